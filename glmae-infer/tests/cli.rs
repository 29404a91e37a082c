//! The command line: `info` on a good model, a non-zero exit and a clear message on a bad one.

use std::process::Command;

fn infer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_glmae-infer"))
}

#[test]
fn info_prints_the_model_and_rejects_damage() {
    let dir = std::env::temp_dir().join(format!("glmae-infer-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = glmae_core::testing_config();
    cfg.out_channels = 14;
    let bytes = glmae_core::synthetic::random_model(&cfg, 3, glmae_core::format::Precision::Int8).unwrap();
    let good = dir.join("model.glmae");
    std::fs::write(&good, &bytes).unwrap();
    let out = infer().arg("info").arg(&good).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("left adrenal gland"), "{text}");
    assert!(text.contains("kernels on this CPU: f32 "), "info names the kernels it runs: {text}");

    let bad = dir.join("cut.glmae");
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let out = infer().arg("info").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cut.glmae") && err.contains("truncated"), "{err}");

    // A device is refused by name rather than read until memory runs out.
    #[cfg(unix)]
    {
        let out = infer().arg("info").arg("/dev/zero").output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("/dev/zero") && err.contains("not a regular file"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// DICOM in: `convert` writes the chosen series as NIfTI on its grid, `segment` on a DICOM
/// folder writes labels on the same grid (shape and affine as the converted image), `--series`
/// picks another series, and a series that cannot be stacked is refused by name. Needs python3
/// with numpy and pydicom to write the series (scripts/dicom_series.py); skipped without them
/// unless `GLMAE_REQUIRE_DICOM_TOOLS=1`.
#[test]
fn dicom_folders_convert_and_segment() {
    let dir = std::env::temp_dir().join(format!("glmae-infer-dicom-{}", std::process::id()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/dicom_series.py");
    let made = Command::new("python3").arg(script).arg("make").arg(&dir).output();
    if !made.as_ref().is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var_os("GLMAE_REQUIRE_DICOM_TOOLS").is_none(),
            "cannot write DICOM series: {made:?}"
        );
        eprintln!("SKIPPED: python3 with numpy and pydicom is missing");
        return;
    }
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let model = dir.join("model.glmae");
    let mut cfg = glmae_core::testing_config();
    cfg.out_channels = 3;
    let bytes = glmae_core::synthetic::random_model(&cfg, 3, glmae_core::format::Precision::F32).unwrap();
    std::fs::write(&model, &bytes).unwrap();

    let study = dir.join("study");
    let image = dir.join("image.nii.gz");
    let mut cmd = infer();
    let out = cmd.args(["convert", "--input"]).arg(&study).arg("--output").arg(&image).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let chosen = cases["study"]["series"].as_str().unwrap();
    assert!(text.contains(&format!("* series {chosen}")), "{text}");

    let labels = dir.join("labels.nii.gz");
    let mut cmd = infer();
    cmd.args(["segment", "--model"]).arg(&model).arg("--input").arg(&study).arg("--output").arg(&labels);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (img, lab) = (glmae_data::read_nifti(&image).unwrap(), glmae_data::read_nifti(&labels).unwrap());
    assert_eq!(img.volume.shape, lab.volume.shape);
    assert_eq!(img.volume.affine.0, lab.volume.affine.0);
    assert!(lab.volume.data.iter().all(|&v| v == v.round() && (0.0..3.0).contains(&v)));

    // A `.dcm` output is a DICOM SEG of the same labels, referencing the chosen series.
    let seg = dir.join("labels.dcm");
    let mut cmd = infer();
    cmd.args(["segment", "--model"]).arg(&model).arg("--input").arg(&study).arg("--output").arg(&seg);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let check = "import sys, highdicom as hd, numpy as np, nibabel as nib\n\
        s = hd.seg.segread(sys.argv[1])\n\
        print(s.SOPClassUID, s.ReferencedSeriesSequence[0].SeriesInstanceUID, len(s.SegmentSequence))\n\
        uids = [r.ReferencedSOPInstanceUID for r in s.ReferencedSeriesSequence[0].ReferencedInstanceSequence]\n\
        print(len(uids))";
    let out = Command::new("python3").args(["-c", check]).arg(&seg).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "highdicom cannot read the SEG: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with(&format!("1.2.840.10008.5.1.4.1.1.66.4 {chosen} 2\n12")), "{text}");

    // A SEG references DICOM instances: from a NIfTI input it is refused before any work.
    let mut cmd = infer();
    cmd.args(["segment", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&image)
        .arg("--output")
        .arg(dir.join("x.dcm"));
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs a DICOM series as input"), "{err}");
    assert!(!dir.join("x.dcm").exists());

    let other = cases["study"]["other"].as_str().unwrap();
    let mut cmd = infer();
    cmd.args(["segment", "--series", other, "--model"]).arg(&model).arg("--input").arg(&study);
    let out = cmd.arg("--output").arg(dir.join("small.nii.gz")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(glmae_data::read_nifti(&dir.join("small.nii.gz")).unwrap().volume.shape[2], 4);

    let mut cmd = infer();
    cmd.args(["segment", "--model"]).arg(&model).arg("--input").arg(dir.join("tilt"));
    let out = cmd.arg("--output").arg(dir.join("tilt.nii.gz")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("gantry tilt") && err.contains("series "), "{err}");
    assert!(!dir.join("tilt.nii.gz").exists(), "a refused series leaves no output");
    std::fs::remove_dir_all(&dir).unwrap();
}
