//! The fine-tuning loop, shared by `glmae-train finetune`, the quickstart and the ablation
//! experiment: the seeded label subset, cached preprocessing, prefetched crops, per-step metrics,
//! optional validation that keeps the best model, and the loss curves.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use glmae_data::transforms::Rng;
use glmae_data::{Dataset, VolumeCache};

use crate::finetune::Finetuner;
use crate::finetune::crops::{crops, ensure_labels_fit, label_subset};

/// How [`train`] runs.
#[derive(Clone, Copy, Debug)]
pub struct TrainOptions {
    /// Threads preparing crops (at least 2 warm the preprocessing cache).
    pub loader_threads: usize,
    /// Validate every `val_every` steps and at the end, keeping the best model in `best.bin`.
    /// The ablation experiment selects no model (the last one is evaluated, so nothing is tuned
    /// on the reported cases) and skips validation, which costs as much as a few hundred steps.
    pub validate: bool,
    /// A progress bar; without it, a line at every fifth of the run (logs of parallel runs).
    pub progress_bar: bool,
}

/// Runs fine-tuning into `out`: the seeded label subset (`label_subset.json`), cached
/// preprocessing, prefetched crops, metrics in `metrics.csv` (plotted in `loss.png`) and the
/// final model in `last.bin`; when validating, the mean validation Dice in `validation.csv`
/// (`validation.png`) and the best model in `best.bin`. Crops come from one seeded stream, so the
/// same settings take the same steps with or without validation. Returns the best mean
/// validation Dice when it validated.
pub fn train(ft: &mut Finetuner, ds: &Dataset, out: &Path, opts: TrainOptions) -> Result<Option<f64>> {
    let cfg = ft.cfg.clone();
    ensure!(!ds.training.is_empty(), "the dataset lists no training cases");
    let validation = if opts.validate { ds.validation.as_slice() } else { &[] };
    ensure!(!opts.validate || !validation.is_empty(), "the dataset lists no validation cases");
    if let Some(c) = ds.training.iter().chain(validation).find(|c| c.label.is_none()) {
        bail!("{} has no label; fine-tuning needs labelled training and validation cases", c.image.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let subset = label_subset(&ds.training, cfg.label_fraction, cfg.seed);
    glmae_data::io::atomic_write(
        &out.join("label_subset.json"),
        serde_json::to_string_pretty(&subset)?.as_bytes(),
    )?;
    let cache = Arc::new(VolumeCache::new(cfg.preprocessing.clone(), Some(out.join("cache"))));
    cache.warm(&subset, opts.loader_threads.max(2))?;
    cache.warm(validation, opts.loader_threads.max(2))?;
    ensure_labels_fit(&cache, subset.iter().chain(validation), cfg.unetr.out_channels as usize)?;
    let (c2, s2, cfg2) = (cache.clone(), subset.clone(), cfg.clone());
    let batches = glmae_data::Prefetcher::new(cfg.steps, opts.loader_threads, 2, cfg.seed, move |step, _| {
        let mut rng = Rng::for_item(cfg2.seed, step as u64);
        let p = c2.get(&s2[rng.below(s2.len())])?;
        let labels = p.labels.as_ref().context("a training case lost its labels")?;
        Ok(crops(&cfg2, &p.image, labels, &mut rng))
    });
    let bar = if opts.progress_bar {
        crate::progress::bar("finetune", cfg.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let open = |name: &str, header: &str| -> Result<std::fs::File> {
        let p = out.join(name);
        let mut f = std::fs::File::create(&p).with_context(|| format!("cannot write {}", p.display()))?;
        writeln!(f, "{header}")?;
        Ok(f)
    };
    let mut metrics = open("metrics.csv", "step,loss,dice_loss,ce,lr")?;
    let mut val = if opts.validate { Some(open("validation.csv", "step,mean_dice")?) } else { None };
    let mut best: Option<f64> = None;
    for batch in batches {
        let (imgs, labs) = batch?;
        let m = ft.step(imgs, &labs);
        ensure!(m.loss.is_finite(), "loss became {} at step {}", m.loss, m.step);
        writeln!(metrics, "{},{:.6},{:.6},{:.6},{:.6e}", m.step, m.loss, m.dice_loss, m.ce, m.lr)?;
        if opts.progress_bar {
            bar.set_message(format!("DiceCE {:.4} best val Dice {:.4}", m.loss, best.unwrap_or(0.0)));
            bar.inc(1);
        } else if ft.step.is_multiple_of((cfg.steps / 5).max(1)) {
            println!("  step {}/{}: DiceCE {:.4}", ft.step, cfg.steps, m.loss);
        }
        let last_step = ft.step == cfg.steps;
        if let Some(val) = val.as_mut()
            && ((cfg.val_every > 0 && ft.step.is_multiple_of(cfg.val_every)) || last_step)
        {
            let (mean, _) = ft.validate(&cache, validation)?;
            writeln!(val, "{},{mean:.6}", ft.step)?;
            if best.is_none_or(|b| mean > b) {
                best = Some(mean);
                ft.save(out, "best")?;
            }
        }
    }
    ft.save(out, "last")?;
    drop((metrics, val));
    plot_curves(out)?;
    bar.finish();
    Ok(best)
}

/// Draws `metrics.csv` (DiceCE, Dice and CE terms) into `loss.png` and, where the run
/// validated, `validation.csv` (mean Dice) into `validation.png`, both against the step.
pub fn plot_curves(out: &Path) -> Result<()> {
    crate::plot::csv_chart(
        &out.join("metrics.csv"),
        &out.join("loss.png"),
        "UNETR FINE-TUNING LOSS",
        &[("dicece", "loss"), ("dice_loss", "dice_loss"), ("ce", "ce")],
    )?;
    let validation = out.join("validation.csv");
    if !validation.is_file() {
        return Ok(());
    }
    crate::plot::csv_chart(
        &validation,
        &out.join("validation.png"),
        "VALIDATION MEAN DICE",
        &[("mean_dice", "mean_dice")],
    )
}
