//! The encoder probe: its classifiers and metrics on synthetic features, the patch labelling on a
//! hand-made label map, and a whole run (library and CLI) on a tiny pretraining run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use glmae_data::phantom::PhantomConfig;
use glmae_data::preprocess::Preprocessor;
use glmae_data::transforms::Rng;
use glmae_data::{Affine, Case, Volume, VolumeCache};
use glmae_train::pretrain::run::RunDir;
use glmae_train::pretrain::train::{LoopOptions, train_loop};
use glmae_train::pretrain::{PretrainConfig, Pretrainer};
use glmae_train::probe::{
    ProbeOptions, ProbeVolume, fit_linear, grid_offsets, knn_predict, patch_labels, probe_run, scores,
    standardise,
};

fn temp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("glmae-probe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn normal(rng: &mut Rng) -> f32 {
    // Box-Muller.
    let (u, v) = (rng.uniform().max(1e-12), rng.uniform());
    ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
}

/// `per_class` points of each of `classes` Gaussian clusters in `width` dimensions: class `c` is
/// centred at `separation` along axis `c` (0 everywhere when `separation` is 0); the other axes
/// hold noise 100 times larger, which swamps cosine similarity unless features are standardised.
fn clusters(
    classes: usize,
    per_class: usize,
    width: usize,
    separation: f32,
    rng: &mut Rng,
) -> (Vec<f32>, Vec<u8>) {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for i in 0..classes * per_class {
        // Interleaved classes, so no method can lean on the order.
        let c = i % classes;
        for j in 0..width {
            let mut v = normal(rng) + if j == c { separation } else { 0.0 };
            if j >= classes {
                v *= 100.0;
            }
            x.push(v);
        }
        y.push(c as u8);
    }
    (x, y)
}

/// Separable clusters, after standardisation, are classified perfectly by both k-NN and the linear
/// classifier (balanced accuracy and macro-F1 1.0); features that carry no label information (random labels on the
/// same points) score near chance (balanced accuracy 0.5 for two classes), so neither classifier
/// can see the evaluation labels.
#[test]
fn classifiers_separate_clusters_and_stay_at_chance_without_information() {
    let mut rng = Rng::new(7);
    let width = 8;
    let (mut fit_x, fit_y) = clusters(3, 60, width, 8.0, &mut rng);
    let (mut eval_x, eval_y) = clusters(3, 30, width, 8.0, &mut rng);
    standardise(&mut fit_x, &mut eval_x, width);
    let knn = scores(&eval_y, &knn_predict(&fit_x, &fit_y, &eval_x, width, 3, 20, 0.07), 3);
    let linear = scores(&eval_y, &fit_linear(&fit_x, &fit_y, width, 3, 300, 1e-4).predict(&eval_x), 3);
    for (name, s) in [("k-NN", &knn), ("linear", &linear)] {
        assert_eq!(s.balanced_accuracy, 1.0, "{name} on separable clusters: {s:?}");
        assert_eq!(s.macro_f1, 1.0, "{name} on separable clusters: {s:?}");
    }

    // The same kind of points, labels drawn independently of them.
    let (mut fit_x, _) = clusters(1, 400, width, 0.0, &mut rng);
    let (mut eval_x, _) = clusters(1, 400, width, 0.0, &mut rng);
    let fit_y: Vec<u8> = (0..400).map(|_| rng.below(2) as u8).collect();
    let eval_y: Vec<u8> = (0..400).map(|_| rng.below(2) as u8).collect();
    standardise(&mut fit_x, &mut eval_x, width);
    let knn = scores(&eval_y, &knn_predict(&fit_x, &fit_y, &eval_x, width, 2, 20, 0.07), 2);
    let linear = scores(&eval_y, &fit_linear(&fit_x, &fit_y, width, 2, 300, 1e-4).predict(&eval_x), 2);
    for (name, s) in [("k-NN", &knn), ("linear", &linear)] {
        assert!((s.balanced_accuracy - 0.5).abs() < 0.1, "{name} without information: {s:?}");
    }
}

/// The linear classifier's class-balanced loss: with 95% of the points in class 0 and a weak
/// signal for class 1, an unweighted fit would predict class 0 everywhere (balanced accuracy 0.5);
/// the balanced one finds class 1 too.
#[test]
fn linear_classifier_balances_rare_classes() {
    let mut rng = Rng::new(3);
    let make = |n: usize, rng: &mut Rng| {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = u8::from(i % 20 == 0);
            x.push(normal(rng) + if c == 1 { 1.5 } else { 0.0 });
            x.push(normal(rng));
            y.push(c);
        }
        (x, y)
    };
    let (mut fx, fy) = make(2000, &mut rng);
    let (mut ex, ey) = make(2000, &mut rng);
    standardise(&mut fx, &mut ex, 2);
    let s = scores(&ey, &fit_linear(&fx, &fy, 2, 2, 300, 1e-4).predict(&ex), 2);
    assert!(s.balanced_accuracy > 0.7, "{s:?}");
    assert!(s.recall[1].is_some_and(|r| r > 0.6), "the rare class is not found: {s:?}");
}

/// Balanced accuracy, macro-F1 and per-class F1 against a hand computation: classes absent from
/// the truth (even when predicted) have no F1 and do not enter the means.
#[test]
fn metrics_match_a_hand_computation() {
    let s = scores(&[0, 0, 0, 1, 1], &[0, 0, 1, 1, 2], 4);
    // Recall: class 0 2/3, class 1 1/2. F1: class 0 2*2/(3+2), class 1 2*1/(2+2).
    assert!((s.balanced_accuracy - (2.0 / 3.0 + 0.5) / 2.0).abs() < 1e-12, "{s:?}");
    assert!((s.macro_f1 - (0.8 + 0.5) / 2.0).abs() < 1e-12, "{s:?}");
    assert_eq!(s.f1[2], None);
    assert_eq!(s.f1[3], None);
    assert!((s.f1[0].unwrap() - 0.8).abs() < 1e-12);
}

/// Patch labels on a hand-made 9 x 8 x 8 map with 4^3 patches: the majority class when it covers
/// at least the minimum fraction (a tie goes to the lower class), no label below it, the partial
/// ninth slice dropped, and a shifted grid reading the voxels it covers.
#[test]
fn patches_take_their_majority_class_above_the_minimum_fraction() {
    let shape = [9, 8, 8];
    let mut data = vec![0u8; 9 * 64];
    let idx = |z: usize, y: usize, x: usize| (z * 8 + y) * 8 + x;
    for z in 0..4 {
        for y in 0..4 {
            for x in 0..4 {
                let n = (z * 4 + y) * 4 + x; // voxel number inside its patch, 0..64
                data[idx(z, y, x)] = 3; // patch (0, 0, 0): all class 3
                data[idx(z, y, 4 + x)] = if n < 40 { 2 } else { 1 }; // (0, 0, 1): 40 of 64 class 2
                data[idx(z, 4 + y, x)] = if n < 30 {
                    5
                } else if n < 50 {
                    1
                } else {
                    0
                }; // (0, 1, 0)
                data[idx(z, 4 + y, 4 + x)] = if n < 32 { 2 } else { 1 }; // (0, 1, 1): a tie
                data[idx(4 + z, y, x)] = 4; // (1, 0, 0)
            }
        }
    }
    // The ninth slice is a partial patch: dropped, whatever it holds.
    for v in &mut data[8 * 64..] {
        *v = 7;
    }
    let labels = Volume::new(data, shape, Affine::from_spacing([1.0; 3]));
    let (grid, l) = patch_labels(&labels, 4, [0; 3], 0.5);
    assert_eq!(grid, [2, 2, 2]);
    assert_eq!(l, vec![Some(3), Some(2), None, Some(1), Some(4), Some(0), Some(0), Some(0)]);
    // 30 of 64 voxels (0.47) is enough at 0.4.
    assert_eq!(patch_labels(&labels, 4, [0; 3], 0.4).1[2], Some(5));
    // Offset by 2 along the first axis: one patch layer, z 2..6; patch (0, 0, 0) is half class 3
    // (z 2..4) and half class 4 (z 4..6): a tie, class 3.
    let (grid, l) = patch_labels(&labels, 4, [2, 0, 0], 0.5);
    assert_eq!(grid, [1, 2, 2]);
    assert_eq!(l[0], Some(3));
    assert!(l.iter().all(|c| *c != Some(7)), "the partial slice was used");

    assert_eq!(grid_offsets(4, false), vec![[0; 3]]);
    let shifted = grid_offsets(4, true);
    assert_eq!(shifted.len(), 8);
    assert!(shifted.contains(&[2, 0, 2]) && shifted.contains(&[2, 2, 2]));

    // A volume smaller than one patch is refused, naming its file.
    let small = Volume::new(vec![0u8; 3 * 8 * 8], [3, 8, 8], Affine::from_spacing([1.0; 3]));
    let img = Volume::new(vec![0.0f32; 3 * 8 * 8], [3, 8, 8], Affine::from_spacing([1.0; 3]));
    let e = ProbeVolume::new(Path::new("tiny_case.nii.gz"), img, &small, 4, &ProbeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("tiny_case.nii.gz") && e.contains("smaller than one 4^3 patch"), "{e}");
}

/// A tiny pretraining run (tiny config, patch 4) on 24 x 24 x 16 phantoms: 4 training and 1
/// validation volumes.
fn tiny_run(root: &Path) -> (PathBuf, PathBuf) {
    let phantom = PhantomConfig { shape: [24, 24, 16], spacing: [14.0, 14.0, 20.0] };
    let data = root.join("phantoms");
    let ds = glmae_data::phantom_dataset::write_phantom_dataset(&data, 5, 0, &phantom, 2).unwrap();
    let run = root.join("run");
    let dir = RunDir::create(&run).unwrap();
    let mut cfg = PretrainConfig::for_tests();
    cfg.steps = 2;
    dir.save_config(&cfg).unwrap();
    let mut prep = Preprocessor::pretraining();
    prep.spacing = phantom.spacing;
    let cases: Vec<Case> = ds.training.iter().map(|c| Case { image: c.image.clone(), label: None }).collect();
    let cache = Arc::new(VolumeCache::new(prep, None));
    let mut pre = Pretrainer::new(cfg, Device::flex().autodiff());
    let opts = LoopOptions { checkpoint_every: 2, loader_threads: 1, progress: false };
    train_loop(&mut pre, &dir, &cases, cache, &opts).unwrap();
    (run, data.join("dataset.json"))
}

/// The whole probe on a tiny run, through the library and the CLI: probe.md and probe.json hold
/// both encoders measured on the same patches (equal supports, different scores), with BTCV class
/// names; a run folder without a checkpoint and a dataset without validation cases are refused
/// with errors naming them.
#[test]
fn probe_writes_both_encoders_side_by_side() {
    let root = temp("e2e");
    let (run, data) = tiny_run(&root);
    let out = root.join("probe");
    let opts = ProbeOptions { linear_steps: 100, ..ProbeOptions::default() };
    let r = probe_run(&run, &data, &out, &opts, None, &Device::flex()).unwrap();
    println!("{}", r.markdown);
    assert_eq!(r.pretrained.fit_support, r.random.fit_support);
    assert_eq!(r.pretrained.eval_support, r.random.eval_support);
    assert!(r.pretrained.fit_support[0] > 0 && r.pretrained.eval_support[0] > 0, "no background patch");
    assert!(r.pretrained.eval_support[1..].iter().any(|&n| n > 0), "no organ patch to score");
    assert_ne!(r.pretrained, r.random, "the random control is the pretrained encoder");
    assert_eq!(r.pretrained.width, 12);
    for s in [&r.pretrained.knn, &r.pretrained.linear, &r.random.knn, &r.random.linear] {
        assert!((0.0..=1.0).contains(&s.balanced_accuracy) && (0.0..=1.0).contains(&s.macro_f1), "{s:?}");
    }
    let md = std::fs::read_to_string(out.join("probe.md")).unwrap();
    assert_eq!(md, r.markdown);
    for needle in
        ["| background |", "| liver |", "k-NN F1 pretrained", "linear F1 random", "**balanced accuracy**"]
    {
        assert!(md.contains(needle), "probe.md lacks {needle:?}:\n{md}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("probe.json")).unwrap()).unwrap();
    for arm in ["pretrained", "random"] {
        let ba = json[arm]["knn"]["balanced_accuracy"].as_f64().unwrap();
        let expected = if arm == "pretrained" { &r.pretrained } else { &r.random };
        assert_eq!(ba, expected.knn.balanced_accuracy);
        assert_eq!(json[arm]["class_names"][6], "liver");
    }

    // The CLI prints the same table (the random control is seeded, so it is the same run).
    let cli_out = root.join("probe-cli");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_glmae-train"))
        .args(["probe", run.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out"])
        .arg(&cli_out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("**macro-F1**") && cli_out.join("probe.json").is_file(), "{stdout}");
    assert!(stdout.contains("of the student encoder"), "{stdout}");

    // `--teacher` probes the EMA teacher's encoder and says so; probe.json records the choice.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_glmae-train"))
        .args(["probe", run.to_str().unwrap(), "--data", data.to_str().unwrap(), "--teacher", "--out"])
        .arg(&cli_out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("of the teacher encoder"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cli_out.join("probe.json")).unwrap()).unwrap();
    assert_eq!(json["options"]["teacher"], true);

    // Errors name what is wrong.
    std::fs::remove_file(run.join("checkpoint.bin")).unwrap();
    let e = format!("{:#}", probe_run(&run, &data, &out, &opts, None, &Device::flex()).unwrap_err());
    assert!(e.contains("checkpoint.bin") && e.contains(run.to_str().unwrap()), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// A dataset without validation cases is refused, naming the dataset file, and so is one whose
/// cases have no labels, naming the image.
#[test]
fn datasets_without_validation_cases_or_labels_are_refused() {
    let root = temp("noval");
    std::fs::create_dir_all(&root).unwrap();
    let run = root.join("run");
    let dir = RunDir::create(&run).unwrap();
    dir.save_config(&PretrainConfig::for_tests()).unwrap();
    dir.save_checkpoint(&Pretrainer::new(PretrainConfig::for_tests(), Device::flex())).unwrap();
    let data = root.join("dataset.json");
    std::fs::write(
        &data,
        r#"{"labels": {"0": "background", "1": "liver"}, "training": [], "validation": []}"#,
    )
    .unwrap();
    let e = format!(
        "{:#}",
        probe_run(&run, &data, &root.join("out"), &ProbeOptions::default(), None, &Device::flex())
            .unwrap_err()
    );
    assert!(e.contains("dataset.json") && e.contains("no validation cases"), "{e}");
    std::fs::write(&data, r#"{"training": ["a.nii.gz"], "validation": [{"image": "b.nii.gz"}]}"#).unwrap();
    let e = format!(
        "{:#}",
        probe_run(&run, &data, &root.join("out"), &ProbeOptions::default(), None, &Device::flex())
            .unwrap_err()
    );
    assert!(e.contains("a.nii.gz has no label"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}
