//! The integer forward pass: int8 activations with calibrated per-tensor scales, int8 weights
//! with per-channel scales, int32 sums ([`crate::kernels::int8`]).
//!
//! What stays f32, and why:
//! - InstanceNorm and LayerNorm: they need the mean and variance of a whole channel or token,
//!   and a norm follows every convolution of the decoder, so each convolution's int32 sums go
//!   straight into the norm, then LeakyReLU and the residual add, and leave as int8.
//! - The encoder's token stream, GELU and attention's softmax: 8 to 216 tokens; the Linear layers
//!   around them take int8 inputs. Attention's two products stay f32: at 216 tokens of width 192
//!   they are under 1% of a window's multiply-adds.
//!
//! - decoder2's output and the 1x1x1 output conv: int8 there loses LeakyReLU's negative tail
//!   (slope 0.01, below one level of the tensor's scale), which shifts every logit; measured on
//!   the firmware's model, 95.1% of labels as the f32 path's with it in int8, 99.4% in f32. The
//!   output conv's logits exist only per voxel, for the argmax: no logits buffer.
//!
//! Transposed convolutions requantise their int32 sums with fixed-point multipliers
//! ([`Requant`]). A decoder's concatenation keeps one scale per half ([`super::points`]).
//!
//! Scratch is three caller buffers ([`Int8Scratch`]): `f32` for the encoder, `i32` for
//! accumulators, `i8` for activations; [`Unetr::int8_scratch_len`] says how large.

use super::arena::{Arena, ForwardError, IntBuffer, sat_sum};
use super::points::{BlockPoint, Points, ResPoints, SkipPoints, UpPoints};
use super::unetr::{double, output_labels, vox};
use super::vit::{VitDims, tokens_to_volume};
use super::weights::{PrUpWeights, ResBlockWeights, UpWeights, VitWeights};
use super::{Unetr, UnetrWeights};
use crate::config::{PosEmbed, UNETR_TAPS};
use crate::kernels::int8::{
    Requant, dot, qconv_transpose_up2, qconv3d, qconv3d_scratch, quantize, quantize_slice,
};
use crate::kernels::{
    Dims3, INSTANCE_NORM_EPS, add_sincos_position_embedding, gather_patch, gelu_in_place, layer_norm,
    leaky_relu, moments_by, self_attention, voxels,
};
use crate::tensor::{Tensor, TensorData, f32_at};

/// The integer pass's scratch: three buffers of the lengths [`Unetr::int8_scratch_len`] gives.
pub struct Int8Scratch<'s> {
    /// The encoder's f32 token stream and temporaries.
    pub f32s: &'s mut [f32],
    /// int32 accumulators.
    pub i32s: &'s mut [i32],
    /// int8 activations.
    pub i8s: &'s mut [i8],
}

/// Lengths of the three buffers of [`Int8Scratch`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Int8ScratchLen {
    /// f32 values.
    pub f32s: usize,
    /// int32 values.
    pub i32s: usize,
    /// int8 values.
    pub i8s: usize,
}

impl Int8ScratchLen {
    /// Bytes in all.
    pub fn bytes(&self) -> usize {
        self.f32s.saturating_mul(4).saturating_add(self.i32s.saturating_mul(4)).saturating_add(self.i8s)
    }

    fn add(self, o: Self) -> Self {
        Self {
            f32s: self.f32s.saturating_add(o.f32s),
            i32s: self.i32s.saturating_add(o.i32s),
            i8s: self.i8s.saturating_add(o.i8s),
        }
    }

    /// Each buffer's larger need: the peak of two things that do not live at once.
    fn max(self, o: Self) -> Self {
        Self { f32s: self.f32s.max(o.f32s), i32s: self.i32s.max(o.i32s), i8s: self.i8s.max(o.i8s) }
    }

    fn i8s(n: usize) -> Self {
        Self { i8s: n, ..Self::default() }
    }

    fn i32s(n: usize) -> Self {
        Self { i32s: n, ..Self::default() }
    }
}

/// Bump arenas over the three buffers.
struct Arenas<'s> {
    f: Arena<'s, f32>,
    i: Arena<'s, i32>,
    b: Arena<'s, i8>,
}

impl<'s> Arenas<'s> {
    fn new(s: Int8Scratch<'s>) -> Self {
        Self {
            f: Arena::int(s.f32s, IntBuffer::F32),
            i: Arena::int(s.i32s, IntBuffer::I32),
            b: Arena::int(s.i8s, IntBuffer::I8),
        }
    }

    /// Everything not yet taken, for a callee.
    fn rest(&mut self) -> Arenas<'_> {
        Arenas {
            f: Arena::int(self.f.rest(), IntBuffer::F32),
            i: Arena::int(self.i.rest(), IntBuffer::I32),
            b: Arena::int(self.b.rest(), IntBuffer::I8),
        }
    }
}

/// An int8 weight: its values (bytes of `i8`) and one f32 scale per output channel.
#[derive(Clone, Copy)]
struct QWeight<'a> {
    values: &'a [u8],
    scales: &'a [u8],
}

impl<'a> QWeight<'a> {
    fn of(t: &Tensor<'a>) -> Result<Self, ForwardError> {
        match t.data() {
            TensorData::Int8 { values, scales, .. } => Ok(Self { values, scales }),
            TensorData::F32(_) => {
                Err(ForwardError::NotInt8 { missing: "int8 weights (this file's are f32)" })
            }
        }
    }

    fn scale(&self, c: usize) -> f32 {
        f32_at(self.scales, c)
    }

    /// Row `r` of a `(rows, rest)` weight.
    fn row(&self, r: usize, len: usize) -> &'a [u8] {
        &self.values[r * len..(r + 1) * len]
    }
}

/// The scales of every point, read from the file's [`super::points::ACTIVATION_SCALES`].
struct Scales<'a> {
    t: Tensor<'a>,
    points: Points,
}

impl Scales<'_> {
    fn get(&self, p: usize) -> f32 {
        self.t.get(p)
    }
}

/// A convolution's dequantised output at voxel `j`: the parts' int32 sums times their scales
/// (`sums[1]` empty for one part). The norms' moments and the values they normalise both come
/// from here, so both see the same f32 numbers.
#[inline]
fn dequant(sums: [&[i32]; 2], c: [f32; 2], j: usize) -> f32 {
    if sums[1].is_empty() {
        sums[0][j] as f32 * c[0]
    } else {
        sums[0][j] as f32 * c[0] + sums[1][j] as f32 * c[1]
    }
}

/// Per-channel mean and `1 / sqrt(var + eps)` of [`dequant`] over the channel: the InstanceNorm
/// of a convolution's dequantised output.
fn norm_of(sums: [&[i32]; 2], c: [f32; 2]) -> (f32, f32) {
    let (mean, var) = moments_by(sums[0].len(), |j| dequant(sums, c, j));
    (mean, 1.0 / libm::sqrtf(var + INSTANCE_NORM_EPS))
}

/// Where a residual block's output goes: int8 with its scale, or f32 (decoder2's output, which
/// only the output conv reads: see [`Unetr::segment_int8`]).
enum Out<'o> {
    I8(&'o mut [i8], f32),
    F32(&'o mut [f32]),
}

/// A residual block's input: one tensor, or a decoder's concatenation as its two halves, each
/// `(values, scale)` (the points module says why the halves have a scale each).
type Parts<'x> = [(&'x [i8], f32)];

fn res_need(w: &ResBlockWeights<'_>, dims: Dims3, parts: usize) -> Int8ScratchLen {
    // Saturating throughout: `int8_scratch_len` is public and windows are only checked for shape.
    let ov = w.shape.out_ch.saturating_mul(vox(dims));
    let i = w.shape.in_ch.max(w.shape.out_ch);
    let proj = if w.conv3.is_some() { ov } else { 0 };
    let second = if parts == 2 { ov } else { 0 };
    Int8ScratchLen {
        f32s: 0,
        i32s: sat_sum(&[ov, proj, second]),
        i8s: ov.saturating_add(qconv3d_scratch(i, 3, dims)),
    }
}

/// A convolution of the parts (input channels concatenated) into one int32 sum per part.
fn conv_parts(
    x: &Parts<'_>,
    dims: Dims3,
    w: &QWeight<'_>,
    o: usize,
    k: usize,
    acc: [&mut [i32]; 2],
    col: &mut [i8],
) {
    let v = voxels(dims);
    let taps = k * k * k;
    let row = x.iter().map(|p| p.0.len() / v).sum::<usize>() * taps;
    let mut offset = 0;
    for ((part, _), acc) in x.iter().zip(acc) {
        let ch = part.len() / v;
        qconv3d(part, dims, ch, (w.values, row, offset), o, k, acc, col);
        offset += ch * taps;
    }
}

/// MONAI's `UnetResBlock` in integers: the parts `x` (`(in, dims)` together) to `out`.
fn res_block(
    w: &ResBlockWeights<'_>,
    x: &Parts<'_>,
    dims: Dims3,
    mut out: Out<'_>,
    sc: &Scales<'_>,
    points: ResPoints,
    mut ar: Arenas<'_>,
) -> Result<(), ForwardError> {
    let (i, o, v) = (w.shape.in_ch, w.shape.out_ch, voxels(dims));
    let n = x.len();
    let (w1, w2) = (QWeight::of(&w.conv1)?, QWeight::of(&w.conv2)?);
    let acc = ar.i.take(o * v)?;
    let col = ar.b.take(qconv3d_scratch(i.max(o), 3, dims))?;
    let a = ar.b.take(o * v)?;
    let second = ar.i.take(if n == 2 { o * v } else { 0 })?;
    let scale = |k: usize| x.get(k).map_or(0.0, |p| p.1);
    conv_parts(x, dims, &w1, o, 3, [&mut *acc, &mut *second], col);
    let inv_a = 1.0 / sc.get(points.a);
    for co in 0..o {
        let c = [w1.scale(co) * scale(0), w1.scale(co) * scale(1)];
        let r = co * v..(co + 1) * v;
        let (s0, s1) = (&acc[r.clone()], second.get(r.clone()).unwrap_or_default());
        let (mean, inv) = norm_of([s0, s1], c);
        for (j, q) in a[r].iter_mut().enumerate() {
            *q = quantize(leaky_relu((dequant([s0, s1], c, j) - mean) * inv), inv_a);
        }
    }
    let sa = sc.get(points.a);
    qconv3d(a, dims, o, (w2.values, o * 27, 0), o, 3, acc, col);
    let proj = match &w.conv3 {
        Some(t) => {
            let w3 = QWeight::of(t)?;
            let acc3 = ar.i.take(o * v)?;
            conv_parts(x, dims, &w3, o, 1, [&mut *acc3, &mut *second], col);
            Some((w3, acc3))
        }
        None => None,
    };
    let inv_out = match &out {
        Out::I8(_, s) => 1.0 / *s,
        Out::F32(_) => 1.0,
    };
    let mut put = |i: usize, y: f32| match &mut out {
        Out::I8(q, _) => q[i] = quantize(y, inv_out),
        Out::F32(f) => f[i] = y,
    };
    for co in 0..o {
        let c = w2.scale(co) * sa;
        let r = co * v..(co + 1) * v;
        let (mean, inv) = norm_of([&acc[r.clone()], &[]], [c, 0.0]);
        match &proj {
            Some((w3, acc3)) => {
                let c3 = [w3.scale(co) * scale(0), w3.scale(co) * scale(1)];
                let (p0, p1) = (&acc3[r.clone()], second.get(r.clone()).unwrap_or_default());
                let (mean3, inv3) = norm_of([p0, p1], c3);
                for j in 0..v {
                    let p = dequant([p0, p1], c3, j);
                    let y = (acc[co * v + j] as f32 * c - mean) * inv + (p - mean3) * inv3;
                    put(co * v + j, leaky_relu(y));
                }
            }
            None => {
                // No projection: one part with as many channels as the output.
                let (x0, sx) = x[0];
                for j in r.clone() {
                    let y = (acc[j] as f32 * c - mean) * inv + f32::from(x0[j]) * sx;
                    put(j, leaky_relu(y));
                }
            }
        }
    }
    Ok(())
}

/// A transposed conv (kernel = stride = 2) from `x` (scale `sx`) into `out` (scale `s_out`).
fn transp(
    t: &Tensor<'_>,
    (x, sx): (&[i8], f32),
    dims: Dims3,
    (out, s_out): (&mut [i8], f32),
    mut ar: Arenas<'_>,
) -> Result<(), ForwardError> {
    let w = QWeight::of(t)?;
    let in_ch = t.shape().dims()[0] as usize;
    let out_ch = t.shape().dims()[1] as usize;
    let acc = ar.i.take(out_ch * 8)?;
    qconv_transpose_up2(x, dims, in_ch, w.values, |co| Requant::new(w.scale(co) * sx / s_out), out, acc);
    Ok(())
}

fn transp_need(out_ch: usize) -> Int8ScratchLen {
    Int8ScratchLen::i32s(out_ch.saturating_mul(8))
}

fn skip_need(w: &PrUpWeights<'_>, grid: Dims3) -> Int8ScratchLen {
    let o = w.shape.out_ch;
    if w.blocks.is_empty() {
        return transp_need(o);
    }
    let mut dims = double(grid);
    let mut held = Int8ScratchLen::i8s(o.saturating_mul(vox(dims)));
    let mut peak = held.add(transp_need(o));
    let last = w.blocks.len() - 1;
    for (j, s) in w.blocks.iter().enumerate() {
        held = held.add(Int8ScratchLen::i8s(o.saturating_mul(vox(double(dims)))));
        peak = peak.max(held.add(transp_need(o)));
        dims = double(dims);
        if j != last {
            held = held.add(Int8ScratchLen::i8s(o.saturating_mul(vox(dims))));
        }
        peak = peak.max(held.add(res_need(&s.res_block, dims, 1)));
    }
    peak
}

/// MONAI's `UnetrPrUpBlock` from hidden state `z` (scale `sz`) on `grid` into `out` (`s_out`).
fn skip_path(
    w: &PrUpWeights<'_>,
    (z, sz): (&[i8], f32),
    grid: Dims3,
    (out, s_out): (&mut [i8], f32),
    sc: &Scales<'_>,
    points: SkipPoints,
    mut ar: Arenas<'_>,
) -> Result<(), ForwardError> {
    let o = w.shape.out_ch;
    let mut dims = double(grid);
    if w.blocks.is_empty() {
        return transp(&w.transp_conv_init, (z, sz), grid, (out, s_out), ar);
    }
    let cur = ar.b.take(o * vox(dims))?;
    let mut s_cur = sc.get(points.init);
    transp(&w.transp_conv_init, (z, sz), grid, (cur, s_cur), ar.rest())?;
    let mut cur: &mut [i8] = cur;
    let mut out = Some(out);
    let last = w.blocks.len() - 1;
    for (j, s) in w.blocks.iter().enumerate() {
        let sp = points.stages[j];
        let up = ar.b.take(o * vox(double(dims)))?;
        let s_up = sc.get(sp.up);
        transp(&s.transp_conv, (cur, s_cur), dims, (up, s_up), ar.rest())?;
        dims = double(dims);
        let (res_out, s_res) = if j == last {
            (out.take().unwrap_or_default(), s_out)
        } else {
            (ar.b.take(o * vox(dims))?, sc.get(sp.out))
        };
        res_block(&s.res_block, &[(up, s_up)], dims, Out::I8(&mut *res_out, s_res), sc, sp.res, ar.rest())?;
        cur = res_out;
        s_cur = s_res;
    }
    Ok(())
}

fn up_need(w: &UpWeights<'_>, dims: Dims3, skip: Int8ScratchLen) -> Int8ScratchLen {
    let o = w.shape.out_ch;
    let cat = o.saturating_mul(2).saturating_mul(vox(dims));
    Int8ScratchLen::i8s(cat).add(skip.max(transp_need(o)).max(res_need(&w.conv_block, dims, 2)))
}

/// MONAI's `UnetrUpBlock` in integers: upsample `x` (on `coarse`), concatenate the skip that
/// `skip` writes with the skip half's scale, residual block into `out`.
#[allow(clippy::too_many_arguments)] // one decoder stage's inputs, outputs and scratch
fn up_block(
    w: &UpWeights<'_>,
    (x, sx): (&[i8], f32),
    coarse: Dims3,
    skip: impl FnOnce(&mut [i8], f32, Arenas<'_>) -> Result<(), ForwardError>,
    out: Out<'_>,
    sc: &Scales<'_>,
    points: UpPoints,
    mut ar: Arenas<'_>,
) -> Result<(), ForwardError> {
    let dims = double(coarse);
    let ov = w.shape.out_ch * voxels(dims);
    let cat = ar.b.take(2 * ov)?;
    let (s_up, s_skip) = (sc.get(points.up), sc.get(points.skip));
    let (upsampled, skipped) = cat.split_at_mut(ov);
    skip(skipped, s_skip, ar.rest())?;
    transp(&w.transp_conv, (x, sx), coarse, (upsampled, s_up), ar.rest())?;
    let parts = [(&*upsampled, s_up), (&*skipped, s_skip)];
    res_block(&w.conv_block, &parts, dims, out, sc, points.res, ar.rest())
}

fn encode_need(d: &VitDims) -> Int8ScratchLen {
    let ne = d.tokens.saturating_mul(d.hidden);
    Int8ScratchLen {
        f32s: sat_sum(&[ne.saturating_mul(5), d.tokens, d.mlp, d.hidden]),
        i32s: 0,
        i8s: sat_sum(&[ne, d.mlp, d.patch_values]),
    }
}

/// `out[o] = bias[o] + scale[o] * sx * (W[o] . x)` for one token.
fn qlinear(
    w: &Tensor<'_>,
    bias: Option<&Tensor<'_>>,
    (x, sx): (&[i8], f32),
    out: &mut [f32],
) -> Result<(), ForwardError> {
    let q = QWeight::of(w)?;
    let n = w.shape().dims()[1] as usize;
    for (o, y) in out.iter_mut().enumerate() {
        *y = dot(q.row(o, n), x) as f32 * (q.scale(o) * sx) + bias.map_or(0.0, |b| b.get(o));
    }
    Ok(())
}

/// The ViT encoder on the quantised input `xq` (scale `sx`): the four hidden states UNETR uses,
/// as int8 volumes with their tap scales, into `taps`.
fn encode(
    w: &VitWeights<'_>,
    cfg: &crate::config::VitConfig,
    (xq, sx): (&[i8], f32),
    window: Dims3,
    taps: &mut [i8],
    sc: &Scales<'_>,
    mut ar: Arenas<'_>,
) -> Result<(), ForwardError> {
    let d = VitDims::new(cfg, window);
    let (n, e) = (d.tokens, d.hidden);
    let ne = n * e;
    let pts = sc.points;
    let x = ar.f.take(ne)?;
    let ln = ar.f.take(ne)?;
    let qkv = ar.f.take(3 * ne)?;
    let scores = ar.f.take(n)?;
    let hidden = ar.f.take(d.mlp)?;
    let vec = ar.f.take(e)?;
    let q = ar.b.take(ne)?;
    let qh = ar.b.take(d.mlp)?;
    let patch = ar.b.take(d.patch_values)?;

    let pe = &w.patch_embedding;
    let pw = QWeight::of(&pe.patch_embeddings.weight)?;
    let in_ch = cfg.in_channels as usize;
    let p = cfg.patch_size as usize;
    for t in 0..n {
        gather_patch(xq, window, in_ch, p, t, patch);
        for h in 0..e {
            let acc = dot(pw.row(h, d.patch_values), patch);
            x[t * e + h] = acc as f32 * (pw.scale(h) * sx) + pe.patch_embeddings.bias.get(h);
        }
    }
    match (cfg.pos_embed, pe.position_embeddings) {
        (PosEmbed::Learned, Some(table)) => {
            for (i, v) in x.iter_mut().enumerate() {
                *v += table.get(i);
            }
        }
        _ => add_sincos_position_embedding(x, d.grid, e),
    }
    let eps = cfg.layer_norm_eps;
    for (i, b) in w.blocks.iter().enumerate() {
        let s1 = sc.get(pts.block(i, BlockPoint::Norm1));
        layer_norm(x, n, &b.norm1.weight, &b.norm1.bias, eps, ln);
        quantize_slice(ln, 1.0 / s1, q);
        for t in 0..n {
            qlinear(
                &b.attn.qkv,
                b.attn.qkv_bias.as_ref(),
                (&q[t * e..(t + 1) * e], s1),
                &mut qkv[t * 3 * e..(t + 1) * 3 * e],
            )?;
        }
        self_attention(qkv, n, e, cfg.num_heads as usize, ln, scores);
        let sa = sc.get(pts.block(i, BlockPoint::Attention));
        quantize_slice(ln, 1.0 / sa, q);
        for t in 0..n {
            qlinear(&b.attn.out_proj.weight, Some(&b.attn.out_proj.bias), (&q[t * e..(t + 1) * e], sa), vec)?;
            for (xv, &y) in x[t * e..(t + 1) * e].iter_mut().zip(vec.iter()) {
                *xv += y;
            }
        }
        let s2 = sc.get(pts.block(i, BlockPoint::Norm2));
        let sg = sc.get(pts.block(i, BlockPoint::Gelu));
        layer_norm(x, n, &b.norm2.weight, &b.norm2.bias, eps, ln);
        quantize_slice(ln, 1.0 / s2, q);
        for t in 0..n {
            qlinear(&b.mlp.linear1.weight, Some(&b.mlp.linear1.bias), (&q[t * e..(t + 1) * e], s2), hidden)?;
            gelu_in_place(hidden);
            quantize_slice(hidden, 1.0 / sg, qh);
            qlinear(&b.mlp.linear2.weight, Some(&b.mlp.linear2.bias), (qh, sg), vec)?;
            for (xv, &y) in x[t * e..(t + 1) * e].iter_mut().zip(vec.iter()) {
                *xv += y;
            }
        }
        if let Some(k) = UNETR_TAPS.iter().position(|&t| t == i) {
            let inv = 1.0 / sc.get(pts.tap(k));
            tokens_to_volume(x, n, e, &mut taps[k * ne..(k + 1) * ne], |v| quantize(v, inv));
        }
    }
    layer_norm(x, n, &w.norm.weight, &w.norm.bias, eps, ln);
    let inv = 1.0 / sc.get(pts.tap(3));
    tokens_to_volume(ln, n, e, &mut taps[3 * ne..4 * ne], |v| quantize(v, inv));
    Ok(())
}

impl<'a> Unetr<'a> {
    /// The activation scales, or why the integer pass cannot run this model.
    fn int8_scales(&self) -> Result<Scales<'a>, ForwardError> {
        if !self.int8_weights {
            return Err(ForwardError::NotInt8 { missing: "int8 weights (this file's are f32)" });
        }
        let t = self.activation_scales.ok_or(ForwardError::NotInt8 {
            missing: "calibrated activation scales (export with --int8 --calibrate)",
        })?;
        Ok(Scales { t, points: Points::new(&self.config) })
    }

    /// Whether every Linear and convolution weight is int8 (what calibration needs).
    pub fn has_int8_weights(&self) -> bool {
        self.int8_weights
    }

    /// Whether the file has what the integer pass needs: int8 weights and activation scales.
    pub fn has_int8(&self) -> bool {
        self.int8_scales().is_ok()
    }

    /// Scratch for [`Self::segment_int8`] on `window`.
    pub fn int8_scratch_len(&self, window: Dims3) -> Result<Int8ScratchLen, ForwardError> {
        self.config.check_window(window).map_err(ForwardError::Window)?;
        self.int8_scales()?;
        let w: &UnetrWeights<'_> = &self.weights;
        let vd = VitDims::new(&self.config.vit, window);
        let g = vd.grid;
        let ne = vd.tokens.saturating_mul(vd.hidden);
        let mut held = Int8ScratchLen::i8s(self.input_len(window).saturating_add(ne.saturating_mul(4)));
        let mut peak = held.add(encode_need(&vd));
        let levels = [double(g), double(double(g)), double(double(double(g))), window];
        for (k, up) in w.ups().into_iter().enumerate() {
            let v = vox(levels[k]);
            let skip = match k {
                3 => res_need(&w.encoder1, levels[k], 1),
                _ => skip_need(w.skips()[2 - k], g),
            };
            let n = up.shape.out_ch.saturating_mul(v);
            // decoder2's output stays f32 for the output conv.
            let out = if k == 3 {
                Int8ScratchLen { f32s: n, ..Int8ScratchLen::default() }
            } else {
                Int8ScratchLen::i8s(n)
            };
            peak = peak.max(held.add(out).add(up_need(up, levels[k], skip)));
            held = held.add(out);
        }
        Ok(peak)
    }

    /// Labels for one window with the integer pass: `input` is the same f32 window
    /// [`Self::segment`] takes, quantised here with the calibrated input scale; the labels are
    /// the argmax of the logits, the first class on ties. Allocates nothing.
    pub fn segment_int8(
        &self,
        input: &[f32],
        window: Dims3,
        labels: &mut [u8],
        scratch: Int8Scratch<'_>,
    ) -> Result<(), ForwardError> {
        let need = self.int8_scratch_len(window)?;
        for (buffer, needed, provided) in [
            (IntBuffer::F32, need.f32s, scratch.f32s.len()),
            (IntBuffer::I32, need.i32s, scratch.i32s.len()),
            (IntBuffer::I8, need.i8s, scratch.i8s.len()),
        ] {
            if provided < needed {
                return Err(ForwardError::Int8ScratchTooSmall { buffer, needed, provided });
            }
        }
        let v = vox(window);
        if labels.len() != v {
            return Err(ForwardError::OutputLength { expected: v, found: labels.len() });
        }
        self.check_input(input, window)?;
        self.segment_int8_unchecked(input, window, labels, Arenas::new(scratch))
    }

    fn segment_int8_unchecked(
        &self,
        input: &[f32],
        window: Dims3,
        labels: &mut [u8],
        mut ar: Arenas<'_>,
    ) -> Result<(), ForwardError> {
        let sc = self.int8_scales()?;
        let pts = sc.points;
        let w = &self.weights;
        let vd = VitDims::new(&self.config.vit, window);
        let g = vd.grid;
        let ne = vd.tokens * vd.hidden;
        let s_in = sc.get(Points::INPUT);
        let xq = ar.b.take(input.len())?;
        quantize_slice(input, 1.0 / s_in, xq);
        let xq: &[i8] = xq;
        let taps = ar.b.take(4 * ne)?;
        encode(&w.vit, &self.config.vit, (xq, s_in), window, taps, &sc, ar.rest())?;
        let tap = |k: usize| (&taps[k * ne..(k + 1) * ne], sc.get(pts.tap(k)));

        let d3_dims = double(g);
        let d3 = ar.b.take(w.decoder5.shape.out_ch * voxels(d3_dims))?;
        let s3 = sc.get(pts.up(0).out);
        up_block(
            &w.decoder5,
            tap(3),
            g,
            |o, s, a| skip_path(&w.encoder4, tap(2), g, (o, s), &sc, pts.skip(2), a),
            Out::I8(&mut *d3, s3),
            &sc,
            pts.up(0),
            ar.rest(),
        )?;
        let d2_dims = double(d3_dims);
        let d2 = ar.b.take(w.decoder4.shape.out_ch * voxels(d2_dims))?;
        let s2 = sc.get(pts.up(1).out);
        up_block(
            &w.decoder4,
            (d3, s3),
            d3_dims,
            |o, s, a| skip_path(&w.encoder3, tap(1), g, (o, s), &sc, pts.skip(1), a),
            Out::I8(&mut *d2, s2),
            &sc,
            pts.up(1),
            ar.rest(),
        )?;
        let d1_dims = double(d2_dims);
        let d1 = ar.b.take(w.decoder3.shape.out_ch * voxels(d1_dims))?;
        let s1 = sc.get(pts.up(2).out);
        up_block(
            &w.decoder3,
            (d2, s2),
            d2_dims,
            |o, s, a| skip_path(&w.encoder2, tap(0), g, (o, s), &sc, pts.skip(0), a),
            Out::I8(&mut *d1, s1),
            &sc,
            pts.up(2),
            ar.rest(),
        )?;
        let d0 = ar.f.take(w.decoder2.shape.out_ch * voxels(window))?;
        up_block(
            &w.decoder2,
            (d1, s1),
            d1_dims,
            |o, s, a| res_block(&w.encoder1, &[(xq, s_in)], window, Out::I8(o, s), &sc, pts.encoder1(), a),
            Out::F32(&mut *d0),
            &sc,
            pts.up(3),
            ar.rest(),
        )?;

        // The output conv in f32 on decoder2's f32 output, as the f32 path runs it.
        output_labels(w, self.config.out_channels as usize, d0, labels);
        Ok(())
    }
}

/// Activation scales from calibration ranges: `range / 127`, and 1 for points a model does not
/// use (their range stays 0).
pub fn scales_from_ranges(ranges: &[f32]) -> impl Iterator<Item = f32> + '_ {
    ranges.iter().map(|&r| if r > 0.0 && r.is_finite() { r / crate::kernels::int8::QMAX as f32 } else { 1.0 })
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::format::{ModelBuilder, ModelFile, Precision};
    use crate::model::point_count;
    use crate::synthetic::random_model;
    use crate::testing_config;

    /// A smooth test window: a bright ball on a ramp.
    fn window_input(m: &Unetr<'_>, w: Dims3, phase: usize) -> Vec<f32> {
        (0..m.input_len(w))
            .map(|i| {
                let (z, y, x) = (i / (w[1] * w[2]), (i / w[2]) % w[1], i % w[2]);
                let r2 =
                    [z, y, x].iter().zip(w).map(|(&a, d)| (a as f32 - d as f32 / 2.0).powi(2)).sum::<f32>();
                let ball = if r2 < 100.0 { 0.8 } else { 0.2 };
                ball + 0.1 * ((x + 2 * y + phase) % 9) as f32 / 9.0
            })
            .collect()
    }

    /// The random int8 model of `testing_config`, calibrated on two windows.
    fn calibrated_model() -> Vec<u8> {
        let bytes = random_model(&testing_config(), 5, Precision::Int8).unwrap();
        let file = ModelFile::parse(&bytes).unwrap();
        let m = Unetr::new(&file).unwrap();
        let w = [32, 32, 32];
        let mut ranges = vec![0.0f32; point_count(&file.config)];
        let mut scratch = vec![0.0f32; m.scratch_len(w).unwrap() + m.logits_len(w)];
        for phase in [0, 4] {
            m.calibrate(&window_input(&m, w, phase), w, &mut ranges, &mut scratch).unwrap();
        }
        let scales: Vec<f32> = scales_from_ranges(&ranges).collect();
        let mut b = ModelBuilder::from_file(&file);
        b.set_activation_scales(&scales);
        b.to_bytes().unwrap()
    }

    fn scratch(len: Int8ScratchLen) -> (Vec<f32>, Vec<i32>, Vec<i8>) {
        (vec![f32::NAN; len.f32s], vec![i32::MIN; len.i32s], vec![-128; len.i8s])
    }

    #[test]
    fn int8_labels_agree_with_the_f32_reference() {
        let bytes = calibrated_model();
        let file = ModelFile::parse(&bytes).unwrap();
        let m = Unetr::new(&file).unwrap();
        assert!(m.has_int8());
        let w = [32, 32, 32];
        let input = window_input(&m, w, 2);
        let mut want = vec![0u8; 32 * 32 * 32];
        m.segment(&input, w, &mut want, &mut vec![0.0; m.segment_scratch_len(w).unwrap()]).unwrap();
        let (mut f, mut i, mut b) = scratch(m.int8_scratch_len(w).unwrap());
        let mut got = vec![9u8; want.len()];
        m.segment_int8(&input, w, &mut got, Int8Scratch { f32s: &mut f, i32s: &mut i, i8s: &mut b }).unwrap();
        let same = got.iter().zip(&want).filter(|(a, b)| a == b).count() as f64 / want.len() as f64;
        std::eprintln!("int8 vs f32 labels: {:.3}% identical", 100.0 * same);
        let classes: std::collections::BTreeSet<u8> = want.iter().copied().collect();
        assert!(classes.len() > 1, "the f32 model predicts one class: a weak test");
        // A random model's logits are close together, so quantisation flips more labels than a
        // trained model's (the firmware fixture test measures that one).
        assert!(same > 0.9, "int8 labels agree with f32 on {:.2}% of voxels", 100.0 * same);
    }

    #[test]
    fn int8_scratch_len_is_exactly_what_the_pass_uses() {
        let bytes = calibrated_model();
        let file = ModelFile::parse(&bytes).unwrap();
        let m = Unetr::new(&file).unwrap();
        for w in [[32, 32, 32], [48, 16, 32]] {
            let input = window_input(&m, w, 1);
            let need = m.int8_scratch_len(w).unwrap();
            let mut labels = vec![0u8; w.iter().product()];
            let (mut f, mut i, mut b) = scratch(need);
            let run = |f: &mut [f32], i: &mut [i32], b: &mut [i8], labels: &mut [u8]| {
                m.segment_int8_unchecked(
                    &input,
                    w,
                    labels,
                    Arenas::new(Int8Scratch { f32s: f, i32s: i, i8s: b }),
                )
            };
            run(&mut f, &mut i, &mut b, &mut labels).unwrap();
            let nf = f.len();
            let ni = i.len();
            let nb = b.len();
            for (short, buffer) in [
                (run(&mut f[..nf - 1], &mut i, &mut b, &mut labels), IntBuffer::F32),
                (run(&mut f, &mut i[..ni - 1], &mut b, &mut labels), IntBuffer::I32),
                (run(&mut f, &mut i, &mut b[..nb - 1], &mut labels), IntBuffer::I8),
            ] {
                assert!(
                    matches!(short, Err(ForwardError::Int8ScratchTooSmall { buffer: b, .. }) if b == buffer),
                    "{w:?}: the {buffer} length overestimates ({short:?})"
                );
            }
        }
    }

    #[test]
    fn models_without_int8_weights_or_scales_are_refused() {
        let w = [32, 32, 32];
        for (precision, missing) in [(Precision::F32, "int8 weights"), (Precision::Int8, "activation scales")]
        {
            let bytes = random_model(&testing_config(), 5, precision).unwrap();
            let file = ModelFile::parse(&bytes).unwrap();
            let m = Unetr::new(&file).unwrap();
            assert!(!m.has_int8());
            let e = m.int8_scratch_len(w).unwrap_err();
            assert!(std::format!("{e}").contains(missing), "{precision:?}: {e}");
        }
        // Scales of the wrong length, and a non-positive scale, are rejected when parsing.
        let bytes = random_model(&testing_config(), 5, Precision::Int8).unwrap();
        let file = ModelFile::parse(&bytes).unwrap();
        let n = point_count(&file.config);
        for bad in [vec![0.1f32; n - 1], {
            let mut v = vec![0.1f32; n];
            v[3] = 0.0;
            v
        }] {
            let mut b = ModelBuilder::from_file(&file);
            b.set_activation_scales(&bad);
            let e = b.to_bytes().unwrap_err();
            assert!(std::format!("{e}").contains("int8.activation_scales"), "{e}");
        }
    }

    #[test]
    fn int8_scales_along_another_axis_are_a_format_error() {
        // The output conv `(classes, 4, 1, 1, 1)` quantised along its input channels: the
        // kernels would read 4 scales as if there were one per class.
        let cfg = crate::UnetrConfig { out_channels: 14, ..testing_config() };
        let mut b = ModelBuilder::new(cfg, crate::format::OwnedPreprocessing::for_classes(14));
        crate::params::for_each_param(&cfg, |p| {
            let values = vec![0.1f32; p.shape.numel()];
            let axis =
                if p.name.as_str() == "out.conv.conv.weight" { Some(1) } else { p.kind.channel_axis() };
            b.push(&p.name, p.shape.dims(), &values, axis);
        });
        let Err(e) = b.to_bytes() else { panic!("a file with scales along the input channels was accepted") };
        assert_eq!(std::format!("{e}"), "tensor `out.conv.conv.weight`: int8 scales do not match the shape");
    }

    #[test]
    fn bad_calls_are_errors() {
        let bytes = calibrated_model();
        let file = ModelFile::parse(&bytes).unwrap();
        let m = Unetr::new(&file).unwrap();
        let w = [32, 32, 32];
        let (mut f, mut i, mut b) = scratch(m.int8_scratch_len(w).unwrap());
        let mut input = window_input(&m, w, 0);
        let mut labels = vec![0u8; 32 * 32 * 32];
        let mut run = |input: &[f32], labels: &mut [u8], i_len: usize| {
            m.segment_int8(input, w, labels, Int8Scratch { f32s: &mut f, i32s: &mut i[..i_len], i8s: &mut b })
        };
        let full = m.int8_scratch_len(w).unwrap().i32s;
        assert!(matches!(run(&input[1..], &mut labels, full), Err(ForwardError::InputLength { .. })));
        assert!(matches!(run(&input, &mut labels[1..], full), Err(ForwardError::OutputLength { .. })));
        let e = run(&input, &mut labels, 10).unwrap_err();
        assert!(std::format!("{e}").contains("int32 scratch holds 10"), "{e}");
        input[77] = f32::INFINITY;
        assert_eq!(run(&input, &mut labels, full), Err(ForwardError::NonFiniteInput { index: 77 }));
    }
}
