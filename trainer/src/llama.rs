//! The trainer's Llama forward pass in candle, over the frozen base weights
//! of a pack, with trainable LoRA parameters.
//!
//! Principal types: [`BaseModel`], [`Lora`].
//!
//! Written with plain candle ops (matmul, broadcast arithmetic, exp,
//! `candle_nn::ops::log_softmax`, a composition of plain
//! ops) and custom ops with explicit backwards: products with the frozen
//! weights ([`FrozenMatmul`]), RMSNorm, RoPE and the attention's masked
//! softmax ([`crate::fused_ops`]).
//! candle 0.11's fused `softmax_last_dim`, `rms_norm`, `rotary_emb::rope`
//! and `QMatMul` return no gradient (see `../shared/DESIGN.md`, Trainer). The
//! computation mirrors the device decoder (`nocturne::decoder`) step for
//! step — RMSNorm, half-split RoPE, grouped-query causal attention, SiLU MLP,
//! tied output projection — so logits agree (a parity test holds them within
//! 1e-3 relative). Base weights are constants (dequantized from the pack,
//! stored transposed `[in, out]`); only the LoRA `Var`s get gradients.
//!
//! LoRA (Hu et al., ICLR 2022): `y = x Wᵀ + (alpha/rank) · (x Aᵀ) Bᵀ`, `A`
//! `[rank, in]` initialised uniform in ±1/√in (PEFT's Kaiming-uniform with
//! a = √5), `B` `[out, rank]` zero, so training starts from the base model.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var, D};
use nocturne::adapter::{LoraAdapter, Target};
use nocturne::config::ModelConfig;
use nocturne::weights::{Matrix, ModelPack};

use crate::fused_ops::{masked_softmax, rms_norm, rope, RopeAngles};

/// Dequantizes a pack matrix to row-major f32 `[rows, cols]`.
pub fn dense(m: Matrix<'_>) -> Vec<f32> {
    match m {
        Matrix::Int8 { values, scales, .. } => {
            let mut out = vec![0.0; values.len()];
            nocturne::quant::dequantize_into(values, scales, &mut out);
            out
        }
        Matrix::F16 { values, .. } => values.iter().map(|v| v.to_f32()).collect(),
    }
}

struct BaseLayer {
    input_norm: Arc<[f64]>,
    post_norm: Arc<[f64]>,
    /// Transposed projections `[in, out]`, in [`Target`] order.
    proj_t: [Tensor; 7],
}

/// The frozen base model.
pub struct BaseModel {
    config: ModelConfig,
    embed: Tensor,
    lm_head_t: Tensor,
    norm: Arc<[f64]>,
    layers: Vec<BaseLayer>,
    /// RoPE tables `[max_positions, head_dim/2]`, row-major.
    cos: Vec<f64>,
    sin: Vec<f64>,
    device: Device,
    dtype: DType,
}

/// `x · W` (or `x · Wᵀ`) for a frozen weight `W` `[in, out]`, on the CPU.
/// candle's matmul backward always computes the gradient of both operands,
/// so a plain matmul with a constant weight costs a weight-sized product and
/// a weight-sized tensor per projection per step; this op's backward gives
/// only the input's gradient, `∂x = ∂y · Wᵀ` (the same op, transposed),
/// which is all a frozen base needs.
///
/// The product runs on the calling thread (the `gemm` crate, which candle's
/// own CPU matmul uses, with no parallelism): training takes the example's
/// gradient and the rehearsal term's on two threads of their own
/// ([`crate::train`]), which a second level of threads inside each product
/// would only contend with.
struct FrozenMatmul {
    w: Tensor,
    transposed: bool,
}

/// `y = x · W` (or `x · Wᵀ`) for row-major `x` `[m, k]`, `w` `[in, out]`, into `y` `[m, n]`;
/// `T` is f32 or f64 (the types `gemm` multiplies), `one` its 1.
fn frozen_product<T: Copy + Default + 'static>(x: &[T], w: &[T], (inp, out): (usize, usize), transposed: bool, one: T) -> candle_core::Result<(Vec<T>, usize)> {
    let (k, n) = if transposed { (out, inp) } else { (inp, out) };
    if w.len() != inp * out || k == 0 || !x.len().is_multiple_of(k) {
        candle_core::bail!("frozen-matmul: an input of {} values does not fit a [{inp}, {out}] weight{}", x.len(), if transposed { " (transposed)" } else { "" });
    }
    let m = x.len() / k;
    let mut y = vec![T::default(); m * n];
    // `W` row-major [in, out]: element (i, j) at i·out + j. As the right-hand
    // side [k, n]: untransposed, (i, j) at i·n + j (row stride n, column
    // stride 1); transposed, (j, i) of W, at j·out + i = j·k + i (row stride
    // 1, column stride k).
    let (rhs_rs, rhs_cs) = if transposed { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: `x` holds m·k values read with row stride k and column stride 1
    // (indices below m·k); `w` holds k·n values read within [0, k·n) by the
    // strides above; `y` holds m·n values written with row stride n, column
    // stride 1. The three buffers are distinct allocations (`y` is new), and
    // `read_dst` is false, so `y`'s initial values and `beta` are not read.
    unsafe {
        gemm::gemm(
            m, n, k,
            y.as_mut_ptr(), 1, n as isize, false,
            x.as_ptr(), 1, k as isize,
            w.as_ptr(), rhs_cs, rhs_rs,
            T::default(), one,
            false, false, false,
            gemm::Parallelism::None,
        );
    }
    Ok((y, n))
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let shape = w_layout.shape().dims2()?;
        let (Some((a, b)), Some((wa, wb))) = (layout.contiguous_offsets(), w_layout.contiguous_offsets()) else {
            candle_core::bail!("frozen-matmul: the input and the weight must be contiguous");
        };
        let mut dims = layout.shape().dims().to_vec();
        let (out, n) = match (storage, &*w_storage) {
            (CpuStorage::F32(x), candle_core::Storage::Cpu(CpuStorage::F32(w))) => {
                let (y, n) = frozen_product(&x[a..b], &w[wa..wb], shape, self.transposed, 1f32)?;
                (CpuStorage::F32(y), n)
            }
            (CpuStorage::F64(x), candle_core::Storage::Cpu(CpuStorage::F64(w))) => {
                let (y, n) = frozen_product(&x[a..b], &w[wa..wb], shape, self.transposed, 1f64)?;
                (CpuStorage::F64(y), n)
            }
            _ => candle_core::bail!("frozen-matmul: the input and the weight must be f32 or f64 alike, on the CPU"),
        };
        *dims.last_mut().expect("a matmul input has a last dimension") = n;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&FrozenMatmul { w: self.w.clone(), transposed: !self.transposed })?))
    }
}

/// `x · w` for a frozen `w` `[in, out]`: [`FrozenMatmul`] on the CPU, a plain matmul elsewhere.
fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone(), transposed: false })
    } else {
        x.matmul(w)
    }
}

fn matrix_t(m: Matrix<'_>, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let (rows, cols) = m.shape();
    Tensor::from_vec(dense(m), (rows, cols), device)?.t()?.contiguous()?.to_dtype(dtype)
}

impl BaseModel {
    /// Loads every weight of `pack` (dequantized) as `dtype` on `device`,
    /// with RoPE tables for `max_positions`.
    ///
    /// # Errors
    /// candle errors (out of memory).
    pub fn from_pack(pack: &ModelPack, dtype: DType, device: &Device, max_positions: usize) -> candle_core::Result<BaseModel> {
        let c = pack.config().clone();
        let vec = |v: &[f32]| -> Arc<[f64]> { v.iter().map(|&v| f64::from(v)).collect() };
        let (vocab, h) = pack.embed_tokens().shape();
        let embed = Tensor::from_vec(dense(pack.embed_tokens()), (vocab, h), device)?.to_dtype(dtype)?;
        let lm_head_t = matrix_t(pack.lm_head(), dtype, device)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let w = pack.layer(l);
            let proj = [w.q_proj, w.k_proj, w.v_proj, w.o_proj, w.gate_proj, w.up_proj, w.down_proj];
            let proj_t = [0, 1, 2, 3, 4, 5, 6].map(|i| matrix_t(proj[i], dtype, device));
            let [q, k, v, o, g, u, d] = proj_t;
            layers.push(BaseLayer { input_norm: vec(w.input_norm), post_norm: vec(w.post_attention_norm), proj_t: [q?, k?, v?, o?, g?, u?, d?] });
        }
        // RoPE angles exactly as the device computes them (f64, then rounded to f32).
        let half = c.head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for i in 0..half {
                let angle = pos as f64 * (c.rope_theta as f64).powf(-2.0 * i as f64 / c.head_dim as f64);
                cos.push(f64::from(angle.cos() as f32));
                sin.push(f64::from(angle.sin() as f32));
            }
        }
        let norm = vec(pack.final_norm());
        Ok(BaseModel { config: c, embed, lm_head_t, norm, layers, cos, sin, device: device.clone(), dtype })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the computation.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `[in, out]` of a projection.
    pub fn projection_shape(&self, layer: usize, target: Target) -> (usize, usize) {
        let d = self.layers[layer].proj_t[target as usize].dims();
        (d[0], d[1])
    }

    fn project(&self, x: &Tensor, layer: usize, target: Target, lora: Option<&Lora>) -> candle_core::Result<Tensor> {
        let y = frozen_matmul(x, &self.layers[layer].proj_t[target as usize])?;
        match lora.and_then(|l| l.pair(layer, target).map(|p| (l, p))) {
            Some((l, (a, b))) => y + (x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)? * l.scale())?,
            None => Ok(y),
        }
    }

    /// Logits `[T, vocab]` after each of `ids` (one sequence from position 0).
    ///
    /// # Errors
    /// candle errors; more tokens than the RoPE table holds.
    pub fn forward(&self, ids: &[u32], lora: Option<&Lora>) -> candle_core::Result<Tensor> {
        frozen_matmul(&self.hidden(&Packed::new(self, &[ids])?, lora)?, &self.lm_head_t)
    }

    /// The final normalised hidden states `[T, hidden]` of the packed sequences.
    fn hidden(&self, packed: &Packed, lora: Option<&Lora>) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (t, d, heads, kv_heads) = (packed.ids.dims1()?, c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let group = heads / kv_heads;
        let eps = f64::from(c.rms_norm_eps);
        let mut x = self.embed.index_select(&packed.ids, 0)?;
        let scale = 1.0 / (d as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let xn = rms_norm(&x, &layer.input_norm, eps)?;
            let q = rope(&self.project(&xn, l, Target::Q, lora)?.reshape((t, heads, d))?, &packed.angles)?;
            let k = rope(&self.project(&xn, l, Target::K, lora)?.reshape((t, kv_heads, d))?, &packed.angles)?;
            let v = self.project(&xn, l, Target::V, lora)?.reshape((t, kv_heads, d))?;
            // Grouped-query attention without copying keys and values per
            // query head: query head h reads key/value head h / group, so the
            // `group` query heads of one key/value head, stacked as rows
            // ([kv_heads, group·T, d]), take one product with it.
            let q = q.transpose(0, 1)?.contiguous()?.reshape((kv_heads, group * t, d))?;
            let (k, v) = (k.transpose(0, 1)?.contiguous()?, v.transpose(0, 1)?.contiguous()?); // [kv_heads, T, d]
            let scores = (q.matmul(&k.t()?)? * scale)?.reshape((heads, t, t))?;
            let probs = masked_softmax(&scores, &packed.allowed)?.reshape((kv_heads, group * t, t))?;
            let att = probs.matmul(&v)?.reshape((heads, t, d))?.transpose(0, 1)?.contiguous()?.reshape((t, heads * d))?;
            x = (x + self.project(&att, l, Target::O, lora)?)?;
            let xn = rms_norm(&x, &layer.post_norm, eps)?;
            let gate = self.project(&xn, l, Target::Gate, lora)?;
            let up = self.project(&xn, l, Target::Up, lora)?;
            let act = (gate.silu()? * up)?;
            x = (x + self.project(&act, l, Target::Down, lora)?)?;
        }
        rms_norm(&x, &self.norm, eps)
    }
}

/// Several sequences packed into one for the forward: their tokens one
/// after the other (`ids` `[T]`, T the sum of their lengths), the RoPE
/// angles of each one's positions from 0 (`angles`), and a block-diagonal causal mask
/// (`allowed` `[T, T]`: true where token `j` is in token `i`'s sequence and
/// `j ≤ i`), so no token attends across sequences. The
/// products with the weights then run once on `[T, hidden]` instead of once
/// per sequence, which the CPU product does at a higher rate (more rows per
/// weight panel), with fewer small ops. This is the "sequence packing" of
/// Krell et al., "Efficient sequence packing without cross-contamination"
/// (2021), with the mask (not position ids alone) keeping sequences apart.
struct Packed {
    ids: Tensor,
    angles: RopeAngles,
    allowed: Arc<[bool]>,
}

impl Packed {
    /// # Errors
    /// No sequence, an empty one, or one longer than the RoPE table.
    fn new(base: &BaseModel, sequences: &[&[u32]]) -> candle_core::Result<Packed> {
        let half = base.config.head_dim / 2;
        let table = base.cos.len() / half.max(1);
        if sequences.is_empty() {
            candle_core::bail!("no sequence to run");
        }
        if let Some((i, s)) = sequences.iter().enumerate().find(|(_, s)| s.is_empty() || s.len() > table) {
            candle_core::bail!("sequence {i} has {} tokens; the forward takes 1 to {table} (the RoPE table's positions)", s.len());
        }
        let ids: Vec<u32> = sequences.concat();
        let rows = |table: &[f64]| -> Arc<[f64]> { sequences.iter().flat_map(|s| &table[..s.len() * half]).copied().collect() };
        let owner: Vec<usize> = sequences.iter().enumerate().flat_map(|(i, s)| std::iter::repeat_n(i, s.len())).collect();
        let t = ids.len();
        let allowed: Arc<[bool]> = (0..t).flat_map(|i| (0..t).map(|j| j <= i && owner[j] == owner[i]).collect::<Vec<_>>()).collect();
        let device = &base.device;
        Ok(Packed {
            ids: Tensor::from_vec(ids, t, device)?,
            angles: RopeAngles { cos: rows(&base.cos), sin: rows(&base.sin) },
            allowed,
        })
    }
}

/// Mean cross-entropy of the model on `ids` against `labels` (one per
/// position: the next token, or `None` where no loss is taken):
/// [`batch_loss`] of one example.
///
/// # Errors
/// As [`batch_loss`].
pub fn sequence_loss(base: &BaseModel, ids: &[u32], labels: &[Option<u32>], lora: Option<&Lora>) -> candle_core::Result<Tensor> {
    batch_loss(base, &[(ids, labels)], lora)
}

/// The mean over `examples` of each one's mean cross-entropy, each example
/// `(ids, labels)` with one label per position (the next token, or `None`
/// where no loss is taken). One forward over the examples packed into one
/// sequence (block-diagonal causal mask, positions from 0 in each), the
/// output projection applied only at labelled positions; equal to the mean
/// of [`sequence_loss`] over the examples (a test holds the loss and its
/// gradients to that in f64).
///
/// # Errors
/// candle errors; no example; an example with no labelled position, with
/// labels not one per token, or longer than the RoPE table.
pub fn batch_loss(base: &BaseModel, examples: &[(&[u32], &[Option<u32>])], lora: Option<&Lora>) -> candle_core::Result<Tensor> {
    let (mut rows, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    let mut offset = 0;
    for (e, (ids, labels)) in examples.iter().enumerate() {
        if labels.len() != ids.len() {
            candle_core::bail!("example {e}: {} labels for {} tokens", labels.len(), ids.len());
        }
        let before = rows.len();
        for (i, label) in labels.iter().enumerate() {
            if let Some(label) = label {
                rows.push((offset + i) as u32);
                targets.push(*label);
            }
        }
        let labelled = rows.len() - before;
        if labelled == 0 {
            candle_core::bail!("example {e}: no labelled position");
        }
        weights.extend(std::iter::repeat_n(1.0 / (labelled * examples.len()) as f64, labelled));
        offset += ids.len();
    }
    let sequences: Vec<&[u32]> = examples.iter().map(|(ids, _)| *ids).collect();
    let hidden = base.hidden(&Packed::new(base, &sequences)?, lora)?;
    let device = hidden.device();
    let picked = frozen_matmul(&hidden.index_select(&Tensor::from_slice(&rows, rows.len(), device)?, 0)?, &base.lm_head_t)?;
    let logp = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let target = Tensor::from_vec(targets, (rows.len(), 1), device)?;
    let weights = Tensor::from_vec(weights, (rows.len(), 1), device)?.to_dtype(base.dtype)?;
    (logp.gather(&target, 1)? * weights)?.sum_all()?.neg()
}

/// A tensor by name: `(name, shape, values)`.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Trainable LoRA parameters for some projections of every layer.
pub struct Lora {
    rank: usize,
    alpha: f32,
    targets: Vec<Target>,
    /// `[layer][target]`: `A` `[rank, in]`, `B` `[out, rank]`.
    pairs: Vec<[Option<(Var, Var)>; 7]>,
}

impl Lora {
    /// Fresh parameters: `A` uniform in ±1/√in (seeded), `B` zero.
    ///
    /// # Errors
    /// candle errors.
    pub fn new(base: &BaseModel, rank: usize, alpha: f32, targets: &[Target], seed: u64) -> candle_core::Result<Lora> {
        let mut rng = nocturne::sampler::SplitMix64(seed);
        let mut uniform = move || rng.next_unit() * 2.0 - 1.0;
        let mut pairs = Vec::with_capacity(base.layers.len());
        for l in 0..base.layers.len() {
            let mut row: [Option<(Var, Var)>; 7] = Default::default();
            for &t in targets {
                let (inp, out) = base.projection_shape(l, t);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..rank * inp).map(|_| uniform() * bound).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inp), base.device())?.to_dtype(base.dtype())?)?;
                let b = Var::zeros((out, rank), base.dtype(), base.device())?;
                row[t as usize] = Some((a, b));
            }
            pairs.push(row);
        }
        Ok(Lora { rank, alpha, targets: targets.to_vec(), pairs })
    }

    /// Parameters starting from a device adapter (the previous night's).
    ///
    /// # Errors
    /// candle errors.
    pub fn from_adapter(base: &BaseModel, adapter: &LoraAdapter) -> candle_core::Result<Lora> {
        let targets: Vec<Target> = adapter.manifest().targets.iter().filter_map(|n| Target::from_name(n)).collect();
        let mut pairs = Vec::with_capacity(base.layers.len());
        for l in 0..base.layers.len() {
            let mut row: [Option<(Var, Var)>; 7] = Default::default();
            for &t in &targets {
                let (a, b) = adapter.projection(l, t).expect("a validated adapter has every targeted projection");
                let tensor = |m: Matrix<'_>| -> candle_core::Result<Tensor> { Tensor::from_vec(dense(m), m.shape(), base.device())?.to_dtype(base.dtype()) };
                // An int8 B is stored transposed, [rank, out] (nocturne::adapter).
                let b = match b {
                    Matrix::Int8 { .. } => tensor(b)?.t()?.contiguous()?,
                    Matrix::F16 { .. } => tensor(b)?,
                };
                row[t as usize] = Some((Var::from_tensor(&tensor(a)?)?, Var::from_tensor(&b)?));
            }
            pairs.push(row);
        }
        Ok(Lora { rank: adapter.rank(), alpha: adapter.manifest().alpha, targets, pairs })
    }

    /// LoRA rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// LoRA alpha.
    pub fn alpha(&self) -> f32 {
        self.alpha
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        f64::from(self.alpha) / self.rank as f64
    }

    /// The targeted projections.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    fn pair(&self, layer: usize, target: Target) -> Option<(&Var, &Var)> {
        self.pairs.get(layer)?[target as usize].as_ref().map(|(a, b)| (a, b))
    }

    /// Every parameter, with its tensor name (`….lora_A.weight`, `….lora_B.weight`).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (l, row) in self.pairs.iter().enumerate() {
            for &t in &self.targets {
                if let Some((a, b)) = &row[t as usize] {
                    out.push((t.tensor_name(l, 'A'), a.clone()));
                    out.push((t.tensor_name(l, 'B'), b.clone()));
                }
            }
        }
        out
    }

    /// Every parameter as (name, shape, f32 values, row-major), `A`
    /// `[rank, in]` and `B` `[out, rank]`.
    ///
    /// # Errors
    /// candle errors.
    pub fn to_f32_tensors(&self) -> candle_core::Result<Vec<NamedTensor>> {
        self.named_vars()
            .into_iter()
            .map(|(name, v)| {
                let t = v.as_tensor();
                Ok((name, t.dims().to_vec(), t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
            })
            .collect()
    }
}
