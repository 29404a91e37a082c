//! A DICOM SEG written from labels on a series' grid reads back in highdicom with the right
//! segments, SNOMED CT codes, source references and voxels: `scripts/dicom_seg_check.py` writes
//! a synthetic oblique CT series with pydicom, we read it, label it, write the SEG, and the script
//! checks it with `highdicom.seg.segread` and `get_pixels_by_source_instance`.
//!
//! Needs python3 with numpy, pydicom and highdicom (`pip install highdicom`). Without them the
//! test says so and passes, unless `GLMAE_REQUIRE_DICOM_TOOLS=1`, where that is a failure.
//! (pydicom-seg is not used: 0.4.1 does not import with pydicom 3.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use glmae_core::preprocessing::BTCV_CLASSES;
use glmae_data::Labels;
use glmae_data::dicom::{DicomVolume, read_dicom_folder};
use glmae_data::dicom_seg::{SegOptions, write_seg};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dicom_seg_check.py")
}

fn python(args: &[&std::ffi::OsStr]) -> std::io::Result<Output> {
    Command::new("python3").arg(script()).args(args).output()
}

/// The expected label map and UIDs for the script: raw uint8 in (slice, row, column) order.
fn write_expected(dir: &Path, name: &str, src: &DicomVolume, labels: &Labels, classes: &[String]) -> PathBuf {
    let [columns, rows, n] = labels.shape;
    let mut raw = Vec::with_capacity(labels.voxels());
    for k in 0..n {
        for j in 0..rows {
            for i in 0..columns {
                raw.push(labels.data[labels.index(i, j, k)]);
            }
        }
    }
    let raw_path = dir.join(format!("{name}.u8"));
    std::fs::write(&raw_path, raw).unwrap();
    let json = serde_json::json!({
        "class_names": classes,
        "source_sop_instance_uids": src.slices.iter().map(|s| s.sop_instance_uid.as_str()).collect::<Vec<_>>(),
        "shape": [n, rows, columns],
        "labels_path": raw_path,
    });
    let json_path = dir.join(format!("{name}.json"));
    std::fs::write(&json_path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    json_path
}

fn check(seg: &Path, series: &Path, expected: &Path) {
    let out = python(&["check".as_ref(), seg.as_os_str(), series.as_os_str(), expected.as_os_str()]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "highdicom check of {} failed:\n{stdout}", seg.display());
}

#[test]
fn seg_reads_back_in_highdicom() {
    let required = std::env::var_os("GLMAE_REQUIRE_DICOM_TOOLS").is_some_and(|v| v == "1");
    let probe = Command::new("python3").args(["-c", "import numpy, pydicom, highdicom"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(!required, "python3 with numpy, pydicom and highdicom is required: {why}");
            eprintln!(
                "SKIPPED: python3 with numpy, pydicom and highdicom is not available ({})",
                why.lines().last().unwrap_or("")
            );
            return;
        }
    }
    let dir = std::env::temp_dir().join(format!("glmae-dicom-seg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let series = dir.join("series");
    let made = python(&["make-series".as_ref(), series.as_os_str()]).unwrap();
    assert!(made.status.success(), "make-series failed: {}", String::from_utf8_lossy(&made.stderr));

    let src = read_dicom_folder(&series, None).unwrap();
    let [columns, rows, n] = src.volume.shape;
    assert_eq!([columns, rows, n], [24, 20, 10]);
    // Four BTCV classes from intensities and geometry: spleen (soft tissue), left kidney (the
    // bright block, on slices 3..7 only), portal and splenic veins (a corner, slices 6.. only),
    // right adrenal gland (one voxel on the last slice); the other nine classes have no voxel.
    let classes: Vec<String> = BTCV_CLASSES.iter().map(|s| s.to_string()).collect();
    let value = |name: &str| classes.iter().position(|c| c == name).unwrap() as u8;
    let (spleen, kidney, veins, adrenal) = (
        value("spleen"),
        value("left kidney"),
        value("portal and splenic veins"),
        value("right adrenal gland"),
    );
    let mut labels = Labels::new(vec![0u8; src.volume.voxels()], src.volume.shape, src.volume.affine);
    for i in 0..columns {
        for j in 0..rows {
            for k in 0..n {
                let v = src.volume.index(i, j, k);
                let hu = src.volume.data[v];
                labels.data[v] = if hu >= 200.0 {
                    kidney
                } else if hu >= 0.0 {
                    spleen
                } else if i < 4 && j < 3 && k >= 6 {
                    veins
                } else if (i, j, k) == (columns - 1, rows - 1, n - 1) {
                    adrenal
                } else {
                    0
                };
            }
        }
    }
    for c in [spleen, kidney, veins, adrenal] {
        assert!(labels.data.contains(&c), "class {c} has no voxel");
    }
    let seg = dir.join("labels.seg.dcm");
    write_seg(&seg, &(&src).into(), &labels, &classes, &SegOptions::default()).unwrap();
    let expected = write_expected(&dir, "labels", &src, &labels, &classes);
    check(&seg, &series, &expected);

    // Nothing labelled: one empty frame, every segment described; a class name in another case
    // ("Liver") and one without a code, in characters the series' Latin-1 cannot hold (the SEG's
    // text is then UTF-8).
    let names: Vec<String> = ["background", "Liver", "病変 lesion"].iter().map(|s| s.to_string()).collect();
    let empty = Labels::new(vec![0u8; src.volume.voxels()], src.volume.shape, src.volume.affine);
    let seg = dir.join("empty.seg.dcm");
    write_seg(&seg, &(&src).into(), &empty, &names, &SegOptions::default()).unwrap();
    let expected = write_expected(&dir, "empty", &src, &empty, &names);
    check(&seg, &series, &expected);
    if std::env::var_os("GLMAE_KEEP_DICOM_SEG").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
