//! Carving caller-provided scratch into buffers, with errors instead of panics.

use core::fmt;

use crate::config::ConfigError;

/// Why a forward pass could not run.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[allow(missing_docs)] // variant docs describe their fields
pub enum ForwardError {
    /// The window does not suit the model.
    Window(ConfigError),
    /// The input slice has the wrong length.
    InputLength { expected: usize, found: usize },
    /// The output slice has the wrong length.
    OutputLength { expected: usize, found: usize },
    /// The input holds NaN or infinity.
    NonFiniteInput { index: usize },
    /// Less scratch than [`crate::Unetr::scratch_len`] asks for.
    ScratchTooSmall { needed: usize, provided: usize },
    /// One of the integer pass's buffers is smaller than [`crate::Unetr::int8_scratch_len`] asks.
    Int8ScratchTooSmall { buffer: IntBuffer, needed: usize, provided: usize },
    /// The integer pass needs int8 weights and calibrated activation scales, and this model
    /// lacks them (`glmae-train export --int8 --calibrate DATA` writes both).
    NotInt8 { missing: &'static str },
}

/// One of the integer forward pass's three scratch buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IntBuffer {
    /// f32 values (the encoder's token stream).
    F32,
    /// int32 accumulators.
    I32,
    /// int8 activations.
    I8,
}

impl fmt::Display for IntBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::I32 => "int32",
            Self::I8 => "int8",
        })
    }
}

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Window(e) => write!(f, "{e}"),
            Self::InputLength { expected, found } => {
                write!(f, "input has {found} values, the window needs {expected}")
            }
            Self::OutputLength { expected, found } => {
                write!(f, "output has room for {found} values, the window needs {expected}")
            }
            Self::NonFiniteInput { index } => write!(f, "input value {index} is NaN or infinite"),
            Self::ScratchTooSmall { needed, provided } => {
                write!(f, "scratch holds {provided} f32 values, the forward pass needs {needed}")
            }
            Self::Int8ScratchTooSmall { buffer, needed, provided } => {
                write!(f, "{buffer} scratch holds {provided} values, the integer forward pass needs {needed}")
            }
            Self::NotInt8 { missing } => write!(f, "the integer forward pass needs {missing}"),
        }
    }
}

impl core::error::Error for ForwardError {}

/// A bump allocator over a slice; buffers live as long as the slice borrow.
pub(crate) struct Arena<'s, T = f32> {
    rest: &'s mut [T],
    /// Which integer-pass buffer this is, for errors; `None` for the f32 pass's scratch.
    buffer: Option<IntBuffer>,
}

impl<'s> Arena<'s, f32> {
    pub(crate) fn new(scratch: &'s mut [f32]) -> Self {
        Self { rest: scratch, buffer: None }
    }
}

impl<'s, T> Arena<'s, T> {
    /// An arena over one of the integer pass's buffers.
    pub(crate) fn int(scratch: &'s mut [T], buffer: IntBuffer) -> Self {
        Self { rest: scratch, buffer: Some(buffer) }
    }

    /// The next `n` values.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'s mut [T], ForwardError> {
        let rest = core::mem::take(&mut self.rest);
        if n > rest.len() {
            let provided = rest.len();
            self.rest = rest;
            return Err(match self.buffer {
                None => ForwardError::ScratchTooSmall { needed: n, provided },
                Some(buffer) => ForwardError::Int8ScratchTooSmall { buffer, needed: n, provided },
            });
        }
        let (head, tail) = rest.split_at_mut(n);
        self.rest = tail;
        Ok(head)
    }

    /// Everything not yet taken, for a callee's own arena.
    pub(crate) fn rest(&mut self) -> &mut [T] {
        self.rest
    }
}

/// Saturating sum and product for buffer-size arithmetic on hostile windows.
pub(crate) fn sat_sum(xs: &[usize]) -> usize {
    xs.iter().fold(0usize, |a, &b| a.saturating_add(b))
}
