//! Loading throughput: phantom generation, NIfTI decoding, preprocessing, GL-MAE views and the
//! prefetching pipeline. `cargo bench -p glmae-data --bench loading` prints a markdown table
//! (docs/performance.md records the numbers and the machine).

use std::sync::Arc;
use std::time::Instant;

use glmae_data::phantom::PhantomConfig;
use glmae_data::phantom_dataset::write_phantom_dataset;
use glmae_data::preprocess::Preprocessor;
use glmae_data::transforms::{Rng, ViewSpec, random_view};
use glmae_data::{Prefetcher, VolumeCache, read_nifti};

fn rate(n: usize, secs: f64) -> String {
    format!("{:.2}/s ({:.0} ms each)", n as f64 / secs, 1000.0 * secs / n as f64)
}

fn main() -> anyhow::Result<()> {
    let count = 6;
    let dir = std::env::temp_dir().join(format!("glmae-bench-loading-{}", std::process::id()));
    let cfg = PhantomConfig::default();
    println!("| stage | threads | throughput |");
    println!("|---|---|---|");

    let t = Instant::now();
    let ds = write_phantom_dataset(&dir, count, 0, &cfg, 2)?;
    println!(
        "| generate + write phantom {:?} (gzip NIfTI) | 2 | {} |",
        cfg.shape,
        rate(count, t.elapsed().as_secs_f64())
    );
    let cases: Vec<_> = ds.training.iter().chain(&ds.validation).cloned().collect();

    let t = Instant::now();
    for c in &cases {
        read_nifti(&c.image)?;
    }
    println!("| decode .nii.gz image | 1 | {} |", rate(count, t.elapsed().as_secs_f64()));

    for threads in [1, 2] {
        let cache = VolumeCache::new(Preprocessor::pretraining(), None);
        let t = Instant::now();
        cache.warm(&cases, threads)?;
        println!(
            "| decode + preprocess image and labels (cold cache) | {threads} | {} |",
            rate(count, t.elapsed().as_secs_f64())
        );
    }
    let cache_dir = dir.join("cache");
    let cache = VolumeCache::new(Preprocessor::pretraining(), Some(cache_dir.clone()));
    cache.warm(&cases, 2)?;
    let cache = VolumeCache::new(Preprocessor::pretraining(), Some(cache_dir));
    let t = Instant::now();
    cache.warm(&cases, 1)?;
    println!("| preprocessed volume from the disk cache | 1 | {} |", rate(count, t.elapsed().as_secs_f64()));

    let vol = cache.get(&cases[0])?;
    for (name, spec, n) in
        [("global view 160^3", ViewSpec::GLOBAL, 10), ("local view 96^3", ViewSpec::LOCAL, 20)]
    {
        let mut rng = Rng::new(1);
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(random_view(&vol.image, &spec, &mut rng));
        }
        println!("| {name} | 1 | {} |", rate(n, t.elapsed().as_secs_f64()));
    }

    let cache = Arc::new(cache);
    let steps = 12;
    for workers in [1, 2] {
        let (cache, cases) = (cache.clone(), cases.clone());
        let t = Instant::now();
        let samples = Prefetcher::new(steps, workers, 4, 0, move |i, rng| {
            let v = cache.get(&cases[i % cases.len()])?;
            let globals: Vec<_> = (0..2).map(|_| random_view(&v.image, &ViewSpec::GLOBAL, rng)).collect();
            let locals: Vec<_> = (0..4).map(|_| random_view(&v.image, &ViewSpec::LOCAL, rng)).collect();
            Ok((globals, locals))
        });
        for s in samples {
            std::hint::black_box(s?);
        }
        println!(
            "| GL-MAE sample (2 global + 4 local views), prefetched | {workers} | {} |",
            rate(steps, t.elapsed().as_secs_f64())
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
