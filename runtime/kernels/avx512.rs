//! AVX-512F kernels for x86-64: the f32-activation primitives prefill
//! spends its time in — the four-row dot of the prefill tile and row
//! dequantization — and the f16 and f32 row dots, on 16 f32 lanes, half the
//! instructions of their AVX2 namesakes. `Kernels::best` puts them in the
//! table when the CPU has AVX-512F (with AVX2, FMA and F16C); the other
//! primitives stay AVX2. (An AVX-512 int8 row dot measured slower than the
//! AVX2 one in decode on the project's AMD EPYC test machine — decode
//! 108 against 123 tokens/s at one thread — so decode's int8 dot stays AVX2.)
//!
//! Each function has the contract of its namesake in [`super::scalar`] and
//! asserts it (through [`contract`]) before touching memory, so the raw
//! loads and stores stay inside the slices in release builds too; tails
//! shorter than 16 run the scalar formula. Sums are reassociated, so
//! results differ from the scalar ones by rounding only.

use std::arch::x86_64::*;

use half::f16;

use super::scalar::contract;
use crate::config::INT8_BLOCK;

/// Sixteen i8 at `p` widened to f32.
///
/// # Safety
/// `p..p + 16` must be readable.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn load_i8x16(p: *const i8) -> __m512 {
    // SAFETY: the caller guarantees 16 readable bytes; loadu is unaligned.
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(p as *const __m128i) }))
}

/// Sixteen f16 at `p` widened to f32.
///
/// # Safety
/// `p..p + 16` must be readable.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn load_f16x16(p: *const f16) -> __m512 {
    // SAFETY: the caller guarantees 16 readable f16 (32 bytes).
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p as *const __m256i) })
}

/// Element types the f32-accumulating loops read sixteen at a time.
trait Lanes: Copy {
    /// Sixteen elements at `p` as f32.
    ///
    /// # Safety
    /// `p..p + 16` must be readable, and the CPU must have AVX-512F, AVX2, FMA and F16C.
    unsafe fn load16(p: *const Self) -> __m512;
    /// One element as f32 (for the tail).
    fn widen(self) -> f32;
}

impl Lanes for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f32.
        unsafe { _mm512_loadu_ps(p) }
    }
    fn widen(self) -> f32 {
        self
    }
}

impl Lanes for f16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f16.
        unsafe { load_f16x16(p) }
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `Σ a[i] × b[i]` with four accumulators (contract: equal lengths).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn dot<E: Lanes>(kernel: &str, a: &[E], b: &[f32]) -> f32 {
    contract::same_len(kernel, a.len(), b.len());
    let n = a.len();
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 16k + 16 <= i + 64 <= n == a.len() == b.len().
            *acc = _mm512_fmadd_ps(unsafe { E::load16(ap.add(i + 16 * k)) }, unsafe { _mm512_loadu_ps(bp.add(i + 16 * k)) }, *acc);
        }
        i += 64;
    }
    while i + 16 <= n {
        // SAFETY: i + 16 <= n == a.len() == b.len().
        acc[0] = _mm512_fmadd_ps(unsafe { E::load16(ap.add(i)) }, unsafe { _mm512_loadu_ps(bp.add(i)) }, acc[0]);
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    for j in i..n {
        sum += a[j].widen() * b[j];
    }
    sum
}

/// `Σ a[i] × b[i]`, `a` in f16.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2, FMA and F16C (lengths are asserted, not assumed).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    dot("dot_f16", a, b)
}

/// `Σ a[i] × b[i]`.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2, FMA and F16C (lengths are asserted, not assumed).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot("dot_f32", a, b)
}

/// Four rows (back to back in `rows`, contract [`contract::four_rows`]) dotted with `x`.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2, FMA and F16C (lengths are asserted, not assumed).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub fn dot4_f32(rows: &[f32], x: &[f32]) -> [f32; 4] {
    contract::four_rows("dot4_f32", rows.len(), x.len());
    let n = x.len();
    let (rp, xp) = (rows.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n == x.len().
        let xv = unsafe { _mm512_loadu_ps(xp.add(i)) };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: r·n + i + 16 <= 3n + n == rows.len() (contract).
            *acc = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(rp.add(r * n + i)) }, xv, *acc);
        }
        i += 16;
    }
    let mut out = acc.map(|a| _mm512_reduce_add_ps(a));
    for j in i..n {
        for (r, o) in out.iter_mut().enumerate() {
            *o += rows[r * n + j] * x[j];
        }
    }
    out
}

/// `out = values × scales` per 32-block (contract: [`contract::int8_row`]).
///
/// # Safety
/// The CPU must support AVX-512F, AVX2, FMA and F16C (lengths are asserted, not assumed).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub fn dequant_i8(values: &[i8], scales: &[f16], out: &mut [f32]) {
    contract::int8_row("dequant_i8", values.len(), scales.len(), out.len());
    let (q, o) = (values.as_ptr(), out.as_mut_ptr());
    for (b, scale) in scales.iter().enumerate() {
        let s = _mm512_set1_ps(scale.to_f32());
        for k in 0..2 {
            let at = b * INT8_BLOCK + 16 * k;
            // SAFETY: at + 16 <= (b + 1) × 32 <= values.len() == out.len() (contract).
            unsafe { _mm512_storeu_ps(o.add(at), _mm512_mul_ps(load_i8x16(q.add(at)), s)) };
        }
    }
}

/// `out = values` widened (contract: equal lengths).
///
/// # Safety
/// The CPU must support AVX-512F, AVX2, FMA and F16C (lengths are asserted, not assumed).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub fn dequant_f16(values: &[f16], out: &mut [f32]) {
    contract::same_len("dequant_f16", values.len(), out.len());
    let n = values.len();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n == values.len() == out.len().
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(i), load_f16x16(values.as_ptr().add(i))) };
        i += 16;
    }
    for j in i..n {
        out[j] = values[j].to_f32();
    }
}

/// A 4 × 3 tile: four rows (back to back) × three activation rows (back to
/// back), contract [`contract::four_rows_three_tokens`].
///
/// # Safety
/// The CPU must support AVX-512F, AVX2, FMA and F16C (lengths are asserted, not assumed).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub fn dot4x3_f32(rows: &[f32], x: &[f32]) -> [[f32; 4]; 3] {
    contract::four_rows_three_tokens("dot4x3_f32", rows.len(), x.len());
    let n = rows.len() / 4;
    let (rp, xp) = (rows.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; 3];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: r·n + i + 16 <= 4n == rows.len() (contract).
        let w: [__m512; 4] = std::array::from_fn(|r| unsafe { _mm512_loadu_ps(rp.add(r * n + i)) });
        for (t, acc) in acc.iter_mut().enumerate() {
            // SAFETY: t·n + i + 16 <= 3n == x.len() (contract).
            let xv = unsafe { _mm512_loadu_ps(xp.add(t * n + i)) };
            for (acc, w) in acc.iter_mut().zip(w) {
                *acc = _mm512_fmadd_ps(w, xv, *acc);
            }
        }
        i += 16;
    }
    let mut out = acc.map(|a| a.map(|v| _mm512_reduce_add_ps(v)));
    for j in i..n {
        for (t, out) in out.iter_mut().enumerate() {
            for (r, o) in out.iter_mut().enumerate() {
                *o += rows[r * n + j] * x[t * n + j];
            }
        }
    }
    out
}
