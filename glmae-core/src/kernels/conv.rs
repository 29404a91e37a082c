//! Direct 3-D convolution and transposed convolution with cubic kernels.

use super::{Dims3, voxels};
use crate::tensor::Tensor;

/// Cubic kernel size, stride and zero padding of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Kernel edge.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
}

impl ConvGeometry {
    /// 3x3x3, stride 1, padding 1: UNETR's residual-block convolution.
    pub const K3: Self = Self { kernel: 3, stride: 1, padding: 1 };
    /// 1x1x1: the residual projection and the output layer.
    pub const K1: Self = Self { kernel: 1, stride: 1, padding: 0 };
    /// 2x2x2, stride 2: UNETR's transposed upsampling.
    pub const UP2: Self = Self { kernel: 2, stride: 2, padding: 0 };
}

/// Output size of [`conv3d`].
pub fn conv_output_dims(input: Dims3, g: ConvGeometry) -> Dims3 {
    input.map(|i| (i + 2 * g.padding - g.kernel) / g.stride + 1)
}

/// Output size of [`conv_transpose3d`].
pub fn conv_transpose_output_dims(input: Dims3, g: ConvGeometry) -> Dims3 {
    input.map(|i| (i - 1) * g.stride + g.kernel - 2 * g.padding)
}

/// Output positions `o` in `0..out_len` whose input `o * stride + tap - padding` lies in
/// `0..in_len`.
fn valid_outputs(out_len: usize, in_len: usize, tap: usize, g: ConvGeometry) -> core::ops::Range<usize> {
    let lo = g.padding.saturating_sub(tap).div_ceil(g.stride);
    let hi_in = in_len + g.padding; // exclusive bound of o * stride + tap
    let hi = if hi_in > tap { (hi_in - tap - 1) / g.stride + 1 } else { 0 };
    lo..hi.min(out_len)
}

/// Conv3d: `input` is `(in_ch, dims)`, `weight` is `(out_ch, in_ch, k, k, k)`, `out` receives
/// `(out_ch, conv_output_dims(dims, g))`. Loops are ordered tap-outermost so each weight is
/// decoded once and the innermost loop runs along a contiguous row.
pub fn conv3d(
    input: &[f32],
    dims: Dims3,
    weight: &Tensor<'_>,
    bias: Option<&Tensor<'_>>,
    g: ConvGeometry,
    out: &mut [f32],
) {
    let w = weight.shape();
    let (out_ch, in_ch, k) = (w.dims()[0] as usize, w.dims()[1] as usize, g.kernel);
    let od = conv_output_dims(dims, g);
    let (on, inn) = (voxels(od), voxels(dims));
    for co in 0..out_ch {
        let oc = &mut out[co * on..(co + 1) * on];
        oc.fill(bias.map_or(0.0, |b| b.get(co)));
        for ci in 0..in_ch {
            let ic = &input[ci * inn..(ci + 1) * inn];
            for tz in 0..k {
                for ty in 0..k {
                    for tx in 0..k {
                        let wv = weight.get((((co * in_ch + ci) * k + tz) * k + ty) * k + tx);
                        for oz in valid_outputs(od[0], dims[0], tz, g) {
                            let iz = oz * g.stride + tz - g.padding;
                            for oy in valid_outputs(od[1], dims[1], ty, g) {
                                let iy = oy * g.stride + ty - g.padding;
                                let orow = &mut oc[(oz * od[1] + oy) * od[2]..][..od[2]];
                                let irow = &ic[(iz * dims[1] + iy) * dims[2]..][..dims[2]];
                                for ox in valid_outputs(od[2], dims[2], tx, g) {
                                    orow[ox] += wv * irow[ox * g.stride + tx - g.padding];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// ConvTranspose3d without bias: `input` is `(in_ch, dims)`, `weight` is
/// `(in_ch, out_ch, k, k, k)` as PyTorch stores it, `out` receives
/// `(out_ch, conv_transpose_output_dims(dims, g))`.
pub fn conv_transpose3d(input: &[f32], dims: Dims3, weight: &Tensor<'_>, g: ConvGeometry, out: &mut [f32]) {
    let w = weight.shape();
    let (in_ch, out_ch, k) = (w.dims()[0] as usize, w.dims()[1] as usize, g.kernel);
    let od = conv_transpose_output_dims(dims, g);
    let (on, inn) = (voxels(od), voxels(dims));
    out[..out_ch * on].fill(0.0);
    for co in 0..out_ch {
        let oc = &mut out[co * on..(co + 1) * on];
        for ci in 0..in_ch {
            let ic = &input[ci * inn..(ci + 1) * inn];
            for tz in 0..k {
                for ty in 0..k {
                    for tx in 0..k {
                        let wv = weight.get((((ci * out_ch + co) * k + tz) * k + ty) * k + tx);
                        // Input i reaches output o = i * stride + tap - padding.
                        for iz in 0..dims[0] {
                            let Some(oz) = (iz * g.stride + tz).checked_sub(g.padding).filter(|&o| o < od[0])
                            else {
                                continue;
                            };
                            for iy in 0..dims[1] {
                                let Some(oy) =
                                    (iy * g.stride + ty).checked_sub(g.padding).filter(|&o| o < od[1])
                                else {
                                    continue;
                                };
                                let orow = &mut oc[(oz * od[1] + oy) * od[2]..][..od[2]];
                                let irow = &ic[(iz * dims[1] + iy) * dims[2]..][..dims[2]];
                                for (ix, &v) in irow.iter().enumerate() {
                                    if let Some(ox) =
                                        (ix * g.stride + tx).checked_sub(g.padding).filter(|&o| o < od[2])
                                    {
                                        orow[ox] += wv * v;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{f32_tensor_bytes, lcg_vec, tensor};

    fn idx(d: Dims3, c: usize, z: usize, y: usize, x: usize) -> usize {
        ((c * d[0] + z) * d[1] + y) * d[2] + x
    }

    /// Conv3d straight from the definition, in f64, over every output and every tap.
    fn conv_ref(x: &[f32], d: Dims3, w: &[f32], ci: usize, co: usize, g: ConvGeometry) -> Vec<f64> {
        let k = g.kernel;
        let od = conv_output_dims(d, g);
        let mut out = vec![0.0; co * voxels(od)];
        for o in 0..co {
            for (z, y, xx) in
                (0..od[0]).flat_map(|z| (0..od[1]).flat_map(move |y| (0..od[2]).map(move |x| (z, y, x))))
            {
                let mut s = 0.0f64;
                for c in 0..ci {
                    for (a, b, e) in
                        (0..k).flat_map(|a| (0..k).flat_map(move |b| (0..k).map(move |e| (a, b, e))))
                    {
                        let (iz, iy, ix) = (
                            (z * g.stride + a) as isize - g.padding as isize,
                            (y * g.stride + b) as isize - g.padding as isize,
                            (xx * g.stride + e) as isize - g.padding as isize,
                        );
                        if iz < 0
                            || iy < 0
                            || ix < 0
                            || iz >= d[0] as isize
                            || iy >= d[1] as isize
                            || ix >= d[2] as isize
                        {
                            continue;
                        }
                        s += w[(((o * ci + c) * k + a) * k + b) * k + e] as f64
                            * x[idx(d, c, iz as usize, iy as usize, ix as usize)] as f64;
                    }
                }
                out[idx(od, o, z, y, xx)] = s;
            }
        }
        out
    }

    #[test]
    fn conv3d_matches_definition_for_unetr_and_odd_geometries() {
        let d = [5, 4, 6];
        for g in [
            ConvGeometry::K3,
            ConvGeometry::K1,
            ConvGeometry { kernel: 3, stride: 2, padding: 1 },
            ConvGeometry { kernel: 2, stride: 2, padding: 0 },
        ] {
            let (ci, co) = (3, 2);
            let x = lcg_vec(ci * voxels(d), 1, 1.0);
            let w = lcg_vec(co * ci * g.kernel.pow(3), 2, 0.5);
            let wb = f32_tensor_bytes(&w);
            let k = g.kernel as u32;
            let wt = tensor(&wb, &[co as u32, ci as u32, k, k, k]);
            let od = conv_output_dims(d, g);
            let mut out = vec![f32::NAN; co * voxels(od)];
            conv3d(&x, d, &wt, None, g, &mut out);
            let r = conv_ref(&x, d, &w, ci, co, g);
            for (i, (a, b)) in out.iter().zip(&r).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-5, "{g:?} output {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn conv_transpose3d_matches_scatter_definition() {
        let d = [2, 3, 2];
        for g in [ConvGeometry::UP2, ConvGeometry { kernel: 3, stride: 2, padding: 1 }] {
            let (ci, co, k) = (3, 2, g.kernel);
            let x = lcg_vec(ci * voxels(d), 7, 1.0);
            let w = lcg_vec(ci * co * k.pow(3), 8, 0.5);
            let wb = f32_tensor_bytes(&w);
            let wt = tensor(&wb, &[ci as u32, co as u32, k as u32, k as u32, k as u32]);
            let od = conv_transpose_output_dims(d, g);
            let mut out = vec![f32::NAN; co * voxels(od)];
            conv_transpose3d(&x, d, &wt, g, &mut out);
            // Scatter every input through every tap, in f64.
            let mut r = vec![0.0f64; out.len()];
            for c in 0..ci {
                for o in 0..co {
                    for (z, y, xx) in
                        (0..d[0]).flat_map(|z| (0..d[1]).flat_map(move |y| (0..d[2]).map(move |x| (z, y, x))))
                    {
                        for (a, b, e) in
                            (0..k).flat_map(|a| (0..k).flat_map(move |b| (0..k).map(move |e| (a, b, e))))
                        {
                            let p = |i: usize, t: usize| (i * g.stride + t) as isize - g.padding as isize;
                            let (oz, oy, ox) = (p(z, a), p(y, b), p(xx, e));
                            if oz < 0
                                || oy < 0
                                || ox < 0
                                || oz >= od[0] as isize
                                || oy >= od[1] as isize
                                || ox >= od[2] as isize
                            {
                                continue;
                            }
                            r[idx(od, o, oz as usize, oy as usize, ox as usize)] +=
                                w[(((c * co + o) * k + a) * k + b) * k + e] as f64
                                    * x[idx(d, c, z, y, xx)] as f64;
                        }
                    }
                }
            }
            for (i, (a, b)) in out.iter().zip(&r).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-5, "{g:?} output {i}: {a} vs {b}");
            }
        }
    }
}
