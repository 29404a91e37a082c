//! Multi-head self-attention over a fused qkv projection.

/// Scaled dot-product attention for every head. `qkv` is `(tokens, 3 * hidden)` with features
/// ordered (q|k|v, head, head_dim) as MONAI's `SABlock` lays them out; `out` receives
/// `(tokens, hidden)` with heads concatenated; `scores` holds `tokens` values of scratch.
pub fn self_attention(
    qkv: &[f32],
    tokens: usize,
    hidden: usize,
    heads: usize,
    out: &mut [f32],
    scores: &mut [f32],
) {
    let dh = hidden / heads;
    let scale = 1.0 / libm::sqrtf(dh as f32);
    let row = 3 * hidden;
    for h in 0..heads {
        for i in 0..tokens {
            let q = &qkv[i * row + h * dh..][..dh];
            for (j, s) in scores[..tokens].iter_mut().enumerate() {
                let k = &qkv[j * row + hidden + h * dh..][..dh];
                let mut dot = 0.0;
                for (a, b) in q.iter().zip(k) {
                    dot += a * b;
                }
                *s = dot * scale;
            }
            super::softmax_in_place(&mut scores[..tokens]);
            let o = &mut out[i * hidden + h * dh..][..dh];
            o.fill(0.0);
            for (j, &p) in scores[..tokens].iter().enumerate() {
                let v = &qkv[j * row + 2 * hidden + h * dh..][..dh];
                for (a, b) in o.iter_mut().zip(v) {
                    *a += p * b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::lcg_vec;

    #[test]
    fn matches_f64_attention() {
        let (t, e, heads) = (5, 6, 2);
        let dh = e / heads;
        let qkv = lcg_vec(t * 3 * e, 11, 1.5);
        let mut out = vec![0.0f32; t * e];
        let mut scores = vec![0.0f32; t];
        self_attention(&qkv, t, e, heads, &mut out, &mut scores);
        for h in 0..heads {
            for i in 0..t {
                let at = |tok: usize, part: usize, d: usize| qkv[tok * 3 * e + part * e + h * dh + d] as f64;
                let logits: Vec<f64> = (0..t)
                    .map(|j| (0..dh).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>() / (dh as f64).sqrt())
                    .collect();
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let ex: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = ex.iter().sum();
                for d in 0..dh {
                    let expected: f64 = (0..t).map(|j| ex[j] / z * at(j, 2, d)).sum();
                    assert!((out[i * e + h * dh + d] as f64 - expected).abs() < 1e-5);
                }
            }
        }
    }
}
