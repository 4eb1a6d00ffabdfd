//! AVX2 + FMA + F16C kernels for x86-64, selected at run time by
//! [`super::Kernels::detect`] only when the CPU reports all three features.
//! Each function has the contract of its namesake in [`super::scalar`];
//! sums are reassociated (eight lanes, several accumulators), so results
//! differ from the scalar ones by rounding only.

#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use half::f16;

use crate::config::INT8_BLOCK;

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f16x8(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// Eight i8 at `p` widened to f32.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_i8x8(p: *const i8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C; lengths as in the scalar kernel.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_i8(values: &[i8], scales: &[f16], x: &[f32]) -> f32 {
    let blocks = values.len() / INT8_BLOCK;
    debug_assert!(x.len() >= blocks * INT8_BLOCK && scales.len() >= blocks);
    let (q, xp) = (values.as_ptr(), x.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    for b in 0..blocks {
        let o = b * INT8_BLOCK;
        let mut s0 = _mm256_mul_ps(load_i8x8(q.add(o)), _mm256_loadu_ps(xp.add(o)));
        let mut s1 = _mm256_mul_ps(load_i8x8(q.add(o + 8)), _mm256_loadu_ps(xp.add(o + 8)));
        s0 = _mm256_fmadd_ps(load_i8x8(q.add(o + 16)), _mm256_loadu_ps(xp.add(o + 16)), s0);
        s1 = _mm256_fmadd_ps(load_i8x8(q.add(o + 24)), _mm256_loadu_ps(xp.add(o + 24)), s1);
        let scale = _mm256_set1_ps(scales.get_unchecked(b).to_f32());
        if b % 2 == 0 {
            acc0 = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), scale, acc0);
        } else {
            acc1 = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), scale, acc1);
        }
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

/// Element types the f32-accumulating loops read eight at a time.
trait Lanes: Copy {
    /// Eight elements at `p` as f32.
    unsafe fn load8(p: *const Self) -> __m256;
    /// One element as f32 (for the tail).
    fn widen(self) -> f32;
}

impl Lanes for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    fn widen(self) -> f32 {
        self
    }
}

impl Lanes for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        load_f16x8(p)
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `Σ a[i] × b[i]` with four accumulators.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot<E: Lanes>(a: &[E], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(E::load8(ap.add(i + 8 * k)), _mm256_loadu_ps(bp.add(i + 8 * k)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(E::load8(ap.add(i)), _mm256_loadu_ps(bp.add(i)), acc[0]);
        i += 8;
    }
    let mut sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for j in i..n {
        sum += a[j].widen() * b[j];
    }
    sum
}

/// `y += alpha × x`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy<E: Lanes>(alpha: f32, x: &[E], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let a = _mm256_set1_ps(alpha);
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(yp.add(i), _mm256_fmadd_ps(a, E::load8(xp.add(i)), _mm256_loadu_ps(yp.add(i))));
        i += 8;
    }
    for j in i..n {
        y[j] += alpha * x[j].widen();
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    dot(a, b)
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot(a, b)
}

/// # Safety
/// The CPU must support AVX2 and FMA; `rows.len() >= 4 × x.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot4_f32(rows: &[f32], x: &[f32]) -> [f32; 4] {
    let n = x.len();
    assert!(rows.len() >= 4 * n);
    let (rp, xp) = (rows.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 8 <= n {
        let xv = _mm256_loadu_ps(xp.add(i));
        for (r, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(rp.add(r * n + i)), xv, *acc);
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

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy_f16(alpha: f32, x: &[f16], y: &mut [f32]) {
    axpy(alpha, x, y)
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    axpy(alpha, x, y)
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C; lengths as in the scalar kernel.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_i8(values: &[i8], scales: &[f16], out: &mut [f32]) {
    let blocks = (values.len() / INT8_BLOCK).min(out.len() / INT8_BLOCK);
    let (q, o) = (values.as_ptr(), out.as_mut_ptr());
    for b in 0..blocks {
        let s = _mm256_set1_ps(scales.get_unchecked(b).to_f32());
        for k in 0..4 {
            let at = b * INT8_BLOCK + 8 * k;
            _mm256_storeu_ps(o.add(at), _mm256_mul_ps(load_i8x8(q.add(at)), s));
        }
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_f16(values: &[f16], out: &mut [f32]) {
    let n = values.len().min(out.len());
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(out.as_mut_ptr().add(i), load_f16x8(values.as_ptr().add(i)));
        i += 8;
    }
    for j in i..n {
        out[j] = values[j].to_f32();
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn to_f16(x: &[f32], out: &mut [f16]) {
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(i)));
        _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, h);
        i += 8;
    }
    for j in i..n {
        out[j] = f16::from_f32(x[j]);
    }
}
