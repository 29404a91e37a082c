//! # glmae-train
//!
//! GL-MAE pretraining, UNETR fine-tuning, evaluation and export. Today: model presets and writing
//! weight files atomically; the burn training code builds on these.

pub mod presets;
