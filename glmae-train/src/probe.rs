//! A probe of a frozen encoder in minutes: k-NN and linear classifiers on its patch tokens.
//!
//! Each labelled volume is preprocessed as pretraining does and cut into non-overlapping
//! `patch^3` patches (the encoder's patch size); partial patches at the far edge are dropped. With
//! shifts on (the default), the grid is also laid at the 7 other offsets of half a patch along any
//! subset of the axes (`0` or `patch / 2` per axis, 8 grids), which gives about 8 times as many,
//! overlapping, samples per volume; fitting and evaluation volumes alike. A patch's label is its
//! majority class when that class covers at least `min_fraction` of its voxels (background is a
//! class too); other patches are left out.
//!
//! The encoder sees all tokens of one grid at once, unmasked, with the sin-cos position table of
//! that grid, and its output tokens (after the final norm) are the features. They are
//! standardised with the fitting features' mean and standard deviation, then classified by
//! (1) a k-NN on cosine similarity with similarity-weighted votes (DINO's: weight
//! `exp(similarity / 0.07)`) and (2) a multinomial logistic regression (class-balanced, L2),
//! fitted by a fixed number of Nesterov-accelerated gradient steps on the host. Scores on the
//! held-out volumes' patches: balanced accuracy and macro-F1 over the classes present there, and
//! F1 per class. A random-initialised encoder measured on the same patches is the control.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::module::Module;
use burn::tensor::Device;
use glmae_data::preprocess::{CropBox, Preprocessor};
use glmae_data::transforms::Rng;
use glmae_data::{Case, Dataset, Labels, Volume, VolumeCache};
use serde::{Deserialize, Serialize};

use crate::nets::vit::{Vit, tensor};
use crate::pretrain::views::{patchify, sincos_table};

/// Settings of a probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeOptions {
    /// Neighbours of the k-NN classifier.
    pub k: usize,
    /// Temperature of the k-NN vote weights `exp(similarity / temperature)` (DINO: 0.07).
    pub temperature: f64,
    /// A patch is labelled by its majority class only when that class covers at least this
    /// fraction of its voxels.
    pub min_fraction: f64,
    /// Also lay the patch grid at offsets of half a patch (8 grids instead of 1).
    pub shifts: bool,
    /// Seed of the random control encoder and of the fitting subsample.
    pub seed: u64,
    /// Gradient steps of the linear classifier.
    pub linear_steps: usize,
    /// L2 penalty of the linear classifier's weights (not its biases).
    pub l2: f64,
    /// At most this many fitting patches, a seeded subsample (k-NN costs fit x eval x width).
    pub max_fit: usize,
    /// Probe the hidden state after this many transformer blocks (no final norm; 0: the patch
    /// embedding plus positions) instead of the encoder's normed output.
    #[serde(default)]
    pub blocks: Option<usize>,
    /// Probe the run's EMA teacher encoder instead of the student (what fine-tuning starts
    /// from); DINO evaluates its teacher.
    #[serde(default)]
    pub teacher: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            k: 20,
            temperature: 0.07,
            min_fraction: 0.5,
            shifts: true,
            seed: 0,
            linear_steps: 300,
            l2: 1e-4,
            max_fit: 100_000,
            blocks: None,
            teacher: false,
        }
    }
}

/// The labelled patches of one grid of one volume.
#[derive(Clone, Debug, PartialEq)]
pub struct GridPatches {
    /// First voxel of the grid.
    pub offset: [usize; 3],
    /// Patches per axis.
    pub grid: [usize; 3],
    /// Row-major token indices of the kept patches.
    pub tokens: Vec<usize>,
    /// Their labels.
    pub labels: Vec<u8>,
}

/// A preprocessed volume and its labelled patches.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeVolume {
    /// The image file it came from.
    pub name: PathBuf,
    /// The preprocessed image.
    pub image: Volume,
    /// Labelled patches, one entry per grid offset that fits.
    pub grids: Vec<GridPatches>,
}

/// The patches both encoders are measured on: fitting and evaluation volumes, labelled once.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeData {
    /// Patch edge in voxels (the encoder's).
    pub patch: usize,
    /// Class names by label value, background first.
    pub class_names: Vec<String>,
    /// Volumes the classifiers are fitted on.
    pub fit: Vec<ProbeVolume>,
    /// Held-out volumes they are scored on.
    pub eval: Vec<ProbeVolume>,
}

/// Scores of one classifier on the evaluation patches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Mean recall over the classes present in the evaluation patches.
    pub balanced_accuracy: f64,
    /// Mean F1 over the classes present in the evaluation patches.
    pub macro_f1: f64,
    /// Recall per class (`None` for classes absent from the evaluation patches).
    pub recall: Vec<Option<f64>>,
    /// F1 per class (`None` for classes absent from the evaluation patches).
    pub f1: Vec<Option<f64>>,
}

/// What a probe measured for one encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Class names, background first.
    pub class_names: Vec<String>,
    /// Fitting patches per class.
    pub fit_support: Vec<usize>,
    /// Evaluation patches per class.
    pub eval_support: Vec<usize>,
    /// Feature width.
    pub width: usize,
    /// The k-NN classifier.
    pub knn: Scores,
    /// The linear classifier.
    pub linear: Scores,
}

/// Grid offsets: `[0, 0, 0]`, and with `shifts` every combination of `0` and `patch / 2` per
/// axis (8 offsets).
pub fn grid_offsets(patch: usize, shifts: bool) -> Vec<[usize; 3]> {
    if !shifts || patch < 2 {
        return vec![[0; 3]];
    }
    let h = patch / 2;
    (0..8).map(|m| [(m >> 2) & 1, (m >> 1) & 1, m & 1].map(|b| b * h)).collect()
}

/// Whole patches per axis of a grid starting at `offset` (partial patches at the far edge are
/// dropped); zero along an axis shorter than `offset + patch`.
pub fn grid_shape(shape: [usize; 3], patch: usize, offset: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|a| shape[a].saturating_sub(offset[a]) / patch.max(1))
}

/// The label of each patch of the grid at `offset`: its majority class (the lowest on a tie) when
/// that class covers at least `min_fraction` of the `patch^3` voxels, else `None`. Returns the
/// grid and one entry per patch in row-major grid order.
pub fn patch_labels(
    labels: &Labels,
    patch: usize,
    offset: [usize; 3],
    min_fraction: f64,
) -> ([usize; 3], Vec<Option<u8>>) {
    let grid = grid_shape(labels.shape, patch, offset);
    let voxels = patch * patch * patch;
    let mut out = Vec::with_capacity(grid.iter().product());
    let mut counts = [0usize; 256];
    for gz in 0..grid[0] {
        for gy in 0..grid[1] {
            for gx in 0..grid[2] {
                counts.fill(0);
                let start = [gz, gy, gx].map(|g| g * patch);
                for z in 0..patch {
                    for y in 0..patch {
                        let row = labels.index(
                            offset[0] + start[0] + z,
                            offset[1] + start[1] + y,
                            offset[2] + start[2],
                        );
                        for &l in &labels.data[row..row + patch] {
                            counts[l as usize] += 1;
                        }
                    }
                }
                // `max_by_key` keeps the last maximum; scanning in reverse makes that the lowest.
                let (class, &n) = counts.iter().enumerate().rev().max_by_key(|&(_, n)| *n).unwrap_or((0, &0));
                out.push((n as f64 >= min_fraction * voxels as f64 && n > 0).then_some(class as u8));
            }
        }
    }
    (grid, out)
}

/// Encodes every patch of `image` on the grid at `offset`, all tokens at once and unmasked.
///
/// # Shapes
/// The encoder sees tokens `(1, tokens, channels * patch^3)` with the sin-cos table
/// `(tokens, width)` of the grid and returns `(1, tokens, width)` after its final norm; that comes
/// back as host values `(tokens, width)`, row-major, tokens in row-major grid order.
pub fn encode_grid(
    encoder: &Vit,
    image: &Volume,
    patch: usize,
    offset: [usize; 3],
    blocks: Option<usize>,
    device: &Device,
) -> Result<([usize; 3], Vec<f32>)> {
    let grid = grid_shape(image.shape, patch, offset);
    ensure!(grid.iter().all(|&g| g > 0), "a {:?} volume holds no {patch}^3 patch at {offset:?}", image.shape);
    let crop = CropBox { start: offset, size: grid.map(|g| g * patch) }.apply(image);
    let (grid, tokens) = patchify(&crop, patch);
    let n = grid.iter().product::<usize>();
    let [values, width] = encoder.patch_embedding.patch_embeddings.weight.dims();
    ensure!(
        values == image.channels * patch * patch * patch,
        "the encoder takes {values} values per token, a {patch}^3 patch of {} channel(s) has {}",
        image.channels,
        image.channels * patch * patch * patch
    );
    let x = tensor(tokens, [1, n, values], device);
    let pos = tensor(sincos_table(grid, width), [n, width], device);
    let out = match blocks {
        Some(n) => encoder.forward_blocks(x, pos, n),
        None => encoder.forward(x, pos, None),
    };
    let out = out.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok((grid, out))
}

impl ProbeVolume {
    /// Labels the patches of a preprocessed volume on every grid offset that fits; `name` (the
    /// image file) names it in errors.
    pub fn new(
        name: &Path,
        image: Volume,
        labels: &Labels,
        patch: usize,
        opts: &ProbeOptions,
    ) -> Result<Self> {
        ensure!(
            labels.shape == image.shape,
            "{}: labels {:?} and image {:?} differ after preprocessing",
            name.display(),
            labels.shape,
            image.shape
        );
        ensure!(
            grid_shape(image.shape, patch, [0; 3]).iter().all(|&g| g > 0),
            "{}: the preprocessed volume {:?} is smaller than one {patch}^3 patch",
            name.display(),
            image.shape
        );
        let mut grids = Vec::new();
        for offset in grid_offsets(patch, opts.shifts) {
            let (grid, all) = patch_labels(labels, patch, offset, opts.min_fraction);
            if grid.contains(&0) {
                continue; // a shifted grid that no longer fits this volume
            }
            let (tokens, labels) = all.iter().enumerate().filter_map(|(t, l)| l.map(|l| (t, l))).unzip();
            grids.push(GridPatches { offset, grid, tokens, labels });
        }
        Ok(Self { name: name.to_path_buf(), image, grids })
    }

    /// Labelled patches over all grids.
    pub fn patches(&self) -> usize {
        self.grids.iter().map(|g| g.tokens.len()).sum()
    }
}

impl ProbeData {
    /// Reads, preprocesses with `prep` and labels the patches of the `fit` and `eval` cases (every
    /// case needs a label file), keeping at most `opts.max_fit` fitting patches (seeded).
    pub fn prepare(
        fit: &[Case],
        eval: &[Case],
        prep: &Preprocessor,
        patch: usize,
        class_names: Vec<String>,
        opts: &ProbeOptions,
    ) -> Result<Self> {
        ensure!(!fit.is_empty(), "no labelled training cases to fit the probe on");
        ensure!(!eval.is_empty(), "no validation cases to score the probe on");
        ensure!(patch > 0, "patch size 0");
        let cache = VolumeCache::new(prep.clone(), None);
        let load = |cases: &[Case]| -> Result<Vec<ProbeVolume>> {
            cases
                .iter()
                .map(|c| {
                    ensure!(
                        c.label.is_some(),
                        "{} has no label file; the probe needs labelled cases",
                        c.image.display()
                    );
                    let p = cache.get(c)?;
                    let labels = p
                        .labels
                        .as_ref()
                        .with_context(|| format!("{} lost its labels", c.image.display()))?;
                    ProbeVolume::new(&c.image, p.image.clone(), labels, patch, opts)
                })
                .collect()
        };
        let mut data = Self { patch, class_names, fit: load(fit)?, eval: load(eval)? };
        data.subsample_fit(opts.max_fit, opts.seed);
        Ok(data)
    }

    /// Keeps a seeded random `max` of the fitting patches (all when there are fewer).
    pub fn subsample_fit(&mut self, max: usize, seed: u64) {
        let all: Vec<(usize, usize, usize)> = self
            .fit
            .iter()
            .enumerate()
            .flat_map(|(v, vol)| {
                vol.grids
                    .iter()
                    .enumerate()
                    .flat_map(move |(g, grid)| (0..grid.tokens.len()).map(move |j| (v, g, j)))
            })
            .collect();
        if all.len() <= max {
            return;
        }
        // Partial Fisher-Yates: the first `max` of a seeded shuffle.
        let mut order: Vec<usize> = (0..all.len()).collect();
        let mut rng = Rng::new(seed ^ 0x0050_b1e5);
        for i in 0..max {
            order.swap(i, i + rng.below(all.len() - i));
        }
        let mut keep = vec![false; all.len()];
        for &i in &order[..max] {
            keep[i] = true;
        }
        let mut flags = keep.into_iter();
        for vol in &mut self.fit {
            for grid in &mut vol.grids {
                let k: Vec<bool> = flags.by_ref().take(grid.tokens.len()).collect();
                let mut it = k.iter();
                grid.tokens.retain(|_| it.next().copied().unwrap_or(false));
                let mut it = k.iter();
                grid.labels.retain(|_| it.next().copied().unwrap_or(false));
            }
        }
    }

    /// Number of classes: the named ones, or more when a label value lies beyond them.
    pub fn classes(&self) -> usize {
        let max = self
            .fit
            .iter()
            .chain(&self.eval)
            .flat_map(|v| v.grids.iter().flat_map(|g| g.labels.iter()))
            .max()
            .map_or(0, |&m| m as usize + 1);
        self.class_names.len().max(max)
    }
}

/// The encoder's features and the labels of every labelled patch of `volumes`.
///
/// # Shapes
/// Returns `(patches, width)` host values, row-major, with `patches` labels, and `width`.
pub fn features(
    encoder: &Vit,
    volumes: &[ProbeVolume],
    patch: usize,
    blocks: Option<usize>,
    device: &Device,
) -> Result<(Vec<f32>, Vec<u8>, usize)> {
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut width = 0;
    for vol in volumes {
        for g in vol.grids.iter().filter(|g| !g.tokens.is_empty()) {
            let (_, f) = encode_grid(encoder, &vol.image, patch, g.offset, blocks, device)
                .with_context(|| format!("{}", vol.name.display()))?;
            width = f.len() / g.grid.iter().product::<usize>().max(1);
            for &t in &g.tokens {
                x.extend_from_slice(&f[t * width..(t + 1) * width]);
            }
            y.extend_from_slice(&g.labels);
        }
    }
    Ok((x, y, width))
}

/// Standardises every feature (column) of `fit` and `eval` (`(n, width)` row-major) with the
/// mean and standard deviation of `fit`'s; a constant column becomes 0.
pub fn standardise(fit: &mut [f32], eval: &mut [f32], width: usize) {
    if width == 0 || fit.is_empty() {
        return;
    }
    let n = (fit.len() / width) as f64;
    let mut mean = vec![0.0f64; width];
    let mut sq = vec![0.0f64; width];
    for row in fit.chunks_exact(width) {
        for (j, &v) in row.iter().enumerate() {
            mean[j] += v as f64;
            sq[j] += v as f64 * v as f64;
        }
    }
    let scale: Vec<f64> = (0..width)
        .map(|j| {
            mean[j] /= n;
            let var = (sq[j] / n - mean[j] * mean[j]).max(0.0);
            if var > 1e-12 { 1.0 / var.sqrt() } else { 0.0 }
        })
        .collect();
    for row in fit.chunks_exact_mut(width).chain(eval.chunks_exact_mut(width)) {
        for (j, v) in row.iter_mut().enumerate() {
            *v = ((*v as f64 - mean[j]) * scale[j]) as f32;
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: the compiler vectorises this.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for ((a, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *a += u * v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn l2_normalised(x: &[f32], width: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(width.max(1)) {
        let norm = dot(row, row).sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    }
    out
}

/// k-NN prediction: for each `eval` row, the `k` `fit` rows of highest cosine similarity vote for
/// their labels with weight `exp(similarity / temperature)` (DINO's k-NN); the heaviest class wins
/// (the lowest on a tie).
///
/// # Shapes
/// `fit` is `(n_fit, width)` with `fit_labels` of length `n_fit`, `eval` is `(n_eval, width)`,
/// all row-major; returns `n_eval` labels.
pub fn knn_predict(
    fit: &[f32],
    fit_labels: &[u8],
    eval: &[f32],
    width: usize,
    classes: usize,
    k: usize,
    temperature: f64,
) -> Vec<u8> {
    let (fit, eval) = (l2_normalised(fit, width), l2_normalised(eval, width));
    let k = k.clamp(1, fit_labels.len().max(1));
    let classes = classes.max(fit_labels.iter().max().map_or(1, |&m| m as usize + 1));
    let mut top: Vec<(f32, u8)> = Vec::with_capacity(k + 1);
    let mut votes = vec![0.0f64; classes];
    eval.chunks_exact(width.max(1))
        .map(|q| {
            top.clear();
            for (row, &label) in fit.chunks_exact(width.max(1)).zip(fit_labels) {
                let s = dot(q, row);
                // `top` stays sorted, most similar first; ties keep the earlier fit row.
                if top.len() < k || top.last().is_some_and(|&(m, _)| s > m) {
                    let at = top.partition_point(|&(t, _)| t >= s);
                    top.insert(at, (s, label));
                    top.truncate(k);
                }
            }
            votes.fill(0.0);
            for &(s, label) in &top {
                votes[label as usize] += (s as f64 / temperature).exp();
            }
            argmax(&votes) as u8
        })
        .collect()
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// A multinomial logistic regression: `classes` rows of `width` weights and a bias.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearClassifier {
    /// Feature width.
    pub width: usize,
    /// Classes.
    pub classes: usize,
    /// `(classes, width + 1)` row-major; the last column is the bias.
    pub weights: Vec<f64>,
}

impl LinearClassifier {
    /// Class scores of one feature row.
    fn logits(&self, x: &[f32], out: &mut [f64]) {
        let w1 = self.width + 1;
        for (c, o) in out.iter_mut().enumerate() {
            let w = &self.weights[c * w1..(c + 1) * w1];
            *o = w[self.width] + x.iter().zip(w).map(|(&a, &b)| a as f64 * b).sum::<f64>();
        }
    }

    /// The most likely class of each row of `x` (`(n, width)` row-major).
    pub fn predict(&self, x: &[f32]) -> Vec<u8> {
        let mut z = vec![0.0; self.classes];
        x.chunks_exact(self.width.max(1))
            .map(|row| {
                self.logits(row, &mut z);
                argmax(&z) as u8
            })
            .collect()
    }

    /// The class-weighted mean cross-entropy plus `l2 / 2 * |W|^2` (biases unpenalised) on `x`,
    /// `y` with per-row weights `w`, and its gradient.
    fn loss_and_grad(&self, x: &[f32], y: &[u8], w: &[f64], l2: f64) -> (f64, Vec<f64>) {
        let (d, w1) = (self.width, self.width + 1);
        let mut grad = vec![0.0; self.weights.len()];
        let mut z = vec![0.0; self.classes];
        let mut loss = 0.0;
        let n = y.len().max(1) as f64;
        for ((row, &label), &weight) in x.chunks_exact(d.max(1)).zip(y).zip(w) {
            self.logits(row, &mut z);
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
            loss += weight * (m + sum.ln() - z[label as usize]) / n;
            for (c, &zc) in z.iter().enumerate() {
                let p = (zc - m).exp() / sum;
                let g = weight * (p - f64::from(c == label as usize)) / n;
                if g == 0.0 {
                    continue;
                }
                let gr = &mut grad[c * w1..(c + 1) * w1];
                for (o, &v) in gr.iter_mut().zip(row) {
                    *o += g * v as f64;
                }
                gr[d] += g;
            }
        }
        for c in 0..self.classes {
            for j in 0..d {
                let v = self.weights[c * w1 + j];
                loss += 0.5 * l2 * v * v;
                grad[c * w1 + j] += l2 * v;
            }
        }
        (loss, grad)
    }
}

/// Per-row weights that give every class present the same total weight (mean weight 1).
pub fn balanced_weights(y: &[u8], classes: usize) -> Vec<f64> {
    let mut counts = vec![0usize; classes.max(y.iter().max().map_or(0, |&m| m as usize + 1))];
    for &l in y {
        counts[l as usize] += 1;
    }
    let present = counts.iter().filter(|&&c| c > 0).count().max(1) as f64;
    y.iter().map(|&l| y.len() as f64 / (present * counts[l as usize] as f64)).collect()
}

/// Fits a class-balanced multinomial logistic regression with L2 penalty `l2` by `steps`
/// Nesterov-accelerated gradient steps of size `1 / L`, where `L` bounds the loss's curvature
/// (half the largest eigenvalue of the weighted feature covariance, by power iteration, plus
/// `l2`). Deterministic.
///
/// # Shapes
/// `x` is `(n, width)` row-major with `n` labels `y`.
pub fn fit_linear(
    x: &[f32],
    y: &[u8],
    width: usize,
    classes: usize,
    steps: usize,
    l2: f64,
) -> LinearClassifier {
    let classes = classes.max(y.iter().max().map_or(1, |&m| m as usize + 1));
    let w = balanced_weights(y, classes);
    let step = 1.0 / curvature_bound(x, &w, width, l2);
    let mut model = LinearClassifier { width, classes, weights: vec![0.0; classes * (width + 1)] };
    let mut prev = model.weights.clone();
    for t in 0..steps {
        // Look ahead along the momentum, take the gradient there.
        let beta = t as f64 / (t as f64 + 3.0);
        let ahead: Vec<f64> =
            model.weights.iter().zip(&prev).map(|(&cur, &old)| cur + beta * (cur - old)).collect();
        let probe = LinearClassifier { weights: ahead, ..model.clone() };
        let (_, grad) = probe.loss_and_grad(x, y, &w, l2);
        prev = std::mem::take(&mut model.weights);
        model.weights = probe.weights.iter().zip(&grad).map(|(&a, &g)| a - step * g).collect();
    }
    model
}

/// An upper bound on the curvature of the weighted softmax cross-entropy: the softmax Hessian is
/// at most `I / 2` (Böhning), so `L <= lambda_max(sum_i w_i x_i x_i^T / n) / 2 + l2` with `x_i`
/// extended by the bias's 1. Power iteration underestimates slightly, hence the margin.
fn curvature_bound(x: &[f32], w: &[f64], width: usize, l2: f64) -> f64 {
    let n = w.len().max(1) as f64;
    let mut v = vec![1.0 / ((width + 1) as f64).sqrt(); width + 1];
    let mut lambda = 1.0;
    for _ in 0..30 {
        let mut next = vec![0.0; width + 1];
        for (row, &wi) in x.chunks_exact(width.max(1)).zip(w) {
            let s = wi * (v[width] + row.iter().zip(&v).map(|(&a, &b)| a as f64 * b).sum::<f64>()) / n;
            for (o, &a) in next.iter_mut().zip(row) {
                *o += s * a as f64;
            }
            next[width] += s;
        }
        lambda = next.iter().map(|a| a * a).sum::<f64>().sqrt();
        if lambda <= 0.0 {
            return 1.0 + l2;
        }
        v = next.iter().map(|a| a / lambda).collect();
    }
    1.1 * 0.5 * lambda + l2
}

/// Balanced accuracy, macro-F1 and per-class recall and F1 of `pred` against `truth`, over the
/// classes present in `truth`.
pub fn scores(truth: &[u8], pred: &[u8], classes: usize) -> Scores {
    let classes = classes.max(truth.iter().chain(pred).max().map_or(0, |&m| m as usize + 1));
    let (mut tp, mut support, mut predicted) =
        (vec![0usize; classes], vec![0usize; classes], vec![0usize; classes]);
    for (&t, &p) in truth.iter().zip(pred) {
        support[t as usize] += 1;
        predicted[p as usize] += 1;
        if t == p {
            tp[t as usize] += 1;
        }
    }
    let recall: Vec<Option<f64>> =
        (0..classes).map(|c| (support[c] > 0).then(|| tp[c] as f64 / support[c] as f64)).collect();
    let f1: Vec<Option<f64>> = (0..classes)
        .map(|c| (support[c] > 0).then(|| 2.0 * tp[c] as f64 / (support[c] + predicted[c]) as f64))
        .collect();
    let mean = |v: &[Option<f64>]| {
        let p: Vec<f64> = v.iter().flatten().copied().collect();
        if p.is_empty() { 0.0 } else { p.iter().sum::<f64>() / p.len() as f64 }
    };
    Scores { balanced_accuracy: mean(&recall), macro_f1: mean(&f1), recall, f1 }
}

fn counts(y: &[u8], classes: usize) -> Vec<usize> {
    let mut c = vec![0; classes];
    for &l in y {
        if let Some(n) = c.get_mut(l as usize) {
            *n += 1;
        }
    }
    c
}

/// Measures `encoder` (frozen) on `data`: features of every labelled patch, standardised with
/// the fitting features' statistics, then k-NN and linear classifiers fitted on the fitting
/// volumes and scored on the evaluation volumes.
pub fn probe(encoder: &Vit, data: &ProbeData, opts: &ProbeOptions, device: &Device) -> Result<ProbeResult> {
    let encoder = encoder.clone().valid();
    let (mut fit_x, fit_y, width) = features(&encoder, &data.fit, data.patch, opts.blocks, device)?;
    let (mut eval_x, eval_y, _) = features(&encoder, &data.eval, data.patch, opts.blocks, device)?;
    ensure!(!fit_y.is_empty(), "no fitting patch has a class covering {} of its voxels", opts.min_fraction);
    ensure!(
        !eval_y.is_empty(),
        "no evaluation patch has a class covering {} of its voxels",
        opts.min_fraction
    );
    ensure!(
        fit_x.iter().chain(&eval_x).all(|v| v.is_finite()),
        "the encoder's features hold NaN or infinite values"
    );
    standardise(&mut fit_x, &mut eval_x, width);
    let classes = data.classes();
    let knn = knn_predict(&fit_x, &fit_y, &eval_x, width, classes, opts.k, opts.temperature);
    let linear = fit_linear(&fit_x, &fit_y, width, classes, opts.linear_steps, opts.l2).predict(&eval_x);
    let mut class_names = data.class_names.clone();
    class_names.extend((class_names.len()..classes).map(|c| format!("class {c}")));
    Ok(ProbeResult {
        class_names,
        fit_support: counts(&fit_y, classes),
        eval_support: counts(&eval_y, classes),
        width,
        knn: scores(&eval_y, &knn, classes),
        linear: scores(&eval_y, &linear, classes),
    })
}

impl ProbeResult {
    /// A markdown table of this result (`names.0`) beside `other` (`names.1`, measured on the same
    /// patches): one row per class seen in fitting or evaluation with its patch counts, k-NN and
    /// linear F1 of both, then balanced accuracy and macro-F1.
    pub fn markdown_side_by_side(&self, other: &ProbeResult, names: (&str, &str)) -> String {
        let (a, b) = names;
        let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
        let at = |s: &Scores, c: usize| s.f1.get(c).copied().flatten();
        let mut s = format!(
            "| class | fit patches | eval patches | k-NN F1 {a} | k-NN F1 {b} | linear F1 {a} | linear F1 {b} |\n\
             |---|---:|---:|---:|---:|---:|---:|\n"
        );
        for (c, name) in self.class_names.iter().enumerate() {
            let (nf, ne) = (self.fit_support[c], self.eval_support[c]);
            if nf + ne == 0 {
                continue;
            }
            let _ = writeln!(
                s,
                "| {name} | {nf} | {ne} | {} | {} | {} | {} |",
                f(at(&self.knn, c)),
                f(at(&other.knn, c)),
                f(at(&self.linear, c)),
                f(at(&other.linear, c))
            );
        }
        let (nf, ne) = (self.fit_support.iter().sum::<usize>(), self.eval_support.iter().sum::<usize>());
        for (label, get) in [
            ("balanced accuracy", (|s: &Scores| s.balanced_accuracy) as fn(&Scores) -> f64),
            ("macro-F1", |s: &Scores| s.macro_f1),
        ] {
            let _ = writeln!(
                s,
                "| **{label}** | {nf} | {ne} | **{:.3}** | **{:.3}** | **{:.3}** | **{:.3}** |",
                get(&self.knn),
                get(&other.knn),
                get(&self.linear),
                get(&other.linear)
            );
        }
        s
    }
}

/// The preprocessing a probe of `run` uses: pretraining's, at `spacing` when given, else at the
/// spacing `config.json` records (`"spacing"` or `"preprocessing": {"spacing"}`), else at the
/// first training image's own spacing (in RAS axis order), which is how phantom runs train.
pub fn run_preprocessor(run: &Path, ds: &Dataset, spacing: Option<[f32; 3]>) -> Result<Preprocessor> {
    let mut prep = Preprocessor::pretraining();
    if let Some(s) = spacing.or(stored_spacing(run)) {
        prep.spacing = s;
        return Ok(prep);
    }
    let first = ds.training.first().context("the dataset lists no training cases")?;
    let img = glmae_data::read_nifti(&first.image)?;
    let (orient, sp) = (img.volume.affine.orientation(), img.volume.affine.spacing());
    // Output axis w of RAS reads the input axis that points along world axis w.
    prep.spacing =
        std::array::from_fn(|w| orient.iter().position(|&(x, _)| x == w).map_or(sp[w], |a| sp[a]) as f32);
    Ok(prep)
}

fn stored_spacing(run: &Path) -> Option<[f32; 3]> {
    let text = std::fs::read_to_string(run.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let s = v.get("spacing").or_else(|| v.get("preprocessing")?.get("spacing"))?;
    serde_json::from_value(s.clone()).ok()
}

/// Both encoders' results and where they were written.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// The run's student encoder (what fine-tuning starts from).
    pub pretrained: ProbeResult,
    /// A random-initialised encoder of the same configuration.
    pub random: ProbeResult,
    /// The side-by-side markdown table.
    pub markdown: String,
    /// `probe.md`.
    pub markdown_path: PathBuf,
    /// `probe.json`.
    pub json_path: PathBuf,
}

/// Probes the student encoder of pretraining run `run` and a random-initialised one (seeded by
/// `opts.seed`) on dataset `data` (fitted on its training cases, scored on its validation cases),
/// writing `out/probe.md` and `out/probe.json`.
pub fn probe_run(
    run: &Path,
    data: &Path,
    out: &Path,
    opts: &ProbeOptions,
    spacing: Option<[f32; 3]>,
    device: &Device,
) -> Result<ProbeReport> {
    let dir = crate::pretrain::run::RunDir::open(run)?;
    ensure!(
        dir.checkpoint_path().is_file(),
        "{}: no checkpoint.bin; the run has not saved weights yet",
        run.display()
    );
    let ds = Dataset::from_json(data)?;
    ensure!(
        !ds.validation.is_empty(),
        "{} lists no validation cases; the probe scores on held-out volumes",
        data.display()
    );
    if let Some(c) = ds.training.iter().chain(&ds.validation).find(|c| c.label.is_none()) {
        bail!("{}: {} has no label; the probe needs labelled cases", data.display(), c.image.display());
    }
    let names: Vec<String> = match ds.labels.keys().last() {
        Some(&last) => {
            (0..=last).map(|c| ds.labels.get(&c).cloned().unwrap_or_else(|| format!("class {c}"))).collect()
        }
        None => Vec::new(),
    };
    // Fine-tuning starts from the student's encoder (finetune.rs, `init_from`): probe that one
    // unless the teacher is asked for.
    let pre = dir.load_weights(device.clone())?;
    let encoder = if opts.teacher { &pre.teacher.vit } else { &pre.student.vit };
    let patch = pre.cfg.encoder.patch_size as usize;
    let prep = run_preprocessor(run, &ds, spacing)?;
    let probe_data = ProbeData::prepare(&ds.training, &ds.validation, &prep, patch, names, opts)?;
    let pretrained = probe(encoder, &probe_data, opts, device)?;
    device.seed(opts.seed);
    let random_vit = Vit::new(&pre.cfg.encoder, device);
    let random = probe(&random_vit, &probe_data, opts, device)?;

    let fit_n: usize = probe_data.fit.iter().map(ProbeVolume::patches).sum();
    let eval_n: usize = probe_data.eval.iter().map(ProbeVolume::patches).sum();
    let mut markdown = format!(
        "Probe of {} on {}: {} fitting patches from {} volume(s), {} evaluation patches from {} \
         volume(s), {}^3 patches, {} grid(s) per volume, spacing {:?} mm, k = {}, min fraction {}, \
         features: {} of the {} encoder\n\n",
        run.display(),
        data.display(),
        fit_n,
        probe_data.fit.len(),
        eval_n,
        probe_data.eval.len(),
        patch,
        grid_offsets(patch, opts.shifts).len(),
        prep.spacing,
        opts.k,
        opts.min_fraction,
        opts.blocks
            .map_or("the encoder's normed output".to_string(), |n| format!("after {n} block(s), no norm")),
        if opts.teacher { "teacher" } else { "student" }
    );
    markdown.push_str(&pretrained.markdown_side_by_side(&random, ("pretrained", "random")));
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let markdown_path = out.join("probe.md");
    let json_path = out.join("probe.json");
    glmae_data::io::atomic_write(&markdown_path, markdown.as_bytes())?;
    let json = serde_json::json!({
        "run": run,
        "data": data,
        "patch": patch,
        "spacing": prep.spacing,
        "options": opts,
        "fit_volumes": probe_data.fit.iter().map(|v| &v.name).collect::<Vec<_>>(),
        "eval_volumes": probe_data.eval.iter().map(|v| &v.name).collect::<Vec<_>>(),
        "pretrained": pretrained,
        "random": random,
    });
    glmae_data::io::atomic_write(&json_path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    Ok(ProbeReport { pretrained, random, markdown, markdown_path, json_path })
}
