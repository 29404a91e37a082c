//! Models in and out: the `.glmae` export of a fine-tuned UNETR, MONAI state dicts and the GL-MAE
//! authors' checkpoints, and MONAI bundles.

pub mod bundle;
pub mod export;
pub mod import;
