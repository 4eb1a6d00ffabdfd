//! The firmware-profile format and its validation.
//!
//! Principal types: [`Profile`] (one parsed, validated profile), [`Durability`],
//! [`Precision`], [`ProfileError`].
//!
//! This file is compiled twice: by `build.rs` (through `#[path]`), which
//! validates the chosen profile and bakes it into constants, and by the
//! runtime library, whose unit tests exercise the same validation. It therefore
//! depends only on `serde` and `toml`.
//!
//! Invariants of a valid profile: every field is present and known; `threads`,
//! `max_context_tokens`, `max_new_tokens`, `deadline_ms` and the journal sizes
//! and `server.slots`/`server.queue` are non-zero; `max_new_tokens <
//! max_context_tokens`; the f16 KV caches of the profile's own context for
//! its sizing model, one per server slot, fit in `memory_budget_bytes`;
//! a journal segment fits in the journal quota. The file format is documented
//! in `firmware-profiles/README.md`.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

/// Weight precision of the model pack a profile expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Symmetric int8, one f16 scale per block of 32 inputs.
    Int8,
    /// IEEE 754 binary16.
    Fp16,
}

impl Precision {
    /// The name used in profiles, pack directories and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Precision::Int8 => "int8",
            Precision::Fp16 => "fp16",
        }
    }
}

/// When a journal record counts as stored (acknowledged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Acknowledged when `fdatasync` after that record returns.
    FsyncEachRecord,
    /// Acknowledged at the next sync, which happens every `group_commit_ms`.
    GroupCommit,
}

/// The model shape a profile is sized for: the largest model its memory
/// budget must hold a full-context KV cache for.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sizing {
    /// Transformer layers.
    pub layers: u32,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: u32,
    /// Dimension of one attention head.
    pub head_dim: u32,
}

/// Journal settings of a profile.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSpec {
    /// Durability policy.
    pub durability: Durability,
    /// Group-commit interval in milliseconds (used by [`Durability::GroupCommit`]).
    pub group_commit_ms: u32,
    /// Size at which a segment file is sealed and a new one started, bytes.
    pub segment_bytes: u64,
    /// Disk quota for all segments, bytes.
    pub disk_quota_bytes: u64,
}

/// The local API's (`nocturne serve`) settings.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Sessions answering requests at once, each with its own KV cache and
    /// buffers from the memory plan (the budget holds all of them).
    pub slots: u32,
    /// Requests that may wait for a slot; one more is refused (429).
    pub queue: u32,
}

/// Recall memory's settings (used when recall is compiled in).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecallSpec {
    /// Longest text the sentence encoder embeds, in encoder tokens (longer
    /// text is truncated); its graph's heap is planned for this length.
    /// 1..=512, BERT's position table.
    pub max_sequence_tokens: u32,
    /// Entries the recall index holds (taught answers and passages); its
    /// embeddings are allocated once for all of them, in the memory plan.
    pub capacity: u32,
    /// How the index stores embeddings.
    pub embedding_precision: EmbeddingPrecision,
    /// Most entries recalled into one prompt.
    pub top_k: u32,
    /// Most tokens recalled text may add to one prompt.
    pub prompt_tokens: u32,
}

/// Storage precision of recall embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingPrecision {
    /// 4 bytes per dimension.
    F32,
    /// 2 bytes per dimension (IEEE half); inner products within ~1e-3 of f32.
    F16,
}

impl EmbeddingPrecision {
    /// Bytes per stored dimension.
    pub const fn bytes(self) -> usize {
        match self {
            EmbeddingPrecision::F32 => 4,
            EmbeddingPrecision::F16 => 2,
        }
    }
}

/// Longest encoder input a profile may ask for: the position table of BERT
/// encoders such as all-MiniLM-L6-v2.
pub const MAX_RECALL_SEQUENCE: u32 = 512;

/// Optional parts compiled into the runtime.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parts {
    /// Recall memory (retrieval of journaled corrections).
    pub recall: bool,
}

/// One firmware profile. All sizes are bytes, all durations milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Profile name (`low`, `mid`, `high` or a custom name).
    pub name: Cow<'static, str>,
    /// Hardware class the profile targets; documentation only.
    pub target_class: Cow<'static, str>,
    /// Maximum worker threads; the runtime uses min(this, available cores).
    pub threads: u32,
    /// Anonymous memory the runtime may allocate for a session: KV cache,
    /// scratch, logits, adapters, recall index. Mapped weights are not counted.
    pub memory_budget_bytes: u64,
    /// Precision of the weight pack the firmware expects.
    pub weight_precision: Precision,
    /// Maximum context (prompt + reply) in tokens.
    pub max_context_tokens: u32,
    /// Maximum new tokens per reply.
    pub max_new_tokens: u32,
    /// Per-request deadline, milliseconds.
    pub deadline_ms: u32,
    /// Model shape the budget is sized for.
    pub sizing: Sizing,
    /// Journal settings.
    pub journal: JournalSpec,
    /// Local API settings.
    pub server: ServerSpec,
    /// Recall memory settings.
    pub recall: RecallSpec,
    /// Optional parts.
    pub parts: Parts,
}

/// Why a profile is invalid. The message names the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileError {
    /// Not TOML, an unknown key, a missing field or a wrong type.
    Syntax(String),
    /// A field whose value breaks an invariant.
    Invalid {
        /// Dotted field name, e.g. `journal.segment_bytes`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProfileError::Syntax(msg) => write!(f, "{msg}"),
            ProfileError::Invalid { field, reason } => write!(f, "field `{field}`: {reason}"),
        }
    }
}

impl std::error::Error for ProfileError {}

impl Profile {
    /// Parses and validates a profile from TOML text.
    ///
    /// # Errors
    /// [`ProfileError::Syntax`] for malformed TOML, unknown keys, missing
    /// fields and wrong types (the message names the key and line);
    /// [`ProfileError::Invalid`] for values that break an invariant.
    pub fn from_toml(text: &str) -> Result<Profile, ProfileError> {
        let profile: Profile =
            toml::from_str(text).map_err(|e| ProfileError::Syntax(e.to_string()))?;
        profile.validate()?;
        Ok(profile)
    }

    /// Bytes of an f16 KV cache (keys and values) for one token of the
    /// sizing model.
    pub const fn kv_bytes_per_token(&self) -> u64 {
        2 * self.sizing.layers as u64 * self.sizing.kv_heads as u64 * self.sizing.head_dim as u64 * 2
    }

    /// Checks the invariants listed in the module documentation.
    ///
    /// # Errors
    /// [`ProfileError::Invalid`] naming the first field that breaks one.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let invalid = |field: &'static str, reason: String| Err(ProfileError::Invalid { field, reason });
        let nonzero: [(&'static str, u64); 15] = [
            ("threads", self.threads.into()),
            ("memory_budget_bytes", self.memory_budget_bytes),
            ("max_context_tokens", self.max_context_tokens.into()),
            ("max_new_tokens", self.max_new_tokens.into()),
            ("deadline_ms", self.deadline_ms.into()),
            ("sizing.layers", self.sizing.layers.into()),
            ("sizing.kv_heads", self.sizing.kv_heads.into()),
            ("sizing.head_dim", self.sizing.head_dim.into()),
            ("journal.segment_bytes", self.journal.segment_bytes),
            ("server.slots", self.server.slots.into()),
            ("server.queue", self.server.queue.into()),
            ("recall.max_sequence_tokens", self.recall.max_sequence_tokens.into()),
            ("recall.capacity", self.recall.capacity.into()),
            ("recall.top_k", self.recall.top_k.into()),
            ("recall.prompt_tokens", self.recall.prompt_tokens.into()),
        ];
        for (field, value) in nonzero {
            if value == 0 {
                return invalid(field, "must be greater than zero".into());
            }
        }
        if self.recall.max_sequence_tokens > MAX_RECALL_SEQUENCE {
            return invalid(
                "recall.max_sequence_tokens",
                format!("{} is over {MAX_RECALL_SEQUENCE}, the encoder's position table", self.recall.max_sequence_tokens),
            );
        }
        if self.recall.prompt_tokens >= self.max_context_tokens {
            return invalid(
                "recall.prompt_tokens",
                format!("{} leaves no room for the conversation in max_context_tokens = {}", self.recall.prompt_tokens, self.max_context_tokens),
            );
        }
        if self.journal.durability == Durability::GroupCommit && self.journal.group_commit_ms == 0 {
            return invalid("journal.group_commit_ms", "must be greater than zero for group-commit".into());
        }
        if self.max_new_tokens >= self.max_context_tokens {
            return invalid(
                "max_new_tokens",
                format!(
                    "{} leaves no room for a prompt in max_context_tokens = {}",
                    self.max_new_tokens, self.max_context_tokens
                ),
            );
        }
        let kv_bytes = self.kv_bytes_per_token() * u64::from(self.max_context_tokens) * u64::from(self.server.slots);
        if kv_bytes > self.memory_budget_bytes {
            return invalid(
                "memory_budget_bytes",
                format!(
                    "{} bytes cannot hold the f16 KV caches of max_context_tokens = {} for the sizing model in {} slot(s) ({} bytes)",
                    self.memory_budget_bytes, self.max_context_tokens, self.server.slots, kv_bytes
                ),
            );
        }
        if self.journal.segment_bytes > self.journal.disk_quota_bytes {
            return invalid(
                "journal.disk_quota_bytes",
                format!(
                    "{} bytes is smaller than one segment (journal.segment_bytes = {})",
                    self.journal.disk_quota_bytes, self.journal.segment_bytes
                ),
            );
        }
        Ok(())
    }

    /// Rust source of a `const` expression that rebuilds this profile; used by
    /// `build.rs` to bake the profile into the binary.
    pub fn to_rust_const(&self) -> String {
        format!(
            "Profile {{ name: Cow::Borrowed({:?}), target_class: Cow::Borrowed({:?}), threads: {}, \
             memory_budget_bytes: {}, weight_precision: Precision::{:?}, max_context_tokens: {}, \
             max_new_tokens: {}, deadline_ms: {}, \
             sizing: Sizing {{ layers: {}, kv_heads: {}, head_dim: {} }}, \
             journal: JournalSpec {{ durability: Durability::{:?}, group_commit_ms: {}, segment_bytes: {}, disk_quota_bytes: {} }}, \
             server: ServerSpec {{ slots: {}, queue: {} }}, \
             recall: RecallSpec {{ max_sequence_tokens: {}, capacity: {}, embedding_precision: EmbeddingPrecision::{:?}, top_k: {}, prompt_tokens: {} }}, \
             parts: Parts {{ recall: {} }} }}",
            self.name,
            self.target_class,
            self.threads,
            self.memory_budget_bytes,
            self.weight_precision,
            self.max_context_tokens,
            self.max_new_tokens,
            self.deadline_ms,
            self.sizing.layers,
            self.sizing.kv_heads,
            self.sizing.head_dim,
            self.journal.durability,
            self.journal.group_commit_ms,
            self.journal.segment_bytes,
            self.journal.disk_quota_bytes,
            self.server.slots,
            self.server.queue,
            self.recall.max_sequence_tokens,
            self.recall.capacity,
            self.recall.embedding_precision,
            self.recall.top_k,
            self.recall.prompt_tokens,
            self.parts.recall,
        )
    }
}
