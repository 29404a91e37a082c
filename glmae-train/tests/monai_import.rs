//! A MONAI UNETR exported by `scripts/monai_reference.py` and imported by us gives MONAI's output
//! on the same input, whether it comes as safetensors, a `torch.save` state dict (zip or legacy
//! container), a GL-MAE authors'-style `{"student": {"module.backbone.*": ...}, "teacher": ...}`
//! checkpoint, a trainer's `{"state_dict", "optimizer", "epoch"}` checkpoint or a MONAI bundle
//! (`configs/inference.json` + `models/model.pt`, with its preprocessing). Needs python3
//! with torch, monai, einops and safetensors; without them the test says so and passes, unless
//! `GLMAE_REQUIRE_MONAI=1`.

use std::process::Command;

use glmae_core::format::{OwnedPreprocessing, Precision};
use glmae_train::io::import::{ImportOptions, import_unetr, model_bytes, read_tensors};

#[path = "../../scripts/rust/monai_reference.rs"]
mod monai_reference;
use monai_reference::run_monai_script;

#[test]
fn imported_monai_unetr_reproduces_monai_output() {
    let dir = std::env::temp_dir().join(format!("glmae-monai-{}", std::process::id()));
    if !run_monai_script("monai_reference.py", &dir) {
        return;
    }
    let opts = ImportOptions { num_heads: 2, layer_norm_eps: 1e-5 };
    let io = read_tensors(&dir.join("io.safetensors")).unwrap();
    let expected = &io["logits"].values;
    let reference = logits(&dir.join("unetr.safetensors"), &opts, &io["input"].values);
    let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = reference.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max) / scale;
    eprintln!("MONAI vs glmae-core: max relative error {err:.2e}");
    assert!(err < 1e-4, "imported model differs from MONAI by {err}");

    // Every PyTorch variant imports to the very same weights, hence the same logits.
    for file in ["unetr.pt", "unetr_legacy.pt", "unetr_student.pth", "unetr_state_dict.pt"] {
        let got = logits(&dir.join(file), &opts, &io["input"].values);
        assert!(got == reference, "{file} imports to other logits than unetr.safetensors");
        eprintln!("{file}: same logits as unetr.safetensors");
    }

    // A MONAI bundle around the same weights: `import BUNDLE` reads the heads, window and
    // inference transforms from configs/inference.json (through `@` references), the class names
    // from configs/metadata.json, and gives the same logits with no flag.
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(bundle.join("models")).unwrap();
    std::fs::create_dir_all(bundle.join("configs")).unwrap();
    std::fs::copy(dir.join("unetr.pt"), bundle.join("models/model.pt")).unwrap();
    let inference = r#"{
        "imports": ["$import glob"],
        "roi": [32, 32, 32],
        "network_def": {"_target_": "UNETR", "in_channels": 1, "out_channels": 3, "img_size": "@roi",
                        "feature_size": 4, "hidden_size": 24, "mlp_dim": 48, "num_heads": 2, "qkv_bias": false},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "LPS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [0.8, 0.8, 3.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
             "b_min": 0.0, "b_max": 1.0, "clip": true}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi", "sw_batch_size": 4, "overlap": 0.5}
    }"#;
    std::fs::write(bundle.join("configs/inference.json"), inference).unwrap();
    let metadata = r#"{"network_data_format": {"outputs": {"pred": {"channel_def":
        {"0": "background", "1": "liver", "2": "tumour"}}}}}"#;
    std::fs::write(bundle.join("configs/metadata.json"), metadata).unwrap();
    let model_path = dir.join("bundle.glmae");
    let run = Command::new(env!("CARGO_BIN_EXE_glmae-train"))
        .arg("import")
        .arg(&bundle)
        .arg("--out")
        .arg(&model_path)
        .output()
        .unwrap();
    assert!(run.status.success(), "import of a bundle failed: {}", String::from_utf8_lossy(&run.stderr));
    let bytes = std::fs::read(&model_path).unwrap();
    let file = glmae_core::ModelFile::parse(&bytes).unwrap();
    let p = &file.preprocessing;
    assert_eq!(p.orientation, "LPS");
    assert_eq!(p.target_spacing, [0.8, 0.8, 3.0]);
    assert_eq!((p.intensity.a_min, p.intensity.a_max, p.intensity.clip), (-57.0, 164.0, true));
    assert!(!p.foreground_crop, "the bundle has no CropForegroundd");
    assert_eq!(p.class_names.iter().collect::<Vec<_>>(), ["background", "liver", "tumour"]);
    let model = glmae_core::Unetr::new(&file).unwrap();
    let window = [32, 32, 32];
    let mut out = vec![0.0; model.logits_len(window)];
    let mut scratch = vec![0.0; model.scratch_len(window).unwrap()];
    model.forward(&io["input"].values, window, &mut out, &mut scratch).unwrap();
    assert!(out == reference, "the bundle imports to other logits than unetr.safetensors");
    eprintln!("bundle: {}", String::from_utf8_lossy(&run.stdout).trim());

    // A state dict with a tensor removed and one renamed is refused with both named.
    let mut all = read_tensors(&dir.join("unetr.safetensors")).unwrap();
    all.remove("decoder3.conv_block.conv2.conv.weight");
    let mut moved = all.remove("encoder2.blocks.1.1.conv1.conv.weight").unwrap();
    moved.name = "encoder2.blocks.1.1.conv9.conv.weight".into();
    all.insert(moved.name.clone(), moved);
    let bytes: Vec<Vec<u8>> =
        all.values().map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = all
        .values()
        .zip(&bytes)
        .map(|(t, b)| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b).unwrap(),
            )
        })
        .collect();
    let broken = dir.join("broken.safetensors");
    std::fs::write(&broken, safetensors::serialize(views, None).unwrap()).unwrap();
    let e = format!("{:#}", import_unetr(&broken, &opts).unwrap_err());
    assert!(e.contains("missing `decoder3.conv_block.conv2.conv.weight`"), "{e}");
    assert!(e.contains("missing `encoder2.blocks.1.1.conv1.conv.weight`"), "{e}");
    assert!(e.contains("unexpected `encoder2.blocks.1.1.conv9.conv.weight`"), "{e}");

    // A checkpoint without any float tensor is an error that says so.
    let empty = dir.join("empty.pt");
    let made = Command::new("python3")
        .args(["-c", "import sys, torch; torch.save({'epoch': 3, 'step': torch.tensor(5)}, sys.argv[1])"])
        .arg(&empty)
        .status()
        .unwrap();
    assert!(made.success());
    let e = format!("{:#}", import_unetr(&empty, &opts).unwrap_err());
    assert!(e.contains("no floating-point tensors"), "{e}");
    // Neither format: refused, naming both.
    let junk = dir.join("junk.pt");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    let e = format!("{:#}", import_unetr(&junk, &opts).unwrap_err());
    assert!(e.contains("neither safetensors nor a readable PyTorch checkpoint"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Imports `path` and runs glmae-core's forward pass on `input` (one 32^3 window).
fn logits(path: &std::path::Path, opts: &ImportOptions, input: &[f32]) -> Vec<f32> {
    let (cfg, tensors) = import_unetr(path, opts).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    assert_eq!((cfg.vit.hidden_size, cfg.feature_size, cfg.out_channels), (24, 4, 3));
    let bytes = model_bytes(cfg, OwnedPreprocessing::for_classes(3), Precision::F32, &tensors).unwrap();
    let file = glmae_core::ModelFile::parse(&bytes).unwrap();
    let model = glmae_core::Unetr::new(&file).unwrap();
    let window = [32, 32, 32];
    let mut out = vec![0.0; model.logits_len(window)];
    let mut scratch = vec![0.0; model.scratch_len(window).unwrap()];
    model.forward(input, window, &mut out, &mut scratch).unwrap();
    out
}
