//! Winograd in f32: the transformed weights ([`WinogradWeights`], either variant), the products
//! on the GEMM micro-kernel, and the convolution ([`conv_winograd`]); and its bf16 form
//! ([`conv_winograd_bf16`]): the same transforms in f32, the transformed inputs and weights
//! rounded to bf16 for the products, accumulated in f32.

use super::super::bf16::{Bf16, Bf16Tile, PackedBf16};
use super::super::conv::{NormStats, Vol};
use super::super::gemm::{Batch, NR, PackedB};
use super::super::kernels::{Bf16Kernels, F32Kernels};
use super::blocks::{Scratch, for_each_block, out_geometry};
use super::transforms::{F2, F4, Points, input_transform, output_transform};
use super::{TransformedKernels, Variant, padded_bias};

/// A 3x3x3 convolution's weights transformed for Winograd: one packed `(in_ch, out_ch)` matrix
/// per position of the transformed tile.
#[derive(Clone, Debug)]
pub struct WinogradWeights {
    variant: Variant,
    u: Vec<PackedB>,
    /// `u` rounded to bf16, for [`conv_winograd_bf16`] (built by [`Self::pack_bf16`]).
    ub: Option<Vec<PackedBf16>>,
    bias: Vec<f32>,
    in_ch: usize,
    out_ch: usize,
}

impl WinogradWeights {
    /// From `weight(i)`, element `i` of a row-major `(out, in, 3, 3, 3)` weight.
    pub fn from_fn(
        variant: Variant,
        out_ch: usize,
        in_ch: usize,
        weight: impl Fn(usize) -> f32,
        bias: Option<&[f32]>,
    ) -> Self {
        Self::new(&TransformedKernels::new(variant, out_ch, in_ch, weight), bias)
    }

    /// From kernels already transformed (rounded to f32 here, once).
    pub fn new(k: &TransformedKernels, bias: Option<&[f32]>) -> Self {
        let (t, in_ch, out_ch, n) = (&k.t, k.in_ch, k.out_ch, k.variant.positions());
        let u = (0..n)
            .map(|p| PackedB::from_fn(in_ch, out_ch, |ci, co| t[(co * in_ch + ci) * n + p] as f32))
            .collect();
        Self { variant: k.variant, u, ub: None, bias: padded_bias(bias, out_ch), in_ch, out_ch }
    }

    /// Adds the bf16 packing [`conv_winograd_bf16`] runs on (the f32 one rounded), if missing.
    /// F(2, 3) only: F(4, 3)'s transforms scale values by up to 10 per dimension before the
    /// rounding, and its outputs came out 45% of their root mean square off the direct sum
    /// (F(2, 3): 0.5%; measured by this module's conformance test before F(4, 3) was excluded).
    pub fn pack_bf16(&mut self) {
        assert_eq!(self.variant, Variant::F2, "bf16 products are for F(2, 3) only");
        if self.ub.is_none() {
            let (ci, co) = (self.in_ch, self.out_ch);
            let ub = self.u.iter().map(|u| PackedBf16::from_fn(ci, co, |r, c| u.get(r, c))).collect();
            self.ub = Some(ub);
        }
    }

    /// Whether [`Self::pack_bf16`] ran.
    pub fn has_bf16(&self) -> bool {
        self.ub.is_some()
    }

    /// The algorithm these weights are transformed for.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Whether these weights run on a volume of interior size `dims` (whole tiles only).
    pub fn fits(&self, dims: [usize; 3]) -> bool {
        self.variant.fits(dims)
    }

    /// Panics unless these weights run on `x` into channels `off..` of `out` (callers size
    /// every volume, so a mismatch is a bug).
    fn check_shapes(&self, x: &Vol, out: &Vol, off: usize) {
        assert_eq!(x.c, self.in_ch, "conv input channels");
        assert_eq!(x.dims, out.dims, "conv keeps the size");
        assert!(self.fits(x.dims), "{:?} Winograd tiles do not divide {:?}", self.variant, x.dims);
        assert!(off + self.out_ch <= out.c, "conv output channels");
    }

    /// Output channels.
    pub fn out_ch(&self) -> usize {
        self.out_ch
    }

    /// Bytes of transformed weights.
    pub fn bytes(&self) -> usize {
        let ub = self.ub.iter().flatten().map(PackedBf16::bytes).sum::<usize>();
        self.u.iter().map(PackedB::bytes).sum::<usize>() + ub + self.bias.len() * 4
    }
}

/// Runs `w` on `x` into channels `off..off + w.out_ch()` of `out` (same interior size, whole
/// tiles in every dimension: [`WinogradWeights::fits`]). Returns the InstanceNorm statistics of
/// those channels ([`super::super::conv::instance_stats`]'s), gathered block by block while the block's
/// outputs are in cache: every 3x3x3 convolution of the model is normalised next, and a separate
/// pass would read the whole output again.
pub fn conv_winograd(
    kernels: F32Kernels,
    x: &Vol,
    w: &WinogradWeights,
    out: &mut Vol,
    off: usize,
) -> NormStats {
    w.check_shapes(x, out, off);
    match w.variant {
        Variant::F2 => run::<F2, 2, 4>(kernels, x, w, out, off),
        Variant::F4 => run::<F4, 4, 6>(kernels, x, w, out, off),
    }
}

/// [`conv_winograd`] for one variant's transforms.
fn run<W: Points<M, A>, const M: usize, const A: usize>(
    kernels: F32Kernels,
    x: &Vol,
    w: &WinogradWeights,
    out: &mut Vol,
    off: usize,
) -> NormStats {
    let (ci, co, n) = (w.in_ch, w.out_ch, w.variant.positions());
    let g = out_geometry(x.dims, out.c, off);
    for_each_block(w.variant, out, co, |(v, m, cols): &mut Scratch<f32>, b, slab, moments| {
        let nt = b.tiles();
        v.resize(n * nt * ci, 0.0);
        m.resize(n * nt * co, 0.0);
        input_transform::<W, M, A, _>(kernels, x, b, 1.0, v, cols);
        products(kernels, w, v, m, nt);
        output_transform::<W, M, A>(kernels, m, co, &w.bias, b, slab, g, moments);
    })
    .norm_stats()
}

/// [`conv_winograd`] with the products in bf16 (`kernels`' micro-kernel; the transforms run on
/// the f32 kernels paired with it): the transformed inputs are rounded to bf16 as the input
/// transform stores them, multiplied by the bf16 weights ([`WinogradWeights::pack_bf16`], which
/// must have run) and summed in f32. Returns the InstanceNorm statistics as [`conv_winograd`].
pub fn conv_winograd_bf16(
    kernels: Bf16Kernels,
    x: &Vol,
    w: &WinogradWeights,
    out: &mut Vol,
    off: usize,
) -> NormStats {
    w.check_shapes(x, out, off);
    // Only F(2, 3) weights have the packing (`pack_bf16` asserts it).
    let Some(ub) = &w.ub else { panic!("conv_winograd_bf16 on weights without their bf16 packing") };
    let (ci, co, n) = (w.in_ch, w.out_ch, w.variant.positions());
    let g = out_geometry(x.dims, out.c, off);
    let f32k = kernels.f32_transforms();
    for_each_block(w.variant, out, co, |(v, m, cols): &mut Scratch<Bf16>, b, slab, moments| {
        let nt = b.tiles();
        v.resize(n * nt * ci, Bf16::default());
        m.resize(n * nt * co, 0.0);
        input_transform::<F2, 2, 4, _>(f32k, x, b, 1.0, v, cols);
        for (p, u) in ub.iter().enumerate() {
            for pn in 0..u.panels() {
                let tile = Bf16Tile {
                    a: &v[p * ci..],
                    lda: n * ci,
                    kc: ci,
                    b: u.panel(pn),
                    ldc: n * co,
                    mr: nt,
                    nc: u.panel_cols(pn),
                };
                tile.run(kernels, &mut m[p * co + pn * NR..]);
            }
        }
        output_transform::<F2, 2, 4>(f32k, m, co, &w.bias, b, slab, g, moments);
    })
    .norm_stats()
}

/// The GEMMs of one block, one per position: `m[., p, .] = v[., p, .] * u[p]`, each
/// `(nt, in_ch) x (in_ch, out_ch)`.
fn products(kernels: F32Kernels, w: &WinogradWeights, v: &[f32], m: &mut [f32], nt: usize) {
    let (ci, co, n) = (w.in_ch, w.out_ch, w.u.len());
    Batch { a: v, a_step: ci, lda: n * ci, b: &w.u, c_step: co, ldc: n * co, mr: nt }.run(kernels, m);
}

#[cfg(test)]
mod tests {
    use super::super::super::conv::{ConvWeights, conv, instance_stats};
    use super::super::super::kernels::for_each_f32_kernels;
    use super::super::super::lcg;
    use super::super::random_volume;
    use super::*;

    /// The f32 Winograd kernel's conformance tests for one kernel set (`$kernels`, an
    /// `Option<F32Kernels>`: `None` where this CPU lacks it), in module `$name`.
    macro_rules! winograd_conformance {
        ($name:ident, $kernels:expr) => {
            mod $name {
                use super::*;

                #[test]
                fn f2_matches_direct_convolution() {
                    if let Some(k) = $kernels {
                        matches_direct_convolution(k, Variant::F2, 1e-5);
                    }
                }

                #[test]
                fn f4_matches_direct_convolution() {
                    if let Some(k) = $kernels {
                        matches_direct_convolution(k, Variant::F4, 1e-2);
                    }
                }
            }
        };
    }

    for_each_f32_kernels!(winograd_conformance);

    /// The bf16 Winograd kernel's conformance tests for one bf16 kernel set.
    macro_rules! bf16_winograd_conformance {
        ($name:ident, $kernels:expr) => {
            mod $name {
                use super::*;

                #[test]
                fn f2_matches_direct_convolution() {
                    if let Some(k) = $kernels {
                        bf16_matches_direct_convolution(k, Variant::F2, 2e-2);
                    }
                }
            }
        };
    }

    mod bf16 {
        use super::super::super::super::kernels::for_each_bf16_kernels;
        use super::*;
        for_each_bf16_kernels!(bf16_winograd_conformance);
    }

    /// The bf16 products against the f32 direct convolution, as [`matches_direct_convolution`]
    /// (channels outside the range untouched), relative to the outputs' root mean square: bf16
    /// keeps 8 significant bits, so each product errs by up to 2^-9 of its inputs' size and an
    /// output by a few thousandths of the typical output (measured 0.53-0.55% rms, 2.1-2.7% at
    /// worst, against 2% and 8 x 2%); a wrong pair order or packing is off by the order of the
    /// outputs (a bad transform by tens of percents: F(4, 3) in bf16 measured 45%). Also: every
    /// kernel set gives the portable one's values to within f32 rounding (the same products, the
    /// same order).
    fn bf16_matches_direct_convolution(kernels: Bf16Kernels, variant: Variant, tol: f32) {
        use super::super::super::kernels::Bf16Kernels;
        for (ci, co, dims) in [(8, 16, [4, 8, 8]), (11, 5, [4, 4, 4]), (19, 21, [8, 4, 100])] {
            let (x, want, mut wino) = direct_case(variant, ci, co, dims);
            wino.pack_bf16();
            let mut got = Vol::zeros(dims, co + 3);
            got.data.fill(7.0);
            conv_winograd_bf16(kernels, &x, &wino, &mut got, 2);
            let mut portable = Vol::zeros(dims, co + 3);
            conv_winograd_bf16(Bf16Kernels::PORTABLE, &x, &wino, &mut portable, 2);
            let voxels = dims.iter().product::<usize>();
            let rms = (want.data.iter().map(|v| v * v).sum::<f32>() / (voxels * co) as f32).sqrt();
            let (mut worst, mut sq) = (0.0f32, 0.0f32);
            let label = format!("bf16 {variant:?} {kernels:?} ci={ci} co={co}");
            for_each_output(&got, &want, co, &label, |i, g, e| {
                let err = (g - e).abs() / rms;
                worst = worst.max(err);
                sq += err * err;
                assert!(err < 8.0 * tol, "{label} value {i}: {g} vs {e}");
                let p = portable.data[i];
                assert!((g - p).abs() <= 1e-5 * rms, "{label} vs portable: {g} vs {p}");
            });
            let rms_err = (sq / (voxels * co) as f32).sqrt();
            println!("{label} {dims:?}: error / rms {rms_err:.1e}, worst {worst:.1e}");
            assert!(rms_err < tol, "{label}: error {rms_err} of the outputs' rms");
        }
    }

    /// `variant` on `kernels` computes the direct implicit GEMM's convolution (portable) and
    /// returns its InstanceNorm statistics: odd channel counts (tails of the 8-lane transforms
    /// and of the 16-column panels), several blocks per slab and rows split into parts (100
    /// wide), an output channel offset. Channels outside the written range must stay untouched.
    /// F(4, 3) rounds more (its transforms scale by up to 10 per dimension): measured at most
    /// 3e-6 of an output's size for F(2, 3) and 2e-5 for F(4, 3) here (`tol` 1e-5 and 1e-2); a
    /// wrong transform is off by the order of the outputs themselves.
    fn matches_direct_convolution(kernels: F32Kernels, variant: Variant, tol: f32) {
        for (ci, co, dims) in
            [(8, 16, [4, 8, 8]), (11, 5, [4, 4, 4]), (19, 21, [8, 4, 100]), (16, 16, [8, 8, 8])]
        {
            let (x, want, wino) = direct_case(variant, ci, co, dims);
            let mut got = Vol::zeros(dims, co + 3);
            got.data.fill(7.0);
            let stats = conv_winograd(kernels, &x, &wino, &mut got, 2);
            // The moments gathered block by block are those of the whole output.
            let whole = instance_stats(F32Kernels::PORTABLE, &got, 2, co);
            for (a, b) in stats.scale.iter().zip(&whole.scale).chain(stats.shift.iter().zip(&whole.shift)) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{variant:?} {kernels:?}: {a} vs {b}");
            }
            let mut worst = 0.0f32;
            let label = format!("{variant:?} {kernels:?} ci={ci} co={co} {dims:?}");
            for_each_output(&got, &want, co, &label, |i, g, e| {
                let err = (g - e).abs() / ((1.0 + e.abs()) * (ci as f32).sqrt());
                worst = worst.max(err);
                assert!(err < tol, "{label} value {i}: {g} vs {e}");
            });
            println!("{label}: relative error {worst:.1e}");
        }
    }

    /// Random input and weights for `ci -> co` channels on `dims`: the input, the direct
    /// (portable) convolution's output in channels `2..2 + co` of `co + 3`, and the weights
    /// transformed for `variant`.
    fn direct_case(variant: Variant, ci: usize, co: usize, dims: [usize; 3]) -> (Vol, Vol, WinogradWeights) {
        let weights = lcg(co * ci * 27, 1);
        let bias = lcg(co, 2);
        let direct = ConvWeights::from_fn(co, ci, 3, |i| weights[i], Some(&bias));
        let wino = WinogradWeights::from_fn(variant, co, ci, |i| weights[i], Some(&bias));
        let x = random_volume(dims, ci, 3);
        let mut want = Vol::zeros(dims, co + 3);
        conv(F32Kernels::PORTABLE, &x, &direct, &mut want, 2);
        (x, want, wino)
    }

    /// Calls `f(index, got, want)` for every interior value of channels `2..2 + co`, after
    /// checking that `got`'s other channels kept their fill value 7.
    fn for_each_output(got: &Vol, want: &Vol, co: usize, label: &str, mut f: impl FnMut(usize, f32, f32)) {
        let dims = got.dims;
        for z in 1..=dims[0] {
            for y in 1..=dims[1] {
                for xx in 1..=dims[2] {
                    let i = got.at(z, y, xx);
                    for c in 0..co + 3 {
                        if c < 2 || c >= co + 2 {
                            assert_eq!(got.data[i + c], 7.0, "{label} wrote channel {c} outside its range");
                        } else {
                            f(i + c, got.data[i + c], want.data[i + c]);
                        }
                    }
                }
            }
        }
    }
}
