//! Calibration of the integer forward pass (`export --int8 --calibrate DATA`): the f32 reference
//! runs on windows of real images, and the largest magnitude each int8 activation reaches sets
//! its scale (`range / 127`, stored in the file as `int8.activation_scales`). This is
//! post-training static quantisation with a representative dataset, as TFLite and CMSIS-NN
//! users do it, with max-abs ranges.

use anyhow::{Context, Result, bail};
use glmae_core::format::ModelBuilder;
use glmae_core::model::{point_count, scales_from_ranges};
use glmae_core::{ModelFile, Unetr};
use glmae_data::dataset::Dataset;
use glmae_data::preprocess::Preprocessor;
use glmae_data::read_nifti;
use glmae_data::sliding_window::starts;

/// What a calibration used and found.
#[derive(Clone, Debug)]
pub struct CalibrationReport {
    /// Images read.
    pub images: usize,
    /// Windows run through the f32 reference.
    pub windows: usize,
    /// Points (activation tensors) given a scale.
    pub points: usize,
    /// Smallest and largest calibrated range over the points used.
    pub range: (f32, f32),
}

/// The window of `window` voxels at `start` of a channel-first volume, zero where it extends past
/// the volume's end (an image smaller than the window).
fn cut(data: &[f32], channels: usize, shape: [usize; 3], start: [usize; 3], window: [usize; 3]) -> Vec<f32> {
    let (v, wv) = (shape.iter().product::<usize>(), window.iter().product::<usize>());
    let mut out = vec![0.0; channels * wv];
    for c in 0..channels {
        for z in 0..window[0].min(shape[0] - start[0]) {
            for y in 0..window[1].min(shape[1] - start[1]) {
                let n = window[2].min(shape[2] - start[2]);
                let src = c * v + ((start[0] + z) * shape[1] + start[1] + y) * shape[2] + start[2];
                let dst = c * wv + (z * window[1] + y) * window[2];
                out[dst..dst + n].copy_from_slice(&data[src..src + n]);
            }
        }
    }
    out
}

/// `bytes` (an int8 `.glmae` model) with activation scales calibrated on at most `max_windows`
/// windows of the images of `data`: the first `max_windows` images (training, then validation,
/// then test cases) share the windows evenly, each spreading its share over its tiling.
pub fn calibrate(bytes: &[u8], data: &Dataset, max_windows: usize) -> Result<(Vec<u8>, CalibrationReport)> {
    let file = ModelFile::parse(bytes).context("the model to calibrate")?;
    let model = Unetr::new(&file)?;
    if !model.has_int8_weights() {
        bail!("only models with int8 weights can be calibrated for the integer pass (export with --int8)");
    }
    let window = file.config.vit.img_size.map(|s| s as usize);
    let prep = Preprocessor::from_model(&file.preprocessing);
    let cases: Vec<_> = data.training.iter().chain(&data.validation).chain(&data.test).collect();
    if cases.is_empty() || max_windows == 0 {
        bail!("calibration needs at least one image and one window");
    }
    let images = cases.len().min(max_windows);
    let mut ranges = vec![0.0f32; point_count(&file.config)];
    let mut scratch = vec![0.0f32; model.scratch_len(window)? + model.logits_len(window)];
    let mut windows = 0;
    for (i, case) in cases.iter().take(images).enumerate() {
        let image = read_nifti(&case.image)?.volume;
        let (image, _) =
            prep.apply(&image).with_context(|| format!("preprocessing {}", case.image.display()))?;
        let (channels, shape) = (image.channels, image.shape);
        if channels != file.config.vit.in_channels as usize {
            bail!(
                "{}: {channels} channels, the model takes {}",
                case.image.display(),
                file.config.vit.in_channels
            );
        }
        let axes: Vec<Vec<usize>> = (0..3).map(|a| starts(shape[a], window[a], 0.0)).collect();
        let mut tiles = Vec::new();
        for &z in &axes[0] {
            for &y in &axes[1] {
                tiles.extend(axes[2].iter().map(|&x| [z, y, x]));
            }
        }
        // This image's share of the windows, spread over its tiles.
        let share = (max_windows.saturating_mul(i + 1) / images - max_windows.saturating_mul(i) / images)
            .min(tiles.len());
        for k in 0..share {
            let start = tiles[k * tiles.len() / share];
            let input = cut(&image.data, channels, shape, start, window);
            model
                .calibrate(&input, window, &mut ranges, &mut scratch)
                .with_context(|| format!("calibrating on {} at {start:?}", case.image.display()))?;
            windows += 1;
        }
    }
    let used: Vec<f32> = ranges.iter().copied().filter(|&r| r > 0.0).collect();
    let range = used.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    let scales: Vec<f32> = scales_from_ranges(&ranges).collect();
    let mut builder = ModelBuilder::from_file(&file);
    builder.set_activation_scales(&scales);
    let out = builder.to_bytes().context("writing the calibrated model")?;
    Ok((out, CalibrationReport { images, windows, points: used.len(), range }))
}

#[cfg(test)]
mod tests {
    use glmae_core::format::Precision;
    use glmae_core::model::Int8Scratch;
    use glmae_core::synthetic::random_model;
    use glmae_data::phantom::PhantomConfig;
    use glmae_data::phantom_dataset::write_phantom_dataset;

    use super::*;

    /// Calibrating a random int8 model on two small phantoms gives a file the integer pass runs,
    /// with its other tensors unchanged; an f32 model is refused.
    #[test]
    fn calibrated_models_run_the_integer_pass() {
        let dir = std::env::temp_dir().join(format!("glmae-calibrate-{}", std::process::id()));
        let cfg = PhantomConfig { shape: [40, 36, 34], spacing: [4.5, 4.5, 6.0] };
        let data = write_phantom_dataset(&dir, 2, 3, &cfg, 1).unwrap();
        let mut unetr = glmae_core::testing_config();
        unetr.out_channels = 14;
        let bytes = random_model(&unetr, 7, Precision::Int8).unwrap();
        let (out, report) = calibrate(&bytes, &data, 3).unwrap();
        let f32_model = random_model(&unetr, 7, Precision::F32).unwrap();
        let refused = calibrate(&f32_model, &data, 1).unwrap_err();
        std::fs::remove_dir_all(&dir).ok();
        assert!(refused.to_string().contains("int8 weights"), "{refused}");
        assert_eq!((report.images, report.windows), (2, 3), "{report:?}");
        let file = ModelFile::parse(&out).unwrap();
        let model = Unetr::new(&file).unwrap();
        assert!(model.has_int8());
        let before = ModelFile::parse(&bytes).unwrap();
        for ((n, a), (m, b)) in before.tensors().zip(file.tensors()) {
            assert_eq!(n, m);
            assert_eq!(format!("{:?}", a.data()), format!("{:?}", b.data()), "{n} changed");
        }
        let w = [32, 32, 32];
        let q = model.int8_scratch_len(w).unwrap();
        let (mut f, mut i, mut b) = (vec![0f32; q.f32s], vec![0i32; q.i32s], vec![0i8; q.i8s]);
        let mut labels = vec![0u8; 32 * 32 * 32];
        let scratch = Int8Scratch { f32s: &mut f, i32s: &mut i, i8s: &mut b };
        model.segment_int8(&vec![0.3; 32 * 32 * 32], w, &mut labels, scratch).unwrap();
    }
}
