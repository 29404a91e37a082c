//! Activation buffers recycled between layers and between windows: fresh 100 MB allocations
//! would cost more in page faults than a layer.

use std::sync::{Arc, Mutex};

use glmae_core::kernels::Dims3;

use super::conv::Vol;
use super::qconv::QVol;

/// Recycled buffers: f32 activations and int16 quantised inputs.
#[derive(Debug, Default)]
pub(super) struct BufferPool {
    f32: Vec<Vec<f32>>,
    i16: Vec<Vec<i16>>,
}

impl BufferPool {
    /// A volume from the smallest recycled buffer that fits, else a new one.
    pub(super) fn vol(&mut self, dims: Dims3, c: usize) -> Vol {
        let n = (dims[0] + 2) * (dims[1] + 2) * (dims[2] + 2) * c;
        let pool = &mut self.f32;
        let best = (0..pool.len()).filter(|&i| pool[i].capacity() >= n).min_by_key(|&i| pool[i].capacity());
        match best {
            Some(i) => Vol::reuse(pool.swap_remove(i), dims, c),
            None => Vol::zeros(dims, c),
        }
    }

    /// Takes back a volume's buffer.
    pub(super) fn recycle(&mut self, v: Vol) {
        self.f32.push(v.data);
    }

    /// A recycled int16 buffer (empty if none is left).
    pub(super) fn take_i16(&mut self) -> Vec<i16> {
        self.i16.pop().unwrap_or_default()
    }

    /// Takes back a quantised volume's buffer, if there is one.
    pub(super) fn recycle_q(&mut self, q: Option<QVol>) {
        if let Some(q) = q {
            self.i16.push(q.into_buffer());
        }
    }
}

/// The buffers a model keeps between windows, shared by its clones. A forward pass takes them
/// all and puts them back at its end, so concurrent passes never share a buffer (a second one
/// starts with an empty pool).
#[derive(Clone, Debug, Default)]
pub(super) struct SharedPool(Arc<Mutex<BufferPool>>);

impl SharedPool {
    /// Takes every kept buffer.
    pub(super) fn take(&self) -> BufferPool {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Keeps `pool`'s buffers for the next pass.
    pub(super) fn put(&self, pool: BufferPool) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = pool;
    }
}
