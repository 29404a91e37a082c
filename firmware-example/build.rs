//! Picks the QEMU board's memory layout for the target, links with cortex-m-rt's script (and
//! defmt's with the `defmt` feature), and sizes the static arena from the embedded model: it
//! writes `$OUT_DIR/arena.rs` with `WINDOW`, `SCRATCH_LEN` (`Unetr::segment_scratch_len`), the
//! integer path's three buffers (`Unetr::int8_scratch_len`) and `ARENA_WORDS`, the larger of the
//! two, for `data/model.glmae`, so a new model resizes the arena and a model too large for the
//! board's RAM fails at link time.
//!
//! Boards: thumbv7em -> mps2-an386 (Cortex-M4F); thumbv8m.main -> mps2-an505 (Cortex-M33), or
//! mps3-an547 (Cortex-M55) when built with `-C target-cpu=cortex-m55` (run-an547.sh).
use std::{env, fs, path::PathBuf};

use glmae_core::{ModelFile, Unetr};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = env::var("TARGET").expect("cargo sets TARGET");
    // No file called memory.x may sit in the package folder: lld would pick it up first.
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let an547 =
        target.starts_with("thumbv8m") && flags.split('\x1f').any(|f| f.ends_with("target-cpu=cortex-m55"));
    let an505 = target.starts_with("thumbv8m") && !an547;
    let layout = match (an505, an547) {
        (true, _) => "memory-an505.x",
        (_, true) => "memory-an547.x",
        _ => "memory-an386.x",
    };
    fs::copy(layout, out.join("memory.x")).expect("copy memory layout");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    if env::var_os("CARGO_FEATURE_DEFMT").is_some() {
        println!("cargo:rustc-link-arg=-Tdefmt.x");
    }
    println!("cargo::rustc-check-cfg=cfg(board_an505)");
    println!("cargo::rustc-check-cfg=cfg(board_an547)");
    if an505 {
        println!("cargo:rustc-cfg=board_an505");
    }
    if an547 {
        println!("cargo:rustc-cfg=board_an547");
    }

    let bytes = fs::read("data/model.glmae").expect("read data/model.glmae");
    let file = ModelFile::parse(&bytes).unwrap_or_else(|e| panic!("data/model.glmae: {e}"));
    let model = Unetr::new(&file).unwrap_or_else(|e| panic!("data/model.glmae: {e}"));
    let window = file.config.vit.img_size.map(|s| s as usize);
    let scratch = model.segment_scratch_len(window).unwrap_or_else(|e| panic!("data/model.glmae: {e}"));
    let q = model.int8_scratch_len(window).unwrap_or_else(|e| panic!("data/model.glmae: {e}"));
    let words = scratch.max(q.f32s + q.i32s + q.i8s.div_ceil(4));
    let arena = format!(
        "/// The model's window (its training ROI).\nconst WINDOW: [usize; 3] = {window:?};\n\
         /// f32 values of scratch: `Unetr::segment_scratch_len(WINDOW)` for data/model.glmae.\n\
         const SCRATCH_LEN: usize = {scratch};\n\
         /// The integer path's buffers: `Unetr::int8_scratch_len(WINDOW)`.\n\
         const INT8_F32S: usize = {};\nconst INT8_I32S: usize = {};\nconst INT8_I8S: usize = {};\n\
         /// Words of the one arena both paths use in turn.\nconst ARENA_WORDS: usize = {words};\n",
        q.f32s, q.i32s, q.i8s
    );
    fs::write(out.join("arena.rs"), arena).expect("write arena.rs");

    println!("cargo:rerun-if-changed=memory-an386.x");
    println!("cargo:rerun-if-changed=memory-an505.x");
    println!("cargo:rerun-if-changed=memory-an547.x");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    println!("cargo:rerun-if-changed=data");
}
