//! Runs the trained int8 UNETR stored in flash (`data/model.glmae`, exported by `glmae-train
//! export`) on one 32^3 phantom window, with every buffer static and no allocator, checks the label
//! map against the host's result (`data/expected_labels.u8`, written by the glmae-tests fixture
//! test), and prints per-class voxel counts and the time the window took. Exit code 0 over
//! semihosting means identical labels.
//!
//! Logging goes through semihosting as text, or as defmt frames with the `defmt` feature.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::{DWT, SCB, SYST};
use cortex_m_rt::{entry, exception};
use cortex_m_semihosting::debug;
#[cfg(feature = "defmt")]
use defmt_semihosting as _;
use glmae_core::{ModelFile, Unetr};
use panic_semihosting as _;

/// Prints one line: text over semihosting, or a defmt frame with the `defmt` feature.
macro_rules! say {
    ($($arg:tt)*) => {{
        #[cfg(feature = "defmt")]
        defmt::println!($($arg)*);
        #[cfg(not(feature = "defmt"))]
        cortex_m_semihosting::hprintln!($($arg)*);
    }};
}

// The arena size, computed by build.rs from data/model.glmae: `SCRATCH_LEN`, `WINDOW`.
include!(concat!(env!("OUT_DIR"), "/arena.rs"));

const VOXELS: usize = WINDOW[0] * WINDOW[1] * WINDOW[2];

/// Bytes with the alignment of `f32`, so the input window is read in place from flash.
#[repr(C, align(4))]
struct Aligned<B: ?Sized>(B);

static MODEL: &[u8] = include_bytes!("../data/model.glmae");
static INPUT: &Aligned<[u8]> = &Aligned(*include_bytes!("../data/input.f32"));
static EXPECTED: &[u8] = include_bytes!("../data/expected_labels.u8");
/// The phantom's own labels for the window (its ground truth), to show what the model gets right.
static PHANTOM: &[u8] = include_bytes!("../data/phantom_labels.u8");

static mut SCRATCH: [f32; SCRATCH_LEN] = [0.0; SCRATCH_LEN];
static mut LABELS: [u8; VOXELS] = [0; VOXELS];

/// SysTick's reload value: it counts down from 2^24 - 1, then its exception counts the wrap.
const RELOAD: u32 = 0x00ff_ffff;
/// Length of the calibration loop.
const CALIBRATION_INSTRUCTIONS: u32 = 10_000_000;
/// SysTick wraps since it started.
static WRAPS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// Starts SysTick on the core clock, counting wraps in its exception.
fn start_clock(syst: &mut SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(RELOAD);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
    // The counter starts at 0 and reloads on its first tick; QEMU counts that as a wrap and takes
    // the exception. Let it pass before anything is measured.
    spin(1000);
}

/// Core-clock ticks since [`start_clock`]: the wrap count extended by the 24-bit counter. With
/// exceptions masked, a wrap the handler has not counted yet shows as a pending SysTick or as
/// the counter going up between two reads.
fn ticks() -> u64 {
    cortex_m::interrupt::free(|_| {
        let wraps = WRAPS.load(Ordering::Relaxed);
        let first = SYST::get_current();
        let pending = SCB::is_pendst_pending();
        let second = SYST::get_current();
        let (wraps, current) = if pending || second > first { (wraps + 1, second) } else { (wraps, first) };
        u64::from(wraps) * (u64::from(RELOAD) + 1) + u64::from(RELOAD - current)
    })
}

/// Runs `f` and returns its result and the core-clock ticks it took.
fn measure<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let start = ticks();
    let result = f();
    (result, ticks() - start)
}

/// Runs `2 * n` instructions: `n` times `subs` + `bne`.
fn spin(n: u32) {
    if n == 0 {
        return;
    }
    // SAFETY: only decrements a register until it is zero.
    unsafe {
        core::arch::asm!("2:", "subs {0}, {0}, #1", "bne 2b", inout(reg) n => _, options(nomem, nostack));
    }
}

unsafe extern "C" {
    /// cortex-m-rt's stack bounds: the stack grows down from `_stack_start` (the top of RAM) to
    /// `_stack_end` (the end of the statics); with `paint-stack` all of it starts as 0xcccccccc.
    static _stack_start: u32;
    static _stack_end: u32;
}

/// Bytes of stack used so far: from the top of RAM down to the lowest word that lost its paint.
fn stack_used() -> usize {
    let (top, bottom) = (addr_of!(_stack_start) as usize, addr_of!(_stack_end) as usize);
    let mut p = bottom;
    // SAFETY: every word between the two linker symbols is RAM reserved for the stack.
    while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == cortex_m_rt::STACK_PAINT_VALUE {
        p += 4;
    }
    top - p
}

fn exit(ok: bool) -> ! {
    debug::exit(if ok { debug::EXIT_SUCCESS } else { debug::EXIT_FAILURE });
    #[allow(clippy::empty_loop)]
    loop {}
}

#[entry]
fn main() -> ! {
    const { assert!(cfg!(target_endian = "little"), "input.f32 is little-endian") };
    let Some(mut core) = cortex_m::Peripherals::take() else { exit(false) };
    // SAFETY: `main` runs once and nothing else touches these statics.
    let (scratch, labels) = unsafe { (&mut *addr_of_mut!(SCRATCH), &mut *addr_of_mut!(LABELS)) };
    // SAFETY: INPUT is 4-byte aligned, its length a multiple of 4 (checked below), every bit
    // pattern is an f32, and the target is little-endian like the file.
    let input: &[f32] = unsafe { core::slice::from_raw_parts(INPUT.0.as_ptr().cast(), INPUT.0.len() / 4) };

    let file = match ModelFile::parse(MODEL) {
        Ok(f) => f,
        Err(e) => {
            say!("model rejected: {}", e);
            exit(false)
        }
    };
    let model = match Unetr::new(&file) {
        Ok(m) => m,
        Err(e) => {
            say!("model rejected: {}", e);
            exit(false)
        }
    };
    let (int8, f32_bytes) = file.storage();
    let classes = file.config.out_channels as usize;
    say!(
        "model: {} bytes in flash ({} int8 weights, {} bytes of f32), {} classes, arena {} f32",
        file.len(),
        int8,
        f32_bytes,
        classes,
        SCRATCH_LEN
    );

    // A damaged copy must be rejected, not run: the first 64 bytes with one of them flipped.
    let mut corrupt = [0u8; 64];
    corrupt.copy_from_slice(&MODEL[..64]);
    corrupt[40] ^= 1;
    let rejected = ModelFile::parse(&corrupt).is_err();
    say!("truncated copy with a flipped byte rejected: {}", rejected);
    if INPUT.0.len() != 4 * VOXELS || EXPECTED.len() != VOXELS || PHANTOM.len() != VOXELS {
        say!(
            "data files have the wrong size: input {} bytes, labels {} and {}",
            INPUT.0.len(),
            EXPECTED.len(),
            PHANTOM.len()
        );
        exit(false)
    }

    // Two clocks around the forward pass: the DWT cycle counter (what to read on silicon; QEMU
    // implements no DWT and it reads 0) and SysTick on the core clock, which QEMU runs on its
    // virtual clock: under `-icount shift=0` (see .cargo/config.toml) that advances 1 ns per
    // instruction. A calibration loop of known length measures instructions per tick on every run.
    core.DCB.enable_trace();
    let has_cyccnt = DWT::has_cycle_counter();
    if has_cyccnt {
        core.DWT.enable_cycle_counter();
    }
    start_clock(&mut core.SYST);
    let ((), calibration) = measure(|| spin(CALIBRATION_INSTRUCTIONS / 2));
    core.DWT.set_cycle_count(0);
    let (result, ticks) = measure(|| model.segment(input, WINDOW, labels, scratch));
    let cycles = DWT::cycle_count();
    core.SYST.disable_counter();
    if let Err(e) = result {
        say!("forward failed: {}", e);
        exit(false)
    }

    for (c, name) in file.preprocessing.class_names.iter().enumerate().take(classes) {
        let (mut predicted, mut truth, mut both) = (0u32, 0u32, 0u32);
        for (&p, &t) in labels.iter().zip(PHANTOM) {
            let (p, t) = (usize::from(p) == c, usize::from(t) == c);
            predicted += u32::from(p);
            truth += u32::from(t);
            both += u32::from(p && t);
        }
        let dice = (200 * both + (predicted + truth) / 2).checked_div(predicted + truth).unwrap_or(100);
        say!("class {} ({}): {} voxels (phantom {}, Dice {}%)", c, name, predicted, truth, dice);
    }
    say!(
        "time: {} SysTick ticks (core clock) for the window, {} for a calibration loop of {} instructions",
        ticks,
        calibration,
        CALIBRATION_INSTRUCTIONS
    );
    say!(
        "instructions per window (QEMU -icount): {}",
        ticks * u64::from(CALIBRATION_INSTRUCTIONS) / calibration.max(1)
    );
    say!("DWT CYCCNT: present {}, counted {} cycles", has_cyccnt, cycles);
    say!("stack used: {} bytes", stack_used());
    let mismatches = labels.iter().zip(EXPECTED).filter(|(a, b)| a != b).count();
    say!("labels differing from the host: {} of {}", mismatches, VOXELS);
    exit(mismatches == 0 && rejected)
}
