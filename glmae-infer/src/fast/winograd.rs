//! 3x3x3 convolutions (padding 1) by Winograd's minimal filtering F(2x2x2, 3x3x3) (Lavin and
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2x2 block of outputs comes from a 4x4x4 block of input as 64 independent channel
//! products instead of 8 x 27: 3.4x fewer multiply-adds. The price is a transform of every input
//! and output block (additions only), 64/27 times the weight memory, and rounding that differs
//! from the direct sum by a few f32 ulps of the activations (the agreement tests bound it).
//!
//! Work goes in blocks of tiles (a few rows of tiles of one output z-slab, so the block's
//! transformed data, a few hundred KB, stays in L2):
//! 1. input transform `V = Bt d B` of each tile, stored tile-major as `[tile][position][in_ch]`
//!    (each tile writes one contiguous run);
//! 2. 64 GEMMs `M_p = V_p U_p` on the register-tiled micro-kernel ([`super::gemm`]), `U_p` being
//!    the transformed weights of position `p`, reading `V_p` as rows of stride `64 * in_ch` and
//!    writing `M` as `[tile][position][out_ch]`;
//! 3. output transform `Y = At M A`, plus bias, into the channel-last output.
//!
//! Output z-slabs are split across the rayon pool.

use rayon::prelude::*;

use super::conv::Vol;
use super::gemm::{Isa, NR, PackedB, Tile, pad_bias};
use super::qconv::{QIsa, QTile};

/// The weight transform `G` of F(2, 3).
const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// Tiles per block: enough GEMM rows for the micro-kernel to amortise its B loads.
const BLOCK_TILES: usize = 48;

/// A 3x3x3 convolution's weights transformed for F(2x2x2, 3x3x3): one packed `(in_ch, out_ch)`
/// matrix per position of the 4x4x4 transformed tile.
#[derive(Clone, Debug)]
pub struct WinogradWeights {
    u: Vec<PackedB>,
    bias: Vec<f32>,
    in_ch: usize,
    out_ch: usize,
}

impl WinogradWeights {
    /// The engine runs Winograd from this many input channels on (one AVX register of the
    /// transforms). At 8 -> 16 channels on 96^3 it took 50 ms against 62 direct; at 4 (the
    /// transforms' portable path) 111 against 33.
    pub const MIN_IN_CH: usize = 8;

    /// From `weight(i)`, element `i` of a row-major `(out, in, 3, 3, 3)` weight.
    pub fn from_fn(out_ch: usize, in_ch: usize, weight: impl Fn(usize) -> f32, bias: Option<&[f32]>) -> Self {
        Self::new(&TransformedKernels::new(out_ch, in_ch, weight), bias)
    }

    /// From kernels already transformed (rounded to f32 here, once).
    pub fn new(k: &TransformedKernels, bias: Option<&[f32]>) -> Self {
        let (t, in_ch, out_ch) = (&k.t, k.in_ch, k.out_ch);
        let u = (0..64)
            .map(|p| PackedB::from_fn(in_ch, out_ch, |ci, co| t[(co * in_ch + ci) * 64 + p] as f32))
            .collect();
        Self { u, bias: padded_bias(bias, out_ch), in_ch, out_ch }
    }

    /// Whether these weights run on a volume of interior size `dims` (whole 2x2x2 tiles only).
    pub fn fits(&self, dims: [usize; 3]) -> bool {
        fits(dims)
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

fn fits(dims: [usize; 3]) -> bool {
    dims.iter().all(|d| d % 2 == 0)
}

fn padded_bias(bias: Option<&[f32]>, n: usize) -> Vec<f32> {
    pad_bias(bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec).into_iter(), n)
}

/// A 3x3x3 convolution's kernels transformed for F(2x2x2, 3x3x3), `G g Gt` along all three
/// axes, in f64 so that the only rounding is that of the packing built from them: the f32 one
/// ([`WinogradWeights::new`]) and the integer one ([`QWinogradWeights::new`]) share one transform.
#[derive(Clone, Debug)]
pub struct TransformedKernels {
    /// Element `(co * in_ch + ci) * 64 + position`.
    t: Vec<f64>,
    in_ch: usize,
    out_ch: usize,
}

impl TransformedKernels {
    /// From `weight(i)`, element `i` of a row-major `(out, in, 3, 3, 3)` weight.
    pub fn new(out_ch: usize, in_ch: usize, weight: impl Fn(usize) -> f32) -> Self {
        Self { t: transform_weights(out_ch * in_ch, weight), in_ch, out_ch }
    }
}

/// `G g Gt` for each of `kernels` 3x3x3 kernels (`weight(kernel * 27 + k)`): element
/// `kernel * 64 + position`.
fn transform_weights(kernels: usize, weight: impl Fn(usize) -> f32) -> Vec<f64> {
    let mut t = vec![0.0f64; kernels * 64];
    for (kernel, dst) in t.chunks_exact_mut(64).enumerate() {
        let g: [f64; 27] = std::array::from_fn(|k| weight(kernel * 27 + k) as f64);
        // Separable: along x, then y, then z.
        let mut gx = [0.0f64; 3 * 3 * 4];
        for r in 0..9 {
            for (c, grow) in G.iter().enumerate() {
                gx[r * 4 + c] = (0..3).map(|k| grow[k] * g[r * 3 + k]).sum();
            }
        }
        let mut gy = [0.0f64; 3 * 4 * 4];
        for i in 0..3 {
            for (b, grow) in G.iter().enumerate() {
                for c in 0..4 {
                    gy[(i * 4 + b) * 4 + c] = (0..3).map(|j| grow[j] * gx[(i * 3 + j) * 4 + c]).sum();
                }
            }
        }
        for (a, grow) in G.iter().enumerate() {
            for bc in 0..16 {
                dst[a * 16 + bc] = (0..3).map(|i| grow[i] * gy[i * 16 + bc]).sum::<f64>();
            }
        }
    }
    t
}

/// The integer form of [`WinogradWeights`], for the int8 kernels (`--int8-kernels`): the
/// file's dequantised int8 weights transformed in f64 (the transform is not integer: `G` holds
/// halves), then quantised again per position and output channel to i16 levels and packed for
/// `vpdpwssd` as in [`mod@super::qconv`]. Inputs are transformed in f32 and quantised per tensor to
/// i16 after the transform, so the products are exact i32 sums. Int8 levels for the transformed
/// weights gave 1% of the output range as error in a single layer; these levels give 4e-4.
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
        Self::new(&TransformedKernels::new(out_ch, in_ch, weight), bias)
    }

    /// From kernels already transformed; `None` unless their input channels are a multiple of 8.
    pub fn new(k: &TransformedKernels, bias: Option<&[f32]>) -> Option<Self> {
        let (t, in_ch, out_ch) = (&k.t, k.in_ch, k.out_ch);
        if in_ch == 0 || !in_ch.is_multiple_of(8) {
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
        fits(dims)
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
/// channels `off..off + out_ch` of `out` (same interior size, even in every dimension).
pub fn conv_qwinograd(isa: QIsa, x: &Vol, amax: f32, w: &QWinogradWeights, out: &mut Vol, off: usize) {
    assert_eq!(x.c, w.in_ch, "conv input channels");
    assert_eq!(x.dims, out.dims, "conv keeps the size");
    assert!(w.fits(x.dims), "Winograd tiles need even sizes, not {:?}", x.dims);
    assert!(off + w.out_ch <= out.c, "conv output channels");
    let (ci, co) = (w.in_ch, w.out_ch);
    let sx = if amax > 0.0 { amax / w.level() as f32 } else { 1.0 };
    // VNNI implies AVX2 (QIsa::detect checks both) for the f32 transforms.
    let fisa = if isa == QIsa::Vnni { Isa::Avx2Fma } else { Isa::Scalar };
    let g = out_geometry(x.dims, out.c, off);
    for_each_block(out, |(v, m, cols): &mut Scratch<i16>, b, slab| {
        let nt = b.tiles();
        v.resize(64 * nt * ci, 0);
        m.resize(64 * nt * co, 0.0);
        input_transform(fisa, x, b, 1.0 / sx, v, cols);
        qproducts(isa, w, sx, v, m, nt);
        output_transform(fisa, m, co, &w.bias, b, slab, g);
    });
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

/// Geometry of one block of tiles: `rows` rows of `per_row` tiles starting at tile row `ty0` of
/// output z-slab `tz`.
#[derive(Clone, Copy)]
struct Block {
    tz: usize,
    ty0: usize,
    rows: usize,
    per_row: usize,
}

impl Block {
    fn tiles(&self) -> usize {
        self.rows * self.per_row
    }

    /// Output-tile coordinates `(ty, tx)` of tile `t`.
    fn tile(&self, t: usize) -> (usize, usize) {
        (self.ty0 + t / self.per_row, t % self.per_row)
    }
}

/// Runs `w` on `x` into channels `off..off + w.out_ch()` of `out` (same interior size, even in
/// every dimension: [`WinogradWeights::fits`]).
pub fn conv_winograd(isa: Isa, x: &Vol, w: &WinogradWeights, out: &mut Vol, off: usize) {
    assert_eq!(x.c, w.in_ch, "conv input channels");
    assert_eq!(x.dims, out.dims, "conv keeps the size");
    assert!(w.fits(x.dims), "Winograd tiles need even sizes, not {:?}", x.dims);
    assert!(off + w.out_ch <= out.c, "conv output channels");
    let (ci, co) = (w.in_ch, w.out_ch);
    let g = out_geometry(x.dims, out.c, off);
    for_each_block(out, |(v, m, cols): &mut Scratch<f32>, b, slab| {
        let nt = b.tiles();
        v.resize(64 * nt * ci, 0.0);
        m.resize(64 * nt * co, 0.0);
        input_transform(isa, x, b, 1.0, v, cols);
        products(isa, w, v, m, nt);
        output_transform(isa, m, co, &w.bias, b, slab, g);
    });
}

/// Per-thread buffers: transformed inputs, products, and the column scratch of the transform.
type Scratch<T> = (Vec<T>, Vec<f32>, Vec<f32>);

/// Runs `step(scratch, block, slab)` for every block of tiles of `out`, output z-slabs split
/// across the rayon pool; `slab` is the slab's two padded output planes.
fn for_each_block<S: Default + Send>(out: &mut Vol, step: impl Fn(&mut S, Block, &mut [f32]) + Sync) {
    let [d0, h, wd] = out.dims;
    let per_row = wd / 2;
    let rows = (BLOCK_TILES / per_row).clamp(1, h / 2);
    let oplane = out.plane();
    // Rayon calls `S::default` once per task it splits off: a few tasks per thread keep the
    // balance without reallocating (and faulting in) the scratch for every slab.
    let min_len = (d0 / 2 / (4 * rayon::current_num_threads())).max(1);
    // Output z-slab tz is padded planes 2tz + 1 and 2tz + 2: one chunk.
    out.data[oplane..(d0 + 1) * oplane]
        .par_chunks_mut(2 * oplane)
        .enumerate()
        .with_min_len(min_len)
        .for_each_init(S::default, |scratch, (tz, slab)| {
            let mut ty0 = 0;
            while ty0 < h / 2 {
                let b = Block { tz, ty0, rows: rows.min(h / 2 - ty0), per_row };
                step(scratch, b, slab);
                ty0 += b.rows;
            }
        });
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

/// The 64 GEMMs of one block: `m[., p, .] = v[., p, .] * u[p]`, each `(nt, in_ch) x (in_ch, out_ch)`.
fn products(isa: Isa, w: &WinogradWeights, v: &[f32], m: &mut [f32], nt: usize) {
    let (ci, co) = (w.in_ch, w.out_ch);
    let offs = [0usize];
    for (p, u) in w.u.iter().enumerate() {
        for pn in 0..u.panels() {
            let panel = u.panel(pn);
            let nc = u.panel_cols(pn);
            let tile = Tile {
                a: &v[p * ci..],
                a_offs: &offs,
                lda: 64 * ci,
                kc: ci,
                b: panel,
                bias: None,
                accumulate: false,
                ldc: 64 * co,
                mr: nt,
                nc,
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
fn input_transform<T: Transformed>(isa: Isa, x: &Vol, b: Block, inv: f32, v: &mut [T], cols: &mut Vec<f32>) {
    let ci = x.c;
    let s = [x.plane(), (x.dims[2] + 2) * ci, ci];
    // Channels from `vector_ch` on take the per-tile path.
    let mut vector_ch = 0;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2Fma && Isa::detect() == Isa::Avx2Fma {
        // Neighbouring tiles share two of their four x-columns, so each row's columns are
        // transformed along y and z once, then combined along x per tile.
        let ncols = 2 * b.per_row + 2;
        cols.resize(ncols * 16 * 8, 0.0);
        vector_ch = ci / 8 * 8;
        for r in 0..b.rows {
            let base = x.at(2 * b.tz, 2 * (b.ty0 + r), 0);
            let src = &x.data[base..base + 3 * (s[0] + s[1]) + (ncols - 1) * s[2] + ci];
            let dst = &mut v[r * b.per_row * 64 * ci..][..b.per_row * 64 * ci];
            for c in (0..vector_ch).step_by(8) {
                // SAFETY: AVX2 is present (checked above); `src` holds the row's 4 x 4 x ncols
                // voxels up to channel `ci`, `cols` ncols columns, `dst` the row's tiles.
                unsafe {
                    avx2::input_row8(
                        src[c..].as_ptr(),
                        s,
                        ncols,
                        cols.as_mut_ptr(),
                        dst[c..].as_mut_ptr(),
                        ci,
                        inv,
                    )
                };
            }
        }
    }
    if vector_ch == ci {
        return;
    }
    // The last value a tile reads, from its corner.
    let reach = 3 * (s[0] + s[1] + s[2]) + ci;
    for t in 0..b.tiles() {
        let (ty, tx) = b.tile(t);
        let base = x.at(2 * b.tz, 2 * ty, 2 * tx);
        let src = &x.data[base..base + reach];
        let dst = &mut v[t * 64 * ci..][..64 * ci];
        for c in vector_ch..ci {
            input_tile(src, c, s, inv, dst);
        }
    }
}

/// Output-transforms every tile of block `b` from `m` (`[tile][position][out_ch]`) into `slab`.
// Without x86_64 only the portable path exists.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_mut))]
fn output_transform(
    isa: Isa,
    m: &[f32],
    co: usize,
    bias: &[f32],
    b: Block,
    slab: &mut [f32],
    g: OutGeometry,
) {
    // The last value a tile writes, from its first output.
    let reach = g.plane + g.row + g.c + co;
    for t in 0..b.tiles() {
        let (ty, tx) = b.tile(t);
        // Slab-relative padded voxel of the tile's first output (z plane 0 of the slab).
        let base = (2 * ty + 1) * g.row + (2 * tx + 1) * g.c + g.off;
        let src = &m[t * 64 * co..][..64 * co];
        let dst = &mut slab[base..base + reach];
        let mut c = 0;
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2Fma && Isa::detect() == Isa::Avx2Fma {
            while c + 8 <= co {
                // SAFETY: AVX2 is present (checked above); `src` holds all 64 positions of
                // channels `c..c + 8`, `dst` the 2x2x2 outputs (`reach`), `bias` is padded.
                unsafe {
                    avx2::output_tile8(
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
            output_tile(src, c, bc, dst, g);
        }
    }
}

/// One channel of the input transform (the portable path and the AVX2 path's tail): the 4x4x4
/// block at `src` (strides `s` along z, y, x) into `v[p * in_ch + c]`.
fn input_tile<T: Transformed>(src: &[f32], c: usize, s: [usize; 3], inv: f32, v: &mut [T]) {
    let ci = v.len() / 64;
    let mut d = [0.0f32; 64];
    for (n, dn) in d.iter_mut().enumerate() {
        *dn = src[(n / 16) * s[0] + (n / 4 % 4) * s[1] + (n % 4) * s[2] + c];
    }
    for (start, step) in (0..16)
        .map(|r| (r * 4, 1))
        .chain((0..16).map(|r| (r / 4 * 16 + r % 4, 4)))
        .chain((0..16).map(|r| (r, 16)))
    {
        let [a, b, cc, e] = [0, 1, 2, 3].map(|i| d[start + i * step]);
        for (i, val) in [a - cc, b + cc, cc - b, b - e].into_iter().enumerate() {
            d[start + i * step] = val;
        }
    }
    for (p, dp) in d.iter().enumerate() {
        v[p * ci + c] = T::from_f32(*dp, inv);
    }
}

/// One channel of the output transform: `m[p * out_ch + c]` to the 2x2x2 outputs at `dst`.
fn output_tile(m: &[f32], c: usize, bias: f32, dst: &mut [f32], g: OutGeometry) {
    let co = m.len() / 64;
    let at = |v: [f32; 4]| [v[0] + v[1] + v[2], v[1] - v[2] - v[3]];
    // Along x: (i, j, k) -> (i, j, r); along y: -> (i, q, r); along z: -> (p, q, r).
    let ex: Vec<[f32; 2]> = (0..16).map(|r| at([0, 1, 2, 3].map(|k| m[(r * 4 + k) * co + c]))).collect();
    let ey: Vec<[[f32; 2]; 2]> =
        (0..4).map(|i| [0, 1].map(|r| at([0, 1, 2, 3].map(|j| ex[i * 4 + j][r])))).collect();
    for q in 0..2 {
        for r in 0..2 {
            let y = at([0, 1, 2, 3].map(|i| ey[i][r][q]));
            for (p, yp) in y.iter().enumerate() {
                dst[p * g.plane + q * g.row + r * g.c + c] = yp + bias;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
// The loops index several arrays by transform position (rows of one, columns of another).
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use core::arch::x86_64::*;

    use super::{OutGeometry, Transformed};

    /// `Bt` of F(2, 3) on four vectors.
    #[inline(always)]
    unsafe fn bt(a: __m256, b: __m256, c: __m256, e: __m256) -> [__m256; 4] {
        unsafe { [_mm256_sub_ps(a, c), _mm256_add_ps(b, c), _mm256_sub_ps(c, b), _mm256_sub_ps(b, e)] }
    }

    /// `At` of F(2, 3): four vectors to two.
    #[inline(always)]
    unsafe fn at(a: __m256, b: __m256, c: __m256, e: __m256) -> [__m256; 2] {
        unsafe { [_mm256_add_ps(_mm256_add_ps(a, b), c), _mm256_sub_ps(_mm256_sub_ps(b, c), e)] }
    }

    /// Eight channels of the input transform of one row of tiles: `src` is the row's first
    /// padded voxel (strides `s` along z, y, x), `ncols` x-columns of 4x4 voxels; tile `t` (x
    /// columns `2t..2t + 4`) goes to `v[(t * 64 + p) * ci + 0..8]`. `cols` is scratch.
    ///
    /// # Safety
    /// The CPU supports AVX2; `src` is readable 8 values past `3 * (s[0] + s[1]) + (ncols - 1) *
    /// s[2]`, `cols` writable for `ncols * 128` values, and `v` for `(ncols / 2 - 1) * 64 * ci`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn input_row8<T: Transformed>(
        src: *const f32,
        s: [usize; 3],
        ncols: usize,
        cols: *mut f32,
        v: *mut T,
        ci: usize,
        inv: f32,
    ) {
        // SAFETY (whole body): offsets within the contract's extents.
        unsafe {
            // Each column along y, then z: 16 vectors, position (a, b) at cols[(x * 16 + a * 4 + b) * 8].
            for xc in 0..ncols {
                let col = src.add(xc * s[2]);
                let mut t = [[_mm256_setzero_ps(); 4]; 4];
                for (i, ti) in t.iter_mut().enumerate() {
                    let [a, b, c, e] = [0, 1, 2, 3].map(|j| _mm256_loadu_ps(col.add(i * s[0] + j * s[1])));
                    *ti = bt(a, b, c, e);
                }
                let out = cols.add(xc * 128);
                for bb in 0..4 {
                    let r = bt(t[0][bb], t[1][bb], t[2][bb], t[3][bb]);
                    for (a, ra) in r.into_iter().enumerate() {
                        _mm256_storeu_ps(out.add((a * 4 + bb) * 8), ra);
                    }
                }
            }
            // Along x, per tile.
            for tile in 0..ncols / 2 - 1 {
                let c0 = cols.add(2 * tile * 128);
                let vt = v.add(tile * 64 * ci);
                for ab in 0..16 {
                    let [a, b, c, e] = [0, 1, 2, 3].map(|k| _mm256_loadu_ps(c0.add(k * 128 + ab * 8)));
                    for (k, rk) in bt(a, b, c, e).into_iter().enumerate() {
                        T::put8(vt.add((ab * 4 + k) * ci), rk, inv);
                    }
                }
            }
        }
    }

    /// Eight channels of the output transform: `m[p * co + 0..8]` for the 64 positions into
    /// the 2x2x2 outputs at `dst` (strides from `g`), plus `bias[0..8]`.
    ///
    /// # Safety
    /// The CPU supports AVX2; `m` is readable 8 values past `63 * co`, `bias` 8 values, and
    /// `dst` writable 8 values past `g.plane + g.row + g.c`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn output_tile8(
        m: *const f32,
        co: usize,
        bias: *const f32,
        dst: *mut f32,
        g: OutGeometry,
    ) {
        // SAFETY (whole body): offsets within the contract's extents.
        unsafe {
            let mut ex = [[_mm256_setzero_ps(); 2]; 16];
            for (r, e) in ex.iter_mut().enumerate() {
                let p = m.add(r * 4 * co);
                let [a, b, c, d] = [0, 1, 2, 3].map(|k| _mm256_loadu_ps(p.add(k * co)));
                *e = at(a, b, c, d);
            }
            let mut ey = [[[_mm256_setzero_ps(); 2]; 2]; 4];
            for (i, e) in ey.iter_mut().enumerate() {
                for r in 0..2 {
                    let [q0, q1] = at(ex[i * 4][r], ex[i * 4 + 1][r], ex[i * 4 + 2][r], ex[i * 4 + 3][r]);
                    e[0][r] = q0;
                    e[1][r] = q1;
                }
            }
            let bias = _mm256_loadu_ps(bias);
            for q in 0..2 {
                for r in 0..2 {
                    let y = at(ey[0][q][r], ey[1][q][r], ey[2][q][r], ey[3][q][r]);
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

    /// Winograd and the direct implicit GEMM compute the same convolution: odd channel counts
    /// (tails of the 8-lane transforms and of the 16-column panels), several blocks per slab,
    /// an output channel offset, and every kernel ISA of this CPU. Channels outside the written
    /// range must stay untouched.
    #[test]
    fn matches_direct_convolution() {
        for (ci, co, dims) in
            [(8, 16, [4, 6, 8]), (11, 5, [2, 2, 2]), (19, 21, [6, 4, 100]), (16, 16, [8, 8, 8])]
        {
            let weights = lcg(co * ci * 27, 1);
            let bias = lcg(co, 2);
            let direct = ConvWeights::from_fn(co, ci, 3, |i| weights[i], Some(&bias));
            let wino = WinogradWeights::from_fn(co, ci, |i| weights[i], Some(&bias));
            let x = random_volume(dims, ci, 3);
            let mut want = Vol::zeros(dims, co + 3);
            conv(Isa::Scalar, &x, &direct, &mut want, 2);
            for isa in [Isa::Scalar, Isa::Avx2Fma].into_iter().filter(|i| i.supported()) {
                let mut got = Vol::zeros(dims, co + 3);
                got.data.fill(7.0);
                conv_winograd(isa, &x, &wino, &mut got, 2);
                for z in 1..=dims[0] {
                    for y in 1..=dims[1] {
                        for xx in 1..=dims[2] {
                            let i = got.at(z, y, xx);
                            for c in 0..co + 3 {
                                let (g, e) = (got.data[i + c], want.data[i + c]);
                                if c < 2 || c >= co + 2 {
                                    assert_eq!(g, 7.0, "{isa:?} wrote channel {c} outside its range");
                                } else {
                                    assert!(
                                        (g - e).abs() < 1e-5 * (1.0 + e.abs()) * (ci as f32).sqrt(),
                                        "{isa:?} ci={ci} co={co} {dims:?} voxel ({z},{y},{xx}) ch {c}: {g} vs {e}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The integer path stays within its quantisation error of the f32 convolution: inputs and
    /// transformed weights at 12 bits give at most 3e-4 to 5e-4 of the output range here; 2e-3
    /// leaves room without hiding a wrong transform (which is off by the order of the outputs
    /// themselves). Layers whose channels are not a multiple of 8 get no integer form.
    #[test]
    fn integer_path_stays_within_quantisation_error() {
        assert!(QWinogradWeights::from_fn(4, 12, |_| 1.0, None).is_none());
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
