//! Runs the trained int8 UNETR stored in flash (`data/model.glmae`, exported by `glmae-train
//! export --int8 --calibrate`) on one 32^3 phantom window twice, with every buffer static and no
//! allocator: the f32 path (int8 weights dequantised, f32 arithmetic) and the integer path (int8
//! activations, int32 sums, SMLAD on the DSP extension, Helium on the Cortex-M55). It checks both
//! label maps against the host's (`data/expected_labels.u8`, `data/expected_labels_int8.u8`,
//! written by the glmae-tests fixture test), and prints per-class voxel counts, Dice against the
//! phantom, and the instructions each window took. Exit code 0 over semihosting means identical
//! labels on both paths.
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
use glmae_core::model::Int8Scratch;
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

// The arena sizes, computed by build.rs from data/model.glmae: `WINDOW`, `SCRATCH_LEN` (f32
// path), `INT8_F32S`, `INT8_I32S`, `INT8_I8S` (integer path) and `ARENA_WORDS`, the larger.
include!(concat!(env!("OUT_DIR"), "/arena.rs"));

const VOXELS: usize = WINDOW[0] * WINDOW[1] * WINDOW[2];

/// Bytes with the alignment of `f32`, so the input window is read in place from flash.
#[repr(C, align(4))]
struct Aligned<B: ?Sized>(B);

const MODEL_LEN: usize = include_bytes!("../data/model.glmae").len();
const INPUT_LEN: usize = include_bytes!("../data/input.f32").len();
// On the an547 the 512 KiB ITCM that boots holds code and labels; the model and the input go to
// the DTCM (memory-an547.x, section `.bigdata`), which QEMU loads from the ELF like flash. The
// section is initialised data like .rodata (SAFETY of the attribute: no other symbol is placed
// there, and the linker script keeps it); on silicon a loader must copy it in first.
#[cfg_attr(board_an547, unsafe(link_section = ".bigdata"))]
static MODEL: Aligned<[u8; MODEL_LEN]> = Aligned(*include_bytes!("../data/model.glmae"));
#[cfg_attr(board_an547, unsafe(link_section = ".bigdata"))]
static INPUT: Aligned<[u8; INPUT_LEN]> = Aligned(*include_bytes!("../data/input.f32"));
static EXPECTED: &[u8] = include_bytes!("../data/expected_labels.u8");
static EXPECTED_INT8: &[u8] = include_bytes!("../data/expected_labels_int8.u8");
/// The phantom's own labels for the window (its ground truth), to show what the model gets right.
static PHANTOM: &[u8] = include_bytes!("../data/phantom_labels.u8");

/// One arena for both paths, which run one after the other: the f32 path's scratch, or the
/// integer path's f32, int32 and int8 buffers laid end to end.
static mut ARENA: [u32; ARENA_WORDS] = [0; ARENA_WORDS];
static mut LABELS: [u8; VOXELS] = [0; VOXELS];
static mut LABELS_INT8: [u8; VOXELS] = [0; VOXELS];

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

/// Per-class voxel counts and Dice against the phantom's labels.
fn dice(labels: &[u8], c: usize) -> (u32, u32) {
    let (mut predicted, mut truth, mut both) = (0u32, 0u32, 0u32);
    for (&p, &t) in labels.iter().zip(PHANTOM) {
        let (p, t) = (usize::from(p) == c, usize::from(t) == c);
        predicted += u32::from(p);
        truth += u32::from(t);
        both += u32::from(p && t);
    }
    let dice = (200 * both + (predicted + truth) / 2).checked_div(predicted + truth).unwrap_or(100);
    (predicted, dice)
}

#[entry]
fn main() -> ! {
    const { assert!(cfg!(target_endian = "little"), "input.f32 is little-endian") };
    let Some(mut core) = cortex_m::Peripherals::take() else { exit(false) };
    // SAFETY: `main` runs once and nothing else touches these statics.
    let (arena, labels, labels_int8) =
        unsafe { (&mut *addr_of_mut!(ARENA), &mut *addr_of_mut!(LABELS), &mut *addr_of_mut!(LABELS_INT8)) };
    // SAFETY: INPUT is 4-byte aligned, its length a multiple of 4 (checked below), every bit
    // pattern is an f32, and the target is little-endian like the file.
    let input: &[f32] = unsafe { core::slice::from_raw_parts(INPUT.0.as_ptr().cast(), INPUT.0.len() / 4) };
    let model_bytes: &[u8] = &MODEL.0;

    let file = match ModelFile::parse(model_bytes) {
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
        "model: {} bytes in flash ({} int8 weights, {} bytes of f32), {} classes; arena {} words \
         (f32 path {} f32; integer path {} f32 + {} int32 + {} int8)",
        file.len(),
        int8,
        f32_bytes,
        classes,
        ARENA_WORDS,
        SCRATCH_LEN,
        INT8_F32S,
        INT8_I32S,
        INT8_I8S
    );

    // A damaged copy must be rejected, not run: the first 64 bytes with one of them flipped.
    let mut corrupt = [0u8; 64];
    corrupt.copy_from_slice(&model_bytes[..64]);
    corrupt[40] ^= 1;
    let rejected = ModelFile::parse(&corrupt).is_err();
    say!("truncated copy with a flipped byte rejected: {}", rejected);
    if INPUT.0.len() != 4 * VOXELS
        || EXPECTED.len() != VOXELS
        || EXPECTED_INT8.len() != VOXELS
        || PHANTOM.len() != VOXELS
    {
        say!(
            "data files have the wrong size: input {} bytes, labels {}, {} and {}",
            INPUT.0.len(),
            EXPECTED.len(),
            EXPECTED_INT8.len(),
            PHANTOM.len()
        );
        exit(false)
    }

    // Two clocks around each forward pass: the DWT cycle counter (what to read on silicon; QEMU
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
    let instructions = |ticks: u64| ticks * u64::from(CALIBRATION_INSTRUCTIONS) / calibration.max(1);

    // The f32 path.
    core.DWT.set_cycle_count(0);
    let (result, f32_ticks) = measure(|| {
        // SAFETY: the arena is ARENA_WORDS >= SCRATCH_LEN words, u32 and f32 have one size and
        // alignment, every bit pattern is an f32, and this borrow ends with the closure.
        let scratch: &mut [f32] =
            unsafe { core::slice::from_raw_parts_mut(arena.as_mut_ptr().cast(), SCRATCH_LEN) };
        model.segment(input, WINDOW, labels, scratch)
    });
    let f32_cycles = DWT::cycle_count();
    if let Err(e) = result {
        say!("f32 forward failed: {}", e);
        exit(false)
    }

    // The integer path.
    core.DWT.set_cycle_count(0);
    let (result, int8_ticks) = measure(|| {
        let (f, rest) = arena.split_at_mut(INT8_F32S);
        let (i, b) = rest.split_at_mut(INT8_I32S);
        // SAFETY: three disjoint parts of the arena (build.rs made it large enough), u32 has the
        // size and alignment of f32 and i32 and at least that of i8, every bit pattern is valid
        // for all three, and the borrows end with the closure.
        let scratch = unsafe {
            Int8Scratch {
                f32s: core::slice::from_raw_parts_mut(f.as_mut_ptr().cast(), INT8_F32S),
                i32s: core::slice::from_raw_parts_mut(i.as_mut_ptr().cast(), INT8_I32S),
                i8s: core::slice::from_raw_parts_mut(b.as_mut_ptr().cast(), INT8_I8S),
            }
        };
        model.segment_int8(input, WINDOW, labels_int8, scratch)
    });
    let int8_cycles = DWT::cycle_count();
    core.SYST.disable_counter();
    if let Err(e) = result {
        say!("integer forward failed: {}", e);
        exit(false)
    }

    for (c, name) in file.preprocessing.class_names.iter().enumerate().take(classes) {
        let (f, fd) = dice(labels, c);
        let (q, qd) = dice(labels_int8, c);
        let (truth, _) = dice(PHANTOM, c);
        say!(
            "class {} ({}): phantom {} voxels; f32 {} (Dice {}%); int8 {} (Dice {}%)",
            c,
            name,
            truth,
            f,
            fd,
            q,
            qd
        );
    }
    say!(
        "time: f32 {} and int8 {} SysTick ticks (core clock) per window, {} for a calibration loop of {} instructions",
        f32_ticks,
        int8_ticks,
        calibration,
        CALIBRATION_INSTRUCTIONS
    );
    say!(
        "instructions per window (QEMU -icount): f32 {}, int8 {}",
        instructions(f32_ticks),
        instructions(int8_ticks)
    );
    say!(
        "DWT CYCCNT: present {}, counted {} (f32) and {} (int8) cycles",
        has_cyccnt,
        f32_cycles,
        int8_cycles
    );
    say!("stack used: {} bytes", stack_used());
    let differ = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(a, b)| a != b).count();
    let (f32_mismatches, int8_mismatches) = (differ(labels, EXPECTED), differ(labels_int8, EXPECTED_INT8));
    say!(
        "labels differing from the host: f32 {} of {}, int8 {} of {}",
        f32_mismatches,
        VOXELS,
        int8_mismatches,
        VOXELS
    );
    exit(f32_mismatches == 0 && int8_mismatches == 0 && rejected)
}
