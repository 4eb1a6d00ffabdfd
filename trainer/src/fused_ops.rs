//! RMSNorm, RoPE and the attention's masked softmax as single candle ops
//! with explicit backwards, for the trainer's forward ([`crate::llama`]).
//!
//! Composed of plain candle ops, an RMSNorm is 7 tensor ops forward and
//! about 20 backward, a RoPE about 9 and 15, a masked softmax 6 and about 10,
//! each allocating a tensor the size of its input; at the few dozen to few
//! hundred tokens of a training step that per-op cost, not arithmetic,
//! dominated them (30 layers × 2 norms, 2 RoPEs and a softmax a forward).
//! Here each is one pass forward and one backward. candle 0.11's own fused
//! `rms_norm`, `rotary_emb::rope` and `softmax_last_dim` return no gradient
//! (`../shared/DESIGN.md`, Trainer), hence these.
//!
//! All three run on the CPU in f32 or f64 (f64 for the finite-difference test),
//! accumulate in f64, and take only the input's gradient: the norm weights
//! and the RoPE tables are frozen constants.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};

/// A row-wise kernel over a contiguous f32 or f64 input of a given shape.
trait Kernel: Send + Sync {
    const NAME: &'static str;
    fn run<T: WithDType>(&self, x: &[T], dims: &[usize]) -> candle_core::Result<Vec<T>>;
    /// The input's gradient from the forward's input `x`, output `y` and `∂y`
    /// (`None`: the op is itself a backward, not differentiated again).
    fn backward(&self, _x: &Tensor, _y: &Tensor, _grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

/// A [`Kernel`] as a candle op (one impl for all of them).
struct Op<K>(K);

impl<K: Kernel> CustomOp1 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        apply(&self.0, storage, layout)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.0.backward(x, y, grad)
    }
}

/// Runs `kernel` on `storage` (f32 or f64, contiguous); the output has the input's shape.
fn apply<K: Kernel>(kernel: &K, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("{}: the input must be contiguous", K::NAME);
    };
    let dims = layout.shape().dims();
    let out = match storage {
        CpuStorage::F32(x) => CpuStorage::F32(kernel.run(&x[a..b], dims)?),
        CpuStorage::F64(x) => CpuStorage::F64(kernel.run(&x[a..b], dims)?),
        _ => candle_core::bail!("{}: the input must be f32 or f64", K::NAME),
    };
    Ok((out, layout.shape().clone()))
}

/// RMSNorm over the last dimension (Zhang & Sennrich, "Root Mean Square
/// Layer Normalization", NeurIPS 2019), as the device decoder computes it:
/// `y = x · r ⊙ w`, `r = 1/√(mean(x²) + ε)`, for `x` `[…, n]` and the frozen
/// weight `w` `[n]`. Backward, with `gw = ∂y ⊙ w`:
/// `∂x = r · gw − x · r³ · mean(gw ⊙ x)`.
///
/// # Errors
/// A last dimension other than `w`'s length; a non-contiguous or non-float input.
pub fn rms_norm(x: &Tensor, w: &Arc<[f64]>, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Op(RmsNorm { w: Arc::clone(w), eps }))
}

struct RmsNorm {
    w: Arc<[f64]>,
    eps: f64,
}

impl RmsNorm {
    /// `(row, r)` of each row of `x` (checked against `w`'s length).
    fn rows<'a, T: WithDType>(&'a self, x: &'a [T], dims: &[usize]) -> candle_core::Result<impl Iterator<Item = (&'a [T], f64)> + 'a> {
        let n = self.w.len();
        if dims.last() != Some(&n) || n == 0 {
            candle_core::bail!("rms-norm: input {dims:?} against a weight of {n}");
        }
        Ok(x.chunks_exact(n).map(move |row| {
            let ms = row.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / n as f64;
            (row, 1.0 / (ms + self.eps).sqrt())
        }))
    }
}

impl Kernel for RmsNorm {
    const NAME: &'static str = "rms-norm";
    fn run<T: WithDType>(&self, x: &[T], dims: &[usize]) -> candle_core::Result<Vec<T>> {
        let mut out = Vec::with_capacity(x.len());
        for (row, r) in self.rows(x, dims)? {
            out.extend(row.iter().zip(self.w.iter()).map(|(v, w)| T::from_f64(v.to_f64() * r * w)));
        }
        Ok(out)
    }

    fn backward(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let backward = RmsNormBackward { norm: RmsNorm { w: Arc::clone(&self.w), eps: self.eps }, x: x.clone() };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Op(backward))?))
    }
}


/// [`RmsNorm`]'s backward, applied to `∂y`, with the forward's input `x`.
struct RmsNormBackward {
    norm: RmsNorm,
    x: Tensor,
}

impl Kernel for RmsNormBackward {
    const NAME: &'static str = "rms-norm backward";
    fn run<T: WithDType>(&self, grad: &[T], dims: &[usize]) -> candle_core::Result<Vec<T>> {
        let x: Vec<T> = self.x.flatten_all()?.to_vec1()?;
        if x.len() != grad.len() {
            candle_core::bail!("rms-norm backward: {} gradients for {} inputs", grad.len(), x.len());
        }
        let n = self.norm.w.len();
        let mut out = Vec::with_capacity(x.len());
        for ((row, r), g) in self.norm.rows(&x, dims)?.zip(grad.chunks_exact(n)) {
            let gw = |i: usize| g[i].to_f64() * self.norm.w[i];
            let mean = (0..n).map(|i| gw(i) * row[i].to_f64()).sum::<f64>() / n as f64;
            out.extend((0..n).map(|i| T::from_f64(r * gw(i) - row[i].to_f64() * r * r * r * mean)));
        }
        Ok(out)
    }
}


/// The RoPE angles of a packed sequence's tokens: `cos` and `sin` `[T, d/2]`
/// row-major, row `t` for token `t`'s position.
pub struct RopeAngles {
    /// `cos(pos · θ^(−2i/d))`, `[T, d/2]`.
    pub cos: Arc<[f64]>,
    /// `sin(pos · θ^(−2i/d))`, `[T, d/2]`.
    pub sin: Arc<[f64]>,
}

/// Half-split RoPE (Su et al., "RoFormer", 2021; the split-halves layout of
/// Llama's Hugging Face implementation, as the device decoder applies it) on
/// `x` `[T, heads, d]`: for `i < d/2`, `(x₁, x₂) = (x[i], x[i + d/2])` becomes
/// `(x₁ cos − x₂ sin, x₂ cos + x₁ sin)` at token `t`'s angles. A rotation, so
/// its backward is the inverse rotation (`sin` negated).
///
/// # Errors
/// `x` not `[T, heads, d]` with `angles` `[T, d/2]`; a non-float input.
pub fn rope(x: &Tensor, angles: &RopeAngles) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Op(Rope { cos: Arc::clone(&angles.cos), sin: Arc::clone(&angles.sin), inverse: false }))
}

struct Rope {
    cos: Arc<[f64]>,
    sin: Arc<[f64]>,
    inverse: bool,
}

impl Kernel for Rope {
    const NAME: &'static str = "rope";
    fn run<T: WithDType>(&self, x: &[T], dims: &[usize]) -> candle_core::Result<Vec<T>> {
        let &[t, heads, d] = dims else { candle_core::bail!("rope: input {dims:?} is not [T, heads, d]") };
        let half = d / 2;
        if d % 2 != 0 || self.cos.len() != t * half || self.sin.len() != t * half {
            candle_core::bail!("rope: input {dims:?} against angles for {} values", self.cos.len());
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![T::zero(); x.len()];
        for (row, (xs, ys)) in x.chunks_exact(heads * d).zip(out.chunks_exact_mut(heads * d)).enumerate() {
            let (cos, sin) = (&self.cos[row * half..][..half], &self.sin[row * half..][..half]);
            for (xh, yh) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)) {
                for i in 0..half {
                    let (x1, x2, s) = (xh[i].to_f64(), xh[i + half].to_f64(), sign * sin[i]);
                    yh[i] = T::from_f64(x1 * cos[i] - x2 * s);
                    yh[i + half] = T::from_f64(x2 * cos[i] + x1 * s);
                }
            }
        }
        Ok(out)
    }

    fn backward(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inverse = Rope { cos: Arc::clone(&self.cos), sin: Arc::clone(&self.sin), inverse: !self.inverse };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Op(inverse))?))
    }
}


/// Softmax over the last dimension of attention scores `[heads, T, T]`
/// restricted to the pairs `allowed` (`[T, T]` row-major: query `i` may
/// attend to key `j`); the others get probability 0, as adding −∞ before a
/// plain softmax would give. Every query must allow at least one key (the
/// causal masks allow the query itself). Backward, with `y` the output:
/// `∂s = y ⊙ (∂y − Σ ∂y ⊙ y)` per row.
///
/// # Errors
/// `scores` not `[heads, T, T]` for `allowed` `[T, T]`; a non-float input.
pub fn masked_softmax(scores: &Tensor, allowed: &Arc<[bool]>) -> candle_core::Result<Tensor> {
    scores.contiguous()?.apply_op1(Op(MaskedSoftmax { allowed: Arc::clone(allowed) }))
}

struct MaskedSoftmax {
    allowed: Arc<[bool]>,
}

impl MaskedSoftmax {
    /// T, checked: `dims` is `[heads, T, T]` and `allowed` is `[T, T]`.
    fn tokens(&self, dims: &[usize]) -> candle_core::Result<usize> {
        match dims {
            &[_, t, u] if t == u && t * t == self.allowed.len() && t > 0 => Ok(t),
            _ => candle_core::bail!("masked softmax: scores {dims:?} against a mask of {} pairs", self.allowed.len()),
        }
    }
}

impl Kernel for MaskedSoftmax {
    const NAME: &'static str = "masked softmax";
    fn run<T: WithDType>(&self, x: &[T], dims: &[usize]) -> candle_core::Result<Vec<T>> {
        let t = self.tokens(dims)?;
        let mut out = vec![T::zero(); x.len()];
        for (r, (row, y)) in x.chunks_exact(t).zip(out.chunks_exact_mut(t)).enumerate() {
            let allowed = &self.allowed[(r % t) * t..][..t];
            let max = row.iter().zip(allowed).filter(|(_, &a)| a).map(|(v, _)| v.to_f64()).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row.iter().zip(allowed).map(|(v, &a)| if a { (v.to_f64() - max).exp() } else { 0.0 }).collect();
            let sum: f64 = e.iter().sum();
            for (y, e) in y.iter_mut().zip(&e) {
                *y = T::from_f64(e / sum);
            }
        }
        Ok(out)
    }

    fn backward(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Op(SoftmaxBackward { y: y.clone() }))?))
    }
}


/// [`MaskedSoftmax`]'s backward, applied to `∂y`, with the forward's output `y`.
struct SoftmaxBackward {
    y: Tensor,
}

impl Kernel for SoftmaxBackward {
    const NAME: &'static str = "masked softmax backward";
    fn run<T: WithDType>(&self, grad: &[T], dims: &[usize]) -> candle_core::Result<Vec<T>> {
        let y: Vec<T> = self.y.flatten_all()?.to_vec1()?;
        let Some(&t) = dims.last().filter(|_| y.len() == grad.len()) else {
            candle_core::bail!("masked softmax backward: {} gradients for {} outputs", grad.len(), y.len());
        };
        let mut out = Vec::with_capacity(y.len());
        for (y, g) in y.chunks_exact(t).zip(grad.chunks_exact(t)) {
            let dot: f64 = y.iter().zip(g).map(|(y, g)| y.to_f64() * g.to_f64()).sum();
            out.extend(y.iter().zip(g).map(|(y, g)| T::from_f64(y.to_f64() * (g.to_f64() - dot))));
        }
        Ok(out)
    }
}

