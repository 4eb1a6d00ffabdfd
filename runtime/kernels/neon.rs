//! NEON kernels for aarch64 (Advanced SIMD is part of every ARMv8-A core,
//! so these need no detection), and the int8 × int8 block dots in two
//! flavours: `SDOT` where the CPU has the dot-product extension (detected
//! at run time; emitted with `asm!`, since `vdotq_s32` is not stable), and
//! `SMULL` + `SADALP` (widening multiply, pairwise add-accumulate) on cores
//! without it, such as the Cortex-A72 of a Raspberry Pi 4.
//!
//! Every function is `#[target_feature(enable = "neon")]`, as the
//! intrinsics require; NEON is in the baseline of the aarch64 targets we
//! build for (checked at compile time in `kernels`), so the table calls
//! them through safe wrappers. Each function has the contract of its namesake in [`super::scalar`] and
//! asserts it (through [`contract`]) before touching memory, so the raw
//! loads and stores below stay inside the slices in release builds too.
//! Sums are reassociated (four lanes, several accumulators), so results
//! differ from the scalar ones by rounding only; the quantizer and the
//! f16 conversions are exact. Half floats are converted with `FCVTL` and
//! `FCVTN` (base ARMv8 instructions; the `float16x4_t` intrinsics are not
//! stable), through `asm!`.

use std::arch::aarch64::*;
use std::arch::asm;

use half::f16;

use super::scalar::contract;
use crate::config::INT8_BLOCK;

/// Four f16 at `p` widened to f32 (`FCVTL`).
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_f16x4(p: *const f16) -> float32x4_t {
    // SAFETY: the caller guarantees 4 readable f16 (8 bytes); vld1 is unaligned.
    let h = unsafe { vld1_u16(p as *const u16) };
    let out: float32x4_t;
    // SAFETY: FCVTL reads and writes registers only.
    unsafe { asm!("fcvtl {o:v}.4s, {i:v}.4h", i = in(vreg) h, o = lateout(vreg) out, options(pure, nomem, nostack)) };
    out
}

/// One f16 widened to f32 (scalar `FCVT`, base ARMv8: `half`'s `to_f32`
/// checks the CPU at each call, and without FEAT_FP16, as on a Cortex-A72,
/// converts in software).
#[inline]
#[target_feature(enable = "neon")]
fn f16_to_f32(h: f16) -> f32 {
    // The half's bits in the low 16 bits of a register.
    let bits = f32::from_bits(u32::from(h.to_bits()));
    let out: f32;
    // SAFETY: FCVT reads and writes registers only.
    unsafe { asm!("fcvt {o:s}, {i:h}", i = in(vreg) bits, o = lateout(vreg) out, options(pure, nomem, nostack)) };
    out
}

/// Four f32 narrowed to f16 (`FCVTN`, rounding to nearest even under the
/// default FPCR, which Rust code never changes), stored at `p`.
///
/// # Safety
/// `p..p + 4` must be writable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn store_f16x4(p: *mut f16, v: float32x4_t) {
    let h: uint16x4_t;
    // SAFETY: FCVTN reads and writes registers only.
    unsafe { asm!("fcvtn {o:v}.4h, {i:v}.4s", i = in(vreg) v, o = lateout(vreg) h, options(pure, nomem, nostack)) };
    // SAFETY: the caller guarantees 4 writable f16 (8 bytes).
    unsafe { vst1_u16(p as *mut u16, h) };
}

/// Sixteen i8 at `p` widened to four f32 vectors.
///
/// # Safety
/// `p..p + 16` must be readable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_i8x16(p: *const i8) -> [float32x4_t; 4] {
    // SAFETY: the caller guarantees 16 readable bytes.
    let v = unsafe { vld1q_s8(p) };
    let (lo, hi) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
    [vmovl_s16(vget_low_s16(lo)), vmovl_high_s16(lo), vmovl_s16(vget_low_s16(hi)), vmovl_high_s16(hi)].map(|v| vcvtq_f32_s32(v))
}

/// Element types the f32-accumulating loops read four at a time.
trait Lanes: Copy {
    /// Four elements at `p` as f32.
    ///
    /// # Safety
    /// `p..p + 4` must be readable.
    unsafe fn load4(p: *const Self) -> float32x4_t;
    /// One element as f32 (for the tail).
    fn widen(self) -> f32;
}

impl Lanes for f32 {
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load4(p: *const f32) -> float32x4_t {
        // SAFETY: the caller guarantees 4 readable f32.
        unsafe { vld1q_f32(p) }
    }
    fn widen(self) -> f32 {
        self
    }
}

impl Lanes for f16 {
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load4(p: *const f16) -> float32x4_t {
        // SAFETY: the caller guarantees 4 readable f16.
        unsafe { load_f16x4(p) }
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `Σ a[i] × b[i]` with four accumulators (contract: equal lengths).
#[inline]
#[target_feature(enable = "neon")]
fn dot<E: Lanes>(kernel: &str, a: &[E], b: &[f32]) -> f32 {
    contract::same_len(kernel, a.len(), b.len());
    let n = a.len();
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 4k + 4 <= i + 16 <= n == a.len() == b.len().
            *acc = vfmaq_f32(*acc, unsafe { E::load4(ap.add(i + 4 * k)) }, unsafe { vld1q_f32(bp.add(i + 4 * k)) });
        }
        i += 16;
    }
    while i + 4 <= n {
        // SAFETY: i + 4 <= n == a.len() == b.len().
        acc[0] = vfmaq_f32(acc[0], unsafe { E::load4(ap.add(i)) }, unsafe { vld1q_f32(bp.add(i)) });
        i += 4;
    }
    let mut sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for j in i..n {
        sum += a[j].widen() * b[j];
    }
    sum
}

/// `y += alpha × x` (contract: equal lengths).
#[inline]
#[target_feature(enable = "neon")]
fn axpy<E: Lanes>(kernel: &str, alpha: f32, x: &[E], y: &mut [f32]) {
    contract::same_len(kernel, x.len(), y.len());
    let n = x.len();
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n == x.len() == y.len(); `y` is borrowed mutably, so the store aliases nothing.
        unsafe { vst1q_f32(yp.add(i), vfmaq_n_f32(vld1q_f32(yp.add(i)), E::load4(xp.add(i)), alpha)) };
        i += 4;
    }
    for j in i..n {
        y[j] += alpha * x[j].widen();
    }
}

/// `Σ values[i] × scales[i / 32] × x[i]` (contract: [`contract::int8_row`]).
#[target_feature(enable = "neon")]
pub fn dot_i8(values: &[i8], scales: &[f16], x: &[f32]) -> f32 {
    contract::int8_row("dot_i8", values.len(), scales.len(), x.len());
    let (q, xp) = (values.as_ptr(), x.as_ptr());
    let mut acc = vdupq_n_f32(0.0);
    for (b, scale) in scales.iter().enumerate() {
        let mut s = [vdupq_n_f32(0.0); 2];
        for half in 0..2 {
            let o = b * INT8_BLOCK + 16 * half;
            // SAFETY: o + 16 <= (b + 1) × 32 <= values.len() == x.len() (contract).
            let w = unsafe { load_i8x16(q.add(o)) };
            for (k, w) in w.into_iter().enumerate() {
                // SAFETY: o + 4k + 4 <= o + 16, as above.
                s[k % 2] = vfmaq_f32(s[k % 2], w, unsafe { vld1q_f32(xp.add(o + 4 * k)) });
            }
        }
        acc = vfmaq_n_f32(acc, vaddq_f32(s[0], s[1]), f16_to_f32(*scale));
    }
    vaddvq_f32(acc)
}

/// `Σ a[i] × b[i]`, `a` in f16.
#[target_feature(enable = "neon")]
pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    dot("dot_f16", a, b)
}

/// `Σ a[i] × b[i]`.
#[target_feature(enable = "neon")]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot("dot_f32", a, b)
}

/// Four rows (back to back in `rows`, contract [`contract::four_rows`]) dotted with `x`.
#[target_feature(enable = "neon")]
pub fn dot4_f32(rows: &[f32], x: &[f32]) -> [f32; 4] {
    contract::four_rows("dot4_f32", rows.len(), x.len());
    let n = x.len();
    let (rp, xp) = (rows.as_ptr(), x.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n == x.len().
        let xv = unsafe { vld1q_f32(xp.add(i)) };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: r·n + i + 4 <= 3n + n == rows.len() (contract).
            *acc = vfmaq_f32(*acc, unsafe { vld1q_f32(rp.add(r * n + i)) }, xv);
        }
        i += 4;
    }
    let mut out = acc.map(|v| vaddvq_f32(v));
    for j in i..n {
        for (r, o) in out.iter_mut().enumerate() {
            *o += rows[r * n + j] * x[j];
        }
    }
    out
}

/// `y += alpha × x`, `x` in f16.
#[target_feature(enable = "neon")]
pub fn axpy_f16(alpha: f32, x: &[f16], y: &mut [f32]) {
    axpy("axpy_f16", alpha, x, y)
}

/// `y += alpha × x`.
#[target_feature(enable = "neon")]
pub fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    axpy("axpy_f32", alpha, x, y)
}

/// `out = values × scales` per 32-block (contract: [`contract::int8_row`]).
#[target_feature(enable = "neon")]
pub fn dequant_i8(values: &[i8], scales: &[f16], out: &mut [f32]) {
    contract::int8_row("dequant_i8", values.len(), scales.len(), out.len());
    let (q, o) = (values.as_ptr(), out.as_mut_ptr());
    for (b, scale) in scales.iter().enumerate() {
        let s = f16_to_f32(*scale);
        for half in 0..2 {
            let at = b * INT8_BLOCK + 16 * half;
            // SAFETY: at + 16 <= (b + 1) × 32 <= values.len() == out.len() (contract).
            let w = unsafe { load_i8x16(q.add(at)) };
            for (k, w) in w.into_iter().enumerate() {
                // SAFETY: at + 4k + 4 <= at + 16, as above.
                unsafe { vst1q_f32(o.add(at + 4 * k), vmulq_n_f32(w, s)) };
            }
        }
    }
}

/// `out = values` widened (contract: equal lengths).
#[target_feature(enable = "neon")]
pub fn dequant_f16(values: &[f16], out: &mut [f32]) {
    contract::same_len("dequant_f16", values.len(), out.len());
    let n = values.len();
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n == values.len() == out.len().
        unsafe { vst1q_f32(out.as_mut_ptr().add(i), load_f16x4(values.as_ptr().add(i))) };
        i += 4;
    }
    for j in i..n {
        out[j] = values[j].to_f32();
    }
}

/// `out = x` narrowed to f16, round to nearest even (contract: equal lengths).
#[target_feature(enable = "neon")]
pub fn to_f16(x: &[f32], out: &mut [f16]) {
    contract::same_len("to_f16", x.len(), out.len());
    let n = x.len();
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n == x.len() == out.len().
        unsafe { store_f16x4(out.as_mut_ptr().add(i), vld1q_f32(x.as_ptr().add(i))) };
        i += 4;
    }
    for j in i..n {
        out[j] = f16::from_f32(x[j]);
    }
}

/// One activation row to int8 blocks, exactly as [`super::scalar::quantize_i8`]
/// (the same f32 operations; `FCVTNS` rounds ties to even).
#[target_feature(enable = "neon")]
pub fn quantize_i8(x: &[f32], values: &mut [i8], scales: &mut [f32]) {
    contract::int8_row("quantize_i8", values.len(), scales.len(), x.len());
    for (b, d) in scales.iter_mut().enumerate() {
        let at = b * INT8_BLOCK;
        // SAFETY: at + 32 <= scales.len() × 32 == x.len() (contract).
        let v: [float32x4_t; 8] = std::array::from_fn(|k| unsafe { vld1q_f32(x.as_ptr().add(at + 4 * k)) });
        let amax = v.iter().fold(vdupq_n_f32(0.0), |m, v| vmaxq_f32(m, vabsq_f32(*v)));
        *d = vmaxvq_f32(amax) / 127.0;
        let inv = if *d > 0.0 { 1.0 / *d } else { 0.0 };
        let q = v.map(|v| vcvtnq_s32_f32(vmulq_n_f32(v, inv)));
        let q16: [int16x8_t; 4] = std::array::from_fn(|k| vcombine_s16(vqmovn_s32(q[2 * k]), vqmovn_s32(q[2 * k + 1])));
        let q8 = [vcombine_s8(vqmovn_s16(q16[0]), vqmovn_s16(q16[1])), vcombine_s8(vqmovn_s16(q16[2]), vqmovn_s16(q16[3]))];
        for (k, q8) in q8.into_iter().enumerate() {
            // SAFETY: at + 16k + 16 <= at + 32 <= values.len() (contract).
            unsafe { vst1q_s8(values.as_mut_ptr().add(at + 16 * k), q8) };
        }
    }
}

/// A 4 × 3 tile: four rows (back to back) × three activation rows (back to
/// back), contract [`contract::four_rows_three_tokens`].

#[target_feature(enable = "neon")]
pub fn dot4x3_f32(rows: &[f32], x: &[f32]) -> [[f32; 4]; 3] {
    contract::four_rows_three_tokens("dot4x3_f32", rows.len(), x.len());
    let n = rows.len() / 4;
    let (rp, xp) = (rows.as_ptr(), x.as_ptr());
    let mut acc = [[vdupq_n_f32(0.0); 4]; 3];
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: r·n + i + 4 <= 4n == rows.len() (contract).
        let w: [float32x4_t; 4] = std::array::from_fn(|r| unsafe { vld1q_f32(rp.add(r * n + i)) });
        for (t, acc) in acc.iter_mut().enumerate() {
            // SAFETY: t·n + i + 4 <= 3n == x.len() (contract).
            let xv = unsafe { vld1q_f32(xp.add(t * n + i)) };
            for (acc, w) in acc.iter_mut().zip(w) {
                *acc = vfmaq_f32(*acc, w, xv);
            }
        }
        i += 4;
    }
    let mut out = acc.map(|a| a.map(|v| vaddvq_f32(v)));
    for j in i..n {
        for (t, out) in out.iter_mut().enumerate() {
            for (r, o) in out.iter_mut().enumerate() {
                *o += rows[r * n + j] * x[t * n + j];
            }
        }
    }
    out
}

/// Generates the int8 × int8 dots for one way of summing a block's 32 byte
/// products into four i32 lanes.
macro_rules! int8_dots {
    ($name:ident, $doc:literal, $features:literal, |$w:ident, $x:ident| $block_dot:expr) => {
        #[doc = $doc]
        pub mod $name {
            use std::arch::aarch64::*;
            #[allow(unused_imports)]
            use std::arch::asm;

            use half::f16;

            use crate::config::INT8_BLOCK;
            use crate::kernels::scalar::contract;

            /// The exact i32 lane sums of one block's products.
            #[inline]
            #[target_feature(enable = $features)]
            fn block_dot($w: [int8x16_t; 2], $x: [int8x16_t; 2]) -> int32x4_t {
                $block_dot
            }

            /// The 32 bytes at `p`.
            ///
            /// # Safety
            /// `p..p + 32` must be readable.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn load32(p: *const i8) -> [int8x16_t; 2] {
                // SAFETY: the caller guarantees 32 readable bytes.
                unsafe { [vld1q_s8(p), vld1q_s8(p.add(16))] }
            }

            /// One weight row against one activation row
            /// (contract: [`contract::int8_rows`], one row).
            #[target_feature(enable = $features)]
            pub fn dot_i8_i8(w: &[i8], w_scales: &[f16], x: &[i8], x_scales: &[f32]) -> f32 {
                contract::int8_rows("dot_i8_i8", 1, 1, w.len(), w_scales.len(), x.len(), x_scales.len());
                let scaled = |b: usize, acc: float32x4_t| {
                    // SAFETY: every call below passes b < blocks: (b + 1) × 32 <= w.len() == x.len() (contract).
                    let (wv, xv) = unsafe { (load32(w.as_ptr().add(b * INT8_BLOCK)), load32(x.as_ptr().add(b * INT8_BLOCK))) };
                    vfmaq_n_f32(acc, vcvtq_f32_s32(block_dot(wv, xv)), super::f16_to_f32(w_scales[b]) * x_scales[b])
                };
                // Two accumulators with constant names, so both stay in
                // registers (indexed by `b % 2` they would live on the stack).
                let (blocks, mut even, mut odd) = (x_scales.len(), vdupq_n_f32(0.0), vdupq_n_f32(0.0));
                for b in (0..blocks - blocks % 2).step_by(2) {
                    even = scaled(b, even);
                    odd = scaled(b + 1, odd);
                }
                if blocks % 2 == 1 {
                    even = scaled(blocks - 1, even);
                }
                vaddvq_f32(vaddq_f32(even, odd))
            }

            /// Four weight rows (back to back; their scales widened to f32,
            /// back to back) against `T` activation rows (back to back):
            /// each weight block is loaded once for the `T` tokens
            /// (contract: [`contract::int8_rows`], four rows, `T` tokens).
            #[target_feature(enable = $features)]
            pub fn dot4xt_i8_i8<const T: usize>(w: &[i8], w_scales: &[f32], x: &[i8], x_scales: &[f32]) -> [[f32; 4]; T] {
                contract::int8_rows("dot4xt_i8_i8", 4, T, w.len(), w_scales.len(), x.len(), x_scales.len());
                let (n, blocks) = (x.len() / T, x_scales.len() / T);
                let mut acc = [[vdupq_n_f32(0.0); 4]; T];
                for b in 0..blocks {
                    let mut wv = [[vdupq_n_s8(0); 2]; 4];
                    for (r, wv) in wv.iter_mut().enumerate() {
                        // SAFETY: r × n + (b + 1) × 32 <= 4n == w.len() (contract).
                        *wv = unsafe { load32(w.as_ptr().add(r * n + b * INT8_BLOCK)) };
                    }
                    for (t, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: t × n + (b + 1) × 32 <= T × n == x.len() (contract).
                        let xv = unsafe { load32(x.as_ptr().add(t * n + b * INT8_BLOCK)) };
                        let xs = x_scales[t * blocks + b];
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let sum = vcvtq_f32_s32(block_dot(wv[r], xv));
                            *acc = vfmaq_n_f32(*acc, sum, w_scales[r * blocks + b] * xs);
                        }
                    }
                }
                let mut out = [[0.0; 4]; T];
                for (out, acc) in out.iter_mut().zip(&acc) {
                    for (o, a) in out.iter_mut().zip(acc) {
                        *o = vaddvq_f32(*a);
                    }
                }
                out
            }
        }
    };
}

int8_dots!(
    widening,
    "`SMULL`/`SMULL2` (i8 × i8 → i16) and `SADALP` (pairwise add into i32): base NEON.",
    "neon",
    |w, x| {
        let mut acc = vdupq_n_s32(0);
        for (w, x) in w.into_iter().zip(x) {
            acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w), vget_low_s8(x)));
            acc = vpadalq_s16(acc, vmull_high_s8(w, x));
        }
        acc
    }
);

int8_dots!(
    dotprod,
    "`SDOT` (four i8 × i8 products into each i32 lane), ARMv8.2 dot-product extension. \
     Calling these needs `is_aarch64_feature_detected!(\"dotprod\")`.",
    "neon,dotprod",
    |w, x| {
        let mut acc = vdupq_n_s32(0);
        for (w, x) in w.into_iter().zip(x) {
            // SAFETY: SDOT reads and writes registers only; the enclosing function
            // is compiled for, and only called on, CPUs with the dotprod extension.
            unsafe {
                asm!("sdot {acc:v}.4s, {w:v}.16b, {x:v}.16b", acc = inout(vreg) acc, w = in(vreg) w, x = in(vreg) x,
                     options(pure, nomem, nostack));
            }
        }
        acc
    }
);
