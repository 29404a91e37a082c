//! Zero-copy views of the tensors inside a weight file.
//!
//! Values stay as little-endian bytes where they lie (flash, a memory map, a `Vec`): nothing is
//! copied or aligned, so reading costs no allocation on any target.

use serde::{Deserialize, Serialize};

use crate::params::Shape;

/// How a tensor's values are stored, in a file's tensor table (postcard) and in a [`Tensor`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum TensorData<'a> {
    /// Little-endian f32 values.
    F32(&'a [u8]),
    /// Symmetric int8 values with one f32 scale per channel along `axis`:
    /// `value = scale[channel] * q`.
    Int8 {
        /// The axis the scales run along (the output channels); one byte in the file. A `usize`
        /// in memory: with a `u8` here the firmware's stack high-water mark doubled (107 KB to
        /// 206 KB on the Cortex-M4F), the bound tensor tree no longer built in place.
        #[serde(with = "axis_byte")]
        axis: usize,
        /// Little-endian f32 scales, one per channel.
        scales: &'a [u8],
        /// Quantised values, as bytes of `i8`.
        values: &'a [u8],
    },
}

/// The int8 scale axis as one byte in the file.
mod axis_byte {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(axis: &usize, s: S) -> Result<S::Ok, S::Error> {
        u8::try_from(*axis).map_err(serde::ser::Error::custom)?.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        u8::deserialize(d).map(usize::from)
    }
}

/// A read-only tensor of known shape.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    shape: Shape,
    data: TensorData<'a>,
    /// Product of the dimensions after `axis`, for finding an element's channel.
    inner: usize,
}

#[inline]
pub(crate) fn f32_at(bytes: &[u8], i: usize) -> f32 {
    let b = &bytes[4 * i..4 * i + 4];
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl<'a> Tensor<'a> {
    /// A tensor over `data`; the caller (the file parser) has checked that the lengths agree.
    pub(crate) fn new(shape: Shape, data: TensorData<'a>) -> Self {
        let inner = match data {
            TensorData::F32(_) => 1,
            TensorData::Int8 { axis, .. } => shape.dims()[axis + 1..].iter().map(|&d| d as usize).product(),
        };
        Self { shape, data, inner }
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The stored values.
    pub fn data(&self) -> TensorData<'a> {
        self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.numel()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the values are int8.
    pub fn is_int8(&self) -> bool {
        matches!(self.data, TensorData::Int8 { .. })
    }

    /// Element `i` in row-major order, dequantised.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self.data {
            TensorData::F32(b) => f32_at(b, i),
            TensorData::Int8 { axis, scales, values } => {
                let channel = (i / self.inner) % self.shape.dims()[axis] as usize;
                f32_at(scales, channel) * (values[i] as i8) as f32
            }
        }
    }

    /// Copies all elements, dequantised, into `out` (which must hold [`Self::len`] values).
    pub fn copy_to(&self, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate().take(self.len()) {
            *o = self.get(i);
        }
    }

    /// Row `r` of a tensor viewed as `(dims[0], rest)`: a Linear weight's output row, or a Conv3d
    /// weight's output filter.
    #[inline]
    pub fn row(&self, r: usize) -> Row<'a> {
        let n = self.len() / self.shape.dims()[0] as usize;
        match self.data {
            TensorData::F32(b) => Row::F32(&b[4 * r * n..4 * (r + 1) * n]),
            TensorData::Int8 { axis, scales, values } => {
                debug_assert_eq!(axis, 0, "rows of int8 tensors need scales along axis 0");
                Row::Int8 { scale: f32_at(scales, r), values: &values[r * n..(r + 1) * n] }
            }
        }
    }
}

/// One row of a weight matrix.
#[derive(Clone, Copy, Debug)]
pub enum Row<'a> {
    /// Little-endian f32 values.
    F32(&'a [u8]),
    /// int8 values and the row's scale.
    Int8 {
        /// Dequantisation scale.
        scale: f32,
        /// Values as bytes of `i8`.
        values: &'a [u8],
    },
}

impl Row<'_> {
    /// Dot product with `x`, which must be as long as the row. int8 rows apply their scale once,
    /// after the sum.
    #[inline]
    pub fn dot(&self, x: &[f32]) -> f32 {
        match *self {
            Row::F32(b) => {
                let mut acc = 0.0f32;
                for (w, &xi) in b.chunks_exact(4).zip(x) {
                    acc += f32::from_le_bytes([w[0], w[1], w[2], w[3]]) * xi;
                }
                acc
            }
            Row::Int8 { scale, values } => {
                let mut acc = 0.0f32;
                for (&q, &xi) in values.iter().zip(x) {
                    acc += (q as i8) as f32 * xi;
                }
                acc * scale
            }
        }
    }

    /// Element `j`, dequantised.
    #[inline]
    pub fn get(&self, j: usize) -> f32 {
        match *self {
            Row::F32(b) => f32_at(b, j),
            Row::Int8 { scale, values } => scale * (values[j] as i8) as f32,
        }
    }
}
