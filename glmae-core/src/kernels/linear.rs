//! Fully connected layer over a token sequence.

use crate::tensor::Tensor;

/// `out[t][o] = bias[o] + sum_i weight[o][i] * x[t][i]` for `tokens` rows; `weight` is
/// `(out_dim, in_dim)` as PyTorch stores it.
pub fn linear(x: &[f32], tokens: usize, weight: &Tensor<'_>, bias: Option<&Tensor<'_>>, out: &mut [f32]) {
    let out_dim = weight.shape().dims()[0] as usize;
    let in_dim = weight.shape().dims()[1] as usize;
    for t in 0..tokens {
        let xt = &x[t * in_dim..(t + 1) * in_dim];
        let ot = &mut out[t * out_dim..(t + 1) * out_dim];
        for (o, y) in ot.iter_mut().enumerate() {
            *y = weight.row(o).dot(xt) + bias.map_or(0.0, |b| b.get(o));
        }
    }
}
