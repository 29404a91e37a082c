//! The whole forward pass: ViT encoder, UNETR decoder, logits and labels.

mod arena;
mod int8;
pub mod points;
mod unetr;
mod vit;
mod weights;

pub use arena::{ForwardError, IntBuffer};
pub use int8::{Int8Scratch, Int8ScratchLen, scales_from_ranges};
pub use points::{ACTIVATION_SCALES, point_count};
pub use unetr::Unetr;
pub use weights::{
    BlockWeights, LinearWeights, NormWeights, PrUpStageWeights, PrUpWeights, ResBlockWeights, UnetrWeights,
    UpWeights, VitWeights,
};
