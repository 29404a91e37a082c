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
