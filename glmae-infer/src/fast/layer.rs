//! One convolution layer's weights, in every packing the policy ([`super::policy`]) may run it on.

use glmae_core::tensor::Tensor;

use super::conv::ConvWeights;
use super::policy::Packings;
use super::qconv::QConvWeights;
use super::winograd::{QWinogradWeights, TransformedKernels, Variant, WinogradWeights};

/// A 3x3x3 or 1x1x1 convolution: packed f32 weights always (dequantised for int8 files), the
/// Winograd-transformed ones where [`Packings::for_layer`] asks for them, and, when the file
/// stores a 3x3x3 layer as int8, the integer packings for the int8 kernels (direct, and F(2, 3)
/// Winograd where the input channels are a multiple of 8). 1x1x1 layers stay f32: quantising
/// their input cost more than their integer products saved.
#[derive(Clone, Debug)]
pub(super) struct Layer {
    /// The direct packing.
    pub f: ConvWeights,
    /// Winograd F(2, 3).
    pub w2: Option<WinogradWeights>,
    /// Winograd F(4, 3).
    pub w4: Option<WinogradWeights>,
    /// The direct int8 packing.
    pub q: Option<QConvWeights>,
    /// Integer Winograd F(2, 3).
    pub qw: Option<QWinogradWeights>,
}

impl Layer {
    pub(super) fn new(w: &Tensor<'_>, bias: Option<&Tensor<'_>>) -> Self {
        let shape = w.shape();
        let d = shape.dims();
        let (out_ch, in_ch, kernel) = (d[0] as usize, d[1] as usize, d[2] as usize);
        let b: Option<Vec<f32>> = bias.map(|b| (0..out_ch).map(|i| b.get(i)).collect());
        let q = if kernel == 3 { QConvWeights::new(w, bias) } else { None };
        let (mut w2, mut w4, mut qw) = (None, None, None);
        let packings = Packings::for_layer(kernel, in_ch);
        if packings.f2 {
            // One f64 transform for both F(2, 3) packings.
            let k = TransformedKernels::new(Variant::F2, out_ch, in_ch, |i| w.get(i));
            w2 = Some(WinogradWeights::new(&k, b.as_deref()));
            qw = q.as_ref().and_then(|_| QWinogradWeights::new(&k, b.as_deref()));
        }
        if packings.f4 {
            w4 = Some(WinogradWeights::from_fn(Variant::F4, out_ch, in_ch, |i| w.get(i), b.as_deref()));
        }
        Self { f: ConvWeights::new(w, bias), w2, w4, q, qw }
    }

    /// Adds the bf16 packing of F(2, 3), which the bf16 mode runs wherever F(2, 3) runs.
    pub(super) fn pack_bf16(&mut self) {
        if let Some(w2) = &mut self.w2 {
            w2.pack_bf16();
        }
    }

    /// Output channels.
    pub(super) fn out_ch(&self) -> usize {
        self.f.out_ch()
    }

    /// Bytes of packed weights, every packing included.
    pub(super) fn bytes(&self) -> usize {
        self.f.bytes()
            + self.w2.as_ref().map_or(0, WinogradWeights::bytes)
            + self.w4.as_ref().map_or(0, WinogradWeights::bytes)
            + self.q.as_ref().map_or(0, QConvWeights::bytes)
            + self.qw.as_ref().map_or(0, QWinogradWeights::bytes)
    }
}
