//! The ViT encoder in burn, block for block as MONAI's `ViT` (so its weights export by name to
//! glmae-core), shared by GL-MAE pretraining and the UNETR.
//!
//! Inputs are patch tokens, `(batch, tokens, in_channels * patch^3)` in Conv3d kernel order, made
//! on the CPU by `crate::pretrain::views`: patchifying there keeps the model free of 8-D reshapes
//! (which the ndarray backend cannot do) and equals MONAI's Conv3d(kernel = stride = patch)
//! embedding.

use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use glmae_core::VitConfig;

/// Two-layer MLP with exact GELU (MONAI's `MLPBlock`).
#[derive(Module, Debug)]
pub struct Mlp {
    /// Hidden layer.
    pub linear1: Linear,
    /// Output layer.
    pub linear2: Linear,
}

/// Multi-head self-attention with a fused qkv projection laid out (q|k|v, head, dim), as
/// MONAI's `SABlock`.
#[derive(Module, Debug)]
pub struct Attention {
    /// Fused q, k, v projection.
    pub qkv: Linear,
    /// Output projection.
    pub out_proj: Linear,
    heads: usize,
}

impl Attention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, e] = x.dims();
        let dh = e / self.heads;
        let split = |t: Tensor<3>| t.reshape([b, n, self.heads, dh]).swap_dims(1, 2);
        let qkv = self.qkv.forward(x);
        let q = split(qkv.clone().narrow(2, 0, e));
        let k = split(qkv.clone().narrow(2, e, e));
        let v = split(qkv.narrow(2, 2 * e, e));
        let att = softmax(q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (dh as f64).sqrt()), 3);
        let out = att.matmul(v).swap_dims(1, 2).reshape([b, n, e]);
        self.out_proj.forward(out)
    }
}

/// Pre-norm transformer block (MONAI's `TransformerBlock`).
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention.
    pub norm1: LayerNorm,
    /// Self-attention.
    pub attn: Attention,
    /// Norm before the MLP.
    pub norm2: LayerNorm,
    /// MLP.
    pub mlp: Mlp,
}

impl Block {
    /// A block of width `dim`.
    pub fn new(dim: usize, heads: usize, mlp: usize, qkv_bias: bool, eps: f64, device: &Device) -> Self {
        Self {
            norm1: LayerNormConfig::new(dim).with_epsilon(eps).init(device),
            attn: Attention {
                qkv: linear(dim, 3 * dim, qkv_bias, device),
                out_proj: linear(dim, dim, true, device),
                heads,
            },
            norm2: LayerNormConfig::new(dim).with_epsilon(eps).init(device),
            mlp: Mlp { linear1: linear(dim, mlp, true, device), linear2: linear(mlp, dim, true, device) },
        }
    }

    /// `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x));
        let h = self.mlp.linear2.forward(gelu(self.mlp.linear1.forward(self.norm2.forward(x.clone()))));
        x + h
    }
}

/// The patch embedding: a Linear on flattened patches, equal to MONAI's Conv3d with
/// kernel = stride = patch (exported as `vit.patch_embedding.patch_embeddings.weight`).
#[derive(Module, Debug)]
pub struct PatchEmbedding {
    /// `(in_channels * patch^3) -> hidden`.
    pub patch_embeddings: Linear,
}

/// The ViT encoder.
#[derive(Module, Debug)]
pub struct Vit {
    /// Patch embedding.
    pub patch_embedding: PatchEmbedding,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final LayerNorm.
    pub norm: LayerNorm,
}

impl Vit {
    /// An encoder for `cfg` (patch size, width, depth, heads, MLP, qkv bias, epsilon).
    pub fn new(cfg: &VitConfig, device: &Device) -> Self {
        let (e, p) = (cfg.hidden_size as usize, cfg.patch_size as usize);
        let k = cfg.in_channels as usize * p * p * p;
        let eps = cfg.layer_norm_eps as f64;
        Self {
            patch_embedding: PatchEmbedding { patch_embeddings: linear(k, e, true, device) },
            blocks: (0..cfg.depth)
                .map(|_| {
                    Block::new(e, cfg.num_heads as usize, cfg.mlp_dim as usize, cfg.qkv_bias, eps, device)
                })
                .collect(),
            norm: LayerNormConfig::new(e).with_epsilon(eps).init(device),
        }
    }

    /// Encodes the tokens at `keep` (`(batch, kept)` indices; all tokens when `None`), each with
    /// its position embedding `pos` (`(tokens, hidden)`). Returns `(batch, kept, hidden)` after
    /// the final norm.
    pub fn forward(&self, tokens: Tensor<3>, pos: Tensor<2>, keep: Option<Tensor<2, Int>>) -> Tensor<3> {
        let [b, _, _] = tokens.dims();
        let x = self.patch_embedding.patch_embeddings.forward(tokens)
            + pos.unsqueeze_dim::<3>(0).repeat_dim(0, b);
        let mut x = match keep {
            Some(keep) => gather_tokens(x, keep),
            None => x,
        };
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.norm.forward(x)
    }
}

impl Vit {
    /// Encodes every token through the first `blocks` transformer blocks only, without the final
    /// norm (`blocks` 0: the patch embedding plus positions): the hidden state UNETR taps after
    /// blocks 3, 6 and 9, for probing what each depth holds.
    ///
    /// # Shapes
    /// - `tokens`: `[N, L, C * P^3]`, `pos`: `[L, D]`; returns `[N, L, D]`.
    pub fn forward_blocks(&self, tokens: Tensor<3>, pos: Tensor<2>, blocks: usize) -> Tensor<3> {
        let [b, _, _] = tokens.dims();
        let mut x = self.patch_embedding.patch_embeddings.forward(tokens)
            + pos.unsqueeze_dim::<3>(0).repeat_dim(0, b);
        for block in self.blocks.iter().take(blocks) {
            x = block.forward(x);
        }
        x
    }

    /// Encodes every token and also returns the hidden states UNETR taps: after blocks 3, 6
    /// and 9 (before the final norm), then the final normed output.
    pub fn forward_with_taps(&self, tokens: Tensor<3>, pos: Tensor<2>) -> ([Tensor<3>; 3], Tensor<3>) {
        let [b, _, _] = tokens.dims();
        let mut x = self.patch_embedding.patch_embeddings.forward(tokens)
            + pos.unsqueeze_dim::<3>(0).repeat_dim(0, b);
        let mut taps = Vec::with_capacity(3);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x);
            if glmae_core::config::UNETR_TAPS.contains(&i) {
                taps.push(x.clone());
            }
        }
        let last = self.norm.forward(x.clone());
        let mut taps = taps.into_iter();
        let mut next = || taps.next().unwrap_or_else(|| x.clone());
        ([next(), next(), next()], last)
    }
}

/// Selects tokens: `x` is `(batch, tokens, dim)`, `idx` is `(batch, kept)`.
pub fn gather_tokens(x: Tensor<3>, idx: Tensor<2, Int>) -> Tensor<3> {
    let [_, _, d] = x.dims();
    x.gather(1, idx.unsqueeze_dim::<3>(2).repeat_dim(2, d))
}

/// A Linear initialised as MAE's `_init_weights`: xavier-uniform weight, zero bias (burn's
/// default, U(+-1/sqrt(fan_in)) on both, is not what MAE or MONAI use; method.md).
pub fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    let mut l = LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::XavierUniform { gain: 1.0 })
        .init(device);
    if bias {
        l.bias = Some(Param::from_tensor(Tensor::zeros([d_out], device)));
    }
    l
}

/// A tensor from host values.
pub fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// An integer tensor from host indices.
pub fn int_tensor<const D: usize>(values: Vec<i64>, shape: [usize; D], device: &Device) -> Tensor<D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// `forward_blocks` through every block, then the final norm, is `forward`; through none it
    /// is the patch embedding plus the positions.
    #[test]
    fn forward_blocks_is_a_prefix_of_forward() {
        let device = Device::flex();
        let cfg = crate::pretrain::PretrainConfig::for_tests();
        let vit = Vit::new(&cfg.encoder, &device);
        let values = cfg.encoder.patch_size.pow(3) as usize;
        let (n, d) = (8, cfg.encoder.hidden_size as usize);
        let x = Tensor::<3>::random([2, n, values], Distribution::Uniform(0.0, 1.0), &device);
        let pos = Tensor::<2>::random([n, d], Distribution::Uniform(-1.0, 1.0), &device);
        let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        let max_diff =
            |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        let full = host(vit.forward(x.clone(), pos.clone(), None));
        let all =
            host(vit.norm.forward(vit.forward_blocks(x.clone(), pos.clone(), cfg.encoder.depth as usize)));
        assert_eq!(full.len(), 2 * n * d);
        assert!(max_diff(full, all) < 1e-5);
        let embedded =
            vit.patch_embedding.patch_embeddings.forward(x.clone()) + pos.clone().unsqueeze_dim::<3>(0);
        assert!(max_diff(host(embedded), host(vit.forward_blocks(x.clone(), pos.clone(), 0))) < 1e-6);
        let one = host(vit.forward_blocks(x, pos, 1));
        assert!(one.iter().all(|v| v.is_finite()));
    }
}
