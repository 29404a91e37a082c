//! Damaged DICOM files never crash the reader: every file of a good series (written by
//! `scripts/dicom_series.py`), cut short at seeded places or with seeded bytes overwritten, is
//! read with `glmae_data::dicom::read_dicom_folder`, which must return (a volume or an error), not
//! panic. Needs python3 with numpy and pydicom; skipped without them unless
//! `GLMAE_REQUIRE_DICOM_TOOLS=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use glmae_core::synthetic::SplitMix64;
use glmae_data::dicom::read_dicom_folder;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { files(&p, out) } else { out.push(p) }
    }
}

#[test]
fn damaged_series_are_errors_never_panics() {
    let dir = std::env::temp_dir().join(format!("glmae-dicom-damage-{}", std::process::id()));
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
    let series = dir.join("axial_explicit");
    let mut originals = Vec::new();
    files(&series, &mut originals);
    originals.sort();
    let copies: Vec<Vec<u8>> = originals.iter().map(|p| std::fs::read(p).unwrap()).collect();
    // More rounds for a longer search: GLMAE_DAMAGE_ROUNDS=3000.
    let rounds: usize = std::env::var("GLMAE_DAMAGE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut rng = SplitMix64::new(7);
    let (mut errors, mut read) = (0, 0);
    for round in 0..rounds {
        let which = (rng.next_u64() % originals.len() as u64) as usize;
        let good = &copies[which];
        let mut bad = good.clone();
        match round % 3 {
            // Cut short anywhere, header included.
            0 => bad.truncate((rng.next_u64() % good.len() as u64) as usize),
            // Overwrite a few bytes in the header and element area (lengths, VRs, tags).
            1 => {
                for _ in 0..1 + rng.next_u64() % 4 {
                    let at = 128 + (rng.next_u64() % 900.min(good.len() as u64 - 128)) as usize;
                    bad[at] = rng.next_u64() as u8;
                }
            }
            // A length field made huge: four 0xff bytes somewhere in the first kilobyte.
            _ => {
                let at = 132 + (rng.next_u64() % 800.min(good.len() as u64 - 140)) as usize;
                bad[at..at + 4].copy_from_slice(&[0xff; 4]);
            }
        }
        std::fs::write(&originals[which], &bad).unwrap();
        let result = std::panic::catch_unwind(|| read_dicom_folder(&series, None));
        let outcome = result.unwrap_or_else(|_| {
            panic!("round {round}: a damaged {} made the reader panic", originals[which].display())
        });
        match outcome {
            Ok(_) => read += 1,
            Err(_) => errors += 1,
        }
        std::fs::write(&originals[which], good).unwrap();
    }
    println!(
        "{rounds} damaged series: {errors} refused, {read} read (the damage fell in pixel values or an element the reader does not use)"
    );
    assert!(errors > rounds / 3, "only {errors} of {rounds} damaged series were refused");
    std::fs::remove_dir_all(&dir).unwrap();
}
