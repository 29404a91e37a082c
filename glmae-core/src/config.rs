//! Model configuration: the ViT encoder and the UNETR decoder built on it.
//!
//! These structs are the single definition of the architecture. The weight file stores them, the
//! trainer builds its burn modules from them, and the reference forward pass runs them.

use core::fmt;
use serde::{Deserialize, Serialize};

/// UNETR's patch size: its decoder upsamples the token grid four times by two, so anything else
/// would not return to the input resolution (MONAI fixes it to 16 as well).
pub const UNETR_PATCH: u32 = 16;
/// UNETR takes hidden states after these encoder blocks (0-based), as MONAI does.
pub const UNETR_TAPS: [usize; 3] = [3, 6, 9];
/// UNETR's encoder depth: MONAI's `UNETR` hard-codes 12 blocks.
pub const UNETR_DEPTH: u32 = 12;
/// Most encoder blocks any configuration may have.
pub const MAX_DEPTH: usize = 32;

/// Largest input side in voxels: a window of 256^3 already needs gigabytes of activations, and a
/// damaged file must not ask for more.
pub const MAX_IMG_SIZE: u32 = 256;

/// How the encoder adds position information to its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PosEmbed {
    /// Fixed 3-D sin-cos embedding, generated for whatever token grid the input has.
    SinCos,
    /// A learned table for the configured input size (`vit.patch_embedding.position_embeddings`).
    Learned,
}

/// A Vision Transformer encoder over 3-D volumes (MONAI's `ViT`, classification off).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VitConfig {
    /// Input channels (1 for CT).
    pub in_channels: u32,
    /// Input window in voxels, per axis, in the order the arrays are laid out.
    pub img_size: [u32; 3],
    /// Cubic patch edge in voxels.
    pub patch_size: u32,
    /// Token width.
    pub hidden_size: u32,
    /// Number of transformer blocks.
    pub depth: u32,
    /// Attention heads per block.
    pub num_heads: u32,
    /// Width of each block's MLP.
    pub mlp_dim: u32,
    /// Whether the fused qkv projection has a bias.
    pub qkv_bias: bool,
    /// LayerNorm epsilon (1e-6 in MAE; PyTorch's default 1e-5 in MONAI).
    pub layer_norm_eps: f32,
    /// Position embedding kind.
    pub pos_embed: PosEmbed,
}

impl VitConfig {
    /// ViT-Tiny: dim 192, 12 blocks, 3 heads, MLP 768 (the paper's small encoder).
    pub const fn vit_t(img_size: [u32; 3]) -> Self {
        Self::preset(img_size, 192, 3, 768)
    }

    /// ViT-Base: dim 768, 12 blocks, 12 heads, MLP 3072.
    pub const fn vit_b(img_size: [u32; 3]) -> Self {
        Self::preset(img_size, 768, 12, 3072)
    }

    const fn preset(img_size: [u32; 3], hidden_size: u32, num_heads: u32, mlp_dim: u32) -> Self {
        Self {
            in_channels: 1,
            img_size,
            patch_size: 16,
            hidden_size,
            depth: 12,
            num_heads,
            mlp_dim,
            qkv_bias: true,
            layer_norm_eps: 1e-6,
            pos_embed: PosEmbed::SinCos,
        }
    }

    /// Token grid for the configured input size.
    pub fn grid(&self) -> [usize; 3] {
        let p = self.patch_size as usize;
        self.img_size.map(|s| s as usize / p)
    }

    /// Number of tokens for the configured input size.
    pub fn num_tokens(&self) -> usize {
        self.grid().iter().product()
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        (self.hidden_size / self.num_heads.max(1)) as usize
    }

    /// Checks the encoder on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            ("in_channels", self.in_channels),
            ("patch_size", self.patch_size),
            ("hidden_size", self.hidden_size),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("mlp_dim", self.mlp_dim),
        ];
        for (field, value) in nonzero {
            if value == 0 {
                return Err(ConfigError::Zero(field));
            }
        }
        if self.depth as usize > MAX_DEPTH {
            return Err(ConfigError::TooDeep(self.depth));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(ConfigError::HeadsDoNotDivide {
                hidden_size: self.hidden_size,
                num_heads: self.num_heads,
            });
        }
        if self.pos_embed == PosEmbed::SinCos && !self.hidden_size.is_multiple_of(6) {
            return Err(ConfigError::SinCosWidth(self.hidden_size));
        }
        if self.img_size.iter().any(|&s| s > MAX_IMG_SIZE) {
            return Err(ConfigError::ImgTooLarge(self.img_size));
        }
        for s in self.img_size {
            if s == 0 || !s.is_multiple_of(self.patch_size) {
                return Err(ConfigError::ImgNotMultipleOfPatch {
                    img_size: self.img_size,
                    patch_size: self.patch_size,
                });
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(ConfigError::BadEpsilon);
        }
        Ok(())
    }
}

/// UNETR (Hatamizadeh et al.) exactly as MONAI builds it: residual conv blocks, instance norm
/// without affine, LeakyReLU 0.01, 2x2x2 transposed convolutions, conv bias only in the output.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UnetrConfig {
    /// The encoder.
    pub vit: VitConfig,
    /// Channels of the finest decoder stage (16 in MAE3D, 48 in the authors' later code).
    pub feature_size: u32,
    /// Output classes, background included.
    pub out_channels: u32,
}

impl UnetrConfig {
    /// A UNETR whose decoder matches the paper's ViT-T experiments (feature size 16).
    pub const fn vit_t(img_size: [u32; 3], out_channels: u32) -> Self {
        Self { vit: VitConfig::vit_t(img_size), feature_size: 16, out_channels }
    }

    /// A UNETR on ViT-B with feature size 16.
    pub const fn vit_b(img_size: [u32; 3], out_channels: u32) -> Self {
        Self { vit: VitConfig::vit_b(img_size), feature_size: 16, out_channels }
    }

    /// Checks that the encoder and decoder fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.vit.validate()?;
        if self.vit.patch_size != UNETR_PATCH {
            return Err(ConfigError::UnetrPatch(self.vit.patch_size));
        }
        if self.vit.depth != UNETR_DEPTH {
            return Err(ConfigError::UnetrDepth(self.vit.depth));
        }
        if self.feature_size == 0 {
            return Err(ConfigError::Zero("feature_size"));
        }
        if self.out_channels == 0 || self.out_channels > 256 {
            return Err(ConfigError::OutChannels(self.out_channels));
        }
        Ok(())
    }

    /// Checks that `window` (voxels per axis) can be run by this model: a multiple of the patch,
    /// and equal to the configured input size when the position embedding is a learned table.
    pub fn check_window(&self, window: [usize; 3]) -> Result<(), ConfigError> {
        let p = self.vit.patch_size as usize;
        let configured = self.vit.img_size.map(|s| s as usize);
        let ok = match self.vit.pos_embed {
            PosEmbed::Learned => window == configured,
            PosEmbed::SinCos => window.iter().all(|&w| w > 0 && w.is_multiple_of(p)),
        };
        if ok {
            Ok(())
        } else {
            Err(ConfigError::Window {
                window: window.map(|w| w as u32),
                img_size: self.vit.img_size,
                learned: self.vit.pos_embed == PosEmbed::Learned,
            })
        }
    }
}

/// Why a configuration (or a window for it) cannot be built or run.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[allow(missing_docs)] // variant docs describe their fields
pub enum ConfigError {
    /// A size that must be positive is zero.
    Zero(&'static str),
    /// More blocks than [`MAX_DEPTH`].
    TooDeep(u32),
    /// `hidden_size` is not a multiple of `num_heads`.
    HeadsDoNotDivide { hidden_size: u32, num_heads: u32 },
    /// 3-D sin-cos embedding splits the width in six.
    SinCosWidth(u32),
    /// Each input side must be a positive multiple of the patch.
    ImgNotMultipleOfPatch { img_size: [u32; 3], patch_size: u32 },
    /// LayerNorm epsilon must be finite and positive.
    BadEpsilon,
    /// An input side above [`MAX_IMG_SIZE`].
    ImgTooLarge([u32; 3]),
    /// UNETR needs patch 16.
    UnetrPatch(u32),
    /// UNETR needs 12 encoder blocks.
    UnetrDepth(u32),
    /// Between 1 and 256 classes (labels are stored as bytes).
    OutChannels(u32),
    /// The window cannot be run by this model.
    Window { window: [u32; 3], img_size: [u32; 3], learned: bool },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Zero(field) => write!(f, "{field} must be positive"),
            Self::TooDeep(d) => write!(f, "depth {d} exceeds the maximum of {MAX_DEPTH}"),
            Self::HeadsDoNotDivide { hidden_size, num_heads } => {
                write!(f, "hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
            }
            Self::SinCosWidth(h) => {
                write!(f, "hidden_size {h} must be a multiple of 6 for the 3-D sin-cos position embedding")
            }
            Self::ImgNotMultipleOfPatch { img_size, patch_size } => {
                write!(f, "img_size {img_size:?} is not a positive multiple of patch_size {patch_size}")
            }
            Self::BadEpsilon => write!(f, "layer_norm_eps must be finite and positive"),
            Self::ImgTooLarge(s) => {
                write!(f, "img_size {s:?} exceeds the maximum of {MAX_IMG_SIZE} per axis")
            }
            Self::UnetrPatch(p) => write!(f, "UNETR needs patch_size {UNETR_PATCH}, got {p}"),
            Self::UnetrDepth(d) => write!(f, "UNETR needs an encoder of depth {UNETR_DEPTH}, got {d}"),
            Self::OutChannels(c) => write!(f, "out_channels must be between 1 and 256, got {c}"),
            Self::Window { window, img_size, learned } => {
                if learned {
                    write!(
                        f,
                        "window {window:?} differs from img_size {img_size:?}, which a learned position embedding requires"
                    )
                } else {
                    write!(f, "window {window:?} is not a positive multiple of the patch size {UNETR_PATCH}")
                }
            }
        }
    }
}

impl core::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_paper() {
        let t = VitConfig::vit_t([96; 3]);
        assert_eq!((t.hidden_size, t.depth, t.num_heads, t.mlp_dim), (192, 12, 3, 768));
        let b = VitConfig::vit_b([96; 3]);
        assert_eq!((b.hidden_size, b.depth, b.num_heads, b.mlp_dim), (768, 12, 12, 3072));
        assert_eq!(t.num_tokens(), 216);
        assert_eq!(VitConfig::vit_t([160; 3]).num_tokens(), 1000);
        UnetrConfig::vit_t([96; 3], 14).validate().unwrap();
        UnetrConfig::vit_b([96; 3], 14).validate().unwrap();
    }

    #[test]
    fn rejects_inconsistent_configs() {
        let mut c = UnetrConfig::vit_t([96; 3], 14);
        c.vit.num_heads = 5;
        assert!(matches!(c.validate(), Err(ConfigError::HeadsDoNotDivide { .. })));
        let mut c = UnetrConfig::vit_t([90, 96, 96], 14);
        assert!(matches!(c.validate(), Err(ConfigError::ImgNotMultipleOfPatch { .. })));
        c.vit.img_size = [96; 3];
        c.vit.depth = 8;
        assert_eq!(c.validate(), Err(ConfigError::UnetrDepth(8)));
        c.vit.depth = 12;
        c.out_channels = 0;
        assert_eq!(c.validate(), Err(ConfigError::OutChannels(0)));
        // A 512^3 window (a damaged or hostile file) is refused before anything is allocated.
        c.out_channels = 14;
        c.vit.img_size = [96, 512, 96];
        assert_eq!(c.validate(), Err(ConfigError::ImgTooLarge([96, 512, 96])));
        c.vit.img_size = [256; 3];
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn windows_follow_the_position_embedding() {
        let mut c = UnetrConfig::vit_t([96; 3], 14);
        assert!(c.check_window([160, 96, 32]).is_ok());
        assert!(c.check_window([100, 96, 32]).is_err());
        c.vit.pos_embed = PosEmbed::Learned;
        assert!(c.check_window([96; 3]).is_ok());
        assert!(c.check_window([160, 96, 96]).is_err());
    }
}
