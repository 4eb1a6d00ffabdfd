//! One consolidation run, end to end: journals → replay buffer → LoRA
//! training → evaluation on the device decoder → gate → signed adapter
//! bundle (and PEFT copy) → `report.json`.
//!
//! Principal items: [`NightConfig`], [`consolidate`], [`Report`],
//! [`journal_dirs`], [`retention_texts`].
//!
//! Split: with at least [`MIN_CORRECTIONS_TO_HOLD_OUT`] corrections, those
//! whose interaction LSN is a multiple of 5 ([`is_held_out`]) are held out of training. The
//! gate ([`crate::eval::Gate`]) requires the match rate on the trained
//! corrections to improve, the held-out match rate not to fall, and the
//! retention perplexity to stay within its bound. A rejected adapter is still written, under
//! `rejected/`, so it can be inspected.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device};
use ed25519_dalek::SigningKey;
use nocturne::adapter::LoraAdapter;
use nocturne::profile::Profile;
use nocturne::tokenizer::Tokenizer;
use nocturne::weights::{ModelPack, TOKENIZER_FILE};
use serde::Serialize;

use crate::train::{rehearsal_samples, train, Retention, TrainConfig};
use crate::eval::{Evaluator, Gate, Scores};
use crate::export::{export_adapter, AdapterPrecision};
use crate::llama::{BaseModel, Lora};
use crate::replay::{PriorityWeights, ReplayBuffer, ReplayReport};

/// Fewest corrections before some are held out of training for the gate.
pub const MIN_CORRECTIONS_TO_HOLD_OUT: usize = 10;

/// Whether a correction of the interaction at LSN `interaction` is held out
/// of training (when there are enough corrections): every fifth LSN.
pub fn is_held_out(interaction: u64) -> bool {
    interaction.is_multiple_of(5)
}

/// The built-in retention set: general text and dialogue the base handles.
pub const RETENTION_TEXT: &str = include_str!("../data/retention.txt");

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct NightConfig {
    /// Training settings.
    pub train: TrainConfig,
    /// Priority weights.
    pub weights: PriorityWeights,
    /// The publication gate.
    pub gate: Gate,
    /// Precision of the device bundle.
    pub precision: AdapterPrecision,
    /// The device profile the evaluation runs under ([`crate::eval::device_profile`]).
    pub device: Profile,
}

/// Everything a run measured, as written to `report.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Replay-buffer counts.
    pub replay: ReplayReport,
    /// Priority of every example.
    pub priorities: Vec<f32>,
    /// Examples (interactions with usable feedback) per day of the interaction (UTC date, count).
    pub examples_per_day: Vec<(String, usize)>,
    /// Task loss per step.
    pub losses: Vec<f32>,
    /// Training throughput, tokens per second.
    pub tokens_per_second: f64,
    /// Training wall time, seconds.
    pub train_seconds: f64,
    /// Whole run wall time, seconds.
    pub total_seconds: f64,
    /// Scores without the new adapter (base, or the previous adapter).
    pub before: ScoresJson,
    /// Scores with it.
    pub after: ScoresJson,
    /// Whether the gate used held-out examples.
    pub held_out: bool,
    /// The decision.
    pub published: bool,
    /// Why.
    pub decision: String,
    /// The adapter's id and where it went.
    pub adapter: String,
    /// Device bundle directory.
    pub bundle: PathBuf,
    /// PEFT directory.
    pub peft: PathBuf,
    /// Size of the adapter weights file, bytes.
    pub adapter_bytes: u64,
    /// LoRA settings.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f32,
    /// MAS weight.
    pub mas_lambda: f64,
    /// Rehearsal weight.
    pub rehearsal_weight: f64,
    /// Rehearsal divergence per step.
    pub divergences: Vec<f32>,
    /// Precision of the device bundle.
    pub precision: AdapterPrecision,
}

/// [`Scores`] for JSON.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ScoresJson {
    /// Match rate on the trained corrections.
    pub task: f64,
    /// Match rate on held-out corrections.
    pub held_out: Option<f64>,
    /// Retention perplexity.
    pub retention_perplexity: f64,
}

impl From<Scores> for ScoresJson {
    fn from(s: Scores) -> ScoresJson {
        ScoresJson { task: s.task, held_out: s.held_out, retention_perplexity: s.retention_perplexity }
    }
}

/// The journal directories of a host store (`devices/*`), or the given ones.
///
/// # Errors
/// The store cannot be listed.
pub fn journal_dirs(store: Option<&Path>, journals: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = journals.to_vec();
    if let Some(store) = store {
        let devices = store.join("devices");
        for entry in std::fs::read_dir(&devices).with_context(|| format!("cannot list {}", devices.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            }
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Retention texts: paragraphs (blank-line separated) of `files`, or of the
/// built-in set when there are none.
///
/// # Errors
/// A file cannot be read.
pub fn retention_texts(files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut text = String::new();
    for f in files {
        text.push_str(&std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?);
        text.push_str("\n\n");
    }
    if files.is_empty() {
        text.push_str(RETENTION_TEXT);
    }
    Ok(text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect())
}

fn day(ms: u64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = (ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{m:02}-{d:02}", yoe + era * 400 + i64::from(m <= 2))
}

/// What a night consolidates, and with which keys and texts.
#[derive(Clone, Copy)]
pub struct NightSources<'a> {
    /// Journal directories (a device's `journal/`, a store's `devices/<id>/`).
    pub journals: &'a [PathBuf],
    /// The base model pack directory.
    pub base: &'a Path,
    /// The adapter bundle to continue from (None: the bare base).
    pub previous: Option<&'a Path>,
    /// The trainer's signing key.
    pub key: &'a SigningKey,
    /// Retention texts (the gate's perplexity set, the MAS reference prompts).
    pub retention: &'a [String],
}

/// Runs one consolidation of `sources`, writing into `out` (published
/// bundle and PEFT copy, or under `rejected/`, and `report.json`).
///
/// # Errors
/// Unreadable journals or pack; no training example; training, evaluation
/// or export failures.
pub fn consolidate(sources: NightSources<'_>, out: &Path, config: &NightConfig, progress: &mut dyn FnMut(usize, f32, f64)) -> anyhow::Result<Report> {
    let NightSources { journals: dirs, base: base_dir, previous, key, retention } = sources;
    let started = std::time::Instant::now();
    let pack = ModelPack::open(base_dir)?;
    let tokenizer = Tokenizer::from_file(&base_dir.join(TOKENIZER_FILE))?;
    let buffer = ReplayBuffer::build(dirs, config.weights)?;
    // Hold out every fifth corrected interaction (by LSN) when there are
    // enough corrections for that to mean something.
    let corrected: Vec<usize> = (0..buffer.examples.len()).filter(|&i| buffer.examples[i].corrected).collect();
    let held_out_set: Vec<usize> =
        if corrected.len() >= MIN_CORRECTIONS_TO_HOLD_OUT { corrected.iter().copied().filter(|&i| is_held_out(buffer.examples[i].interaction)).collect() } else { Vec::new() };
    let train_set: Vec<usize> = (0..buffer.examples.len()).filter(|i| !held_out_set.contains(i)).collect();
    let taught: Vec<usize> = train_set.iter().copied().filter(|&i| buffer.examples[i].corrected).collect();
    let trainer_key = key.verifying_key();
    let previous_adapter = previous.map(|p| LoraAdapter::open(p, &pack, &trainer_key)).transpose()?.map(Arc::new);
    let base = BaseModel::from_pack(&pack, DType::F32, &Device::Cpu, config.train.max_tokens.max(64))?;
    let warm = previous_adapter.as_ref().map(|a| Lora::from_adapter(&base, a)).transpose()?;
    let reference: Vec<Vec<u32>> = retention
        .iter()
        .map(|t| tokenizer.encode(t).map(|mut ids| {
            ids.truncate(48);
            ids
        }))
        .collect::<Result<_, _>>()?;
    let t = &config.train;
    let rehearsal = if t.rehearsal_weight > 0.0 { rehearsal_samples(&pack, previous_adapter.clone(), &tokenizer, t.rehearsal_sequences, t.rehearsal_tokens, t.seed)? } else { Vec::new() };
    let outcome = train(&base, &tokenizer, &buffer.subset(&train_set), warm, Retention { reference: &reference, rehearsal: &rehearsal }, t, progress)?;
    drop(base);
    // Evaluate before (the device as it is) and after (with the candidate).
    let staging = out.join(".staging");
    let _ = std::fs::remove_dir_all(&staging);
    let mut description = serde_json::json!({
        "examples": buffer.examples.len(),
        "trained_on": train_set.len(),
        "first_interaction_ms": buffer.examples.iter().map(|e| e.time_ms).min(),
        "last_interaction_ms": buffer.examples.iter().map(|e| e.time_ms).max(),
    });
    let parent = previous_adapter.as_ref().map(|a| a.id());
    let exported = export_adapter(&staging, key, &outcome.lora, &pack, parent, &description.to_string(), config.precision)?;
    let candidate = Arc::new(LoraAdapter::open(&exported.bundle, &pack, &trainer_key)?);
    let taught: Vec<_> = taught.iter().map(|&i| &buffer.examples[i]).collect();
    let held: Vec<_> = held_out_set.iter().map(|&i| &buffer.examples[i]).collect();
    let mut evaluator = Evaluator::new(&pack, &tokenizer, &config.device)?;
    let mut score = |adapter: Option<Arc<LoraAdapter>>| -> anyhow::Result<(Scores, Vec<bool>)> {
        evaluator.set_adapter(adapter);
        let matched = evaluator.matches(&taught)?;
        let task = matched.iter().filter(|&&m| m).count() as f64 / matched.len().max(1) as f64;
        let scores = Scores {
            task: if taught.is_empty() { 0.0 } else { task },
            held_out: if held.is_empty() { None } else { Some(evaluator.match_rate(&held)?) },
            retention_perplexity: evaluator.perplexity(retention)?,
        };
        Ok((scores, matched))
    };
    let (before, _) = score(previous_adapter.clone())?;
    let (after, learned) = score(Some(Arc::clone(&candidate)))?;
    // The corrections the adapter answers as taught: the device's recall
    // memory stops injecting them while this adapter is active.
    let learned: Vec<serde_json::Value> = taught
        .iter()
        .zip(&learned)
        .filter(|(_, &m)| m)
        .map(|(e, _)| serde_json::json!({"device": e.device.to_string(), "interaction": e.interaction}))
        .collect();
    drop(evaluator);
    let (published, decision) = config.gate.decide(&before, &after);
    // The bundle that leaves is signed again with the evaluation in its
    // manifest (same weights, so the same adapter id).
    let _ = std::fs::remove_dir_all(&staging);
    description["before"] = serde_json::to_value(ScoresJson::from(before))?;
    description["after"] = serde_json::to_value(ScoresJson::from(after))?;
    description["published"] = published.into();
    description["decision"] = decision.clone().into();
    description["learned"] = learned.into();
    let target = if published { out.to_path_buf() } else { out.join("rejected") };
    let exported = export_adapter(&target, key, &outcome.lora, &pack, parent, &description.to_string(), config.precision)?;
    let (bundle, peft) = (exported.bundle, exported.peft);
    let adapter_bytes = std::fs::metadata(bundle.join(nocturne::adapter::ADAPTER_WEIGHTS_FILE))?.len();
    let mut per_day = std::collections::BTreeMap::<String, usize>::new();
    for e in &buffer.examples {
        *per_day.entry(day(e.time_ms)).or_default() += 1;
    }
    let report = Report {
        replay: buffer.report.clone(),
        priorities: buffer.examples.iter().map(|e| e.priority).collect(),
        examples_per_day: per_day.into_iter().collect(),
        losses: outcome.losses,
        tokens_per_second: outcome.tokens_per_second,
        train_seconds: outcome.seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        before: before.into(),
        after: after.into(),
        held_out: !held_out_set.is_empty(),
        published,
        decision,
        adapter: exported.id.to_string(),
        bundle,
        peft,
        adapter_bytes,
        rank: outcome.lora.rank(),
        alpha: outcome.lora.alpha(),
        mas_lambda: config.train.mas_lambda,
        rehearsal_weight: config.train.rehearsal_weight,
        divergences: outcome.divergences,
        precision: config.precision,
    };
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::day(0), "1970-01-01");
        assert_eq!(super::day(951_782_400_000), "2000-02-29");
        assert_eq!(super::day(1_795_252_306_838), "2026-11-21");
    }
}
