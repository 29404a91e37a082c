//! The whole forward pass against logits computed independently in float64 numpy by
//! `scripts/golden_unetr.py` (regenerate with `python3 scripts/golden_unetr.py`).

use std::collections::HashMap;

use glmae_core::format::{ModelBuilder, OwnedPreprocessing, Precision};
use glmae_core::params::param_count;
use glmae_core::{ModelFile, PosEmbed, Unetr, UnetrConfig, VitConfig};
use safetensors::SafeTensors;

struct Golden {
    config: UnetrConfig,
    tensors: HashMap<String, Vec<f32>>,
}

fn load(name: &str) -> Golden {
    let path = format!("{}/tests/data/{name}.safetensors", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let c: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["config"]).unwrap();
    let u = |k: &str| c[k].as_u64().unwrap() as u32;
    let img: Vec<u32> =
        c["img_size"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let config = UnetrConfig {
        vit: VitConfig {
            in_channels: u("in_channels"),
            img_size: [img[0], img[1], img[2]],
            patch_size: 16,
            hidden_size: u("hidden_size"),
            depth: 12,
            num_heads: u("num_heads"),
            mlp_dim: u("mlp_dim"),
            qkv_bias: c["qkv_bias"].as_bool().unwrap(),
            layer_norm_eps: c["layer_norm_eps"].as_f64().unwrap() as f32,
            pos_embed: if c["pos_embed"] == "Learned" { PosEmbed::Learned } else { PosEmbed::SinCos },
        },
        feature_size: u("feature_size"),
        out_channels: u("out_channels"),
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (n, v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
        })
        .collect();
    Golden { config, tensors }
}

/// Builds our weight file from the golden parameters and runs the forward pass.
fn run(g: &Golden, precision: Precision) -> Vec<f32> {
    let prep = OwnedPreprocessing::for_classes(g.config.out_channels as usize);
    let bytes = ModelBuilder::from_params(g.config, prep, precision, |p| {
        g.tensors.get(p.name.as_str()).map(std::vec::Vec::as_slice)
    })
    .unwrap()
    .to_bytes()
    .unwrap();
    let file = ModelFile::parse(&bytes).unwrap();
    let model = Unetr::new(&file).unwrap();
    let window = g.config.vit.img_size.map(|s| s as usize);
    let mut logits = vec![0.0; model.logits_len(window)];
    let mut scratch = vec![0.0; model.scratch_len(window).unwrap()];
    model.forward(&g.tensors["__input__"], window, &mut logits, &mut scratch).unwrap();
    logits
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn labels(logits: &[f32], classes: usize) -> Vec<u8> {
    let mut out = vec![0u8; logits.len() / classes];
    glmae_core::kernels::argmax_channels(logits, classes, &mut out);
    out
}

fn check_case(name: &str) {
    let g = load(name);
    // The golden file holds exactly the model's parameters plus input and logits.
    assert_eq!(g.tensors.len(), param_count(&g.config) + 2, "{name}: parameter set differs from numpy's");
    let expected = &g.tensors["__logits__"];
    let got = run(&g, Precision::F32);
    let err = max_abs_diff(&got, expected);
    // f32 accumulation against float64: measured 1e-6-scale; 1e-4 leaves room across targets.
    assert!(err < 1e-4, "{name}: f32 forward differs from numpy by {err}");

    // int8 weights (per-output-channel scales): stated tolerance 5% of the logit range, and at
    // least 97% of voxels keep their label.
    let q = run(&g, Precision::Int8);
    let range = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let qerr = max_abs_diff(&q, expected);
    let classes = g.config.out_channels as usize;
    let (lf, lq) = (labels(expected, classes), labels(&q, classes));
    let agree = lf.iter().zip(&lq).filter(|(a, b)| a == b).count() as f64 / lf.len() as f64;
    eprintln!(
        "{name}: f32 max error {err:.2e}; int8 max error {qerr:.3e} of range {range:.3}, label agreement {:.4}",
        agree
    );
    assert!(qerr < 0.05 * range, "{name}: int8 error {qerr} exceeds 5% of {range}");
    assert!(agree >= 0.97, "{name}: int8 labels agree on only {agree}");
}

#[test]
fn sincos_unetr_matches_numpy() {
    check_case("golden_sincos");
}

#[test]
fn learned_position_unetr_matches_numpy() {
    check_case("golden_learned");
}
