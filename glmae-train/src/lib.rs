//! # glmae-train
//!
//! GL-MAE pretraining, UNETR fine-tuning, evaluation and export. GL-MAE pretraining runs on burn (CPU `flex` by default).

pub mod bundle;
pub mod conv;
pub mod data_parallel;
pub mod device;
pub mod evaluate;
pub mod experiment;
pub mod finetune;
pub mod import;
pub mod loss;
pub mod model;
pub mod naming;
pub mod plot;
pub mod presets;
pub mod pretrain;
pub mod probe;
pub mod progress;
pub mod quickstart;
pub mod run;
pub mod unetr;
pub mod views;
