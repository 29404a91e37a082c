//! Preprocessing metadata stored with every model, so inference repeats training's exactly.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::format::Seq;

/// UNETR's BTCV recipe (MONAI's `Orientationd` and `Spacingd` pixdim): the orientation every
/// owned preprocessing type starts from.
pub const BTCV_ORIENTATION: &str = "RAS";

/// UNETR's BTCV target spacing in mm per array axis.
pub const BTCV_SPACING: [f32; 3] = [1.5, 1.5, 2.0];

/// The 13 BTCV organs plus background, in BTCV's label order.
pub const BTCV_CLASSES: [&str; 14] = [
    "background",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic veins",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
];

/// Linear intensity mapping `[a_min, a_max] -> [b_min, b_max]` (MONAI's `ScaleIntensityRanged`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IntensityScaling {
    /// Source low value (HU for CT).
    pub a_min: f32,
    /// Source high value.
    pub a_max: f32,
    /// Target low value.
    pub b_min: f32,
    /// Target high value.
    pub b_max: f32,
    /// Clip to `[b_min, b_max]` after scaling.
    pub clip: bool,
}

impl IntensityScaling {
    /// The UNETR abdomen-CT convention: HU `[-175, 250] -> [0, 1]`, clipped.
    pub const ABDOMEN_CT: Self = Self { a_min: -175.0, a_max: 250.0, b_min: 0.0, b_max: 1.0, clip: true };

    /// Maps one intensity.
    #[inline]
    pub fn apply(&self, x: f32) -> f32 {
        let y = (x - self.a_min) / (self.a_max - self.a_min) * (self.b_max - self.b_min) + self.b_min;
        // min/max, not clamp: an unvalidated window with b_min > b_max must not panic.
        if self.clip { y.max(self.b_min.min(self.b_max)).min(self.b_max.max(self.b_min)) } else { y }
    }
}

/// What a model expects of its input and what its outputs mean.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Preprocessing<'a> {
    /// Axis codes the volume is reoriented to before anything else, e.g. `"RAS"`.
    pub orientation: &'a str,
    /// Voxel spacing in mm the volume is resampled to, per array axis.
    pub target_spacing: [f32; 3],
    /// Intensity mapping after resampling.
    pub intensity: IntensityScaling,
    /// Whether the volume is cropped to its foreground (intensity above `a_min`) before inference.
    pub foreground_crop: bool,
    /// One name per output channel, background first.
    #[serde(borrow)]
    pub class_names: Seq<'a, &'a str>,
}

/// What is wrong with stored preprocessing metadata.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[allow(missing_docs)] // variant docs describe their fields
pub enum PreprocessingError {
    /// Orientation must be three distinct axis codes from R/L, A/P, S/I.
    Orientation,
    /// Spacing must be between [`MIN_SPACING`] and [`MAX_SPACING`] mm.
    Spacing,
    /// The intensity window must be finite with `a_min < a_max` and `b_min < b_max`.
    Intensity,
    /// One class name per output channel.
    ClassCount { names: usize, out_channels: u32 },
    /// A class name is empty.
    EmptyClassName(usize),
}

impl fmt::Display for PreprocessingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Orientation => {
                write!(f, "orientation must be three distinct axis codes from R/L, A/P, S/I")
            }
            Self::Spacing => {
                write!(f, "target spacing must be between {MIN_SPACING} and {MAX_SPACING} mm")
            }
            Self::Intensity => {
                write!(f, "intensity window must be finite with a_min < a_max and b_min < b_max")
            }
            Self::ClassCount { names, out_channels } => {
                write!(f, "{names} class names for {out_channels} output channels")
            }
            Self::EmptyClassName(i) => write!(f, "class name {i} is empty"),
        }
    }
}

impl core::error::Error for PreprocessingError {}

/// Smallest target spacing a model may store, in mm (a micro-CT voxel is ~0.01 mm).
pub const MIN_SPACING: f32 = 1e-3;
/// Largest target spacing a model may store, in mm.
pub const MAX_SPACING: f32 = 1e3;

/// Checks an orientation string such as `"RAS"` or `"LPI"`.
pub fn valid_orientation(code: &str) -> bool {
    let b = code.as_bytes();
    if b.len() != 3 {
        return false;
    }
    let axis = |c: u8| match c {
        b'R' | b'L' => Some(0),
        b'A' | b'P' => Some(1),
        b'S' | b'I' => Some(2),
        _ => None,
    };
    match (axis(b[0]), axis(b[1]), axis(b[2])) {
        (Some(x), Some(y), Some(z)) => x != y && y != z && x != z,
        _ => false,
    }
}

impl Preprocessing<'_> {
    /// Checks the metadata against a model with `out_channels` outputs.
    pub fn validate(&self, out_channels: u32) -> Result<(), PreprocessingError> {
        if !valid_orientation(self.orientation) {
            return Err(PreprocessingError::Orientation);
        }
        if !self.target_spacing.iter().all(|s| (MIN_SPACING..=MAX_SPACING).contains(s)) {
            return Err(PreprocessingError::Spacing);
        }
        let w = &self.intensity;
        let finite = [w.a_min, w.a_max, w.b_min, w.b_max].iter().all(|v| v.is_finite());
        if !finite || w.a_min >= w.a_max || w.b_min >= w.b_max {
            return Err(PreprocessingError::Intensity);
        }
        if self.class_names.len() != out_channels as usize {
            return Err(PreprocessingError::ClassCount { names: self.class_names.len(), out_channels });
        }
        if let Some(i) = self.class_names.iter().position(str::is_empty) {
            return Err(PreprocessingError::EmptyClassName(i));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orientation_codes() {
        for ok in ["RAS", "LPS", "IPL", "ASR"] {
            assert!(valid_orientation(ok), "{ok}");
        }
        for bad in ["RAA", "RLS", "RA", "RASS", "XYZ", ""] {
            assert!(!valid_orientation(bad), "{bad}");
        }
    }

    #[test]
    fn abdomen_window_maps_and_clips() {
        let w = IntensityScaling::ABDOMEN_CT;
        assert_eq!(w.apply(-175.0), 0.0);
        assert_eq!(w.apply(250.0), 1.0);
        assert!((w.apply(37.5) - 0.5).abs() < 1e-6);
        assert_eq!(w.apply(-1000.0), 0.0);
        assert_eq!(w.apply(3000.0), 1.0);
    }

    /// Stored metadata a damaged or hostile file may carry is refused by `validate`: a target
    /// spacing of 5.9e-39 mm or 1e30 mm, an output window with b_min > b_max; `apply` on such a
    /// window does not panic (it used `f32::clamp`, which panics when min > max).
    #[test]
    fn absurd_spacing_and_inverted_windows_are_refused() -> Result<(), &'static str> {
        // postcard's encoding of ["background", "organ"]: count, then length-prefixed strings.
        let names = b"\x02\x0abackground\x05organ";
        let ok = Preprocessing {
            orientation: "RAS",
            target_spacing: [1.5, 1.5, 2.0],
            intensity: IntensityScaling::ABDOMEN_CT,
            foreground_crop: true,
            class_names: Seq::decode(names).ok_or("the class names do not decode")?,
        };
        assert_eq!(ok.validate(2), Ok(()));
        for spacing in [5.9e-39, 1e30, 0.0, f32::NAN] {
            let p = Preprocessing { target_spacing: [1.5, spacing, 2.0], ..ok };
            assert_eq!(p.validate(2), Err(PreprocessingError::Spacing), "{spacing}");
        }
        let inverted = IntensityScaling { b_min: 1.0, b_max: 0.0, ..IntensityScaling::ABDOMEN_CT };
        assert_eq!(
            Preprocessing { intensity: inverted, ..ok }.validate(2),
            Err(PreprocessingError::Intensity)
        );
        // The window maps high HU to b_max = 0 and clips to [0, 1].
        assert_eq!(inverted.apply(3000.0), 0.0);
        assert_eq!(inverted.apply(-3000.0), 1.0);
        Ok(())
    }
}
