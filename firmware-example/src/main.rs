//! Runs a small int8 UNETR stored in flash on one 32^3 window, with every buffer static and no
//! allocator, and checks the label map against the host's result (`data/expected_labels.u8`,
//! written by the glmae-tests fixture test). Exit code 0 over semihosting means identical labels.
#![no_std]
#![no_main]

use core::ptr::addr_of_mut;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use glmae_core::{ModelFile, Unetr};
use panic_semihosting as _;

static MODEL: &[u8] = include_bytes!("../data/model.glmae");
static INPUT: &[u8] = include_bytes!("../data/input.f32");
static EXPECTED: &[u8] = include_bytes!("../data/expected_labels.u8");

const WINDOW: [usize; 3] = [32, 32, 32];
const VOXELS: usize = WINDOW[0] * WINDOW[1] * WINDOW[2];
/// f32 values of scratch: what `Unetr::segment_scratch_len` asks for this model and window.
const SCRATCH_LEN: usize = 666_368;

static mut SCRATCH: [f32; SCRATCH_LEN] = [0.0; SCRATCH_LEN];
static mut WINDOW_IN: [f32; VOXELS] = [0.0; VOXELS];
static mut LABELS: [u8; VOXELS] = [0; VOXELS];

fn exit(ok: bool) -> ! {
    debug::exit(if ok { debug::EXIT_SUCCESS } else { debug::EXIT_FAILURE });
    #[allow(clippy::empty_loop)]
    loop {}
}

#[entry]
fn main() -> ! {
    // SAFETY: `main` runs once and nothing else touches these statics.
    let (scratch, input, labels) =
        unsafe { (&mut *addr_of_mut!(SCRATCH), &mut *addr_of_mut!(WINDOW_IN), &mut *addr_of_mut!(LABELS)) };

    let file = match ModelFile::parse(MODEL) {
        Ok(f) => f,
        Err(e) => {
            hprintln!("model rejected: {}", e);
            exit(false)
        }
    };
    let model = match Unetr::new(&file) {
        Ok(m) => m,
        Err(e) => {
            hprintln!("model rejected: {}", e);
            exit(false)
        }
    };
    let (int8, f32_bytes) = file.storage();
    hprintln!(
        "model: {} bytes in flash ({} int8 weights, {} bytes of f32), {} classes",
        file.len(),
        int8,
        f32_bytes,
        file.config.out_channels
    );

    // A damaged copy must be rejected, not run: flip one payload byte in RAM.
    let mut corrupt = [0u8; 64];
    corrupt.copy_from_slice(&MODEL[..64]);
    corrupt[40] ^= 1;
    let rejected = ModelFile::parse(&corrupt).is_err();
    hprintln!("truncated copy rejected: {}", rejected);

    for (v, b) in input.iter_mut().zip(INPUT.chunks_exact(4)) {
        *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    if let Err(e) = model.segment(input, WINDOW, labels, scratch) {
        hprintln!("forward failed: {}", e);
        exit(false)
    }

    let classes = file.config.out_channels as usize;
    let mut counts = [0usize; 256];
    for &l in labels.iter() {
        counts[l as usize] += 1;
    }
    for (c, name) in file.preprocessing.class_names.iter().enumerate().take(classes) {
        hprintln!("class {} ({}): {} voxels", c, name, counts[c]);
    }
    let mismatches = labels.iter().zip(EXPECTED).filter(|(a, b)| a != b).count();
    hprintln!("labels differing from the host: {} of {}", mismatches, VOXELS);
    exit(mismatches == 0 && rejected && EXPECTED.len() == VOXELS)
}
