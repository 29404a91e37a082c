//! Every parameter of a UNETR, named as MONAI names it, in one typed tree.
//!
//! [`UnetrParams<T>`] has one field per MONAI state-dict module (`vit.blocks[i].attn.qkv`,
//! `encoder1..4`, `decoder5..2`, `out`) and leaves of any type. Its `build` functions are the
//! only place the names are made, each segment where its module is built ([`ParamBuilder::pp`],
//! candle's `vb.pp("attn")`): [`UnetrParams::specs`] gives every name, shape and kind; the weight
//! file's binder (`glmae_core::model::UnetrWeights::bind`) builds the same tree with tensors
//! read by those names; [`for_each_param`] (the writer's and importers' order) walks the specs.
//! This is the contract between the trainer, the weight file, importers and the forward passes:
//! a weight file holds exactly these tensors with exactly these shapes.

use core::fmt::{self, Write};

use crate::config::{MAX_DEPTH, PosEmbed, UnetrConfig};

/// A parameter name, such as `vit.blocks.3.attn.qkv.weight`.
pub type ParamName = heapless::String<64>;

/// Most dimensions a parameter has (a 3-D convolution kernel has five).
pub const MAX_RANK: usize = 5;

/// A tensor shape of rank 1 to [`MAX_RANK`].
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    dims: [u32; MAX_RANK],
    rank: u8,
}

impl Shape {
    /// A shape from its dimensions; `None` when the rank is 0 or above [`MAX_RANK`].
    pub fn new(dims: &[u32]) -> Option<Self> {
        if dims.is_empty() || dims.len() > MAX_RANK {
            return None;
        }
        let mut s = Shape { dims: [0; MAX_RANK], rank: dims.len() as u8 };
        s.dims[..dims.len()].copy_from_slice(dims);
        Some(s)
    }

    /// The dimensions.
    pub fn dims(&self) -> &[u32] {
        &self.dims[..self.rank as usize]
    }

    /// Number of elements (saturating, so a hostile shape cannot overflow).
    pub fn numel(&self) -> usize {
        self.dims().iter().fold(1usize, |n, &d| n.saturating_mul(d as usize))
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Shape {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "{=[?]}", self.dims())
    }
}

/// What a parameter is, which decides its layout and whether it may be quantised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Linear weight `(out, in)`.
    Linear,
    /// Conv3d weight `(out, in, k, k, k)`.
    Conv,
    /// ConvTranspose3d weight `(in, out, k, k, k)`.
    ConvTranspose,
    /// Bias or LayerNorm scale/shift.
    Vector,
    /// Learned position embedding `(1, tokens, hidden)`.
    PositionTable,
}

impl ParamKind {
    /// The output-channel axis that per-channel int8 scales run along; `None` for parameters that
    /// always stay f32 (vectors and the position table are tiny and precision-sensitive).
    pub fn channel_axis(self) -> Option<usize> {
        match self {
            Self::Linear | Self::Conv => Some(0),
            Self::ConvTranspose => Some(1),
            Self::Vector | Self::PositionTable => None,
        }
    }
}

/// One parameter: its name, shape and kind.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// MONAI's state-dict name.
    pub name: ParamName,
    /// Expected shape.
    pub shape: Shape,
    /// What it is.
    pub kind: ParamKind,
}

/// Formats a name; all names this crate builds are well under 64 bytes.
pub(crate) fn name(args: fmt::Arguments<'_>) -> ParamName {
    let mut s = ParamName::new();
    let _ = s.write_fmt(args);
    s
}

/// A name truncated to fit, for error messages about names read from a file.
pub(crate) fn truncated_name(text: &str) -> ParamName {
    let mut s = ParamName::new();
    for c in text.chars() {
        if s.push(c).is_err() {
            break;
        }
    }
    s
}

/// One of UNETR's residual conv blocks (MONAI `UnetResBlock`): two 3x3x3 convolutions and, when
/// the channel count changes, a 1x1x1 projection of the residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResBlockShape {
    /// Input channels.
    pub in_ch: usize,
    /// Output channels.
    pub out_ch: usize,
}

impl ResBlockShape {
    /// Whether the residual needs `conv3` (MONAI adds it when channels differ; strides are 1 here).
    pub fn has_projection(&self) -> bool {
        self.in_ch != self.out_ch
    }
}

/// MONAI's `UnetrPrUpBlock`: a transposed conv from the token grid, then `layers` x (transposed
/// conv + residual block), each doubling the resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrUpShape {
    /// Module name (`encoder2` ...).
    pub prefix: &'static str,
    /// Output channels.
    pub out_ch: usize,
    /// Extra upsampling stages after the first.
    pub layers: usize,
}

/// MONAI's `UnetrUpBlock`: transposed conv, concatenation with the skip, residual block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpShape {
    /// Module name (`decoder5` ...).
    pub prefix: &'static str,
    /// Input channels.
    pub in_ch: usize,
    /// Output channels (the skip has as many).
    pub out_ch: usize,
}

/// The decoder's block structure for a configuration, shared by the parameter list and the
/// forward pass so that the two cannot disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderLayout {
    /// `encoder1`, on the input volume.
    pub encoder1: ResBlockShape,
    /// `encoder2..4`, on hidden states after blocks 3, 6, 9.
    pub skips: [PrUpShape; 3],
    /// `decoder5..2`, coarse to fine.
    pub ups: [UpShape; 4],
    /// Input channels of the 1x1x1 output conv.
    pub out_in_ch: usize,
    /// Classes.
    pub classes: usize,
}

impl DecoderLayout {
    /// The layout MONAI's `UNETR` builds for `cfg`.
    pub fn new(cfg: &UnetrConfig) -> Self {
        let f = cfg.feature_size as usize;
        let e = cfg.vit.hidden_size as usize;
        Self {
            encoder1: ResBlockShape { in_ch: cfg.vit.in_channels as usize, out_ch: f },
            skips: [
                PrUpShape { prefix: "encoder2", out_ch: 2 * f, layers: 2 },
                PrUpShape { prefix: "encoder3", out_ch: 4 * f, layers: 1 },
                PrUpShape { prefix: "encoder4", out_ch: 8 * f, layers: 0 },
            ],
            ups: [
                UpShape { prefix: "decoder5", in_ch: e, out_ch: 8 * f },
                UpShape { prefix: "decoder4", in_ch: 8 * f, out_ch: 4 * f },
                UpShape { prefix: "decoder3", in_ch: 4 * f, out_ch: 2 * f },
                UpShape { prefix: "decoder2", in_ch: 2 * f, out_ch: f },
            ],
            out_in_ch: f,
            classes: cfg.out_channels as usize,
        }
    }
}

fn shape(dims: &[usize]) -> Shape {
    let mut d = [0u32; MAX_RANK];
    for (o, &i) in d.iter_mut().zip(dims) {
        *o = i as u32;
    }
    Shape::new(&d[..dims.len()]).unwrap_or_default()
}

/// Where a model's parameters are made, candle's `VarBuilder` style: a name prefix, extended
/// with [`ParamBuilder::pp`] where a submodule is built, and a function that makes each leaf
/// from its [`ParamSpec`] (reads it from a file, allocates it, or keeps the spec). Each MONAI
/// name segment is written once, in the `build` of the module that owns it.
pub struct ParamBuilder<'f, T, E> {
    prefix: ParamName,
    make: &'f mut dyn FnMut(ParamSpec) -> Result<T, E>,
}

impl<'f, T, E> ParamBuilder<'f, T, E> {
    /// A builder at the root of the names.
    pub fn new(make: &'f mut dyn FnMut(ParamSpec) -> Result<T, E>) -> Self {
        Self { prefix: ParamName::new(), make }
    }

    /// The builder of a submodule: `segment` appended to the prefix (`vb.pp("attn")`).
    pub fn pp(&mut self, segment: impl fmt::Display) -> ParamBuilder<'_, T, E> {
        let prefix = if self.prefix.is_empty() {
            name(format_args!("{segment}"))
        } else {
            name(format_args!("{}.{segment}", self.prefix))
        };
        ParamBuilder { prefix, make: &mut *self.make }
    }

    /// The leaf `prefix.leaf` of shape `dims`.
    pub fn get(&mut self, leaf: &str, dims: &[usize], kind: ParamKind) -> Result<T, E> {
        let spec = ParamSpec { name: name(format_args!("{}.{leaf}", self.prefix)), shape: shape(dims), kind };
        (self.make)(spec)
    }
}

/// The leaves' function for [`UnetrParams::try_map`]: owned values in, new values out.
pub type MapFn<'f, T, U, E> = &'f mut dyn FnMut(T) -> Result<U, E>;

/// A `weight` and its `bias`: a Linear or biased convolution ([`Linear`]) or a LayerNorm's scale
/// and shift ([`Norm`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightBias<T> {
    /// Linear `(out, in)`; Conv3d `(out, in, k, k, k)`; LayerNorm scale `(hidden,)`.
    pub weight: T,
    /// `(out,)`; LayerNorm shift `(hidden,)`.
    pub bias: T,
}

/// A Linear or biased convolution.
pub type Linear<T> = WeightBias<T>;
/// A LayerNorm: scale `weight` and shift `bias`.
pub type Norm<T> = WeightBias<T>;

impl<T> WeightBias<T> {
    /// `weight` of shape `w` and `bias` of shape `(w[0],)`.
    fn build<E>(mut b: ParamBuilder<'_, T, E>, w: &[usize], kind: ParamKind) -> Result<Self, E> {
        Ok(Self { weight: b.get("weight", w, kind)?, bias: b.get("bias", &w[..1], ParamKind::Vector)? })
    }

    /// A LayerNorm over `e` features.
    fn layer_norm<E>(b: ParamBuilder<'_, T, E>, e: usize) -> Result<Self, E> {
        Self::build(b, &[e], ParamKind::Vector)
    }

    fn try_map<U, E>(self, f: MapFn<'_, T, U, E>) -> Result<WeightBias<U>, E> {
        Ok(WeightBias { weight: f(self.weight)?, bias: f(self.bias)? })
    }

    fn as_ref(&self) -> WeightBias<&T> {
        WeightBias { weight: &self.weight, bias: &self.bias }
    }
}

/// MONAI's `SABlock` projections. Field order is the file's order (`out_proj` first).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention<T> {
    /// Output projection `(hidden, hidden)`.
    pub out_proj: Linear<T>,
    /// Fused q, k, v projection `(3 hidden, hidden)`, outputs ordered (qkv, head, dim).
    pub qkv: T,
    /// Its bias `(3 hidden,)`, when the config has one.
    pub qkv_bias: Option<T>,
}

/// MONAI's `MLPBlock`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mlp<T> {
    /// `(mlp, hidden)`.
    pub linear1: Linear<T>,
    /// `(hidden, mlp)`.
    pub linear2: Linear<T>,
}

/// MONAI's `TransformerBlock` (pre-norm). Field order is the file's order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Block<T> {
    /// The MLP.
    pub mlp: Mlp<T>,
    /// Norm before attention.
    pub norm1: Norm<T>,
    /// Attention.
    pub attn: Attention<T>,
    /// Norm before the MLP.
    pub norm2: Norm<T>,
}

impl<T> Block<T> {
    fn build<E>(mut b: ParamBuilder<'_, T, E>, v: &crate::config::VitConfig) -> Result<Self, E> {
        use ParamKind::Linear as L;
        let (e, m) = (v.hidden_size as usize, v.mlp_dim as usize);
        let mlp = {
            let mut b = b.pp("mlp");
            Mlp {
                linear1: Linear::build(b.pp("linear1"), &[m, e], L)?,
                linear2: Linear::build(b.pp("linear2"), &[e, m], L)?,
            }
        };
        let norm1 = Norm::layer_norm(b.pp("norm1"), e)?;
        let attn = {
            let mut b = b.pp("attn");
            let out_proj = Linear::build(b.pp("out_proj"), &[e, e], L)?;
            let mut q = b.pp("qkv");
            let qkv = q.get("weight", &[3 * e, e], L)?;
            let qkv_bias = if v.qkv_bias { Some(q.get("bias", &[3 * e], ParamKind::Vector)?) } else { None };
            Attention { out_proj, qkv, qkv_bias }
        };
        let norm2 = Norm::layer_norm(b.pp("norm2"), e)?;
        Ok(Self { mlp, norm1, attn, norm2 })
    }

    fn try_map<U, E>(self, f: MapFn<'_, T, U, E>) -> Result<Block<U>, E> {
        let mlp = Mlp { linear1: self.mlp.linear1.try_map(f)?, linear2: self.mlp.linear2.try_map(f)? };
        let norm1 = self.norm1.try_map(f)?;
        let attn = Attention {
            out_proj: self.attn.out_proj.try_map(f)?,
            qkv: f(self.attn.qkv)?,
            qkv_bias: self.attn.qkv_bias.map(&mut *f).transpose()?,
        };
        Ok(Block { mlp, norm1, attn, norm2: self.norm2.try_map(f)? })
    }

    fn as_ref(&self) -> Block<&T> {
        Block {
            mlp: Mlp { linear1: self.mlp.linear1.as_ref(), linear2: self.mlp.linear2.as_ref() },
            norm1: self.norm1.as_ref(),
            attn: Attention {
                out_proj: self.attn.out_proj.as_ref(),
                qkv: &self.attn.qkv,
                qkv_bias: self.attn.qkv_bias.as_ref(),
            },
            norm2: self.norm2.as_ref(),
        }
    }
}

/// MONAI's `PatchEmbeddingBlock`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PatchEmbedding<T> {
    /// The patch projection, a Conv3d `(hidden, in, p, p, p)` with bias.
    pub patch_embeddings: Linear<T>,
    /// Learned position table `(1, tokens, hidden)`, when the config uses one.
    pub position_embeddings: Option<T>,
}

/// MONAI's `ViT`.
#[derive(Clone, Debug, PartialEq)]
pub struct Vit<T> {
    /// Patch and position embedding.
    pub patch_embedding: PatchEmbedding<T>,
    /// Transformer blocks.
    pub blocks: heapless::Vec<Block<T>, MAX_DEPTH>,
    /// Final LayerNorm.
    pub norm: Norm<T>,
}

impl<T> Vit<T> {
    // Inlined: the encoder tree holds MAX_DEPTH blocks inline (tens of KB with tensor leaves);
    // built in the caller's frame, it is not copied through each return on a microcontroller's stack.
    #[inline(always)]
    fn build<E>(mut b: ParamBuilder<'_, T, E>, v: &crate::config::VitConfig) -> Result<Self, E> {
        let (e, p, c) = (v.hidden_size as usize, v.patch_size as usize, v.in_channels as usize);
        let patch_embedding = {
            let mut b = b.pp("patch_embedding");
            PatchEmbedding {
                patch_embeddings: Linear::build(b.pp("patch_embeddings"), &[e, c, p, p, p], ParamKind::Conv)?,
                position_embeddings: match v.pos_embed {
                    PosEmbed::Learned => Some(b.get(
                        "position_embeddings",
                        &[1, v.num_tokens(), e],
                        ParamKind::PositionTable,
                    )?),
                    PosEmbed::SinCos => None,
                },
            }
        };
        let mut blocks = heapless::Vec::new();
        let mut bb = b.pp("blocks");
        for i in 0..(v.depth as usize).min(MAX_DEPTH) {
            // Cannot overflow: at most MAX_DEPTH (validate() caps depth there too).
            let _ = blocks.push(Block::build(bb.pp(i), v)?);
        }
        Ok(Self { patch_embedding, blocks, norm: Norm::layer_norm(b.pp("norm"), e)? })
    }

    fn try_map<U, E>(self, f: MapFn<'_, T, U, E>) -> Result<Vit<U>, E> {
        let patch_embedding = PatchEmbedding {
            patch_embeddings: self.patch_embedding.patch_embeddings.try_map(f)?,
            position_embeddings: self.patch_embedding.position_embeddings.map(&mut *f).transpose()?,
        };
        let mut blocks = heapless::Vec::new();
        for b in self.blocks {
            let _ = blocks.push(b.try_map(f)?);
        }
        Ok(Vit { patch_embedding, blocks, norm: self.norm.try_map(f)? })
    }

    fn as_ref(&self) -> Vit<&T> {
        Vit {
            patch_embedding: PatchEmbedding {
                patch_embeddings: self.patch_embedding.patch_embeddings.as_ref(),
                position_embeddings: self.patch_embedding.position_embeddings.as_ref(),
            },
            blocks: self.blocks.iter().map(Block::as_ref).collect(),
            norm: self.norm.as_ref(),
        }
    }
}

/// MONAI's `UnetResBlock`: `conv1`, `conv2` and, when channels change, the projection `conv3`
/// (each `convN.conv.weight`: MONAI's `Convolution` wraps the Conv3d, no bias).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResBlock<T> {
    /// Channel counts.
    pub shape: ResBlockShape,
    /// First 3x3x3 conv `(out, in, 3, 3, 3)`.
    pub conv1: T,
    /// Second 3x3x3 conv `(out, out, 3, 3, 3)`.
    pub conv2: T,
    /// 1x1x1 residual projection `(out, in, 1, 1, 1)`.
    pub conv3: Option<T>,
}

impl<T> ResBlock<T> {
    fn build<E>(mut b: ParamBuilder<'_, T, E>, s: ResBlockShape) -> Result<Self, E> {
        let (i, o, k) = (s.in_ch, s.out_ch, ParamKind::Conv);
        let conv1 = b.pp("conv1").pp("conv").get("weight", &[o, i, 3, 3, 3], k)?;
        let conv2 = b.pp("conv2").pp("conv").get("weight", &[o, o, 3, 3, 3], k)?;
        let conv3 = if s.has_projection() {
            Some(b.pp("conv3").pp("conv").get("weight", &[o, i, 1, 1, 1], k)?)
        } else {
            None
        };
        Ok(Self { shape: s, conv1, conv2, conv3 })
    }

    fn try_map<U, E>(self, f: MapFn<'_, T, U, E>) -> Result<ResBlock<U>, E> {
        Ok(ResBlock {
            shape: self.shape,
            conv1: f(self.conv1)?,
            conv2: f(self.conv2)?,
            conv3: self.conv3.map(f).transpose()?,
        })
    }

    fn as_ref(&self) -> ResBlock<&T> {
        ResBlock { shape: self.shape, conv1: &self.conv1, conv2: &self.conv2, conv3: self.conv3.as_ref() }
    }
}

/// One stage of a skip path (`encoderN.blocks.j`): transposed conv `0`, residual block `1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrUpStage<T> {
    /// `blocks.j.0.conv.weight`: 2x2x2 transposed conv `(out, out, 2, 2, 2)`.
    pub transp_conv: T,
    /// `blocks.j.1`: residual block at the new resolution.
    pub res_block: ResBlock<T>,
}

/// MONAI's `UnetrPrUpBlock` (`encoder2..4`): a transposed conv from the token grid, then
/// `layers` stages.
#[derive(Clone, Debug, PartialEq)]
pub struct PrUp<T> {
    /// Channel counts and depth.
    pub shape: PrUpShape,
    /// `transp_conv_init.conv.weight` `(hidden, out, 2, 2, 2)`.
    pub transp_conv_init: T,
    /// `blocks.0`, `blocks.1`.
    pub blocks: heapless::Vec<PrUpStage<T>, 2>,
}

impl<T> PrUp<T> {
    fn build<E>(mut b: ParamBuilder<'_, T, E>, s: PrUpShape, hidden: usize) -> Result<Self, E> {
        let (o, k) = (s.out_ch, ParamKind::ConvTranspose);
        let transp_conv_init = b.pp("transp_conv_init").pp("conv").get("weight", &[hidden, o, 2, 2, 2], k)?;
        let mut blocks = heapless::Vec::new();
        let mut bb = b.pp("blocks");
        for j in 0..s.layers.min(2) {
            let mut stage = bb.pp(j);
            let transp_conv = stage.pp(0).pp("conv").get("weight", &[o, o, 2, 2, 2], k)?;
            let res_block = ResBlock::build(stage.pp(1), ResBlockShape { in_ch: o, out_ch: o })?;
            let _ = blocks.push(PrUpStage { transp_conv, res_block });
        }
        Ok(Self { shape: s, transp_conv_init, blocks })
    }

    fn try_map<U, E>(self, f: MapFn<'_, T, U, E>) -> Result<PrUp<U>, E> {
        let transp_conv_init = f(self.transp_conv_init)?;
        let mut blocks = heapless::Vec::new();
        for s in self.blocks {
            let _ =
                blocks.push(PrUpStage { transp_conv: f(s.transp_conv)?, res_block: s.res_block.try_map(f)? });
        }
        Ok(PrUp { shape: self.shape, transp_conv_init, blocks })
    }

    fn as_ref(&self) -> PrUp<&T> {
        PrUp {
            shape: self.shape,
            transp_conv_init: &self.transp_conv_init,
            blocks: self
                .blocks
                .iter()
                .map(|s| PrUpStage { transp_conv: &s.transp_conv, res_block: s.res_block.as_ref() })
                .collect(),
        }
    }
}

/// MONAI's `UnetrUpBlock` (`decoder5..2`): transposed conv, concatenation with the skip,
/// residual block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Up<T> {
    /// Channel counts.
    pub shape: UpShape,
    /// `transp_conv.conv.weight` `(in, out, 2, 2, 2)`.
    pub transp_conv: T,
    /// `conv_block`, on `2 out` channels.
    pub conv_block: ResBlock<T>,
}

impl<T> Up<T> {
    fn build<E>(mut b: ParamBuilder<'_, T, E>, u: UpShape) -> Result<Self, E> {
        let (i, o) = (u.in_ch, u.out_ch);
        let transp_conv =
            b.pp("transp_conv").pp("conv").get("weight", &[i, o, 2, 2, 2], ParamKind::ConvTranspose)?;
        let conv_block = ResBlock::build(b.pp("conv_block"), ResBlockShape { in_ch: 2 * o, out_ch: o })?;
        Ok(Self { shape: u, transp_conv, conv_block })
    }

    fn try_map<U, E>(self, f: MapFn<'_, T, U, E>) -> Result<Up<U>, E> {
        Ok(Up {
            shape: self.shape,
            transp_conv: f(self.transp_conv)?,
            conv_block: self.conv_block.try_map(f)?,
        })
    }

    fn as_ref(&self) -> Up<&T> {
        Up { shape: self.shape, transp_conv: &self.transp_conv, conv_block: self.conv_block.as_ref() }
    }
}

/// Every parameter of MONAI's `UNETR`, one field per state-dict module, with leaves of any type:
/// [`ParamSpec`]s ([`UnetrParams::specs`], the one place the names are made), a weight file's
/// tensors (`glmae_core::model::UnetrWeights`), packed kernels, or `&T` ([`UnetrParams::as_ref`]).
/// [`UnetrParams::try_map`] and [`UnetrParams::visit`] walk the leaves in the file's order.
#[derive(Clone, Debug, PartialEq)]
pub struct UnetrParams<T> {
    /// The encoder.
    pub vit: Vit<T>,
    /// `encoder1.layer`: residual block on the input volume.
    pub encoder1: ResBlock<T>,
    /// Skip path from the hidden state after block 3.
    pub encoder2: PrUp<T>,
    /// After block 6.
    pub encoder3: PrUp<T>,
    /// After block 9.
    pub encoder4: PrUp<T>,
    /// Decoder stage from the last hidden state, with `encoder4`'s skip.
    pub decoder5: Up<T>,
    /// With `encoder3`'s skip.
    pub decoder4: Up<T>,
    /// With `encoder2`'s skip.
    pub decoder3: Up<T>,
    /// With `encoder1`'s skip, at full resolution.
    pub decoder2: Up<T>,
    /// `out.conv.conv`: the 1x1x1 output conv `(classes, feature, 1, 1, 1)` with bias.
    pub out: Linear<T>,
}

impl<T> UnetrParams<T> {
    /// Builds the tree for `cfg`, making each leaf with `b`'s function.
    #[inline(always)]
    pub fn build<E>(cfg: &UnetrConfig, mut b: ParamBuilder<'_, T, E>) -> Result<Self, E> {
        let d = DecoderLayout::new(cfg);
        let e = cfg.vit.hidden_size as usize;
        let vit = Vit::build(b.pp("vit"), &cfg.vit)?;
        let encoder1 = ResBlock::build(b.pp("encoder1").pp("layer"), d.encoder1)?;
        let [s2, s3, s4] = d.skips;
        let encoder2 = PrUp::build(b.pp(s2.prefix), s2, e)?;
        let encoder3 = PrUp::build(b.pp(s3.prefix), s3, e)?;
        let encoder4 = PrUp::build(b.pp(s4.prefix), s4, e)?;
        let [u5, u4, u3, u2] = d.ups;
        let decoder5 = Up::build(b.pp(u5.prefix), u5)?;
        let decoder4 = Up::build(b.pp(u4.prefix), u4)?;
        let decoder3 = Up::build(b.pp(u3.prefix), u3)?;
        let decoder2 = Up::build(b.pp(u2.prefix), u2)?;
        let out = Linear::build(
            b.pp("out").pp("conv").pp("conv"),
            &[d.classes, d.out_in_ch, 1, 1, 1],
            ParamKind::Conv,
        )?;
        Ok(Self { vit, encoder1, encoder2, encoder3, encoder4, decoder5, decoder4, decoder3, decoder2, out })
    }

    /// The same tree with every leaf replaced by `f(leaf)`, in the file's order; the first error
    /// stops the walk.
    pub fn try_map<U, E>(self, mut f: impl FnMut(T) -> Result<U, E>) -> Result<UnetrParams<U>, E> {
        let f: MapFn<'_, T, U, E> = &mut f;
        Ok(UnetrParams {
            vit: self.vit.try_map(f)?,
            encoder1: self.encoder1.try_map(f)?,
            encoder2: self.encoder2.try_map(f)?,
            encoder3: self.encoder3.try_map(f)?,
            encoder4: self.encoder4.try_map(f)?,
            decoder5: self.decoder5.try_map(f)?,
            decoder4: self.decoder4.try_map(f)?,
            decoder3: self.decoder3.try_map(f)?,
            decoder2: self.decoder2.try_map(f)?,
            out: self.out.try_map(f)?,
        })
    }

    /// The tree of references to this one's leaves.
    pub fn as_ref(&self) -> UnetrParams<&T> {
        UnetrParams {
            vit: self.vit.as_ref(),
            encoder1: self.encoder1.as_ref(),
            encoder2: self.encoder2.as_ref(),
            encoder3: self.encoder3.as_ref(),
            encoder4: self.encoder4.as_ref(),
            decoder5: self.decoder5.as_ref(),
            decoder4: self.decoder4.as_ref(),
            decoder3: self.decoder3.as_ref(),
            decoder2: self.decoder2.as_ref(),
            out: self.out.as_ref(),
        }
    }

    /// Calls `f` on every leaf, in the file's order.
    pub fn visit(&self, mut f: impl FnMut(&T)) {
        infallible(self.as_ref().try_map(|t| {
            f(t);
            Ok(())
        }));
    }

    /// `encoder2..4`, the skip paths from the hidden states after blocks 3, 6 and 9.
    pub fn skips(&self) -> [&PrUp<T>; 3] {
        [&self.encoder2, &self.encoder3, &self.encoder4]
    }

    /// `decoder5..2`, coarse to fine.
    pub fn ups(&self) -> [&Up<T>; 4] {
        [&self.decoder5, &self.decoder4, &self.decoder3, &self.decoder2]
    }
}

impl Vit<ParamSpec> {
    /// The encoder's names, shapes and kinds (`vit.*`), as [`UnetrParams::specs`] has them.
    pub fn specs(cfg: &crate::config::VitConfig) -> Self {
        let mut keep = |s: ParamSpec| Ok(s);
        infallible(Self::build(ParamBuilder::new(&mut keep).pp("vit"), cfg))
    }
}

impl UnetrParams<ParamSpec> {
    /// Every parameter's name, shape and kind for `cfg`.
    pub fn specs(cfg: &UnetrConfig) -> Self {
        let mut keep = |s: ParamSpec| Ok(s);
        infallible(Self::build(cfg, ParamBuilder::new(&mut keep)))
    }
}

/// Calls `f` once for every parameter of `cfg`, in the file's order (encoder, then decoder).
pub fn for_each_param(cfg: &UnetrConfig, mut f: impl FnMut(ParamSpec)) {
    infallible(UnetrParams::specs(cfg).try_map(|s| {
        f(s);
        Ok(())
    }));
}

/// The value of a walk whose leaf function cannot fail.
fn infallible<T>(r: Result<T, core::convert::Infallible>) -> T {
    match r {
        Ok(t) => t,
        Err(never) => match never {},
    }
}

/// Number of parameters (tensors) of `cfg`.
pub fn param_count(cfg: &UnetrConfig) -> usize {
    let mut n = 0;
    for_each_param(cfg, |_| n += 1);
    n
}

/// Number of scalar weights of `cfg`.
pub fn weight_count(cfg: &UnetrConfig) -> usize {
    let mut n = 0;
    for_each_param(cfg, |p| n += p.shape.numel());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_t_unetr_has_monais_parameter_count() {
        // MONAI's UNETR(1, 14, (96,96,96), feature_size=16, hidden_size=192, mlp_dim=768,
        // num_heads=3, qkv_bias=True, pos_embed sincos) reports 8.99 M parameters
        // (../shared/docs/data.md); that count includes the 216 x 192 sin-cos table, which we
        // regenerate instead of storing.
        let cfg = UnetrConfig::vit_t([96; 3], 14);
        let n = weight_count(&cfg);
        assert_eq!(((n + 216 * 192) as f64 / 1e4).round(), 899.0, "{n}");
        assert_eq!(n, 8_946_670);
    }

    /// `try_map` and `visit` walk the leaves in the order `build` made them: the i-th leaf of a
    /// file's bound tree is the tensor the file holds under the i-th spec's name (every tensor of
    /// a random model differs), for learned and sin-cos positions, with and without a qkv bias.
    #[cfg(feature = "alloc")]
    #[test]
    fn tree_walks_leaves_in_build_order() -> Result<(), crate::format::FormatError> {
        use crate::format::{ModelFile, Precision};
        extern crate alloc;
        use alloc::vec::Vec;
        for (pos, qkv_bias) in [(PosEmbed::SinCos, false), (PosEmbed::Learned, true)] {
            let mut cfg = crate::testing_config();
            cfg.vit.pos_embed = pos;
            cfg.vit.qkv_bias = qkv_bias;
            let bytes = crate::synthetic::random_model(&cfg, 3, Precision::F32)?;
            let file = ModelFile::parse(&bytes)?;
            let weights = crate::model::UnetrWeights::bind(&file)?;
            let mut specs = Vec::new();
            UnetrParams::specs(&cfg).visit(|s| specs.push(s.clone()));
            let mut leaves = Vec::new();
            weights.visit(|t| leaves.push(*t));
            assert_eq!(specs.len(), leaves.len());
            assert_eq!(specs.len(), param_count(&cfg));
            for (spec, leaf) in specs.iter().zip(&leaves) {
                let stored = file.tensor(&spec.name, spec.shape)?;
                assert_eq!(leaf.shape(), spec.shape, "{}", spec.name);
                let same = (0..leaf.len()).all(|i| leaf.get(i) == stored.get(i));
                assert!(same, "leaf at {} holds another tensor", spec.name);
            }
        }
        Ok(())
    }

    #[test]
    fn names_match_monai() {
        let cfg = UnetrConfig::vit_t([96; 3], 14);
        let mut names = heapless::Vec::<ParamName, 256>::new();
        for_each_param(&cfg, |p| names.push(p.name).unwrap());
        for expected in [
            "vit.blocks.3.attn.qkv.weight",
            "encoder2.blocks.0.1.conv1.conv.weight",
            "encoder1.layer.conv3.conv.weight",
            "decoder5.conv_block.conv3.conv.weight",
            "out.conv.conv.weight",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing");
        }
        assert!(!names.iter().any(|n| n.as_str() == "encoder2.blocks.0.1.conv3.conv.weight"));
        assert_eq!(names.len(), param_count(&cfg));
    }
}
