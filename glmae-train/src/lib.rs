//! # glmae-train
//!
//! GL-MAE pretraining, UNETR fine-tuning, evaluation, export and import, on burn (CPU `flex` by
//! default). The folders follow the stages of a study:
//!
//! - [`nets`]: the burn networks shared by the stages (the ViT encoder, the UNETR, the training
//!   convolution) and their parameters' MONAI names.
//! - [`pretrain`]: GL-MAE pretraining: views, the student/teacher networks, losses, the run
//!   folder and its loop.
//! - [`finetune`]: UNETR fine-tuning: the DiceCE loss, crops, the training loop.
//! - [`evaluate`] and [`probe`]: Dice on labelled cases; k-NN and linear probes of an encoder.
//! - [`io`]: `.glmae` export, MONAI state-dict and bundle import.
//! - [`experiment`] and [`quickstart`]: the ablation study and the whole pipeline on phantoms.
//! - [`device`], [`presets`], [`plot`], [`progress`]: compute devices, named model sizes, charts,
//!   progress bars.
//!
//! The command line (`src/main.rs`, one file per command under `src/cli/`) only parses flags and
//! calls these modules.

// One unsafe call, the GEMM in `nets::conv`, is allowed where it is made.
#![deny(unsafe_code)]

pub mod device;
pub mod evaluate;
pub mod experiment;
pub mod finetune;
pub mod io;
pub mod nets;
pub mod plot;
pub mod presets;
pub mod pretrain;
pub mod probe;
pub mod progress;
pub mod quickstart;
