//! Deterministic values and tensor views for unit tests.

extern crate std;
use std::vec::Vec;

use crate::params::Shape;
use crate::synthetic::Lcg;
use crate::tensor::{Tensor, TensorData};

/// `n` values of [`Lcg`] in `scale * [-1, 1)`, the generator seeded by one step from `seed`.
pub fn lcg_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut g = Lcg::new(Lcg::new(seed).next_u64());
    (0..n).map(|_| g.symmetric() * scale).collect()
}

/// Like [`lcg_vec`], as an array shifted by `offset`.
pub fn lcg_values<const N: usize>(seed: u64, scale: f32, offset: f32) -> [f32; N] {
    let v = lcg_vec(N, seed, scale);
    core::array::from_fn(|i| v[i] + offset)
}

/// Little-endian bytes of `values`.
pub fn f32_tensor_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// An f32 tensor view over `bytes`.
pub fn tensor<'a>(bytes: &'a [u8], dims: &[u32]) -> Tensor<'a> {
    Tensor::new(Shape::new(dims).unwrap(), TensorData::F32(bytes))
}
