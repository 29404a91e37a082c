//! Arbitrary bytes as the payload behind a valid preamble and checksum, so that mutations reach
//! the postcard decoder and the consistency checks instead of stopping at the CRC.
#![no_main]
use glmae_core::format::{FORMAT_VERSION, MAGIC, crc32};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let mut file = Vec::with_capacity(payload.len() + 20);
    file.extend_from_slice(&MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    file.extend_from_slice(&crc32(payload).to_le_bytes());
    file.extend_from_slice(payload);
    if let Ok(f) = glmae_core::ModelFile::parse(&file) {
        let model = glmae_core::Unetr::new(&f).expect("a parsed file binds");
        let _ = model.scratch_len([32, 32, 32]);
    }
});
