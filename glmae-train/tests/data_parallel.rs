//! Data-parallel pretraining gives the same run as one device on the whole batch. Both replicas
//! live on the CPU here: the arithmetic (shares, loss scaling, gradient sums, the centre, the
//! broadcast after each step) is what is checked; on GPUs only the devices change.

use burn::tensor::{Device, Tensor};
use glmae_data::Volume;
use glmae_data::transforms::Rng;
use glmae_train::pretrain::data_parallel::DataParallel;
use glmae_train::pretrain::{PretrainConfig, Pretrainer, make_sample};

mod common;
use common::{flat_params, phantom_volume};

fn device() -> Device {
    Device::flex().autodiff()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn two_replicas_follow_the_single_device_run() {
    let mut cfg = PretrainConfig::for_tests();
    cfg.batch_size = 4;
    cfg.steps = 3;
    // Clipping would hide a gradient off by a constant factor (and AdamW nearly does): keep it
    // off and compare the gradient norms too.
    cfg.grad_clip = 0.0;
    let vols: Vec<Volume> = (0..4).map(|i| phantom_volume(10 + i)).collect();
    let mut single = Pretrainer::new(cfg.clone(), device());
    // The same starting weights (tests running beside this one draw from the same CPU device
    // RNG, so two fresh inits with one seed may differ).
    let mut primary = Pretrainer::new(cfg.clone(), device());
    primary.student = single.student.clone();
    primary.teacher = single.teacher.clone();
    let mut parallel = DataParallel::new(&primary, &[device()]).unwrap();
    assert_eq!(parallel.world_size(), 2);
    for step in 0..cfg.steps {
        let mut rng = Rng::for_item(cfg.seed, step as u64);
        let samples: Vec<_> = vols.iter().map(|v| make_sample(&cfg, v, &mut rng)).collect();
        let a = single.step(&samples);
        let b = parallel.step(&mut primary, &samples).unwrap();
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-4 * x.abs().max(1.0);
        for (name, x, y) in [
            ("loss", a.loss, b.loss),
            ("rec global", a.rec_global, b.rec_global),
            ("rec local", a.rec_local, b.rec_local),
            ("consistency", a.consistency, b.consistency),
            ("gradient norm", a.grad_norm, b.grad_norm),
        ] {
            assert!(close(x, y), "step {step}: {name} {x} on one device, {y} data-parallel");
        }
    }
    assert_eq!(primary.step, cfg.steps);
    // AdamW divides by the root of the squared-gradient average, so where a gradient is near zero
    // the two summation orders can move a weight by up to about one learning rate (0.002 here)
    // in opposite directions; a replica out of sync would show in the losses above.
    let lr = cfg.lr_at(0) as f32;
    let d = max_diff(&flat_params(&single.student), &flat_params(&primary.student));
    assert!(d < lr, "students differ by {d}");
    let d = max_diff(&flat_params(&single.teacher), &flat_params(&primary.teacher));
    assert!(d < 0.01 * lr, "teachers differ by {d}");
    let c = |t: &Tensor<1>| t.to_data().try_to_vec::<f32>().unwrap();
    let d = max_diff(&c(&single.center), &c(&primary.center));
    assert!(d < 1e-6, "centres differ by {d}");
}

#[test]
fn uneven_batches_are_refused() {
    let mut cfg = PretrainConfig::for_tests();
    cfg.batch_size = 3;
    let primary = Pretrainer::new(cfg, device());
    let e = DataParallel::new(&primary, &[device()]).err().unwrap().to_string();
    assert!(e.contains("cannot be split evenly over 2 devices"), "{e}");
}
