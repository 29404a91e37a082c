//! `glmae-train make-phantoms`: the synthetic CT dataset.

use std::path::PathBuf;

/// Flags of `make-phantoms`.
#[derive(clap::Args)]
pub struct Args {
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of volumes; the last fifth is listed for validation.
    #[arg(long, default_value_t = 10)]
    pub count: usize,
    /// Seed of the first volume (volume i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Voxels per axis.
    #[arg(long, value_delimiter = ',', default_values_t = [160, 128, 96])]
    pub shape: Vec<usize>,
    /// Voxel spacing in mm per axis.
    #[arg(long, value_delimiter = ',', default_values_t = [2.0, 2.0, 2.5])]
    pub spacing: Vec<f32>,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// Writes the phantoms and their `dataset.json`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { out, count, seed, shape, spacing, threads } = a;
    anyhow::ensure!(
        shape.len() == 3 && spacing.len() == 3,
        "--shape and --spacing take three values, e.g. 160,128,96"
    );
    let cfg = glmae_data::phantom::PhantomConfig {
        shape: [shape[0], shape[1], shape[2]],
        spacing: [spacing[0], spacing[1], spacing[2]],
    };
    let start = std::time::Instant::now();
    let bar = glmae_train::progress::bar("phantoms", count as u64);
    let ds = glmae_data::phantom_dataset::write_phantom_dataset_observed(
        &out,
        count,
        seed,
        &cfg,
        threads,
        &|| bar.inc(1),
    )?;
    bar.finish_and_clear();
    println!(
        "wrote {count} phantoms ({} training, {} validation) to {} in {:.1} s",
        ds.training.len(),
        ds.validation.len(),
        out.join("dataset.json").display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
