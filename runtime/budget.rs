//! The memory plan: every buffer a session allocates, computed up front from
//! the model config and the profile, and checked against the profile budget.
//!
//! Principal types: [`MemoryPlan`], [`PlanSettings`], [`DecoderBuffers`],
//! [`KvPrecision`], [`BudgetError`]; the sizing constants [`ROW_TILE`],
//! [`TOKEN_GROUP`], [`PREFILL_BLOCK`], [`MAX_LORA_RANK`], [`FUSED_PRODUCTS`].
//!
//! Invariants: the plan is a leaf: it knows the model config and nothing of
//! the code that allocates (decoder, session, adapters), which sizes its
//! buffers from here; the decoder allocates exactly [`DecoderBuffers`], once,
//! when a session starts, and `Session::start` asserts that everything it
//! allocated equals the plan item by item; a session whose plan exceeds
//! `memory_budget_bytes` does not start. Mapped weights (the pack and adapter
//! files) are file-backed and reported beside the plan, not in it.

use std::fmt;

use crate::config::{ModelConfig, INT8_BLOCK};

/// Weight rows a prefill worker dequantizes and applies together.
pub const ROW_TILE: usize = 4;

/// Tokens of a product input the grouped int8 prefill tile takes at once
/// (one token per 32-bit lane of a 256-bit register; see
/// `kernels::scalar::group_tokens_i8` for the layout).
pub const TOKEN_GROUP: usize = 8;

/// Tokens per prefill block: large enough to amortize each weight row over
/// many tokens, small enough that activations stay a few hundred KiB.
pub const PREFILL_BLOCK: usize = 32;

/// Largest LoRA rank an adapter may have: the decoder's `A x` scratch and the
/// adapter-scale buffer are planned for it.
pub const MAX_LORA_RANK: usize = 64;

/// Most projections of one input the decoder runs as one parallel job (q,
/// k and v); each has its own slice of the adapter's `A x` scratch.
pub const FUSED_PRODUCTS: usize = 3;

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
    /// With an int8 pack, quantize each product's input to int8 blocks and
    /// multiply in integers (faster; see `decoder`); otherwise products
    /// read f32 activations, the reference.
    pub int8_activations: bool,
}

impl PlanSettings {
    /// The device's settings for a model with `config`: a context of
    /// `context_tokens` capped by the model's `max_position_embeddings`,
    /// [`PREFILL_BLOCK`], `threads` workers (at least 1), an f16 KV cache,
    /// one row of logits and f32 activations. Other uses change fields of
    /// the result.
    pub fn new(config: &ModelConfig, context_tokens: usize, threads: usize) -> PlanSettings {
        PlanSettings {
            context_tokens: context_tokens.min(config.max_position_embeddings),
            prefill_block: PREFILL_BLOCK,
            threads: threads.max(1),
            kv: KvPrecision::F16,
            logit_rows: 1,
            int8_activations: false,
        }
    }
}

/// Element counts of every buffer the decoder allocates: the one sizing
/// that [`MemoryPlan::new`] counts and `Decoder::new` allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderBuffers {
    /// KV cache elements: `2 × layers × context × kv_heads × head_dim`.
    pub kv_cache: usize,
    /// Residual stream and normed input, each `prefill_block × hidden` f32.
    pub residual: usize,
    /// Queries and attention output, each `prefill_block × heads × head_dim` f32.
    pub q: usize,
    /// Keys and values of the block, each `prefill_block × kv_heads × head_dim` f32.
    pub kv: usize,
    /// MLP gate and up, each `prefill_block × intermediate` f32.
    pub mlp: usize,
    /// The adapter's `A x`, `FUSED_PRODUCTS × prefill_block × MAX_LORA_RANK` f32.
    pub lora: usize,
    /// A product input quantized to int8 blocks (with `int8_activations`,
    /// else 0), `prefill_block × max(hidden, q width, intermediate)` i8.
    pub quantized: usize,
    /// Its block scales, `quantized / 32` f32.
    pub quantized_scales: usize,
    /// The same input in groups of [`TOKEN_GROUP`] tokens for the grouped
    /// prefill tile (with `int8_activations`, else 0): `prefill_block`
    /// rounded up to a whole group `× max(hidden, q width, intermediate)` i8.
    pub grouped: usize,
    /// Its block scales and its block offsets, `grouped / 32` each (f32 and
    /// i32).
    pub grouped_scales: usize,
    /// Attention scores, `threads × context` f32.
    pub scores: usize,
    /// Dequantized weight-row tiles (an int8 tile's widened scales take
    /// less), `threads × ROW_TILE × max(hidden, q width, intermediate)` f32.
    pub rows: usize,
    /// `logit_rows × vocab` f32.
    pub logits: usize,
    /// RoPE cosines, and as many sines: `context × head_dim / 2` f32 each.
    pub rope: usize,
    /// An int8 adapter's `B` scales as f32, for an adapter of
    /// [`MAX_LORA_RANK`] on every projection of every layer:
    /// `layers × MAX_LORA_RANK × (q + 2 kv + 2 hidden + 2 intermediate) / 32`.
    pub adapter_scales: usize,
}

impl DecoderBuffers {
    /// The buffers for `config` under `settings`.
    pub fn new(config: &ModelConfig, settings: &PlanSettings) -> DecoderBuffers {
        let (h, q, kv, ff) = (config.hidden_size, config.q_width(), config.kv_width(), config.intermediate_size);
        let (ctx, block, threads) = (settings.context_tokens, settings.prefill_block, settings.threads);
        let projection_outputs = q + 2 * kv + 2 * h + 2 * ff;
        // The widest product input; its int8 copies exist only with int8 activations.
        let widest = h.max(q).max(ff);
        let quantized = if settings.int8_activations { block * widest } else { 0 };
        let grouped = if settings.int8_activations { block.next_multiple_of(TOKEN_GROUP) * widest } else { 0 };
        DecoderBuffers {
            kv_cache: 2 * config.num_hidden_layers * ctx * kv,
            residual: block * h,
            q: block * q,
            kv: block * kv,
            mlp: block * ff,
            lora: FUSED_PRODUCTS * block * MAX_LORA_RANK,
            quantized,
            quantized_scales: quantized / INT8_BLOCK,
            grouped,
            grouped_scales: grouped / INT8_BLOCK,
            scores: threads * ctx,
            rows: threads * ROW_TILE * widest,
            logits: settings.logit_rows * config.vocab_size,
            rope: ctx * config.head_dim / 2,
            adapter_scales: config.num_hidden_layers * MAX_LORA_RANK * (projection_outputs / INT8_BLOCK),
        }
    }
}

/// Bytes of each buffer of a session. See the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Keys and values: `2 × layers × context × kv_heads × head_dim` elements.
    pub kv_cache: usize,
    /// Activations of one prefill block: residual, normed input, q, k, v,
    /// attention output, MLP gate and up, the adapter's `A x`
    /// (`prefill_block ×` their widths, f32), and the int8 copies of a
    /// product's input (row by row, and in token groups) with their block
    /// scales (and the groups' block offsets).
    pub activations: usize,
    /// Per thread: attention scores (`context` f32) and a tile of dequantized
    /// weight rows (`ROW_TILE × max(hidden, q width, intermediate)` f32).
    pub thread_scratch: usize,
    /// The active int8 adapter's `B` scales as f32 (see
    /// [`DecoderBuffers::adapter_scales`]), allocated at start whether or not
    /// an adapter is ever installed.
    pub adapter_scales: usize,
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
        let b = DecoderBuffers::new(config, settings);
        MemoryPlan {
            kv_cache: b.kv_cache * settings.kv.bytes(),
            activations: (2 * b.residual + 2 * b.q + 2 * b.kv + 2 * b.mlp + b.lora + b.quantized_scales + 2 * b.grouped_scales) * F32
                + b.quantized
                + b.grouped,
            thread_scratch: (b.scores + b.rows) * F32,
            adapter_scales: b.adapter_scales * F32,
            logits: b.logits * F32,
            rope_table: 2 * b.rope * F32,
            sampler: config.vocab_size * (4 + F32),
            token_table,
            request: settings.context_tokens * 4 + reply_bytes,
        }
    }

    /// All bytes of the plan.
    pub fn total(&self) -> usize {
        self.items().iter().map(|(_, bytes)| bytes).sum()
    }

    /// The plan of `n` sessions side by side (a server's slots): every item `n` times.
    pub fn times(&self, n: usize) -> MemoryPlan {
        MemoryPlan {
            kv_cache: self.kv_cache * n,
            activations: self.activations * n,
            thread_scratch: self.thread_scratch * n,
            adapter_scales: self.adapter_scales * n,
            logits: self.logits * n,
            rope_table: self.rope_table * n,
            sampler: self.sampler * n,
            token_table: self.token_table * n,
            request: self.request * n,
        }
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
    pub fn items(&self) -> [(&'static str, usize); 9] {
        [
            ("KV cache", self.kv_cache),
            ("activations", self.activations),
            ("thread scratch", self.thread_scratch),
            ("adapter scales", self.adapter_scales),
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
