//! The `.glmae` weight file: a fixed 20-byte preamble, then a postcard payload.
//!
//! ```text
//! offset  size  field
//! 0       8     magic  89 47 4C 4D 41 45 0D 0A  ("\x89GLMAE\r\n")
//! 8       4     format version, u32 little-endian
//! 12      4     payload length in bytes, u32 little-endian
//! 16      4     CRC-32 (IEEE) of the payload, u32 little-endian
//! 20      n     payload: postcard(Metadata) then postcard(Seq<TensorRecord>)
//! ```
//! `docs/format.md` is the byte-level specification. Parsing checks everything (checksum, config,
//! preprocessing, every tensor's presence, shape and finiteness) so that a file that parses can be
//! run; reading borrows from the input bytes and never allocates.

mod crc32;
mod seq;
#[cfg(feature = "alloc")]
mod writer;

use core::fmt;

use serde::{Deserialize, Serialize};

pub use crc32::crc32;
#[cfg(feature = "alloc")]
pub use seq::encode as encode_seq;
pub use seq::{Seq, SeqIter};
#[cfg(feature = "alloc")]
pub use writer::{ModelBuilder, OwnedPreprocessing, Precision, quantize_per_channel};

use crate::config::{ConfigError, UnetrConfig};
use crate::params::{ParamName, Shape, truncated_name};
use crate::preprocessing::{Preprocessing, PreprocessingError};
use crate::tensor::{Tensor, TensorData, f32_at};

/// The first eight bytes of every weight file.
pub const MAGIC: [u8; 8] = *b"\x89GLMAE\r\n";
/// The format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed preamble before the payload.
pub const PREAMBLE_LEN: usize = 20;

/// Model description at the start of the payload.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Metadata<'a> {
    /// The architecture.
    pub config: UnetrConfig,
    /// How inputs are prepared and what outputs mean.
    #[serde(borrow)]
    pub preprocessing: Preprocessing<'a>,
}

/// One entry of the tensor table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorRecord<'a> {
    /// MONAI state-dict name.
    pub name: &'a str,
    /// Dimensions, at most [`crate::params::MAX_RANK`].
    pub shape: heapless::Vec<u32, { crate::params::MAX_RANK }>,
    /// The values.
    #[serde(borrow)]
    pub data: TensorData<'a>,
}

/// What is wrong with one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[allow(missing_docs)] // variant docs describe their fields
pub enum TensorProblem {
    /// The model needs it and the file lacks it.
    Missing,
    /// The file holds it and the model has no such parameter.
    Unexpected,
    /// The file holds it more than once.
    Duplicate,
    /// Its shape disagrees with the config.
    Shape { expected: Shape, found: Shape },
    /// Rank 0 or above five.
    Rank,
    /// The value bytes do not match the shape.
    DataLength { expected: usize, found: usize },
    /// The int8 scale count or axis does not match the shape.
    Scales,
    /// A value or scale is NaN or infinite.
    NonFinite { index: usize },
    /// A value that must be positive (an activation scale) is not.
    NotPositive { index: usize },
}

/// Why a byte string is not a usable weight file.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)] // variant docs describe their fields
pub enum FormatError {
    /// Shorter than the 20-byte preamble.
    TooShort { len: usize },
    /// Does not start with [`MAGIC`]; not a `.glmae` file.
    BadMagic,
    /// Written by another format version.
    UnsupportedVersion { found: u32 },
    /// The payload is shorter than the preamble says: the file was cut off.
    Truncated { expected: usize, found: usize },
    /// Bytes follow the payload.
    TrailingBytes { extra: usize },
    /// The payload's CRC-32 differs from the stored one: the file was corrupted.
    Checksum { stored: u32, computed: u32 },
    /// A section does not decode.
    Malformed { section: &'static str },
    /// The stored config is invalid.
    Config(ConfigError),
    /// The stored preprocessing metadata is invalid.
    Preprocessing(PreprocessingError),
    /// A tensor is missing, unexpected, duplicated or inconsistent.
    Tensor { name: ParamName, problem: TensorProblem },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { len } => {
                write!(f, "file is {len} bytes, shorter than the {PREAMBLE_LEN}-byte header")
            }
            Self::BadMagic => write!(f, "not a glmae weight file (wrong magic bytes)"),
            Self::UnsupportedVersion { found } => write!(
                f,
                "format version {found} is not supported (this build reads version {FORMAT_VERSION})"
            ),
            Self::Truncated { expected, found } => {
                write!(f, "file is truncated: {found} of {expected} bytes present")
            }
            Self::TrailingBytes { extra } => write!(f, "{extra} unexpected bytes after the payload"),
            Self::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupted"
            ),
            Self::Malformed { section } => write!(f, "malformed {section}"),
            Self::Config(e) => write!(f, "invalid model config: {e}"),
            Self::Preprocessing(e) => write!(f, "invalid preprocessing metadata: {e}"),
            Self::Tensor { name, problem } => {
                write!(f, "tensor `{name}`: ")?;
                match problem {
                    TensorProblem::Missing => write!(f, "missing"),
                    TensorProblem::Unexpected => write!(f, "not a parameter of this model"),
                    TensorProblem::Duplicate => write!(f, "stored more than once"),
                    TensorProblem::Shape { expected, found } => {
                        write!(f, "shape {found} disagrees with the config, which needs {expected}")
                    }
                    TensorProblem::Rank => write!(f, "rank must be 1 to 5"),
                    TensorProblem::DataLength { expected, found } => {
                        write!(f, "{found} bytes of values where the shape needs {expected}")
                    }
                    TensorProblem::Scales => write!(f, "int8 scales do not match the shape"),
                    TensorProblem::NonFinite { index } => write!(f, "non-finite value at index {index}"),
                    TensorProblem::NotPositive { index } => {
                        write!(f, "value at index {index} is not positive")
                    }
                }
            }
        }
    }
}

impl core::error::Error for FormatError {}

#[cfg(feature = "defmt")]
impl defmt::Format for FormatError {
    fn format(&self, f: defmt::Formatter) {
        match self {
            Self::Tensor { name, problem } => defmt::write!(f, "tensor {=str}: {}", name.as_str(), problem),
            Self::Config(e) => defmt::write!(f, "config: {}", e),
            Self::Preprocessing(e) => defmt::write!(f, "preprocessing: {}", e),
            Self::Malformed { section } => defmt::write!(f, "malformed {=str}", section),
            _ => defmt::write!(f, "weight file rejected (header, length or checksum)"),
        }
    }
}

fn tensor_error(name: &str, problem: TensorProblem) -> FormatError {
    FormatError::Tensor { name: truncated_name(name), problem }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// A parsed, fully checked weight file, borrowing its bytes.
#[derive(Clone, Copy, Debug)]
pub struct ModelFile<'a> {
    /// The architecture.
    pub config: UnetrConfig,
    /// How inputs are prepared and what outputs mean.
    pub preprocessing: Preprocessing<'a>,
    tensors: Seq<'a, TensorRecord<'a>>,
    len: usize,
}

impl<'a> ModelFile<'a> {
    /// Parses and checks `bytes`. Never panics and never allocates.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        if bytes.len() < PREAMBLE_LEN {
            return Err(if bytes.len() >= 8 && bytes[..8] != MAGIC {
                FormatError::BadMagic
            } else {
                FormatError::TooShort { len: bytes.len() }
            });
        }
        if bytes[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = read_u32(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        let payload_len = read_u32(bytes, 12) as usize;
        let expected = PREAMBLE_LEN.saturating_add(payload_len);
        if bytes.len() < expected {
            return Err(FormatError::Truncated { expected, found: bytes.len() });
        }
        if bytes.len() > expected {
            return Err(FormatError::TrailingBytes { extra: bytes.len() - expected });
        }
        let payload = &bytes[PREAMBLE_LEN..];
        let stored = read_u32(bytes, 16);
        let computed = crc32(payload);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }

        let (meta, rest) = postcard::take_from_bytes::<Metadata<'a>>(payload)
            .map_err(|_| FormatError::Malformed { section: "model metadata" })?;
        let (tensors, rest) = postcard::take_from_bytes::<Seq<'a, TensorRecord<'a>>>(rest)
            .map_err(|_| FormatError::Malformed { section: "tensor table" })?;
        if !rest.is_empty() {
            return Err(FormatError::Malformed { section: "payload end" });
        }
        meta.config.validate().map_err(FormatError::Config)?;
        meta.preprocessing.validate(meta.config.out_channels).map_err(FormatError::Preprocessing)?;

        let file = Self { config: meta.config, preprocessing: meta.preprocessing, tensors, len: bytes.len() };
        for record in file.tensors.iter() {
            file.check_record(&record)?;
        }
        // Binding checks presence, duplicates, unexpected names and shapes against the config.
        crate::model::UnetrWeights::bind(&file)?;
        Ok(file)
    }

    fn check_record(&self, r: &TensorRecord<'a>) -> Result<(), FormatError> {
        let err = |p| Err(tensor_error(r.name, p));
        let Some(shape) = Shape::new(&r.shape) else { return err(TensorProblem::Rank) };
        let n = shape.numel();
        match r.data {
            TensorData::F32(values) => {
                let expected = n.saturating_mul(4);
                if values.len() != expected {
                    return err(TensorProblem::DataLength { expected, found: values.len() });
                }
                if let Some(index) = (0..n).find(|&i| !f32_at(values, i).is_finite()) {
                    return err(TensorProblem::NonFinite { index });
                }
            }
            TensorData::Int8 { axis, scales, values } => {
                if values.len() != n {
                    return err(TensorProblem::DataLength { expected: n, found: values.len() });
                }
                let channels = shape.dims().get(axis).copied().unwrap_or(0) as usize;
                if channels == 0 || scales.len() != channels * 4 {
                    return err(TensorProblem::Scales);
                }
                if let Some(index) = (0..channels).find(|&i| !f32_at(scales, i).is_finite()) {
                    return err(TensorProblem::NonFinite { index });
                }
            }
        }
        Ok(())
    }

    /// Size of the file in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file is empty (never, for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of stored tensors.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Every stored tensor with its name, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = (&'a str, Tensor<'a>)> + 'a {
        self.tensors.iter().filter_map(|r| Some((r.name, record_tensor(&r)?)))
    }

    /// The tensor called `name`, checked against `expected`.
    pub fn tensor(&self, name: &str, expected: Shape) -> Result<Tensor<'a>, FormatError> {
        let mut found = None;
        for (n, t) in self.tensors() {
            if n == name {
                if found.is_some() {
                    return Err(tensor_error(name, TensorProblem::Duplicate));
                }
                found = Some(t);
            }
        }
        let t = found.ok_or_else(|| tensor_error(name, TensorProblem::Missing))?;
        if t.shape() != expected {
            return Err(tensor_error(name, TensorProblem::Shape { expected, found: t.shape() }));
        }
        Ok(t)
    }

    /// Bytes of weights stored as int8 and as f32, for reporting.
    pub fn storage(&self) -> (usize, usize) {
        let (mut int8, mut f32) = (0, 0);
        for (_, t) in self.tensors() {
            if t.is_int8() { int8 += t.len() } else { f32 += 4 * t.len() }
        }
        (int8, f32)
    }
}

fn record_tensor<'a>(r: &TensorRecord<'a>) -> Option<Tensor<'a>> {
    let shape = Shape::new(&r.shape)?;
    Some(Tensor::new(shape, r.data))
}

/// Checks that every stored tensor name is a parameter of the model, given the number of
/// parameters the model binds; called after all expected parameters were found exactly once.
pub(crate) fn check_no_extra(
    file: &ModelFile<'_>,
    expected_count: usize,
    is_param: impl Fn(&str) -> bool,
) -> Result<(), FormatError> {
    if file.tensor_count() == expected_count {
        return Ok(());
    }
    match file.tensors().find(|(n, _)| !is_param(n)) {
        Some((n, _)) => Err(tensor_error(n, TensorProblem::Unexpected)),
        None => Err(FormatError::Malformed { section: "tensor table" }),
    }
}
