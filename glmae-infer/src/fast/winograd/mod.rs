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
//!
//! Modules: [`mod@f32`] and [`int8`] hold the two kernels (weights, products and entry points),
//! `transforms` the input and output transforms both share, `blocks` the blocked, parallel walk
//! over the output.

mod blocks;
pub mod f32;
pub mod int8;
mod transforms;

use super::gemm::pad_bias;
pub use f32::{WinogradWeights, conv_winograd, conv_winograd_bf16};
pub use int8::{QWinogradWeights, conv_qwinograd};
use transforms::{F2, F4, Points};

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
    pub(super) const fn block_tiles(self) -> usize {
        match self {
            Variant::F2 => 48,
            Variant::F4 => 12,
        }
    }
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

/// A bias padded to whole panels (zeros without one).
fn padded_bias(bias: Option<&[f32]>, n: usize) -> Vec<f32> {
    pad_bias(bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec).into_iter(), n)
}

/// Random interior values, zero border (test data for both kernels).
#[cfg(test)]
fn random_volume(dims: [usize; 3], c: usize, seed: u64) -> super::conv::Vol {
    let mut x = super::conv::Vol::zeros(dims, c);
    let vals = super::lcg(x.data.len(), seed);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A variant only runs on whole tiles.
    #[test]
    fn fits_whole_tiles_only() {
        assert!(Variant::F2.fits([2, 6, 10]) && !Variant::F2.fits([2, 6, 9]));
        assert!(Variant::F4.fits([4, 8, 96]) && !Variant::F4.fits([4, 6, 8]));
    }
}
