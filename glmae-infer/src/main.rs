//! `glmae-infer`: CPU inference from `.glmae` weight files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "glmae-infer", version, about = "CPU inference from glmae weight files")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's architecture, classes, preprocessing and size.
    Info {
        /// The `.glmae` weight file.
        model: PathBuf,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info { model } => {
            let bytes = glmae_infer::read_model_bytes(&model)?;
            let file = glmae_infer::parse_model(&model, &bytes)?;
            print!("{}", glmae_infer::describe(&file)?);
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
