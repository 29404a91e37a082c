//! Seeded random transforms: GL-MAE's global and local views, and fine-tuning's label-guided
//! crops and augmentations (MONAI's `RandCropByPosNegLabeld`, `RandFlipd`, `RandRotate90d`,
//! `RandScaleIntensityd`, `RandShiftIntensityd`). Every function takes the generator explicitly,
//! so a seed reproduces a run exactly.

use glmae_core::synthetic::SplitMix64;

use crate::preprocess::CropBox;
use crate::resample::{Sampling, resample_linear};
use crate::volume::{Labels, Volume};

/// A seeded generator with the few draws the transforms need.
pub struct Rng(SplitMix64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }

    /// A generator for item `index` of a stream `seed`, independent of the order items are drawn.
    pub fn for_item(seed: u64, index: u64) -> Self {
        let mut base = SplitMix64::new(seed ^ 0x5DEE_CE66_D1CE_4E5B);
        let mut s = base.next_u64();
        for _ in 0..2 {
            s = SplitMix64::new(s ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
        }
        Self::new(s)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }
}

/// A random-scale crop resized to a cube: GL-MAE's view (method.md).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ViewSpec {
    /// Output edge in voxels (160 global, 96 local).
    pub size: usize,
    /// Range of the crop's fraction of the volume extent, per axis (0.5-1 global, 0.25-0.5 local).
    pub scale: (f64, f64),
}

impl ViewSpec {
    /// Global view: s ~ U(0.5, 1), resized to 160^3.
    pub const GLOBAL: Self = Self { size: 160, scale: (0.5, 1.0) };
    /// Local view: s ~ U(0.25, 0.5), resized to 96^3.
    pub const LOCAL: Self = Self { size: 96, scale: (0.25, 0.5) };
}

/// Draws `s ~ U(scale)`, crops `s x extent` along every axis at a uniformly random place, and
/// resizes the crop trilinearly to `size^3`.
pub fn random_view(v: &Volume, spec: &ViewSpec, rng: &mut Rng) -> Volume {
    let s = rng.range(spec.scale.0, spec.scale.1);
    let size: [usize; 3] =
        std::array::from_fn(|a| ((v.shape[a] as f64 * s).round() as usize).clamp(1, v.shape[a]));
    let start: [usize; 3] = std::array::from_fn(|a| rng.below(v.shape[a] - size[a] + 1));
    let crop = CropBox { start, size }.apply(v);
    resample_linear(&crop, &Sampling::resize(size, [spec.size; 3]))
}

/// A `size` crop centred on a foreground voxel with probability `pos / (pos + neg)`, else on a
/// background voxel, shifted to lie inside the volume (which is padded by edge replication when
/// smaller than the crop). Returns the image and label crops.
pub fn pos_neg_crop(
    image: &Volume,
    labels: &Labels,
    size: [usize; 3],
    pos: f64,
    neg: f64,
    rng: &mut Rng,
) -> (Volume, Labels) {
    let want_fg = rng.chance(pos / (pos + neg));
    let count = labels.data.iter().filter(|&&l| (l > 0) == want_fg).count();
    let centre = if count == 0 {
        labels.shape.map(|n| n / 2)
    } else {
        let pick = rng.below(count);
        let flat = labels
            .data
            .iter()
            .enumerate()
            .filter(|&(_, &l)| (l > 0) == want_fg)
            .nth(pick)
            .map_or(0, |(i, _)| i);
        [
            flat / (labels.shape[1] * labels.shape[2]),
            (flat / labels.shape[2]) % labels.shape[1],
            flat % labels.shape[2],
        ]
    };
    let mut img_out = Vec::with_capacity(size.iter().product::<usize>() * image.channels);
    let mut lab_out = Vec::with_capacity(size.iter().product());
    let start: [isize; 3] = std::array::from_fn(|a| {
        let lo = centre[a] as isize - (size[a] / 2) as isize;
        lo.clamp(
            0.min(image.shape[a] as isize - size[a] as isize),
            (image.shape[a] as isize - size[a] as isize).max(0),
        )
    });
    let at = |a: usize, o: usize| (start[a] + o as isize).clamp(0, image.shape[a] as isize - 1) as usize;
    let n = image.voxels();
    for c in 0..image.channels {
        for i in 0..size[0] {
            for j in 0..size[1] {
                for k in 0..size[2] {
                    let src = image.index(at(0, i), at(1, j), at(2, k));
                    img_out.push(image.data[c * n + src]);
                    if c == 0 {
                        lab_out.push(labels.data[src]);
                    }
                }
            }
        }
    }
    let mut shift = crate::volume::Affine::from_spacing([1.0; 3]);
    for (row, &s) in shift.0.iter_mut().zip(&start) {
        row[3] = s as f64;
    }
    let affine = image.affine.compose(&shift);
    (
        Volume { data: img_out, shape: size, channels: image.channels, affine },
        Volume { data: lab_out, shape: size, channels: 1, affine },
    )
}

/// Reverses `axis` of every channel.
pub fn flip<T: Copy>(v: &mut Volume<T>, axis: usize) {
    let [n0, n1, n2] = v.shape;
    let n = v.voxels();
    for c in 0..v.channels {
        let ch = &mut v.data[c * n..(c + 1) * n];
        match axis {
            0 => {
                for i in 0..n0 / 2 {
                    for r in 0..n1 * n2 {
                        ch.swap(i * n1 * n2 + r, (n0 - 1 - i) * n1 * n2 + r);
                    }
                }
            }
            1 => {
                for i in 0..n0 {
                    for j in 0..n1 / 2 {
                        for k in 0..n2 {
                            ch.swap((i * n1 + j) * n2 + k, (i * n1 + n1 - 1 - j) * n2 + k);
                        }
                    }
                }
            }
            _ => ch.chunks_exact_mut(n2).for_each(<[T]>::reverse),
        }
    }
}

/// Rotates by 90 degrees `k` times in the plane of axes 0 and 1 (MONAI's default spatial axes),
/// from axis 0 toward axis 1, as `numpy.rot90(x, k, axes=(0, 1))`.
pub fn rot90<T: Copy + Default>(v: &mut Volume<T>, k: usize) {
    for _ in 0..k % 4 {
        let [n0, n1, n2] = v.shape;
        let n = v.voxels();
        let mut out = vec![T::default(); v.data.len()];
        for c in 0..v.channels {
            for i in 0..n0 {
                for j in 0..n1 {
                    // numpy.rot90 (k=1, axes (0, 1)): out[n1 - 1 - j, i] = in[i, j].
                    let src = c * n + (i * n1 + j) * n2;
                    let dst = c * n + ((n1 - 1 - j) * n0 + i) * n2;
                    out[dst..dst + n2].copy_from_slice(&v.data[src..src + n2]);
                }
            }
        }
        v.data = out;
        v.shape = [n1, n0, n2];
    }
}

/// Fine-tuning augmentation (method.md): flips with probability `flip_p` per axis, rot90 with
/// probability `rot_p`, intensity scale `x * (1 + U(-s, s))` and shift `x + U(-o, o)` each with
/// probability `intensity_p`. The same spatial transform is applied to image and labels.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Per-axis flip probability.
    pub flip_p: f64,
    /// Rot90 probability (k uniform in 1..=3).
    pub rot_p: f64,
    /// Intensity scale factor range.
    pub scale: f64,
    /// Intensity shift range.
    pub shift: f64,
    /// Probability of each intensity transform.
    pub intensity_p: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Self { flip_p: 0.2, rot_p: 0.2, scale: 0.1, shift: 0.1, intensity_p: 0.5 }
    }
}

impl Augment {
    /// The same augmentation without flips and rot90, which swap left and right (so that spleen
    /// and liver, or the two kidneys, stay apart); intensity transforms kept.
    pub fn without_flips(self) -> Self {
        Self { flip_p: 0.0, rot_p: 0.0, ..self }
    }

    /// Augments an image and its labels in place.
    pub fn apply(&self, image: &mut Volume, labels: &mut Labels, rng: &mut Rng) {
        for axis in 0..3 {
            if rng.chance(self.flip_p) {
                flip(image, axis);
                flip(labels, axis);
            }
        }
        if rng.chance(self.rot_p) {
            let k = 1 + rng.below(3);
            rot90(image, k);
            rot90(labels, k);
        }
        if rng.chance(self.intensity_p) {
            let f = 1.0 + rng.range(-self.scale, self.scale) as f32;
            image.data.iter_mut().for_each(|x| *x *= f);
        }
        if rng.chance(self.intensity_p) {
            let o = rng.range(-self.shift, self.shift) as f32;
            image.data.iter_mut().for_each(|x| *x += o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Affine;

    fn vol(shape: [usize; 3]) -> Volume {
        Volume::new(
            (0..shape.iter().product::<usize>()).map(|i| i as f32).collect(),
            shape,
            Affine::from_spacing([1.0; 3]),
        )
    }

    #[test]
    fn views_have_the_paper_sizes_and_are_reproducible() {
        let v = vol([40, 30, 20]);
        let g = random_view(&v, &ViewSpec { size: 16, ..ViewSpec::GLOBAL }, &mut Rng::new(3));
        assert_eq!(g.shape, [16; 3]);
        let again = random_view(&v, &ViewSpec { size: 16, ..ViewSpec::GLOBAL }, &mut Rng::new(3));
        assert_eq!(g, again);
        let other = random_view(&v, &ViewSpec { size: 16, ..ViewSpec::GLOBAL }, &mut Rng::new(4));
        assert_ne!(g, other);
        // A local view covers at most half of each axis: its world extent is at most half the volume's.
        let l = random_view(&v, &ViewSpec { size: 12, ..ViewSpec::LOCAL }, &mut Rng::new(5));
        let span = |x: &Volume| (0..3).map(|a| x.affine.0[a][a] * x.shape[a] as f64).collect::<Vec<_>>();
        for (s, full) in span(&l).iter().zip(span(&v)) {
            assert!(*s <= 0.5 * full + 1e-9 && *s >= 0.25 * full - 1.0, "{s} of {full}");
        }
    }

    #[test]
    fn rot90_matches_numpy_and_flip_is_an_involution() {
        // numpy.rot90(np.arange(6).reshape(2, 3, 1), 1, axes=(0, 1))[..., 0] = [[2, 5], [1, 4], [0, 3]]
        let mut v = vol([2, 3, 1]);
        rot90(&mut v, 1);
        assert_eq!(v.shape, [3, 2, 1]);
        assert_eq!(v.data, [2.0, 5.0, 1.0, 4.0, 0.0, 3.0]);
        let mut w = vol([3, 4, 5]);
        rot90(&mut w, 4);
        assert_eq!(w, vol([3, 4, 5]));
        for axis in 0..3 {
            let mut f = vol([3, 4, 5]);
            flip(&mut f, axis);
            assert_ne!(f, vol([3, 4, 5]));
            flip(&mut f, axis);
            assert_eq!(f, vol([3, 4, 5]));
        }
    }

    #[test]
    fn pos_neg_crops_centre_on_the_requested_class() {
        let shape = [30, 30, 30];
        let img = vol(shape);
        let mut lab = Volume::new(vec![0u8; 27000], shape, img.affine);
        for i in 20..24 {
            for j in 3..6 {
                let x = lab.index(i, j, 25);
                lab.data[x] = 3;
            }
        }
        let mut rng = Rng::new(9);
        for _ in 0..20 {
            let (ci, cl) = pos_neg_crop(&img, &lab, [8, 8, 8], 1.0, 0.0, &mut rng);
            assert_eq!(ci.shape, [8, 8, 8]);
            assert!(cl.data.contains(&3), "positive crop missed the foreground");
            // Image and labels stay aligned: voxel values index the source volume.
            let src = ci.data[ci.index(4, 4, 4)] as usize;
            assert_eq!(cl.data[cl.index(4, 4, 4)], lab.data[src]);
        }
        let (_, cl) = pos_neg_crop(&img, &lab, [40, 8, 8], 0.0, 1.0, &mut rng);
        assert_eq!(cl.shape, [40, 8, 8], "crops larger than the volume are padded");
    }
}
