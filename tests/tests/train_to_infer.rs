//! A model written by glmae-train is read and described by glmae-infer; damaged files are refused
//! with errors that name the file and the problem.

use std::path::PathBuf;

use glmae_core::format::Precision;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("glmae-tests-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_model(path: &std::path::Path, precision: Precision) -> Vec<u8> {
    let cfg = glmae_train::presets::unetr("tiny", 3, 32).unwrap();
    let bytes = glmae_core::synthetic::random_model(&cfg, 11, precision).unwrap();
    glmae_data::io::atomic_write(path, &bytes).unwrap();
    bytes
}

#[test]
fn trainer_output_is_described_by_infer() {
    let dir = temp_dir("roundtrip");
    for (name, precision) in [("f32.glmae", Precision::F32), ("int8.glmae", Precision::Int8)] {
        let path = dir.join(name);
        let written = write_model(&path, precision);
        let read = glmae_infer::read_model_bytes(&path).unwrap();
        assert_eq!(read, written);
        let file = glmae_infer::parse_model(&path, &read).unwrap();
        let text = glmae_infer::describe(&file).unwrap();
        assert!(text.contains("ViT hidden 24 depth 12 heads 2 mlp 48"), "{text}");
        assert!(text.contains("classes (3):"), "{text}");
        let int8_line = text.lines().find(|l| l.contains("weights:")).unwrap();
        assert_eq!(int8_line.contains(" 0 int8"), precision == Precision::F32, "{int8_line}");
        assert!(!text.contains("activation scales"), "uncalibrated, yet: {text}");
    }
    // A calibrated int8 model (as `glmae-train export --int8 --calibrate` writes) says so, and the
    // f32 paths still read it.
    let dataset = glmae_data::phantom_dataset::write_phantom_dataset(
        &dir.join("phantoms"),
        1,
        5,
        &glmae_data::phantom::PhantomConfig { shape: [36, 36, 34], spacing: [4.5, 4.5, 6.0] },
        1,
    )
    .unwrap();
    let bytes = write_model(&dir.join("int8.glmae"), Precision::Int8);
    let (calibrated, _) = glmae_train::io::calibrate::calibrate(&bytes, &dataset, 2).unwrap();
    let file = glmae_infer::parse_model(&dir.join("calibrated.glmae"), &calibrated).unwrap();
    let text = glmae_infer::describe(&file).unwrap();
    assert!(text.contains("int8 activation scales for glmae-core's integer pass (91 points"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_files_are_refused_naming_file_and_problem() {
    let dir = temp_dir("damaged");
    let good = write_model(&dir.join("good.glmae"), Precision::Int8);
    let mut corrupt = good.clone();
    corrupt[good.len() / 2] ^= 0xFF;
    let mut wrong_version = good.clone();
    wrong_version[8] = 9;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("truncated.glmae", good[..good.len() - 100].to_vec(), "truncated"),
        ("corrupt.glmae", corrupt, "checksum mismatch"),
        ("version.glmae", wrong_version, "format version 9"),
        ("notes.txt", b"these are not weights".to_vec(), "wrong magic"),
    ];
    for (name, bytes, problem) in cases {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let read = glmae_infer::read_model_bytes(&path).unwrap();
        let err = format!("{:#}", glmae_infer::parse_model(&path, &read).unwrap_err());
        assert!(err.contains(name) && err.contains(problem), "{name}: {err}");
    }
    let missing = dir.join("missing.glmae");
    let err = format!("{:#}", glmae_infer::read_model_bytes(&missing).unwrap_err());
    assert!(err.contains("missing.glmae"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
