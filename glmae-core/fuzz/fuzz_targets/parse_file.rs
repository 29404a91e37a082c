//! Arbitrary bytes as a whole weight file: parsing must return, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = glmae_core::ModelFile::parse(data) {
        let model = glmae_core::Unetr::new(&file).expect("a parsed file binds");
        let _ = model.scratch_len([32, 32, 32]);
        let _ = file.preprocessing.class_names.iter().count();
    }
});
