//! Sliding-window inference over a whole volume (MONAI's `sliding_window_inference`): windows of
//! the model's ROI at a given overlap, predictions blended with constant or Gaussian weights.
//! The model is a closure, so the trainer (burn) and the inference crate (glmae-core kernels)
//! share this code.

use anyhow::{Result, ensure};

/// How overlapping window predictions are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Blend {
    /// Plain average.
    Constant,
    /// Weighted by a Gaussian centred on each window (sigma = 0.125 x ROI, MONAI's default).
    Gaussian,
}

impl std::str::FromStr for Blend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "gaussian" => Ok(Self::Gaussian),
            other => anyhow::bail!("unknown blend mode {other:?}; expected constant or gaussian"),
        }
    }
}

/// Window start positions along one axis of length `size` (after padding to at least `roi`):
/// a stride of `roi * (1 - overlap)`, the last window flush with the end.
pub fn starts(size: usize, roi: usize, overlap: f64) -> Vec<usize> {
    if size <= roi {
        return vec![0];
    }
    let stride = ((roi as f64 * (1.0 - overlap)).floor() as usize).max(1);
    let count = (size - roi).div_ceil(stride) + 1;
    (0..count).map(|i| (i * stride).min(size - roi)).collect()
}

/// How many windows a pass over a volume of `shape` makes.
pub fn window_count(shape: [usize; 3], spec: &WindowSpec) -> usize {
    (0..3).map(|a| starts(shape[a], spec.roi[a], spec.overlap).len()).product()
}

/// Per-voxel weights of one window.
pub fn importance(roi: [usize; 3], blend: Blend) -> Vec<f32> {
    let n = roi.iter().product();
    match blend {
        Blend::Constant => vec![1.0; n],
        Blend::Gaussian => {
            let axis = |len: usize| -> Vec<f64> {
                let sigma = 0.125 * len as f64;
                let centre = (len as f64 - 1.0) / 2.0;
                (0..len).map(|i| (-((i as f64 - centre).powi(2)) / (2.0 * sigma * sigma)).exp()).collect()
            };
            let (a, b, c) = (axis(roi[0]), axis(roi[1]), axis(roi[2]));
            let mut w = Vec::with_capacity(n);
            for x in &a {
                for y in &b {
                    for z in &c {
                        w.push((x * y * z) as f32);
                    }
                }
            }
            // MONAI's `compute_importance_map`: no normalisation, weights clamped below at
            // max(smallest weight, 1e-3) so border voxels still count.
            let floor = w.iter().copied().fold(f32::MAX, f32::min).max(1e-3);
            w.iter().map(|v| v.max(floor)).collect()
        }
    }
}

/// Window size, overlap and blending of a sliding-window pass.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowSpec {
    /// Window (ROI) in voxels.
    pub roi: [usize; 3],
    /// Fraction of each window shared with its neighbour (MONAI's default 0.25; UNETR uses 0.5).
    pub overlap: f64,
    /// How overlapping predictions combine.
    pub blend: Blend,
}

/// The windows of a pass and the running blend of their predictions.
///
/// As MONAI's `sliding_window_inference`, an axis shorter than the ROI is padded with zeros to
/// the ROI, half before (rounded down) and the rest after; windows are laid on the padded volume
/// and their predictions cropped back to the real one.
struct Pass<'a> {
    image: &'a [f32],
    channels: usize,
    shape: [usize; 3],
    roi: [usize; 3],
    /// Zero voxels before the volume on each axis (the padded volume's origin is `-pad`).
    pad: [usize; 3],
    classes: usize,
    weights: Vec<f32>,
    acc: Vec<f32>,
    norm: Vec<f32>,
    starts: Vec<[usize; 3]>,
}

impl<'a> Pass<'a> {
    fn new(
        image: &'a [f32],
        channels: usize,
        shape: [usize; 3],
        spec: &WindowSpec,
        classes: usize,
    ) -> Result<Self> {
        let n: usize = shape.iter().product();
        ensure!(
            image.len() == channels * n,
            "image has {} values, shape {shape:?} x {channels} needs {}",
            image.len(),
            channels * n
        );
        ensure!((0.0..1.0).contains(&spec.overlap), "overlap must be in [0, 1), got {}", spec.overlap);
        let roi = spec.roi;
        ensure!(roi.iter().all(|&r| r > 0), "window {roi:?} has an empty axis");
        let padded: [usize; 3] = std::array::from_fn(|a| shape[a].max(roi[a]));
        let pad: [usize; 3] = std::array::from_fn(|a| (padded[a] - shape[a]) / 2);
        let (s0, s1, s2) = (
            starts(padded[0], roi[0], spec.overlap),
            starts(padded[1], roi[1], spec.overlap),
            starts(padded[2], roi[2], spec.overlap),
        );
        let mut starts = Vec::with_capacity(s0.len() * s1.len() * s2.len());
        for &a in &s0 {
            for &b in &s1 {
                for &c in &s2 {
                    starts.push([a, b, c]);
                }
            }
        }
        Ok(Self {
            image,
            channels,
            shape,
            roi,
            pad,
            classes,
            weights: importance(roi, spec.blend),
            acc: vec![0.0; classes * n],
            norm: vec![0.0; n],
            starts,
        })
    }

    /// The part of a window at `start` (on the padded volume) that lies in the real volume, per
    /// axis: window offsets `lo..hi`, and the real index of `lo`.
    fn overlap(&self, start: [usize; 3]) -> [(usize, usize, usize); 3] {
        std::array::from_fn(|a| {
            let lo = self.pad[a].saturating_sub(start[a]);
            let hi = self.roi[a].min((self.pad[a] + self.shape[a]).saturating_sub(start[a]));
            (lo, hi.max(lo), start[a] + lo - self.pad[a])
        })
    }

    /// The window at `start` (on the padded volume): the volume's values, zeros in the padding.
    fn gather(&self, start: [usize; 3]) -> Vec<f32> {
        let (roi, shape, n) = (self.roi, self.shape, self.shape.iter().product::<usize>());
        let mut window = vec![0.0f32; self.channels * roi.iter().product::<usize>()];
        let [(i0, i1, ri), (j0, j1, rj), (k0, k1, rk)] = self.overlap(start);
        for ch in 0..self.channels {
            for i in i0..i1 {
                for j in j0..j1 {
                    let dst = ((ch * roi[0] + i) * roi[1] + j) * roi[2];
                    let src = ch * n + ((ri + i - i0) * shape[1] + rj + j - j0) * shape[2] + rk;
                    window[dst + k0..dst + k1].copy_from_slice(&self.image[src..src + k1 - k0]);
                }
            }
        }
        window
    }

    /// Adds one window's prediction, weighted, to the voxels inside the real volume.
    fn scatter(&mut self, start: [usize; 3], out: &[f32]) -> Result<()> {
        let (roi, shape) = (self.roi, self.shape);
        let rn: usize = roi.iter().product();
        let n: usize = shape.iter().product();
        ensure!(
            out.len() == self.classes * rn,
            "model returned {} values for a window, expected {}",
            out.len(),
            self.classes * rn
        );
        let [(i0, i1, ri), (j0, j1, rj), (k0, k1, rk)] = self.overlap(start);
        let nk = k1 - k0;
        // Row by row, one class plane at a time: contiguous runs the compiler vectorises
        // (a class-inner loop would touch `classes` planes hundreds of MB apart per voxel).
        // Each value gets the same operations in the same window order either way.
        let rows = (i0..i1).flat_map(|i| (j0..j1).map(move |j| (i, j)));
        let voxel = |i: usize, j: usize| ((ri + i - i0) * shape[1] + rj + j - j0) * shape[2] + rk;
        for (i, j) in rows.clone() {
            let w_row = &self.weights[(i * roi[1] + j) * roi[2] + k0..][..nk];
            let v0 = voxel(i, j);
            for (nv, &w) in self.norm[v0..v0 + nk].iter_mut().zip(w_row) {
                *nv += w;
            }
        }
        for cl in 0..self.classes {
            let (acc, out) = (&mut self.acc[cl * n..(cl + 1) * n], &out[cl * rn..(cl + 1) * rn]);
            for (i, j) in rows.clone() {
                let w0 = (i * roi[1] + j) * roi[2] + k0;
                let v0 = voxel(i, j);
                let row = acc[v0..v0 + nk].iter_mut().zip(&self.weights[w0..w0 + nk]).zip(&out[w0..w0 + nk]);
                for ((v, &w), &o) in row {
                    *v += w * o;
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Vec<f32> {
        let n = self.norm.len();
        for cl in 0..self.classes {
            for (v, nv) in self.acc[cl * n..(cl + 1) * n].iter_mut().zip(&self.norm) {
                *v /= nv.max(f32::MIN_POSITIVE);
            }
        }
        self.acc
    }
}

/// Runs `predict` on every window of `image` (`channels x shape`, channel-first) and blends the
/// `classes`-channel outputs into `(classes, shape)`. Where the volume is smaller than the ROI it
/// is padded with zeros, symmetrically, as MONAI does. `predict` gets the window's values and
/// returns its logits.
pub fn sliding_window(
    image: &[f32],
    channels: usize,
    shape: [usize; 3],
    spec: &WindowSpec,
    classes: usize,
    mut predict: impl FnMut(&[f32]) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let mut pass = Pass::new(image, channels, shape, spec, classes)?;
    for start in pass.starts.clone() {
        let out = predict(&pass.gather(start))?;
        pass.scatter(start, &out)?;
    }
    Ok(pass.finish())
}

/// [`sliding_window`] with `predict` writing each window's logits (`classes x roi` values) into
/// one buffer reused for every window: for large windows a fresh output per window costs more
/// in page faults than blending it.
pub fn sliding_window_into(
    image: &[f32],
    channels: usize,
    shape: [usize; 3],
    spec: &WindowSpec,
    classes: usize,
    mut predict: impl FnMut(&[f32], &mut [f32]) -> Result<()>,
) -> Result<Vec<f32>> {
    let mut pass = Pass::new(image, channels, shape, spec, classes)?;
    let mut out = vec![0.0; classes * spec.roi.iter().product::<usize>()];
    for start in pass.starts.clone() {
        predict(&pass.gather(start), &mut out)?;
        pass.scatter(start, &out)?;
    }
    Ok(pass.finish())
}

/// [`sliding_window`] with windows predicted on `threads` threads, `threads` at a time (so at most
/// that many window outputs are held), blended in the same order as the sequential pass.
/// `on_window` is called after each window (for progress).
#[allow(clippy::too_many_arguments)]
pub fn sliding_window_parallel(
    image: &[f32],
    channels: usize,
    shape: [usize; 3],
    spec: &WindowSpec,
    classes: usize,
    threads: usize,
    predict: impl Fn(&[f32]) -> Result<Vec<f32>> + Sync,
    mut on_window: impl FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let mut pass = Pass::new(image, channels, shape, spec, classes)?;
    let all = pass.starts.clone();
    let total = all.len();
    for (chunk_index, chunk) in all.chunks(threads.max(1)).enumerate() {
        let outs = crate::parallel::map_indexed(
            chunk.len(),
            threads,
            || Err(anyhow::anyhow!("a window worker crashed")),
            |i| predict(&pass.gather(chunk[i])),
        );
        for (start, out) in chunk.iter().zip(outs) {
            pass.scatter(*start, &out?)?;
        }
        on_window((chunk_index * threads.max(1) + chunk.len()).min(total), total);
    }
    Ok(pass.finish())
}

/// Dice per class (1..classes, background excluded) between two label maps; `None` for a class
/// absent from both.
pub fn dice_per_class(pred: &[u8], truth: &[u8], classes: usize) -> Vec<Option<f64>> {
    let mut inter = vec![0usize; classes];
    let mut p = vec![0usize; classes];
    let mut t = vec![0usize; classes];
    for (&a, &b) in pred.iter().zip(truth) {
        p[a as usize % classes] += 1;
        t[b as usize % classes] += 1;
        if a == b {
            inter[a as usize % classes] += 1;
        }
    }
    (1..classes).map(|c| (p[c] + t[c] > 0).then(|| 2.0 * inter[c] as f64 / (p[c] + t[c]) as f64)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_volume_like_monai() {
        assert_eq!(starts(96, 96, 0.5), [0]);
        assert_eq!(starts(200, 96, 0.5), [0, 48, 96, 104]);
        assert_eq!(starts(50, 96, 0.5), [0]);
        assert_eq!(starts(100, 32, 0.0), [0, 32, 64, 68]);
    }

    #[test]
    fn window_count_is_the_number_of_predictions() {
        let shape = [40, 20, 70];
        let spec = WindowSpec { roi: [16, 32, 16], overlap: 0.5, blend: Blend::Constant };
        let image = vec![0.0; shape.iter().product()];
        let mut calls = 0;
        sliding_window(&image, 1, shape, &spec, 2, |w| {
            calls += 1;
            Ok(vec![0.0; 2 * w.len()])
        })
        .unwrap();
        // 4 x 1 x 8 windows: starts 0,8,16,24 / 0 (padded) / 0,8,...,54.
        assert_eq!(calls, 4 * 8);
        assert_eq!(window_count(shape, &spec), calls);
    }

    #[test]
    fn blending_reproduces_a_translation_invariant_model() {
        // A "model" that returns the input as class 0 and minus twice it as class 1: every
        // blend must give both back, each in its own class plane.
        let shape = [20, 13, 9];
        let n: usize = shape.iter().product();
        let image: Vec<f32> = (0..n).map(|i| (i % 17) as f32).collect();
        for blend in [Blend::Constant, Blend::Gaussian] {
            let out = sliding_window(
                &image,
                1,
                shape,
                &WindowSpec { roi: [8, 8, 16], overlap: 0.5, blend },
                2,
                |w| Ok(w.iter().copied().chain(w.iter().map(|v| -2.0 * v)).collect()),
            )
            .unwrap();
            for (a, b) in out[..n].iter().zip(&image) {
                assert!((a - b).abs() < 1e-4, "{blend:?}");
            }
            for (a, b) in out[n..].iter().zip(&image) {
                assert!((a + 2.0 * b).abs() < 2e-4, "{blend:?}, class 1");
            }
        }
        let e = sliding_window(
            &image,
            1,
            shape,
            &WindowSpec { roi: [8; 3], overlap: 0.5, blend: Blend::Constant },
            2,
            |w| Ok(w.to_vec()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("expected 1024"), "{e}");
    }

    /// An axis shorter than the ROI is padded as MONAI pads it: zeros, half before (rounded
    /// down). A model that reports each voxel's position in its window and the window's mean
    /// shows both: a 5-voxel axis in an 8-voxel ROI sits at window offsets 1..6, and an all-ones
    /// volume's windows average 5/8 along that axis.
    #[test]
    fn short_axes_are_zero_padded_symmetrically_like_monai() {
        let shape = [12, 5, 4];
        let roi = [8, 8, 7];
        let n: usize = shape.iter().product();
        let rn: usize = roi.iter().product();
        let image = vec![1.0f32; n];
        let spec = WindowSpec { roi, overlap: 0.5, blend: Blend::Constant };
        let out = sliding_window(&image, 1, shape, &spec, 3, |w| {
            let mean = w.iter().sum::<f32>() / rn as f32;
            let mut o = vec![0.0; 3 * rn];
            for i in 0..roi[0] {
                for j in 0..roi[1] {
                    for k in 0..roi[2] {
                        let v = (i * roi[1] + j) * roi[2] + k;
                        o[v] = j as f32;
                        o[rn + v] = k as f32;
                        o[2 * rn + v] = mean;
                    }
                }
            }
            Ok(o)
        })
        .unwrap();
        for i in 0..shape[0] {
            for j in 0..shape[1] {
                for k in 0..shape[2] {
                    let v = (i * shape[1] + j) * shape[2] + k;
                    // (8 - 5) / 2 = 1 voxel before on axis 1; (7 - 4) / 2 = 1 on axis 2.
                    assert_eq!(out[v], (j + 1) as f32, "axis 1 offset at {i},{j},{k}");
                    assert_eq!(out[n + v], (k + 1) as f32, "axis 2 offset at {i},{j},{k}");
                    let mean = out[2 * n + v];
                    assert!((mean - 5.0 * 4.0 / (8.0 * 7.0)).abs() < 1e-6, "padding is not zeros: {mean}");
                }
            }
        }
    }

    /// The Gaussian weights are MONAI's `compute_importance_map`: exp(-x^2 / (2 sigma^2)) per axis
    /// with sigma = 0.125 x ROI and x measured from the window's centre, multiplied, clamped
    /// below at max(smallest, 1e-3), not normalised.
    #[test]
    fn gaussian_weights_are_monais() {
        let roi = [4, 6, 96];
        let w = importance(roi, Blend::Gaussian);
        let g = |len: usize, i: usize| {
            let (sigma, x) = (0.125 * len as f64, i as f64 - (len as f64 - 1.0) / 2.0);
            (-x * x / (2.0 * sigma * sigma)).exp()
        };
        let at = |i: usize, j: usize, k: usize| w[(i * roi[1] + j) * roi[2] + k];
        let want = (g(4, 1) * g(6, 2) * g(96, 40)).max(1e-3) as f32;
        assert!((at(1, 2, 40) - want).abs() < 1e-6 * want.max(1e-3), "{} vs {want}", at(1, 2, 40));
        assert_eq!(at(0, 0, 0), 1e-3, "a corner is clamped to 1e-3");
        assert!(at(1, 2, 47) < 1.0, "even sizes have no weight of exactly 1");
    }

    /// A volume and overlapping windows for [`negation`].
    fn negation_pass() -> ([usize; 3], Vec<f32>, WindowSpec) {
        let shape = [30, 20, 17];
        let n: usize = shape.iter().product();
        let image: Vec<f32> = (0..n).map(|i| ((i * 31) % 97) as f32).collect();
        (shape, image, WindowSpec { roi: [16, 16, 8], overlap: 0.5, blend: Blend::Gaussian })
    }

    /// A two-class "model": the window and its negation (channel-first).
    fn negation(w: &[f32]) -> Result<Vec<f32>> {
        Ok(w.iter().copied().chain(w.iter().map(|v| -v)).collect())
    }

    #[test]
    fn parallel_pass_equals_the_sequential_one() {
        let (shape, image, spec) = negation_pass();
        let seq = sliding_window(&image, 1, shape, &spec, 2, negation).unwrap();
        let par = sliding_window_parallel(&image, 1, shape, &spec, 2, 3, negation, |_, _| {}).unwrap();
        assert_eq!(seq, par);
    }

    /// The buffer-reusing pass blends exactly as the allocating one, and hands every window the
    /// same buffer (its reason to exist).
    #[test]
    fn reused_buffer_pass_equals_the_sequential_one() {
        let (shape, image, spec) = negation_pass();
        let seq = sliding_window(&image, 1, shape, &spec, 2, negation).unwrap();
        let mut buffers = std::collections::HashSet::new();
        let into = sliding_window_into(&image, 1, shape, &spec, 2, |w, out| {
            buffers.insert(out.as_ptr() as usize);
            assert_eq!(out.len(), 2 * w.len());
            out.copy_from_slice(&negation(w)?);
            Ok(())
        })
        .unwrap();
        assert_eq!(seq, into);
        assert_eq!(buffers.len(), 1);
    }

    #[test]
    fn dice_counts_overlap_per_class() {
        let truth = [0, 1, 1, 2, 2, 0];
        let pred = [0, 1, 0, 2, 2, 2];
        let d = dice_per_class(&pred, &truth, 4);
        assert!((d[0].unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((d[1].unwrap() - 0.8).abs() < 1e-12);
        assert_eq!(d[2], None);
    }
}
