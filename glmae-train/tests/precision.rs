//! Reduced precision: a device configured for bf16 keeps every parameter in bf16, a tiny GL-MAE
//! run still learns, and its checkpoint saves and resumes. (Its own test binary: burn fixes a
//! device's float type once per process.)

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Tensor};
use glmae_train::device::{ComputePrecision, training_devices};
use glmae_train::pretrain::run::RunDir;
use glmae_train::pretrain::{PretrainConfig, Pretrainer};

mod common;
use common::{first_and_last_five, phantom_volume, reconstruction_losses};

fn dtypes(m: &impl Module) -> Vec<DType> {
    struct C(Vec<DType>);
    impl ModuleVisitor for C {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.0.push(p.val().dtype());
        }
    }
    let mut c = C(Vec::new());
    m.visit(&mut c);
    c.0
}

#[test]
fn bf16_training_stores_bf16_and_learns() {
    let device = training_devices("cpu", ComputePrecision::Bf16).unwrap().remove(0);
    let mut cfg = PretrainConfig::for_tests();
    cfg.precision = ComputePrecision::Bf16;
    cfg.batch_size = 2;
    let mut run = Pretrainer::new(cfg.clone(), device.clone());
    assert!(dtypes(&run.student).iter().all(|d| *d == DType::BF16), "{:?}", dtypes(&run.student));
    let losses = reconstruction_losses(&mut run, &cfg, &[phantom_volume(3), phantom_volume(4)]);
    assert!(dtypes(&run.student).iter().all(|d| *d == DType::BF16), "parameters left bf16 after steps");
    let (first, last) = first_and_last_five(&losses);
    eprintln!("bf16 reconstruction loss: first 5 steps {first:.4}, last 5 steps {last:.4}");
    assert!(last < 0.7 * first, "bf16 reconstruction loss did not fall: {first} -> {last}");

    // Saving used to fail on a GPU with DTypeMismatch { expected: F32, actual: BF16 } (the
    // centre was read as f32): save, resume, and find the same state in bf16.
    let root = std::env::temp_dir().join(format!("glmae-bf16-{}", std::process::id()));
    let dir = RunDir::create(&root).unwrap();
    dir.save_config(&cfg).unwrap();
    dir.save_checkpoint(&run).unwrap();
    let back = dir.resume(device).unwrap();
    assert_eq!(back.step, run.step);
    assert!(dtypes(&back.student).iter().all(|d| *d == DType::BF16), "resumed parameters left bf16");
    let centre = |r: &Pretrainer| r.center.to_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    assert_eq!(centre(&back), centre(&run));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn precision_is_fixed_once_per_device() {
    // The first test (or this one) fixed the CPU device's float type; asking again for a different
    // one must be a clear error, not a silent mix of types.
    let _ = training_devices("cpu", ComputePrecision::Bf16);
    let e = training_devices("cpu", ComputePrecision::F16).unwrap_err().to_string();
    assert!(e.contains("precision must be chosen before"), "{e}");
}
