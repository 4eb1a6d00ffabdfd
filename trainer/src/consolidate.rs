//! One consolidation run, end to end: journals → replay buffer → LoRA
//! training → evaluation on the device decoder → gate → signed adapter
//! bundle (and PEFT copy) → `report.json`.
//!
//! Principal items: [`NightConfig`], [`consolidate`], [`Report`],
//! [`journal_dirs`], [`retention_texts`].
//!
//! Every correction is trained on, in the night after it was acknowledged.
//! The evidence that the adapter generalises comes from paraphrases instead
//! of held-out corrections: at the start of the night the device's current
//! model writes paraphrases of each corrected question
//! ([`crate::paraphrase`]); all but one are trained on with the user's
//! answer, and the last, which training never sees, is the gate's
//! generalisation set. Paraphrases are
//! written once per correction: a store keeps them for later nights
//! ([`crate::paraphrase::ParaphraseCache`]). Each question is also trained
//! on in a few other surroundings ([`crate::paraphrase::framings`]). On a
//! later night, the corrections the previous adapter already answers as
//! taught are drawn [`KNOWN_WEIGHT`] times as often as their priority says,
//! so the night's steps go mostly to the new ones. Locality is measured on
//! questions nobody taught: the built-in general questions
//! ([`GENERAL_QUESTIONS`]) and the device's own unrated interactions ([`crate::replay::ReplayBuffer::untaught`]),
//! alternately split into a part the gate uses and a part only the report
//! gives ([`locality_probes`]). The gate ([`crate::eval::Gate`]) requires
//! efficacy to improve, generalisation not to fall, locality to stay at or
//! above its bound, and retention perplexity within its bound. A rejected
//! adapter is still written, under `rejected/`, so it can be inspected.
//!
//! Given the devices' recall encoder ([`NightSources::encoder`]), a
//! paraphrase must also be close to its question in the encoder's
//! embedding ([`crate::paraphrase::ParaphraseConfig::min_similarity`]), and the
//! adapter is scoped (`nocturne::recall::scope`): the corrections it
//! answers as taught, asked with the adapter on every request, are the ones
//! it learned; then generalisation, locality and efficacy are measured with
//! the adapter applied only in the scope of what it learned, as the device
//! will apply it, and the manifest says `"scope": "learned"`. The answers
//! before the night are the device's too: a scoped previous adapter applies
//! in the scope of what its manifest lists.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device};
use ed25519_dalek::SigningKey;
use nocturne::adapter::{LoraAdapter, SCOPE_LEARNED};
use nocturne::profile::Profile;
use nocturne::recall::encoder::SentenceEncoder;
use nocturne::tokenizer::{ChatMessage, Tokenizer, DEFAULT_SYSTEM_PROMPT};
use nocturne::weights::{ModelPack, TOKENIZER_FILE};
use serde::Serialize;

use crate::eval::{normalise, share, unchanged_share, AdapterScope, Evaluator, Gate, Scores};
use crate::export::{export_adapter, AdapterPrecision};
use crate::llama::{BaseModel, Lora};
use crate::paraphrase::{framings, paraphrases, ParaphraseCache, ParaphraseConfig};
use crate::replay::{Example, PriorityWeights, ReplayBuffer, ReplayReport};
use crate::train::{rehearsal_samples, train, Retention, TrainConfig};

/// The built-in retention set: general text and dialogue the base handles.
pub const RETENTION_TEXT: &str = include_str!("../data/retention.txt");

/// General-knowledge questions, one per line, that no night teaches: what
/// a device's model answers to them must not change (locality).
pub const GENERAL_QUESTIONS: &str = include_str!("../data/general_questions.txt");

/// How many questions [`GENERAL_QUESTIONS`] holds.
pub fn general_question_count() -> usize {
    general_questions().count()
}

fn general_questions() -> impl Iterator<Item = &'static str> {
    GENERAL_QUESTIONS.lines().map(str::trim).filter(|q| !q.is_empty())
}

/// The locality probes of a night: the first `general` of the
/// [`GENERAL_QUESTIONS`] (asked under the default system prompt) and
/// `untaught` (contexts of unrated interactions), alternately split into
/// (gate part, report part).
pub fn locality_probes(untaught: &[Vec<ChatMessage>], general: usize) -> (Vec<Vec<ChatMessage>>, Vec<Vec<ChatMessage>>) {
    let general = general_questions().take(general).map(|q| vec![ChatMessage::new("system", DEFAULT_SYSTEM_PROMPT), ChatMessage::new("user", q)]);
    let (mut gate, mut report) = (Vec::new(), Vec::new());
    for (i, probe) in general.chain(untaught.iter().cloned()).enumerate() {
        if i % 2 == 0 { gate.push(probe) } else { report.push(probe) }
    }
    (gate, report)
}

/// The sampling weight, relative to its priority, of a correction (and of
/// its paraphrases) that the model a night starts from already answers as
/// taught.
pub const KNOWN_WEIGHT: f32 = 1.0 / 3.0;

/// Multiplies by [`KNOWN_WEIGHT`] the priority of every example of
/// `training` (the corrections, their paraphrases and framings) whose
/// correction `corrections[i]` the starting model answers as taught
/// (`known[i]`); a correction is the pair (device, interaction).
fn weigh_down_known(training: &mut [Example], corrections: &[&Example], known: &[bool]) {
    let known: std::collections::HashSet<_> = corrections.iter().zip(known).filter(|(_, &k)| k).map(|(e, _)| (e.device, e.interaction)).collect();
    for e in training.iter_mut().filter(|e| e.corrected && known.contains(&(e.device, e.interaction))) {
        e.priority *= KNOWN_WEIGHT;
    }
}

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
    /// Paraphrases of corrected questions.
    pub paraphrase: ParaphraseConfig,
    /// How many of the [`GENERAL_QUESTIONS`] the locality probes ask (all
    /// of them, [`general_question_count`], for a night that publishes; each
    /// costs two greedy answers, before and after).
    pub general_questions: usize,
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
    pub before: Scores,
    /// Scores with it.
    pub after: Scores,
    /// Locality on the report part of the probes (the gate never sees it).
    pub locality_report: f64,
    /// Locality probes: (gate part, report part).
    pub locality_probes: (usize, usize),
    /// The probes whose answer changed, with both answers.
    pub locality_changes: Vec<LocalityChange>,
    /// The paraphrases the night wrote, per corrected question.
    pub paraphrases: Vec<Paraphrased>,
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

/// A never-taught question whose answer the candidate changed.
#[derive(Clone, Debug, Serialize)]
pub struct LocalityChange {
    /// The part of the probes it belongs to: `gate` or `report`.
    pub part: &'static str,
    /// The question.
    pub question: String,
    /// The answer before the night.
    pub before: String,
    /// The candidate's answer.
    pub after: String,
}

/// The paraphrases written for one corrected question.
#[derive(Clone, Debug, Serialize)]
pub struct Paraphrased {
    /// The question as the user asked it.
    pub question: String,
    /// Paraphrases trained on.
    pub trained: Vec<String>,
    /// The paraphrase the gate asks (None: fewer than two were found, and all are trained on).
    pub gate: Option<String>,
    /// The question in other surroundings, trained on ([`crate::paraphrase::framings`]).
    pub framings: Vec<String>,
}

/// The journal directories of a host store (`devices/*`; none in a store
/// no device has delivered to yet), and the given ones.
///
/// # Errors
/// The store cannot be listed (or is not a store: neither `devices/` nor
/// `trainer.key`).
pub fn journal_dirs(store: Option<&Path>, journals: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = journals.to_vec();
    if let Some(store) = store.filter(|s| s.join("devices").exists() || !s.join("trainer.key").exists()) {
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
    /// The devices' recall encoder directory (`encoder.onnx` +
    /// `tokenizer.json`): the adapter is scoped (module docs). None: it
    /// applies to every request.
    pub encoder: Option<&'a Path>,
    /// Where the paraphrases of earlier nights are kept and tonight's are
    /// added (a store's `paraphrases.json`, [`ParaphraseCache`]); None:
    /// every correction is paraphrased again.
    pub paraphrase_cache: Option<&'a Path>,
}

/// Runs one consolidation of `sources`, writing into `out` (published
/// bundle and PEFT copy, or under `rejected/`, and `report.json`).
///
/// # Errors
/// Unreadable journals or pack; no training example; training, evaluation
/// or export failures.
pub fn consolidate(sources: NightSources<'_>, out: &Path, config: &NightConfig, progress: &mut dyn FnMut(usize, f32, f64)) -> anyhow::Result<Report> {
    let NightSources { journals: dirs, base: base_dir, previous, key, retention, encoder, paraphrase_cache } = sources;
    let started = std::time::Instant::now();
    let pack = ModelPack::open(base_dir)?;
    let tokenizer = Tokenizer::from_file(&base_dir.join(TOKENIZER_FILE))?;
    let buffer = ReplayBuffer::build(dirs, config.weights)?;
    let trainer_key = key.verifying_key();
    let previous_adapter = previous.map(|p| LoraAdapter::open(p, &pack, &trainer_key)).transpose()?.map(Arc::new);
    // The device as it is: it writes the paraphrases and gives the answers
    // locality is measured against.
    let mut evaluator = Evaluator::new(&pack, &tokenizer, &config.device)?;
    evaluator.set_adapter(previous_adapter.clone());
    let encoder = encoder
        .map(|dir| SentenceEncoder::load(dir, config.device.recall.max_sequence_tokens as usize).with_context(|| format!("cannot load the recall encoder in {}", dir.display())))
        .transpose()?;
    let encoder = encoder.map(Arc::new);
    let corrections: Vec<&Example> = buffer.examples.iter().filter(|e| e.corrected).collect();
    let mut training = buffer.examples.clone();
    let (mut unseen, mut paraphrased) = (Vec::new(), Vec::new());
    let wanted = config.paraphrase.wanted;
    let mut cache = paraphrase_cache.filter(|_| wanted > 0).map(ParaphraseCache::open).transpose()?;
    let mut written = 0;
    for e in &corrections {
        let question = e.messages.last().map_or("", |m| m.content.as_str());
        let mut found = match cache.as_ref().and_then(|c| c.get(e.device, e.interaction, question, wanted)) {
            Some(found) => found,
            None => {
                let found = paraphrases(&mut evaluator, encoder.as_deref(), question, &config.paraphrase, config.train.seed ^ e.interaction)?;
                if let Some(cache) = cache.as_mut() {
                    cache.insert(e.device, e.interaction, question, wanted, &found);
                    written += 1;
                }
                found
            }
        };
        let gate = if found.len() >= 2 { found.pop() } else { None };
        let framed = framings(question, config.paraphrase.framings, config.train.seed ^ e.interaction);
        // The paraphrases and framings together weigh as much as the question as asked.
        let weight = e.priority / (found.len() + framed.len()).max(1) as f32;
        training.extend(found.iter().chain(&framed).map(|p| e.reworded(p, weight)));
        unseen.extend(gate.iter().map(|p| e.reworded(p, e.priority)));
        paraphrased.push(Paraphrased { question: question.to_string(), trained: found, gate, framings: framed });
    }
    if let Some(cache) = cache.as_ref().filter(|_| written > 0) {
        cache.save()?;
    }
    let unseen: Vec<&Example> = unseen.iter().collect();
    let questions: Vec<&str> = corrections.iter().map(|e| e.messages.last().map_or("", |m| m.content.as_str())).collect();
    // A scoped previous adapter answers what its manifest lists, as on the device.
    if let (Some(encoder), Some(previous)) = (&encoder, &previous_adapter) {
        if previous.manifest().scoped() {
            let listed = |e: &Example| previous.manifest().learned(e.device).contains(&e.interaction);
            let taught: Vec<(&str, bool)> = questions.iter().zip(&corrections).map(|(q, e)| (*q, listed(e))).collect();
            evaluator.set_scope(Some(AdapterScope::new(encoder.clone(), &config.device.recall, &taught)?));
        }
    }
    let (gate_probes, report_probes) = locality_probes(&buffer.untaught, config.general_questions);
    let (gate_answers, report_answers) = (evaluator.answers(&gate_probes)?, evaluator.answers(&report_probes)?);
    let score = |evaluator: &mut Evaluator<'_>, efficacy: f64, locality: f64| -> anyhow::Result<Scores> {
        Ok(Scores {
            efficacy,
            generalisation: if unseen.is_empty() { None } else { Some(evaluator.match_rate(&unseen)?) },
            locality,
            retention_perplexity: evaluator.perplexity(retention)?,
        })
    };
    let known = evaluator.matches(&corrections)?;
    let before = score(&mut evaluator, share(&known), 1.0)?;
    // What the starting model already answers as taught (on a later night,
    // what earlier nights taught) is drawn a third as often, so that the
    // steps go mostly to what is new, while everything is still trained on
    // (prioritised replay: Schaul et al., ICLR 2016, sample by how much is
    // left to learn).
    weigh_down_known(&mut training, &corrections, &known);
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
    let training = ReplayBuffer { examples: training, untaught: Vec::new(), report: buffer.report.clone() };
    let outcome = train(&base, &tokenizer, &training, warm, Retention { reference: &reference, rehearsal: &rehearsal }, t, progress)?;
    drop(base);
    // Evaluate the candidate as the device will run it.
    let staging = out.join(".staging");
    let _ = std::fs::remove_dir_all(&staging);
    let mut description = serde_json::json!({
        "examples": buffer.examples.len(),
        "trained_on": training.examples.len(),
        "first_interaction_ms": buffer.examples.iter().map(|e| e.time_ms).min(),
        "last_interaction_ms": buffer.examples.iter().map(|e| e.time_ms).max(),
    });
    let parent = previous_adapter.as_ref().map(|a| a.id());
    let exported = export_adapter(&staging, key, &outcome.lora, &pack, parent, &description.to_string(), config.precision)?;
    let candidate = Arc::new(LoraAdapter::open(&exported.bundle, &pack, &trainer_key)?);
    evaluator.set_adapter(Some(candidate));
    // The corrections it answers as taught: the device's recall memory stops
    // injecting them while this adapter is active, and they are its scope.
    let learned = evaluator.matches(&corrections)?;
    let scoped = match encoder {
        Some(encoder) => {
            let taught: Vec<(&str, bool)> = questions.iter().copied().zip(learned.iter().copied()).collect();
            evaluator.set_scope(Some(AdapterScope::new(encoder, &config.device.recall, &taught)?));
            true
        }
        None => false,
    };
    let (gate_after, report_after) = (evaluator.answers(&gate_probes)?, evaluator.answers(&report_probes)?);
    let (locality, locality_report) = (unchanged_share(&gate_answers, &gate_after), unchanged_share(&report_answers, &report_after));
    // Every answer that changed, for the report: what the damage is.
    let locality_changes: Vec<LocalityChange> = [("gate", &gate_probes, &gate_answers, &gate_after), ("report", &report_probes, &report_answers, &report_after)]
        .into_iter()
        .flat_map(|(part, probes, before, after)| {
            probes.iter().zip(before.iter().zip(after)).filter(|(_, (b, a))| normalise(a) != normalise(b)).map(move |(p, (b, a))| LocalityChange {
                part,
                question: p.last().map_or(String::new(), |m| m.content.clone()),
                before: b.clone(),
                after: a.clone(),
            })
        })
        .collect();
    let efficacy = evaluator.match_rate(&corrections)?;
    let after = score(&mut evaluator, efficacy, locality)?;
    let learned: Vec<serde_json::Value> = corrections
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
    description["before"] = serde_json::to_value(before)?;
    description["after"] = serde_json::to_value(after)?;
    description["published"] = published.into();
    description["decision"] = decision.clone().into();
    description["learned"] = learned.into();
    if scoped {
        description["scope"] = SCOPE_LEARNED.into();
    }
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
        before,
        after,
        locality_report,
        locality_probes: (gate_probes.len(), report_probes.len()),
        locality_changes,
        paraphrases: paraphrased,
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
    use crate::replay::Example;

    #[test]
    fn what_the_starting_model_answers_is_drawn_less_often_and_still_trained_on() {
        let correction = |interaction: u64, question: &str| Example {
            device: Default::default(),
            interaction,
            time_ms: 0,
            messages: vec![nocturne::tokenizer::ChatMessage::new("user", question)],
            target: "taught".into(),
            reply: String::new(),
            corrected: true,
            implicit: 0.0,
            explicit: 1.0,
            priority: 0.3,
        };
        let (old, new) = (correction(1, "Old?"), correction(2, "New?"));
        let mut approved = correction(1, "Old?");
        approved.corrected = false;
        let mut training = vec![old.clone(), new.clone(), old.reworded("Old, again?", 0.15), new.reworded("New, again?", 0.15), approved];
        super::weigh_down_known(&mut training, &[&old, &new], &[true, false]);
        let priorities: Vec<f32> = training.iter().map(|e| e.priority).collect();
        assert_eq!(priorities, [0.3 * super::KNOWN_WEIGHT, 0.3, 0.15 * super::KNOWN_WEIGHT, 0.15, 0.3]);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(super::day(0), "1970-01-01");
        assert_eq!(super::day(951_782_400_000), "2000-02-29");
        assert_eq!(super::day(1_795_252_306_838), "2026-11-21");
    }
}
