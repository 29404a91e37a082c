//! Picks the QEMU board's memory layout for the target, links with cortex-m-rt's script (and
//! defmt's with the `defmt` feature), and sizes the static arena from the embedded model: it
//! writes `$OUT_DIR/arena.rs` with `WINDOW` and `SCRATCH_LEN`, exactly what
//! `Unetr::segment_scratch_len` asks for `data/model.glmae`, so a new model resizes the arena and
//! a model too large for the board's RAM fails at link time.
use std::{env, fs, path::PathBuf};

use glmae_core::{ModelFile, Unetr};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = env::var("TARGET").expect("cargo sets TARGET");
    // thumbv8m.main -> mps2-an505 (Cortex-M33); other thumb targets -> mps2-an386 (Cortex-M4F).
    // No file called memory.x may sit in the package folder: lld would pick it up first.
    let an505 = target.starts_with("thumbv8m");
    let layout = if an505 { "memory-an505.x" } else { "memory-an386.x" };
    fs::copy(layout, out.join("memory.x")).expect("copy memory layout");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    if env::var_os("CARGO_FEATURE_DEFMT").is_some() {
        println!("cargo:rustc-link-arg=-Tdefmt.x");
    }
    println!("cargo::rustc-check-cfg=cfg(board_an505)");
    if an505 {
        println!("cargo:rustc-cfg=board_an505");
    }

    let bytes = fs::read("data/model.glmae").expect("read data/model.glmae");
    let file = ModelFile::parse(&bytes).unwrap_or_else(|e| panic!("data/model.glmae: {e}"));
    let model = Unetr::new(&file).unwrap_or_else(|e| panic!("data/model.glmae: {e}"));
    let window = file.config.vit.img_size.map(|s| s as usize);
    let scratch = model.segment_scratch_len(window).unwrap_or_else(|e| panic!("data/model.glmae: {e}"));
    let arena = format!(
        "/// The model's window (its training ROI).\nconst WINDOW: [usize; 3] = {window:?};\n\
         /// f32 values of scratch: `Unetr::segment_scratch_len(WINDOW)` for data/model.glmae.\n\
         const SCRATCH_LEN: usize = {scratch};\n"
    );
    fs::write(out.join("arena.rs"), arena).expect("write arena.rs");

    println!("cargo:rerun-if-changed=memory-an386.x");
    println!("cargo:rerun-if-changed=memory-an505.x");
    println!("cargo:rerun-if-changed=data");
}
