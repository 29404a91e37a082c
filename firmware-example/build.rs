//! Picks the QEMU board's memory layout for the target and links with cortex-m-rt's script.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = env::var("TARGET").expect("cargo sets TARGET");
    // thumbv8m.main -> mps2-an505 (Cortex-M33); other thumb targets -> mps2-an386 (Cortex-M4F).
    // No file called memory.x may sit in the package folder: lld would pick it up first.
    let layout = if target.starts_with("thumbv8m") { "memory-an505.x" } else { "memory-an386.x" };
    fs::copy(layout, out.join("memory.x")).expect("copy memory layout");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    println!("cargo:rerun-if-changed=memory-an386.x");
    println!("cargo:rerun-if-changed=memory-an505.x");
    println!("cargo:rerun-if-changed=data");
}
