//! `glmae-infer segment`: labels on the input's own grid, and bad input refused with a non-zero
//! exit and no output file.

use std::path::{Path, PathBuf};
use std::process::Command;

use glmae_data::nifti_io::{StoredType, write_nifti};
use glmae_data::{Affine, read_nifti};

fn infer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_glmae-infer"))
}

/// `glmae-infer segment [flags] --model M --input I --output O`.
fn segment(flags: &[&str], model: &Path, input: &Path, output: &Path) -> std::process::Output {
    infer()
        .arg("segment")
        .args(flags)
        .arg("--model")
        .arg(model)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap()
}

fn setup(tag: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("glmae-seg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = glmae_core::testing_config();
    cfg.out_channels = 14;
    let model = dir.join("model.glmae");
    let bytes = glmae_core::synthetic::random_model(&cfg, 1, glmae_core::format::Precision::Int8).unwrap();
    std::fs::write(&model, bytes).unwrap();
    (dir, model)
}

/// A small LPS-oriented CT-like volume at 1.5 x 1.5 x 2 mm (so resampling is nearly identity).
fn write_ct(path: &Path) -> Affine {
    let shape = [40, 36, 20];
    let p = glmae_data::phantom::generate(
        3,
        &glmae_data::phantom::PhantomConfig { shape, spacing: [1.5 * 4.0, 1.5 * 4.0, 2.0 * 4.0] },
    );
    let affine = glmae_data::nifti_io::meta_for_spacing([1.5, 1.5, 2.0], StoredType::I16);
    let mut meta = affine.clone();
    meta.srow = [[-1.5, 0.0, 0.0, 30.0], [0.0, -1.5, 0.0, 20.0], [0.0, 0.0, 2.0, -5.0]];
    write_nifti(path, &p.hu, shape, 1, &meta, StoredType::I16).unwrap();
    read_nifti(path).unwrap().volume.affine
}

#[test]
fn labels_land_on_the_input_grid() {
    let (dir, model) = setup("ok");
    let input = dir.join("ct.nii.gz");
    let affine = write_ct(&input);
    let output = dir.join("seg.nii.gz");
    let out = segment(&["--threads", "2"], &model, &input, &output);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seg = read_nifti(&output).unwrap();
    assert_eq!(seg.volume.shape, [40, 36, 20]);
    assert_eq!(seg.volume.affine, affine, "labels must keep the input's affine");
    assert_eq!(seg.meta.stored, StoredType::U8);
    assert!(seg.volume.data.iter().all(|&l| l.fract() == 0.0 && l < 14.0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_fails_cleanly_without_output() {
    let (dir, model) = setup("bad");
    let input = dir.join("ct.nii.gz");
    write_ct(&input);
    let bytes = std::fs::read(&input).unwrap();
    let cut = dir.join("cut.nii.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let output = dir.join("seg.nii.gz");
    let out = segment(&[], &model, &cut, &output);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cut.nii.gz") && err.contains("truncated"), "{err}");
    assert!(!output.exists(), "a failed run left an output file");

    let bad_model = dir.join("bad.glmae");
    std::fs::write(&bad_model, b"\\x89GLMAE\\r\\n not really").unwrap();
    let out = segment(&[], &bad_model, &input, &output);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.glmae"));

    let unwritable = dir.join("missing-folder").join("seg.nii.gz");
    let out = segment(&[], &model, &input, &unwritable);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing-folder/seg.nii.gz"));
    assert!(!dir.join("missing-folder").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An output that is the input (same path, the input folder in folder mode, or a link to the
/// input) is refused before anything is written: the CT is left as it was.
#[test]
fn output_over_the_input_is_refused() {
    let (dir, model) = setup("same");
    let input = dir.join("ct.nii.gz");
    write_ct(&input);
    let before = std::fs::read(&input).unwrap();
    let same = dir.join(".").join("ct.nii.gz");
    for output in [&input, &same] {
        let out = segment(&[], &model, &input, output);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("refusing to overwrite the input") && err.contains("ct.nii.gz"), "{err}");
    }
    // Folder mode with the output folder = the input folder names every output like its input.
    let out = segment(&[], &model, &dir, &dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite the input"));
    assert_eq!(std::fs::read(&input).unwrap(), before, "the input was modified");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--reference` runs glmae-core's kernels and `--int8-kernels` the integer ones; the default fast
/// pass must give the reference's labels.
#[test]
fn engines_are_selectable_and_agree() {
    let (dir, model) = setup("engines");
    let input = dir.join("ct.nii.gz");
    write_ct(&input);
    let mut labels = Vec::new();
    for flags in [&[][..], &["--reference"][..], &["--int8-kernels"][..]] {
        let output = dir.join(format!("seg{}.nii.gz", labels.len()));
        let out = segment(flags, &model, &input, &output);
        assert!(out.status.success(), "{flags:?}: {}", String::from_utf8_lossy(&out.stderr));
        labels.push(read_nifti(&output).unwrap().volume.data);
    }
    let same = labels[0].iter().zip(&labels[1]).filter(|(a, b)| a == b).count();
    assert!(same as f64 >= 0.999 * labels[0].len() as f64, "fast and reference labels differ");
    assert_eq!(labels[2].len(), labels[0].len());
    let both = infer()
        .args(["segment", "--reference", "--int8-kernels", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.join("both.nii.gz"))
        .output()
        .unwrap();
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--probabilities` writes one float32 map per class on the input grid (written class by class)
/// that sums to 1 inside the body; `--probabilities-u8` stores the same maps as uint8 with slope
/// 1/255, within half a step of them.
#[test]
fn probabilities_as_float32_and_uint8_agree() {
    let (dir, model) = setup("probs");
    let input = dir.join("ct.nii.gz");
    write_ct(&input);
    let (p32, p8) = (dir.join("p32.nii.gz"), dir.join("p8.nii.gz"));
    for (p, extra) in [(&p32, None), (&p8, Some("--probabilities-u8"))] {
        let mut flags = vec!["--probabilities", p.to_str().unwrap()];
        flags.extend(extra);
        let out = segment(&flags, &model, &input, &dir.join("seg.nii.gz"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (a, b) = (read_nifti(&p32).unwrap(), read_nifti(&p8).unwrap());
    assert_eq!((a.volume.shape, a.volume.channels), ([40, 36, 20], 14));
    assert_eq!(b.meta.stored, StoredType::U8);
    let gap = a.volume.data.iter().zip(&b.volume.data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(gap <= 0.5 / 255.0 + 1e-6, "uint8 probabilities {gap} off the float32 ones");
    // Voxel sums: 1 inside the foreground crop, 0 outside (MONAI pads the inverted crop with 0);
    // at the target spacing no interpolation mixes the two.
    let n = 40 * 36 * 20;
    let sums: Vec<f32> = (0..n).map(|v| (0..14).map(|c| a.volume.data[c * n + v]).sum()).collect();
    assert!(
        sums.iter().all(|s| s.abs() < 1e-4 || (s - 1.0).abs() < 1e-4),
        "a voxel's probabilities sum to neither 0 nor 1"
    );
    assert!(sums.iter().any(|s| (s - 1.0).abs() < 1e-4), "no voxel inside the crop");
    std::fs::remove_dir_all(&dir).unwrap();
}
