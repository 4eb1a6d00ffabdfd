//! Plain Rust reference kernels, and the contract every implementation of
//! each kernel keeps. Every SIMD kernel must agree with these (property
//! tests in `kernels::tests`) and asserts the same [`contract`] before it
//! touches memory, in release builds too.

use half::f16;

use crate::config::INT8_BLOCK;

/// The slice-length contract of each kernel. A violation is a bug in the
/// caller: it panics, naming the kernel and the lengths, before any read.
/// One compare per call is nothing next to the row of work behind it.
pub mod contract {
    use crate::config::INT8_BLOCK;

    /// An int8 row: `values` a multiple of 32 long, one scale per 32-block,
    /// and the f32 side (`x` or `out`) exactly as long as `values`.
    #[inline]
    pub fn int8_row(kernel: &str, values: usize, scales: usize, other: usize) {
        assert!(
            values.is_multiple_of(INT8_BLOCK) && scales == values / INT8_BLOCK && other == values,
            "{kernel}: {values} int8 values need {} scales and as many f32, got {scales} and {other}",
            values / INT8_BLOCK
        );
    }

    /// Two slices of equal length.
    #[inline]
    pub fn same_len(kernel: &str, a: usize, b: usize) {
        assert!(a == b, "{kernel}: slices of {a} and {b} elements, must be equal");
    }

    /// Four rows of `x` elements each, back to back.
    #[inline]
    pub fn four_rows(kernel: &str, rows: usize, x: usize) {
        assert!(rows / 4 == x && rows.is_multiple_of(4), "{kernel}: {rows} row elements are not four rows of {x}");
    }
}

/// `Σ values[i] × scales[i / 32] × x[i]`; `values.len() == x.len()`, a
/// multiple of 32, with `values.len() / 32` scales.
pub fn dot_i8(values: &[i8], scales: &[f16], x: &[f32]) -> f32 {
    contract::int8_row("dot_i8", values.len(), scales.len(), x.len());
    values
        .chunks_exact(INT8_BLOCK)
        .zip(x.chunks_exact(INT8_BLOCK))
        .zip(scales)
        .map(|((q, x), s)| s.to_f32() * q.iter().zip(x).map(|(&q, &x)| f32::from(q) * x).sum::<f32>())
        .sum()
}

/// `Σ a[i] × b[i]` with `a` in f16; equal lengths.
pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    contract::same_len("dot_f16", a.len(), b.len());
    a.iter().zip(b).map(|(a, b)| a.to_f32() * b).sum()
}

/// `Σ a[i] × b[i]`; equal lengths.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    contract::same_len("dot_f32", a.len(), b.len());
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// Four dot products at once: `rows` holds four rows of `x.len()` values
/// back to back (`rows.len() == 4 × x.len()`); returns
/// `[rows[0]·x, rows[1]·x, rows[2]·x, rows[3]·x]`.
pub fn dot4_f32(rows: &[f32], x: &[f32]) -> [f32; 4] {
    contract::four_rows("dot4_f32", rows.len(), x.len());
    let n = x.len();
    std::array::from_fn(|r| dot_f32(&rows[r * n..(r + 1) * n], x))
}

/// `y[i] += alpha × x[i]` with `x` in f16; equal lengths.
pub fn axpy_f16(alpha: f32, x: &[f16], y: &mut [f32]) {
    contract::same_len("axpy_f16", x.len(), y.len());
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x.to_f32());
}

/// `y[i] += alpha × x[i]`; equal lengths.
pub fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    contract::same_len("axpy_f32", x.len(), y.len());
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// `out[i] = values[i] × scales[i / 32]`; lengths as in [`dot_i8`].
pub fn dequant_i8(values: &[i8], scales: &[f16], out: &mut [f32]) {
    contract::int8_row("dequant_i8", values.len(), scales.len(), out.len());
    crate::quant::dequantize_into(values, scales, out);
}

/// `out[i] = values[i]` widened to f32; equal lengths.
pub fn dequant_f16(values: &[f16], out: &mut [f32]) {
    contract::same_len("dequant_f16", values.len(), out.len());
    values.iter().zip(out).for_each(|(v, o)| *o = v.to_f32());
}

/// `out[i] = x[i]` narrowed to f16 (round to nearest even); equal lengths.
pub fn to_f16(x: &[f32], out: &mut [f16]) {
    contract::same_len("to_f16", x.len(), out.len());
    x.iter().zip(out).for_each(|(x, o)| *o = f16::from_f32(*x));
}
