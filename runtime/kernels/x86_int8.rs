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
//! The prefill tile (`dot4xt_i8_i8`: four weight rows × `T` tokens) loads
//! each weight block once for `T` tokens, and the `vpdpbusd` modules use
//! the offset trick there instead of the sign trick: the activation byte
//! goes to the unsigned side as `x + 128` (one `vpxor` per token and block),
//! `Σ (x + 128) w = Σ x w + 128 Σ w`, and the accumulator starts at
//! `-128 Σ w` (one `vpdpbusd` per weight block, shared by the `T` tokens),
//! so a (row, token) pair costs one `vpdpbusd` per block. `vpmaddubsw`
//! saturates i16 pairs (2 × 255 × 128 > 32767), so [`avx2`] keeps the sign
//! trick in the tile too. Block scales are multiplied eight blocks at a time
//! into a small table and broadcast from it.
//!
//! The `vpdpbusd` modules also have the grouped prefill tile
//! (`dot4_grouped_i8_i8`): the tokens, regrouped eight to a register (one
//! per 32-bit lane), take the signed side, and four weight bytes broadcast
//! to every lane take the unsigned one as `w + 128`; each lane starts at its
//! token's `-128 Σ x` of the block, so it ends at the exact block dot
//! (|offset| ≤ 128 × 32 × 127 and the products ≤ 32 × 255 × 127: far inside
//! i32). Two weight rows × up to four groups are 16 registers of sums and
//! accumulators: AVX-512VL's 32 registers hold them; AVX-VNNI's 16 spill
//! some (not measured: no AVX-VNNI machine here).
//!
//! Each function keeps [`contract::int8_rows`] (the grouped tile
//! [`contract::int8_groups`]) and asserts it before any load. They are
//! `#[target_feature]` functions: calling one needs the CPU to have its
//! module's features, which `Kernels::best` establishes before it hands out
//! the `safe` wrappers.

/// Generates one module of kernels for a way of summing byte products.
///
/// `block_dot` sums one block's byte products (unsigned `u` × signed `s`);
/// the tile's pair product is `pair(prepare_weight(w), w, prepare_x(x))`.
macro_rules! int8_kernels {
    (
        $name:ident, $features:literal, $doc:literal,
        block_dot: |$u:ident, $s:ident| $block_dot:expr,
        prepare_weight: |$pw:ident| $prepare_weight:expr,
        prepare_x: |$px:ident| $prepare_x:expr,
        pair: |$pp:ident, $pwv:ident, $pxv:ident| $pair:expr
        $(, dpbusd: |$da:ident, $du:ident, $ds:ident| $dpbusd:expr)? $(,)?
    ) => {
        #[doc = $doc]
        pub mod $name {
            use std::arch::x86_64::*;

            use half::f16;

            use crate::config::INT8_BLOCK;
            use crate::kernels::avx2::{f16_to_f32, hsum};
            use crate::kernels::scalar::contract;

            /// Exact i32 lane sums of `u × s` (u unsigned, s signed bytes).
            #[inline]
            #[target_feature(enable = $features)]
            fn block_dot($u: __m256i, $s: __m256i) -> __m256i {
                $block_dot
            }

            /// Per weight block of the tile, shared by its tokens.
            #[inline]
            #[target_feature(enable = $features)]
            fn prepare_weight($pw: __m256i) -> __m256i {
                $prepare_weight
            }

            /// Per activation block of the tile, shared by its four rows.
            #[inline]
            #[target_feature(enable = $features)]
            fn prepare_x($px: __m256i) -> __m256i {
                $prepare_x
            }

            /// Exact i32 lane sums of one (weight row, token) block pair.
            #[inline]
            #[target_feature(enable = $features)]
            fn pair($pp: __m256i, $pwv: __m256i, $pxv: __m256i) -> __m256i {
                $pair
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
                contract::int8_rows("dot_i8_i8", 1, 1, w.len(), w_scales.len(), x.len(), x_scales.len());
                let blocks = x_scales.len();
                // Two accumulators in registers: the blocks of a group of
                // eight alternate between them with constant indices (an
                // accumulator indexed by `b % 2` lives on the stack, and each
                // block then waits for the previous one's store).
                let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                // SAFETY: every call below passes b < blocks, whose 32 bytes at b × 32 lie inside
                // w and x (w.len() == x.len() == blocks × 32, contract).
                let scaled = |b: usize, scale: f32, acc: __m256| unsafe { scaled_block(w.as_ptr().add(b * INT8_BLOCK), x.as_ptr().add(b * INT8_BLOCK), scale, acc) };
                let whole = blocks - blocks % 8;
                for b0 in (0..whole).step_by(8) {
                    let mut scale = [0.0f32; 8];
                    // SAFETY: b0 + 8 <= blocks == w_scales.len() == x_scales.len() (contract): eight
                    // f16 (16 bytes) and eight f32 are read, eight f32 written to `scale`.
                    unsafe {
                        let ws = _mm256_cvtph_ps(_mm_loadu_si128(w_scales.as_ptr().add(b0) as *const __m128i));
                        _mm256_storeu_ps(scale.as_mut_ptr(), _mm256_mul_ps(ws, _mm256_loadu_ps(x_scales.as_ptr().add(b0))));
                    }
                    for pair in 0..4 {
                        even = scaled(b0 + 2 * pair, scale[2 * pair], even);
                        odd = scaled(b0 + 2 * pair + 1, scale[2 * pair + 1], odd);
                    }
                }
                for b in whole..blocks {
                    even = scaled(b, f16_to_f32(w_scales[b]) * x_scales[b], even);
                }
                hsum(_mm256_add_ps(even, odd))
            }

            /// `acc + scale × (w · x)` over one block's 32 bytes, the dot
            /// exact in i32 (sign trick), added to each of eight lanes'
            /// partial sums.
            ///
            /// # Safety
            /// `w..w + 32` and `x..x + 32` must be readable.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn scaled_block(w: *const i8, x: *const i8, scale: f32, acc: __m256) -> __m256 {
                // SAFETY: the caller guarantees 32 readable bytes at each.
                let (wv, xv) = unsafe { (load32(w), load32(x)) };
                let sum = block_dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale), acc)
            }

            /// Four weight rows (back to back; their scales widened to f32,
            /// back to back) against `T` activation rows (back to back)
            /// (contract: [`contract::int8_rows`], four rows, `T` tokens).
            ///
            /// # Safety
            /// The CPU must have this module's features (lengths are asserted, not assumed).
            #[target_feature(enable = $features)]
            pub fn dot4xt_i8_i8<const T: usize>(w: &[i8], w_scales: &[f32], x: &[i8], x_scales: &[f32]) -> [[f32; 4]; T] {
                contract::int8_rows("dot4xt_i8_i8", 4, T, w.len(), w_scales.len(), x.len(), x_scales.len());
                let (n, blocks) = (x.len() / T, x_scales.len() / T);
                let mut acc = [[_mm256_setzero_ps(); 4]; T];
                // scale[t][r][j]: the product of the two scales of block b + j, b a multiple of 8.
                let mut scale = [[[0.0f32; 8]; 4]; T];
                for b in 0..blocks {
                    if b % 8 == 0 {
                        for t in 0..T {
                            for r in 0..4 {
                                if b + 8 <= blocks {
                                    // SAFETY: b + 8 <= blocks, so the eight f32 at r × blocks + b
                                    // (< 4 × blocks == w_scales.len()) and at t × blocks + b
                                    // (< T × blocks == x_scales.len(), contract) are in bounds.
                                    unsafe {
                                        let ws = _mm256_loadu_ps(w_scales.as_ptr().add(r * blocks + b));
                                        let xs = _mm256_loadu_ps(x_scales.as_ptr().add(t * blocks + b));
                                        _mm256_storeu_ps(scale[t][r].as_mut_ptr(), _mm256_mul_ps(ws, xs));
                                    }
                                } else {
                                    for (j, s) in scale[t][r].iter_mut().enumerate().take(blocks - b) {
                                        *s = w_scales[r * blocks + b + j] * x_scales[t * blocks + b + j];
                                    }
                                }
                            }
                        }
                    }
                    let mut wv = [_mm256_setzero_si256(); 4];
                    let mut pw = [_mm256_setzero_si256(); 4];
                    for r in 0..4 {
                        // SAFETY: r × n + (b + 1) × 32 <= 4n == w.len() (contract).
                        wv[r] = unsafe { load32(w.as_ptr().add(r * n + b * INT8_BLOCK)) };
                        pw[r] = prepare_weight(wv[r]);
                    }
                    for t in 0..T {
                        // SAFETY: t × n + (b + 1) × 32 <= T × n == x.len() (contract).
                        let xv = prepare_x(unsafe { load32(x.as_ptr().add(t * n + b * INT8_BLOCK)) });
                        for r in 0..4 {
                            let sum = pair(pw[r], wv[r], xv);
                            acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale[t][r][b % 8]), acc[t][r]);
                        }
                    }
                }
                let mut out = [[0.0; 4]; T];
                for t in 0..T {
                    for r in 0..4 {
                        out[t][r] = hsum(acc[t][r]);
                    }
                }
                out
            }

            $(
            use crate::budget::TOKEN_GROUP;

            /// `acc + Σ` of the four byte products of each 32-bit lane
            /// (`u` unsigned, `s` signed), exact.
            #[inline]
            #[target_feature(enable = $features)]
            fn dpbusd($da: __m256i, $du: __m256i, $ds: __m256i) -> __m256i {
                $dpbusd
            }

            /// The grouped prefill tile: four weight rows (back to back;
            /// their scales widened to f32, back to back) against groups of
            /// eight tokens regrouped by
            /// [`group_tokens_i8`](crate::kernels::scalar::group_tokens_i8),
            /// one token per 32-bit lane; `out[(g × 4 + r) × 8 + t]` is row
            /// `r` with token `t` of group `g` (contract:
            /// [`contract::int8_groups`]). Per weight block, four weight
            /// bytes are broadcast to every lane and offset to unsigned
            /// (`w + 128`) once for up to four groups, and each `vpdpbusd`
            /// multiplies them by the same four positions of a group's eight
            /// tokens; the lanes start at the tokens' offsets (`-128 Σ x`),
            /// so they end at eight exact block dots, converted and scaled
            /// once per block for the eight. Against [`dot4xt_i8_i8`] a
            /// block pair costs an eighth of a conversion and a multiply-add
            /// instead of one of each, and no scale broadcast (the
            /// microkernel of oneDNN's and ONNX Runtime's u8s8 GEMMs, a
            /// 4-byte broadcast against packed columns, applied to Q8_0
            /// blocks).
            ///
            /// # Safety
            /// The CPU must have this module's features (lengths are asserted, not assumed).
            #[target_feature(enable = $features)]
            pub fn dot4_grouped_i8_i8(w: &[i8], w_scales: &[f32], x: &[i8], x_scales: &[f32], x_offsets: &[i32], out: &mut [f32]) {
                contract::int8_groups("dot4_grouped_i8_i8", w.len(), w_scales.len(), x.len(), x_scales.len(), x_offsets.len(), out.len());
                let groups = out.len() / (4 * TOKEN_GROUP);
                for r0 in [0, 2] {
                    let mut g0 = 0;
                    while g0 < groups {
                        // SAFETY: rows r0, r0 + 1 < 4 and groups g0..g0 + G <= groups
                        // (G is at most what is left), the shapes the contract checked.
                        unsafe {
                            match groups - g0 {
                                1 => grouped_tile::<1>(w, w_scales, x, x_scales, x_offsets, r0, g0, out),
                                2 => grouped_tile::<2>(w, w_scales, x, x_scales, x_offsets, r0, g0, out),
                                3 => grouped_tile::<3>(w, w_scales, x, x_scales, x_offsets, r0, g0, out),
                                _ => grouped_tile::<4>(w, w_scales, x, x_scales, x_offsets, r0, g0, out),
                            }
                        }
                        g0 += 4;
                    }
                }
            }

            /// Rows `r0` and `r0 + 1` against groups `g0..g0 + G` of
            /// [`dot4_grouped_i8_i8`], written to their places in `out`.
            ///
            /// # Safety
            /// The slices keep [`contract::int8_groups`], `r0 + 2 <= 4`,
            /// and `g0 + G` is at most the number of groups.
            #[inline]
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn grouped_tile<const G: usize>(
                w: &[i8],
                w_scales: &[f32],
                x: &[i8],
                x_scales: &[f32],
                x_offsets: &[i32],
                r0: usize,
                g0: usize,
                out: &mut [f32],
            ) {
                let (n, blocks) = (w.len() / 4, w_scales.len() / 4);
                let flip = _mm256_set1_epi8(-128);
                let mut sums = [[_mm256_setzero_ps(); G]; 2];
                for b in 0..blocks {
                    let mut acc = [[_mm256_setzero_si256(); G]; 2];
                    for g in 0..G {
                        // SAFETY: ((g0 + g) × blocks + b + 1) × 8 <= groups × blocks × 8 == x_offsets.len().
                        let offsets = unsafe { _mm256_loadu_si256(x_offsets.as_ptr().add(((g0 + g) * blocks + b) * 8) as *const __m256i) };
                        acc[0][g] = offsets;
                        acc[1][g] = offsets;
                    }
                    for j in 0..8 {
                        for (r, acc) in acc.iter_mut().enumerate() {
                            // SAFETY: (r0 + r) × n + b × 32 + 4j + 4 <= 4n == w.len(); read unaligned.
                            let four = unsafe { (w.as_ptr().add((r0 + r) * n + b * INT8_BLOCK + 4 * j) as *const i32).read_unaligned() };
                            let unsigned = _mm256_xor_si256(_mm256_set1_epi32(four), flip);
                            for (g, acc) in acc.iter_mut().enumerate() {
                                // SAFETY: (g0 + g) × 8n + (b × 8 + j + 1) × 32 <= groups × 8n == x.len().
                                let xv = unsafe { load32(x.as_ptr().add((g0 + g) * 8 * n + (b * 8 + j) * 32)) };
                                *acc = dpbusd(*acc, unsigned, xv);
                            }
                        }
                    }
                    for (r, (sums, acc)) in sums.iter_mut().zip(&acc).enumerate() {
                        let ws = _mm256_set1_ps(w_scales[(r0 + r) * blocks + b]);
                        for (g, (sum, acc)) in sums.iter_mut().zip(acc).enumerate() {
                            // SAFETY: as for the offsets: x_scales.len() == x_offsets.len().
                            let xs = unsafe { _mm256_loadu_ps(x_scales.as_ptr().add(((g0 + g) * blocks + b) * 8)) };
                            *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*acc), _mm256_mul_ps(ws, xs), *sum);
                        }
                    }
                }
                for (r, sums) in sums.iter().enumerate() {
                    for (g, sum) in sums.iter().enumerate() {
                        let at = ((g0 + g) * 4 + r0 + r) * TOKEN_GROUP;
                        // SAFETY: at + 8 <= groups × 32 == out.len() (contract), eight f32 written.
                        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(at), *sum) };
                    }
                }
            }

            /// Safe entry point of the grouped tile (see [`safe`]).
            pub mod safe_grouped {
                /// See [`super::dot4_grouped_i8_i8`].
                pub fn dot4_grouped_i8_i8(w: &[i8], w_scales: &[f32], x: &[i8], x_scales: &[f32], x_offsets: &[i32], out: &mut [f32]) {
                    // SAFETY: the CPU features were detected (module doc of `safe`).
                    unsafe { super::dot4_grouped_i8_i8(w, w_scales, x, x_scales, x_offsets, out) }
                }
            }
            )?

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

                /// See [`super::dot4xt_i8_i8`].
                pub fn dot4xt_i8_i8<const T: usize>(w: &[i8], w_scales: &[f32], x: &[i8], x_scales: &[f32]) -> [[f32; 4]; T] {
                    // SAFETY: the CPU features were detected (module doc).
                    unsafe { super::dot4xt_i8_i8::<T>(w, w_scales, x, x_scales) }
                }
            }
        }
    };
}

int8_kernels!(
    avx2,
    "avx2,fma,f16c",
    "AVX2: `vpmaddubsw` to i16 pairs, `vpmaddwd` by ones to i32.",
    block_dot: |u, s| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
    prepare_weight: |w| _mm256_sign_epi8(w, w),
    prepare_x: |x| x,
    pair: |abs_w, w, x| block_dot(abs_w, _mm256_sign_epi8(x, w)),
);

int8_kernels!(
    avx512vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    "AVX-512 VNNI on 256-bit registers: one `vpdpbusd` per block.",
    block_dot: |u, s| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s),
    prepare_weight: |w| _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), w)),
    prepare_x: |x| _mm256_xor_si256(x, _mm256_set1_epi8(-128)),
    pair: |start, w, x_offset| _mm256_dpbusd_epi32(start, x_offset, w),
    dpbusd: |acc, u, s| _mm256_dpbusd_epi32(acc, u, s),
);

int8_kernels!(
    avxvnni,
    "avx2,fma,f16c,avxvnni",
    "AVX-VNNI: one VEX-encoded `vpdpbusd` per block.",
    block_dot: |u, s| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s),
    prepare_weight: |w| _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), w)),
    prepare_x: |x| _mm256_xor_si256(x, _mm256_set1_epi8(-128)),
    pair: |start, w, x_offset| _mm256_dpbusd_avx_epi32(start, x_offset, w),
    dpbusd: |acc, u, s| _mm256_dpbusd_avx_epi32(acc, u, s),
);
