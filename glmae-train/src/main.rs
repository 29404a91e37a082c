//! `glmae-train`: GL-MAE pretraining, UNETR fine-tuning, evaluation, export and import. The
//! commands are in `cli/`, one file each.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // burn restores optimizer state on its default device, which in a cuda build is GPU 0: a CPU
    // run would then touch (or, without a GPU, fail on) the GPU. Point the default at the CPU
    // backend asked for; still one thread here, so setting the environment is sound.
    if let Some(backend) = cli::requested_device(&cli).and_then(glmae_train::device::cpu_backend_name)
        && std::env::var_os("BURN_DEVICE").is_none()
    {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("BURN_DEVICE", backend) };
    }
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
