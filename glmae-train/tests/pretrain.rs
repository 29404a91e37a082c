//! GL-MAE pretraining on tiny configurations: masking, the loss terms, the EMA teacher and that
//! training learns.

use burn::tensor::{Device, Tensor, TensorData};
use glmae_data::transforms::Rng;
use glmae_train::pretrain::loss::{ConsistencyConfig, consistency, masked_mse, teacher_probs};
use glmae_train::pretrain::{Ablation, PretrainConfig, Pretrainer, make_sample};

mod common;
use common::{first_and_last_five, params, phantom_volume, reconstruction_losses};

fn device() -> Device {
    Device::flex().autodiff()
}

fn t3(v: Vec<f32>, s: [usize; 3]) -> Tensor<3> {
    Tensor::from_data(TensorData::new(v, s), &device())
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_scalar::<f32>() as f64
}

#[test]
fn reconstruction_loss_counts_masked_patches_only() {
    // 1 view, 4 tokens of 2 values; tokens 1 and 3 are masked.
    let target = t3(vec![0.0; 8], [1, 4, 2]);
    let mask = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 1.0, 0.0, 1.0], [1, 4]), &device());
    let pred = t3(vec![9.0, 9.0, 1.0, 3.0, -7.0, 7.0, 2.0, 2.0], [1, 4, 2]);
    // Masked tokens: mean((1,3)^2) = 5, mean((2,2)^2) = 4 -> 4.5; visible errors are ignored.
    let loss = scalar(masked_mse(pred, target.clone(), mask.clone(), false));
    assert!((loss - 4.5).abs() < 1e-6, "{loss}");
    let pred_visible_changed = t3(vec![0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 2.0, 2.0], [1, 4, 2]);
    assert!((scalar(masked_mse(pred_visible_changed, target, mask, false)) - 4.5).abs() < 1e-6);
}

#[test]
fn consistency_matches_a_hand_computation() {
    let d = device();
    // One volume, 1 teacher global view, 2 student views, 3-way distributions.
    let teacher = Tensor::<2>::from_data(TensorData::new(vec![0.2f32, 0.1, -0.3], [1, 3]), &d);
    let center = Tensor::<1>::from_data(TensorData::new(vec![0.05f32, 0.0, -0.05], [3]), &d);
    let student = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.0, -1.0, 0.3, 0.2, 0.1], [2, 3]), &d);
    let cfg = ConsistencyConfig::default();
    let p_t = teacher_probs(teacher, center, cfg.tau_teacher);
    let got = scalar(consistency(p_t, student, 1, cfg.tau_student));
    let softmax = |x: [f64; 3]| {
        let m = x.iter().cloned().fold(f64::MIN, f64::max);
        let e = x.map(|v| (v - m).exp());
        let s: f64 = e.iter().sum();
        e.map(|v| v / s)
    };
    let pt = softmax([(0.2 - 0.05) / 0.04, 0.1 / 0.04, (-0.3 + 0.05) / 0.04]);
    let mut expected = 0.0;
    for s in [[1.0, 0.0, -1.0], [0.3, 0.2, 0.1]] {
        let ps = softmax(s.map(|v: f64| v / 0.1));
        expected += -(0..3).map(|i| pt[i] * ps[i].ln()).sum::<f64>() / 2.0;
    }
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
}

#[test]
fn teacher_follows_the_ema_formula() {
    let mut cfg = PretrainConfig::for_tests();
    cfg.teacher_momentum = 0.9; // large steps make a wrong formula visible
    cfg.steps = 4;
    let mut run = Pretrainer::new(cfg.clone(), device());
    let vol = phantom_volume(1);
    let mut expected: Vec<Vec<f32>> = params(&run.teacher);
    assert_eq!(
        expected,
        params(&run.student.vit).into_iter().chain(params(&run.student.head)).collect::<Vec<_>>()
    );
    let mut rng = Rng::new(3);
    for k in 0..3 {
        let m = cfg.momentum_at(k) as f32;
        run.step(&[make_sample(&cfg, &vol, &mut rng)]);
        let student: Vec<Vec<f32>> =
            params(&run.student.vit).into_iter().chain(params(&run.student.head)).collect();
        for (e, s) in expected.iter_mut().zip(&student) {
            for (a, b) in e.iter_mut().zip(s) {
                *a = m * *a + (1.0 - m) * b;
            }
        }
        let teacher = params(&run.teacher);
        for (i, (e, t)) in expected.iter().zip(&teacher).enumerate() {
            let err = e.iter().zip(t).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-5, "step {k}, parameter {i}: teacher differs from the EMA by {err}");
        }
    }
    assert!(cfg.momentum_at(0) == 0.9 && (cfg.momentum_at(4) - 1.0).abs() < 1e-12);
}

#[test]
fn ablations_use_the_terms_they_name() {
    let vol = phantom_volume(2);
    for (ablation, global, consistency) in [
        (Ablation::LocalOnly, false, false),
        (Ablation::GlobalLocal, true, false),
        (Ablation::Full, true, true),
    ] {
        let mut cfg = PretrainConfig::for_tests();
        cfg.ablation = ablation;
        let mut run = Pretrainer::new(cfg.clone(), device());
        let m = run.step(&[make_sample(&cfg, &vol, &mut Rng::new(0))]);
        assert_eq!(m.rec_global > 0.0, global, "{ablation:?}");
        assert_eq!(m.consistency > 0.0, consistency, "{ablation:?}");
        assert!(m.rec_local > 0.0);
        let sum = m.rec_global + m.rec_local + cfg.lambda * m.consistency;
        assert!((m.loss - sum).abs() < 1e-4 * sum.max(1.0), "{ablation:?}: {} vs {sum}", m.loss);
    }
}

#[test]
fn loss_falls_on_phantom_data() {
    let mut cfg = PretrainConfig::for_tests();
    cfg.steps = 40;
    cfg.batch_size = 2;
    let mut run = Pretrainer::new(cfg.clone(), device());
    let losses = reconstruction_losses(&mut run, &cfg, &[phantom_volume(3), phantom_volume(4)]);
    let (first, last) = first_and_last_five(&losses);
    eprintln!("reconstruction loss: first 5 steps {first:.4}, last 5 steps {last:.4}");
    assert!(last < 0.7 * first, "reconstruction loss did not fall: {first} -> {last}");
}

#[test]
fn resuming_from_a_checkpoint_continues_exactly() {
    use glmae_train::pretrain::run::RunDir;
    let root = std::env::temp_dir().join(format!("glmae-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = RunDir::create(&root).unwrap();
    let mut cfg = PretrainConfig::for_tests();
    cfg.steps = 6;
    dir.save_config(&cfg).unwrap();
    let vol = phantom_volume(5);
    let sample = |step: usize| vec![make_sample(&cfg, &vol, &mut Rng::for_item(cfg.seed, step as u64))];

    let mut run = Pretrainer::new(cfg.clone(), device());
    for s in 0..3 {
        run.step(&sample(s));
    }
    dir.save_checkpoint(&run).unwrap();
    let uninterrupted: Vec<f64> = (3..5).map(|s| run.step(&sample(s)).loss).collect();

    let mut resumed = dir.resume(device()).unwrap();
    assert_eq!(resumed.step, 3);
    let after_resume: Vec<f64> = (3..5).map(|s| resumed.step(&sample(s)).loss).collect();
    assert_eq!(uninterrupted, after_resume, "a resumed run diverges from the uninterrupted one");

    // A damaged checkpoint is refused with its path in the message: cut in half, or one bit
    // flipped anywhere (in the weights it used to resume silently with other losses).
    let ck = dir.checkpoint_path();
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", dir.resume(device()).err().unwrap());
    assert!(e.contains("checkpoint.bin") && e.contains("damaged"), "{e}");
    for at in [20, bytes.len() / 3, bytes.len() / 2, bytes.len() - 10] {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x10;
        std::fs::write(&ck, &flipped).unwrap();
        let e = format!("{:#}", dir.resume(device()).err().unwrap());
        assert!(e.contains("checkpoint.bin") && e.contains("checksum mismatch"), "bit flip at {at}: {e}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// Every float parameter of a module with its path (`vit.blocks.0.attn.qkv.weight`).
fn named_params(m: &impl burn::module::Module) -> Vec<(String, Vec<f32>)> {
    #[derive(Default)]
    struct C {
        path: Vec<String>,
        out: Vec<(String, Vec<f32>)>,
    }
    impl burn::module::ModuleVisitor for C {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
            let v = p.val().to_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            self.out.push((self.path.join("."), v));
        }
    }
    let mut c = C::default();
    m.visit(&mut c);
    c.out
}

/// The default learning-rate rule trains: the paper's 1e-2 read as MAE's base rate gives ViT-T
/// at batch 2 a peak of 1e-2 x 2 / 256 = 7.8e-5 (the old 1.5e-4 base gave 1.2e-6), and `lr`
/// overrides the rule with an absolute rate.
#[test]
fn default_learning_rate_is_the_base_rule_and_lr_overrides_it() {
    for cfg in [PretrainConfig::vit_t(), PretrainConfig::vit_b()] {
        assert_eq!(cfg.batch_size, 2);
        assert!(cfg.peak_lr() >= 5e-5, "default peak lr {} at batch 2 barely trains", cfg.peak_lr());
        assert!((cfg.peak_lr() - 1e-2 * 2.0 / 256.0).abs() < 1e-15);
        assert!((cfg.lr_at(cfg.warmup_steps) - cfg.peak_lr()).abs() < 1e-15);
    }
    let mut cfg = PretrainConfig::vit_t();
    cfg.lr = Some(3e-4);
    assert_eq!(cfg.peak_lr(), 3e-4);
    assert!((cfg.lr_at(cfg.warmup_steps) - 3e-4).abs() < 1e-15);
}

/// AdamW decays weight matrices only: one step from the same initialisation and sample with
/// weight decay 0.5 and with 0 leaves every bias, LayerNorm parameter and the mask token
/// identical, and changes every weight matrix.
#[test]
fn weight_decay_spares_biases_norms_and_the_mask_token() {
    let vol = phantom_volume(2);
    let after_one_step = |wd: f64| {
        let mut cfg = PretrainConfig::for_tests();
        cfg.weight_decay = wd;
        cfg.warmup_steps = 0; // a full-size step makes the decay visible in f32
        let mut run = Pretrainer::new(cfg.clone(), device());
        run.step(&[make_sample(&cfg, &vol, &mut Rng::new(0))]);
        named_params(&run.student)
    };
    let (decayed, plain) = (after_one_step(0.5), after_one_step(0.0));
    assert_eq!(decayed.len(), plain.len());
    // Decoupled decay multiplies a parameter by 1 - lr * wd (here 1 - 2e-3) on top of the same
    // Adam update; threaded reductions make the two runs differ by float rounding (~1e-7).
    let rel = |a: &[f32], b: &[f32]| {
        let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum();
        d / b.iter().map(|y| y.abs()).sum::<f32>().max(1e-12)
    };
    let (mut weights, mut others) = (0, 0);
    for ((name, a), (_, b)) in decayed.iter().zip(&plain) {
        let r = rel(a, b);
        if name.ends_with(".weight") {
            weights += 1;
            assert!(r > 1e-3, "{name}: weight matrix not decayed (relative change {r:e})");
        } else {
            others += 1;
            assert!(r < 1e-5, "{name}: decayed (relative change {r:e}), but only weight matrices should be");
        }
    }
    assert!(others >= 10 && weights >= 10, "{others} others, {weights} weights");
    assert!(decayed.iter().any(|(n, _)| n.ends_with("mask_token")));
    assert!(decayed.iter().any(|(n, _)| n.ends_with("gamma")));
}

/// Linear layers start as in MAE: xavier-uniform weights (bound sqrt(6 / (fan_in + fan_out)))
/// and zero biases, not burn's U(+-1/sqrt(fan_in)) on both.
#[test]
fn linear_layers_are_initialised_as_mae() {
    let cfg = PretrainConfig::for_tests();
    let run = Pretrainer::new(cfg, device());
    let params = named_params(&run.student);
    let qkv = &params.iter().find(|(n, _)| n == "vit.blocks.0.attn.qkv.weight").unwrap().1;
    let (fan_in, fan_out) = (12.0f32, 36.0f32);
    let bound = (6.0 / (fan_in + fan_out)).sqrt();
    let max = qkv.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max <= bound && max > 0.8 * bound, "max |w| {max}, xavier bound {bound}");
    for (name, v) in params.iter().filter(|(n, _)| n.ends_with(".bias")) {
        assert!(v.iter().all(|&b| b == 0.0), "{name} is not zero at initialisation");
    }
}

/// The collapse watch fires on identical inputs: every volume of every step is the same
/// sample with one global view, so the teacher's distributions are identical across the batch
/// and MI = 0; after 100 such steps the watch warns, and metrics.csv carries h_cond, h_marg
/// and mi.
#[test]
fn collapse_watch_fires_on_identical_inputs() {
    use glmae_train::pretrain::loss::CollapseWatch;
    use glmae_train::pretrain::run::RunDir;
    let mut cfg = PretrainConfig::for_tests();
    cfg.steps = 100;
    cfg.batch_size = 2;
    cfg.views.n_global = 1;
    let vol = phantom_volume(3);
    let sample = make_sample(&cfg, &vol, &mut Rng::new(1));
    let root = std::env::temp_dir().join(format!("glmae-collapse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = RunDir::create(&root).unwrap();
    let mut run = Pretrainer::new(cfg.clone(), device());
    let mut watch = CollapseWatch::default();
    let mut fired = None;
    for _ in 0..cfg.steps {
        let m = run.step(&[sample.clone(), sample.clone()]);
        dir.append_metrics(&m, 0.0).unwrap();
        assert!(m.collapse.mi < 1e-3, "step {}: identical inputs, yet MI {}", m.step, m.collapse.mi);
        if let Some(w) = watch.observe(m.step, &m.collapse) {
            fired.get_or_insert((m.step, w));
        }
    }
    let (step, warning) = fired.expect("the watch never fired on identical inputs");
    assert_eq!(step, 99, "{warning}");
    assert!(warning.contains("collapsed"), "{warning}");
    let csv = std::fs::read_to_string(dir.metrics_path()).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    for col in ["h_cond", "h_marg", "mi"] {
        assert!(header.contains(&col), "metrics.csv lacks {col}: {header:?}");
    }
    dir.plot_losses().unwrap();
    assert!(std::fs::metadata(root.join("loss.png")).unwrap().len() > 1000);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A configuration a run cannot train with is refused with the reason before the first step
/// (zero local views crashed burn with a segmentation fault).
#[test]
fn impossible_configurations_are_refused() {
    let mut cfg = PretrainConfig::for_tests();
    cfg.validate().unwrap();
    cfg.views.n_local = 0;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("local view"), "{e}");
    let mut cfg = PretrainConfig::for_tests();
    cfg.views.mask_ratio = 1.0;
    assert!(cfg.validate().unwrap_err().to_string().contains("mask ratio"));
    let mut cfg = PretrainConfig::for_tests();
    cfg.lr = Some(f64::NAN);
    assert!(cfg.validate().unwrap_err().to_string().contains("learning rate"));
}

/// On varied inputs the collapse watch stays healthy: with the head's input batch-normalised
/// (`--head-batch-norm`), two different phantoms per step keep the teacher's mutual information
/// above 0.3 nats (of at most ln 4 for 4 teacher views) after a 20-step warm-up, and the watch
/// never fires. With the paper's plain head the same run collapses to uniform
/// (docs/experiments.md, "Consistency collapse").
#[test]
fn collapse_watch_stays_healthy_on_varied_inputs() {
    use glmae_train::pretrain::loss::CollapseWatch;
    let mut cfg = PretrainConfig::for_tests();
    cfg.steps = 60;
    cfg.batch_size = 2;
    cfg.head.batch_norm = true;
    let vols: Vec<_> = (10..16).map(phantom_volume).collect();
    let mut run = Pretrainer::new(cfg.clone(), device());
    let mut watch = CollapseWatch::new(0.05, 20);
    let mut late = Vec::new();
    for step in 0..cfg.steps {
        let mut rng = Rng::for_item(cfg.seed, step as u64);
        let a = rng.below(vols.len());
        let b = (a + 1 + rng.below(vols.len() - 1)) % vols.len();
        let m = run.step(&[make_sample(&cfg, &vols[a], &mut rng), make_sample(&cfg, &vols[b], &mut rng)]);
        assert!(watch.observe(m.step, &m.collapse).is_none(), "watch fired at step {step}: {m:?}");
        if step >= 20 {
            late.push(m.collapse.mi);
        }
    }
    let mean = late.iter().sum::<f64>() / late.len() as f64;
    let min = late.iter().copied().fold(f64::INFINITY, f64::min);
    eprintln!("teacher MI after warm-up: mean {mean:.3}, min {min:.3} nats");
    assert!(mean > 0.3, "teacher MI {mean:.3} nats after warm-up: collapsed on varied inputs");
}

/// `pretrain --out RUN` on a folder that holds a run is refused (it used to start from scratch
/// over it), naming --resume and --overwrite; with --overwrite the check passes. With --resume,
/// configuration flags are refused.
#[test]
fn pretrain_refuses_to_start_over_an_existing_run() {
    let root = std::env::temp_dir().join(format!("glmae-pretrain-exists-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = glmae_train::pretrain::run::RunDir::create(&root).unwrap();
    dir.save_config(&PretrainConfig::for_tests()).unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_glmae-train"))
            .args(["pretrain", "--model", "tiny", "--data", "no-such-dataset.json", "--out"])
            .arg(&root)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("already holds a pretraining run"), "{err}");
    assert!(err.contains("--resume") && err.contains("--overwrite"), "{err}");
    let o = run(&["--overwrite"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("already holds"), "{err}");
    assert!(err.contains("no-such-dataset.json"), "{err}");
    // A flag that would change a resumed run's configuration is refused, not ignored.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_glmae-train"))
        .args(["pretrain", "--steps", "50", "--resume"])
        .arg(&root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--steps") && err.contains("--resume"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
