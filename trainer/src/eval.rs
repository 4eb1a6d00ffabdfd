//! Evaluation on the device's own decoder: efficacy, generalisation,
//! locality and retention perplexity before and after, and the gate that
//! decides publication.
//!
//! Principal items: [`Evaluator`], [`AdapterScope`], [`normalise`],
//! [`Scores`], [`Gate`].
//!
//! A correction counts as answered when the greedy answer matches its target
//! exactly or after [`normalise`]; locality compares greedy answers before
//! and after the same way. Retention is the perplexity of a fixed set of
//! texts the base already handles. All run on
//! `nocturne::session` with the candidate adapter applied exactly as the
//! device will apply it, so what is measured is what ships: a scoped
//! adapter only to the questions in its scope ([`AdapterScope`], the rule
//! of `nocturne::recall::scope`). The device
//! profile the evaluation runs under (context length, memory budget) is an
//! argument ([`device_profile`]): the host never uses the profile the
//! `nocturne` library happened to be compiled with.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use nocturne::adapter::LoraAdapter;
use nocturne::ids::AdapterId;
use nocturne::kernels::Kernels;
use nocturne::profile::{Profile, RecallSpec};
use nocturne::recall::encoder::SentenceEncoder;
use nocturne::recall::index::{Entry, Hit, Origin, RecallIndex};
use nocturne::recall::prompt::{DEFAULT_THRESHOLD, PASSAGE_THRESHOLD};
use nocturne::recall::scope::in_adapter_scope;
use nocturne::sampler::SamplerConfig;
use nocturne::session::{perplexity, RequestOptions, Session, SessionOptions};
use nocturne::tokenizer::{ChatMessage, Tokenizer};
use nocturne::weights::ModelPack;

use crate::replay::Example;

/// Lowercase, letters and digits only, single spaces: "Paris." and "paris" match.
pub fn normalise(text: &str) -> String {
    let kept: String = text.chars().map(|c| if c.is_alphanumeric() { c.to_ascii_lowercase() } else { ' ' }).collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Scores of one model (base, or base with an adapter): the three figures
/// of model-editing benchmarks (efficacy, generalisation, locality; Meng et
/// al., "Locating and Editing Factual Associations in GPT" (ROME), NeurIPS
/// 2022, and the MEND/MEMIT line), and retention perplexity.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Scores {
    /// Share of the corrections answered with their target as asked
    /// (exact or normalised), [0, 1].
    pub efficacy: f64,
    /// The same on paraphrases of them that training never saw (None: none written).
    pub generalisation: Option<f64>,
    /// Share of never-taught questions whose answer (greedy, normalised) is
    /// the same as the device's before the night, [0, 1]; 1 for the device itself.
    pub locality: f64,
    /// Perplexity on the retention texts.
    pub retention_perplexity: f64,
}

/// Locality: the share of answers in `after` equal to the answer at the
/// same index of `before` after [`normalise`] (1 when there are none).
pub fn unchanged_share(before: &[String], after: &[String]) -> f64 {
    let same = before.iter().zip(after).filter(|(b, a)| normalise(a) == normalise(b)).count();
    if before.is_empty() { 1.0 } else { same as f64 / before.len() as f64 }
}

/// The share of `true` in `matched` (0 when empty): a match rate.
pub fn share(matched: &[bool]) -> f64 {
    matched.iter().filter(|&&m| m).count() as f64 / matched.len().max(1) as f64
}

/// The publication decision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gate {
    /// Largest allowed relative rise of retention perplexity (default 0.03).
    pub retention_bound: f64,
    /// Smallest allowed locality (default 0.95).
    pub locality_bound: f64,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate { retention_bound: 0.03, locality_bound: 0.95 }
    }
}

impl Gate {
    /// Publish only if efficacy improves, generalisation does not fall,
    /// locality stays at or above its bound, and retention perplexity rises
    /// by no more than its bound. Returns the decision and why.
    pub fn decide(&self, before: &Scores, after: &Scores) -> (bool, String) {
        let rise = after.retention_perplexity / before.retention_perplexity - 1.0;
        if after.efficacy <= before.efficacy {
            return (false, format!("efficacy did not improve ({:.3} → {:.3})", before.efficacy, after.efficacy));
        }
        if let (Some(b), Some(a)) = (before.generalisation, after.generalisation) {
            if a < b {
                return (false, format!("generalisation to unseen paraphrases fell ({b:.3} → {a:.3})"));
            }
        }
        if after.locality < self.locality_bound {
            return (false, format!("locality {:.3} is below its bound {:.3}", after.locality, self.locality_bound));
        }
        if rise > self.retention_bound {
            return (false, format!("retention perplexity rose {:.2}% (bound {:.2}%)", 100.0 * rise, 100.0 * self.retention_bound));
        }
        let generalisation = match (before.generalisation, after.generalisation) {
            (Some(b), Some(a)) => format!(", generalisation {b:.3} → {a:.3}"),
            _ => String::new(),
        };
        (
            true,
            format!(
                "efficacy {:.3} → {:.3}{generalisation}, locality {:.3}, retention perplexity {:+.2}% (bound {:.2}%)",
                before.efficacy,
                after.efficacy,
                after.locality,
                100.0 * rise,
                100.0 * self.retention_bound
            ),
        )
    }
}

/// The firmware profile of the default device class (`firmware-profiles/mid.toml`).
pub const DEFAULT_DEVICE_PROFILE: &str = include_str!("../../firmware-profiles/mid.toml");

/// The device profile to evaluate under: the firmware profile file `file`
/// (as `nocturne` builds take it), or [`DEFAULT_DEVICE_PROFILE`].
///
/// # Errors
/// The file cannot be read or is not a valid profile (the message names the field).
pub fn device_profile(file: Option<&Path>) -> anyhow::Result<Profile> {
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            Profile::from_toml(&text).with_context(|| format!("{}: not a valid firmware profile", path.display()))
        }
        None => Ok(Profile::from_toml(DEFAULT_DEVICE_PROFILE)?),
    }
}

/// The scope of a scoped adapter as a device decides it
/// (`nocturne::recall::scope`): the taught questions, embedded by the
/// device's recall encoder into an index like the device's (the profile's
/// precision and `top_k`), each marked whether the adapter learned it.
pub struct AdapterScope {
    encoder: Arc<SentenceEncoder>,
    index: RecallIndex,
    spec: RecallSpec,
    kernels: Kernels,
}

impl AdapterScope {
    /// The scope of the taught `questions` (the user's wording, each with
    /// whether the adapter learned it), embedded by `encoder`, searched as
    /// the profile's recall memory `spec` searches. Every question is kept
    /// (the index is as large as the list).
    ///
    /// # Errors
    /// The encoder failing on a question.
    pub fn new(encoder: Arc<SentenceEncoder>, spec: &RecallSpec, questions: &[(&str, bool)]) -> anyhow::Result<AdapterScope> {
        let mut index = RecallIndex::new([0; 32], encoder.dimension(), questions.len(), spec.embedding_precision);
        for (i, (question, learned)) in questions.iter().enumerate() {
            let origin = Origin::Taught { interaction: i as u64, feedback: i as u64 };
            let learned_by = learned.then_some(AdapterId([0; 16]));
            index.add(Entry { origin, text: question.to_string(), answer: String::new(), learned_by }, &encoder.embed(question)?);
        }
        Ok(AdapterScope { encoder, index, spec: spec.clone(), kernels: Kernels::detect() })
    }

    /// Whether the adapter answers `question`.
    ///
    /// # Errors
    /// The encoder failing.
    pub fn applies(&self, question: &str) -> anyhow::Result<bool> {
        if question.trim().is_empty() {
            return Ok(false);
        }
        let mut hits: Vec<Hit> = Vec::new();
        let query = self.encoder.embed(question)?;
        self.index.search(&self.kernels, &query, self.spec.top_k as usize, DEFAULT_THRESHOLD.min(PASSAGE_THRESHOLD), &mut hits);
        Ok(in_adapter_scope(hits.iter().map(|h| (&self.index.entries()[h.slot], h.score))))
    }
}

/// Answers and scores with the device decoder.
pub struct Evaluator<'a> {
    session: Session<'a>,
    tokenizer: &'a Tokenizer,
    /// The active adapter's scope (None: it answers every request).
    scope: Option<AdapterScope>,
    /// Longest answer, tokens.
    pub max_new_tokens: usize,
    /// The profile's request limits.
    request: RequestOptions,
}

impl<'a> Evaluator<'a> {
    /// A session on `pack` under the device profile `profile`.
    ///
    /// # Errors
    /// The session cannot start (budget).
    pub fn new(pack: &'a ModelPack, tokenizer: &'a Tokenizer, profile: &Profile) -> anyhow::Result<Evaluator<'a>> {
        let mut options = SessionOptions::for_profile(profile);
        options.all_logits = true;
        let request = RequestOptions::for_profile(profile);
        Ok(Evaluator { session: Session::start(pack, tokenizer, profile, options)?, tokenizer, scope: None, max_new_tokens: 48, request })
    }

    /// Uses `adapter` from now on (`None`: the base model), applied to every
    /// request until [`Evaluator::set_scope`].
    pub fn set_adapter(&mut self, adapter: Option<Arc<LoraAdapter>>) {
        self.session.set_adapter(adapter);
        self.set_scope(None);
    }

    /// Applies the adapter only to the chat questions in `scope` from now on
    /// (`None`: to every request); returns the scope it replaces.
    pub fn set_scope(&mut self, scope: Option<AdapterScope>) -> Option<AdapterScope> {
        self.session.apply_adapter(true);
        std::mem::replace(&mut self.scope, scope)
    }

    /// Applies the adapter to the next requests or sets it aside, as a
    /// device's recall memory decided for them (with no scope set).
    pub fn apply_adapter(&mut self, applied: bool) {
        self.session.apply_adapter(applied);
    }

    /// The greedy answer to an example's context.
    ///
    /// # Errors
    /// Tokenizer or decoder errors.
    pub fn answer(&mut self, example: &Example) -> anyhow::Result<String> {
        self.answer_from(&example.messages, "")
    }

    /// The greedy answer to `messages` when the reply begins with `prefix`
    /// (included in the answer), the adapter applied as its scope says for
    /// the last user message.
    ///
    /// # Errors
    /// Tokenizer or decoder errors.
    pub fn answer_from(&mut self, messages: &[ChatMessage], prefix: &str) -> anyhow::Result<String> {
        if let Some(scope) = &self.scope {
            let question = messages.iter().rev().find(|m| m.role == "user").map_or("", |m| m.content.as_str());
            self.session.apply_adapter(scope.applies(question)?);
        }
        let mut ids = self.tokenizer.encode_chat(messages, true)?;
        ids.extend(self.tokenizer.encode(prefix)?);
        let mut options = self.request.clone();
        options.max_new_tokens = self.max_new_tokens;
        options.deadline = std::time::Duration::from_secs(600);
        self.session.generate(&ids, &options, &mut |_| {})?;
        Ok(format!("{prefix}{}", self.session.reply_text()).trim().to_string())
    }

    /// A continuation of raw text `prompt` (no chat template), sampled with
    /// `sampler`, at most `max_new_tokens`, cut before the first `stop`.
    ///
    /// # Errors
    /// Tokenizer or decoder errors.
    pub fn continue_text(&mut self, prompt: &str, stop: &str, max_new_tokens: usize, sampler: SamplerConfig) -> anyhow::Result<String> {
        let ids = self.tokenizer.encode(prompt)?;
        // A raw prompt has no question to scope: the device applies the adapter.
        self.session.apply_adapter(true);
        let mut options = self.request.clone();
        options.max_new_tokens = max_new_tokens;
        options.deadline = std::time::Duration::from_secs(600);
        options.stop = vec![stop.to_string()];
        options.sampler = sampler;
        self.session.generate(&ids, &options, &mut |_| {})?;
        Ok(self.session.reply_text().trim().to_string())
    }

    /// The greedy answer to each of `contexts` (chat messages, the question last).
    ///
    /// # Errors
    /// As [`Evaluator::answer`].
    pub fn answers(&mut self, contexts: &[Vec<ChatMessage>]) -> anyhow::Result<Vec<String>> {
        contexts.iter().map(|m| self.answer_from(m, "")).collect()
    }

    /// Share of `examples` answered with their target.
    ///
    /// # Errors
    /// As [`Evaluator::answer`].
    pub fn match_rate(&mut self, examples: &[&Example]) -> anyhow::Result<f64> {
        Ok(share(&self.matches(examples)?))
    }

    /// For each of `examples`, whether it is answered with its target (exact or normalised).
    ///
    /// # Errors
    /// As [`Evaluator::answer`].
    pub fn matches(&mut self, examples: &[&Example]) -> anyhow::Result<Vec<bool>> {
        examples
            .iter()
            .map(|e| {
                let answer = self.answer(e)?;
                Ok(answer == e.target || normalise(&answer) == normalise(&e.target))
            })
            .collect()
    }

    /// Perplexity over `texts` (token-weighted), each cut to the context,
    /// with the adapter applied whatever its scope (text has no question to
    /// scope, and this is the larger change).
    ///
    /// # Errors
    /// Tokenizer or decoder errors.
    pub fn perplexity(&mut self, texts: &[String]) -> anyhow::Result<f64> {
        self.session.apply_adapter(true);
        let (mut log_sum, mut count) = (0.0, 0usize);
        for text in texts {
            let mut ids = self.tokenizer.encode(text)?;
            ids.truncate(self.session.decoder().capacity().min(512));
            if ids.len() < 2 {
                continue;
            }
            let ppl = perplexity(self.session.decoder(), &ids)?;
            log_sum += ppl.ln() * (ids.len() - 1) as f64;
            count += ids.len() - 1;
        }
        self.session.reset();
        Ok((log_sum / count.max(1) as f64).exp())
    }
}
