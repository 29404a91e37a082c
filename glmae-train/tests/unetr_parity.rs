//! The burn UNETR and glmae-core's reference forward pass agree on the same weights: the trainer's
//! parameters export by name into a `.glmae` file that the core runs.

use burn::tensor::{Device, Tensor, TensorData};
use glmae_core::format::{OwnedPreprocessing, Precision};
use glmae_core::{ModelFile, testing_config};
use glmae_train::nets::unetr::Unetr;

fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

/// A `.glmae` file of `named` (3 classes).
fn model_file(
    cfg: glmae_core::UnetrConfig,
    named: &[glmae_train::nets::naming::NamedTensor],
    precision: Precision,
) -> Vec<u8> {
    glmae_train::io::import::model_bytes(cfg, OwnedPreprocessing::for_classes(3), precision, named).unwrap()
}

/// glmae-core's logits for `input` from the model file `bytes`.
fn core_logits(bytes: &[u8], input: &[f32], window: [usize; 3]) -> Vec<f32> {
    let file = ModelFile::parse(bytes).unwrap();
    let core = glmae_core::Unetr::new(&file).unwrap();
    let mut logits = vec![0.0; core.logits_len(window)];
    let mut scratch = vec![0.0; core.scratch_len(window).unwrap()];
    core.forward(input, window, &mut logits, &mut scratch).unwrap();
    logits
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
        let logits = core_logits(&model_file(cfg, &named, precision), &input, window);
        let err = relative_error(&logits, &burn_logits);
        eprintln!("{precision:?}: max |core - burn| / max |burn| = {err:.2e}");
        let tolerance = if precision == Precision::F32 { 1e-4 } else { 0.05 };
        assert!(err < tolerance, "{precision:?}: relative error {err}");
    }
    assert_eq!(named.len(), glmae_core::params::param_count(&cfg), "export misses or adds parameters");
}

/// A UNETR with MONAI's learned position table (an imported model): the burn forward pass uses the
/// table (the core, which reads it from the file, agrees; with the table scaled, burn's logits
/// change), and `Unetr::from_model_file` gives back every weight, so fine-tuning from the file
/// starts where the file is.
#[test]
fn learned_position_table_is_used_and_round_trips_through_a_model_file() {
    let mut cfg = testing_config();
    cfg.vit.pos_embed = glmae_core::PosEmbed::Learned;
    let window = cfg.vit.img_size.map(|s| s as usize);
    let device = Device::flex();
    device.seed(3);
    let mut model = Unetr::new(&cfg, &device);
    // A table large enough to matter next to the patch embedding's output.
    let table = model.position_embeddings.take().expect("a learned table");
    model.position_embeddings = Some(table.map(|t| t.mul_scalar(50.0)));
    let n: usize = window.iter().product();
    let input: Vec<f32> = (0..n).map(|i| ((i * 104729) % 997) as f32 / 997.0).collect();
    let forward = |m: &Unetr| {
        let x = Tensor::<5>::from_data(
            TensorData::new(input.clone(), [1, 1, window[0], window[1], window[2]]),
            &device,
        );
        m.forward(x).into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    };
    let burn_logits = forward(&model);

    let named = model.named_tensors(&cfg).unwrap();
    assert!(named.iter().any(|t| t.name == "vit.patch_embedding.position_embeddings"));
    let bytes = model_file(cfg, &named, Precision::F32);
    let file = ModelFile::parse(&bytes).unwrap();
    let logits = core_logits(&bytes, &input, window);
    let err = relative_error(&logits, &burn_logits);
    assert!(err < 1e-4, "core and burn disagree with a learned table: {err}");

    let loaded = Unetr::from_model_file(&file, &device).unwrap();
    assert_eq!(loaded.named_tensors(&cfg).unwrap(), named, "a weight changed on the way through the file");
    assert_eq!(forward(&loaded), burn_logits);

    // The sin-cos embedding in place of the table gives other logits: the table is what is used.
    let mut sincos = loaded;
    sincos.position_embeddings = None;
    assert!(relative_error(&forward(&sincos), &burn_logits) > 1e-3, "the table made no difference");
}
