//! `glmae-train`: GL-MAE pretraining, UNETR fine-tuning, evaluation and export.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use glmae_core::format::Precision;

#[derive(Parser)]
#[command(name = "glmae-train", version, about = "GL-MAE pretraining and UNETR fine-tuning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a UNETR with deterministic random weights: for smoke tests, benchmarks and firmware
    /// bring-up before a trained model exists.
    InitModel {
        /// Architecture preset: tiny, vit-t or vit-b.
        #[arg(long, default_value = "vit-t")]
        model: String,
        /// Output classes, background included.
        #[arg(long, default_value_t = 14)]
        classes: u32,
        /// Cubic input window in voxels (ignored by `tiny`, which is 32).
        #[arg(long, default_value_t = 96)]
        img: u32,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Store weight matrices as int8 with per-channel scales.
        #[arg(long)]
        int8: bool,
        /// Output `.glmae` file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write synthetic abdominal CT phantoms with the 13 BTCV organs as an MSD dataset
    /// (imagesTr, labelsTr, dataset.json): the built-in data for training and tests.
    MakePhantoms {
        /// Output folder (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Number of volumes; the last fifth is listed for validation.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Seed of the first volume (volume i uses seed + i).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Voxels per axis.
        #[arg(long, num_args = 3, value_delimiter = ',', default_values_t = [160, 128, 96])]
        shape: Vec<usize>,
        /// Voxel spacing in mm per axis.
        #[arg(long, num_args = 3, value_delimiter = ',', default_values_t = [2.0, 2.0, 2.5])]
        spacing: Vec<f32>,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::InitModel { model, classes, img, seed, int8, out } => {
            let cfg = glmae_train::presets::unetr(&model, classes, img)?;
            let precision = if int8 { Precision::Int8 } else { Precision::F32 };
            let bytes = glmae_core::synthetic::random_model(&cfg, seed, precision)?;
            glmae_data::io::atomic_write(&out, &bytes)?;
            println!(
                "wrote {} ({} bytes, {model}, {classes} classes, {precision:?})",
                out.display(),
                bytes.len()
            );
        }
        Command::MakePhantoms { out, count, seed, shape, spacing, threads } => {
            let cfg = glmae_data::phantom::PhantomConfig {
                shape: [shape[0], shape[1], shape[2]],
                spacing: [spacing[0], spacing[1], spacing[2]],
            };
            let start = std::time::Instant::now();
            let ds = glmae_data::phantom_dataset::write_phantom_dataset(&out, count, seed, &cfg, threads)?;
            println!(
                "wrote {count} phantoms ({} training, {} validation) to {} in {:.1} s",
                ds.training.len(),
                ds.validation.len(),
                out.join("dataset.json").display(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
