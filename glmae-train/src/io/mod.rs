//! Models in and out: the `.glmae` export of a fine-tuned UNETR, MONAI state dicts and the GL-MAE
//! authors' checkpoints, and MONAI bundles; the calibration of int8 models' activations.

pub mod bundle;
pub mod calibrate;
pub mod export;
pub mod import;
