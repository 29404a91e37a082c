//! Turning volumes into what one GL-MAE step consumes: random global and local views, cut into
//! patch tokens, each with its own random mask. All on the CPU, seeded per sample.

use glmae_core::kernels::sincos_position_embedding;
use glmae_data::Volume;
use glmae_data::transforms::{Rng, ViewSpec, random_view};
use serde::{Deserialize, Serialize};

/// How views are drawn and masked (method.md defaults).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViewConfig {
    /// Global views per volume.
    pub n_global: usize,
    /// Local views per volume.
    pub n_local: usize,
    /// Global view: edge and crop-scale range.
    pub global: ViewSpec,
    /// Local view: edge and crop-scale range.
    pub local: ViewSpec,
    /// Fraction of each view's tokens hidden from the student.
    pub mask_ratio: f64,
}

impl Default for ViewConfig {
    fn default() -> Self {
        Self { n_global: 2, n_local: 4, global: ViewSpec::GLOBAL, local: ViewSpec::LOCAL, mask_ratio: 0.75 }
    }
}

/// Several views of one size, as patch tokens with masks.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewBatch {
    /// Number of views.
    pub views: usize,
    /// Token grid of each view.
    pub grid: [usize; 3],
    /// Values per token (`channels * patch^3`).
    pub patch_values: usize,
    /// `(views, tokens, patch_values)`, tokens in grid order, values in Conv3d kernel order.
    pub tokens: Vec<f32>,
    /// `(views, kept)`: the visible tokens' indices.
    pub keep: Vec<i64>,
    /// `(views, tokens)`: where each grid token sits in `[visible, masked]` order.
    pub restore: Vec<i64>,
    /// `(views, tokens)`: 1 for masked tokens, 0 for visible ones.
    pub mask: Vec<f32>,
}

impl ViewBatch {
    /// Tokens per view.
    pub fn tokens_per_view(&self) -> usize {
        self.grid.iter().product()
    }

    /// Visible tokens per view.
    pub fn kept(&self) -> usize {
        self.keep.len() / self.views.max(1)
    }
}

/// Number of visible tokens out of `n` at `mask_ratio` (MAE: `int(n * (1 - ratio))`, at least 1).
pub fn visible_count(n: usize, mask_ratio: f64) -> usize {
    ((n as f64 * (1.0 - mask_ratio)) as usize).clamp(1, n)
}

/// Cuts a single-channel cube `v` into `patch^3` tokens: token `(gz, gy, gx)` in row-major grid
/// order holds voxels `(z, y, x)` of its patch in row-major order.
pub fn patchify(v: &Volume, patch: usize) -> ([usize; 3], Vec<f32>) {
    let grid = v.shape.map(|s| s / patch);
    let mut out = Vec::with_capacity(grid.iter().product::<usize>() * patch * patch * patch * v.channels);
    let n = v.voxels();
    for gz in 0..grid[0] {
        for gy in 0..grid[1] {
            for gx in 0..grid[2] {
                for c in 0..v.channels {
                    for z in 0..patch {
                        for y in 0..patch {
                            let start = c * n + v.index(gz * patch + z, gy * patch + y, gx * patch);
                            out.extend_from_slice(&v.data[start..start + patch]);
                        }
                    }
                }
            }
        }
    }
    (grid, out)
}

/// Draws `count` views of `spec` from `v`, patchifies them and masks each at random.
pub fn make_views(
    v: &Volume,
    spec: &ViewSpec,
    count: usize,
    patch: usize,
    mask_ratio: f64,
    rng: &mut Rng,
) -> ViewBatch {
    let mut batch = ViewBatch {
        views: count,
        grid: [spec.size / patch; 3],
        patch_values: v.channels * patch * patch * patch,
        tokens: Vec::new(),
        keep: Vec::new(),
        restore: Vec::new(),
        mask: Vec::new(),
    };
    for _ in 0..count {
        let view = random_view(v, spec, rng);
        let (grid, tokens) = patchify(&view, patch);
        batch.grid = grid;
        batch.tokens.extend_from_slice(&tokens);
        let n = grid.iter().product::<usize>();
        let kept = visible_count(n, mask_ratio);
        // Fisher-Yates shuffle: the first `kept` stay visible.
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut restore = vec![0i64; n];
        for (rank, &t) in order.iter().enumerate() {
            restore[t] = rank as i64;
        }
        batch.keep.extend(order[..kept].iter().map(|&t| t as i64));
        batch.mask.extend(restore.iter().map(|&r| if (r as usize) < kept { 0.0 } else { 1.0 }));
        batch.restore.extend(restore);
    }
    batch
}

/// Concatenates batches of the same view size.
pub fn concat(parts: Vec<ViewBatch>) -> Option<ViewBatch> {
    let mut it = parts.into_iter();
    let mut out = it.next()?;
    for p in it {
        out.views += p.views;
        out.tokens.extend(p.tokens);
        out.keep.extend(p.keep);
        out.restore.extend(p.restore);
        out.mask.extend(p.mask);
    }
    Some(out)
}

/// The 3-D sin-cos position embedding `(tokens, dim)` for `grid`, as glmae-core computes it;
/// for a width that is not a multiple of 6 (the ViT-T decoder's 128) the last `dim % 6` features
/// are zero.
pub fn sincos_table(grid: [usize; 3], dim: usize) -> Vec<f32> {
    let used = dim / 6 * 6;
    let n = grid.iter().product::<usize>();
    let mut out = vec![0.0; n * dim];
    for t in 0..n {
        for f in 0..used {
            out[t * dim + f] = sincos_position_embedding(grid, used, t, f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use glmae_data::Affine;

    #[test]
    fn masks_keep_exactly_a_quarter_and_restore_inverts_the_shuffle() {
        let v = Volume::new(
            (0..32 * 32 * 32).map(|i| i as f32).collect(),
            [32; 3],
            Affine::from_spacing([1.0; 3]),
        );
        let spec = ViewSpec { size: 16, scale: (0.5, 1.0) };
        let b = make_views(&v, &spec, 3, 4, 0.75, &mut Rng::new(1));
        let n = b.tokens_per_view();
        assert_eq!((n, b.kept(), b.patch_values), (64, 16, 64));
        for view in 0..3 {
            let mask = &b.mask[view * n..(view + 1) * n];
            assert_eq!(mask.iter().filter(|&&m| m == 0.0).count(), 16);
            let keep = &b.keep[view * 16..(view + 1) * 16];
            let restore = &b.restore[view * n..(view + 1) * n];
            for (rank, &t) in keep.iter().enumerate() {
                assert_eq!(mask[t as usize], 0.0, "a kept token is masked");
                assert_eq!(restore[t as usize], rank as i64, "restore does not invert the shuffle");
            }
        }
        assert_ne!(b.keep[..16], b.keep[16..32], "views share a mask");
    }

    #[test]
    fn patchify_uses_conv_kernel_order() {
        let v =
            Volume::new((0..8 * 8 * 8).map(|i| i as f32).collect(), [8; 3], Affine::from_spacing([1.0; 3]));
        let (grid, t) = patchify(&v, 4);
        assert_eq!(grid, [2, 2, 2]);
        // Token 1 is grid (0, 0, 1): its first row starts at voxel (0, 0, 4).
        assert_eq!(&t[64..68], &[4.0, 5.0, 6.0, 7.0]);
        // Its second row is voxel (0, 1, 4..8).
        assert_eq!(&t[68..72], &[12.0, 13.0, 14.0, 15.0]);
    }

    #[test]
    fn sincos_table_agrees_with_the_core_and_pads_odd_widths() {
        let t = sincos_table([2, 3, 4], 12);
        assert_eq!(t[5 * 12 + 7], sincos_position_embedding([2, 3, 4], 12, 5, 7));
        let odd = sincos_table([2, 3, 4], 14);
        assert_eq!(odd[5 * 14 + 11], sincos_position_embedding([2, 3, 4], 12, 5, 11));
        assert_eq!(odd[5 * 14 + 13], 0.0);
    }
}
