//! The burn UNETR and glmae-core's reference forward pass agree on the same weights: the trainer's
//! parameters export by name into a `.glmae` file that the core runs.

use burn::tensor::{Device, Tensor, TensorData};
use glmae_core::format::{ModelBuilder, OwnedPreprocessing, Precision};
use glmae_core::{ModelFile, testing_config};
use glmae_train::unetr::Unetr;

fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

#[test]
fn burn_unetr_and_core_forward_agree() {
    let cfg = testing_config();
    let device = Device::flex();
    device.seed(7);
    let model = Unetr::new(&cfg, &device);
    let window = [32usize, 48, 16];
    let n: usize = window.iter().product();
    let input: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let x = Tensor::<5>::from_data(
        TensorData::new(input.clone(), [1, 1, window[0], window[1], window[2]]),
        &device,
    );
    let burn_logits = model.forward(x).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();

    let named = model.named_tensors(&cfg).unwrap();
    for precision in [Precision::F32, Precision::Int8] {
        let bytes = ModelBuilder::from_params(cfg, OwnedPreprocessing::for_classes(3), precision, |p| {
            named.iter().find(|t| t.name == p.name.as_str()).map(|t| t.values.as_slice())
        })
        .unwrap()
        .to_bytes()
        .unwrap();
        let file = ModelFile::parse(&bytes).unwrap();
        let core = glmae_core::Unetr::new(&file).unwrap();
        let mut logits = vec![0.0; core.logits_len(window)];
        let mut scratch = vec![0.0; core.scratch_len(window).unwrap()];
        core.forward(&input, window, &mut logits, &mut scratch).unwrap();
        let err = relative_error(&logits, &burn_logits);
        eprintln!("{precision:?}: max |core - burn| / max |burn| = {err:.2e}");
        let tolerance = if precision == Precision::F32 { 1e-4 } else { 0.05 };
        assert!(err < tolerance, "{precision:?}: relative error {err}");
    }
    assert_eq!(named.len(), glmae_core::params::param_count(&cfg), "export misses or adds parameters");
}
