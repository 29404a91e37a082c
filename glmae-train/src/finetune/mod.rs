//! UNETR fine-tuning (method.md, "Fine-tuning"): DiceCE on positive/negative label crops with
//! augmentation, AdamW with warm-up and cosine decay, optional frozen encoder (linear evaluation),
//! a seeded label fraction, and sliding-window validation that keeps the best model.
//!
//! [`loss`] holds the DiceCE loss, [`crops`] what a step trains on, [`train`] the loop; this
//! module holds the run's configuration and the [`Finetuner`] (one step, prediction, validation,
//! save and load). The `.glmae` export is in [`crate::io::export`].

pub mod crops;
pub mod loss;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device};
use glmae_core::UnetrConfig;
use glmae_data::preprocess::Preprocessor;
use glmae_data::sliding_window::{Blend, WindowSpec, dice_per_class, sliding_window};
use glmae_data::transforms::{Augment, Rng};
use glmae_data::{Case, Labels, Volume, VolumeCache};
use serde::{Deserialize, Serialize};

use crate::finetune::loss::{dice_ce, one_hot};
use crate::nets::unetr::Unetr;
use crate::nets::vit::tensor;

/// Everything that defines a fine-tuning run; saved as `RUN_DIR/finetune.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    /// The network (its `vit.img_size` is the training ROI).
    pub unetr: UnetrConfig,
    /// Preprocessing, stored in exported models.
    pub preprocessing: Preprocessor,
    /// Class names, background first.
    pub class_names: Vec<String>,
    /// Crops per step (MONAI's 4 per volume, half positive).
    pub crops_per_step: usize,
    /// Optimisation steps.
    pub steps: usize,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Keep the encoder fixed (linear evaluation).
    pub freeze_encoder: bool,
    /// Fraction of labelled training cases used (a seeded subset).
    pub label_fraction: f64,
    /// Augmentation.
    pub augment: Augment,
    /// Steps between validations (0: only at the end).
    pub val_every: usize,
    /// Sliding-window overlap.
    pub overlap: f64,
    /// Sliding-window blending.
    pub blend: Blend,
    /// Seed for initialisation, the label subset, crops and augmentation.
    pub seed: u64,
    /// The pretraining run the encoder came from, if any.
    pub init_from: Option<PathBuf>,
}

impl FinetuneConfig {
    /// The method.md defaults around `unetr`.
    pub fn new(unetr: UnetrConfig, class_names: Vec<String>) -> Self {
        Self {
            unetr,
            preprocessing: Preprocessor::btcv(),
            class_names,
            crops_per_step: 4,
            steps: 1000,
            warmup_steps: 50,
            lr: 1e-4,
            weight_decay: 1e-5,
            freeze_encoder: false,
            label_fraction: 1.0,
            augment: Augment::default(),
            val_every: 100,
            overlap: 0.5,
            blend: Blend::Gaussian,
            seed: 0,
            init_from: None,
        }
    }

    /// A run continuing from the `.glmae` model at `path`: its UNETR (window, position table,
    /// classes), preprocessing and class names, with the method.md training defaults.
    pub fn from_model_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let file =
            glmae_core::ModelFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let names = file.preprocessing.class_names.iter().map(str::to_string).collect();
        let mut cfg = Self::new(file.config, names);
        cfg.preprocessing = Preprocessor::from_model(&file.preprocessing);
        cfg.init_from = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Warm-up then cosine decay to 0.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// The ROI in voxels.
    pub fn roi(&self) -> [usize; 3] {
        self.unetr.vit.img_size.map(|s| s as usize)
    }

    /// The sliding-window settings of validation and evaluation.
    pub fn window(&self) -> WindowSpec {
        WindowSpec { roi: self.roi(), overlap: self.overlap, blend: self.blend }
    }
}

/// Whether `init_from` names a `.glmae` model rather than a pretraining run folder.
pub fn is_model_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "glmae")
}

/// Metrics of one fine-tuning step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FinetuneMetrics {
    /// Step index.
    pub step: usize,
    /// Dice + CE.
    pub loss: f64,
    /// Dice loss term.
    pub dice_loss: f64,
    /// Cross-entropy term.
    pub ce: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// A UNETR being fine-tuned.
pub struct Finetuner {
    /// The run's configuration.
    pub cfg: FinetuneConfig,
    /// The network.
    pub model: Unetr,
    /// AdamW state.
    pub optimizer: ModuleOptimizer,
    /// Steps taken.
    pub step: usize,
    device: Device,
}

impl Finetuner {
    /// A UNETR from scratch, or with the encoder of a GL-MAE pretraining run.
    pub fn new(cfg: FinetuneConfig, device: Device) -> Result<Self> {
        device.seed(cfg.seed);
        let mut model = Unetr::new(&cfg.unetr, &device);
        if let Some(path) = cfg.init_from.as_ref().filter(|p| is_model_file(p)) {
            // A whole UNETR (e.g. imported from MONAI): every weight, position table included.
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let file = glmae_core::ModelFile::parse(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            ensure!(
                file.config == cfg.unetr,
                "{}: its UNETR ({:?}) is not this run's ({:?})",
                path.display(),
                file.config,
                cfg.unetr
            );
            model = Unetr::from_model_file(&file, &device).with_context(|| format!("{}", path.display()))?;
        } else if let Some(run) = &cfg.init_from {
            let dir = crate::pretrain::run::RunDir::open(run)?;
            let pre = dir.load_weights(device.clone())?;
            let (a, b) = (&pre.cfg.encoder, &cfg.unetr.vit);
            ensure!(
                (a.hidden_size, a.depth, a.num_heads, a.mlp_dim, a.patch_size, a.in_channels, a.qkv_bias)
                    == (
                        b.hidden_size,
                        b.depth,
                        b.num_heads,
                        b.mlp_dim,
                        b.patch_size,
                        b.in_channels,
                        b.qkv_bias
                    ),
                "{}: its encoder ({}x{}, {} heads) does not fit this UNETR ({}x{}, {} heads)",
                run.display(),
                a.hidden_size,
                a.depth,
                a.num_heads,
                b.hidden_size,
                b.depth,
                b.num_heads
            );
            model.vit = pre.student.vit;
        }
        if cfg.freeze_encoder {
            model.vit = model.vit.freeze();
        }
        let optimizer = AdamWConfig::new().with_weight_decay(cfg.weight_decay as f32).init();
        Ok(Self { cfg, model, optimizer, step: 0, device })
    }

    /// Draws one step's crops from a prepared case (see [`crops::crops`]).
    pub fn crops(&self, image: &Volume, labels: &Labels, rng: &mut Rng) -> (Vec<f32>, Vec<u8>) {
        crops::crops(&self.cfg, image, labels, rng)
    }

    /// One optimisation step on `crops` crops.
    pub fn step(&mut self, images: Vec<f32>, labels: &[u8]) -> FinetuneMetrics {
        let roi = self.cfg.roi();
        let b = self.cfg.crops_per_step;
        let k = self.cfg.unetr.out_channels as usize;
        let lr = self.cfg.lr_at(self.step);
        let x = tensor(images, [b, 1, roi[0], roi[1], roi[2]], &self.device);
        let g = tensor(one_hot(labels, b, k), [b, k, roi[0], roi[1], roi[2]], &self.device);
        let (dice, ce) = dice_ce(self.model.forward(x), g);
        let (d, c) = (dice.clone().into_scalar::<f32>() as f64, ce.clone().into_scalar::<f32>() as f64);
        let loss = dice + ce;
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.model = self.optimizer.step(lr, self.model.clone(), grads);
        let m = FinetuneMetrics { step: self.step, loss: d + c, dice_loss: d, ce: c, lr };
        self.step += 1;
        m
    }

    /// Labels for a whole prepared image by sliding-window inference.
    pub fn predict(&self, image: &Volume) -> Result<Vec<u8>> {
        self.predict_observed(image, &|| {})
    }

    /// [`predict`](Self::predict), calling `on_window` after each sliding window (for progress).
    pub fn predict_observed(&self, image: &Volume, on_window: &dyn Fn()) -> Result<Vec<u8>> {
        let roi = self.cfg.roi();
        let k = self.cfg.unetr.out_channels as usize;
        let model = self.model.valid();
        let device = self.device.clone();
        let logits = sliding_window(&image.data, image.channels, image.shape, &self.cfg.window(), k, |w| {
            let x = tensor(w.to_vec(), [1, 1, roi[0], roi[1], roi[2]], &device);
            let logits = model
                .forward(x)
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"));
            on_window();
            logits
        })?;
        let mut labels = vec![0u8; image.voxels()];
        glmae_core::kernels::argmax_channels(&logits, k, &mut labels);
        Ok(labels)
    }

    /// Mean Dice (classes present in either map, background excluded) and per-class Dice over
    /// `cases`.
    pub fn validate(&self, cache: &VolumeCache, cases: &[Case]) -> Result<(f64, Vec<Vec<Option<f64>>>)> {
        let k = self.cfg.unetr.out_channels as usize;
        let mut all = Vec::new();
        for c in cases {
            let p = cache.get(c)?;
            let labels = p.labels.as_ref().with_context(|| format!("{} has no labels", c.image.display()))?;
            all.push(dice_per_class(&self.predict(&p.image)?, &labels.data, k));
        }
        let values: Vec<f64> = all.iter().flatten().flatten().copied().collect();
        let mean = if values.is_empty() { 0.0 } else { values.iter().sum::<f64>() / values.len() as f64 };
        Ok((mean, all))
    }

    /// Saves the configuration and the model as `RUN_DIR/finetune.json` and `RUN_DIR/{name}.bin`.
    pub fn save(&self, dir: &Path, name: &str) -> Result<()> {
        glmae_data::io::atomic_write(
            &dir.join("finetune.json"),
            serde_json::to_string_pretty(&self.cfg)?.as_bytes(),
        )?;
        let bytes = self.model.clone().into_record().into_bytes().map_err(|e| anyhow::anyhow!("{e}"))?;
        glmae_data::io::atomic_write(&dir.join(format!("{name}.bin")), &bytes)
    }

    /// Loads `RUN_DIR/finetune.json` and `RUN_DIR/{name}.bin`.
    pub fn load(dir: &Path, name: &str, device: Device) -> Result<Self> {
        let p = dir.join("finetune.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let mut cfg: FinetuneConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a fine-tuning configuration", p.display()))?;
        cfg.init_from = None;
        let mut t = Self::new(cfg, device)?;
        let m = dir.join(format!("{name}.bin"));
        let bytes = std::fs::read(&m).with_context(|| format!("cannot read {}", m.display()))?;
        let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
            .map_err(|e| anyhow::anyhow!("{}: {e}", m.display()))?;
        t.model = t.model.load_record(record);
        Ok(t)
    }
}
