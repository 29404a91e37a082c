//! A weight file's tensors bound to the UNETR structure, checked against the config.

use core::fmt;

use crate::config::{MAX_DEPTH, PosEmbed, UnetrConfig};
use crate::format::{FormatError, ModelFile, check_no_extra};
use crate::params::{DecoderLayout, PrUpShape, ResBlockShape, Shape, UpShape, for_each_param, name};
use crate::tensor::Tensor;

/// LayerNorm scale and shift.
#[derive(Clone, Copy, Debug)]
pub struct NormWeights<'a> {
    /// Scale (`weight`).
    pub weight: Tensor<'a>,
    /// Shift (`bias`).
    pub bias: Tensor<'a>,
}

/// One pre-norm transformer block.
#[derive(Clone, Copy, Debug)]
pub struct BlockWeights<'a> {
    /// Norm before attention.
    pub norm1: NormWeights<'a>,
    /// Fused q, k, v projection `(3 * hidden, hidden)`, outputs ordered (qkv, head, dim).
    pub qkv_weight: Tensor<'a>,
    /// Its bias, when the config has one.
    pub qkv_bias: Option<Tensor<'a>>,
    /// Attention output projection.
    pub out_weight: Tensor<'a>,
    /// Its bias.
    pub out_bias: Tensor<'a>,
    /// Norm before the MLP.
    pub norm2: NormWeights<'a>,
    /// MLP first layer.
    pub fc1_weight: Tensor<'a>,
    /// Its bias.
    pub fc1_bias: Tensor<'a>,
    /// MLP second layer.
    pub fc2_weight: Tensor<'a>,
    /// Its bias.
    pub fc2_bias: Tensor<'a>,
}

/// The ViT encoder.
#[derive(Clone, Debug)]
pub struct VitWeights<'a> {
    /// Patch embedding Conv3d weight.
    pub patch_weight: Tensor<'a>,
    /// Patch embedding bias.
    pub patch_bias: Tensor<'a>,
    /// Learned position table, when the config uses one.
    pub position: Option<Tensor<'a>>,
    /// Transformer blocks.
    pub blocks: heapless::Vec<BlockWeights<'a>, MAX_DEPTH>,
    /// Final LayerNorm.
    pub norm: NormWeights<'a>,
}

/// A residual conv block.
#[derive(Clone, Copy, Debug)]
pub struct ResBlockWeights<'a> {
    /// Channel counts.
    pub shape: ResBlockShape,
    /// First 3x3x3 conv.
    pub conv1: Tensor<'a>,
    /// Second 3x3x3 conv.
    pub conv2: Tensor<'a>,
    /// 1x1x1 residual projection, when channels change.
    pub conv3: Option<Tensor<'a>>,
}

/// One upsampling stage of a skip path: transposed conv then residual block.
#[derive(Clone, Copy, Debug)]
pub struct UpStageWeights<'a> {
    /// 2x2x2 transposed conv.
    pub transp: Tensor<'a>,
    /// Residual block at the new resolution.
    pub res: ResBlockWeights<'a>,
}

/// A skip path from a hidden state (`encoder2..4`).
#[derive(Clone, Debug)]
pub struct PrUpWeights<'a> {
    /// Channel counts and depth.
    pub shape: PrUpShape,
    /// First transposed conv, from the token grid.
    pub init: Tensor<'a>,
    /// Further stages.
    pub stages: heapless::Vec<UpStageWeights<'a>, 2>,
}

/// A decoder stage (`decoder5..2`).
#[derive(Clone, Copy, Debug)]
pub struct UpWeights<'a> {
    /// Channel counts.
    pub shape: UpShape,
    /// Transposed conv.
    pub transp: Tensor<'a>,
    /// Residual block after concatenating the skip.
    pub res: ResBlockWeights<'a>,
}

/// Every UNETR weight, bound by name.
#[derive(Clone, Debug)]
pub struct UnetrWeights<'a> {
    /// The encoder.
    pub vit: VitWeights<'a>,
    /// Residual block on the input.
    pub encoder1: ResBlockWeights<'a>,
    /// `encoder2..4`.
    pub skips: [PrUpWeights<'a>; 3],
    /// `decoder5..2`.
    pub ups: [UpWeights<'a>; 4],
    /// 1x1x1 output conv weight.
    pub out_weight: Tensor<'a>,
    /// Its bias.
    pub out_bias: Tensor<'a>,
}

struct Binder<'f, 'a> {
    file: &'f ModelFile<'a>,
    bound: usize,
}

impl<'a> Binder<'_, 'a> {
    fn get(&mut self, n: fmt::Arguments<'_>, dims: &[usize]) -> Result<Tensor<'a>, FormatError> {
        let mut d = [0u32; 5];
        for (o, &i) in d.iter_mut().zip(dims) {
            *o = i as u32;
        }
        let shape = Shape::new(&d[..dims.len()]).unwrap_or_default();
        let t = self.file.tensor(&name(n), shape)?;
        self.bound += 1;
        Ok(t)
    }

    fn norm(&mut self, prefix: fmt::Arguments<'_>, e: usize) -> Result<NormWeights<'a>, FormatError> {
        let p = name(prefix);
        Ok(NormWeights {
            weight: self.get(format_args!("{p}.weight"), &[e])?,
            bias: self.get(format_args!("{p}.bias"), &[e])?,
        })
    }

    fn res(
        &mut self,
        prefix: fmt::Arguments<'_>,
        s: ResBlockShape,
    ) -> Result<ResBlockWeights<'a>, FormatError> {
        let p = name(prefix);
        let (i, o) = (s.in_ch, s.out_ch);
        Ok(ResBlockWeights {
            shape: s,
            conv1: self.get(format_args!("{p}.conv1.conv.weight"), &[o, i, 3, 3, 3])?,
            conv2: self.get(format_args!("{p}.conv2.conv.weight"), &[o, o, 3, 3, 3])?,
            conv3: if s.has_projection() {
                Some(self.get(format_args!("{p}.conv3.conv.weight"), &[o, i, 1, 1, 1])?)
            } else {
                None
            },
        })
    }
}

impl<'a> UnetrWeights<'a> {
    /// Finds every parameter of `file.config` in `file`, checking shapes, and rejects tensors the
    /// model does not have.
    pub fn bind(file: &ModelFile<'a>) -> Result<Self, FormatError> {
        let cfg = &file.config;
        let v = &cfg.vit;
        let (e, m, p, c) =
            (v.hidden_size as usize, v.mlp_dim as usize, v.patch_size as usize, v.in_channels as usize);
        let mut b = Binder { file, bound: 0 };

        let patch_weight =
            b.get(format_args!("vit.patch_embedding.patch_embeddings.weight"), &[e, c, p, p, p])?;
        let patch_bias = b.get(format_args!("vit.patch_embedding.patch_embeddings.bias"), &[e])?;
        let position = match v.pos_embed {
            PosEmbed::Learned => {
                Some(b.get(format_args!("vit.patch_embedding.position_embeddings"), &[1, v.num_tokens(), e])?)
            }
            PosEmbed::SinCos => None,
        };
        let mut blocks = heapless::Vec::new();
        for i in 0..v.depth as usize {
            let pre = "vit.blocks";
            let block = BlockWeights {
                fc1_weight: b.get(format_args!("{pre}.{i}.mlp.linear1.weight"), &[m, e])?,
                fc1_bias: b.get(format_args!("{pre}.{i}.mlp.linear1.bias"), &[m])?,
                fc2_weight: b.get(format_args!("{pre}.{i}.mlp.linear2.weight"), &[e, m])?,
                fc2_bias: b.get(format_args!("{pre}.{i}.mlp.linear2.bias"), &[e])?,
                norm1: b.norm(format_args!("{pre}.{i}.norm1"), e)?,
                out_weight: b.get(format_args!("{pre}.{i}.attn.out_proj.weight"), &[e, e])?,
                out_bias: b.get(format_args!("{pre}.{i}.attn.out_proj.bias"), &[e])?,
                qkv_weight: b.get(format_args!("{pre}.{i}.attn.qkv.weight"), &[3 * e, e])?,
                qkv_bias: if v.qkv_bias {
                    Some(b.get(format_args!("{pre}.{i}.attn.qkv.bias"), &[3 * e])?)
                } else {
                    None
                },
                norm2: b.norm(format_args!("{pre}.{i}.norm2"), e)?,
            };
            // Cannot overflow: validate() caps depth at MAX_DEPTH.
            let _ = blocks.push(block);
        }
        let vit = VitWeights {
            patch_weight,
            patch_bias,
            position,
            blocks,
            norm: b.norm(format_args!("vit.norm"), e)?,
        };

        let layout = DecoderLayout::new(cfg);
        let encoder1 = b.res(format_args!("encoder1.layer"), layout.encoder1)?;
        let mut skip = |s: PrUpShape| -> Result<PrUpWeights<'a>, FormatError> {
            let (n, o) = (s.prefix, s.out_ch);
            let init = b.get(format_args!("{n}.transp_conv_init.conv.weight"), &[e, o, 2, 2, 2])?;
            let mut stages = heapless::Vec::new();
            for j in 0..s.layers.min(2) {
                let transp = b.get(format_args!("{n}.blocks.{j}.0.conv.weight"), &[o, o, 2, 2, 2])?;
                let res = b.res(format_args!("{n}.blocks.{j}.1"), ResBlockShape { in_ch: o, out_ch: o })?;
                let _ = stages.push(UpStageWeights { transp, res });
            }
            Ok(PrUpWeights { shape: s, init, stages })
        };
        let skips = [skip(layout.skips[0])?, skip(layout.skips[1])?, skip(layout.skips[2])?];
        let mut up = |u: UpShape| -> Result<UpWeights<'a>, FormatError> {
            let (n, i, o) = (u.prefix, u.in_ch, u.out_ch);
            Ok(UpWeights {
                shape: u,
                transp: b.get(format_args!("{n}.transp_conv.conv.weight"), &[i, o, 2, 2, 2])?,
                res: b.res(format_args!("{n}.conv_block"), ResBlockShape { in_ch: 2 * o, out_ch: o })?,
            })
        };
        let ups = [up(layout.ups[0])?, up(layout.ups[1])?, up(layout.ups[2])?, up(layout.ups[3])?];
        let out_weight =
            b.get(format_args!("out.conv.conv.weight"), &[layout.classes, layout.out_in_ch, 1, 1, 1])?;
        let out_bias = b.get(format_args!("out.conv.conv.bias"), &[layout.classes])?;

        check_no_extra(file, b.bound, |n| is_param(cfg, n))?;
        Ok(Self { vit, encoder1, skips, ups, out_weight, out_bias })
    }
}

fn is_param(cfg: &UnetrConfig, n: &str) -> bool {
    let mut found = false;
    for_each_param(cfg, |p| found |= p.name == n);
    found
}
