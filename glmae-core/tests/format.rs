//! The weight file: round trips, and every kind of damage rejected with a precise error.

use glmae_core::format::{FormatError, ModelBuilder, OwnedPreprocessing, Precision, TensorProblem, crc32};
use glmae_core::params::{for_each_param, param_count};
use glmae_core::synthetic::{random_model, random_params};
use glmae_core::{ModelFile, testing_config};

fn tiny_model(precision: Precision) -> Vec<u8> {
    random_model(&testing_config(), 7, precision).unwrap()
}

/// Rewrites the stored checksum so that damage inside the payload reaches the parser.
fn reseal(bytes: &mut [u8]) {
    let crc = crc32(&bytes[20..]);
    bytes[16..20].copy_from_slice(&crc.to_le_bytes());
}

fn builder_with(skip: Option<&str>, reshape: Option<&str>) -> ModelBuilder {
    let cfg = testing_config();
    let mut b = ModelBuilder::new(cfg, OwnedPreprocessing::for_classes(3));
    for (p, v) in random_params(&cfg, 3) {
        if Some(p.name.as_str()) == skip {
            continue;
        }
        let mut dims = p.shape.dims().to_vec();
        if Some(p.name.as_str()) == reshape {
            dims[0] += 1;
            let n: u32 = dims.iter().product();
            b.push(&p.name, &dims, &vec![0.5; n as usize], None);
        } else {
            b.push(&p.name, &dims, &v, None);
        }
    }
    b
}

#[test]
fn round_trip_keeps_config_metadata_and_values() {
    let cfg = testing_config();
    let bytes = tiny_model(Precision::F32);
    let file = ModelFile::parse(&bytes).unwrap();
    assert_eq!(file.config, cfg);
    assert_eq!(file.tensor_count(), param_count(&cfg));
    assert_eq!(file.preprocessing.orientation, "RAS");
    assert_eq!(file.preprocessing.target_spacing, [1.5, 1.5, 2.0]);
    let names: Vec<&str> = file.preprocessing.class_names.iter().collect();
    assert_eq!(names, ["background", "class 1", "class 2"]);
    for ((p, v), (name, t)) in random_params(&cfg, 7).iter().zip(file.tensors()) {
        assert_eq!(p.name.as_str(), name);
        assert_eq!(p.shape, t.shape());
        assert!(v.iter().enumerate().all(|(i, x)| t.get(i) == *x), "{name} changed");
    }
}

#[test]
fn int8_stores_matrices_quantised_and_vectors_exact() {
    let cfg = testing_config();
    let bytes = tiny_model(Precision::Int8);
    let file = ModelFile::parse(&bytes).unwrap();
    let f32_size = tiny_model(Precision::F32).len();
    assert!(bytes.len() * 3 < f32_size, "int8 file {} vs f32 {f32_size}", bytes.len());
    for ((p, v), (_, t)) in random_params(&cfg, 7).iter().zip(file.tensors()) {
        let quantised = p.kind.channel_axis().is_some();
        assert_eq!(t.is_int8(), quantised, "{}", p.name);
        let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        for (i, x) in v.iter().enumerate() {
            // Rounding to the nearest of 255 levels: error at most half a step of the channel.
            let tol = if quantised { max / 127.0 * 0.5 + 1e-7 } else { 0.0 };
            assert!((t.get(i) - x).abs() <= tol, "{} [{i}]", p.name);
        }
    }
}

#[test]
fn wrong_magic_version_and_short_files_are_named() {
    let good = tiny_model(Precision::F32);
    assert_eq!(ModelFile::parse(b"").unwrap_err(), FormatError::TooShort { len: 0 });
    assert_eq!(ModelFile::parse(&good[..10]).unwrap_err(), FormatError::TooShort { len: 10 });
    let mut bad = good.clone();
    bad[1] = b'X';
    assert_eq!(ModelFile::parse(&bad).unwrap_err(), FormatError::BadMagic);
    assert_eq!(ModelFile::parse(b"PK\x03\x04 this is a zip file").unwrap_err(), FormatError::BadMagic);
    let mut v2 = good.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(ModelFile::parse(&v2).unwrap_err(), FormatError::UnsupportedVersion { found: 2 });
    let msg = ModelFile::parse(&v2).unwrap_err().to_string();
    assert!(msg.contains("version 2"), "{msg}");
}

#[test]
fn every_truncation_is_an_error() {
    let good = tiny_model(Precision::Int8);
    for len in (0..good.len()).step_by(97).chain([good.len() - 1]) {
        let e = ModelFile::parse(&good[..len]).unwrap_err();
        assert!(matches!(e, FormatError::TooShort { .. } | FormatError::Truncated { .. }), "len {len}: {e}");
    }
    let mut longer = good.clone();
    longer.push(0);
    assert_eq!(ModelFile::parse(&longer).unwrap_err(), FormatError::TrailingBytes { extra: 1 });
}

#[test]
fn corruption_fails_the_checksum() {
    let good = tiny_model(Precision::Int8);
    for at in (20..good.len()).step_by(1013) {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        assert!(matches!(ModelFile::parse(&bad).unwrap_err(), FormatError::Checksum { .. }), "byte {at}");
    }
}

#[test]
fn resealed_damage_is_an_error_never_a_panic() {
    // With the checksum recomputed, damage reaches the decoder and the consistency checks.
    let good = tiny_model(Precision::Int8);
    let mut rng = glmae_core::synthetic::SplitMix64::new(0x1234_5678);
    let mut rejected = 0;
    for _ in 0..400 {
        let state = rng.next_u64();
        let mut bad = good.clone();
        // Damage the metadata (config, preprocessing, first tensor header), where a byte changes
        // structure rather than a weight value.
        let at = 20 + (state >> 33) as usize % 96;
        bad[at] = (state >> 13) as u8;
        reseal(&mut bad);
        if ModelFile::parse(&bad).is_err() {
            rejected += 1;
        }
    }
    assert!(rejected > 200, "only {rejected} of 400 structural changes were rejected");
}

#[test]
fn missing_unexpected_duplicate_and_misshapen_tensors_are_named() {
    let e = builder_with(Some("vit.blocks.5.attn.qkv.weight"), None).to_bytes().unwrap_err();
    assert_eq!(
        e,
        FormatError::Tensor {
            name: "vit.blocks.5.attn.qkv.weight".try_into().unwrap(),
            problem: TensorProblem::Missing
        }
    );
    assert!(e.to_string().contains("vit.blocks.5.attn.qkv.weight"));

    let e = builder_with(None, Some("decoder3.conv_block.conv1.conv.weight")).to_bytes().unwrap_err();
    match e {
        FormatError::Tensor { name, problem: TensorProblem::Shape { expected, found } } => {
            assert_eq!(name.as_str(), "decoder3.conv_block.conv1.conv.weight");
            assert_eq!(expected.dims(), &[8, 16, 3, 3, 3]);
            assert_eq!(found.dims(), &[9, 16, 3, 3, 3]);
        }
        other => panic!("{other}"),
    }

    let mut b = builder_with(None, None);
    b.push("decoder9.transp_conv.conv.weight", &[2, 2], &[0.0; 4], None);
    let e = b.to_bytes().unwrap_err();
    assert_eq!(
        e,
        FormatError::Tensor {
            name: "decoder9.transp_conv.conv.weight".try_into().unwrap(),
            problem: TensorProblem::Unexpected
        }
    );

    let mut b = builder_with(None, None);
    b.push("vit.norm.bias", &[24], &[0.0; 24], None);
    let e = b.to_bytes().unwrap_err();
    assert_eq!(
        e,
        FormatError::Tensor { name: "vit.norm.bias".try_into().unwrap(), problem: TensorProblem::Duplicate }
    );
}

#[test]
fn non_finite_weights_and_bad_metadata_are_rejected() {
    let cfg = testing_config();
    let mut b = ModelBuilder::new(cfg, OwnedPreprocessing::for_classes(3));
    for (p, mut v) in random_params(&cfg, 3) {
        if p.name == "encoder1.layer.conv2.conv.weight" {
            v[17] = f32::NAN;
        }
        b.push(&p.name, p.shape.dims(), &v, None);
    }
    let e = b.to_bytes().unwrap_err();
    assert_eq!(
        e,
        FormatError::Tensor {
            name: "encoder1.layer.conv2.conv.weight".try_into().unwrap(),
            problem: TensorProblem::NonFinite { index: 17 }
        }
    );

    let params = random_params(&cfg, 3);
    let lookup = |s: &glmae_core::params::ParamSpec| {
        params.iter().find(|(p, _)| p.name == s.name).map(|(_, v)| v.as_slice())
    };
    let mut prep = OwnedPreprocessing::for_classes(4);
    let e =
        ModelBuilder::from_params(cfg, prep.clone(), Precision::F32, lookup).unwrap().to_bytes().unwrap_err();
    assert!(e.to_string().contains("4 class names for 3 output channels"), "{e}");
    prep.class_names.pop();
    prep.orientation = "RAR".into();
    let e =
        ModelBuilder::from_params(cfg, prep.clone(), Precision::F32, lookup).unwrap().to_bytes().unwrap_err();
    assert!(e.to_string().contains("orientation"), "{e}");
    prep.orientation = "LPS".into();
    prep.target_spacing[2] = 0.0;
    let e = ModelBuilder::from_params(cfg, prep, Precision::F32, lookup).unwrap().to_bytes().unwrap_err();
    assert!(e.to_string().contains("spacing"), "{e}");

    let mut bad_cfg = cfg;
    bad_cfg.vit.num_heads = 5;
    let mut names = Vec::new();
    for_each_param(&bad_cfg, |p| names.push(p.name));
    let e = ModelBuilder::new(bad_cfg, OwnedPreprocessing::for_classes(3)).to_bytes().unwrap_err();
    assert!(e.to_string().contains("num_heads 5"), "{e}");
}
