//! Writing weight files (needs `alloc`). Every file written is parsed back before it is returned,
//! so the writer can never produce a file the reader rejects.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::{
    FORMAT_VERSION, FormatError, MAGIC, Metadata, ModelFile, Seq, TensorProblem, TensorRecord, crc32, seq,
    tensor_error,
};
use crate::config::UnetrConfig;
use crate::params::{ParamSpec, for_each_param};
use crate::preprocessing::{BTCV_CLASSES, BTCV_ORIENTATION, BTCV_SPACING, IntensityScaling, Preprocessing};
use crate::tensor::TensorData;

/// How weight matrices are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Everything f32.
    F32,
    /// Linear and convolution weights int8 with per-output-channel scales; vectors stay f32.
    Int8,
}

/// Preprocessing metadata that owns its strings, for building a file.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedPreprocessing {
    /// Orientation code, e.g. `"RAS"`.
    pub orientation: String,
    /// Target spacing in mm.
    pub target_spacing: [f32; 3],
    /// Intensity mapping.
    pub intensity: IntensityScaling,
    /// Foreground crop before inference.
    pub foreground_crop: bool,
    /// Class names, background first.
    pub class_names: Vec<String>,
}

impl OwnedPreprocessing {
    /// The BTCV convention: RAS, 1.5 x 1.5 x 2.0 mm, HU [-175, 250] -> [0, 1], 14 classes.
    pub fn btcv() -> Self {
        Self::with_classes(BTCV_CLASSES.iter().map(alloc::string::ToString::to_string).collect())
    }

    /// BTCV conventions with `n` classes named `background`, `class 1`, ... (BTCV's names when
    /// `n` is 14).
    pub fn for_classes(n: usize) -> Self {
        if n == BTCV_CLASSES.len() {
            return Self::btcv();
        }
        let names = (0..n)
            .map(|i| if i == 0 { "background".to_string() } else { alloc::format!("class {i}") })
            .collect();
        Self::with_classes(names)
    }

    fn with_classes(class_names: Vec<String>) -> Self {
        Self {
            orientation: BTCV_ORIENTATION.to_string(),
            target_spacing: BTCV_SPACING,
            intensity: IntensityScaling::ABDOMEN_CT,
            foreground_crop: true,
            class_names,
        }
    }
}

enum OwnedData {
    F32(Vec<u8>),
    Int8 { axis: u8, scales: Vec<u8>, values: Vec<u8> },
}

struct OwnedTensor {
    name: String,
    shape: Vec<u32>,
    data: OwnedData,
}

/// Symmetric per-channel int8 quantisation along `axis`: `scale = max|w| / 127`,
/// `q = round(w / scale)`. Returns the values and one scale per channel (0 for an all-zero channel).
pub fn quantize_per_channel(values: &[f32], shape: &[u32], axis: usize) -> (Vec<i8>, Vec<f32>) {
    let channels = shape[axis] as usize;
    let inner: usize = shape[axis + 1..].iter().map(|&d| d as usize).product();
    let channel_of = |i: usize| (i / inner) % channels;
    let mut max = alloc::vec![0.0f32; channels];
    for (i, v) in values.iter().enumerate() {
        let c = channel_of(i);
        max[c] = max[c].max(v.abs());
    }
    let scales: Vec<f32> = max.iter().map(|m| m / 127.0).collect();
    let q = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = scales[channel_of(i)];
            if s == 0.0 { 0 } else { libm::roundf(v / s).clamp(-127.0, 127.0) as i8 }
        })
        .collect();
    (q, scales)
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Collects a model's tensors and writes a `.glmae` file.
pub struct ModelBuilder {
    config: UnetrConfig,
    preprocessing: OwnedPreprocessing,
    tensors: Vec<OwnedTensor>,
}

impl ModelBuilder {
    /// An empty model of `config`.
    pub fn new(config: UnetrConfig, preprocessing: OwnedPreprocessing) -> Self {
        Self { config, preprocessing, tensors: Vec::new() }
    }

    /// Every parameter of `config`, fetched by name from `values`, int8 where `precision` says so
    /// and the parameter kind allows. A parameter `values` lacks is an error naming it.
    pub fn from_params<'v>(
        config: UnetrConfig,
        preprocessing: OwnedPreprocessing,
        precision: Precision,
        values: impl Fn(&ParamSpec) -> Option<&'v [f32]>,
    ) -> Result<Self, FormatError> {
        let mut b = Self::new(config, preprocessing);
        let mut missing = None;
        for_each_param(&config, |p| {
            if missing.is_some() {
                return;
            }
            match values(&p) {
                Some(v) => {
                    let axis = if precision == Precision::Int8 { p.kind.channel_axis() } else { None };
                    b.push(&p.name, p.shape.dims(), v, axis);
                }
                None => missing = Some(p.name),
            }
        });
        match missing {
            Some(name) => Err(tensor_error(&name, TensorProblem::Missing)),
            None => Ok(b),
        }
    }

    /// A builder holding everything `file` holds, tensors stored as they are (int8 stays int8).
    pub fn from_file(file: &ModelFile<'_>) -> Self {
        let p = &file.preprocessing;
        let preprocessing = OwnedPreprocessing {
            orientation: p.orientation.to_string(),
            target_spacing: p.target_spacing,
            intensity: p.intensity,
            foreground_crop: p.foreground_crop,
            class_names: p.class_names.iter().map(ToString::to_string).collect(),
        };
        let mut b = Self::new(file.config, preprocessing);
        for (name, t) in file.tensors() {
            let data = match t.data() {
                TensorData::F32(v) => OwnedData::F32(v.to_vec()),
                TensorData::Int8 { axis, scales, values } => {
                    // The parser accepted the axis as an index into a shape of rank <= 5.
                    OwnedData::Int8 { axis: axis as u8, scales: scales.to_vec(), values: values.to_vec() }
                }
            };
            b.tensors.push(OwnedTensor { name: name.to_string(), shape: t.shape().dims().to_vec(), data });
        }
        b
    }

    /// Stores the integer forward pass's activation scales ([`crate::model::ACTIVATION_SCALES`],
    /// one per point: [`crate::model::scales_from_ranges`] of a calibration), replacing any.
    pub fn set_activation_scales(&mut self, scales: &[f32]) {
        let name = crate::model::ACTIVATION_SCALES;
        self.tensors.retain(|t| t.name != name);
        self.push(name, &[scales.len() as u32], scales, None);
    }

    /// Adds a tensor, quantised to int8 along `int8_axis` when given.
    pub fn push(&mut self, name: &str, shape: &[u32], values: &[f32], int8_axis: Option<usize>) {
        let data = match int8_axis {
            Some(axis) if axis < shape.len() => {
                let (q, scales) = quantize_per_channel(values, shape, axis);
                OwnedData::Int8 {
                    axis: axis as u8,
                    scales: le_bytes(&scales),
                    values: q.iter().map(|&v| v as u8).collect(),
                }
            }
            _ => OwnedData::F32(le_bytes(values)),
        };
        self.tensors.push(OwnedTensor { name: name.to_string(), shape: shape.to_vec(), data });
    }

    /// Encodes the file and checks it by parsing it back.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        let encode_err = |_| FormatError::Malformed { section: "encoder output" };
        let mut records = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let shape = heapless::Vec::from_slice(&t.shape)
                .map_err(|_| tensor_error(&t.name, TensorProblem::Rank))?;
            let data = match &t.data {
                OwnedData::F32(v) => TensorData::F32(v),
                OwnedData::Int8 { axis, scales, values } => {
                    TensorData::Int8 { axis: usize::from(*axis), scales, values }
                }
            };
            records.push(TensorRecord { name: &t.name, shape, data });
        }
        let tensor_bytes = seq::encode(&records).map_err(encode_err)?;
        let names: Vec<&str> =
            self.preprocessing.class_names.iter().map(alloc::string::String::as_str).collect();
        let name_bytes = seq::encode(&names).map_err(encode_err)?;
        let p = &self.preprocessing;
        let class_names =
            Seq::decode(&name_bytes).ok_or(FormatError::Malformed { section: "class names" })?;
        let meta = Metadata {
            config: self.config,
            preprocessing: Preprocessing {
                orientation: &p.orientation,
                target_spacing: p.target_spacing,
                intensity: p.intensity,
                foreground_crop: p.foreground_crop,
                class_names,
            },
        };
        let mut payload = postcard::to_allocvec(&meta).map_err(encode_err)?;
        let tensors = Seq::<TensorRecord<'_>>::decode(&tensor_bytes)
            .ok_or(FormatError::Malformed { section: "tensor table" })?;
        payload.extend_from_slice(&postcard::to_allocvec(&tensors).map_err(encode_err)?);

        let mut out = Vec::with_capacity(super::PREAMBLE_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let len = u32::try_from(payload.len())
            .map_err(|_| FormatError::Malformed { section: "payload over 4 GiB" })?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&crc32(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        ModelFile::parse(&out)?;
        Ok(out)
    }
}
