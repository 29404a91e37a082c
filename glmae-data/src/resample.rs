//! Axis-aligned resampling: output voxel `o` along an axis reads input position
//! `o * step + offset` (clamped to the border, as MONAI's default padding mode).

use crate::volume::{Affine, Labels, Volume};

/// Where output voxels fall on the input grid, per axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Output shape.
    pub shape: [usize; 3],
    /// Input voxels per output voxel.
    pub step: [f64; 3],
    /// Input position of output voxel 0.
    pub offset: [f64; 3],
}

impl Sampling {
    /// Keep voxel 0's centre in place and change the spacing by `step` (MONAI's `Spacingd`).
    pub fn respace(shape: [usize; 3], step: [f64; 3]) -> Self {
        Self { shape, step, offset: [0.0; 3] }
    }

    /// Stretch `input` voxels onto `shape` voxels edge to edge (`interpolate` with
    /// `align_corners=False`, MONAI's `Resize`).
    pub fn resize(input: [usize; 3], shape: [usize; 3]) -> Self {
        let step: [f64; 3] = std::array::from_fn(|a| input[a] as f64 / shape[a] as f64);
        Self { shape, step, offset: std::array::from_fn(|a| 0.5 * step[a] - 0.5) }
    }

    /// The output grid's affine given the input's.
    pub fn affine(&self, input: &Affine) -> Affine {
        let mut m = Affine::from_spacing(self.step);
        for a in 0..3 {
            m.0[a][3] = self.offset[a];
        }
        input.compose(&m)
    }
}

/// The two input taps and the upper one's weight for each of `m` output positions along an axis
/// of `n` input voxels (position `o * step + offset`, the border repeated): the one definition of
/// linear interpolation, shared by [`resample_linear`] and the streamed inversion
/// (`preprocess::Inverse::argmax_to_source`).
pub(crate) fn linear_taps(n: usize, m: usize, step: f64, offset: f64) -> Vec<(usize, usize, f32)> {
    (0..m)
        .map(|o| {
            let x = (o as f64 * step + offset).clamp(0.0, (n - 1) as f64);
            let lo = x.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            (lo, hi, (x - lo as f64) as f32)
        })
        .collect()
}

/// Linear interpolation along one axis of a row-major block: `outer x n x inner` to
/// `outer x m x inner`.
fn linear_axis(
    src: &[f32],
    outer: usize,
    n: usize,
    inner: usize,
    m: usize,
    step: f64,
    offset: f64,
) -> Vec<f32> {
    let mut out = vec![0.0f32; outer * m * inner];
    let taps = linear_taps(n, m, step, offset);
    for b in 0..outer {
        let s = &src[b * n * inner..(b + 1) * n * inner];
        let d = &mut out[b * m * inner..(b + 1) * m * inner];
        for (o, &(lo, hi, w)) in taps.iter().enumerate() {
            let (a, c) = (&s[lo * inner..(lo + 1) * inner], &s[hi * inner..(hi + 1) * inner]);
            for ((dv, &av), &cv) in d[o * inner..(o + 1) * inner].iter_mut().zip(a).zip(c) {
                *dv = av + (cv - av) * w;
            }
        }
    }
    out
}

/// The most voxels per channel any pass of [`resample_linear`] holds for `input` voxels onto
/// `output` (axis 2 first, then 1, then 0): more than the output when one axis grows while the
/// others shrink. f64, so that absurd grids compare instead of overflowing.
pub fn resample_peak_voxels(input: [usize; 3], output: [f64; 3]) -> f64 {
    let [n0, n1, _] = input.map(|x| x as f64);
    let [m0, m1, m2] = output;
    (n0 * n1 * m2).max(n0 * m1 * m2).max(m0 * m1 * m2)
}

/// Trilinear resampling of every channel (three separable passes, exact trilinear).
pub fn resample_linear(v: &Volume, s: &Sampling) -> Volume {
    let [n0, n1, n2] = v.shape;
    let [m0, m1, m2] = s.shape;
    let mut data = Vec::with_capacity(v.channels * m0 * m1 * m2);
    for c in 0..v.channels {
        let x = linear_axis(v.channel(c), n0 * n1, n2, 1, m2, s.step[2], s.offset[2]);
        let x = linear_axis(&x, n0, n1, m2, m1, s.step[1], s.offset[1]);
        let x = linear_axis(&x, 1, n0, m1 * m2, m0, s.step[0], s.offset[0]);
        data.extend_from_slice(&x);
    }
    Volume { data, shape: s.shape, channels: v.channels, affine: s.affine(&v.affine) }
}

/// Nearest-neighbour resampling of a label map.
pub fn resample_labels(v: &Labels, s: &Sampling) -> Labels {
    let idx = |a: usize| -> Vec<usize> {
        (0..s.shape[a])
            .map(|o| {
                (o as f64 * s.step[a] + s.offset[a]).round().clamp(0.0, (v.shape[a] - 1) as f64) as usize
            })
            .collect()
    };
    let (i0, i1, i2) = (idx(0), idx(1), idx(2));
    let mut data = Vec::with_capacity(s.shape.iter().product());
    for &a in &i0 {
        for &b in &i1 {
            let row = v.index(a, b, 0);
            data.extend(i2.iter().map(|&c| v.data[row + c]));
        }
    }
    Volume { data, shape: s.shape, channels: 1, affine: s.affine(&v.affine) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trilinear value of `f` at a fractional position, from the definition.
    fn trilinear(v: &Volume, p: [f64; 3]) -> f64 {
        let mut acc = 0.0;
        for corner in 0..8 {
            let mut w = 1.0;
            let mut idx = [0usize; 3];
            for a in 0..3 {
                let x = p[a].clamp(0.0, (v.shape[a] - 1) as f64);
                let lo = x.floor();
                let bit = (corner >> a) & 1;
                idx[a] = ((lo as usize) + bit).min(v.shape[a] - 1);
                w *= if bit == 1 { x - lo } else { 1.0 - (x - lo) };
            }
            acc += w * v.data[v.index(idx[0], idx[1], idx[2])] as f64;
        }
        acc
    }

    #[test]
    fn separable_passes_equal_trilinear_interpolation() {
        let shape = [5, 7, 6];
        let data = (0..210).map(|i| ((i * 37) % 101) as f32).collect();
        let v = Volume::new(data, shape, Affine::from_spacing([1.0, 2.0, 3.0]));
        for s in [Sampling::respace([7, 9, 4], [0.6, 0.75, 1.4]), Sampling::resize(shape, [11, 3, 8])] {
            let r = resample_linear(&v, &s);
            for i in 0..s.shape[0] {
                for j in 0..s.shape[1] {
                    for k in 0..s.shape[2] {
                        let p = [i, j, k].map(|x| x as f64);
                        let p: [f64; 3] = std::array::from_fn(|a| p[a] * s.step[a] + s.offset[a]);
                        let got = r.data[r.index(i, j, k)] as f64;
                        assert!((got - trilinear(&v, p)).abs() < 1e-3, "{s:?} at {i},{j},{k}");
                    }
                }
            }
            // The affine places output voxel 0 where it sampled.
            let world = r.affine.apply([0.0; 3]);
            let expected = v.affine.apply(s.offset);
            assert!(world.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-9));
        }
    }

    #[test]
    fn nearest_keeps_label_values() {
        let v =
            Volume::new((0..24).map(|i| (i % 5) as u8).collect(), [2, 3, 4], Affine::from_spacing([1.0; 3]));
        let r = resample_labels(&v, &Sampling::respace([4, 6, 8], [0.5, 0.5, 0.5]));
        assert!(r.data.iter().all(|&l| l < 5));
        assert_eq!(r.data[r.index(2, 2, 2)], v.data[v.index(1, 1, 1)]);
    }
}
