//! The fast forward pass against glmae-core's reference `Unetr::forward`, the single definition
//! of the model, on random tiny UNETRs: f32 and int8 weights, cubic and non-cubic windows, a
//! learned position table with two input channels and no qkv bias, every kernel ISA this CPU has,
//! 3x3x3 convolutions both by Winograd's F(2x2x2, 3x3x3) and as direct sums.
//!
//! Tolerance: the largest logit difference must stay below 1e-4 of the reference logits' range
//! (max - min over the window), and at least 99.9% of voxels must get the same label. Both passes
//! use the same (dequantised) weights in f32, so only summation order (and Winograd's transforms)
//! differ.

use glmae_core::format::Precision;
use glmae_core::synthetic::random_model;
use glmae_core::{ModelFile, PosEmbed, Unetr, UnetrConfig};
use glmae_infer::fast::{BIsa, ConvAlgorithms, FastUnetr, Isa, QIsa};

const REL_TOL: f64 = 1e-4;
const LABEL_AGREEMENT: f64 = 0.999;
/// The opt-in int8 kernels also quantise activations (to 11-15 bits): 1e-3 of the logit range.
const INT8_KERNEL_REL_TOL: f64 = 1e-3;
const INT8_KERNEL_LABELS: f64 = 0.999;
/// By Winograd, the int8 kernels quantise the transformed inputs, which reach 8 times the
/// inputs' range, at 12 bits (and the transformed weights at 10-12): about 5x the error.
const INT8_WINOGRAD_REL_TOL: f64 = 3e-3;
const INT8_WINOGRAD_LABELS: f64 = 0.995;
/// Largest move of a class's Dice against a phantom's labels, in points, from the f32 reference's:
/// the bound for an int8 file on the int8 kernels (measured 0.17 points on the tiny
/// config). Its labels are compared with the f32 model's, whose weights it quantises: 97.5%
/// (measured 98.2%).
const INT8_DICE_POINTS: f64 = 0.5;
const INT8_FILE_LABELS: f64 = 0.975;
/// The bf16 mode (F(2, 3) products in bf16, 0.5% of an output's rms per layer): 1 point and
/// 98.5% of labels on the tiny config, where every layer below 24^3 runs it (measured 0.49 points
/// and 98.97%). The 0.1 point holds on a ViT-T window, where only the 12^3 layers run it
/// (`RESULT agreement ... bf16=true`: 0.006 points, 99.90% of labels), not on this config.
const BF16_DICE_POINTS: f64 = 1.0;
const BF16_LABELS: f64 = 0.985;

fn input(n: usize, seed: u64) -> Vec<f32> {
    // Smooth structure plus noise, in the [0, 1] range of preprocessed CT.
    let mut rng = glmae_core::synthetic::Lcg::new(seed);
    (0..n)
        .map(|i| {
            // (s >> 40) / 2^24, exactly: symmetric() is (s >> 40) / 2^23 - 1 without rounding.
            let noise = (rng.symmetric() + 1.0) / 2.0;
            0.5 + 0.3 * ((i as f32) * 0.013).sin() * 0.5 + 0.5 * noise - 0.25
        })
        .collect()
}

fn argmax(logits: &[f32], classes: usize) -> Vec<u8> {
    let mut labels = vec![0u8; logits.len() / classes];
    glmae_core::kernels::argmax_channels(logits, classes, &mut labels);
    labels
}

/// The engine variant a comparison runs.
#[derive(Clone, Copy, Debug)]
struct Kernels {
    isa: Isa,
    qisa: Option<QIsa>,
    algorithms: ConvAlgorithms,
}

/// Returns (max |diff| / range, label agreement) of the fast pass against the reference.
fn compare(cfg: &UnetrConfig, precision: Precision, window: [usize; 3], seed: u64, k: Kernels) -> (f64, f64) {
    let bytes = random_model(cfg, seed, precision).unwrap();
    let file = ModelFile::parse(&bytes).unwrap();
    let reference = Unetr::new(&file).unwrap();
    let x = input(reference.input_len(window), seed + 100);
    let mut expected = vec![0.0; reference.logits_len(window)];
    let mut scratch = vec![0.0; reference.scratch_len(window).unwrap()];
    reference.forward(&x, window, &mut expected, &mut scratch).unwrap();

    let fast = FastUnetr::new(&file)
        .unwrap()
        .with_isa(k.isa)
        .unwrap()
        .with_int8_kernels(k.qisa)
        .unwrap()
        .with_conv_algorithms(k.algorithms);
    let (got, stats) = fast.forward_with_stats(&x, window).unwrap();
    // The tiny configs have 3x3x3 layers with 8+ input channels on even sizes (Winograd must
    // run), and F(4, 3) must run on windows of 24+ voxels per axis (their first level).
    let winograd = k.algorithms != ConvAlgorithms::Direct;
    assert_eq!(stats.winograd_convs > 0, winograd, "{k:?}: {} Winograd convolutions", stats.winograd_convs);
    let f4 = k.algorithms == ConvAlgorithms::Winograd && window.iter().all(|&d| d >= 24);
    assert_eq!(stats.f4_convs > 0, f4, "{k:?} {window:?}: {} F(4, 3) convolutions", stats.f4_convs);
    assert_eq!(got.len(), expected.len());
    let (lo, hi) = expected.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let range = (hi - lo) as f64;
    assert!(range > 0.1, "degenerate reference logits");
    let max_diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    let classes = cfg.out_channels as usize;
    let (la, lb) = (argmax(&got, classes), argmax(&expected, classes));
    let same = la.iter().zip(&lb).filter(|(a, b)| a == b).count() as f64 / la.len() as f64;
    (max_diff / range, same)
}

const ALGORITHMS: [ConvAlgorithms; 3] =
    [ConvAlgorithms::Winograd, ConvAlgorithms::WinogradF2, ConvAlgorithms::Direct];

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    if Isa::detect() != Isa::Scalar {
        v.push(Isa::detect());
    }
    v
}

fn check(name: &str, cfg: &UnetrConfig, precision: Precision, window: [usize; 3]) {
    for isa in isas() {
        for algorithms in ALGORITHMS {
            let k = Kernels { isa, qisa: None, algorithms };
            let (rel, same) = compare(cfg, precision, window, 7, k);
            println!("{name} {precision:?} {window:?} {k:?}: max diff {rel:.2e} of range, labels {same:.5}");
            assert!(rel < REL_TOL, "{name} {k:?}: logits differ by {rel:e} of their range");
            assert!(same >= LABEL_AGREEMENT, "{name} {k:?}: only {same} of labels agree");
        }
    }
}

#[test]
fn f32_cubic_window_matches_reference() {
    check("testing_config", &glmae_core::testing_config(), Precision::F32, [32, 32, 32]);
}

#[test]
fn f32_non_cubic_window_matches_reference() {
    let mut cfg = glmae_core::testing_config();
    cfg.out_channels = 14;
    check("14 classes", &cfg, Precision::F32, [48, 32, 16]);
}

#[test]
fn int8_matches_reference_int8() {
    let mut cfg = glmae_core::testing_config();
    cfg.feature_size = 8;
    check("int8", &cfg, Precision::Int8, [32, 48, 32]);
}

/// The integer kernels quantise activations too, so they get their own, looser tolerances.
#[test]
fn int8_kernels_stay_close_to_reference_int8() {
    let mut cfg = glmae_core::testing_config();
    cfg.feature_size = 8;
    cfg.out_channels = 14;
    for qisa in [QIsa::Scalar, QIsa::Vnni, QIsa::Neon] {
        if !qisa.supported() {
            continue;
        }
        for (seed, window) in [(7, [32, 48, 32]), (8, [32, 32, 32])] {
            for algorithms in ALGORITHMS {
                let k = Kernels { isa: Isa::detect(), qisa: Some(qisa), algorithms };
                let (rel, same) = compare(&cfg, Precision::Int8, window, seed, k);
                println!("int8 kernels {window:?} {k:?}: max diff {rel:.2e} of range, labels {same:.5}");
                // Measured: direct 1.4e-4 to 1.5e-4 of the range and 0.9996 of labels;
                // Winograd 7e-4 to 9e-4 and 0.9985.
                let (tol, labels) = if algorithms != ConvAlgorithms::Direct {
                    (INT8_WINOGRAD_REL_TOL, INT8_WINOGRAD_LABELS)
                } else {
                    (INT8_KERNEL_REL_TOL, INT8_KERNEL_LABELS)
                };
                assert!(rel < tol, "{k:?}: logits differ by {rel:e} of their range");
                assert!(same >= labels, "{k:?}: only {same} of labels agree");
            }
        }
    }
}

/// The reduced-precision modes on a CT phantom window (a 14-class tiny UNETR, random weights):
/// each class's Dice against the phantom's labels may move by at most 0.1 point from the f32
/// reference's in the bf16 mode (every bf16 kernel set of this CPU; all 3x3x3 layers below 24^3
/// run F(2, 3) in bf16 in this config, more of the network than in a ViT-T window) by at most
/// [`BF16_DICE_POINTS`], and with an int8 file on the int8 kernels by at most
/// [`INT8_DICE_POINTS`]; the labels agree with the f32 reference's as the constants say. A bf16
/// rounding in the wrong place (a weight rounded twice, a pair order swapped, F(4, 3) in bf16)
/// moves labels by tens of percents.
#[test]
fn reduced_precision_keeps_dice_on_a_phantom_window() {
    use glmae_data::phantom::{PhantomConfig, generate};
    use glmae_data::sliding_window::dice_per_class;
    let mut cfg = glmae_core::testing_config();
    cfg.out_channels = 14;
    let window = [32, 32, 32];
    let p = generate(5, &PhantomConfig { shape: window, spacing: [6.0; 3] });
    let x: Vec<f32> = p.hu.iter().map(|h| ((h + 175.0) / 425.0).clamp(0.0, 1.0)).collect();
    let run_reference = |precision: Precision| {
        let bytes = random_model(&cfg, 21, precision).unwrap();
        let reference = Unetr::new(&ModelFile::parse(&bytes).unwrap()).unwrap();
        let mut logits = vec![0.0; reference.logits_len(window)];
        let mut scratch = vec![0.0; reference.scratch_len(window).unwrap()];
        reference.forward(&x, window, &mut logits, &mut scratch).unwrap();
        argmax(&logits, 14)
    };
    let reference = run_reference(Precision::F32);
    let dice_ref = dice_per_class(&reference, &p.labels, 14);
    let check = |name: &str, labels: &[u8], max_points: f64, min_same: f64| {
        let dice = dice_per_class(labels, &p.labels, 14);
        let moved = dice
            .iter()
            .zip(&dice_ref)
            .filter_map(|(a, b)| Some(100.0 * (a.as_ref()? - b.as_ref()?).abs()))
            .fold(0.0, f64::max);
        let same = labels.iter().zip(&reference).filter(|(a, b)| a == b).count() as f64 / labels.len() as f64;
        println!("{name}: Dice moved by {moved:.4} points at most, labels {same:.5} identical to f32");
        assert!(moved <= max_points, "{name}: a class's Dice moved by {moved} points");
        assert!(same >= min_same, "{name}: only {same} of labels identical to f32");
    };
    let f32_bytes = random_model(&cfg, 21, Precision::F32).unwrap();
    let f32_file = ModelFile::parse(&f32_bytes).unwrap();
    for bisa in [BIsa::Scalar, BIsa::Avx512Bf16] {
        if !bisa.supported() {
            continue;
        }
        let fast = FastUnetr::new(&f32_file).unwrap().with_bf16_kernels(bisa).unwrap().with_bf16(true);
        let (logits, stats) = fast.forward_with_stats(&x, window).unwrap();
        assert!(stats.bf16_convs >= 6, "{bisa:?}: {} layers ran bf16 products", stats.bf16_convs);
        check(&format!("bf16 {bisa:?}"), &argmax(&logits, 14), BF16_DICE_POINTS, BF16_LABELS);
    }
    let int8_bytes = random_model(&cfg, 21, Precision::Int8).unwrap();
    let int8_file = ModelFile::parse(&int8_bytes).unwrap();
    for qisa in [QIsa::Scalar, QIsa::Vnni, QIsa::Neon] {
        if !qisa.supported() {
            continue;
        }
        let fast = FastUnetr::new(&int8_file).unwrap().with_int8_kernels(Some(qisa)).unwrap();
        let logits = fast.forward(&x, window).unwrap();
        check(&format!("int8 kernels {qisa:?}"), &argmax(&logits, 14), INT8_DICE_POINTS, INT8_FILE_LABELS);
    }
}

#[test]
fn learned_table_two_channels_no_qkv_bias() {
    let mut cfg = glmae_core::testing_config();
    cfg.vit.pos_embed = PosEmbed::Learned;
    cfg.vit.in_channels = 2;
    cfg.vit.qkv_bias = false;
    cfg.vit.img_size = [32, 16, 48];
    check("learned", &cfg, Precision::F32, [32, 16, 48]);
}

#[test]
fn bad_input_is_an_error() {
    let bytes = random_model(&glmae_core::testing_config(), 1, Precision::F32).unwrap();
    let file = ModelFile::parse(&bytes).unwrap();
    let fast = FastUnetr::new(&file).unwrap();
    assert!(fast.forward(&[0.0; 10], [32, 32, 32]).is_err());
    assert!(fast.forward(&vec![0.0; 40 * 32 * 32], [40, 32, 32]).is_err());
    let mut x = vec![0.5; 32 * 32 * 32];
    x[5] = f32::NAN;
    let e = fast.forward(&x, [32, 32, 32]).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
    x[5] = 0.5;
    let e = fast.forward_into(&x, [32, 32, 32], &mut [0.0; 7]).unwrap_err();
    assert!(e.to_string().contains("logits buffer has 7 values"), "{e}");
}

/// Whole-volume segmentation: both engines, through the sliding window, on a CT phantom.
#[test]
fn engines_agree_on_a_phantom_volume() {
    use glmae_data::sliding_window::Blend;
    use glmae_infer::{Engine, SegmentOptions, segment_volume};
    let mut cfg = glmae_core::testing_config();
    cfg.out_channels = 14;
    let bytes = random_model(&cfg, 11, Precision::Int8).unwrap();
    let file = ModelFile::parse(&bytes).unwrap();
    let shape = [40, 36, 20];
    let p =
        glmae_data::phantom::generate(4, &glmae_data::phantom::PhantomConfig { shape, spacing: [6.0; 3] });
    let vol: Vec<f32> = p.hu.iter().map(|h| ((h + 175.0) / 425.0).clamp(0.0, 1.0)).collect();
    let opts = SegmentOptions {
        overlap: 0.5,
        blend: Blend::Gaussian,
        threads: 2,
        probabilities: None,
        probabilities_u8: false,
        progress: false,
    };
    let fast = segment_volume(&file, &vol, shape, &opts, Engine::Fast).unwrap();
    let reference = segment_volume(&file, &vol, shape, &opts, Engine::Reference).unwrap();
    let (a, b) = (argmax(&fast, 14), argmax(&reference, 14));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
    println!("phantom volume, int8 model: labels agree on {same:.5}");
    assert!(same >= LABEL_AGREEMENT, "{same}");
}

/// Recycled activation buffers (NaN-filled in debug builds) must not leak into later windows,
/// including windows of another shape.
#[test]
fn repeated_windows_give_identical_logits() {
    let bytes = random_model(&glmae_core::testing_config(), 3, Precision::F32).unwrap();
    let file = ModelFile::parse(&bytes).unwrap();
    let fast = FastUnetr::new(&file).unwrap();
    let (a, b) = ([32, 32, 32], [16, 48, 32]);
    let (xa, xb) = (input(32 * 32 * 32, 1), input(16 * 48 * 32, 2));
    let first = fast.forward(&xa, a).unwrap();
    let other = fast.forward(&xb, b).unwrap();
    assert!(other.iter().all(|v| v.is_finite()));
    assert_eq!(fast.forward(&xa, a).unwrap(), first);
    assert_eq!(fast.forward(&xb, b).unwrap(), other);
}
