//! `glmae-infer`'s whole segmentation pipeline gives MONAI's labels and probabilities on the
//! source grid. `scripts/monai_pipeline_parity.py` runs MONAI 1.6's UNETR inference recipe
//! (Orientationd, Spacingd, ScaleIntensityRanged, CropForegroundd, sliding_window_inference with
//! overlap 0.5 and gaussian blending, softmax, Invertd, argmax) with a small random UNETR on
//! volumes it writes: odd sizes, shorter than the ROI on one and on two axes, anisotropic, LPS,
//! oblique, air margins, int16 with a slope. The same weights, imported as `glmae-train import`
//! does, segment the same files here with both engines. Needs python3 with torch, monai and
//! safetensors; without them the test says so and passes, unless `GLMAE_REQUIRE_MONAI=1`.
//!
//! Run by hand with the numbers per case:
//! `cargo test -p glmae-tests --test monai_pipeline -- --nocapture`

use glmae_core::format::{OwnedPreprocessing, Precision};
use glmae_data::sliding_window::Blend;
use glmae_infer::{Engine, SegmentOptions, segment_file_with};
use glmae_train::io::import::{ImportOptions, import_unetr, model_bytes};

#[path = "../../scripts/rust/monai_reference.rs"]
mod monai_reference;
use monai_reference::run_monai_script;

/// Labels must agree on at least this share of voxels, probabilities within this distance.
const MIN_IDENTICAL: f64 = 0.999;
const MAX_PROBABILITY_GAP: f32 = 1e-4;

#[test]
fn segmentation_matches_monai_inference_recipe() {
    let dir = std::env::temp_dir().join(format!("glmae-monai-pipeline-{}", std::process::id()));
    if !run_monai_script("monai_pipeline_parity.py", &dir) {
        return;
    }
    let opts = ImportOptions { num_heads: 2, layer_norm_eps: 1e-5 };
    let (cfg, tensors) = import_unetr(&dir.join("unetr.safetensors"), &opts).unwrap();
    // BTCV's recipe, as the script's MONAI transforms: RAS, 1.5 x 1.5 x 2 mm, [-175, 250] ->
    // [0, 1] clipped, foreground crop.
    let bytes = model_bytes(cfg, OwnedPreprocessing::for_classes(3), Precision::F32, &tensors).unwrap();
    let model = glmae_core::ModelFile::parse(&bytes).unwrap();
    let cases = std::fs::read_to_string(dir.join("cases.txt")).unwrap();
    let mut failures = Vec::new();
    for line in cases.lines() {
        let (file, what) = line.split_once(' ').unwrap();
        let stem = file.trim_end_matches(".nii.gz");
        let input = dir.join(file);
        let expected_labels = std::fs::read(dir.join(format!("{stem}.labels.u8"))).unwrap();
        let expected_probs: Vec<f32> = std::fs::read(dir.join(format!("{stem}.probs.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        for engine in [Engine::Fast, Engine::Reference] {
            let labels_path = dir.join(format!("{stem}.{engine:?}.labels.nii.gz"));
            let probs_path = dir.join(format!("{stem}.{engine:?}.probs.nii.gz"));
            let sopts = SegmentOptions {
                overlap: 0.5,
                blend: Blend::Gaussian,
                threads: 2,
                probabilities: Some(probs_path.clone()),
                probabilities_u8: false,
                progress: false,
            };
            segment_file_with(&model, &input, &labels_path, &sopts, engine).unwrap();
            let labels = glmae_data::read_nifti(&labels_path).unwrap().volume.data;
            let probs = glmae_data::read_nifti(&probs_path).unwrap().volume.data;
            assert_eq!(labels.len(), expected_labels.len(), "{what}: label grid");
            assert_eq!(probs.len(), expected_probs.len(), "{what}: probability grid");
            let same = labels.iter().zip(&expected_labels).filter(|(a, b)| **a == f32::from(**b)).count();
            let identical = same as f64 / labels.len() as f64;
            let gap = probs.iter().zip(&expected_probs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            eprintln!(
                "{what:60} {engine:?}: {:.4}% identical labels ({} differ), probabilities at most {gap:.1e} apart",
                100.0 * identical,
                labels.len() - same
            );
            if identical < MIN_IDENTICAL || gap > MAX_PROBABILITY_GAP || gap.is_nan() {
                failures
                    .push(format!("{what} ({engine:?}): {:.4}% identical, gap {gap:.1e}", 100.0 * identical));
            }
        }
    }
    assert!(failures.is_empty(), "differs from MONAI:\n{}", failures.join("\n"));
    std::fs::remove_dir_all(&dir).unwrap();
}
