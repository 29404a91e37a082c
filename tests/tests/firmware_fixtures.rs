//! The firmware example's data: `model.glmae` is the trained model `firmware-example/make-model.sh`
//! exported with `glmae-train export --int8 --calibrate` (committed, not regenerated here);
//! `input.f32`, `expected_labels.u8`, `expected_labels_int8.u8` and `phantom_labels.u8` are
//! regenerated from it on the host: a 32^3 window of a synthetic phantom the model never saw,
//! preprocessed with the model's stored preprocessing, the labels the host core predicts for it
//! with the f32 path and with the integer path, and the phantom's own labels. Regenerate after a new
//! model or a deliberate change to the core, the phantom or the preprocessing with
//! `GLMAE_BLESS=1 cargo test -p glmae-tests --test firmware_fixtures`.

use std::path::{Path, PathBuf};

use glmae_core::model::Int8Scratch;
use glmae_core::preprocessing::BTCV_CLASSES;
use glmae_core::{ModelFile, Unetr, UnetrConfig, testing_config};
use glmae_data::phantom::{PhantomConfig, generate};
use glmae_data::preprocess::Preprocessor;
use glmae_data::{Affine, Labels, Volume};

/// The phantom the window is cut from: a seed outside the training set (make-model.sh trains on
/// seeds 0-5) on the grid make-model.sh uses, generated at 4.5 x 4.5 x 6 mm ...
const PHANTOM_SEED: u64 = 1000;
const PHANTOM: PhantomConfig = PhantomConfig { shape: [72, 58, 40], spacing: [4.5, 4.5, 6.0] };
/// ... and declared at 1.5 x 1.5 x 2 mm: third-scale anatomy (make-model.sh says why).
const DECLARED_SPACING: [f64; 3] = [1.5, 1.5, 2.0];

/// Stack and statics besides the arena and the two label maps that the firmware needs in RAM
/// (the stack's measured high-water mark is about 107 KiB; firmware-example/README.md).
const RAM_RESERVE: usize = 160 * 1024;

/// How far the integer path's Dice against the phantom may fall from the f32 path's, per class
/// (issue 19's acceptance: within 1 point).
const DICE_TOLERANCE: f64 = 0.01;

fn firmware_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../firmware-example")
}

/// The RAM region's length in bytes from a firmware linker script (`RAM : ORIGIN = .., LENGTH = 4M`).
fn ram_length(script: &Path) -> usize {
    let text = std::fs::read_to_string(script).unwrap();
    let line = text.lines().find(|l| l.trim_start().starts_with("RAM")).expect("a RAM region");
    let length = line.split("LENGTH").nth(1).expect("LENGTH").trim_start_matches([' ', '=']).trim();
    let (digits, unit) = length.split_at(length.find(|c: char| !c.is_ascii_digit()).unwrap_or(length.len()));
    let scale = match unit.trim() {
        "" => 1,
        "K" => 1024,
        "M" => 1024 * 1024,
        other => panic!("{}: unknown unit {other:?}", script.display()),
    };
    digits.parse::<usize>().unwrap() * scale
}

/// The window start whose labels show the most classes (each at least 2% of the window), then
/// the largest smallest class among them; the first such start on a 4-voxel grid.
fn pick_window(labels: &Labels, window: [usize; 3], classes: usize) -> [usize; 3] {
    let starts = |a: usize| (0..=labels.shape[a] - window[a]).step_by(4);
    let mut best = (0usize, 0usize, [0usize; 3]);
    for i0 in starts(0) {
        for j0 in starts(1) {
            for k0 in starts(2) {
                let mut counts = vec![0usize; classes];
                for i in i0..i0 + window[0] {
                    for j in j0..j0 + window[1] {
                        let row = (i * labels.shape[1] + j) * labels.shape[2];
                        for &l in &labels.data[row + k0..row + k0 + window[2]] {
                            counts[l as usize] += 1;
                        }
                    }
                }
                let enough = window.iter().product::<usize>() / 50;
                let present: Vec<usize> = counts.into_iter().filter(|&c| c >= enough).collect();
                let score = (present.len(), present.iter().copied().min().unwrap_or(0));
                if score > (best.0, best.1) {
                    best = (score.0, score.1, [i0, j0, k0]);
                }
            }
        }
    }
    best.2
}

fn cut<T: Copy>(v: &Volume<T>, start: [usize; 3], window: [usize; 3]) -> Vec<T> {
    let mut out = Vec::with_capacity(window.iter().product());
    for i in start[0]..start[0] + window[0] {
        for j in start[1]..start[1] + window[1] {
            let row = (i * v.shape[1] + j) * v.shape[2];
            out.extend_from_slice(&v.data[row + start[2]..row + start[2] + window[2]]);
        }
    }
    out
}

#[test]
fn firmware_fixtures_match_the_host_core() {
    let dir = firmware_dir();
    let model_path = dir.join("data/model.glmae");
    let bytes = std::fs::read(&model_path).unwrap_or_else(|e| panic!("{}: {e}", model_path.display()));
    let file = ModelFile::parse(&bytes).unwrap();
    let unetr = Unetr::new(&file).unwrap();

    // The trained model is the `tiny` preset with BTCV's 14 classes, int8 weights and calibrated
    // activation scales.
    let expected_config = UnetrConfig { out_channels: 14, ..testing_config() };
    assert_eq!(file.config, expected_config, "model.glmae is not make-model.sh's architecture");
    let names: Vec<&str> = file.preprocessing.class_names.iter().collect();
    assert_eq!(names, BTCV_CLASSES);
    assert!(unetr.has_int8(), "model.glmae should have int8 weights and activation scales");
    let window = file.config.vit.img_size.map(|s| s as usize);

    // The firmware's one arena holds either path's scratch (build.rs computes both from this file
    // with the same core); with the two label maps and a stack reserve it must fit every board's RAM.
    let scratch_len = unetr.segment_scratch_len(window).unwrap();
    let q = unetr.int8_scratch_len(window).unwrap();
    let arena_words = scratch_len.max(q.f32s + q.i32s + q.i8s.div_ceil(4));
    let voxels: usize = window.iter().product();
    let ram_needed = 4 * arena_words + 2 * voxels + RAM_RESERVE;
    eprintln!(
        "arena: f32 path {scratch_len} f32, integer path {q:?} ({} bytes); RAM needed {ram_needed}",
        q.bytes()
    );
    for board in ["memory-an386.x", "memory-an505.x", "memory-an547.x"] {
        let ram = ram_length(&dir.join(board));
        assert!(
            ram_needed <= ram,
            "{board}: the firmware needs {ram_needed} bytes of RAM, the board has {ram}"
        );
    }

    // The input: a phantom window preprocessed as the model's file says.
    let phantom = generate(PHANTOM_SEED, &PHANTOM);
    let affine = Affine::from_spacing(DECLARED_SPACING);
    // Rounded to whole HU as make-phantoms stores them (int16 NIfTI).
    let image = Volume::new(phantom.hu.iter().map(|v| v.round()).collect(), phantom.shape, affine);
    let truth = Volume::new(phantom.labels.clone(), phantom.shape, affine);
    let (image, truth) =
        Preprocessor::from_model(&file.preprocessing).apply_with_labels(&image, &truth).unwrap();
    let start = pick_window(&truth, window, names.len());
    let input = cut(&image, start, window);
    let truth = cut(&truth, start, window);

    let mut labels = vec![0u8; voxels];
    let mut scratch = vec![0.0; scratch_len];
    unetr.segment(&input, window, &mut labels, &mut scratch).unwrap();
    let mut labels_int8 = vec![0u8; voxels];
    let (mut f, mut i, mut b) = (vec![0f32; q.f32s], vec![0i32; q.i32s], vec![0i8; q.i8s]);
    let scratch = Int8Scratch { f32s: &mut f, i32s: &mut i, i8s: &mut b };
    unetr.segment_int8(&input, window, &mut labels_int8, scratch).unwrap();

    let count = |l: &[u8], c: usize| l.iter().filter(|&&v| v as usize == c).count();
    let dice = |l: &[u8], c: usize| {
        let both = l.iter().zip(&truth).filter(|&(&p, &t)| p as usize == c && t as usize == c).count();
        let (p, t) = (count(l, c), count(&truth, c));
        if p + t == 0 { 1.0 } else { 2.0 * both as f64 / (p + t) as f64 }
    };
    eprintln!("window at {start:?} of the preprocessed phantom {:?}", image.shape);
    let same = labels.iter().zip(&labels_int8).filter(|(a, b)| a == b).count();
    eprintln!("int8 labels identical to f32 on {same} of {voxels} voxels");
    for (c, name) in names.iter().enumerate() {
        let (d, dq) = (dice(&labels, c), dice(&labels_int8, c));
        eprintln!(
            "class {c:2} ({name}): phantom {}, f32 {} (Dice {d:.4}), int8 {} (Dice {dq:.4})",
            count(&truth, c),
            count(&labels, c),
            count(&labels_int8, c)
        );
        assert!(dq >= d - DICE_TOLERANCE, "class {c} ({name}): int8 Dice {dq:.4} vs f32 {d:.4}");
    }
    let shown = (0..names.len()).filter(|&c| count(&labels, c) > 0 && count(&truth, c) > 0).count();
    assert!(shown >= 3, "the window shows only {shown} classes both in the phantom and the prediction");

    let input_bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    let files = [
        ("input.f32", input_bytes),
        ("expected_labels.u8", labels),
        ("expected_labels_int8.u8", labels_int8),
        ("phantom_labels.u8", truth),
    ];
    let data = dir.join("data");
    if std::env::var_os("GLMAE_BLESS").is_some() {
        for (name, bytes) in &files {
            std::fs::write(data.join(name), bytes).unwrap();
        }
        eprintln!("wrote {} fixtures to {}", files.len(), data.display());
    }
    for (name, bytes) in &files {
        let path = data.join(name);
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(committed == *bytes, "{} is stale: regenerate with GLMAE_BLESS=1", path.display());
    }
}
