//! Importing MONAI UNETR state dicts (and the GL-MAE authors' checkpoints, whose keys carry a
//! `module.backbone.` prefix) into glmae-core's format.
//!
//! Reads safetensors. A PyTorch `.pt`/`.pth` file is refused with the one-line conversion to
//! run first (`safetensors.torch.save_file`), since a pickle reader is not built in yet.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use glmae_core::params::for_each_param;
use glmae_core::{PosEmbed, UnetrConfig, VitConfig};
use safetensors::{Dtype, SafeTensors};

use crate::export::NamedTensor;

/// What the weights cannot tell: MONAI's defaults are 12 heads and LayerNorm eps 1e-5.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportOptions {
    /// Attention heads.
    pub num_heads: u32,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self { num_heads: 12, layer_norm_eps: 1e-5 }
    }
}

/// Prefixes wrappers add: DataParallel (`module.`), the GL-MAE authors' `module.backbone.`.
const PREFIXES: [&str; 3] = ["module.backbone.", "module.", "backbone."];

fn canonical(name: &str) -> &str {
    PREFIXES.iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name)
}

/// MONAI parameters our UNETR does not have: the cross-attention block MONAI builds in every
/// transformer block even when it is disabled.
fn ignored(name: &str) -> bool {
    name.contains(".cross_attn.") || name.contains(".norm_cross_attn.")
}

/// Reads every float tensor of a safetensors file (f32, f16, bf16 or f64) under its canonical name.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, NamedTensor>> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    if ext == "pt" || ext == "pth" {
        bail!(
            "{}: PyTorch pickle files are not read directly yet; convert it first with\n  python3 -c \"import torch, sys; from safetensors.torch import save_file; sd = torch.load(sys.argv[1], map_location='cpu'); sd = sd.get('student', sd.get('state_dict', sd)); save_file({{k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}}, sys.argv[1] + '.safetensors')\" {}",
            path.display(),
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => {
                data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or_default()) as f32)
                .collect(),
            Dtype::F16 => {
                data.chunks_exact(2).map(|b| half_to_f32(u16::from_le_bytes([b[0], b[1]]), false)).collect()
            }
            Dtype::BF16 => {
                data.chunks_exact(2).map(|b| half_to_f32(u16::from_le_bytes([b[0], b[1]]), true)).collect()
            }
            _ => continue, // integer buffers (e.g. batch counters) are not weights
        };
        let canon = canonical(&name).to_string();
        out.insert(canon.clone(), NamedTensor { name: canon, shape: view.shape().to_vec(), values });
    }
    Ok(out)
}

fn half_to_f32(h: u16, bf16: bool) -> f32 {
    if bf16 {
        return f32::from_bits((h as u32) << 16);
    }
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if frac == 0 => sign,
        // Subnormal half: frac x 2^-24, exact in f32.
        0 => {
            let magnitude = frac as f32 * 2f32.powi(-24);
            return if sign != 0 { -magnitude } else { magnitude };
        }
        31 => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | (((exp - 15 + 127) as u32) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

fn dims(t: &BTreeMap<String, NamedTensor>, name: &str) -> Result<Vec<usize>> {
    t.get(name)
        .map(|x| x.shape.clone())
        .with_context(|| format!("missing `{name}`, which fixes the architecture"))
}

/// The UNETR configuration a MONAI state dict implies, and its tensors under our names. Every
/// missing, unexpected or misshapen tensor is listed in one error.
pub fn import_unetr(path: &Path, opts: &ImportOptions) -> Result<(UnetrConfig, Vec<NamedTensor>)> {
    let mut t = read_tensors(path)?;
    t.retain(|k, _| !ignored(k));
    let name = path.display();
    let pe = dims(&t, "vit.patch_embedding.patch_embeddings.weight").with_context(|| format!("{name}"))?;
    ensure!(
        pe.len() == 5,
        "{name}: patch embedding weight has shape {pe:?}, expected (hidden, channels, p, p, p)"
    );
    let (hidden, in_channels, patch) = (pe[0] as u32, pe[1] as u32, pe[2] as u32);
    let mlp = dims(&t, "vit.blocks.0.mlp.linear1.weight").with_context(|| format!("{name}"))?[0] as u32;
    let depth = (0..).take_while(|i| t.contains_key(&format!("vit.blocks.{i}.norm1.weight"))).count() as u32;
    let feature = dims(&t, "encoder1.layer.conv1.conv.weight").with_context(|| format!("{name}"))?[0] as u32;
    let classes = dims(&t, "out.conv.conv.weight").with_context(|| format!("{name}"))?[0] as u32;
    let qkv_bias = t.contains_key("vit.blocks.0.attn.qkv.bias");
    let mut vit = VitConfig {
        in_channels,
        img_size: [96; 3],
        patch_size: patch,
        hidden_size: hidden,
        depth,
        num_heads: opts.num_heads,
        mlp_dim: mlp,
        qkv_bias,
        layer_norm_eps: opts.layer_norm_eps,
        pos_embed: PosEmbed::Learned,
    };
    // MONAI stores the position table even when it is sin-cos; a cubic grid is assumed for the
    // window (MONAI's ROIs are cubic), and a table equal to our sin-cos one is dropped.
    if let Some(pos) = t.get("vit.patch_embedding.position_embeddings") {
        let n = pos.shape.get(1).copied().unwrap_or(0);
        let g = (n as f64).cbrt().round() as usize;
        ensure!(g * g * g == n, "{name}: {n} position embeddings do not form a cubic token grid");
        vit.img_size = [g as u32 * patch; 3];
        let sincos = crate::views::sincos_table([g; 3], hidden as usize);
        if hidden % 6 == 0 && sincos.iter().zip(&pos.values).all(|(a, b)| (a - b).abs() < 1e-4) {
            vit.pos_embed = PosEmbed::SinCos;
            t.remove("vit.patch_embedding.position_embeddings");
        }
    } else {
        vit.pos_embed = PosEmbed::SinCos;
    }
    let cfg = UnetrConfig { vit, feature_size: feature, out_channels: classes };
    cfg.validate().with_context(|| format!("{name}: the weights imply an invalid UNETR"))?;

    let mut problems = Vec::new();
    let mut out = Vec::new();
    for_each_param(&cfg, |p| match t.remove(p.name.as_str()) {
        Some(x) => {
            let want: Vec<usize> = p.shape.dims().iter().map(|&d| d as usize).collect();
            if x.shape == want {
                out.push(x);
            } else {
                problems.push(format!("`{}` has shape {:?}, expected {want:?}", p.name, x.shape));
            }
        }
        None => problems.push(format!("missing `{}` {:?}", p.name, p.shape.dims())),
    });
    for (k, v) in &t {
        problems.push(format!("unexpected `{k}` {:?}", v.shape));
    }
    if !problems.is_empty() {
        bail!("{name}: not a MONAI UNETR state dict for {cfg:?}:\n  {}", problems.join("\n  "));
    }
    Ok((cfg, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_decodes() {
        assert_eq!(half_to_f32(0x3c00, false), 1.0);
        assert_eq!(half_to_f32(0xc000, false), -2.0);
        assert_eq!(half_to_f32(0x0001, false), 2f32.powi(-24));
        assert_eq!(half_to_f32(0x83ff, false), -1023.0 * 2f32.powi(-24));
        assert_eq!(half_to_f32(0x3f80, true), 1.0);
        assert!(half_to_f32(0x7e00, false).is_nan());
    }

    #[test]
    fn prefixes_and_cross_attention_are_handled() {
        assert_eq!(canonical("module.backbone.vit.norm.weight"), "vit.norm.weight");
        assert_eq!(canonical("module.out.conv.conv.bias"), "out.conv.conv.bias");
        assert!(ignored("vit.blocks.3.norm_cross_attn.weight"));
        assert!(!ignored("vit.blocks.3.attn.qkv.weight"));
    }
}
