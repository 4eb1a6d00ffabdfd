//! The Llama-family decoder over a memory-mapped pack.
//!
//! Principal types: [`Decoder`], [`DecodeError`]; [`kv_cache::KvCache`].
//!
//! The forward pass follows Hugging Face's `LlamaForCausalLM`: token
//! embedding; per layer RMSNorm → q/k/v projections → RoPE (half-split) →
//! grouped-query causal attention over the KV cache → output projection →
//! residual; RMSNorm → SiLU-gated MLP → residual; final RMSNorm; the output
//! projection (tied to the embedding when the config says so). Prefill runs
//! the prompt in blocks of `prefill_block` tokens through matrix-matrix
//! products; decode is the same pass with one token (matrix-vector).
//! Matrix rows and attention heads are split over a persistent
//! [`WorkerPool`].
//!
//! An active LoRA adapter ([`Decoder::set_adapter`]) adds
//! `scale · B (A x)` to each targeted projection, unmerged: `A x` is computed
//! per token into a planned scratch buffer, and each output row adds its
//! `B` row's dot with it inside the same parallel pass as the base product.
//! An int8 `B`'s scales are widened to f32 once, when the adapter is set,
//! into a planned buffer (the column walk then converts no half floats).
//!
//! Invariants:
//! - Every buffer is allocated in [`Decoder::new`], sized by the plan's
//!   [`DecoderBuffers`]; [`Decoder::allocated`] reports them as a
//!   [`MemoryPlan`]; [`Decoder::forward`] and [`Decoder::set_adapter`]
//!   perform no heap allocation.
//! - Weights are read in place from the mapping, never copied.
//! - Position `p` of the KV cache holds token `p` of the current sequence;
//!   [`Decoder::truncate`] forgets positions, nothing else rewinds.

pub mod kv_cache;

use std::sync::Arc;

use half::f16;

use crate::adapter::{LoraAdapter, Target};
use crate::budget::{DecoderBuffers, MemoryPlan, PlanSettings, MAX_LORA_RANK, ROW_TILE, TOKEN_GROUP};
use crate::config::INT8_BLOCK;
use crate::kernels::scalar::group_tokens_i8;
use crate::kernels::{rms_norm, rope, silu_mul, softmax, Kernels, RopeTable};
use crate::pool::{share, WorkerPool};
use crate::weights::{Matrix, ModelPack};
use kv_cache::{Cache, KvCache, KvElement};

/// A forward pass that cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The tokens do not fit in the remaining context.
    #[error("context full: {needed} tokens needed, the context holds {capacity}")]
    ContextFull {
        /// Positions the request would need.
        needed: usize,
        /// Context capacity.
        capacity: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Nothing to process.
    #[error("no tokens to process")]
    Empty,
}

/// Disjoint parallel writes into one buffer: each worker writes only the
/// indices its static share gives it.
#[derive(Clone, Copy)]
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: workers write disjoint index ranges (see each use), and the owning
// buffer outlives the `WorkerPool::run` call that uses the pointer (`run`
// returns, or unwinds, only after every worker finished the job).
unsafe impl Send for SharedOut {}
// SAFETY: as for `Send`: shared references only hand out disjoint ranges.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn new(buf: &mut [f32]) -> SharedOut {
        SharedOut { ptr: buf.as_mut_ptr(), len: buf.len() }
    }

    /// # Safety
    /// No other thread may access `start..start + len` during the borrow.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.len), "shared write out of bounds");
        // SAFETY: `start..start + len` lies inside the buffer (asserted above),
        // which is alive for the job; the caller guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Activation buffers of one prefill block (`prefill_block` rows each).
struct Activations {
    x: Vec<f32>,
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// `A x` of the active adapter, `prefill_block × MAX_LORA_RANK`.
    lora: Vec<f32>,
    /// A product input as int8 blocks (int8 packs with int8 activations).
    xq: QuantizedInput,
}

/// The int8 copies of a product input: row by row (values, one f32 scale
/// per 32-block) and, for the grouped prefill tile, in groups of
/// [`TOKEN_GROUP`] tokens (`kernels::scalar::group_tokens_i8`'s layout:
/// values, scales, offsets).
struct QuantizedInput {
    values: Vec<i8>,
    scales: Vec<f32>,
    grouped: Vec<i8>,
    grouped_scales: Vec<f32>,
    grouped_offsets: Vec<i32>,
}

/// A product's input rows: f32, and for an int8 pack the same rows
/// quantized to int8 blocks (values, one f32 scale per 32-block), made once
/// for every product that reads them; for several rows and kernels with a
/// grouped tile, also in token groups (values, scales, offsets).
#[derive(Clone, Copy)]
struct Input<'a> {
    f32: &'a [f32],
    i8: Option<(&'a [i8], &'a [f32])>,
    grouped: Option<(&'a [i8], &'a [f32], &'a [i32])>,
}

impl<'a> Input<'a> {
    /// `x` (`n` rows), quantized into `q` when `int8`, and grouped there too
    /// when `n > 1` and the kernels have [`Kernels::dot4_grouped_i8_i8`].
    fn new(k: &Kernels, int8: bool, x: &'a [f32], n: usize, q: &'a mut QuantizedInput) -> Input<'a> {
        if !int8 {
            return Input { f32: x, i8: None, grouped: None };
        }
        let QuantizedInput { values, scales, grouped, grouped_scales, grouped_offsets } = q;
        let (values, scales) = (&mut values[..x.len()], &mut scales[..x.len() / INT8_BLOCK]);
        (k.quantize_i8)(x, values, scales);
        let grouped = (n > 1 && k.dot4_grouped_i8_i8.is_some()).then(|| {
            let cols = x.len() / n;
            let len = n.next_multiple_of(TOKEN_GROUP) * cols;
            let (values_out, scales_out, offsets_out) =
                (&mut grouped[..len], &mut grouped_scales[..len / INT8_BLOCK], &mut grouped_offsets[..len / INT8_BLOCK]);
            group_tokens_i8(cols, values, scales, values_out, scales_out, offsets_out);
            (&*values_out, &*scales_out, &*offsets_out)
        });
        Input { f32: x, i8: Some((values, scales)), grouped }
    }
}

/// A decoding session's model state: KV cache, buffers, worker pool.
pub struct Decoder<'m> {
    pack: &'m ModelPack,
    kernels: Kernels,
    pool: WorkerPool,
    settings: PlanSettings,
    kv: KvCache,
    rope: RopeTable,
    act: Activations,
    /// Per worker: `context` attention scores.
    scores: Vec<f32>,
    /// Per worker: a tile of [`ROW_TILE`] dequantized weight rows.
    rows: Vec<f32>,
    logits: Vec<f32>,
    pos: usize,
    adapter: Option<Arc<LoraAdapter>>,
    /// Whether the active adapter takes part in the forward pass
    /// ([`Decoder::apply_adapter`]).
    adapter_applied: bool,
    /// The active adapter's int8 `B` scales as f32, at [`ScaleLayout`] offsets.
    adapter_scales: Vec<f32>,
    scale_layout: ScaleLayout,
}

/// Where the f32 scales of each projection's int8 `B` (`[rank, out / 32]`)
/// sit in the decoder's adapter-scale buffer: layer by layer, each target
/// at a fixed offset with room for [`MAX_LORA_RANK`] rows.
#[derive(Clone, Copy)]
struct ScaleLayout {
    /// Offset of each target ([`Target::ALL`] order) within a layer.
    offsets: [usize; 7],
    /// Elements per layer.
    layer: usize,
}

impl ScaleLayout {
    fn new(pack: &ModelPack) -> ScaleLayout {
        let w = pack.layer(0);
        let outputs = [w.q_proj, w.k_proj, w.v_proj, w.o_proj, w.gate_proj, w.up_proj, w.down_proj].map(|m| m.shape().0);
        let mut offsets = [0; 7];
        let mut at = 0;
        for (offset, out) in offsets.iter_mut().zip(outputs) {
            *offset = at;
            at += MAX_LORA_RANK * (out / INT8_BLOCK);
        }
        ScaleLayout { offsets, layer: at }
    }

    /// The span of `target`'s scales in `layer` for `len` elements.
    fn span(&self, layer: usize, target: Target, len: usize) -> std::ops::Range<usize> {
        let start = layer * self.layer + self.offsets[target as usize];
        start..start + len
    }
}

/// The adapter's contribution to one projection: `scale · B t`, where
/// `t = A x` for each token of the block (`rank` values per token).
struct LoraTerm<'a> {
    b: Matrix<'a>,
    /// An int8 `B`'s scales as f32, `[rank, out / 32]` (the decoder's buffer).
    b_scales: &'a [f32],
    t: &'a [f32],
    rank: usize,
    scale: f32,
}

impl LoraTerm<'_> {
    /// `scale · B[r] · t_i`: a row dot for an F16 `B` `[out, rank]`; for an
    /// int8 `B`, stored transposed `[rank, out]` (see [`crate::adapter`]),
    /// a walk down column `r`.
    fn output(&self, k: &Kernels, i: usize, r: usize) -> f32 {
        let t = &self.t[i * self.rank..(i + 1) * self.rank];
        let dot = match self.b {
            Matrix::Int8 { cols, values, .. } => {
                let (blocks, block, scales) = (cols / INT8_BLOCK, r / INT8_BLOCK, self.b_scales);
                t.iter().enumerate().map(|(j, &tj)| tj * f32::from(values[j * cols + r]) * scales[j * blocks + block]).sum()
            }
            Matrix::F16 { .. } => k.row_dot(&self.b, r, t),
        };
        self.scale * dot
    }
}

/// What every projection of a block shares: the pool, the kernels, the
/// active adapter with its widened scales, the block's token count.
struct Projections<'a> {
    pool: &'a WorkerPool,
    k: Kernels,
    adapter: Option<&'a LoraAdapter>,
    adapter_scales: &'a [f32],
    scale_layout: ScaleLayout,
    n: usize,
}

impl Projections<'_> {
    /// For each `(target, m, out)`: `out = m · input` for the block's
    /// tokens, plus the adapter's `scale · B (A x)` when it targets `target`
    /// in `layer` (`A x`, from the f32 input, goes to the product's slice of
    /// `lora`); all products of the same input run as one parallel job, so
    /// q, k and v (and gate and up) cost one join, not three (two). `rows`
    /// is the workers' tile scratch.
    fn apply(&self, layer: usize, products: heapless::Vec<(Target, &Matrix<'_>, &mut [f32]), FUSED>, input: Input<'_>, lora: &mut [f32], rows: &mut [f32]) {
        let mut jobs: heapless::Vec<Product<'_>, FUSED> = heapless::Vec::new();
        for ((target, m, out), lora) in products.into_iter().zip(lora.chunks_exact_mut(lora.len() / FUSED)) {
            let term = self.adapter.and_then(|adapter| {
                let input = input.f32;
                let (a, b) = adapter.projection(layer, target)?;
                let (rank, cols) = a.shape();
                for i in 0..self.n {
                    for j in 0..rank {
                        lora[i * rank + j] = self.k.row_dot(&a, j, &input[i * cols..(i + 1) * cols]);
                    }
                }
                let b_scales = match b {
                    Matrix::Int8 { scales, .. } => &self.adapter_scales[self.scale_layout.span(layer, target, scales.len())],
                    Matrix::F16 { .. } => &[],
                };
                Some(LoraTerm { b, b_scales, t: &lora[..self.n * rank], rank, scale: adapter.scale() })
            });
            let rows = m.shape().0;
            // `jobs` holds as many products as `products` does, so the push cannot fail.
            let _ = jobs.push(Product { m: *m, out: SharedOut::new(&mut out[..self.n * rows]), lora: term });
        }
        matmul(self.pool, &self.k, &jobs, input, self.n, rows);
    }
}

/// Most products one job runs (q, k and v).
const FUSED: usize = crate::budget::FUSED_PRODUCTS;

/// One product of a parallel job: `out = m · input` (`[n × rows]`), plus
/// the adapter's term.
struct Product<'a> {
    m: Matrix<'a>,
    out: SharedOut,
    lora: Option<LoraTerm<'a>>,
}

impl<'m> Decoder<'m> {
    /// Allocates every buffer of the plan for `pack` under `settings`
    /// ([`DecoderBuffers`]) and starts the worker pool. Budget checks happen
    /// before this (see [`crate::budget::MemoryPlan::check`]).
    pub fn new(pack: &'m ModelPack, settings: PlanSettings) -> Decoder<'m> {
        let c = pack.config();
        let buffers = DecoderBuffers::new(c, &settings);
        let scale_layout = ScaleLayout::new(pack);
        assert_eq!(scale_layout.layer * c.num_hidden_layers, buffers.adapter_scales, "adapter scales as planned");
        let zeros = |n: usize| vec![0.0f32; n];
        Decoder {
            pack,
            kernels: Kernels::detect(),
            pool: WorkerPool::new(settings.threads),
            settings,
            kv: KvCache::new(settings.kv, c.num_hidden_layers, settings.context_tokens, c.kv_width()),
            rope: RopeTable::new(settings.context_tokens, c.head_dim, c.rope_theta),
            act: Activations {
                x: zeros(buffers.residual),
                xb: zeros(buffers.residual),
                q: zeros(buffers.q),
                k: zeros(buffers.kv),
                v: zeros(buffers.kv),
                att: zeros(buffers.q),
                gate: zeros(buffers.mlp),
                up: zeros(buffers.mlp),
                lora: zeros(buffers.lora),
                xq: QuantizedInput {
                    values: vec![0; buffers.quantized],
                    scales: zeros(buffers.quantized_scales),
                    grouped: vec![0; buffers.grouped],
                    grouped_scales: zeros(buffers.grouped_scales),
                    grouped_offsets: vec![0; buffers.grouped_scales],
                },
            },
            scores: zeros(buffers.scores),
            rows: zeros(buffers.rows),
            logits: zeros(buffers.logits),
            pos: 0,
            adapter: None,
            adapter_applied: true,
            adapter_scales: zeros(buffers.adapter_scales),
            scale_layout,
        }
    }

    /// Makes `adapter` (opened for this decoder's pack) active from the next
    /// forward pass on; `None` decodes with the base model alone. The KV
    /// cache is cleared, since it was computed with the previous weights.
    /// An int8 adapter's `B` scales are widened into the planned buffer.
    pub fn set_adapter(&mut self, adapter: Option<Arc<LoraAdapter>>) {
        if let Some(adapter) = &adapter {
            for layer in 0..self.pack.config().num_hidden_layers {
                for target in Target::ALL {
                    if let Some((_, Matrix::Int8 { scales, .. })) = adapter.projection(layer, target) {
                        let out = &mut self.adapter_scales[self.scale_layout.span(layer, target, scales.len())];
                        out.iter_mut().zip(scales).for_each(|(o, s)| *o = s.to_f32());
                    }
                }
            }
        }
        self.adapter = adapter;
        self.pos = 0;
    }

    /// The active adapter.
    pub fn adapter(&self) -> Option<&Arc<LoraAdapter>> {
        self.adapter.as_ref()
    }

    /// Whether the active adapter takes part in the next forward passes
    /// (`true` from [`Decoder::new`] on): a scoped adapter is applied only to
    /// the requests in its scope (decided by `recall/scope.rs`, above this module),
    /// without reloading it. When the setting changes the KV cache is
    /// cleared, since it was computed with the other weights. Returns whether
    /// it changed.
    pub fn apply_adapter(&mut self, applied: bool) -> bool {
        let changed = applied != self.adapter_applied;
        self.adapter_applied = applied;
        if changed {
            self.pos = 0;
        }
        changed
    }

    /// The adapter the forward pass applies: the active one, unless
    /// [`Decoder::apply_adapter`] set it aside.
    pub fn applied_adapter(&self) -> Option<&Arc<LoraAdapter>> {
        self.adapter.as_ref().filter(|_| self.adapter_applied)
    }

    /// Bytes this decoder allocated, as the items of a [`MemoryPlan`] (the
    /// items the decoder does not own are zero).
    pub fn allocated(&self) -> MemoryPlan {
        let f = |v: &Vec<f32>| v.capacity() * 4;
        let a = &self.act;
        MemoryPlan {
            kv_cache: self.kv.bytes(),
            activations: f(&a.x) + f(&a.xb) + f(&a.q) + f(&a.k) + f(&a.v) + f(&a.att) + f(&a.gate) + f(&a.up) + f(&a.lora)
                + f(&a.xq.scales)
                + f(&a.xq.grouped_scales)
                + a.xq.grouped_offsets.capacity() * 4
                + a.xq.values.capacity()
                + a.xq.grouped.capacity(),
            thread_scratch: f(&self.scores) + f(&self.rows),
            adapter_scales: f(&self.adapter_scales),
            logits: f(&self.logits),
            rope_table: self.rope.allocated(),
            ..MemoryPlan::default()
        }
    }

    /// The settings the decoder was planned with.
    pub fn settings(&self) -> &PlanSettings {
        &self.settings
    }

    /// Kernels in use.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Worker threads in use, the caller included.
    pub fn threads(&self) -> usize {
        self.pool.workers()
    }

    /// The worker pool's joins so far and the time spent waiting at them.
    pub fn pool_stats(&self) -> crate::pool::PoolStats {
        self.pool.stats()
    }

    /// The pack being decoded.
    pub fn pack(&self) -> &'m ModelPack {
        self.pack
    }

    /// Tokens in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Context capacity in tokens.
    pub fn capacity(&self) -> usize {
        self.settings.context_tokens
    }

    /// Forgets every position from `pos` on (`pos <= position()`).
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    /// Appends `tokens` to the sequence and returns the logits (`[vocab]`)
    /// after the last one (mutable, for the sampler's in-place penalties).
    ///
    /// # Errors
    /// [`DecodeError`] when `tokens` is empty, does not fit the context, or
    /// holds an id outside the vocabulary; nothing is appended then.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<&mut [f32], DecodeError> {
        self.check(tokens)?;
        for block in tokens.chunks(self.settings.prefill_block) {
            self.block(block, false);
        }
        Ok(&mut self.logits[..self.pack.config().vocab_size])
    }

    /// Like [`forward`](Self::forward), but calls `each(index, logits)` with
    /// the logits after every token (for perplexity). Needs a plan with
    /// `logit_rows == prefill_block`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_all(&mut self, tokens: &[u32], mut each: impl FnMut(usize, &[f32])) -> Result<(), DecodeError> {
        assert_eq!(self.settings.logit_rows, self.settings.prefill_block, "plan keeps one row of logits");
        self.check(tokens)?;
        let vocab = self.pack.config().vocab_size;
        for (b, block) in tokens.chunks(self.settings.prefill_block).enumerate() {
            self.block(block, true);
            for i in 0..block.len() {
                each(b * self.settings.prefill_block + i, &self.logits[i * vocab..(i + 1) * vocab]);
            }
        }
        Ok(())
    }

    fn check(&self, tokens: &[u32]) -> Result<(), DecodeError> {
        if tokens.is_empty() {
            return Err(DecodeError::Empty);
        }
        let needed = self.pos + tokens.len();
        if needed > self.settings.context_tokens {
            return Err(DecodeError::ContextFull { needed, capacity: self.settings.context_tokens });
        }
        let vocab = self.pack.config().vocab_size;
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(&id) => Err(DecodeError::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }

    /// One block of at most `prefill_block` checked tokens.
    fn block(&mut self, tokens: &[u32], all_logits: bool) {
        let c = self.pack.config();
        let (h, qw, kw, ff, d) = (c.hidden_size, c.q_width(), c.kv_width(), c.intermediate_size, c.head_dim);
        let (n, pos0, eps, k) = (tokens.len(), self.pos, c.rms_norm_eps, self.kernels);
        let int8 = self.settings.int8_activations && self.pack.precision() == crate::profile::Precision::Int8;
        let a = &mut self.act;
        let p = Projections {
            pool: &self.pool,
            k,
            adapter: self.adapter.as_deref().filter(|_| self.adapter_applied),
            adapter_scales: &self.adapter_scales,
            scale_layout: self.scale_layout,
            n,
        };
        let embed = self.pack.embed_tokens();
        for (i, &t) in tokens.iter().enumerate() {
            k.dequant_row(&embed, t as usize, &mut a.x[i * h..(i + 1) * h]);
        }
        for layer in 0..c.num_hidden_layers {
            let w = self.pack.layer(layer);
            for i in 0..n {
                rms_norm(&k, &a.x[i * h..(i + 1) * h], w.input_norm, eps, &mut a.xb[i * h..(i + 1) * h]);
            }
            let input = Input::new(&k, int8, &a.xb[..n * h], n, &mut a.xq);
            let qkv = [(Target::Q, &w.q_proj, &mut a.q[..]), (Target::K, &w.k_proj, &mut a.k[..]), (Target::V, &w.v_proj, &mut a.v[..])];
            p.apply(layer, heapless::Vec::from_iter(qkv), input, &mut a.lora, &mut self.rows);
            for i in 0..n {
                rope(&mut a.q[i * qw..(i + 1) * qw], d, pos0 + i, &self.rope);
                rope(&mut a.k[i * kw..(i + 1) * kw], d, pos0 + i, &self.rope);
            }
            let shape = AttentionShape { heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: d, context: self.settings.context_tokens };
            match &mut self.kv {
                KvCache::F16(cache) => attend::<f16>(&self.pool, &k, cache, layer, a, n, pos0, &shape, &mut self.scores),
                KvCache::F32(cache) => attend::<f32>(&self.pool, &k, cache, layer, a, n, pos0, &shape, &mut self.scores),
            }
            let input = Input::new(&k, int8, &a.att[..n * qw], n, &mut a.xq);
            p.apply(layer, heapless::Vec::from_iter([(Target::O, &w.o_proj, &mut a.xb[..])]), input, &mut a.lora, &mut self.rows);
            add(&mut a.x[..n * h], &a.xb[..n * h]);
            for i in 0..n {
                rms_norm(&k, &a.x[i * h..(i + 1) * h], w.post_attention_norm, eps, &mut a.xb[i * h..(i + 1) * h]);
            }
            let input = Input::new(&k, int8, &a.xb[..n * h], n, &mut a.xq);
            let gate_up = [(Target::Gate, &w.gate_proj, &mut a.gate[..]), (Target::Up, &w.up_proj, &mut a.up[..])];
            p.apply(layer, heapless::Vec::from_iter(gate_up), input, &mut a.lora, &mut self.rows);
            silu_mul(&mut a.gate[..n * ff], &a.up[..n * ff]);
            let input = Input::new(&k, int8, &a.gate[..n * ff], n, &mut a.xq);
            p.apply(layer, heapless::Vec::from_iter([(Target::Down, &w.down_proj, &mut a.xb[..])]), input, &mut a.lora, &mut self.rows);
            add(&mut a.x[..n * h], &a.xb[..n * h]);
        }
        let first = if all_logits { 0 } else { n - 1 };
        for (j, i) in (first..n).enumerate() {
            rms_norm(&k, &a.x[i * h..(i + 1) * h], self.pack.final_norm(), eps, &mut a.xb[j * h..(j + 1) * h]);
        }
        let rows = n - first;
        let input = Input::new(&k, int8, &a.xb[..rows * h], rows, &mut a.xq);
        let vocab = self.pack.config().vocab_size;
        let lm_head = Product { m: self.pack.lm_head(), out: SharedOut::new(&mut self.logits[..rows * vocab]), lora: None };
        matmul(&self.pool, &k, &[lm_head], input, rows, &mut self.rows);
        self.pos += n;
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

/// For each product: `out[i × rows + r] = m[r] · input[i × cols ..]` (plus
/// the adapter's `scale · B[r] · t_i`) for `i < n`, every product's rows
/// split over the pool in one job. An int8 matrix with an int8 input takes
/// the integer path ([`Kernels::dot_i8_i8`]); anything else dots f32
/// activations. With `n > 1` each worker takes [`ROW_TILE`] weight rows at
/// a time and applies them to all `n` inputs while they sit in cache, three
/// tokens at a time (4 × 3 register tiles): int8 rows directly
/// ([`Kernels::dot4x3_i8_i8`], their scales widened into the worker's slice
/// of `scratch`; or by groups of eight tokens, [`Kernels::dot4_grouped_i8_i8`],
/// where the kernels have it and the input was grouped), other rows
/// dequantized into it first ([`Kernels::dot4x3_f32`]).
fn matmul(pool: &WorkerPool, k: &Kernels, products: &[Product<'_>], input: Input<'_>, n: usize, scratch: &mut [f32]) {
    let stride = scratch.len() / pool.workers();
    let scratch = SharedOut::new(scratch);
    for p in products {
        assert_eq!(p.out.len, n * p.m.shape().0, "a product's output holds n rows of its outputs");
    }
    pool.run(&|w, workers| {
        // SAFETY: worker w owns scratch[w × stride ..][..stride].
        let tile = unsafe { scratch.slice(w * stride, stride) };
        for p in products {
            product_share(k, p, input, n, share(p.m.shape().0, w, workers), tile);
        }
    });
}

/// Worker's share `mine` of the rows of one product (see [`matmul`]);
/// `tile` is the worker's scratch.
fn product_share(k: &Kernels, p: &Product<'_>, input: Input<'_>, n: usize, mine: std::ops::Range<usize>, tile: &mut [f32]) {
    let (m, (rows, cols)) = (&p.m, p.m.shape());
    let extra = |i: usize, r: usize| p.lora.as_ref().map_or(0.0, |l| l.output(k, i, r));
    if n == 1 {
        // SAFETY: this worker writes only the rows of its share.
        let out = unsafe { p.out.slice(mine.start, mine.len()) };
        for (o, r) in out.iter_mut().zip(mine) {
            let dot = match input.i8 {
                Some((xq, xs)) => k.row_dot_i8(m, r, xq, xs),
                None => None,
            };
            *o = dot.unwrap_or_else(|| k.row_dot(m, r, input.f32)) + extra(0, r);
        }
        return;
    }
    assert!(ROW_TILE * cols <= tile.len(), "a worker's tile fits its share of the scratch");
    // SAFETY: element (i, r) belongs to the worker that owns row r.
    let put = |i: usize, r: usize, v: f32| unsafe { p.out.slice(i * rows + r, 1)[0] = v + extra(i, r) };
    match (*m, input.i8) {
        (Matrix::Int8 { values, scales, .. }, Some((xq, xs))) => {
            let blocks = cols / INT8_BLOCK;
            let x = |i: usize| (&xq[i * cols..(i + 1) * cols], &xs[i * blocks..(i + 1) * blocks]);
            let mut r0 = mine.start;
            while r0 + ROW_TILE <= mine.end {
                let tile_scales = &mut tile[..ROW_TILE * blocks];
                (k.dequant_f16)(&scales[r0 * blocks..(r0 + ROW_TILE) * blocks], tile_scales);
                let tile_values = &values[r0 * cols..(r0 + ROW_TILE) * cols];
                if let (Some((xg, xgs, xgo)), Some(grouped)) = (input.grouped, k.dot4_grouped_i8_i8) {
                    // Up to GROUPS_PER_CALL token groups per call, their outputs on the stack.
                    const GROUPS_PER_CALL: usize = 4;
                    let (len, scales_len) = (TOKEN_GROUP * cols, TOKEN_GROUP * blocks);
                    let mut dots = [0.0f32; GROUPS_PER_CALL * ROW_TILE * TOKEN_GROUP];
                    let groups = n.div_ceil(TOKEN_GROUP);
                    for g0 in (0..groups).step_by(GROUPS_PER_CALL) {
                        let g1 = groups.min(g0 + GROUPS_PER_CALL);
                        let out = &mut dots[..(g1 - g0) * ROW_TILE * TOKEN_GROUP];
                        grouped(tile_values, tile_scales, &xg[g0 * len..g1 * len], &xgs[g0 * scales_len..g1 * scales_len], &xgo[g0 * scales_len..g1 * scales_len], out);
                        for (i, &v) in out.iter().enumerate() {
                            let (token, row) = ((g0 + i / (ROW_TILE * TOKEN_GROUP)) * TOKEN_GROUP + i % TOKEN_GROUP, i / TOKEN_GROUP % ROW_TILE);
                            if token < n {
                                put(token, r0 + row, v);
                            }
                        }
                    }
                } else {
                    let mut i = 0;
                    while i + 3 <= n {
                        let (xq, xs) = (&xq[i * cols..(i + 3) * cols], &xs[i * blocks..(i + 3) * blocks]);
                        let dots = (k.dot4x3_i8_i8)(tile_values, tile_scales, xq, xs);
                        for (j, dots) in dots.iter().enumerate() {
                            dots.iter().enumerate().for_each(|(t, &v)| put(i + j, r0 + t, v));
                        }
                        i += 3;
                    }
                    for i in i..n {
                        let (xq, xs) = x(i);
                        let [dots] = (k.dot4x1_i8_i8)(tile_values, tile_scales, xq, xs);
                        dots.iter().enumerate().for_each(|(t, &v)| put(i, r0 + t, v));
                    }
                }
                r0 += ROW_TILE;
            }
            for r in r0..mine.end {
                let (row, row_scales) = (&values[r * cols..(r + 1) * cols], &scales[r * blocks..(r + 1) * blocks]);
                for i in 0..n {
                    let (xq, xs) = x(i);
                    put(i, r, (k.dot_i8_i8)(row, row_scales, xq, xs));
                }
            }
        }
        _ => {
            let x = |i: usize| &input.f32[i * cols..(i + 1) * cols];
            let tile = &mut tile[..ROW_TILE * cols];
            let mut r0 = mine.start;
            while r0 + ROW_TILE <= mine.end {
                for t in 0..ROW_TILE {
                    k.dequant_row(m, r0 + t, &mut tile[t * cols..(t + 1) * cols]);
                }
                let mut i = 0;
                while i + 3 <= n {
                    let dots = (k.dot4x3_f32)(tile, &input.f32[i * cols..(i + 3) * cols]);
                    for (j, dots) in dots.iter().enumerate() {
                        dots.iter().enumerate().for_each(|(t, &v)| put(i + j, r0 + t, v));
                    }
                    i += 3;
                }
                for i in i..n {
                    let dots = (k.dot4_f32)(tile, x(i));
                    dots.iter().enumerate().for_each(|(t, &v)| put(i, r0 + t, v));
                }
                r0 += ROW_TILE;
            }
            for r in r0..mine.end {
                k.dequant_row(m, r, &mut tile[..cols]);
                for i in 0..n {
                    put(i, r, (k.dot_f32)(&tile[..cols], x(i)));
                }
            }
        }
    }
}

struct AttentionShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    context: usize,
}

/// Stores the block's keys and values at `pos0..pos0 + n`, then computes
/// causal grouped-query attention for each (token, head) into `a.att`.
#[allow(clippy::too_many_arguments)]
fn attend<E: KvElement>(
    pool: &WorkerPool,
    k: &Kernels,
    cache: &mut Cache<E>,
    layer: usize,
    a: &mut Activations,
    n: usize,
    pos0: usize,
    shape: &AttentionShape,
    scores: &mut [f32],
) {
    let (d, heads, kw) = (shape.head_dim, shape.heads, shape.kv_heads * shape.head_dim);
    for i in 0..n {
        cache.store(k, layer, pos0 + i, &a.k[i * kw..(i + 1) * kw], &a.v[i * kw..(i + 1) * kw]);
    }
    let (keys, values) = (cache.keys(layer), cache.values(layer));
    let group = heads / shape.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let q = &a.q;
    let (att, scores) = (SharedOut::new(&mut a.att[..n * heads * d]), SharedOut::new(scores));
    pool.run(&|w, workers| {
        // SAFETY: worker w owns scores[w × context ..][..context].
        let sc = unsafe { scores.slice(w * shape.context, shape.context) };
        for item in share(n * heads, w, workers) {
            let (i, head) = (item / heads, item % heads);
            let (len, g) = (pos0 + i + 1, head / group);
            let qh = &q[(i * heads + head) * d..][..d];
            for (s, score) in sc[..len].iter_mut().enumerate() {
                *score = E::dot(k, &keys[s * kw + g * d..][..d], qh) * scale;
            }
            softmax(&mut sc[..len]);
            // SAFETY: (token i, head) is this worker's item; its output span is disjoint.
            let out = unsafe { att.slice((i * heads + head) * d, d) };
            out.fill(0.0);
            for (s, &p) in sc[..len].iter().enumerate() {
                E::axpy(k, p, &values[s * kw + g * d..][..d], out);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The integer path of every product (tiles of [`ROW_TILE`] rows, by
    /// token groups and without, and the rows left over; one token and
    /// several, one worker and two) equals the f32 path on the same
    /// quantized activations.
    #[test]
    fn int8_products_equal_f32_products_on_the_quantized_input() {
        for (rows, cols, n) in [(19, 96, 5), (64, 64, 32), (96, 64, 9), (32, 128, 32)] {
            products_agree(rows, cols, n);
        }
    }

    fn products_agree(rows: usize, cols: usize, n: usize) {
        let noise = |i: usize, m: usize| ((i * 7919 + 13) % m) as i64 - (m / 2) as i64;
        let values: Vec<i8> = (0..rows * cols).map(|i| noise(i, 256) as i8).collect();
        let scales: Vec<f16> = (0..rows * cols / 32).map(|i| f16::from_f32(0.01 + 0.001 * (i % 7) as f32)).collect();
        let m = Matrix::Int8 { rows, cols, values: &values, scales: &scales };
        let x: Vec<f32> = (0..n * cols).map(|i| noise(i * 31, 1001) as f32 / 100.0).collect();
        let detected = Kernels::detect();
        let ungrouped = |k: Kernels| Kernels { dot4_grouped_i8_i8: None, ..k };
        for k in [Kernels::SCALAR, ungrouped(Kernels::SCALAR), detected, ungrouped(detected)] {
            let grouped = n.next_multiple_of(TOKEN_GROUP) * cols;
            let mut q = QuantizedInput {
                values: vec![0; n * cols],
                scales: vec![0.0; n * cols / 32],
                grouped: vec![0; grouped],
                grouped_scales: vec![0.0; grouped / 32],
                grouped_offsets: vec![0; grouped / 32],
            };
            for threads in [1, 2] {
                let pool = WorkerPool::new(threads);
                let mut scratch = vec![0.0; threads * ROW_TILE * cols];
                for tokens in [1, n] {
                    let (mut got, mut want) = (vec![0.0; tokens * rows], vec![0.0; tokens * rows]);
                    let int8_input = Input::new(&k, true, &x[..tokens * cols], tokens, &mut q);
                    assert_eq!(int8_input.grouped.is_some(), tokens > 1 && k.dot4_grouped_i8_i8.is_some());
                    let (xq, xs) = int8_input.i8.unwrap();
                    let dequantized: Vec<f32> = (0..tokens * cols).map(|i| f32::from(xq[i]) * xs[i / 32]).collect();
                    let product = |out: &mut [f32]| Product { m, out: SharedOut::new(out), lora: None };
                    matmul(&pool, &k, &[product(&mut got)], int8_input, tokens, &mut scratch);
                    let f32_input = Input { f32: &dequantized, i8: None, grouped: None };
                    matmul(&pool, &k, &[product(&mut want)], f32_input, tokens, &mut scratch);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{}: {g} != {w} ({tokens} tokens, {threads} threads)", k.isa.name());
                    }
                }
            }
        }
    }
}
