//! The whole forward pass: ViT encoder, UNETR decoder, logits and labels.

mod arena;
mod unetr;
mod vit;
mod weights;

pub use arena::ForwardError;
pub use unetr::Unetr;
pub use weights::{
    BlockWeights, LinearWeights, NormWeights, PrUpStageWeights, PrUpWeights, ResBlockWeights, UnetrWeights,
    UpWeights, VitWeights,
};
