//! UNETR forward-pass benchmark: ViT-T encoder (hidden 192, depth 12, heads 3, MLP 768, patch 16),
//! feature size 16, 14 classes, random weights, 96^3 windows.
//!
//!     cargo bench -p glmae-infer --bench forward                 # windows: f32/int8 x 1/2 threads
//!     cargo bench -p glmae-infer --bench forward -- volume       # + 256x256x128 volumes, overlap 0.5
//!     cargo bench -p glmae-infer --bench forward -- reference    # + one reference-kernel window
//!     cargo bench -p glmae-infer --bench forward -- agreement    # fast vs reference labels on a phantom
//!     cargo bench -p glmae-infer --bench forward -- conv=32,16,96,1   # one 3x3x3 layer (CI,CO,EDGE,THREADS)
//!     cargo bench -p glmae-infer --bench forward -- up=32,16,48,1     # one transposed conv, EDGE^3 -> (2 EDGE)^3
//!
//! 3x3x3 convolutions run by Winograd F(4x4x4, 3x3x3) or F(2x2x2, 3x3x3) where they fit
//! ([`ConvAlgorithms::Winograd`]); `CONV_F2=1` allows only F(2x2x2, 3x3x3), `CONV_DIRECT=1` only
//! direct implicit GEMMs (windows and agreement). For `conv=`, `CONV_F4=1` times F(4x4x4, 3x3x3)
//! (else F(2x2x2, 3x3x3)), `CONV_DIRECT=1` the direct kernel, `CONV_INT8=1` the integer kernels;
//! `up=CI,CO,EDGE,THREADS` times one 2x2x2 transposed convolution. A layer's GFLOP/s count the
//! direct algorithm's 27 multiply-adds per input channel and output (an effective rate for
//! Winograd).
//!
//! `only=f32` or `only=int8` restricts the precisions; `volume-only` skips the window runs.
//! int8 runs twice: dequantised to f32 (the default engine) and on the integer kernels
//! (`int8_kernels=Some(Vnni)`, when the CPU has AVX-512 VNNI).
//!
//! Each measurement runs in a child process so that its peak resident memory (VmHWM) is its own.
//! Window times are the median of `REPS` runs after one warm-up run; `cpu_ms` is the process's
//! CPU time per window (user + system), which stays meaningful on a shared, loaded machine. Conv GFLOP/s counts
//! 2 x multiply-adds of the decoder's 3x3x3, 1x1x1 and transposed convolutions over their time.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use glmae_core::format::Precision;
use glmae_core::{ModelFile, Unetr, UnetrConfig};
use glmae_data::sliding_window::Blend;
use glmae_infer::fast::{ConvAlgorithms, FastUnetr};
use glmae_infer::{Engine, SegmentOptions, segment_volume};

const WINDOW: [usize; 3] = [96, 96, 96];
const VOLUME: [usize; 3] = [256, 256, 128];
const REPS: usize = 5;

fn config() -> UnetrConfig {
    UnetrConfig::vit_t([96, 96, 96], 14)
}

fn model(precision: Precision) -> Result<Vec<u8>> {
    Ok(glmae_core::synthetic::random_model(&config(), 42, precision)?)
}

fn precision(s: &str) -> Result<Precision> {
    match s {
        "f32" => Ok(Precision::F32),
        "int8" => Ok(Precision::Int8),
        _ => bail!("precision must be f32 or int8, not {s}"),
    }
}

/// A preprocessed CT phantom (HU window [-175, 250] -> [0, 1]) of `shape` at 1.5 mm.
fn phantom(shape: [usize; 3]) -> (Vec<f32>, Vec<u8>) {
    let p = glmae_data::phantom::generate(
        7,
        &glmae_data::phantom::PhantomConfig { shape, spacing: [1.5, 1.5, 2.0].map(|s: f32| s * 1.6) },
    );
    (p.hu.iter().map(|h| ((h + 175.0) / 425.0).clamp(0.0, 1.0)).collect(), p.labels)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("thread pool")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The 3x3x3 convolution algorithms: all by default, `CONV_DIRECT=1` none, `CONV_F2=1` only
/// Winograd F(2x2x2, 3x3x3).
fn algorithms() -> ConvAlgorithms {
    if std::env::var("CONV_DIRECT").is_ok() {
        ConvAlgorithms::Direct
    } else if std::env::var("CONV_F2").is_ok() {
        ConvAlgorithms::WinogradF2
    } else {
        ConvAlgorithms::Winograd
    }
}

/// Child: time windows of the fast pass.
fn child_window(p: Precision, threads: usize, int8_kernels: bool, bf16: bool) -> Result<()> {
    let bytes = model(p)?;
    let file = ModelFile::parse(&bytes)?;
    let t = Instant::now();
    let mut fast = FastUnetr::new(&file)?.with_conv_algorithms(algorithms()).with_bf16(bf16);
    // Packing (and transforming) the weights, once per model.
    let load_ms = 1e3 * t.elapsed().as_secs_f64();
    if int8_kernels {
        fast = fast.with_int8_kernels(glmae_infer::fast::QIsa::detect())?;
    }
    let (input, _) = phantom(WINDOW);
    let pool = pool(threads)?;
    let mut times = Vec::new();
    let mut stats = Vec::new();
    let mut cpu = 0.0;
    // One logits buffer for all windows, as the sliding window does.
    let mut logits = vec![0.0; fast.logits_len(WINDOW)];
    for r in 0..=REPS {
        let c0 = cpu_seconds();
        let t = Instant::now();
        let s = pool.install(|| fast.forward_into(&input, WINDOW, &mut logits))?;
        times.push(t.elapsed().as_secs_f64());
        stats.push(s);
        if r > 0 {
            cpu += cpu_seconds() - c0;
        }
    }
    times.remove(0);
    stats.remove(0);
    let conv_gflops = median(stats.iter().map(|s| 2.0 * s.conv_macs as f64 / s.conv_seconds / 1e9).collect());
    let enc = median(stats.iter().map(|s| s.encoder_seconds).collect());
    let conv_s = median(stats.iter().map(|s| s.conv_seconds).collect());
    let norm_s = median(stats.iter().map(|s| s.norm_seconds).collect());
    println!(
        "RESULT window precision={p:?} threads={threads} isa={:?} algorithms={:?} int8_kernels={:?} bf16={} cpu_ms={:.0} ms={:.0} min_ms={:.0} encoder_ms={:.0} conv_ms={:.0} norm_ms={:.0} conv_gflop={:.1} conv_gflops={:.1} peak_mib={:.0} packed_mib={:.1} load_ms={load_ms:.0}",
        fast.isa(),
        fast.conv_algorithms(),
        fast.int8_kernels(),
        fast.bf16(),
        1e3 * cpu / REPS as f64,
        1e3 * median(times.clone()),
        1e3 * times.iter().cloned().fold(f64::MAX, f64::min),
        1e3 * enc,
        1e3 * conv_s,
        1e3 * norm_s,
        2.0 * stats[0].conv_macs as f64 / 1e9,
        conv_gflops,
        peak_rss_mib(),
        fast.weight_bytes() as f64 / (1 << 20) as f64,
    );
    Ok(())
}

/// Process CPU seconds (user + system) from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    if f.len() < 13 { f64::NAN } else { (f[11] + f[12]) / 100.0 }
}

/// Child: one 3x3x3 convolution layer, GFLOP/s by wall and by CPU time.
fn child_conv(ci: usize, co: usize, edge: usize, threads: usize) -> Result<()> {
    use glmae_infer::fast::conv::{ConvWeights, Vol, conv};
    use glmae_infer::fast::kernels::{Bf16Kernels, F32Kernels, Int8Kernels};
    use glmae_infer::fast::qconv::{QConvWeights, QVol, max_level, qconv};
    use glmae_infer::fast::winograd::Variant;
    let cw = ConvWeights::from_fn(co, ci, 3, |i| ((i * 7919) % 13) as f32 * 0.01, None);
    let q: Vec<i8> = (0..co * ci * 27).map(|i| ((i * 7919) % 13) as i8).collect();
    let qw = QConvWeights::from_parts(co, ci, 3, &q, &vec![0.01; co], None);
    let int8 = std::env::var("CONV_INT8").is_ok();
    let winograd = std::env::var("CONV_DIRECT").is_err();
    let variant = if std::env::var("CONV_F4").is_ok() { Variant::F4 } else { Variant::F2 };
    let bf16 = std::env::var("CONV_BF16").is_ok();
    let mut ww = glmae_infer::fast::winograd::WinogradWeights::from_fn(
        variant,
        co,
        ci,
        |i| ((i * 7919) % 13) as f32 * 0.01,
        None,
    );
    if bf16 {
        ww.pack_bf16();
    }
    let d = [edge; 3];
    let mut x = Vol::zeros(d, ci);
    for (i, v) in x.data.iter_mut().enumerate() {
        *v = (i % 17) as f32 * 0.1;
    }
    let mut out = Vol::zeros(d, co);
    let pool = pool(threads)?;
    let qww = glmae_infer::fast::winograd::QWinogradWeights::from_fn(co, ci, |i| q[i] as f32 * 0.01, None);
    let run = |out: &mut Vol| {
        if let (true, true, Some(qww)) = (int8, winograd, &qww) {
            let amax = glmae_infer::fast::conv::abs_max(&x, 0, ci);
            glmae_infer::fast::winograd::conv_qwinograd(Int8Kernels::best(), &x, amax, qww, out, 0);
        } else if int8 {
            let amax = glmae_infer::fast::conv::abs_max(&x, 0, ci);
            let qx = QVol::quantize(&x, amax, max_level(qw.k()), Vec::new());
            qconv(Int8Kernels::best(), &qx, &qw, out, 0);
        } else if winograd && bf16 {
            glmae_infer::fast::winograd::conv_winograd_bf16(Bf16Kernels::best(), &x, &ww, out, 0);
        } else if winograd {
            glmae_infer::fast::winograd::conv_winograd(F32Kernels::best(), &x, &ww, out, 0);
        } else {
            conv(F32Kernels::best(), &x, &cw, out, 0);
        }
    };
    pool.install(|| run(&mut out));
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let reps = 3;
    for _ in 0..reps {
        pool.install(|| run(&mut out));
    }
    let (wall, cpu) = (t0.elapsed().as_secs_f64() / reps as f64, (cpu_seconds() - c0) / reps as f64);
    let flop = 2.0 * (27 * ci * co * edge * edge * edge) as f64;
    println!(
        "RESULT conv int8={int8} bf16={bf16} winograd={} variant={variant:?} ci={ci} co={co} edge={edge} threads={threads} ms={:.1} gflops_wall={:.1} gflops_per_cpu_s={:.1}",
        winograd && (!int8 || qww.is_some()),
        wall * 1e3,
        flop / wall / 1e9,
        flop / cpu / 1e9
    );
    Ok(())
}

/// Child: the Winograd products of one block alone, on data that stays in cache: `tiles` rows of
/// `ci` values per position against one packed `ci x co` matrix per position (216 of them, as
/// F(4, 3)), repeated; GMAC/s against the machine's FMA peak says how much of a product's time is
/// the micro-kernel itself.
fn child_products(ci: usize, co: usize, tiles: usize) -> Result<()> {
    use glmae_infer::fast::gemm::{Batch, PackedB};
    use glmae_infer::fast::kernels::F32Kernels;
    let n = 216;
    let v: Vec<f32> = (0..tiles * n * ci).map(|i| (i % 13) as f32 * 0.1).collect();
    let u: Vec<PackedB> =
        (0..n).map(|p| PackedB::from_fn(ci, co, |r, c| ((p + r + c) % 7) as f32 * 0.1)).collect();
    let mut m = vec![0.0f32; tiles * n * co];
    let kernels = match std::env::var("ISA").as_deref() {
        Ok("avx2") => F32Kernels::new(glmae_infer::fast::Isa::Avx2Fma).unwrap_or(F32Kernels::PORTABLE),
        _ => F32Kernels::best(),
    };
    let run = |m: &mut [f32]| {
        Batch { a: &v, a_step: ci, lda: n * ci, b: &u, c_step: co, ldc: n * co, mr: tiles }.run(kernels, m)
    };
    run(&mut m);
    let reps = 2000;
    let t = Instant::now();
    for _ in 0..reps {
        run(&mut m);
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    let macs = (tiles * n * ci * co) as f64;
    println!(
        "RESULT products ci={ci} co={co} tiles={tiles} isa={:?} us={:.1} gmacs={:.1}",
        kernels.isa(),
        s * 1e6,
        macs / s / 1e9
    );
    Ok(())
}

/// Child: this CPU's multiply-add peak on one core, the yardstick of `products`: 12 independent
/// chains of 512-bit FMAs (f32) and of `vdpbf16ps` (bf16 pairs) on registers only.
#[cfg(target_arch = "x86_64")]
fn child_peak() -> Result<()> {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f")]
    fn fma(n: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(1.0); 12];
        let (b, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, b, c);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dpbf16(n: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(1.0); 12];
        // SAFETY: both are 64-byte vectors and every bit pattern is a valid value of either.
        let b = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f80_3f80)) };
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, b, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
    let n = 50_000_000;
    if std::arch::is_x86_feature_detected!("avx512f") {
        let t = Instant::now();
        // SAFETY: the CPU has AVX-512 F (checked above).
        let s = unsafe { fma(n) };
        println!(
            "RESULT peak f32_fma_gmacs={:.1} ({s})",
            (n * 12 * 16) as f64 / t.elapsed().as_secs_f64() / 1e9
        );
    }
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16") {
        let t = Instant::now();
        // SAFETY: the CPU has AVX-512 F and BF16 (checked above).
        let s = unsafe { dpbf16(n) };
        println!(
            "RESULT peak bf16_dot_gmacs={:.1} ({s})",
            (n * 12 * 32) as f64 / t.elapsed().as_secs_f64() / 1e9
        );
    }
    Ok(())
}

/// Child: one 2x2x2 stride-2 transposed convolution from EDGE^3 to (2 EDGE)^3.
fn child_up(ci: usize, co: usize, edge: usize, threads: usize) -> Result<()> {
    use glmae_infer::fast::conv::{UpConvWeights, Vol, conv_transpose};
    use glmae_infer::fast::kernels::F32Kernels;
    let w = UpConvWeights::from_fn(ci, co, |i| ((i * 7919) % 13) as f32 * 0.01);
    let mut x = Vol::zeros([edge; 3], ci);
    for (i, v) in x.data.iter_mut().enumerate() {
        *v = (i % 17) as f32 * 0.1;
    }
    let mut out = Vol::zeros([2 * edge; 3], 2 * co);
    let pool = pool(threads)?;
    pool.install(|| conv_transpose(F32Kernels::best(), &x, &w, &mut out, 0));
    let t0 = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        pool.install(|| conv_transpose(F32Kernels::best(), &x, &w, &mut out, 0));
    }
    let wall = t0.elapsed().as_secs_f64() / reps as f64;
    let flop = 2.0 * (8 * ci * co * edge * edge * edge) as f64;
    println!(
        "RESULT up ci={ci} co={co} edge={edge} threads={threads} ms={:.1} gflops={:.1}",
        wall * 1e3,
        flop / wall / 1e9
    );
    Ok(())
}

/// Child: one whole volume through the sliding window.
fn child_volume(p: Precision, threads: usize, engine: Engine) -> Result<()> {
    let bytes = model(p)?;
    let file = ModelFile::parse(&bytes)?;
    let (vol, _) = phantom(VOLUME);
    let opts = SegmentOptions {
        overlap: 0.5,
        blend: Blend::Gaussian,
        threads,
        probabilities: None,
        probabilities_u8: false,
        progress: false,
    };
    let (t, c0) = (Instant::now(), cpu_seconds());
    let logits = segment_volume(&file, &vol, VOLUME, &opts, engine)?;
    let s = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - c0;
    let windows: usize = (0..3)
        .map(|a| glmae_data::sliding_window::starts(VOLUME[a], WINDOW[a], opts.overlap).len())
        .product();
    println!(
        "RESULT volume precision={p:?} threads={threads} engine={engine:?} shape={VOLUME:?} windows={windows} s={s:.1} cpu_s={cpu:.1} peak_mib={:.0} logits={}",
        peak_rss_mib(),
        logits.len()
    );
    Ok(())
}

/// Child: one window on glmae-core's reference kernels (single thread).
fn child_reference(p: Precision) -> Result<()> {
    let bytes = model(p)?;
    let file = ModelFile::parse(&bytes)?;
    let m = Unetr::new(&file)?;
    let (input, _) = phantom(WINDOW);
    let mut logits = vec![0.0; m.logits_len(WINDOW)];
    let mut scratch = vec![0.0; m.scratch_len(WINDOW)?];
    let t = Instant::now();
    m.forward(&input, WINDOW, &mut logits, &mut scratch)?;
    println!(
        "RESULT reference precision={p:?} threads=1 ms={:.0} peak_mib={:.0}",
        1e3 * t.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    Ok(())
}

/// Child: fast vs reference logits and labels on a phantom window, Dice per class between them.
fn child_agreement(p: Precision) -> Result<()> {
    let bytes = model(p)?;
    let file = ModelFile::parse(&bytes)?;
    let m = Unetr::new(&file)?;
    let (input, truth) = phantom(WINDOW);
    let mut expected = vec![0.0; m.logits_len(WINDOW)];
    let mut scratch = vec![0.0; m.scratch_len(WINDOW)?];
    m.forward(&input, WINDOW, &mut expected, &mut scratch)?;
    drop(scratch);
    let (lo, hi) = expected.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let n = WINDOW.iter().product::<usize>();
    let mut lb = vec![0u8; n];
    glmae_core::kernels::argmax_channels(&expected, 14, &mut lb);
    let dice_ref = glmae_data::sliding_window::dice_per_class(&lb, &truth, 14);
    let mut variants = vec![(None, false), (None, true)];
    if p == Precision::Int8 {
        variants.extend(glmae_infer::fast::QIsa::detect().map(|q| (Some(q), false)));
    }
    for (q, bf16) in variants {
        let fast =
            FastUnetr::new(&file)?.with_int8_kernels(q)?.with_conv_algorithms(algorithms()).with_bf16(bf16);
        let got = pool(2)?.install(|| fast.forward(&input, WINDOW))?;
        let max_diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let mut la = vec![0u8; n];
        glmae_core::kernels::argmax_channels(&got, 14, &mut la);
        let same = la.iter().zip(&lb).filter(|(a, b)| a == b).count() as f64 / n as f64;
        let dice = glmae_data::sliding_window::dice_per_class(&la, &lb, 14);
        let present: Vec<f64> = dice.iter().flatten().map(|d| 100.0 * d).collect();
        let min = present.iter().cloned().fold(f64::MAX, f64::min);
        let mean = present.iter().sum::<f64>() / present.len().max(1) as f64;
        // Against the phantom's own labels: how far the fast pass moves each class's Dice (the
        // issue's criterion; with random weights the Dice values themselves mean nothing).
        let dice_fast = glmae_data::sliding_window::dice_per_class(&la, &truth, 14);
        let change = dice_fast
            .iter()
            .zip(&dice_ref)
            .filter_map(|(a, b)| Some((a.as_ref()? - b.as_ref()?).abs() * 100.0))
            .fold(0.0, f64::max);
        println!(
            "RESULT agreement precision={p:?} int8_kernels={q:?} bf16={bf16} algorithms={:?} logit_range={:.3} max_diff={max_diff:.2e} rel={:.2e} labels_same={:.5} dice_fast_vs_ref_mean={mean:.2} dice_min={min:.2} classes_present={} max_dice_change_vs_truth_points={change:.3}",
            fast.conv_algorithms(),
            hi - lo,
            max_diff / (hi - lo),
            same,
            present.len()
        );
    }
    Ok(())
}

fn spawn(args: &[&str]) -> Result<String> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe).arg("--child").args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("child {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("RESULT")).collect();
    for l in &lines {
        println!("{l}");
    }
    Ok(lines.join("\n"))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.first().map(String::as_str) == Some("--child") {
        let p = precision(args.get(2).map_or("f32", String::as_str)).unwrap_or(Precision::F32);
        let threads: usize = args.get(3).map_or(Ok(2), |s| s.parse())?;
        return match args.get(1).map(String::as_str) {
            Some("window") => child_window(p, threads, false, false),
            Some("window-int8k") => child_window(p, threads, true, false),
            Some("window-bf16") => child_window(p, threads, false, true),
            Some("volume") => child_volume(p, threads, Engine::Fast),
            Some("volume-int8k") => child_volume(p, threads, Engine::FastInt8Kernels),
            Some("reference") => child_reference(p),
            #[cfg(target_arch = "x86_64")]
            Some("peak") => child_peak(),
            Some("products") => {
                let n: Vec<usize> = args[2..5].iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
                child_products(n[0], n[1], n[2])
            }
            Some("agreement") => child_agreement(p),
            Some("up") => {
                let n: Vec<usize> = args[2..].iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
                child_up(n[0], n[1], n[2], n[3])
            }
            Some("conv") => {
                let n: Vec<usize> = args[2..].iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
                child_conv(n[0], n[1], n[2], n[3])
            }
            other => bail!("unknown child {other:?}"),
        };
    }
    let has = |s: &str| args.iter().any(|a| a == s);
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model_name = cpu.lines().find_map(|l| l.strip_prefix("model name")).unwrap_or(": ?");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "cpu{model_name}, load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("ViT-T UNETR, feature size 16, 14 classes, window {WINDOW:?}");
    for kind in ["conv", "up"] {
        if let Some(c) = args.iter().find_map(|a| a.strip_prefix(kind).and_then(|r| r.strip_prefix('='))) {
            // conv=CI,CO,EDGE,THREADS or up=...: one layer (kernel tuning).
            let v: Vec<&str> = c.split(',').collect();
            anyhow::ensure!(v.len() == 4, "{kind}= takes CI,CO,EDGE,THREADS");
            spawn(&[kind, v[0], v[1], v[2], v[3]])?;
            return Ok(());
        }
    }
    let only = args.iter().find_map(|a| a.strip_prefix("only="));
    for p in ["f32", "int8"] {
        if only.is_some_and(|o| o != p) {
            continue;
        }
        if !has("volume-only") {
            for t in ["1", "2"] {
                spawn(&["window", p, t])?;
            }
            if p == "int8" && glmae_infer::fast::QIsa::detect().is_some() {
                for t in ["1", "2"] {
                    spawn(&["window-int8k", p, t])?;
                }
            }
        }
        if has("volume") || has("volume-only") {
            for t in ["2", "1"] {
                if t == "1" && !has("volume1") {
                    continue;
                }
                spawn(&["volume", p, t])?;
                if p == "int8" {
                    spawn(&["volume-int8k", p, t])?;
                }
            }
        }
        if has("reference") && p == "f32" {
            spawn(&["reference", p, "1"])?;
        }
        if has("agreement") {
            spawn(&["agreement", p, "2"])?;
        }
    }
    Ok(())
}
