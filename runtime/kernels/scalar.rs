//! Plain Rust reference kernels, and the contract every implementation of
//! each kernel keeps. Every SIMD kernel must agree with these (property
//! tests in `kernels::tests`) and asserts the same [`contract`] before it
//! touches memory, in release builds too.

use half::f16;

use crate::budget::TOKEN_GROUP;
use crate::config::INT8_BLOCK;

/// The slice-length contract of each kernel. A violation is a bug in the
/// caller: it panics, naming the kernel and the lengths, before any read.
/// One compare per call is nothing next to the row of work behind it.
pub mod contract {
    use crate::budget::TOKEN_GROUP;
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

    /// Four rows of `n` elements and three activation rows of `n`, each
    /// set back to back.
    #[inline]
    pub fn four_rows_three_tokens(kernel: &str, rows: usize, x: usize) {
        assert!(
            rows.is_multiple_of(4) && x == rows / 4 * 3,
            "{kernel}: {rows} row elements and {x} activations are not four rows and three tokens of one width"
        );
    }

    /// `rows` int8 weight rows back to back (`weights` values, one scale per
    /// 32-block in `weight_scales`) against `tokens` int8 activation rows of
    /// the same width, back to back (`x` values, one scale per 32-block in
    /// `x_scales`).
    #[inline]
    pub fn int8_rows(kernel: &str, rows: usize, tokens: usize, weights: usize, weight_scales: usize, x: usize, x_scales: usize) {
        let width = x / tokens;
        assert!(
            width.is_multiple_of(INT8_BLOCK)
                && x == tokens * width
                && x_scales == x / INT8_BLOCK
                && weights == rows * width
                && weight_scales == rows * (width / INT8_BLOCK),
            "{kernel}: {rows} row(s) of {weights} int8 values with {weight_scales} scales against {tokens} \
             token(s) of {x} values with {x_scales} scales; need {rows} and {tokens} rows of one width, a \
             multiple of {INT8_BLOCK}, and one scale per {INT8_BLOCK}-block"
        );
    }

    /// Four int8 weight rows back to back (`weights` values, one scale per
    /// 32-block in `weight_scales`) against whole groups of eight tokens of
    /// the same width, laid out by [`super::group_tokens_i8`] (`x` values;
    /// `x_scales` and `x_offsets` one per block and token), with `out` one
    /// f32 per row and token.
    #[inline]
    pub fn int8_groups(kernel: &str, weights: usize, weight_scales: usize, x: usize, x_scales: usize, x_offsets: usize, out: usize) {
        let width = weights / 4;
        let groups = out / (4 * TOKEN_GROUP);
        assert!(
            width > 0
                && width.is_multiple_of(INT8_BLOCK)
                && weights == 4 * width
                && weight_scales == 4 * (width / INT8_BLOCK)
                && out == groups * 4 * TOKEN_GROUP
                && x == groups * TOKEN_GROUP * width
                && x_scales == groups * TOKEN_GROUP * (width / INT8_BLOCK)
                && x_offsets == x_scales,
            "{kernel}: {weights} int8 weight values with {weight_scales} scales against {x} grouped values with \
             {x_scales} scales and {x_offsets} offsets into {out} outputs; need four rows and whole groups of \
             {TOKEN_GROUP} tokens of one width, a nonzero multiple of {INT8_BLOCK}, one scale (and offset) per \
             {INT8_BLOCK}-block, and an output per row and token"
        );
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

/// Quantizes one activation row to int8 blocks, as llama.cpp's Q8_0
/// activations (`quantize_row_q8_0_ref` in ggml-quants.c) but with an f32
/// scale: per 32-block, `d = max|x| / 127`, `values = round(x / d)` (ties
/// to even, as the SIMD conversions round; computed as `x × (1 / d)`, 0 for
/// an all-zero block), `scales = d`. `x.len()` a multiple of 32, `values` as
/// long, one scale per block.
pub fn quantize_i8(x: &[f32], values: &mut [i8], scales: &mut [f32]) {
    contract::int8_row("quantize_i8", values.len(), scales.len(), x.len());
    for ((x, q), d) in x.chunks_exact(INT8_BLOCK).zip(values.chunks_exact_mut(INT8_BLOCK)).zip(scales) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *d = amax / 127.0;
        let inv = if *d > 0.0 { 1.0 / *d } else { 0.0 };
        q.iter_mut().zip(x).for_each(|(q, x)| *q = (x * inv).round_ties_even().clamp(-127.0, 127.0) as i8);
    }
}

/// One int8 weight row against one int8 activation row (llama.cpp's
/// `ggml_vec_dot_q8_0_q8_0`): `Σ_b w_scales[b] × x_scales[b] × Σ_{i in b}
/// w[i] × x[i]`, the inner sums exact in i32 (contract
/// [`contract::int8_rows`] with one row).
pub fn dot_i8_i8(w: &[i8], w_scales: &[f16], x: &[i8], x_scales: &[f32]) -> f32 {
    contract::int8_rows("dot_i8_i8", 1, 1, w.len(), w_scales.len(), x.len(), x_scales.len());
    w.chunks_exact(INT8_BLOCK)
        .zip(x.chunks_exact(INT8_BLOCK))
        .zip(w_scales.iter().zip(x_scales))
        .map(|((w, x), (ws, xs))| ws.to_f32() * xs * block_sum(w, x) as f32)
        .sum()
}

/// A 4 × `T` register tile of the integer prefill product: four int8
/// weight rows (back to back, their scales already widened to f32, also
/// back to back) against `T` int8 activation rows (back to back, scales
/// likewise); `out[t][r]` is [`dot_i8_i8`] of row `r` and token `t`
/// (contract [`contract::int8_rows`] with four rows and `T` tokens).
pub fn dot4xt_i8_i8<const T: usize>(w: &[i8], w_scales: &[f32], x: &[i8], x_scales: &[f32]) -> [[f32; 4]; T] {
    contract::int8_rows("dot4xt_i8_i8", 4, T, w.len(), w_scales.len(), x.len(), x_scales.len());
    let (n, blocks) = (x.len() / T, x_scales.len() / T);
    std::array::from_fn(|t| {
        let (x, xs) = (&x[t * n..(t + 1) * n], &x_scales[t * blocks..(t + 1) * blocks]);
        std::array::from_fn(|r| {
            let (w, ws) = (&w[r * n..(r + 1) * n], &w_scales[r * blocks..(r + 1) * blocks]);
            w.chunks_exact(INT8_BLOCK)
                .zip(x.chunks_exact(INT8_BLOCK))
                .zip(ws.iter().zip(xs))
                .map(|((w, x), (ws, xs))| ws * xs * block_sum(w, x) as f32)
                .sum()
        })
    })
}

/// Regroups `n` int8 activation rows of width `cols` (row by row in
/// `values`, block scales in `scales`, as [`quantize_i8`] writes them) for
/// the grouped prefill tile ([`dot4_grouped_i8_i8`]): groups of
/// [`TOKEN_GROUP`] (8) tokens, the last one padded with zero tokens (value
/// and scale 0). Within a group, block `b`'s bytes `4j..4j + 4` of token
/// `t` go to `out[((b × 8 + j) × 8 + t) × 4..][..4]`, so 32 bytes hold
/// the same four positions of eight tokens, one token per 32-bit lane;
/// `out_scales[b × 8 + t]` is the token's block scale and
/// `out_offsets[b × 8 + t] = -128 × Σ` of its block's 32 values (what the
/// `vpdpbusd` tiles subtract after multiplying by `w + 128`). Groups follow
/// each other: `out` is `groups × 8 × cols` long, the other two `groups × 8
/// × cols / 32`; `n` is `values.len() / cols`. Panics on other lengths.
pub fn group_tokens_i8(cols: usize, values: &[i8], scales: &[f32], out: &mut [i8], out_scales: &mut [f32], out_offsets: &mut [i32]) {
    let blocks = cols / INT8_BLOCK;
    let n = values.len().checked_div(cols).unwrap_or(0);
    let groups = n.div_ceil(TOKEN_GROUP);
    assert!(
        cols.is_multiple_of(INT8_BLOCK)
            && values.len() == n * cols
            && scales.len() == n * blocks
            && out.len() == groups * TOKEN_GROUP * cols
            && out_scales.len() == groups * TOKEN_GROUP * blocks
            && out_offsets.len() == out_scales.len(),
        "group_tokens_i8: {} values and {} scales of width {cols} do not fill {} grouped values, {} scales and {} offsets",
        values.len(),
        scales.len(),
        out.len(),
        out_scales.len(),
        out_offsets.len()
    );
    let group_len = TOKEN_GROUP * cols;
    for (g, ((out, out_scales), out_offsets)) in
        out.chunks_exact_mut(group_len).zip(out_scales.chunks_exact_mut(TOKEN_GROUP * blocks)).zip(out_offsets.chunks_exact_mut(TOKEN_GROUP * blocks)).enumerate()
    {
        for t in 0..TOKEN_GROUP {
            let token = g * TOKEN_GROUP + t;
            for b in 0..blocks {
                let (block, scale) = match token < n {
                    true => (&values[token * cols + b * INT8_BLOCK..][..INT8_BLOCK], scales[token * blocks + b]),
                    false => (&[0i8; INT8_BLOCK][..], 0.0),
                };
                for (j, four) in block.chunks_exact(4).enumerate() {
                    out[((b * TOKEN_GROUP + j) * TOKEN_GROUP + t) * 4..][..4].copy_from_slice(four);
                }
                out_scales[b * TOKEN_GROUP + t] = scale;
                out_offsets[b * TOKEN_GROUP + t] = -128 * block.iter().map(|&v| i32::from(v)).sum::<i32>();
            }
        }
    }
}

/// The grouped prefill tile: four int8 weight rows (back to back, scales
/// widened to f32, back to back) against groups of [`TOKEN_GROUP`] tokens
/// laid out by [`group_tokens_i8`]; `out[(g × 4 + r) × 8 + t]` is
/// [`dot_i8_i8`] of row `r` and token `t` of group `g` (contract
/// [`contract::int8_groups`]). The offsets are checked but not needed here:
/// the reference multiplies signed bytes.
pub fn dot4_grouped_i8_i8(w: &[i8], w_scales: &[f32], x: &[i8], x_scales: &[f32], x_offsets: &[i32], out: &mut [f32]) {
    contract::int8_groups("dot4_grouped_i8_i8", w.len(), w_scales.len(), x.len(), x_scales.len(), x_offsets.len(), out.len());
    let (n, blocks) = (w.len() / 4, w_scales.len() / 4);
    for (i, out) in out.iter_mut().enumerate() {
        let (g, r, t) = (i / (4 * TOKEN_GROUP), i / TOKEN_GROUP % 4, i % TOKEN_GROUP);
        let x = &x[g * TOKEN_GROUP * n..][..TOKEN_GROUP * n];
        *out = (0..blocks)
            .map(|b| {
                let w = &w[r * n + b * INT8_BLOCK..][..INT8_BLOCK];
                let dot: i32 = (0..INT8_BLOCK)
                    .map(|i| i32::from(w[i]) * i32::from(x[((b * TOKEN_GROUP + i / 4) * TOKEN_GROUP + t) * 4 + i % 4]))
                    .sum();
                w_scales[r * blocks + b] * x_scales[(g * blocks + b) * TOKEN_GROUP + t] * dot as f32
            })
            .sum();
    }
}

/// `Σ w[i] × x[i]` of one block, exact.
fn block_sum(w: &[i8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&w, &x)| i32::from(w) * i32::from(x)).sum()
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

/// A 4 × 3 register tile of the prefill product: `rows` holds four rows of
/// `n` values back to back, `x` three activation rows of `n` back to back;
/// `out[t][r] = rows[r] · x[t]`. Each loaded weight serves three tokens.
pub fn dot4x3_f32(rows: &[f32], x: &[f32]) -> [[f32; 4]; 3] {
    contract::four_rows_three_tokens("dot4x3_f32", rows.len(), x.len());
    let n = rows.len() / 4;
    std::array::from_fn(|t| dot4_f32(rows, &x[t * n..(t + 1) * n]))
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
