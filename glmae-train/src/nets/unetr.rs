//! UNETR in burn, block for block as MONAI's (and glmae-core's), on the GL-MAE encoder.
//!
//! The layout comes from `glmae_core::params::DecoderLayout`, so the trainer, the weight file and
//! the reference forward pass share one definition of the decoder.

use anyhow::{Result, anyhow, ensure};
use burn::module::{Module, Param};
use burn::nn::conv::{Conv3d, Conv3dConfig, ConvTranspose3d, ConvTranspose3dConfig};
use burn::nn::{InstanceNorm, InstanceNormConfig, PaddingConfig3d};
use burn::tensor::activation::leaky_relu;
use burn::tensor::{Device, Distribution, Tensor};
use glmae_core::UnetrConfig;
use glmae_core::config::PosEmbed;
use glmae_core::params::{self, DecoderLayout, ParamSpec, PrUpShape, ResBlockShape, UnetrParams, UpShape};

use crate::nets::naming::{Layout, NamedTensor, ParamVisitor, Reader, Writer, walk_vit};
use crate::nets::vit::Vit;
use crate::pretrain::views::sincos_table;

fn conv(i: usize, o: usize, k: usize, bias: bool, device: &Device) -> Conv3d {
    Conv3dConfig::new([i, o], [k; 3])
        .with_padding(PaddingConfig3d::Explicit(k / 2, k / 2, k / 2))
        .with_bias(bias)
        .init(device)
}

/// `c.forward(x)` through [`crate::nets::conv::conv3d`], the faster training convolution on the CPU.
fn apply(c: &Conv3d, x: Tensor<5>) -> Tensor<5> {
    crate::nets::conv::conv3d(x, c.weight.val(), c.bias.as_ref().map(|b| b.val()))
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
        let h = leaky_relu(self.norm1.forward(apply(&self.conv1, x.clone())), 0.01);
        let h = self.norm2.forward(apply(&self.conv2, h));
        let residual = match (&self.conv3, &self.norm3) {
            (Some(c), Some(n)) => n.forward(apply(c, x)),
            _ => x,
        };
        leaky_relu(h + residual, 0.01)
    }
}

/// One upsampling stage of a skip path (`encoderN.blocks.i`).
#[derive(Module, Debug)]
pub struct PrUpStage {
    /// 2x2x2 transposed conv.
    pub transp_conv: ConvTranspose3d,
    /// Residual block.
    pub res_block: ResBlock,
}

/// MONAI's `UnetrPrUpBlock` (`encoder2..4`).
#[derive(Module, Debug)]
pub struct PrUp {
    /// First transposed conv from the token grid.
    pub transp_conv_init: ConvTranspose3d,
    /// Further stages.
    pub blocks: Vec<PrUpStage>,
}

impl PrUp {
    fn new(hidden: usize, s: &PrUpShape, device: &Device) -> Self {
        Self {
            transp_conv_init: up(hidden, s.out_ch, device),
            blocks: (0..s.layers)
                .map(|_| PrUpStage {
                    transp_conv: up(s.out_ch, s.out_ch, device),
                    res_block: ResBlock::new(ResBlockShape { in_ch: s.out_ch, out_ch: s.out_ch }, device),
                })
                .collect(),
        }
    }

    /// The skip path from hidden states `(batch, hidden, grid...)`.
    fn forward(&self, volume: Tensor<5>) -> Tensor<5> {
        let mut y = self.transp_conv_init.forward(volume);
        for stage in &self.blocks {
            y = stage.res_block.forward(stage.transp_conv.forward(y));
        }
        y
    }

    fn walk(&mut self, v: &mut impl ParamVisitor, spec: &params::PrUp<ParamSpec>) -> Result<()> {
        kernel(v, &spec.transp_conv_init, &mut self.transp_conv_init.weight)?;
        ensure!(
            self.blocks.len() == spec.blocks.len(),
            "{}: stage count differs from the config",
            spec.shape.prefix
        );
        for (stage, stage_spec) in self.blocks.iter_mut().zip(&spec.blocks) {
            kernel(v, &stage_spec.transp_conv, &mut stage.transp_conv.weight)?;
            walk_res(v, &stage_spec.res_block, &mut stage.res_block)?;
        }
        Ok(())
    }
}

/// MONAI's `UnetrUpBlock` (`decoder5..2`).
#[derive(Module, Debug)]
pub struct Up {
    /// Transposed conv.
    pub transp_conv: ConvTranspose3d,
    /// Residual block on the concatenation with the skip.
    pub conv_block: ResBlock,
}

impl Up {
    fn new(s: &UpShape, device: &Device) -> Self {
        Self {
            transp_conv: up(s.in_ch, s.out_ch, device),
            conv_block: ResBlock::new(ResBlockShape { in_ch: 2 * s.out_ch, out_ch: s.out_ch }, device),
        }
    }

    /// Upsamples `y` and joins it with `skip` (concatenated along channels).
    fn forward(&self, y: Tensor<5>, skip: Tensor<5>) -> Tensor<5> {
        self.conv_block.forward(Tensor::cat(vec![self.transp_conv.forward(y), skip], 1))
    }

    fn walk(&mut self, v: &mut impl ParamVisitor, spec: &params::Up<ParamSpec>) -> Result<()> {
        kernel(v, &spec.transp_conv, &mut self.transp_conv.weight)?;
        walk_res(v, &spec.conv_block, &mut self.conv_block)
    }
}

/// UNETR: the ViT encoder and MONAI's decoder.
#[derive(Module, Debug)]
pub struct Unetr {
    /// Encoder.
    pub vit: Vit,
    /// Residual block on the input.
    pub encoder1: ResBlock,
    /// Skip path from the hidden state after block 3.
    pub encoder2: PrUp,
    /// Skip path from the hidden state after block 6.
    pub encoder3: PrUp,
    /// Skip path from the hidden state after block 9.
    pub encoder4: PrUp,
    /// Decoder stage from the encoder's output, joined with `encoder4`.
    pub decoder5: Up,
    /// Decoder stage joined with `encoder3`.
    pub decoder4: Up,
    /// Decoder stage joined with `encoder2`.
    pub decoder3: Up,
    /// Decoder stage joined with `encoder1`, at full resolution.
    pub decoder2: Up,
    /// 1x1x1 output conv with bias.
    pub out: Conv3d,
    /// MONAI's learned position table `(tokens, hidden)` for the configured window, when the
    /// model has one (`PosEmbed::Learned`, e.g. an imported MONAI UNETR); else the sin-cos
    /// embedding is made for each window's token grid.
    pub position_embeddings: Option<Param<Tensor<2>>>,
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
            encoder2: PrUp::new(e, &l.skips[0], device),
            encoder3: PrUp::new(e, &l.skips[1], device),
            encoder4: PrUp::new(e, &l.skips[2], device),
            decoder5: Up::new(&l.ups[0], device),
            decoder4: Up::new(&l.ups[1], device),
            decoder3: Up::new(&l.ups[2], device),
            decoder2: Up::new(&l.ups[3], device),
            out: conv(l.out_in_ch, l.classes, 1, true, device),
            // MONAI initialises its learned table with trunc_normal(std 0.02).
            position_embeddings: (cfg.vit.pos_embed == PosEmbed::Learned).then(|| {
                let n = cfg.vit.num_tokens();
                Param::from_tensor(Tensor::random([n, e], Distribution::Normal(0.0, 0.02), device))
            }),
            patch: cfg.vit.patch_size as usize,
        }
    }

    /// A UNETR with every weight of a `.glmae` model (int8 weights dequantised), ready to
    /// fine-tune: the architecture, learned position table included, is the file's. The integer
    /// pass's activation scales, when present, are not weights and are left out.
    pub fn from_model_file(file: &glmae_core::ModelFile<'_>, device: &Device) -> Result<Self> {
        let weights = file.tensors().filter(|(name, _)| *name != glmae_core::model::ACTIVATION_SCALES);
        let tensors = weights.map(|(name, t)| {
            let mut values = vec![0f32; t.len()];
            t.copy_to(&mut values);
            let shape = t.shape().dims().iter().map(|&d| d as usize).collect();
            NamedTensor { name: name.to_string(), shape, values }
        });
        let mut writer = Writer::new(tensors);
        let mut model = Self::new(&file.config, device);
        model.walk(&mut writer, &file.config)?;
        let unused = writer.unused();
        anyhow::ensure!(unused.is_empty(), "tensors this UNETR has no place for: {}", unused.join(", "));
        Ok(model)
    }

    /// Logits `(batch, classes, d, h, w)` for `x` (`(batch, channels, d, h, w)`, sides multiples
    /// of 16), with the sin-cos position embedding for the window's token grid.
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let [b, _, d, h, w] = x.dims();
        let p = self.patch;
        let grid = [d / p, h / p, w / p];
        let e = self.vit.norm.gamma.dims()[0];
        let n = grid.iter().product::<usize>();
        let pos = match &self.position_embeddings {
            // The table is for the configured window; sliding windows always have that shape.
            Some(table) => table.val(),
            None => crate::nets::vit::tensor(sincos_table(grid, e), [n, e], &x.device()),
        };
        let (taps, last) = self.vit.forward_with_taps(patchify(x.clone(), p), pos);
        let volume = |t: Tensor<3>| -> Tensor<5> {
            t.reshape([b, grid[0], grid[1], grid[2], e]).permute([0, 4, 1, 2, 3])
        };
        let [z3, z6, z9] = taps;
        let d3 = self.decoder5.forward(volume(last), self.encoder4.forward(volume(z9)));
        let d2 = self.decoder4.forward(d3, self.encoder3.forward(volume(z6)));
        let d1 = self.decoder3.forward(d2, self.encoder2.forward(volume(z3)));
        let d0 = self.decoder2.forward(d1, self.encoder1.forward(x));
        apply(&self.out, d0)
    }

    /// Every parameter under MONAI's names, in PyTorch layout (glmae-core's order).
    pub fn named_tensors(&self, cfg: &UnetrConfig) -> Result<Vec<NamedTensor>> {
        let mut reader = Reader::default();
        self.clone().walk(&mut reader, cfg)?;
        Ok(reader.tensors)
    }

    /// Visits every parameter under its MONAI name in glmae-core's order. The names are
    /// glmae-core's parameter tree's ([`UnetrParams::specs`]); this walk pairs them with the burn
    /// modules (the encoder's in [`walk_vit`]).
    pub fn walk(&mut self, v: &mut impl ParamVisitor, cfg: &UnetrConfig) -> Result<()> {
        let specs = UnetrParams::specs(cfg);
        walk_vit(v, &mut self.vit, &cfg.vit, self.position_embeddings.as_mut())?;
        walk_res(v, &specs.encoder1, &mut self.encoder1)?;
        self.encoder2.walk(v, &specs.encoder2)?;
        self.encoder3.walk(v, &specs.encoder3)?;
        self.encoder4.walk(v, &specs.encoder4)?;
        self.decoder5.walk(v, &specs.decoder5)?;
        self.decoder4.walk(v, &specs.decoder4)?;
        self.decoder3.walk(v, &specs.decoder3)?;
        self.decoder2.walk(v, &specs.decoder2)?;
        kernel(v, &specs.out.weight, &mut self.out.weight)?;
        if let Some(b) = self.out.bias.clone() {
            self.out.bias = Some(v.param(&specs.out.bias.name, b, Layout::Same)?);
        }
        Ok(())
    }
}

/// A convolution kernel: burn's Conv3d `(out, in, k, k, k)` and ConvTranspose3d
/// `(in, out, k, k, k)` are PyTorch's layouts.
fn kernel(v: &mut impl ParamVisitor, spec: &ParamSpec, w: &mut Param<Tensor<5>>) -> Result<()> {
    *w = v.param(&spec.name, w.clone(), Layout::Same)?;
    Ok(())
}

fn walk_res(v: &mut impl ParamVisitor, spec: &params::ResBlock<ParamSpec>, r: &mut ResBlock) -> Result<()> {
    kernel(v, &spec.conv1, &mut r.conv1.weight)?;
    kernel(v, &spec.conv2, &mut r.conv2.weight)?;
    match (r.conv3.as_mut(), &spec.conv3) {
        (Some(c3), Some(s3)) => kernel(v, s3, &mut c3.weight),
        (None, None) => Ok(()),
        _ => Err(anyhow!("{}: residual projection differs from the config", spec.conv1.name)),
    }
}
