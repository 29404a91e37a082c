//! GL-MAE's losses: masked-patch reconstruction (paper eq. 2) and global-guided consistency
//! (eq. 6-8, with DINO's temperatures and centring).

use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};

/// Mean squared error over masked patches only: `pred` and `target` are `(views, tokens,
/// values)`, `mask` is `(views, tokens)` with 1 on masked tokens. With `norm_pix`, each target
/// patch is normalised to zero mean and unit variance first (MAE's option).
pub fn masked_mse(pred: Tensor<3>, target: Tensor<3>, mask: Tensor<2>, norm_pix: bool) -> Tensor<1> {
    let target = if norm_pix {
        let mean = target.clone().mean_dim(2);
        let var = target.clone().sub(mean.clone()).powi_scalar(2).mean_dim(2);
        target.sub(mean).div(var.add_scalar(1e-6).sqrt())
    } else {
        target
    };
    let per_patch: Tensor<2> = pred.sub(target).powi_scalar(2).mean_dim(2).squeeze_dim(2);
    // A view too small to mask (one token) contributes nothing instead of 0/0.
    per_patch.mul(mask.clone()).sum().div(mask.sum().clamp_min(1.0))
}

/// Temperatures and centring of the consistency loss.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConsistencyConfig {
    /// Student temperature (0.1).
    pub tau_student: f64,
    /// Teacher temperature (0.04), reached after the warm-up.
    pub tau_teacher: f64,
    /// Momentum of the running centre of teacher outputs (0.9).
    pub center_momentum: f64,
    /// Teacher temperature at step 0 when warming up (DINO's `warmup_teacher_temp`, 0.04).
    #[serde(default = "default_tau_teacher_start")]
    pub tau_teacher_start: f64,
    /// Steps of the linear teacher-temperature warm-up from `tau_teacher_start` to
    /// `tau_teacher` (0: `tau_teacher` from the first step).
    #[serde(default)]
    pub tau_teacher_warmup_steps: usize,
    /// Start the centre at the first batch's mean teacher output instead of 0 (DINO starts at
    /// 0; a freshly initialised head's outputs share a large common part, which a zero centre
    /// leaves in place for the first tens of steps).
    #[serde(default)]
    pub center_warm_start: bool,
    /// How the teacher's outputs are kept from collapsing: DINO's running-mean centring or
    /// DINOv2's Sinkhorn-Knopp normalisation over the step's teacher views.
    #[serde(default)]
    pub centering: Centering,
}

/// The teacher's anti-collapse normalisation.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Centering {
    /// DINO: subtract a running mean of the teacher's outputs, then `softmax(. / tau_t)`.
    #[default]
    Mean,
    /// DINOv2 / SwAV: three Sinkhorn-Knopp iterations on `exp(t / tau_t)` over the step's
    /// teacher views, so that every output dimension gets an equal share of the batch.
    Sinkhorn,
}

fn default_tau_teacher_start() -> f64 {
    0.04
}

impl Default for ConsistencyConfig {
    fn default() -> Self {
        Self {
            tau_student: 0.1,
            tau_teacher: 0.04,
            center_momentum: 0.9,
            tau_teacher_start: default_tau_teacher_start(),
            tau_teacher_warmup_steps: 0,
            center_warm_start: false,
            centering: Centering::Mean,
        }
    }
}

impl ConsistencyConfig {
    /// Teacher temperature at `step`: linear from `tau_teacher_start` to `tau_teacher` over the
    /// warm-up, then constant (DINO's schedule).
    pub fn tau_teacher_at(&self, step: usize) -> f64 {
        if step >= self.tau_teacher_warmup_steps {
            return self.tau_teacher;
        }
        let t = step as f64 / self.tau_teacher_warmup_steps as f64;
        self.tau_teacher_start + (self.tau_teacher - self.tau_teacher_start) * t
    }
}

/// DINOv2's `sinkhorn_knopp_teacher`: starting from `exp(teacher / tau)`, alternately makes every
/// output dimension's total over the rows equal (1 / K) and every row a distribution, `iters`
/// times; returns the rows.
///
/// # Shapes
/// - `teacher`: `[N, K]`; returns `[N, K]`, each row summing to 1.
pub fn sinkhorn_probs(teacher: Tensor<2>, tau: f64, iters: usize) -> Tensor<2> {
    let [n, k] = teacher.dims();
    // Subtracting the global maximum keeps exp finite and cancels in the normalisations.
    let logits = teacher.div_scalar(tau);
    let max = logits.clone().max();
    let mut q = logits.sub(max.unsqueeze_dim::<2>(0)).exp();
    q = q.clone().div(q.clone().sum().unsqueeze_dim::<2>(0));
    for _ in 0..iters {
        q = q.clone().div(q.clone().sum_dim(0).clamp_min(1e-30)).div_scalar(k as f64);
        q = q.clone().div(q.clone().sum_dim(1).clamp_min(1e-30)).div_scalar(n as f64);
    }
    q.mul_scalar(n as f64)
}

/// The teacher's distributions: `softmax((teacher - center) / tau_teacher)`.
///
/// # Shapes
/// - `teacher`: `[N, K]`, `center`: `[K]`; returns `[N, K]`.
pub fn teacher_probs(teacher: Tensor<2>, center: Tensor<1>, tau_teacher: f64) -> Tensor<2> {
    softmax(teacher.sub(center.unsqueeze_dim::<2>(0)).div_scalar(tau_teacher), 1)
}

/// Cross-entropy `H(P_t(unmasked global i), P_s(masked view j))` averaged over every pair of a
/// volume's teacher global views and student views (global and local), then over volumes.
///
/// # Shapes
/// - `p_teacher`: `[volumes * n_global, K]`, the teacher's distributions ([`teacher_probs`],
///   detached);
/// - `student`: `[volumes * n_student, K]` logits, each volume's views contiguous;
/// - returns `[1]`.
pub fn consistency(p_teacher: Tensor<2>, student: Tensor<2>, volumes: usize, tau_student: f64) -> Tensor<1> {
    let [tv, d] = p_teacher.dims();
    let [sv, _] = student.dims();
    let (ng, ns) = (tv / volumes, sv / volumes);
    let p_t = p_teacher.reshape([volumes, ng, d]);
    let log_p_s = log_softmax(student.div_scalar(tau_student), 1).reshape([volumes, ns, d]);
    // (volumes, ng, ns): sum over the distribution of P_t * log P_s, for every pair.
    let cross = p_t.matmul(log_p_s.swap_dims(1, 2));
    cross.mean().neg()
}

/// The teacher centre after one step: `m * center + (1 - m) * batch_mean`, where `batch_mean` is
/// the mean of the step's teacher outputs (over every replica under data parallelism).
pub fn update_center(center: Tensor<1>, batch_mean: Tensor<1>, momentum: f64) -> Tensor<1> {
    center.mul_scalar(momentum).add(batch_mean.mul_scalar(1.0 - momentum))
}

/// DINO's collapse diagnostics of one step's teacher distributions (nats).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CollapseStats {
    /// Mean entropy of the per-sample distributions, `H_cond = mean_i H(p_i)`: ln K when the
    /// teacher is uniform for every input.
    pub h_cond: f64,
    /// Entropy of the batch-mean distribution, `H_marg = H(mean_i p_i)`: near 0 when every input
    /// lands on the same dimension.
    pub h_marg: f64,
    /// `MI = H_marg - H_cond`, the information the teacher's output carries about its input:
    /// near 0 in either collapse.
    pub mi: f64,
}

impl CollapseStats {
    /// The statistics of `probs`, rows of `k` probabilities each (a row per teacher view).
    pub fn from_probs(probs: &[f32], k: usize) -> Self {
        let rows = probs.len().checked_div(k).unwrap_or(0);
        if rows == 0 {
            return Self::default();
        }
        let entropy =
            |p: &mut dyn Iterator<Item = f64>| -> f64 { p.filter(|&x| x > 0.0).map(|x| -x * x.ln()).sum() };
        let mut mean = vec![0.0f64; k];
        let mut h_cond = 0.0;
        for row in probs.chunks_exact(k) {
            // Renormalised in f64: the rows come from an f32 (or bf16) softmax.
            let total: f64 = row.iter().map(|&x| f64::from(x)).sum::<f64>().max(f64::MIN_POSITIVE);
            h_cond += entropy(&mut row.iter().map(|&x| f64::from(x) / total));
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += f64::from(x) / total;
            }
        }
        let n = rows as f64;
        let h_cond = h_cond / n;
        let h_marg = entropy(&mut mean.iter().map(|m| m / n));
        // Clamped: rounding can make the difference a hair negative for identical rows.
        Self { h_cond, h_marg, mi: (h_marg - h_cond).max(0.0) }
    }
}

/// Warns when the consistency term has collapsed: MI below `floor` nats for `patience`
/// consecutive steps (defaults 0.05 and 100, as the collapse watch in method.md).
#[derive(Clone, Debug)]
pub struct CollapseWatch {
    /// MI below this counts as collapsed.
    pub floor: f64,
    /// Consecutive collapsed steps before a warning.
    pub patience: usize,
    streak: usize,
}

impl Default for CollapseWatch {
    fn default() -> Self {
        Self { floor: 0.05, patience: 100, streak: 0 }
    }
}

impl CollapseWatch {
    /// A watch that warns after `patience` consecutive steps with MI below `floor` nats.
    pub fn new(floor: f64, patience: usize) -> Self {
        Self { floor, patience, streak: 0 }
    }

    /// Feeds one step's statistics; returns the warning to show when the streak of collapsed
    /// steps reaches `patience` (and again every `patience` steps while it lasts).
    pub fn observe(&mut self, step: usize, s: &CollapseStats) -> Option<String> {
        if s.mi >= self.floor {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        self.streak.is_multiple_of(self.patience.max(1)).then(|| {
            format!(
                "warning: the consistency term looks collapsed: teacher MI {:.4} nats < {} for the last {} \
                 steps (step {step}; H_cond {:.3}, H_marg {:.3} nats). {} Its loss then carries no \
                 per-volume signal; see metrics.csv (h_cond, h_marg, mi) and method.md, 'collapse watch'.",
                s.mi,
                self.floor,
                self.streak,
                s.h_cond,
                s.h_marg,
                if s.h_marg < 0.5 * s.h_cond.max(1e-9) || s.h_marg < 0.1 {
                    "Every volume lands on the same few dimensions (one-dimension collapse)."
                } else {
                    "The centred teacher is uniform for every volume (uniform collapse)."
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_stats_of_known_distributions() {
        // Two one-hot rows on different dimensions: H_cond 0, H_marg ln 2, MI ln 2.
        let s = CollapseStats::from_probs(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], 3);
        assert!(s.h_cond.abs() < 1e-12 && (s.h_marg - 2f64.ln()).abs() < 1e-12, "{s:?}");
        assert!((s.mi - 2f64.ln()).abs() < 1e-12);
        // Identical uniform rows: H_cond = H_marg = ln K, MI 0 (uniform collapse).
        let s = CollapseStats::from_probs(&[0.25; 8], 4);
        assert!((s.h_cond - 4f64.ln()).abs() < 1e-9 && s.mi < 1e-9, "{s:?}");
        // Identical one-hot rows: everything 0 (one-dimension collapse).
        let s = CollapseStats::from_probs(&[0.0, 1.0, 0.0, 1.0], 2);
        assert!(s.h_cond.abs() < 1e-12 && s.h_marg.abs() < 1e-12 && s.mi < 1e-12, "{s:?}");
    }

    #[test]
    fn watch_fires_after_patience_collapsed_steps_and_resets() {
        let mut w = CollapseWatch { floor: 0.05, patience: 3, ..Default::default() };
        let low = CollapseStats { h_cond: 4.8, h_marg: 4.8, mi: 0.0 };
        let high = CollapseStats { h_cond: 1.0, h_marg: 3.0, mi: 2.0 };
        assert!(w.observe(0, &low).is_none() && w.observe(1, &low).is_none());
        assert!(w.observe(2, &high).is_none(), "a healthy step resets the streak");
        assert!(w.observe(3, &low).is_none() && w.observe(4, &low).is_none());
        let msg = w.observe(5, &low).expect("third collapsed step in a row");
        assert!(msg.contains("uniform collapse"), "{msg}");
    }

    #[test]
    fn sinkhorn_rows_are_distributions_and_columns_balance() {
        let device = burn::tensor::Device::flex();
        // Three rows that all prefer dimension 0: centring-free Sinkhorn spreads them.
        let t = Tensor::<2>::from_data(
            burn::tensor::TensorData::new(vec![1.0f32, 0.0, 0.0, 0.9, 0.1, 0.0, 0.8, 0.0, 0.2], [3, 3]),
            &device,
        );
        let q =
            sinkhorn_probs(t, 0.1, 20).into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_default();
        for r in 0..3 {
            let row: f32 = q[3 * r..3 * r + 3].iter().sum();
            assert!((row - 1.0).abs() < 1e-4, "row {r} sums to {row}");
        }
        for c in 0..3 {
            let col: f32 = (0..3).map(|r| q[3 * r + c]).sum();
            assert!((col - 1.0).abs() < 1e-2, "column {c} takes {col} of 3 rows");
        }
        // Each row's largest share differs: the batch is spread over the dimensions.
        let argmax = |r: usize| (0..3).max_by(|&a, &b| q[3 * r + a].total_cmp(&q[3 * r + b])).unwrap_or(0);
        assert_ne!(argmax(0), argmax(1));
    }

    #[test]
    fn teacher_temperature_warms_up_linearly() {
        let c = ConsistencyConfig { tau_teacher: 0.07, tau_teacher_warmup_steps: 10, ..Default::default() };
        assert_eq!(c.tau_teacher_at(0), 0.04);
        assert!((c.tau_teacher_at(5) - 0.055).abs() < 1e-12);
        assert_eq!(c.tau_teacher_at(10), 0.07);
        assert_eq!(ConsistencyConfig::default().tau_teacher_at(0), 0.04);
    }
}
