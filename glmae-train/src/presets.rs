//! Named model configurations for the command line. A preset names one encoder: `pretrain
//! --model P` and `finetune --model P` build the same ViT (apart from its window), so a fine-tuning
//! run can start from a pretraining run of the same preset.

use anyhow::{Result, bail};
use glmae_core::{UnetrConfig, testing_config};

use crate::pretrain::PretrainConfig;

/// The presets `--model` accepts.
pub const PRESETS: [&str; 3] = ["tiny", "vit-t", "vit-b"];

/// The UNETR for `name` with `classes` outputs and a cubic window of `img` voxels (`tiny` keeps
/// its own 32^3 window).
pub fn unetr(name: &str, classes: u32, img: u32) -> Result<UnetrConfig> {
    let mut cfg = match name {
        "tiny" => testing_config(),
        "vit-t" => UnetrConfig::vit_t([img; 3], classes),
        "vit-b" => UnetrConfig::vit_b([img; 3], classes),
        other => bail!("unknown model preset {other:?}; expected one of {}", PRESETS.join(", ")),
    };
    cfg.out_channels = classes;
    cfg.validate()?;
    Ok(cfg)
}

/// The pretraining configuration for `name`.
pub fn pretrain(name: &str) -> Result<PretrainConfig> {
    Ok(match name {
        "tiny" => PretrainConfig::tiny(),
        "vit-t" => PretrainConfig::vit_t(),
        "vit-b" => PretrainConfig::vit_b(),
        other => bail!("unknown model preset {other:?}; expected one of {}", PRESETS.join(", ")),
    })
}
