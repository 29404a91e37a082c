//! What a fine-tuning step trains on: the seeded label subset, the label check, and augmented
//! foreground/background crops.

use anyhow::{Result, bail};
use glmae_data::transforms::{Rng, pos_neg_crop};
use glmae_data::{Case, Labels, Volume, VolumeCache};

use crate::finetune::FinetuneConfig;

/// The seeded subset of `cases` a label fraction keeps (at least one case).
pub fn label_subset(cases: &[Case], fraction: f64, seed: u64) -> Vec<Case> {
    let keep = ((cases.len() as f64 * fraction).round() as usize).clamp(1.min(cases.len()), cases.len());
    let mut order: Vec<usize> = (0..cases.len()).collect();
    let mut rng = Rng::new(seed ^ 0x001a_be15);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut chosen: Vec<usize> = order[..keep].to_vec();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| cases[i].clone()).collect()
}

/// One step's training crops from a prepared case: `crops_per_step` ROI crops centred on
/// foreground and background alternately at random (1:1), augmented; image `(crops, 1, roi)` and
/// labels `(crops, roi)`.
pub fn crops(cfg: &FinetuneConfig, image: &Volume, labels: &Labels, rng: &mut Rng) -> (Vec<f32>, Vec<u8>) {
    let roi = cfg.roi();
    let mut imgs = Vec::new();
    let mut labs = Vec::new();
    for _ in 0..cfg.crops_per_step {
        let (mut ci, mut cl) = pos_neg_crop(image, labels, roi, 1.0, 1.0, rng);
        cfg.augment.apply(&mut ci, &mut cl, rng);
        // rot90 swaps axes 0 and 1; for a non-cubic ROI, turn once more to restore the shape.
        if ci.shape != roi {
            glmae_data::transforms::rot90(&mut ci, 1);
            glmae_data::transforms::rot90(&mut cl, 1);
        }
        imgs.extend_from_slice(&ci.data);
        labs.extend_from_slice(&cl.data);
    }
    (imgs, labs)
}

/// Refuses label maps with a value the model has no class for (a label 200 with 14 classes
/// would otherwise train as one of them), naming the file, the value and the class count.
pub fn ensure_labels_fit<'a>(
    cache: &VolumeCache,
    cases: impl IntoIterator<Item = &'a glmae_data::Case>,
    classes: usize,
) -> Result<()> {
    for case in cases {
        let p = cache.get(case)?;
        let Some(labels) = p.labels.as_ref() else { continue };
        if let Some(&max) = labels.data.iter().max().filter(|&&m| m as usize >= classes) {
            let path = case.label.as_deref().unwrap_or(&case.image);
            bail!(
                "{}: label value {max} but the model has {classes} classes (0..={}); fix the label map \
                 or give the dataset's label list",
                path.display(),
                classes - 1
            );
        }
    }
    Ok(())
}
