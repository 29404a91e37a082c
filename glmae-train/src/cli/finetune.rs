//! `glmae-train finetune`: UNETR fine-tuning on labelled volumes.

use std::path::PathBuf;

/// Flags of `finetune`.
#[derive(clap::Args)]
pub struct Args {
    /// dataset.json with training and validation lists (labels required).
    #[arg(long)]
    pub data: PathBuf,
    /// Run folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Encoder preset: vit-t, vit-b or tiny.
    #[arg(long, default_value = "vit-t")]
    pub model: String,
    /// Start from this pretraining run's encoder, whose shape then replaces the preset's, or
    /// from every weight of this `.glmae` model (e.g. `import`ed from MONAI), whose
    /// architecture, preprocessing and class names then replace --model, --roi, --feature-size
    /// and --spacing (default: from scratch).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Encoder width for a from-scratch run of the same shape as a narrow pretraining run
    /// (`pretrain --hidden`); with it, --heads.
    #[arg(long, requires = "heads", conflicts_with = "init")]
    pub hidden: Option<u32>,
    /// Attention heads with --hidden.
    #[arg(long, requires = "hidden")]
    pub heads: Option<u32>,
    /// Target spacing in mm that images and labels are resampled to (default 1.5,1.5,2, MONAI's
    /// BTCV recipe); give the data's own spacing to train on its grid.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub spacing: Option<Vec<f32>>,
    /// Keep the encoder fixed (linear evaluation).
    #[arg(long)]
    pub freeze_encoder: bool,
    /// Fraction of training cases with labels used (seeded subset).
    #[arg(long, default_value_t = 1.0)]
    pub label_fraction: f64,
    /// ROI edge in voxels (96 in the paper; `tiny` uses 32).
    #[arg(long)]
    pub roi: Option<u32>,
    /// Decoder feature size (16 MAE3D, 48 the authors' later code).
    #[arg(long, default_value_t = 16)]
    pub feature_size: u32,
    /// Steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Steps between validations.
    #[arg(long, default_value_t = 100)]
    pub val_every: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Crops per step.
    #[arg(long, default_value_t = 4)]
    pub crops: usize,
    /// Per-axis flip probability of the training crops (method.md's 0.2; 0 lets the model tell
    /// left from right, e.g. spleen from liver, as the quickstart does).
    #[arg(long, default_value_t = 0.2)]
    pub flip_p: f64,
    /// Probability of a random rot90 of the training crops (method.md's 0.2).
    #[arg(long, default_value_t = 0.2)]
    pub rot_p: f64,
    /// Use BTCV's split (img0035-0040 validate) instead of the json's lists.
    #[arg(long)]
    pub btcv_split: bool,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, ndarray, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Threads preparing crops.
    #[arg(long, default_value_t = 1)]
    pub loader_threads: usize,
}

/// Fine-tunes into `--out`.
pub fn run(a: Args) -> anyhow::Result<()> {
    use glmae_train::finetune::train::{TrainOptions, train};
    use glmae_train::finetune::{FinetuneConfig, Finetuner};
    let ds = glmae_data::Dataset::from_json(&a.data)?;
    let ds = if a.btcv_split { ds.btcv_split() } else { ds };
    let classes = ds.labels.keys().last().map_or(0, |&k| k + 1);
    anyhow::ensure!(
        classes >= 2,
        "{}: the \"labels\" map needs background and at least one class",
        a.data.display()
    );
    let mut cfg = match &a.init {
        // A whole model: its architecture, preprocessing and class names carry over.
        Some(model) if glmae_train::finetune::is_model_file(model) => {
            anyhow::ensure!(
                a.roi.is_none() && a.spacing.is_none(),
                "--roi and --spacing are the model's own when --init is a .glmae file"
            );
            let cfg = FinetuneConfig::from_model_file(model)?;
            anyhow::ensure!(
                cfg.class_names.len() == classes as usize,
                "{} has {} classes ({}), {} has {classes}: fine-tuning keeps the model's output layer",
                model.display(),
                cfg.class_names.len(),
                cfg.class_names.join(", "),
                a.data.display()
            );
            cfg
        }
        _ => {
            let roi = a.roi.unwrap_or(if a.model == "tiny" { 32 } else { 96 });
            let mut unetr = glmae_train::presets::unetr(&a.model, classes, roi)?;
            unetr.feature_size = if a.model == "tiny" { unetr.feature_size } else { a.feature_size };
            if let Some(run) = &a.init {
                // The encoder is the pretraining run's, whatever its width; only the window is ours.
                let encoder = glmae_train::pretrain::run::RunDir::open(run)?.load_config()?.encoder;
                unetr.vit = glmae_core::VitConfig { img_size: unetr.vit.img_size, ..encoder };
            }
            if let (Some(hidden), Some(heads)) = (a.hidden, a.heads) {
                let narrow =
                    glmae_train::pretrain::PretrainConfig::narrow(hidden, heads, (64, 32), 1, 2).encoder;
                unetr.vit = glmae_core::VitConfig { img_size: unetr.vit.img_size, ..narrow };
            }
            unetr.validate()?;
            let names = (0..classes)
                .map(|c| ds.labels.get(&c).cloned().unwrap_or_else(|| format!("class {c}")))
                .collect();
            let mut cfg = FinetuneConfig::new(unetr, names);
            cfg.init_from = a.init.clone();
            cfg
        }
    };
    if let Some(s) = &a.spacing {
        anyhow::ensure!(
            s.len() == 3 && s.iter().all(|v| v.is_finite() && *v > 0.0),
            "--spacing needs three positive millimetre values, got {s:?}"
        );
        cfg.preprocessing.spacing = [s[0], s[1], s[2]];
    }
    cfg.freeze_encoder = a.freeze_encoder;
    cfg.label_fraction = a.label_fraction;
    cfg.steps = a.steps;
    cfg.val_every = a.val_every;
    cfg.lr = a.lr;
    cfg.crops_per_step = a.crops;
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.flip_p) && (0.0..=1.0).contains(&a.rot_p),
        "--flip-p and --rot-p are probabilities in [0, 1]"
    );
    cfg.augment.flip_p = a.flip_p;
    cfg.augment.rot_p = a.rot_p;
    cfg.seed = a.seed;
    cfg.warmup_steps = cfg.warmup_steps.min(a.steps / 10);
    let mut ft = Finetuner::new(cfg, glmae_train::device::training_device(&a.device)?)?;
    let opts = TrainOptions { loader_threads: a.loader_threads, validate: true, progress_bar: true };
    let best = train(&mut ft, &ds, &a.out, opts)?.unwrap_or(0.0);
    println!("best validation mean Dice {:.4}; models in {}", best, a.out.display());
    Ok(())
}
