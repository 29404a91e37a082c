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
    /// Segment a NIfTI volume, every volume in a folder, or a DICOM series with a model.
    Segment {
        /// The `.glmae` weight file.
        #[arg(long)]
        model: PathBuf,
        /// A .nii/.nii.gz file, a folder of them, or a folder of DICOM files (any names, nested:
        /// the series is chosen as with `convert`).
        #[arg(long)]
        input: PathBuf,
        /// The label file (NIfTI), or a folder for a folder of NIfTI files; with DICOM input, a
        /// `.dcm` name writes a DICOM SEG referencing the series instead.
        #[arg(long)]
        output: PathBuf,
        /// With DICOM input: the SeriesInstanceUID to segment (default: the CT series with the
        /// most slices).
        #[arg(long)]
        series: Option<String>,
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
    /// Run a DICOM storage SCP: each series received is segmented once no instance of it has
    /// arrived for --quiet-seconds; its DICOM SEG is written to --out and, with --destination,
    /// sent there by C-STORE. One log line per series on stderr. Ctrl-C finishes the series in
    /// hand and stops; series still waiting stay in the spool for the next start.
    Serve {
        /// The `.glmae` weight file.
        #[arg(long)]
        model: PathBuf,
        /// This SCP's AE title (associations calling another title are rejected).
        #[arg(long, default_value = "GLMAE")]
        ae_title: String,
        /// TCP port to listen on (0: any free port, logged at start).
        #[arg(long, default_value_t = 11112)]
        port: u16,
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Folder for the SEG objects (`<SeriesInstanceUID>.seg.dcm`).
        #[arg(long)]
        out: PathBuf,
        /// Folder where received instances wait (default: OUT/spool).
        #[arg(long)]
        spool: Option<PathBuf>,
        /// A series is complete once no instance of it arrived for this many seconds.
        #[arg(long, default_value_t = 5.0)]
        quiet_seconds: f64,
        /// Send each SEG to this storage SCP: AE@host:port.
        #[arg(long)]
        destination: Option<glmae_infer::serve::Destination>,
        /// Threads inside each window.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Window overlap.
        #[arg(long, default_value_t = 0.5)]
        overlap: f64,
        /// At most this many series wait; instances of a further series are refused (A700).
        #[arg(long, default_value_t = 8)]
        max_pending_series: usize,
        /// At most this many associations at once; more are rejected.
        #[arg(long, default_value_t = 8)]
        max_associations: usize,
    },
    /// Convert a DICOM series to NIfTI (what `dcm2niix` gives, read with nibabel): lists the
    /// series found and writes the chosen one in its own units (HU for CT) and grid.
    Convert {
        /// A folder of DICOM files (any names, sub-folders included).
        #[arg(long)]
        input: PathBuf,
        /// The .nii or .nii.gz file to write.
        #[arg(long)]
        output: PathBuf,
        /// The SeriesInstanceUID to convert (default: the CT series with the most slices).
        #[arg(long)]
        series: Option<String>,
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
            series,
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
            let dicom = input.is_dir() && glmae_data::dataset::nifti_files_in(&input)?.is_empty();
            if dicom {
                // `.dcm`: a DICOM SEG referencing the series; anything else: NIfTI labels.
                let seg = output.extension().is_some_and(|e| e.eq_ignore_ascii_case("dcm"));
                glmae_infer::ensure_outputs_apart(&input, &output, &opts)?;
                let start = std::time::Instant::now();
                let s = glmae_infer::segment_dicom(&file, &input, series.as_deref(), &opts, engine)?;
                if seg {
                    let names: Vec<String> =
                        file.preprocessing.class_names.iter().map(|n| n.to_string()).collect();
                    s.write_seg(&output, &names, &glmae_data::dicom_seg::SegOptions::default())?;
                } else {
                    s.write_nifti(&output)?;
                }
                println!(
                    "{} -> {} ({}x{}x{}, {} windows, {:.1} s)",
                    s.series.label(),
                    output.display(),
                    s.labels.shape[0],
                    s.labels.shape[1],
                    s.labels.shape[2],
                    s.summary.windows,
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            anyhow::ensure!(series.is_none(), "--series is for a folder of DICOM files");
            anyhow::ensure!(
                !output.extension().is_some_and(|e| e.eq_ignore_ascii_case("dcm")),
                "{}: a DICOM SEG output needs a DICOM series as input (a folder of DICOM files); {} is NIfTI",
                output.display(),
                input.display()
            );
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
        Command::Serve {
            model,
            ae_title,
            port,
            bind,
            out,
            spool,
            quiet_seconds,
            destination,
            threads,
            overlap,
            max_pending_series,
            max_associations,
        } => {
            use std::sync::atomic::{AtomicBool, Ordering};
            static STOP: AtomicBool = AtomicBool::new(false);
            anyhow::ensure!(threads > 0, "--threads must be at least 1");
            anyhow::ensure!(
                quiet_seconds.is_finite() && (0.0..=86_400.0).contains(&quiet_seconds),
                "--quiet-seconds must be between 0 and 86400"
            );
            anyhow::ensure!(max_pending_series > 0, "--max-pending-series must be at least 1");
            anyhow::ensure!(max_associations > 0, "--max-associations must be at least 1");
            let bytes = glmae_infer::read_model_bytes(&model)?;
            let file = glmae_infer::parse_model(&model, &bytes)?;
            let mut cfg = glmae_infer::serve::ServeConfig::new(&ae_title, port, &out);
            // An IPv6 address needs brackets before the port.
            cfg.listen =
                if bind.contains(':') { format!("[{bind}]:{port}") } else { format!("{bind}:{port}") };
            if let Some(s) = spool {
                cfg.spool_dir = s;
            }
            cfg.quiet = std::time::Duration::from_secs_f64(quiet_seconds);
            cfg.destination = destination;
            cfg.segment.threads = threads;
            cfg.segment.overlap = overlap;
            cfg.max_pending_series = max_pending_series;
            cfg.max_associations = max_associations;
            ctrlc::set_handler(|| {
                if STOP.swap(true, Ordering::SeqCst) {
                    glmae_infer::serve::log("second interrupt: stopping now");
                    std::process::exit(130);
                }
                glmae_infer::serve::log("interrupted: finishing the series in hand, then stopping");
            })
            .map_err(|e| anyhow::anyhow!("cannot handle Ctrl-C: {e}"))?;
            glmae_infer::serve::serve(&file, &cfg, &STOP)?;
        }
        Command::Convert { input, output, series } => {
            use glmae_data::nifti_io::{StoredType, meta_for_affine, write_nifti};
            let name = output.to_string_lossy();
            anyhow::ensure!(
                name.ends_with(".nii") || name.ends_with(".nii.gz"),
                "{name}: convert writes NIfTI; give a .nii or .nii.gz name"
            );
            let scan = glmae_data::dicom::scan(&input)?;
            let chosen = glmae_data::dicom::choose(&scan, &input, series.as_deref())?;
            for s in &scan.series {
                let mark = if s.series_uid == chosen.series_uid { "*" } else { " " };
                println!("{mark} {}", s.label());
            }
            if !scan.skipped.is_empty() {
                println!(
                    "  ({} file(s) skipped, e.g. {}: {})",
                    scan.skipped.len(),
                    scan.skipped[0].0.display(),
                    scan.skipped[0].1
                );
            }
            let v = glmae_data::dicom::read_series(chosen)?;
            glmae_data::io::ensure_not_input(&input, &output)?;
            // Integer values (CT in HU) are stored as int16 as dcm2niix does; anything else float32.
            let integral = v.volume.data.iter().all(|x| x.fract() == 0.0 && (-32768.0..=32767.0).contains(x));
            let stored = if integral { StoredType::I16 } else { StoredType::F32 };
            let meta = meta_for_affine(&v.volume.affine, stored);
            write_nifti(&output, &v.volume.data, v.volume.shape, 1, &meta, stored)?;
            println!(
                "wrote {} ({}x{}x{}, {stored:?}, {})",
                output.display(),
                v.volume.shape[0],
                v.volume.shape[1],
                v.volume.shape[2],
                v.volume.affine.axcodes()
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
