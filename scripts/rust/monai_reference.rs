//! Shared by the MONAI parity tests of several crates (included with `#[path]`): runs one of
//! `scripts/*.py` with python3 and says whether its outputs are there.

/// Runs `scripts/<script> <dir>`; `false` (after printing why) when python3 with torch + monai
/// is not available, a failed assertion instead when `GLMAE_REQUIRE_MONAI` is set.
pub fn run_monai_script(script: &str, dir: &std::path::Path) -> bool {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/").to_string() + script;
    let out = std::process::Command::new("python3").arg(&path).arg(dir).output();
    let why = match out {
        Ok(o) if o.status.success() => return true,
        Ok(o) => String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or_default().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(std::env::var_os("GLMAE_REQUIRE_MONAI").is_none(), "MONAI reference failed: {why}");
    eprintln!("SKIPPED: python3 with torch + monai is not available ({why})");
    false
}
