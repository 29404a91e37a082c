//! The blocked walk over a Winograd convolution's output: blocks of tiles within output z-slabs,
//! slabs split across the rayon pool, per-thread scratch kept between calls, and the InstanceNorm
//! moments of what each block wrote.

use std::cell::RefCell;

use rayon::prelude::*;

use super::super::bf16::Bf16;
use super::super::conv::{RowMoments, Vol};
use super::Variant;

/// Geometry of one block of tiles: `rows` rows of `per_row` tiles from output tile
/// `(ty0, tx0)` of output z-slab `tz` (in tiles).
#[derive(Clone, Copy)]
pub(super) struct Block {
    pub(super) tz: usize,
    pub(super) ty0: usize,
    pub(super) rows: usize,
    pub(super) tx0: usize,
    pub(super) per_row: usize,
}

impl Block {
    pub(super) fn tiles(&self) -> usize {
        self.rows * self.per_row
    }

    /// Output-tile coordinates `(ty, tx)` of tile `t`.
    pub(super) fn tile(&self, t: usize) -> (usize, usize) {
        (self.ty0 + t / self.per_row, self.tx0 + t % self.per_row)
    }
}

/// Per-thread buffers: transformed inputs, products, and the column scratch of the transform.
pub(super) type Scratch<T> = (Vec<T>, Vec<f32>, Vec<f32>);

thread_local! {
    // Kept between convolutions: fresh buffers of a few MB per call cost page faults.
    static F32_SCRATCH: RefCell<Scratch<f32>> = RefCell::default();
    static I16_SCRATCH: RefCell<Scratch<i16>> = RefCell::default();
    static BF16_SCRATCH: RefCell<Scratch<Bf16>> = RefCell::default();
}

/// Scratch of one kind, kept per thread.
pub(super) trait ThreadScratch: Default {
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

impl ThreadScratch for Scratch<Bf16> {
    fn with<R>(f: impl FnOnce(&mut Self) -> R) -> R {
        BF16_SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => f(&mut s),
            Err(_) => f(&mut Self::default()),
        })
    }
}

/// Runs `step(scratch, block, slab, moments)` for every block of tiles of `out`, output z-slabs
/// split across the rayon pool; `slab` is the slab's padded output planes. Returns the moments
/// of `n` channels the steps gathered.
pub(super) fn for_each_block<S: ThreadScratch>(
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
pub(super) struct OutGeometry {
    /// Values per padded z-plane.
    pub(super) plane: usize,
    /// Values per padded row.
    pub(super) row: usize,
    /// Channels per voxel.
    pub(super) c: usize,
    /// First channel written.
    pub(super) off: usize,
}

pub(super) fn out_geometry(dims: [usize; 3], c: usize, off: usize) -> OutGeometry {
    let row = (dims[2] + 2) * c;
    OutGeometry { plane: (dims[1] + 2) * row, row, c, off }
}
