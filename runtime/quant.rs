//! The int8 block format of packs and adapters: its reference quantizer and
//! dequantizer (the SIMD kernels agree with [`dequantize_into`]).
//!
//! Principal items: [`quantize_int8`], [`Int8Matrix`], [`dequantize_into`].
//!
//! Symmetric, per block of [`INT8_BLOCK`] consecutive inputs of a row: the
//! scale is the f16 value `s ≥ max|x| / 127` nearest to it, and each value is
//! `q = round(x / s)` in `[-127, 127]`, so `|x − q·s| ≤ s / 2` (half a
//! quantization step). The same scheme as ggml's Q8_0 (`quantize_row_q8_0_ref`
//! in ggml-quants.c), with the scale rounded up instead of to nearest so that
//! no value clips.

use half::f16;

use crate::config::INT8_BLOCK;

/// An int8-quantized `[rows, cols]` matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    /// `rows × cols` values, row-major.
    pub values: Vec<i8>,
    /// `rows × cols / 32` scales; scale `k` covers values `32k .. 32k + 32`.
    pub scales: Vec<f16>,
}

/// Quantizes `x` (row-major, rows a multiple of [`INT8_BLOCK`] long) to
/// int8 blocks.
///
/// # Panics
/// `x.len()` is not a multiple of [`INT8_BLOCK`] (callers check row lengths
/// and report them first).
pub fn quantize_int8(x: &[f32]) -> Int8Matrix {
    assert!(x.len().is_multiple_of(INT8_BLOCK), "{} values are not whole {INT8_BLOCK}-blocks", x.len());
    let mut values = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / INT8_BLOCK);
    for block in x.chunks_exact(INT8_BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut scale = f16::from_f32(amax / 127.0);
        if scale.to_f32() * 127.0 < amax {
            scale = f16::from_bits(scale.to_bits() + 1);
        }
        let inv = if scale.to_f32() > 0.0 { 1.0 / scale.to_f32() } else { 0.0 };
        values.extend(block.iter().map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8));
        scales.push(scale);
    }
    Int8Matrix { values, scales }
}

impl Int8Matrix {
    /// The f32 values the quantized matrix stands for.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.values.len()];
        dequantize_into(&self.values, &self.scales, &mut out);
        out
    }
}

/// `out[i] = values[i] × scales[i / 32]`: the reference dequantizer. Reads
/// whole blocks only, up to the shortest of the three (callers that need
/// exact lengths check them: the scalar kernel `dequant_i8`).
pub fn dequantize_into(values: &[i8], scales: &[f16], out: &mut [f32]) {
    for ((q, o), s) in values.chunks_exact(INT8_BLOCK).zip(out.chunks_exact_mut(INT8_BLOCK)).zip(scales) {
        let s = s.to_f32();
        q.iter().zip(o).for_each(|(&q, o)| *o = f32::from(q) * s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn dequantized_block_is_within_half_a_step(x in prop::collection::vec(-8.0f32..8.0, 32..=32 * 6)
            .prop_filter("whole blocks", |v| v.len().is_multiple_of(32))) {
            let q = quantize_int8(&x);
            let back = q.dequantize();
            for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                let step = q.scales[i / 32].to_f32();
                // Half a step, plus f32 rounding of the product.
                prop_assert!((a - b).abs() <= step * 0.5 + step * 1e-5, "element {i}: {a} vs {b}, step {step}");
            }
        }
    }

    #[test]
    fn block_maximum_maps_to_127_and_zero_block_stays_zero() {
        let mut x = vec![0.0f32; 64];
        x[5] = -3.0;
        x[7] = 1.5;
        let q = quantize_int8(&x);
        assert_eq!(q.values[5], -127);
        assert_eq!(q.scales[1].to_f32(), 0.0);
        assert!(q.values[32..].iter().all(|&v| v == 0));
    }
}
