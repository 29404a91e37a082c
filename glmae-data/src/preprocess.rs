//! The deterministic preprocessing stored with every model, and its inverse for predictions.
//!
//! Order, as MONAI's UNETR recipe: reorient (axis permutation and flips, exact), resample to the
//! target spacing (trilinear for images, nearest for labels; the voxel-0 centre stays put, as
//! MONAI's `Spacingd`), map intensities, crop to the foreground. [`Inverse`] takes a prediction on
//! the model grid back to the source grid.

use anyhow::{Result, anyhow, ensure};
use glmae_core::{IntensityScaling, Preprocessing};

use crate::resample::{Sampling, resample_labels, resample_linear};
use crate::volume::{Affine, Labels, Volume};

/// Preprocessing parameters (a model file's [`Preprocessing`], owned).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocessor {
    /// Target axis codes, e.g. `"RAS"`.
    pub orientation: String,
    /// Target spacing in mm per axis.
    pub spacing: [f32; 3],
    /// Intensity mapping.
    pub intensity: IntensityScaling,
    /// Crop to voxels above the window's lower bound.
    pub foreground_crop: bool,
}

impl Preprocessor {
    /// The preprocessing a model file records.
    pub fn from_model(p: &Preprocessing<'_>) -> Self {
        Self {
            orientation: p.orientation.to_string(),
            spacing: p.target_spacing,
            intensity: p.intensity,
            foreground_crop: p.foreground_crop,
        }
    }

    /// UNETR's BTCV recipe: RAS, 1.5 x 1.5 x 2.0 mm, HU [-175, 250] -> [0, 1], foreground crop.
    pub fn btcv() -> Self {
        Self {
            orientation: "RAS".into(),
            spacing: [1.5, 1.5, 2.0],
            intensity: IntensityScaling::ABDOMEN_CT,
            foreground_crop: true,
        }
    }

    /// GL-MAE pretraining (method.md): HU [-1000, 1000] -> [0, 1], same orientation and spacing,
    /// no crop.
    pub fn pretraining() -> Self {
        Self {
            intensity: IntensityScaling { a_min: -1000.0, a_max: 1000.0, b_min: 0.0, b_max: 1.0, clip: true },
            foreground_crop: false,
            ..Self::btcv()
        }
    }

    /// Preprocesses an image; the [`Inverse`] maps model-grid predictions back.
    pub fn apply(&self, image: &Volume) -> Result<(Volume, Inverse)> {
        let (img, _, inv) = self.run(image, None)?;
        Ok((img, inv))
    }

    /// Preprocesses an image and its label map on the same grid.
    pub fn apply_with_labels(&self, image: &Volume, labels: &Labels) -> Result<(Volume, Labels)> {
        ensure!(
            labels.shape == image.shape,
            "label grid {:?} differs from image grid {:?}",
            labels.shape,
            image.shape
        );
        let (img, lab, _) = self.run(image, Some(labels))?;
        Ok((img, lab.ok_or_else(|| anyhow!("labels were dropped during preprocessing"))?))
    }

    fn run(&self, image: &Volume, labels: Option<&Labels>) -> Result<(Volume, Option<Labels>, Inverse)> {
        ensure!(image.data.iter().all(|v| v.is_finite()), "image holds NaN or infinite values");
        let map = AxisMap::to_codes(&image.affine, &self.orientation)?;
        let img = map.apply(image);
        let lab = labels.map(|l| map.apply(l));
        let oriented_shape = img.shape;

        let old = img.affine.spacing();
        let target = self.spacing.map(f64::from);
        let shape = respaced_shape(img.shape, old, target);
        let step: [f64; 3] = std::array::from_fn(|a| target[a] / old[a]);
        let sampling = Sampling::respace(shape, step);
        let mut img = resample_linear(&img, &sampling);
        let lab = lab.map(|l| resample_labels(&l, &sampling));
        let resampled_shape = img.shape;

        for v in &mut img.data {
            *v = self.intensity.apply(*v);
        }
        let crop = if self.foreground_crop {
            // MONAI's `CropForegroundd` default `select_fn` is `x > 0` whatever the intensity
            // window; with no foreground at all MONAI crops to nothing, we keep the volume.
            foreground_box(&img, 0.0).unwrap_or(CropBox::whole(img.shape))
        } else {
            CropBox::whole(img.shape)
        };
        let img = crop.apply(&img);
        let lab = lab.map(|l| crop.apply(&l));
        Ok((img, lab, Inverse { map, oriented_shape, resampled_shape, step, crop }))
    }
}

/// The grid MONAI's `Spacingd` resamples `shape` voxels of spacing `old` onto at spacing `new`
/// (`compute_shape_offset` with `scale_extent=False`): the distance from the first to the last
/// voxel centre in new voxels, plus one, rounded half to even as numpy does. (Rounding
/// `shape * old / new` instead gave one voxel fewer or more on some axes.)
pub fn respaced_shape(shape: [usize; 3], old: [f64; 3], new: [f64; 3]) -> [usize; 3] {
    std::array::from_fn(|a| {
        let span = shape[a].saturating_sub(1) as f64 * old[a] / new[a];
        ((span + 1.0).round_ties_even() as usize).max(1)
    })
}

/// An axis permutation with flips: output axis `a` reads input axis `from[a]`, reversed when
/// `flip[a]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisMap {
    from: [usize; 3],
    flip: [bool; 3],
}

impl AxisMap {
    /// The map that reorients a grid with `affine` to the axis codes `target` (e.g. `"RAS"`).
    pub fn to_codes(affine: &Affine, target: &str) -> Result<Self> {
        ensure!(glmae_core::preprocessing::valid_orientation(target), "invalid orientation {target:?}");
        let world_of = |c: u8| match c {
            b'R' => (0, 1.0),
            b'L' => (0, -1.0),
            b'A' => (1, 1.0),
            b'P' => (1, -1.0),
            b'S' => (2, 1.0),
            _ => (2, -1.0),
        };
        let current = affine.orientation();
        let mut from = [0; 3];
        let mut flip = [false; 3];
        for (a, &code) in target.as_bytes().iter().enumerate() {
            let (world, sign) = world_of(code);
            let src = current.iter().position(|&(w, _)| w == world).unwrap_or(a);
            from[a] = src;
            flip[a] = current[src].1 * sign < 0.0;
        }
        Ok(Self { from, flip })
    }

    /// Shape after the map.
    pub fn shape(&self, shape: [usize; 3]) -> [usize; 3] {
        self.from.map(|f| shape[f])
    }

    /// Reorients a volume; the affine changes so that every voxel keeps its world position.
    pub fn apply<T: Copy>(&self, v: &Volume<T>) -> Volume<T> {
        let out_shape = self.shape(v.shape);
        let mut data = Vec::with_capacity(v.data.len());
        let n = v.voxels();
        for c in 0..v.channels {
            let src = &v.data[c * n..(c + 1) * n];
            let mut idx = [0usize; 3];
            for o0 in 0..out_shape[0] {
                for o1 in 0..out_shape[1] {
                    for o2 in 0..out_shape[2] {
                        for (a, o) in [o0, o1, o2].into_iter().enumerate() {
                            idx[self.from[a]] = if self.flip[a] { out_shape[a] - 1 - o } else { o };
                        }
                        data.push(src[(idx[0] * v.shape[1] + idx[1]) * v.shape[2] + idx[2]]);
                    }
                }
            }
        }
        // New index o maps to old index: old[from[a]] = flip ? n-1-o : o.
        let mut t = [[0.0; 4]; 4];
        for a in 0..3 {
            let f = self.from[a];
            if self.flip[a] {
                t[f][a] = -1.0;
                t[f][3] = (out_shape[a] - 1) as f64;
            } else {
                t[f][a] = 1.0;
            }
        }
        t[3][3] = 1.0;
        Volume { data, shape: out_shape, channels: v.channels, affine: v.affine.compose(&Affine(t)) }
    }

    /// The inverse map.
    pub fn inverse(&self) -> Self {
        let mut from = [0; 3];
        let mut flip = [false; 3];
        for a in 0..3 {
            from[self.from[a]] = a;
            flip[self.from[a]] = self.flip[a];
        }
        Self { from, flip }
    }
}

/// A box `[start, start + size)` per axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    /// First voxel.
    pub start: [usize; 3],
    /// Extent.
    pub size: [usize; 3],
}

impl CropBox {
    /// The whole grid.
    pub fn whole(shape: [usize; 3]) -> Self {
        Self { start: [0; 3], size: shape }
    }

    /// Copies the box out of `v`; the affine moves with the origin.
    pub fn apply<T: Copy>(&self, v: &Volume<T>) -> Volume<T> {
        let mut data = Vec::with_capacity(self.size.iter().product::<usize>() * v.channels);
        let n = v.voxels();
        for c in 0..v.channels {
            for i in self.start[0]..self.start[0] + self.size[0] {
                for j in self.start[1]..self.start[1] + self.size[1] {
                    let row = c * n + v.index(i, j, self.start[2]);
                    data.extend_from_slice(&v.data[row..row + self.size[2]]);
                }
            }
        }
        let mut shift = Affine::from_spacing([1.0; 3]);
        for a in 0..3 {
            shift.0[a][3] = self.start[a] as f64;
        }
        Volume { data, shape: self.size, channels: v.channels, affine: v.affine.compose(&shift) }
    }
}

/// The bounding box of voxels above `threshold` in channel 0 (MONAI's `CropForegroundd` with
/// `select_fn = x > threshold`); `None` when there are none.
pub fn foreground_box(v: &Volume, threshold: f32) -> Option<CropBox> {
    let mut lo = v.shape;
    let mut hi = [0usize; 3];
    for i in 0..v.shape[0] {
        for j in 0..v.shape[1] {
            let row = &v.data[v.index(i, j, 0)..v.index(i, j, 0) + v.shape[2]];
            let first = row.iter().position(|&x| x > threshold);
            let last = row.iter().rposition(|&x| x > threshold);
            if let (Some(f), Some(l)) = (first, last) {
                for (a, p) in [i, j].into_iter().enumerate() {
                    lo[a] = lo[a].min(p);
                    hi[a] = hi[a].max(p + 1);
                }
                lo[2] = lo[2].min(f);
                hi[2] = hi[2].max(l + 1);
            }
        }
    }
    (hi[0] > 0).then(|| CropBox { start: lo, size: std::array::from_fn(|a| hi[a] - lo[a]) })
}

/// How to take a prediction on the model grid back to the source image's grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Inverse {
    map: AxisMap,
    oriented_shape: [usize; 3],
    resampled_shape: [usize; 3],
    step: [f64; 3],
    crop: CropBox,
}

impl Inverse {
    /// The model-grid shape predictions must have.
    pub fn model_shape(&self) -> [usize; 3] {
        self.crop.size
    }

    /// Labels on the model grid to the source grid: un-crop (background outside), nearest
    /// resampling to the reoriented source shape, then the inverse axis map.
    pub fn labels_to_source(&self, labels: &[u8]) -> Result<Vec<u8>> {
        let grid = self.uncrop(labels, 1, |_| 0)?;
        let oriented = resample_labels(&grid, &self.back_sampling());
        Ok(self.map.inverse().apply(&oriented).data)
    }

    /// Per-class probabilities on the model grid (`classes` channels) to the source grid:
    /// background 1 outside the crop, trilinear resampling back, the inverse axis map.
    pub fn probabilities_to_source(&self, probs: &[f32], classes: usize) -> Result<Vec<f32>> {
        let grid = self.uncrop(probs, classes, |c| if c == 0 { 1.0 } else { 0.0 })?;
        let oriented = resample_linear(&grid, &self.back_sampling());
        Ok(self.map.inverse().apply(&oriented).data)
    }

    fn back_sampling(&self) -> Sampling {
        Sampling::respace(self.oriented_shape, self.step.map(|x| 1.0 / x))
    }

    /// Places model-grid values (`channels` blocks) into the resampled grid, `fill(channel)`
    /// outside the crop.
    fn uncrop<T: Copy>(&self, values: &[T], channels: usize, fill: impl Fn(usize) -> T) -> Result<Volume<T>> {
        let n = self.crop.size.iter().product::<usize>();
        ensure!(
            values.len() == n * channels,
            "prediction has {} values, the model grid {:?} x {channels} needs {}",
            values.len(),
            self.crop.size,
            n * channels
        );
        let s = self.resampled_shape;
        let full_n: usize = s.iter().product();
        let mut full = Vec::with_capacity(full_n * channels);
        for c in 0..channels {
            full.extend(std::iter::repeat_n(fill(c), full_n));
        }
        let [ci, cj, ck] = self.crop.start;
        let [si, sj, sk] = self.crop.size;
        for c in 0..channels {
            for i in 0..si {
                for j in 0..sj {
                    let dst = c * full_n + ((ci + i) * s[1] + cj + j) * s[2] + ck;
                    let src = c * n + (i * sj + j) * sk;
                    full[dst..dst + sk].copy_from_slice(&values[src..src + sk]);
                }
            }
        }
        Ok(Volume { data: full, shape: s, channels, affine: Affine::from_spacing([1.0; 3]) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The foreground crop keeps voxels above 0 after the intensity mapping, as MONAI's
    /// `CropForegroundd` default `select_fn`, also when the window maps to [-1, 1].
    #[test]
    fn foreground_is_above_zero_after_scaling_as_monai() {
        let shape = [6, 5, 4];
        let n: usize = shape.iter().product();
        // HU -1000 everywhere, -100 in a 2x2x2 block, 300 in one voxel of it.
        let mut data = vec![-1000.0f32; n];
        for (i, j, k) in
            [(1, 1, 1), (1, 1, 2), (1, 2, 1), (1, 2, 2), (2, 1, 1), (2, 1, 2), (2, 2, 1), (2, 2, 2)]
        {
            data[(i * shape[1] + j) * shape[2] + k] = -100.0;
        }
        data[(2 * shape[1] + 2) * shape[2] + 2] = 300.0;
        let v = Volume::new(data, shape, Affine::from_spacing([1.0; 3]));
        let mut p = Preprocessor::pretraining();
        p.spacing = [1.0; 3];
        // [-1000, 1000] -> [-1, 1]: -100 maps to -0.1 (not foreground), 300 to 0.3.
        p.intensity = IntensityScaling { a_min: -1000.0, a_max: 1000.0, b_min: -1.0, b_max: 1.0, clip: true };
        p.foreground_crop = true;
        let (out, _) = p.apply(&v).unwrap();
        assert_eq!(out.shape, [1, 1, 1], "only the 300 HU voxel is above 0 after scaling");
        // [-1000, 1000] -> [0, 1]: every voxel above -1000 HU is foreground.
        p.intensity = IntensityScaling { a_min: -1000.0, a_max: 1000.0, b_min: 0.0, b_max: 1.0, clip: true };
        assert_eq!(p.apply(&v).unwrap().0.shape, [2, 2, 2]);
    }

    /// Output grids as MONAI 1.6.1's `Spacing(pixdim=(1.5, 1.5, 2.0))` makes them (shapes read
    /// from MONAI on these inputs: `MetaTensor(torch.rand((1, *shape)), affine=diag(old))`).
    #[test]
    fn respaced_shapes_are_monais() {
        let new = [1.5, 1.5, 2.0];
        for (shape, old, monai) in [
            ([100, 90, 37], [0.8, 0.8, 2.5], [54, 48, 46]),
            ([61, 47, 30], [0.7, 0.93, 3.0], [29, 30, 44]),
            ([90, 64, 45], [2.0, 1.0, 1.0], [120, 43, 23]),
            ([33, 33, 33], [1.5, 1.5, 2.0], [33, 33, 33]),
            ([1, 5, 2], [1.0, 1.0, 1.0], [1, 4, 2]),
        ] {
            assert_eq!(respaced_shape(shape, old, new), monai, "{shape:?} at {old:?}");
        }
    }

    fn ramp(shape: [usize; 3], affine: Affine) -> Volume {
        let data = (0..shape.iter().product::<usize>()).map(|i| i as f32).collect();
        Volume::new(data, shape, affine)
    }

    #[test]
    fn reorienting_keeps_every_voxel_in_place() {
        // LPS grid with axes permuted: array axis 0 runs superior-inferior.
        let affine = Affine([
            [0.0, -0.8, 0.0, 50.0],
            [0.0, 0.0, -0.8, 40.0],
            [-2.0, 0.0, 0.0, 30.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let v = ramp([4, 5, 6], affine);
        assert_eq!(affine.axcodes(), "ILP");
        let map = AxisMap::to_codes(&affine, "RAS").unwrap();
        let r = map.apply(&v);
        assert_eq!(r.affine.axcodes(), "RAS");
        assert_eq!(r.shape, [5, 6, 4]);
        for (o, &val) in r.data.iter().enumerate() {
            let ijk = [o / 24, (o / 4) % 6, o % 4];
            let src = val as usize;
            let sijk = [src / 30, (src / 6) % 5, src % 6];
            let a = r.affine.apply(ijk.map(|x| x as f64));
            let b = v.affine.apply(sijk.map(|x| x as f64));
            assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9), "voxel {o} moved");
        }
        assert_eq!(map.inverse().apply(&r).data, v.data);
    }

    #[test]
    fn round_trip_to_model_grid_and_back_restores_labels() {
        let affine = Affine([
            [-0.9, 0.0, 0.0, 0.0],
            [0.0, -0.9, 0.0, 0.0],
            [0.0, 0.0, 2.5, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let shape = [40, 36, 12];
        let mut img = Volume::new(vec![-1000.0; 40 * 36 * 12], shape, affine);
        let mut lab = Volume::new(vec![0u8; 40 * 36 * 12], shape, affine);
        for i in 8..30 {
            for j in 6..28 {
                for k in 2..10 {
                    let x = img.index(i, j, k);
                    img.data[x] = 40.0;
                    lab.data[x] = if i < 19 { 1 } else { 2 };
                }
            }
        }
        let p = Preprocessor::btcv();
        let (pi, pl) = p.apply_with_labels(&img, &lab).unwrap();
        let (pi2, inv) = p.apply(&img).unwrap();
        assert_eq!(pi, pi2);
        assert_eq!(pi.affine.axcodes(), "RAS");
        let sp = pi.spacing();
        assert!((sp[0] - 1.5).abs() < 0.05 && (sp[2] - 2.0).abs() < 0.1, "{sp:?}");
        // Cropped to the body (HU above -175), intensities in [0, 1].
        assert!(pi.shape[0] < 30 && pi.data.iter().all(|v| (0.0..=1.0).contains(v)));
        let back = inv.labels_to_source(&pl.data).unwrap();
        let agree = back.iter().zip(&lab.data).filter(|(a, b)| a == b).count() as f64 / back.len() as f64;
        assert!(agree > 0.97, "only {agree} of labels survive the round trip");
    }

    #[test]
    fn mismatched_label_grid_and_nan_are_errors() {
        let a = Affine::from_spacing([1.0; 3]);
        let img = Volume::new(vec![0.0; 8], [2, 2, 2], a);
        let lab = Volume::new(vec![0u8; 12], [3, 2, 2], a);
        let e = Preprocessor::btcv().apply_with_labels(&img, &lab).unwrap_err();
        assert!(e.to_string().contains("label grid [3, 2, 2] differs"), "{e}");
        let mut bad = img.clone();
        bad.data[3] = f32::NAN;
        assert!(Preprocessor::btcv().apply(&bad).unwrap_err().to_string().contains("NaN"));
    }
}
