//! `glmae-train pretrain`: GL-MAE pretraining, new or resumed.

use std::path::PathBuf;

/// Flags of `pretrain`.
#[derive(clap::Args)]
pub struct Args {
    /// A dataset.json, or folders of .nii/.nii.gz images separated by commas.
    #[arg(long, required_unless_present = "resume")]
    pub data: Option<String>,
    /// Encoder preset: vit-t, vit-b or tiny (a seconds-long smoke test).
    #[arg(long, conflicts_with = "resume", default_value = "vit-t")]
    pub model: String,
    /// Run folder: config.json, metrics.csv, checkpoint.bin.
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder exactly where its last checkpoint left off, with its own
    /// configuration (flags that would change it are refused).
    #[arg(long, conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// Start a new run in an --out folder that already holds one (its checkpoint and metrics
    /// are replaced); without it such a folder is refused.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// cpu (burn flex), ndarray, cuda or cuda:N; several GPUs (cuda:0,cuda:1 or cuda:all) train
    /// data-parallel, each taking an equal share of every batch.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Float type of all tensors: f32, bf16 or f16 (bf16/f16 on GPUs; saved with the run).
    #[arg(long, value_enum)]
    pub precision: Option<glmae_train::device::ComputePrecision>,
    /// Optimisation steps.
    #[arg(long, conflicts_with = "resume")]
    pub steps: Option<usize>,
    /// Encoder width instead of the preset's: ViT-T's shape at another width, with a 2-block
    /// decoder as wide and a 4x-wide head to 128 (the quickstart's and the experiment's model).
    #[arg(long, conflicts_with = "resume")]
    pub hidden: Option<u32>,
    /// Attention heads with --hidden.
    #[arg(long, conflicts_with = "resume", default_value_t = 3)]
    pub heads: u32,
    /// Global and local view edges in voxels with --hidden (GLOBAL,LOCAL).
    #[arg(long, conflicts_with = "resume", value_delimiter = ',', default_values_t = [64, 32])]
    pub views: Vec<usize>,
    /// Volumes per step.
    #[arg(long, conflicts_with = "resume")]
    pub batch_size: Option<usize>,
    /// Linear warm-up steps.
    #[arg(long, conflicts_with = "resume")]
    pub warmup_steps: Option<usize>,
    /// Base learning rate: the peak rate is base_lr x batch / 256 (default 1e-2, the paper's
    /// rate read as MAE's base rate).
    #[arg(long, conflicts_with = "resume")]
    pub base_lr: Option<f64>,
    /// Absolute peak learning rate, instead of the base_lr rule.
    #[arg(long, conflicts_with = "resume")]
    pub lr: Option<f64>,
    /// AdamW weight decay on weight matrices (biases, norms and the mask token get none).
    #[arg(long, conflicts_with = "resume")]
    pub weight_decay: Option<f64>,
    /// Teacher temperature after the warm-up (0.04; DINO uses 0.04-0.07).
    #[arg(long, conflicts_with = "resume")]
    pub teacher_temp: Option<f64>,
    /// Steps of DINO's linear teacher-temperature warm-up from 0.04 to --teacher-temp.
    #[arg(long, conflicts_with = "resume")]
    pub teacher_temp_warmup: Option<usize>,
    /// Teacher EMA momentum at step 0 (0.996; it rises to 1 on a cosine).
    #[arg(long, conflicts_with = "resume")]
    pub teacher_momentum: Option<f64>,
    /// Momentum of the teacher-output centre (0.9).
    #[arg(long, conflicts_with = "resume")]
    pub center_momentum: Option<f64>,
    /// The teacher's anti-collapse normalisation: mean (DINO's running centre) or sinkhorn
    /// (DINOv2's Sinkhorn-Knopp over each step's teacher views).
    #[arg(long, conflicts_with = "resume", value_enum)]
    pub centering: Option<glmae_train::pretrain::loss::Centering>,
    /// Standardise the head's pooled input over each forward pass's views (DINO's `use_bn`).
    #[arg(long, conflicts_with = "resume")]
    pub head_batch_norm: bool,
    /// Start the teacher centre at the first batch's mean instead of 0.
    #[arg(long, conflicts_with = "resume")]
    pub center_warm_start: bool,
    /// Size K of the consistency distributions (the head's output).
    #[arg(long, conflicts_with = "resume")]
    pub head_out: Option<usize>,
    /// DINO's head: an L2-normalised bottleneck of this width and a weight-normalised last
    /// layer (0: the paper's three-layer head).
    #[arg(long, conflicts_with = "resume")]
    pub head_bottleneck: Option<usize>,
    /// Loss terms: full (GL-MAE), global-local (no consistency), local-only (MAE3D).
    #[arg(long, conflicts_with = "resume", value_enum)]
    pub ablation: Option<glmae_train::pretrain::Ablation>,
    /// Weight of the consistency loss.
    #[arg(long, conflicts_with = "resume")]
    pub lambda: Option<f64>,
    /// Global and local views per volume.
    #[arg(long, conflicts_with = "resume")]
    pub n_global: Option<usize>,
    /// Local views per volume.
    #[arg(long, conflicts_with = "resume")]
    pub n_local: Option<usize>,
    /// Fraction of tokens masked.
    #[arg(long, conflicts_with = "resume")]
    pub mask_ratio: Option<f64>,
    /// Normalise target patches.
    #[arg(long, conflicts_with = "resume")]
    pub norm_pix_loss: bool,
    /// Seed.
    #[arg(long, conflicts_with = "resume")]
    pub seed: Option<u64>,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Threads preparing samples.
    #[arg(long, default_value_t = 1)]
    pub loader_threads: usize,
    /// Preprocessed-volume cache folder (default: RUN_DIR/cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
}

/// Pretrains (or resumes) into the run folder.
pub fn run(a: Args) -> anyhow::Result<()> {
    use glmae_train::device::training_devices;
    use glmae_train::pretrain::run::RunDir;
    use glmae_train::pretrain::train::{LoopOptions, train_loop_on};
    use glmae_train::pretrain::{PretrainConfig, Pretrainer};
    let (dir, mut run, data, devices) = match (&a.resume, &a.out) {
        (Some(root), _) => {
            let dir = RunDir::open(root)?;
            let precision = dir.load_config()?.precision;
            if a.precision.is_some_and(|p| p != precision) {
                anyhow::bail!(
                    "{} was trained in {precision:?}; a resumed run keeps its precision",
                    root.display()
                );
            }
            let devices = training_devices(&a.device, precision)?;
            let run = dir.resume(devices[0].clone())?;
            let data = std::fs::read_to_string(root.join("data.txt"))
                .map_err(|e| anyhow::anyhow!("{}: {e}", root.join("data.txt").display()))?;
            println!("resuming {} at step {}/{}", root.display(), run.step, run.cfg.steps);
            (dir, run, data.trim().to_string(), devices)
        }
        (None, Some(out)) => {
            // A second `pretrain --out RUN` used to start from scratch over a trained run.
            if out.join("config.json").is_file() && !a.overwrite {
                anyhow::bail!(
                    "{} already holds a pretraining run: continue it with --resume {}, or pass \
                     --overwrite to start a new run there",
                    out.display(),
                    out.display()
                );
            }
            let mut cfg = glmae_train::presets::pretrain(&a.model)?;
            if let Some(hidden) = a.hidden {
                anyhow::ensure!(a.views.len() == 2, "--views takes two sizes, GLOBAL,LOCAL");
                anyhow::ensure!(
                    hidden > 0 && a.heads > 0 && hidden.is_multiple_of(a.heads) && hidden.is_multiple_of(6),
                    "--hidden {hidden} must be a multiple of --heads {} and of 6 (sin-cos positions)",
                    a.heads
                );
                cfg = PretrainConfig::narrow(
                    hidden,
                    a.heads,
                    (a.views[0], a.views[1]),
                    cfg.steps,
                    cfg.batch_size,
                );
            }
            macro_rules! set {
                ($($field:ident).+ = $arg:expr) => {
                    if let Some(v) = $arg {
                        cfg.$($field).+ = v;
                    }
                };
            }
            set!(steps = a.steps);
            set!(batch_size = a.batch_size);
            set!(warmup_steps = a.warmup_steps);
            set!(base_lr = a.base_lr);
            cfg.lr = a.lr.or(cfg.lr);
            set!(weight_decay = a.weight_decay);
            set!(consistency.tau_teacher = a.teacher_temp);
            set!(consistency.tau_teacher_warmup_steps = a.teacher_temp_warmup);
            set!(head.out = a.head_out);
            set!(teacher_momentum = a.teacher_momentum);
            set!(consistency.centering = a.centering);
            set!(consistency.center_momentum = a.center_momentum);
            set!(head.bottleneck = a.head_bottleneck);
            set!(ablation = a.ablation);
            set!(lambda = a.lambda);
            set!(views.n_global = a.n_global);
            set!(views.n_local = a.n_local);
            set!(views.mask_ratio = a.mask_ratio);
            set!(seed = a.seed);
            set!(precision = a.precision);
            cfg.norm_pix_loss |= a.norm_pix_loss;
            cfg.consistency.center_warm_start |= a.center_warm_start;
            cfg.head.batch_norm |= a.head_batch_norm;
            println!(
                "peak learning rate {:.3e} ({})",
                cfg.peak_lr(),
                if cfg.lr.is_some() {
                    "--lr".to_string()
                } else {
                    format!("base {:.1e} x batch {} / 256", cfg.base_lr, cfg.batch_size)
                }
            );
            cfg.validate()?;
            let devices = training_devices(&a.device, cfg.precision)?;
            let dir = RunDir::create(out)?;
            dir.save_config(&cfg)?;
            let data = a.data.clone().unwrap_or_default();
            glmae_data::io::atomic_write(&out.join("data.txt"), data.as_bytes())?;
            (dir, Pretrainer::new(cfg, devices[0].clone()), data, devices)
        }
        (None, None) => anyhow::bail!("give --out RUN_DIR for a new run or --resume RUN_DIR"),
    };
    let ds = glmae_data::Dataset::open(&data)?;
    let cases: Vec<glmae_data::Case> = ds
        .training
        .iter()
        .chain(&ds.validation)
        .chain(&ds.test)
        .map(|c| glmae_data::Case { image: c.image.clone(), label: None })
        .collect();
    let cache_dir = a.cache.clone().unwrap_or_else(|| dir.root().join("cache"));
    let cache = std::sync::Arc::new(glmae_data::VolumeCache::new(
        glmae_data::preprocess::Preprocessor::pretraining(),
        Some(cache_dir),
    ));
    println!("preparing {} volumes", cases.len());
    cache.warm(&cases, a.loader_threads.max(2))?;
    let opts = LoopOptions {
        checkpoint_every: a.checkpoint_every,
        loader_threads: a.loader_threads,
        progress: true,
    };
    if devices.len() > 1 {
        println!(
            "data-parallel over {} devices, {} volumes each per step",
            devices.len(),
            run.cfg.batch_size / devices.len()
        );
    }
    let metrics = train_loop_on(&mut run, &devices[1..], &dir, &cases, cache, &opts)?;
    if let Some(last) = metrics.last() {
        println!(
            "step {}: loss {:.4}; metrics in {}, checkpoint in {}",
            last.step + 1,
            last.loss,
            dir.metrics_path().display(),
            dir.checkpoint_path().display()
        );
    }
    Ok(())
}
