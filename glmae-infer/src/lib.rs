//! # glmae-infer
//!
//! CPU inference from `.glmae` weight files. Today: loading a model with errors that name the
//! file, and describing it (`glmae-infer info`). Segmentation of NIfTI volumes builds on this.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use glmae_core::params::weight_count;
use glmae_core::{ModelFile, PosEmbed, Unetr};

/// Reads a weight file; the error names the file.
pub fn read_model_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read model file {}", path.display()))
}

/// Parses and checks weight-file bytes; the error names the file and the problem.
pub fn parse_model<'a>(path: &Path, bytes: &'a [u8]) -> Result<ModelFile<'a>> {
    ModelFile::parse(bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A human-readable summary: architecture, classes, preprocessing, storage and memory needs.
pub fn describe(file: &ModelFile<'_>) -> Result<String> {
    let c = &file.config;
    let v = &c.vit;
    let window = v.img_size.map(|s| s as usize);
    let model = Unetr::new(file)?;
    let scratch = model.segment_scratch_len(window)?;
    let (int8, f32_bytes) = file.storage();
    let p = &file.preprocessing;
    let mut s = String::new();
    writeln!(
        s,
        "model: UNETR, {} parameters in {} tensors, {} bytes on disk",
        weight_count(c),
        file.tensor_count(),
        file.len()
    )?;
    writeln!(s, "  weights: {int8} int8 values, {f32_bytes} bytes of f32")?;
    writeln!(
        s,
        "  encoder: ViT hidden {} depth {} heads {} mlp {} patch {}, qkv bias {}, LayerNorm eps {:e}, position {}",
        v.hidden_size,
        v.depth,
        v.num_heads,
        v.mlp_dim,
        v.patch_size,
        v.qkv_bias,
        v.layer_norm_eps,
        match v.pos_embed {
            PosEmbed::SinCos => "sin-cos (any window that is a multiple of 16)",
            PosEmbed::Learned => "learned (fixed window)",
        }
    )?;
    writeln!(
        s,
        "  decoder: feature size {}, {} input channel(s), window {:?}",
        c.feature_size, v.in_channels, v.img_size
    )?;
    writeln!(
        s,
        "  reference forward on one window needs {:.1} MiB of scratch",
        scratch as f64 * 4.0 / (1 << 20) as f64
    )?;
    writeln!(s, "preprocessing:")?;
    writeln!(
        s,
        "  orientation {}, spacing {:?} mm, foreground crop {}",
        p.orientation, p.target_spacing, p.foreground_crop
    )?;
    let w = &p.intensity;
    writeln!(s, "  intensity [{}, {}] -> [{}, {}], clip {}", w.a_min, w.a_max, w.b_min, w.b_max, w.clip)?;
    writeln!(s, "classes ({}):", p.class_names.len())?;
    for (i, name) in p.class_names.iter().enumerate() {
        writeln!(s, "  {i:>3}  {name}")?;
    }
    Ok(s)
}
