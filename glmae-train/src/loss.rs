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
    /// Teacher temperature (0.04).
    pub tau_teacher: f64,
    /// Momentum of the running centre of teacher outputs (0.9).
    pub center_momentum: f64,
}

impl Default for ConsistencyConfig {
    fn default() -> Self {
        Self { tau_student: 0.1, tau_teacher: 0.04, center_momentum: 0.9 }
    }
}

/// Cross-entropy `H(P_t(unmasked global i), P_s(masked view j))` averaged over every pair of a
/// volume's teacher global views and student views (global and local), then over volumes.
///
/// `teacher` is `(volumes * n_global, out)` (already detached), `center` is `(out)`, `student` is
/// `(volumes * n_student, out)` with each volume's views contiguous.
pub fn consistency(
    teacher: Tensor<2>,
    center: Tensor<1>,
    student: Tensor<2>,
    volumes: usize,
    cfg: &ConsistencyConfig,
) -> Tensor<1> {
    let [tv, d] = teacher.dims();
    let [sv, _] = student.dims();
    let (ng, ns) = (tv / volumes, sv / volumes);
    let centered = teacher.sub(center.unsqueeze_dim::<2>(0)).div_scalar(cfg.tau_teacher);
    let p_t = softmax(centered, 1).reshape([volumes, ng, d]);
    let log_p_s = log_softmax(student.div_scalar(cfg.tau_student), 1).reshape([volumes, ns, d]);
    // (volumes, ng, ns): sum over the distribution of P_t * log P_s, for every pair.
    let cross = p_t.matmul(log_p_s.swap_dims(1, 2));
    cross.mean().neg()
}

/// The teacher centre after one step: `m * center + (1 - m) * batch_mean`, where `batch_mean` is
/// the mean of the step's teacher outputs (over every replica under data parallelism).
pub fn update_center(center: Tensor<1>, batch_mean: Tensor<1>, momentum: f64) -> Tensor<1> {
    center.mul_scalar(momentum).add(batch_mean.mul_scalar(1.0 - momentum))
}
