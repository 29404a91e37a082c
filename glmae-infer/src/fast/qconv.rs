//! Direct integer convolutions for int8 weight files (a 3x3x3 or 1x1x1 layer; the engine uses it
//! for 3x3x3 layers that Winograd does not cover), with the file's int8 weights
//! (per-output-channel scales) and activations quantised per tensor to int16 on the fly,
//! accumulated exactly in i32. Its micro-kernel (`QTile`) also runs the integer Winograd
//! products ([`super::winograd`]).
//!
//! `y[co] = s_x * s_w[co] * sum q_x * q_w (+ bias)` with `q_x = round(x / s_x)`, symmetric, so the
//! zero border stays exactly 0. `s_x = max|x| / A`, where `A` is the largest level for which no
//! i32 sum can overflow (`K * 128 * A < 2^31`, `K` the layer's reduction length: 2427 for the
//! widest UNETR layer, 19418 for a 32-channel one), i.e. 11 to 15 bits: 16 to 128 times finer
//! than uint8 activations, which moved 4% of labels in the ViT-T check (docs/performance.md).
//! The products run on AVX-512 VNNI (`vpdpwssd`, 256-bit form: 16 multiply-adds per instruction
//! against 8 for an f32 FMA, on half the activation bytes) where the CPU has it, and on portable
//! integer Rust otherwise; both compute the same integers and the same f32 epilogue, so they
//! agree exactly.

use glmae_core::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::conv::Vol;
use super::gemm::{MR, NR};
use super::kernels::Int8Kernels;

/// An int16-quantised channel-last volume with a zero border and channels padded to a multiple
/// of 2 (the VNNI dot product's width) with zeros.
#[derive(Clone, Debug)]
pub struct QVol {
    data: Vec<i16>,
    dims: [usize; 3],
    c2: usize,
    scale: f32,
}

/// The largest quantisation level for a layer summing `k` products of int8 weights (|w| <= 128,
/// so even a file holding -128 cannot overflow the i32 sums).
pub fn max_level(k: usize) -> i32 {
    (i32::MAX as i64 / (k.max(1) as i64 * 128)).min(i16::MAX as i64) as i32
}

impl QVol {
    /// Quantises `x`, whose largest `|value|` is `amax`, to levels `-level..=level`, reusing
    /// `buf`'s allocation.
    pub fn quantize(x: &Vol, amax: f32, level: i32, mut buf: Vec<i16>) -> Self {
        // Adding and subtracting 1.5 * 2^23 rounds to nearest (ties to even) without SSE4.1's
        // `roundps` (baseline x86_64 would call libm for `f32::round`); the clamp keeps values
        // in range should `amax` understate the data.
        const MAGIC: f32 = 12_582_912.0;
        let [d0, h, wd] = x.dims;
        let (c, plane) = (x.c, x.plane());
        let level = level.max(1) as f32;
        let scale = if amax > 0.0 { amax / level } else { 1.0 };
        let c2 = c.div_ceil(2) * 2;
        let qplane = (h + 2) * (wd + 2) * c2;
        buf.clear();
        buf.resize((d0 + 2) * qplane, 0);
        let inv = 1.0 / scale;
        buf[qplane..(d0 + 1) * qplane].par_chunks_mut(qplane).enumerate().for_each(|(z, q)| {
            let pl = &x.data[(z + 1) * plane..][..plane];
            for y in 0..h {
                let r0 = ((y + 1) * (wd + 2) + 1) * c;
                let q0 = ((y + 1) * (wd + 2) + 1) * c2;
                let (qrow, row) = (&mut q[q0..q0 + wd * c2], &pl[r0..r0 + wd * c]);
                let q1 = |v: f32| (((v * inv).clamp(-level, level) + MAGIC) - MAGIC) as i32 as i16;
                if c == c2 {
                    for (qq, &vv) in qrow.iter_mut().zip(row) {
                        *qq = q1(vv);
                    }
                } else {
                    for (qv, v) in qrow.chunks_exact_mut(c2).zip(row.chunks_exact(c)) {
                        for (qq, &vv) in qv.iter_mut().zip(v) {
                            *qq = q1(vv);
                        }
                    }
                }
            }
        });
        Self { data: buf, dims: x.dims, c2, scale }
    }

    /// The buffer, for reuse.
    pub fn into_buffer(self) -> Vec<i16> {
        self.data
    }
}

/// A 3x3x3 (padding 1) or 1x1x1 convolution with int8 weights widened to i16 and packed for
/// `vpdpwssd`: per panel of `NR` output channels, per tap, per pair of input channels,
/// `NR x 2` values.
#[derive(Clone, Debug)]
pub struct QConvWeights {
    packed: Vec<i16>,
    c2: usize,
    out_ch: usize,
    kernel: usize,
    /// Per output channel, padded to whole panels.
    w_scale: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl QConvWeights {
    /// From an int8 `(out, in, k, k, k)` Conv3d weight quantised along the output channels;
    /// `None` for f32 weights or another quantisation axis.
    pub fn new(w: &Tensor<'_>, bias: Option<&Tensor<'_>>) -> Option<Self> {
        let TensorData::Int8 { axis: 0, scales, values } = w.data() else { return None };
        let d = w.shape();
        let d = d.dims();
        let (out_ch, in_ch, kernel) = (d[0] as usize, d[1] as usize, d[2] as usize);
        let scales: Vec<f32> =
            scales.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let q: Vec<i8> = values.iter().map(|&b| b as i8).collect();
        let bias: Option<Vec<f32>> = bias.map(|b| (0..out_ch).map(|i| b.get(i)).collect());
        Some(Self::from_parts(out_ch, in_ch, kernel, &q, &scales, bias.as_deref()))
    }

    /// From row-major `(out, in, k, k, k)` int8 values `q` and per-output-channel scales.
    pub fn from_parts(
        out_ch: usize,
        in_ch: usize,
        kernel: usize,
        q: &[i8],
        scales: &[f32],
        bias: Option<&[f32]>,
    ) -> Self {
        let taps = kernel.pow(3);
        let c2 = in_ch.div_ceil(2) * 2;
        let panels = out_ch.div_ceil(NR);
        let pairs = c2 / 2;
        let mut packed = vec![0i16; panels * taps * pairs * NR * 2];
        for co in 0..out_ch {
            let (p, j) = (co / NR, co % NR);
            for ci in 0..in_ch {
                for t in 0..taps {
                    packed[(((p * taps + t) * pairs + ci / 2) * NR + j) * 2 + ci % 2] =
                        q[(co * in_ch + ci) * taps + t] as i16;
                }
            }
        }
        let mut w_scale = scales[..out_ch].to_vec();
        w_scale.resize(panels * NR, 0.0);
        let bias = bias.map(|b| {
            let mut v = b.to_vec();
            v.resize(panels * NR, 0.0);
            v
        });
        Self { packed, c2, out_ch, kernel, w_scale, bias }
    }

    /// Output channels.
    pub fn out_ch(&self) -> usize {
        self.out_ch
    }

    /// The reduction length (taps x input channels), which bounds the activation levels.
    pub fn k(&self) -> usize {
        self.kernel.pow(3) * self.c2
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        2 * self.packed.len()
    }
}

/// Micro-tiles: per row `i < mr`, `sum_t sum_g dot2(a[offs[t] + i * lda + 2g..], b[..])`,
/// converted to f32 as `acc * scale[j] (+ bias[j])`; the rows run as consecutive `MR`-row tiles.
#[derive(Clone, Copy)]
pub(super) struct QTile<'a> {
    pub a: &'a [i16],
    pub a_offs: &'a [usize],
    pub lda: usize,
    pub pairs: usize,
    /// Per tap, per pair of reduction rows, `NR x 2` values.
    pub b: &'a [i16],
    /// `s_x * s_w[j]`.
    pub scale: &'a [f32; NR],
    pub bias: Option<&'a [f32]>,
    pub ldc: usize,
    pub mr: usize,
    pub nc: usize,
}

impl<'a> QTile<'a> {
    /// The `MR`-row tiles: the first row of each and the tile.
    fn tiles(&self) -> impl Iterator<Item = (usize, QTile<'a>)> {
        let t = *self;
        // Every field spelled out: `..t` here hits a rustc ICE (1.95, array-length const in `scale`).
        (0..t.mr).step_by(MR).map(move |i| {
            let tile = QTile {
                a: &t.a[i * t.lda..],
                a_offs: t.a_offs,
                lda: t.lda,
                pairs: t.pairs,
                b: t.b,
                scale: t.scale,
                bias: t.bias,
                ldc: t.ldc,
                mr: (t.mr - i).min(MR),
                nc: t.nc,
            };
            (i, tile)
        })
    }

    /// Runs the tiles into `c` (element `(i, j)` at `i * ldc + j`); panics if a slice is too short.
    pub fn run(&self, kernels: Int8Kernels, c: &mut [f32]) {
        let taps = self.a_offs.len();
        assert!(self.mr >= 1 && self.nc >= 1 && self.nc <= NR);
        assert!(self.b.len() >= taps * self.pairs * NR * 2);
        assert!(self.bias.is_none_or(|b| b.len() >= NR));
        let a_last =
            self.a_offs.iter().copied().max().unwrap_or(0) + (self.mr - 1) * self.lda + 2 * self.pairs;
        assert!(a_last <= self.a.len(), "A too short");
        assert!((self.mr - 1) * self.ldc + self.nc <= c.len(), "C too short");
        match kernels.qisa() {
            #[cfg(target_arch = "x86_64")]
            super::kernels::QIsa::Vnni => {
                // SAFETY: an `Int8Kernels` holding VNNI exists only where the CPU has AVX2,
                // AVX-512 VNNI and VL (checked when the token was made), and the asserts above
                // bound every access the kernel makes.
                unsafe { vnni::tiles(self, c) }
            }
            #[cfg(target_arch = "aarch64")]
            super::kernels::QIsa::Neon => {
                // SAFETY: an `Int8Kernels` holding NEON exists only where the CPU has it (checked
                // when the token was made), and the asserts above bound every access.
                unsafe { neon::tiles(self, c) }
            }
            _ => {
                for (i, t) in self.tiles() {
                    t.scalar(&mut c[i * t.ldc..]);
                }
            }
        }
    }

    fn scalar(&self, c: &mut [f32]) {
        let mut acc = [[0i32; NR]; MR];
        for (t, &off) in self.a_offs.iter().enumerate() {
            for g in 0..self.pairs {
                let b = &self.b[(t * self.pairs + g) * NR * 2..][..NR * 2];
                for (i, row) in acc.iter_mut().enumerate().take(self.mr) {
                    let a = &self.a[off + i * self.lda + 2 * g..][..2];
                    for (v, w) in row.iter_mut().zip(b.chunks_exact(2)) {
                        // Wrapping, like the instruction; the levels guarantee no wrap happens.
                        *v = v.wrapping_add(a[0] as i32 * w[0] as i32 + a[1] as i32 * w[1] as i32);
                    }
                }
            }
        }
        for (i, row) in acc.iter().enumerate().take(self.mr) {
            for j in 0..self.nc {
                c[i * self.ldc + j] = row[j] as f32 * self.scale[j] + self.bias.map_or(0.0, |b| b[j]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{NR, QTile};
    use core::arch::x86_64::*;

    /// All of `t`'s rows, `MR` at a time.
    ///
    /// # Safety
    /// As for [`tile`], for all `t.mr` rows.
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    pub(super) unsafe fn tiles(t: &QTile<'_>, c: &mut [f32]) {
        for (i, t) in t.tiles() {
            // SAFETY: the caller's contract covers every row.
            unsafe { crate::fast::gemm::with_rows!(t.mr, tile(&t, &mut c[i * t.ldc..])) }
        }
    }

    /// # Safety
    /// The CPU supports AVX2, AVX-512 VNNI and VL, `M == t.mr`, and every access described by `t`
    /// is inside its slices and `c` ([`QTile::run`] asserts it).
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    pub(super) unsafe fn tile<const M: usize>(t: &QTile<'_>, c: &mut [f32]) {
        let mut acc = [[_mm256_setzero_si256(); 2]; M];
        // SAFETY: (for the whole body) see the function's contract.
        unsafe {
            let ap = t.a.as_ptr();
            let mut bp = t.b.as_ptr();
            for &off in t.a_offs {
                let at = ap.add(off);
                for g in 0..t.pairs {
                    let b0 = _mm256_loadu_si256(bp as *const __m256i);
                    let b1 = _mm256_loadu_si256(bp.add(16) as *const __m256i);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let av =
                            _mm256_set1_epi32((at.add(i * t.lda + 2 * g) as *const i32).read_unaligned());
                        a[0] = _mm256_dpwssd_epi32(a[0], av, b0);
                        a[1] = _mm256_dpwssd_epi32(a[1], av, b1);
                    }
                    bp = bp.add(NR * 2);
                }
            }
            // Epilogue in the scalar kernel's order (convert, scale, add bias: no FMA), so the
            // two kernels agree exactly.
            let mut tmp = [0.0f32; NR];
            for (i, a) in acc.iter().enumerate() {
                // Whole panels store straight into C (a `copy_from_slice` of a run-time length
                // is a libc call per row).
                let dst = if t.nc == NR { c.as_mut_ptr().add(i * t.ldc) } else { tmp.as_mut_ptr() };
                for (h, &acc_h) in a.iter().enumerate() {
                    let mut y = _mm256_mul_ps(
                        _mm256_cvtepi32_ps(acc_h),
                        _mm256_loadu_ps(t.scale.as_ptr().add(8 * h)),
                    );
                    if let Some(b) = t.bias {
                        y = _mm256_add_ps(y, _mm256_loadu_ps(b.as_ptr().add(8 * h)));
                    }
                    _mm256_storeu_ps(dst.add(8 * h), y);
                }
                if t.nc < NR {
                    c[i * t.ldc..][..t.nc].copy_from_slice(&tmp[..t.nc]);
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{NR, QTile};
    use core::arch::aarch64::*;

    /// All of `t`'s rows, `MR` at a time.
    ///
    /// # Safety
    /// As for [`tile`], for all `t.mr` rows.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn tiles(t: &QTile<'_>, c: &mut [f32]) {
        for (i, t) in t.tiles() {
            // SAFETY: the caller's contract covers every row.
            unsafe { crate::fast::gemm::with_rows!(t.mr, tile(&t, &mut c[i * t.ldc..])) }
        }
    }

    /// `M` rows of 16 columns: per pair of reduction rows, the broadcast pair of A times each
    /// 8-value chunk of B (four columns' pairs) by two widening multiplies (`smull`, `smull2`),
    /// whose products `vpaddq_s32` sums pairwise into the columns' i32 accumulators (wrapping,
    /// like the scalar kernel and `vpdpwssd`; the levels guarantee no wrap happens).
    ///
    /// # Safety
    /// The CPU supports NEON, `M == t.mr`, and every access described by `t` is inside its slices
    /// and `c` ([`QTile::run`] asserts it).
    #[target_feature(enable = "neon")]
    unsafe fn tile<const M: usize>(t: &QTile<'_>, c: &mut [f32]) {
        let mut acc = [[vdupq_n_s32(0); 4]; M];
        // SAFETY: (for the whole body) see the function's contract.
        unsafe {
            let ap = t.a.as_ptr();
            let mut bp = t.b.as_ptr();
            for &off in t.a_offs {
                let at = ap.add(off);
                for g in 0..t.pairs {
                    let b: [int16x8_t; 4] = core::array::from_fn(|q| vld1q_s16(bp.add(8 * q)));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let pair = (at.add(i * t.lda + 2 * g) as *const i32).read_unaligned();
                        let av = vreinterpretq_s16_s32(vdupq_n_s32(pair));
                        for (aq, bq) in a.iter_mut().zip(b) {
                            let lo = vmull_s16(vget_low_s16(av), vget_low_s16(bq));
                            let hi = vmull_high_s16(av, bq);
                            *aq = vaddq_s32(*aq, vpaddq_s32(lo, hi));
                        }
                    }
                    bp = bp.add(NR * 2);
                }
            }
            // Epilogue in the scalar kernel's order (convert, scale, add bias: no FMA), so the
            // two kernels agree exactly.
            let mut tmp = [0.0f32; NR];
            for (i, a) in acc.iter().enumerate() {
                for (q, &aq) in a.iter().enumerate() {
                    let mut y = vmulq_f32(vcvtq_f32_s32(aq), vld1q_f32(t.scale.as_ptr().add(4 * q)));
                    if let Some(b) = t.bias {
                        y = vaddq_f32(y, vld1q_f32(b.as_ptr().add(4 * q)));
                    }
                    vst1q_f32(tmp.as_mut_ptr().add(4 * q), y);
                }
                c[i * t.ldc..][..t.nc].copy_from_slice(&tmp[..t.nc]);
            }
        }
    }
}

/// Runs `w` on the quantised `x` into f32 channels `off..off + w.out_ch()` of `out`.
pub fn qconv(kernels: Int8Kernels, x: &QVol, w: &QConvWeights, out: &mut Vol, off: usize) {
    assert_eq!(x.c2, w.c2, "quantised conv input channels");
    assert_eq!(x.dims, out.dims, "conv keeps the size");
    assert!(off + w.out_ch <= out.c, "conv output channels");
    let [d0, h, wd] = x.dims;
    let c2 = x.c2;
    let taps: Vec<usize> = if w.kernel == 3 {
        (0..27).map(|t| ((t / 9 * (h + 2) + t / 3 % 3) * (wd + 2) + t % 3) * c2).collect()
    } else {
        vec![(((h + 2) + 1) * (wd + 2) + 1) * c2]
    };
    let pairs = c2 / 2;
    let panel_len = taps.len() * pairs * NR * 2;
    let panels = w.out_ch.div_ceil(NR);
    let qplane = (h + 2) * (wd + 2) * c2;
    let (oc, oplane) = (out.c, out.plane());
    out.data[oplane..(d0 + 1) * oplane].par_chunks_mut(oplane).enumerate().for_each(|(z, opl)| {
        for p in 0..panels {
            let nc = (w.out_ch - p * NR).min(NR);
            let mut scale = [0.0f32; NR];
            for (s, &ws) in scale.iter_mut().zip(&w.w_scale[p * NR..]) {
                *s = x.scale * ws;
            }
            for y in 0..h {
                let mut x0 = 0;
                while x0 < wd {
                    let mr = (wd - x0).min(MR);
                    let a0 = z * qplane + (y * (wd + 2) + x0) * c2;
                    let tile = QTile {
                        a: &x.data[a0..],
                        a_offs: &taps,
                        lda: c2,
                        pairs,
                        b: &w.packed[p * panel_len..][..panel_len],
                        scale: &scale,
                        bias: w.bias.as_ref().map(|b| &b[p * NR..][..NR]),
                        ldc: oc,
                        mr,
                        nc,
                    };
                    let c0 = ((y + 1) * (wd + 2) + x0 + 1) * oc + off + p * NR;
                    tile.run(kernels, &mut opl[c0..]);
                    x0 += mr;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fast::conv::{ConvWeights, conv};
    use crate::fast::kernels::{F32Kernels, for_each_int8_kernels};

    /// The direct int8 kernel's conformance tests for one kernel set (`$kernels`, an
    /// `Option<Int8Kernels>`: `None` where this CPU lacks it), in module `$name`.
    macro_rules! qconv_conformance {
        ($name:ident, $kernels:expr) => {
            mod $name {
                use super::*;

                /// The int8 convolution equals the f32 one on dequantised weights and
                /// re-quantised inputs (the portable kernel), and this set equals the portable
                /// kernel bit for bit.
                #[test]
                fn qconv_matches_f32_conv_on_quantised_values() {
                    if let Some(k) = $kernels {
                        qconv_matches_f32_conv_on(k);
                    }
                }
            }
        };
    }

    for_each_int8_kernels!(qconv_conformance);

    fn qconv_matches_f32_conv_on(kernels: Int8Kernels) {
        for (ci, co, k, d) in [(5, 20, 3, [4, 7, 9]), (16, 16, 3, [6, 6, 6]), (3, 14, 1, [5, 3, 8])] {
            let taps = k * k * k;
            let q: Vec<i8> =
                (0..co * ci * taps).map(|i| (((i * 37 + 11) % 255) as i32 - 127) as i8).collect();
            let scales: Vec<f32> = (0..co).map(|i| 0.001 * (i + 1) as f32).collect();
            let bias: Vec<f32> = (0..co).map(|i| i as f32 * 0.1 - 0.5).collect();
            let qw = QConvWeights::from_parts(co, ci, k, &q, &scales, Some(&bias));
            let mut x = Vol::zeros(d, ci);
            for z in 0..d[0] {
                for y in 0..d[1] {
                    for xx in 0..d[2] {
                        let i = x.at(z + 1, y + 1, xx + 1);
                        for c in 0..ci {
                            x.data[i + c] = (((z * 7 + y * 3 + xx * 5 + c * 11) % 23) as f32 - 6.0) * 0.37;
                        }
                    }
                }
            }
            let qx = QVol::quantize(&x, crate::fast::conv::abs_max(&x, 0, ci), max_level(qw.k()), Vec::new());
            // What the int8 kernel sees, in f32: dequantised inputs and weights.
            let mut xd = x.clone();
            for z in 0..d[0] {
                for y in 0..d[1] {
                    for xx in 0..d[2] {
                        let (i, j) = (
                            x.at(z + 1, y + 1, xx + 1),
                            ((z + 1) * (d[1] + 2) + y + 1) * (d[2] + 2) + xx + 1,
                        );
                        for c in 0..ci {
                            xd.data[i + c] = qx.data[j * qx.c2 + c] as f32 * qx.scale;
                        }
                    }
                }
            }
            let fw = ConvWeights::from_fn(co, ci, k, |i| q[i] as f32 * scales[i / (ci * taps)], Some(&bias));
            let mut expected = Vol::zeros(d, co + 3);
            conv(F32Kernels::PORTABLE, &xd, &fw, &mut expected, 2);
            let mut got = Vol::zeros(d, co + 3);
            qconv(Int8Kernels::PORTABLE, &qx, &qw, &mut got, 2);
            for (a, b) in got.data.iter().zip(&expected.data) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
            let mut v = Vol::zeros(d, co + 3);
            qconv(kernels, &qx, &qw, &mut v, 2);
            assert_eq!(v.data, got.data, "{kernels:?} and portable int8 kernels differ");
        }
    }

    #[test]
    fn quantisation_keeps_zero_exact_and_error_within_half_a_step() {
        let d = [3, 4, 5];
        let mut x = Vol::zeros(d, 3);
        for z in 0..3 {
            for y in 0..4 {
                for xx in 0..5 {
                    let i = x.at(z + 1, y + 1, xx + 1);
                    for c in 0..3 {
                        x.data[i + c] = ((z + y * 2 + xx * 3 + c) as f32).sin() * 3.0 + 0.5;
                    }
                }
            }
        }
        let q = QVol::quantize(&x, crate::fast::conv::abs_max(&x, 0, 3), 1000, Vec::new());
        assert_eq!(q.data[0], 0, "the border is zero");
        assert_eq!(q.data[(6 + 1) * 7 * 4 + 4 + 3], 0, "padding channels are zero");
        for z in 0..3 {
            for y in 0..4 {
                for xx in 0..5 {
                    let (i, j) = (x.at(z + 1, y + 1, xx + 1), ((z + 1) * 6 + y + 1) * 7 + xx + 1);
                    for c in 0..3 {
                        let back = q.data[j * 4 + c] as f32 * q.scale;
                        assert!((back - x.data[i + c]).abs() <= 0.5 * q.scale * 1.001);
                    }
                }
            }
        }
    }
}
