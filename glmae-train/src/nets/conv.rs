//! 3-D "same" convolution for training on the CPU: stride 1, odd cubic kernels (UNETR's 3x3x3 and
//! 1x1x1), forward, input gradient and weight gradient as im2col + GEMM over depth slices.
//!
//! Why it exists: burn 0.22's `flex` backend computes a convolution's weight gradient as another
//! convolution whose "kernel" is the whole output gradient (an im2col of the full volume on one
//! thread), and spends most of a fine-tuning step there. Here every pass builds the columns of one
//! output depth slice at a time (contiguous row copies along W), multiplies them with the `gemm`
//! crate, and runs the slices on rayon's pool; numbers in docs/performance.md ("UNETR fine-tuning
//! step on the CPU").
//!
//! [`conv3d`] takes this path for tensors on the flex device, with or without autodiff; on any
//! other device (CUDA, ndarray) it is burn's own `conv3d`.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::module::conv3d as burn_conv3d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// Shapes of one convolution: input `(b, ci, d, h, w)`, kernel `(co, ci, k, k, k)`, output
/// `(b, co, d, h, w)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Batch.
    pub b: usize,
    /// Input channels.
    pub ci: usize,
    /// Output channels.
    pub co: usize,
    /// Kernel edge (odd).
    pub k: usize,
    /// Spatial shape `[d, h, w]`, the same in and out.
    pub dhw: [usize; 3],
}

impl Geometry {
    fn hw(&self) -> usize {
        self.dhw[1] * self.dhw[2]
    }
    fn voxels(&self) -> usize {
        self.dhw[0] * self.hw()
    }
    /// Rows of one column matrix: `ci * k^3`.
    fn rows(&self) -> usize {
        self.ci * self.k * self.k * self.k
    }
    /// The input-gradient pass: a convolution from `co` channels to `ci`.
    fn transposed(&self) -> Self {
        Self { ci: self.co, co: self.ci, ..*self }
    }
}

/// Column matrix `(ci k^3, h w)` of output depth slice `z` of one batch item `x: (ci, d, h, w)`:
/// row `((c k + kd) k + kh) k + kw`, column `y w + x`, holds `x[c, z+kd-p, y+kh-p, x+kw-p]` or 0.
fn im2col_slice(x: &[f32], g: &Geometry, z: usize, col: &mut [f32]) {
    let [d, h, w] = g.dhw;
    let (k, p, hw) = (g.k, g.k / 2, g.hw());
    let mut row = 0;
    for c in 0..g.ci {
        for kd in 0..k {
            let zz = z as isize + kd as isize - p as isize;
            for kh in 0..k {
                for kw in 0..k {
                    let dst = &mut col[row * hw..(row + 1) * hw];
                    row += 1;
                    if zz < 0 || zz >= d as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let plane = &x[(c * d + zz as usize) * hw..][..hw];
                    // Output column x reads input column x + kw - p: a shifted copy with zeros.
                    let (lo, hi) = (p.saturating_sub(kw), (w + p - kw).min(w));
                    for yy in 0..h {
                        let iy = yy as isize + kh as isize - p as isize;
                        let out = &mut dst[yy * w..(yy + 1) * w];
                        if iy < 0 || iy >= h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * w..][..w];
                        out[..lo].fill(0.0);
                        out[hi..].fill(0.0);
                        out[lo..hi].copy_from_slice(&src[lo + kw - p..hi + kw - p]);
                    }
                }
            }
        }
    }
}

/// `dst (m, n) = lhs (m, k) rhs (k, n)` (or `+=` with `accumulate`), row-major with the given row
/// strides of `dst` and `lhs`; `rhs` as `(row stride, column stride)`.
#[allow(clippy::too_many_arguments)]
#[allow(unsafe_code)] // the GEMM crate takes raw pointers; see the SAFETY note below
fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
    rhs_strides: (usize, usize),
    [m, n, k]: [usize; 3],
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() > (m - 1) * dst_rs + n - 1, "matmul: dst too short");
    assert!(k == 0 || lhs.len() > (m - 1) * lhs_rs + k - 1, "matmul: lhs too short");
    assert!(k == 0 || rhs.len() > (k - 1) * rhs_strides.0 + (n - 1) * rhs_strides.1, "matmul: rhs too short");
    // SAFETY: the asserts above keep every element gemm touches inside the three slices; `dst` is
    // borrowed mutably, so it does not alias `lhs` or `rhs`.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Forward pass: `y = conv(x, weight) + bias`, `x: (b, ci, d, h, w)`, `weight: (co, ci, k, k, k)`,
/// `y: (b, co, d, h, w)`.
pub fn forward(x: &[f32], weight: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f32> {
    let (v, hw, rows, d) = (g.voxels(), g.hw(), g.rows(), g.dhw[0]);
    // One job per (batch item, depth slice), each filling its own contiguous `(co, hw)` block of
    // a `(b, d, co, hw)` buffer; one pass then moves the blocks to `(b, co, d, hw)`.
    let mut slices = vec![0.0f32; g.b * g.co * v];
    slices.par_chunks_mut((g.co * hw).max(1)).enumerate().for_each_init(
        || vec![0.0f32; rows * hw],
        |col, (job, out)| {
            let (b, z) = (job / d, job % d);
            im2col_slice(&x[b * g.ci * v..(b + 1) * g.ci * v], g, z, col);
            matmul(out, hw, weight, rows, col, (hw, 1), [g.co, hw, rows], false);
            if let Some(bias) = bias {
                for (row, &bc) in out.chunks_mut(hw).zip(bias) {
                    row.iter_mut().for_each(|o| *o += bc);
                }
            }
        },
    );
    let mut y = vec![0.0f32; g.b * g.co * v];
    for b in 0..g.b {
        for z in 0..d {
            for c in 0..g.co {
                let src = &slices[((b * d + z) * g.co + c) * hw..][..hw];
                y[(b * g.co + c) * v + z * hw..][..hw].copy_from_slice(src);
            }
        }
    }
    y
}

/// Gradient with respect to the input: the convolution of `grad_y: (b, co, d, h, w)` with the
/// kernel's channels swapped and taps mirrored.
pub fn input_grad(grad_y: &[f32], weight: &[f32], g: &Geometry) -> Vec<f32> {
    let k3 = g.k * g.k * g.k;
    let mut flipped = vec![0.0f32; weight.len()];
    for o in 0..g.co {
        for i in 0..g.ci {
            for t in 0..k3 {
                flipped[(i * g.co + o) * k3 + (k3 - 1 - t)] = weight[(o * g.ci + i) * k3 + t];
            }
        }
    }
    forward(grad_y, &flipped, None, &g.transposed())
}

/// Gradient with respect to the kernel: `sum over (b, z) of grad_y[b, :, z] col(b, z)^T`,
/// `(co, ci k^3)`.
pub fn weight_grad(x: &[f32], grad_y: &[f32], g: &Geometry) -> Vec<f32> {
    let (v, hw, rows) = (g.voxels(), g.hw(), g.rows());
    let jobs: Vec<(usize, usize)> = (0..g.b).flat_map(|b| (0..g.dhw[0]).map(move |z| (b, z))).collect();
    jobs.par_iter()
        .fold(
            || (vec![0.0f32; rows * hw], vec![0.0f32; g.co * rows]),
            |(mut col, mut acc), &(b, z)| {
                im2col_slice(&x[b * g.ci * v..(b + 1) * g.ci * v], g, z, &mut col);
                let gy = &grad_y[b * g.co * v + z * hw..];
                // acc (co, rows) += gy (co, hw) col^T (hw, rows)
                matmul(&mut acc, rows, gy, v, &col, (1, hw), [g.co, rows, hw], true);
                (col, acc)
            },
        )
        .map(|(_, acc)| acc)
        .reduce(
            || vec![0.0f32; g.co * rows],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// Gradient with respect to the bias: the sum of `grad_y` over batch and voxels, per channel.
pub fn bias_grad(grad_y: &[f32], g: &Geometry) -> Vec<f32> {
    let v = g.voxels();
    (0..g.co).map(|c| (0..g.b).map(|b| grad_y[(b * g.co + c) * v..][..v].iter().sum::<f32>()).sum()).collect()
}

fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) if t.is_contiguous() => std::borrow::Cow::Borrowed(s),
        _ => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("f32 storage").to_vec()),
    }
}

fn flex(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn geometry(x: &FlexTensor, w: &FlexTensor) -> Geometry {
    use burn::backend::TensorMetadata;
    let (xs, ws) = (x.shape(), w.shape());
    Geometry { b: xs[0], ci: xs[1], co: ws[0], k: ws[2], dhw: [xs[2], xs[3], xs[4]] }
}

fn forward_flex(x: &FlexTensor, w: &FlexTensor, bias: Option<&FlexTensor>) -> FlexTensor {
    let g = geometry(x, w);
    let bias = bias.map(values);
    let y = forward(&values(x), &values(w), bias.as_deref(), &g);
    flex(y, vec![g.b, g.co, g.dhw[0], g.dhw[1], g.dhw[2]])
}

/// The backward step; its state is the saved input and kernel.
#[derive(Debug)]
struct ConvBackward;

type State = (FlexTensor, FlexTensor);

/// Registers the gradients of the parents that need one (input, kernel, bias).
fn backward_parts(parents: [Option<NodeId>; 3], gy: FlexTensor, (x, w): State, grads: &mut Gradients) {
    let g = geometry(&x, &w);
    let gy_values = values(&gy);
    if let Some(id) = parents[0] {
        let dx = input_grad(&gy_values, &values(&w), &g);
        grads.register::<Flex>(id, flex(dx, vec![g.b, g.ci, g.dhw[0], g.dhw[1], g.dhw[2]]));
    }
    if let Some(id) = parents[1] {
        let dw = weight_grad(&values(&x), &gy_values, &g);
        grads.register::<Flex>(id, flex(dw, vec![g.co, g.ci, g.k, g.k, g.k]));
    }
    if let Some(id) = parents[2] {
        grads.register::<Flex>(id, flex(bias_grad(&gy_values, &g), vec![g.co]));
    }
}

impl Backward<Flex, 2> for ConvBackward {
    type State = State;
    fn backward(self, ops: Ops<State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gy = grads.consume::<Flex>(&ops.node);
        let [x, w] = ops.parents.map(|p| p.map(|n| n.id));
        backward_parts([x, w, None], gy, ops.state, grads);
    }
}

impl Backward<Flex, 3> for ConvBackward {
    type State = State;
    fn backward(self, ops: Ops<State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gy = grads.consume::<Flex>(&ops.node);
        backward_parts(ops.parents.map(|p| p.map(|n| n.id)), gy, ops.state, grads);
    }
}

type AdTensor = <Autodiff<Flex> as burn::backend::BackendTypes>::FloatTensorPrimitive;

fn forward_autodiff(x: AdTensor, w: AdTensor, bias: Option<AdTensor>) -> AdTensor {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    let y = forward_flex(x.primitive(), w.primitive(), bias.as_ref().map(|b| b.primitive()));
    let state = (x.primitive().clone(), w.primitive().clone());
    match bias {
        Some(bias) => match Backward::<Flex, 3>::prepare::<NoCheckpointing>(
            ConvBackward,
            [x.node(), w.node(), bias.node()],
        )
        .compute_bound()
        .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
        None => match Backward::<Flex, 2>::prepare::<NoCheckpointing>(ConvBackward, [x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    }
}

/// `conv3d(x, weight) + bias` with stride 1 and padding `k / 2` ("same"), as burn's
/// `module::conv3d` with those options.
///
/// # Shapes
/// - x: `[b, ci, d, h, w]`
/// - weight: `[co, ci, k, k, k]`, `k` odd
/// - bias: `[co]`
/// - output: `[b, co, d, h, w]`
pub fn conv3d(x: Tensor<5>, weight: Tensor<5>, bias: Option<Tensor<1>>) -> Tensor<5> {
    let k = weight.dims()[2];
    let options = ConvOptions::new([1; 3], [k / 2; 3], [1; 3], 1);
    let f32_cubic =
        weight.dims()[3] == k && weight.dims()[4] == k && k % 2 == 1 && x.dtype() == burn::tensor::DType::F32;
    if !f32_cubic {
        return burn_conv3d(x, weight, bias, options);
    }
    // Autodiff on flex: our kernels with our backward.
    if let (Ok(xa), Ok(wa)) = (
        x.clone().try_into_primitive::<Autodiff<Flex>>(),
        weight.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        let ba = match bias.clone().map(|b| b.try_into_primitive::<Autodiff<Flex>>()) {
            None => None,
            Some(Ok(b)) => Some(b),
            Some(Err(_)) => return burn_conv3d(x, weight, bias, options),
        };
        return Tensor::from_primitive::<Autodiff<Flex>>(forward_autodiff(xa, wa, ba));
    }
    // Plain flex (validation, inference in the trainer).
    if let (Ok(xf), Ok(wf)) =
        (x.clone().try_into_primitive::<Flex>(), weight.clone().try_into_primitive::<Flex>())
    {
        let bf = match bias.clone().map(|b| b.try_into_primitive::<Flex>()) {
            None => None,
            Some(Ok(b)) => Some(b),
            Some(Err(_)) => return burn_conv3d(x, weight, bias, options),
        };
        return Tensor::from_primitive::<Flex>(forward_flex(&xf, &wf, bf.as_ref()));
    }
    burn_conv3d(x, weight, bias, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct definition in f64: `y[b,o,z,y,x] = bias[o] + sum x[b,i,z+a-p,y+c-p,x+e-p] w[o,i,a,c,e]`.
    fn reference(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f64> {
        let [d, h, wd] = g.dhw;
        let (k, p) = (g.k as isize, (g.k / 2) as isize);
        let mut y = vec![0.0f64; g.b * g.co * d * h * wd];
        for b in 0..g.b {
            for o in 0..g.co {
                for z in 0..d as isize {
                    for yy in 0..h as isize {
                        for xx in 0..wd as isize {
                            let mut s = bias.map_or(0.0, |bb| bb[o] as f64);
                            for i in 0..g.ci {
                                for a in 0..k {
                                    for c in 0..k {
                                        for e in 0..k {
                                            let (iz, iy, ix) = (z + a - p, yy + c - p, xx + e - p);
                                            if iz < 0
                                                || iy < 0
                                                || ix < 0
                                                || iz >= d as isize
                                                || iy >= h as isize
                                                || ix >= wd as isize
                                            {
                                                continue;
                                            }
                                            let xv = x[(((b * g.ci + i) * d + iz as usize) * h
                                                + iy as usize)
                                                * wd
                                                + ix as usize];
                                            let wv = w[(((o * g.ci + i) * g.k + a as usize) * g.k
                                                + c as usize)
                                                * g.k
                                                + e as usize];
                                            s += xv as f64 * wv as f64;
                                        }
                                    }
                                }
                            }
                            y[(((b * g.co + o) * d + z as usize) * h + yy as usize) * wd + xx as usize] = s;
                        }
                    }
                }
            }
        }
        y
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = glmae_core::synthetic::SplitMix64::new(seed);
        (0..n).map(|_| s.symmetric()).collect()
    }

    fn max_diff(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
    }

    const SHAPES: [Geometry; 3] = [
        Geometry { b: 2, ci: 3, co: 5, k: 3, dhw: [4, 5, 7] },
        Geometry { b: 1, ci: 4, co: 2, k: 1, dhw: [3, 2, 6] },
        Geometry { b: 1, ci: 1, co: 3, k: 3, dhw: [1, 1, 2] },
    ];

    /// The forward pass equals the f64 definition, bias included, on odd shapes and both kernels.
    #[test]
    fn forward_matches_the_definition() {
        for g in SHAPES {
            let x = values(g.b * g.ci * g.voxels(), 1);
            let w = values(g.co * g.rows(), 2);
            let bias = values(g.co, 3);
            let y = forward(&x, &w, Some(&bias), &g);
            assert!(max_diff(&y, &reference(&x, &w, Some(&bias), &g)) < 1e-5, "{g:?}");
        }
    }

    /// Each gradient equals the derivative of `sum(y * r)` from the definition: the input gradient
    /// by the adjoint identity `<conv(x), r> = <x, input_grad(r)>` for unit x, the weight and bias
    /// gradients by the same with unit kernels.
    #[test]
    fn gradients_match_the_definition() {
        for g in SHAPES {
            let x = values(g.b * g.ci * g.voxels(), 4);
            let w = values(g.co * g.rows(), 5);
            let r = values(g.b * g.co * g.voxels(), 6);
            let dot = |y: &[f64]| y.iter().zip(&r).map(|(a, &b)| a * b as f64).sum::<f64>();
            let dx = input_grad(&r, &w, &g);
            for j in 0..x.len() {
                let mut e = vec![0.0f32; x.len()];
                e[j] = 1.0;
                let want = dot(&reference(&e, &w, None, &g));
                assert!((dx[j] as f64 - want).abs() < 1e-4, "dx[{j}] {g:?}");
            }
            let dw = weight_grad(&x, &r, &g);
            for j in 0..w.len() {
                let mut e = vec![0.0f32; w.len()];
                e[j] = 1.0;
                let want = dot(&reference(&x, &e, None, &g));
                assert!((dw[j] as f64 - want).abs() < 1e-4, "dw[{j}] {g:?}");
            }
            let db = bias_grad(&r, &g);
            for c in 0..g.co {
                let mut e = vec![0.0f32; g.co];
                e[c] = 1.0;
                let zero = vec![0.0f32; w.len()];
                let want = dot(&reference(&x, &zero, Some(&e), &g));
                assert!((db[c] as f64 - want).abs() < 1e-4, "db[{c}] {g:?}");
            }
        }
    }

    /// Through burn: forward and every gradient on the autodiff flex device equal burn's own
    /// `conv3d` (the path the function replaces).
    #[test]
    fn autodiff_matches_burns_conv3d() {
        use burn::tensor::Distribution;
        let device = burn::tensor::Device::flex().autodiff();
        let probe = Tensor::<5>::zeros([1, 1, 1, 1, 1], &device);
        assert!(probe.try_into_primitive::<Autodiff<Flex>>().is_ok(), "our path must be the one tested");
        for g in SHAPES {
            let x = Tensor::<5>::random(
                [g.b, g.ci, g.dhw[0], g.dhw[1], g.dhw[2]],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let w = Tensor::<5>::random([g.co, g.ci, g.k, g.k, g.k], Distribution::Normal(0.0, 1.0), &device);
            let bias = Tensor::<1>::random([g.co], Distribution::Normal(0.0, 1.0), &device);
            let r = Tensor::<5>::random(
                [g.b, g.co, g.dhw[0], g.dhw[1], g.dhw[2]],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let run = |ours: bool| {
                let (x, w, bias) =
                    (x.clone().require_grad(), w.clone().require_grad(), bias.clone().require_grad());
                let y = if ours {
                    conv3d(x.clone(), w.clone(), Some(bias.clone()))
                } else {
                    burn_conv3d(
                        x.clone(),
                        w.clone(),
                        Some(bias.clone()),
                        ConvOptions::new([1; 3], [g.k / 2; 3], [1; 3], 1),
                    )
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                let flat = |t: Tensor<5>| t.into_data().try_to_vec::<f32>().unwrap();
                (
                    flat(y.inner()),
                    flat(x.grad(&grads).unwrap()),
                    flat(w.grad(&grads).unwrap()),
                    bias.grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap(),
                )
            };
            let (a, b) = (run(true), run(false));
            let close =
                |p: &[f32], q: &[f32]| p.iter().zip(q).all(|(u, v)| (u - v).abs() < 1e-4 * (1.0 + v.abs()));
            assert!(close(&a.0, &b.0), "forward {g:?}");
            assert!(close(&a.1, &b.1), "input grad {g:?}");
            assert!(close(&a.2, &b.2), "weight grad {g:?}");
            assert!(close(&a.3, &b.3), "bias grad {g:?}");
        }
    }
}
