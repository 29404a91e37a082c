//! # glmae-data
//!
//! Everything between files on disk and tensors: NIfTI reading and writing that matches nibabel,
//! datasets as users keep them, the preprocessing stored with every model, seeded augmentation,
//! and a synthetic abdominal CT phantom. Training and inference both use this crate, so
//! preprocessing is written once.

#![forbid(unsafe_code)]

pub mod dataset;
pub mod dicom;
pub mod dicom_seg;
pub mod io;
pub mod loader;
pub mod nifti_io;
pub mod parallel;
pub mod phantom;
pub mod phantom_dataset;
pub mod preprocess;
pub mod resample;
pub mod sliding_window;
pub mod transforms;
pub mod volume;

pub use dataset::{Case, Dataset};
pub use loader::{Prefetcher, Prepared, VolumeCache};
pub use nifti_io::{NiftiImage, NiftiMeta, read_nifti, write_labels, write_nifti};
pub use volume::{Affine, Labels, Volume};
