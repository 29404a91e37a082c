//! MONAI's names and PyTorch's layouts for the burn networks' parameters, in both directions:
//! [`walk_vit`] and [`Unetr::walk`](crate::nets::unetr::Unetr::walk) name every parameter once, and a
//! [`ParamVisitor`] either reads them out ([`Reader`]: `.glmae` export, MONAI state dicts) or
//! writes values in ([`Writer`]: fine-tuning from a `.glmae` model).

use std::collections::HashMap;

use anyhow::{Result, anyhow, ensure};
use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Tensor, TensorData};
use glmae_core::VitConfig;
use glmae_core::params::{self, ParamSpec};

use crate::nets::vit::Vit;

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

/// How a burn parameter relates to its PyTorch tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Layout {
    /// Same shape and order (norms, biases, convolution kernels).
    Same,
    /// A Linear weight: burn `(in, out)`, PyTorch `(out, in)`.
    Transposed,
    /// The patch embedding: burn's Linear `(c p^3, hidden)` is PyTorch's Conv3d kernel of this
    /// shape `(hidden, c, p, p, p)`.
    PatchKernel([usize; 5]),
    /// The learned position table: burn `(tokens, hidden)`, PyTorch `(1, tokens, hidden)`.
    Batched,
}

impl Layout {
    /// The PyTorch shape of a burn tensor of shape `dims`.
    fn torch_shape(&self, dims: &[usize]) -> Vec<usize> {
        match self {
            Layout::Same => dims.to_vec(),
            Layout::Transposed => vec![dims[1], dims[0]],
            Layout::PatchKernel(s) => s.to_vec(),
            Layout::Batched => [&[1], dims].concat(),
        }
    }
}

/// Sees every parameter under its MONAI name; may replace its value.
pub trait ParamVisitor {
    /// Visits `p`, returning it (a writer returns it with new values).
    fn param<const D: usize>(
        &mut self,
        name: &str,
        p: Param<Tensor<D>>,
        layout: Layout,
    ) -> Result<Param<Tensor<D>>>;
}

/// Visits a Linear's `weight` and `bias` under the names of `spec`.
pub fn linear(v: &mut impl ParamVisitor, spec: &params::Linear<ParamSpec>, l: &mut Linear) -> Result<()> {
    l.weight = v.param(&spec.weight.name, l.weight.clone(), Layout::Transposed)?;
    if let Some(b) = l.bias.clone() {
        l.bias = Some(v.param(&spec.bias.name, b, Layout::Same)?);
    }
    Ok(())
}

/// Visits a LayerNorm's `weight` (gamma) and `bias` (beta) under the names of `spec`.
pub fn norm(v: &mut impl ParamVisitor, spec: &params::Norm<ParamSpec>, n: &mut LayerNorm) -> Result<()> {
    n.gamma = v.param(&spec.weight.name, n.gamma.clone(), Layout::Same)?;
    if let Some(b) = n.beta.clone() {
        n.beta = Some(v.param(&spec.bias.name, b, Layout::Same)?);
    }
    Ok(())
}

/// Every encoder parameter as `vit.*`, in glmae-core's order, with the learned position table
/// (when the model has one) where MONAI keeps it, after the patch embedding. The names are
/// glmae-core's parameter tree's ([`params::Vit::specs`]); this walk only pairs them with the
/// burn modules.
pub fn walk_vit(
    v: &mut impl ParamVisitor,
    vit: &mut Vit,
    cfg: &VitConfig,
    table: Option<&mut Param<Tensor<2>>>,
) -> Result<()> {
    let specs = params::Vit::specs(cfg);
    let pe = &mut vit.patch_embedding.patch_embeddings;
    let names = &specs.patch_embedding.patch_embeddings;
    // The Conv3d kernel shape (hidden, in_channels, p, p, p), from the tree.
    let dims = names.weight.shape.dims();
    let kernel = Layout::PatchKernel(std::array::from_fn(|i| dims.get(i).map_or(1, |&d| d as usize)));
    pe.weight = v.param(&names.weight.name, pe.weight.clone(), kernel)?;
    if let Some(b) = pe.bias.clone() {
        pe.bias = Some(v.param(&names.bias.name, b, Layout::Same)?);
    }
    if let Some(t) = table {
        let spec = specs.patch_embedding.position_embeddings.as_ref();
        let spec =
            spec.ok_or_else(|| anyhow!("the model has a learned position table; its config has sin-cos"))?;
        *t = v.param(&spec.name, t.clone(), Layout::Batched)?;
    }
    ensure!(
        vit.blocks.len() == specs.blocks.len(),
        "{} blocks, the config has {}",
        vit.blocks.len(),
        specs.blocks.len()
    );
    for (b, s) in vit.blocks.iter_mut().zip(&specs.blocks) {
        linear(v, &s.mlp.linear1, &mut b.mlp.linear1)?;
        linear(v, &s.mlp.linear2, &mut b.mlp.linear2)?;
        norm(v, &s.norm1, &mut b.norm1)?;
        linear(v, &s.attn.out_proj, &mut b.attn.out_proj)?;
        b.attn.qkv.weight = v.param(&s.attn.qkv.name, b.attn.qkv.weight.clone(), Layout::Transposed)?;
        if let Some(bias) = b.attn.qkv.bias.clone() {
            let spec = s.attn.qkv_bias.as_ref();
            let spec = spec.ok_or_else(|| anyhow!("the model has a qkv bias; its config has none"))?;
            b.attn.qkv.bias = Some(v.param(&spec.name, bias, Layout::Same)?);
        }
        norm(v, &s.norm2, &mut b.norm2)?;
    }
    norm(v, &specs.norm, &mut vit.norm)
}

/// Collects every visited parameter as a [`NamedTensor`] in PyTorch layout.
#[derive(Default)]
pub struct Reader {
    /// What was read, in visiting order.
    pub tensors: Vec<NamedTensor>,
}

impl ParamVisitor for Reader {
    fn param<const D: usize>(
        &mut self,
        name: &str,
        p: Param<Tensor<D>>,
        layout: Layout,
    ) -> Result<Param<Tensor<D>>> {
        let t = p.val();
        let shape = layout.torch_shape(&t.dims());
        // burn's (in, out) Linear read transposed is PyTorch's row-major (out, in); the patch
        // kernel is the same transposition, reshaped.
        let values = match layout {
            Layout::Transposed | Layout::PatchKernel(_) => tensor_values(t.transpose())?,
            Layout::Same | Layout::Batched => tensor_values(t)?,
        };
        self.tensors.push(NamedTensor { name: name.to_string(), shape, values });
        Ok(p)
    }
}

/// Replaces every visited parameter with the values stored under its name (PyTorch layout),
/// keeping its id and gradient setting; a missing name or a shape that differs is an error
/// naming the tensor. Names left unused are listed by [`Writer::unused`].
pub struct Writer {
    source: HashMap<String, NamedTensor>,
}

impl Writer {
    /// A writer taking values from `tensors`.
    pub fn new(tensors: impl IntoIterator<Item = NamedTensor>) -> Self {
        Self { source: tensors.into_iter().map(|t| (t.name.clone(), t)).collect() }
    }

    /// The source tensors no parameter took, sorted.
    pub fn unused(&self) -> Vec<String> {
        let mut names: Vec<String> = self.source.keys().cloned().collect();
        names.sort();
        names
    }
}

impl ParamVisitor for Writer {
    fn param<const D: usize>(
        &mut self,
        name: &str,
        p: Param<Tensor<D>>,
        layout: Layout,
    ) -> Result<Param<Tensor<D>>> {
        let t = self.source.remove(name).ok_or_else(|| anyhow!("tensor `{name}` is missing"))?;
        let dims = p.val().dims();
        let want = layout.torch_shape(&dims);
        ensure!(t.shape == want, "tensor `{name}` has shape {:?}; this model needs {want:?}", t.shape);
        Ok(p.map(|old| {
            let device = old.device();
            let grad = old.is_require_grad();
            let new: Tensor<D> = match layout {
                Layout::Transposed | Layout::PatchKernel(_) => {
                    // PyTorch (out, in) row-major, read back as burn's (in, out).
                    let rev = [dims[1], dims[0]];
                    let m: Tensor<2> = Tensor::from_data(TensorData::new(t.values, rev), &device);
                    m.transpose().reshape(dims)
                }
                Layout::Same | Layout::Batched => Tensor::from_data(TensorData::new(t.values, dims), &device),
            };
            // A tensor made from data is not tracked: keep the parameter trainable.
            new.set_require_grad(grad)
        }))
    }
}

/// Every encoder parameter as `vit.*` tensors, in glmae-core's order. The patch embedding becomes
/// the Conv3d kernel `(hidden, in_channels, p, p, p)` it is equivalent to.
pub fn encoder_tensors(vit: &Vit, cfg: &VitConfig) -> Result<Vec<NamedTensor>> {
    let mut reader = Reader::default();
    walk_vit(&mut reader, &mut vit.clone(), cfg, None)?;
    Ok(reader.tensors)
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
