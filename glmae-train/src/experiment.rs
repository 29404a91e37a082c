//! The pretraining ablation (the paper's Table 4) on built-in phantoms: UNETR fine-tuned on a
//! fraction of the labels from (a) scratch, (b) local-only MAE (MAE3D), (c) global + local
//! reconstruction, (d) full GL-MAE, with the same fine-tuning budget and seeds for every arm.
//!
//! Layout of `--out DIR`:
//! - `experiment.json`: the plan (a rerun into the same folder must use the same one);
//! - `phantoms/`: the MSD dataset;
//! - `pretrain/<arm>/`: one pretraining run per pretrained arm (identical steps, views, seed);
//! - `finetune/<arm>/seed<N>/`: one fine-tuning run per arm and seed, with `eval/` (Dice table,
//!   overlays) and `result.json` (per-class Dice, wall times);
//! - `results.csv` (arm, seed, per-class and mean Dice) and `summary.md` (mean ± std over seeds).
//!
//! Every stage is skipped when its result exists, so an interrupted run continues where it
//! stopped (a pretraining run resumes from its last checkpoint).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use glmae_data::phantom::{LABELS, PhantomConfig};
use glmae_data::preprocess::Preprocessor;
use glmae_data::{Case, Dataset, VolumeCache};
use serde::{Deserialize, Serialize};

use crate::finetune::train::TrainOptions;
use crate::finetune::{FinetuneConfig, Finetuner};
use crate::pretrain::run::RunDir;
use crate::pretrain::train::{LoopOptions, train_loop};
use crate::pretrain::{Ablation, PretrainConfig, Pretrainer};

/// How big the experiment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum ExperimentScale {
    /// Seconds: checks that every stage runs and the bookkeeping is right; the Dice is noise.
    Tiny,
    /// The quickstart's model on more phantoms, about 46 minutes on 2 shared CPU cores.
    Small,
    /// The same model at 6 mm voxels: the 32^3 ROI sees 192 mm, most of the abdomen, so 300
    /// fine-tuning steps from scratch learn the liver (docs/experiments.md, "Fine-tuning").
    Coarse,
}

/// One arm of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arm {
    /// Random encoder.
    Scratch,
    /// Encoder from local-only masked reconstruction (MAE3D).
    LocalOnly,
    /// Encoder from global + local masked reconstruction.
    GlobalLocal,
    /// Encoder from GL-MAE: reconstruction plus global-guided consistency.
    Full,
}

impl Arm {
    /// Every arm, in the order of the paper's table.
    pub const ALL: [Arm; 4] = [Arm::Scratch, Arm::LocalOnly, Arm::GlobalLocal, Arm::Full];

    /// The name used in folders, results.csv and summary.md.
    pub fn name(self) -> &'static str {
        match self {
            Arm::Scratch => "scratch",
            Arm::LocalOnly => "local-only",
            Arm::GlobalLocal => "global-local",
            Arm::Full => "full",
        }
    }

    /// The pretraining loss of this arm (`None` for scratch).
    pub fn ablation(self) -> Option<Ablation> {
        match self {
            Arm::Scratch => None,
            Arm::LocalOnly => Some(Ablation::LocalOnly),
            Arm::GlobalLocal => Some(Ablation::GlobalLocal),
            Arm::Full => Some(Ablation::Full),
        }
    }

    /// The arm called `name`.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name).with_context(|| format!("unknown arm {name:?}"))
    }
}

/// Everything that fixes a study's numbers: the phantoms, the model, pretraining and
/// fine-tuning. The experiment saves its plan as `experiment.json`; the quickstart runs one too
/// ([`crate::quickstart`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Phantom volumes written (the last fifth validates).
    pub phantoms: usize,
    /// Voxels per phantom.
    pub phantom_shape: [usize; 3],
    /// Phantom voxel size and the resampling target, in mm.
    pub spacing: [f32; 3],
    /// Encoder width.
    pub hidden: u32,
    /// Attention heads.
    pub heads: u32,
    /// Global and local view edges (voxels).
    pub views: (usize, usize),
    /// Pretraining steps per arm.
    pub pretrain_steps: usize,
    /// Volumes per pretraining step.
    pub pretrain_batch: usize,
    /// Fine-tuning steps per run.
    pub finetune_steps: usize,
    /// Crops per fine-tuning step.
    pub crops: usize,
    /// Fine-tuning ROI edge (voxels).
    pub roi: u32,
    /// UNETR decoder feature size.
    pub feature: u32,
    /// Fraction of the training cases whose labels fine-tuning uses.
    pub label_fraction: f64,
    /// Fine-tuning seeds `0..seeds`.
    pub seeds: u64,
    /// Absolute peak pretraining learning rate (`None`: the default rule, 1e-2 x batch / 256).
    #[serde(default)]
    pub pretrain_lr: Option<f64>,
    /// Batch-normalise the projection head's input (`pretrain --head-batch-norm`).
    #[serde(default)]
    pub head_batch_norm: bool,
    /// Peak fine-tuning learning rate.
    #[serde(default = "default_finetune_lr")]
    pub finetune_lr: f64,
    /// Fine-tuning flips and rot90 off (`finetune --flip-p 0 --rot-p 0`, as the quickstart):
    /// they swap left and right (docs/experiments.md, "The quickstart's budget").
    #[serde(default)]
    pub no_flips: bool,
}

fn default_finetune_lr() -> f64 {
    1e-3
}

impl Plan {
    /// The plan of a scale, before command-line overrides.
    pub fn new(scale: ExperimentScale, seeds: u64) -> Self {
        match scale {
            ExperimentScale::Tiny => Plan {
                phantoms: 5,
                phantom_shape: [48, 40, 32],
                spacing: [6.0, 6.0, 7.5],
                hidden: 24,
                heads: 2,
                views: (48, 32),
                pretrain_steps: 2,
                pretrain_batch: 1,
                finetune_steps: 2,
                crops: 1,
                roi: 32,
                feature: 4,
                label_fraction: 0.25,
                seeds,
                pretrain_lr: None,
                head_batch_norm: false,
                finetune_lr: 1e-3,
                no_flips: false,
            },
            // The quickstart's model and view sizes; 20 phantoms leave 16 for training (4 with
            // labels at 25%) and 4 to validate. Pretraining steps are cheap next to fine-tuning
            // ones (8 and 64 tokens per view, no convolutional decoder), so they get 4x as many; the
            // 12 fine-tuning runs of 200 steps and their evaluations take most of the 46 minutes
            // measured (docs/experiments.md).
            ExperimentScale::Small => Plan {
                phantoms: 20,
                phantom_shape: [96, 80, 64],
                spacing: [3.0, 3.0, 3.75],
                hidden: 96,
                heads: 3,
                views: (64, 32),
                pretrain_steps: 800,
                pretrain_batch: 2,
                finetune_steps: 200,
                crops: 2,
                roi: 32,
                feature: 8,
                label_fraction: 0.25,
                seeds,
                // 800 steps are short for the base rule's 7.8e-5: on the 20 phantoms, 300 steps
                // at 1.56e-3 reach a masked-patch MSE of 0.024 against 0.037 (experiments.md).
                pretrain_lr: Some(1.5625e-3),
                head_batch_norm: false,
                finetune_lr: 1e-3,
                no_flips: false,
            },
            // 6 mm voxels (48 x 40 x 40, the same 288 x 240 x 240 mm field): a fine-tuning step
            // costs as at `Small` (~1.1 s with burn's conv3d, 0.33 s with ours), but its crop
            // holds most of the organs, so the budget teaches the scratch arm the liver. Global views are 48^3 (27 tokens) so that
            // pretraining sees the volume at 3-6 mm, near the fine-tuning scale; local views keep
            // 32^3 (8 tokens). 2e-3 is the fine-tuning rate measured to learn the liver in 300
            // steps (docs/experiments.md).
            ExperimentScale::Coarse => Plan {
                phantoms: 20,
                phantom_shape: [48, 40, 40],
                spacing: [6.0, 6.0, 6.0],
                hidden: 96,
                heads: 3,
                views: (48, 32),
                pretrain_steps: 600,
                pretrain_batch: 2,
                finetune_steps: 300,
                crops: 2,
                roi: 32,
                feature: 8,
                label_fraction: 0.25,
                seeds,
                pretrain_lr: Some(1.5625e-3),
                head_batch_norm: false,
                finetune_lr: 2e-3,
                no_flips: false,
            },
        }
    }

    /// The pretraining run of an arm.
    pub fn pretrain_config(&self, ablation: Ablation) -> PretrainConfig {
        let mut c = PretrainConfig::narrow(
            self.hidden,
            self.heads,
            self.views,
            self.pretrain_steps,
            self.pretrain_batch,
        );
        c.ablation = ablation;
        c.seed = 0;
        c.lr = self.pretrain_lr;
        c.head.batch_norm = self.head_batch_norm;
        c
    }

    /// A fine-tuning run (no validation: the last model is evaluated), from scratch or from `init`.
    pub fn finetune_config(&self, seed: u64, init: Option<PathBuf>) -> FinetuneConfig {
        let mut unetr = glmae_core::UnetrConfig::vit_t([self.roi; 3], LABELS.len() as u32);
        unetr.vit = self.pretrain_config(Ablation::Full).encoder;
        unetr.vit.img_size = [self.roi; 3];
        unetr.feature_size = self.feature;
        let mut c = FinetuneConfig::new(unetr, LABELS.iter().map(|s| s.to_string()).collect());
        c.preprocessing.spacing = self.spacing;
        c.init_from = init;
        c.steps = self.finetune_steps;
        c.warmup_steps = self.finetune_steps / 10;
        // No model selection on the cases that are reported: the last model is evaluated.
        c.val_every = 0;
        c.crops_per_step = self.crops;
        c.lr = self.finetune_lr;
        if self.no_flips {
            c.augment = c.augment.without_flips();
        }
        c.label_fraction = self.label_fraction;
        c.seed = seed;
        c
    }
}

/// `glmae-train experiment ...`.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Fine-tune on a fraction of the labels from scratch, local-only MAE, global + local
    /// reconstruction and full GL-MAE (same budget and seeds); write results.csv and summary.md.
    Ablation(AblationArgs),
}

/// Flags of `experiment ablation`.
#[derive(clap::Args, Debug)]
pub struct AblationArgs {
    /// Output folder; a rerun into it skips every finished stage.
    #[arg(long, default_value = "ablation")]
    pub out: PathBuf,
    /// Fine-tuning seeds per arm (0..N).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// tiny (seconds, a smoke test), small (about 46 minutes on 2 shared cores) or coarse
    /// (6 mm voxels, where fine-tuning from scratch learns the liver).
    #[arg(long, value_enum, default_value = "small")]
    pub scale: ExperimentScale,
    /// cpu, ndarray, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Pretraining steps per arm (default: the scale's).
    #[arg(long)]
    pub pretrain_steps: Option<usize>,
    /// Fine-tuning steps per run (default: the scale's).
    #[arg(long)]
    pub finetune_steps: Option<usize>,
    /// Phantom volumes (default: the scale's; the last fifth validates).
    #[arg(long)]
    pub phantoms: Option<usize>,
    /// Fraction of the training cases with labels.
    #[arg(long, default_value_t = 0.25)]
    pub label_fraction: f64,
    /// Absolute peak pretraining learning rate (default: the scale's).
    #[arg(long)]
    pub pretrain_lr: Option<f64>,
    /// Batch-normalise the projection head's input in the full arm (`pretrain --head-batch-norm`).
    #[arg(long)]
    pub head_batch_norm: bool,
    /// Stop after pretraining and the probe (no fine-tuning): the encoders measured in minutes.
    #[arg(long)]
    pub no_finetune: bool,
    /// Fine-tune without flips and rot90 (method.md's recipe has them; they swap left and right).
    #[arg(long)]
    pub no_flips: bool,
}

/// Runs an experiment subcommand, printing where the results are.
pub fn run_command(cmd: Command) -> Result<()> {
    match cmd {
        Command::Ablation(a) => {
            let mut plan = Plan::new(a.scale, a.seeds);
            plan.pretrain_steps = a.pretrain_steps.unwrap_or(plan.pretrain_steps);
            plan.finetune_steps = a.finetune_steps.unwrap_or(plan.finetune_steps);
            plan.phantoms = a.phantoms.unwrap_or(plan.phantoms);
            plan.label_fraction = a.label_fraction;
            plan.pretrain_lr = a.pretrain_lr.or(plan.pretrain_lr);
            plan.head_batch_norm |= a.head_batch_norm;
            plan.no_flips |= a.no_flips;
            let start = Instant::now();
            let device = crate::device::training_device(&a.device)?;
            let s = ablation_stages(&a.out, &plan, device, !a.no_finetune)?;
            let text = std::fs::read_to_string(&s.markdown)
                .with_context(|| format!("cannot read {}", s.markdown.display()))?;
            println!("\n{text}");
            println!(
                "done in {:.1} min; results in {} and {}",
                start.elapsed().as_secs_f64() / 60.0,
                s.csv.display(),
                s.markdown.display()
            );
        }
    }
    Ok(())
}

/// One fine-tuning run's outcome, saved as `finetune/<arm>/seed<N>/result.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The arm's name.
    pub arm: String,
    /// Fine-tuning seed (initialisation of the non-pretrained parts, label subset, crops).
    pub seed: u64,
    /// Mean Dice per foreground class over the validation cases (`None`: absent everywhere).
    pub class_dice: Vec<Option<f64>>,
    /// Mean over classes.
    pub mean_dice: f64,
    /// Wall time of fine-tuning, seconds.
    pub finetune_s: f64,
    /// Wall time of the evaluation, seconds.
    pub eval_s: f64,
}

/// What a finished experiment produced.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Every run, arm-major then by seed.
    pub results: Vec<RunResult>,
    /// `results.csv`.
    pub csv: PathBuf,
    /// `summary.md`.
    pub markdown: PathBuf,
}

/// Mean and sample standard deviation (n - 1; `None` for fewer than two values).
pub fn mean_std(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len() as f64;
    let mean = if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / n };
    let std = (v.len() > 1).then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    (mean, std)
}

fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: unexpected content", p.display()))
}

fn write_json<T: Serialize>(p: &Path, v: &T) -> Result<()> {
    glmae_data::io::atomic_write(p, serde_json::to_string_pretty(v)?.as_bytes())
}

/// Runs (or continues) the whole ablation into `out` on `device` (an autodiff device).
pub fn ablation(out: &Path, plan: &Plan, device: burn::tensor::Device) -> Result<Summary> {
    ablation_stages(out, plan, device, true)
}

/// [`ablation`], stopping after pretraining and the probe when `finetune` is false.
pub fn ablation_stages(
    out: &Path,
    plan: &Plan,
    device: burn::tensor::Device,
    finetune: bool,
) -> Result<Summary> {
    ensure!(plan.seeds > 0, "--seeds must be at least 1");
    ensure!(plan.pretrain_steps > 0 && plan.finetune_steps > 0, "step counts must be at least 1");
    ensure!(plan.label_fraction > 0.0 && plan.label_fraction <= 1.0, "--label-fraction must be in (0, 1]");
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let plan_path = out.join("experiment.json");
    if plan_path.is_file() {
        let old: Plan = read_json(&plan_path)?;
        // Runs already in the folder must come from the same numbers; more seeds may be added.
        let same = Plan { seeds: plan.seeds, ..old.clone() } == *plan;
        ensure!(
            same,
            "{} holds an experiment with another plan ({old:?}); use a new --out folder",
            out.display()
        );
    }
    write_json(&plan_path, plan)?;

    let data = out.join("phantoms");
    let json = data.join("dataset.json");
    let t = Instant::now();
    let ds = if json.is_file() {
        println!("[phantoms] reusing {}", json.display());
        Dataset::from_json(&json)?
    } else {
        println!("[phantoms] writing {} synthetic CT phantoms to {}", plan.phantoms, data.display());
        let cfg = PhantomConfig { shape: plan.phantom_shape, spacing: plan.spacing };
        glmae_data::phantom_dataset::write_phantom_dataset(&data, plan.phantoms, 0, &cfg, 2)?
    };
    let labelled = crate::finetune::crops::label_subset(&ds.training, plan.label_fraction, 0).len();
    println!(
        "[phantoms] {} training ({labelled} with labels at {:.0}%), {} validation; {:.1} s",
        ds.training.len(),
        100.0 * plan.label_fraction,
        ds.validation.len(),
        t.elapsed().as_secs_f64()
    );

    // Pretraining uses the training images without labels; validation volumes are never seen.
    let unlabelled: Vec<Case> =
        ds.training.iter().map(|c| Case { image: c.image.clone(), label: None }).collect();
    let mut prep = Preprocessor::pretraining();
    prep.spacing = plan.spacing;
    let cache = Arc::new(VolumeCache::new(prep, Some(out.join("pretrain/cache"))));
    let pretrained: Vec<Arm> = Arm::ALL.into_iter().filter(|a| a.ablation().is_some()).collect();
    for (i, arm) in pretrained.iter().enumerate() {
        let Some(ablation) = arm.ablation() else { continue };
        let dir = out.join("pretrain").join(arm.name());
        let tag = format!("[pretrain {}/{}] {}", i + 1, pretrained.len(), arm.name());
        pretrain_arm(&dir, &plan.pretrain_config(ablation), &unlabelled, &cache, &device, &tag)?;
    }

    let probes = probe_arms(out, plan, &ds, &device)?;

    // Seed-major order: an interrupted run has whole seeds for every arm.
    let total = plan.seeds as usize * Arm::ALL.len();
    let mut results = Vec::with_capacity(total);
    for seed in (0..plan.seeds).filter(|_| finetune) {
        for arm in Arm::ALL {
            let n = results.len() + 1;
            let tag = format!("[finetune {n}/{total}] {} seed {seed}", arm.name());
            let init = arm.ablation().map(|_| out.join("pretrain").join(arm.name()));
            let dir = out.join("finetune").join(arm.name()).join(format!("seed{seed}"));
            results.push(finetune_arm(&dir, plan.finetune_config(seed, init), arm, &ds, &device, &tag)?);
        }
    }
    results.sort_by_key(|r| (Arm::from_name(&r.arm).map_or(usize::MAX, |a| a as usize), r.seed));

    let csv = out.join("results.csv");
    glmae_data::io::atomic_write(&csv, results_csv(&results).as_bytes())?;
    let markdown = out.join("summary.md");
    let mut md = if results.is_empty() {
        String::from("# Pretraining ablation on phantoms\n\nFine-tuning was not run (`--no-finetune`).\n")
    } else {
        summary_markdown(out, plan, &ds, &results)?
    };
    md.push_str(&pretraining_markdown(out)?);
    md.push_str(&probe_markdown(&probes));
    glmae_data::io::atomic_write(&markdown, md.as_bytes())?;
    Ok(Summary { results, csv, markdown })
}

/// One arm's probe (frozen encoder, k-NN and linear classifiers on 16^3 patch tokens).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArmProbe {
    /// The arm's name.
    pub arm: String,
    /// What the probe measured.
    pub result: crate::probe::ProbeResult,
}

/// Probes every arm's encoder on the same patches (fitted on the training phantoms' labels,
/// scored on the validation phantoms), the scratch arm being the random initialisation every
/// pretraining run starts from (seed 0). Written to `probe.json`; reused when present.
fn probe_arms(out: &Path, plan: &Plan, ds: &Dataset, device: &burn::tensor::Device) -> Result<Vec<ArmProbe>> {
    let path = out.join("probe.json");
    if path.is_file() {
        println!("[probe] reusing {}", path.display());
        return read_json(&path);
    }
    let t = Instant::now();
    let opts = crate::probe::ProbeOptions::default();
    let mut prep = Preprocessor::pretraining();
    prep.spacing = plan.spacing;
    let cfg = plan.pretrain_config(Ablation::Full);
    let names = LABELS.iter().map(|s| s.to_string()).collect();
    let patch = cfg.encoder.patch_size as usize;
    let data = crate::probe::ProbeData::prepare(&ds.training, &ds.validation, &prep, patch, names, &opts)?;
    let mut probes = Vec::new();
    for arm in Arm::ALL {
        let encoder = match arm.ablation() {
            None => {
                device.seed(cfg.seed);
                crate::nets::vit::Vit::new(&cfg.encoder, device)
            }
            Some(_) => {
                RunDir::open(&out.join("pretrain").join(arm.name()))?
                    .load_weights(device.clone())?
                    .student
                    .vit
            }
        };
        let result = crate::probe::probe(&encoder, &data, &opts, device)?;
        println!(
            "[probe] {}: k-NN balanced accuracy {:.3}, macro-F1 {:.3}; linear {:.3}, {:.3}",
            arm.name(),
            result.knn.balanced_accuracy,
            result.knn.macro_f1,
            result.linear.balanced_accuracy,
            result.linear.macro_f1
        );
        probes.push(ArmProbe { arm: arm.name().into(), result });
    }
    write_json(&path, &probes)?;
    println!("[probe] {:.1} s", t.elapsed().as_secs_f64());
    Ok(probes)
}

/// The probe table of summary.md: the summary scores per arm, then F1 per class.
fn probe_markdown(probes: &[ArmProbe]) -> String {
    let mut s = String::from(
        "\n## Probe of the frozen encoders\n\nk-NN (k = 20, cosine) and linear classifiers on the \
         encoders' 16^3 patch tokens, fitted on the training phantoms and scored on the validation \
         phantoms (patches whose majority class covers at least half of them, 8 grid offsets); \
         scratch is the random initialisation every pretraining run starts from.\n\n\
         | arm | k-NN balanced accuracy | k-NN macro-F1 | linear balanced accuracy | linear macro-F1 |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for p in probes {
        let r = &p.result;
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            p.arm, r.knn.balanced_accuracy, r.knn.macro_f1, r.linear.balanced_accuracy, r.linear.macro_f1
        );
    }
    let Some(first) = probes.first() else { return s };
    s.push_str("\nF1 per class, k-NN / linear (validation patches in brackets):\n\n| class |");
    for p in probes {
        let _ = write!(s, " {} |", p.arm);
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(probes.len()));
    s.push('\n');
    let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
    for (c, name) in first.result.class_names.iter().enumerate() {
        if first.result.eval_support.get(c).copied().unwrap_or(0) == 0 {
            continue;
        }
        let _ = write!(s, "| {name} ({}) |", first.result.eval_support[c]);
        for p in probes {
            let r = &p.result;
            let at = |sc: &crate::probe::Scores| sc.f1.get(c).copied().flatten();
            let _ = write!(s, " {} / {} |", f(at(&r.knn)), f(at(&r.linear)));
        }
        s.push('\n');
    }
    s
}

/// The pretraining arms' last 20 steps (mean): losses and the collapse watch.
fn pretraining_markdown(out: &Path) -> Result<String> {
    let mut s = String::from(
        "\n## Pretraining, last 20 steps (mean)\n\n| arm | rec. global | rec. local | consistency | \
         H_cond | H_marg | MI |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for arm in Arm::ALL.into_iter().filter(|a| a.ablation().is_some()) {
        let table = crate::plot::read_csv(&out.join("pretrain").join(arm.name()).join("metrics.csv"))?;
        let last = |name: &str| {
            let v = table.column(name).unwrap_or_default();
            let tail = &v[v.len().saturating_sub(20)..];
            tail.iter().sum::<f64>() / tail.len().max(1) as f64
        };
        let _ = writeln!(
            s,
            "| {} | {:.4} | {:.4} | {:.3} | {:.3} | {:.3} | {:.3} |",
            arm.name(),
            last("rec_global"),
            last("rec_local"),
            last("consistency"),
            last("h_cond"),
            last("h_marg"),
            last("mi")
        );
    }
    Ok(s)
}

/// Runs one pretraining arm to its last step (resuming a partial run), recording its wall time.
fn pretrain_arm(
    dir: &Path,
    cfg: &PretrainConfig,
    cases: &[Case],
    cache: &Arc<VolumeCache>,
    device: &burn::tensor::Device,
    tag: &str,
) -> Result<()> {
    let timing = dir.join("timing.json");
    if timing.is_file() {
        println!("{tag}: done before, skipped");
        return Ok(());
    }
    let t = Instant::now();
    let (run_dir, mut run) = if dir.join("checkpoint.bin").is_file() {
        let d = RunDir::open(dir)?;
        ensure!(d.load_config()? == *cfg, "{}: pretrained with another configuration", dir.display());
        let run = d.resume(device.clone())?;
        println!("{tag}: resuming at step {}/{}", run.step, cfg.steps);
        (d, run)
    } else {
        println!("{tag}: {} steps of {} volumes", cfg.steps, cfg.batch_size);
        let d = RunDir::create(dir)?;
        d.save_config(cfg)?;
        (d, Pretrainer::new(cfg.clone(), device.clone()))
    };
    cache.warm(cases, 2)?;
    let opts = LoopOptions { checkpoint_every: 25, loader_threads: 1, progress: true };
    let metrics = train_loop(&mut run, &run_dir, cases, cache.clone(), &opts)?;
    let seconds = t.elapsed().as_secs_f64();
    let previous = metrics.first().map_or(0, |m| m.step);
    write_json(&timing, &serde_json::json!({ "seconds": seconds, "resumed_at_step": previous }))?;
    if let Some(m) = metrics.last() {
        println!(
            "{tag}: step {} loss {:.4} (rec global {:.4}, local {:.4}, consistency {:.4}); {:.1} min",
            m.step + 1,
            m.loss,
            m.rec_global,
            m.rec_local,
            m.consistency,
            seconds / 60.0
        );
    }
    Ok(())
}

/// Fine-tunes and evaluates one arm and seed, or reads the result of an earlier run.
fn finetune_arm(
    dir: &Path,
    cfg: FinetuneConfig,
    arm: Arm,
    ds: &Dataset,
    device: &burn::tensor::Device,
    tag: &str,
) -> Result<RunResult> {
    let result = dir.join("result.json");
    if result.is_file() {
        let r: RunResult = read_json(&result)?;
        println!("{tag}: done before, mean Dice {:.2}", 100.0 * r.mean_dice);
        return Ok(r);
    }
    let t = Instant::now();
    let seed = cfg.seed;
    let mut ft = Finetuner::new(cfg, device.clone())?;
    // No validation: the last model is evaluated, so nothing is tuned on the reported cases.
    let opts = TrainOptions { loader_threads: 1, validate: false, progress_bar: false };
    crate::finetune::train::train(&mut ft, ds, dir, opts)?;
    let finetune_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let report = crate::evaluate::evaluate(&ft, &ds.validation, &dir.join("eval"))?;
    let r = RunResult {
        arm: arm.name().into(),
        seed,
        class_dice: report.class_means(),
        mean_dice: report.mean(),
        finetune_s,
        eval_s: t.elapsed().as_secs_f64(),
    };
    write_json(&result, &r)?;
    println!(
        "{tag}: mean Dice {:.2} (liver {:.2}); fine-tune {:.1} min, eval {:.0} s",
        100.0 * r.mean_dice,
        100.0 * r.class_dice.get(5).copied().flatten().unwrap_or(0.0),
        finetune_s / 60.0,
        r.eval_s
    );
    Ok(r)
}

/// `arm,seed,<13 classes>,mean` with Dice in [0, 1] (empty: class absent from every case).
pub fn results_csv(results: &[RunResult]) -> String {
    let mut s = format!("arm,seed,{},mean\n", LABELS[1..].join(","));
    for r in results {
        let cells: Vec<String> =
            r.class_dice.iter().map(|d| d.map_or(String::new(), |x| format!("{x:.6}"))).collect();
        let _ = writeln!(s, "{},{},{},{:.6}", r.arm, r.seed, cells.join(","), r.mean_dice);
    }
    s
}

fn pm(values: &[f64]) -> String {
    match mean_std(values) {
        (m, Some(s)) => format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * s),
        (m, None) => format!("{:.2}", 100.0 * m),
    }
}

fn summary_markdown(out: &Path, plan: &Plan, ds: &Dataset, results: &[RunResult]) -> Result<String> {
    let arms: Vec<(Arm, Vec<&RunResult>)> =
        Arm::ALL.into_iter().map(|a| (a, results.iter().filter(|r| r.arm == a.name()).collect())).collect();
    let mut s = String::from("# Pretraining ablation on phantoms\n\n");
    let labelled = crate::finetune::crops::label_subset(&ds.training, plan.label_fraction, 0).len();
    let _ = writeln!(
        s,
        "{} phantoms of {:?} voxels at {:?} mm: {} training ({} labelled at {:.0}%), {} validation. \
         Encoder width {}, depth 12, {} heads, patch 16; pretraining {} steps x {} volumes; \
         fine-tuning {} steps x {} crops of {}^3, feature size {}, seeds 0 to {}. Dice in %, \
         mean over the validation cases, then mean ± sample standard deviation over seeds.\n",
        plan.phantoms,
        plan.phantom_shape,
        plan.spacing,
        ds.training.len(),
        labelled,
        100.0 * plan.label_fraction,
        ds.validation.len(),
        plan.hidden,
        plan.heads,
        plan.pretrain_steps,
        plan.pretrain_batch,
        plan.finetune_steps,
        plan.crops,
        plan.roi,
        plan.feature,
        plan.seeds - 1
    );
    s.push_str("| arm | seeds | mean Dice | per seed |\n|---|---|---|---|\n");
    for (arm, rs) in &arms {
        let means: Vec<f64> = rs.iter().map(|r| r.mean_dice).collect();
        let per: Vec<String> = means.iter().map(|m| format!("{:.2}", 100.0 * m)).collect();
        let _ = writeln!(s, "| {} | {} | {} | {} |", arm.name(), rs.len(), pm(&means), per.join(", "));
    }
    s.push_str("\nPer class (mean ± std over seeds):\n\n| class |");
    for (arm, _) in &arms {
        let _ = write!(s, " {} |", arm.name());
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(arms.len()));
    s.push('\n');
    for (c, name) in LABELS[1..].iter().enumerate() {
        let _ = write!(s, "| {name} |");
        for (_, rs) in &arms {
            let v: Vec<f64> = rs.iter().filter_map(|r| r.class_dice.get(c).copied().flatten()).collect();
            let _ = write!(s, " {} |", if v.is_empty() { "-".into() } else { pm(&v) });
        }
        s.push('\n');
    }
    s.push_str(
        "\nWall time per stage:\n\n| stage | runs | minutes per run | minutes in all |\n|---|---|---|---|\n",
    );
    for (arm, _) in arms.iter().filter(|(a, _)| a.ablation().is_some()) {
        let p = out.join("pretrain").join(arm.name()).join("timing.json");
        let v: serde_json::Value = read_json(&p)?;
        let m = v["seconds"].as_f64().unwrap_or(f64::NAN) / 60.0;
        let _ = writeln!(s, "| pretraining {} | 1 | {m:.2} | {m:.2} |", arm.name());
    }
    for (arm, rs) in &arms {
        for (what, evaluation) in [("fine-tuning", false), ("evaluation", true)] {
            let v: Vec<f64> =
                rs.iter().map(|r| if evaluation { r.eval_s } else { r.finetune_s } / 60.0).collect();
            let sum: f64 = v.iter().sum();
            let _ = writeln!(
                s,
                "| {what} {} | {} | {:.2} | {sum:.2} |",
                arm.name(),
                v.len(),
                sum / v.len().max(1) as f64
            );
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--no-flips` reaches the fine-tuning runs (both spatial augmentations off, intensity kept),
    /// and a plan written before the field existed reads as method.md's recipe.
    #[test]
    fn no_flips_turns_off_flips_and_rot90_only() {
        let mut plan = Plan::new(ExperimentScale::Coarse, 1);
        let with = plan.finetune_config(0, None).augment;
        assert!(with.flip_p > 0.0 && with.rot_p > 0.0);
        plan.no_flips = true;
        let without = plan.finetune_config(0, None).augment;
        assert_eq!((without.flip_p, without.rot_p), (0.0, 0.0));
        assert_eq!(
            (without.scale, without.shift, without.intensity_p),
            (with.scale, with.shift, with.intensity_p)
        );
        let mut json = serde_json::to_value(&plan).unwrap();
        json.as_object_mut().unwrap().remove("no_flips");
        assert!(!serde_json::from_value::<Plan>(json).unwrap().no_flips);
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert_eq!(s, Some(1.0));
        assert_eq!(mean_std(&[4.0]), (4.0, None));
    }

    #[test]
    fn arm_names_round_trip() {
        for a in Arm::ALL {
            assert_eq!(Arm::from_name(a.name()).unwrap(), a);
        }
        assert!(Arm::from_name("mae").is_err());
    }
}
