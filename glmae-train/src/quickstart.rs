//! The whole pipeline on built-in data, sized for a 2-core CPU: phantoms, GL-MAE pretraining,
//! UNETR fine-tuning from the pretrained encoder, evaluation, int8 export, and segmentation of a
//! held-out volume with glmae-infer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use glmae_core::format::Precision;
use glmae_data::phantom::PhantomConfig;
use glmae_data::preprocess::Preprocessor;
use glmae_data::{Case, VolumeCache};

use crate::experiment::Plan;
use crate::finetune::Finetuner;
use crate::finetune::train::TrainOptions;
use crate::pretrain::run::RunDir;
use crate::pretrain::train::{LoopOptions, train_loop};
use crate::pretrain::{Ablation, Pretrainer};

/// How big the quickstart is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuickstartScale {
    /// Seconds: a smoke test of every stage.
    Tiny,
    /// About ten minutes on 2 cores (release build): segments the large organs.
    Small,
}

/// The quickstart's numbers, as the experiment's [`Plan`]: all labels, one seed, the pretraining
/// rate 1.5625e-3 (a few hundred steps are too few for the default rule's 7.8e-5;
/// docs/experiments.md, "Learning rate"). The phantoms are made at the spacing training
/// resamples to, so nothing is resampled.
pub fn plan(scale: QuickstartScale) -> Plan {
    match scale {
        QuickstartScale::Tiny => Plan {
            phantoms: 3,
            phantom_shape: [48, 40, 32],
            spacing: [6.0, 6.0, 7.5],
            hidden: 24,
            heads: 2,
            views: (48, 32),
            pretrain_steps: 4,
            pretrain_batch: 2,
            finetune_steps: 4,
            crops: 2,
            roi: 32,
            feature: 4,
            label_fraction: 1.0,
            seeds: 1,
            pretrain_lr: Some(1.5625e-3),
            head_batch_norm: false,
            finetune_lr: 1e-3,
            no_flips: false,
        },
        // 6 mm voxels (48 x 40 x 40, a 288 x 240 x 240 mm field): a 32^3 crop holds most of the
        // organs, so each step teaches all of them. What was traded for the 10-minute budget:
        // resolution (6 mm, a quarter of BTCV's 1.5 x 1.5 x 2 mm per axis), the ROI (32 not
        // 96), width (96 not 192), decoder features (8 not 16) and the random flips and rot90,
        // which swap left and right (spleen with liver, one kidney with the other). 1500
        // fine-tuning steps at 2e-3 then reach Dice 68-91 on spleen, kidneys, liver, stomach,
        // aorta, IVC and pancreas in 8.6 min (docs/experiments.md, "The quickstart's budget");
        // pretraining steps are cheap (~0.1 s) next to fine-tuning ones (~0.33 s).
        QuickstartScale::Small => Plan {
            phantoms: 20,
            phantom_shape: [48, 40, 40],
            spacing: [6.0, 6.0, 6.0],
            hidden: 96,
            heads: 3,
            views: (48, 32),
            pretrain_steps: 300,
            pretrain_batch: 2,
            finetune_steps: 1500,
            crops: 2,
            roi: 32,
            feature: 8,
            label_fraction: 1.0,
            seeds: 1,
            pretrain_lr: Some(1.5625e-3),
            head_batch_norm: false,
            finetune_lr: 2e-3,
            no_flips: true,
        },
    }
}

/// Where each result of a quickstart run is.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The phantom dataset.
    pub data: PathBuf,
    /// Pretraining run (metrics.csv, loss.png, checkpoint.bin).
    pub pretrain: PathBuf,
    /// Fine-tuning run (metrics.csv, validation.csv, loss.png, validation.png, best.bin).
    pub finetune: PathBuf,
    /// Evaluation (dice.csv, dice.md, overlays).
    pub eval: PathBuf,
    /// Mean validation Dice.
    pub mean_dice: f64,
    /// The int8 model.
    pub model: PathBuf,
    /// A held-out volume's segmentation.
    pub segmentation: PathBuf,
}

/// Runs every stage into `out`.
pub fn quickstart(out: &Path, scale: QuickstartScale, device: burn::tensor::Device) -> Result<Summary> {
    let p = plan(scale);
    let phantom = PhantomConfig { shape: p.phantom_shape, spacing: p.spacing };
    let data = out.join("phantoms");
    println!("[1/6] writing {} synthetic CT phantoms to {}", p.phantoms, data.display());
    let bar = crate::progress::bar("phantoms", p.phantoms as u64);
    let ds = glmae_data::phantom_dataset::write_phantom_dataset_observed(
        &data,
        p.phantoms,
        0,
        &phantom,
        2,
        &|| bar.inc(1),
    )?;
    bar.finish_and_clear();

    println!("[2/6] GL-MAE pretraining ({} steps)", p.pretrain_steps);
    let pcfg = p.pretrain_config(Ablation::Full);
    let pre_dir = RunDir::create(&out.join("pretrain"))?;
    pre_dir.save_config(&pcfg)?;
    let mut prep = Preprocessor::pretraining();
    prep.spacing = p.spacing;
    let unlabelled: Vec<Case> =
        ds.training.iter().map(|c| Case { image: c.image.clone(), label: None }).collect();
    let cache = Arc::new(VolumeCache::new(prep, None));
    cache.warm(&unlabelled, 2)?;
    let mut run = Pretrainer::new(pcfg.clone(), device.clone());
    let opts = LoopOptions { checkpoint_every: p.pretrain_steps, loader_threads: 1, progress: true };
    train_loop(&mut run, &pre_dir, &unlabelled, cache, &opts)?;

    println!("[3/6] UNETR fine-tuning from the pretrained encoder ({} steps)", p.finetune_steps);
    let mut fcfg = p.finetune_config(0, Some(pre_dir.root().to_path_buf()));
    // The quickstart keeps the best of four validations.
    fcfg.val_every = (p.finetune_steps / 4).max(1);
    let ft_dir = out.join("finetune");
    let mut ft = Finetuner::new(fcfg, device.clone())?;
    let opts = TrainOptions { loader_threads: 1, validate: true, progress_bar: true };
    crate::finetune::train::train(&mut ft, &ds, &ft_dir, opts)?;

    println!("[4/6] evaluating on {} validation volume(s)", ds.validation.len());
    let best = Finetuner::load(&ft_dir, "best", device)?;
    let eval = ft_dir.join("eval");
    let report = crate::evaluate::evaluate_with_progress(
        &best,
        &ds.validation,
        &eval,
        &crate::progress::bar("evaluate", 0),
    )?;
    print!("{}", report.markdown());

    println!("[5/6] exporting the int8 model");
    let model = out.join("unetr-int8.glmae");
    glmae_data::io::atomic_write(&model, &best.export(Precision::Int8)?)?;

    println!("[6/6] segmenting a held-out volume with glmae-infer");
    let bytes = std::fs::read(&model)?;
    let file = glmae_infer::parse_model(&model, &bytes)?;
    let held_out = &ds.validation[0].image;
    let segmentation = out.join("segmentation.nii.gz");
    let sopts = glmae_infer::SegmentOptions {
        overlap: 0.5,
        blend: glmae_data::sliding_window::Blend::Gaussian,
        threads: 2,
        probabilities: None,
        probabilities_u8: false,
        progress: true,
    };
    glmae_infer::segment_file(&file, held_out, &segmentation, &sopts)?;
    Ok(Summary {
        data,
        pretrain: pre_dir.root().to_path_buf(),
        finetune: ft_dir,
        eval,
        mean_dice: report.mean(),
        model,
        segmentation,
    })
}
