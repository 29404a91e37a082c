//! The GL-MAE networks around the shared ViT encoder: the MAE decoder with a learned mask token,
//! the projection head, and the student (encoder, decoder, head) with its EMA teacher.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Distribution, Int, Tensor};
use glmae_core::VitConfig;
use serde::{Deserialize, Serialize};

use crate::nets::vit::{Block, Vit, gather_tokens, linear};

/// MAE decoder widths (method.md: ViT-T 128 x 4 with 4 heads, ViT-B 512 x 8 with 16 heads).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Width.
    pub width: usize,
    /// Blocks.
    pub depth: usize,
    /// Heads.
    pub heads: usize,
}

/// The MAE decoder shared by global and local views.
#[derive(Module, Debug)]
pub struct MaeDecoder {
    /// Encoder width to decoder width.
    pub embed: Linear,
    /// The learned token standing in for masked patches, `(1, 1, width)`.
    pub mask_token: Param<Tensor<3>>,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: LayerNorm,
    /// Width to voxels per patch.
    pub pred: Linear,
}

impl MaeDecoder {
    /// A decoder from encoder width `hidden` to `patch_values` voxels per token.
    pub fn new(cfg: &DecoderConfig, hidden: usize, patch_values: usize, eps: f64, device: &Device) -> Self {
        let w = cfg.width;
        let mask = Tensor::<3>::random([1, 1, w], Distribution::Normal(0.0, 0.02), device);
        Self {
            embed: linear(hidden, w, true, device),
            mask_token: Param::from_tensor(mask),
            blocks: (0..cfg.depth).map(|_| Block::new(w, cfg.heads, 4 * w, true, eps, device)).collect(),
            norm: LayerNormConfig::new(w).with_epsilon(eps).init(device),
            pred: linear(w, patch_values, true, device),
        }
    }

    /// Reconstructs every patch: `latent` holds the visible tokens, `restore` (`(batch, tokens)`)
    /// puts `[visible, mask tokens]` back in grid order, `pos` is the decoder position embedding.
    pub fn forward(&self, latent: Tensor<3>, restore: Tensor<2, Int>, pos: Tensor<2>) -> Tensor<3> {
        let x = self.embed.forward(latent);
        let [b, kept, _] = x.dims();
        let [_, n] = restore.dims();
        let masks = self.mask_token.val().repeat_dim(0, b).repeat_dim(1, n - kept);
        let x = gather_tokens(Tensor::cat(vec![x, masks], 1), restore);
        let mut x = x + pos.unsqueeze_dim::<3>(0).repeat_dim(0, b);
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.pred.forward(self.norm.forward(x))
    }
}

/// Projection head sizes (method.md: hidden 2048, output 512).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// Hidden width.
    pub hidden: usize,
    /// Output width (the distributions' size K).
    pub out: usize,
    /// 0: the paper's head (three Linear layers, eq. 4). Otherwise DINO's head: the third layer
    /// maps to this bottleneck width, the result is L2-normalised, and a weight-normalised
    /// Linear without bias (each output's weight vector scaled to norm 1, DINO's
    /// `norm_last_layer`) maps it to `out`.
    #[serde(default)]
    pub bottleneck: usize,
    /// Standardise the pooled tokens over the views of a forward pass (batch normalisation
    /// without affine parameters, as DINO's head option `use_bn`) before the first layer.
    #[serde(default)]
    pub batch_norm: bool,
}

/// The projection head on the mean encoder token: three Linear layers with GELU between them
/// (paper eq. 4), or DINO's head when [`HeadConfig::bottleneck`] is set.
#[derive(Module, Debug)]
pub struct ProjectionHead {
    /// First layer.
    pub linear1: Linear,
    /// Second layer.
    pub linear2: Linear,
    /// Output layer (to the bottleneck in DINO's head).
    pub linear3: Linear,
    /// DINO's weight-normalised last layer, `[bottleneck, out]`, no bias.
    pub last: Option<Linear>,
    batch_norm: bool,
}

impl ProjectionHead {
    /// A head from encoder width `hidden`.
    pub fn new(cfg: &HeadConfig, hidden: usize, device: &Device) -> Self {
        let third = if cfg.bottleneck > 0 { cfg.bottleneck } else { cfg.out };
        Self {
            linear1: linear(hidden, cfg.hidden, true, device),
            linear2: linear(cfg.hidden, cfg.hidden, true, device),
            linear3: linear(cfg.hidden, third, true, device),
            last: (cfg.bottleneck > 0).then(|| linear(cfg.bottleneck, cfg.out, false, device)),
            batch_norm: cfg.batch_norm,
        }
    }

    /// Projects the mean token to the head's output.
    ///
    /// # Shapes
    /// - `tokens`: `[N, L, D]`; returns `[N, K]`.
    pub fn forward(&self, tokens: Tensor<3>) -> Tensor<2> {
        let mut pooled: Tensor<2> = tokens.mean_dim(1).squeeze_dim(1);
        if self.batch_norm && pooled.dims()[0] > 1 {
            let mean = pooled.clone().mean_dim(0);
            let centred = pooled.sub(mean);
            let var = centred.clone().powi_scalar(2).mean_dim(0);
            pooled = centred.div(var.add_scalar(1e-5).sqrt());
        }
        let x = self.linear3.forward(gelu(self.linear2.forward(gelu(self.linear1.forward(pooled)))));
        let Some(last) = &self.last else { return x };
        // DINO: cosine similarity of the bottleneck code with K unit prototypes.
        let x = x.clone().div(l2_norm(x, 1));
        let w = last.weight.val();
        x.matmul(w.clone().div(l2_norm(w, 0)))
    }
}

/// L2 norm along `dim`, kept as a size-1 axis and bounded below (`F.normalize`'s eps 1e-12).
fn l2_norm(x: Tensor<2>, dim: usize) -> Tensor<2> {
    x.powi_scalar(2).sum_dim(dim).sqrt().clamp_min(1e-12)
}

/// The student: encoder, MAE decoder and projection head, all trained.
#[derive(Module, Debug)]
pub struct Student {
    /// Encoder.
    pub vit: Vit,
    /// Decoder.
    pub decoder: MaeDecoder,
    /// Projection head.
    pub head: ProjectionHead,
}

/// The teacher: an exponential moving average of the student's encoder and head.
#[derive(Module, Debug)]
pub struct Teacher {
    /// Encoder.
    pub vit: Vit,
    /// Projection head.
    pub head: ProjectionHead,
}

impl Student {
    /// A freshly initialised student.
    pub fn new(vit: &VitConfig, decoder: &DecoderConfig, head: &HeadConfig, device: &Device) -> Self {
        let e = vit.hidden_size as usize;
        let p = vit.patch_size as usize;
        let values = vit.in_channels as usize * p * p * p;
        let eps = vit.layer_norm_eps as f64;
        Self {
            vit: Vit::new(vit, device),
            decoder: MaeDecoder::new(decoder, e, values, eps, device),
            head: ProjectionHead::new(head, e, device),
        }
    }

    /// The teacher's starting point: a copy of the encoder and head that takes no gradients.
    pub fn teacher(&self) -> Teacher {
        // burn creates parameters lazily, and clones of a parameter not initialised yet share
        // its pending initialisation, `require_grad` flag included: `no_grad` on such a copy
        // froze the student's own encoder and head as well (only the decoder trained).
        // Initialising every parameter first gives the teacher copies of its own.
        struct Materialise;
        impl ModuleVisitor for Materialise {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let _ = param.val();
            }
        }
        self.vit.visit(&mut Materialise);
        self.head.visit(&mut Materialise);
        Teacher { vit: self.vit.clone(), head: self.head.clone() }.no_grad()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether every float parameter of `m` requires gradients (`Some(true)`), none does
    /// (`Some(false)`), or they differ (`None`).
    fn require_grad(m: &impl Module) -> Option<bool> {
        struct All(Vec<bool>);
        impl ModuleVisitor for All {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.push(param.val().is_require_grad());
            }
        }
        let mut all = All(Vec::new());
        m.visit(&mut all);
        let first = *all.0.first()?;
        all.0.iter().all(|&b| b == first).then_some(first)
    }

    #[test]
    fn making_the_teacher_leaves_the_student_trainable() {
        let device = Device::flex().autodiff();
        let cfg = crate::pretrain::PretrainConfig::for_tests();
        let student = Student::new(&cfg.encoder, &cfg.decoder, &cfg.head, &device);
        let teacher = student.teacher();
        assert_eq!(require_grad(&teacher.vit), Some(false));
        assert_eq!(require_grad(&teacher.head), Some(false));
        assert_eq!(require_grad(&student.vit), Some(true));
        assert_eq!(require_grad(&student.head), Some(true));
        assert_eq!(require_grad(&student.decoder), Some(true));
    }
}
