//! LayerNorm over token features and InstanceNorm over volume channels.

use crate::tensor::Tensor;

/// InstanceNorm3d's epsilon (PyTorch's default, which MONAI keeps).
pub const INSTANCE_NORM_EPS: f32 = 1e-5;

/// Sum of `f(i)` for `i` in `0..n`, in blocks of 256 so that long f32 sums keep their precision
/// without f64 (slow on Cortex-M).
fn blocked_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut total = 0.0f32;
    let mut start = 0;
    while start < n {
        let mut s = 0.0f32;
        for i in start..(start + 256).min(n) {
            s += f(i);
        }
        total += s;
        start += 256;
    }
    total
}

/// Mean and biased variance of the `n` values `x(i)`, two-pass.
pub fn moments_by(n: usize, x: impl Fn(usize) -> f32) -> (f32, f32) {
    let count = n as f32;
    let mean = blocked_sum(n, &x) / count;
    let var = blocked_sum(n, |i| (x(i) - mean) * (x(i) - mean)) / count;
    (mean, var)
}

/// Mean and biased variance, two-pass.
fn moments(x: &[f32]) -> (f32, f32) {
    moments_by(x.len(), |i| x[i])
}

/// LayerNorm of each of `tokens` rows of width `weight.len()` into `out`.
pub fn layer_norm(
    x: &[f32],
    tokens: usize,
    weight: &Tensor<'_>,
    bias: &Tensor<'_>,
    eps: f32,
    out: &mut [f32],
) {
    let dim = weight.len();
    for t in 0..tokens {
        let xt = &x[t * dim..(t + 1) * dim];
        let (mean, var) = moments(xt);
        let inv = 1.0 / libm::sqrtf(var + eps);
        for (i, (o, &v)) in out[t * dim..(t + 1) * dim].iter_mut().zip(xt).enumerate() {
            *o = (v - mean) * inv * weight.get(i) + bias.get(i);
        }
    }
}

/// InstanceNorm without affine parameters: each channel of `x` (`channels` blocks of equal
/// length) is shifted to mean 0 and scaled to variance 1.
pub fn instance_norm_in_place(x: &mut [f32], channels: usize, eps: f32) {
    let n = x.len() / channels;
    for c in x.chunks_exact_mut(n) {
        let (mean, var) = moments(c);
        let inv = 1.0 / libm::sqrtf(var + eps);
        for v in c {
            *v = (*v - mean) * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{f32_tensor_bytes, lcg_values, tensor};

    fn reference_norm(x: &[f32], eps: f64) -> [f64; 64] {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let mut out = [0.0; 64];
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v as f64 - mean) / (var + eps).sqrt();
        }
        out
    }

    #[test]
    fn layer_norm_matches_f64() {
        let x = lcg_values::<48>(3, 5.0, 2.0);
        let wb = f32_tensor_bytes(&lcg_values::<24>(4, 1.0, 1.0));
        let bb = f32_tensor_bytes(&lcg_values::<24>(5, 0.5, 0.0));
        let (w, b) = (tensor(&wb, &[24]), tensor(&bb, &[24]));
        let mut out = [0.0f32; 48];
        layer_norm(&x, 2, &w, &b, 1e-6, &mut out);
        for t in 0..2 {
            let r = reference_norm(&x[t * 24..(t + 1) * 24], 1e-6);
            for i in 0..24 {
                let expected = r[i] * w.get(i) as f64 + b.get(i) as f64;
                assert!((out[t * 24 + i] as f64 - expected).abs() < 1e-5, "t={t} i={i}");
            }
        }
    }

    #[test]
    fn instance_norm_matches_f64_per_channel() {
        let mut x = lcg_values::<64>(9, 100.0, 40.0);
        let r0 = reference_norm(&x[..32], 1e-5);
        let r1 = reference_norm(&x[32..], 1e-5);
        instance_norm_in_place(&mut x, 2, 1e-5);
        for i in 0..32 {
            assert!((x[i] as f64 - r0[i]).abs() < 1e-5);
            assert!((x[32 + i] as f64 - r1[i]).abs() < 1e-5);
        }
    }
}
