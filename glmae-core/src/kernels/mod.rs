//! Reference kernels: plain loops, f32 accumulation, outputs into caller-provided slices.
//!
//! Volumes are channel-first and row-major, `[channel][d0][d1][d2]`; token sequences are
//! `[token][feature]`. Each kernel documents the lengths it expects; the forward pass sizes every
//! buffer before calling, so slice-length mismatches here are programming errors, not bad input.

mod activation;
mod attention;
mod conv;
mod embed;
pub mod int8;
mod linear;
mod norm;

pub use activation::{
    LEAKY_RELU_SLOPE, argmax_channels, gelu, gelu_in_place, leaky_relu, leaky_relu_in_place, softmax_in_place,
};
pub use attention::self_attention;
pub use conv::{ConvGeometry, conv_output_dims, conv_transpose_output_dims, conv_transpose3d, conv3d};
pub use embed::{add_sincos_position_embedding, gather_patch, patch_embed, sincos_position_embedding};
pub use linear::linear;
pub use norm::{INSTANCE_NORM_EPS, instance_norm_in_place, layer_norm, moments_by};

/// Voxels per axis.
pub type Dims3 = [usize; 3];

/// Number of voxels in `d`.
#[inline]
pub fn voxels(d: Dims3) -> usize {
    d[0] * d[1] * d[2]
}
