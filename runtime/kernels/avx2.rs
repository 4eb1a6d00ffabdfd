//! AVX2 + FMA + F16C kernels for x86-64, selected at run time by
//! [`super::Kernels::detect`] only when the CPU reports all three features.
//! Each function has the contract of its namesake in [`super::scalar`] and
//! asserts it (through [`contract`]) before touching memory, so the raw
//! loads and stores below stay inside the slices in release builds too;
//! sums are reassociated (eight lanes, several accumulators), so results
//! differ from the scalar ones by rounding only.
//!
//! The functions are safe to call from code compiled with the same target
//! features; from anywhere else a call is `unsafe` and must first establish
//! that the CPU has them (see `Kernels::detect`).

use std::arch::x86_64::*;

use half::f16;

use super::scalar::contract;
use crate::config::INT8_BLOCK;

/// The sum of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Eight f16 at `p` widened to f32.
///
/// # Safety
/// `p..p + 8` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f16x8(p: *const f16) -> __m256 {
    // SAFETY: the caller guarantees 8 readable f16 (16 bytes); loadu has no alignment requirement.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
}

/// Eight i8 at `p` widened to f32.
///
/// # Safety
/// `p..p + 8` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_i8x8(p: *const i8) -> __m256 {
    // SAFETY: the caller guarantees 8 readable bytes; loadl reads exactly 8, unaligned.
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(p as *const __m128i) }))
}

/// `Σ values[i] × scales[i / 32] × x[i]` (contract: [`contract::int8_row`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (slice lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dot_i8(values: &[i8], scales: &[f16], x: &[f32]) -> f32 {
    contract::int8_row("dot_i8", values.len(), scales.len(), x.len());
    let (q, xp, blocks) = (values.as_ptr(), x.as_ptr(), scales.len());
    // SAFETY: every call below passes b < blocks, whose 32 values and 32 x at b × 32 lie
    // inside the slices (values.len() == x.len() == blocks × 32, contract).
    let scaled = |b: usize, scale: f32, acc: __m256| unsafe { scaled_block(q.add(b * INT8_BLOCK), xp.add(b * INT8_BLOCK), scale, acc) };
    // Scales are widened eight at a time, and the blocks alternate between
    // two accumulators named, not indexed, so both stay in registers.
    let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let whole = blocks - blocks % 8;
    for b0 in (0..whole).step_by(8) {
        let mut scale = [0.0f32; 8];
        // SAFETY: b0 + 8 <= blocks == scales.len(): eight f16 are read, eight f32 written.
        unsafe { _mm256_storeu_ps(scale.as_mut_ptr(), load_f16x8(scales.as_ptr().add(b0))) };
        for pair in 0..4 {
            even = scaled(b0 + 2 * pair, scale[2 * pair], even);
            odd = scaled(b0 + 2 * pair + 1, scale[2 * pair + 1], odd);
        }
    }
    for (b, &scale) in scales.iter().enumerate().skip(whole) {
        even = scaled(b, f16_to_f32(scale), even);
    }
    hsum(_mm256_add_ps(even, odd))
}

/// `acc + scale × Σ q[i] × x[i]` over one block (32 int8 values, 32 f32),
/// in eight lanes.
///
/// # Safety
/// `q..q + 32` and `x..x + 32` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scaled_block(q: *const i8, x: *const f32, scale: f32, acc: __m256) -> __m256 {
    // SAFETY: the caller guarantees 32 readable values and 32 readable f32.
    let sum = unsafe {
        let s0 = _mm256_mul_ps(load_i8x8(q), _mm256_loadu_ps(x));
        let s1 = _mm256_mul_ps(load_i8x8(q.add(8)), _mm256_loadu_ps(x.add(8)));
        let s0 = _mm256_fmadd_ps(load_i8x8(q.add(16)), _mm256_loadu_ps(x.add(16)), s0);
        _mm256_add_ps(s0, _mm256_fmadd_ps(load_i8x8(q.add(24)), _mm256_loadu_ps(x.add(24)), s1))
    };
    _mm256_fmadd_ps(sum, _mm256_set1_ps(scale), acc)
}

/// One f16 widened with F16C (`half`'s `to_f32` checks the CPU at each call).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16_to_f32(h: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
}

/// Element types the f32-accumulating loops read eight at a time.
trait Lanes: Copy {
    /// Eight elements at `p` as f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable, and the CPU must have AVX2, FMA and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
    /// One element as f32 (for the tail).
    fn widen(self) -> f32;
}

impl Lanes for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f32; loadu is unaligned.
        unsafe { _mm256_loadu_ps(p) }
    }
    fn widen(self) -> f32 {
        self
    }
}

impl Lanes for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f16.
        unsafe { load_f16x8(p) }
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `Σ a[i] × b[i]` with four accumulators (contract: equal lengths).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot<E: Lanes>(kernel: &str, a: &[E], b: &[f32]) -> f32 {
    contract::same_len(kernel, a.len(), b.len());
    let n = a.len();
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8k + 8 <= i + 32 <= n == a.len() == b.len().
            *acc = _mm256_fmadd_ps(unsafe { E::load8(ap.add(i + 8 * k)) }, unsafe { _mm256_loadu_ps(bp.add(i + 8 * k)) }, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n == a.len() == b.len().
        acc[0] = _mm256_fmadd_ps(unsafe { E::load8(ap.add(i)) }, unsafe { _mm256_loadu_ps(bp.add(i)) }, acc[0]);
        i += 8;
    }
    let mut sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for j in i..n {
        sum += a[j].widen() * b[j];
    }
    sum
}

/// `y += alpha × x` (contract: equal lengths).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn axpy<E: Lanes>(kernel: &str, alpha: f32, x: &[E], y: &mut [f32]) {
    contract::same_len(kernel, x.len(), y.len());
    let n = x.len();
    let a = _mm256_set1_ps(alpha);
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n == x.len() == y.len(); `y` is borrowed mutably, so the store aliases nothing.
        unsafe { _mm256_storeu_ps(yp.add(i), _mm256_fmadd_ps(a, E::load8(xp.add(i)), _mm256_loadu_ps(yp.add(i)))) };
        i += 8;
    }
    for j in i..n {
        y[j] += alpha * x[j].widen();
    }
}

/// `Σ a[i] × b[i]`, `a` in f16.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (slice lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    dot("dot_f16", a, b)
}

/// `Σ a[i] × b[i]`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (slice lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot("dot_f32", a, b)
}

/// Four rows (back to back in `rows`, contract [`contract::four_rows`]) dotted with `x`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (slice lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma")]
pub fn dot4_f32(rows: &[f32], x: &[f32]) -> [f32; 4] {
    contract::four_rows("dot4_f32", rows.len(), x.len());
    let n = x.len();
    let (rp, xp) = (rows.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n == x.len().
        let xv = unsafe { _mm256_loadu_ps(xp.add(i)) };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: r·n + i + 8 <= 3n + n == rows.len() (contract).
            *acc = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(rp.add(r * n + i)) }, xv, *acc);
        }
        i += 8;
    }
    let mut out = [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])];
    for j in i..n {
        for (r, o) in out.iter_mut().enumerate() {
            *o += rows[r * n + j] * x[j];
        }
    }
    out
}

/// `y += alpha × x`, `x` in f16.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (slice lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn axpy_f16(alpha: f32, x: &[f16], y: &mut [f32]) {
    axpy("axpy_f16", alpha, x, y)
}

/// `y += alpha × x`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (slice lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    axpy("axpy_f32", alpha, x, y)
}

/// `out = values × scales` per 32-block (contract: [`contract::int8_row`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (slice lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dequant_i8(values: &[i8], scales: &[f16], out: &mut [f32]) {
    contract::int8_row("dequant_i8", values.len(), scales.len(), out.len());
    let (q, o) = (values.as_ptr(), out.as_mut_ptr());
    for (b, scale) in scales.iter().enumerate() {
        let s = _mm256_set1_ps(scale.to_f32());
        for k in 0..4 {
            let at = b * INT8_BLOCK + 8 * k;
            // SAFETY: at + 8 <= (b + 1) × 32 <= scales.len() × 32 == values.len() == out.len() (contract).
            unsafe { _mm256_storeu_ps(o.add(at), _mm256_mul_ps(load_i8x8(q.add(at)), s)) };
        }
    }
}

/// `out = values` widened (contract: equal lengths).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (slice lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dequant_f16(values: &[f16], out: &mut [f32]) {
    contract::same_len("dequant_f16", values.len(), out.len());
    let n = values.len();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n == values.len() == out.len().
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), load_f16x8(values.as_ptr().add(i))) };
        i += 8;
    }
    for j in i..n {
        out[j] = values[j].to_f32();
    }
}

/// `out = x` narrowed to f16, round to nearest even (contract: equal lengths).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (slice lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn to_f16(x: &[f32], out: &mut [f16]) {
    contract::same_len("to_f16", x.len(), out.len());
    let n = x.len();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n == x.len() == out.len(); eight f16 are the 16 bytes stored.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(i)));
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, h);
        }
        i += 8;
    }
    for j in i..n {
        out[j] = f16::from_f32(x[j]);
    }
}

/// The largest of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// One activation row to int8 blocks, exactly as [`super::scalar::quantize_i8`]
/// (the same f32 operations; `cvtps` rounds ties to even under the default
/// MXCSR rounding mode, which Rust code never changes).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (slice lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn quantize_i8(x: &[f32], values: &mut [i8], scales: &mut [f32]) {
    contract::int8_row("quantize_i8", values.len(), scales.len(), x.len());
    let sign = _mm256_set1_ps(-0.0);
    // packs interleaves the two 128-bit lanes; this puts the dwords back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, d) in scales.iter_mut().enumerate() {
        let at = b * INT8_BLOCK;
        // SAFETY: at + 32 <= scales.len() × 32 == x.len() (contract).
        let v: [__m256; 4] = std::array::from_fn(|k| unsafe { _mm256_loadu_ps(x.as_ptr().add(at + 8 * k)) });
        let amax = v.iter().fold(_mm256_setzero_ps(), |m, v| _mm256_max_ps(m, _mm256_andnot_ps(sign, *v)));
        *d = hmax(amax) / 127.0;
        let inv = _mm256_set1_ps(if *d > 0.0 { 1.0 / *d } else { 0.0 });
        let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
        let q16 = [_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])];
        let q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16[0], q16[1]), order);
        // SAFETY: at + 32 <= values.len() (contract); storeu is unaligned.
        unsafe { _mm256_storeu_si256(values.as_mut_ptr().add(at) as *mut __m256i, q8) };
    }
}

/// A 4 × 3 tile: four rows (back to back) × three activation rows (back to
/// back), contract [`contract::four_rows_three_tokens`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (lengths are asserted, not assumed).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dot4x3_f32(rows: &[f32], x: &[f32]) -> [[f32; 4]; 3] {
    contract::four_rows_three_tokens("dot4x3_f32", rows.len(), x.len());
    let n = rows.len() / 4;
    let (rp, xp) = (rows.as_ptr(), x.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 4]; 3];
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: r·n + i + 8 <= 4n == rows.len() (contract).
        let w: [__m256; 4] = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(rp.add(r * n + i)) });
        for (t, acc) in acc.iter_mut().enumerate() {
            // SAFETY: t·n + i + 8 <= 3n == x.len() (contract).
            let xv = unsafe { _mm256_loadu_ps(xp.add(t * n + i)) };
            for (acc, w) in acc.iter_mut().zip(w) {
                *acc = _mm256_fmadd_ps(w, xv, *acc);
            }
        }
        i += 8;
    }
    let mut out = acc.map(|a| a.map(|v| hsum(v)));
    for j in i..n {
        for (t, out) in out.iter_mut().enumerate() {
            for (r, o) in out.iter_mut().enumerate() {
                *o += rows[r * n + j] * x[t * n + j];
            }
        }
    }
    out
}
