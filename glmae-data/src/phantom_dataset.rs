//! Writing synthetic phantoms as an MSD dataset (`imagesTr`, `labelsTr`, `dataset.json`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};

use crate::dataset::{Case, Dataset};
use crate::io::atomic_write;
use crate::nifti_io::{StoredType, meta_for_spacing, write_nifti};
use crate::phantom::{LABELS, PhantomConfig, generate};

/// Writes `count` phantoms (seeds `seed..seed + count`) under `out` as an MSD dataset: int16 HU
/// images, uint8 BTCV labels, and a `dataset.json` that keeps the last `validation` cases (at
/// least one when `count > 1`) for validation. Runs on `threads` threads; returns the dataset.
pub fn write_phantom_dataset(
    out: &Path,
    count: usize,
    seed: u64,
    cfg: &PhantomConfig,
    threads: usize,
) -> Result<Dataset> {
    write_phantom_dataset_observed(out, count, seed, cfg, threads, &|| {})
}

/// [`write_phantom_dataset`], calling `written` after each phantom (for a progress bar).
pub fn write_phantom_dataset_observed(
    out: &Path,
    count: usize,
    seed: u64,
    cfg: &PhantomConfig,
    threads: usize,
    written: &(dyn Fn() + Sync),
) -> Result<Dataset> {
    ensure!(count > 0, "--count must be at least 1");
    for sub in ["imagesTr", "labelsTr"] {
        let d = out.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let errors: Vec<String> = crate::parallel::map_indexed(
        count,
        threads,
        || Some("a writer thread crashed".to_string()),
        |i| {
            let result = write_one(out, i, seed + i as u64, cfg).err().map(|e| format!("{e:#}"));
            written();
            result
        },
    )
    .into_iter()
    .flatten()
    .collect();
    ensure!(errors.is_empty(), "{}", errors.join("\n"));

    let cases: Vec<Case> = (0..count)
        .map(|i| Case {
            image: out.join(format!("imagesTr/phantom_{i:04}.nii.gz")),
            label: Some(out.join(format!("labelsTr/phantom_{i:04}.nii.gz"))),
        })
        .collect();
    let n_val = if count > 1 { (count / 5).max(1) } else { 0 };
    let (training, validation) = cases.split_at(count - n_val);
    let labels: BTreeMap<u32, String> =
        LABELS.iter().enumerate().map(|(i, n)| (i as u32, n.to_string())).collect();
    let ds = Dataset {
        name: "GL-MAE synthetic abdominal CT phantoms".into(),
        labels,
        training: training.to_vec(),
        validation: validation.to_vec(),
        test: Vec::new(),
    };
    atomic_write(&out.join("dataset.json"), ds.to_json(out)?.as_bytes())?;
    Ok(ds)
}

fn write_one(out: &Path, i: usize, seed: u64, cfg: &PhantomConfig) -> Result<()> {
    let p = generate(seed, cfg);
    let hu: Vec<f32> = p.hu.iter().map(|v| v.round()).collect();
    let labels: Vec<f32> = p.labels.iter().map(|&l| l as f32).collect();
    let name = format!("phantom_{i:04}.nii.gz");
    write_nifti(
        &out.join("imagesTr").join(&name),
        &hu,
        p.shape,
        1,
        &meta_for_spacing(p.spacing, StoredType::I16),
        StoredType::I16,
    )?;
    write_nifti(
        &out.join("labelsTr").join(&name),
        &labels,
        p.shape,
        1,
        &meta_for_spacing(p.spacing, StoredType::U8),
        StoredType::U8,
    )
}
