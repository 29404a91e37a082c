//! `glmae-train init-model`: a UNETR with deterministic random weights.

use std::path::PathBuf;

use glmae_core::format::Precision;

/// Flags of `init-model`.
#[derive(clap::Args)]
pub struct Args {
    /// Architecture preset: tiny, vit-t or vit-b.
    #[arg(long, default_value = "vit-t")]
    pub model: String,
    /// Output classes, background included.
    #[arg(long, default_value_t = 14)]
    pub classes: u32,
    /// Cubic input window in voxels (ignored by `tiny`, which is 32).
    #[arg(long, default_value_t = 96)]
    pub img: u32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Store weight matrices as int8 with per-channel scales.
    #[arg(long)]
    pub int8: bool,
    /// Output `.glmae` file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes the model.
pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { model, classes, img, seed, int8, out } = a;
    let cfg = glmae_train::presets::unetr(&model, classes, img)?;
    let precision = if int8 { Precision::Int8 } else { Precision::F32 };
    let bytes = glmae_core::synthetic::random_model(&cfg, seed, precision)?;
    glmae_data::io::atomic_write(&out, &bytes)?;
    println!("wrote {} ({} bytes, {model}, {classes} classes, {precision:?})", out.display(), bytes.len());
    Ok(())
}
