//! The ViT encoder: patch embedding, position embedding, pre-norm blocks, final norm.

use super::arena::{Arena, ForwardError, sat_sum};
use super::points::{BlockPoint, Probe};
use super::weights::{BlockWeights, VitWeights};
use crate::config::{PosEmbed, UNETR_TAPS, VitConfig};
use crate::kernels::{
    Dims3, add_sincos_position_embedding, gelu_in_place, layer_norm, linear, patch_embed, self_attention,
};

/// Token-grid sizes for a window.
pub(crate) struct VitDims {
    pub grid: Dims3,
    pub tokens: usize,
    pub hidden: usize,
    pub mlp: usize,
    pub patch_values: usize,
}

impl VitDims {
    pub(crate) fn new(cfg: &VitConfig, window: Dims3) -> Self {
        let p = cfg.patch_size as usize;
        let grid = window.map(|w| w / p);
        Self {
            grid,
            tokens: grid.iter().fold(1usize, |a, &b| a.saturating_mul(b)),
            hidden: cfg.hidden_size as usize,
            mlp: cfg.mlp_dim as usize,
            patch_values: (cfg.in_channels as usize).saturating_mul(p * p * p),
        }
    }

    fn ne(&self) -> usize {
        self.tokens.saturating_mul(self.hidden)
    }

    /// Scratch for [`encode`]: tokens, normed tokens, qkv, and per-token temporaries.
    pub(crate) fn scratch_len(&self) -> usize {
        let ne = self.ne();
        sat_sum(&[ne, ne, ne.saturating_mul(3), self.tokens, self.mlp, self.hidden, self.patch_values])
    }
}

/// Copies tokens `(tokens, hidden)` to a channel-first volume `(hidden, grid)` (MONAI's
/// `proj_feat`), each value through `f` (the identity, or the integer pass's quantisation).
pub(crate) fn tokens_to_volume<T>(
    x: &[f32],
    tokens: usize,
    hidden: usize,
    out: &mut [T],
    f: impl Fn(f32) -> T,
) {
    for t in 0..tokens {
        for e in 0..hidden {
            out[e * tokens + t] = f(x[t * hidden + e]);
        }
    }
}

#[allow(clippy::too_many_arguments)] // the block's buffers, carved once by `encode`
fn block(
    b: &BlockWeights<'_>,
    cfg: &VitConfig,
    d: &VitDims,
    x: &mut [f32],
    ln: &mut [f32],
    qkv: &mut [f32],
    tmp: &mut Temps<'_>,
    probe: &mut Probe<'_>,
    index: usize,
) {
    let points = probe.points();
    let point = |p| points.block(index, p);
    let (n, e) = (d.tokens, d.hidden);
    let eps = cfg.layer_norm_eps;
    layer_norm(x, n, &b.norm1.weight, &b.norm1.bias, eps, ln);
    probe.see(point(BlockPoint::Norm1), ln);
    linear(ln, n, &b.attn.qkv, b.attn.qkv_bias.as_ref(), qkv);
    let attn = &mut *ln; // the normed tokens are spent; reuse their buffer
    self_attention(qkv, n, e, cfg.num_heads as usize, attn, tmp.scores);
    probe.see(point(BlockPoint::Attention), attn);
    for t in 0..n {
        linear(&attn[t * e..(t + 1) * e], 1, &b.attn.out_proj.weight, Some(&b.attn.out_proj.bias), tmp.vec);
        for (xv, &y) in x[t * e..(t + 1) * e].iter_mut().zip(tmp.vec.iter()) {
            *xv += y;
        }
    }
    layer_norm(x, n, &b.norm2.weight, &b.norm2.bias, eps, ln);
    probe.see(point(BlockPoint::Norm2), ln);
    for t in 0..n {
        linear(&ln[t * e..(t + 1) * e], 1, &b.mlp.linear1.weight, Some(&b.mlp.linear1.bias), tmp.hidden);
        gelu_in_place(tmp.hidden);
        probe.see(point(BlockPoint::Gelu), tmp.hidden);
        linear(tmp.hidden, 1, &b.mlp.linear2.weight, Some(&b.mlp.linear2.bias), tmp.vec);
        for (xv, &y) in x[t * e..(t + 1) * e].iter_mut().zip(tmp.vec.iter()) {
            *xv += y;
        }
    }
}

struct Temps<'s> {
    scores: &'s mut [f32],
    hidden: &'s mut [f32],
    vec: &'s mut [f32],
}

/// Runs the encoder on `input` (`(in_ch, window)`) and writes the four hidden states UNETR uses,
/// each as a channel-first volume `(hidden, grid)`, into `taps`: after blocks 3, 6 and 9, then the
/// final LayerNorm of the last block. `probe` sees the tensors the integer pass quantises.
pub(crate) fn encode(
    w: &VitWeights<'_>,
    cfg: &VitConfig,
    input: &[f32],
    window: Dims3,
    taps: &mut [f32],
    scratch: &mut [f32],
    probe: &mut Probe<'_>,
) -> Result<(), ForwardError> {
    let d = VitDims::new(cfg, window);
    let ne = d.ne();
    let mut arena = Arena::new(scratch);
    let x = arena.take(ne)?;
    let ln = arena.take(ne)?;
    let qkv = arena.take(3 * ne)?;
    let mut tmp =
        Temps { scores: arena.take(d.tokens)?, hidden: arena.take(d.mlp)?, vec: arena.take(d.hidden)? };
    let patch_buf = arena.take(d.patch_values)?;

    let pe = &w.patch_embedding;
    patch_embed(input, window, &pe.patch_embeddings.weight, &pe.patch_embeddings.bias, x, patch_buf);
    match (cfg.pos_embed, pe.position_embeddings) {
        (PosEmbed::Learned, Some(table)) => {
            for (i, v) in x.iter_mut().enumerate() {
                *v += table.get(i);
            }
        }
        _ => add_sincos_position_embedding(x, d.grid, d.hidden),
    }
    for (i, b) in w.blocks.iter().enumerate() {
        block(b, cfg, &d, x, ln, qkv, &mut tmp, probe, i);
        if let Some(k) = UNETR_TAPS.iter().position(|&t| t == i) {
            tokens_to_volume(x, d.tokens, d.hidden, &mut taps[k * ne..(k + 1) * ne], |v| v);
            probe.see(probe.points().tap(k), &taps[k * ne..(k + 1) * ne]);
        }
    }
    layer_norm(x, d.tokens, &w.norm.weight, &w.norm.bias, cfg.layer_norm_eps, ln);
    tokens_to_volume(ln, d.tokens, d.hidden, &mut taps[3 * ne..4 * ne], |v| v);
    probe.see(probe.points().tap(3), &taps[3 * ne..4 * ne]);
    Ok(())
}
