//! The ViT encoder on packed GEMMs: patch embedding, position embedding, pre-norm blocks with
//! multi-head attention, final LayerNorm. Same arithmetic as glmae-core's `model::vit`.

use glmae_core::config::{PosEmbed, UNETR_TAPS, VitConfig};
use glmae_core::kernels::{Dims3, add_sincos_position_embedding};
use glmae_core::model::{BlockWeights, NormWeights, VitWeights};
use glmae_core::tensor::Tensor;
use rayon::prelude::*;

use super::gemm::{PackedB, gemm, pad_bias};
use super::kernels::F32Kernels;
use super::math::{gelu_in_place, softmax_in_place};

/// A Linear layer: `W^T` packed, bias padded.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    w: PackedB,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn new(w: &Tensor<'_>, bias: Option<&Tensor<'_>>) -> Self {
        let d = w.shape();
        let (out_dim, in_dim) = (d.dims()[0] as usize, d.dims()[1] as usize);
        Self {
            w: PackedB::from_fn(in_dim, out_dim, |i, o| w.get(o * in_dim + i)),
            bias: bias.map(|b| pad_bias((0..out_dim).map(|i| b.get(i)), out_dim)),
        }
    }

    /// `out (+)= x * W^T + b` for `rows` rows of width `in_dim`.
    fn run(&self, kernels: F32Kernels, x: &[f32], rows: usize, out: &mut [f32], accumulate: bool) {
        let (k, n) = (self.w.k(), self.w.n());
        gemm(kernels, x, rows, k, &self.w, self.bias.as_deref(), accumulate, out, n);
    }

    fn bytes(&self) -> usize {
        self.w.bytes()
    }
}

#[derive(Clone, Debug)]
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Norm {
    fn new(n: &NormWeights<'_>) -> Self {
        let len = n.weight.len();
        Self {
            weight: (0..len).map(|i| n.weight.get(i)).collect(),
            bias: (0..len).map(|i| n.bias.get(i)).collect(),
        }
    }

    /// LayerNorm of each row, as glmae-core computes it (two-pass f32 moments in blocks of 256).
    fn run(&self, x: &[f32], eps: f32, out: &mut [f32]) {
        let dim = self.weight.len();
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, xt)| {
            let blocked = |f: &dyn Fn(f32) -> f32| -> f32 {
                xt.chunks(256).map(|c| c.iter().fold(0.0f32, |s, &v| s + f(v))).fold(0.0, |a, b| a + b)
            };
            let n = dim as f32;
            let mean = blocked(&|v| v) / n;
            let var = blocked(&|v| (v - mean) * (v - mean)) / n;
            let inv = 1.0 / (var + eps).sqrt();
            for (((o, &v), &w), &b) in o.iter_mut().zip(xt).zip(&self.weight).zip(&self.bias) {
                *o = (v - mean) * inv * w + b;
            }
        });
    }
}

#[derive(Clone, Debug)]
struct Block {
    norm1: Norm,
    qkv: Linear,
    proj: Linear,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn new(b: &BlockWeights<'_>) -> Self {
        Self {
            norm1: Norm::new(&b.norm1),
            qkv: Linear::new(&b.attn.qkv, b.attn.qkv_bias.as_ref()),
            proj: Linear::new(&b.attn.out_proj.weight, Some(&b.attn.out_proj.bias)),
            norm2: Norm::new(&b.norm2),
            fc1: Linear::new(&b.mlp.linear1.weight, Some(&b.mlp.linear1.bias)),
            fc2: Linear::new(&b.mlp.linear2.weight, Some(&b.mlp.linear2.bias)),
        }
    }
}

/// The encoder with every weight packed for the micro-kernel.
#[derive(Clone, Debug)]
pub(crate) struct FastVit {
    cfg: VitConfig,
    patch: Linear,
    /// The learned table, or the sin-cos one of the configured grid (computed once: per window
    /// it cost 2 ms).
    position: Vec<f32>,
    blocks: Vec<Block>,
    norm: Norm,
}

impl FastVit {
    pub(crate) fn new(w: &VitWeights<'_>, cfg: &VitConfig) -> Self {
        let d = w.patch_embedding.patch_embeddings.weight.shape();
        let (hidden, rest) =
            (d.dims()[0] as usize, w.patch_embedding.patch_embeddings.weight.len() / d.dims()[0] as usize);
        let patch = Linear {
            // The patch Conv3d is a Linear over the patch's (in_ch, p, p, p) values.
            w: PackedB::from_fn(rest, hidden, |i, o| {
                w.patch_embedding.patch_embeddings.weight.get(o * rest + i)
            }),
            bias: Some(pad_bias((0..hidden).map(|i| w.patch_embedding.patch_embeddings.bias.get(i)), hidden)),
        };
        Self {
            cfg: *cfg,
            patch,
            position: match w.patch_embedding.position_embeddings {
                Some(t) => (0..t.len()).map(|i| t.get(i)).collect(),
                None => sincos_table(cfg.img_size.map(|s| (s / cfg.patch_size) as usize), hidden),
            },
            blocks: w.blocks.iter().map(Block::new).collect(),
            norm: Norm::new(&w.norm),
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.patch.bytes()
            + self
                .blocks
                .iter()
                .map(|b| b.qkv.bytes() + b.proj.bytes() + b.fc1.bytes() + b.fc2.bytes())
                .sum::<usize>()
    }

    /// The four hidden states UNETR taps (after blocks 3, 6, 9 and the final norm), each as
    /// token rows `(tokens, hidden)`, for a channel-first `input` on `window`.
    pub(crate) fn encode(&self, kernels: F32Kernels, input: &[f32], window: Dims3) -> [Vec<f32>; 4] {
        let cfg = &self.cfg;
        let p = cfg.patch_size as usize;
        let (e, in_ch) = (cfg.hidden_size as usize, cfg.in_channels as usize);
        let grid = window.map(|w| w / p);
        let tokens = grid[0] * grid[1] * grid[2];
        let pv = in_ch * p * p * p;

        // Gather patches in the kernel's (in_ch, z, y, x) order, one token per row.
        let mut patches = vec![0.0f32; tokens * pv];
        patches.par_chunks_mut(pv).enumerate().for_each(|(t, row)| {
            glmae_core::kernels::gather_patch(input, window, in_ch, p, t, row);
        });
        let mut x = vec![0.0f32; tokens * e];
        self.patch.run(kernels, &patches, tokens, &mut x, false);
        drop(patches);
        let configured = cfg.img_size.map(|s| (s / cfg.patch_size) as usize);
        // The learned table only exists for the configured window; other windows take sin-cos.
        let table = if cfg.pos_embed == PosEmbed::Learned || grid == configured {
            std::borrow::Cow::Borrowed(&self.position)
        } else {
            std::borrow::Cow::Owned(sincos_table(grid, e))
        };
        for (v, t) in x.iter_mut().zip(table.iter()) {
            *v += t;
        }

        let heads = cfg.num_heads as usize;
        let mlp = cfg.mlp_dim as usize;
        let mut ln = vec![0.0f32; tokens * e];
        let mut qkv = vec![0.0f32; tokens * 3 * e];
        let mut attn = vec![0.0f32; tokens * e];
        let mut scores = vec![0.0f32; tokens * tokens];
        let mut hidden = vec![0.0f32; tokens * mlp];
        let mut taps: [Vec<f32>; 4] = Default::default();
        for (i, b) in self.blocks.iter().enumerate() {
            b.norm1.run(&x, cfg.layer_norm_eps, &mut ln);
            b.qkv.run(kernels, &ln, tokens, &mut qkv, false);
            attention(kernels, &qkv, tokens, e, heads, &mut attn, &mut scores);
            b.proj.run(kernels, &attn, tokens, &mut x, true);
            b.norm2.run(&x, cfg.layer_norm_eps, &mut ln);
            b.fc1.run(kernels, &ln, tokens, &mut hidden, false);
            hidden.par_chunks_mut(mlp).for_each(|row| gelu_in_place(kernels, row));
            b.fc2.run(kernels, &hidden, tokens, &mut x, true);
            if let Some(k) = UNETR_TAPS.iter().position(|&t| t == i) {
                taps[k] = x.clone();
            }
        }
        self.norm.run(&x, cfg.layer_norm_eps, &mut ln);
        taps[3] = ln;
        taps
    }
}

/// The sin-cos position embedding of `grid`, `(tokens, hidden)`.
fn sincos_table(grid: Dims3, hidden: usize) -> Vec<f32> {
    let mut table = vec![0.0; grid.iter().product::<usize>() * hidden];
    add_sincos_position_embedding(&mut table, grid, hidden);
    table
}

/// Multi-head attention over a fused `(tokens, 3 * hidden)` qkv (MONAI's (q|k|v, head, dim)
/// order) into `(tokens, hidden)`: per head, `softmax(Q K^T / sqrt(dh)) V` as two GEMMs.
fn attention(
    kernels: F32Kernels,
    qkv: &[f32],
    t: usize,
    e: usize,
    heads: usize,
    out: &mut [f32],
    scores: &mut [f32],
) {
    let dh = e / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    for h in 0..heads {
        let kt = PackedB::from_fn(dh, t, |d, j| qkv[j * 3 * e + e + h * dh + d]);
        gemm(kernels, &qkv[h * dh..], t, 3 * e, &kt, None, false, scores, t);
        scores.par_chunks_mut(t).for_each(|row| {
            row.iter_mut().for_each(|s| *s *= scale);
            softmax_in_place(kernels, row);
        });
        let v = PackedB::from_fn(t, dh, |j, d| qkv[j * 3 * e + 2 * e + h * dh + d]);
        gemm(kernels, scores, t, t, &v, None, false, &mut out[h * dh..], e);
    }
}
