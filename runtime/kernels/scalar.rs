//! Plain Rust reference kernels. Every SIMD kernel must agree with these
//! (property tests in `kernels::tests`).

use half::f16;

use crate::config::INT8_BLOCK;

/// `Σ values[i] × scales[i / 32] × x[i]`; `values.len() == x.len()`, a multiple of 32.
pub fn dot_i8(values: &[i8], scales: &[f16], x: &[f32]) -> f32 {
    values
        .chunks_exact(INT8_BLOCK)
        .zip(x.chunks_exact(INT8_BLOCK))
        .zip(scales)
        .map(|((q, x), s)| s.to_f32() * q.iter().zip(x).map(|(&q, &x)| f32::from(q) * x).sum::<f32>())
        .sum()
}

/// `Σ a[i] × b[i]` with `a` in f16.
pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a.to_f32() * b).sum()
}

/// `Σ a[i] × b[i]`.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// Four dot products at once: `rows` holds four rows of `x.len()` values
/// back to back; returns `[rows[0]·x, rows[1]·x, rows[2]·x, rows[3]·x]`.
pub fn dot4_f32(rows: &[f32], x: &[f32]) -> [f32; 4] {
    let n = x.len();
    std::array::from_fn(|r| dot_f32(&rows[r * n..(r + 1) * n], x))
}

/// `y[i] += alpha × x[i]` with `x` in f16.
pub fn axpy_f16(alpha: f32, x: &[f16], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x.to_f32());
}

/// `y[i] += alpha × x[i]`.
pub fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// `out[i] = values[i] × scales[i / 32]`.
pub fn dequant_i8(values: &[i8], scales: &[f16], out: &mut [f32]) {
    for ((q, o), s) in values.chunks_exact(INT8_BLOCK).zip(out.chunks_exact_mut(INT8_BLOCK)).zip(scales) {
        let s = s.to_f32();
        q.iter().zip(o).for_each(|(&q, o)| *o = f32::from(q) * s);
    }
}

/// `out[i] = values[i]` widened to f32.
pub fn dequant_f16(values: &[f16], out: &mut [f32]) {
    values.iter().zip(out).for_each(|(v, o)| *o = v.to_f32());
}

/// `out[i] = x[i]` narrowed to f16 (round to nearest even).
pub fn to_f16(x: &[f32], out: &mut [f16]) {
    x.iter().zip(out).for_each(|(x, o)| *o = f16::from_f32(*x));
}
