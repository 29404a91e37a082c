//! The input and output transforms of F(2, 3) and F(4, 3) (`Bt d B` and `At m A` along all three
//! axes), shared by the f32 and the integer kernels: portable code on one f32 at a time, and
//! AVX2 code on eight channels at a time, both from the same straight-line formulas ([`Points`]
//! over [`Lanes`]).

use std::mem::MaybeUninit;

use super::super::bf16::Bf16;
use super::super::conv::{RowMoments, Vol};
use super::super::kernels::F32Kernels;
use super::blocks::{Block, OutGeometry};

/// Arithmetic of the transforms, on one f32 (the portable path) or a SIMD register ([`Vector`]:
/// eight lanes of AVX2, four of NEON). Safe: a register value only exists where the CPU has its
/// features.
pub(super) trait Lanes: Copy {
    /// `self + o`.
    fn add(self, o: Self) -> Self;
    /// `self - o`.
    fn sub(self, o: Self) -> Self;
    /// `self * k + o` (fused for AVX2 registers, two roundings for f32, as before the split).
    fn mul_add(self, k: f32, o: Self) -> Self;
}

impl Lanes for f32 {
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    fn mul_add(self, k: f32, o: Self) -> Self {
        self * k + o
    }
}

/// The three matrices of F(M, 3) on `A = M + 2` points: `G` (weights, applied at load time in
/// f64), `Bt` (inputs) and `At` (outputs) as straight-line code.
pub(super) trait Points<const M: usize, const A: usize> {
    /// `G`, the kernel transform (rows of weights for the 3 taps).
    const G: [[f64; 3]; A];

    /// `Bt d`.
    fn bt<L: Lanes>(d: [L; A]) -> [L; A];

    /// `At m`.
    fn at<L: Lanes>(m: [L; A]) -> [L; M];
}

/// F(2, 3) on the points 0, 1, -1 and infinity.
pub(super) struct F2;

impl Points<2, 4> for F2 {
    const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

    #[inline(always)]
    fn bt<L: Lanes>([a, b, c, e]: [L; 4]) -> [L; 4] {
        [a.sub(c), b.add(c), c.sub(b), b.sub(e)]
    }

    #[inline(always)]
    fn at<L: Lanes>([a, b, c, e]: [L; 4]) -> [L; 2] {
        [a.add(b).add(c), b.sub(c).sub(e)]
    }
}

/// F(4, 3) on the points 0, 1, -1, 2, -2 and infinity (Lavin and Gray's matrices).
pub(super) struct F4;

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
    fn bt<L: Lanes>([d0, d1, d2, d3, d4, d5]: [L; 6]) -> [L; 6] {
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

    /// Rows `[1 1 1 1 1 0]`, `[0 1 -1 2 -2 0]`, `[0 1 1 4 4 0]`, `[0 1 -1 8 -8 1]`.
    #[inline(always)]
    fn at<L: Lanes>([m0, m1, m2, m3, m4, m5]: [L; 6]) -> [L; 4] {
        let (s12, s34) = (m1.add(m2), m3.add(m4));
        let (d12, d34) = (m1.sub(m2), m3.sub(m4));
        [m0.add(s12).add(s34), d34.mul_add(2.0, d12), s34.mul_add(4.0, s12), d34.mul_add(8.0, d12).add(m5)]
    }
}

/// A transformed input value as stored: f32 as computed, i16 quantised (`v * inv`, rounded
/// to nearest even), or bf16 (rounded to nearest even).
pub(super) trait Transformed: Copy + Default + Send {
    /// The stored form of `v`.
    fn from_f32(v: f32, inv: f32) -> Self;

    /// Stores a register's `V::LANES` values as [`Self::from_f32`] would.
    ///
    /// # Safety
    /// `dst` is writable for `V::LANES` values.
    unsafe fn put<V: Vector>(dst: *mut Self, v: V, inv: f32);
}

impl Transformed for f32 {
    fn from_f32(v: f32, _: f32) -> Self {
        v
    }

    #[inline(always)]
    unsafe fn put<V: Vector>(dst: *mut Self, v: V, _: f32) {
        // SAFETY: `dst` is writable for `V::LANES` values (the contract).
        unsafe { v.store(dst) }
    }
}

impl Transformed for i16 {
    fn from_f32(v: f32, inv: f32) -> Self {
        (v * inv).round_ties_even().clamp(-32767.0, 32767.0) as i16
    }

    #[inline(always)]
    unsafe fn put<V: Vector>(dst: *mut Self, v: V, inv: f32) {
        // SAFETY: `dst` is writable for `V::LANES` values (the contract).
        unsafe { v.store_i16(dst, inv) }
    }
}

impl Transformed for Bf16 {
    fn from_f32(v: f32, _: f32) -> Self {
        Bf16::from_f32(v)
    }

    #[inline(always)]
    unsafe fn put<V: Vector>(dst: *mut Self, v: V, _: f32) {
        // SAFETY: `dst` is writable for `V::LANES` values (the contract); `Bf16` is a transparent u16.
        unsafe { v.store_bf16(dst.cast()) }
    }
}

/// A SIMD register of f32 lanes the transforms run on ([`avx2::F32x8`], [`neon::F32x4`]). A value
/// can only be made by [`Vector::load`] or [`Vector::zero`], whose contracts require the CPU
/// features, so holding one proves them: that is what makes its [`Lanes`] arithmetic safe.
pub(super) trait Vector: Lanes {
    /// f32 values per register.
    const LANES: usize;

    /// # Safety
    /// The CPU has the register's features; `p` is readable for `LANES` values.
    unsafe fn load(p: *const f32) -> Self;

    /// # Safety
    /// The CPU has the register's features.
    unsafe fn zero() -> Self;

    /// # Safety
    /// `p` is writable for `LANES` values.
    unsafe fn store(self, p: *mut f32);

    /// Stores `self * inv` rounded to nearest even, saturated to i16.
    ///
    /// # Safety
    /// `p` is writable for `LANES` values.
    unsafe fn store_i16(self, p: *mut i16, inv: f32);

    /// Stores the values rounded to bf16 as [`Bf16::from_f32`] rounds them (nearest, ties to even,
    /// on the bits), as u16.
    ///
    /// # Safety
    /// `p` is writable for `LANES` values.
    unsafe fn store_bf16(self, p: *mut u16);
}

/// Transforms every tile of block `b` of `x` into `v` (`[tile][position][in_ch]`), scaled by
/// `inv` when `T` is i16. `cols` is scratch for the AVX2 path.
pub(super) fn input_transform<W: Points<M, A>, const M: usize, const A: usize, T: Transformed>(
    kernels: F32Kernels,
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
    if let Some((lanes, row)) = simd_input_row::<W, M, A, T>(kernels) {
        // Neighbouring tiles share A - M of their A x-columns, so each row's columns are
        // transformed along y and z once, then combined along x per tile.
        let ncols = M * b.per_row + A - M;
        let groups = ci / lanes;
        cols.resize(RING * groups * A * A * lanes, 0.0);
        vector_ch = lanes * groups;
        for r in 0..b.rows {
            let base = x.at(M * b.tz, M * (b.ty0 + r), M * b.tx0);
            let src = &x.data[base..base + (A - 1) * (s[0] + s[1]) + (ncols - 1) * s[2] + ci];
            let dst = &mut v[r * b.per_row * n * ci..][..b.per_row * n * ci];
            // SAFETY: `simd_input_row` returns a kernel only where its kernel set (and so the
            // CPU) has the features; `src` holds the row's A x A x ncols voxels up to channel
            // `ci`, `cols` the ring of columns, `dst` the row's tiles.
            unsafe { row(src.as_ptr(), s, b.per_row, groups, cols.as_mut_ptr(), dst.as_mut_ptr(), ci, inv) };
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
/// then adds the block's outputs to `moments`.
#[allow(clippy::too_many_arguments)]
pub(super) fn output_transform<W: Points<M, A>, const M: usize, const A: usize>(
    kernels: F32Kernels,
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
        if let Some((lanes, tile)) = simd_output_tile::<W, M, A>(kernels) {
            while c + lanes <= co {
                // SAFETY: `simd_output_tile` returns a kernel only where its kernel set (and so
                // the CPU) has the features; `src` holds all positions of channels
                // `c..c + lanes`, `dst` the tile's outputs (`reach`), `bias` is padded.
                unsafe { tile(src[c..].as_ptr(), co, bias[c..c + lanes].as_ptr(), dst[c..].as_mut_ptr(), g) };
                c += lanes;
            }
        }
        for (c, &bc) in bias.iter().enumerate().take(co).skip(c) {
            output_tile::<W, M, A>(src, c, bc, dst, g);
        }
    }
    let starts: Vec<usize> = (0..M)
        .flat_map(|z| {
            (M * b.ty0..M * (b.ty0 + b.rows))
                .map(move |y| z * g.plane + (y + 1) * g.row + (M * b.tx0 + 1) * g.c + g.off)
        })
        .collect();
    moments.add_rows(kernels, slab, &starts, g.c, M * b.per_row);
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
        let t = W::bt(std::array::from_fn(|i| d[start + i * step]));
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
    // Along x: (z, y, x) -> ex[(z * A + y) * M + r].
    let mut ex = [0.0f32; 6 * 6 * 4];
    for zy in 0..A * A {
        let t = W::at(std::array::from_fn(|k| m[(zy * A + k) * co + c]));
        ex[zy * M..][..M].copy_from_slice(&t);
    }
    // Along y: -> ey[(z * M + q) * M + r].
    let mut ey = [0.0f32; 6 * 4 * 4];
    for z in 0..A {
        for r in 0..M {
            let t = W::at(std::array::from_fn(|j| ex[(z * A + j) * M + r]));
            for (q, tq) in t.into_iter().enumerate() {
                ey[(z * M + q) * M + r] = tq;
            }
        }
    }
    // Along z, into the output.
    for qr in 0..M * M {
        let t = W::at(std::array::from_fn(|i| ey[i * M * M + qr]));
        for (p, tp) in t.into_iter().enumerate() {
            dst[p * g.plane + (qr / M) * g.row + (qr % M) * g.c + c] = tp + bias;
        }
    }
}

/// Columns kept by [`input_row`]: at least A, a power of two.
pub(super) const RING: usize = 8;

/// The SIMD input transform of one row of tiles ([`input_row`] on this kernel set's register),
/// with the register's lane count, where the kernel set has one.
type InputRow<T> = unsafe fn(*const f32, [usize; 3], usize, usize, *mut f32, *mut T, usize, f32);

/// The SIMD output transform of one tile's `lanes` channels ([`output_lanes`]), likewise.
type OutputTile = unsafe fn(*const f32, usize, *const f32, *mut f32, OutGeometry);

/// [`input_row`] compiled for `kernels`' registers, and their lanes; `None` for the portable set.
#[allow(unused_variables)]
fn simd_input_row<W: Points<M, A>, const M: usize, const A: usize, T: Transformed>(
    kernels: F32Kernels,
) -> Option<(usize, InputRow<T>)> {
    #[cfg(target_arch = "x86_64")]
    if kernels.isa() == super::super::kernels::Isa::Avx512 {
        return Some((8, avx512::input_row::<W, M, A, T>));
    }
    #[cfg(target_arch = "x86_64")]
    if kernels.avx2() {
        return Some((8, avx2::input_row::<W, M, A, T>));
    }
    #[cfg(target_arch = "aarch64")]
    if kernels.isa() == super::super::kernels::Isa::Neon {
        return Some((4, neon::input_row::<W, M, A, T>));
    }
    None
}

/// [`output_lanes`] compiled for `kernels`' registers, and their lanes; `None` for the portable set.
#[allow(unused_variables)]
fn simd_output_tile<W: Points<M, A>, const M: usize, const A: usize>(
    kernels: F32Kernels,
) -> Option<(usize, OutputTile)> {
    #[cfg(target_arch = "x86_64")]
    if kernels.isa() == super::super::kernels::Isa::Avx512 {
        return Some((8, avx512::output_lanes::<W, M, A>));
    }
    #[cfg(target_arch = "x86_64")]
    if kernels.avx2() {
        return Some((8, avx2::output_lanes::<W, M, A>));
    }
    #[cfg(target_arch = "aarch64")]
    if kernels.isa() == super::super::kernels::Isa::Neon {
        return Some((4, neon::output_lanes::<W, M, A>));
    }
    None
}

/// The input transform of one row of `tiles` tiles, channels `0..V::LANES * groups`: `src` is the
/// row's first padded voxel (strides `s` along z, y, x); tile `t` (x columns `M t..M t + A`)
/// goes to `v[(t * A^3 + p) * ci + 0..V::LANES * groups]`. Each x-column is transformed along y
/// and z once, into a ring of the last [`RING`] columns (`ring`, all channel groups: a few
/// KB, in L1), and a tile is combined along x as soon as its last column is in, writing
/// each position's channels in one contiguous run. Inlined into each kernel set's copy
/// (`avx2::input_row`, `neon::input_row`), which is compiled for its features.
///
/// # Safety
/// The CPU has `V`'s features; `src` is readable `V::LANES * groups` values past
/// `(A - 1) * (s[0] + s[1]) + (M * tiles + A - M - 1) * s[2]`, `ring` writable for
/// `RING * groups * A^2 * V::LANES` values, and `v` for `tiles * A^3 * ci`,
/// `ci >= V::LANES * groups`.
// The loops index several arrays by transform position (rows of one, columns of another).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline(always)]
unsafe fn input_row<V: Vector, W: Points<M, A>, const M: usize, const A: usize, T: Transformed>(
    src: *const f32,
    s: [usize; 3],
    tiles: usize,
    groups: usize,
    ring: *mut f32,
    v: *mut T,
    ci: usize,
    inv: f32,
) {
    let l = V::LANES;
    let col_len = A * A * l;
    let slot_len = groups * col_len;
    let n = A * A * A;
    // SAFETY: (for the whole body) offsets within the contract's extents; the CPU has V's features.
    unsafe {
        for xc in 0..M * tiles + A - M {
            // Column xc along y, then z: position (a, b) of group g at
            // slot[g * col_len + (a * A + b) * l].
            let col = src.add(xc * s[2]);
            let slot = ring.add(xc % RING * slot_len);
            for g in 0..groups {
                // Uninitialised, not zeroed: LLVM zeroed the spilled array with a `memset` call
                // per column. Every element is written before it is read.
                let mut t = [[MaybeUninit::<V>::uninit(); A]; A];
                for (i, ti) in t.iter_mut().enumerate() {
                    let mut d = [V::zero(); A];
                    for (j, dj) in d.iter_mut().enumerate() {
                        *dj = V::load(col.add(i * s[0] + j * s[1] + l * g));
                    }
                    *ti = W::bt(d).map(MaybeUninit::new);
                }
                let out = slot.add(g * col_len);
                for bb in 0..A {
                    let r = W::bt(std::array::from_fn(|i| t[i][bb].assume_init()));
                    for (a, ra) in r.into_iter().enumerate() {
                        ra.store(out.add((a * A + bb) * l));
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
                    let mut d = [V::zero(); A];
                    for (k, dk) in d.iter_mut().enumerate() {
                        *dk = V::load(ring.add((first + k) % RING * slot_len + g * col_len + ab * l));
                    }
                    for (k, rk) in W::bt(d).into_iter().enumerate() {
                        T::put(vt.add((ab * A + k) * ci + l * g), rk, inv);
                    }
                }
            }
        }
    }
}

/// `V::LANES` channels of the output transform: `m[p * co + 0..LANES]` for the A^3 positions
/// into the M^3 outputs at `dst` (strides from `g`), plus `bias[0..LANES]`. Inlined into each
/// kernel set's copy, as [`input_row`].
///
/// # Safety
/// The CPU has `V`'s features; `m` is readable `V::LANES` values past `(A^3 - 1) * co`, `bias`
/// `V::LANES` values, and `dst` writable `V::LANES` values past `(M - 1) * (g.plane + g.row + g.c)`.
#[inline(always)]
// The loops index several arrays by transform position (rows of one, columns of another).
#[allow(clippy::needless_range_loop)]
unsafe fn output_lanes<V: Vector, W: Points<M, A>, const M: usize, const A: usize>(
    m: *const f32,
    co: usize,
    bias: *const f32,
    dst: *mut f32,
    g: OutGeometry,
) {
    // SAFETY: (for the whole body) offsets within the contract's extents; the CPU has V's features.
    unsafe {
        // Along x, then y, one z-plane of positions at a time: ey[z][q][r]. Uninitialised, not
        // zeroed (LLVM zeroed these 3 KB with a `memset` call per tile); every element is
        // written before it is read.
        let mut ey = [[[MaybeUninit::<V>::uninit(); M]; M]; A];
        for (z, eyz) in ey.iter_mut().enumerate() {
            let mut ex = [[MaybeUninit::<V>::uninit(); M]; A];
            for (y, exy) in ex.iter_mut().enumerate() {
                let mut d = [V::zero(); A];
                for (k, dk) in d.iter_mut().enumerate() {
                    *dk = V::load(m.add(((z * A + y) * A + k) * co));
                }
                *exy = W::at(d).map(MaybeUninit::new);
            }
            for r in 0..M {
                let at = W::at(std::array::from_fn(|y| ex[y][r].assume_init()));
                for (q, v) in at.into_iter().enumerate() {
                    eyz[q][r] = MaybeUninit::new(v);
                }
            }
        }
        let bias = V::load(bias);
        for q in 0..M {
            for r in 0..M {
                let y = W::at(std::array::from_fn(|z| ey[z][q][r].assume_init()));
                for (p, yp) in y.into_iter().enumerate() {
                    yp.add(bias).store(dst.add(p * g.plane + q * g.row + r * g.c));
                }
            }
        }
    }
}

/// Declares `input_row` and `output_lanes` of a kernel-set module: [`input_row`] and
/// [`output_lanes`] on `$v`, compiled with `$features`.
macro_rules! simd_transforms {
    ($v:ty, $features:literal) => {
        /// [`super::input_row`] on this module's register.
        ///
        /// # Safety
        /// As for [`super::input_row`].
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
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
            // SAFETY: the caller's contract.
            unsafe { super::input_row::<$v, W, M, A, T>(src, s, tiles, groups, ring, v, ci, inv) }
        }

        /// [`super::output_lanes`] on this module's register.
        ///
        /// # Safety
        /// As for [`super::output_lanes`].
        #[target_feature(enable = $features)]
        pub(super) unsafe fn output_lanes<W: Points<M, A>, const M: usize, const A: usize>(
            m: *const f32,
            co: usize,
            bias: *const f32,
            dst: *mut f32,
            g: OutGeometry,
        ) {
            // SAFETY: the caller's contract.
            unsafe { super::output_lanes::<$v, W, M, A>(m, co, bias, dst, g) }
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use core::arch::x86_64::*;

    use super::{Lanes, OutGeometry, Points, Transformed, Vector};

    /// Eight f32 lanes of an AVX register. Made only by [`Vector::load`] and [`Vector::zero`],
    /// whose contracts require AVX2 and FMA, so a value proves that the CPU has both: that is
    /// what makes its [`Lanes`] arithmetic safe.
    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub(in super::super) struct F32x8(__m256);

    impl Vector for F32x8 {
        const LANES: usize = 8;

        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the contract.
            Self(unsafe { _mm256_loadu_ps(p) })
        }

        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: the contract.
            Self(unsafe { _mm256_setzero_ps() })
        }

        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: `self` exists, so the CPU has AVX2 (see the type); `p` is the caller's.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }

        #[inline(always)]
        unsafe fn store_i16(self, p: *mut i16, inv: f32) {
            // SAFETY: `self` exists, so the CPU has AVX2 (see the type); `p` is the caller's.
            // cvtps rounds to nearest even (the MXCSR default) like `Transformed::from_f32`,
            // and packs saturates.
            unsafe {
                let i = _mm256_cvtps_epi32(_mm256_mul_ps(self.0, _mm256_set1_ps(inv)));
                // packs works per 128-bit lane: [i0..3 i0..3 | i4..7 i4..7]; keep quads 0 and 2.
                let q = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packs_epi32(i, i));
                _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(q));
            }
        }

        #[inline(always)]
        unsafe fn store_bf16(self, p: *mut u16) {
            // SAFETY: `self` exists, so the CPU has AVX2 (see the type); `p` is the caller's.
            unsafe {
                let u = _mm256_castps_si256(self.0);
                let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(1));
                let r = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
                let h = _mm256_srli_epi32::<16>(r);
                // packus works per 128-bit lane: [h0..3 h0..3 | h4..7 h4..7]; keep quads 0 and 2.
                let q = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi32(h, h));
                _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(q));
            }
        }
    }

    impl Lanes for F32x8 {
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            // SAFETY: `self` exists, so the CPU has AVX2 and FMA (see the type).
            Self(unsafe { _mm256_add_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            // SAFETY: as for `add`.
            Self(unsafe { _mm256_sub_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn mul_add(self, k: f32, o: Self) -> Self {
            // SAFETY: as for `add`.
            Self(unsafe { _mm256_fmadd_ps(self.0, _mm256_set1_ps(k), o.0) })
        }
    }

    simd_transforms!(F32x8, "avx2,fma");
}

/// The AVX2 transforms compiled with AVX-512 F and VL as well: the same eight-lane code, but
/// with 32 vector registers instead of 16, so fewer of the input transform's 6 x 6 column
/// registers spill to the stack. (Sixteen lanes of AVX-512, one load per 16-channel voxel and
/// half the instructions, timed the same: 39.6-40.1 against 38.3-38.9 ms at 16 -> 16 channels
/// on 96^3, so the transforms are not bound by their instruction count.)
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::avx2::F32x8;
    use super::{OutGeometry, Points, Transformed};

    simd_transforms!(F32x8, "avx2,fma,avx512f,avx512vl");
}

#[cfg(target_arch = "aarch64")]
pub(super) mod neon {
    use core::arch::aarch64::*;

    use super::{Lanes, OutGeometry, Points, Transformed, Vector};

    /// Four f32 lanes of a NEON register. Made only by [`Vector::load`] and [`Vector::zero`],
    /// whose contracts require NEON, so a value proves that the CPU has it.
    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub(in super::super) struct F32x4(float32x4_t);

    impl Vector for F32x4 {
        const LANES: usize = 4;

        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the contract.
            Self(unsafe { vld1q_f32(p) })
        }

        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: the contract.
            Self(unsafe { vdupq_n_f32(0.0) })
        }

        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: `self` exists, so the CPU has NEON (see the type); `p` is the caller's.
            unsafe { vst1q_f32(p, self.0) }
        }

        #[inline(always)]
        unsafe fn store_i16(self, p: *mut i16, inv: f32) {
            // SAFETY: as for `store`. fcvtns rounds to nearest even like `Transformed::from_f32`,
            // and sqxtn saturates.
            unsafe { vst1_s16(p, vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(self.0, inv)))) }
        }

        #[inline(always)]
        unsafe fn store_bf16(self, p: *mut u16) {
            // SAFETY: as for `store`.
            unsafe {
                let u = vreinterpretq_u32_f32(self.0);
                let odd = vandq_u32(vshrq_n_u32::<16>(u), vdupq_n_u32(1));
                let r = vaddq_u32(u, vaddq_u32(odd, vdupq_n_u32(0x7fff)));
                vst1_u16(p, vshrn_n_u32::<16>(r));
            }
        }
    }

    impl Lanes for F32x4 {
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            // SAFETY: `self` exists, so the CPU has NEON (see the type).
            Self(unsafe { vaddq_f32(self.0, o.0) })
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            // SAFETY: as for `add`.
            Self(unsafe { vsubq_f32(self.0, o.0) })
        }
        #[inline(always)]
        fn mul_add(self, k: f32, o: Self) -> Self {
            // SAFETY: as for `add`. `o + self * k`, fused.
            Self(unsafe { vfmaq_n_f32(o.0, self.0, k) })
        }
    }

    simd_transforms!(F32x4, "neon");
}
