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
