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
    /// With --int8: calibrate the integer forward pass's activation scales on the images of this
    /// dataset (a dataset.json or folders of NIfTI images), so that glmae-core's integer pass
    /// (`Unetr::segment_int8`, the firmware) can run the model.
    #[arg(long, value_name = "DATA", requires = "int8")]
    pub calibrate: Option<String>,
    /// Windows the calibration runs through the f32 reference, spread over the images.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub calibrate_windows: usize,
}

/// Writes the model.
pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { run, out, int8, which, calibrate, calibrate_windows } = a;
    let ft = glmae_train::finetune::Finetuner::load(&run, &which, glmae_train::device::base_device("cpu")?)?;
    let precision = if int8 { Precision::Int8 } else { Precision::F32 };
    let mut bytes = ft.export(precision)?;
    if let Some(data) = calibrate {
        let dataset = glmae_data::dataset::Dataset::open(&data)?;
        let (calibrated, report) =
            glmae_train::io::calibrate::calibrate(&bytes, &dataset, calibrate_windows)?;
        println!(
            "calibrated {} activation scales on {} windows of {} images (ranges {:.3} to {:.3})",
            report.points, report.windows, report.images, report.range.0, report.range.1
        );
        bytes = calibrated;
    }
    glmae_data::io::atomic_write(&out, &bytes)?;
    println!("wrote {} ({} bytes, {precision:?})", out.display(), bytes.len());
    Ok(())
}
