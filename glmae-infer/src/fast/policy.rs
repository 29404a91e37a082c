//! Which algorithm runs each convolution: the packings a layer gets when the model is loaded
//! ([`Packings::for_layer`]) and, per call, the kernel among them ([`Policy::choose`]). The
//! thresholds come from single-layer timings (docs/performance.md).

use glmae_core::kernels::Dims3;

use super::layer::Layer;
use super::qconv::QConvWeights;
use super::winograd::{QWinogradWeights, Variant, WinogradWeights};

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

/// Winograd runs from this many input channels on (one AVX register of the transforms). At
/// 8 -> 16 channels on 96^3 F(2, 3) took 50 ms against 62 direct; at 4 (the transforms'
/// portable path) 111 against 33.
const WINOGRAD_MIN_IN_CH: usize = 8;

/// F(4, 3) weights are built up to this many input channels. One layer at 1 thread
/// (docs/performance.md), F(4, 3) / F(2, 3) / integer F(2, 3) ms: 32 -> 16 at 96^3
/// 88 / 151 / 131, 64 -> 32 at 48^3 31 / 55 / 44, 128 -> 64 at 24^3 13 / 24 / 15,
/// 256 -> 128 at 12^3 14 / 12 / 6: with many channels on few tiles, streaming 216
/// transformed weight matrices per block of tiles costs more than the products save.
const F4_MAX_IN_CH: usize = 128;

/// F(4, 3) runs on volumes of at least this many voxels along each axis (6 tiles; at
/// 128 -> 128 on 12^3 it is no faster than F(2, 3), 5.3 against 5.5 ms).
const F4_MIN_EDGE: usize = 24;

/// Below this many input channels the f32 direct kernel is faster than the integer one (1 -> 16
/// channels on 96^3: 13 against 18 ms, quantising the input included).
const INT8_MIN_IN_CH: usize = 8;

/// With the int8 kernels on, the integer F(2, 3) kernel takes layers from this many input
/// channels on, even where F(4, 3) would run (15 against 13-16 ms at 128 -> 64 on 24^3, 3
/// against 5 at 128 -> 128 on 12^3).
const QWINOGRAD_FROM_IN_CH: usize = 128;

/// Which Winograd packings a layer gets at load (besides the direct f32 one, always, and the
/// direct int8 one for int8 3x3x3 layers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Packings {
    /// F(2, 3) (and its integer form where the weights are int8).
    pub f2: bool,
    /// F(4, 3).
    pub f4: bool,
}

impl Packings {
    /// For a `kernel`^3 convolution with `in_ch` input channels.
    pub(super) fn for_layer(kernel: usize, in_ch: usize) -> Self {
        let f2 = kernel == 3 && in_ch >= WINOGRAD_MIN_IN_CH;
        Self { f2, f4: f2 && in_ch <= F4_MAX_IN_CH }
    }
}

/// The kernel one convolution runs on.
#[derive(Clone, Copy, Debug)]
pub(super) enum ConvKernel<'l> {
    /// The f32 implicit GEMM on the layer's direct packing.
    Direct,
    /// Winograd in f32, either variant.
    Winograd(&'l WinogradWeights),
    /// The direct int8 kernel.
    QDirect(&'l QConvWeights),
    /// Integer Winograd F(2, 3).
    QWinograd(&'l QWinogradWeights),
    /// Winograd F(2, 3) with bf16 products.
    WinogradBf16(&'l WinogradWeights),
}

/// A model's rules for choosing kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Policy {
    /// The algorithms 3x3x3 convolutions may run by.
    pub algorithms: ConvAlgorithms,
    /// Whether int8 layers may run on the integer kernels (else on their dequantised f32
    /// weights).
    pub int8: bool,
    /// Whether the layers that run F(2, 3) run it with bf16 products (the bf16 mode).
    pub bf16: bool,
}

impl Policy {
    /// Which kernel runs `layer` on a volume of size `dims`: F(4, 3) where its weights exist
    /// and suit the size (unless the integer F(2, 3) kernel is on and the layer has
    /// [`QWINOGRAD_FROM_IN_CH`]+ input channels); else the int8 kernels for int8 layers with
    /// [`INT8_MIN_IN_CH`]+ input channels when on; else F(2, 3) where the size is even; else
    /// the direct implicit GEMM. In the bf16 mode, F(2, 3) runs with bf16 products.
    pub(super) fn choose<'l>(&self, layer: &'l Layer, dims: Dims3) -> ConvKernel<'l> {
        match self.choose_f32_or_int8(layer, dims) {
            // F(2, 3) runs where F(4, 3) does not apply (volumes under 24^3, layers over 128
            // input channels); there bf16 products are the faster kernel. One layer at 1 thread,
            // F(2, 3) f32 / bf16 ms: 256 -> 128 at 12^3 15.9 / 9.1, 128 -> 128 at 12^3 7.5 /
            // 4.5, 16 -> 16 at 96^3 119 / 82 (where F(4, 3) in f32 takes 48). F(4, 3) has no bf16
            // form ([`super::winograd::WinogradWeights::pack_bf16`]).
            ConvKernel::Winograd(w) if self.bf16 && w.variant() == Variant::F2 && w.has_bf16() => {
                ConvKernel::WinogradBf16(w)
            }
            k => k,
        }
    }

    /// [`Self::choose`] without the bf16 mode.
    fn choose_f32_or_int8<'l>(&self, layer: &'l Layer, dims: Dims3) -> ConvKernel<'l> {
        let in_ch = layer.f.in_ch();
        let int8 = layer.q.as_ref().filter(|_| self.int8 && in_ch >= INT8_MIN_IN_CH);
        let qwinograd = match (self.algorithms, int8, &layer.qw) {
            (ConvAlgorithms::Direct, ..) => None,
            (_, Some(_), Some(qw)) if qw.fits(dims) => Some(ConvKernel::QWinograd(qw)),
            _ => None,
        };
        if self.algorithms == ConvAlgorithms::Winograd
            && let Some(w4) = Self::f4_for(layer, dims)
            && (qwinograd.is_none() || in_ch < QWINOGRAD_FROM_IN_CH)
        {
            return ConvKernel::Winograd(w4);
        }
        if let Some(k) = qwinograd {
            return k;
        }
        if let Some(q) = int8 {
            return ConvKernel::QDirect(q);
        }
        match &layer.w2 {
            Some(w2) if self.algorithms != ConvAlgorithms::Direct && w2.fits(dims) => {
                ConvKernel::Winograd(w2)
            }
            _ => ConvKernel::Direct,
        }
    }

    /// `layer`'s F(4, 3) weights, if they exist and suit a volume of size `dims`.
    fn f4_for(layer: &Layer, dims: Dims3) -> Option<&WinogradWeights> {
        layer.w4.as_ref().filter(|w| w.fits(dims) && dims.iter().all(|&d| d >= F4_MIN_EDGE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Winograd from 8 input channels, F(4, 3) up to 128, 3x3x3 layers only.
    #[test]
    fn packings_follow_the_thresholds() {
        assert_eq!(Packings::for_layer(3, 7), Packings { f2: false, f4: false });
        assert_eq!(Packings::for_layer(3, 8), Packings { f2: true, f4: true });
        assert_eq!(Packings::for_layer(3, 128), Packings { f2: true, f4: true });
        assert_eq!(Packings::for_layer(3, 256), Packings { f2: true, f4: false });
        assert_eq!(Packings::for_layer(1, 64), Packings { f2: false, f4: false });
    }
}
