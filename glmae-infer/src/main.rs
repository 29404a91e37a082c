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
    /// Segment a NIfTI volume (or every volume in a folder) with a model.
    Segment {
        /// The `.glmae` weight file.
        #[arg(long)]
        model: PathBuf,
        /// A .nii/.nii.gz file, or a folder of them.
        #[arg(long)]
        input: PathBuf,
        /// The label file, or a folder for a folder input.
        #[arg(long)]
        output: PathBuf,
        /// Window overlap.
        #[arg(long, default_value_t = 0.5)]
        overlap: f64,
        /// gaussian or constant.
        #[arg(long, default_value = "gaussian")]
        blend: glmae_data::sliding_window::Blend,
        /// Threads (all inside each window; one window each with --reference).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Run glmae-core's reference kernels instead of the fast forward pass.
        #[arg(long, conflicts_with = "int8_kernels")]
        reference: bool,
        /// int8 models: run the decoder's int8 3x3x3 convolutions with 128+ input channels on
        /// integer kernels, quantising activations too (a few % faster, slightly less exact),
        /// instead of all on dequantised f32 weights.
        #[arg(long)]
        int8_kernels: bool,
        /// Also write per-class probabilities (single input only).
        #[arg(long)]
        probabilities: Option<PathBuf>,
        /// Store the probabilities as uint8 (scl_slope 1/255) instead of float32.
        #[arg(long, requires = "probabilities")]
        probabilities_u8: bool,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info { model } => {
            let bytes = glmae_infer::read_model_bytes(&model)?;
            let file = glmae_infer::parse_model(&model, &bytes)?;
            print!("{}", glmae_infer::describe(&file)?);
        }
        Command::Segment {
            model,
            input,
            output,
            overlap,
            blend,
            threads,
            reference,
            int8_kernels,
            probabilities,
            probabilities_u8,
        } => {
            // More threads than cores only adds contention (100x slower at 1000 on 2 cores).
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            anyhow::ensure!(threads > 0, "--threads must be at least 1");
            let threads = if threads > cores {
                eprintln!("warning: --threads {threads} is more than the {cores} cores here; using {cores}");
                cores
            } else {
                threads
            };
            let bytes = glmae_infer::read_model_bytes(&model)?;
            let file = glmae_infer::parse_model(&model, &bytes)?;
            let opts = glmae_infer::SegmentOptions {
                overlap,
                blend,
                threads,
                probabilities,
                probabilities_u8,
                progress: true,
            };
            let engine = match (reference, int8_kernels) {
                (true, _) => glmae_infer::Engine::Reference,
                (false, true) => glmae_infer::Engine::FastInt8Kernels,
                (false, false) => glmae_infer::Engine::Fast,
            };
            let jobs: Vec<(PathBuf, PathBuf)> = if input.is_dir() {
                anyhow::ensure!(opts.probabilities.is_none(), "--probabilities takes a single input file");
                std::fs::create_dir_all(&output)
                    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", output.display()))?;
                let v: Vec<_> = glmae_data::dataset::nifti_files_in(&input)?
                    .into_iter()
                    .map(|p| {
                        let out = output.join(p.file_name().unwrap_or_default());
                        (p, out)
                    })
                    .collect();
                anyhow::ensure!(!v.is_empty(), "no .nii or .nii.gz files in {}", input.display());
                v
            } else {
                vec![(input, output)]
            };
            let mut failed = Vec::new();
            for (i, o) in &jobs {
                let start = std::time::Instant::now();
                match glmae_infer::segment_file_with(&file, i, o, &opts, engine) {
                    Ok(s) => println!(
                        "{} -> {} ({} windows, {:.1} s)",
                        i.display(),
                        o.display(),
                        s.windows,
                        start.elapsed().as_secs_f64()
                    ),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        failed.push(i.display().to_string());
                    }
                }
            }
            anyhow::ensure!(
                failed.is_empty(),
                "{} of {} volume(s) failed: {}",
                failed.len(),
                jobs.len(),
                failed.join(", ")
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
