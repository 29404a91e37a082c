//! 3x3x3 convolutions (padding 1) by Winograd's minimal filtering (Lavin and Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016), in two sizes ([`Variant`]):
//!
//! - F(2x2x2, 3x3x3): each 2x2x2 block of outputs comes from a 4x4x4 block of input as 64
//!   independent channel products instead of 8 x 27 (3.4x fewer multiply-adds). Its transforms
//!   are additions only, so it also runs on integers ([`QWinogradWeights`]).
//! - F(4x4x4, 3x3x3): 4x4x4 outputs from a 6x6x6 input block, 216 products instead of 64 x 27
//!   (8x fewer), and 3.4 transformed values per output instead of 8: less memory traffic where
//!   the transforms dominate (few channels, large volumes). Its transforms multiply by up to 8 in
//!   each dimension, so it stays f32.
//!
//! The price is a transform of every input and output block, more weight memory (64/27 or
//! 216/27 times), and rounding that differs from the direct sum by a few f32 ulps of the
//! activations (more for F(4, 3); the agreement tests bound both).
//!
//! Work goes in blocks of tiles (tiles of one output z-slab, so the block's transformed data, a
//! few hundred KB, stays in L2):
//! 1. input transform `V = Bt d B` of each tile, stored tile-major as `[tile][position][in_ch]`
//!    (each tile writes one contiguous run);
//! 2. one GEMM `M_p = V_p U_p` per position on the register-tiled micro-kernel ([`super::gemm`]),
//!    `U_p` being the transformed weights of position `p`, reading `V_p` as rows of stride
//!    `positions * in_ch` and writing `M` as `[tile][position][out_ch]`;
//! 3. output transform `Y = At M A`, plus bias, into the channel-last output.
//!
//! Output z-slabs are split across the rayon pool.

use std::cell::RefCell;

use rayon::prelude::*;

use super::conv::{NormStats, RowMoments, Vol};
use super::gemm::{Isa, NR, PackedB, Tile, pad_bias};
use super::qconv::{QIsa, QTile};

/// Which Winograd algorithm: F(2x2x2, 3x3x3) or F(4x4x4, 3x3x3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// 2x2x2 output tiles from 4x4x4 input blocks.
    F2,
    /// 4x4x4 output tiles from 6x6x6 input blocks.
    F4,
}

impl Variant {
    /// Edge of an output tile.
    pub const fn edge(self) -> usize {
        match self {
            Variant::F2 => 2,
            Variant::F4 => 4,
        }
    }

    /// Positions of a transformed tile: `(edge + 2)^3`.
    pub const fn positions(self) -> usize {
        let a = self.edge() + 2;
        a * a * a
    }

    /// Whether a volume of interior size `dims` is whole tiles.
    pub fn fits(self, dims: [usize; 3]) -> bool {
        dims.iter().all(|d| d % self.edge() == 0)
    }

    /// Tiles per block: enough GEMM rows for the micro-kernel to amortise its B loads, few
    /// enough for the block's transformed inputs and products to stay in L2 (1 MiB here). For
    /// F(4, 3), 6, 12 and 24 tiles timed the same within noise (16 -> 16 channels at 96^3 and
    /// 64 -> 32 at 48^3).
    const fn block_tiles(self) -> usize {
        match self {
            Variant::F2 => 48,
            Variant::F4 => 12,
        }
    }
}

/// Arithmetic of the transforms, on one f32 (the portable path) or eight (an AVX2 register).
///
/// Safety of every method: for AVX2 registers, the CPU supports AVX2 and FMA.
trait Lanes: Copy {
    /// `self + o`.
    unsafe fn add(self, o: Self) -> Self;
    /// `self - o`.
    unsafe fn sub(self, o: Self) -> Self;
    /// `self * k + o`.
    unsafe fn mul_add(self, k: f32, o: Self) -> Self;
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    unsafe fn mul_add(self, k: f32, o: Self) -> Self {
        self * k + o
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for core::arch::x86_64::__m256 {
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        // SAFETY: the trait's contract.
        unsafe { core::arch::x86_64::_mm256_add_ps(self, o) }
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        // SAFETY: the trait's contract.
        unsafe { core::arch::x86_64::_mm256_sub_ps(self, o) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, k: f32, o: Self) -> Self {
        use core::arch::x86_64::*;
        // SAFETY: the trait's contract.
        unsafe { _mm256_fmadd_ps(self, _mm256_set1_ps(k), o) }
    }
}

/// The three matrices of F(M, 3) on `A = M + 2` points: `G` (weights, applied at load time in
/// f64), `Bt` (inputs) and `At` (outputs) as straight-line code.
trait Points<const M: usize, const A: usize> {
    /// `G`, the kernel transform (rows of weights for the 3 taps).
    const G: [[f64; 3]; A];

    /// `Bt d`.
    ///
    /// # Safety
    /// As [`Lanes`].
    unsafe fn bt<L: Lanes>(d: [L; A]) -> [L; A];

    /// `At m`.
    ///
    /// # Safety
    /// As [`Lanes`].
    unsafe fn at<L: Lanes>(m: [L; A]) -> [L; M];
}

/// F(2, 3) on the points 0, 1, -1 and infinity.
struct F2;

impl Points<2, 4> for F2 {
    const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

    #[inline(always)]
    unsafe fn bt<L: Lanes>([a, b, c, e]: [L; 4]) -> [L; 4] {
        // SAFETY: the caller's.
        unsafe { [a.sub(c), b.add(c), c.sub(b), b.sub(e)] }
    }

    #[inline(always)]
    unsafe fn at<L: Lanes>([a, b, c, e]: [L; 4]) -> [L; 2] {
        // SAFETY: the caller's.
        unsafe { [a.add(b).add(c), b.sub(c).sub(e)] }
    }
}

/// F(4, 3) on the points 0, 1, -1, 2, -2 and infinity (Lavin and Gray's matrices).
struct F4;

impl Points<4, 6> for F4 {
    const G: [[f64; 3]; 6] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];

    /// Rows `[4 0 -5 0 1 0]`, `[0 -4 -4 1 1 0]`, `[0 4 -4 -1 1 0]`, `[0 -2 -1 2 1 0]`,
    /// `[0 2 -1 -2 1 0]`, `[0 4 0 -5 0 1]`, sharing the sums of the middle four.
    #[inline(always)]
    unsafe fn bt<L: Lanes>([d0, d1, d2, d3, d4, d5]: [L; 6]) -> [L; 6] {
        // SAFETY: the caller's.
        unsafe {
            let (s12, s34) = (d1.add(d2), d3.add(d4));
            let (d12, d43) = (d1.sub(d2), d4.sub(d3));
            let (d13, d42) = (d1.sub(d3), d4.sub(d2));
            [
                d0.mul_add(4.0, d2.mul_add(-5.0, d4)),
                s12.mul_add(-4.0, s34),
                d12.mul_add(4.0, d43),
                d13.mul_add(-2.0, d42),
                d13.mul_add(2.0, d42),
                d1.mul_add(4.0, d3.mul_add(-5.0, d5)),
            ]
        }
    }

    /// Rows `[1 1 1 1 1 0]`, `[0 1 -1 2 -2 0]`, `[0 1 1 4 4 0]`, `[0 1 -1 8 -8 1]`.
    #[inline(always)]
    unsafe fn at<L: Lanes>([m0, m1, m2, m3, m4, m5]: [L; 6]) -> [L; 4] {
        // SAFETY: the caller's.
        unsafe {
            let (s12, s34) = (m1.add(m2), m3.add(m4));
            let (d12, d34) = (m1.sub(m2), m3.sub(m4));
            [
                m0.add(s12).add(s34),
                d34.mul_add(2.0, d12),
                s34.mul_add(4.0, s12),
                d34.mul_add(8.0, d12).add(m5),
            ]
        }
    }
}

/// A 3x3x3 convolution's weights transformed for Winograd: one packed `(in_ch, out_ch)` matrix
/// per position of the transformed tile.
#[derive(Clone, Debug)]
pub struct WinogradWeights {
    variant: Variant,
    u: Vec<PackedB>,
    bias: Vec<f32>,
    in_ch: usize,
    out_ch: usize,
}

impl WinogradWeights {
    /// The engine runs Winograd from this many input channels on (one AVX register of the
    /// transforms). At 8 -> 16 channels on 96^3 F(2, 3) took 50 ms against 62 direct; at 4
    /// (the transforms' portable path) 111 against 33.
    pub const MIN_IN_CH: usize = 8;

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
        Self { variant: k.variant, u, bias: padded_bias(bias, out_ch), in_ch, out_ch }
    }

    /// The algorithm these weights are transformed for.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Whether these weights run on a volume of interior size `dims` (whole tiles only).
    pub fn fits(&self, dims: [usize; 3]) -> bool {
        self.variant.fits(dims)
    }

    /// Output channels.
    pub fn out_ch(&self) -> usize {
        self.out_ch
    }

    /// Bytes of transformed weights.
    pub fn bytes(&self) -> usize {
        self.u.iter().map(PackedB::bytes).sum::<usize>() + self.bias.len() * 4
    }
}

fn padded_bias(bias: Option<&[f32]>, n: usize) -> Vec<f32> {
    pad_bias(bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec).into_iter(), n)
}

/// A 3x3x3 convolution's kernels transformed for one [`Variant`], `G g Gt` along all three
/// axes, in f64 so that the only rounding is that of the packing built from them: for F(2, 3)
/// the f32 one ([`WinogradWeights::new`]) and the integer one ([`QWinogradWeights::new`]) share
/// one transform.
#[derive(Clone, Debug)]
pub struct TransformedKernels {
    variant: Variant,
    /// Element `(co * in_ch + ci) * positions + position`.
    t: Vec<f64>,
    in_ch: usize,
    out_ch: usize,
}

impl TransformedKernels {
    /// From `weight(i)`, element `i` of a row-major `(out, in, 3, 3, 3)` weight.
    pub fn new(variant: Variant, out_ch: usize, in_ch: usize, weight: impl Fn(usize) -> f32) -> Self {
        let t = match variant {
            Variant::F2 => transform_weights(&F2::G, out_ch * in_ch, weight),
            Variant::F4 => transform_weights(&F4::G, out_ch * in_ch, weight),
        };
        Self { variant, t, in_ch, out_ch }
    }
}

/// `G g Gt` (`g` rows of `G`) for each of `kernels` 3x3x3 kernels (`weight(kernel * 27 + k)`):
/// element `kernel * a^3 + position`, position `(z * a + y) * a + x`.
fn transform_weights(g: &[[f64; 3]], kernels: usize, weight: impl Fn(usize) -> f32) -> Vec<f64> {
    let a = g.len();
    let n = a * a * a;
    let mut t = vec![0.0f64; kernels * n];
    let (mut gx, mut gy) = (vec![0.0f64; 9 * a], vec![0.0f64; 3 * a * a]);
    for (kernel, dst) in t.chunks_exact_mut(n).enumerate() {
        let w: [f64; 27] = std::array::from_fn(|k| weight(kernel * 27 + k) as f64);
        // Separable: along x, then y, then z.
        for r in 0..9 {
            for (c, grow) in g.iter().enumerate() {
                gx[r * a + c] = (0..3).map(|k| grow[k] * w[r * 3 + k]).sum();
            }
        }
        for i in 0..3 {
            for (b, grow) in g.iter().enumerate() {
                for c in 0..a {
                    gy[(i * a + b) * a + c] = (0..3).map(|j| grow[j] * gx[(i * 3 + j) * a + c]).sum();
                }
            }
        }
        for (z, grow) in g.iter().enumerate() {
            for bc in 0..a * a {
                dst[z * a * a + bc] = (0..3).map(|i| grow[i] * gy[i * a * a + bc]).sum::<f64>();
            }
        }
    }
    t
}

/// The integer form of [`WinogradWeights`] (F(2, 3) only), for the int8 kernels
/// (`--int8-kernels`): the file's dequantised int8 weights transformed in f64 (the transform is
/// not integer: `G` holds halves), then quantised again per position and output channel to i16
/// levels and packed for `vpdpwssd` as in [`mod@super::qconv`]. Inputs are transformed in f32 and
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
/// the InstanceNorm statistics of those channels, as [`conv_winograd`].
pub fn conv_qwinograd(
    isa: QIsa,
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
    // VNNI implies AVX2 (QIsa::detect checks both) for the f32 transforms.
    let fisa = if isa == QIsa::Vnni { Isa::Avx2Fma } else { Isa::Scalar };
    let g = out_geometry(x.dims, out.c, off);
    for_each_block(Variant::F2, out, co, |(v, m, cols): &mut Scratch<i16>, b, slab, moments| {
        let nt = b.tiles();
        v.resize(64 * nt * ci, 0);
        m.resize(64 * nt * co, 0.0);
        input_transform::<F2, 2, 4, _>(fisa, x, b, 1.0 / sx, v, cols);
        qproducts(isa, w, sx, v, m, nt);
        output_transform::<F2, 2, 4>(fisa, m, co, &w.bias, b, slab, g, moments);
    })
    .norm_stats()
}

/// [`products`] on integers: `m[., p, .] = sx * s_w[p] * (v[., p, .] * q[p])`.
fn qproducts(isa: QIsa, w: &QWinogradWeights, sx: f32, v: &[i16], m: &mut [f32], nt: usize) {
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
            tile.run(isa, &mut m[p * co + pn * NR..]);
        }
    }
}

/// Geometry of one block of tiles: `rows` rows of `per_row` tiles from output tile
/// `(ty0, tx0)` of output z-slab `tz` (in tiles).
#[derive(Clone, Copy)]
struct Block {
    tz: usize,
    ty0: usize,
    rows: usize,
    tx0: usize,
    per_row: usize,
}

impl Block {
    fn tiles(&self) -> usize {
        self.rows * self.per_row
    }

    /// Output-tile coordinates `(ty, tx)` of tile `t`.
    fn tile(&self, t: usize) -> (usize, usize) {
        (self.ty0 + t / self.per_row, self.tx0 + t % self.per_row)
    }
}

/// Runs `w` on `x` into channels `off..off + w.out_ch()` of `out` (same interior size, whole
/// tiles in every dimension: [`WinogradWeights::fits`]). Returns the InstanceNorm statistics of
/// those channels ([`super::conv::instance_stats`]'s), gathered block by block while the block's
/// outputs are in cache: every 3x3x3 convolution of the model is normalised next, and a separate
/// pass would read the whole output again.
pub fn conv_winograd(isa: Isa, x: &Vol, w: &WinogradWeights, out: &mut Vol, off: usize) -> NormStats {
    assert_eq!(x.c, w.in_ch, "conv input channels");
    assert_eq!(x.dims, out.dims, "conv keeps the size");
    assert!(w.fits(x.dims), "{:?} Winograd tiles do not divide {:?}", w.variant, x.dims);
    assert!(off + w.out_ch <= out.c, "conv output channels");
    match w.variant {
        Variant::F2 => winograd_f32::<F2, 2, 4>(isa, x, w, out, off),
        Variant::F4 => winograd_f32::<F4, 4, 6>(isa, x, w, out, off),
    }
}

fn winograd_f32<W: Points<M, A>, const M: usize, const A: usize>(
    isa: Isa,
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
        input_transform::<W, M, A, _>(isa, x, b, 1.0, v, cols);
        products(isa, w, v, m, nt);
        output_transform::<W, M, A>(isa, m, co, &w.bias, b, slab, g, moments);
    })
    .norm_stats()
}

/// Per-thread buffers: transformed inputs, products, and the column scratch of the transform.
type Scratch<T> = (Vec<T>, Vec<f32>, Vec<f32>);

thread_local! {
    // Kept between convolutions: fresh buffers of a few MB per call cost page faults.
    static F32_SCRATCH: RefCell<Scratch<f32>> = RefCell::default();
    static I16_SCRATCH: RefCell<Scratch<i16>> = RefCell::default();
}

/// Scratch of one kind, kept per thread.
trait ThreadScratch: Default {
    /// Runs `f` on this thread's buffers (fresh ones if they are in use).
    fn with<R>(f: impl FnOnce(&mut Self) -> R) -> R;
}

impl ThreadScratch for Scratch<f32> {
    fn with<R>(f: impl FnOnce(&mut Self) -> R) -> R {
        F32_SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => f(&mut s),
            Err(_) => f(&mut Self::default()),
        })
    }
}

impl ThreadScratch for Scratch<i16> {
    fn with<R>(f: impl FnOnce(&mut Self) -> R) -> R {
        I16_SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => f(&mut s),
            Err(_) => f(&mut Self::default()),
        })
    }
}

/// Runs `step(scratch, block, slab, moments)` for every block of tiles of `out`, output z-slabs
/// split across the rayon pool; `slab` is the slab's padded output planes. Returns the moments
/// of `n` channels the steps gathered.
fn for_each_block<S: ThreadScratch>(
    variant: Variant,
    out: &mut Vol,
    n: usize,
    step: impl Fn(&mut S, Block, &mut [f32], &mut RowMoments) + Sync,
) -> RowMoments {
    let e = variant.edge();
    let [d0, h, wd] = out.dims;
    let (rows_n, cols_n) = (h / e, wd / e);
    let want = variant.block_tiles();
    // Whole rows of tiles per block where they fit, else each row in near-equal parts.
    let (rows, parts) =
        if cols_n <= want { ((want / cols_n).clamp(1, rows_n), 1) } else { (1, cols_n.div_ceil(want)) };
    let oplane = out.plane();
    // Output z-slab tz is padded planes e * tz + 1 ..= e * tz + e: one chunk.
    out.data[oplane..(d0 + 1) * oplane]
        .par_chunks_mut(e * oplane)
        .enumerate()
        .map(|(tz, slab)| {
            let mut moments = RowMoments::new(n);
            S::with(|scratch| {
                let mut ty0 = 0;
                while ty0 < rows_n {
                    let rows = rows.min(rows_n - ty0);
                    for part in 0..parts {
                        let (tx0, tx1) = (part * cols_n / parts, (part + 1) * cols_n / parts);
                        step(scratch, Block { tz, ty0, rows, tx0, per_row: tx1 - tx0 }, slab, &mut moments);
                    }
                    ty0 += rows;
                }
            });
            moments
        })
        .reduce(|| RowMoments::new(n), |a, b| a.merge(&b))
}

/// Where the output transform writes: the output's row and voxel strides and channel offset.
#[derive(Clone, Copy)]
struct OutGeometry {
    /// Values per padded z-plane.
    plane: usize,
    /// Values per padded row.
    row: usize,
    /// Channels per voxel.
    c: usize,
    /// First channel written.
    off: usize,
}

fn out_geometry(dims: [usize; 3], c: usize, off: usize) -> OutGeometry {
    let row = (dims[2] + 2) * c;
    OutGeometry { plane: (dims[1] + 2) * row, row, c, off }
}

/// The GEMMs of one block, one per position: `m[., p, .] = v[., p, .] * u[p]`, each
/// `(nt, in_ch) x (in_ch, out_ch)`.
fn products(isa: Isa, w: &WinogradWeights, v: &[f32], m: &mut [f32], nt: usize) {
    let (ci, co, n) = (w.in_ch, w.out_ch, w.u.len());
    let offs = [0usize];
    for (p, u) in w.u.iter().enumerate() {
        for pn in 0..u.panels() {
            let tile = Tile {
                a: &v[p * ci..],
                a_offs: &offs,
                lda: n * ci,
                kc: ci,
                b: u.panel(pn),
                bias: None,
                accumulate: false,
                ldc: n * co,
                mr: nt,
                nc: u.panel_cols(pn),
            };
            tile.run(isa, &mut m[p * co + pn * NR..]);
        }
    }
}

/// A transformed input value as stored: f32 as computed, or i16 quantised (`v * inv`, rounded
/// to nearest even).
trait Transformed: Copy + Default + Send {
    fn from_f32(v: f32, inv: f32) -> Self;

    /// Stores eight values as [`Self::from_f32`] would.
    ///
    /// # Safety
    /// The CPU supports AVX2; `dst` is writable for 8 values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn put8(dst: *mut Self, v: core::arch::x86_64::__m256, inv: f32);
}

impl Transformed for f32 {
    fn from_f32(v: f32, _: f32) -> Self {
        v
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn put8(dst: *mut Self, v: core::arch::x86_64::__m256, _: f32) {
        // SAFETY: the contract.
        unsafe { core::arch::x86_64::_mm256_storeu_ps(dst, v) }
    }
}

impl Transformed for i16 {
    fn from_f32(v: f32, inv: f32) -> Self {
        (v * inv).round_ties_even().clamp(-32767.0, 32767.0) as i16
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn put8(dst: *mut Self, v: core::arch::x86_64::__m256, inv: f32) {
        use core::arch::x86_64::*;
        // SAFETY: the contract. cvtps rounds to nearest even (the MXCSR default) like
        // `from_f32`, and packs saturates.
        unsafe {
            let i = _mm256_cvtps_epi32(_mm256_mul_ps(v, _mm256_set1_ps(inv)));
            // packs works per 128-bit lane: [i0..3 i0..3 | i4..7 i4..7]; keep quads 0 and 2.
            let p = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packs_epi32(i, i));
            _mm_storeu_si128(dst.cast(), _mm256_castsi256_si128(p));
        }
    }
}

/// Transforms every tile of block `b` of `x` into `v` (`[tile][position][in_ch]`), scaled by
/// `inv` when `T` is i16. `cols` is scratch for the AVX2 path.
// Without x86_64 only the portable path exists.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_mut))]
fn input_transform<W: Points<M, A>, const M: usize, const A: usize, T: Transformed>(
    isa: Isa,
    x: &Vol,
    b: Block,
    inv: f32,
    v: &mut [T],
    cols: &mut Vec<f32>,
) {
    let (ci, n) = (x.c, A * A * A);
    let s = [x.plane(), (x.dims[2] + 2) * ci, ci];
    // Channels from `vector_ch` on take the per-tile path.
    let mut vector_ch = 0;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2Fma && Isa::detect() == Isa::Avx2Fma {
        // Neighbouring tiles share A - M of their A x-columns, so each row's columns are
        // transformed along y and z once, then combined along x per tile.
        let ncols = M * b.per_row + A - M;
        let groups = ci / 8;
        cols.resize(avx2::RING * groups * A * A * 8, 0.0);
        vector_ch = 8 * groups;
        for r in 0..b.rows {
            let base = x.at(M * b.tz, M * (b.ty0 + r), M * b.tx0);
            let src = &x.data[base..base + (A - 1) * (s[0] + s[1]) + (ncols - 1) * s[2] + ci];
            let dst = &mut v[r * b.per_row * n * ci..][..b.per_row * n * ci];
            // SAFETY: AVX2 is present (checked above); `src` holds the row's A x A x ncols
            // voxels up to channel `ci`, `cols` the ring of columns, `dst` the row's tiles.
            unsafe {
                avx2::input_row::<W, M, A, T>(
                    src.as_ptr(),
                    s,
                    b.per_row,
                    groups,
                    cols.as_mut_ptr(),
                    dst.as_mut_ptr(),
                    ci,
                    inv,
                )
            };
        }
    }
    if vector_ch == ci {
        return;
    }
    // The last value a tile reads, from its corner.
    let reach = (A - 1) * (s[0] + s[1] + s[2]) + ci;
    for t in 0..b.tiles() {
        let (ty, tx) = b.tile(t);
        let base = x.at(M * b.tz, M * ty, M * tx);
        let src = &x.data[base..base + reach];
        let dst = &mut v[t * n * ci..][..n * ci];
        for c in vector_ch..ci {
            input_tile::<W, M, A, T>(src, c, s, inv, dst);
        }
    }
}

/// Output-transforms every tile of block `b` from `m` (`[tile][position][out_ch]`) into `slab`,
/// then adds the block's output rows to `moments`.
// Without x86_64 only the portable path exists.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_mut))]
#[allow(clippy::too_many_arguments)]
fn output_transform<W: Points<M, A>, const M: usize, const A: usize>(
    isa: Isa,
    m: &[f32],
    co: usize,
    bias: &[f32],
    b: Block,
    slab: &mut [f32],
    g: OutGeometry,
    moments: &mut RowMoments,
) {
    let n = A * A * A;
    // The last value a tile writes, from its first output.
    let reach = (M - 1) * (g.plane + g.row + g.c) + co;
    for t in 0..b.tiles() {
        let (ty, tx) = b.tile(t);
        // Slab-relative padded voxel of the tile's first output (z plane 0 of the slab).
        let base = (M * ty + 1) * g.row + (M * tx + 1) * g.c + g.off;
        let src = &m[t * n * co..][..n * co];
        let dst = &mut slab[base..base + reach];
        let mut c = 0;
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2Fma && Isa::detect() == Isa::Avx2Fma {
            while c + 8 <= co {
                // SAFETY: AVX2 is present (checked above); `src` holds all positions of
                // channels `c..c + 8`, `dst` the tile's outputs (`reach`), `bias` is padded.
                unsafe {
                    avx2::output_tile8::<W, M, A>(
                        src[c..].as_ptr(),
                        co,
                        bias[c..c + 8].as_ptr(),
                        dst[c..].as_mut_ptr(),
                        g,
                    )
                };
                c += 8;
            }
        }
        for (c, &bc) in bias.iter().enumerate().take(co).skip(c) {
            output_tile::<W, M, A>(src, c, bc, dst, g);
        }
    }
    for z in 0..M {
        for y in M * b.ty0..M * (b.ty0 + b.rows) {
            moments.add_row(
                &slab[z * g.plane + (y + 1) * g.row + (M * b.tx0 + 1) * g.c + g.off..],
                g.c,
                M * b.per_row,
            );
        }
    }
}

/// One channel of the input transform (the portable path and the AVX2 path's tail): the A^3
/// block at `src` (strides `s` along z, y, x) into `v[p * in_ch + c]`.
fn input_tile<W: Points<M, A>, const M: usize, const A: usize, T: Transformed>(
    src: &[f32],
    c: usize,
    s: [usize; 3],
    inv: f32,
    v: &mut [T],
) {
    let n = A * A * A;
    let ci = v.len() / n;
    let mut d = [0.0f32; 216];
    for (i, di) in d[..n].iter_mut().enumerate() {
        *di = src[(i / (A * A)) * s[0] + (i / A % A) * s[1] + (i % A) * s[2] + c];
    }
    // Along x (stride 1), y (stride A), z (stride A^2), from each line's first position.
    let lines = (0..A * A)
        .map(|r| (r * A, 1))
        .chain((0..A * A).map(|r| ((r / A) * A * A + r % A, A)))
        .chain((0..A * A).map(|r| (r, A * A)));
    for (start, step) in lines {
        // SAFETY: f32 lanes need no CPU feature.
        let t = unsafe { W::bt(std::array::from_fn(|i| d[start + i * step])) };
        for (i, ti) in t.into_iter().enumerate() {
            d[start + i * step] = ti;
        }
    }
    for (p, dp) in d[..n].iter().enumerate() {
        v[p * ci + c] = T::from_f32(*dp, inv);
    }
}

/// One channel of the output transform: `m[p * out_ch + c]` to the M^3 outputs at `dst`.
fn output_tile<W: Points<M, A>, const M: usize, const A: usize>(
    m: &[f32],
    c: usize,
    bias: f32,
    dst: &mut [f32],
    g: OutGeometry,
) {
    let co = m.len() / (A * A * A);
    // SAFETY (the `at` calls): f32 lanes need no CPU feature.
    // Along x: (z, y, x) -> ex[(z * A + y) * M + r].
    let mut ex = [0.0f32; 6 * 6 * 4];
    for zy in 0..A * A {
        let t = unsafe { W::at(std::array::from_fn(|k| m[(zy * A + k) * co + c])) };
        ex[zy * M..][..M].copy_from_slice(&t);
    }
    // Along y: -> ey[(z * M + q) * M + r].
    let mut ey = [0.0f32; 6 * 4 * 4];
    for z in 0..A {
        for r in 0..M {
            let t = unsafe { W::at(std::array::from_fn(|j| ex[(z * A + j) * M + r])) };
            for (q, tq) in t.into_iter().enumerate() {
                ey[(z * M + q) * M + r] = tq;
            }
        }
    }
    // Along z, into the output.
    for qr in 0..M * M {
        let t = unsafe { W::at(std::array::from_fn(|i| ey[i * M * M + qr])) };
        for (p, tp) in t.into_iter().enumerate() {
            dst[p * g.plane + (qr / M) * g.row + (qr % M) * g.c + c] = tp + bias;
        }
    }
}

#[cfg(target_arch = "x86_64")]
// The loops index several arrays by transform position (rows of one, columns of another).
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use core::arch::x86_64::*;
    use std::array::from_fn;

    use super::{OutGeometry, Points, Transformed};

    /// Columns kept by [`input_row`]: at least A, a power of two.
    pub(super) const RING: usize = 8;

    /// The input transform of one row of `tiles` tiles, channels `0..8 * groups`: `src` is the
    /// row's first padded voxel (strides `s` along z, y, x); tile `t` (x columns `M t..M t + A`)
    /// goes to `v[(t * A^3 + p) * ci + 0..8 * groups]`. Each x-column is transformed along y
    /// and z once, into a ring of the last [`RING`] columns (`ring`, all channel groups: a few
    /// KB, in L1), and a tile is combined along x as soon as its last column is in, writing
    /// each position's channels in one contiguous run.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `src` is readable `8 * groups` values past
    /// `(A - 1) * (s[0] + s[1]) + (M * tiles + A - M - 1) * s[2]`, `ring` writable for
    /// `RING * groups * A^2 * 8` values, and `v` for `tiles * A^3 * ci`, `ci >= 8 * groups`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn input_row<W: Points<M, A>, const M: usize, const A: usize, T: Transformed>(
        src: *const f32,
        s: [usize; 3],
        tiles: usize,
        groups: usize,
        ring: *mut f32,
        v: *mut T,
        ci: usize,
        inv: f32,
    ) {
        let col_len = A * A * 8;
        let slot_len = groups * col_len;
        let n = A * A * A;
        // SAFETY (whole body): offsets within the contract's extents; AVX2 and FMA present.
        unsafe {
            for xc in 0..M * tiles + A - M {
                // Column xc along y, then z: position (a, b) of group g at
                // slot[g * col_len + (a * A + b) * 8].
                let col = src.add(xc * s[2]);
                let slot = ring.add(xc % RING * slot_len);
                for g in 0..groups {
                    let mut t = [[_mm256_setzero_ps(); A]; A];
                    for (i, ti) in t.iter_mut().enumerate() {
                        let mut d = [_mm256_setzero_ps(); A];
                        for (j, dj) in d.iter_mut().enumerate() {
                            *dj = _mm256_loadu_ps(col.add(i * s[0] + j * s[1] + 8 * g));
                        }
                        *ti = W::bt(d);
                    }
                    let out = slot.add(g * col_len);
                    for bb in 0..A {
                        let r = W::bt(from_fn(|i| t[i][bb]));
                        for (a, ra) in r.into_iter().enumerate() {
                            _mm256_storeu_ps(out.add((a * A + bb) * 8), ra);
                        }
                    }
                }
                // The tile whose last column this was, along x.
                if xc + 1 < A || !(xc + 1 - A).is_multiple_of(M) {
                    continue;
                }
                let tile = (xc + 1 - A) / M;
                let first = M * tile;
                let vt = v.add(tile * n * ci);
                for ab in 0..A * A {
                    for g in 0..groups {
                        let mut d = [_mm256_setzero_ps(); A];
                        for (k, dk) in d.iter_mut().enumerate() {
                            *dk = _mm256_loadu_ps(
                                ring.add((first + k) % RING * slot_len + g * col_len + ab * 8),
                            );
                        }
                        for (k, rk) in W::bt(d).into_iter().enumerate() {
                            T::put8(vt.add((ab * A + k) * ci + 8 * g), rk, inv);
                        }
                    }
                }
            }
        }
    }

    /// Eight channels of the output transform: `m[p * co + 0..8]` for the A^3 positions into
    /// the M^3 outputs at `dst` (strides from `g`), plus `bias[0..8]`.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `m` is readable 8 values past `(A^3 - 1) * co`, `bias` 8
    /// values, and `dst` writable 8 values past `(M - 1) * (g.plane + g.row + g.c)`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn output_tile8<W: Points<M, A>, const M: usize, const A: usize>(
        m: *const f32,
        co: usize,
        bias: *const f32,
        dst: *mut f32,
        g: OutGeometry,
    ) {
        // SAFETY (whole body): offsets within the contract's extents; AVX2 and FMA present.
        unsafe {
            // Along x, then y, one z-plane of positions at a time: ey[z][q][r].
            let mut ey = [[[_mm256_setzero_ps(); M]; M]; A];
            for (z, eyz) in ey.iter_mut().enumerate() {
                let mut ex = [[_mm256_setzero_ps(); M]; A];
                for (y, exy) in ex.iter_mut().enumerate() {
                    let mut d = [_mm256_setzero_ps(); A];
                    for (k, dk) in d.iter_mut().enumerate() {
                        *dk = _mm256_loadu_ps(m.add(((z * A + y) * A + k) * co));
                    }
                    *exy = W::at(d);
                }
                for r in 0..M {
                    for (q, v) in W::at(from_fn(|y| ex[y][r])).into_iter().enumerate() {
                        eyz[q][r] = v;
                    }
                }
            }
            let bias = _mm256_loadu_ps(bias);
            for q in 0..M {
                for r in 0..M {
                    let y = W::at(from_fn(|z| ey[z][q][r]));
                    for (p, yp) in y.into_iter().enumerate() {
                        _mm256_storeu_ps(dst.add(p * g.plane + q * g.row + r * g.c), _mm256_add_ps(yp, bias));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv::{ConvWeights, conv};
    use super::super::lcg;
    use super::*;

    /// Random interior values, zero border.
    fn random_volume(dims: [usize; 3], c: usize, seed: u64) -> Vol {
        let mut x = Vol::zeros(dims, c);
        let vals = lcg(x.data.len(), seed);
        for z in 1..=dims[0] {
            for y in 1..=dims[1] {
                for xx in 1..=dims[2] {
                    let i = x.at(z, y, xx);
                    x.data[i..i + c].copy_from_slice(&vals[i..i + c]);
                }
            }
        }
        x
    }

    /// Both variants compute the direct implicit GEMM's convolution and return its InstanceNorm
    /// statistics: odd channel counts (tails of the 8-lane transforms and of the 16-column
    /// panels), several blocks per slab and rows split into parts (100 wide), an output channel
    /// offset, and every kernel ISA of this CPU. Channels outside the written range must stay
    /// untouched. F(4, 3) rounds more (its
    /// transforms scale by up to 10 per dimension): measured at most 3e-6 of an output's size
    /// for F(2, 3) and 2e-5 for F(4, 3) here; a wrong transform is off by the order of the
    /// outputs themselves.
    #[test]
    fn matches_direct_convolution() {
        for (variant, tol) in [(Variant::F2, 1e-5), (Variant::F4, 1e-2)] {
            for (ci, co, dims) in
                [(8, 16, [4, 8, 8]), (11, 5, [4, 4, 4]), (19, 21, [8, 4, 100]), (16, 16, [8, 8, 8])]
            {
                let weights = lcg(co * ci * 27, 1);
                let bias = lcg(co, 2);
                let direct = ConvWeights::from_fn(co, ci, 3, |i| weights[i], Some(&bias));
                let wino = WinogradWeights::from_fn(variant, co, ci, |i| weights[i], Some(&bias));
                let x = random_volume(dims, ci, 3);
                let mut want = Vol::zeros(dims, co + 3);
                conv(Isa::Scalar, &x, &direct, &mut want, 2);
                for isa in [Isa::Scalar, Isa::Avx2Fma].into_iter().filter(|i| i.supported()) {
                    let mut got = Vol::zeros(dims, co + 3);
                    got.data.fill(7.0);
                    let stats = conv_winograd(isa, &x, &wino, &mut got, 2);
                    // The moments gathered block by block are those of the whole output.
                    let whole = super::super::conv::instance_stats(&got, 2, co);
                    for (a, b) in
                        stats.scale.iter().zip(&whole.scale).chain(stats.shift.iter().zip(&whole.shift))
                    {
                        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{variant:?} {isa:?}: {a} vs {b}");
                    }
                    let mut worst = 0.0f32;
                    for z in 1..=dims[0] {
                        for y in 1..=dims[1] {
                            for xx in 1..=dims[2] {
                                let i = got.at(z, y, xx);
                                for c in 0..co + 3 {
                                    let (g, e) = (got.data[i + c], want.data[i + c]);
                                    if c < 2 || c >= co + 2 {
                                        assert_eq!(
                                            g, 7.0,
                                            "{variant:?} {isa:?} wrote channel {c} outside its range"
                                        );
                                        continue;
                                    }
                                    let err = (g - e).abs() / ((1.0 + e.abs()) * (ci as f32).sqrt());
                                    worst = worst.max(err);
                                    assert!(
                                        err < tol,
                                        "{variant:?} {isa:?} ci={ci} co={co} {dims:?} voxel ({z},{y},{xx}) ch {c}: {g} vs {e}"
                                    );
                                }
                            }
                        }
                    }
                    println!("{variant:?} {isa:?} ci={ci} co={co} {dims:?}: relative error {worst:.1e}");
                }
            }
        }
    }

    /// A variant only runs on whole tiles.
    #[test]
    fn fits_whole_tiles_only() {
        assert!(Variant::F2.fits([2, 6, 10]) && !Variant::F2.fits([2, 6, 9]));
        assert!(Variant::F4.fits([4, 8, 96]) && !Variant::F4.fits([4, 6, 8]));
    }

    /// The integer path stays within its quantisation error of the f32 convolution: inputs and
    /// transformed weights at 12 bits give at most 3e-4 to 5e-4 of the output range here; 2e-3
    /// leaves room without hiding a wrong transform (which is off by the order of the outputs
    /// themselves). Layers whose channels are not a multiple of 8, and F(4, 3) kernels, get no
    /// integer form.
    #[test]
    fn integer_path_stays_within_quantisation_error() {
        assert!(QWinogradWeights::from_fn(4, 12, |_| 1.0, None).is_none());
        let f4 = TransformedKernels::new(Variant::F4, 4, 16, |_| 1.0);
        assert!(QWinogradWeights::new(&f4, None).is_none());
        for (ci, co, dims) in [(8, 16, [4, 6, 8]), (32, 21, [6, 4, 20]), (16, 16, [8, 8, 8])] {
            let weights = lcg(co * ci * 27, 11);
            let bias = lcg(co, 12);
            let direct = ConvWeights::from_fn(co, ci, 3, |i| weights[i], Some(&bias));
            let qw = QWinogradWeights::from_fn(co, ci, |i| weights[i], Some(&bias)).unwrap();
            let x = random_volume(dims, ci, 13);
            let amax = super::super::conv::abs_max(&x, 0, ci);
            let mut want = Vol::zeros(dims, co + 1);
            conv(Isa::Scalar, &x, &direct, &mut want, 1);
            let range = want.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for isa in [QIsa::Scalar, QIsa::Vnni].into_iter().filter(|i| i.supported()) {
                let mut got = Vol::zeros(dims, co + 1);
                conv_qwinograd(isa, &x, amax, &qw, &mut got, 1);
                let worst =
                    got.data.iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                println!("{isa:?} ci={ci} co={co}: max error {:.2e} of the range", worst / range);
                assert!(
                    worst < 2e-3 * range,
                    "{isa:?} ci={ci} co={co}: error {worst} for outputs up to {range}"
                );
            }
        }
    }
}
