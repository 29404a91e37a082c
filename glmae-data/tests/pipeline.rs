//! Phantoms written as an MSD dataset go through scanning, caching, preprocessing, views and
//! crops, and predictions map back to the source grid.

use std::path::PathBuf;

use glmae_data::loader::to_labels;
use glmae_data::phantom::PhantomConfig;
use glmae_data::phantom_dataset::write_phantom_dataset_observed;
use glmae_data::preprocess::Preprocessor;
use glmae_data::transforms::{Augment, Rng, ViewSpec, pos_neg_crop, random_view};
use glmae_data::{Dataset, VolumeCache, read_nifti};

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("glmae-pipe-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn small() -> PhantomConfig {
    PhantomConfig { shape: [80, 64, 48], spacing: [4.0, 4.0, 5.0] }
}

#[test]
fn phantom_dataset_round_trips_through_the_pipeline() {
    let d = temp("msd");
    let written = std::sync::atomic::AtomicUsize::new(0);
    let tick = || {
        written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let ds = write_phantom_dataset_observed(&d, 3, 10, &small(), 2, &tick).unwrap();
    assert_eq!(written.into_inner(), 3, "one progress tick per phantom written");
    assert_eq!((ds.training.len(), ds.validation.len()), (2, 1));
    let reread = Dataset::from_json(&d.join("dataset.json")).unwrap();
    assert_eq!(reread.training, ds.training);
    assert_eq!(reread.labels.len(), 14);
    reread.scan().unwrap();

    // The files hold what the generator made: HU as int16, labels as uint8, RAS at the spacing.
    let img = read_nifti(&ds.training[0].image).unwrap();
    assert_eq!(img.volume.shape, [80, 64, 48]);
    assert_eq!(img.volume.affine.axcodes(), "RAS");
    assert_eq!(img.volume.spacing(), [4.0, 4.0, 5.0]);
    let phantom = glmae_data::phantom::generate(10, &small());
    assert!(img.volume.data.iter().zip(&phantom.hu).all(|(a, b)| (a - b.round()).abs() < 1e-3));

    // Preprocessed once, cached on disk, and read back identically by a fresh cache.
    let cache_dir = d.join("cache");
    let cache = VolumeCache::new(Preprocessor::btcv(), Some(cache_dir.clone()));
    cache.warm(&ds.training, 2).unwrap();
    let p = cache.get(&ds.training[0]).unwrap();
    let fresh = VolumeCache::new(Preprocessor::btcv(), Some(cache_dir.clone())).get(&ds.training[0]).unwrap();
    assert_eq!(*p, *fresh);
    // A damaged cache entry is rebuilt rather than trusted.
    for e in std::fs::read_dir(&cache_dir).unwrap() {
        let path = e.unwrap().path();
        let b = std::fs::read(&path).unwrap();
        std::fs::write(&path, &b[..b.len() / 2]).unwrap();
    }
    let rebuilt = VolumeCache::new(Preprocessor::btcv(), Some(cache_dir)).get(&ds.training[0]).unwrap();
    assert_eq!(*p, *rebuilt);

    let labels = p.labels.as_ref().unwrap();
    let spacing = p.image.spacing();
    assert!((spacing[0] - 1.5).abs() < 1e-6 && (spacing[2] - 2.0).abs() < 1e-6, "{spacing:?}");
    let present = (0..14u8).filter(|c| labels.data.contains(c)).count();
    assert!(present >= 12, "only {present} classes survive preprocessing");
    assert!(p.image.data.iter().all(|v| (0.0..=1.0).contains(v)));

    // Fine-tuning crop with augmentation keeps image and labels aligned in shape.
    let mut rng = Rng::new(0);
    let (mut ci, mut cl) = pos_neg_crop(&p.image, labels, [48, 48, 32], 1.0, 1.0, &mut rng);
    Augment::default().apply(&mut ci, &mut cl, &mut rng);
    assert_eq!(ci.voxels(), cl.voxels());
    let g = random_view(&p.image, &ViewSpec { size: 32, ..ViewSpec::GLOBAL }, &mut rng);
    assert_eq!(g.shape, [32; 3]);

    // A perfect prediction on the model grid maps back onto the source labels.
    let (model_img, inverse) = Preprocessor::btcv().apply(&img.volume).unwrap();
    assert_eq!(model_img.shape, labels.shape);
    let back = inverse.labels_to_source(&labels.data).unwrap();
    let source = to_labels(read_nifti(ds.training[0].label.as_ref().unwrap()).unwrap().volume).unwrap();
    let agree = back.iter().zip(&source.data).filter(|(a, b)| a == b).count() as f64 / back.len() as f64;
    assert!(agree > 0.97, "labels survive the round trip at only {agree}");
    std::fs::remove_dir_all(&d).unwrap();
}
