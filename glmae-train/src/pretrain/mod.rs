//! GL-MAE pretraining (paper section 3, method.md): [`views`] cuts random global and local views
//! into masked patch tokens, [`model`] holds the student (encoder, MAE decoder, projection head) and
//! its EMA teacher, [`loss`] the reconstruction and consistency losses, [`run`] the run folder
//! (configuration, metrics, checkpoints) and [`train`] the loop, on one device or several
//! ([`data_parallel`]).
//!
//! This module holds one optimisation step and the state it updates: student, EMA teacher, AdamW,
//! the teacher-output centre and the step counter (method.md, "Optimisation").

pub mod data_parallel;
pub mod loss;
pub mod model;
pub mod run;
pub mod train;
pub mod views;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use glmae_core::VitConfig;
use glmae_data::Volume;
use glmae_data::transforms::{Rng, ViewSpec};
use serde::{Deserialize, Serialize};

use crate::nets::vit::{int_tensor, tensor};
use crate::pretrain::loss::{
    CollapseStats, ConsistencyConfig, consistency, masked_mse, teacher_probs, update_center,
};
use crate::pretrain::model::{DecoderConfig, HeadConfig, Student, Teacher};
use crate::pretrain::views::{ViewBatch, ViewConfig, concat, make_views, sincos_table};

/// Which terms the loss has (the paper's Table 4 ablation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Ablation {
    /// Reconstruct masked patches of local views only: the MAE3D baseline.
    LocalOnly,
    /// Reconstruct global and local views, no consistency.
    GlobalLocal,
    /// Reconstruction plus global-guided consistency: GL-MAE.
    Full,
}

/// Everything that defines a pretraining run; saved in the run folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    /// Encoder (its `img_size` is the global view size).
    pub encoder: VitConfig,
    /// MAE decoder.
    pub decoder: DecoderConfig,
    /// Projection head.
    pub head: HeadConfig,
    /// Views and masking.
    pub views: ViewConfig,
    /// Loss terms.
    pub ablation: Ablation,
    /// Weight of the consistency loss.
    pub lambda: f64,
    /// Temperatures and centring.
    pub consistency: ConsistencyConfig,
    /// Normalise each target patch (MAE's `norm_pix_loss`).
    pub norm_pix_loss: bool,
    /// Volumes per step.
    pub batch_size: usize,
    /// Optimisation steps.
    pub steps: usize,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Base learning rate: the peak rate is `base_lr * batch_size / 256` (MAE's rule; the
    /// paper's 1e-2 read as a base rate, method.md "Optimisation") unless `lr` is set.
    pub base_lr: f64,
    /// Absolute peak learning rate, overriding the `base_lr` rule (`--lr`).
    #[serde(default)]
    pub lr: Option<f64>,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// AdamW weight decay, applied to weight matrices only ([`decayed_params`]).
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: (f64, f64),
    /// Clip the global gradient norm to this value (0 disables).
    pub grad_clip: f64,
    /// Teacher momentum at step 0; it rises to 1 on a cosine.
    pub teacher_momentum: f64,
    /// Seed for initialisation, views and masks.
    pub seed: u64,
    /// Float type of every tensor (set on the device before the model is made).
    #[serde(default)]
    pub precision: crate::device::ComputePrecision,
}

impl PretrainConfig {
    /// The paper's ViT-T setting (160^3 global views, 96^3 local views, decoder 128 x 4).
    pub fn vit_t() -> Self {
        Self::with_encoder(VitConfig::vit_t([160; 3]), DecoderConfig { width: 128, depth: 4, heads: 4 })
    }

    /// ViT-B with the MAE decoder 512 x 8.
    pub fn vit_b() -> Self {
        Self::with_encoder(VitConfig::vit_b([160; 3]), DecoderConfig { width: 512, depth: 8, heads: 16 })
    }

    fn with_encoder(encoder: VitConfig, decoder: DecoderConfig) -> Self {
        Self {
            encoder,
            decoder,
            head: HeadConfig { hidden: 2048, out: 512, bottleneck: 0, batch_norm: false },
            views: ViewConfig::default(),
            ablation: Ablation::Full,
            lambda: 1.0,
            consistency: ConsistencyConfig::default(),
            norm_pix_loss: false,
            batch_size: 2,
            steps: 1000,
            warmup_steps: 40,
            base_lr: 1e-2,
            lr: None,
            min_lr: 0.0,
            weight_decay: 0.05,
            betas: (0.9, 0.95),
            grad_clip: 3.0,
            teacher_momentum: 0.996,
            seed: 0,
            precision: Default::default(),
        }
    }

    /// ViT-T's shape at another width, with view sizes `(global, local)`, a 2-layer decoder as
    /// wide as the encoder and a 4x-width head to 128: the quickstart's and the experiment's model.
    pub fn narrow(hidden: u32, heads: u32, views: (usize, usize), steps: usize, batch_size: usize) -> Self {
        let mut c = Self::vit_t();
        c.encoder.hidden_size = hidden;
        c.encoder.num_heads = heads;
        c.encoder.mlp_dim = 4 * hidden;
        c.encoder.img_size = [views.0 as u32; 3];
        c.decoder = DecoderConfig { width: hidden as usize, depth: 2, heads: heads as usize };
        c.head = HeadConfig { hidden: 4 * hidden as usize, out: 128, bottleneck: 0, batch_norm: false };
        c.views.global = ViewSpec { size: views.0, ..ViewSpec::GLOBAL };
        c.views.local = ViewSpec { size: views.1, ..ViewSpec::LOCAL };
        c.steps = steps;
        c.warmup_steps = steps / 10;
        c.batch_size = batch_size;
        c
    }

    /// The `tiny` preset (`pretrain --model tiny`), a seconds-long smoke test: the encoder of the
    /// `tiny` UNETR ([`glmae_core::testing_config`]: patch 16, width 24, 12 blocks), so
    /// `finetune --model tiny --init RUN` can start from it, with 64^3 global and 32^3 local
    /// views (64 and 8 tokens) and a one-block decoder.
    pub fn tiny() -> Self {
        let mut encoder = glmae_core::testing_config().vit;
        encoder.img_size = [64; 3];
        let mut c = Self::with_encoder(encoder, DecoderConfig { width: 24, depth: 1, heads: 2 });
        c.head = HeadConfig { hidden: 32, out: 16, bottleneck: 0, batch_norm: false };
        c.views.global = ViewSpec { size: 64, ..ViewSpec::GLOBAL };
        c.views.local = ViewSpec { size: 32, ..ViewSpec::LOCAL };
        c.steps = 40;
        c.warmup_steps = 4;
        c.base_lr = 0.5;
        c
    }

    /// The configuration unit tests train: patch 4, width 12, 2 blocks, 16^3 global and 8^3
    /// local views (no UNETR can use a patch-4 encoder; the `tiny` preset is [`Self::tiny`]).
    pub fn for_tests() -> Self {
        let mut c = Self::tiny();
        let e = &mut c.encoder;
        (e.patch_size, e.hidden_size, e.mlp_dim, e.depth, e.img_size) = (4, 12, 24, 2, [16; 3]);
        c.decoder.width = 12;
        c.views.global.size = 16;
        c.views.local.size = 8;
        c
    }

    /// Checks what a run needs before it starts: at least one view of each kind (a view list
    /// of length 0 reaches burn as an empty tensor), a batch, a mask ratio in [0, 1), positive
    /// temperatures and a finite, positive learning rate.
    pub fn validate(&self) -> anyhow::Result<()> {
        let v = &self.views;
        anyhow::ensure!(
            v.n_global >= 1 && v.n_local >= 1,
            "GL-MAE needs at least one global and one local view per volume (got {} global, {} local)",
            v.n_global,
            v.n_local
        );
        anyhow::ensure!(self.batch_size >= 1 && self.steps >= 1, "batch size and steps must be at least 1");
        anyhow::ensure!(
            (0.0..1.0).contains(&v.mask_ratio),
            "mask ratio {} must be in [0, 1): the encoder needs a visible token",
            v.mask_ratio
        );
        let c = &self.consistency;
        anyhow::ensure!(
            [c.tau_student, c.tau_teacher, c.tau_teacher_start].iter().all(|t| t.is_finite() && *t > 0.0),
            "temperatures must be positive (student {}, teacher {} from {})",
            c.tau_student,
            c.tau_teacher,
            c.tau_teacher_start
        );
        let lr = self.peak_lr();
        anyhow::ensure!(lr.is_finite() && lr > 0.0, "learning rate {lr} must be positive");
        anyhow::ensure!(self.head.out >= 2, "the head needs at least 2 outputs (got {})", self.head.out);
        Ok(())
    }

    /// The peak learning rate: `lr` when set, otherwise `base_lr * batch_size / 256`.
    pub fn peak_lr(&self) -> f64 {
        self.lr.unwrap_or(self.base_lr * self.batch_size as f64 / 256.0)
    }

    /// Learning rate at `step`: linear warm-up to [`Self::peak_lr`], then cosine to `min_lr`.
    pub fn lr_at(&self, step: usize) -> f64 {
        let peak = self.peak_lr();
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr + (peak - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// Teacher momentum at `step`: `1 - (1 - m0) * (cos(pi * step / steps) + 1) / 2` (eq. 3).
    pub fn momentum_at(&self, step: usize) -> f64 {
        let t = (step as f64 / self.steps.max(1) as f64).min(1.0);
        1.0 - (1.0 - self.teacher_momentum) * ((std::f64::consts::PI * t).cos() + 1.0) / 2.0
    }
}

/// The views of one volume for one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Global views.
    pub global: ViewBatch,
    /// Local views.
    pub local: ViewBatch,
}

/// Draws a sample's views and masks from a preprocessed volume.
pub fn make_sample(cfg: &PretrainConfig, v: &Volume, rng: &mut Rng) -> Sample {
    let p = cfg.encoder.patch_size as usize;
    let r = cfg.views.mask_ratio;
    Sample {
        global: make_views(v, &cfg.views.global, cfg.views.n_global, p, r, rng),
        local: make_views(v, &cfg.views.local, cfg.views.n_local, p, r, rng),
    }
}

/// Loss terms and schedule values of one step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Step index (0-based).
    pub step: usize,
    /// Total loss.
    pub loss: f64,
    /// Reconstruction loss on global views (0 when not used).
    pub rec_global: f64,
    /// Reconstruction loss on local views.
    pub rec_local: f64,
    /// Consistency loss (0 when not used).
    pub consistency: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Teacher momentum used.
    pub momentum: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Teacher temperature used.
    pub tau_teacher: f64,
    /// The collapse watch on the teacher's distributions (all 0 without consistency).
    pub collapse: CollapseStats,
}

/// Tensors of one view size on the device.
struct ViewTensors {
    tokens: Tensor<3>,
    keep: Tensor<2, burn::tensor::Int>,
    restore: Tensor<2, burn::tensor::Int>,
    mask: Tensor<2>,
    enc_pos: Tensor<2>,
    dec_pos: Tensor<2>,
}

/// One replica's share of a step: gradients, loss terms (total, rec global, rec local,
/// consistency) and, when consistency is on, the mean teacher output (for the centre) and the
/// teacher's distributions (for the collapse watch).
pub struct PartialStep {
    /// Gradients of the (scaled) loss.
    pub grads: GradientsParams,
    /// Unscaled loss terms.
    pub terms: [f64; 4],
    /// Mean of the teacher outputs over this share of the batch.
    pub teacher_mean: Option<Tensor<1>>,
    /// The teacher's distributions on the host, one row of `head.out` per global view (empty
    /// without consistency).
    pub teacher_probs: Vec<f32>,
}

/// The parameters AdamW decays: weight matrices, i.e. every parameter named `weight` (Linear
/// and convolution weights). Biases, LayerNorm `gamma`/`beta` and the mask token get no decay,
/// as in MAE and DINO (method.md "Optimisation").
pub fn decayed_params() -> ParamGroup {
    ParamGroup::from_regex(r"(^|\.)weight$").unwrap_or_else(|_| ParamGroup::from_ids(Vec::new()))
}

/// AdamW with `weight_decay` on [`decayed_params`] and none on the other parameters.
pub fn adamw(betas: (f64, f64), weight_decay: f64) -> ModuleOptimizer {
    let base = AdamWConfig::new().with_beta_1(betas.0 as f32).with_beta_2(betas.1 as f32).with_epsilon(1e-8);
    ModuleOptimizer::from(base.clone().with_weight_decay(0.0).build()).with_group(
        decayed_params(),
        base.with_weight_decay(weight_decay as f32).build(),
        None,
    )
}

/// The model, its optimiser and everything else a step changes.
pub struct Pretrainer {
    /// The run's configuration.
    pub cfg: PretrainConfig,
    /// Trained network.
    pub student: Student,
    /// EMA network.
    pub teacher: Teacher,
    /// AdamW state.
    pub optimizer: ModuleOptimizer,
    /// Running centre of teacher outputs.
    pub center: Tensor<1>,
    /// Steps taken.
    pub step: usize,
    device: Device,
    positions: std::sync::Mutex<std::collections::HashMap<([usize; 3], usize), Tensor<2>>>,
}

impl Pretrainer {
    /// A fresh run on `device` (an autodiff device), initialised from `cfg.seed`.
    pub fn new(cfg: PretrainConfig, device: Device) -> Self {
        device.seed(cfg.seed);
        let student = Student::new(&cfg.encoder, &cfg.decoder, &cfg.head, &device);
        let teacher = student.teacher();
        let optimizer = adamw(cfg.betas, cfg.weight_decay);
        let center = Tensor::<1>::zeros([cfg.head.out], &device);
        Self { cfg, student, teacher, optimizer, center, step: 0, device, positions: Default::default() }
    }

    /// The device the run lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn upload(&self, b: &ViewBatch) -> ViewTensors {
        let (v, n, k, kept) = (b.views, b.tokens_per_view(), b.patch_values, b.kept());
        let d = &self.device;
        ViewTensors {
            tokens: tensor(b.tokens.clone(), [v, n, k], d),
            keep: int_tensor(b.keep.clone(), [v, kept], d),
            restore: int_tensor(b.restore.clone(), [v, n], d),
            mask: tensor(b.mask.clone(), [v, n], d),
            enc_pos: self.position_table(b.grid, self.cfg.encoder.hidden_size as usize),
            dec_pos: self.position_table(b.grid, self.cfg.decoder.width),
        }
    }

    /// The sin-cos table for a token grid and width, built once per run (views of one size
    /// share it every step).
    fn position_table(&self, grid: [usize; 3], dim: usize) -> Tensor<2> {
        let mut cache = self.positions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cache
            .entry((grid, dim))
            .or_insert_with(|| tensor(sincos_table(grid, dim), [grid.iter().product(), dim], &self.device))
            .clone()
    }

    /// The loss terms for `samples` without changing any state: (total, [rec global, rec local,
    /// consistency], teacher outputs and the teacher's distributions `[volumes * n_global, K]`).
    #[allow(clippy::type_complexity)]
    pub fn losses(
        &self,
        samples: &[Sample],
    ) -> (Tensor<1>, [Option<Tensor<1>>; 3], Option<(Tensor<2>, Tensor<2>)>) {
        let volumes = samples.len();
        let g = concat(samples.iter().map(|s| s.global.clone()).collect()).map(|b| self.upload(&b));
        let l = concat(samples.iter().map(|s| s.local.clone()).collect()).map(|b| self.upload(&b));
        let s = &self.student;
        let reconstruct = |t: &ViewTensors| -> (Tensor<3>, Tensor<1>) {
            let latent = s.vit.forward(t.tokens.clone(), t.enc_pos.clone(), Some(t.keep.clone()));
            let pred = s.decoder.forward(latent.clone(), t.restore.clone(), t.dec_pos.clone());
            (latent, masked_mse(pred, t.tokens.clone(), t.mask.clone(), self.cfg.norm_pix_loss))
        };
        let ablation = self.cfg.ablation;
        let local = l.as_ref().map(reconstruct);
        let global = match ablation {
            Ablation::LocalOnly => None,
            _ => g.as_ref().map(reconstruct),
        };
        let mut total: Option<Tensor<1>> = None;
        let mut add = |t: &Tensor<1>, w: f64| {
            let t = t.clone().mul_scalar(w);
            total = Some(match total.take() {
                Some(x) => x + t,
                None => t,
            });
        };
        if let Some((_, r)) = &global {
            add(r, 1.0);
        }
        if let Some((_, r)) = &local {
            add(r, 1.0);
        }
        let mut cons = None;
        let mut teacher_out = None;
        if let (Ablation::Full, Some(gt), Some((g_latent, _))) = (ablation, g.as_ref(), global.as_ref()) {
            let t = self
                .teacher
                .head
                .forward(self.teacher.vit.forward(gt.tokens.clone(), gt.enc_pos.clone(), None))
                .detach();
            let out = self.cfg.head.out;
            let sg = s.head.forward(g_latent.clone()).reshape([volumes, self.cfg.views.n_global, out]);
            let student = match &local {
                Some((l_latent, _)) => {
                    let sl = s.head.forward(l_latent.clone()).reshape([volumes, self.cfg.views.n_local, out]);
                    Tensor::cat(vec![sg, sl], 1)
                }
                None => sg,
            };
            let [_, per, _] = student.dims();
            let tau_t = self.cfg.consistency.tau_teacher_at(self.step);
            let center = if self.step == 0 && self.cfg.consistency.center_warm_start {
                t.clone().mean_dim(0).squeeze_dim::<1>(0)
            } else {
                self.center.clone()
            };
            let p_t = match self.cfg.consistency.centering {
                crate::pretrain::loss::Centering::Mean => teacher_probs(t.clone(), center, tau_t),
                crate::pretrain::loss::Centering::Sinkhorn => {
                    crate::pretrain::loss::sinkhorn_probs(t.clone(), tau_t, 3)
                }
            }
            .detach();
            let c = consistency(
                p_t.clone(),
                student.reshape([volumes * per, out]),
                volumes,
                self.cfg.consistency.tau_student,
            );
            add(&c, self.cfg.lambda);
            cons = Some(c);
            teacher_out = Some((t, p_t));
        }
        let total = total.unwrap_or_else(|| Tensor::zeros([1], &self.device));
        (total, [global.map(|x| x.1), local.map(|x| x.1), cons], teacher_out)
    }

    /// One optimisation step on `samples` (one per volume of the batch).
    pub fn step(&mut self, samples: &[Sample]) -> StepMetrics {
        let part = self.gradients(samples, 1.0);
        self.apply(part.grads, part.terms, part.teacher_mean, &part.teacher_probs)
    }

    /// Forward and backward on `samples` without changing any state. The loss is multiplied by
    /// `scale` before `backward` (a replica's share of a data-parallel batch).
    pub fn gradients(&self, samples: &[Sample], scale: f64) -> PartialStep {
        let (total, terms, teacher_out) = self.losses(samples);
        let scalar =
            |t: &Option<Tensor<1>>| t.as_ref().map_or(0.0, |t| t.clone().into_scalar::<f32>() as f64);
        let terms = [
            total.clone().into_scalar::<f32>() as f64,
            scalar(&terms[0]),
            scalar(&terms[1]),
            scalar(&terms[2]),
        ];
        let grads = GradientsParams::from_grads(total.mul_scalar(scale).backward(), &self.student);
        let (teacher_mean, teacher_probs) = match teacher_out {
            Some((t, p)) => {
                // One read a step: the watch needs every row (K values per global view).
                let probs = p.to_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
                (Some(t.mean_dim(0).squeeze_dim::<1>(0)), probs)
            }
            None => (None, Vec::new()),
        };
        PartialStep { grads, terms, teacher_mean, teacher_probs }
    }

    /// Completes a step from the batch's gradients, loss terms (total, rec global, rec local,
    /// consistency), mean teacher output and teacher distributions (rows of `head.out`):
    /// clipping, AdamW, the teacher EMA, the centre and the collapse watch's statistics.
    pub fn apply(
        &mut self,
        mut grads: GradientsParams,
        terms: [f64; 4],
        teacher_mean: Option<Tensor<1>>,
        teacher_probs: &[f32],
    ) -> StepMetrics {
        let collapse = CollapseStats::from_probs(teacher_probs, self.cfg.head.out);
        let tau_teacher = self.cfg.consistency.tau_teacher_at(self.step);
        let lr = self.cfg.lr_at(self.step);
        let momentum = self.cfg.momentum_at(self.step);
        let grad_norm = clip_global_norm(&self.student, &mut grads, self.cfg.grad_clip);
        self.student = self.optimizer.step(lr, self.student.clone(), grads);
        self.update_teacher(momentum);
        if let Some(mean) = teacher_mean {
            let m = if self.step == 0 && self.cfg.consistency.center_warm_start {
                0.0
            } else {
                self.cfg.consistency.center_momentum
            };
            self.center = update_center(self.center.clone(), mean, m).detach();
        }
        let m = StepMetrics {
            step: self.step,
            loss: terms[0],
            rec_global: terms[1],
            rec_local: terms[2],
            consistency: terms[3],
            lr,
            momentum,
            grad_norm,
            tau_teacher,
            collapse,
        };
        self.step += 1;
        m
    }

    /// `teacher = m * teacher + (1 - m) * student` for the encoder and head.
    pub fn update_teacher(&mut self, momentum: f64) {
        let mut vit = Collect::default();
        self.student.vit.visit(&mut vit);
        let mut head = Collect::default();
        self.student.head.visit(&mut head);
        let teacher = self.teacher.clone();
        let mut ema = Ema { source: vit.values.into_iter().chain(head.values).collect(), next: 0, momentum };
        self.teacher = Teacher { vit: teacher.vit.map(&mut ema), head: teacher.head.map(&mut ema) };
    }
}

/// Flattened copies of every float parameter, in visiting order.
#[derive(Default)]
struct Collect {
    values: Vec<Tensor<1>>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val().detach();
        let n = t.shape().num_elements();
        self.values.push(t.reshape([n]));
    }
}

/// Moves each parameter toward the matching source tensor (same visiting order).
struct Ema {
    source: Vec<Tensor<1>>,
    next: usize,
    momentum: f64,
}

impl ModuleMapper for Ema {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(src) = self.source.get(self.next) else { return param };
        self.next += 1;
        let m = self.momentum;
        param.map(|t| {
            let shape = t.shape();
            (t.mul_scalar(m) + src.clone().reshape(shape).mul_scalar(1.0 - m)).detach()
        })
    }
}

/// Scales all gradients so that their joint L2 norm is at most `max` (PyTorch's
/// `clip_grad_norm_`; burn's own clipping works per tensor). Returns the norm before clipping.
fn clip_global_norm(module: &Student, grads: &mut GradientsParams, max: f64) -> f64 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        total: f64,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.total += g.powi_scalar(2).sum().into_scalar::<f32>() as f64;
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut n = Norm { grads, total: 0.0 };
    module.visit(&mut n);
    let norm = n.total.sqrt();
    if max > 0.0 && norm > max {
        module.visit(&mut Scale { grads, factor: max / (norm + 1e-6) });
    }
    norm
}
