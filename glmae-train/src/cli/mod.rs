//! The command line: one module per command, each with its flags (`Args`) and a `run` that
//! parses nothing further and calls the library.

use clap::{Parser, Subcommand};

pub mod evaluate;
pub mod export;
pub mod finetune;
pub mod import;
pub mod init_model;
pub mod make_phantoms;
pub mod pretrain;
pub mod probe;
pub mod quickstart;

/// `glmae-train`'s flags.
#[derive(Parser)]
#[command(name = "glmae-train", version, about = "GL-MAE pretraining and UNETR fine-tuning")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand)]
pub enum Command {
    /// The whole pipeline on built-in phantoms: pretrain, fine-tune, evaluate, export, segment.
    Quickstart(quickstart::Args),
    /// Write a UNETR with deterministic random weights: for smoke tests, benchmarks and firmware
    /// bring-up before a trained model exists.
    InitModel(init_model::Args),
    /// Write synthetic abdominal CT phantoms with the 13 BTCV organs as an MSD dataset
    /// (imagesTr, labelsTr, dataset.json): the built-in data for training and tests.
    MakePhantoms(make_phantoms::Args),
    /// GL-MAE pretraining of a ViT encoder on unlabelled volumes.
    Pretrain(Box<pretrain::Args>),
    /// Fine-tune UNETR on labelled volumes, from scratch or from a pretraining run's encoder.
    Finetune(Box<finetune::Args>),
    /// Sliding-window evaluation of a fine-tuned run: Dice CSV, markdown table, PNG overlays.
    Evaluate(evaluate::Args),
    /// Measure a pretraining run's encoder in minutes: k-NN and linear probes of its frozen patch
    /// tokens beside a random-initialised encoder's (probe.md, probe.json).
    Probe(Box<probe::Args>),
    /// Convert a MONAI UNETR state dict, a MONAI bundle or a GL-MAE authors' checkpoint
    /// (safetensors or PyTorch `.pt`/`.pth`) to `.glmae`.
    Import(Box<import::Args>),
    /// Experiments that compare whole runs: `ablation` (the paper's Table 4 on phantoms).
    #[command(subcommand)]
    Experiment(glmae_train::experiment::Command),
    /// Write a fine-tuned run as a `.glmae` model with its preprocessing and class names.
    Export(export::Args),
}

/// Runs the command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Quickstart(a) => quickstart::run(a),
        Command::InitModel(a) => init_model::run(a),
        Command::MakePhantoms(a) => make_phantoms::run(a),
        Command::Pretrain(a) => pretrain::run(*a),
        Command::Finetune(a) => finetune::run(*a),
        Command::Evaluate(a) => evaluate::run(a),
        Command::Probe(a) => probe::run(*a),
        Command::Import(a) => import::run(*a),
        Command::Experiment(cmd) => glmae_train::experiment::run_command(cmd),
        Command::Export(a) => export::run(a),
    }
}

/// The device named on the command line, if the command trains or evaluates.
pub fn requested_device(cli: &Cli) -> Option<&str> {
    match &cli.command {
        Command::Quickstart(a) => Some(&a.device),
        Command::Evaluate(a) => Some(&a.device),
        Command::Pretrain(a) => Some(&a.device),
        Command::Finetune(a) => Some(&a.device),
        Command::Probe(a) => Some(&a.device),
        Command::Experiment(glmae_train::experiment::Command::Ablation(a)) => Some(&a.device),
        _ => None,
    }
}
