//! glmae-infer's own UNETR forward pass, built for speed on CPUs.
//!
//! glmae-core stays the single definition of the model: [`FastUnetr::new`] takes the core's bound
//! [`UnetrWeights`] and repacks them (int8 weights are dequantised to f32 once, here, so by
//! default both precisions run the same f32 kernels), and the agreement tests compare this pass
//! with the core's reference `Unetr::forward`. What changes is the execution:
//!
//! - every Linear, the patch embedding, both attention products and every convolution run on one
//!   register-tiled GEMM micro-kernel ([`gemm`]): 12 rows of 512-bit accumulators with AVX-512,
//!   6 x 16 with AVX2 + FMA or aarch64 NEON, portable code elsewhere (chosen once, [`kernels`]);
//! - decoder activations are channel-last with a zero border ([`conv::Vol`]), so a 3x3x3
//!   convolution is an implicit GEMM over 27 shifted views of its input, or (by default, for
//!   layers with 8+ input channels) Winograd's F(4x4x4, 3x3x3) (up to 128 input channels on
//!   volumes of 24+ voxels per axis, 8x fewer multiply-adds) or F(2x2x2, 3x3x3) (3.4x fewer)
//!   ([`winograd`]), 1e-6 to 1e-5 of the logit range from the reference;
//! - work inside one window is split across the current rayon pool (output planes for the
//!   decoder, token rows for the encoder), so a single window uses every core;
//! - optionally ([`FastUnetr::with_int8_kernels`]), int8 3x3x3 decoder convolutions with 128+
//!   input channels run on integer products (AVX-512 VNNI `vpdpwssd`) of per-tensor quantised
//!   activations, where they beat F(4, 3) in f32: by Winograd on i16 transformed inputs and
//!   weights ([`winograd::conv_qwinograd`]), else directly on the file's int8 weights
//!   ([`mod@qconv`]);
//! - optionally ([`FastUnetr::with_bf16`]), the layers that run F(2, 3) multiply in bf16
//!   (AVX-512 BF16 `vdpbf16ps`, [`mod@bf16`]): measured barely faster and less exact, so an
//!   experiment of the library and the benchmark, not a flag of the command line.
//!
//! The modules: this one holds the model graph (residual, skip and up blocks, the forward
//! pass); [`kernels`] the kernel table (which implementation of each kernel this CPU runs,
//! detected once at load); `policy` which algorithm each convolution runs by; `layer` a
//! convolution's packings; `pool` the recycled activation buffers; [`mod@gemm`], [`mod@conv`],
//! [`winograd`], [`mod@qconv`], [`mod@bf16`] and `math` the kernels themselves.

pub mod bf16;
pub mod conv;
pub mod gemm;
pub mod kernels;
mod layer;
mod math;
mod policy;
mod pool;
pub mod qconv;
mod vit;
pub mod winograd;

use std::time::Instant;

use anyhow::{Result, ensure};
use glmae_core::config::UnetrConfig;
use glmae_core::kernels::Dims3;
use glmae_core::model::{PrUpWeights, ResBlockWeights, UnetrWeights, UpWeights};
use glmae_core::{ModelFile, Unetr};

use conv::{
    ConvWeights, NormStats, UpConvWeights, Vol, abs_max, conv, conv_transpose, conv1x1_channel_first,
    instance_stats, norm_add_lrelu, norm_lrelu,
};
pub use kernels::{BIsa, Bf16Kernels, F32Kernels, Int8Kernels, Isa, KernelTable, QIsa};
use layer::Layer;
pub use policy::ConvAlgorithms;
use policy::{ConvKernel, Policy};
use pool::{BufferPool, SharedPool};
use qconv::{QVol, max_level, qconv};
use winograd::{Variant, conv_qwinograd, conv_winograd, conv_winograd_bf16};

#[derive(Clone, Debug)]
struct Res {
    conv1: Layer,
    conv2: Layer,
    conv3: Option<Layer>,
}

impl Res {
    fn new(w: &ResBlockWeights<'_>) -> Self {
        Self {
            conv1: Layer::new(&w.conv1, None),
            conv2: Layer::new(&w.conv2, None),
            conv3: w.conv3.as_ref().map(|c| Layer::new(c, None)),
        }
    }

    fn bytes(&self) -> usize {
        self.conv1.bytes() + self.conv2.bytes() + self.conv3.as_ref().map_or(0, Layer::bytes)
    }

    fn layers_mut(&mut self) -> impl Iterator<Item = &mut Layer> {
        [&mut self.conv1, &mut self.conv2].into_iter().chain(self.conv3.as_mut())
    }

    /// MONAI's `UnetResBlock` on `x` into channels `off..` of `out`:
    /// `lrelu(norm(conv2(lrelu(norm(conv1 x)))) + residual)`, the residual being `x` or
    /// `norm(conv3 x)`.
    fn run(&self, x: &Vol, out: &mut Vol, off: usize, cx: &mut Ctx) {
        let o = self.conv2.out_ch();
        let mut a = cx.pool.vol(x.dims, o);
        // conv1 and conv3 read the same input: quantise it at most once.
        let mut qx = None;
        let s1 = cx.conv(x, &mut qx, &self.conv1, &mut a, 0);
        let k = cx.kernels.f32;
        cx.timed(|| norm_lrelu(k, &mut a, 0, &s1));
        let mut qa = None;
        let s2 = cx.conv(&a, &mut qa, &self.conv2, out, off);
        cx.pool.recycle_q(qa);
        match &self.conv3 {
            Some(proj) => {
                // `a` is spent: reuse it for the projected residual (every interior value is rewritten).
                let s3 = cx.conv(x, &mut qx, proj, &mut a, 0);
                cx.timed(|| norm_add_lrelu(k, out, off, &s2, &a, &s3));
            }
            None => cx.timed(|| norm_add_lrelu(k, out, off, &s2, x, &NormStats::identity(o))),
        }
        cx.pool.recycle_q(qx);
        cx.pool.recycle(a);
    }
}

#[derive(Clone, Debug)]
struct Skip {
    init: UpConvWeights,
    stages: Vec<(UpConvWeights, Res)>,
}

impl Skip {
    fn new(w: &PrUpWeights<'_>) -> Self {
        Self {
            init: UpConvWeights::new(&w.transp_conv_init),
            stages: w
                .blocks
                .iter()
                .map(|s| (UpConvWeights::new(&s.transp_conv), Res::new(&s.res_block)))
                .collect(),
        }
    }

    /// MONAI's `UnetrPrUpBlock` from the hidden-state volume `z` into channels `off..` of `dst`.
    fn run(&self, z: &Vol, dst: &mut Vol, off: usize, cx: &mut Ctx) {
        if self.stages.is_empty() {
            cx.up(z, &self.init, dst, off);
            return;
        }
        let mut cur = cx.pool.vol(z.dims.map(|d| 2 * d), self.init.out_ch());
        cx.up(z, &self.init, &mut cur, 0);
        let last = self.stages.len() - 1;
        for (j, (transp, res)) in self.stages.iter().enumerate() {
            let mut up = cx.pool.vol(cur.dims.map(|d| 2 * d), transp.out_ch());
            cx.up(&cur, transp, &mut up, 0);
            cx.pool.recycle(cur);
            if j == last {
                res.run(&up, dst, off, cx);
                cx.pool.recycle(up);
                return;
            }
            let mut next = cx.pool.vol(up.dims, transp.out_ch());
            res.run(&up, &mut next, 0, cx);
            cx.pool.recycle(up);
            cur = next;
        }
        unreachable!("the loop returns at its last stage")
    }
}

#[derive(Clone, Debug)]
struct Up {
    transp: UpConvWeights,
    res: Res,
}

impl Up {
    fn new(w: &UpWeights<'_>) -> Self {
        Self { transp: UpConvWeights::new(&w.transp_conv), res: Res::new(&w.conv_block) }
    }

    /// MONAI's `UnetrUpBlock`: upsample `x`, concatenate (channels-last, so the skip writes the
    /// second half of each voxel's channels directly), residual block.
    /// `skip` writes channels `o..2o` of the concatenation.
    fn run(&self, x: &Vol, skip: impl FnOnce(&mut Vol, usize, &mut Ctx), cx: &mut Ctx) -> Vol {
        let o = self.transp.out_ch();
        let dims = x.dims.map(|d| 2 * d);
        let mut cat = cx.pool.vol(dims, 2 * o);
        skip(&mut cat, o, cx);
        cx.up(x, &self.transp, &mut cat, 0);
        let mut out = cx.pool.vol(dims, o);
        self.res.run(&cat, &mut out, 0, cx);
        cx.pool.recycle(cat);
        out
    }
}

/// Time and multiply-adds spent in the decoder's convolutions, for the benchmark's GFLOP/s.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Multiply-adds in 3x3x3, 1x1x1 and transposed convolutions.
    pub conv_macs: u64,
    /// Seconds spent in them.
    pub conv_seconds: f64,
    /// How many 3x3x3 convolutions ran by Winograd's algorithm (either variant).
    pub winograd_convs: u32,
    /// How many of those ran by F(4x4x4, 3x3x3).
    pub f4_convs: u32,
    /// How many of those ran with bf16 products (the bf16 mode's F(2x2x2, 3x3x3)).
    pub bf16_convs: u32,
    /// Seconds in instance norms, activations and residual adds.
    pub norm_seconds: f64,
    /// Seconds in the encoder.
    pub encoder_seconds: f64,
    /// Seconds for the whole window.
    pub total_seconds: f64,
}

/// What one forward pass carries through the decoder: the kernels, the policy that picks among
/// them, the timings, and the recycled activation buffers.
struct Ctx {
    kernels: KernelTable,
    policy: Policy,
    stats: Stats,
    pool: BufferPool,
}

impl Ctx {
    /// Runs `f`, counting its time as normalisation.
    fn timed<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.stats.norm_seconds += t.elapsed().as_secs_f64();
        r
    }

    /// `layer` on `x` by the policy's choice; returns the InstanceNorm statistics of what it
    /// wrote (gathered by the f32 kernels as they write, measured here after the integer ones).
    /// The integer kernels measure `x`'s largest `|value|` for their quantisation; for the direct
    /// one `x` is quantised into `qx` unless a layer reading the same input already did: callers
    /// run the 3x3x3 layer before the 1x1x1 one, so a shared level is the lower, safe for both.
    fn conv(
        &mut self,
        x: &Vol,
        qx: &mut Option<QVol>,
        layer: &Layer,
        out: &mut Vol,
        off: usize,
    ) -> NormStats {
        let t = Instant::now();
        let amax = || abs_max(x, 0, x.c);
        let stats = match self.policy.choose(layer, x.dims) {
            ConvKernel::Winograd(w) => {
                self.stats.winograd_convs += 1;
                self.stats.f4_convs += u32::from(w.variant() == Variant::F4);
                Some(conv_winograd(self.kernels.f32, x, w, out, off))
            }
            ConvKernel::WinogradBf16(w) => {
                self.stats.winograd_convs += 1;
                self.stats.bf16_convs += 1;
                Some(conv_winograd_bf16(self.kernels.bf16, x, w, out, off))
            }
            ConvKernel::QWinograd(qw) => {
                self.stats.winograd_convs += 1;
                Some(conv_qwinograd(self.kernels.int8, x, amax(), qw, out, off))
            }
            ConvKernel::QDirect(q) => {
                let qv = qx
                    .get_or_insert_with(|| QVol::quantize(x, amax(), max_level(q.k()), self.pool.take_i16()));
                qconv(self.kernels.int8, qv, q, out, off);
                None
            }
            ConvKernel::Direct => Some(conv(self.kernels.f32, x, &layer.f, out, off)),
        };
        self.stats.conv_seconds += t.elapsed().as_secs_f64();
        self.stats.conv_macs += (layer.f.macs_per_voxel() * x.dims.iter().product::<usize>()) as u64;
        let k = self.kernels.f32;
        stats.unwrap_or_else(|| self.timed(|| instance_stats(k, out, off, layer.out_ch())))
    }

    fn up(&mut self, x: &Vol, w: &UpConvWeights, out: &mut Vol, off: usize) {
        let t = Instant::now();
        conv_transpose(self.kernels.f32, x, w, out, off);
        self.stats.conv_seconds += t.elapsed().as_secs_f64();
        self.stats.conv_macs += (w.macs_per_input_voxel() * x.dims.iter().product::<usize>()) as u64;
    }
}

/// A UNETR with its weights packed for [`FastUnetr::forward`].
#[derive(Clone, Debug)]
pub struct FastUnetr {
    config: UnetrConfig,
    /// The kernels, chosen once when the model is built.
    kernels: KernelTable,
    vit: vit::FastVit,
    encoder1: Res,
    skips: [Skip; 3],
    ups: [Up; 4],
    /// UNETR's output block: a 1x1x1 convolution.
    out: ConvWeights,
    /// Which algorithm runs each convolution.
    policy: Policy,
    /// Activation buffers kept between windows.
    pool: SharedPool,
}

impl FastUnetr {
    /// Packs the weights of a parsed file (checked and bound by glmae-core).
    pub fn new(file: &ModelFile<'_>) -> Result<Self> {
        let reference = Unetr::new(file)?;
        Ok(Self::from_weights(reference.config(), reference.weights()))
    }

    /// Packs already-bound weights.
    pub fn from_weights(config: &UnetrConfig, w: &UnetrWeights<'_>) -> Self {
        Self {
            config: *config,
            // The CPU is tested once per process; every kernel call below reuses the choice.
            kernels: KernelTable::detect(),
            vit: vit::FastVit::new(&w.vit, &config.vit),
            encoder1: Res::new(&w.encoder1),
            skips: w.skips().map(Skip::new),
            ups: w.ups().map(Up::new),
            out: ConvWeights::new(&w.out.weight, Some(&w.out.bias)),
            // The int8 kernels are opt-in: quantising activations costs accuracy
            // (docs/performance.md).
            policy: Policy { algorithms: ConvAlgorithms::default(), int8: false, bf16: false },
            pool: SharedPool::default(),
        }
    }

    /// Runs on `isa` instead of the detected best; errors if this CPU cannot.
    pub fn with_isa(mut self, isa: Isa) -> Result<Self> {
        let Some(k) = F32Kernels::new(isa) else { anyhow::bail!("this CPU cannot run the {isa:?} kernels") };
        self.kernels.f32 = k;
        Ok(self)
    }

    /// Runs the int8 layers on `qisa`'s integer kernels, or (`None`) on their dequantised f32
    /// weights with the f32 kernels; errors if this CPU cannot.
    pub fn with_int8_kernels(mut self, qisa: Option<QIsa>) -> Result<Self> {
        if let Some(q) = qisa {
            let Some(k) = Int8Kernels::new(q) else {
                anyhow::bail!("this CPU cannot run the {q:?} int8 kernels")
            };
            self.kernels.int8 = k;
        }
        self.policy.int8 = qisa.is_some();
        Ok(self)
    }

    /// The bf16 mode: the decoder's convolutions that run Winograd F(2, 3) (those F(4, 3) does
    /// not take: volumes under 24^3, layers over 128 input channels) run it with their
    /// transformed inputs and weights rounded to bf16 (8 significant bits) and the
    /// products summed in f32, on AVX-512 BF16 where the CPU has it and on portable code that
    /// computes the same values elsewhere (slower, never less accurate: the caller decides the
    /// arithmetic, the CPU only the speed). `false` returns to f32.
    pub fn with_bf16(mut self, on: bool) -> Self {
        if on {
            let skips = self.skips.iter_mut().flat_map(|s| s.stages.iter_mut().map(|(_, r)| r));
            let res = std::iter::once(&mut self.encoder1)
                .chain(skips)
                .chain(self.ups.iter_mut().map(|u| &mut u.res));
            for r in res {
                r.layers_mut().for_each(Layer::pack_bf16);
            }
        }
        self.policy.bf16 = on;
        self
    }

    /// Runs the bf16 mode's products on `bisa` instead of the detected best; errors if this CPU
    /// cannot.
    pub fn with_bf16_kernels(mut self, bisa: BIsa) -> Result<Self> {
        let Some(k) = Bf16Kernels::new(bisa) else {
            anyhow::bail!("this CPU cannot run the {bisa:?} bf16 kernels")
        };
        self.kernels.bf16 = k;
        Ok(self)
    }

    /// Whether the bf16 mode is on ([`Self::with_bf16`]).
    pub fn bf16(&self) -> bool {
        self.policy.bf16
    }

    /// Restricts the algorithms of the 3x3x3 convolutions (all Winograd variants by default).
    pub fn with_conv_algorithms(mut self, algorithms: ConvAlgorithms) -> Self {
        self.policy.algorithms = algorithms;
        self
    }

    /// The algorithms 3x3x3 convolutions may run by.
    pub fn conv_algorithms(&self) -> ConvAlgorithms {
        self.policy.algorithms
    }

    /// The f32 kernels in use.
    pub fn isa(&self) -> Isa {
        self.kernels.f32.isa()
    }

    /// The int8 kernels in use for int8 layers, if any (f32 files never use them).
    pub fn int8_kernels(&self) -> Option<QIsa> {
        (self.has_int8_layers() && self.policy.int8).then(|| self.kernels.int8.qisa())
    }

    /// The kernel table: the f32 and int8 kernel sets this model runs on.
    pub fn kernels(&self) -> KernelTable {
        self.kernels
    }

    fn has_int8_layers(&self) -> bool {
        self.encoder1.conv1.q.is_some()
    }

    /// The architecture.
    pub fn config(&self) -> &UnetrConfig {
        &self.config
    }

    /// Bytes of packed weights held (f32 for both precisions, Winograd-transformed ones too).
    pub fn weight_bytes(&self) -> usize {
        let skips: usize = self
            .skips
            .iter()
            .map(|s| s.init.bytes() + s.stages.iter().map(|(t, r)| t.bytes() + r.bytes()).sum::<usize>())
            .sum();
        let ups: usize = self.ups.iter().map(|u| u.transp.bytes() + u.res.bytes()).sum();
        self.vit.bytes() + self.encoder1.bytes() + skips + ups + self.out.bytes()
    }

    /// Logits `(out_channels, window)` for a channel-first `(in_channels, window)` input, using
    /// the current rayon pool.
    pub fn forward(&self, input: &[f32], window: Dims3) -> Result<Vec<f32>> {
        Ok(self.forward_with_stats(input, window)?.0)
    }

    /// [`Self::forward`], also reporting where the time went.
    pub fn forward_with_stats(&self, input: &[f32], window: Dims3) -> Result<(Vec<f32>, Stats)> {
        let mut out = vec![0.0; self.logits_len(window)];
        let stats = self.forward_into(input, window, &mut out)?;
        Ok((out, stats))
    }

    /// Values in one window's logits: output channels x window voxels.
    pub fn logits_len(&self, window: Dims3) -> usize {
        self.out.out_ch() * window.iter().product::<usize>()
    }

    /// [`Self::forward_with_stats`] into `out` ([`Self::logits_len`] values), for callers that
    /// run many windows: a fresh buffer per window (50 MB at 96^3 and 14 classes, beyond
    /// malloc's reuse) cost 58 ms of page faults at 1 thread, about 9% of the window.
    pub fn forward_into(&self, input: &[f32], window: Dims3, out: &mut [f32]) -> Result<Stats> {
        self.config.check_window(window)?;
        let in_ch = self.config.vit.in_channels as usize;
        let expected = in_ch * window.iter().product::<usize>();
        ensure!(input.len() == expected, "input has {} values, the window needs {expected}", input.len());
        ensure!(
            out.len() == self.logits_len(window),
            "the logits buffer has {} values, the window needs {}",
            out.len(),
            self.logits_len(window)
        );
        if let Some(i) = input.iter().position(|v| !v.is_finite()) {
            anyhow::bail!("input value {i} is NaN or infinite");
        }
        let start = Instant::now();
        let mut cx = Ctx {
            kernels: self.kernels,
            policy: self.policy,
            stats: Stats::default(),
            pool: self.pool.take(),
        };
        let p = self.config.vit.patch_size as usize;
        let grid = window.map(|w| w / p);
        let e = self.config.vit.hidden_size as usize;
        let [z3, z6, z9, z12] =
            self.vit.encode(self.kernels.f32, input, window).map(|t| Vol::from_tokens(&t, grid, e));
        cx.stats.encoder_seconds = start.elapsed().as_secs_f64();

        let d3 = self.ups[0].run(&z12, |c, o, cx| self.skips[2].run(&z9, c, o, cx), &mut cx);
        let d2 = self.ups[1].run(&d3, |c, o, cx| self.skips[1].run(&z6, c, o, cx), &mut cx);
        cx.pool.recycle(d3);
        let d1 = self.ups[2].run(&d2, |c, o, cx| self.skips[0].run(&z3, c, o, cx), &mut cx);
        cx.pool.recycle(d2);
        let x = Vol::from_channel_first(input, window, in_ch);
        let d0 = self.ups[3].run(&d1, |c, o, cx| self.encoder1.run(&x, c, o, cx), &mut cx);
        cx.pool.recycle(d1);
        // The output layer is 1x1x1 (UNETR's `out`), written channel-first directly.
        let t = Instant::now();
        conv1x1_channel_first(self.kernels.f32, &d0, &self.out, out);
        cx.stats.conv_seconds += t.elapsed().as_secs_f64();
        cx.stats.conv_macs += (self.out.macs_per_voxel() * window.iter().product::<usize>()) as u64;
        cx.pool.recycle(d0);
        let mut stats = cx.stats;
        stats.total_seconds = start.elapsed().as_secs_f64();
        self.pool.put(cx.pool);
        Ok(stats)
    }
}

/// Test data: `n` pseudo-random values in [-1, 1) (glmae-core's test-data generator).
#[cfg(test)]
fn lcg(n: usize, seed: u64) -> Vec<f32> {
    glmae_core::synthetic::Lcg::new(seed).symmetric_vec(n)
}
