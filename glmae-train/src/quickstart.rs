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

use crate::finetune::{FinetuneConfig, Finetuner};
use crate::pretrain::{PretrainConfig, Pretrainer};
use crate::run::{LoopOptions, RunDir, train_loop};

/// How big the quickstart is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scale {
    /// Seconds: a smoke test of every stage.
    Tiny,
    /// About ten minutes on 2 cores (release build): segments the large organs.
    Small,
}

struct Plan {
    phantoms: usize,
    /// The phantoms; training resamples to their own spacing, so nothing is resampled.
    phantom: PhantomConfig,
    pretrain_steps: usize,
    finetune_steps: usize,
    view: (usize, usize),
    roi: u32,
    hidden: u32,
    heads: u32,
    feature: u32,
    /// Peak fine-tuning learning rate.
    finetune_lr: f64,
    /// Random flips and rot90 in fine-tuning (method.md's p 0.2 each); off, the model may use
    /// which side an organ lies on.
    spatial_augment: bool,
}

fn plan(scale: Scale) -> Plan {
    match scale {
        Scale::Tiny => Plan {
            phantoms: 3,
            phantom: PhantomConfig { shape: [48, 40, 32], spacing: [6.0, 6.0, 7.5] },
            pretrain_steps: 4,
            finetune_steps: 4,
            view: (48, 32),
            roi: 32,
            hidden: 24,
            heads: 2,
            feature: 4,
            finetune_lr: 1e-3,
            spatial_augment: true,
        },
        // 6 mm voxels (48 x 40 x 40, a 288 x 240 x 240 mm field): a 32^3 crop holds most of the
        // organs, so each step teaches all of them. What was traded for the 10-minute budget:
        // resolution (6 mm, a quarter of BTCV's 1.5 x 1.5 x 2 mm per axis), the ROI (32 not
        // 96), width (96 not 192), decoder features (8 not 16) and the random flips and rot90,
        // which swap left and right (spleen with liver, one kidney with the other). 1500
        // fine-tuning steps at 2e-3 then reach Dice 68-91 on spleen, kidneys, liver, stomach,
        // aorta, IVC and pancreas in 8.6 min (docs/experiments.md, "The quickstart's budget");
        // pretraining steps are cheap (~0.1 s) next to fine-tuning ones (~0.33 s).
        Scale::Small => Plan {
            phantoms: 20,
            phantom: PhantomConfig { shape: [48, 40, 40], spacing: [6.0, 6.0, 6.0] },
            pretrain_steps: 300,
            finetune_steps: 1500,
            view: (48, 32),
            roi: 32,
            hidden: 96,
            heads: 3,
            feature: 8,
            finetune_lr: 2e-3,
            spatial_augment: false,
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
pub fn quickstart(out: &Path, scale: Scale, device: burn::tensor::Device) -> Result<Summary> {
    let p = plan(scale);
    let data = out.join("phantoms");
    println!("[1/6] writing {} synthetic CT phantoms to {}", p.phantoms, data.display());
    let bar = crate::progress::bar("phantoms", p.phantoms as u64);
    let ds = glmae_data::phantom_dataset::write_phantom_dataset_observed(
        &data,
        p.phantoms,
        0,
        &p.phantom,
        2,
        &|| bar.inc(1),
    )?;
    bar.finish_and_clear();

    println!("[2/6] GL-MAE pretraining ({} steps)", p.pretrain_steps);
    let mut pcfg = PretrainConfig::narrow(p.hidden, p.heads, p.view, p.pretrain_steps, 2);
    // A few hundred steps are too few for the default rule's 7.8e-5 (docs/experiments.md, "Learning rate").
    pcfg.lr = Some(1.5625e-3);
    let pre_dir = RunDir::create(&out.join("pretrain"))?;
    pre_dir.save_config(&pcfg)?;
    let mut prep = Preprocessor::pretraining();
    prep.spacing = p.phantom.spacing;
    let unlabelled: Vec<Case> =
        ds.training.iter().map(|c| Case { image: c.image.clone(), label: None }).collect();
    let cache = Arc::new(VolumeCache::new(prep, None));
    cache.warm(&unlabelled, 2)?;
    let mut run = Pretrainer::new(pcfg.clone(), device.clone());
    let opts = LoopOptions { checkpoint_every: p.pretrain_steps, loader_threads: 1, progress: true };
    train_loop(&mut run, &pre_dir, &unlabelled, cache, &opts)?;

    println!("[3/6] UNETR fine-tuning from the pretrained encoder ({} steps)", p.finetune_steps);
    let mut unetr = glmae_core::UnetrConfig::vit_t([p.roi; 3], 14);
    unetr.vit = pcfg.encoder;
    unetr.vit.img_size = [p.roi; 3];
    unetr.feature_size = p.feature;
    let names = glmae_data::phantom::LABELS.iter().map(|s| s.to_string()).collect();
    let mut fcfg = FinetuneConfig::new(unetr, names);
    fcfg.preprocessing.spacing = p.phantom.spacing;
    fcfg.init_from = Some(pre_dir.root().to_path_buf());
    fcfg.steps = p.finetune_steps;
    fcfg.warmup_steps = p.finetune_steps / 10;
    fcfg.val_every = (p.finetune_steps / 4).max(1);
    fcfg.crops_per_step = 2;
    fcfg.lr = p.finetune_lr;
    if !p.spatial_augment {
        fcfg.augment = fcfg.augment.without_flips();
    }
    let ft_dir = out.join("finetune");
    let ft = Finetuner::new(fcfg, device.clone())?;
    crate::finetune::train(ft, &ds, &ft_dir, 1)?;

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
