//! The trained encoder's weights under glmae-core's (MONAI's) names and PyTorch layouts, the
//! bridge from a burn run to `.glmae` files and MONAI state dicts.

use anyhow::{Result, anyhow};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::Tensor;
use glmae_core::VitConfig;

use crate::model::Vit;

/// A named tensor in PyTorch layout.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// MONAI state-dict name.
    pub name: String,
    /// PyTorch shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// A tensor's values as f32, row-major.
pub fn tensor_values<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow!("reading a parameter: {e:?}"))
}

/// Appends `t` under `name` (the one place a tensor becomes a [`NamedTensor`]).
pub(crate) fn push<const D: usize>(out: &mut Vec<NamedTensor>, name: String, t: Tensor<D>) -> Result<()> {
    out.push(NamedTensor { name, shape: t.dims().to_vec(), values: tensor_values(t)? });
    Ok(())
}

/// A weight and its optional bias as `{name}.weight` / `{name}.bias`.
fn weight_and_bias<const D: usize>(
    out: &mut Vec<NamedTensor>,
    name: &str,
    w: Tensor<D>,
    b: Option<Tensor<1>>,
) -> Result<()> {
    push(out, format!("{name}.weight"), w)?;
    match b {
        Some(b) => push(out, format!("{name}.bias"), b),
        None => Ok(()),
    }
}

fn linear(out: &mut Vec<NamedTensor>, name: &str, l: &Linear) -> Result<()> {
    // burn stores Linear weights (in, out); PyTorch (out, in).
    weight_and_bias(out, name, l.weight.val().transpose(), l.bias.as_ref().map(|b| b.val()))
}

fn norm(out: &mut Vec<NamedTensor>, name: &str, n: &LayerNorm) -> Result<()> {
    weight_and_bias(out, name, n.gamma.val(), n.beta.as_ref().map(|b| b.val()))
}

/// Every encoder parameter as `vit.*` tensors, in glmae-core's order. The patch embedding becomes
/// the Conv3d kernel `(hidden, in_channels, p, p, p)` it is equivalent to.
pub fn encoder_tensors(vit: &Vit, cfg: &VitConfig) -> Result<Vec<NamedTensor>> {
    let mut out = Vec::new();
    let pe = &vit.patch_embedding.patch_embeddings;
    let (e, c, p) = (cfg.hidden_size as usize, cfg.in_channels as usize, cfg.patch_size as usize);
    let w = pe.weight.val().transpose();
    out.push(NamedTensor {
        name: "vit.patch_embedding.patch_embeddings.weight".into(),
        shape: vec![e, c, p, p, p],
        values: tensor_values(w)?,
    });
    if let Some(b) = &pe.bias {
        out.push(NamedTensor {
            name: "vit.patch_embedding.patch_embeddings.bias".into(),
            shape: vec![e],
            values: tensor_values(b.val())?,
        });
    }
    for (i, b) in vit.blocks.iter().enumerate() {
        let pre = format!("vit.blocks.{i}");
        linear(&mut out, &format!("{pre}.mlp.linear1"), &b.mlp.linear1)?;
        linear(&mut out, &format!("{pre}.mlp.linear2"), &b.mlp.linear2)?;
        norm(&mut out, &format!("{pre}.norm1"), &b.norm1)?;
        linear(&mut out, &format!("{pre}.attn.out_proj"), &b.attn.out_proj)?;
        linear(&mut out, &format!("{pre}.attn.qkv"), &b.attn.qkv)?;
        norm(&mut out, &format!("{pre}.norm2"), &b.norm2)?;
    }
    norm(&mut out, "vit.norm", &vit.norm)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use glmae_core::params::for_each_param;

    #[test]
    fn encoder_names_and_shapes_match_glmae_core() {
        let mut cfg = glmae_core::testing_config();
        cfg.vit.qkv_bias = true;
        let vit = Vit::new(&cfg.vit, &Device::flex());
        let ours: Vec<(String, Vec<usize>)> =
            encoder_tensors(&vit, &cfg.vit).unwrap().into_iter().map(|t| (t.name, t.shape)).collect();
        let mut core = Vec::new();
        for_each_param(&cfg, |p| {
            if p.name.starts_with("vit.") {
                core.push((
                    p.name.to_string(),
                    p.shape.dims().iter().map(|&d| d as usize).collect::<Vec<_>>(),
                ));
            }
        });
        assert_eq!(ours, core);
    }

    #[test]
    fn patch_embedding_becomes_the_equivalent_conv_kernel() {
        // Linear on a patch flattened in (c, z, y, x) order equals Conv3d with that kernel: the
        // exported kernel's element (e, 0, z, y, x) is the Linear weight of input z*p*p + y*p + x.
        let cfg = glmae_core::testing_config().vit;
        let vit = Vit::new(&cfg, &Device::flex());
        let t = &encoder_tensors(&vit, &cfg).unwrap()[0];
        let w = tensor_values(vit.patch_embedding.patch_embeddings.weight.val()).unwrap(); // (in, out)
        let (e, p) = (cfg.hidden_size as usize, cfg.patch_size as usize);
        let (oe, z, y, x) = (5, 3, 7, 11);
        let input = (z * p + y) * p + x;
        assert_eq!(t.values[oe * p * p * p + input], w[input * e + oe]);
    }
}
