//! UNETR fine-tuning (method.md, "Fine-tuning"): DiceCE on positive/negative label crops with
//! augmentation, AdamW with warm-up and cosine decay, optional frozen encoder (linear evaluation),
//! a seeded label fraction, and sliding-window validation that keeps the best model.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::store::ModuleRecord;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Bytes, Device, Tensor};
use glmae_core::UnetrConfig;
use glmae_core::format::{ModelBuilder, OwnedPreprocessing, Precision};
use glmae_data::preprocess::Preprocessor;
use glmae_data::sliding_window::{Blend, WindowSpec, dice_per_class, sliding_window};
use glmae_data::transforms::{Augment, Rng, pos_neg_crop};
use glmae_data::{Case, Labels, Volume, VolumeCache};
use serde::{Deserialize, Serialize};

use crate::model::tensor;
use crate::unetr::Unetr;

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

/// The seeded subset of `cases` a label fraction keeps (at least one case).
pub fn label_subset(cases: &[Case], fraction: f64, seed: u64) -> Vec<Case> {
    let keep = ((cases.len() as f64 * fraction).round() as usize).clamp(1.min(cases.len()), cases.len());
    let mut order: Vec<usize> = (0..cases.len()).collect();
    let mut rng = Rng::new(seed ^ 0x001a_be15);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut chosen: Vec<usize> = order[..keep].to_vec();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| cases[i].clone()).collect()
}

/// MONAI's `DiceCELoss(softmax=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-6)` with
/// one-hot targets: mean over (crop, class) of `1 - 2 sum(p g) / (sum p^2 + sum g^2 + 1e-6)`,
/// plus the mean cross-entropy over voxels. `logits` is `(b, k, d, h, w)`, `onehot` likewise.
pub fn dice_ce(logits: Tensor<5>, onehot: Tensor<5>) -> (Tensor<1>, Tensor<1>) {
    let [b, k, d, h, w] = logits.dims();
    let v = d * h * w;
    let flat = |t: Tensor<5>| -> Tensor<3> { t.reshape([b, k, v]) };
    let (logits, g) = (flat(logits), flat(onehot));
    let p = softmax(logits.clone(), 1);
    let inter: Tensor<2> = (p.clone() * g.clone()).sum_dim(2).squeeze_dim(2);
    let denom: Tensor<2> = (p.powi_scalar(2).sum_dim(2) + g.clone().powi_scalar(2).sum_dim(2)).squeeze_dim(2);
    let dice = inter.mul_scalar(2.0).div(denom.add_scalar(1e-6)).neg().add_scalar(1.0).mean();
    let ce = (log_softmax(logits, 1) * g).sum_dim(1).mean().neg();
    (dice, ce)
}

/// One step's training crops from a prepared case: `crops_per_step` ROI crops centred on
/// foreground and background alternately at random (1:1), augmented; image `(crops, 1, roi)` and
/// labels `(crops, roi)`.
pub fn crops(cfg: &FinetuneConfig, image: &Volume, labels: &Labels, rng: &mut Rng) -> (Vec<f32>, Vec<u8>) {
    let roi = cfg.roi();
    let mut imgs = Vec::new();
    let mut labs = Vec::new();
    for _ in 0..cfg.crops_per_step {
        let (mut ci, mut cl) = pos_neg_crop(image, labels, roi, 1.0, 1.0, rng);
        cfg.augment.apply(&mut ci, &mut cl, rng);
        // rot90 swaps axes 0 and 1; for a non-cubic ROI, turn once more to restore the shape.
        if ci.shape != roi {
            glmae_data::transforms::rot90(&mut ci, 1);
            glmae_data::transforms::rot90(&mut cl, 1);
        }
        imgs.extend_from_slice(&ci.data);
        labs.extend_from_slice(&cl.data);
    }
    (imgs, labs)
}

/// Refuses label maps with a value the model has no class for (a label 200 with 14 classes
/// would otherwise train as one of them), naming the file, the value and the class count.
pub fn ensure_labels_fit<'a>(
    cache: &VolumeCache,
    cases: impl IntoIterator<Item = &'a glmae_data::Case>,
    classes: usize,
) -> Result<()> {
    for case in cases {
        let p = cache.get(case)?;
        let Some(labels) = p.labels.as_ref() else { continue };
        if let Some(&max) = labels.data.iter().max().filter(|&&m| m as usize >= classes) {
            let path = case.label.as_deref().unwrap_or(&case.image);
            bail!(
                "{}: label value {max} but the model has {classes} classes (0..={}); fix the label map \
                 or give the dataset's label list",
                path.display(),
                classes - 1
            );
        }
    }
    Ok(())
}

/// One-hot `(b, classes, d, h, w)` host values for label crops.
fn one_hot(labels: &[u8], crops: usize, classes: usize) -> Vec<f32> {
    let v = labels.len() / crops.max(1);
    let mut out = vec![0.0; crops * classes * v];
    for (i, &l) in labels.iter().enumerate() {
        let (c, x) = (i / v, i % v);
        out[(c * classes + (l as usize).min(classes - 1)) * v + x] = 1.0;
    }
    out
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
            let dir = crate::run::RunDir::open(run)?;
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

    /// Draws one step's crops from a prepared case (see [`crops`]).
    pub fn crops(&self, image: &Volume, labels: &Labels, rng: &mut Rng) -> (Vec<f32>, Vec<u8>) {
        crops(&self.cfg, image, labels, rng)
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

    /// The `.glmae` file of this model with its preprocessing and class names.
    pub fn export(&self, precision: Precision) -> Result<Vec<u8>> {
        let named = self.model.named_tensors(&self.cfg.unetr)?;
        let p = &self.cfg.preprocessing;
        let prep = OwnedPreprocessing {
            orientation: p.orientation.clone(),
            target_spacing: p.spacing,
            intensity: p.intensity,
            foreground_crop: p.foreground_crop,
            class_names: self.cfg.class_names.clone(),
        };
        let builder = ModelBuilder::from_params(self.cfg.unetr, prep, precision, |spec| {
            named.iter().find(|t| t.name == spec.name.as_str()).map(|t| t.values.as_slice())
        })?;
        match builder.to_bytes() {
            Ok(b) => Ok(b),
            Err(e) => bail!("exported model is inconsistent: {e}"),
        }
    }
}

/// Runs fine-tuning into `out`: the seeded label subset, cached preprocessing, prefetched crops,
/// metrics in `metrics.csv`, validation Dice in `validation.csv`, the best model (by mean
/// validation Dice) in `best.bin` and the final one in `last.bin`.
pub fn train(mut ft: Finetuner, ds: &glmae_data::Dataset, out: &Path, loader_threads: usize) -> Result<f64> {
    use std::io::Write;
    let cfg = ft.cfg.clone();
    ensure!(!ds.training.is_empty(), "the dataset lists no training cases");
    ensure!(!ds.validation.is_empty(), "the dataset lists no validation cases");
    if let Some(c) = ds.training.iter().chain(&ds.validation).find(|c| c.label.is_none()) {
        bail!("{} has no label; fine-tuning needs labelled training and validation cases", c.image.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let subset = label_subset(&ds.training, cfg.label_fraction, cfg.seed);
    glmae_data::io::atomic_write(
        &out.join("label_subset.json"),
        serde_json::to_string_pretty(&subset)?.as_bytes(),
    )?;
    let cache = std::sync::Arc::new(VolumeCache::new(cfg.preprocessing.clone(), Some(out.join("cache"))));
    cache.warm(&subset, loader_threads.max(2))?;
    cache.warm(&ds.validation, loader_threads.max(2))?;
    let classes = cfg.unetr.out_channels as usize;
    ensure_labels_fit(&cache, subset.iter().chain(&ds.validation), classes)?;
    let (c2, s2, cfg2) = (cache.clone(), subset.clone(), cfg.clone());
    let batches = glmae_data::Prefetcher::new(cfg.steps, loader_threads, 2, cfg.seed, move |step, _| {
        let mut rng = Rng::for_item(cfg2.seed, step as u64);
        let p = c2.get(&s2[rng.below(s2.len())])?;
        let labels = p.labels.as_ref().context("a training case lost its labels")?;
        Ok(crops(&cfg2, &p.image, labels, &mut rng))
    });
    let bar = crate::progress::bar("finetune", cfg.steps as u64);
    let open = |name: &str, header: &str| -> Result<std::fs::File> {
        let p = out.join(name);
        let mut f = std::fs::File::create(&p).with_context(|| format!("cannot write {}", p.display()))?;
        writeln!(f, "{header}")?;
        Ok(f)
    };
    let mut metrics = open("metrics.csv", "step,loss,dice_loss,ce,lr")?;
    let mut val = open("validation.csv", "step,mean_dice")?;
    let mut best = -1.0f64;
    for batch in batches {
        let (imgs, labs) = batch?;
        let m = ft.step(imgs, &labs);
        ensure!(m.loss.is_finite(), "loss became {} at step {}", m.loss, m.step);
        writeln!(metrics, "{},{:.6},{:.6},{:.6},{:.6e}", m.step, m.loss, m.dice_loss, m.ce, m.lr)?;
        bar.set_message(format!("DiceCE {:.4} best val Dice {:.4}", m.loss, best.max(0.0)));
        bar.inc(1);
        let last_step = ft.step == cfg.steps;
        if (cfg.val_every > 0 && ft.step.is_multiple_of(cfg.val_every)) || last_step {
            let (mean, _) = ft.validate(&cache, &ds.validation)?;
            writeln!(val, "{},{mean:.6}", ft.step)?;
            if mean > best {
                best = mean;
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
