//! Paraphrases of corrected questions, written at the start of a night by
//! the device's own model on the device decoder, so that the adapter learns
//! the answer under several wordings, and the gate can check that it answers
//! wordings it never trained on.
//!
//! Principal items: [`paraphrases`], [`acceptable`], [`framings`],
//! [`ParaphraseConfig`], [`ParaphraseCache`].
//!
//! Why: a fact fine-tuned under one wording is recalled under others only
//! when training saw several (Allen-Zhu & Li, "Physics of Language Models:
//! Part 3.1", ICML 2024; Ovadia et al., "Fine-Tuning or Retrieval?", EMNLP
//! 2024, who augment with paraphrases for the same reason).
//!
//! How: the model continues a fixed few-shot prompt of question → rewritten
//! question pairs ([`FEW_SHOT`]), sampled (temperature 0.8, top-p 0.95,
//! each attempt its own seed), cut at the end of the line. A 135M model
//! often repeats the question, answers it instead, negates it, turns "you"
//! into "I", or drifts to another topic, so each candidate passes
//! [`acceptable`]: a question if and only if the original is one (a question
//! mark, or a question word first: chat users drop the mark), as many
//! negations modulo 2, the same persons (the user, the assistant), a
//! different text after [`normalise`] from the original and from every kept
//! one, a length within half and twice (plus three words) the original's,
//! and at least half of the original's content words kept. Given the
//! devices' recall encoder, it must also mean nearly the same: a cosine
//! similarity of at least [`ParaphraseConfig::min_similarity`] (0.75) to the
//! original, which drops the rewordings the rules let through that say
//! something else ("Robots are the best" for "Robots are stupid"). The
//! rules and the threshold were chosen by reading candidates for
//! chatterbot-corpus questions past the ones `scripts/scenario` asks (the
//! questions it judges rephrasings on were not looked at).
//!
//! Besides rewordings, users put the same question in different
//! surroundings: a greeting before it, thanks after it, typed in lower case
//! without its mark. An adapter trained on the bare question keys on its
//! exact opening and often misses it then, so [`framings`] puts each
//! corrected question in a few of [`FRAMINGS`], chosen per correction (input
//! noise as data augmentation, the oldest remedy for brittle inputs; Wei &
//! Zou's EDA, EMNLP 2019, does the same for text classifiers by rule). They
//! are trained on, never used by the gate, and written by rule, so no
//! filter applies.

use std::path::{Path, PathBuf};

use anyhow::Context;
use nocturne::durable_file::write_atomic;
use nocturne::ids::DeviceId;
use nocturne::recall::encoder::SentenceEncoder;
use nocturne::sampler::SamplerConfig;

use crate::eval::{normalise, Evaluator};

/// The few-shot prompt the model continues: general questions, none of them
/// a template a rephrasing check uses; the question to rewrite follows
/// `Question: `, and the model writes after `Rewritten:`.
pub const FEW_SHOT: &str = "Rewrite each question in other words, keeping its meaning.\n\n\
Question: How old are you?\nRewritten: What is your age?\n\n\
Question: Where do you live?\nRewritten: What place do you call home?\n\n\
Question: Can you tell me a joke?\nRewritten: Do you know any jokes?\n\n\
Question: Do you like music?\nRewritten: Are you a fan of music?\n\n";

/// How many paraphrases to look for.
#[derive(Clone, Copy, Debug)]
pub struct ParaphraseConfig {
    /// Paraphrases wanted per question (default 4: three to train on, one for the gate).
    pub wanted: usize,
    /// Sampling attempts per question at most (default 32, [`ParaphraseConfig::wanting`]).
    pub attempts: usize,
    /// Longest paraphrase, tokens (default 32).
    pub max_tokens: usize,
    /// Least cosine similarity of a paraphrase's recall embedding to the
    /// question's, when the encoder is given (default 0.75).
    pub min_similarity: f32,
    /// Framings of each question to train on besides the paraphrases
    /// (default 2 of the [`FRAMINGS`]; 0 turns them off).
    pub framings: usize,
}

impl ParaphraseConfig {
    /// `wanted` paraphrases per question, with at most eight sampling
    /// attempts each (on questions past the scenario's, about one candidate
    /// in ten passed every check), 32 tokens at most, and two framings.
    pub fn wanting(wanted: usize) -> ParaphraseConfig {
        ParaphraseConfig { wanted, attempts: wanted * 8, max_tokens: 32, min_similarity: 0.75, framings: 2 }
    }
}

impl Default for ParaphraseConfig {
    fn default() -> ParaphraseConfig {
        ParaphraseConfig::wanting(4)
    }
}

/// Surroundings a user puts a question in, `{q}` the question as asked,
/// `{l}` the question with its first letter in lower case. The last one is
/// the question typed casually: all lower case, without its final mark.
pub const FRAMINGS: &[&str] = &["Hi! {q}", "Hey, {l}", "{q} Thanks!", "{q} :)", "Hmm, {l}", "Okay, {l}", "Hello there. {q}", "{casual}"];

/// `text` with its first letter in lower case ("What is AI?" → "what is AI?").
pub fn lower_first(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or(String::new(), |c| c.to_lowercase().collect::<String>() + chars.as_str())
}

/// `count` distinct [`FRAMINGS`] of `question` (all of them at most),
/// chosen by `seed` (SplitMix64, reproducible); none for an empty question.
pub fn framings(question: &str, count: usize, seed: u64) -> Vec<String> {
    let question = question.trim();
    if question.is_empty() {
        return Vec::new();
    }
    let lowered = lower_first(question);
    let casual = question.trim_end_matches(['?', '!', '.']).trim_end().to_lowercase();
    let mut order: Vec<usize> = (0..FRAMINGS.len()).collect();
    let mut rng = nocturne::sampler::SplitMix64(seed);
    // Fisher–Yates, stopped after the first `count` places.
    for i in 0..count.min(order.len()) {
        let j = i + (rng.next_u64() % (order.len() - i) as u64) as usize;
        order.swap(i, j);
    }
    // One placeholder per framing, filled once: braces in the question stay text.
    let fill = |framing: &str| {
        [("{q}", question), ("{l}", lowered.as_str()), ("{casual}", casual.as_str())]
            .into_iter()
            .find_map(|(mark, text)| framing.split_once(mark).map(|(before, after)| format!("{before}{text}{after}")))
            .unwrap_or_else(|| framing.to_string())
    };
    order.into_iter().take(count).map(|k| fill(FRAMINGS[k])).filter(|framed| !framed.is_empty() && framed != question).collect()
}

/// Words that carry no topic (articles, pronouns, auxiliaries, question words).
const FUNCTION_WORDS: &[&str] = &[
    "a", "an", "the", "is", "are", "was", "were", "be", "do", "does", "did", "you", "your", "yours", "i", "me", "my", "we", "us", "our", "it",
    "its", "he", "she", "they", "them", "what", "who", "whom", "which", "when", "where", "why", "how", "can", "could", "will", "would",
    "should", "shall", "may", "might", "have", "has", "had", "of", "to", "in", "on", "at", "for", "with", "and", "or", "not", "no", "that",
    "this", "there", "s", "re", "m", "t", "ll", "d", "ve", "any", "some", "about", "tell", "know",
];

/// First words of a question asked without its question mark ("What is a chat bot").
const QUESTION_OPENERS: &[&str] = &[
    "what", "who", "whom", "whose", "which", "when", "where", "why", "how", "is", "are", "am", "was", "were", "do", "does", "did", "can",
    "could", "will", "would", "should", "shall", "may", "might", "have", "has",
];

/// Words that negate, after [`normalise`] ("don't" is "don t").
const NEGATIONS: &[&str] = &["not", "no", "never", "t", "cannot", "nothing", "nobody", "none", "nor", "neither"];

/// Words of the first person (the user) and of the second (the assistant).
const FIRST_PERSON: &[&str] = &["i", "me", "my", "mine", "myself", "we", "us", "our", "ours"];
const SECOND_PERSON: &[&str] = &["you", "your", "yours", "yourself"];

fn content_words(text: &str) -> Vec<String> {
    normalise(text).split(' ').filter(|w| !w.is_empty() && !FUNCTION_WORDS.contains(w)).map(String::from).collect()
}

/// A question: it ends with `?` or opens with a question word or auxiliary.
fn is_question(text: &str) -> bool {
    text.trim_end().ends_with('?') || normalise(text).split(' ').next().is_some_and(|w| QUESTION_OPENERS.contains(&w))
}

/// What a rewording must keep besides its topic: whether it asks, whether
/// it negates (an odd number of negations), and who it is about (the user,
/// the assistant: "You are immortal" is not "I am immortal").
fn form(text: &str) -> (bool, bool, bool, bool) {
    let normalised = normalise(text);
    let words: Vec<&str> = normalised.split(' ').collect();
    let count = |set: &[&str]| words.iter().filter(|w| set.contains(w)).count();
    (is_question(text), count(NEGATIONS) % 2 == 1, count(FIRST_PERSON) > 0, count(SECOND_PERSON) > 0)
}

/// Whether `candidate` is kept as a paraphrase of `original`, given the
/// paraphrases `kept` so far (the rules are in the module documentation).
pub fn acceptable(original: &str, candidate: &str, kept: &[String]) -> bool {
    let candidate = candidate.trim();
    let (n_original, n_candidate) = (normalise(original), normalise(candidate));
    if n_candidate.is_empty() || n_candidate == n_original || kept.iter().any(|k| normalise(k) == n_candidate) {
        return false;
    }
    if form(original) != form(candidate) {
        return false;
    }
    let (words, candidate_words) = (n_original.split(' ').count(), n_candidate.split(' ').count());
    if candidate_words * 2 < words || candidate_words > 2 * words + 3 {
        return false;
    }
    let wanted = content_words(original);
    let have = content_words(candidate);
    let shared = wanted.iter().filter(|w| have.contains(w)).count();
    2 * shared >= wanted.len()
}

/// Up to `config.wanted` paraphrases of `question`, written by the model
/// the evaluator runs (the device's current model), in the order found,
/// each [`acceptable`] and, with `encoder`, at least `config.min_similarity`
/// similar to `question`. Reproducible for a given `seed`.
///
/// # Errors
/// Tokenizer, decoder or encoder errors.
pub fn paraphrases(evaluator: &mut Evaluator<'_>, encoder: Option<&SentenceEncoder>, question: &str, config: &ParaphraseConfig, seed: u64) -> anyhow::Result<Vec<String>> {
    let prompt = format!("{FEW_SHOT}Question: {}\nRewritten:", question.trim());
    let original = encoder.map(|e| e.embed(question)).transpose()?;
    let mut kept = Vec::new();
    for attempt in 0..config.attempts as u64 {
        if kept.len() == config.wanted {
            break;
        }
        let sampler = SamplerConfig { temperature: 0.8, top_k: 0, top_p: 0.95, repetition_penalty: 1.0, seed: seed.wrapping_add(attempt) };
        let candidate = evaluator.continue_text(&prompt, "\n", config.max_tokens, sampler)?;
        if !acceptable(question, &candidate, &kept) {
            continue;
        }
        if let (Some(encoder), Some(original)) = (encoder, &original) {
            // Both embeddings have unit length: the dot product is the cosine.
            let similarity: f32 = encoder.embed(&candidate)?.iter().zip(original).map(|(a, b)| a * b).sum();
            if similarity < config.min_similarity {
                continue;
            }
        }
        kept.push(candidate.trim().to_string());
    }
    Ok(kept)
}

/// One correction's paraphrases as a night wrote them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct CachedParaphrases {
    /// The device that journaled the correction (hex).
    device: String,
    /// The corrected interaction's LSN on that device.
    interaction: u64,
    /// The question as asked.
    question: String,
    /// [`ParaphraseConfig::wanted`] when they were written.
    wanted: usize,
    /// The paraphrases found, in order (the last is the gate's when there are two or more).
    paraphrases: Vec<String>,
}

/// The paraphrases earlier nights wrote, so that a night paraphrases only
/// the corrections acknowledged since the last one, with the model as it
/// was before any night taught them (a night reads the store's whole
/// history: without the cache it writes every earlier night's paraphrases
/// again). A JSON file, by default a store's `paraphrases.json`: an array of
/// `{device, interaction, question, wanted, paraphrases}`, replaced
/// atomically when a night adds to it. An entry is used for the same
/// correction (device, interaction) with the same question text, when it
/// was written wanting at least as many paraphrases as tonight.
pub struct ParaphraseCache {
    path: PathBuf,
    entries: Vec<CachedParaphrases>,
}

impl ParaphraseCache {
    /// The cache in `path` (empty if the file does not exist yet).
    ///
    /// # Errors
    /// The file cannot be read, or is not such an array (the error names
    /// the file; deleting it makes the next night write every paraphrase
    /// again).
    pub fn open(path: &Path) -> anyhow::Result<ParaphraseCache> {
        let entries = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a paraphrase cache (delete it to write every paraphrase again)", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read the paraphrase cache {}", path.display())),
        };
        Ok(ParaphraseCache { path: path.to_path_buf(), entries })
    }

    /// The paraphrases written for the correction `(device, interaction)` of
    /// `question`, at most `wanted` of them, if an entry wrote them wanting
    /// at least as many.
    pub fn get(&self, device: DeviceId, interaction: u64, question: &str, wanted: usize) -> Option<Vec<String>> {
        let device = device.to_string();
        self.entries
            .iter()
            .find(|e| e.device == device && e.interaction == interaction && e.question == question && e.wanted >= wanted)
            .map(|e| e.paraphrases.iter().take(wanted).cloned().collect())
    }

    /// Records the paraphrases written for a correction (replacing an older entry).
    pub fn insert(&mut self, device: DeviceId, interaction: u64, question: &str, wanted: usize, paraphrases: &[String]) {
        let device = device.to_string();
        self.entries.retain(|e| !(e.device == device && e.interaction == interaction));
        self.entries.push(CachedParaphrases { device, interaction, question: question.to_string(), wanted, paraphrases: paraphrases.to_vec() });
    }

    /// Writes the cache back, atomically and durably.
    ///
    /// # Errors
    /// The file cannot be written (it is then unchanged).
    pub fn save(&self) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.entries)?;
        write_atomic(&self.path, &bytes).with_context(|| format!("cannot write the paraphrase cache {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::{acceptable, framings, ParaphraseCache, FRAMINGS};
    use nocturne::ids::DeviceId;

    #[test]
    fn the_cache_gives_back_what_a_night_wrote_for_the_same_correction_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paraphrases.json");
        let mut cache = ParaphraseCache::open(&path).unwrap();
        let (device, written) = (DeviceId([7; 16]), vec!["What's AI?".to_string(), "What does AI mean?".to_string()]);
        assert_eq!(cache.get(device, 5, "What is AI?", 4), None);
        cache.insert(device, 5, "What is AI?", 4, &written);
        cache.save().unwrap();
        let cache = ParaphraseCache::open(&path).unwrap();
        assert_eq!(cache.get(device, 5, "What is AI?", 4), Some(written.clone()));
        assert_eq!(cache.get(device, 5, "What is AI?", 1), Some(written[..1].to_vec()));
        // Another correction, another device, another question text, or more wanted than were looked for.
        assert_eq!(cache.get(device, 6, "What is AI?", 4), None);
        assert_eq!(cache.get(DeviceId([8; 16]), 5, "What is AI?", 4), None);
        assert_eq!(cache.get(device, 5, "What is ML?", 4), None);
        assert_eq!(cache.get(device, 5, "What is AI?", 6), None);
        // A file that is not a cache: an error naming it, the file kept.
        std::fs::write(&path, b"{not json").unwrap();
        let error = format!("{:#}", ParaphraseCache::open(&path).err().unwrap());
        assert!(error.contains("paraphrases.json") && error.contains("not a paraphrase cache"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{not json");
    }

    #[test]
    fn framings_surround_the_question_differently_and_reproducibly() {
        let question = "What is a chat bot?";
        let all = framings(question, FRAMINGS.len() + 3, 1);
        assert_eq!(all.len(), FRAMINGS.len());
        let mut distinct = all.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
        assert!(all.contains(&"Hey, what is a chat bot?".to_string()) && all.contains(&"What is a chat bot? Thanks!".to_string()), "{all:?}");
        assert!(all.contains(&"what is a chat bot".to_string()), "{all:?}");
        assert!(all.iter().all(|f| f.to_lowercase().contains("what is a chat bot")), "{all:?}");
        // The same seed, the same choice; another seed, mostly another.
        assert_eq!(framings(question, 2, 7), framings(question, 2, 7));
        assert_eq!(framings(question, 2, 7).len(), 2);
        assert!((0..16).any(|seed| framings(question, 2, seed) != framings(question, 2, 7)));
        assert!(framings("  ", 2, 7).is_empty() && framings(question, 0, 7).is_empty());
        // Braces in the question are its text, not placeholders.
        assert!(framings("What is {l} in {q}?", FRAMINGS.len(), 5).contains(&"Hey, what is {l} in {q}?".to_string()));
        // A question already typed casually is not framed as itself.
        assert!(!framings("what is ai", FRAMINGS.len(), 3).contains(&"what is ai".to_string()));
    }

    #[test]
    fn rewordings_pass_and_repeats_answers_and_drift_do_not() {
        let kept = vec!["What's your favourite colour?".to_string()];
        assert!(acceptable("What is your favorite color?", "Which color do you like best, your favorite one?", &[]));
        assert!(acceptable("What is the stock market?", "What's a stock market?", &[]));
        assert!(acceptable("When will you die?", "When do you die?", &[]));
        // The question itself, again or after normalisation, or a kept one again.
        assert!(!acceptable("What is your favorite color?", "what is your favorite color", &[]));
        assert!(!acceptable("What is your favorite color?", "What's your favourite colour?", &kept));
        // An answer instead of a question.
        assert!(!acceptable("Are you sentient?", "No, I'm not sentient.", &[]));
        // Another topic: fewer than half the content words kept.
        assert!(!acceptable("Who is the president of the United States?", "Who is the president of the world?", &[]));
        assert!(!acceptable("What is the stock market?", "What kind of business do you run?", &[]));
        // A question asked without its mark answered, a statement turned into a question.
        assert!(!acceptable("What is a chat bot", "A chat bot!", &[]));
        assert!(acceptable("What is a chat bot", "What does a chat bot do", &[]));
        assert!(!acceptable("Robots", "Can robots walk?", &[]));
        // Negated, or about someone else.
        assert!(!acceptable("Robots laugh", "Robots do not laugh.", &[]));
        assert!(!acceptable("You are not immortal", "You're immortal!", &[]));
        assert!(acceptable("You are not immortal", "You aren't an immortal being", &[]));
        assert!(!acceptable("You are immortal", "I am immortal!", &[]));
        // Far too short or too long.
        assert!(!acceptable("What is the capital city of the country of France?", "France?", &[]));
        assert!(!acceptable("Why?", "Why is it that this is the case, and why would anyone ever think so at all?", &[]));
    }
}
