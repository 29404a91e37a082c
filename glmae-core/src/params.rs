//! Every parameter of a UNETR, named as MONAI names it.
//!
//! This enumeration is the contract between the trainer, the weight file, importers and the
//! reference forward pass: a weight file holds exactly these tensors with exactly these shapes.

use core::fmt::{self, Write};

use crate::config::{PosEmbed, UnetrConfig};

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

fn emit(f: &mut impl FnMut(ParamSpec), args: fmt::Arguments<'_>, dims: &[usize], kind: ParamKind) {
    f(ParamSpec { name: name(args), shape: shape(dims), kind });
}

fn res_block_params(f: &mut impl FnMut(ParamSpec), prefix: fmt::Arguments<'_>, b: ResBlockShape) {
    let mut p = ParamName::new();
    let _ = p.write_fmt(prefix);
    emit(f, format_args!("{p}.conv1.conv.weight"), &[b.out_ch, b.in_ch, 3, 3, 3], ParamKind::Conv);
    emit(f, format_args!("{p}.conv2.conv.weight"), &[b.out_ch, b.out_ch, 3, 3, 3], ParamKind::Conv);
    if b.has_projection() {
        emit(f, format_args!("{p}.conv3.conv.weight"), &[b.out_ch, b.in_ch, 1, 1, 1], ParamKind::Conv);
    }
}

/// Calls `f` once for every parameter of `cfg`, in a fixed order (encoder, then decoder).
pub fn for_each_param(cfg: &UnetrConfig, mut f: impl FnMut(ParamSpec)) {
    let v = &cfg.vit;
    let (e, m, p, c) =
        (v.hidden_size as usize, v.mlp_dim as usize, v.patch_size as usize, v.in_channels as usize);
    let f = &mut f;
    use ParamKind::*;
    emit(f, format_args!("vit.patch_embedding.patch_embeddings.weight"), &[e, c, p, p, p], Conv);
    emit(f, format_args!("vit.patch_embedding.patch_embeddings.bias"), &[e], Vector);
    if v.pos_embed == PosEmbed::Learned {
        let n = v.num_tokens();
        emit(f, format_args!("vit.patch_embedding.position_embeddings"), &[1, n, e], PositionTable);
    }
    for i in 0..v.depth as usize {
        let b = "vit.blocks";
        emit(f, format_args!("{b}.{i}.mlp.linear1.weight"), &[m, e], Linear);
        emit(f, format_args!("{b}.{i}.mlp.linear1.bias"), &[m], Vector);
        emit(f, format_args!("{b}.{i}.mlp.linear2.weight"), &[e, m], Linear);
        emit(f, format_args!("{b}.{i}.mlp.linear2.bias"), &[e], Vector);
        emit(f, format_args!("{b}.{i}.norm1.weight"), &[e], Vector);
        emit(f, format_args!("{b}.{i}.norm1.bias"), &[e], Vector);
        emit(f, format_args!("{b}.{i}.attn.out_proj.weight"), &[e, e], Linear);
        emit(f, format_args!("{b}.{i}.attn.out_proj.bias"), &[e], Vector);
        emit(f, format_args!("{b}.{i}.attn.qkv.weight"), &[3 * e, e], Linear);
        if v.qkv_bias {
            emit(f, format_args!("{b}.{i}.attn.qkv.bias"), &[3 * e], Vector);
        }
        emit(f, format_args!("{b}.{i}.norm2.weight"), &[e], Vector);
        emit(f, format_args!("{b}.{i}.norm2.bias"), &[e], Vector);
    }
    emit(f, format_args!("vit.norm.weight"), &[e], Vector);
    emit(f, format_args!("vit.norm.bias"), &[e], Vector);

    let d = DecoderLayout::new(cfg);
    res_block_params(f, format_args!("encoder1.layer"), d.encoder1);
    for s in d.skips {
        let (n, o) = (s.prefix, s.out_ch);
        emit(f, format_args!("{n}.transp_conv_init.conv.weight"), &[e, o, 2, 2, 2], ConvTranspose);
        for j in 0..s.layers {
            emit(f, format_args!("{n}.blocks.{j}.0.conv.weight"), &[o, o, 2, 2, 2], ConvTranspose);
            let rb = ResBlockShape { in_ch: o, out_ch: o };
            res_block_params(f, format_args!("{n}.blocks.{j}.1"), rb);
        }
    }
    for u in d.ups {
        let (n, i, o) = (u.prefix, u.in_ch, u.out_ch);
        emit(f, format_args!("{n}.transp_conv.conv.weight"), &[i, o, 2, 2, 2], ConvTranspose);
        res_block_params(f, format_args!("{n}.conv_block"), ResBlockShape { in_ch: 2 * o, out_ch: o });
    }
    emit(f, format_args!("out.conv.conv.weight"), &[d.classes, d.out_in_ch, 1, 1, 1], Conv);
    emit(f, format_args!("out.conv.conv.bias"), &[d.classes], Vector);
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
