//! The input and output transforms of F(2, 3) and F(4, 3) (`Bt d B` and `At m A` along all three
//! axes), shared by the f32 and the integer kernels: portable code on one f32 at a time, and
//! AVX2 code on eight channels at a time, both from the same straight-line formulas ([`Points`]
//! over [`Lanes`]).

use super::super::bf16::Bf16;
use super::super::conv::{RowMoments, Vol};
use super::super::kernels::F32Kernels;
use super::blocks::{Block, OutGeometry};

/// Arithmetic of the transforms, on one f32 (the portable path) or eight (an AVX2 register,
/// [`avx2::F32x8`]). Safe: an `F32x8` only exists where the CPU has AVX2 and FMA.
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

/// A transformed input value as stored: f32 as computed, or i16 quantised (`v * inv`, rounded
/// to nearest even).
pub(super) trait Transformed: Copy + Default + Send {
    /// The stored form of `v`.
    fn from_f32(v: f32, inv: f32) -> Self;

    /// Stores eight values as [`Self::from_f32`] would.
    ///
    /// # Safety
    /// `dst` is writable for 8 values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn put8(dst: *mut Self, v: avx2::F32x8, inv: f32);
}

impl Transformed for f32 {
    fn from_f32(v: f32, _: f32) -> Self {
        v
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn put8(dst: *mut Self, v: avx2::F32x8, _: f32) {
        // SAFETY: `dst` is writable for 8 values (the contract).
        unsafe { v.store(dst) }
    }
}

impl Transformed for i16 {
    fn from_f32(v: f32, inv: f32) -> Self {
        (v * inv).round_ties_even().clamp(-32767.0, 32767.0) as i16
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn put8(dst: *mut Self, v: avx2::F32x8, inv: f32) {
        // SAFETY: `dst` is writable for 8 values (the contract).
        unsafe { v.store_i16(dst, inv) }
    }
}

impl Transformed for Bf16 {
    fn from_f32(v: f32, _: f32) -> Self {
        Bf16::from_f32(v)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn put8(dst: *mut Self, v: avx2::F32x8, _: f32) {
        // SAFETY: `dst` is writable for 8 values (the contract); `Bf16` is a transparent u16.
        unsafe { v.store_bf16(dst.cast()) }
    }
}

/// Transforms every tile of block `b` of `x` into `v` (`[tile][position][in_ch]`), scaled by
/// `inv` when `T` is i16. `cols` is scratch for the AVX2 path.
// Without x86_64 only the portable path exists (and `cols`, the AVX2 path's scratch, is not resized).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_mut, clippy::ptr_arg))]
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
    #[cfg(target_arch = "x86_64")]
    if kernels.avx2() {
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
            // SAFETY: an `F32Kernels` holding AVX2 + FMA exists only where the CPU has both;
            // `src` holds the row's A x A x ncols voxels up to channel `ci`, `cols` the ring of
            // columns, `dst` the row's tiles.
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
/// then adds the block's outputs to `moments`.
// Without x86_64 only the portable path exists.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_mut))]
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
        #[cfg(target_arch = "x86_64")]
        if kernels.avx2() {
            while c + 8 <= co {
                // SAFETY: an `F32Kernels` holding AVX2 + FMA exists only where the CPU has both;
                // `src` holds all positions of channels `c..c + 8`, `dst` the tile's outputs
                // (`reach`), `bias` is padded.
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

#[cfg(target_arch = "x86_64")]
// The loops index several arrays by transform position (rows of one, columns of another).
#[allow(clippy::needless_range_loop)]
pub(super) mod avx2 {
    use core::arch::x86_64::*;
    use std::array::from_fn;

    use super::{Lanes, OutGeometry, Points, Transformed};

    /// Columns kept by [`input_row`]: at least A, a power of two.
    pub(in super::super) const RING: usize = 8;

    /// Eight f32 lanes of an AVX register. Made only by [`F32x8::load`] and [`F32x8::zero`],
    /// whose contracts require AVX2 and FMA, so a value proves that the CPU has both: that is
    /// what makes its [`Lanes`] arithmetic safe.
    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub(in super::super) struct F32x8(__m256);

    impl F32x8 {
        /// # Safety
        /// The CPU supports AVX2 and FMA; `p` is readable for 8 values.
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the contract.
            Self(unsafe { _mm256_loadu_ps(p) })
        }

        /// # Safety
        /// The CPU supports AVX2 and FMA.
        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: the contract.
            Self(unsafe { _mm256_setzero_ps() })
        }

        /// Stores the eight values at `p`.
        ///
        /// # Safety
        /// `p` is writable for 8 values.
        #[inline(always)]
        pub(super) unsafe fn store(self, p: *mut f32) {
            // SAFETY: `self` exists, so the CPU has AVX2 (see the type); `p` is the caller's.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }

        /// Stores `self * inv` rounded to nearest even, saturated to i16, as eight i16 at `p`.
        ///
        /// # Safety
        /// `p` is writable for 8 values.
        #[inline(always)]
        pub(super) unsafe fn store_i16(self, p: *mut i16, inv: f32) {
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
    }

    impl F32x8 {
        /// Stores the eight values rounded to bf16 as [`super::Bf16::from_f32`] rounds them
        /// (nearest, ties to even, on the bits), as eight u16 at `p`.
        ///
        /// # Safety
        /// `p` is writable for 8 values.
        #[inline(always)]
        pub(super) unsafe fn store_bf16(self, p: *mut u16) {
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
    pub(in super::super) unsafe fn input_row<
        W: Points<M, A>,
        const M: usize,
        const A: usize,
        T: Transformed,
    >(
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
        // SAFETY: (for the whole body) offsets within the contract's extents; AVX2 and FMA present.
        unsafe {
            for xc in 0..M * tiles + A - M {
                // Column xc along y, then z: position (a, b) of group g at
                // slot[g * col_len + (a * A + b) * 8].
                let col = src.add(xc * s[2]);
                let slot = ring.add(xc % RING * slot_len);
                for g in 0..groups {
                    let mut t = [[F32x8::zero(); A]; A];
                    for (i, ti) in t.iter_mut().enumerate() {
                        let mut d = [F32x8::zero(); A];
                        for (j, dj) in d.iter_mut().enumerate() {
                            *dj = F32x8::load(col.add(i * s[0] + j * s[1] + 8 * g));
                        }
                        *ti = W::bt(d);
                    }
                    let out = slot.add(g * col_len);
                    for bb in 0..A {
                        let r = W::bt(from_fn(|i| t[i][bb]));
                        for (a, ra) in r.into_iter().enumerate() {
                            ra.store(out.add((a * A + bb) * 8));
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
                        let mut d = [F32x8::zero(); A];
                        for (k, dk) in d.iter_mut().enumerate() {
                            *dk = F32x8::load(ring.add((first + k) % RING * slot_len + g * col_len + ab * 8));
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
    pub(in super::super) unsafe fn output_tile8<W: Points<M, A>, const M: usize, const A: usize>(
        m: *const f32,
        co: usize,
        bias: *const f32,
        dst: *mut f32,
        g: OutGeometry,
    ) {
        // SAFETY: (for the whole body) offsets within the contract's extents; AVX2 and FMA present.
        unsafe {
            // Along x, then y, one z-plane of positions at a time: ey[z][q][r].
            let mut ey = [[[F32x8::zero(); M]; M]; A];
            for (z, eyz) in ey.iter_mut().enumerate() {
                let mut ex = [[F32x8::zero(); M]; A];
                for (y, exy) in ex.iter_mut().enumerate() {
                    let mut d = [F32x8::zero(); A];
                    for (k, dk) in d.iter_mut().enumerate() {
                        *dk = F32x8::load(m.add(((z * A + y) * A + k) * co));
                    }
                    *exy = W::at(d);
                }
                for r in 0..M {
                    for (q, v) in W::at(from_fn(|y| ex[y][r])).into_iter().enumerate() {
                        eyz[q][r] = v;
                    }
                }
            }
            let bias = F32x8::load(bias);
            for q in 0..M {
                for r in 0..M {
                    let y = W::at(from_fn(|z| ey[z][q][r]));
                    for (p, yp) in y.into_iter().enumerate() {
                        yp.add(bias).store(dst.add(p * g.plane + q * g.row + r * g.c));
                    }
                }
            }
        }
    }
}
