//! int8 weight × int8 activation block dot products for x86-64, after
//! llama.cpp's Q8_0 × Q8_0 path (`ggml_vec_dot_q8_0_q8_0` and its
//! `mul_sum_i8_pairs_float` in ggml-cpu's x86 quants): per 32-block the 32
//! byte products are summed exactly in i32 lanes, converted once to f32 and
//! scaled by the product of the two block scales.
//!
//! The instructions multiply unsigned by signed bytes, so each block uses
//! the sign trick: `w · x = |w| · (x × sign(w))` (`vpsignb` twice). The
//! weight takes the unsigned side: a pack's `-128` becomes 128 there,
//! exactly, while activations, which we quantize, stay within ±127, so
//! `x × sign(w)` never overflows and every byte value of a pack is
//! multiplied exactly. Three
//! ways to sum the byte products, one module each, chosen at run time:
//! - [`avx2`]: `vpmaddubsw` (pairs to i16; at most 2 × 128 × 127, no
//!   saturation since activations stay within ±127) then `vpmaddwd` by ones;
//! - [`avx512vnni`]: `vpdpbusd` on 256-bit registers (AVX-512 VNNI + VL);
//! - [`avxvnni`]: the VEX-encoded `vpdpbusd` (AVX-VNNI, e.g. Alder Lake).
//!
//! Each function keeps [`contract::int8_rows`] and asserts it before any
//! load. They are `#[target_feature]` functions: calling one needs the CPU
//! to have its module's features, which `Kernels::best` establishes before
//! it hands out the `safe` wrappers.

/// Generates one module of kernels for a way of summing byte products.
macro_rules! int8_kernels {
    ($name:ident, $features:literal, $doc:literal, |$u:ident, $s:ident| $block_dot:expr) => {
        #[doc = $doc]
        pub mod $name {
            use std::arch::x86_64::*;

            use half::f16;

            use crate::config::INT8_BLOCK;
            use crate::kernels::avx2::hsum;
            use crate::kernels::scalar::contract;

            /// Exact i32 lane sums of `u × s` (u unsigned, s signed bytes).
            #[inline]
            #[target_feature(enable = $features)]
            fn block_dot($u: __m256i, $s: __m256i) -> __m256i {
                $block_dot
            }

            /// 32 bytes at `p`.
            ///
            /// # Safety
            /// `p..p + 32` must be readable.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn load32(p: *const i8) -> __m256i {
                // SAFETY: the caller guarantees 32 readable bytes; loadu is unaligned.
                unsafe { _mm256_loadu_si256(p as *const __m256i) }
            }

            /// One weight row against one activation row
            /// (contract: [`contract::int8_rows`], one row).
            ///
            /// # Safety
            /// The CPU must have this module's features (lengths are asserted, not assumed).
            #[target_feature(enable = $features)]
            pub fn dot_i8_i8(w: &[i8], w_scales: &[f16], x: &[i8], x_scales: &[f32]) -> f32 {
                contract::int8_rows("dot_i8_i8", 1, w.len(), w_scales.len(), x.len(), x_scales.len());
                let blocks = x_scales.len();
                let mut acc = [_mm256_setzero_ps(); 2];
                let mut scale = [0.0f32; 8];
                for b in 0..blocks {
                    if b % 8 == 0 {
                        if b + 8 <= blocks {
                            // SAFETY: b + 8 <= blocks == w_scales.len() == x_scales.len() (contract):
                            // eight f16 (16 bytes) and eight f32 are read, eight f32 written to `scale`.
                            unsafe {
                                let ws = _mm256_cvtph_ps(_mm_loadu_si128(w_scales.as_ptr().add(b) as *const __m128i));
                                let xs = _mm256_loadu_ps(x_scales.as_ptr().add(b));
                                _mm256_storeu_ps(scale.as_mut_ptr(), _mm256_mul_ps(ws, xs));
                            }
                        } else {
                            for (j, s) in scale.iter_mut().enumerate().take(blocks - b) {
                                *s = w_scales[b + j].to_f32() * x_scales[b + j];
                            }
                        }
                    }
                    // SAFETY: (b + 1) × 32 <= blocks × 32 == w.len() == x.len() (contract).
                    let (wv, xv) = unsafe { (load32(w.as_ptr().add(b * INT8_BLOCK)), load32(x.as_ptr().add(b * INT8_BLOCK))) };
                    let sum = block_dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                    acc[b % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale[b % 8]), acc[b % 2]);
                }
                hsum(_mm256_add_ps(acc[0], acc[1]))
            }

            /// Four weight rows (back to back; their scales widened to f32,
            /// back to back) against one activation row
            /// (contract: [`contract::int8_rows`], four rows).
            ///
            /// # Safety
            /// The CPU must have this module's features (lengths are asserted, not assumed).
            #[target_feature(enable = $features)]
            pub fn dot4_i8_i8(w: &[i8], w_scales: &[f32], x: &[i8], x_scales: &[f32]) -> [f32; 4] {
                contract::int8_rows("dot4_i8_i8", 4, w.len(), w_scales.len(), x.len(), x_scales.len());
                let (n, blocks) = (x.len(), x_scales.len());
                let mut acc = [_mm256_setzero_ps(); 4];
                for b in 0..blocks {
                    // SAFETY: (b + 1) × 32 <= n == x.len() (contract).
                    let xv = unsafe { load32(x.as_ptr().add(b * INT8_BLOCK)) };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: r × n + (b + 1) × 32 <= 4n == w.len() (contract).
                        let wv = unsafe { load32(w.as_ptr().add(r * n + b * INT8_BLOCK)) };
                        let sum = block_dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                        let scale = _mm256_set1_ps(w_scales[r * blocks + b] * x_scales[b]);
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
                    }
                }
                acc.map(|a| hsum(a))
            }

            /// Safe entry points, reachable only through the kernel table
            /// `Kernels::best` builds after detecting this module's features,
            /// so the calls below are sound (lengths are asserted inside).
            pub mod safe {
                use half::f16;

                /// See [`super::dot_i8_i8`].
                pub fn dot_i8_i8(w: &[i8], w_scales: &[f16], x: &[i8], x_scales: &[f32]) -> f32 {
                    // SAFETY: the CPU features were detected (module doc).
                    unsafe { super::dot_i8_i8(w, w_scales, x, x_scales) }
                }

                /// See [`super::dot4_i8_i8`].
                pub fn dot4_i8_i8(w: &[i8], w_scales: &[f32], x: &[i8], x_scales: &[f32]) -> [f32; 4] {
                    // SAFETY: the CPU features were detected (module doc).
                    unsafe { super::dot4_i8_i8(w, w_scales, x, x_scales) }
                }
            }
        }
    };
}

int8_kernels!(
    avx2,
    "avx2,fma,f16c",
    "AVX2: `vpmaddubsw` to i16 pairs, `vpmaddwd` by ones to i32.",
    |u, s| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
);

int8_kernels!(
    avx512vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    "AVX-512 VNNI on 256-bit registers: one `vpdpbusd` per block.",
    |u, s| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
);

int8_kernels!(
    avxvnni,
    "avx2,fma,f16c,avxvnni",
    "AVX-VNNI: one VEX-encoded `vpdpbusd` per block.",
    |u, s| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
);
