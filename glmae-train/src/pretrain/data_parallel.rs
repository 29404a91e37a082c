//! Data-parallel pretraining over several devices with burn's multi-device gradient support.
//!
//! Each step the batch is dealt out round-robin to one replica per device. Every replica runs
//! forward and backward on its share in its own thread, with the loss divided by the number of
//! replicas, so that the summed gradients are those of the whole batch. burn's
//! [`MultiGradientsParams`] adds the replicas' gradients up (each parameter on one device, moved
//! there by burn), the primary replica clips, takes the AdamW step and moves the teacher, and
//! every other replica then receives the updated networks with [`Module::fork`]. This is the
//! scheme of burn's multi-device learner; parameters are broadcast each step, which for ViT-T
//! (5.7 M) and ViT-B (86 M) costs little next to a step.

use anyhow::{Result, ensure};
use burn::module::Module;
use burn::optim::{GradientsParams, MultiGradientsParams};
use burn::tensor::{Device, Tensor};

use crate::pretrain::{PartialStep, Pretrainer, Sample, StepMetrics};

/// The replicas beside a primary [`Pretrainer`], one per extra device.
pub struct DataParallel {
    replicas: Vec<Pretrainer>,
}

impl DataParallel {
    /// Replicas of `primary` on `others` (the primary's own device is not among them). The batch
    /// size must be a multiple of the number of devices so that every replica has the same
    /// share, which keeps the averaged loss equal to the whole batch's.
    pub fn new(primary: &Pretrainer, others: &[Device]) -> Result<Self> {
        let world = others.len() + 1;
        ensure!(
            primary.cfg.batch_size.is_multiple_of(world),
            "batch size {} cannot be split evenly over {world} devices; use a multiple of {world}",
            primary.cfg.batch_size
        );
        let mut replicas: Vec<Pretrainer> =
            others.iter().map(|d| Pretrainer::new(primary.cfg.clone(), d.clone())).collect();
        sync(primary, &mut replicas);
        Ok(Self { replicas })
    }

    /// Devices taking part, the primary's included.
    pub fn world_size(&self) -> usize {
        self.replicas.len() + 1
    }

    /// One data-parallel step of `primary` on `samples` (the whole batch).
    pub fn step(&mut self, primary: &mut Pretrainer, samples: &[Sample]) -> Result<StepMetrics> {
        let world = self.world_size();
        ensure!(
            samples.len().is_multiple_of(world),
            "{} volumes cannot be split evenly over {world} devices",
            samples.len()
        );
        let share =
            |rank: usize| -> Vec<Sample> { samples.iter().skip(rank).step_by(world).cloned().collect() };
        let scale = 1.0 / world as f64;
        let parts: Vec<PartialStep> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .replicas
                .iter()
                .enumerate()
                .map(|(i, replica)| {
                    let mine = share(i + 1);
                    scope.spawn(move || replica.gradients(&mine, scale))
                })
                .collect();
            let mut parts = vec![primary.gradients(&share(0), scale)];
            for (i, h) in handles.into_iter().enumerate() {
                let part =
                    h.join().map_err(|_| anyhow::anyhow!("replica {} failed during its step", i + 1))?;
                parts.push(part);
            }
            anyhow::Ok(parts)
        })?;
        let mut terms = [0.0; 4];
        let mut multi = MultiGradientsParams::default();
        let mut teacher_sum: Option<Tensor<1>> = None;
        let mut teacher_probs = Vec::new();
        let device = primary.device().clone();
        let replica_devices =
            std::iter::once(device.clone()).chain(self.replicas.iter().map(|r| r.device().clone()));
        for (part, part_device) in parts.into_iter().zip(replica_devices) {
            for (t, v) in terms.iter_mut().zip(part.terms) {
                *t += v * scale;
            }
            if let Some(m) = part.teacher_mean {
                let m = m.to_device(&device);
                teacher_sum = Some(match teacher_sum.take() {
                    Some(s) => s + m,
                    None => m,
                });
            }
            teacher_probs.extend_from_slice(&part.teacher_probs);
            multi.grads.push((part.grads, part_device));
        }
        let grads = gather(&primary.student, multi, &device);
        let teacher_mean = teacher_sum.map(|s| s.mul_scalar(scale));
        let metrics = primary.apply(grads, terms, teacher_mean, &teacher_probs);
        sync(primary, &mut self.replicas);
        Ok(metrics)
    }
}

/// Gives every replica the primary's student, teacher, centre and step.
fn sync(primary: &Pretrainer, replicas: &mut [Pretrainer]) {
    for r in replicas {
        let device = r.device().clone();
        r.student = primary.student.clone().fork(&device);
        r.teacher = primary.teacher.clone().fork(&device);
        r.center = primary.center.clone().to_device(&device);
        r.step = primary.step;
    }
}

/// Sums every parameter's gradients over the replicas (burn picks the device each sum runs on)
/// and brings them to `device`, keyed like the primary's parameters.
fn gather<M: Module>(module: &M, mut multi: MultiGradientsParams, device: &Device) -> GradientsParams {
    struct Gather<'a> {
        multi: &'a mut MultiGradientsParams,
        out: GradientsParams,
        device: &'a Device,
    }
    impl burn::module::ModuleVisitor for Gather<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if let Some((sum, _)) = self.multi.remove::<D>(param.id) {
                self.out.register(param.id, sum.to_device(self.device));
            }
        }
    }
    let mut g = Gather { multi: &mut multi, out: GradientsParams::new(), device };
    module.visit(&mut g);
    g.out
}
