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
//!   layers with 8+ input channels) Winograd's F(4x4x4, 3x3x3) (up to 128 input channels on
//!   volumes of 24+ voxels per axis, 8x fewer multiply-adds) or F(2x2x2, 3x3x3) (3.4x fewer)
//!   ([`winograd`]), 1e-6 to 1e-5 of the logit range from the reference;
//! - work inside one window is split across the current rayon pool (output planes for the
//!   decoder, token rows for the encoder), so a single window uses every core;
//! - optionally ([`FastUnetr::with_int8_kernels`]), int8 3x3x3 decoder convolutions with 128+
//!   input channels run on integer products (AVX-512 VNNI `vpdpwssd`) of per-tensor quantised
//!   activations, where they beat F(4, 3) in f32: by Winograd on i16 transformed inputs and
//!   weights ([`winograd::conv_qwinograd`]), else directly on the file's int8 weights
//!   ([`mod@qconv`]).

pub mod conv;
pub mod gemm;
mod math;
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
    ConvWeights, NormStats, UpConvWeights, Vol, abs_max, conv, conv_transpose, conv1x1_channel_first,
    instance_stats, norm_add_lrelu, norm_lrelu,
};
pub use gemm::Isa;
use glmae_core::tensor::Tensor;
pub use qconv::QIsa;
use qconv::{QConvWeights, QVol, max_level, qconv};
use winograd::{
    QWinogradWeights, TransformedKernels, Variant, WinogradWeights, conv_qwinograd, conv_winograd,
};

/// A 3x3x3 or 1x1x1 convolution: packed f32 weights always (dequantised for int8 files), the
/// Winograd-transformed ones for 3x3x3 layers with enough input channels (F(4, 3) only up to
/// [`Layer::F4_MAX_IN_CH`]), and, when the file stores a 3x3x3 layer as int8, the integer
/// packings for the int8 kernels (direct, and F(2, 3) Winograd where the input channels are a
/// multiple of 8). 1x1x1 layers stay f32: quantising their input cost more than their integer
/// products saved.
#[derive(Clone, Debug)]
struct Layer {
    f: ConvWeights,
    w2: Option<WinogradWeights>,
    w4: Option<WinogradWeights>,
    q: Option<QConvWeights>,
    qw: Option<QWinogradWeights>,
}

impl Layer {
    /// F(4, 3) weights are built up to this many input channels. One layer at 1 thread
    /// (docs/performance.md), F(4, 3) / F(2, 3) / integer F(2, 3) ms: 32 -> 16 at 96^3
    /// 88 / 151 / 131, 64 -> 32 at 48^3 31 / 55 / 44, 128 -> 64 at 24^3 13 / 24 / 15,
    /// 256 -> 128 at 12^3 14 / 12 / 6: with many channels on few tiles, streaming 216
    /// transformed weight matrices per block of tiles costs more than the products save.
    const F4_MAX_IN_CH: usize = 128;

    /// F(4, 3) runs on volumes of at least this many voxels along each axis (6 tiles; at
    /// 128 -> 128 on 12^3 it is no faster than F(2, 3), 5.3 against 5.5 ms).
    const F4_MIN_EDGE: usize = 24;

    fn new(w: &Tensor<'_>, bias: Option<&Tensor<'_>>) -> Self {
        let shape = w.shape();
        let d = shape.dims();
        let (out_ch, in_ch, kernel) = (d[0] as usize, d[1] as usize, d[2] as usize);
        let b: Option<Vec<f32>> = bias.map(|b| (0..out_ch).map(|i| b.get(i)).collect());
        let q = if kernel == 3 { QConvWeights::new(w, bias) } else { None };
        let (mut w2, mut w4, mut qw) = (None, None, None);
        if kernel == 3 && in_ch >= WinogradWeights::MIN_IN_CH {
            // One f64 transform for both F(2, 3) packings.
            let k = TransformedKernels::new(Variant::F2, out_ch, in_ch, |i| w.get(i));
            w2 = Some(WinogradWeights::new(&k, b.as_deref()));
            qw = q.as_ref().and_then(|_| QWinogradWeights::new(&k, b.as_deref()));
            if in_ch <= Self::F4_MAX_IN_CH {
                w4 = Some(WinogradWeights::from_fn(Variant::F4, out_ch, in_ch, |i| w.get(i), b.as_deref()));
            }
        }
        Self { f: ConvWeights::new(w, bias), w2, w4, q, qw }
    }

    /// The F(4, 3) weights, if they exist and suit a volume of size `dims`.
    fn f4_for(&self, dims: Dims3) -> Option<&WinogradWeights> {
        self.w4.as_ref().filter(|w| w.fits(dims) && dims.iter().all(|&d| d >= Self::F4_MIN_EDGE))
    }

    fn out_ch(&self) -> usize {
        self.f.out_ch()
    }

    fn bytes(&self) -> usize {
        self.f.bytes()
            + self.w2.as_ref().map_or(0, WinogradWeights::bytes)
            + self.w4.as_ref().map_or(0, WinogradWeights::bytes)
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
    /// `norm(conv3 x)`.
    fn run(&self, x: &Vol, out: &mut Vol, off: usize, cx: &mut Ctx) {
        let o = self.conv2.out_ch();
        let mut a = cx.vol(x.dims, o);
        // conv1 and conv3 read the same input: quantise it at most once.
        let mut qx = None;
        let s1 = cx.conv(x, &mut qx, &self.conv1, &mut a, 0);
        cx.timed(|| norm_lrelu(&mut a, 0, &s1));
        let mut qa = None;
        let s2 = cx.conv(&a, &mut qa, &self.conv2, out, off);
        cx.recycle_q(qa);
        match &self.conv3 {
            Some(proj) => {
                // `a` is spent: reuse it for the projected residual (every interior value is rewritten).
                let s3 = cx.conv(x, &mut qx, proj, &mut a, 0);
                cx.timed(|| norm_add_lrelu(out, off, &s2, &a, &s3));
            }
            None => cx.timed(|| norm_add_lrelu(out, off, &s2, x, &NormStats::identity(o))),
        }
        cx.recycle_q(qx);
        cx.recycle(a);
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
        let mut cur = cx.vol(z.dims.map(|d| 2 * d), self.init.out_ch());
        cx.up(z, &self.init, &mut cur, 0);
        let last = self.stages.len() - 1;
        for (j, (transp, res)) in self.stages.iter().enumerate() {
            let mut up = cx.vol(cur.dims.map(|d| 2 * d), transp.out_ch());
            cx.up(&cur, transp, &mut up, 0);
            cx.recycle(cur);
            if j == last {
                res.run(&up, dst, off, cx);
                cx.recycle(up);
                return;
            }
            let mut next = cx.vol(up.dims, transp.out_ch());
            res.run(&up, &mut next, 0, cx);
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
        Self { transp: UpConvWeights::new(&w.transp_conv), res: Res::new(&w.conv_block) }
    }

    /// MONAI's `UnetrUpBlock`: upsample `x`, concatenate (channels-last, so the skip writes the
    /// second half of each voxel's channels directly), residual block.
    /// `skip` writes channels `o..2o` of the concatenation.
    fn run(&self, x: &Vol, skip: impl FnOnce(&mut Vol, usize, &mut Ctx), cx: &mut Ctx) -> Vol {
        let o = self.transp.out_ch();
        let dims = x.dims.map(|d| 2 * d);
        let mut cat = cx.vol(dims, 2 * o);
        skip(&mut cat, o, cx);
        cx.up(x, &self.transp, &mut cat, 0);
        let mut out = cx.vol(dims, o);
        self.res.run(&cat, &mut out, 0, cx);
        cx.recycle(cat);
        out
    }
}

/// The kernel one convolution runs on.
enum Kernel<'l> {
    Direct,
    Winograd(&'l WinogradWeights),
    QDirect(QIsa, &'l QConvWeights),
    QWinograd(QIsa, &'l QWinogradWeights),
}

/// The algorithms 3x3x3 convolutions may run by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvAlgorithms {
    /// Direct implicit GEMMs only.
    Direct,
    /// Winograd F(2x2x2, 3x3x3) where the volume's sizes are even (layers with 8+ input channels).
    WinogradF2,
    /// Also Winograd F(4x4x4, 3x3x3) for layers with 8 to 128 input channels on volumes of
    /// 24+ voxels per axis divisible by 4 (the default: the fastest).
    #[default]
    Winograd,
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
    algorithms: ConvAlgorithms,
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

    /// `layer` on `x` by [`Self::kernel`]'s choice; returns the InstanceNorm statistics of what
    /// it wrote (gathered by the Winograd kernels, measured here after the others). The integer
    /// kernels measure `x`'s largest `|value|` for their quantisation; for the direct one `x` is
    /// quantised into `qx` unless a layer reading the same input already did: callers run the
    /// 3x3x3 layer before the 1x1x1 one, so a shared level is the lower, safe for both.
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
        let stats = match self.kernel(layer, x.dims) {
            Kernel::Winograd(w) => {
                self.stats.winograd_convs += 1;
                self.stats.f4_convs += u32::from(w.variant() == Variant::F4);
                Some(conv_winograd(self.isa, x, w, out, off))
            }
            Kernel::QWinograd(qisa, qw) => {
                self.stats.winograd_convs += 1;
                Some(conv_qwinograd(qisa, x, amax(), qw, out, off))
            }
            Kernel::QDirect(qisa, q) => {
                let qv = qx.get_or_insert_with(|| {
                    QVol::quantize(x, amax(), max_level(q.k()), self.pool.i16.pop().unwrap_or_default())
                });
                qconv(qisa, qv, q, out, off);
                None
            }
            Kernel::Direct => {
                conv(self.isa, x, &layer.f, out, off);
                None
            }
        };
        self.stats.conv_seconds += t.elapsed().as_secs_f64();
        self.stats.conv_macs += (layer.f.macs_per_voxel() * x.dims.iter().product::<usize>()) as u64;
        stats.unwrap_or_else(|| self.timed(|| instance_stats(out, off, layer.out_ch())))
    }

    /// Which kernel runs `layer` on a volume of size `dims`: F(4, 3) where its weights exist
    /// and suit the size (unless the integer F(2, 3) kernel is on and the layer has 128+ input
    /// channels, where it was faster: 15 against 13-16 ms at 128 -> 64 on 24^3, 3 against 5 at
    /// 128 -> 128 on 12^3); else the int8 kernels for int8 layers with 8+ input channels when
    /// on; else F(2, 3) where the size is even; else the direct implicit GEMM.
    fn kernel<'l>(&self, layer: &'l Layer, dims: Dims3) -> Kernel<'l> {
        // Below 8 input channels the f32 direct kernel is faster than the integer one (1 -> 16
        // channels on 96^3: 13 against 18 ms, quantising the input included).
        let int8 = self.qisa.zip(layer.q.as_ref()).filter(|_| layer.f.in_ch() >= 8);
        let qwinograd = match (self.algorithms, int8, &layer.qw) {
            (ConvAlgorithms::Direct, ..) => None,
            (_, Some((qisa, _)), Some(qw)) if qw.fits(dims) => Some(Kernel::QWinograd(qisa, qw)),
            _ => None,
        };
        if self.algorithms == ConvAlgorithms::Winograd
            && let Some(w4) = layer.f4_for(dims)
            && (qwinograd.is_none() || layer.f.in_ch() < Self::QWINOGRAD_FROM_IN_CH)
        {
            return Kernel::Winograd(w4);
        }
        if let Some(k) = qwinograd {
            return k;
        }
        if let Some((qisa, q)) = int8 {
            return Kernel::QDirect(qisa, q);
        }
        match &layer.w2 {
            Some(w2) if self.algorithms != ConvAlgorithms::Direct && w2.fits(dims) => Kernel::Winograd(w2),
            _ => Kernel::Direct,
        }
    }

    /// With the int8 kernels on, the integer F(2, 3) kernel takes layers from this many input
    /// channels on even where F(4, 3) would run.
    const QWINOGRAD_FROM_IN_CH: usize = 128;

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
    /// UNETR's output block: a 1x1x1 convolution.
    out: ConvWeights,
    /// int8 kernels for the decoder's int8 convolutions; `None` runs them on dequantised f32.
    qisa: Option<QIsa>,
    /// The algorithms 3x3x3 convolutions may run by.
    algorithms: ConvAlgorithms,
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
            skips: w.skips().map(Skip::new),
            ups: w.ups().map(Up::new),
            out: ConvWeights::new(&w.out.weight, Some(&w.out.bias)),
            // Opt-in: quantising activations costs accuracy (docs/performance.md).
            qisa: None,
            algorithms: ConvAlgorithms::default(),
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

    /// Restricts the algorithms of the 3x3x3 convolutions (all Winograd variants by default).
    pub fn with_conv_algorithms(mut self, algorithms: ConvAlgorithms) -> Self {
        self.algorithms = algorithms;
        self
    }

    /// The algorithms 3x3x3 convolutions may run by.
    pub fn conv_algorithms(&self) -> ConvAlgorithms {
        self.algorithms
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
        let pool = std::mem::take(&mut *self.pool.lock().unwrap_or_else(|e| e.into_inner()));
        let mut cx = Ctx {
            isa: self.isa,
            qisa: self.qisa,
            algorithms: self.algorithms,
            stats: Stats::default(),
            pool,
        };
        let p = self.config.vit.patch_size as usize;
        let grid = window.map(|w| w / p);
        let e = self.config.vit.hidden_size as usize;
        let [z3, z6, z9, z12] =
            self.vit.encode(self.isa, input, window).map(|t| Vol::from_tokens(&t, grid, e));
        cx.stats.encoder_seconds = start.elapsed().as_secs_f64();

        let d3 = self.ups[0].run(&z12, |c, o, cx| self.skips[2].run(&z9, c, o, cx), &mut cx);
        let d2 = self.ups[1].run(&d3, |c, o, cx| self.skips[1].run(&z6, c, o, cx), &mut cx);
        cx.recycle(d3);
        let d1 = self.ups[2].run(&d2, |c, o, cx| self.skips[0].run(&z3, c, o, cx), &mut cx);
        cx.recycle(d2);
        let x = Vol::from_channel_first(input, window, in_ch);
        let d0 = self.ups[3].run(&d1, |c, o, cx| self.encoder1.run(&x, c, o, cx), &mut cx);
        cx.recycle(d1);
        // The output layer is 1x1x1 (UNETR's `out`), written channel-first directly.
        let t = Instant::now();
        conv1x1_channel_first(self.isa, &d0, &self.out, out);
        cx.stats.conv_seconds += t.elapsed().as_secs_f64();
        cx.stats.conv_macs += (self.out.macs_per_voxel() * window.iter().product::<usize>()) as u64;
        cx.recycle(d0);
        let mut stats = cx.stats;
        stats.total_seconds = start.elapsed().as_secs_f64();
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = cx.pool;
        Ok(stats)
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
