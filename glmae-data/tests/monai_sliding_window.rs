//! Sliding-window inference gives MONAI 1.6's `sliding_window_inference` output: window
//! placement, zero padding of axes shorter than the ROI (half before), Gaussian and constant
//! blending, on odd shapes. `scripts/monai_sliding_window.py` runs MONAI with a model whose logits
//! depend on the window-local position, so a window placed one voxel off changes the output.
//! Needs python3 with torch and monai; without them the test says so and passes, unless
//! `GLMAE_REQUIRE_MONAI=1`.

use std::path::Path;

#[path = "../../scripts/rust/monai_reference.rs"]
mod monai_reference;
use monai_reference::run_monai_script;

use glmae_data::sliding_window::{Blend, WindowSpec, sliding_window};

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// The script's model: class 0 = 2 x input + 0.01 x k, class 1 = -input + 0.02 x j (window-local).
fn model(w: &[f32], roi: [usize; 3]) -> Vec<f32> {
    let rn = w.len();
    let mut out = vec![0.0f32; 2 * rn];
    for i in 0..roi[0] {
        for j in 0..roi[1] {
            for k in 0..roi[2] {
                let v = (i * roi[1] + j) * roi[2] + k;
                out[v] = 2.0 * w[v] + 0.01 * k as f32;
                out[rn + v] = -w[v] + 0.02 * j as f32;
            }
        }
    }
    out
}

#[test]
fn sliding_window_matches_monai() {
    let dir = std::env::temp_dir().join(format!("glmae-monai-sw-{}", std::process::id()));
    if !run_monai_script("monai_sliding_window.py", &dir) {
        return;
    }
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 6);
    for (n, case) in cases.iter().enumerate() {
        let arr = |key: &str| -> [usize; 3] {
            let v: Vec<usize> = serde_json::from_value(case[key].clone()).unwrap();
            [v[0], v[1], v[2]]
        };
        let (shape, roi) = (arr("shape"), arr("roi"));
        let overlap = case["overlap"].as_f64().unwrap();
        let blend = if case["mode"] == "gaussian" { Blend::Gaussian } else { Blend::Constant };
        let image = read_f32(&dir.join(format!("case{n}.in.f32")));
        let expected = read_f32(&dir.join(format!("case{n}.out.f32")));
        let spec = WindowSpec { roi, overlap, blend };
        let got = sliding_window(&image, 1, shape, &spec, 2, |w| Ok(model(w, roi))).unwrap();
        assert_eq!(got.len(), expected.len(), "case {n}");
        let err = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        eprintln!(
            "case {n}: shape {shape:?}, roi {roi:?}, overlap {overlap}, {blend:?}: max |diff| {err:.2e}"
        );
        assert!(err < 1e-5, "case {n} ({shape:?} in {roi:?}, {blend:?}) differs from MONAI by {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
