//! Any bytes as a `.nii` (or `.nii.gz` when they start with gzip's magic) file: `read_nifti` returns
//! an image or an error, never panics, and an image it returns is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let gz = bytes.starts_with(&[0x1f, 0x8b]);
    let path = std::env::temp_dir().join(format!(
        "glmae-fuzz-{}.nii{}",
        std::process::id(),
        if gz { ".gz" } else { "" }
    ));
    std::fs::write(&path, bytes).unwrap();
    // Small limit: the fuzzer's 2 GB memory cap must not be what stops a large declared volume.
    if let Ok(img) = glmae_data::nifti_io::read_nifti_limited(&path, 1 << 24) {
        let v = &img.volume;
        assert_eq!(v.data.len(), v.shape.iter().product::<usize>() * v.channels);
    }
});
