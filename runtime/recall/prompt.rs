//! How recalled entries enter the prompt.
//!
//! Principal items: [`RecallForm`], [`with_recalled`], [`RecalledPrompt`],
//! [`DEFAULT_THRESHOLD`], [`PASSAGE_THRESHOLD`].
//!
//! Forms (chosen by the held-out tuning of `trainer/examples/recall_eval`;
//! [`RecallForm::DEFAULT`] is the one it chose):
//! - [`RecallForm::Prefill`]: the best taught entry's answer begins the
//!   assistant's reply (the model continues from it, usually with the end of
//!   its turn); any other taught entries become earlier turns as in
//!   `Turns`. A 135M model copies an answer it is shown from earlier turns
//!   rarely (20–25% on the tuning split) but keeps one it has begun.
//! - [`RecallForm::Turns`]: each taught entry becomes an earlier exchange of
//!   the conversation, right after the system message: the user's question,
//!   then the taught answer as the assistant's reply (the best match last,
//!   nearest the new question). Passages go into the system message.
//! - [`RecallForm::System`]: everything goes into the system message, after a
//!   line saying these are answers the user taught.
//!
//! Entries are taken best first while their text stays within the token
//! budget (the profile's `recall.prompt_tokens`); an entry that does not fit
//! is skipped, a smaller one after it may still fit.

use crate::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

use super::index::{Entry, Origin};

/// Similarity (cosine) a taught entry needs to be recalled, tuned on the
/// held-out split of `trainer/examples/recall_eval.rs`.
pub const DEFAULT_THRESHOLD: f32 = 0.70;

/// Similarity (cosine) a document passage needs to be recalled. A question
/// is less like a passage that answers it than like another wording of
/// itself: with all-MiniLM-L6-v2 and `tests/fixtures/harbour_kiosk.txt`,
/// eight tuning questions the document answers scored 0.42–0.71 against
/// their best passage and eight unrelated ones 0.03–0.21 (`nocturne recall
/// search`); the threshold sits nearer the unrelated side's gap edge, for
/// locality. The questions of `tests/recall.rs` are other ones.
pub const PASSAGE_THRESHOLD: f32 = 0.35;

/// The similarity an entry of `origin` needs to be recalled.
pub fn threshold(origin: &Origin) -> f32 {
    match origin {
        Origin::Taught { .. } => DEFAULT_THRESHOLD,
        Origin::Passage { .. } => PASSAGE_THRESHOLD,
    }
}

/// Where recalled entries go in the prompt (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecallForm {
    /// The best answer begins the reply.
    Prefill,
    /// As earlier turns of the conversation.
    Turns,
    /// In the system message.
    System,
}

impl RecallForm {
    /// The form the runtime uses.
    pub const DEFAULT: RecallForm = RecallForm::Prefill;
}

const TAUGHT_HEADER: &str = "The user taught you these answers; when asked one of these questions, give its answer:";
const PASSAGE_HEADER: &str = "Notes that may help:";

/// A prompt with recalled entries in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecalledPrompt {
    /// The conversation to render with the chat template.
    pub messages: Vec<ChatMessage>,
    /// Text the assistant's reply begins with ([`RecallForm::Prefill`]):
    /// encode it after the template's generation prompt, and show it before
    /// the generated text.
    pub reply_prefix: Option<String>,
    /// Positions (in the `recalled` given) of the entries that went in,
    /// within the budget.
    pub used: Vec<usize>,
}

/// `messages` (a system message first, then the conversation) with `recalled`
/// (best first) inserted in `form`, within `budget` tokens of inserted text.
///
/// # Errors
/// The tokenizer failing on an entry's text.
pub fn with_recalled(
    messages: &[ChatMessage],
    recalled: &[&Entry],
    form: RecallForm,
    budget: usize,
    tokenizer: &Tokenizer,
) -> Result<RecalledPrompt, TokenizerError> {
    let (mut spent, mut used) = (0, Vec::new());
    let mut chosen: Vec<&Entry> = Vec::new();
    for (i, entry) in recalled.iter().enumerate() {
        let cost = tokenizer.encode(&entry.text)?.len() + tokenizer.encode(&entry.answer)?.len();
        if spent + cost <= budget {
            spent += cost;
            chosen.push(entry);
            used.push(i);
        }
    }
    let (mut system_lines, mut turns) = (Vec::new(), Vec::new());
    let mut taught: Vec<&Entry> = chosen.iter().copied().filter(|e| matches!(e.origin, Origin::Taught { .. })).collect();
    let reply_prefix = match form {
        RecallForm::Prefill if !taught.is_empty() => Some(taught.remove(0).answer.clone()),
        _ => None,
    };
    let passages: Vec<&Entry> = chosen.iter().copied().filter(|e| matches!(e.origin, Origin::Passage { .. })).collect();
    if !passages.is_empty() {
        system_lines.push(PASSAGE_HEADER.to_string());
        system_lines.extend(passages.iter().map(|p| p.text.clone()));
    }
    match form {
        RecallForm::Turns | RecallForm::Prefill => {
            for entry in taught.iter().rev() {
                turns.push(ChatMessage::new("user", &entry.text));
                turns.push(ChatMessage::new("assistant", &entry.answer));
            }
        }
        RecallForm::System if !taught.is_empty() => {
            system_lines.push(TAUGHT_HEADER.to_string());
            system_lines.extend(taught.iter().map(|e| format!("Q: {}\nA: {}", e.text, e.answer)));
        }
        RecallForm::System => {}
    }
    let mut out = Vec::with_capacity(messages.len() + turns.len());
    let (first, rest) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => (first.clone(), rest),
        _ => (ChatMessage::new("system", ""), messages),
    };
    let mut system = first;
    if !system_lines.is_empty() {
        let joined = system_lines.join("\n");
        system.content = if system.content.is_empty() { joined } else { format!("{}\n\n{joined}", system.content) };
    }
    out.push(system);
    out.extend(turns);
    out.extend(rest.iter().cloned());
    Ok(RecalledPrompt { messages: out, reply_prefix, used })
}
