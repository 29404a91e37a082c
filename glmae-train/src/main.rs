//! `glmae-train`: GL-MAE pretraining, UNETR fine-tuning, evaluation and export.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use glmae_core::format::Precision;

#[derive(Parser)]
#[command(name = "glmae-train", version, about = "GL-MAE pretraining and UNETR fine-tuning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole pipeline on built-in phantoms: pretrain, fine-tune, evaluate, export, segment.
    Quickstart {
        /// Output folder.
        #[arg(long, default_value = "quickstart")]
        out: PathBuf,
        /// tiny (seconds, a smoke test) or small (about ten minutes on 2 cores).
        #[arg(long, value_enum, default_value = "small")]
        scale: glmae_train::quickstart::Scale,
        /// cpu, ndarray, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Write a UNETR with deterministic random weights: for smoke tests, benchmarks and firmware
    /// bring-up before a trained model exists.
    InitModel {
        /// Architecture preset: tiny, vit-t or vit-b.
        #[arg(long, default_value = "vit-t")]
        model: String,
        /// Output classes, background included.
        #[arg(long, default_value_t = 14)]
        classes: u32,
        /// Cubic input window in voxels (ignored by `tiny`, which is 32).
        #[arg(long, default_value_t = 96)]
        img: u32,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Store weight matrices as int8 with per-channel scales.
        #[arg(long)]
        int8: bool,
        /// Output `.glmae` file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write synthetic abdominal CT phantoms with the 13 BTCV organs as an MSD dataset
    /// (imagesTr, labelsTr, dataset.json): the built-in data for training and tests.
    MakePhantoms {
        /// Output folder (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Number of volumes; the last fifth is listed for validation.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Seed of the first volume (volume i uses seed + i).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Voxels per axis.
        #[arg(long, value_delimiter = ',', default_values_t = [160, 128, 96])]
        shape: Vec<usize>,
        /// Voxel spacing in mm per axis.
        #[arg(long, value_delimiter = ',', default_values_t = [2.0, 2.0, 2.5])]
        spacing: Vec<f32>,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// GL-MAE pretraining of a ViT encoder on unlabelled volumes.
    Pretrain(Box<PretrainArgs>),
    /// Fine-tune UNETR on labelled volumes, from scratch or from a pretraining run's encoder.
    Finetune(Box<FinetuneArgs>),
    /// Sliding-window evaluation of a fine-tuned run: Dice CSV, markdown table, PNG overlays.
    Evaluate {
        /// The fine-tuning run folder.
        run: PathBuf,
        /// dataset.json with labels.
        #[arg(long)]
        data: PathBuf,
        /// Which list to evaluate: validation, training or test.
        #[arg(long, default_value = "validation")]
        split: String,
        /// Output folder (default RUN/eval).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Model to evaluate: best or last.
        #[arg(long, default_value = "best")]
        which: String,
        /// Sliding-window overlap.
        #[arg(long)]
        overlap: Option<f64>,
        /// constant or gaussian.
        #[arg(long)]
        blend: Option<glmae_data::sliding_window::Blend>,
        /// cpu or ndarray (cuda with the feature).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Measure a pretraining run's encoder in minutes: k-NN and linear probes of its frozen patch
    /// tokens beside a random-initialised encoder's (probe.md, probe.json).
    Probe(Box<ProbeArgs>),
    /// Convert a MONAI UNETR state dict, a MONAI bundle or a GL-MAE authors' checkpoint
    /// (safetensors or PyTorch `.pt`/`.pth`) to `.glmae`.
    Import {
        /// The state dict (`.safetensors`, `.pt` or `.pth`), or a MONAI bundle folder
        /// (`configs/inference.json` + `models/model.pt`), whose inference transforms, window,
        /// heads and class names (`configs/metadata.json`) are read; flags override them.
        input: PathBuf,
        /// Output `.glmae` file.
        #[arg(long)]
        out: PathBuf,
        /// Attention heads (not recorded in a state dict; a bundle's `num_heads`, else MONAI's 12).
        #[arg(long)]
        heads: Option<u32>,
        /// LayerNorm epsilon (MONAI uses PyTorch's 1e-5).
        #[arg(long, default_value_t = 1e-5)]
        eps: f32,
        /// Store weight matrices as int8.
        #[arg(long)]
        int8: bool,
        /// Target spacing in mm, as MONAI's Spacingd pixdim (default 1.5,1.5,2).
        #[arg(long, value_delimiter = ',', num_args = 1)]
        spacing: Option<Vec<f32>>,
        /// ScaleIntensityRanged's a_min,a_max,b_min,b_max (default -175,250,0,1).
        #[arg(long, value_delimiter = ',', num_args = 1, allow_hyphen_values = true)]
        intensity: Option<Vec<f32>>,
        /// ScaleIntensityRanged's clip (default true).
        #[arg(long, action = clap::ArgAction::Set)]
        clip: Option<bool>,
        /// Cubic sliding-window ROI in voxels (default: the position table's grid, else 96).
        #[arg(long)]
        roi: Option<u32>,
        /// No foreground crop before inference (CropForegroundd left out).
        #[arg(long)]
        no_crop: bool,
        /// Class names, background first: a JSON list, an MSD labels map or dataset.json, or one
        /// name per line.
        #[arg(long)]
        classes: Option<PathBuf>,
    },
    /// Experiments that compare whole runs: `ablation` (the paper's Table 4 on phantoms).
    #[command(subcommand)]
    Experiment(glmae_train::experiment::Command),
    /// Write a fine-tuned run as a `.glmae` model with its preprocessing and class names.
    Export {
        /// The fine-tuning run folder.
        run: PathBuf,
        /// Output `.glmae` file.
        #[arg(long)]
        out: PathBuf,
        /// Store weight matrices as int8 with per-channel scales.
        #[arg(long)]
        int8: bool,
        /// Model to export: best or last.
        #[arg(long, default_value = "best")]
        which: String,
    },
}

#[derive(clap::Args)]
struct FinetuneArgs {
    /// dataset.json with training and validation lists (labels required).
    #[arg(long)]
    data: PathBuf,
    /// Run folder.
    #[arg(long)]
    out: PathBuf,
    /// Encoder preset: vit-t, vit-b or tiny.
    #[arg(long, default_value = "vit-t")]
    model: String,
    /// Start from this pretraining run's encoder, whose shape then replaces the preset's, or
    /// from every weight of this `.glmae` model (e.g. `import`ed from MONAI), whose
    /// architecture, preprocessing and class names then replace --model, --roi, --feature-size
    /// and --spacing (default: from scratch).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Encoder width for a from-scratch run of the same shape as a narrow pretraining run
    /// (`pretrain --hidden`); with it, --heads.
    #[arg(long, requires = "heads", conflicts_with = "init")]
    hidden: Option<u32>,
    /// Attention heads with --hidden.
    #[arg(long, requires = "hidden")]
    heads: Option<u32>,
    /// Target spacing in mm that images and labels are resampled to (default 1.5,1.5,2, MONAI's
    /// BTCV recipe); give the data's own spacing to train on its grid.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    spacing: Option<Vec<f32>>,
    /// Keep the encoder fixed (linear evaluation).
    #[arg(long)]
    freeze_encoder: bool,
    /// Fraction of training cases with labels used (seeded subset).
    #[arg(long, default_value_t = 1.0)]
    label_fraction: f64,
    /// ROI edge in voxels (96 in the paper; `tiny` uses 32).
    #[arg(long)]
    roi: Option<u32>,
    /// Decoder feature size (16 MAE3D, 48 the authors' later code).
    #[arg(long, default_value_t = 16)]
    feature_size: u32,
    /// Steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Steps between validations.
    #[arg(long, default_value_t = 100)]
    val_every: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Crops per step.
    #[arg(long, default_value_t = 4)]
    crops: usize,
    /// Per-axis flip probability of the training crops (method.md's 0.2; 0 lets the model tell
    /// left from right, e.g. spleen from liver, as the quickstart does).
    #[arg(long, default_value_t = 0.2)]
    flip_p: f64,
    /// Probability of a random rot90 of the training crops (method.md's 0.2).
    #[arg(long, default_value_t = 0.2)]
    rot_p: f64,
    /// Use BTCV's split (img0035-0040 validate) instead of the json's lists.
    #[arg(long)]
    btcv_split: bool,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, ndarray, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Threads preparing crops.
    #[arg(long, default_value_t = 1)]
    loader_threads: usize,
}

fn finetune(a: FinetuneArgs) -> anyhow::Result<()> {
    use glmae_train::finetune::{FinetuneConfig, Finetuner, train};
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
                let encoder = glmae_train::run::RunDir::open(run)?.load_config()?.encoder;
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
    let ft = Finetuner::new(cfg, glmae_train::device::training_device(&a.device)?)?;
    let best = train(ft, &ds, &a.out, a.loader_threads)?;
    println!("best validation mean Dice {:.4}; models in {}", best, a.out.display());
    Ok(())
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// The pretraining run folder (config.json, checkpoint.bin).
    run: PathBuf,
    /// dataset.json with labels: fitted on `training`, scored on `validation`.
    #[arg(long)]
    data: PathBuf,
    /// Output folder (default RUN/probe).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Neighbours of the k-NN classifier.
    #[arg(long, default_value_t = 20)]
    k: usize,
    /// A patch is labelled when its majority class covers at least this fraction of it.
    #[arg(long, default_value_t = 0.5)]
    min_fraction: f64,
    /// Also cut the volumes at offsets of half a patch (8 grids; `--shifts false` for one).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    shifts: bool,
    /// At most this many fitting patches (a seeded subsample).
    #[arg(long, default_value_t = 100_000)]
    max_fit: usize,
    /// Resample to this spacing in mm (default: the run's, else the first training image's).
    #[arg(long, value_delimiter = ',')]
    spacing: Option<Vec<f32>>,
    /// Seed of the random control encoder and the subsample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Probe the hidden state after this many transformer blocks (0: the patch embedding; UNETR
    /// taps 3, 6 and 9) instead of the encoder's final normed output.
    #[arg(long)]
    blocks: Option<usize>,
    /// Probe the EMA teacher's encoder instead of the student's (what fine-tuning starts from).
    #[arg(long)]
    teacher: bool,
    /// cpu or ndarray (cuda with the feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn probe(a: ProbeArgs) -> anyhow::Result<()> {
    use glmae_train::probe::{ProbeOptions, probe_run};
    let opts = ProbeOptions {
        k: a.k,
        min_fraction: a.min_fraction,
        shifts: a.shifts,
        max_fit: a.max_fit,
        seed: a.seed,
        blocks: a.blocks,
        teacher: a.teacher,
        ..ProbeOptions::default()
    };
    let spacing = match a.spacing.as_deref() {
        None => None,
        Some(&[x, y, z]) => Some([x, y, z]),
        Some(_) => anyhow::bail!("--spacing takes three values, e.g. 1.5,1.5,2"),
    };
    let out = a.out.unwrap_or_else(|| a.run.join("probe"));
    let device = glmae_train::device::base_device(&a.device)?;
    let r = probe_run(&a.run, &a.data, &out, &opts, spacing, &device)?;
    print!("{}", r.markdown);
    println!("written to {} and {}", r.markdown_path.display(), r.json_path.display());
    Ok(())
}

#[derive(clap::Args)]
struct PretrainArgs {
    /// A dataset.json, or folders of .nii/.nii.gz images separated by commas.
    #[arg(long, required_unless_present = "resume")]
    data: Option<String>,
    /// Encoder preset: vit-t, vit-b or tiny (a seconds-long smoke test).
    #[arg(long, conflicts_with = "resume", default_value = "vit-t")]
    model: String,
    /// Run folder: config.json, metrics.csv, checkpoint.bin.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this folder exactly where its last checkpoint left off, with its own
    /// configuration (flags that would change it are refused).
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Start a new run in an --out folder that already holds one (its checkpoint and metrics
    /// are replaced); without it such a folder is refused.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// cpu (burn flex), ndarray, cuda or cuda:N; several GPUs (cuda:0,cuda:1 or cuda:all) train
    /// data-parallel, each taking an equal share of every batch.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Float type of all tensors: f32, bf16 or f16 (bf16/f16 on GPUs; saved with the run).
    #[arg(long, value_enum)]
    precision: Option<glmae_train::device::ComputePrecision>,
    /// Optimisation steps.
    #[arg(long, conflicts_with = "resume")]
    steps: Option<usize>,
    /// Encoder width instead of the preset's: ViT-T's shape at another width, with a 2-block
    /// decoder as wide and a 4x-wide head to 128 (the quickstart's and the experiment's model).
    #[arg(long, conflicts_with = "resume")]
    hidden: Option<u32>,
    /// Attention heads with --hidden.
    #[arg(long, conflicts_with = "resume", default_value_t = 3)]
    heads: u32,
    /// Global and local view edges in voxels with --hidden (GLOBAL,LOCAL).
    #[arg(long, conflicts_with = "resume", value_delimiter = ',', default_values_t = [64, 32])]
    views: Vec<usize>,
    /// Volumes per step.
    #[arg(long, conflicts_with = "resume")]
    batch_size: Option<usize>,
    /// Linear warm-up steps.
    #[arg(long, conflicts_with = "resume")]
    warmup_steps: Option<usize>,
    /// Base learning rate: the peak rate is base_lr x batch / 256 (default 1e-2, the paper's
    /// rate read as MAE's base rate).
    #[arg(long, conflicts_with = "resume")]
    base_lr: Option<f64>,
    /// Absolute peak learning rate, instead of the base_lr rule.
    #[arg(long, conflicts_with = "resume")]
    lr: Option<f64>,
    /// AdamW weight decay on weight matrices (biases, norms and the mask token get none).
    #[arg(long, conflicts_with = "resume")]
    weight_decay: Option<f64>,
    /// Teacher temperature after the warm-up (0.04; DINO uses 0.04-0.07).
    #[arg(long, conflicts_with = "resume")]
    teacher_temp: Option<f64>,
    /// Steps of DINO's linear teacher-temperature warm-up from 0.04 to --teacher-temp.
    #[arg(long, conflicts_with = "resume")]
    teacher_temp_warmup: Option<usize>,
    /// Teacher EMA momentum at step 0 (0.996; it rises to 1 on a cosine).
    #[arg(long, conflicts_with = "resume")]
    teacher_momentum: Option<f64>,
    /// Momentum of the teacher-output centre (0.9).
    #[arg(long, conflicts_with = "resume")]
    center_momentum: Option<f64>,
    /// The teacher's anti-collapse normalisation: mean (DINO's running centre) or sinkhorn
    /// (DINOv2's Sinkhorn-Knopp over each step's teacher views).
    #[arg(long, conflicts_with = "resume", value_enum)]
    centering: Option<glmae_train::loss::Centering>,
    /// Standardise the head's pooled input over each forward pass's views (DINO's `use_bn`).
    #[arg(long, conflicts_with = "resume")]
    head_batch_norm: bool,
    /// Start the teacher centre at the first batch's mean instead of 0.
    #[arg(long, conflicts_with = "resume")]
    center_warm_start: bool,
    /// Size K of the consistency distributions (the head's output).
    #[arg(long, conflicts_with = "resume")]
    head_out: Option<usize>,
    /// DINO's head: an L2-normalised bottleneck of this width and a weight-normalised last
    /// layer (0: the paper's three-layer head).
    #[arg(long, conflicts_with = "resume")]
    head_bottleneck: Option<usize>,
    /// Loss terms: full (GL-MAE), global-local (no consistency), local-only (MAE3D).
    #[arg(long, conflicts_with = "resume", value_enum)]
    ablation: Option<glmae_train::pretrain::Ablation>,
    /// Weight of the consistency loss.
    #[arg(long, conflicts_with = "resume")]
    lambda: Option<f64>,
    /// Global and local views per volume.
    #[arg(long, conflicts_with = "resume")]
    n_global: Option<usize>,
    /// Local views per volume.
    #[arg(long, conflicts_with = "resume")]
    n_local: Option<usize>,
    /// Fraction of tokens masked.
    #[arg(long, conflicts_with = "resume")]
    mask_ratio: Option<f64>,
    /// Normalise target patches.
    #[arg(long, conflicts_with = "resume")]
    norm_pix_loss: bool,
    /// Seed.
    #[arg(long, conflicts_with = "resume")]
    seed: Option<u64>,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Threads preparing samples.
    #[arg(long, default_value_t = 1)]
    loader_threads: usize,
    /// Preprocessed-volume cache folder (default: RUN_DIR/cache).
    #[arg(long)]
    cache: Option<PathBuf>,
}

fn pretrain(a: PretrainArgs) -> anyhow::Result<()> {
    use glmae_train::device::training_devices;
    use glmae_train::pretrain::{PretrainConfig, Pretrainer};
    use glmae_train::run::{LoopOptions, RunDir, train_loop_on};
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
            let mut cfg = match a.model.as_str() {
                "vit-t" => PretrainConfig::vit_t(),
                "vit-b" => PretrainConfig::vit_b(),
                "tiny" => PretrainConfig::tiny(),
                other => anyhow::bail!("unknown model {other:?}; expected vit-t, vit-b or tiny"),
            };
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Quickstart { out, scale, device } => {
            let start = std::time::Instant::now();
            let s = glmae_train::quickstart::quickstart(
                &out,
                scale,
                glmae_train::device::training_device(&device)?,
            )?;
            println!("\ndone in {:.1} min:", start.elapsed().as_secs_f64() / 60.0);
            println!("  phantom dataset         {}", s.data.join("dataset.json").display());
            println!("  pretraining loss curve  {}", s.pretrain.join("loss.png").display());
            println!("  fine-tuning loss curve  {}", s.finetune.join("loss.png").display());
            println!(
                "  Dice table              {} (mean {:.2})",
                s.eval.join("dice.md").display(),
                100.0 * s.mean_dice
            );
            println!("  overlays                {}", s.eval.display());
            println!("  int8 model              {}", s.model.display());
            println!("  held-out segmentation   {}", s.segmentation.display());
        }
        Command::InitModel { model, classes, img, seed, int8, out } => {
            let cfg = glmae_train::presets::unetr(&model, classes, img)?;
            let precision = if int8 { Precision::Int8 } else { Precision::F32 };
            let bytes = glmae_core::synthetic::random_model(&cfg, seed, precision)?;
            glmae_data::io::atomic_write(&out, &bytes)?;
            println!(
                "wrote {} ({} bytes, {model}, {classes} classes, {precision:?})",
                out.display(),
                bytes.len()
            );
        }
        Command::MakePhantoms { out, count, seed, shape, spacing, threads } => {
            anyhow::ensure!(
                shape.len() == 3 && spacing.len() == 3,
                "--shape and --spacing take three values, e.g. 160,128,96"
            );
            let cfg = glmae_data::phantom::PhantomConfig {
                shape: [shape[0], shape[1], shape[2]],
                spacing: [spacing[0], spacing[1], spacing[2]],
            };
            let start = std::time::Instant::now();
            let bar = glmae_train::progress::bar("phantoms", count as u64);
            let ds = glmae_data::phantom_dataset::write_phantom_dataset_observed(
                &out,
                count,
                seed,
                &cfg,
                threads,
                &|| bar.inc(1),
            )?;
            bar.finish_and_clear();
            println!(
                "wrote {count} phantoms ({} training, {} validation) to {} in {:.1} s",
                ds.training.len(),
                ds.validation.len(),
                out.join("dataset.json").display(),
                start.elapsed().as_secs_f64()
            );
        }
        Command::Pretrain(args) => pretrain(*args)?,
        Command::Experiment(cmd) => glmae_train::experiment::run_command(cmd)?,
        Command::Finetune(args) => finetune(*args)?,
        Command::Probe(args) => probe(*args)?,
        Command::Evaluate { run, data, split, out, which, overlap, blend, device } => {
            let mut ft = glmae_train::finetune::Finetuner::load(
                &run,
                &which,
                glmae_train::device::base_device(&device)?,
            )?;
            if let Some(o) = overlap {
                ft.cfg.overlap = o;
            }
            if let Some(b) = blend {
                ft.cfg.blend = b;
            }
            let ds = glmae_data::Dataset::from_json(&data)?;
            let cases = match split.as_str() {
                "validation" => ds.validation,
                "training" => ds.training,
                "test" => ds.test,
                other => anyhow::bail!("unknown split {other:?}; expected validation, training or test"),
            };
            let out = out.unwrap_or_else(|| run.join("eval"));
            let bar = glmae_train::progress::bar("evaluate", 0);
            let report = glmae_train::evaluate::evaluate_with_progress(&ft, &cases, &out, &bar)?;
            print!("{}", report.markdown());
            println!("Dice per case in {}, overlays in {}", out.join("dice.csv").display(), out.display());
        }
        Command::Import { input, out, heads, eps, int8, spacing, intensity, clip, roi, no_crop, classes } => {
            use glmae_train::import::{ImportPreprocessing, read_class_names};
            let (weights, bundle) = if input.is_dir() {
                anyhow::ensure!(
                    glmae_train::bundle::is_bundle(&input),
                    "{}: a folder to import must be a MONAI bundle (configs/inference.json, models/model.pt)",
                    input.display()
                );
                let b = glmae_train::bundle::read_bundle(&input)?;
                for note in &b.config.notes {
                    println!("bundle: {note}");
                }
                (b.weights.clone(), Some(b))
            } else {
                (input.clone(), None)
            };
            let heads = heads.or(bundle.as_ref().and_then(|b| b.config.num_heads)).unwrap_or(12);
            let from_bundle = bundle.map(|b| b.config.preprocessing).unwrap_or_default();
            let opts = glmae_train::import::ImportOptions { num_heads: heads, layer_norm_eps: eps };
            let (mut cfg, tensors) = glmae_train::import::import_unetr(&weights, &opts)?;
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
            let bytes = glmae_train::import::model_bytes(cfg, prep, precision, &tensors)?;
            glmae_data::io::atomic_write(&out, &bytes)?;
            println!("wrote {} ({} bytes) with that preprocessing", out.display(), bytes.len());
        }
        Command::Export { run, out, int8, which } => {
            let ft = glmae_train::finetune::Finetuner::load(
                &run,
                &which,
                glmae_train::device::base_device("cpu")?,
            )?;
            let precision = if int8 { Precision::Int8 } else { Precision::F32 };
            let bytes = ft.export(precision)?;
            glmae_data::io::atomic_write(&out, &bytes)?;
            println!("wrote {} ({} bytes, {precision:?})", out.display(), bytes.len());
        }
    }
    Ok(())
}

/// The device named on the command line, if the command trains or evaluates.
fn requested_device(cli: &Cli) -> Option<&str> {
    match &cli.command {
        Command::Quickstart { device, .. } | Command::Evaluate { device, .. } => Some(device),
        Command::Pretrain(a) => Some(&a.device),
        Command::Finetune(a) => Some(&a.device),
        Command::Probe(a) => Some(&a.device),
        Command::Experiment(glmae_train::experiment::Command::Ablation(a)) => Some(&a.device),
        _ => None,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // burn restores optimizer state on its default device, which in a cuda build is GPU 0: a CPU
    // run would then touch (or, without a GPU, fail on) the GPU. Point the default at the CPU
    // backend asked for; still one thread here, so setting the environment is sound.
    if let Some(backend) = requested_device(&cli).and_then(glmae_train::device::cpu_backend_name)
        && std::env::var_os("BURN_DEVICE").is_none()
    {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("BURN_DEVICE", backend) };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
