//! What the pretraining tests share: a small preprocessed phantom, a network's parameters as
//! plain numbers, and a short tiny-config run.

#![allow(dead_code)] // each test binary uses its own subset

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use glmae_data::phantom::{PhantomConfig, generate};
use glmae_data::preprocess::Preprocessor;
use glmae_data::transforms::Rng;
use glmae_data::{Affine, Volume};
use glmae_train::pretrain::{PretrainConfig, Pretrainer, make_sample};

/// A 48 x 40 x 32 phantom at 6 mm, through pretraining's preprocessing.
pub fn phantom_volume(seed: u64) -> Volume {
    let p = generate(seed, &PhantomConfig { shape: [48, 40, 32], spacing: [6.0, 6.0, 7.5] });
    let v = Volume::new(p.hu, p.shape, Affine::from_spacing(p.spacing.map(f64::from)));
    let mut prep = Preprocessor::pretraining();
    prep.spacing = [6.0, 6.0, 7.5];
    prep.apply(&v).unwrap().0
}

/// Every float parameter of a module, flattened, in visiting order.
pub fn params(m: &impl Module) -> Vec<Vec<f32>> {
    struct C(Vec<Vec<f32>>);
    impl ModuleVisitor for C {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.0.push(p.val().to_data().convert::<f32>().try_to_vec::<f32>().unwrap());
        }
    }
    let mut c = C(Vec::new());
    m.visit(&mut c);
    c.0
}

/// All of a module's parameters as one vector.
pub fn flat_params(m: &impl Module) -> Vec<f32> {
    params(m).concat()
}

/// Runs `cfg.steps` steps on one sample per volume per step; checks every loss is finite and
/// returns the reconstruction loss (global + local) of each step.
pub fn reconstruction_losses(run: &mut Pretrainer, cfg: &PretrainConfig, vols: &[Volume]) -> Vec<f64> {
    (0..cfg.steps)
        .map(|step| {
            let mut rng = Rng::for_item(cfg.seed, step as u64);
            let samples: Vec<_> = vols.iter().map(|v| make_sample(cfg, v, &mut rng)).collect();
            let m = run.step(&samples);
            assert!(m.loss.is_finite(), "step {step}: loss {}", m.loss);
            m.rec_global + m.rec_local
        })
        .collect()
}

/// Mean of the first and of the last five values.
pub fn first_and_last_five(v: &[f64]) -> (f64, f64) {
    (v[..5].iter().sum::<f64>() / 5.0, v[v.len() - 5..].iter().sum::<f64>() / 5.0)
}
