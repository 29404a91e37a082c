//! Seconds per GL-MAE step and views per second at the paper's sizes (ViT-T, 2 global 160^3 and
//! 4 local 96^3 views per volume, 75% masking). `cargo bench -p glmae-train --bench
//! pretrain_step -- [cpu|ndarray|cuda] [steps] [batch]`; docs/performance.md has the results.

use std::time::Instant;

use glmae_data::phantom::{PhantomConfig, generate};
use glmae_data::preprocess::Preprocessor;
use glmae_data::transforms::Rng;
use glmae_data::{Affine, Volume};
use glmae_train::pretrain::{Ablation, PretrainConfig, Pretrainer, make_sample};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let device_name = args.first().map_or("cpu", |s| s.as_str());
    let steps: usize = args.get(1).map_or(Ok(3), |s| s.parse())?;
    let batch: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let p = generate(0, &PhantomConfig::default());
    let v = Volume::new(p.hu, p.shape, Affine::from_spacing(p.spacing.map(f64::from)));
    let vol = Preprocessor::pretraining().apply(&v)?.0;
    println!("| encoder | loss | device | volumes/step | s/step | views/s |");
    println!("|---|---|---|---|---|---|");
    for ablation in [Ablation::Full, Ablation::LocalOnly] {
        let mut cfg = PretrainConfig::vit_t();
        cfg.ablation = ablation;
        cfg.batch_size = batch;
        let device = glmae_train::device::training_device(device_name)?;
        let mut run = Pretrainer::new(cfg.clone(), device);
        let samples: Vec<Vec<_>> = (0..=steps)
            .map(|s| {
                let mut rng = Rng::for_item(0, s as u64);
                (0..batch).map(|_| make_sample(&cfg, &vol, &mut rng)).collect()
            })
            .collect();
        run.step(&samples[0]); // warm-up: allocation and kernel selection
        let t = Instant::now();
        for s in &samples[1..] {
            run.step(s);
        }
        let per_step = t.elapsed().as_secs_f64() / steps as f64;
        let views = batch
            * match ablation {
                Ablation::LocalOnly => cfg.views.n_local,
                _ => cfg.views.n_global + cfg.views.n_local,
            };
        println!(
            "| ViT-T | {ablation:?} | {device_name} | {batch} | {per_step:.2} | {:.2} |",
            views as f64 / per_step
        );
    }
    Ok(())
}
