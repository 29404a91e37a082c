//! GL-MAE pretraining on tiny configurations: masking, the loss terms, the EMA teacher and that
//! training learns.

use burn::tensor::{Device, Tensor, TensorData};
use glmae_data::transforms::Rng;
use glmae_train::loss::{ConsistencyConfig, consistency, masked_mse};
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
    let got = scalar(consistency(teacher, center, student, 1, &cfg));
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
    let mut cfg = PretrainConfig::tiny();
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
        let mut cfg = PretrainConfig::tiny();
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
    let mut cfg = PretrainConfig::tiny();
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
    use glmae_train::run::RunDir;
    let root = std::env::temp_dir().join(format!("glmae-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = RunDir::create(&root).unwrap();
    let mut cfg = PretrainConfig::tiny();
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

    // A damaged checkpoint is refused with its path in the message.
    let ck = dir.checkpoint_path();
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", dir.resume(device()).err().unwrap());
    assert!(e.contains("checkpoint.bin") && e.contains("truncated"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}
