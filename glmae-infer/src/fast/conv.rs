//! The decoder's layers on channel-last volumes with a one-voxel zero border.
//!
//! Keeping every activation channel-last (`[z][y][x][channel]`) and zero-padded turns each of the
//! 27 taps of a 3x3x3 convolution into a plain shift of A in the GEMM micro-kernel: no im2col
//! copy and no bounds tests in the inner loop. Output rows are x-runs of `MR` voxels, output
//! columns are `NR` channels, and output planes are split across the rayon pool.

use glmae_core::kernels::{Dims3, INSTANCE_NORM_EPS, LEAKY_RELU_SLOPE};
use glmae_core::tensor::Tensor;
use rayon::prelude::*;

use super::gemm::{NR, PackedB, Tile, pad_bias};
use super::kernels::F32Kernels;

/// Declares `$avx2`, an AVX2 + FMA copy of the `#[inline(always)]` function `$portable` (the
/// same operations, so the same values: Rust never fuses a multiply and an add on its own), for
/// the elementwise passes and the InstanceNorm moments, which the build's baseline target (SSE2)
/// compiled to 4-lane code with spills (6% of a window in `add_row` alone).
macro_rules! avx2_copy {
    ($avx2:ident = $portable:ident($($arg:ident: $ty:ty),*)) => {
        /// # Safety
        /// The CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) {
            $portable($($arg),*)
        }
    };
}

/// Runs `$portable($args)`, or its [`avx2_copy`] `$avx2` where `$kernels` run the AVX2 code.
macro_rules! on_kernels {
    ($kernels:expr, $avx2:ident, $portable:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if $kernels.avx2() {
            // SAFETY: an `F32Kernels` that runs the AVX2 code exists only where the CPU has AVX2
            // and FMA.
            unsafe { $avx2($($arg),*) }
        } else {
            $portable($($arg),*)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $kernels;
            $portable($($arg),*)
        }
    }};
}

/// A channel-last volume with a one-voxel zero border on every side.
#[derive(Clone, Debug)]
pub struct Vol {
    /// `(d0 + 2) * (d1 + 2) * (d2 + 2) * c` values.
    pub data: Vec<f32>,
    /// Interior size.
    pub dims: Dims3,
    /// Channels per voxel.
    pub c: usize,
}

impl Vol {
    /// All zeros.
    pub fn zeros(dims: Dims3, c: usize) -> Self {
        let n = (dims[0] + 2) * (dims[1] + 2) * (dims[2] + 2) * c;
        Self { data: vec![0.0; n], dims, c }
    }

    /// A volume in a recycled buffer: the border is zeroed, the interior holds stale values (NaN
    /// in debug builds, so tests catch any layer that reads before it writes).
    pub fn reuse(mut data: Vec<f32>, dims: Dims3, c: usize) -> Self {
        let n = (dims[0] + 2) * (dims[1] + 2) * (dims[2] + 2) * c;
        data.truncate(n);
        data.resize(n, 0.0);
        let mut v = Self { data, dims, c };
        if cfg!(debug_assertions) {
            v.data.fill(f32::NAN);
        }
        v.zero_border();
        v
    }

    /// Zeroes the one-voxel border (interior values are left as they are).
    fn zero_border(&mut self) {
        let [d0, h, w] = self.dims;
        let (plane, c) = (self.plane(), self.c);
        self.data[..plane].fill(0.0);
        self.data[(d0 + 1) * plane..].fill(0.0);
        self.data[plane..(d0 + 1) * plane].par_chunks_mut(plane).for_each(|pl| {
            pl[..(w + 2) * c].fill(0.0);
            pl[(h + 1) * (w + 2) * c..].fill(0.0);
            for y in 1..=h {
                let row = &mut pl[y * (w + 2) * c..(y + 1) * (w + 2) * c];
                row[..c].fill(0.0);
                row[(w + 1) * c..].fill(0.0);
            }
        });
    }

    /// Values in one padded z-plane.
    pub fn plane(&self) -> usize {
        (self.dims[1] + 2) * (self.dims[2] + 2) * self.c
    }

    /// Index of padded voxel `(z, y, x)` (interior voxels are `1..=dims`).
    pub fn at(&self, z: usize, y: usize, x: usize) -> usize {
        ((z * (self.dims[1] + 2) + y) * (self.dims[2] + 2) + x) * self.c
    }

    /// From a channel-first `(c, dims)` array.
    pub fn from_channel_first(x: &[f32], dims: Dims3, c: usize) -> Self {
        let mut v = Self::zeros(dims, c);
        let n = dims[0] * dims[1] * dims[2];
        for z in 0..dims[0] {
            for y in 0..dims[1] {
                for xx in 0..dims[2] {
                    let dst = v.at(z + 1, y + 1, xx + 1);
                    let src = (z * dims[1] + y) * dims[2] + xx;
                    for ch in 0..c {
                        v.data[dst + ch] = x[ch * n + src];
                    }
                }
            }
        }
        v
    }

    /// From token rows `(d0 * d1 * d2, c)`, row-major over the grid (the ViT's output).
    pub fn from_tokens(t: &[f32], dims: Dims3, c: usize) -> Self {
        let mut v = Self::zeros(dims, c);
        for z in 0..dims[0] {
            for y in 0..dims[1] {
                let dst = v.at(z + 1, y + 1, 1);
                let src = (z * dims[1] + y) * dims[2] * c;
                v.data[dst..dst + dims[2] * c].copy_from_slice(&t[src..src + dims[2] * c]);
            }
        }
        v
    }

    /// Channels `off..off + n` as a channel-first array.
    pub fn to_channel_first(&self, off: usize, n: usize) -> Vec<f32> {
        let d = self.dims;
        let mut out = vec![0.0; n * d[0] * d[1] * d[2]];
        // One pass over the source writes n sequential streams per z-plane.
        planes_by_z(&mut out, d[0], d[1] * d[2]).into_par_iter().enumerate().for_each(|(z, mut segs)| {
            for y in 0..d[1] {
                let src = &self.data[self.at(z + 1, y + 1, 1)..][..d[2] * self.c];
                for (x, v) in src.chunks_exact(self.c).enumerate() {
                    for (seg, &val) in segs.iter_mut().zip(&v[off..off + n]) {
                        seg[y * d[2] + x] = val;
                    }
                }
            }
        });
        out
    }

    /// Interior planes `1..=d0` as mutable chunks, for parallel writes.
    fn interior_planes_mut(&mut self) -> impl IndexedParallelIterator<Item = (usize, &mut [f32])> {
        let plane = self.plane();
        let d0 = self.dims[0];
        self.data[plane..(d0 + 1) * plane].par_chunks_mut(plane).enumerate()
    }
}

/// A 3x3x3 (padding 1) or 1x1x1 convolution, weights packed per output-channel panel as
/// `[tap][in_ch][NR]`; int8 weights are dequantised here, once.
#[derive(Clone, Debug)]
pub struct ConvWeights {
    packed: PackedB,
    bias: Option<Vec<f32>>,
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
}

impl ConvWeights {
    /// From a PyTorch `(out, in, k, k, k)` Conv3d weight with `k` 1 or 3.
    pub fn new(w: &Tensor<'_>, bias: Option<&Tensor<'_>>) -> Self {
        let d = w.shape();
        let d = d.dims();
        let (out_ch, in_ch, kernel) = (d[0] as usize, d[1] as usize, d[2] as usize);
        let bias: Option<Vec<f32>> = bias.map(|b| (0..out_ch).map(|i| b.get(i)).collect());
        Self::from_fn(out_ch, in_ch, kernel, |i| w.get(i), bias.as_deref())
    }

    /// From `weight(i)`, element `i` of a row-major `(out, in, k, k, k)` weight, `k` 1 or 3.
    pub fn from_fn(
        out_ch: usize,
        in_ch: usize,
        kernel: usize,
        weight: impl Fn(usize) -> f32,
        bias: Option<&[f32]>,
    ) -> Self {
        let taps = kernel * kernel * kernel;
        // Row r = tap * in_ch + ci of the implicit GEMM's B.
        let packed = PackedB::from_fn(taps * in_ch, out_ch, |r, co| {
            let (tap, ci) = (r / in_ch, r % in_ch);
            weight((co * in_ch + ci) * taps + tap)
        });
        let bias = bias.map(|b| pad_bias(b.iter().copied(), out_ch));
        Self { packed, bias, in_ch, out_ch, kernel }
    }

    /// Output channels.
    pub fn out_ch(&self) -> usize {
        self.out_ch
    }

    /// Input channels.
    pub fn in_ch(&self) -> usize {
        self.in_ch
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        self.packed.bytes()
    }

    /// Multiply-adds per output voxel.
    pub fn macs_per_voxel(&self) -> usize {
        self.kernel.pow(3) * self.in_ch * self.out_ch
    }
}

/// Runs `w` on `x` into channels `off..off + w.out_ch()` of `out` (same interior size).
/// Returns the InstanceNorm statistics of those channels ([`instance_stats`]'s), gathered plane
/// by plane right after the plane is written, while it is in cache: the model normalises every
/// convolution's output, and a separate pass read the whole volume again (13 ms of a window).
pub fn conv(kernels: F32Kernels, x: &Vol, w: &ConvWeights, out: &mut Vol, off: usize) -> NormStats {
    assert_eq!(x.c, w.in_ch, "conv input channels");
    assert_eq!(x.dims, out.dims, "conv keeps the size");
    assert!(off + w.out_ch <= out.c, "conv output channels");
    let [_, h, wd] = x.dims;
    let ci = x.c;
    // Tap offsets from the padded voxel at the output's (z, y, x) corner.
    let taps: Vec<usize> = if w.kernel == 3 {
        (0..27).map(|t| ((t / 9 * (h + 2) + t / 3 % 3) * (wd + 2) + t % 3) * ci).collect()
    } else {
        vec![(((h + 2) + 1) * (wd + 2) + 1) * ci]
    };
    let oc = out.c;
    let xw = &x.data;
    let plane_in = x.plane();
    let n = w.out_ch;
    let starts = row_starts(out.dims, oc, off);
    out.interior_planes_mut()
        .map(|(z, oplane)| {
            for p in 0..w.packed.panels() {
                let panel = w.packed.panel(p);
                let nc = w.packed.panel_cols(p);
                let bias = w.bias.as_ref().map(|b| &b[p * NR..][..NR]);
                // One call per row (the micro-kernel walks it MR voxels at a time).
                for y in 0..h {
                    let tile = Tile {
                        a: &xw[z * plane_in + y * (wd + 2) * ci..],
                        a_offs: &taps,
                        lda: ci,
                        kc: ci,
                        b: panel,
                        bias,
                        accumulate: false,
                        ldc: oc,
                        mr: wd,
                        nc,
                    };
                    tile.run(kernels, &mut oplane[((y + 1) * (wd + 2) + 1) * oc + off + p * NR..]);
                }
            }
            RowMoments::of_rows(kernels, oplane, &starts, oc, wd, n)
        })
        .reduce(|| RowMoments::new(n), |a, b| a.merge(&b))
        .norm_stats()
}

/// A channel-first array's planes (`plane` values each, `d0` per channel) grouped by z: plane z
/// of channel k is segment `k * d0 + z`, so each z-plane task gets its channels' segments and
/// writes them as sequential streams.
fn planes_by_z(out: &mut [f32], d0: usize, plane: usize) -> Vec<Vec<&mut [f32]>> {
    let mut by_z: Vec<Vec<&mut [f32]>> = (0..d0).map(|_| Vec::new()).collect();
    for (i, seg) in out.chunks_mut(plane).enumerate() {
        by_z[i % d0].push(seg);
    }
    by_z
}

/// Runs the 1x1x1 convolution `w` on `x` straight into a channel-first array `out` (`out_ch`
/// planes of `x`'s interior), one x-row at a time through an L1 scratch row: the model's last
/// layer, whose logits would otherwise be written channel-last and read back to transpose them
/// (100 MB of traffic at 96^3 and 14 classes).
pub fn conv1x1_channel_first(kernels: F32Kernels, x: &Vol, w: &ConvWeights, out: &mut [f32]) {
    assert_eq!((x.c, w.kernel), (w.in_ch, 1), "a 1x1x1 conv on its input channels");
    let [d0, h, wd] = x.dims;
    let (ci, co, pv) = (x.c, w.out_ch, h * wd);
    assert_eq!(out.len(), co * d0 * pv, "channel-first output size");
    let taps = [0usize];
    let ldc = w.packed.panels() * NR;
    planes_by_z(out, d0, pv).into_par_iter().enumerate().for_each_init(Vec::new, |row, (z, mut segs)| {
        row.resize(wd * ldc, 0.0);
        for y in 0..h {
            for p in 0..w.packed.panels() {
                let tile = Tile {
                    a: &x.data[x.at(z + 1, y + 1, 1)..],
                    a_offs: &taps,
                    lda: ci,
                    kc: ci,
                    b: w.packed.panel(p),
                    bias: w.bias.as_ref().map(|b| &b[p * NR..][..NR]),
                    accumulate: false,
                    ldc,
                    mr: wd,
                    nc: w.packed.panel_cols(p),
                };
                tile.run(kernels, &mut row[p * NR..]);
            }
            for (k, seg) in segs.iter_mut().enumerate() {
                for (o, v) in seg[y * wd..(y + 1) * wd].iter_mut().zip(row.chunks_exact(ldc)) {
                    *o = v[k];
                }
            }
        }
    });
}

/// A 2x2x2 stride-2 transposed convolution (no bias), one packed `(in_ch, out_ch)` matrix per tap.
#[derive(Clone, Debug)]
pub struct UpConvWeights {
    taps: Vec<PackedB>,
    in_ch: usize,
    out_ch: usize,
}

impl UpConvWeights {
    /// From a PyTorch `(in, out, 2, 2, 2)` ConvTranspose3d weight.
    pub fn new(w: &Tensor<'_>) -> Self {
        let d = w.shape();
        let d = d.dims();
        Self::from_fn(d[0] as usize, d[1] as usize, |i| w.get(i))
    }

    /// From `weight(i)`, element `i` of a row-major `(in, out, 2, 2, 2)` weight.
    pub fn from_fn(in_ch: usize, out_ch: usize, weight: impl Fn(usize) -> f32) -> Self {
        let taps = (0..8)
            .map(|t| PackedB::from_fn(in_ch, out_ch, |ci, co| weight((ci * out_ch + co) * 8 + t)))
            .collect();
        Self { taps, in_ch, out_ch }
    }

    /// Output channels.
    pub fn out_ch(&self) -> usize {
        self.out_ch
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        self.taps.iter().map(PackedB::bytes).sum()
    }

    /// Multiply-adds per input voxel.
    pub fn macs_per_input_voxel(&self) -> usize {
        8 * self.in_ch * self.out_ch
    }
}

/// Runs `w` on `x` into channels `off..off + w.out_ch()` of `out`, whose interior is twice `x`'s.
pub fn conv_transpose(kernels: F32Kernels, x: &Vol, w: &UpConvWeights, out: &mut Vol, off: usize) {
    assert_eq!(x.c, w.in_ch, "transposed conv input channels");
    assert_eq!(out.dims, x.dims.map(|d| 2 * d), "transposed conv doubles the size");
    assert!(off + w.out_ch <= out.c, "transposed conv output channels");
    let [d0, h, wd] = x.dims;
    let (ci, oc, ow) = (x.c, out.c, 2 * wd + 2);
    let oplane = out.plane();
    let xw = &x.data;
    let offs = [0usize];
    // Input plane z writes output planes 2z and 2z + 1 (padded 2z + 1, 2z + 2): one chunk.
    // All eight taps of one input row run together, so the four output rows they write stay
    // in L1 (tap by tap over whole planes, 32 -> 16 channels at 48^3 -> 96^3 took 32 ms: the
    // two output planes, 1.2 MB, went through L3 eight times).
    out.data[oplane..(2 * d0 + 1) * oplane].par_chunks_mut(2 * oplane).enumerate().for_each(|(z, chunk)| {
        for y in 0..h {
            for (t, packed) in w.taps.iter().enumerate() {
                let (a, b, c) = (t / 4, t / 2 % 2, t % 2);
                for p in 0..packed.panels() {
                    let panel = packed.panel(p);
                    let nc = packed.panel_cols(p);
                    // One call per row (the micro-kernel walks it MR voxels at a time).
                    let tile = Tile {
                        a: &xw[x.at(z + 1, y + 1, 1)..],
                        a_offs: &offs,
                        lda: ci,
                        kc: ci,
                        b: panel,
                        bias: None,
                        accumulate: false,
                        // Neighbouring input voxels land two output voxels apart.
                        ldc: 2 * oc,
                        mr: wd,
                        nc,
                    };
                    let c0 = a * oplane + ((2 * y + b + 1) * ow + c + 1) * oc + off + p * NR;
                    tile.run(kernels, &mut chunk[c0..]);
                }
            }
        }
    });
}

/// InstanceNorm (no affine) of a channel range as `y = x * scale + shift`, `scale` being
/// `1 / sqrt(var + eps)` and `shift` `-mean * scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct NormStats {
    /// Per channel.
    pub scale: Vec<f32>,
    /// Per channel.
    pub shift: Vec<f32>,
}

impl NormStats {
    /// The identity, for an un-normalised residual.
    pub fn identity(n: usize) -> Self {
        Self { scale: vec![1.0; n], shift: vec![0.0; n] }
    }
}

/// Running count, mean and sum of squared deviations, merged with Chan et al.'s formula.
#[derive(Clone, Copy, Debug, Default)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn merge(self, o: Moments) -> Moments {
        let n = self.n + o.n;
        if n == 0.0 {
            return self;
        }
        let d = o.mean - self.mean;
        Moments { n, mean: self.mean + d * o.n / n, m2: self.m2 + o.m2 + d * d * self.n * o.n / n }
    }
}

/// Per-channel moments of a channel range, gathered a set of x-rows at a time (a Winograd block's
/// outputs, an InstanceNorm plane): the set's mean and squared deviations are computed in f32
/// while it sits in cache (two passes, so no cancellation), then merged into f64 totals.
#[derive(Clone, Debug)]
pub struct RowMoments {
    acc: Vec<Moments>,
}

impl RowMoments {
    /// No rows yet, `n` channels.
    pub fn new(n: usize) -> Self {
        Self { acc: vec![Moments::default(); n] }
    }

    /// Adds the rows of `voxels` voxels (stride `c` values) starting at `data[start]` for each
    /// of `starts`, channels `0..n`, on `kernels` (the same values on each).
    pub fn add_rows(&mut self, kernels: F32Kernels, data: &[f32], starts: &[usize], c: usize, voxels: usize) {
        let n = self.acc.len();
        if starts.is_empty() || voxels == 0 {
            return;
        }
        // Every value read, checked once here: the AVX2 sums index without checks.
        let last = starts.iter().max().map_or(0, |&s| s + (voxels - 1) * c + n);
        assert!(last <= data.len() && n <= c, "moment rows out of bounds");
        let mut g = 0;
        while g + 8 <= n {
            let sums = |mean: Option<[f32; 8]>| {
                #[cfg(target_arch = "x86_64")]
                if kernels.avx2() {
                    // SAFETY: an `F32Kernels` that runs the AVX2 code exists only where the CPU
                    // has AVX2 and FMA; the assert above bounds every row's 8 channels from `g`.
                    return unsafe { lane_sums8_avx2(data, starts, g, c, voxels, mean) };
                }
                lane_sums::<8>(data, starts, g, c, voxels, mean)
            };
            self.add_channels::<8>(starts.len() * voxels, g, sums);
            g += 8;
        }
        for g in g..n {
            self.add_channels::<1>(starts.len() * voxels, g, |mean| {
                lane_sums(data, starts, g, c, voxels, mean)
            });
        }
    }

    /// Merges the moments of `count` values of channels `g..g + W` into the totals: their mean,
    /// then their squared deviations from it (two passes of `sums` while the values sit in
    /// cache, so no cancellation), summed in f32, merged in f64.
    #[inline(always)]
    fn add_channels<const W: usize>(
        &mut self,
        count: usize,
        g: usize,
        sums: impl Fn(Option<[f32; W]>) -> [f32; W],
    ) {
        let inv = 1.0 / count as f32;
        let mean = sums(None).map(|s| s * inv);
        let m2 = sums(Some(mean));
        for k in 0..W {
            let a = &mut self.acc[g + k];
            *a = a.merge(Moments { n: count as f64, mean: mean[k] as f64, m2: m2[k] as f64 });
        }
    }

    /// The moments of `n` channels of the rows [`Self::add_rows`] describes.
    fn of_rows(
        kernels: F32Kernels,
        data: &[f32],
        starts: &[usize],
        c: usize,
        voxels: usize,
        n: usize,
    ) -> Self {
        let mut m = Self::new(n);
        m.add_rows(kernels, data, starts, c, voxels);
        m
    }

    /// Both sets of rows.
    pub fn merge(mut self, o: &Self) -> Self {
        for (a, b) in self.acc.iter_mut().zip(&o.acc) {
            *a = a.merge(*b);
        }
        self
    }

    /// The InstanceNorm these moments call for.
    pub fn norm_stats(&self) -> NormStats {
        let scale: Vec<f32> = self
            .acc
            .iter()
            .map(|m| 1.0 / ((m.m2 / m.n.max(1.0)) as f32 + INSTANCE_NORM_EPS).sqrt())
            .collect();
        let shift = self.acc.iter().zip(&scale).map(|(m, &s)| -(m.mean as f32) * s).collect();
        NormStats { scale, shift }
    }
}

/// `sum x` (`mean` `None`) or `sum (x - mean)^2` over channels `g..g + W` of voxels
/// `0..voxels` (stride `c`) of each row starting at `data[start]`, in f32, in four slots
/// (consecutive voxels do not wait on one another's additions; voxel `i` of a quad in slot `i`,
/// the rest in slot 0), the slots summed at the end: the portable form of [`lane_sums8_avx2`],
/// with the same values.
fn lane_sums<const W: usize>(
    data: &[f32],
    starts: &[usize],
    g: usize,
    c: usize,
    voxels: usize,
    mean: Option<[f32; W]>,
) -> [f32; W] {
    let f = |i: usize| -> [f32; W] {
        let mut x = [0.0; W];
        x.copy_from_slice(&data[i..][..W]);
        if let Some(m) = mean {
            for k in 0..W {
                x[k] = (x[k] - m[k]) * (x[k] - m[k]);
            }
        }
        x
    };
    let quads = voxels / 4 * 4;
    let mut s = [[0.0f32; W]; 4];
    for &start in starts {
        let at = |i: usize| start + g + i * c;
        for i in (0..quads).step_by(4) {
            for (j, sj) in s.iter_mut().enumerate() {
                let x = f(at(i + j));
                for k in 0..W {
                    sj[k] += x[k];
                }
            }
        }
        for i in quads..voxels {
            let x = f(at(i));
            for k in 0..W {
                s[0][k] += x[k];
            }
        }
    }
    std::array::from_fn(|k| s[0][k] + s[1][k] + s[2][k] + s[3][k])
}

/// [`lane_sums`] for eight channels in AVX2 registers (same operations, same order, no fused
/// multiply-add, so the same values). Written out because LLVM vectorised the portable form's
/// second pass badly: it kept one slot in scalars and rebuilt it lane by lane (the moments
/// took 6% of a window).
///
/// # Safety
/// The CPU has AVX2; `data` holds `start + g + (voxels - 1) * c + 8` values for every start.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lane_sums8_avx2(
    data: &[f32],
    starts: &[usize],
    g: usize,
    c: usize,
    voxels: usize,
    mean: Option<[f32; 8]>,
) -> [f32; 8] {
    use std::arch::x86_64::*;
    let mut out = [0.0f32; 8];
    // SAFETY: (the whole body) the contract bounds every load; the CPU has AVX2.
    unsafe {
        let p = data.as_ptr().add(g);
        let s = match mean {
            None => slots8(p, starts, c, voxels, |x| x),
            Some(m) => {
                let m = _mm256_loadu_ps(m.as_ptr());
                slots8(p, starts, c, voxels, |x| {
                    let d = _mm256_sub_ps(x, m);
                    _mm256_mul_ps(d, d)
                })
            }
        };
        let t = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), s[2]), s[3]);
        _mm256_storeu_ps(out.as_mut_ptr(), t);
    }
    out
}

/// [`lane_sums8_avx2`]'s four slots of `sum f(x)`, inlined into it (so compiled with AVX2).
///
/// # Safety
/// As for [`lane_sums8_avx2`], with `p` its `data` from channel `g`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn slots8(
    p: *const f32,
    starts: &[usize],
    c: usize,
    voxels: usize,
    f: impl Fn(std::arch::x86_64::__m256) -> std::arch::x86_64::__m256,
) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    let quads = voxels / 4 * 4;
    // SAFETY: (the whole body) the caller's contract.
    unsafe {
        let mut s = [_mm256_setzero_ps(); 4];
        for &start in starts {
            let row = p.add(start);
            for i in (0..quads).step_by(4) {
                for (j, sj) in s.iter_mut().enumerate() {
                    *sj = _mm256_add_ps(*sj, f(_mm256_loadu_ps(row.add((i + j) * c))));
                }
            }
            for i in quads..voxels {
                s[0] = _mm256_add_ps(s[0], f(_mm256_loadu_ps(row.add(i * c))));
            }
        }
        s
    }
}

/// InstanceNorm statistics of channels `off..off + n` of `x`, in one pass over memory
/// ([`RowMoments`]).
pub fn instance_stats(kernels: F32Kernels, x: &Vol, off: usize, n: usize) -> NormStats {
    let [d0, _, wd] = x.dims;
    let (plane, c) = (x.plane(), x.c);
    let starts = row_starts(x.dims, c, off);
    x.data[plane..(d0 + 1) * plane]
        .par_chunks(plane)
        .map(|pl| RowMoments::of_rows(kernels, pl, &starts, c, wd, n))
        .reduce(|| RowMoments::new(n), |a, b| a.merge(&b))
        .norm_stats()
}

/// Where each interior x-row of a padded plane of a volume of interior size `dims` with `c`
/// channels starts, at channel `off`: the rows [`RowMoments::add_rows`] reads for one plane.
fn row_starts(dims: Dims3, c: usize, off: usize) -> Vec<usize> {
    let [_, h, wd] = dims;
    (0..h).map(|y| ((y + 1) * (wd + 2) + 1) * c + off).collect()
}

#[inline]
fn lrelu(v: f32) -> f32 {
    if v < 0.0 { v * LEAKY_RELU_SLOPE } else { v }
}

/// `if a > m { a } else { m }`: unlike `f32::max`, vectorises in reductions (no NaN rules).
#[inline]
fn bigger(m: f32, a: f32) -> f32 {
    if a > m { a } else { m }
}

/// Largest `|value|` over channels `off..off + n` of `x`'s interior.
pub fn abs_max(x: &Vol, off: usize, n: usize) -> f32 {
    let [d0, h, wd] = x.dims;
    let (plane, c) = (x.plane(), x.c);
    x.data[plane..(d0 + 1) * plane]
        .par_chunks(plane)
        .map(|pl| {
            let mut m = vec![0.0f32; n];
            for y in 0..h {
                let r0 = ((y + 1) * (wd + 2) + 1) * c + off;
                for v in pl[r0..r0 + (wd - 1) * c + n].chunks(c) {
                    for (mm, &val) in m.iter_mut().zip(&v[..n]) {
                        *mm = bigger(*mm, val.abs());
                    }
                }
            }
            m.into_iter().fold(0.0, bigger)
        })
        .reduce(|| 0.0, bigger)
}

/// Normalises channels `off..off + stats.scale.len()` of `x` in place, then LeakyReLU.
pub fn norm_lrelu(kernels: F32Kernels, x: &mut Vol, off: usize, stats: &NormStats) {
    let [_, h, wd] = x.dims;
    let (c, n) = (x.c, stats.scale.len());
    let (scale, shift) = (&stats.scale[..n], &stats.shift[..n]);
    let rows = (h, wd, c, off);
    x.interior_planes_mut().for_each(|(_, pl)| {
        on_kernels!(kernels, norm_lrelu_plane_avx2, norm_lrelu_plane(pl, rows, scale, shift))
    });
}

/// [`norm_lrelu`] on one padded plane; `rows` is `(h, wd, c, off)`.
#[inline(always)]
fn norm_lrelu_plane(pl: &mut [f32], rows: (usize, usize, usize, usize), scale: &[f32], shift: &[f32]) {
    let ((h, wd, c, off), n) = (rows, scale.len());
    for y in 0..h {
        let r0 = ((y + 1) * (wd + 2) + 1) * c + off;
        for v in pl[r0..r0 + (wd - 1) * c + n].chunks_mut(c) {
            for ((val, &s), &b) in v[..n].iter_mut().zip(scale).zip(shift) {
                *val = lrelu(*val * s + b);
            }
        }
    }
}
avx2_copy!(norm_lrelu_plane_avx2 = norm_lrelu_plane(pl: &mut [f32], rows: (usize, usize, usize, usize), scale: &[f32], shift: &[f32]));

/// The end of a residual block: `out = lrelu(norm(out) + norm_r(r))` over channels `off..` of
/// `out`, where `r` is channels `0..` of `res` and `norm_r` its statistics (identity when the
/// residual is the block's input).
pub fn norm_add_lrelu(
    kernels: F32Kernels,
    out: &mut Vol,
    off: usize,
    stats: &NormStats,
    res: &Vol,
    res_stats: &NormStats,
) {
    assert_eq!(out.dims, res.dims);
    let [_, h, wd] = out.dims;
    let (c, rc, n) = (out.c, res.c, stats.scale.len());
    assert!(n <= rc && res_stats.scale.len() == n);
    let (scale, shift) = (&stats.scale[..n], &stats.shift[..n]);
    let (rscale, rshift) = (&res_stats.scale[..n], &res_stats.shift[..n]);
    let rplane = res.plane();
    let norms = [scale, shift, rscale, rshift];
    out.interior_planes_mut().for_each(|(z, pl)| {
        let rpl = &res.data[(z + 1) * rplane..][..rplane];
        on_kernels!(
            kernels,
            norm_add_lrelu_plane_avx2,
            norm_add_lrelu_plane(pl, rpl, (h, wd, c, off, rc), norms)
        )
    });
}

/// [`norm_add_lrelu`] on one padded plane of the output and of the residual; `g` is
/// `(h, wd, c, off, rc)`, `norms` the output's scale and shift, then the residual's.
#[inline(always)]
fn norm_add_lrelu_plane(
    pl: &mut [f32],
    rpl: &[f32],
    g: (usize, usize, usize, usize, usize),
    norms: [&[f32]; 4],
) {
    let ((h, wd, c, off, rc), [scale, shift, rscale, rshift]) = (g, norms);
    let n = scale.len();
    for y in 0..h {
        let r0 = ((y + 1) * (wd + 2) + 1) * c + off;
        let q0 = ((y + 1) * (wd + 2) + 1) * rc;
        let rows =
            pl[r0..r0 + (wd - 1) * c + n].chunks_mut(c).zip(rpl[q0..q0 + (wd - 1) * rc + n].chunks(rc));
        for (v, r) in rows {
            for (((val, &rv), (&s, &b)), (&rs, &rb)) in
                v[..n].iter_mut().zip(&r[..n]).zip(scale.iter().zip(shift)).zip(rscale.iter().zip(rshift))
            {
                *val = lrelu(*val * s + b + (rv * rs + rb));
            }
        }
    }
}
avx2_copy!(
    norm_add_lrelu_plane_avx2 =
        norm_add_lrelu_plane(pl: &mut [f32], rpl: &[f32], g: (usize, usize, usize, usize, usize), norms: [&[f32]; 4])
);

#[cfg(test)]
mod tests {
    use super::super::kernels::for_each_f32_kernels;
    use super::*;

    /// Large offsets and one outlier must not cost the one-pass statistics their precision, on
    /// every kernel set (ten channels: one eight-channel group, which the AVX2 set sums in
    /// registers, and two single channels), and every set computes the portable set's values.
    #[test]
    fn instance_stats_match_two_pass_f64() {
        let (d, n) = ([5, 7, 33], 10);
        let mut x = Vol::zeros(d, n + 2);
        let mut vals = vec![Vec::new(); n];
        for z in 0..d[0] {
            for y in 0..d[1] {
                for xx in 0..d[2] {
                    let i = x.at(z + 1, y + 1, xx + 1);
                    let t = (z * 31 + y * 7 + xx) as f32;
                    x.data[i] = f32::NAN; // outside the range: must not be read
                    x.data[i + n + 1] = f32::NAN;
                    for (c, vc) in vals.iter_mut().enumerate() {
                        let v = match c % 3 {
                            0 => 1000.0 * (c + 1) as f32 + (t * 0.37 + c as f32).sin(),
                            1 if t == 0.0 => 500.0,
                            1 => (t * 0.11).cos() * 1e-3,
                            _ => -3.0 + (t * 0.05 * c as f32).cos(),
                        };
                        x.data[i + 1 + c] = v;
                        vc.push(v as f64);
                    }
                }
            }
        }
        let portable = instance_stats(F32Kernels::PORTABLE, &x, 1, n);
        for kernels in F32Kernels::all() {
            let s = instance_stats(kernels, &x, 1, n);
            assert_eq!(s, portable, "{kernels:?} against the portable kernels");
        }
        for (c, v) in vals.iter().enumerate() {
            let len = v.len() as f64;
            let mean = v.iter().sum::<f64>() / len;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / len;
            let scale = 1.0 / (var + INSTANCE_NORM_EPS as f64).sqrt();
            let s = &portable;
            assert!((s.scale[c] as f64 / scale - 1.0).abs() < 1e-5, "channel {c}: {} vs {scale}", s.scale[c]);
            assert!(
                (s.shift[c] as f64 + mean * scale).abs() < 1e-4 * (1.0 + (mean * scale).abs()),
                "channel {c}"
            );
        }
    }

    /// The direct convolution kernels' conformance tests for one kernel set (`$kernels`, an
    /// `Option<F32Kernels>`: `None` where this CPU lacks it), in module `$name`.
    macro_rules! conv_conformance {
        ($name:ident, $kernels:expr) => {
            mod $name {
                use super::*;

                /// The fused output layer equals a 1x1x1 convolution followed by the layout
                /// change, for more classes than one 16-column panel.
                #[test]
                fn channel_first_1x1_matches_conv_then_transpose() {
                    if let Some(k) = $kernels {
                        channel_first_1x1_matches_conv_then_transpose_on(k);
                    }
                }

                /// The 3x3x3 implicit GEMM against an f64 convolution.
                #[test]
                fn conv3_matches_f64() {
                    if let Some(k) = $kernels {
                        conv3_matches_f64_on(k);
                    }
                }

                /// The transposed convolution against an f64 one.
                #[test]
                fn conv_transpose_matches_f64() {
                    if let Some(k) = $kernels {
                        conv_transpose_matches_f64_on(k);
                    }
                }
            }
        };
    }

    for_each_f32_kernels!(conv_conformance);

    fn channel_first_1x1_matches_conv_then_transpose_on(kernels: F32Kernels) {
        let (ci, co, d) = (5, 21, [3, 4, 7]);
        let w = super::super::lcg(co * ci, 1);
        let bias = super::super::lcg(co, 2);
        let cw = ConvWeights::from_fn(co, ci, 1, |i| w[i], Some(&bias));
        let vals = super::super::lcg(ci * 84, 3);
        let x = Vol::from_channel_first(&vals, d, ci);
        let mut want = Vol::zeros(d, co);
        conv(kernels, &x, &cw, &mut want, 0);
        let mut got = vec![f32::NAN; co * 84];
        conv1x1_channel_first(kernels, &x, &cw, &mut got);
        assert_eq!(got, want.to_channel_first(0, co), "{kernels:?}");
    }

    /// Odd sizes and channel counts (tails of the 6-row tiles and 16-column panels), an output
    /// channel offset; channels outside the written range stay untouched; the returned
    /// statistics are the output's.
    fn conv3_matches_f64_on(kernels: F32Kernels) {
        let (ci, co, d) = (5, 19, [3, 4, 7]);
        let w = super::super::lcg(co * ci * 27, 4);
        let bias = super::super::lcg(co, 5);
        let cw = ConvWeights::from_fn(co, ci, 3, |i| w[i], Some(&bias));
        let x = Vol::from_channel_first(&super::super::lcg(ci * 84, 6), d, ci);
        let mut got = Vol::zeros(d, co + 2);
        got.data.fill(7.0);
        let stats = conv(kernels, &x, &cw, &mut got, 1);
        // The statistics gathered as the planes are written are those of the written channels
        // (up to the order the planes' f64 totals are merged in).
        let want = instance_stats(kernels, &got, 1, co);
        for (g, w) in stats.scale.iter().chain(&stats.shift).zip(want.scale.iter().chain(&want.shift)) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{kernels:?} conv statistics: {g} vs {w}");
        }
        for z in 1..=d[0] {
            for y in 1..=d[1] {
                for xx in 1..=d[2] {
                    let o = got.at(z, y, xx);
                    assert_eq!((got.data[o], got.data[o + co + 1]), (7.0, 7.0), "{kernels:?} wrote outside");
                    for c in 0..co {
                        let mut e = bias[c] as f64;
                        for k in 0..ci {
                            for t in 0..27 {
                                let v = x.data[x.at(z + t / 9 - 1, y + t / 3 % 3 - 1, xx + t % 3 - 1) + k];
                                e += w[(c * ci + k) * 27 + t] as f64 * v as f64;
                            }
                        }
                        let g = got.data[o + 1 + c] as f64;
                        assert!(
                            (g - e).abs() < 1e-5 * (1.0 + e.abs()),
                            "{kernels:?} ({z},{y},{xx}) ch {c}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// Odd sizes and channel counts, an output channel offset.
    fn conv_transpose_matches_f64_on(kernels: F32Kernels) {
        let (ci, co, d) = (6, 17, [2, 3, 5]);
        let w = super::super::lcg(ci * co * 8, 7);
        let uw = UpConvWeights::from_fn(ci, co, |i| w[i]);
        let x = Vol::from_channel_first(&super::super::lcg(ci * 30, 8), d, ci);
        let mut got = Vol::zeros(d.map(|v| 2 * v), co + 3);
        conv_transpose(kernels, &x, &uw, &mut got, 2);
        for z in 0..2 * d[0] {
            for y in 0..2 * d[1] {
                for xx in 0..2 * d[2] {
                    let o = got.at(z + 1, y + 1, xx + 1);
                    let src = x.at(z / 2 + 1, y / 2 + 1, xx / 2 + 1);
                    let t = (z % 2) * 4 + (y % 2) * 2 + xx % 2;
                    for c in 0..co {
                        let e: f64 =
                            (0..ci).map(|k| x.data[src + k] as f64 * w[(k * co + c) * 8 + t] as f64).sum();
                        let g = got.data[o + 2 + c] as f64;
                        assert!(
                            (g - e).abs() < 1e-5 * (1.0 + e.abs()),
                            "{kernels:?} ({z},{y},{xx}) ch {c}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// The layout round trip and the border the convolutions rely on.
    #[test]
    fn channel_first_round_trip_and_zero_border() {
        let d = [3, 4, 5];
        let x: Vec<f32> = (0..2 * 60).map(|i| i as f32).collect();
        let v = Vol::from_channel_first(&x, d, 2);
        assert_eq!(v.to_channel_first(0, 2), x);
        assert_eq!(v.to_channel_first(1, 1), x[60..]);
        let r = Vol::reuse(vec![7.0; v.data.len() + 10], d, 2);
        assert_eq!(r.data.len(), v.data.len());
        for z in 0..5 {
            for y in 0..6 {
                for xx in 0..7 {
                    if z == 0 || y == 0 || xx == 0 || z == 4 || y == 5 || xx == 6 {
                        assert_eq!(&r.data[r.at(z, y, xx)..][..2], &[0.0, 0.0]);
                    }
                }
            }
        }
    }
}
