//! Datasets as users keep them, and every problem in one reported at once.

use std::path::{Path, PathBuf};

use glmae_data::nifti_io::{StoredType, meta_for_spacing, write_nifti};
use glmae_data::{Case, Dataset};

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("glmae-ds-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("imagesTr")).unwrap();
    std::fs::create_dir_all(d.join("labelsTr")).unwrap();
    d
}

fn write(
    path: &Path,
    shape: [usize; 3],
    spacing: [f32; 3],
    value: impl Fn(usize) -> f32,
    stored: StoredType,
) {
    let data: Vec<f32> = (0..shape.iter().product()).map(value).collect();
    write_nifti(path, &data, shape, 1, &meta_for_spacing(spacing, stored), stored).unwrap();
}

#[test]
fn msd_json_lists_resolve_relative_to_the_file() {
    let d = temp("json");
    std::fs::write(
        d.join("dataset.json"),
        r#"{"name": "Tiny", "labels": {"0": "background", "1": "spleen"},
            "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
            "validation": [{"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz"}],
            "test": ["./imagesTs/c.nii.gz"]}"#,
    )
    .unwrap();
    let ds = Dataset::from_json(&d.join("dataset.json")).unwrap();
    assert_eq!(ds.name, "Tiny");
    assert_eq!(ds.labels[&1], "spleen");
    assert_eq!(
        ds.training,
        [Case { image: d.join("imagesTr/a.nii.gz"), label: Some(d.join("labelsTr/a.nii.gz")) }]
    );
    assert_eq!(ds.validation[0].image, d.join("imagesTr/b.nii.gz"));
    assert_eq!(ds.test, [Case { image: d.join("imagesTs/c.nii.gz"), label: None }]);
    // Written back and read again, the lists survive.
    std::fs::write(d.join("again.json"), ds.to_json(&d).unwrap()).unwrap();
    let again = Dataset::from_json(&d.join("again.json")).unwrap();
    assert_eq!((again.training, again.validation, again.test), (ds.training, ds.validation, ds.test));
    std::fs::write(d.join("bad.json"), r#"{"training": [{"label": "x"}]}"#).unwrap();
    let e = format!("{:#}", Dataset::from_json(&d.join("bad.json")).unwrap_err());
    assert!(e.contains("bad.json") && e.contains("training[0] has no \"image\""), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn btcv_split_keeps_35_to_40_for_validation() {
    let training = (1..=40)
        .filter(|n| !(11..=20).contains(n)) // BTCV's 30 labelled cases are numbered with gaps
        .map(|n| Case {
            image: format!("imagesTr/img{n:04}.nii.gz").into(),
            label: Some(format!("labelsTr/label{n:04}.nii.gz").into()),
        })
        .collect();
    let ds = Dataset { training, ..Dataset::default() }.btcv_split();
    assert_eq!((ds.training.len(), ds.validation.len()), (24, 6));
    assert!(ds.validation.iter().all(
        |c| c.image.to_string_lossy().contains("img003") || c.image.to_string_lossy().contains("img0040")
    ));
}

#[test]
fn folders_of_images_for_pretraining() {
    let a = temp("fa");
    let b = temp("fb");
    write(&a.join("imagesTr/x.nii.gz"), [4, 4, 4], [1.0; 3], |_| 0.0, StoredType::I16);
    write(&a.join("labelsTr/x.nii.gz"), [4, 4, 4], [1.0; 3], |_| 0.0, StoredType::U8);
    std::fs::create_dir_all(b.join("deep/er")).unwrap();
    write(&b.join("deep/er/y.nii"), [4, 4, 4], [1.0; 3], |_| 0.0, StoredType::I16);
    let spec = format!("{},{}", a.display(), b.display());
    let ds = Dataset::open(&spec).unwrap();
    let names: Vec<String> =
        ds.training.iter().map(|c| c.image.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(names, ["x.nii.gz", "y.nii"], "label folders are not images");
    let e = format!("{:#}", Dataset::open(&a.join("nothing-here").to_string_lossy()).unwrap_err());
    assert!(e.contains("nothing-here"), "{e}");
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

#[test]
fn scan_reports_every_problem_naming_each_file() {
    let d = temp("scan");
    let img = |n: &str| d.join(format!("imagesTr/{n}.nii.gz"));
    let lab = |n: &str| d.join(format!("labelsTr/{n}.nii.gz"));
    let blob = |i: usize| if (10..20).contains(&(i % 30)) { 1.0 } else { 0.0 };
    write(&img("good"), [6, 6, 6], [1.0; 3], |i| i as f32, StoredType::I16);
    write(&lab("good"), [6, 6, 6], [1.0; 3], blob, StoredType::U8);
    write(&img("grid"), [6, 6, 6], [1.0; 3], |i| i as f32, StoredType::I16);
    write(&lab("grid"), [6, 6, 5], [1.0; 3], blob, StoredType::U8);
    write(&img("empty"), [6, 6, 6], [1.0; 3], |i| i as f32, StoredType::I16);
    write(&lab("empty"), [6, 6, 6], [1.0; 3], |_| 0.0, StoredType::U8);
    write(&img("cut"), [6, 6, 6], [1.0; 3], |i| i as f32, StoredType::I16);
    let bytes = std::fs::read(img("cut")).unwrap();
    std::fs::write(img("cut"), &bytes[..bytes.len() / 2]).unwrap();
    write(&lab("cut"), [6, 6, 6], [1.0; 3], blob, StoredType::U8);
    write(&img("class"), [6, 6, 6], [1.0; 3], |i| i as f32, StoredType::I16);
    write(&lab("class"), [6, 6, 6], [1.0; 3], |i| if i == 7 { 9.0 } else { blob(i) }, StoredType::U8);
    let case = |n: &str| Case { image: img(n), label: Some(lab(n)) };
    let mut ds = Dataset { name: "broken".into(), ..Dataset::default() };
    ds.labels.insert(0, "background".into());
    ds.labels.insert(1, "organ".into());
    ds.training = vec![case("good"), case("grid"), case("empty"), case("cut"), case("class")];
    ds.validation = vec![Case { image: img("missing"), label: None }];
    let e = ds.scan().unwrap_err().to_string();
    assert!(e.starts_with("5 problem(s)"), "{e}");
    for expected in [
        "labelsTr/grid.nii.gz: label grid [6, 6, 5]",
        "labelsTr/empty.nii.gz: label map is empty",
        "imagesTr/cut.nii.gz: gzip stream is corrupt or truncated",
        "labelsTr/class.nii.gz: label 9 is not among the dataset's classes 0-1",
        "imagesTr/missing.nii.gz",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
    assert!(!e.contains("good.nii.gz"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A folder of inputs lists the `.nii` and `.nii.gz` files directly in it, sorted, without
/// hidden files (`._x.nii.gz` resource forks), sub-folders or other files; pretraining's
/// recursive listing applies the same file rule below the top.
#[test]
fn folder_listings_share_one_nifti_rule() {
    use glmae_data::dataset::nifti_files_in;
    let dir = std::env::temp_dir().join(format!("glmae-listing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::create_dir_all(dir.join("labelsTr")).unwrap();
    for name in ["b.nii.gz", "a.nii", "._c.nii.gz", "sub/d.nii", "labelsTr/e.nii"] {
        write(&dir.join(name), [2, 2, 2], [1.0; 3], |_| 0.0, StoredType::F32);
    }
    std::fs::write(dir.join("notes.txt"), "x").unwrap();
    let flat = nifti_files_in(&dir).unwrap();
    assert_eq!(flat, vec![dir.join("a.nii"), dir.join("b.nii.gz")]);
    let recursive: Vec<_> = Dataset::from_folders(std::slice::from_ref(&dir))
        .unwrap()
        .training
        .into_iter()
        .map(|c| c.image)
        .collect();
    assert_eq!(recursive, vec![dir.join("a.nii"), dir.join("b.nii.gz"), dir.join("sub/d.nii")]);
    std::fs::remove_dir_all(&dir).unwrap();
}
