//! The journal's record schema and its byte encoding.
//!
//! Principal types: [`Record`] (what a reader gets back), [`Body`] (what a
//! writer appends: [`Interaction`], [`Feedback`], [`MetricsSnapshot`],
//! [`AdapterEvent`]), [`Decoded`], [`RecordError`].
//!
//! A record's bytes (the payload the segment framing carries) are
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | kind: 1 interaction, 2 feedback, 3 metrics, 4 adapter event |
//! | 1 | 1 | schema version of that kind ([`schema_version`]: interaction 3, the others 1) |
//! | 2 | 8 | LSN (log sequence number), u64 little-endian, from 1, unique per device |
//! | 10 | 8 | wall-clock time, milliseconds since the Unix epoch, u64 little-endian |
//! | 18 | … | the kind's struct in postcard (<https://postcard.jamesmunns.com/wire-format>) |
//!
//! Versioning rules: a reader skips a kind it does not know (it still sees
//! the LSN and time, so nothing is miscounted) and never fails on one; a
//! kind's struct only ever gains fields at its end, with a new schema version,
//! so a reader decodes every version up to the one it knows (postcard ignores
//! trailing bytes). Enum variants (stop reasons, thumbs, adapter actions)
//! are only ever appended.
//!
//! Identifiers are bytes in postcard and lowercase hex in JSON (`dump`).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::ids::{AdapterId, ModelId};

/// Largest encoded record, bytes. A prompt of the largest profile's full
/// context (2,048 tokens, about 8 KiB of text) and a reply fit.
pub const RECORD_MAX: usize = 16 * 1024;

/// Bytes before the postcard body: kind, version, LSN, time.
pub const RECORD_PREFIX: usize = 18;

/// Kind byte of each record type.
pub mod kind {
    /// [`super::Interaction`].
    pub const INTERACTION: u8 = 1;
    /// [`super::Feedback`].
    pub const FEEDBACK: u8 = 2;
    /// [`super::MetricsSnapshot`].
    pub const METRICS: u8 = 3;
    /// [`super::AdapterEvent`].
    pub const ADAPTER: u8 = 4;
}

/// The record time of now: milliseconds since the Unix epoch (0 if the
/// clock is before it). The one wall clock of records, segment headers and
/// manifests.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Schema version this build writes, and the newest it reads, for `kind`:
/// interactions are at 3 (version 2 appended `persona`, version 3
/// `recalled`), the other kinds at 1.
pub fn schema_version(kind: u8) -> u8 {
    match kind {
        kind::INTERACTION => 3,
        _ => 1,
    }
}

/// Why a request ended. Interaction records store it: variants are only
/// ever appended, never reordered (the postcard encoding is the index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// The reply ended with one of the request's stop strings (removed from the reply).
    StopString,
    /// The reply reached the request's maximum new tokens.
    MaxTokens,
    /// The context filled up.
    ContextFull,
    /// The request's deadline passed.
    Deadline,
}

impl StopReason {
    /// snake_case name, as printed in JSON output.
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::StopString => "stop_string",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Deadline => "deadline",
        }
    }
}

/// One answered request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interaction<'a> {
    /// Conversation it belongs to (random per conversation; one-shot requests get their own).
    pub conversation: u64,
    /// Position in the conversation, from 0.
    pub turn: u32,
    /// The base model that answered.
    pub base_model: ModelId,
    /// The adapter active at the time, if any.
    pub adapter: Option<AdapterId>,
    /// System prompt.
    pub system: Cow<'a, str>,
    /// The user's message (earlier turns are earlier interactions of the conversation).
    pub prompt: Cow<'a, str>,
    /// The reply as shown.
    pub reply: Cow<'a, str>,
    /// Prompt tokens, including the chat template and earlier turns.
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV cache entries were reused.
    pub reused_tokens: u32,
    /// Tokens generated.
    pub new_tokens: u32,
    /// Why the reply ended.
    pub stop_reason: StopReason,
    /// Prefill speed, tokens per second.
    pub prefill_tokens_per_s: f32,
    /// Decode speed, tokens per second.
    pub decode_tokens_per_s: f32,
    /// Time from the request to its first token, milliseconds.
    pub time_to_first_token_ms: f32,
    /// Peak resident memory of the session's process, bytes.
    pub peak_memory_bytes: u64,
    /// The persona whose system prompt the request used, if one (schema
    /// version 2; version 1 records decode with none).
    #[serde(default)]
    pub persona: Option<Cow<'a, str>>,
    /// The taught answers recall put into the prompt, as the LSNs of the
    /// interactions they corrected, best match first (schema version 3;
    /// earlier records decode with none).
    #[serde(default)]
    pub recalled: Cow<'a, [u64]>,
}

impl<'a> Interaction<'a> {
    /// An interaction of `conversation` (turn 0) with its texts and no
    /// measurements (counts, speeds and memory 0, stop reason eos, no
    /// adapter, persona or recall): what simulated users and tools that
    /// replay conversations journal.
    pub fn of_texts(conversation: u64, base_model: ModelId, system: &'a str, prompt: &'a str, reply: &'a str) -> Interaction<'a> {
        Interaction {
            conversation,
            turn: 0,
            base_model,
            adapter: None,
            system: Cow::Borrowed(system),
            prompt: Cow::Borrowed(prompt),
            reply: Cow::Borrowed(reply),
            prompt_tokens: 0,
            reused_tokens: 0,
            new_tokens: 0,
            stop_reason: StopReason::Eos,
            prefill_tokens_per_s: 0.0,
            decode_tokens_per_s: 0.0,
            time_to_first_token_ms: 0.0,
            peak_memory_bytes: 0,
            persona: None,
            recalled: Cow::Borrowed(&[]),
        }
    }
}

/// Thumbs up or down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Thumbs {
    /// Good answer.
    Up,
    /// Bad answer.
    Down,
}

/// Signals the user gave without meaning to rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImplicitSignals {
    /// The user asked for another reply (negative).
    pub regenerated: bool,
    /// The user copied the reply (positive).
    pub copied: bool,
    /// The user edited the reply before using it (mildly negative).
    pub edited: bool,
    /// The user left the conversation right after the reply (negative).
    pub abandoned: bool,
    /// The user continued the conversation this many seconds after the reply (positive).
    pub follow_up_s: Option<u32>,
}

impl ImplicitSignals {
    /// True when no signal is set.
    pub fn is_empty(&self) -> bool {
        *self == ImplicitSignals::default()
    }
}

/// What a user said (or showed) about one interaction.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Feedback<'a> {
    /// LSN of the interaction this is about.
    pub interaction: u64,
    /// Explicit rating, 1 (worst) to 5 (best).
    pub rating: Option<u8>,
    /// Thumbs up or down.
    pub thumbs: Option<Thumbs>,
    /// The reply the user wanted.
    pub correction: Option<Cow<'a, str>>,
    /// Implicit signals.
    pub implicit: ImplicitSignals,
}

/// Counters of the device at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// Seconds since the runtime started.
    pub uptime_s: u64,
    /// Requests answered since start.
    pub requests: u64,
    /// Tokens generated since start.
    pub tokens_generated: u64,
    /// Peak resident memory, bytes.
    pub peak_memory_bytes: u64,
    /// Bytes of journal segments on disk.
    pub journal_bytes: u64,
}

/// What happened to an adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterAction {
    /// Became the active adapter.
    Installed,
    /// Was replaced by the previous adapter after failing to load or its self-test.
    RolledBack,
}

/// An adapter installed or rolled back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterEvent<'a> {
    /// What happened.
    pub action: AdapterAction,
    /// The adapter it happened to.
    pub adapter: AdapterId,
    /// The adapter active before (None: the bare base model).
    pub previous: Option<AdapterId>,
    /// Why (for a rollback: the load or self-test error).
    pub reason: Cow<'a, str>,
}

/// The content of a record, as appended.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body<'a> {
    /// An answered request.
    Interaction(Interaction<'a>),
    /// Feedback on an interaction.
    Feedback(Feedback<'a>),
    /// Device counters.
    Metrics(MetricsSnapshot),
    /// An adapter change.
    Adapter(AdapterEvent<'a>),
}

/// A record read back from the journal.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Record {
    /// Log sequence number.
    pub lsn: u64,
    /// Milliseconds since the Unix epoch when it was appended.
    pub time_ms: u64,
    /// The content.
    #[serde(flatten)]
    pub body: Body<'static>,
}

/// What [`decode`] finds in a record's bytes.
#[derive(Clone, Debug, PartialEq)]
// Decoded records are handed to a visitor one at a time; boxing the large
// variant would cost an allocation per record read.
#[allow(clippy::large_enum_variant)]
pub enum Decoded {
    /// A kind this build knows.
    Known(Record),
    /// A kind (or newer schema version) this build does not know: skipped.
    Unknown {
        /// Kind byte.
        kind: u8,
        /// Schema version byte.
        version: u8,
        /// Its LSN.
        lsn: u64,
    },
}

/// A record that cannot be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The encoded record would exceed [`RECORD_MAX`].
    #[error("record does not fit the journal's {RECORD_MAX}-byte record limit (shorten the prompt, reply or correction)")]
    TooLarge,
    /// A field is out of its range.
    #[error("invalid record: {0}")]
    Invalid(&'static str),
    /// Fewer bytes than the fixed prefix.
    #[error("record of {0} bytes is shorter than its {RECORD_PREFIX}-byte prefix")]
    Short(usize),
    /// The postcard body does not decode as its kind.
    #[error("{kind} record (LSN {lsn}) does not decode: {problem}")]
    Body {
        /// Kind name.
        kind: &'static str,
        /// Its LSN.
        lsn: u64,
        /// postcard's message.
        problem: String,
    },
}

impl Body<'_> {
    /// The kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Body::Interaction(_) => kind::INTERACTION,
            Body::Feedback(_) => kind::FEEDBACK,
            Body::Metrics(_) => kind::METRICS,
            Body::Adapter(_) => kind::ADAPTER,
        }
    }

    /// Checks ranges a valid record keeps.
    ///
    /// # Errors
    /// A rating outside 1–5, or feedback that says nothing.
    pub fn validate(&self) -> Result<(), RecordError> {
        if let Body::Feedback(f) = self {
            if f.rating.is_some_and(|r| !(1..=5).contains(&r)) {
                return Err(RecordError::Invalid("a rating is between 1 and 5"));
            }
            if f.rating.is_none() && f.thumbs.is_none() && f.correction.is_none() && f.implicit.is_empty() {
                return Err(RecordError::Invalid("feedback needs a rating, thumbs, a correction or an implicit signal"));
            }
            if f.interaction == 0 {
                return Err(RecordError::Invalid("feedback names no interaction (LSN 0)"));
            }
        }
        Ok(())
    }
}

/// Name of a kind byte, for messages and `stat`.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        kind::INTERACTION => "interaction",
        kind::FEEDBACK => "feedback",
        kind::METRICS => "metrics",
        kind::ADAPTER => "adapter",
        _ => "unknown",
    }
}

/// Encodes a record into `out` and returns its length. Does not allocate.
///
/// # Errors
/// [`RecordError::TooLarge`] when it does not fit `out`; the checks of
/// [`Body::validate`].
pub fn encode(out: &mut [u8], lsn: u64, time_ms: u64, body: &Body<'_>) -> Result<usize, RecordError> {
    body.validate()?;
    if out.len() < RECORD_PREFIX {
        return Err(RecordError::TooLarge);
    }
    out[0] = body.kind();
    out[1] = schema_version(body.kind());
    out[2..10].copy_from_slice(&lsn.to_le_bytes());
    out[10..18].copy_from_slice(&time_ms.to_le_bytes());
    let rest = &mut out[RECORD_PREFIX..];
    let used = match body {
        Body::Interaction(v) => postcard::to_slice(v, rest).map(|s| s.len()),
        Body::Feedback(v) => postcard::to_slice(v, rest).map(|s| s.len()),
        Body::Metrics(v) => postcard::to_slice(v, rest).map(|s| s.len()),
        Body::Adapter(v) => postcard::to_slice(v, rest).map(|s| s.len()),
    }
    .map_err(|_| RecordError::TooLarge)?;
    Ok(RECORD_PREFIX + used)
}

/// The LSN in an encoded record's prefix.
///
/// # Errors
/// [`RecordError::Short`] when `bytes` is shorter than the prefix.
pub fn lsn_of(bytes: &[u8]) -> Result<u64, RecordError> {
    match bytes.get(2..10) {
        Some(b) if bytes.len() >= RECORD_PREFIX => Ok(u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        _ => Err(RecordError::Short(bytes.len())),
    }
}

/// Decodes a record's bytes. Unknown kinds and newer schema versions are
/// returned as [`Decoded::Unknown`], not as errors.
///
/// # Errors
/// A short prefix, a body that does not decode, or a decoded body outside its
/// ranges (see [`Body::validate`]).
pub fn decode(bytes: &[u8]) -> Result<Decoded, RecordError> {
    let lsn = lsn_of(bytes)?;
    let (kind, version) = (bytes[0], bytes[1]);
    let time_ms = u64::from_le_bytes(bytes[10..18].try_into().expect("8 bytes"));
    let rest = &bytes[RECORD_PREFIX..];
    let fail = |e: postcard::Error| RecordError::Body { kind: kind_name(kind), lsn, problem: e.to_string() };
    if version > schema_version(kind) || version == 0 {
        return Ok(Decoded::Unknown { kind, version, lsn });
    }
    let body = match kind {
        // Versions 1 and 2 lack the trailing fields: postcard's `None` and an
        // empty sequence are one zero byte each.
        kind::INTERACTION if version < 3 => {
            let missing: &[u8] = if version == 1 { &[0, 0] } else { &[0] };
            Body::Interaction(postcard::from_bytes(&[rest, missing].concat()).map_err(fail)?)
        }
        kind::INTERACTION => Body::Interaction(postcard::from_bytes(rest).map_err(fail)?),
        kind::FEEDBACK => Body::Feedback(postcard::from_bytes(rest).map_err(fail)?),
        kind::METRICS => Body::Metrics(postcard::from_bytes(rest).map_err(fail)?),
        kind::ADAPTER => Body::Adapter(postcard::from_bytes(rest).map_err(fail)?),
        _ => return Ok(Decoded::Unknown { kind, version, lsn }),
    };
    body.validate()?;
    Ok(Decoded::Known(Record { lsn, time_ms, body }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kinds_and_versions_are_skipped_not_errors() {
        let mut buf = [0u8; 64];
        let n = encode(&mut buf, 7, 1, &Body::Metrics(MetricsSnapshot::default())).unwrap();
        buf[0] = 200;
        assert_eq!(decode(&buf[..n]), Ok(Decoded::Unknown { kind: 200, version: 1, lsn: 7 }));
        buf[0] = kind::METRICS;
        buf[1] = schema_version(kind::METRICS) + 1;
        assert_eq!(decode(&buf[..n]), Ok(Decoded::Unknown { kind: kind::METRICS, version: 2, lsn: 7 }));
    }

    #[test]
    fn version_1_and_2_interactions_decode_without_the_later_fields() {
        let interaction = |persona: Option<&'static str>, recalled: &'static [u64]| Interaction {
            conversation: 3,
            turn: 1,
            base_model: ModelId([7; 32]),
            adapter: None,
            system: "s".into(),
            prompt: "p".into(),
            reply: "r".into(),
            prompt_tokens: 10,
            reused_tokens: 2,
            new_tokens: 4,
            stop_reason: StopReason::Eos,
            prefill_tokens_per_s: 1.0,
            decode_tokens_per_s: 2.0,
            time_to_first_token_ms: 3.0,
            peak_memory_bytes: 4,
            persona: persona.map(Cow::Borrowed),
            recalled: Cow::Borrowed(recalled),
        };
        let mut buf = [0u8; 256];
        let n = encode(&mut buf, 5, 9, &Body::Interaction(interaction(Some("formal"), &[12, 3]))).unwrap();
        assert_eq!(buf[1], 3);
        let Ok(Decoded::Known(record)) = decode(&buf[..n]) else { panic!("version 3 decodes") };
        assert_eq!(record.body, Body::Interaction(interaction(Some("formal"), &[12, 3])));
        // What a version-2 build wrote: the same fields without `recalled`.
        let n = encode(&mut buf, 5, 9, &Body::Interaction(interaction(Some("formal"), &[]))).unwrap();
        buf[1] = 2;
        let Ok(Decoded::Known(record)) = decode(&buf[..n - 1]) else { panic!("version 2 decodes") };
        assert_eq!(record.body, Body::Interaction(interaction(Some("formal"), &[])));
        // What a version-1 build wrote: without the persona either.
        let n = encode(&mut buf, 5, 9, &Body::Interaction(interaction(None, &[]))).unwrap();
        buf[1] = 1;
        let Ok(Decoded::Known(record)) = decode(&buf[..n - 2]) else { panic!("version 1 decodes") };
        assert_eq!(record.body, Body::Interaction(interaction(None, &[])));
    }

    #[test]
    fn invalid_feedback_is_refused() {
        let mut buf = [0u8; 64];
        let rating = Body::Feedback(Feedback { interaction: 1, rating: Some(6), ..Feedback::default() });
        assert_eq!(encode(&mut buf, 1, 0, &rating), Err(RecordError::Invalid("a rating is between 1 and 5")));
        let empty = Body::Feedback(Feedback { interaction: 1, ..Feedback::default() });
        assert!(matches!(encode(&mut buf, 1, 0, &empty), Err(RecordError::Invalid(_))));
    }

    #[test]
    fn a_record_larger_than_the_buffer_is_too_large() {
        let mut buf = [0u8; 32];
        let body = Body::Feedback(Feedback { interaction: 1, correction: Some("x".repeat(40).into()), ..Feedback::default() });
        assert_eq!(encode(&mut buf, 1, 0, &body), Err(RecordError::TooLarge));
    }
}
