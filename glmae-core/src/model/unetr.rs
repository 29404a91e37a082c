//! UNETR: the encoder's hidden states decoded to per-voxel class logits.
//!
//! The decoder runs coarse to fine and computes each skip connection just before it is needed,
//! so only one full-resolution skip is alive at a time. Every buffer comes from caller scratch.

use super::arena::{Arena, ForwardError, sat_sum};
use super::points::{Points, Probe, ResPoints, SkipPoints, UpPoints};
use super::vit::{VitDims, encode};
use super::weights::{PrUpWeights, ResBlockWeights, UnetrWeights, UpWeights};
use crate::config::UnetrConfig;
use crate::format::{FormatError, ModelFile};
use crate::kernels::{
    ConvGeometry, Dims3, INSTANCE_NORM_EPS, conv_transpose3d, conv3d, instance_norm_in_place,
    leaky_relu_in_place, voxels,
};

/// A UNETR ready to run, borrowing its weights from a parsed file.
#[derive(Clone, Debug)]
pub struct Unetr<'a> {
    pub(crate) config: UnetrConfig,
    pub(crate) weights: UnetrWeights<'a>,
    /// [`super::points::ACTIVATION_SCALES`], when the file was calibrated for the integer pass.
    pub(crate) activation_scales: Option<crate::tensor::Tensor<'a>>,
    /// Whether every Linear and convolution weight is int8.
    pub(crate) int8_weights: bool,
}

pub(crate) fn double(d: Dims3) -> Dims3 {
    d.map(|v| v * 2)
}

pub(crate) fn vox(d: Dims3) -> usize {
    d.iter().fold(1usize, |a, &b| a.saturating_mul(b))
}

/// Scratch for [`res_block`] producing `out_ch` channels over `v` voxels.
fn res_block_scratch(w: &ResBlockWeights<'_>, v: usize) -> usize {
    w.shape.out_ch.saturating_mul(v)
}

/// MONAI's `UnetResBlock`: conv-norm-lrelu, conv-norm, plus the (projected) input, lrelu.
fn res_block(
    w: &ResBlockWeights<'_>,
    x: &[f32],
    dims: Dims3,
    out: &mut [f32],
    scratch: &mut [f32],
    (probe, points): (&mut Probe<'_>, ResPoints),
) -> Result<(), ForwardError> {
    let (o, v) = (w.shape.out_ch, voxels(dims));
    let a = Arena::new(scratch).take(o * v)?;
    conv3d(x, dims, &w.conv1, None, ConvGeometry::K3, a);
    instance_norm_in_place(a, o, INSTANCE_NORM_EPS);
    leaky_relu_in_place(a);
    probe.see(points.a, a);
    conv3d(a, dims, &w.conv2, None, ConvGeometry::K3, out);
    instance_norm_in_place(out, o, INSTANCE_NORM_EPS);
    let residual: &[f32] = match &w.conv3 {
        Some(proj) => {
            conv3d(x, dims, proj, None, ConvGeometry::K1, a);
            instance_norm_in_place(a, o, INSTANCE_NORM_EPS);
            a
        }
        None => &x[..o * v],
    };
    for (y, r) in out.iter_mut().zip(residual) {
        *y += r;
    }
    leaky_relu_in_place(out);
    Ok(())
}

/// Scratch for [`skip_path`] from the token grid `grid`.
fn skip_path_scratch(w: &PrUpWeights<'_>, grid: Dims3) -> usize {
    let o = w.shape.out_ch;
    let mut dims = double(grid);
    if w.blocks.is_empty() {
        return 0;
    }
    let mut total = o.saturating_mul(vox(dims));
    let last = w.blocks.len() - 1;
    for (j, s) in w.blocks.iter().enumerate() {
        dims = double(dims);
        let v = vox(dims);
        let res_out = if j == last { 0 } else { o.saturating_mul(v) };
        total = sat_sum(&[total, o.saturating_mul(v), res_out, res_block_scratch(&s.res_block, v)]);
    }
    total
}

/// MONAI's `UnetrPrUpBlock` from a hidden-state volume `z` on `grid` into `out`.
fn skip_path(
    w: &PrUpWeights<'_>,
    z: &[f32],
    grid: Dims3,
    out: &mut [f32],
    scratch: &mut [f32],
    (probe, points): (&mut Probe<'_>, SkipPoints),
) -> Result<(), ForwardError> {
    let o = w.shape.out_ch;
    let mut dims = double(grid);
    if w.blocks.is_empty() {
        conv_transpose3d(z, grid, &w.transp_conv_init, ConvGeometry::UP2, out);
        return Ok(());
    }
    let mut arena = Arena::new(scratch);
    let mut cur: &mut [f32] = arena.take(o * voxels(dims))?;
    conv_transpose3d(z, grid, &w.transp_conv_init, ConvGeometry::UP2, cur);
    probe.see(points.init, cur);
    let mut out = Some(out);
    let last = w.blocks.len() - 1;
    for (j, s) in w.blocks.iter().enumerate() {
        let sp = points.stages[j];
        let up = arena.take(o * voxels(double(dims)))?;
        conv_transpose3d(cur, dims, &s.transp_conv, ConvGeometry::UP2, up);
        probe.see(sp.up, up);
        dims = double(dims);
        let res_out =
            if j == last { out.take().unwrap_or_default() } else { arena.take(o * voxels(dims))? };
        res_block(&s.res_block, up, dims, res_out, arena.rest(), (probe, sp.res))?;
        if j != last {
            probe.see(sp.out, res_out);
        }
        cur = res_out;
    }
    Ok(())
}

/// Scratch for [`up_block`] at output resolution `v` voxels, given its skip's own scratch.
fn up_block_scratch(w: &UpWeights<'_>, v: usize, skip_scratch: usize) -> usize {
    let o = w.shape.out_ch;
    sat_sum(&[o.saturating_mul(2).saturating_mul(v), skip_scratch.max(res_block_scratch(&w.conv_block, v))])
}

/// MONAI's `UnetrUpBlock`: upsample `x` (on `coarse`), concatenate the skip that `skip` writes,
/// residual block into `out`.
fn up_block(
    w: &UpWeights<'_>,
    x: &[f32],
    coarse: Dims3,
    skip: impl FnOnce(&mut [f32], &mut [f32], &mut Probe<'_>) -> Result<(), ForwardError>,
    out: &mut [f32],
    scratch: &mut [f32],
    (probe, points): (&mut Probe<'_>, UpPoints),
) -> Result<(), ForwardError> {
    let dims = double(coarse);
    let ov = w.shape.out_ch * voxels(dims);
    let mut arena = Arena::new(scratch);
    let cat = arena.take(2 * ov)?;
    let (upsampled, skipped) = cat.split_at_mut(ov);
    skip(skipped, arena.rest(), probe)?;
    conv_transpose3d(x, coarse, &w.transp_conv, ConvGeometry::UP2, upsampled);
    probe.see(points.up, upsampled);
    probe.see(points.skip, skipped);
    res_block(&w.conv_block, cat, dims, out, arena.rest(), (probe, points.res))?;
    probe.see(points.out, out);
    Ok(())
}

impl<'a> Unetr<'a> {
    /// Binds a parsed file's weights.
    pub fn new(file: &ModelFile<'a>) -> Result<Self, FormatError> {
        let weights = UnetrWeights::bind(file)?;
        // Weight matrices are the rank-2 (Linear) and rank-5 (convolution) tensors.
        let int8_weights =
            file.tensors().filter(|(_, t)| matches!(t.shape().dims().len(), 2 | 5)).all(|(_, t)| t.is_int8());
        Ok(Self {
            config: file.config,
            weights,
            activation_scales: super::points::activation_scales(file)?,
            int8_weights,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &UnetrConfig {
        &self.config
    }

    /// The bound weights.
    pub fn weights(&self) -> &UnetrWeights<'a> {
        &self.weights
    }

    /// `input` has [`Self::input_len`] values for `window`, all finite.
    pub(crate) fn check_input(&self, input: &[f32], window: Dims3) -> Result<(), ForwardError> {
        let expected = self.input_len(window);
        if input.len() != expected {
            return Err(ForwardError::InputLength { expected, found: input.len() });
        }
        match input.iter().position(|v| !v.is_finite()) {
            Some(index) => Err(ForwardError::NonFiniteInput { index }),
            None => Ok(()),
        }
    }

    /// Input values for `window`: `in_channels x voxels`, channel-first.
    pub fn input_len(&self, window: Dims3) -> usize {
        (self.config.vit.in_channels as usize).saturating_mul(vox(window))
    }

    /// Logit values for `window`: `out_channels x voxels`, channel-first.
    pub fn logits_len(&self, window: Dims3) -> usize {
        (self.config.out_channels as usize).saturating_mul(vox(window))
    }

    /// How many f32 values of scratch [`Self::forward`] needs for `window`.
    pub fn scratch_len(&self, window: Dims3) -> Result<usize, ForwardError> {
        self.config.check_window(window).map_err(ForwardError::Window)?;
        let vd = VitDims::new(&self.config.vit, window);
        let taps = vd.tokens.saturating_mul(vd.hidden).saturating_mul(4);
        let w = &self.weights;
        let g = vd.grid;
        let levels = [double(g), double(double(g)), double(double(double(g))), window];
        // Each decoder output stays alive while the finer stages run (a bump allocator).
        let mut held = 0usize;
        let mut peak = vd.scratch_len();
        for (k, up) in w.ups().into_iter().enumerate() {
            let v = vox(levels[k]);
            let skip = match k {
                3 => res_block_scratch(&w.encoder1, v),
                _ => skip_path_scratch(w.skips()[2 - k], g),
            };
            let out = up.shape.out_ch.saturating_mul(v);
            peak = peak.max(sat_sum(&[held, out, up_block_scratch(up, v, skip)]));
            held = held.saturating_add(out);
        }
        Ok(taps.saturating_add(peak))
    }

    /// Logits for one window: `input` is `(in_channels, window)` and `logits` receives
    /// `(out_channels, window)`, both channel-first and row-major. Allocates nothing.
    pub fn forward(
        &self,
        input: &[f32],
        window: Dims3,
        logits: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<(), ForwardError> {
        let needed = self.scratch_len(window)?;
        if scratch.len() < needed {
            return Err(ForwardError::ScratchTooSmall { needed, provided: scratch.len() });
        }
        let expected = self.logits_len(window);
        if logits.len() != expected {
            return Err(ForwardError::OutputLength { expected, found: logits.len() });
        }
        self.check_input(input, window)?;
        self.forward_unchecked(input, window, logits, scratch)
    }

    pub(crate) fn forward_unchecked(
        &self,
        input: &[f32],
        window: Dims3,
        logits: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<(), ForwardError> {
        self.forward_probed(input, window, Head::Logits(logits), scratch, &mut Probe::off(&self.config))
    }

    /// The forward pass, showing `probe` every tensor the integer pass quantises.
    fn forward_probed(
        &self,
        input: &[f32],
        window: Dims3,
        head: Head<'_>,
        scratch: &mut [f32],
        probe: &mut Probe<'_>,
    ) -> Result<(), ForwardError> {
        let w = &self.weights;
        let vd = VitDims::new(&self.config.vit, window);
        let g = vd.grid;
        let ne = vd.tokens * vd.hidden;
        let pts = probe.points();
        probe.see(Points::INPUT, input);
        let mut arena = Arena::new(scratch);
        let taps = arena.take(4 * ne)?;
        encode(&w.vit, &self.config.vit, input, window, taps, arena.rest(), probe)?;
        let (z3, rest) = taps.split_at(ne);
        let (z6, rest) = rest.split_at(ne);
        let (z9, z12) = rest.split_at(ne);

        let d3_dims = double(g);
        let d3 = arena.take(w.decoder5.shape.out_ch * voxels(d3_dims))?;
        up_block(
            &w.decoder5,
            z12,
            g,
            |o, s, p| skip_path(&w.encoder4, z9, g, o, s, (p, pts.skip(2))),
            d3,
            arena.rest(),
            (probe, pts.up(0)),
        )?;
        let d2_dims = double(d3_dims);
        let d2 = arena.take(w.decoder4.shape.out_ch * voxels(d2_dims))?;
        up_block(
            &w.decoder4,
            d3,
            d3_dims,
            |o, s, p| skip_path(&w.encoder3, z6, g, o, s, (p, pts.skip(1))),
            d2,
            arena.rest(),
            (probe, pts.up(1)),
        )?;
        let d1_dims = double(d2_dims);
        let d1 = arena.take(w.decoder3.shape.out_ch * voxels(d1_dims))?;
        up_block(
            &w.decoder3,
            d2,
            d2_dims,
            |o, s, p| skip_path(&w.encoder2, z3, g, o, s, (p, pts.skip(0))),
            d1,
            arena.rest(),
            (probe, pts.up(2)),
        )?;
        let d0 = arena.take(w.decoder2.shape.out_ch * voxels(window))?;
        up_block(
            &w.decoder2,
            d1,
            d1_dims,
            |o, s, p| res_block(&w.encoder1, input, window, o, s, (p, pts.encoder1())),
            d0,
            arena.rest(),
            (probe, pts.up(3)),
        )?;

        match head {
            Head::Logits(logits) => {
                conv3d(d0, window, &w.out.weight, Some(&w.out.bias), ConvGeometry::K1, logits);
            }
            Head::Labels(labels) => output_labels(w, self.config.out_channels as usize, d0, labels),
        }
        Ok(())
    }

    /// Calibration for the integer pass: runs the f32 forward pass on one window and raises
    /// `ranges[p]` to the largest magnitude seen at each activation point `p`
    /// ([`crate::model::points`]; `ranges` has [`crate::model::point_count`] values). Needs
    /// [`Self::scratch_len`] plus [`Self::logits_len`] of scratch.
    pub fn calibrate(
        &self,
        input: &[f32],
        window: Dims3,
        ranges: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<(), ForwardError> {
        let expected = Points::new(&self.config).count;
        if ranges.len() != expected {
            return Err(ForwardError::OutputLength { expected, found: ranges.len() });
        }
        let needed = self.scratch_len(window)?.saturating_add(self.logits_len(window));
        if scratch.len() < needed {
            return Err(ForwardError::ScratchTooSmall { needed, provided: scratch.len() });
        }
        self.check_input(input, window)?;
        let (logits, rest) = scratch.split_at_mut(self.logits_len(window));
        self.forward_probed(
            input,
            window,
            Head::Logits(logits),
            rest,
            &mut Probe::recording(&self.config, ranges),
        )
    }

    /// Scratch for [`Self::segment`]: the forward pass's; the logits are never stored.
    pub fn segment_scratch_len(&self, window: Dims3) -> Result<usize, ForwardError> {
        self.scratch_len(window)
    }

    /// Labels (argmax over classes, the first class on ties) for one window into `labels`
    /// (`voxels` bytes): the output conv and the argmax run voxel by voxel, so no logits buffer
    /// is needed and the labels are exactly those of [`Self::forward`]'s logits.
    pub fn segment(
        &self,
        input: &[f32],
        window: Dims3,
        labels: &mut [u8],
        scratch: &mut [f32],
    ) -> Result<(), ForwardError> {
        let needed = self.segment_scratch_len(window)?;
        if scratch.len() < needed {
            return Err(ForwardError::ScratchTooSmall { needed, provided: scratch.len() });
        }
        let v = vox(window);
        if labels.len() != v {
            return Err(ForwardError::OutputLength { expected: v, found: labels.len() });
        }
        self.check_input(input, window)?;
        self.forward_probed(input, window, Head::Labels(labels), scratch, &mut Probe::off(&self.config))
    }
}

/// The 1x1x1 output conv on decoder2's output `d0` (`(feature_size, voxels)`) and the argmax
/// per voxel (the first class on ties) into `labels`, without storing the logits: conv3d's sums
/// voxel by voxel in its order (bias, then input channels), so the labels are
/// `argmax_channels` of [`Unetr::forward`]'s logits bit for bit. Shared by the f32 and integer
/// passes.
pub(crate) fn output_labels(w: &UnetrWeights<'_>, classes: usize, d0: &[f32], labels: &mut [u8]) {
    let (v, ci) = (labels.len(), w.decoder2.shape.out_ch);
    // Row::get is Tensor::get's value (scale * q) without its index arithmetic.
    let logit = |k: usize, i: usize| {
        let (row, mut acc) = (w.out.weight.row(k), w.out.bias.get(k));
        for c in 0..ci {
            acc += row.get(c) * d0[c * v + i];
        }
        acc
    };
    for (i, label) in labels.iter_mut().enumerate() {
        let (mut best, mut best_value) = (0, logit(0, i));
        for k in 1..classes {
            let value = logit(k, i);
            if value > best_value {
                best = k;
                best_value = value;
            }
        }
        *label = best as u8;
    }
}

/// What the forward pass ends with.
enum Head<'o> {
    /// The logits, `(classes, window)`.
    Logits(&'o mut [f32]),
    /// Their argmax per voxel.
    Labels(&'o mut [u8]),
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use crate::format::Precision;
    use crate::synthetic::random_model;
    use crate::testing_config;

    fn with_model(precision: Precision, f: impl FnOnce(&Unetr<'_>)) {
        let bytes = random_model(&testing_config(), 5, precision).unwrap();
        let file = ModelFile::parse(&bytes).unwrap();
        f(&Unetr::new(&file).unwrap());
    }

    #[test]
    fn scratch_len_is_exactly_what_the_forward_pass_uses() {
        with_model(Precision::F32, |m| {
            for window in [[32, 32, 32], [48, 16, 32]] {
                let input: std::vec::Vec<f32> =
                    (0..m.input_len(window)).map(|i| (i % 7) as f32 / 7.0).collect();
                let mut logits = std::vec![0.0; m.logits_len(window)];
                let need = m.scratch_len(window).unwrap();
                let mut scratch = std::vec![f32::NAN; need];
                m.forward_unchecked(&input, window, &mut logits, &mut scratch).unwrap();
                assert!(logits.iter().all(|v| v.is_finite()), "NaN scratch leaked into the output");
                let short = m.forward_unchecked(&input, window, &mut logits, &mut scratch[..need - 1]);
                assert!(
                    matches!(short, Err(ForwardError::ScratchTooSmall { .. })),
                    "{window:?}: scratch_len overestimates"
                );
            }
        });
    }

    #[test]
    fn bad_calls_are_errors() {
        with_model(Precision::Int8, |m| {
            let w = [32, 32, 32];
            let n = m.input_len(w);
            let mut logits = std::vec![0.0; m.logits_len(w)];
            let mut scratch = std::vec![0.0; m.scratch_len(w).unwrap()];
            let mut input = std::vec![0.25; n];
            assert!(matches!(
                m.forward(&input[1..], w, &mut logits, &mut scratch),
                Err(ForwardError::InputLength { .. })
            ));
            assert!(matches!(
                m.forward(&input, w, &mut logits[1..], &mut scratch),
                Err(ForwardError::OutputLength { .. })
            ));
            assert!(matches!(
                m.forward(&input, [40, 32, 32], &mut logits, &mut scratch),
                Err(ForwardError::Window(_))
            ));
            let e = m.forward(&input, w, &mut logits, &mut scratch[..10]).unwrap_err();
            assert!(std::format!("{e}").contains("scratch holds 10"));
            input[123] = f32::NAN;
            assert_eq!(
                m.forward(&input, w, &mut logits, &mut scratch),
                Err(ForwardError::NonFiniteInput { index: 123 })
            );
        });
    }

    #[test]
    fn segment_is_argmax_of_forward() {
        with_model(Precision::F32, |m| {
            let w = [32, 32, 32];
            let input: std::vec::Vec<f32> =
                (0..m.input_len(w)).map(|i| ((i * 31) % 101) as f32 / 101.0).collect();
            let mut logits = std::vec![0.0; m.logits_len(w)];
            let mut scratch = std::vec![0.0; m.segment_scratch_len(w).unwrap()];
            m.forward(&input, w, &mut logits, &mut scratch).unwrap();
            let mut labels = std::vec![0u8; 32 * 32 * 32];
            m.segment(&input, w, &mut labels, &mut scratch).unwrap();
            let v = labels.len();
            for (i, &l) in labels.iter().enumerate() {
                let best = (0..3).max_by(|&a, &b| logits[a * v + i].total_cmp(&logits[b * v + i])).unwrap();
                assert_eq!(l as usize, best);
            }
            assert!(
                labels.iter().any(|&l| l != labels[0]),
                "a random model should not predict one class everywhere"
            );
        });
    }
}
