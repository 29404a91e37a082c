//! Element-wise activations, softmax and argmax.

/// Negative slope of UNETR's LeakyReLU (MONAI's default).
pub const LEAKY_RELU_SLOPE: f32 = 0.01;

/// Exact GELU, `x * (1 + erf(x / sqrt 2)) / 2` (PyTorch's default, not the tanh approximation).
#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * core::f32::consts::FRAC_1_SQRT_2))
}

/// GELU over a slice.
pub fn gelu_in_place(x: &mut [f32]) {
    for v in x {
        *v = gelu(*v);
    }
}

/// LeakyReLU with slope [`LEAKY_RELU_SLOPE`].
#[inline]
pub fn leaky_relu(v: f32) -> f32 {
    if v < 0.0 { v * LEAKY_RELU_SLOPE } else { v }
}

/// [`leaky_relu`] over a slice.
pub fn leaky_relu_in_place(x: &mut [f32]) {
    for v in x {
        *v = leaky_relu(*v);
    }
}

/// Softmax over a slice, shifted by its maximum so large logits cannot overflow.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = libm::expf(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x {
        *v *= inv;
    }
}

/// Per voxel, the index of the largest of `classes` channel-first logits (the first on ties).
/// `logits` holds `classes * labels.len()` values; `classes` is at most 256.
pub fn argmax_channels(logits: &[f32], classes: usize, labels: &mut [u8]) {
    let n = labels.len();
    for (v, label) in labels.iter_mut().enumerate() {
        let mut best = 0;
        let mut best_value = logits[v];
        for c in 1..classes {
            let value = logits[c * n + v];
            if value > best_value {
                best = c;
                best_value = value;
            }
        }
        *label = best as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Maclaurin series in f64, independent of libm.
    fn erf64(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        2.0 / core::f64::consts::PI.sqrt() * sum
    }

    #[test]
    fn gelu_is_exact_not_tanh() {
        for i in -40..=40 {
            let x = i as f64 / 10.0;
            let expected = 0.5 * x * (1.0 + erf64(x / 2f64.sqrt()));
            assert!((gelu(x as f32) as f64 - expected).abs() < 1e-6, "x={x}");
        }
        // The tanh approximation differs by ~1e-4 here; exact GELU must not.
        let tanh_approx = 0.5
            * 1.5
            * (1.0 + libm::tanh((2.0 / core::f64::consts::PI).sqrt() * (1.5 + 0.044715 * 1.5f64.powi(3))));
        assert!((gelu(1.5) as f64 - tanh_approx).abs() > 1e-5);
    }

    #[test]
    fn softmax_matches_f64_and_survives_large_logits() {
        let mut x = [1000.0f32, 1001.0, 999.5, -3.0];
        let e: [f64; 4] = [0.0, 1.0, -0.5, -1003.0].map(|v: f64| v.exp());
        let s: f64 = e.iter().sum();
        softmax_in_place(&mut x);
        for (a, b) in x.iter().zip(e) {
            assert!((*a as f64 - b / s).abs() < 1e-6);
        }
    }

    #[test]
    fn leaky_relu_and_argmax() {
        let mut x = [-2.0f32, 0.0, 3.0];
        leaky_relu_in_place(&mut x);
        assert_eq!(x, [-0.02, 0.0, 3.0]);
        // Three classes, two voxels: voxel 0 -> class 2, voxel 1 -> tie between 0 and 1 -> 0.
        let logits = [0.1, 5.0, 0.2, 5.0, 0.3, -1.0];
        let mut labels = [9u8; 2];
        argmax_channels(&logits, 3, &mut labels);
        assert_eq!(labels, [2, 0]);
    }
}
