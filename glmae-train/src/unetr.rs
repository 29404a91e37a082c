//! UNETR in burn, block for block as MONAI's (and glmae-core's), on the GL-MAE encoder.
//!
//! The layout comes from `glmae_core::params::DecoderLayout`, so the trainer, the weight file and
//! the reference forward pass share one definition of the decoder.

use anyhow::Result;
use burn::module::Module;
use burn::nn::conv::{Conv3d, Conv3dConfig, ConvTranspose3d, ConvTranspose3dConfig};
use burn::nn::{InstanceNorm, InstanceNormConfig, PaddingConfig3d};
use burn::tensor::activation::leaky_relu;
use burn::tensor::{Device, Tensor};
use glmae_core::UnetrConfig;
use glmae_core::params::{DecoderLayout, ResBlockShape};

use crate::export::{NamedTensor, encoder_tensors, push};
use crate::model::Vit;
use crate::views::sincos_table;

fn conv(i: usize, o: usize, k: usize, bias: bool, device: &Device) -> Conv3d {
    Conv3dConfig::new([i, o], [k; 3])
        .with_padding(PaddingConfig3d::Explicit(k / 2, k / 2, k / 2))
        .with_bias(bias)
        .init(device)
}

fn up(i: usize, o: usize, device: &Device) -> ConvTranspose3d {
    ConvTranspose3dConfig::new([i, o], [2; 3]).with_stride([2; 3]).with_bias(false).init(device)
}

fn instance_norm(c: usize, device: &Device) -> InstanceNorm {
    InstanceNormConfig::new(c).with_affine(false).init(device)
}

/// MONAI's `UnetResBlock`: conv-norm-lrelu, conv-norm, plus the (projected) input, lrelu.
#[derive(Module, Debug)]
pub struct ResBlock {
    /// First 3x3x3 conv.
    pub conv1: Conv3d,
    /// Second 3x3x3 conv.
    pub conv2: Conv3d,
    /// 1x1x1 residual projection when channels change.
    pub conv3: Option<Conv3d>,
    norm1: InstanceNorm,
    norm2: InstanceNorm,
    norm3: Option<InstanceNorm>,
}

impl ResBlock {
    fn new(s: ResBlockShape, device: &Device) -> Self {
        let proj = s.has_projection();
        Self {
            conv1: conv(s.in_ch, s.out_ch, 3, false, device),
            conv2: conv(s.out_ch, s.out_ch, 3, false, device),
            conv3: proj.then(|| conv(s.in_ch, s.out_ch, 1, false, device)),
            norm1: instance_norm(s.out_ch, device),
            norm2: instance_norm(s.out_ch, device),
            norm3: proj.then(|| instance_norm(s.out_ch, device)),
        }
    }

    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let h = leaky_relu(self.norm1.forward(self.conv1.forward(x.clone())), 0.01);
        let h = self.norm2.forward(self.conv2.forward(h));
        let residual = match (&self.conv3, &self.norm3) {
            (Some(c), Some(n)) => n.forward(c.forward(x)),
            _ => x,
        };
        leaky_relu(h + residual, 0.01)
    }
}

/// One upsampling stage of a skip path.
#[derive(Module, Debug)]
pub struct UpStage {
    /// 2x2x2 transposed conv.
    pub transp: ConvTranspose3d,
    /// Residual block.
    pub res: ResBlock,
}

/// MONAI's `UnetrPrUpBlock`.
#[derive(Module, Debug)]
pub struct PrUp {
    /// First transposed conv from the token grid.
    pub transp_conv_init: ConvTranspose3d,
    /// Further stages.
    pub blocks: Vec<UpStage>,
}

/// MONAI's `UnetrUpBlock`.
#[derive(Module, Debug)]
pub struct Up {
    /// Transposed conv.
    pub transp_conv: ConvTranspose3d,
    /// Residual block on the concatenation with the skip.
    pub conv_block: ResBlock,
}

/// UNETR: the ViT encoder and MONAI's decoder.
#[derive(Module, Debug)]
pub struct Unetr {
    /// Encoder.
    pub vit: Vit,
    /// Residual block on the input.
    pub encoder1: ResBlock,
    /// `encoder2..4`.
    pub skips: Vec<PrUp>,
    /// `decoder5..2`.
    pub ups: Vec<Up>,
    /// 1x1x1 output conv with bias.
    pub out: Conv3d,
    patch: usize,
}

/// Cuts `(batch, channels, d, h, w)` into patch tokens `(batch, tokens, channels * p^3)` in
/// Conv3d kernel order, with at most 6-D intermediates (the ndarray backend's limit).
pub fn patchify(x: Tensor<5>, p: usize) -> Tensor<3> {
    let [b, c, d, h, w] = x.dims();
    let g = [d / p, h / p, w / p];
    let x: Tensor<6> = x.reshape([b * c, g[0], p, g[1], p, w]).swap_dims(2, 3);
    let x: Tensor<4> = x.reshape([b * c * g[0] * g[1], p * p, g[2], p]).swap_dims(1, 2);
    let x: Tensor<6> = x.reshape([b, c, g[0], g[1], g[2], p * p * p]).permute([0, 2, 3, 4, 1, 5]);
    x.reshape([b, g[0] * g[1] * g[2], c * p * p * p])
}

impl Unetr {
    /// A freshly initialised UNETR for `cfg` (the encoder as [`Vit::new`]).
    pub fn new(cfg: &UnetrConfig, device: &Device) -> Self {
        let l = DecoderLayout::new(cfg);
        let e = cfg.vit.hidden_size as usize;
        Self {
            vit: Vit::new(&cfg.vit, device),
            encoder1: ResBlock::new(l.encoder1, device),
            skips: l
                .skips
                .iter()
                .map(|s| PrUp {
                    transp_conv_init: up(e, s.out_ch, device),
                    blocks: (0..s.layers)
                        .map(|_| UpStage {
                            transp: up(s.out_ch, s.out_ch, device),
                            res: ResBlock::new(ResBlockShape { in_ch: s.out_ch, out_ch: s.out_ch }, device),
                        })
                        .collect(),
                })
                .collect(),
            ups: l
                .ups
                .iter()
                .map(|u| Up {
                    transp_conv: up(u.in_ch, u.out_ch, device),
                    conv_block: ResBlock::new(
                        ResBlockShape { in_ch: 2 * u.out_ch, out_ch: u.out_ch },
                        device,
                    ),
                })
                .collect(),
            out: conv(l.out_in_ch, l.classes, 1, true, device),
            patch: cfg.vit.patch_size as usize,
        }
    }

    /// Logits `(batch, classes, d, h, w)` for `x` (`(batch, channels, d, h, w)`, sides multiples
    /// of 16), with the sin-cos position embedding for the window's token grid.
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let [b, _, d, h, w] = x.dims();
        let p = self.patch;
        let grid = [d / p, h / p, w / p];
        let e = self.vit.norm.gamma.dims()[0];
        let n = grid.iter().product::<usize>();
        let pos = crate::model::tensor(sincos_table(grid, e), [n, e], &x.device());
        let (taps, last) = self.vit.forward_with_taps(patchify(x.clone(), p), pos);
        let volume = |t: Tensor<3>| -> Tensor<5> {
            t.reshape([b, grid[0], grid[1], grid[2], e]).permute([0, 4, 1, 2, 3])
        };
        let skip = |k: usize, z: Tensor<3>| {
            let s = &self.skips[k];
            let mut y = s.transp_conv_init.forward(volume(z));
            for stage in &s.blocks {
                y = stage.res.forward(stage.transp.forward(y));
            }
            y
        };
        let [z3, z6, z9] = taps;
        let decode = |u: &Up, y: Tensor<5>, skip: Tensor<5>| {
            u.conv_block.forward(Tensor::cat(vec![u.transp_conv.forward(y), skip], 1))
        };
        let d3 = decode(&self.ups[0], volume(last), skip(2, z9));
        let d2 = decode(&self.ups[1], d3, skip(1, z6));
        let d1 = decode(&self.ups[2], d2, skip(0, z3));
        let d0 = decode(&self.ups[3], d1, self.encoder1.forward(x));
        self.out.forward(d0)
    }

    /// Every parameter under MONAI's names, in PyTorch layout (glmae-core's order).
    pub fn named_tensors(&self, cfg: &UnetrConfig) -> Result<Vec<NamedTensor>> {
        let mut out = encoder_tensors(&self.vit, &cfg.vit)?;
        push_res(&mut out, "encoder1.layer", &self.encoder1)?;
        let layout = DecoderLayout::new(cfg);
        for (s, shape) in self.skips.iter().zip(layout.skips) {
            let n = shape.prefix;
            push(&mut out, format!("{n}.transp_conv_init.conv.weight"), s.transp_conv_init.weight.val())?;
            for (j, stage) in s.blocks.iter().enumerate() {
                push(&mut out, format!("{n}.blocks.{j}.0.conv.weight"), stage.transp.weight.val())?;
                push_res(&mut out, &format!("{n}.blocks.{j}.1"), &stage.res)?;
            }
        }
        for (u, shape) in self.ups.iter().zip(layout.ups) {
            let n = shape.prefix;
            push(&mut out, format!("{n}.transp_conv.conv.weight"), u.transp_conv.weight.val())?;
            push_res(&mut out, &format!("{n}.conv_block"), &u.conv_block)?;
        }
        push(&mut out, "out.conv.conv.weight".into(), self.out.weight.val())?;
        if let Some(b) = &self.out.bias {
            push(&mut out, "out.conv.conv.bias".into(), b.val())?;
        }
        Ok(out)
    }
}

fn push_res(out: &mut Vec<NamedTensor>, prefix: &str, r: &ResBlock) -> Result<()> {
    push(out, format!("{prefix}.conv1.conv.weight"), r.conv1.weight.val())?;
    push(out, format!("{prefix}.conv2.conv.weight"), r.conv2.weight.val())?;
    if let Some(c3) = &r.conv3 {
        push(out, format!("{prefix}.conv3.conv.weight"), c3.weight.val())?;
    }
    Ok(())
}
