//! # glmae-core
//!
//! The GL-MAE project's model, weight format and reference forward pass, for every target from a
//! workstation to a Cortex-M. `no_std`; nothing here allocates unless the `alloc` feature is on,
//! and then only to *write* weight files.
//!
//! - [`config`]: [`VitConfig`] (ViT-T, ViT-B) and [`UnetrConfig`], the one architecture definition.
//! - [`params`]: every parameter's MONAI name, shape and kind.
//! - [`format`]: the `.glmae` file (f32 or per-channel int8), parsed zero-copy with full checks.
//! - [`kernels`]: reference kernels writing into caller buffers.
//! - [`model`]: [`Unetr`], the whole forward pass from an input window to logits and labels, with
//!   [`Unetr::scratch_len`] telling the caller how much memory to provide; and the integer pass
//!   ([`Unetr::segment_int8`]: int8 activations with scales calibrated at export, int32 sums,
//!   SMLAD on Cortex-M4/M33, Helium on Cortex-M55), with its activation points in
//!   [`model::points`].
//!
//! ```
//! # #[cfg(feature = "alloc")] {
//! use glmae_core::{ModelFile, Unetr};
//! # let cfg = glmae_core::testing_config();
//! # let bytes = glmae_core::synthetic::random_model(&cfg, 1, glmae_core::format::Precision::F32).unwrap();
//! let file = ModelFile::parse(&bytes)?;            // checks everything, borrows `bytes`
//! let model = Unetr::new(&file)?;
//! let window = [32, 32, 32];
//! let input = vec![0.5f32; model.input_len(window)];
//! let mut labels = vec![0u8; 32 * 32 * 32];
//! let mut scratch = vec![0f32; model.segment_scratch_len(window)?];
//! model.segment(&input, window, &mut labels, &mut scratch)?;
//! # }
//! # Ok::<(), Box<dyn core::error::Error>>(())
//! ```
#![cfg_attr(not(test), no_std)]
// Denied everywhere but `kernels::int8::dsp` (three DSP-extension instructions in `asm!`).
#![deny(unsafe_code)]
#![warn(missing_docs)]
// Errors carry the offending tensor's name inline because there is no allocator to box it; they
// are returned once per load, never on a hot path.
#![allow(clippy::result_large_err)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod config;
pub mod format;
pub mod kernels;
pub mod model;
pub mod params;
pub mod preprocessing;
#[cfg(feature = "alloc")]
pub mod synthetic;
pub mod tensor;
#[cfg(test)]
mod testing;

pub use config::{ConfigError, PosEmbed, UnetrConfig, VitConfig};
pub use format::{FormatError, ModelFile};
pub use model::{ForwardError, Unetr};
pub use preprocessing::{IntensityScaling, Preprocessing};

/// A tiny UNETR (32^3 window, 2 tokens per axis, width 24, feature size 4, 3 classes) for tests,
/// examples and the firmware demo: small enough for a Cortex-M4 with 4 MiB of RAM.
pub const fn testing_config() -> UnetrConfig {
    UnetrConfig {
        vit: VitConfig {
            in_channels: 1,
            img_size: [32, 32, 32],
            patch_size: 16,
            hidden_size: 24,
            depth: 12,
            num_heads: 2,
            mlp_dim: 48,
            qkv_bias: true,
            layer_norm_eps: 1e-6,
            pos_embed: PosEmbed::SinCos,
        },
        feature_size: 4,
        out_channels: 3,
    }
}
