//! The deterministic preprocessing stored with every model, and its inverse for predictions.
//!
//! Order, as MONAI's UNETR recipe: reorient (axis permutation and flips, exact), resample to the
//! target spacing (trilinear for images, nearest for labels, on the grid MONAI's `Spacingd`
//! makes: [`spacing_grid`]), map intensities, crop to the foreground. [`Inverse`] takes a
//! prediction on the model grid back to the source grid as MONAI's `Invertd` does.

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

    /// The preprocessing a model file is written with: these transforms and the class names
    /// (background first). [`Self::from_model`] reads it back.
    pub fn to_model(&self, class_names: Vec<String>) -> glmae_core::format::OwnedPreprocessing {
        glmae_core::format::OwnedPreprocessing {
            orientation: self.orientation.clone(),
            target_spacing: self.spacing,
            intensity: self.intensity,
            foreground_crop: self.foreground_crop,
            class_names,
        }
    }

    /// UNETR's BTCV recipe: RAS, 1.5 x 1.5 x 2.0 mm, HU [-175, 250] -> [0, 1], foreground crop.
    pub fn btcv() -> Self {
        Self {
            orientation: glmae_core::preprocessing::BTCV_ORIENTATION.into(),
            spacing: glmae_core::preprocessing::BTCV_SPACING,
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
        // A label map placed elsewhere in space (MONAI compares the affines too) would train on
        // the wrong voxels: 0.1 mm in the origin, 0.1% in the voxel axes.
        let (a, b) = (&image.affine.0, &labels.affine.0);
        let origin = (0..3).map(|r| (a[r][3] - b[r][3]).abs()).fold(0.0, f64::max);
        let axes = (0..3)
            .flat_map(|r| (0..3).map(move |c| (r, c)))
            .map(|(r, c)| (a[r][c] - b[r][c]).abs() / image.affine.spacing()[c].max(1e-12))
            .fold(0.0, f64::max);
        ensure!(
            origin <= 0.1 && axes <= 1e-3,
            "the label map's affine differs from the image's (origins {:?} and {:?} mm, {origin:.3} mm apart; \
             voxel axes differ by {:.2}%): the labels do not lie on the image",
            [a[0][3], a[1][3], a[2][3]],
            [b[0][3], b[1][3], b[2][3]],
            100.0 * axes
        );
        let (img, lab, _) = self.run(image, Some(labels))?;
        Ok((img, lab.ok_or_else(|| anyhow!("labels were dropped during preprocessing"))?))
    }

    /// [`Preprocessor::apply`] that consumes the image, so its memory is reused or freed as soon
    /// as it is reoriented: a source CT is the largest buffer of a segmentation (512 x 512 x 600
    /// is 629 MB as float32) and nothing after this step needs it.
    pub fn apply_owned(&self, image: Volume) -> Result<(Volume, Inverse)> {
        let map = self.orientation_map(&image)?;
        let img = map.apply_owned(image);
        let (img, _, inv) = self.after_orientation(map, img, None)?;
        Ok((img, inv))
    }

    fn run(&self, image: &Volume, labels: Option<&Labels>) -> Result<(Volume, Option<Labels>, Inverse)> {
        let map = self.orientation_map(image)?;
        let img = map.apply(image);
        let lab = labels.map(|l| map.apply(l));
        self.after_orientation(map, img, lab)
    }

    /// The reorientation of a finite image to the target axis codes.
    fn orientation_map(&self, image: &Volume) -> Result<AxisMap> {
        ensure!(image.data.iter().all(|v| v.is_finite()), "image holds NaN or infinite values");
        AxisMap::to_codes(&image.affine, &self.orientation)
    }

    /// Spacing, intensity and crop, on an image (and labels) already reoriented by `map`.
    fn after_orientation(
        &self,
        map: AxisMap,
        img: Volume,
        lab: Option<Labels>,
    ) -> Result<(Volume, Option<Labels>, Inverse)> {
        let oriented_shape = img.shape;

        let sampling = spacing_grid(img.shape, &img.affine, self.spacing.map(f64::from))?;
        let step = sampling.step;
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
        Ok((img, lab, Inverse { map, oriented_shape, resampled_shape, step, origin: sampling.offset, crop }))
    }
}

/// The grid MONAI's `Spacingd` (`diagonal=False`, `scale_extent=False`) resamples a grid of
/// `shape` voxels with `affine` onto at spacing `target`: the shape of [`respaced_shape`], and
/// the input-voxel position of output voxel 0.
///
/// MONAI keeps voxel 0's centre in place when it is the lowest corner of the input in the
/// output's voxel frame (`compute_shape_offset`, within numpy's `allclose` tolerance of 1e-8),
/// and otherwise centres the output grid on the input. That frame is the input's sheared by the
/// Cholesky factor of `zoom_affine`: axis-aligned grids keep voxel 0, while an oblique affine
/// stored in a NIfTI header (float32) has columns orthogonal only to ~1e-8, enough to move the
/// output grid by a fraction of a voxel. We follow MONAI: same rule, same grids.
///
/// An error, saying how large the grid would be, when it exceeds [`MAX_GRID_VOXELS`] or a spacing
/// is not a positive finite number (a header scaled by 1e30 must not become a 58 GB allocation).
pub fn spacing_grid(shape: [usize; 3], affine: &Affine, target: [f64; 3]) -> Result<Sampling> {
    let old = affine.spacing();
    for (what, s) in [("image", old), ("target", target)] {
        ensure!(
            s.iter().all(|x| x.is_finite() && *x > 0.0),
            "the {what} voxel spacing {s:?} mm is not positive and finite"
        );
    }
    let sizes: [f64; 3] =
        std::array::from_fn(|a| shape[a].saturating_sub(1) as f64 * old[a] / target[a] + 1.0);
    // The separable passes hold more than the output when one axis grows and the others shrink.
    let voxels = crate::resample::resample_peak_voxels(shape, sizes);
    ensure!(
        voxels.is_finite() && voxels <= MAX_GRID_VOXELS as f64,
        "resampling {shape:?} voxels of {old:?} mm to {target:?} mm would make a grid of {:.3e} voxels \
         (~{:.0} x {:.0} x {:.0}, {:.1} GB as float32); the limit is {MAX_GRID_VOXELS}: check the image's \
         voxel size and the model's target spacing",
        voxels,
        sizes[0],
        sizes[1],
        sizes[2],
        voxels * 4.0 / 1e9
    );
    let out = respaced_shape(shape, old, target);
    let step: [f64; 3] = std::array::from_fn(|a| target[a] / old[a]);
    let column = |c: usize| [affine.0[0][c], affine.0[1][c], affine.0[2][c]];
    let dot = |a: usize, b: usize| (0..3).map(|r| column(a)[r] * column(b)[r]).sum::<f64>();
    // Upper-triangular Cholesky factor of the columns' Gram matrix: the output voxel frame is
    // diag(1 / target) x zs of the input's.
    let mut zs = [[0.0f64; 3]; 3];
    for a in 0..3 {
        let d = dot(a, a) - (0..a).map(|k| zs[k][a] * zs[k][a]).sum::<f64>();
        zs[a][a] = d.max(0.0).sqrt();
        for b in a + 1..3 {
            let off = dot(a, b) - (0..a).map(|k| zs[k][a] * zs[k][b]).sum::<f64>();
            zs[a][b] = if zs[a][a] > 0.0 { off / zs[a][a] } else { 0.0 };
        }
    }
    // The lowest any corner lies below voxel 0 along output axis a.
    let keeps_voxel0 = (0..3).all(|a| {
        let below: f64 =
            (a + 1..3).map(|b| (zs[a][b] / target[a] * shape[b].saturating_sub(1) as f64).min(0.0)).sum();
        below >= -1e-8
    });
    let offset = if keeps_voxel0 {
        [0.0; 3]
    } else {
        std::array::from_fn(|a| shape[a] as f64 / 2.0 - step[a] * out[a] as f64 / 2.0)
    };
    Ok(Sampling { shape: out, step, offset })
}

/// The most voxels a resampled grid may have: 2^30 (4.3 GB as float32; a 512 x 512 x 4096 grid).
pub const MAX_GRID_VOXELS: usize = 1 << 30;

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
        Volume {
            data,
            shape: out_shape,
            channels: v.channels,
            affine: self.affine_after(&v.affine, out_shape),
        }
    }

    /// The affine of the reoriented grid (shape `out_shape`) of a grid with `affine`: new index
    /// `o` is old index `old[from[a]] = flip ? n-1-o : o`, so every voxel keeps its position.
    fn affine_after(&self, affine: &Affine, out_shape: [usize; 3]) -> Affine {
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
        affine.compose(&Affine(t))
    }

    /// [`AxisMap::apply`] on a volume it may reuse: flips alone (LPS to RAS, the common case)
    /// are done in place; a permutation needs a second buffer, and the input is freed after it.
    pub fn apply_owned<T: Copy>(&self, mut v: Volume<T>) -> Volume<T> {
        if self.from != [0, 1, 2] {
            return self.apply(&v);
        }
        let [n0, n1, n2] = v.shape;
        let n = v.voxels();
        for c in 0..v.channels {
            let data = &mut v.data[c * n..(c + 1) * n];
            if self.flip[2] {
                data.chunks_exact_mut(n2.max(1)).for_each(<[T]>::reverse);
            }
            if self.flip[1] {
                for plane in data.chunks_exact_mut((n1 * n2).max(1)) {
                    for j in 0..n1 / 2 {
                        let (a, b) = plane.split_at_mut((n1 - 1 - j) * n2);
                        a[j * n2..(j + 1) * n2].swap_with_slice(&mut b[..n2]);
                    }
                }
            }
            if self.flip[0] {
                let plane = n1 * n2;
                for i in 0..n0 / 2 {
                    let (a, b) = data.split_at_mut((n0 - 1 - i) * plane);
                    a[i * plane..(i + 1) * plane].swap_with_slice(&mut b[..plane]);
                }
            }
        }
        v.affine = self.affine_after(&v.affine, v.shape);
        v
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

/// One tap of linear interpolation: a model-grid index (`None` outside the crop) and its weight.
type Tap = (Option<usize>, f32);

/// How to take a prediction on the model grid back to the source image's grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Inverse {
    map: AxisMap,
    oriented_shape: [usize; 3],
    resampled_shape: [usize; 3],
    step: [f64; 3],
    /// Source-voxel position of the resampled grid's voxel 0 ([`spacing_grid`]).
    origin: [f64; 3],
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

    /// Per-class probabilities on the model grid (`classes` channels) to the source grid, as
    /// MONAI's `Invertd(nearest_interp=False)`: 0 for every class outside the crop (MONAI pads
    /// the inverted crop with zeros, so those voxels sum to 0, not 1), trilinear resampling back
    /// with the border repeated, the inverse axis map.
    ///
    /// # Shapes
    /// - `probs`: `[classes, model_shape]`, channel-major
    /// - returns `[classes, source shape]`
    pub fn probabilities_to_source(&self, probs: &[f32], classes: usize) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for c in 0..classes {
            out.extend(self.class_to_source(probs, classes, c)?);
        }
        Ok(out)
    }

    /// Class `class` of [`Inverse::probabilities_to_source`] alone: memory for one class on the
    /// source grid, whatever the class count.
    pub fn class_to_source(&self, probs: &[f32], classes: usize, class: usize) -> Result<Vec<f32>> {
        ensure!(class < classes, "class {class} of {classes}");
        let n = self.model_voxels(probs.len(), classes)?;
        let grid = self.uncrop(&probs[class * n..(class + 1) * n], 1, |_| 0.0)?;
        let oriented = resample_linear(&grid, &self.back_sampling());
        drop(grid);
        // Reoriented in place where the map is flips alone: one source-sized buffer, not two.
        Ok(self.map.inverse().apply_owned(oriented).data)
    }

    /// Labels on the source grid from per-class scores on the model grid, as MONAI's
    /// `Invertd(nearest_interp=False)` then `AsDiscreted(argmax=True)`: the scores go back as
    /// [`Inverse::probabilities_to_source`] takes them, and each source voxel gets the class with
    /// the largest value (the first on ties, as `torch.argmax`). Streamed voxel by voxel on
    /// `threads` threads: memory stays at the model grid's, where the probabilities on a
    /// 512 x 512 x 200 source grid would need 2.9 GB for 14 classes.
    ///
    /// # Shapes
    /// - `scores`: `[classes, model_shape]`, channel-major, `classes` in 1..=256
    /// - returns `[source shape]`
    pub fn argmax_to_source(&self, scores: &[f32], classes: usize, threads: usize) -> Result<Vec<u8>> {
        ensure!((1..=256).contains(&classes), "{classes} classes do not fit 8-bit labels");
        let n = self.model_voxels(scores.len(), classes)?;
        let s = self.back_sampling();
        // Per axis and output position: the two taps of linear interpolation in the resampled
        // grid (border repeated, as `resample_linear`), as model-grid indices (`None` outside
        // the crop, where every class is 0), and their weights.
        let taps: [Vec<[Tap; 2]>; 3] = std::array::from_fn(|a| {
            let inside = |r: usize| r.checked_sub(self.crop.start[a]).filter(|&m| m < self.crop.size[a]);
            crate::resample::linear_taps(self.resampled_shape[a], s.shape[a], s.step[a], s.offset[a])
                .into_iter()
                .map(|(lo, hi, w)| [(inside(lo), 1.0 - w), (inside(hi), w)])
                .collect()
        });
        let [_, m1, m2] = self.crop.size;
        let slices = crate::parallel::map_indexed(
            s.shape[0],
            threads,
            || None,
            |i| {
                let mut out = Vec::with_capacity(s.shape[1] * s.shape[2]);
                let mut acc = vec![0.0f32; classes];
                for t1 in &taps[1] {
                    for t2 in &taps[2] {
                        acc.fill(0.0);
                        for &(a, wa) in &taps[0][i] {
                            for &(b, wb) in t1 {
                                for &(c, wc) in t2 {
                                    let (Some(a), Some(b), Some(c)) = (a, b, c) else { continue };
                                    let w = wa * wb * wc;
                                    if w == 0.0 {
                                        continue;
                                    }
                                    let v = (a * m1 + b) * m2 + c;
                                    for (k, x) in acc.iter_mut().enumerate() {
                                        *x += w * scores[k * n + v];
                                    }
                                }
                            }
                        }
                        let mut best = 0;
                        for (k, &x) in acc.iter().enumerate().skip(1) {
                            if x > acc[best] {
                                best = k;
                            }
                        }
                        out.push(best as u8);
                    }
                }
                Some(out)
            },
        );
        let mut data = Vec::with_capacity(s.shape.iter().product());
        for slice in slices {
            data.extend(slice.ok_or_else(|| anyhow!("a thread panicked while inverting the labels"))?);
        }
        let oriented = Volume { data, shape: s.shape, channels: 1, affine: Affine::from_spacing([1.0; 3]) };
        Ok(self.map.inverse().apply(&oriented).data)
    }

    /// Voxels of the model grid, after checking that `len` values fill it `channels` times.
    fn model_voxels(&self, len: usize, channels: usize) -> Result<usize> {
        let n = self.crop.size.iter().product::<usize>();
        ensure!(
            len == n * channels,
            "prediction has {len} values, the model grid {:?} x {channels} needs {}",
            self.crop.size,
            n * channels
        );
        Ok(n)
    }

    /// Source voxel o sits at (o - origin) / step in the resampled grid.
    fn back_sampling(&self) -> Sampling {
        Sampling {
            shape: self.oriented_shape,
            step: self.step.map(|x| 1.0 / x),
            offset: std::array::from_fn(|a| -self.origin[a] / self.step[a]),
        }
    }

    /// Places model-grid values (`channels` blocks) into the resampled grid, `fill(channel)`
    /// outside the crop.
    fn uncrop<T: Copy>(&self, values: &[T], channels: usize, fill: impl Fn(usize) -> T) -> Result<Volume<T>> {
        let n = self.model_voxels(values.len(), channels)?;
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

    /// What a model file is written with reads back as the same transforms, whichever field
    /// differs from the BTCV recipe, with the class names beside them.
    #[test]
    fn model_preprocessing_round_trips() -> Result<()> {
        use glmae_core::format::{ModelBuilder, Precision};
        let p = Preprocessor {
            orientation: "LPS".into(),
            spacing: [0.8, 0.9, 3.0],
            intensity: IntensityScaling { a_min: -100.0, a_max: 300.0, b_min: -1.0, b_max: 1.0, clip: false },
            foreground_crop: false,
        };
        let cfg = glmae_core::testing_config();
        let names: Vec<String> = ["background", "a", "b"].map(String::from).to_vec();
        let values = glmae_core::synthetic::random_params(&cfg, 1);
        let b = ModelBuilder::from_params(cfg, p.to_model(names.clone()), Precision::F32, |spec| {
            values.iter().find(|(s, _)| s.name == spec.name).map(|(_, v)| v.as_slice())
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let bytes = b.to_bytes().map_err(|e| anyhow::anyhow!("{e}"))?;
        let file = glmae_core::ModelFile::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(Preprocessor::from_model(&file.preprocessing), p);
        let read: Vec<&str> = file.preprocessing.class_names.iter().collect();
        assert_eq!(read, ["background", "a", "b"]);
        Ok(())
    }

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

    /// The in-place reorientation gives the same voxels and affine as the copying one, for every
    /// combination of flips, on two channels and odd and even axis lengths; a permutation falls
    /// back to the copy.
    #[test]
    fn owned_reorientation_equals_the_copy() {
        let affine = Affine([
            [-0.8, 0.0, 0.0, 5.0],
            [0.0, -0.7, 0.0, 4.0],
            [0.0, 0.0, 2.0, 3.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let shape = [5, 4, 3];
        let mut v = ramp(shape, affine);
        v.data.extend(v.data.clone().iter().map(|x| -x));
        v.channels = 2;
        for bits in 0..8u8 {
            let map = AxisMap { from: [0, 1, 2], flip: [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0] };
            let (copy, owned) = (map.apply(&v), map.apply_owned(v.clone()));
            assert_eq!(
                (&copy.data, copy.shape, copy.affine),
                (&owned.data, owned.shape, owned.affine),
                "{map:?}"
            );
        }
        let map = AxisMap { from: [2, 0, 1], flip: [true, false, true] };
        assert_eq!(map.apply(&v).data, map.apply_owned(v.clone()).data);
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

    /// MONAI 1.6.1's `Spacingd(pixdim=(1.5, 1.5, 2))` grids: an axis-aligned affine keeps voxel
    /// 0 in place; an oblique one read from a NIfTI header (float32 columns, 12 degrees about z,
    /// 1.2 x 1.1 x 2.5 mm, 67 x 59 x 19) is centred on the input. Expected affines read from MONAI
    /// on these inputs (`scripts/monai_pipeline_parity.py`'s oblique case).
    #[test]
    fn spacing_grid_origin_is_monais() {
        let target = [1.5, 1.5, 2.0];
        let axis_aligned = Affine([
            [0.8, 0.0, 0.0, 10.0],
            [0.0, 0.8, 0.0, -20.0],
            [0.0, 0.0, 3.0, 5.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let s = spacing_grid([91, 81, 21], &axis_aligned, target).unwrap();
        assert_eq!((s.shape, s.offset), ([49, 44, 31], [0.0; 3]));
        let oblique = Affine([
            [1.1737771034240723, -0.2287028580904007, 0.0, -30.0],
            [0.2494940310716629, 1.0759623050689697, 0.0, 15.0],
            [0.0, 0.0, 2.5, 40.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let s = spacing_grid([67, 59, 19], &oblique, target).unwrap();
        assert_eq!(s.shape, [54, 44, 24]);
        let origin = s.affine(&oblique).apply([0.0; 3]);
        let monai = [-30.17909318925087, 14.399643583226917, 39.75];
        assert!(
            origin.iter().zip(monai).all(|(a, b)| (a - b).abs() < 1e-6),
            "{origin:?} vs MONAI's {monai:?}"
        );
    }

    /// Absurd geometry is an error naming the grid it would make, not a panic or an allocation of
    /// tens of GB: a header scaled by 1e30, 100 mm voxels against a 5.9e-39 mm target, NaN.
    #[test]
    fn grids_too_large_or_spacings_not_finite_are_errors() {
        let huge = Affine::from_spacing([1e30, 1e30, 1e30]);
        let e = spacing_grid([512, 512, 100], &huge, [1.5, 1.5, 2.0]).unwrap_err().to_string();
        assert!(e.contains("would make a grid of") && e.contains("limit"), "{e}");
        let e =
            spacing_grid([64; 3], &Affine::from_spacing([100.0; 3]), [5.9e-39; 3]).unwrap_err().to_string();
        assert!(e.contains("would make a grid of"), "{e}");
        let e = spacing_grid([8; 3], &Affine::from_spacing([f64::NAN, 1.0, 1.0]), [1.0; 3]).unwrap_err();
        assert!(e.to_string().contains("not positive and finite"), "{e}");
        // Through the preprocessing: an image with 100 mm voxels and a 0.01 mm target.
        let img = Volume::new(vec![0.0; 512], [8, 8, 8], Affine::from_spacing([100.0; 3]));
        let mut p = Preprocessor::btcv();
        p.spacing = [0.01; 3];
        assert!(p.apply(&img).unwrap_err().to_string().contains("would make a grid of"));
        assert!(
            spacing_grid([512, 512, 600], &Affine::from_spacing([0.7, 0.7, 1.0]), [1.5, 1.5, 2.0]).is_ok()
        );
        // Found by the fuzz target: a small output whose first pass is huge (axis 2 grows 10^6x
        // while axes 0 and 1 shrink to one voxel) is bounded too.
        let e = spacing_grid([24, 24, 24], &Affine::from_spacing([1e-3, 1e-3, 1e3]), [1.0, 1.0, 1e-2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("would make a grid of"), "{e}");
    }

    /// The streamed argmax gives the labels of the argmax of the whole inverted probability
    /// volume (MONAI's order: invert, then argmax), on a grid that is reoriented, resampled and
    /// cropped; voxels outside the crop get 0 for every class.
    #[test]
    fn streamed_argmax_equals_argmax_of_inverted_probabilities() {
        let affine = Affine([
            [-0.9, 0.0, 0.0, 5.0],
            [0.0, 0.0, 2.5, -3.0],
            [0.0, -1.1, 0.0, 7.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let shape = [41, 11, 35];
        let mut img = Volume::new(vec![-1000.0; 41 * 11 * 35], shape, affine);
        for i in 7..33 {
            for j in 2..10 {
                for k in 5..29 {
                    let x = img.index(i, j, k);
                    img.data[x] = 40.0;
                }
            }
        }
        let (model_grid, inv) = Preprocessor::btcv().apply(&img).unwrap();
        assert!(model_grid.shape.iter().zip(&shape).any(|(m, s)| m != s));
        let classes = 4;
        let n = model_grid.voxels();
        // Smooth scores with ties on half of the voxels between classes 1 and 2.
        let mut scores = vec![0.0f32; classes * n];
        for v in 0..n {
            for c in 0..classes {
                scores[c * n + v] =
                    ((v * (c + 3)) % 17) as f32 / 17.0 + if c == 2 && v % 2 == 0 { 0.0 } else { 0.01 };
            }
        }
        let probs = inv.probabilities_to_source(&scores, classes).unwrap();
        let m = img.voxels();
        let expected: Vec<u8> = (0..m)
            .map(|v| {
                let mut best = 0;
                for c in 1..classes {
                    if probs[c * m + v] > probs[best * m + v] {
                        best = c;
                    }
                }
                best as u8
            })
            .collect();
        let got = inv.argmax_to_source(&scores, classes, 3).unwrap();
        let same = got.iter().zip(&expected).filter(|(a, b)| a == b).count();
        // Separable passes and direct weights round differently: near-ties may flip.
        assert!(same as f64 >= 0.999 * m as f64, "{same} of {m} labels agree");
        // Outside the body every class is 0 (the crop's zero padding): label 0, probability 0.
        assert_eq!(got[0], 0);
        assert!((0..classes).all(|c| probs[c * m] == 0.0));
        let e = inv.argmax_to_source(&scores[1..], classes, 1).unwrap_err();
        assert!(e.to_string().contains("needs"), "{e}");
    }

    #[test]
    fn mismatched_label_grid_and_nan_are_errors() {
        let a = Affine::from_spacing([1.0; 3]);
        let img = Volume::new(vec![0.0; 8], [2, 2, 2], a);
        let lab = Volume::new(vec![0u8; 12], [3, 2, 2], a);
        let e = Preprocessor::btcv().apply_with_labels(&img, &lab).unwrap_err();
        assert!(e.to_string().contains("label grid [3, 2, 2] differs"), "{e}");
        // Same grid, 50 mm off: refused; 0.01 mm off (float32 headers): accepted.
        let mut shifted = Volume::new(vec![0u8; 8], [2, 2, 2], a);
        shifted.affine.0[1][3] = 50.0;
        let e = Preprocessor::btcv().apply_with_labels(&img, &shifted).unwrap_err().to_string();
        assert!(e.contains("affine differs") && e.contains("50.000 mm apart"), "{e}");
        shifted.affine.0[1][3] = 0.01;
        assert!(Preprocessor::btcv().apply_with_labels(&img, &shifted).is_ok());
        let mut bad = img.clone();
        bad.data[3] = f32::NAN;
        assert!(Preprocessor::btcv().apply(&bad).unwrap_err().to_string().contains("NaN"));
    }
}
