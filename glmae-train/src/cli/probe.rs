//! `glmae-train probe`: k-NN and linear probes of a pretraining run's encoder.

use std::path::PathBuf;

/// Flags of `probe`.
#[derive(clap::Args)]
pub struct Args {
    /// The pretraining run folder (config.json, checkpoint.bin).
    pub run: PathBuf,
    /// dataset.json with labels: fitted on `training`, scored on `validation`.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder (default RUN/probe).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Neighbours of the k-NN classifier.
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    /// A patch is labelled when its majority class covers at least this fraction of it.
    #[arg(long, default_value_t = 0.5)]
    pub min_fraction: f64,
    /// Also cut the volumes at offsets of half a patch (8 grids; `--shifts false` for one).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub shifts: bool,
    /// At most this many fitting patches (a seeded subsample).
    #[arg(long, default_value_t = 100_000)]
    pub max_fit: usize,
    /// Resample to this spacing in mm (default: the run's, else the first training image's).
    #[arg(long, value_delimiter = ',')]
    pub spacing: Option<Vec<f32>>,
    /// Seed of the random control encoder and the subsample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Probe the hidden state after this many transformer blocks (0: the patch embedding; UNETR
    /// taps 3, 6 and 9) instead of the encoder's final normed output.
    #[arg(long)]
    pub blocks: Option<usize>,
    /// Probe the EMA teacher's encoder instead of the student's (what fine-tuning starts from).
    #[arg(long)]
    pub teacher: bool,
    /// cpu or ndarray (cuda with the feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Probes and prints the table.
pub fn run(a: Args) -> anyhow::Result<()> {
    use glmae_train::probe::{ProbeOptions, probe_run};
    let opts = ProbeOptions {
        k: a.k,
        min_fraction: a.min_fraction,
        shifts: a.shifts,
        max_fit: a.max_fit,
        seed: a.seed,
        blocks: a.blocks,
        teacher: a.teacher,
        ..ProbeOptions::default()
    };
    let spacing = match a.spacing.as_deref() {
        None => None,
        Some(&[x, y, z]) => Some([x, y, z]),
        Some(_) => anyhow::bail!("--spacing takes three values, e.g. 1.5,1.5,2"),
    };
    let out = a.out.unwrap_or_else(|| a.run.join("probe"));
    let device = glmae_train::device::base_device(&a.device)?;
    let r = probe_run(&a.run, &a.data, &out, &opts, spacing, &device)?;
    print!("{}", r.markdown);
    println!("written to {} and {}", r.markdown_path.display(), r.json_path.display());
    Ok(())
}
