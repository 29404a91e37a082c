//! glmae-infer's own UNETR forward pass, built for speed on CPUs.
//!
//! glmae-core stays the single definition of the model: [`FastUnetr::new`] takes the core's bound
//! [`UnetrWeights`] and repacks them (int8 weights are dequantised to f32 once, here, so by
//! default both precisions run the same f32 kernels), and the agreement tests compare this pass
//! with the core's reference `Unetr::forward`. What changes is the execution:
//!
//! - every Linear, the patch embedding, both attention products and every convolution run on one
//!   register-tiled GEMM micro-kernel ([`gemm`]) with AVX2 + FMA where the CPU has it;
//! - decoder activations are channel-last with a zero border ([`conv::Vol`]), so a 3x3x3
//!   convolution is an implicit GEMM over 27 shifted views of its input, or (by default, for
//!   layers with 8+ input channels on even sizes) Winograd's F(2x2x2, 3x3x3) ([`winograd`]):
//!   3.4x fewer multiply-adds, 1e-6 of the logit range from the reference;
//! - work inside one window is split across the current rayon pool (output planes for the
//!   decoder, token rows for the encoder), so a single window uses every core;
//! - optionally ([`FastUnetr::with_int8_kernels`]), int8 3x3x3 decoder convolutions run on
//!   integer products (AVX-512 VNNI `vpdpwssd`) of per-tensor quantised activations: by
//!   Winograd on i16 transformed inputs and weights ([`winograd::conv_qwinograd`]), else
//!   directly on the file's int8 weights ([`mod@qconv`]).

pub mod conv;
pub mod gemm;
pub mod qconv;
mod vit;
pub mod winograd;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Result, ensure};
use glmae_core::config::UnetrConfig;
use glmae_core::kernels::Dims3;
use glmae_core::model::{PrUpWeights, ResBlockWeights, UnetrWeights, UpWeights};
use glmae_core::{ModelFile, Unetr};

use conv::{
    ConvWeights, NormStats, UpConvWeights, Vol, abs_max, conv, conv_transpose, instance_stats,
    norm_add_lrelu, norm_lrelu,
};
pub use gemm::Isa;
use glmae_core::tensor::Tensor;
pub use qconv::QIsa;
use qconv::{QConvWeights, QVol, max_level, qconv};
use winograd::{QWinogradWeights, TransformedKernels, WinogradWeights, conv_qwinograd, conv_winograd};

/// A 3x3x3 or 1x1x1 convolution: packed f32 weights always (dequantised for int8 files), the
/// Winograd-transformed ones for 3x3x3 layers with enough input channels, and, when the file
/// stores a 3x3x3 layer as int8, the integer packings for the int8 kernels (direct, and
/// Winograd where the input channels are a multiple of 8). 1x1x1 layers stay f32: quantising
/// their input cost more than their integer products saved.
#[derive(Clone, Debug)]
struct Layer {
    f: ConvWeights,
    w: Option<WinogradWeights>,
    q: Option<QConvWeights>,
    qw: Option<QWinogradWeights>,
}

impl Layer {
    fn new(w: &Tensor<'_>, bias: Option<&Tensor<'_>>) -> Self {
        let shape = w.shape();
        let d = shape.dims();
        let (out_ch, in_ch, kernel) = (d[0] as usize, d[1] as usize, d[2] as usize);
        let b: Option<Vec<f32>> = bias.map(|b| (0..out_ch).map(|i| b.get(i)).collect());
        let q = if kernel == 3 { QConvWeights::new(w, bias) } else { None };
        let (mut wino, mut qw) = (None, None);
        if kernel == 3 && in_ch >= WinogradWeights::MIN_IN_CH {
            // One f64 transform for both packings.
            let k = TransformedKernels::new(out_ch, in_ch, |i| w.get(i));
            wino = Some(WinogradWeights::new(&k, b.as_deref()));
            qw = q.as_ref().and_then(|_| QWinogradWeights::new(&k, b.as_deref()));
        }
        Self { f: ConvWeights::new(w, bias), w: wino, q, qw }
    }

    fn out_ch(&self) -> usize {
        self.f.out_ch()
    }

    fn bytes(&self) -> usize {
        self.f.bytes()
            + self.w.as_ref().map_or(0, WinogradWeights::bytes)
            + self.q.as_ref().map_or(0, QConvWeights::bytes)
            + self.qw.as_ref().map_or(0, QWinogradWeights::bytes)
    }
}

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

    /// MONAI's `UnetResBlock` on `x` into channels `off..` of `out`:
    /// `lrelu(norm(conv2(lrelu(norm(conv1 x)))) + residual)`, the residual being `x` or
    /// `norm(conv3 x)`. `x_max` is `x`'s largest `|value|` when known (the int8 kernels need it);
    /// returns the output's.
    fn run(&self, x: &Vol, x_max: Option<f32>, out: &mut Vol, off: usize, cx: &mut Ctx) -> f32 {
        let o = self.conv2.out_ch();
        let mut a = cx.vol(x.dims, o);
        // conv1 and conv3 read the same input: quantise it at most once.
        let mut qx = None;
        cx.conv(x, x_max, &mut qx, &self.conv1, &mut a, 0);
        let t = Instant::now();
        let s1 = instance_stats(&a, 0, o);
        let a_max = norm_lrelu(&mut a, 0, &s1);
        cx.stats.norm_seconds += t.elapsed().as_secs_f64();
        let mut qa = None;
        cx.conv(&a, Some(a_max), &mut qa, &self.conv2, out, off);
        cx.recycle_q(qa);
        let s2 = cx.timed(|| instance_stats(out, off, o));
        let out_max = match &self.conv3 {
            Some(proj) => {
                // `a` is spent: reuse it for the projected residual (every interior value is rewritten).
                cx.conv(x, x_max, &mut qx, proj, &mut a, 0);
                let t = Instant::now();
                let s3 = instance_stats(&a, 0, o);
                let m = norm_add_lrelu(out, off, &s2, &a, &s3);
                cx.stats.norm_seconds += t.elapsed().as_secs_f64();
                m
            }
            None => cx.timed(|| norm_add_lrelu(out, off, &s2, x, &NormStats::identity(o))),
        };
        cx.recycle_q(qx);
        cx.recycle(a);
        out_max
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
            init: UpConvWeights::new(&w.init),
            stages: w.stages.iter().map(|s| (UpConvWeights::new(&s.transp), Res::new(&s.res))).collect(),
        }
    }

    /// MONAI's `UnetrPrUpBlock` from the hidden-state volume `z` into channels `off..` of `dst`;
    /// returns their largest `|value|` when the int8 kernels need it (else 0).
    fn run(&self, z: &Vol, dst: &mut Vol, off: usize, cx: &mut Ctx) -> f32 {
        if self.stages.is_empty() {
            cx.up(z, &self.init, dst, off);
            return cx.abs_max(dst, off, self.init.out_ch());
        }
        let mut cur = cx.vol(z.dims.map(|d| 2 * d), self.init.out_ch());
        cx.up(z, &self.init, &mut cur, 0);
        let last = self.stages.len() - 1;
        for (j, (transp, res)) in self.stages.iter().enumerate() {
            let mut up = cx.vol(cur.dims.map(|d| 2 * d), transp.out_ch());
            cx.up(&cur, transp, &mut up, 0);
            cx.recycle(cur);
            let up_max = cx.abs_max(&up, 0, up.c);
            if j == last {
                let m = res.run(&up, Some(up_max), dst, off, cx);
                cx.recycle(up);
                return m;
            }
            let mut next = cx.vol(up.dims, transp.out_ch());
            res.run(&up, Some(up_max), &mut next, 0, cx);
            cx.recycle(up);
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
        Self { transp: UpConvWeights::new(&w.transp), res: Res::new(&w.res) }
    }

    /// MONAI's `UnetrUpBlock`: upsample `x`, concatenate (channels-last, so the skip writes the
    /// second half of each voxel's channels directly), residual block.
    /// `skip` writes channels `o..2o` of the concatenation and returns their largest `|value|`;
    /// so does this for its output.
    fn run(&self, x: &Vol, skip: impl FnOnce(&mut Vol, usize, &mut Ctx) -> f32, cx: &mut Ctx) -> (Vol, f32) {
        let o = self.transp.out_ch();
        let dims = x.dims.map(|d| 2 * d);
        let mut cat = cx.vol(dims, 2 * o);
        let skip_max = skip(&mut cat, o, cx);
        cx.up(x, &self.transp, &mut cat, 0);
        let cat_max = cx.abs_max(&cat, 0, o).max(skip_max);
        let mut out = cx.vol(dims, o);
        let m = self.res.run(&cat, Some(cat_max), &mut out, 0, cx);
        cx.recycle(cat);
        (out, m)
    }
}

/// Time and multiply-adds spent in the decoder's convolutions, for the benchmark's GFLOP/s.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Multiply-adds in 3x3x3, 1x1x1 and transposed convolutions.
    pub conv_macs: u64,
    /// Seconds spent in them.
    pub conv_seconds: f64,
    /// How many 3x3x3 convolutions ran by Winograd's algorithm.
    pub winograd_convs: u32,
    /// Seconds in instance norms, activations and residual adds.
    pub norm_seconds: f64,
    /// Seconds in the encoder.
    pub encoder_seconds: f64,
    /// Seconds for the whole window.
    pub total_seconds: f64,
}

/// What one forward pass carries through the decoder: the kernels, the timings, and recycled
/// activation buffers (fresh 100 MB allocations would cost more in page faults than a layer).
struct Ctx {
    isa: Isa,
    qisa: Option<QIsa>,
    winograd: bool,
    stats: Stats,
    pool: Pools,
}

/// Recycled buffers: f32 activations and int16 quantised inputs.
#[derive(Debug, Default)]
struct Pools {
    f32: Vec<Vec<f32>>,
    i16: Vec<Vec<i16>>,
}

impl Ctx {
    /// A volume from the smallest recycled buffer that fits, else a new one.
    fn vol(&mut self, dims: Dims3, c: usize) -> Vol {
        let n = (dims[0] + 2) * (dims[1] + 2) * (dims[2] + 2) * c;
        let pool = &mut self.pool.f32;
        let best = (0..pool.len()).filter(|&i| pool[i].capacity() >= n).min_by_key(|&i| pool[i].capacity());
        match best {
            Some(i) => Vol::reuse(pool.swap_remove(i), dims, c),
            None => Vol::zeros(dims, c),
        }
    }

    /// `abs_max` of a channel range when the int8 kernels are on (they need it), else 0.
    fn abs_max(&mut self, x: &Vol, off: usize, n: usize) -> f32 {
        if self.qisa.is_none() {
            return 0.0;
        }
        let t = Instant::now();
        let m = abs_max(x, off, n);
        self.stats.conv_seconds += t.elapsed().as_secs_f64();
        m
    }

    fn recycle_q(&mut self, q: Option<QVol>) {
        if let Some(q) = q {
            self.pool.i16.push(q.into_buffer());
        }
    }

    /// Runs `f`, counting its time as normalisation.
    fn timed<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.stats.norm_seconds += t.elapsed().as_secs_f64();
        r
    }

    fn recycle(&mut self, v: Vol) {
        self.pool.f32.push(v.data);
    }

    /// `layer` on `x`, whose largest `|value|` is `x_max` when known. With the int8 kernels
    /// and an int8 layer that is not run by Winograd, `x` is quantised into `qx` unless a
    /// layer reading the same input already did: callers run the 3x3x3 layer before the 1x1x1
    /// one, so a shared level is the lower, safe for both.
    fn conv(
        &mut self,
        x: &Vol,
        x_max: Option<f32>,
        qx: &mut Option<QVol>,
        layer: &Layer,
        out: &mut Vol,
        off: usize,
    ) {
        let t = Instant::now();
        let amax = || x_max.unwrap_or_else(|| abs_max(x, 0, x.c));
        match (self.qisa, &layer.q) {
            (Some(qisa), Some(q)) => match &layer.qw {
                Some(qw) if self.winograd && qw.fits(x.dims) => {
                    conv_qwinograd(qisa, x, amax(), qw, out, off);
                    self.stats.winograd_convs += 1;
                }
                _ => {
                    let qv = qx.get_or_insert_with(|| {
                        QVol::quantize(x, amax(), max_level(q.k()), self.pool.i16.pop().unwrap_or_default())
                    });
                    qconv(qisa, qv, q, out, off);
                }
            },
            _ => match &layer.w {
                Some(w) if self.winograd && w.fits(x.dims) => {
                    conv_winograd(self.isa, x, w, out, off);
                    self.stats.winograd_convs += 1;
                }
                _ => conv(self.isa, x, &layer.f, out, off),
            },
        }
        self.stats.conv_seconds += t.elapsed().as_secs_f64();
        self.stats.conv_macs += (layer.f.macs_per_voxel() * x.dims.iter().product::<usize>()) as u64;
    }

    fn up(&mut self, x: &Vol, w: &UpConvWeights, out: &mut Vol, off: usize) {
        let t = Instant::now();
        conv_transpose(self.isa, x, w, out, off);
        self.stats.conv_seconds += t.elapsed().as_secs_f64();
        self.stats.conv_macs += (w.macs_per_input_voxel() * x.dims.iter().product::<usize>()) as u64;
    }
}

/// A UNETR with its weights packed for [`FastUnetr::forward`].
#[derive(Clone, Debug)]
pub struct FastUnetr {
    config: UnetrConfig,
    isa: Isa,
    vit: vit::FastVit,
    encoder1: Res,
    skips: [Skip; 3],
    ups: [Up; 4],
    out: Layer,
    /// int8 kernels for the decoder's int8 convolutions; `None` runs them on dequantised f32.
    qisa: Option<QIsa>,
    /// f32 3x3x3 convolutions by Winograd F(2x2x2, 3x3x3) where they fit.
    winograd: bool,
    /// Activation buffers kept between windows.
    pool: Arc<Mutex<Pools>>,
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
            isa: Isa::detect(),
            vit: vit::FastVit::new(&w.vit, &config.vit),
            encoder1: Res::new(&w.encoder1),
            skips: [Skip::new(&w.skips[0]), Skip::new(&w.skips[1]), Skip::new(&w.skips[2])],
            ups: [Up::new(&w.ups[0]), Up::new(&w.ups[1]), Up::new(&w.ups[2]), Up::new(&w.ups[3])],
            out: Layer::new(&w.out_weight, Some(&w.out_bias)),
            // Opt-in: quantising activations costs accuracy (docs/performance.md).
            qisa: None,
            winograd: true,
            pool: Arc::default(),
        }
    }

    /// Runs on `isa` instead of the detected best; errors if this CPU cannot.
    pub fn with_isa(mut self, isa: Isa) -> Result<Self> {
        ensure!(isa.supported(), "this CPU cannot run the {isa:?} kernels");
        self.isa = isa;
        Ok(self)
    }

    /// Runs the int8 layers on `qisa`'s integer kernels, or (`None`) on their dequantised f32
    /// weights with the f32 kernels; errors if this CPU cannot.
    pub fn with_int8_kernels(mut self, qisa: Option<QIsa>) -> Result<Self> {
        if let Some(q) = qisa {
            ensure!(q.supported(), "this CPU cannot run the {q:?} int8 kernels");
        }
        self.qisa = qisa;
        Ok(self)
    }

    /// Runs the f32 3x3x3 convolutions by Winograd's F(2x2x2, 3x3x3) (the default) or
    /// (`false`) as direct implicit GEMMs.
    pub fn with_winograd(mut self, on: bool) -> Self {
        self.winograd = on;
        self
    }

    /// Whether f32 3x3x3 convolutions run by Winograd's algorithm.
    pub fn winograd(&self) -> bool {
        self.winograd
    }

    /// The f32 kernels in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The int8 kernels in use for int8 layers, if any (f32 files never use them).
    pub fn int8_kernels(&self) -> Option<QIsa> {
        if self.has_int8_layers() { self.qisa } else { None }
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
        self.config.check_window(window)?;
        let in_ch = self.config.vit.in_channels as usize;
        let expected = in_ch * window.iter().product::<usize>();
        ensure!(input.len() == expected, "input has {} values, the window needs {expected}", input.len());
        if let Some(i) = input.iter().position(|v| !v.is_finite()) {
            anyhow::bail!("input value {i} is NaN or infinite");
        }
        let start = Instant::now();
        let pool = std::mem::take(&mut *self.pool.lock().unwrap_or_else(|e| e.into_inner()));
        let mut cx =
            Ctx { isa: self.isa, qisa: self.qisa, winograd: self.winograd, stats: Stats::default(), pool };
        let p = self.config.vit.patch_size as usize;
        let grid = window.map(|w| w / p);
        let e = self.config.vit.hidden_size as usize;
        let [z3, z6, z9, z12] =
            self.vit.encode(self.isa, input, window).map(|t| Vol::from_tokens(&t, grid, e));
        cx.stats.encoder_seconds = start.elapsed().as_secs_f64();

        let (d3, _) = self.ups[0].run(&z12, |c, o, cx| self.skips[2].run(&z9, c, o, cx), &mut cx);
        let (d2, _) = self.ups[1].run(&d3, |c, o, cx| self.skips[1].run(&z6, c, o, cx), &mut cx);
        cx.recycle(d3);
        let (d1, _) = self.ups[2].run(&d2, |c, o, cx| self.skips[0].run(&z3, c, o, cx), &mut cx);
        cx.recycle(d2);
        let x = Vol::from_channel_first(input, window, in_ch);
        let (d0, d0_max) = self.ups[3].run(&d1, |c, o, cx| self.encoder1.run(&x, None, c, o, cx), &mut cx);
        cx.recycle(d1);
        let classes = self.out.out_ch();
        let mut logits = cx.vol(window, classes);
        let mut q0 = None;
        cx.conv(&d0, Some(d0_max), &mut q0, &self.out, &mut logits, 0);
        cx.recycle_q(q0);
        cx.recycle(d0);
        let out = logits.to_channel_first(0, classes);
        cx.recycle(logits);
        let mut stats = cx.stats;
        stats.total_seconds = start.elapsed().as_secs_f64();
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = cx.pool;
        Ok((out, stats))
    }
}

/// Test data: `n` pseudo-random values in [-1, 1).
#[cfg(test)]
fn lcg(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
