//! The scenario's data, from pinned PyPI packages: question/answer pairs of
//! `chatterbot-corpus==1.3.3` (English, all categories) and dialogues of
//! `chitchat-dataset==0.9.0` (held-out text for retention perplexity).
//!
//! Principal items: [`CHATTERBOT`], [`CHITCHAT`], [`chatterbot_pairs`],
//! [`parse_conversations`], [`chitchat_dialogues`].

use std::path::Path;

use anyhow::Context;

use nocturne_trainer::fetch::{download_pinned, read_member};

/// A pinned wheel.
pub struct Pin {
    /// PyPI package.
    pub package: &'static str,
    /// Version.
    pub version: &'static str,
    /// Wheel file name.
    pub wheel: &'static str,
    /// Its sha256.
    pub sha256: &'static str,
}

/// chatterbot-corpus 1.3.3.
pub const CHATTERBOT: Pin = Pin {
    package: "chatterbot-corpus",
    version: "1.3.3",
    wheel: "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    sha256: "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
};

/// chitchat-dataset 0.9.0.
pub const CHITCHAT: Pin = Pin {
    package: "chitchat-dataset",
    version: "0.9.0",
    wheel: "chitchat_dataset-0.9.0-py3-none-any.whl",
    sha256: "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
};

impl Pin {
    /// Downloads (once) and verifies the wheel into `downloads`.
    ///
    /// # Errors
    /// As [`download_pinned`].
    pub fn fetch(&self, downloads: &Path, python: &str) -> anyhow::Result<std::path::PathBuf> {
        download_pinned(self.package, self.version, self.wheel, self.sha256, downloads, python)
    }
}

fn unquote(text: &str) -> String {
    let t = text.trim();
    let inner = t
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .or_else(|| t.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))
        .unwrap_or(t);
    inner.replace("''", "'")
}

/// The conversations of one chatterbot corpus file: its YAML subset is a
/// `conversations:` list whose items start with `- - ` and continue with
/// `  - `; longer lines continue indented. Returns each conversation's
/// utterances.
pub fn parse_conversations(yaml: &str) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut inside = false;
    for line in yaml.lines() {
        if line.starts_with("conversations:") {
            inside = true;
            continue;
        }
        if !inside || line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("- - ") {
            out.push(vec![unquote(rest)]);
        } else if let Some(rest) = line.strip_prefix("  - ") {
            if let Some(c) = out.last_mut() {
                c.push(unquote(rest));
            }
        } else if line.starts_with("    ") {
            if let Some(last) = out.last_mut().and_then(|c| c.last_mut()) {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else if !line.starts_with(' ') {
            inside = false;
        }
    }
    out
}

/// Question/answer pairs of the English corpus, all categories: the first
/// two utterances of each conversation; for a question asked more than
/// once, its first answer. In file order.
///
/// # Errors
/// The wheel cannot be read.
pub fn chatterbot_pairs(wheel: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let file = std::fs::File::open(wheel).with_context(|| format!("cannot read {}", wheel.display()))?;
    let archive = zip::ZipArchive::new(file).with_context(|| format!("{}: not a zip archive", wheel.display()))?;
    let mut names: Vec<String> = archive.file_names().filter(|n| n.contains("/data/english/") && n.ends_with(".yml")).map(String::from).collect();
    names.sort();
    let mut seen = std::collections::HashSet::new();
    let mut pairs = Vec::new();
    for name in names {
        let text = String::from_utf8_lossy(&read_member(wheel, &name)?).into_owned();
        for conversation in parse_conversations(&text) {
            if let [q, a, ..] = conversation.as_slice() {
                if !q.is_empty() && !a.is_empty() && seen.insert(q.to_lowercase()) {
                    pairs.push((q.clone(), a.clone()));
                }
            }
        }
    }
    Ok(pairs)
}

/// The first `n` dialogues of the chitchat dataset (sorted by id), each as
/// text with one `A:`/`B:` line per turn.
///
/// # Errors
/// The wheel cannot be read or its dataset is not the expected JSON.
pub fn chitchat_dialogues(wheel: &Path, n: usize) -> anyhow::Result<Vec<String>> {
    let bytes = read_member(wheel, "chitchat_dataset/dataset.json")?;
    let data: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes).context("chitchat dataset.json is not a JSON object")?;
    let mut ids: Vec<&String> = data.keys().collect();
    ids.sort();
    let mut out = Vec::new();
    for id in ids.into_iter().take(n) {
        let turns = data[id]["messages"].as_array().with_context(|| format!("dialogue {id} has no messages"))?;
        let text: Vec<String> = turns
            .iter()
            .enumerate()
            .map(|(i, turn)| {
                let said: Vec<&str> = turn.as_array().map(|m| m.iter().filter_map(|x| x["text"].as_str()).collect()).unwrap_or_default();
                format!("{}: {}", if i % 2 == 0 { "A" } else { "B" }, said.join(" "))
            })
            .collect();
        out.push(text.join("\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_corpus_yaml_subset() {
        let yaml = "categories:\n- AI\nconversations:\n- - What is AI?\n  - Artificial Intelligence is the branch\n    of engineering.\n- - 'Are you sentient?'\n  - Sort of.\n  - Really?\n";
        let c = super::parse_conversations(yaml);
        assert_eq!(c, vec![
            vec!["What is AI?".to_string(), "Artificial Intelligence is the branch of engineering.".into()],
            vec!["Are you sentient?".into(), "Sort of.".into(), "Really?".into()],
        ]);
    }
}
