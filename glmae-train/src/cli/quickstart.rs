//! `glmae-train quickstart`: the whole pipeline on built-in phantoms.

use std::path::PathBuf;

/// Flags of `quickstart`.
#[derive(clap::Args)]
pub struct Args {
    /// Output folder.
    #[arg(long, default_value = "quickstart")]
    pub out: PathBuf,
    /// tiny (seconds, a smoke test) or small (about ten minutes on 2 cores).
    #[arg(long, value_enum, default_value = "small")]
    pub scale: glmae_train::quickstart::QuickstartScale,
    /// cpu, ndarray, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Runs the pipeline and lists what it wrote.
pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { out, scale, device } = a;
    let start = std::time::Instant::now();
    let s = glmae_train::quickstart::quickstart(&out, scale, glmae_train::device::training_device(&device)?)?;
    println!("\ndone in {:.1} min:", start.elapsed().as_secs_f64() / 60.0);
    println!("  phantom dataset         {}", s.data.join("dataset.json").display());
    println!("  pretraining loss curve  {}", s.pretrain.join("loss.png").display());
    println!("  fine-tuning loss curve  {}", s.finetune.join("loss.png").display());
    println!(
        "  Dice table              {} (mean {:.2})",
        s.eval.join("dice.md").display(),
        100.0 * s.mean_dice
    );
    println!("  overlays                {}", s.eval.display());
    println!("  int8 model              {}", s.model.display());
    println!("  held-out segmentation   {}", s.segmentation.display());
    Ok(())
}
