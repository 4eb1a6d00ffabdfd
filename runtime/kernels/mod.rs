//! Compute kernels of the decoder.
//!
//! Principal types: [`Kernels`] (the vector primitives, chosen once at run
//! time by CPU feature detection), [`Isa`]; functions [`rms_norm`],
//! [`rope`], [`RopeTable`], [`softmax`], [`silu_mul`].
//!
//! The vector primitives — int8 and fp16 row dot products against f32
//! activations, f32 dot (single and four rows at once), axpy, row
//! dequantization, f32→f16 — exist as a plain
//! scalar reference ([`scalar`]) and, on x86-64 with AVX2+FMA+F16C, as SIMD
//! versions ([`avx2`]). A matrix-vector product is one row dot per output
//! row; prefill's matrix-matrix product dequantizes four weight rows at a
//! time into an L1-resident f32 buffer and dots them with every token of the
//! block (`dot4_f32` loads each activation once for four rows), so a weight
//! byte is read from memory once per block instead of once per token.
//! RMSNorm reuses the f32 dot; RoPE, softmax and SiLU are scalar (they touch
//! O(hidden) values per token against O(hidden²) for the products).
//!
//! int8 × int8: [`Kernels::quantize_i8`] turns an activation row into int8
//! blocks of 32 with an f32 scale, [`Kernels::dot_i8_i8`] dots an int8
//! weight row with it and [`Kernels::dot4x3_i8_i8`] four rows with three
//! tokens at once (the prefill tile; [`Kernels::dot4x1_i8_i8`] for the
//! block's last tokens), summing each block's byte products exactly in i32 and
//! scaling once per block, after llama.cpp's Q8_0 × Q8_0 path
//! ([`x86_int8`] has the SIMD versions and the sign trick they use). Where
//! the CPU has `vpdpbusd`, prefill takes [`Kernels::dot4_grouped_i8_i8`]
//! instead: the block's tokens regrouped eight to a register, one per
//! 32-bit lane ([`scalar::group_tokens_i8`], the one implementation of that
//! layout: it moves bytes once per product input), so each block's
//! conversion and scaling serve eight tokens.
//!
//! On aarch64 every primitive has a NEON version ([`neon`]); the int8
//! products use `sdot` where the CPU has the dot-product extension and
//! `smull` + `sadalp` otherwise.
//!
//! Invariants: no kernel allocates; a SIMD kernel agrees with its scalar
//! reference up to float reassociation (property tests below); every kernel
//! reachable through a safe function pointer asserts its slice contract
//! before it reads, so no input can make it read or write out of bounds
//! (tested with short slices for every kernel of every table).

pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod x86_int8;
#[cfg(target_arch = "aarch64")]
pub mod neon;

use half::f16;

use crate::weights::Matrix;

/// Instruction set the kernels were chosen for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C; int8 products with `vpmaddubsw`.
    Avx2,
    /// As [`Isa::Avx2`], int8 products with AVX-VNNI's `vpdpbusd`.
    Avx2AvxVnni,
    /// As [`Isa::Avx2`], with the f32-activation dots and dequantization on
    /// AVX-512F's 16 lanes.
    Avx512,
    /// As [`Isa::Avx512`], int8 products with AVX-512 VNNI's `vpdpbusd`.
    Avx512Vnni,
    /// aarch64 NEON; int8 products with `smull` + `sadalp`.
    Neon,
    /// aarch64 NEON; int8 products with the dot-product extension's `sdot`.
    NeonDotprod,
}

impl Isa {
    /// Lowercase name, as printed by `nocturne info`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma+f16c",
            Isa::Avx2AvxVnni => "avx2+fma+f16c, int8: avxvnni",
            Isa::Avx512 => "avx512f+avx2+fma+f16c",
            Isa::Avx512Vnni => "avx512f+avx2+fma+f16c, int8: avx512vnni",
            Isa::Neon => "neon",
            Isa::NeonDotprod => "neon, int8: dotprod",
        }
    }
}

/// The vector primitives for one instruction set. Each keeps the slice
/// contract of its [`scalar`] reference ([`scalar::contract`]: equal
/// lengths; int8 rows a multiple of 32 with one scale per block) and panics
/// on a violation before reading anything, in every build.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// Which implementation these are.
    pub isa: Isa,
    /// `Σ values[i] × scales[i/32] × x[i]`.
    pub dot_i8: fn(&[i8], &[f16], &[f32]) -> f32,
    /// `Σ a[i] × b[i]`, `a` in f16.
    pub dot_f16: fn(&[f16], &[f32]) -> f32,
    /// `Σ a[i] × b[i]`.
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    /// Four rows (back to back in the first slice) dotted with one vector.
    pub dot4_f32: fn(&[f32], &[f32]) -> [f32; 4],
    /// Four rows dotted with three vectors (back to back): the prefill tile.
    pub dot4x3_f32: Dot4x3,
    /// `y += alpha × x`, `x` in f16.
    pub axpy_f16: fn(f32, &[f16], &mut [f32]),
    /// `y += alpha × x`.
    pub axpy_f32: fn(f32, &[f32], &mut [f32]),
    /// `out = values × scales` per 32-block.
    pub dequant_i8: fn(&[i8], &[f16], &mut [f32]),
    /// `out = values` widened.
    pub dequant_f16: fn(&[f16], &mut [f32]),
    /// `out = x` narrowed to f16.
    pub to_f16: fn(&[f32], &mut [f16]),
    /// One activation row to int8 blocks: `(x, values, scales)`.
    pub quantize_i8: fn(&[f32], &mut [i8], &mut [f32]),
    /// int8 weight row (f16 block scales) · int8 activation row (f32 block scales).
    pub dot_i8_i8: DotI8I8,
    /// Four int8 weight rows (back to back, f32 block scales back to back) ·
    /// one int8 activation row.
    pub dot4x1_i8_i8: Dot4xTI8I8<1>,
    /// Four int8 weight rows · three int8 activation rows (back to back):
    /// the integer prefill tile.
    pub dot4x3_i8_i8: Dot4xTI8I8<3>,
    /// Four int8 weight rows · groups of eight int8 activation rows laid
    /// out by [`scalar::group_tokens_i8`]: the integer prefill tile where
    /// the CPU has `vpdpbusd` (`None` elsewhere: [`Kernels::dot4x3_i8_i8`]
    /// serves).
    pub dot4_grouped_i8_i8: Option<Dot4Grouped>,
}

/// `(four rows, three activation rows) → out[token][row]` ([`scalar::dot4x3_f32`]).
pub type Dot4x3 = fn(&[f32], &[f32]) -> [[f32; 4]; 3];

/// `(weights, weight scales, x, x scales) → Σ` of one int8 row pair ([`scalar::dot_i8_i8`]).
pub type DotI8I8 = fn(&[i8], &[f16], &[i8], &[f32]) -> f32;

/// `(four weight rows, their scales as f32, T activation rows, their
/// scales) → out[token][row]` ([`scalar::dot4xt_i8_i8`]).
pub type Dot4xTI8I8<const T: usize> = fn(&[i8], &[f32], &[i8], &[f32]) -> [[f32; 4]; T];

/// `(four weight rows, their scales as f32, token groups, their scales,
/// their offsets, out[group][row][token])` ([`scalar::dot4_grouped_i8_i8`]).
pub type Dot4Grouped = fn(&[i8], &[f32], &[i8], &[f32], &[i32], &mut [f32]);

/// Safe functions calling `#[target_feature]` kernels: `name = kernel,
/// (args) -> ret;` each. The invoking module's documentation says why the
/// CPU features are present whenever the wrappers can be reached.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! safe_wrappers {
    ($($name:ident = $kernel:path, ($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {$(
        #[allow(clippy::unused_unit)]
        pub fn $name($($arg: $ty),*) -> $ret {
            // SAFETY: the module's features are present (module doc); lengths are asserted inside.
            unsafe { $kernel($($arg),*) }
        }
    )*};
}

#[cfg(target_arch = "x86_64")]
mod avx2_safe {
    //! Safe entry points to the AVX2 kernels. Each [`super::avx2`] function
    //! asserts its slice contract itself; what it cannot check is the CPU.
    //! These wrappers are reachable only through `Kernels::AVX2`, which
    //! `Kernels::best` hands out only after `is_x86_feature_detected!`
    //! confirmed AVX2, FMA and F16C, so the calls below are sound.
    use super::avx2;
    use half::f16;

    safe_wrappers! {
        dot_i8 = avx2::dot_i8, (v: &[i8], s: &[f16], x: &[f32]) -> f32;
        dot_f16 = avx2::dot_f16, (a: &[f16], b: &[f32]) -> f32;
        dot_f32 = avx2::dot_f32, (a: &[f32], b: &[f32]) -> f32;
        dot4_f32 = avx2::dot4_f32, (rows: &[f32], x: &[f32]) -> [f32; 4];
        dot4x3_f32 = avx2::dot4x3_f32, (rows: &[f32], x: &[f32]) -> [[f32; 4]; 3];
        axpy_f16 = avx2::axpy_f16, (a: f32, x: &[f16], y: &mut [f32]) -> ();
        axpy_f32 = avx2::axpy_f32, (a: f32, x: &[f32], y: &mut [f32]) -> ();
        dequant_i8 = avx2::dequant_i8, (v: &[i8], s: &[f16], o: &mut [f32]) -> ();
        dequant_f16 = avx2::dequant_f16, (v: &[f16], o: &mut [f32]) -> ();
        to_f16 = avx2::to_f16, (x: &[f32], o: &mut [f16]) -> ();
        quantize_i8 = avx2::quantize_i8, (x: &[f32], v: &mut [i8], s: &mut [f32]) -> ();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512_safe {
    //! Safe entry points to the AVX-512F kernels, reachable only through the
    //! tables `Kernels::best` hands out after `is_x86_feature_detected!`
    //! confirmed AVX-512F, AVX2, FMA and F16C.
    use super::avx512;
    use half::f16;

    safe_wrappers! {
        dot_f16 = avx512::dot_f16, (a: &[f16], b: &[f32]) -> f32;
        dot_f32 = avx512::dot_f32, (a: &[f32], b: &[f32]) -> f32;
        dot4_f32 = avx512::dot4_f32, (rows: &[f32], x: &[f32]) -> [f32; 4];
        dot4x3_f32 = avx512::dot4x3_f32, (rows: &[f32], x: &[f32]) -> [[f32; 4]; 3];
        dequant_i8 = avx512::dequant_i8, (v: &[i8], s: &[f16], o: &mut [f32]) -> ();
        dequant_f16 = avx512::dequant_f16, (v: &[f16], o: &mut [f32]) -> ();
    }
}

#[cfg(target_arch = "aarch64")]
mod neon_safe {
    //! Safe entry points to the NEON kernels. NEON is in the baseline of
    //! every aarch64 target this crate builds for (asserted at compile time
    //! below), so calling them is sound; each asserts its slice contract.
    use super::neon;
    use half::f16;

    const _: () = assert!(cfg!(target_feature = "neon"), "the aarch64 kernels need NEON in the build's baseline");

    safe_wrappers! {
        dot_i8 = neon::dot_i8, (v: &[i8], s: &[f16], x: &[f32]) -> f32;
        dot_f16 = neon::dot_f16, (a: &[f16], b: &[f32]) -> f32;
        dot_f32 = neon::dot_f32, (a: &[f32], b: &[f32]) -> f32;
        dot4_f32 = neon::dot4_f32, (rows: &[f32], x: &[f32]) -> [f32; 4];
        dot4x3_f32 = neon::dot4x3_f32, (rows: &[f32], x: &[f32]) -> [[f32; 4]; 3];
        axpy_f16 = neon::axpy_f16, (a: f32, x: &[f16], y: &mut [f32]) -> ();
        axpy_f32 = neon::axpy_f32, (a: f32, x: &[f32], y: &mut [f32]) -> ();
        dequant_i8 = neon::dequant_i8, (v: &[i8], s: &[f16], o: &mut [f32]) -> ();
        dequant_f16 = neon::dequant_f16, (v: &[f16], o: &mut [f32]) -> ();
        to_f16 = neon::to_f16, (x: &[f32], o: &mut [f16]) -> ();
        quantize_i8 = neon::quantize_i8, (x: &[f32], v: &mut [i8], s: &mut [f32]) -> ();
        dot_i8_i8 = neon::widening::dot_i8_i8, (w: &[i8], ws: &[f16], x: &[i8], xs: &[f32]) -> f32;
        dot4x1_i8_i8 = neon::widening::dot4xt_i8_i8::<1>, (w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> [[f32; 4]; 1];
        dot4x3_i8_i8 = neon::widening::dot4xt_i8_i8::<3>, (w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> [[f32; 4]; 3];
    }
}

#[cfg(target_arch = "aarch64")]
mod dotprod_safe {
    //! Safe entry points to the `sdot` kernels, reachable only through the
    //! table `Kernels::best` builds after `is_aarch64_feature_detected!`
    //! confirmed the dot-product extension, so the calls below are sound
    //! (lengths are asserted inside).
    use super::neon::dotprod;
    use half::f16;

    safe_wrappers! {
        dot_i8_i8 = dotprod::dot_i8_i8, (w: &[i8], ws: &[f16], x: &[i8], xs: &[f32]) -> f32;
        dot4x1_i8_i8 = dotprod::dot4xt_i8_i8::<1>, (w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> [[f32; 4]; 1];
        dot4x3_i8_i8 = dotprod::dot4xt_i8_i8::<3>, (w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> [[f32; 4]; 3];
    }
}

impl Kernels {
    /// The scalar reference kernels.
    pub const SCALAR: Kernels = Kernels {
        isa: Isa::Scalar,
        dot_i8: scalar::dot_i8,
        dot_f16: scalar::dot_f16,
        dot_f32: scalar::dot_f32,
        dot4_f32: scalar::dot4_f32,
        dot4x3_f32: scalar::dot4x3_f32,
        axpy_f16: scalar::axpy_f16,
        axpy_f32: scalar::axpy_f32,
        dequant_i8: scalar::dequant_i8,
        dequant_f16: scalar::dequant_f16,
        to_f16: scalar::to_f16,
        quantize_i8: scalar::quantize_i8,
        dot_i8_i8: scalar::dot_i8_i8,
        dot4x1_i8_i8: scalar::dot4xt_i8_i8::<1>,
        dot4x3_i8_i8: scalar::dot4xt_i8_i8::<3>,
        dot4_grouped_i8_i8: Some(scalar::dot4_grouped_i8_i8),
    };

    #[cfg(target_arch = "x86_64")]
    const AVX2: Kernels = Kernels {
        isa: Isa::Avx2,
        dot_i8: avx2_safe::dot_i8,
        dot_f16: avx2_safe::dot_f16,
        dot_f32: avx2_safe::dot_f32,
        dot4_f32: avx2_safe::dot4_f32,
        dot4x3_f32: avx2_safe::dot4x3_f32,
        axpy_f16: avx2_safe::axpy_f16,
        axpy_f32: avx2_safe::axpy_f32,
        dequant_i8: avx2_safe::dequant_i8,
        dequant_f16: avx2_safe::dequant_f16,
        to_f16: avx2_safe::to_f16,
        quantize_i8: avx2_safe::quantize_i8,
        dot_i8_i8: x86_int8::avx2::safe::dot_i8_i8,
        dot4x1_i8_i8: x86_int8::avx2::safe::dot4xt_i8_i8::<1>,
        dot4x3_i8_i8: x86_int8::avx2::safe::dot4xt_i8_i8::<3>,
        dot4_grouped_i8_i8: None,
    };

    /// The fastest kernels this CPU supports. `NOCTURNE_KERNELS=scalar` in the
    /// environment forces the scalar reference (for comparisons).
    pub fn detect() -> Kernels {
        if std::env::var_os("NOCTURNE_KERNELS").is_some_and(|v| v == "scalar") {
            return Kernels::SCALAR;
        }
        Self::best()
    }

    #[cfg(target_arch = "x86_64")]
    const AVX2_AVXVNNI: Kernels = Kernels {
        isa: Isa::Avx2AvxVnni,
        dot_i8_i8: x86_int8::avxvnni::safe::dot_i8_i8,
        dot4x1_i8_i8: x86_int8::avxvnni::safe::dot4xt_i8_i8::<1>,
        dot4x3_i8_i8: x86_int8::avxvnni::safe::dot4xt_i8_i8::<3>,
        dot4_grouped_i8_i8: Some(x86_int8::avxvnni::safe_grouped::dot4_grouped_i8_i8),
        ..Kernels::AVX2
    };

    #[cfg(target_arch = "x86_64")]
    const AVX512: Kernels = Kernels {
        isa: Isa::Avx512,
        dot_f16: avx512_safe::dot_f16,
        dot_f32: avx512_safe::dot_f32,
        dot4_f32: avx512_safe::dot4_f32,
        dot4x3_f32: avx512_safe::dot4x3_f32,
        dequant_i8: avx512_safe::dequant_i8,
        dequant_f16: avx512_safe::dequant_f16,
        ..Kernels::AVX2
    };

    #[cfg(target_arch = "x86_64")]
    const AVX512_VNNI: Kernels = Kernels {
        isa: Isa::Avx512Vnni,
        dot_i8_i8: x86_int8::avx512vnni::safe::dot_i8_i8,
        dot4x1_i8_i8: x86_int8::avx512vnni::safe::dot4xt_i8_i8::<1>,
        dot4x3_i8_i8: x86_int8::avx512vnni::safe::dot4xt_i8_i8::<3>,
        dot4_grouped_i8_i8: Some(x86_int8::avx512vnni::safe_grouped::dot4_grouped_i8_i8),
        ..Kernels::AVX512
    };

    /// On x86-64: AVX2 + FMA + F16C at least; AVX-512F's 16 lanes for the
    /// f32-activation dots where the CPU has them; the best int8 product
    /// (AVX-512 VNNI with VL, then AVX-VNNI, then AVX2 alone).
    #[cfg(target_arch = "x86_64")]
    fn best() -> Kernels {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")) {
            return Kernels::SCALAR;
        }
        let avx512 = is_x86_feature_detected!("avx512f");
        if avx512 && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
            Kernels::AVX512_VNNI
        } else if avx512 {
            Kernels::AVX512
        } else if is_x86_feature_detected!("avxvnni") {
            Kernels::AVX2_AVXVNNI
        } else {
            Kernels::AVX2
        }
    }

    /// The NEON kernels (every aarch64 core has NEON), with `sdot` for the
    /// int8 products where the CPU has the dot-product extension.
    #[cfg(target_arch = "aarch64")]
    const NEON: Kernels = Kernels {
        isa: Isa::Neon,
        dot_i8: neon_safe::dot_i8,
        dot_f16: neon_safe::dot_f16,
        dot_f32: neon_safe::dot_f32,
        dot4_f32: neon_safe::dot4_f32,
        dot4x3_f32: neon_safe::dot4x3_f32,
        axpy_f16: neon_safe::axpy_f16,
        axpy_f32: neon_safe::axpy_f32,
        dequant_i8: neon_safe::dequant_i8,
        dequant_f16: neon_safe::dequant_f16,
        to_f16: neon_safe::to_f16,
        quantize_i8: neon_safe::quantize_i8,
        dot_i8_i8: neon_safe::dot_i8_i8,
        dot4x1_i8_i8: neon_safe::dot4x1_i8_i8,
        dot4x3_i8_i8: neon_safe::dot4x3_i8_i8,
        dot4_grouped_i8_i8: None,
    };

    #[cfg(target_arch = "aarch64")]
    fn best() -> Kernels {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            Kernels {
                isa: Isa::NeonDotprod,
                dot_i8_i8: dotprod_safe::dot_i8_i8,
                dot4x1_i8_i8: dotprod_safe::dot4x1_i8_i8,
                dot4x3_i8_i8: dotprod_safe::dot4x3_i8_i8,
                ..Kernels::NEON
            }
        } else {
            Kernels::NEON
        }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn best() -> Kernels {
        Kernels::SCALAR
    }

    /// Dot product of row `row` of `m` with `x` (`x.len() == cols`; panics otherwise).
    #[inline]
    pub fn row_dot(&self, m: &Matrix<'_>, row: usize, x: &[f32]) -> f32 {
        match *m {
            Matrix::Int8 { cols, values, scales, .. } => {
                let blocks = cols / crate::config::INT8_BLOCK;
                (self.dot_i8)(&values[row * cols..(row + 1) * cols], &scales[row * blocks..(row + 1) * blocks], x)
            }
            Matrix::F16 { cols, values, .. } => (self.dot_f16)(&values[row * cols..(row + 1) * cols], x),
        }
    }

    /// Dot product of row `row` of an int8 `m` with an int8 activation row
    /// (`x.len() == cols`, one scale per 32-block; panics otherwise), or
    /// `None` when `m` is not int8.
    #[inline]
    pub fn row_dot_i8(&self, m: &Matrix<'_>, row: usize, x: &[i8], x_scales: &[f32]) -> Option<f32> {
        match *m {
            Matrix::Int8 { cols, values, scales, .. } => {
                let blocks = cols / crate::config::INT8_BLOCK;
                Some((self.dot_i8_i8)(&values[row * cols..(row + 1) * cols], &scales[row * blocks..(row + 1) * blocks], x, x_scales))
            }
            Matrix::F16 { .. } => None,
        }
    }

    /// Row `row` of `m` as f32 into `out` (`out.len() == cols`; panics otherwise).
    #[inline]
    pub fn dequant_row(&self, m: &Matrix<'_>, row: usize, out: &mut [f32]) {
        match *m {
            Matrix::Int8 { cols, values, scales, .. } => {
                let blocks = cols / crate::config::INT8_BLOCK;
                (self.dequant_i8)(&values[row * cols..(row + 1) * cols], &scales[row * blocks..(row + 1) * blocks], out)
            }
            Matrix::F16 { cols, values, .. } => (self.dequant_f16)(&values[row * cols..(row + 1) * cols], out),
        }
    }
}

/// RMSNorm (Zhang & Sennrich, 2019): `out = x / sqrt(mean(x²) + eps) × weight`.
pub fn rms_norm(k: &Kernels, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = (k.dot_f32)(x, x) / x.len() as f32;
    let inv = 1.0 / (mean_square + eps).sqrt();
    out.iter_mut().zip(x.iter().zip(weight)).for_each(|(o, (x, w))| *o = x * inv * w);
}

/// Precomputed rotary-embedding angles (Su et al., RoFormer, 2021) for
/// positions `0..positions` of heads of dimension `head_dim`:
/// `θ(p, i) = p × base^(−2i / head_dim)`, `i < head_dim / 2`.
pub struct RopeTable {
    half: usize,
    /// `[positions × head_dim/2]` cosines, then sines.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Builds the table (`positions × head_dim / 2` cosines and as many
    /// sines, f32; the memory plan's `rope_table`).
    pub fn new(positions: usize, head_dim: usize, base: f32) -> RopeTable {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for i in 0..half {
                let inv_freq = (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
                let angle = p as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Bytes this table allocated.
    pub fn allocated(&self) -> usize {
        (self.cos.capacity() + self.sin.capacity()) * std::mem::size_of::<f32>()
    }
}

/// Rotates every head of `x` (`[heads × head_dim]`) to position `pos`, in
/// Hugging Face's half-split layout: element `i` pairs with `i + head_dim/2`.
pub fn rope(x: &mut [f32], head_dim: usize, pos: usize, table: &RopeTable) {
    let half = table.half;
    let (cos, sin) = (&table.cos[pos * half..(pos + 1) * half], &table.sin[pos * half..(pos + 1) * half]);
    for head in x.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x1 * cos[i] + x0 * sin[i];
        }
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// SwiGLU's gating (Shazeer, 2020): `gate[i] = silu(gate[i]) × up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gate.iter_mut().zip(up).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f32, b: f32, scale: f32) -> bool {
        (a - b).abs() <= 1e-5 * scale.max(1.0)
    }

    fn halves(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    fn vecs(max: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        (0..max).prop_flat_map(|n| (prop::collection::vec(-4.0f32..4.0, n), prop::collection::vec(-4.0f32..4.0, n)))
    }

    fn blocks(max_blocks: usize) -> impl Strategy<Value = (Vec<i8>, Vec<f16>, Vec<f32>)> {
        (1..=max_blocks).prop_flat_map(|b| {
            (
                prop::collection::vec(-127i8..=127, b * 32),
                prop::collection::vec((0.0f32..0.1).prop_map(f16::from_f32), b),
                prop::collection::vec(-4.0f32..4.0, b * 32),
            )
        })
    }

    fn best() -> Kernels {
        let k = Kernels::best();
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            assert_ne!(k.isa, Isa::Scalar, "AVX2 CPU must get the AVX2 kernels");
        }
        #[cfg(target_arch = "aarch64")]
        {
            let dotprod = std::arch::is_aarch64_feature_detected!("dotprod");
            assert_eq!(k.isa, if dotprod { Isa::NeonDotprod } else { Isa::Neon }, "aarch64 must get the NEON kernels");
        }
        k
    }

    /// Every table this CPU can run (the best one and each fallback below
    /// it), so the fallbacks are tested on a CPU that would never pick them.
    fn tables() -> Vec<Kernels> {
        #[allow(unused_mut)]
        let mut tables = vec![Kernels::SCALAR, best()];
        #[cfg(target_arch = "x86_64")]
        if best().isa != Isa::Scalar {
            tables.push(Kernels::AVX2);
            if is_x86_feature_detected!("avxvnni") {
                tables.push(Kernels::AVX2_AVXVNNI);
            }
            if is_x86_feature_detected!("avx512f") {
                tables.push(Kernels::AVX512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        tables.push(Kernels::NEON);
        tables
    }

    /// An int8 activation row as the decoder makes it: quantized f32.
    fn activations(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
        let (mut v, mut s) = (vec![0; x.len()], vec![0.0; x.len() / 32]);
        scalar::quantize_i8(x, &mut v, &mut s);
        (v, s)
    }

    fn int8_rows(rows: usize, max_blocks: usize) -> impl Strategy<Value = (Vec<i8>, Vec<f16>, Vec<f32>)> {
        (1..=max_blocks).prop_flat_map(move |b| {
            (
                prop::collection::vec(any::<i8>(), rows * b * 32),
                prop::collection::vec((0.0f32..0.1).prop_map(f16::from_f32), rows * b),
                prop::collection::vec(-4.0f32..4.0, b * 32),
            )
        })
    }

    proptest! {
        #[test]
        fn dot_i8_matches_scalar((q, s, x) in blocks(40)) {
            let scale: f32 = q.iter().zip(&x).map(|(q, x)| (f32::from(*q) * x * 0.1).abs()).sum();
            for k in tables() {
                prop_assert!(close((k.dot_i8)(&q, &s, &x), scalar::dot_i8(&q, &s, &x), scale), "{}", k.isa.name());
            }
        }

        #[test]
        fn quantize_i8_matches_scalar_exactly((_q, _s, x) in blocks(40), zero_block in any::<bool>()) {
            let mut x = x;
            if zero_block { x[..32].fill(0.0); }
            let (want_v, want_s) = activations(&x);
            for k in tables() {
                let (mut v, mut s) = (vec![0; x.len()], vec![0.0; x.len() / 32]);
                (k.quantize_i8)(&x, &mut v, &mut s);
                prop_assert_eq!(&v, &want_v, "{}", k.isa.name());
                prop_assert_eq!(&s, &want_s, "{}", k.isa.name());
            }
            // Within half a step of the input.
            for (i, (v, x)) in want_v.iter().zip(&x).enumerate() {
                prop_assert!((f32::from(*v) * want_s[i / 32] - x).abs() <= want_s[i / 32] * 0.5 + 1e-6);
            }
        }

        #[test]
        fn dot_i8_i8_matches_scalar((w, ws, x) in int8_rows(1, 41)) {
            let (xq, xs) = activations(&x);
            let want = scalar::dot_i8_i8(&w, &ws, &xq, &xs);
            let scale: f32 = w.iter().zip(&x).map(|(w, x)| (f32::from(*w) * x * 0.1).abs()).sum();
            for k in tables() {
                prop_assert!(close((k.dot_i8_i8)(&w, &ws, &xq, &xs), want, scale), "{}", k.isa.name());
            }
        }

        #[test]
        fn dot4xt_i8_i8_match_scalar((w, ws, x) in int8_rows(4, 41), x_more in prop::collection::vec(-4.0f32..4.0, 2 * 41 * 32)) {
            // Three tokens: x, then two more rows of its width.
            let n = x.len();
            let tokens: Vec<f32> = x.iter().chain(&x_more[..2 * n]).copied().collect();
            let (xq, xs) = activations(&tokens);
            let ws: Vec<f32> = ws.iter().map(|s| s.to_f32()).collect();
            let want = scalar::dot4xt_i8_i8::<3>(&w, &ws, &xq, &xs);
            // Each (row, token) equals the single-row kernel on it, and the
            // one-token tile equals the first token of the three-token one.
            let blocks = n / 32;
            let halves: Vec<f16> = ws.iter().map(|&s| f16::from_f32(s)).collect();
            for (t, want) in want.iter().enumerate() {
                let (xq, xs) = (&xq[t * n..(t + 1) * n], &xs[t * blocks..(t + 1) * blocks]);
                for (r, want) in want.iter().enumerate() {
                    let one = scalar::dot_i8_i8(&w[r * n..(r + 1) * n], &halves[r * blocks..(r + 1) * blocks], xq, xs);
                    prop_assert!(close(one, *want, 1.0));
                }
            }
            prop_assert_eq!(scalar::dot4xt_i8_i8::<1>(&w, &ws, &xq[..n], &xs[..blocks])[0], want[0]);
            let scale: f32 = w.iter().map(|w| f32::from(*w).abs() * 4.0 * 0.1).sum();
            for k in tables() {
                let got = (k.dot4x3_i8_i8)(&w, &ws, &xq, &xs);
                let first = (k.dot4x1_i8_i8)(&w, &ws, &xq[..n], &xs[..blocks]);
                for t in 0..3 {
                    for r in 0..4 { prop_assert!(close(got[t][r], want[t][r], scale), "{}", k.isa.name()); }
                }
                for r in 0..4 { prop_assert!(close(first[0][r], want[0][r], scale), "{}", k.isa.name()); }
            }
        }

        #[test]
        fn dot4_grouped_i8_i8_matches_the_row_by_row_tile(
            (w, ws, x) in int8_rows(4, 41), x_more in prop::collection::vec(-4.0f32..4.0, 40 * 41 * 32), tokens in 1usize..=41,
        ) {
            // `tokens` rows of x's width (six groups at most, the last one
            // partial unless `tokens` is a multiple of eight), grouped.
            let cols = x.len();
            let rows: Vec<f32> = x.iter().chain(&x_more[..(tokens - 1) * cols]).copied().collect();
            let (xq, xs) = activations(&rows);
            let (blocks, groups) = (cols / 32, tokens.div_ceil(8));
            let (mut xg, mut xgs, mut xgo) = (vec![0i8; groups * 8 * cols], vec![0.0f32; groups * 8 * blocks], vec![0i32; groups * 8 * blocks]);
            scalar::group_tokens_i8(cols, &xq, &xs, &mut xg, &mut xgs, &mut xgo);
            let ws: Vec<f32> = ws.iter().map(|s| s.to_f32()).collect();
            // The reference, token by token, equals the one-token tile; padding gives exact zeros.
            let mut want = vec![f32::NAN; groups * 32];
            scalar::dot4_grouped_i8_i8(&w, &ws, &xg, &xgs, &xgo, &mut want);
            for (i, want) in want.iter().enumerate() {
                let (g, r, t) = (i / 32, i / 8 % 4, i % 8);
                let token = g * 8 + t;
                if token < tokens {
                    let one = scalar::dot4xt_i8_i8::<1>(&w, &ws, &xq[token * cols..(token + 1) * cols], &xs[token * blocks..(token + 1) * blocks]);
                    prop_assert!(close(*want, one[0][r], 1.0), "row {} token {}", r, token);
                } else {
                    prop_assert_eq!(*want, 0.0, "padding token {} of row {}", token, r);
                }
            }
            let scale: f32 = w.iter().map(|w| f32::from(*w).abs() * 4.0 * 0.1).sum();
            for k in tables() {
                if let Some(grouped) = k.dot4_grouped_i8_i8 {
                    let mut got = vec![f32::NAN; groups * 32];
                    grouped(&w, &ws, &xg, &xgs, &xgo, &mut got);
                    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                        prop_assert!(close(*got, *want, scale), "{} output {}", k.isa.name(), i);
                    }
                }
            }
        }

        #[test]
        fn dequant_i8_matches_scalar((q, s, _x) in blocks(20)) {
            let mut want = vec![0.0; q.len()];
            scalar::dequant_i8(&q, &s, &mut want);
            for k in tables() {
                let mut got = vec![0.0; q.len()];
                (k.dequant_i8)(&q, &s, &mut got);
                prop_assert_eq!(&got, &want, "{}", k.isa.name());
            }
        }

        #[test]
        fn dot_f16_and_f32_match_scalar((a, b) in vecs(300)) {
            let scale: f32 = a.iter().zip(&b).map(|(a, b)| (a * b).abs()).sum();
            let ah = halves(&a);
            for k in tables() {
                prop_assert!(close((k.dot_f16)(&ah, &b), scalar::dot_f16(&ah, &b), scale), "{}", k.isa.name());
                prop_assert!(close((k.dot_f32)(&a, &b), scalar::dot_f32(&a, &b), scale), "{}", k.isa.name());
            }
        }

        #[test]
        fn dot4_matches_scalar((rows, x) in (0usize..200).prop_flat_map(|n| (
            prop::collection::vec(-4.0f32..4.0, 4 * n), prop::collection::vec(-4.0f32..4.0, n)))) {
            let scale: f32 = rows.iter().map(|r| r.abs() * 4.0).sum();
            let want = scalar::dot4_f32(&rows, &x);
            for k in tables() {
                let got = (k.dot4_f32)(&rows, &x);
                for r in 0..4 { prop_assert!(close(got[r], want[r], scale), "{}", k.isa.name()); }
            }
        }

        #[test]
        fn dot4x3_matches_scalar((rows, x) in (0usize..200).prop_flat_map(|n| (
            prop::collection::vec(-4.0f32..4.0, 4 * n), prop::collection::vec(-4.0f32..4.0, 3 * n)))) {
            let n = rows.len() / 4;
            let want = scalar::dot4x3_f32(&rows, &x);
            // The reference is three four-row dots.
            for t in 0..3 {
                prop_assert_eq!(want[t], scalar::dot4_f32(&rows, &x[t * n..(t + 1) * n]));
            }
            let scale: f32 = rows.iter().map(|r| r.abs() * 4.0).sum();
            for k in tables() {
                let got = (k.dot4x3_f32)(&rows, &x);
                for t in 0..3 {
                    for r in 0..4 { prop_assert!(close(got[t][r], want[t][r], scale), "{}", k.isa.name()); }
                }
            }
        }

        #[test]
        fn axpy_matches_scalar((x, y) in vecs(300), alpha in -2.0f32..2.0) {
            let xh = halves(&x);
            for k in tables() {
                let (mut a, mut b) = (y.clone(), y.clone());
                (k.axpy_f16)(alpha, &xh, &mut a);
                scalar::axpy_f16(alpha, &xh, &mut b);
                for (a, b) in a.iter().zip(&b) { prop_assert!(close(*a, *b, 8.0), "{}", k.isa.name()); }
                let (mut a, mut b) = (y.clone(), y.clone());
                (k.axpy_f32)(alpha, &x, &mut a);
                scalar::axpy_f32(alpha, &x, &mut b);
                for (a, b) in a.iter().zip(&b) { prop_assert!(close(*a, *b, 8.0), "{}", k.isa.name()); }
            }
        }

        #[test]
        fn f16_conversions_match_scalar((x, _) in vecs(300)) {
            let mut halves = vec![f16::ZERO; x.len()];
            scalar::to_f16(&x, &mut halves);
            let mut widened = vec![0.0; x.len()];
            scalar::dequant_f16(&halves, &mut widened);
            for k in tables() {
                let mut a = vec![f16::ZERO; x.len()];
                (k.to_f16)(&x, &mut a);
                prop_assert_eq!(&a, &halves, "{}", k.isa.name());
                let mut c = vec![0.0; x.len()];
                (k.dequant_f16)(&halves, &mut c);
                prop_assert_eq!(&c, &widened, "{}", k.isa.name());
            }
        }
    }

    /// Every kernel of `k`, called with slices one element (or one block)
    /// short in each position, must panic rather than read past them.
    fn assert_contracts_panic(k: Kernels) {
        use std::panic::{catch_unwind, AssertUnwindSafe};
        type Case = (&'static str, Box<dyn Fn()>);
        let cases: Vec<Case> = vec![
            ("dot_i8 short x", Box::new(move || { let _ = (k.dot_i8)(&[1; 64], &[f16::ONE; 2], &[1.0; 63]); })),
            ("dot_i8 short scales", Box::new(move || { let _ = (k.dot_i8)(&[1; 64], &[f16::ONE; 1], &[1.0; 64]); })),
            ("dot_i8 partial block", Box::new(move || { let _ = (k.dot_i8)(&[1; 40], &[f16::ONE; 2], &[1.0; 40]); })),
            ("dot_f16 short", Box::new(move || { let _ = (k.dot_f16)(&[f16::ONE; 17], &[1.0; 16]); })),
            ("dot_f32 short", Box::new(move || { let _ = (k.dot_f32)(&[1.0; 16], &[1.0; 17]); })),
            ("dot4_f32 short rows", Box::new(move || { let _ = (k.dot4_f32)(&[1.0; 63], &[1.0; 16]); })),
            ("dot4x3_f32 short x", Box::new(move || { let _ = (k.dot4x3_f32)(&[1.0; 64], &[1.0; 47]); })),
            ("dot4x3_f32 two tokens", Box::new(move || { let _ = (k.dot4x3_f32)(&[1.0; 64], &[1.0; 32]); })),
            ("axpy_f16 short y", Box::new(move || (k.axpy_f16)(1.0, &[f16::ONE; 16], &mut [0.0; 15]))),
            ("axpy_f32 short x", Box::new(move || (k.axpy_f32)(1.0, &[1.0; 15], &mut [0.0; 16]))),
            ("dequant_i8 short out", Box::new(move || (k.dequant_i8)(&[1; 64], &[f16::ONE; 2], &mut [0.0; 32]))),
            ("dequant_i8 short scales", Box::new(move || (k.dequant_i8)(&[1; 64], &[f16::ONE; 1], &mut [0.0; 64]))),
            ("dequant_f16 short out", Box::new(move || (k.dequant_f16)(&[f16::ONE; 16], &mut [0.0; 8]))),
            ("to_f16 short out", Box::new(move || (k.to_f16)(&[1.0; 16], &mut [f16::ZERO; 9]))),
            ("quantize_i8 short values", Box::new(move || (k.quantize_i8)(&[1.0; 64], &mut [0; 32], &mut [0.0; 2]))),
            ("quantize_i8 short scales", Box::new(move || (k.quantize_i8)(&[1.0; 64], &mut [0; 64], &mut [0.0; 1]))),
            ("dot_i8_i8 short x", Box::new(move || { let _ = (k.dot_i8_i8)(&[1; 64], &[f16::ONE; 2], &[1; 32], &[1.0; 2]); })),
            ("dot_i8_i8 short x scales", Box::new(move || { let _ = (k.dot_i8_i8)(&[1; 64], &[f16::ONE; 2], &[1; 64], &[1.0; 1]); })),
            ("dot_i8_i8 partial block", Box::new(move || { let _ = (k.dot_i8_i8)(&[1; 40], &[f16::ONE; 2], &[1; 40], &[1.0; 2]); })),
            ("dot4x1_i8_i8 three rows", Box::new(move || { let _ = (k.dot4x1_i8_i8)(&[1; 96], &[1.0; 3], &[1; 32], &[1.0; 1]); })),
            ("dot4x1_i8_i8 short scales", Box::new(move || { let _ = (k.dot4x1_i8_i8)(&[1; 128], &[1.0; 3], &[1; 32], &[1.0; 1]); })),
            ("dot4x3_i8_i8 two tokens", Box::new(move || { let _ = (k.dot4x3_i8_i8)(&[1; 128], &[1.0; 4], &[1; 64], &[1.0; 2]); })),
            ("dot4x3_i8_i8 short x scales", Box::new(move || { let _ = (k.dot4x3_i8_i8)(&[1; 128], &[1.0; 4], &[1; 96], &[1.0; 2]); })),
            ("dot4x3_i8_i8 partial block", Box::new(move || { let _ = (k.dot4x3_i8_i8)(&[1; 160], &[1.0; 8], &[1; 120], &[1.0; 6]); })),
        ];
        let mut cases = cases;
        if let Some(grouped) = k.dot4_grouped_i8_i8 {
            // One group of width 32 is (128, 4, 256, 8, 8, 32) long.
            let grouped_cases: [Case; 6] = [
                ("dot4_grouped_i8_i8 seven tokens", Box::new(move || grouped(&[1; 128], &[1.0; 4], &[1; 224], &[1.0; 7], &[0; 7], &mut [0.0; 32]))),
                ("dot4_grouped_i8_i8 short offsets", Box::new(move || grouped(&[1; 128], &[1.0; 4], &[1; 256], &[1.0; 8], &[0; 7], &mut [0.0; 32]))),
                ("dot4_grouped_i8_i8 short weight scales", Box::new(move || grouped(&[1; 128], &[1.0; 3], &[1; 256], &[1.0; 8], &[0; 8], &mut [0.0; 32]))),
                ("dot4_grouped_i8_i8 partial block", Box::new(move || grouped(&[1; 160], &[1.0; 4], &[1; 320], &[1.0; 8], &[0; 8], &mut [0.0; 32]))),
                ("dot4_grouped_i8_i8 short out", Box::new(move || grouped(&[1; 128], &[1.0; 4], &[1; 256], &[1.0; 8], &[0; 8], &mut [0.0; 31]))),
                ("dot4_grouped_i8_i8 no columns", Box::new(move || grouped(&[], &[], &[], &[], &[], &mut [0.0; 32]))),
            ];
            cases.extend(grouped_cases);
        }
        for (name, call) in cases {
            let outcome = catch_unwind(AssertUnwindSafe(&call));
            assert!(outcome.is_err(), "{} kernels: {name} did not panic", k.isa.name());
        }
    }

    #[test]
    fn every_kernel_panics_on_slices_that_break_its_contract() {
        for k in tables() {
            assert_contracts_panic(k);
        }
    }

    #[test]
    fn rope_rotates_half_split_pairs() {
        let table = RopeTable::new(4, 4, 10_000.0);
        let mut x = [1.0, 0.0, 0.0, 1.0];
        rope(&mut x, 4, 0, &table);
        assert_eq!(x, [1.0, 0.0, 0.0, 1.0]);
        rope(&mut x, 4, 1, &table);
        // Pair (x0, x2) rotates by 1 radian, pair (x1, x3) by 1/100.
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        assert!((x[1] + 0.01f32.sin()).abs() < 1e-6 && (x[3] - 0.01f32.cos()).abs() < 1e-6);
    }

    #[test]
    fn softmax_and_rms_norm() {
        let mut x = [1.0, 2.0, 3.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6 && x[2] > x[1]);
        let mut out = [0.0; 2];
        rms_norm(&Kernels::SCALAR, &[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6 && (out[1] - 8.0 / rms).abs() < 1e-6);
    }
}
