//! DICOM series in, checked against the tools people trust: `scripts/dicom_series.py` writes
//! series with pydicom (axial, sagittal and oblique orientations, implicit and explicit VR, big
//! endian, rescale slope and intercept with 12 stored bits, shuffled and nested file names, a
//! study of three series, and series that must be refused); each good series read by
//! `glmae_data::dicom` and written as NIfTI must equal `dcm2niix`'s conversion read back with
//! nibabel (voxels and affine), and each bad one must be refused with an error naming the
//! problem and the series.
//!
//! Needs python3 with numpy, pydicom and nibabel, and `dcm2niix` (Debian package). Without them
//! the test says so and passes, unless `GLMAE_REQUIRE_DICOM_TOOLS=1` (set in CI), where missing
//! tools are a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use glmae_data::dicom::{choose, read_dicom_folder, read_series, scan};
use glmae_data::nifti_io::{StoredType, meta_for_affine, write_nifti};
use serde_json::Value;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dicom_series.py")
}

/// Runs the script; `None` (after saying why) when the tools are missing and not required.
fn run(args: &[&str]) -> Option<String> {
    let required = std::env::var_os("GLMAE_REQUIRE_DICOM_TOOLS").is_some();
    let out = Command::new("python3").arg(script()).args(args).output();
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        other => {
            let why = match other {
                Ok(o) => {
                    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
                }
                Err(e) => e.to_string(),
            };
            assert!(!required, "scripts/dicom_series.py {args:?} failed: {why}");
            eprintln!("SKIPPED: {args:?}: python3 with pydicom/nibabel or dcm2niix is missing ({why})");
            None
        }
    }
}

fn have_dcm2niix() -> bool {
    let ok = Command::new("dcm2niix").arg("-v").output().is_ok();
    assert!(ok || std::env::var_os("GLMAE_REQUIRE_DICOM_TOOLS").is_none(), "dcm2niix is not installed");
    ok
}

#[test]
fn series_read_as_dcm2niix_and_nibabel_do_and_bad_series_are_refused() {
    let dir = std::env::temp_dir().join(format!("glmae-dicom-{}", std::process::id()));
    let Some(_) = run(&["make", dir.to_str().unwrap()]) else { return };
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let compare = have_dcm2niix();
    let mut compared = 0;
    for (name, case) in cases.as_object().unwrap() {
        let case_dir = dir.join(name);
        let result = read_dicom_folder(&case_dir, None);
        if case["ok"].as_bool().unwrap() {
            let v = result.unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let shape: Vec<usize> =
                case["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            assert_eq!(v.volume.shape.to_vec(), shape, "{name}");
            assert_eq!(v.series.series_uid, case["series"].as_str().unwrap(), "{name}: the wrong series");
            assert_eq!(v.slices.len(), shape[2], "{name}");
            if name == "study" || !compare {
                continue;
            }
            let ours = dir.join(format!("{name}.nii"));
            let meta = meta_for_affine(&v.volume.affine, StoredType::F32);
            write_nifti(&ours, &v.volume.data, v.volume.shape, 1, &meta, StoredType::F32).unwrap();
            let line = run(&["compare", case_dir.to_str().unwrap(), ours.to_str().unwrap()])
                .unwrap_or_else(|| panic!("{name}: compare did not run"));
            println!("{name}: {}", line.trim());
            compared += 1;
        } else {
            let e = format!("{:#}", result.err().unwrap_or_else(|| panic!("{name}: read without an error")));
            let want = case["error"].as_str().unwrap();
            assert!(e.contains(want), "{name}: expected \"{want}\" in: {e}");
            assert!(e.contains("series "), "{name}: the error does not name the series: {e}");
            println!("{name}: refused: {e}");
        }
    }
    if compare {
        assert_eq!(compared, 6, "every good single-series case is compared with dcm2niix");
    }

    // The study: three series and a text file; the CT with the most slices by default, any other
    // by its UID, and an unknown UID lists what there is.
    let study = dir.join("study");
    let s = scan(&study).unwrap();
    assert_eq!(s.series.len(), 3);
    assert_eq!(s.skipped.len(), 1, "{:?}", s.skipped);
    assert!(s.skipped[0].1.contains("not a DICOM file"), "{:?}", s.skipped);
    let other = cases["study"]["other"].as_str().unwrap();
    let small = read_series(choose(&s, &study, Some(other)).unwrap()).unwrap();
    assert_eq!(small.volume.shape[2], 4);
    let e = format!("{:#}", choose(&s, &study, Some("1.2.3")).unwrap_err());
    assert!(e.contains("no series 1.2.3") && e.contains(other), "{e}");

    // A file cut short inside its pixel data is an error naming the file, not a panic or a
    // volume with a hole.
    let cut = dir.join("cut");
    copy_dir(&dir.join("axial_explicit"), &cut);
    let victim = first_file(&cut);
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() - 100]).unwrap();
    let e = format!("{:#}", read_dicom_folder(&cut, None).unwrap_err());
    assert!(e.contains(&victim.display().to_string()), "the error does not name {}: {e}", victim.display());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let target = to.join(p.file_name().unwrap());
        if p.is_dir() { copy_dir(&p, &target) } else { std::fs::copy(&p, &target).map(|_| ()).unwrap() }
    }
}

fn first_file(dir: &Path) -> PathBuf {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    let p = entries.into_iter().next().unwrap();
    if p.is_dir() { first_file(&p) } else { p }
}

/// A folder without DICOM images is an error naming the folder and why the files were skipped.
#[test]
fn a_folder_without_dicom_is_an_error() {
    let dir = std::env::temp_dir().join(format!("glmae-nodicom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), "hello").unwrap();
    std::fs::write(dir.join("short"), [0u8; 10]).unwrap();
    let e = format!("{:#}", read_dicom_folder(&dir, None).unwrap_err());
    assert!(e.contains("no DICOM images found") && e.contains(&dir.display().to_string()), "{e}");
    assert!(e.contains("not a DICOM file"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
