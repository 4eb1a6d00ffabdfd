//! The memory plan: every buffer a session allocates, computed up front from
//! the model config and the profile, and checked against the profile budget.
//!
//! Principal types: [`MemoryPlan`], [`PlanSettings`], [`KvPrecision`],
//! [`BudgetError`].
//!
//! Invariants: the decoder allocates exactly the buffers listed here, once,
//! when a session starts (a test compares the plan with the allocations byte
//! for byte); a session whose plan exceeds `memory_budget_bytes` does not
//! start. Mapped weights are file-backed and reported beside the plan, not in it.

use std::fmt;

use crate::adapter::MAX_LORA_RANK;
use crate::config::ModelConfig;

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPrecision {
    /// IEEE binary16, the device default.
    F16,
    /// f32, for exact comparisons against a reference.
    F32,
}

impl KvPrecision {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvPrecision::F16 => 2,
            KvPrecision::F32 => 4,
        }
    }
}

/// Session parameters the plan depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanSettings {
    /// Context capacity in tokens (the KV cache's length).
    pub context_tokens: usize,
    /// Tokens per prefill block.
    pub prefill_block: usize,
    /// Worker threads (each has its own scores and weight-row scratch).
    pub threads: usize,
    /// KV cache element type.
    pub kv: KvPrecision,
    /// Rows of logits kept: 1 (the last token) or `prefill_block` (every
    /// token of a block, for perplexity).
    pub logit_rows: usize,
}

/// Bytes of each buffer of a session. See the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Keys and values: `2 × layers × context × kv_heads × head_dim` elements.
    pub kv_cache: usize,
    /// Activations of one prefill block: residual, normed input, q, k, v,
    /// attention output, MLP gate and up (`prefill_block ×` their widths, f32).
    pub activations: usize,
    /// Per thread: attention scores (`context` f32) and a tile of dequantized
    /// weight rows (`ROW_TILE × max(hidden, q width, intermediate)` f32).
    pub thread_scratch: usize,
    /// `logit_rows × vocab` f32.
    pub logits: usize,
    /// RoPE cosines and sines, `context × head_dim` f32.
    pub rope_table: usize,
    /// Sampler candidate buffers: `vocab ×` (u32 index + f32 probability).
    pub sampler: usize,
    /// Token text table: the UTF-8 bytes of every vocabulary entry plus
    /// `vocab + 1` u32 offsets.
    pub token_table: usize,
    /// Request buffers: the token history (`context` u32) and the reply text
    /// (`max_new_tokens ×` the longest token's bytes).
    pub request: usize,
}

/// The plan exceeds the profile's budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the session needs {needed} bytes ({plan}) but profile `{profile}` allows {budget} bytes (memory_budget_bytes)")]
pub struct BudgetError {
    /// Bytes the plan needs.
    pub needed: usize,
    /// The profile's budget.
    pub budget: u64,
    /// Profile name.
    pub profile: String,
    /// The plan, itemized.
    pub plan: String,
}

const F32: usize = 4;

impl MemoryPlan {
    /// The plan for `config` under `settings`; `token_table` is the byte size
    /// of the tokenizer's token table and `reply_bytes` the capacity of the
    /// reply text.
    pub fn new(config: &ModelConfig, settings: &PlanSettings, token_table: usize, reply_bytes: usize) -> MemoryPlan {
        let (h, q, kv, ff, v) =
            (config.hidden_size, config.q_width(), config.kv_width(), config.intermediate_size, config.vocab_size);
        let (ctx, block) = (settings.context_tokens, settings.prefill_block);
        MemoryPlan {
            kv_cache: 2 * config.num_hidden_layers * ctx * kv * settings.kv.bytes(),
            activations: block * (2 * h + 2 * q + 2 * kv + 2 * ff + MAX_LORA_RANK) * F32,
            thread_scratch: settings.threads * (ctx + crate::decoder::ROW_TILE * h.max(q).max(ff)) * F32,
            logits: settings.logit_rows * v * F32,
            rope_table: crate::kernels::RopeTable::bytes(ctx, config.head_dim),
            sampler: v * (4 + F32),
            token_table,
            request: ctx * 4 + reply_bytes,
        }
    }

    /// All bytes of the plan.
    pub fn total(&self) -> usize {
        self.kv_cache
            + self.activations
            + self.thread_scratch
            + self.logits
            + self.rope_table
            + self.sampler
            + self.token_table
            + self.request
    }

    /// Checks the plan against a profile's budget.
    ///
    /// # Errors
    /// [`BudgetError`] naming both numbers when the plan is larger.
    pub fn check(&self, profile: &str, budget: u64) -> Result<(), BudgetError> {
        if self.total() as u64 > budget {
            return Err(BudgetError { needed: self.total(), budget, profile: profile.into(), plan: self.to_string() });
        }
        Ok(())
    }

    /// `(name, bytes)` of each item, in display order.
    pub fn items(&self) -> [(&'static str, usize); 8] {
        [
            ("KV cache", self.kv_cache),
            ("activations", self.activations),
            ("thread scratch", self.thread_scratch),
            ("logits", self.logits),
            ("RoPE table", self.rope_table),
            ("sampler", self.sampler),
            ("token table", self.token_table),
            ("request buffers", self.request),
        ]
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, bytes)) in self.items().iter().enumerate() {
            write!(f, "{}{name} {bytes}", if i > 0 { ", " } else { "" })?;
        }
        Ok(())
    }
}
