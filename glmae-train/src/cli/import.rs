//! `glmae-train import`: a MONAI state dict, bundle or GL-MAE authors' checkpoint to `.glmae`.

use std::path::PathBuf;

use glmae_core::format::Precision;

/// Flags of `import`.
#[derive(clap::Args)]
pub struct Args {
    /// The state dict (`.safetensors`, `.pt` or `.pth`), or a MONAI bundle folder
    /// (`configs/inference.json` + `models/model.pt`), whose inference transforms, window,
    /// heads and class names (`configs/metadata.json`) are read; flags override them.
    pub input: PathBuf,
    /// Output `.glmae` file.
    #[arg(long)]
    pub out: PathBuf,
    /// Attention heads (not recorded in a state dict; a bundle's `num_heads`, else MONAI's 12).
    #[arg(long)]
    pub heads: Option<u32>,
    /// LayerNorm epsilon (MONAI uses PyTorch's 1e-5).
    #[arg(long, default_value_t = 1e-5)]
    pub eps: f32,
    /// Store weight matrices as int8.
    #[arg(long)]
    pub int8: bool,
    /// Target spacing in mm, as MONAI's Spacingd pixdim (default 1.5,1.5,2).
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub spacing: Option<Vec<f32>>,
    /// ScaleIntensityRanged's a_min,a_max,b_min,b_max (default -175,250,0,1).
    #[arg(long, value_delimiter = ',', num_args = 1, allow_hyphen_values = true)]
    pub intensity: Option<Vec<f32>>,
    /// ScaleIntensityRanged's clip (default true).
    #[arg(long, action = clap::ArgAction::Set)]
    pub clip: Option<bool>,
    /// Cubic sliding-window ROI in voxels (default: the position table's grid, else 96).
    #[arg(long)]
    pub roi: Option<u32>,
    /// No foreground crop before inference (CropForegroundd left out).
    #[arg(long)]
    pub no_crop: bool,
    /// Class names, background first: a JSON list, an MSD labels map or dataset.json, or one
    /// name per line.
    #[arg(long)]
    pub classes: Option<PathBuf>,
}

/// Converts and writes the model.
pub fn run(a: Args) -> anyhow::Result<()> {
    use glmae_train::io::import::{ImportPreprocessing, read_class_names};
    let Args { input, out, heads, eps, int8, spacing, intensity, clip, roi, no_crop, classes } = a;
    let (weights, bundle) = if input.is_dir() {
        anyhow::ensure!(
            glmae_train::io::bundle::is_bundle(&input),
            "{}: a folder to import must be a MONAI bundle (configs/inference.json, models/model.pt)",
            input.display()
        );
        let b = glmae_train::io::bundle::read_bundle(&input)?;
        for note in &b.config.notes {
            println!("bundle: {note}");
        }
        (b.weights.clone(), Some(b))
    } else {
        (input.clone(), None)
    };
    let heads = heads.or(bundle.as_ref().and_then(|b| b.config.num_heads)).unwrap_or(12);
    let from_bundle = bundle.map(|b| b.config.preprocessing).unwrap_or_default();
    let opts = glmae_train::io::import::ImportOptions { num_heads: heads, layer_norm_eps: eps };
    let (mut cfg, tensors) = glmae_train::io::import::import_unetr(&weights, &opts)?;
    let precision = if int8 { Precision::Int8 } else { Precision::F32 };
    let three = |v: Option<Vec<f32>>, n: usize, flag: &str| -> anyhow::Result<Option<Vec<f32>>> {
        if let Some(v) = &v {
            anyhow::ensure!(v.len() == n, "{flag} takes {n} comma-separated values, got {}", v.len());
        }
        Ok(v)
    };
    // A flag given wins over the bundle's value, which wins over the BTCV default.
    let choices = ImportPreprocessing {
        orientation: from_bundle.orientation,
        spacing: three(spacing, 3, "--spacing")?.map(|v| [v[0], v[1], v[2]]).or(from_bundle.spacing),
        intensity: three(intensity, 4, "--intensity")?
            .map(|v| [v[0], v[1], v[2], v[3]])
            .or(from_bundle.intensity),
        clip: clip.or(from_bundle.clip),
        roi: roi.or(from_bundle.roi),
        crop: if no_crop { Some(false) } else { from_bundle.crop },
        classes: classes.as_deref().map(read_class_names).transpose()?.or(from_bundle.classes),
    };
    let prep = choices.apply(&mut cfg)?;
    println!(
        "preprocessing: {} {:?} mm, intensity [{}, {}] -> [{}, {}]{}, {}, window {:?}; classes: {}",
        prep.orientation,
        prep.target_spacing,
        prep.intensity.a_min,
        prep.intensity.a_max,
        prep.intensity.b_min,
        prep.intensity.b_max,
        if prep.intensity.clip { " clipped" } else { "" },
        if prep.foreground_crop { "foreground crop" } else { "no crop" },
        cfg.vit.img_size,
        prep.class_names.join(", ")
    );
    let bytes = glmae_train::io::import::model_bytes(cfg, prep, precision, &tensors)?;
    glmae_data::io::atomic_write(&out, &bytes)?;
    println!("wrote {} ({} bytes) with that preprocessing", out.display(), bytes.len());
    Ok(())
}
