//! Patch embedding and the 3-D sin-cos position embedding.

use super::Dims3;
use crate::tensor::Tensor;

/// The sin-cos position embedding value of `token` (row-major over `grid`) at `feature`, exactly
/// as MONAI's `build_sincos_position_embedding` lays it out: features are six blocks of
/// `hidden / 6`, `[sin(w), cos(w), sin(h), cos(h), sin(d), cos(d)]` where `(h, w, d)` are the
/// token's coordinates along grid axes 0, 1, 2 and block frequency `i` is `10000^(-i / (hidden/6))`.
pub fn sincos_position_embedding(grid: Dims3, hidden: usize, token: usize, feature: usize) -> f32 {
    let pos_dim = hidden / 6;
    let coords = [token / (grid[1] * grid[2]), (token / grid[2]) % grid[1], token % grid[2]];
    let block = feature / pos_dim;
    let i = feature % pos_dim;
    let omega = 1.0 / libm::powf(10000.0, i as f32 / pos_dim as f32);
    // Blocks 0-1 use axis 1, blocks 2-3 axis 0, blocks 4-5 axis 2 (MONAI's order).
    let axis = [1, 1, 0, 0, 2, 2][block];
    let angle = coords[axis] as f32 * omega;
    if block.is_multiple_of(2) { libm::sinf(angle) } else { libm::cosf(angle) }
}

/// Adds the sin-cos embedding for `grid` to `tokens` (`(grid tokens, hidden)`).
pub fn add_sincos_position_embedding(tokens: &mut [f32], grid: Dims3, hidden: usize) {
    for (t, row) in tokens.chunks_exact_mut(hidden).enumerate() {
        for (f, v) in row.iter_mut().enumerate() {
            *v += sincos_position_embedding(grid, hidden, t, f);
        }
    }
}

/// Conv3d with kernel = stride = `patch` from `(in_ch, dims)` to tokens `(grid, hidden)`, where
/// `grid = dims / patch`; `patch_buf` holds `in_ch * patch^3` values of scratch.
pub fn patch_embed(
    input: &[f32],
    dims: Dims3,
    weight: &Tensor<'_>,
    bias: &Tensor<'_>,
    tokens: &mut [f32],
    patch_buf: &mut [f32],
) {
    let w = weight.shape();
    let (hidden, in_ch, p) = (w.dims()[0] as usize, w.dims()[1] as usize, w.dims()[2] as usize);
    let grid = dims.map(|d| d / p);
    let n = in_ch * p * p * p;
    for (t, out) in tokens.chunks_exact_mut(hidden).take(grid[0] * grid[1] * grid[2]).enumerate() {
        let patch = &mut patch_buf[..n];
        gather_patch(input, dims, in_ch, p, t, patch);
        for (e, o) in out.iter_mut().enumerate() {
            *o = weight.row(e).dot(patch) + bias.get(e);
        }
    }
}

/// Copies token `token`'s patch (row-major over the `dims / p` grid) from `input` (`(in_ch,
/// dims)`) into `out` (`in_ch * p^3` values) in the patch kernel's `(in_ch, z, y, x)` order: the
/// one gather the reference and the fast encoders share.
#[inline]
pub fn gather_patch<T: Copy>(input: &[T], dims: Dims3, in_ch: usize, p: usize, token: usize, out: &mut [T]) {
    let grid = dims.map(|d| d / p);
    let (gz, gy, gx) = (token / (grid[1] * grid[2]), token / grid[2] % grid[1], token % grid[2]);
    let vox = dims[0] * dims[1] * dims[2];
    let mut n = 0;
    for c in 0..in_ch {
        for z in 0..p {
            for y in 0..p {
                let src = c * vox + ((gz * p + z) * dims[1] + gy * p + y) * dims[2] + gx * p;
                out[n..n + p].copy_from_slice(&input[src..src + p]);
                n += p;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sincos_matches_monai_layout() {
        // grid (2, 3, 4), hidden 12 -> pos_dim 2, omega = [1, 1/100].
        let grid = [2, 3, 4];
        let (h, w, d) = (1, 2, 3);
        let token = (h * grid[1] + w) * grid[2] + d;
        let omega = [1.0f64, 0.01];
        let mut expected = Vec::new();
        for (coord, _) in [(2.0, "w"), (1.0, "h"), (3.0, "d")] {
            expected.extend(omega.iter().map(|o| (coord * o).sin()));
            expected.extend(omega.iter().map(|o| (coord * o).cos()));
        }
        for (f, e) in expected.iter().enumerate() {
            let got = sincos_position_embedding(grid, 12, token, f) as f64;
            assert!((got - e).abs() < 1e-6, "feature {f}: {got} vs {e}");
        }
    }
}
