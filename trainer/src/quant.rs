//! Int8 block quantization of weight matrices (the device pack format).
//!
//! Symmetric, per block of [`INT8_BLOCK`] consecutive inputs of a row: the
//! scale is the f16 value `s ≥ max|x| / 127` nearest to it, and each value is
//! `q = round(x / s)` in `[-127, 127]`, so `|x − q·s| ≤ s / 2` (half a
//! quantization step). The same scheme as ggml's Q8_0, with the scale rounded
//! up instead of to nearest so that no value clips.

use half::f16;
use nocturne::config::INT8_BLOCK;

/// An int8-quantized `[rows, cols]` matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    /// `rows × cols` values, row-major.
    pub values: Vec<i8>,
    /// `rows × cols / 32` scales; scale `k` covers values `32k .. 32k + 32`.
    pub scales: Vec<f16>,
}

/// Quantizes `x` (row-major, row length a multiple of [`INT8_BLOCK`]; the
/// caller validates) to int8 blocks.
pub fn quantize_int8(x: &[f32]) -> Int8Matrix {
    debug_assert_eq!(x.len() % INT8_BLOCK, 0);
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
        self.values
            .chunks_exact(INT8_BLOCK)
            .zip(&self.scales)
            .flat_map(|(block, s)| block.iter().map(move |&q| f32::from(q) * s.to_f32()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn dequantized_block_is_within_half_a_step(x in prop::collection::vec(-8.0f32..8.0, 32..=32 * 6)
            .prop_filter("whole blocks", |v| v.len() % 32 == 0)) {
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
