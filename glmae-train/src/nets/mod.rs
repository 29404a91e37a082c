//! The burn networks every stage shares: the ViT encoder, the UNETR built on it, the CPU training
//! convolution, and the walks that give each parameter its MONAI name.

pub mod conv;
pub mod naming;
pub mod unetr;
pub mod vit;
