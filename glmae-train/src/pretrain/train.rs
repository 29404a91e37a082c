//! The pretraining loop: draws seeded samples on loader threads, steps the [`Pretrainer`] (on one
//! device or data-parallel), logs every step to the run folder and checkpoints.

use anyhow::{Result, ensure};
use burn::tensor::Device;

use crate::pretrain::data_parallel::DataParallel;
use crate::pretrain::run::RunDir;
use crate::pretrain::{Pretrainer, StepMetrics};

/// Where pretraining data comes from and how the loop runs.
#[derive(Clone, Debug)]
pub struct LoopOptions {
    /// Steps between checkpoints (a checkpoint is also written at the end).
    pub checkpoint_every: usize,
    /// Threads preparing samples.
    pub loader_threads: usize,
    /// Show a progress bar.
    pub progress: bool,
}

/// Runs `run` until `run.cfg.steps`, drawing volumes from `cache`/`cases`, logging every step to
/// `dir` and checkpointing. Returns the metrics of the steps it ran.
pub fn train_loop(
    run: &mut Pretrainer,
    dir: &RunDir,
    cases: &[glmae_data::Case],
    cache: std::sync::Arc<glmae_data::VolumeCache>,
    opts: &LoopOptions,
) -> Result<Vec<StepMetrics>> {
    train_loop_on(run, &[], dir, cases, cache, opts)
}

/// [`train_loop`] with data parallelism: `run` lives on the first device and a replica on each
/// of `others` takes an equal share of every batch ([`DataParallel`]).
pub fn train_loop_on(
    run: &mut Pretrainer,
    others: &[Device],
    dir: &RunDir,
    cases: &[glmae_data::Case],
    cache: std::sync::Arc<glmae_data::VolumeCache>,
    opts: &LoopOptions,
) -> Result<Vec<StepMetrics>> {
    ensure!(!cases.is_empty(), "no images to pretrain on");
    run.cfg.validate()?;
    let mut parallel = if others.is_empty() { None } else { Some(DataParallel::new(run, others)?) };
    let cfg = run.cfg.clone();
    let start = run.step;
    let remaining = cfg.steps.saturating_sub(start);
    let cases = std::sync::Arc::new(cases.to_vec());
    let sample_cfg = cfg.clone();
    let samples = glmae_data::Prefetcher::new(remaining, opts.loader_threads, 2, cfg.seed, move |i, _| {
        let step = start + i;
        let mut rng = glmae_data::transforms::Rng::for_item(sample_cfg.seed, step as u64);
        (0..sample_cfg.batch_size)
            .map(|_| {
                let case = &cases[rng.below(cases.len())];
                let v = cache.get(case)?;
                Ok(crate::pretrain::make_sample(&sample_cfg, &v.image, &mut rng))
            })
            .collect::<Result<Vec<_>>>()
    });
    let bar = if opts.progress {
        crate::progress::bar("pretrain", cfg.steps as u64).with_position(start as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    dir.truncate_metrics(start)?;
    let views_per_step = cfg.batch_size * (cfg.views.n_global + cfg.views.n_local);
    let mut watch = crate::pretrain::loss::CollapseWatch::default();
    let watching = cfg.ablation == crate::pretrain::Ablation::Full;
    let mut out = Vec::with_capacity(remaining);
    for batch in samples {
        let batch = batch?;
        let t = std::time::Instant::now();
        let m = match &mut parallel {
            Some(p) => p.step(run, &batch)?,
            None => run.step(&batch),
        };
        let vps = views_per_step as f64 / t.elapsed().as_secs_f64().max(1e-9);
        ensure!(
            m.loss.is_finite(),
            "loss became {} at step {}; stopping (the last checkpoint is intact)",
            m.loss,
            m.step
        );
        dir.append_metrics(&m, vps)?;
        if let Some(warning) = watching.then(|| watch.observe(m.step, &m.collapse)).flatten() {
            // Above the progress bar on a terminal; a plain line on stderr otherwise (logs).
            if bar.is_hidden() {
                eprintln!("{warning}");
            } else {
                bar.suspend(|| eprintln!("{warning}"));
            }
        }
        bar.set_message(format!(
            "loss {:.4} (rec g {:.4} l {:.4} cons {:.4} mi {:.3}) lr {:.2e} {:.1} views/s",
            m.loss, m.rec_global, m.rec_local, m.consistency, m.collapse.mi, m.lr, vps
        ));
        bar.inc(1);
        if run.step.is_multiple_of(opts.checkpoint_every.max(1)) || run.step == cfg.steps {
            dir.save_checkpoint(run)?;
            dir.plot_losses()?;
        }
        out.push(m);
    }
    bar.finish();
    Ok(out)
}
