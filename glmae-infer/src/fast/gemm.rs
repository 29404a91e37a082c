//! Packed weight panels and the register-tiled GEMM micro-kernel every fast layer runs on.
//!
//! The micro-kernel computes an `MR x NR` (6 x 16; 12 x 16 on AVX-512) block of `C = A * B`, with
//! A read in place
//! (row stride `lda`, optionally as the sum over several "taps" that each shift A and use their
//! own slice of B: that is how a 3x3x3 convolution on a channel-last, zero-padded volume becomes
//! an implicit GEMM without an im2col copy) and B packed into 64-byte-aligned panels of `NR`
//! columns. The accumulators stay in registers for the whole K loop, so C is written once.
//!
//! Four implementations, chosen once in the [`KernelTable`]: AVX-512 F, AVX2 + FMA and aarch64
//! NEON (`std::arch`), and portable Rust that the compiler vectorises for whatever target it builds
//! for. Conformance tests check that they agree. [`Batch`] runs many products of one shape (the
//! Winograd positions) in one call.
//!
//! [`KernelTable`]: super::kernels::KernelTable

use super::kernels::F32Kernels;

/// Rows of C per micro-tile (voxels along x, or tokens).
pub const MR: usize = 6;

/// `$kernel::<M>(args)` with the const `M` equal to the run-time row count `$mr` (1 to `MR`).
macro_rules! with_rows {
    ($mr:expr, $kernel:ident($($arg:expr),*)) => {
        match $mr {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            _ => $kernel::<6>($($arg),*),
        }
    };
}
// Only the SIMD kernels (x86_64 here and in qconv, aarch64 here) use it.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_imports))]
pub(crate) use with_rows;
/// [`with_rows`] for the 512-bit kernels' 1 to 12 rows.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))]
macro_rules! with_rows12 {
    ($mr:expr, $kernel:ident($($arg:expr),*)) => {
        match $mr {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            6 => $kernel::<6>($($arg),*),
            7 => $kernel::<7>($($arg),*),
            8 => $kernel::<8>($($arg),*),
            9 => $kernel::<9>($($arg),*),
            10 => $kernel::<10>($($arg),*),
            11 => $kernel::<11>($($arg),*),
            _ => $kernel::<12>($($arg),*),
        }
    };
}
// Only the x86_64 AVX-512 kernels (here and in bf16) use it.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(crate) use with_rows12;

/// Columns of C per micro-tile (output channels or features): two AVX registers.
pub const NR: usize = 16;

/// A `k x n` matrix packed as `ceil(n / NR)` panels, each `k` rows of `NR` values (columns past
/// `n` are zero), starting on a 64-byte boundary so each panel row is one cache line.
#[derive(Clone, Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    start: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs `value(row, col)` for `row < k`, `col < n`.
    pub fn from_fn(k: usize, n: usize, value: impl Fn(usize, usize) -> f32) -> Self {
        let panels = n.div_ceil(NR);
        let len = panels * k * NR;
        let mut data = vec![0.0f32; len + NR];
        // Align the first panel to 64 bytes; `align_offset` counts elements.
        let start = data.as_ptr().align_offset(64).min(NR);
        for p in 0..panels {
            for r in 0..k {
                let row = &mut data[start + (p * k + r) * NR..][..NR];
                for (j, v) in row.iter_mut().enumerate() {
                    let col = p * NR + j;
                    if col < n {
                        *v = value(r, col);
                    }
                }
            }
        }
        Self { k, n, start, data }
    }

    /// Element `(row, col)`.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        assert!(row < self.k && col < self.n, "({row}, {col}) outside a {} x {} matrix", self.k, self.n);
        self.data[self.start + ((col / NR) * self.k + row) * NR + col % NR]
    }

    /// Rows (the reduction length).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of `NR`-column panels.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Panel `p`: `k * NR` values.
    pub fn panel(&self, p: usize) -> &[f32] {
        &self.data[self.start + p * self.k * NR..][..self.k * NR]
    }

    /// Valid columns of panel `p`.
    pub fn panel_cols(&self, p: usize) -> usize {
        (self.n - p * NR).min(NR)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// A bias vector padded to whole panels, so a tile reads `NR` values without a bounds check.
pub fn pad_bias(values: impl Iterator<Item = f32>, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = values.take(n).collect();
    v.resize(n.div_ceil(NR) * NR, 0.0);
    v
}

/// Micro-tiles: `C[i][j] (+)= bias[j] + sum_t sum_k A[offs[t] + i * lda + k] * B_t[k][j]` for
/// `i < mr`, `j < nc <= NR`, where `B_t` is rows `t * kc .. (t + 1) * kc` of the panel `b`; the
/// rows run as consecutive micro-tiles of the kernel set's height (`MR`, or 12 on AVX-512).
#[derive(Clone, Copy)]
pub struct Tile<'a> {
    /// A, read from offsets `a_offs[t] + i * lda + k`.
    pub a: &'a [f32],
    /// Start of each tap in `a`.
    pub a_offs: &'a [usize],
    /// A's row stride.
    pub lda: usize,
    /// Reduction length per tap.
    pub kc: usize,
    /// One packed panel, `a_offs.len() * kc * NR` values.
    pub b: &'a [f32],
    /// `NR` bias values, if any.
    pub bias: Option<&'a [f32]>,
    /// Add to C instead of overwriting it.
    pub accumulate: bool,
    /// C's row stride.
    pub ldc: usize,
    /// Rows to compute (any number: one call runs them all, saving a call and the checks per
    /// `MR` rows).
    pub mr: usize,
    /// Columns to store.
    pub nc: usize,
}

impl<'a> Tile<'a> {
    /// The `MR`-row tiles: the first row of each and the tile.
    fn tiles(&self) -> impl Iterator<Item = (usize, Tile<'a>)> {
        let t = *self;
        (0..t.mr).step_by(MR).map(move |i| (i, Tile { a: &t.a[i * t.lda..], mr: (t.mr - i).min(MR), ..t }))
    }

    /// Runs the tile into `c` (element `(i, j)` at `i * ldc + j`). Panics if a slice is too short:
    /// the callers size every buffer, so that would be a bug, and it keeps the SIMD reads in bounds.
    pub fn run(&self, kernels: F32Kernels, c: &mut [f32]) {
        let taps = self.a_offs.len();
        assert!(self.mr >= 1 && self.nc >= 1 && self.nc <= NR);
        assert!(self.b.len() >= taps * self.kc * NR, "B panel too short");
        assert!(self.bias.is_none_or(|b| b.len() >= NR), "bias too short");
        let a_last = self.a_offs.iter().copied().max().unwrap_or(0) + (self.mr - 1) * self.lda + self.kc;
        assert!(self.kc == 0 || a_last <= self.a.len(), "A too short");
        assert!((self.mr - 1) * self.ldc + self.nc <= c.len(), "C too short");
        match kernels.isa() {
            #[cfg(target_arch = "x86_64")]
            super::kernels::Isa::Avx512 => {
                // SAFETY: an `F32Kernels` holding AVX-512 exists only where the CPU has AVX-512 F
                // (checked when the token was made), and the asserts above bound every A, B, bias
                // and C access the kernel makes.
                unsafe { avx512::tiles(self, c) }
            }
            #[cfg(target_arch = "aarch64")]
            super::kernels::Isa::Neon => {
                // SAFETY: an `F32Kernels` holding NEON exists only where the CPU has it (checked
                // when the token was made), and the asserts above bound every A, B, bias and C
                // access the kernel makes.
                unsafe { neon::tiles(self, c) }
            }
            #[cfg(target_arch = "x86_64")]
            super::kernels::Isa::Avx2Fma => {
                // SAFETY: an `F32Kernels` holding AVX2 + FMA exists only where the CPU has both
                // (checked when the token was made), and the asserts above bound every A, B, bias
                // and C access the kernel makes.
                unsafe { avx2::tiles(self, c) }
            }
            _ => {
                for (i, t) in self.tiles() {
                    with_rows!(t.mr, scalar_tile(&t, &mut c[i * t.ldc..]));
                }
            }
        }
    }
}

/// Many products of one shape, as Winograd runs them (one per transformed position):
/// `C_i = A_i * B_i` for `i < b.len()`, `A_i` being `mr` rows of `b[i].k()` values at
/// `a[i * a_step + r * lda..]`, `C_i`'s rows at `c[i * c_step + r * ldc..]`. One call runs them all,
/// so the per-call costs of [`Tile::run`] (its checks, the dispatch, the kernel's entry) are paid
/// once: with 16 input channels they were a third of the products' time.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    /// All the A matrices.
    pub a: &'a [f32],
    /// Offset of `A_{i+1}` from `A_i`.
    pub a_step: usize,
    /// Row stride of every A.
    pub lda: usize,
    /// The B matrices, all `kc x n`.
    pub b: &'a [PackedB],
    /// Offset of `C_{i+1}` from `C_i`.
    pub c_step: usize,
    /// Row stride of every C.
    pub ldc: usize,
    /// Rows of every product.
    pub mr: usize,
}

impl Batch<'_> {
    /// Runs every product into `c`. Panics if a slice is too short or the B matrices differ in
    /// shape (the callers size every buffer, so that would be a bug).
    pub fn run(&self, kernels: F32Kernels, c: &mut [f32]) {
        let Some(first) = self.b.first() else { return };
        let (kc, n, count) = (first.k(), first.n(), self.b.len());
        assert!(self.b.iter().all(|b| b.k() == kc && b.n() == n), "B matrices of one shape");
        assert!(self.mr >= 1 && n >= 1);
        assert!(
            kc == 0 || (count - 1) * self.a_step + (self.mr - 1) * self.lda + kc <= self.a.len(),
            "A too short"
        );
        assert!((count - 1) * self.c_step + (self.mr - 1) * self.ldc + n <= c.len(), "C too short");
        #[cfg(target_arch = "x86_64")]
        if kernels.isa() == super::kernels::Isa::Avx512 {
            // SAFETY: an `F32Kernels` holding AVX-512 exists only where the CPU has AVX-512 F, and
            // the asserts above bound every A, B and C access.
            unsafe { avx512::batch(self, c) };
            return;
        }
        let offs = [0usize];
        for (i, b) in self.b.iter().enumerate() {
            for p in 0..b.panels() {
                let tile = Tile {
                    a: &self.a[i * self.a_step..],
                    a_offs: &offs,
                    lda: self.lda,
                    kc,
                    b: b.panel(p),
                    bias: None,
                    accumulate: false,
                    ldc: self.ldc,
                    mr: self.mr,
                    nc: b.panel_cols(p),
                };
                tile.run(kernels, &mut c[i * self.c_step + p * NR..]);
            }
        }
    }
}

/// The portable kernel: the same loop nest with `[f32; NR]` rows the compiler vectorises.
fn scalar_tile<const M: usize>(t: &Tile<'_>, c: &mut [f32]) {
    let mut acc = [[0.0f32; NR]; M];
    if t.accumulate {
        for (i, row) in acc.iter_mut().enumerate() {
            row[..t.nc].copy_from_slice(&c[i * t.ldc..][..t.nc]);
        }
    }
    if let Some(bias) = t.bias {
        for row in acc.iter_mut() {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
    for (tap, &off) in t.a_offs.iter().enumerate() {
        let b = &t.b[tap * t.kc * NR..][..t.kc * NR];
        for (k, brow) in b.chunks_exact(NR).enumerate() {
            for (i, row) in acc.iter_mut().enumerate() {
                let av = t.a[off + i * t.lda + k];
                for (v, &bv) in row.iter_mut().zip(brow) {
                    *v += av * bv;
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        c[i * t.ldc..][..t.nc].copy_from_slice(&row[..t.nc]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{NR, Tile};
    use core::arch::x86_64::*;

    /// All of `t`'s rows, `MR` at a time.
    ///
    /// # Safety
    /// As for [`tile`], for all `t.mr` rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tiles(t: &Tile<'_>, c: &mut [f32]) {
        for (i, t) in t.tiles() {
            // SAFETY: the caller's contract covers every row.
            unsafe { super::with_rows!(t.mr, tile(&t, &mut c[i * t.ldc..])) }
        }
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA, `M == t.mr`, and every access described by `t` is inside
    /// `t.a`, `t.b`, `t.bias` and `c` ([`Tile::run`] asserts all of it).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const M: usize>(t: &Tile<'_>, c: &mut [f32]) {
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        // SAFETY: (for the whole body) see the function's contract; pointer offsets below stay within
        // the slices' asserted extents.
        unsafe {
            if t.accumulate {
                let mut tmp = [0.0f32; NR];
                for (i, a) in acc.iter_mut().enumerate() {
                    tmp[..t.nc].copy_from_slice(&c[i * t.ldc..][..t.nc]);
                    a[0] = _mm256_loadu_ps(tmp.as_ptr());
                    a[1] = _mm256_loadu_ps(tmp.as_ptr().add(8));
                }
            }
            if let Some(bias) = t.bias {
                let (b0, b1) = (_mm256_loadu_ps(bias.as_ptr()), _mm256_loadu_ps(bias.as_ptr().add(8)));
                for a in acc.iter_mut() {
                    a[0] = _mm256_add_ps(a[0], b0);
                    a[1] = _mm256_add_ps(a[1], b1);
                }
            }
            let ap = t.a.as_ptr();
            let mut bp = t.b.as_ptr();
            for &off in t.a_offs {
                let at = ap.add(off);
                for k in 0..t.kc {
                    let b0 = _mm256_loadu_ps(bp);
                    let b1 = _mm256_loadu_ps(bp.add(8));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let av = _mm256_broadcast_ss(&*at.add(i * t.lda + k));
                        a[0] = _mm256_fmadd_ps(av, b0, a[0]);
                        a[1] = _mm256_fmadd_ps(av, b1, a[1]);
                    }
                    bp = bp.add(NR);
                }
            }
            if t.nc == NR {
                let cp = c.as_mut_ptr();
                for (i, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(cp.add(i * t.ldc), a[0]);
                    _mm256_storeu_ps(cp.add(i * t.ldc + 8), a[1]);
                }
            } else {
                let mut tmp = [0.0f32; NR];
                for (i, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(tmp.as_mut_ptr(), a[0]);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), a[1]);
                    c[i * t.ldc..][..t.nc].copy_from_slice(&tmp[..t.nc]);
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{NR, Tile};
    use core::arch::aarch64::*;

    /// All of `t`'s rows, `MR` at a time.
    ///
    /// # Safety
    /// As for [`tile`], for all `t.mr` rows.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn tiles(t: &Tile<'_>, c: &mut [f32]) {
        for (i, t) in t.tiles() {
            // SAFETY: the caller's contract covers every row.
            unsafe { super::with_rows!(t.mr, tile(&t, &mut c[i * t.ldc..])) }
        }
    }

    /// `M` rows of 16 columns: four 128-bit accumulators per row (24 of the 32 registers), the
    /// four of B's row and a broadcast of A.
    ///
    /// # Safety
    /// The CPU supports NEON, `M == t.mr`, and every access described by `t` is inside `t.a`,
    /// `t.b`, `t.bias` and `c` ([`Tile::run`] asserts all of it).
    #[target_feature(enable = "neon")]
    unsafe fn tile<const M: usize>(t: &Tile<'_>, c: &mut [f32]) {
        let mut acc = [[vdupq_n_f32(0.0); 4]; M];
        // SAFETY: (for the whole body) see the function's contract; pointer offsets below stay
        // within the slices' asserted extents.
        unsafe {
            if t.accumulate {
                let mut tmp = [0.0f32; NR];
                for (i, a) in acc.iter_mut().enumerate() {
                    tmp[..t.nc].copy_from_slice(&c[i * t.ldc..][..t.nc]);
                    for (q, aq) in a.iter_mut().enumerate() {
                        *aq = vld1q_f32(tmp.as_ptr().add(4 * q));
                    }
                }
            }
            if let Some(bias) = t.bias {
                for a in acc.iter_mut() {
                    for (q, aq) in a.iter_mut().enumerate() {
                        *aq = vaddq_f32(*aq, vld1q_f32(bias.as_ptr().add(4 * q)));
                    }
                }
            }
            let ap = t.a.as_ptr();
            let mut bp = t.b.as_ptr();
            for &off in t.a_offs {
                let at = ap.add(off);
                for k in 0..t.kc {
                    let b =
                        [vld1q_f32(bp), vld1q_f32(bp.add(4)), vld1q_f32(bp.add(8)), vld1q_f32(bp.add(12))];
                    for (i, a) in acc.iter_mut().enumerate() {
                        let av = vld1q_dup_f32(at.add(i * t.lda + k));
                        for (aq, bq) in a.iter_mut().zip(b) {
                            *aq = vfmaq_f32(*aq, av, bq);
                        }
                    }
                    bp = bp.add(NR);
                }
            }
            let mut tmp = [0.0f32; NR];
            for (i, a) in acc.iter().enumerate() {
                for (q, aq) in a.iter().enumerate() {
                    vst1q_f32(tmp.as_mut_ptr().add(4 * q), *aq);
                }
                c[i * t.ldc..][..t.nc].copy_from_slice(&tmp[..t.nc]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{NR, Tile};
    use core::arch::x86_64::*;

    /// Rows per micro-tile: one 512-bit accumulator per row, 12 of the 32 registers (B needs one
    /// more; A is broadcast from memory), twice the AVX2 kernel's rows per load of B. 24 rows
    /// timed the same on Winograd products with 16 to 64 input channels.
    const MR512: usize = 12;

    /// Every product of `bt`, [`MR512`] rows at a time, through [`batch_rows`].
    ///
    /// # Safety
    /// The CPU supports AVX-512 F; every access `bt` describes is inside `bt.a`, its B matrices
    /// and `c` ([`super::Batch::run`] asserts it).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn batch(bt: &super::Batch<'_>, c: &mut [f32]) {
        let mut r = 0;
        while r < bt.mr {
            let rows = (bt.mr - r).min(MR512);
            // SAFETY: rows `r..r + rows` of every product are within the caller's contract.
            unsafe { super::with_rows12!(rows, batch_rows(bt, r, c)) };
            r += rows;
        }
    }

    /// Rows `r0..r0 + M` of every product of `bt`: one [`tile`] per product and panel, the row
    /// count known at compile time.
    ///
    /// # Safety
    /// As for [`batch`], for those rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn batch_rows<const M: usize>(bt: &super::Batch<'_>, r0: usize, c: &mut [f32]) {
        let offs = [0usize];
        let (a, cp) = (bt.a.as_ptr(), c.as_mut_ptr());
        for (i, b) in bt.b.iter().enumerate() {
            for p in 0..b.panels() {
                let t = Tile {
                    a: bt.a,
                    a_offs: &offs,
                    lda: bt.lda,
                    kc: b.k(),
                    b: b.panel(p),
                    bias: None,
                    accumulate: false,
                    ldc: bt.ldc,
                    mr: M,
                    nc: b.panel_cols(p),
                };
                let ai = a.wrapping_add(i * bt.a_step + r0 * bt.lda);
                let ci = cp.wrapping_add(i * bt.c_step + r0 * bt.ldc + p * NR);
                // SAFETY: product `i`'s rows `r0..r0 + M` and panel `p` are within the contract.
                unsafe { tile::<M>(&t, ai, ci) };
            }
        }
    }

    /// All of `t`'s rows, [`MR512`] at a time.
    ///
    /// # Safety
    /// As for [`tile`], for all `t.mr` rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tiles(t: &Tile<'_>, c: &mut [f32]) {
        let mut i = 0;
        while i < t.mr {
            let rows = (t.mr - i).min(MR512);
            let a = t.a.as_ptr().wrapping_add(i * t.lda);
            let cp = c.as_mut_ptr().wrapping_add(i * t.ldc);
            // SAFETY: rows `i..i + rows` are within the caller's contract.
            unsafe { super::with_rows12!(rows, tile(t, a, cp)) };
            i += rows;
        }
    }

    /// `M` rows of `t` from `a` (its row 0) into `c`.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F; `a` and `c` are rows of `t.a` and of the caller's C such that
    /// every access `t` describes for `M` rows is in bounds ([`Tile::run`] asserts it).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const M: usize>(t: &Tile<'_>, a: *const f32, c: *mut f32) {
        let mask: __mmask16 = if t.nc == NR { !0 } else { (1u16 << t.nc) - 1 };
        let mut acc = [_mm512_setzero_ps(); M];
        // SAFETY: (for the whole body) see the function's contract; pointer offsets below stay
        // within the slices' asserted extents, and masked loads and stores touch `nc` columns only.
        unsafe {
            if t.accumulate {
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_maskz_loadu_ps(mask, c.add(i * t.ldc));
                }
            }
            if let Some(bias) = t.bias {
                let b = _mm512_loadu_ps(bias.as_ptr());
                for acc in acc.iter_mut() {
                    *acc = _mm512_add_ps(*acc, b);
                }
            }
            let mut bp = t.b.as_ptr();
            for &off in t.a_offs {
                let at = a.add(off);
                for k in 0..t.kc {
                    let b = _mm512_loadu_ps(bp);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_fmadd_ps(_mm512_set1_ps(*at.add(i * t.lda + k)), b, *acc);
                    }
                    bp = bp.add(NR);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(i * t.ldc), mask, *acc);
            }
        }
    }
}

/// `C (+)= A * B (+ bias)` for `m` rows of A (row stride `lda`, `b.k()` columns) into C (row
/// stride `ldc`), rows split across the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    kernels: F32Kernels,
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedB,
    bias: Option<&[f32]>,
    accumulate: bool,
    c: &mut [f32],
    ldc: usize,
) {
    use rayon::prelude::*;
    if m == 0 {
        return;
    }
    // Blocks of 12 rows (one AVX-512 micro-tile, two of the others): the encoder's 216 tokens
    // make 18 tasks, which two threads share evenly (24-row blocks made 9: encoder 24-29 ms at
    // 2 threads against 22-28, 4 interleaved rounds).
    let rows = 2 * MR;
    let k = b.k();
    let offs = [0usize];
    c.par_chunks_mut(rows * ldc).enumerate().for_each(|(blk, cblk)| {
        let r0 = blk * rows;
        if r0 >= m {
            return;
        }
        let r1 = (r0 + rows).min(m);
        for p in 0..b.panels() {
            let panel = b.panel(p);
            let nc = b.panel_cols(p);
            let bias = bias.map(|v| &v[p * NR..][..NR]);
            // All the block's rows in one call: the kernel set picks its own rows per micro-tile.
            let tile = Tile {
                a: &a[r0 * lda..],
                a_offs: &offs,
                lda,
                kc: k,
                b: panel,
                bias,
                accumulate,
                ldc,
                mr: r1 - r0,
                nc,
            };
            tile.run(kernels, &mut cblk[p * NR..]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::kernels::{F32Kernels, for_each_f32_kernels};
    use super::super::lcg;
    use super::*;

    /// The GEMM micro-kernel's conformance tests for one kernel set (`$kernels`, an
    /// `Option<F32Kernels>`: `None` where this CPU lacks it), in module `$name`.
    macro_rules! gemm_conformance {
        ($name:ident, $kernels:expr) => {
            mod $name {
                use super::*;

                /// Against an f64 product, over ragged sizes, bias and accumulation.
                #[test]
                fn gemm_matches_f64() {
                    if let Some(k) = $kernels {
                        gemm_matches_f64_on(k);
                    }
                }

                /// Multi-tap tiles (the implicit-GEMM convolution's form) against f64 and the
                /// portable kernel.
                #[test]
                fn tap_tiles_match_portable() {
                    if let Some(k) = $kernels {
                        tap_tiles_match_portable_on(k);
                    }
                }
            }
        };
    }

    for_each_f32_kernels!(gemm_conformance);

    fn gemm_matches_f64_on(kernels: F32Kernels) {
        for &(m, k, n) in &[(1, 1, 1), (7, 5, 17), (13, 33, 40), (24, 64, 16), (6, 3, 5)] {
            let a = lcg(m * k, 1);
            let bm = lcg(k * n, 2);
            let bias = lcg(n, 3);
            let c0 = lcg(m * n, 4);
            let packed = PackedB::from_fn(k, n, |r, col| bm[r * n + col]);
            let pb = pad_bias(bias.iter().copied(), n);
            for accumulate in [false, true] {
                let mut c = c0.clone();
                gemm(kernels, &a, m, k, &packed, Some(&pb), accumulate, &mut c, n);
                for i in 0..m {
                    for j in 0..n {
                        let mut e = bias[j] as f64 + if accumulate { c0[i * n + j] as f64 } else { 0.0 };
                        for r in 0..k {
                            e += a[i * k + r] as f64 * bm[r * n + j] as f64;
                        }
                        let got = c[i * n + j] as f64;
                        assert!((got - e).abs() < 1e-4, "{kernels:?} m{m} k{k} n{n} ({i},{j}): {got} vs {e}");
                    }
                }
            }
        }
    }

    fn tap_tiles_match_portable_on(kernels: F32Kernels) {
        let (kc, lda, taps) = (7, 9, [0usize, 3, 20, 41]);
        let a = lcg(200, 5);
        let b = lcg(taps.len() * kc * NR, 6);
        for mr in 1..=MR {
            for nc in [1, 9, NR] {
                let tile = Tile {
                    a: &a,
                    a_offs: &taps,
                    lda,
                    kc,
                    b: &b,
                    bias: None,
                    accumulate: false,
                    ldc: 20,
                    mr,
                    nc,
                };
                let mut expected = vec![0.0f32; 20 * MR];
                tile.run(F32Kernels::PORTABLE, &mut expected);
                for i in 0..mr {
                    for j in 0..nc {
                        let mut e = 0.0f64;
                        for (t, &off) in taps.iter().enumerate() {
                            for k in 0..kc {
                                e += a[off + i * lda + k] as f64 * b[(t * kc + k) * NR + j] as f64;
                            }
                        }
                        assert!((expected[i * 20 + j] as f64 - e).abs() < 1e-4);
                    }
                }
                let mut got = vec![0.0f32; 20 * MR];
                tile.run(kernels, &mut got);
                for (x, y) in got.iter().zip(&expected) {
                    assert!((x - y).abs() < 1e-5, "{kernels:?} mr {mr} nc {nc}: {x} vs {y}");
                }
            }
        }
    }
}
