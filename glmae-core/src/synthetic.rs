//! Deterministic pseudo-random weights (needs `alloc`), for tests, benchmarks and the firmware
//! demo. Not a training initialisation: the trainer initialises its own modules.

use alloc::vec::Vec;

use crate::config::UnetrConfig;
use crate::format::{FormatError, ModelBuilder, OwnedPreprocessing, Precision};
use crate::params::{ParamKind, ParamSpec, for_each_param};

/// SplitMix64's output function (Stafford's mix 13): a bijection of 64-bit words that spreads
/// every input bit over the output; also used to derive independent seeds.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: tiny, seedable, and identical on every platform.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `[-1, 1)`.
    pub fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Knuth's MMIX linear congruential generator: the test data of every crate's kernel and
/// agreement tests (inputs and weights whose tolerances were measured on it). Weights of
/// synthetic models and phantoms use [`SplitMix64`]; this one is only for test inputs.
pub struct Lcg(u64);

impl Lcg {
    /// A generator whose first output is the step after `state`.
    pub fn new(state: u64) -> Self {
        Self(state)
    }

    /// The next 64 bits of state.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0
    }

    /// Uniform in `[-1, 1)` from the state's top 24 bits.
    pub fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` values of [`Self::symmetric`].
    pub fn symmetric_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.symmetric()).collect()
    }
}

/// Values for every parameter of `cfg`: weights uniform in `+-1/sqrt(fan_in)`, LayerNorm scales
/// near 1, biases and shifts small, so activations stay in a sensible range through the network.
pub fn random_params(cfg: &UnetrConfig, seed: u64) -> Vec<(ParamSpec, Vec<f32>)> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::new();
    for_each_param(cfg, |p| {
        let d = p.shape.dims();
        let n = p.shape.numel();
        let is_norm_scale = p.name.ends_with(".weight") && p.kind == ParamKind::Vector;
        let (scale, offset) = match p.kind {
            ParamKind::Linear | ParamKind::Conv => (1.0 / libm::sqrtf((n / d[0] as usize) as f32), 0.0),
            ParamKind::ConvTranspose => (1.0 / libm::sqrtf(d[0] as f32), 0.0),
            ParamKind::PositionTable => (0.02, 0.0),
            ParamKind::Vector if is_norm_scale => (0.1, 1.0),
            ParamKind::Vector => (0.1, 0.0),
        };
        let values = (0..n).map(|_| offset + scale * rng.symmetric()).collect();
        out.push((p, values));
    });
    out
}

/// A complete weight file of random weights for `cfg`.
pub fn random_model(cfg: &UnetrConfig, seed: u64, precision: Precision) -> Result<Vec<u8>, FormatError> {
    let params = random_params(cfg, seed);
    let prep = OwnedPreprocessing::for_classes(cfg.out_channels as usize);
    let lookup =
        |spec: &ParamSpec| params.iter().find(|(p, _)| p.name == spec.name).map(|(_, v)| v.as_slice());
    ModelBuilder::from_params(*cfg, prep, precision, lookup)?.to_bytes()
}
