//! `glmae-train evaluate`: sliding-window Dice of a fine-tuned run.

use std::path::PathBuf;

/// Flags of `evaluate`.
#[derive(clap::Args)]
pub struct Args {
    /// The fine-tuning run folder.
    pub run: PathBuf,
    /// dataset.json with labels.
    #[arg(long)]
    pub data: PathBuf,
    /// Which list to evaluate: validation, training or test.
    #[arg(long, default_value = "validation")]
    pub split: String,
    /// Output folder (default RUN/eval).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model to evaluate: best or last.
    #[arg(long, default_value = "best")]
    pub which: String,
    /// Sliding-window overlap.
    #[arg(long)]
    pub overlap: Option<f64>,
    /// constant or gaussian.
    #[arg(long)]
    pub blend: Option<glmae_data::sliding_window::Blend>,
    /// cpu or ndarray (cuda with the feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Evaluates and prints the Dice table.
pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { run, data, split, out, which, overlap, blend, device } = a;
    let mut ft =
        glmae_train::finetune::Finetuner::load(&run, &which, glmae_train::device::base_device(&device)?)?;
    if let Some(o) = overlap {
        ft.cfg.overlap = o;
    }
    if let Some(b) = blend {
        ft.cfg.blend = b;
    }
    let ds = glmae_data::Dataset::from_json(&data)?;
    let cases = match split.as_str() {
        "validation" => ds.validation,
        "training" => ds.training,
        "test" => ds.test,
        other => anyhow::bail!("unknown split {other:?}; expected validation, training or test"),
    };
    let out = out.unwrap_or_else(|| run.join("eval"));
    let bar = glmae_train::progress::bar("evaluate", 0);
    let report = glmae_train::evaluate::evaluate_with_progress(&ft, &cases, &out, &bar)?;
    print!("{}", report.markdown());
    println!("Dice per case in {}, overlays in {}", out.join("dice.csv").display(), out.display());
    Ok(())
}
