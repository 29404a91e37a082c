//! Every NIfTI file nibabel can read here gives the same values and affine through our reader:
//! nibabel's test data, Debian's `mricron-data` and `insighttoolkit5-examples` volumes when
//! installed, and files with header quirks that `scripts/nibabel_reference.py --make-odd` writes.
//!
//! Needs python3 with nibabel (`pip install nibabel`). Without it the test says so and passes,
//! unless `GLMAE_REQUIRE_NIBABEL=1` (set in CI), where a missing nibabel is a failure.

use std::path::Path;
use std::process::Command;

use glmae_data::read_nifti;
use serde_json::Value;

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1.0)
}

#[test]
fn reader_matches_nibabel() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let odd = std::env::temp_dir().join(format!("glmae-nibabel-odd-{}", std::process::id()));
    let out = Command::new("python3")
        .arg(root.join("scripts/nibabel_reference.py"))
        .arg("--make-odd")
        .arg(&odd)
        .output();
    let required = std::env::var_os("GLMAE_REQUIRE_NIBABEL").is_some();
    let out = match out {
        Ok(o) if o.status.success() => o,
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(!required, "nibabel reference failed: {why}");
            eprintln!(
                "SKIPPED: python3 with nibabel is not available ({})",
                why.lines().last().unwrap_or("")
            );
            return;
        }
    };
    let refs: serde_json::Map<String, Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(refs.len() >= 20, "only {} reference files found", refs.len());
    let mut failures = Vec::new();
    for (path, r) in &refs {
        let name = Path::new(path).file_name().unwrap().to_string_lossy().into_owned();
        let img = match read_nifti(Path::new(path)) {
            Ok(img) => img,
            Err(e) => {
                failures.push(format!("{name}: we reject a file nibabel reads: {e:#}"));
                continue;
            }
        };
        let v = &img.volume;
        let shape: Vec<usize> =
            r["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        if shape != v.shape || r["channels"].as_u64().unwrap() as usize != v.channels {
            failures.push(format!(
                "{name}: shape {:?} x {} vs nibabel {shape:?} x {}",
                v.shape, v.channels, r["channels"]
            ));
            continue;
        }
        'affine: for (row, ref_row) in v.affine.0.iter().zip(r["affine"].as_array().unwrap()) {
            for (a, b) in row.iter().zip(ref_row.as_array().unwrap()) {
                if !close(*a, b.as_f64().unwrap(), 1e-5) {
                    failures.push(format!("{name}: affine {:?} vs nibabel {}", v.affine.0, r["affine"]));
                    break 'affine;
                }
            }
        }
        for pair in r["samples"].as_array().unwrap() {
            let i = pair[0].as_u64().unwrap() as usize;
            let ok = match pair[1].as_f64() {
                Some(expected) => close(v.data[i] as f64, expected, 1e-6),
                None => v.data[i].is_nan(),
            };
            if !ok {
                let expected = &pair[1];
                failures.push(format!("{name}: value at {i} is {} vs nibabel {expected}", v.data[i]));
                break;
            }
        }
        let finite = || v.data.iter().filter(|x| !x.is_nan()).map(|&x| x as f64);
        let (sum, sumsq): (f64, f64) = (finite().sum(), finite().map(|x| x * x).sum());
        let nans = v.data.iter().filter(|x| x.is_nan()).count();
        if nans as u64 != r["nan_count"].as_u64().unwrap() {
            failures.push(format!("{name}: {nans} NaN voxels vs nibabel {}", r["nan_count"]));
        }
        if !close(sum, r["sum"].as_f64().unwrap(), 1e-9) || !close(sumsq, r["sumsq"].as_f64().unwrap(), 1e-9)
        {
            failures
                .push(format!("{name}: sum {sum} / sumsq {sumsq} vs nibabel {} / {}", r["sum"], r["sumsq"]));
        }
        if v.affine.axcodes() != r["axcodes"].as_str().unwrap() {
            failures.push(format!("{name}: axis codes {} vs nibabel {}", v.affine.axcodes(), r["axcodes"]));
        }
        // Written back as a label map on the same grid, the file reads back with the same affine.
        if v.channels == 1 && img.meta.stored.is_integer() {
            let labels: Vec<u8> = v.data.iter().map(|&x| (x.abs() as i64 % 7) as u8).collect();
            let out = odd.join(format!("labels-{name}.nii.gz"));
            glmae_data::write_labels(&out, &labels, v.shape, &img.meta, glmae_data::nifti_io::LabelType::U8)
                .unwrap();
            let back = read_nifti(&out).unwrap();
            let same_values = back.volume.data.iter().zip(&labels).all(|(a, &b)| *a == b as f32);
            let same_affine = back
                .volume
                .affine
                .0
                .iter()
                .flatten()
                .zip(v.affine.0.iter().flatten())
                .all(|(a, b)| close(*a, *b, 1e-6));
            if !same_values
                || !same_affine
                || back.meta.sform_code != img.meta.sform_code
                || back.meta.qform_code != img.meta.qform_code
            {
                failures.push(format!("{name}: labels written on its grid read back differently"));
            }
        }
        eprintln!("ok {name}: {:?} x {} {:?} {}", v.shape, v.channels, img.meta.stored, v.affine.axcodes());
    }
    let _ = std::fs::remove_dir_all(&odd);
    assert!(failures.is_empty(), "{} mismatches with nibabel:\n{}", failures.len(), failures.join("\n"));
}
