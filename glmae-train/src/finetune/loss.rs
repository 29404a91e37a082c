//! The fine-tuning loss: MONAI's DiceCE on one-hot targets.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};

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

/// One-hot `(b, classes, d, h, w)` host values for label crops.
pub(crate) fn one_hot(labels: &[u8], crops: usize, classes: usize) -> Vec<f32> {
    let v = labels.len() / crops.max(1);
    let mut out = vec![0.0; crops * classes * v];
    for (i, &l) in labels.iter().enumerate() {
        let (c, x) = (i / v, i % v);
        out[(c * classes + (l as usize).min(classes - 1)) * v + x] = 1.0;
    }
    out
}
