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
        }
    }
}

impl core::error::Error for ForwardError {}

/// A bump allocator over a slice; buffers live as long as the slice borrow.
pub(crate) struct Arena<'s> {
    rest: &'s mut [f32],
}

impl<'s> Arena<'s> {
    pub(crate) fn new(scratch: &'s mut [f32]) -> Self {
        Self { rest: scratch }
    }

    /// The next `n` values.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'s mut [f32], ForwardError> {
        let rest = core::mem::take(&mut self.rest);
        if n > rest.len() {
            let provided = rest.len();
            self.rest = rest;
            return Err(ForwardError::ScratchTooSmall { needed: n, provided });
        }
        let (head, tail) = rest.split_at_mut(n);
        self.rest = tail;
        Ok(head)
    }

    /// Everything not yet taken, for a callee's own arena.
    pub(crate) fn rest(&mut self) -> &mut [f32] {
        self.rest
    }
}

/// Saturating sum and product for buffer-size arithmetic on hostile windows.
pub(crate) fn sat_sum(xs: &[usize]) -> usize {
    xs.iter().fold(0usize, |a, &b| a.saturating_add(b))
}
