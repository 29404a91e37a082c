//! A weight file's tensors bound to the UNETR parameter tree, checked against the config.

use crate::format::{FormatError, ModelFile, TensorProblem, check_no_extra};
use crate::params::{
    Block, Linear, Norm, ParamBuilder, PrUp, PrUpStage, ResBlock, UnetrParams, Up, Vit, truncated_name,
};
use crate::tensor::{Tensor, TensorData};

use super::points::ACTIVATION_SCALES;

/// Every UNETR weight of a file, in the parameter tree (fields named as MONAI's state dict).
pub type UnetrWeights<'a> = UnetrParams<Tensor<'a>>;
/// The encoder's weights.
pub type VitWeights<'a> = Vit<Tensor<'a>>;
/// One transformer block's weights.
pub type BlockWeights<'a> = Block<Tensor<'a>>;
/// A LayerNorm's weights.
pub type NormWeights<'a> = Norm<Tensor<'a>>;
/// A Linear's (or biased conv's) weights.
pub type LinearWeights<'a> = Linear<Tensor<'a>>;
/// A residual conv block's weights.
pub type ResBlockWeights<'a> = ResBlock<Tensor<'a>>;
/// One upsampling stage of a skip path.
pub type PrUpStageWeights<'a> = PrUpStage<Tensor<'a>>;
/// A skip path's weights (`encoder2..4`).
pub type PrUpWeights<'a> = PrUp<Tensor<'a>>;
/// A decoder stage's weights (`decoder5..2`).
pub type UpWeights<'a> = Up<Tensor<'a>>;

impl<'a> UnetrParams<Tensor<'a>> {
    /// Finds every parameter of `file.config` in `file`, checking shapes, and rejects tensors the
    /// model does not have.
    #[inline(always)]
    pub fn bind(file: &ModelFile<'a>) -> Result<Self, FormatError> {
        let mut bound = 0usize;
        let mut get = |spec: crate::params::ParamSpec| {
            let t = file.tensor(&spec.name, spec.shape)?;
            // The kernels read an int8 weight's scales along its output channels (axis 0, or 1
            // for a transposed conv): another axis is a malformed file, not a layout to support.
            if let TensorData::Int8 { axis, .. } = t.data()
                && Some(axis) != spec.kind.channel_axis()
            {
                return Err(FormatError::Tensor {
                    name: truncated_name(&spec.name),
                    problem: TensorProblem::Scales,
                });
            }
            bound += 1;
            Ok(t)
        };
        let weights = Self::build(&file.config, ParamBuilder::new(&mut get))?;
        // The integer pass's activation scales are the one tensor besides the parameters.
        let scales = usize::from(super::points::activation_scales(file)?.is_some());
        check_no_extra(file, bound + scales, |n| n == ACTIVATION_SCALES || is_param(&file.config, n))?;
        Ok(weights)
    }
}

fn is_param(cfg: &crate::config::UnetrConfig, n: &str) -> bool {
    let mut found = false;
    crate::params::for_each_param(cfg, |p| found |= p.name == n);
    found
}
