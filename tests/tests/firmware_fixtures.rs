//! The firmware example's embedded model, input and expected labels are what the host core
//! produces. Regenerate after a deliberate change with
//! `GLMAE_BLESS=1 cargo test -p glmae-tests --test firmware_fixtures`.

use std::path::PathBuf;

use glmae_core::format::Precision;
use glmae_core::synthetic::random_model;
use glmae_core::{ModelFile, Unetr, testing_config};

const WINDOW: [usize; 3] = [32, 32, 32];
const SEED: u64 = 2026;

/// A smooth synthetic patch: a bright ellipsoid and a darker sphere on a textured background, in
/// the model's [0, 1] intensity range.
fn input_patch() -> Vec<f32> {
    let mut v = Vec::with_capacity(32 * 32 * 32);
    for z in 0..32 {
        for y in 0..32 {
            for x in 0..32 {
                let (fz, fy, fx) = (z as f32, y as f32, x as f32);
                let e =
                    ((fz - 14.0) / 9.0).powi(2) + ((fy - 18.0) / 6.0).powi(2) + ((fx - 12.0) / 7.0).powi(2);
                let s = ((fz - 22.0).powi(2) + (fy - 10.0).powi(2) + (fx - 23.0).powi(2)).sqrt();
                let mut value = 0.25 + 0.03 * (fx * 0.9).sin() * (fy * 0.7).cos();
                if e < 1.0 {
                    value = 0.85;
                } else if s < 5.0 {
                    value = 0.55;
                }
                v.push(value);
            }
        }
    }
    v
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../firmware-example/data")
}

#[test]
fn firmware_fixtures_match_the_host_core() {
    let model = random_model(&testing_config(), SEED, Precision::Int8).unwrap();
    let input = input_patch();
    let file = ModelFile::parse(&model).unwrap();
    let unetr = Unetr::new(&file).unwrap();
    let mut labels = vec![0u8; input.len()];
    let mut scratch = vec![0.0; unetr.segment_scratch_len(WINDOW).unwrap()];
    unetr.segment(&input, WINDOW, &mut labels, &mut scratch).unwrap();
    let input_bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    let scratch_len = scratch.len();
    drop(unetr);
    let files = [("model.glmae", model.clone()), ("input.f32", input_bytes), ("expected_labels.u8", labels)];
    let dir = fixture_dir();
    if std::env::var_os("GLMAE_BLESS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        eprintln!("wrote fixtures to {}; segment scratch {} f32", dir.display(), scratch_len);
    }
    for (name, bytes) in &files {
        let path = dir.join(name);
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(committed == *bytes, "{} is stale: regenerate with GLMAE_BLESS=1", path.display());
    }
}
