//! `glmae-train export`: a fine-tuned run as a `.glmae` model.

use std::path::PathBuf;

use glmae_core::format::Precision;

/// Flags of `export`.
#[derive(clap::Args)]
pub struct Args {
    /// The fine-tuning run folder.
    pub run: PathBuf,
    /// Output `.glmae` file.
    #[arg(long)]
    pub out: PathBuf,
    /// Store weight matrices as int8 with per-channel scales.
    #[arg(long)]
    pub int8: bool,
    /// Model to export: best or last.
    #[arg(long, default_value = "best")]
    pub which: String,
}

/// Writes the model.
pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { run, out, int8, which } = a;
    let ft = glmae_train::finetune::Finetuner::load(&run, &which, glmae_train::device::base_device("cpu")?)?;
    let precision = if int8 { Precision::Int8 } else { Precision::F32 };
    let bytes = ft.export(precision)?;
    glmae_data::io::atomic_write(&out, &bytes)?;
    println!("wrote {} ({} bytes, {precision:?})", out.display(), bytes.len());
    Ok(())
}
