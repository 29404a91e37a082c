//! The encoder's transcendental functions in a form the compiler vectorises: `exp` (softmax) and
//! GELU's `erf`, to about 1e-7, instead of one libm call per value (GELU over the ViT-T MLP
//! took 8 of the encoder's 53 ms at 1 thread, the softmax exponentials about 5).
//!
//! glmae-core's reference keeps libm's functions; the difference is within f32 rounding of the
//! activations (the tests below bound it, the agreement tests bound the whole pass).

use super::kernels::F32Kernels;

/// `e^x`, relative error under 2e-7 on `[-87, 88]` (Cephes' `expf` polynomial); inputs below
/// -87.3 give about 1e-38 instead of underflowing further.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts so that `k * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer (ties to even) and leaves it in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let kf = x * LOG2E + ROUND;
    let k = kf.to_bits() as i32 - ROUND.to_bits() as i32;
    let kf = kf - ROUND;
    let r = x - kf * LN2_HI - kf * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((k + 127) as u32) << 23)
}

/// GELU (`0.5 x (1 + erf(x / sqrt 2))`, the exact form, not the tanh one), with Abramowitz and
/// Stegun's erf 7.1.26 (absolute error 1.5e-7, so GELU's is under 2e-7 x max(1, |x|)).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly =
        t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * exp(-z * z);
    let erf = if x < 0.0 { -erf_abs } else { erf_abs };
    0.5 * x * (1.0 + erf)
}

/// GELU over a slice, on `kernels` (the AVX2 copy is the portable loop compiled for AVX2: the
/// same operations, so the same values).
pub fn gelu_in_place(kernels: F32Kernels, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernels.avx2() {
        // SAFETY: an `F32Kernels` that runs the AVX2 code exists only where the CPU has AVX2 and FMA.
        unsafe { avx2::gelu_in_place(x) };
        return;
    }
    // Elsewhere the portable loop, which the target's own vectors run (NEON on aarch64).
    let _ = kernels;
    gelu_loop(x)
}

/// Softmax over a slice, shifted by its maximum so large logits cannot overflow.
pub fn softmax_in_place(kernels: F32Kernels, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernels.avx2() {
        // SAFETY: an `F32Kernels` that runs the AVX2 code exists only where the CPU has AVX2 and FMA.
        unsafe { avx2::softmax_in_place(x) };
        return;
    }
    let _ = kernels;
    softmax_loop(x)
}

#[inline(always)]
fn gelu_loop(x: &mut [f32]) {
    for v in x {
        *v = gelu(*v);
    }
}

#[inline(always)]
fn softmax_loop(x: &mut [f32]) {
    // Eight running maxima and sums: a single one would chain every value to the last.
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (mi, &v) in m.iter_mut().zip(c) {
            *mi = if v > *mi { v } else { *mi };
        }
    }
    let max = chunks.remainder().iter().chain(&m).fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let mut s = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (si, &v) in s.iter_mut().zip(c) {
            *si += v;
        }
    }
    let inv = 1.0 / (s.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>());
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    /// [`super::gelu_loop`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_in_place(x: &mut [f32]) {
        super::gelu_loop(x)
    }

    /// [`super::softmax_loop`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_in_place(x: &mut [f32]) {
        super::softmax_loop(x)
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::for_each_f32_kernels;
    use super::*;

    /// Relative error of `exp` against f64 over the range the softmax uses (and beyond).
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "exp: relative error {worst:e}");
    }

    /// The elementwise kernels' conformance tests for one kernel set (`$kernels`, an
    /// `Option<F32Kernels>`: `None` where this CPU lacks it), in module `$name`.
    macro_rules! math_conformance {
        ($name:ident, $kernels:expr) => {
            mod $name {
                use super::*;

                #[test]
                fn gelu_matches_exact_erf() {
                    if let Some(k) = $kernels {
                        gelu_matches_exact_erf_on(k);
                    }
                }

                #[test]
                fn softmax_matches_reference() {
                    if let Some(k) = $kernels {
                        softmax_matches_reference_on(k);
                    }
                }
            }
        };
    }

    for_each_f32_kernels!(math_conformance);

    /// GELU against f64's exact erf, on `kernels` and on the portable loop: absolute error under
    /// 2e-7 x max(1, |x|) (erf's 1.5e-7, halved, times |x|). The reference's own f32
    /// `0.5 x (1 + erff)` is off by up to 1e-7 x |x| where `erff` nears -1.
    fn gelu_matches_exact_erf_on(kernels: F32Kernels) {
        let xs: Vec<f32> = (0..=40_000).map(|i| -10.0 + 20.0 * i as f32 / 40_000.0).collect();
        let mut fast = xs.clone();
        gelu_in_place(kernels, &mut fast);
        let mut portable = xs.clone();
        gelu_loop(&mut portable);
        let mut worst = 0.0f64;
        for ((&x, &f), &p) in xs.iter().zip(&fast).zip(&portable) {
            let x64 = x as f64;
            let want = 0.5 * x64 * (1.0 + libm::erf(x64 / std::f64::consts::SQRT_2));
            for got in [f, p] {
                let err = (got as f64 - want).abs() / x64.abs().max(1.0);
                worst = worst.max(err);
                assert!(err < 2e-7, "{kernels:?} gelu({x}) = {got}, exact {want}");
            }
        }
        println!("{kernels:?} gelu: error up to {worst:.1e} x max(1, |x|)");
    }

    /// Softmax sums to one, keeps order, survives large logits, and matches the reference's.
    fn softmax_matches_reference_on(kernels: F32Kernels) {
        let mut x: Vec<f32> = (0..219).map(|i| ((i * 37) % 101) as f32 * 0.37 - 10.0).collect();
        x[5] = 1000.0;
        let mut want = x.clone();
        glmae_core::kernels::softmax_in_place(&mut want);
        softmax_in_place(kernels, &mut x);
        for (a, b) in x.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.max(1e-30) + 1e-37, "{kernels:?}: {a} vs {b}");
        }
        let sum: f32 = x.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }
}
