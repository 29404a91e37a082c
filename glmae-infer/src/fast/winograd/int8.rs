//! Winograd F(2, 3) on integers: the transformed weights quantised to i16
//! ([`QWinogradWeights`]), the products on the int8 micro-kernel, and the convolution
//! ([`conv_qwinograd`]).

use super::super::conv::{NormStats, Vol};
use super::super::gemm::NR;
use super::super::kernels::Int8Kernels;
use super::super::qconv::QTile;
use super::blocks::{Scratch, for_each_block, out_geometry};
use super::transforms::{F2, input_transform, output_transform};
use super::{TransformedKernels, Variant, padded_bias};

/// The integer form of [`super::WinogradWeights`] (F(2, 3) only), for the int8 kernels
/// (`--int8-kernels`): the file's dequantised int8 weights transformed in f64 (the transform is
/// not integer: `G` holds halves), then quantised again per position and output channel to i16
/// levels and packed for `vpdpwssd` as in [`mod@super::super::qconv`]. Inputs are transformed in f32 and
/// quantised per tensor to i16 after the transform, so the products are exact i32 sums. Int8
/// levels for the transformed weights gave 1% of the output range as error in a single layer;
/// these levels give 4e-4.
#[derive(Clone, Debug)]
pub struct QWinogradWeights {
    /// Per position, per panel of `NR` output channels, per pair of input channels: `NR x 2`.
    packed: Vec<i16>,
    /// Per position, per output channel (padded to whole panels): the weights' scale.
    scale: Vec<f32>,
    bias: Vec<f32>,
    in_ch: usize,
    out_ch: usize,
}

impl QWinogradWeights {
    /// From `weight(i)`, element `i` of a row-major `(out, in, 3, 3, 3)` weight; `None` unless
    /// `in_ch` is a multiple of 8 (the quantising transform's width).
    pub fn from_fn(
        out_ch: usize,
        in_ch: usize,
        weight: impl Fn(usize) -> f32,
        bias: Option<&[f32]>,
    ) -> Option<Self> {
        Self::new(&TransformedKernels::new(Variant::F2, out_ch, in_ch, weight), bias)
    }

    /// From kernels already transformed; `None` unless they are F(2, 3)'s and their input
    /// channels a multiple of 8.
    pub fn new(k: &TransformedKernels, bias: Option<&[f32]>) -> Option<Self> {
        let (t, in_ch, out_ch) = (&k.t, k.in_ch, k.out_ch);
        if k.variant != Variant::F2 || in_ch == 0 || !in_ch.is_multiple_of(8) {
            return None;
        }
        let levels = Levels::new(in_ch);
        let (panels, pairs) = (out_ch.div_ceil(NR), in_ch / 2);
        let panel_len = pairs * NR * 2;
        let mut packed = vec![0i16; 64 * panels * panel_len];
        let mut scale = vec![0.0f32; 64 * panels * NR];
        for p in 0..64 {
            for co in 0..out_ch {
                let u = |ci: usize| t[(co * in_ch + ci) * 64 + p];
                let amax = (0..in_ch).map(|ci| u(ci).abs()).fold(0.0, f64::max);
                let s = if amax > 0.0 { amax / levels.weights as f64 } else { 1.0 };
                scale[p * panels * NR + co] = s as f32;
                let (pn, j) = (co / NR, co % NR);
                for ci in 0..in_ch {
                    packed[(p * panels + pn) * panel_len + ((ci / 2) * NR + j) * 2 + ci % 2] =
                        (u(ci) / s).round() as i16;
                }
            }
        }
        Some(Self { packed, scale, bias: padded_bias(bias, out_ch), in_ch, out_ch })
    }

    /// Whether these weights run on a volume of interior size `dims` (whole 2x2x2 tiles only).
    pub fn fits(&self, dims: [usize; 3]) -> bool {
        Variant::F2.fits(dims)
    }

    /// The largest activation level.
    pub fn level(&self) -> i32 {
        Levels::new(self.in_ch).inputs
    }

    /// Bytes of packed weights and scales.
    pub fn bytes(&self) -> usize {
        2 * self.packed.len() + 4 * (self.scale.len() + self.bias.len())
    }
}

/// Quantisation levels of the integer path. A transformed input is a signed sum of 8 inputs, so
/// it reaches 8 times the input level, which must fit i16; and `in_ch` products of transformed
/// inputs and weights must fit i32. The two levels share that budget equally: 12 bits each up
/// to 16 input channels, 10 bits at 256.
#[derive(Clone, Copy, Debug)]
struct Levels {
    inputs: i32,
    weights: i32,
}

impl Levels {
    fn new(in_ch: usize) -> Self {
        // inputs * 8 * weights * in_ch <= i32::MAX, inputs <= 4095 (8 * 4095 < 2^15).
        let budget = i32::MAX as f64 / (8.0 * in_ch.max(1) as f64);
        let weights = budget.sqrt().floor().min(4095.0) as i32;
        let inputs = ((budget / weights as f64).floor() as i32).min(4095);
        Self { inputs, weights }
    }
}

/// Runs the integer Winograd convolution `w` on `x`, whose largest `|value|` is `amax`, into
/// channels `off..off + out_ch` of `out` (same interior size, even in every dimension); returns
/// the InstanceNorm statistics of those channels, as [`super::conv_winograd`].
pub fn conv_qwinograd(
    kernels: Int8Kernels,
    x: &Vol,
    amax: f32,
    w: &QWinogradWeights,
    out: &mut Vol,
    off: usize,
) -> NormStats {
    assert_eq!(x.c, w.in_ch, "conv input channels");
    assert_eq!(x.dims, out.dims, "conv keeps the size");
    assert!(w.fits(x.dims), "Winograd tiles need even sizes, not {:?}", x.dims);
    assert!(off + w.out_ch <= out.c, "conv output channels");
    let (ci, co) = (w.in_ch, w.out_ch);
    let sx = if amax > 0.0 { amax / w.level() as f32 } else { 1.0 };
    // Each integer set transforms with the same f32 kernels (AVX2 + FMA with VNNI).
    let fk = kernels.f32_transforms();
    let g = out_geometry(x.dims, out.c, off);
    for_each_block(Variant::F2, out, co, |(v, m, cols): &mut Scratch<i16>, b, slab, moments| {
        let nt = b.tiles();
        v.resize(64 * nt * ci, 0);
        m.resize(64 * nt * co, 0.0);
        input_transform::<F2, 2, 4, _>(fk, x, b, 1.0 / sx, v, cols);
        qproducts(kernels, w, sx, v, m, nt);
        output_transform::<F2, 2, 4>(fk, m, co, &w.bias, b, slab, g, moments);
    })
    .norm_stats()
}

/// [`super::f32`]'s products on integers: `m[., p, .] = sx * s_w[p] * (v[., p, .] * q[p])`.
fn qproducts(kernels: Int8Kernels, w: &QWinogradWeights, sx: f32, v: &[i16], m: &mut [f32], nt: usize) {
    let (ci, co) = (w.in_ch, w.out_ch);
    let (panels, pairs) = (co.div_ceil(NR), ci / 2);
    let panel_len = pairs * NR * 2;
    let offs = [0usize];
    for p in 0..64 {
        for pn in 0..panels {
            let k = p * panels + pn;
            let mut scale = [0.0f32; NR];
            for (s, &ws) in scale.iter_mut().zip(&w.scale[k * NR..][..NR]) {
                *s = sx * ws;
            }
            let nc = (co - pn * NR).min(NR);
            let tile = QTile {
                a: &v[p * ci..],
                a_offs: &offs,
                lda: 64 * ci,
                pairs,
                b: &w.packed[k * panel_len..][..panel_len],
                scale: &scale,
                bias: None,
                ldc: 64 * co,
                mr: nt,
                nc,
            };
            tile.run(kernels, &mut m[p * co + pn * NR..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::conv::{ConvWeights, abs_max, conv};
    use super::super::super::kernels::{F32Kernels, for_each_int8_kernels};
    use super::super::super::lcg;
    use super::super::random_volume;
    use super::*;

    /// Layers whose channels are not a multiple of 8, and F(4, 3) kernels, get no integer form.
    #[test]
    fn integer_form_only_for_f2_and_multiples_of_8() {
        assert!(QWinogradWeights::from_fn(4, 12, |_| 1.0, None).is_none());
        let f4 = TransformedKernels::new(Variant::F4, 4, 16, |_| 1.0);
        assert!(QWinogradWeights::new(&f4, None).is_none());
    }

    /// The integer Winograd kernel's conformance tests for one kernel set (`$kernels`, an
    /// `Option<Int8Kernels>`: `None` where this CPU lacks it), in module `$name`.
    macro_rules! qwinograd_conformance {
        ($name:ident, $kernels:expr) => {
            mod $name {
                use super::*;

                #[test]
                fn integer_path_stays_within_quantisation_error() {
                    if let Some(k) = $kernels {
                        stays_within_quantisation_error(k);
                    }
                }
            }
        };
    }

    for_each_int8_kernels!(qwinograd_conformance);

    /// The integer path on `kernels` stays within its quantisation error of the f32 convolution:
    /// inputs and transformed weights at 12 bits give at most 3e-4 to 5e-4 of the output range
    /// here; 2e-3 leaves room without hiding a wrong transform (which is off by the order of the
    /// outputs themselves).
    fn stays_within_quantisation_error(kernels: Int8Kernels) {
        for (ci, co, dims) in [(8, 16, [4, 6, 8]), (32, 21, [6, 4, 20]), (16, 16, [8, 8, 8])] {
            let weights = lcg(co * ci * 27, 11);
            let bias = lcg(co, 12);
            let direct = ConvWeights::from_fn(co, ci, 3, |i| weights[i], Some(&bias));
            let qw = QWinogradWeights::from_fn(co, ci, |i| weights[i], Some(&bias));
            let Some(qw) = qw else { panic!("{ci} input channels have an integer form") };
            let x = random_volume(dims, ci, 13);
            let amax = abs_max(&x, 0, ci);
            let mut want = Vol::zeros(dims, co + 1);
            conv(F32Kernels::PORTABLE, &x, &direct, &mut want, 1);
            let range = want.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let mut got = Vol::zeros(dims, co + 1);
            conv_qwinograd(kernels, &x, amax, &qw, &mut got, 1);
            let worst = got.data.iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            println!("{kernels:?} ci={ci} co={co}: max error {:.2e} of the range", worst / range);
            assert!(
                worst < 2e-3 * range,
                "{kernels:?} ci={ci} co={co}: error {worst} for outputs up to {range}"
            );
        }
    }
}
