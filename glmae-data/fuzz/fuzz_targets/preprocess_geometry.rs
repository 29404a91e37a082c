//! Any affine (12 floats), grid shape and target spacing through the preprocessing and back:
//! an error or a consistent result, never a panic. Grids above 2^22 voxels are left to the unit
//! tests (`grids_too_large_or_spacings_not_finite_are_errors`): they would only hit the fuzzer's
//! memory cap (so are grids whose intermediate passes exceed it: `resample_peak_voxels`).
#![no_main]

use glmae_data::preprocess::{AxisMap, Preprocessor, spacing_grid};
use glmae_data::{Affine, Volume};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if bytes.len() < 3 + 15 * 4 + 1 {
        return;
    }
    let shape = [bytes[0], bytes[1], bytes[2]].map(|b| (b % 24) as usize + 1);
    let f = |i: usize| f32::from_le_bytes(bytes[3 + 4 * i..7 + 4 * i].try_into().unwrap()) as f64;
    let mut m = [[0.0; 4]; 4];
    for r in 0..3 {
        for c in 0..4 {
            m[r][c] = f(r * 4 + c);
        }
    }
    m[3][3] = 1.0;
    let affine = Affine(m);
    let target = [f(12) as f32, f(13) as f32, f(14) as f32];
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 100.0 } else { -1000.0 }).collect();
    let image = Volume::new(data, shape, affine);
    // The grid is computed after reorientation, as the preprocessing does.
    let Ok(map) = AxisMap::to_codes(&affine, "RAS") else { return };
    let oriented = map.apply(&image);
    let Ok(grid) = spacing_grid(oriented.shape, &oriented.affine, target.map(f64::from)) else { return };
    let peak = glmae_data::resample::resample_peak_voxels(oriented.shape, grid.shape.map(|x| x as f64));
    if peak > (1 << 22) as f64 {
        return;
    }
    let mut p = Preprocessor::btcv();
    p.spacing = target;
    p.foreground_crop = bytes[3 + 60] & 1 == 1;
    if let Ok((model_grid, inverse)) = p.apply(&image) {
        assert_eq!(model_grid.shape, inverse.model_shape());
        let scores = vec![0.5f32; 2 * model_grid.voxels()];
        let labels = inverse.argmax_to_source(&scores, 2, 1).unwrap();
        assert_eq!(labels.len(), n);
    }
});
