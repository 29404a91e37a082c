//! The activations the integer forward pass stores as int8, and where their scales are.
//!
//! Each such tensor (a *point*) has one scale, `range / 127`, calibrated at export
//! (`glmae-train export --int8 --calibrate DATA`) from the largest magnitude the f32 reference
//! produced there on the calibration windows, and stored in the weight file as the f32 tensor
//! [`ACTIVATION_SCALES`]. The order, for a ViT of depth `d` (`D = 5 + 4 d`):
//!
//! ```text
//! 0                      the input window
//! 1 + 4 i + j            block i: j = 0 norm1 output, 1 attention output, 2 norm2 output,
//!                        3 GELU output (the inputs of qkv, out_proj, linear1, linear2)
//! 1 + 4 d + k            hidden state k as a volume (after blocks 3, 6, 9; the final norm)
//! D                      encoder1's first conv-norm-lrelu
//! D + 1 + 7 s + 0        skip path s (encoder2, 3, 4): transp_conv_init output
//! D + 1 + 7 s + 1 + 3 j  stage j: upsampled (+0), first conv-norm-lrelu (+1), output (+2)
//! D + 22 + 4 u           decoder u (decoder5, 4, 3, 2): the concatenation's upsampled half (+0)
//!                        and skip half (+1), first conv-norm-lrelu (+2), output (+3)
//! ```
//!
//! The two halves of a concatenation have a scale each: the upsampled half is a transposed
//! conv's output and the skip half (mostly) a normalised block's, with different ranges
//! (measured on the firmware's model, this moved 0.1% of labels; the residual block reads the
//! halves as two parts at no extra cost in multiply-adds).
//!
//! Slots a model does not use hold 1: encoder4's (it has no stages), encoder3's stage 1 (it has
//! one), each skip path's last stage output and encoder4's transp_conv_init output (they are the
//! decoder's skip half). decoder2's output is calibrated but read by nothing: the integer pass
//! keeps that tensor in f32 (`model::int8` says why).

use crate::config::UnetrConfig;
use crate::format::{FormatError, ModelFile, TensorProblem};
use crate::params::{Shape, truncated_name};
use crate::tensor::Tensor;

/// Name of the tensor holding the activation scales, `(point count,)` f32.
pub const ACTIVATION_SCALES: &str = "int8.activation_scales";

/// The file's [`ACTIVATION_SCALES`], checked to have one value per point; `None` if absent.
pub(crate) fn activation_scales<'a>(file: &ModelFile<'a>) -> Result<Option<Tensor<'a>>, FormatError> {
    if !file.tensors().any(|(n, _)| n == ACTIVATION_SCALES) {
        return Ok(None);
    }
    let count = point_count(&file.config);
    let shape = Shape::new(&[count as u32]).unwrap_or_default();
    let t = file.tensor(ACTIVATION_SCALES, shape)?;
    if t.is_int8() {
        return Err(FormatError::Tensor {
            name: truncated_name(ACTIVATION_SCALES),
            problem: TensorProblem::Scales,
        });
    }
    if let Some(index) = (0..count).find(|&i| t.get(i).is_nan() || t.get(i) <= 0.0) {
        return Err(FormatError::Tensor {
            name: truncated_name(ACTIVATION_SCALES),
            problem: TensorProblem::NotPositive { index },
        });
    }
    Ok(Some(t))
}

/// Number of points of a model: the length of [`ACTIVATION_SCALES`].
pub fn point_count(cfg: &UnetrConfig) -> usize {
    Points::new(cfg).count
}

/// Point indices of one residual block's internal tensor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResPoints {
    /// After the first conv, norm and LeakyReLU.
    pub a: usize,
}

/// Point indices of one skip-path stage.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StagePoints {
    /// The transposed conv's output, the residual block's input.
    pub up: usize,
    /// The residual block.
    pub res: ResPoints,
    /// The stage's output (unused for the last stage).
    pub out: usize,
}

/// Point indices of a skip path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SkipPoints {
    /// transp_conv_init's output when stages follow.
    pub init: usize,
    /// The stages.
    pub stages: [StagePoints; 2],
}

/// Point indices of a decoder stage.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UpPoints {
    /// The concatenation's first half: the upsampled input.
    pub up: usize,
    /// The concatenation's second half: the skip.
    pub skip: usize,
    /// The residual block.
    pub res: ResPoints,
    /// The decoder stage's output.
    pub out: usize,
}

/// Every point of a model.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Points {
    depth: usize,
    pub count: usize,
}

/// Which tensor of a transformer block.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BlockPoint {
    Norm1 = 0,
    Attention = 1,
    Norm2 = 2,
    Gelu = 3,
}

impl Points {
    pub fn new(cfg: &UnetrConfig) -> Self {
        let depth = cfg.vit.depth as usize;
        Self { depth, count: 5 + 4 * depth + 38 }
    }

    pub const INPUT: usize = 0;

    pub fn block(&self, i: usize, p: BlockPoint) -> usize {
        1 + 4 * i + p as usize
    }

    /// Hidden state `k` (0..4) as a volume.
    pub fn tap(&self, k: usize) -> usize {
        1 + 4 * self.depth + k
    }

    fn decoder(&self) -> usize {
        5 + 4 * self.depth
    }

    pub fn encoder1(&self) -> ResPoints {
        ResPoints { a: self.decoder() }
    }

    /// Skip path `s` (0 = encoder2).
    pub fn skip(&self, s: usize) -> SkipPoints {
        let b = self.decoder() + 1 + 7 * s;
        let stage = |j: usize| StagePoints {
            up: b + 1 + 3 * j,
            res: ResPoints { a: b + 2 + 3 * j },
            out: b + 3 + 3 * j,
        };
        SkipPoints { init: b, stages: [stage(0), stage(1)] }
    }

    /// Decoder stage `u` (0 = decoder5).
    pub fn up(&self, u: usize) -> UpPoints {
        let b = self.decoder() + 22 + 4 * u;
        UpPoints { up: b, skip: b + 1, res: ResPoints { a: b + 2 }, out: b + 3 }
    }
}

/// Records the largest magnitude of every point while the f32 reference runs (calibration), or
/// nothing.
pub(crate) struct Probe<'r> {
    points: Points,
    ranges: Option<&'r mut [f32]>,
}

impl<'r> Probe<'r> {
    /// A probe that records nothing.
    pub fn off(cfg: &UnetrConfig) -> Self {
        Self { points: Points::new(cfg), ranges: None }
    }

    /// A probe raising `ranges[p]` (`point_count` values) to the largest `|x|` seen at point `p`.
    pub fn recording(cfg: &UnetrConfig, ranges: &'r mut [f32]) -> Self {
        Self { points: Points::new(cfg), ranges: Some(ranges) }
    }

    /// The model's points.
    pub fn points(&self) -> Points {
        self.points
    }

    /// Tensor `x` at point `p`.
    #[inline]
    pub fn see(&mut self, p: usize, x: &[f32]) {
        if let Some(r) = self.ranges.as_deref_mut() {
            let m = x.iter().fold(r[p], |m, v| m.max(v.abs()));
            r[p] = m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_has_one_slot() {
        let cfg = crate::testing_config();
        let p = Points::new(&cfg);
        let mut all = std::vec![Points::INPUT];
        for i in 0..cfg.vit.depth as usize {
            for b in [BlockPoint::Norm1, BlockPoint::Attention, BlockPoint::Norm2, BlockPoint::Gelu] {
                all.push(p.block(i, b));
            }
        }
        all.extend((0..4).map(|k| p.tap(k)));
        all.push(p.encoder1().a);
        for s in 0..3 {
            let sp = p.skip(s);
            all.push(sp.init);
            for st in sp.stages {
                all.extend([st.up, st.res.a, st.out]);
            }
        }
        for u in 0..4 {
            let up = p.up(u);
            all.extend([up.up, up.skip, up.res.a, up.out]);
        }
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..p.count).collect::<std::vec::Vec<_>>(), "slots overlap or leave gaps");
    }
}
