//! bfloat16 products: the number format, weight panels packed in pairs, and the GEMM micro-kernel
//! of the bf16 mode (`FastUnetr::with_bf16`: Winograd F(2, 3) products on `vdpbf16ps`, AVX-512
//! BF16).
//!
//! A bf16 value is the upper half of an f32 (8 exponent bits, 8 significant bits): rounding an
//! f32 to it keeps the range and 3 significant decimal digits. A product of two bf16 values is
//! exact in f32, so the only roundings of a bf16 GEMM are those of its inputs and of the f32
//! accumulation. The micro-kernel reads A (rows of bf16 values, K contiguous) in place and B packed
//! as panels of `NR` columns holding, for each pair of rows `2k, 2k + 1`, the two values of each
//! column side by side: one 512-bit register of B per pair, the layout `vdpbf16ps` multiplies
//! against a broadcast pair of A. Accumulators are f32 and stay in registers for the whole K loop.
//!
//! Two implementations, chosen once in the [`KernelTable`](super::kernels::KernelTable): AVX-512
//! BF16 and portable Rust, which computes exactly what `vdpbf16ps` specifies (each pair's odd
//! product added, then its even one, each sum rounded to nearest f32) apart from denormals, which
//! the instruction flushes to zero.

use super::gemm::NR;
use super::kernels::Bf16Kernels;

/// A bfloat16 value (its bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// `v` rounded to the nearest bf16, ties to even (finite values; NaN stays NaN).
    #[inline(always)]
    pub fn from_f32(v: f32) -> Self {
        let u = v.to_bits();
        Self((u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16)
    }

    /// The value as an f32 (exact).
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
}

/// Rows of C one micro-kernel call computes at most: one 512-bit accumulator per row, 12 of the
/// 32 registers, so a Winograd F(4, 3) block (12 tiles) is one call per position and panel.
pub const MR_BF16: usize = 12;

/// A `k x n` matrix in bf16, packed as `ceil(n / NR)` panels of `ceil(k / 2)` pair-rows of
/// `2 * NR` values (element `(r, c)` of a panel at `(r / 2) * 2 * NR + 2 * c + r % 2`; a missing
/// last row and columns past `n` are zero), each panel starting on a 64-byte boundary.
#[derive(Clone, Debug)]
pub struct PackedBf16 {
    k: usize,
    n: usize,
    start: usize,
    data: Vec<Bf16>,
}

impl PackedBf16 {
    /// Packs `value(row, col)`, rounded to bf16, for `row < k`, `col < n`.
    pub fn from_fn(k: usize, n: usize, value: impl Fn(usize, usize) -> f32) -> Self {
        let panel = k.div_ceil(2) * 2 * NR;
        let mut data = vec![Bf16::default(); n.div_ceil(NR) * panel + 2 * NR];
        // Align the first panel to 64 bytes; `align_offset` counts elements.
        let start = data.as_ptr().align_offset(64).min(2 * NR);
        for col in 0..n {
            let (p, j) = (col / NR, col % NR);
            for r in 0..k {
                data[start + p * panel + (r / 2) * 2 * NR + 2 * j + r % 2] = Bf16::from_f32(value(r, col));
            }
        }
        Self { k, n, start, data }
    }

    /// Number of `NR`-column panels.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Panel `p`.
    pub fn panel(&self, p: usize) -> &[Bf16] {
        let len = self.k.div_ceil(2) * 2 * NR;
        &self.data[self.start + p * len..][..len]
    }

    /// Valid columns of panel `p`.
    pub fn panel_cols(&self, p: usize) -> usize {
        (self.n - p * NR).min(NR)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// `C[i][j] = sum_k A[i * lda + k] * B[k][j]` for `i < mr`, `j < nc <= NR`, `k < kc`, with B one
/// panel of a [`PackedBf16`]; rows run as consecutive [`MR_BF16`]-row tiles.
#[derive(Clone, Copy)]
pub struct Bf16Tile<'a> {
    /// A, `mr` rows of stride `lda`.
    pub a: &'a [Bf16],
    /// A's row stride.
    pub lda: usize,
    /// Reduction length.
    pub kc: usize,
    /// One packed panel of `kc` rows.
    pub b: &'a [Bf16],
    /// C's row stride.
    pub ldc: usize,
    /// Rows to compute.
    pub mr: usize,
    /// Columns to store.
    pub nc: usize,
}

impl Bf16Tile<'_> {
    /// Runs the tile into `c` (element `(i, j)` at `i * ldc + j`). Panics if a slice is too short:
    /// the callers size every buffer, so that would be a bug, and it keeps the SIMD reads in bounds.
    pub fn run(&self, kernels: Bf16Kernels, c: &mut [f32]) {
        assert!(self.mr >= 1 && self.nc >= 1 && self.nc <= NR);
        assert!(self.b.len() >= self.kc.div_ceil(2) * 2 * NR, "B panel too short");
        assert!(self.kc == 0 || (self.mr - 1) * self.lda + self.kc <= self.a.len(), "A too short");
        assert!((self.mr - 1) * self.ldc + self.nc <= c.len(), "C too short");
        match kernels.bisa() {
            #[cfg(target_arch = "x86_64")]
            super::kernels::BIsa::Avx512Bf16 => {
                // SAFETY: a `Bf16Kernels` holding AVX-512 BF16 exists only where the CPU has it
                // (checked when the token was made), and the asserts above bound every A, B and
                // C access the kernel makes.
                unsafe { avx512::tiles(self, c) }
            }
            _ => {
                for i in (0..self.mr).step_by(MR_BF16) {
                    let rows = (self.mr - i).min(MR_BF16);
                    scalar_rows(
                        &Bf16Tile { a: &self.a[i * self.lda..], mr: rows, ..*self },
                        &mut c[i * self.ldc..],
                    );
                }
            }
        }
    }
}

/// The portable kernel: `vdpbf16ps`'s arithmetic (odd product of each pair, then the even one).
fn scalar_rows(t: &Bf16Tile<'_>, c: &mut [f32]) {
    for i in 0..t.mr {
        let a = &t.a[i * t.lda..][..t.kc];
        let mut acc = [0.0f32; NR];
        for (kp, brow) in t.b.chunks_exact(2 * NR).take(t.kc.div_ceil(2)).enumerate() {
            let a0 = a[2 * kp].to_f32();
            let a1 = a.get(2 * kp + 1).map_or(0.0, |v| v.to_f32());
            for (j, v) in acc.iter_mut().enumerate() {
                // Two statements: the products are exact, and each sum rounds once.
                *v += a1 * brow[2 * j + 1].to_f32();
                *v += a0 * brow[2 * j].to_f32();
            }
        }
        c[i * t.ldc..][..t.nc].copy_from_slice(&acc[..t.nc]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Bf16Tile, MR_BF16, NR};
    use core::arch::x86_64::*;

    /// The 32 bf16 values in `v`'s bits.
    #[inline(always)]
    fn as_bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 64-byte vectors and every bit pattern is a valid value of either.
        unsafe { core::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// All of `t`'s rows, [`MR_BF16`] at a time.
    ///
    /// # Safety
    /// As for [`tile`], for all `t.mr` rows.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tiles(t: &Bf16Tile<'_>, c: &mut [f32]) {
        let mut i = 0;
        while i < t.mr {
            let rows = (t.mr - i).min(MR_BF16);
            let a = t.a.as_ptr().wrapping_add(i * t.lda);
            let cp = c.as_mut_ptr().wrapping_add(i * t.ldc);
            // SAFETY: rows `i..i + rows` are within the caller's contract.
            unsafe { super::super::gemm::with_rows12!(rows, tile(t, a, cp)) };
            i += rows;
        }
    }

    /// `M` rows from `a` into `c`.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F and BF16; `a` holds `M` rows of `t.kc` values at stride `t.lda`,
    /// `t.b` the panel, `c` `M` rows of `t.nc` values at stride `t.ldc` ([`Bf16Tile::run`] asserts
    /// all of it).
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn tile<const M: usize>(t: &Bf16Tile<'_>, a: *const super::Bf16, c: *mut f32) {
        let mut acc = [_mm512_setzero_ps(); M];
        let pairs = t.kc / 2;
        // SAFETY: (for the whole body) see the function's contract; every offset below stays
        // within the rows, the panel and C.
        unsafe {
            let mut bp = t.b.as_ptr() as *const __m512i;
            for kp in 0..pairs {
                let b = as_bh(_mm512_loadu_si512(bp));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let pair = (a.add(i * t.lda + 2 * kp) as *const i32).read_unaligned();
                    *acc = _mm512_dpbf16_ps(*acc, as_bh(_mm512_set1_epi32(pair)), b);
                }
                bp = bp.add(1);
            }
            if t.kc % 2 == 1 {
                // The last, unpaired row: its partner is zero in both A and B.
                let b = as_bh(_mm512_loadu_si512(bp));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let last = i32::from((*a.add(i * t.lda + t.kc - 1)).0);
                    *acc = _mm512_dpbf16_ps(*acc, as_bh(_mm512_set1_epi32(last)), b);
                }
            }
            let mask: __mmask16 = if t.nc == NR { !0 } else { (1u16 << t.nc) - 1 };
            for (i, acc) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(i * t.ldc), mask, *acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::for_each_bf16_kernels;
    use super::super::lcg;
    use super::*;

    /// Rounding to nearest, ties to even, and exact widening.
    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(Bf16::from_f32(1.0).0, 0x3f80);
        assert_eq!(Bf16::from_f32(-2.5).to_f32(), -2.5);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.
        assert_eq!(Bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to the even 1 + 2^-6.
        assert_eq!(Bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.0 + 1.0 / 64.0);
        assert_eq!(Bf16::from_f32(1.0 + 1.5 / 256.0).to_f32(), 1.0 + 1.0 / 128.0);
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
        for v in lcg(1000, 9) {
            let r = Bf16::from_f32(v * 100.0).to_f32();
            assert!((r - v * 100.0).abs() <= (v * 100.0).abs() / 256.0, "{v}: {r}");
        }
    }

    /// The bf16 micro-kernel's conformance tests for one kernel set (`$kernels`, an
    /// `Option<Bf16Kernels>`: `None` where this CPU lacks it), in module `$name`.
    macro_rules! bf16_gemm_conformance {
        ($name:ident, $kernels:expr) => {
            mod $name {
                use super::*;

                #[test]
                fn products_match_f64_of_rounded_inputs() {
                    if let Some(k) = $kernels {
                        products_match_f64_of_rounded_inputs_on(k);
                    }
                }
            }
        };
    }

    for_each_bf16_kernels!(bf16_gemm_conformance);

    /// Against an f64 product of the bf16-rounded inputs, over ragged sizes (odd K, partial
    /// panels, more rows than one tile); C's values outside the tile untouched. The f32
    /// accumulation of K exact products errs by at most about K ulps of the sum of |terms|.
    fn products_match_f64_of_rounded_inputs_on(kernels: Bf16Kernels) {
        for &(m, k, n) in &[(1, 1, 1), (7, 5, 17), (13, 33, 40), (12, 64, 16), (25, 3, 5)] {
            let a: Vec<Bf16> = lcg(m * k, 1).into_iter().map(Bf16::from_f32).collect();
            let bm = lcg(k * n, 2);
            let packed = PackedBf16::from_fn(k, n, |r, col| bm[r * n + col]);
            let ldc = n + 3;
            let mut c = vec![7.0f32; m * ldc];
            for p in 0..packed.panels() {
                let tile = Bf16Tile {
                    a: &a,
                    lda: k,
                    kc: k,
                    b: packed.panel(p),
                    ldc,
                    mr: m,
                    nc: packed.panel_cols(p),
                };
                tile.run(kernels, &mut c[p * NR..]);
            }
            for i in 0..m {
                for j in 0..ldc {
                    let got = c[i * ldc + j];
                    if j >= n {
                        assert_eq!(got, 7.0, "{kernels:?} wrote column {j} past n = {n}");
                        continue;
                    }
                    let (mut e, mut mag) = (0.0f64, 0.0f64);
                    for r in 0..k {
                        let t = a[i * k + r].to_f32() as f64 * Bf16::from_f32(bm[r * n + j]).to_f32() as f64;
                        e += t;
                        mag += t.abs();
                    }
                    let tol = mag * k as f64 * f32::EPSILON as f64 + 1e-30;
                    assert!(
                        (got as f64 - e).abs() <= tol,
                        "{kernels:?} m{m} k{k} n{n} ({i},{j}): {got} vs {e}"
                    );
                }
            }
        }
    }
}
