//! Synthetic abdominal CT phantom: the built-in data the project trains and tests on.
//!
//! [`generate`] builds one CT volume with the 13 BTCV organ labels from a seed. Anatomy is
//! modelled in millimetres in a canonical patient frame (RAS+, origin at the centre of the field
//! of view) and every seed is drawn as a different patient and scan:
//!
//! - habitus: the abdominal cavity's size and roundness, subcutaneous and visceral fat (lateral
//!   body diameter about 250-390 mm, thin to obese);
//! - anatomy: per-organ volume (e.g. liver 0.7-1.4x), position and rotation, and a smooth random
//!   displacement field with a per-seed amplitude;
//! - acquisition: contrast [`Phase`] (non-contrast, arterial, portal venous) with the tissue
//!   enhancement of each, noise (sigma 5-25 HU), slice thickness (blur along the superior axis,
//!   FWHM 1-5 mm) and field-of-view truncation (a body wider than the lateral field of view, or
//!   air outside a reconstruction circle);
//! - pathology: some seeds get 1-3 hypo- or hyperdense [`Lesion`]s in the liver, spleen or
//!   kidneys, labelled as their organ (as BTCV does).
//!
//! Intensities overlap between classes (liver and spleen, pancreas and bowel wall, vessels and
//! renal cortex) and shift with the phase, so a model has to learn shape and context rather than
//! a HU window. Labels are exact: a voxel carries an organ's label only where that organ is drawn.
//!
//! Generation is deterministic in the seed. A volume with another shape or spacing shows the same
//! anatomy resampled (cut to its own field of view); only the white noise is drawn per voxel.

use std::f32::consts::TAU;
use std::ops::Range;

use glmae_core::synthetic::{SplitMix64, mix64};

/// Size and sampling of generated volumes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PhantomConfig {
    /// Voxels along (i, j, k) = (Right, Anterior, Superior).
    pub shape: [usize; 3],
    /// Voxel size in millimetres along (i, j, k); non-positive or non-finite values are treated as
    /// 1 mm.
    pub spacing: [f32; 3],
}

impl Default for PhantomConfig {
    /// 160 x 128 x 96 voxels of 2 x 2 x 2.5 mm: a 320 x 256 x 240 mm field of view.
    fn default() -> Self {
        Self { shape: [160, 128, 96], spacing: [2.0, 2.0, 2.5] }
    }
}

/// Contrast phase of a generated scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// No intravenous contrast: blood about 40 HU, liver brighter than spleen.
    NonContrast,
    /// Late arterial phase (about 35 s): bright aorta, renal cortex brighter than medulla,
    /// heterogeneous spleen, little hepatic enhancement.
    Arterial,
    /// Portal venous phase (about 70 s): the phase of BTCV's scans.
    PortalVenous,
}

impl Phase {
    /// Short lower-case name, e.g. for captions.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Phase::NonContrast => "non-contrast",
            Phase::Arterial => "arterial",
            Phase::PortalVenous => "portal venous",
        }
    }
}

/// How a lesion differs from its organ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LesionKind {
    /// Simple cyst: water density in every phase.
    Cyst,
    /// Hypovascular solid lesion (e.g. a metastasis): darker than the organ.
    Hypodense,
    /// Hypervascular lesion (e.g. a haemangioma or HCC): brighter than the organ, most in the
    /// arterial phase.
    Hyperdense,
}

/// A lesion drawn into an organ. Its voxels keep the organ's label (BTCV labels lesions as the
/// organ); only the intensity differs.
#[derive(Clone, Debug, PartialEq)]
pub struct Lesion {
    /// Label of the organ it lies in (an index into [`LABELS`]).
    pub organ: u8,
    /// Cyst, hypo- or hyperdense.
    pub kind: LesionKind,
    /// Radius before deformation, mm.
    pub radius_mm: f32,
    /// Intensity drawn inside it before texture, blur and noise, HU.
    pub hu: f32,
    /// Voxels it covers (all labelled `organ`).
    pub voxels: usize,
    /// Voxel (i, j, k) nearest its centre among those it covers.
    pub centre: [usize; 3],
}

/// One generated volume.
#[derive(Clone, Debug, PartialEq)]
pub struct Phantom {
    /// Hounsfield units; `shape[0] * shape[1] * shape[2]` values, index `(i * shape[1] + j) *
    /// shape[2] + k`, axes RAS+ (i toward the patient's right, j anterior, k superior).
    pub hu: Vec<f32>,
    /// Label per voxel (an index into [`LABELS`]), same layout as `hu`.
    pub labels: Vec<u8>,
    /// Voxels along (i, j, k).
    pub shape: [usize; 3],
    /// Voxel size in millimetres along (i, j, k), as used (see [`PhantomConfig::spacing`]).
    pub spacing: [f32; 3],
    /// Contrast phase the intensities were drawn for.
    pub phase: Phase,
    /// Lesions visible in this volume (empty for most seeds).
    pub lesions: Vec<Lesion>,
}

/// BTCV label names, index = label value (0 background .. 13): glmae-core's list.
pub const LABELS: [&str; 14] = glmae_core::preprocessing::BTCV_CLASSES;

/// Generates the phantom for `seed` sampled on `cfg`'s grid.
///
/// The same seed and config always give the same volume. The field of view is centred on the
/// abdomen; structures outside it are simply cut off.
#[must_use]
pub fn generate(seed: u64, cfg: &PhantomConfig) -> Phantom {
    let patient = Patient::draw(seed);
    let hu = Hu::draw(seed, patient.phase);
    let layout = Layout::draw(seed);
    let mut scene = Scene::new(seed, cfg);

    body_and_background(&mut scene, seed, &patient, &hu);
    if let Some(radius) = patient.recon_radius {
        scene.cut_circle(radius);
    }
    spine_and_back_muscles(&mut scene, seed, &hu);
    heart(&mut scene, &hu);
    colon(&mut scene, seed, &hu);
    duodenum(&mut scene, &layout, &hu);
    liver(&mut scene, seed, &layout, &hu);
    spleen(&mut scene, seed, &layout, &hu);
    kidneys(&mut scene, seed, &layout, &hu);
    renal_veins(&mut scene, &layout, &hu);
    stomach(&mut scene, seed, &layout, &hu);
    esophagus(&mut scene, seed, &layout, &hu);
    gallbladder(&mut scene, seed, &layout, &hu);
    pancreas(&mut scene, seed, &layout, &hu);
    adrenals(&mut scene, seed, &layout, &hu);
    mesenteric_vessels(&mut scene, &layout, &hu);
    portal_and_splenic_veins(&mut scene, &layout, &hu);
    inferior_vena_cava(&mut scene, &layout, &hu);
    aorta(&mut scene, &layout, &hu);
    let lesions = lesions(&mut scene, seed, &layout, &hu);

    scene.finish(seed, &patient, lesions)
}

// ------------------------------------------------------------------------------------------------
// Labels and intensities
// ------------------------------------------------------------------------------------------------

const BACKGROUND: u8 = 0;
const SPLEEN: u8 = 1;
const KIDNEY_R: u8 = 2;
const KIDNEY_L: u8 = 3;
const GALLBLADDER: u8 = 4;
const ESOPHAGUS: u8 = 5;
const LIVER: u8 = 6;
const STOMACH: u8 = 7;
const AORTA: u8 = 8;
const IVC: u8 = 9;
const PORTAL_SPLENIC: u8 = 10;
const PANCREAS: u8 = 11;
const ADRENAL_R: u8 = 12;
const ADRENAL_L: u8 = 13;

// Phase-independent values; organ values get per-seed offsets in `Hu::draw`.
const HU_AIR: f32 = -1000.0;
const HU_LUNG: f32 = -860.0;
const HU_GAS: f32 = -900.0;
const HU_SUBCUTANEOUS_FAT: f32 = -100.0;
const HU_VISCERAL_FAT: f32 = -90.0;
const HU_MUSCLE: f32 = 45.0;
const HU_CORTICAL_BONE: f32 = 850.0;
const HU_CANCELLOUS_BONE: f32 = 250.0;
const HU_THIN_BONE: f32 = 550.0;
const HU_DISC: f32 = 90.0;
const HU_CSF: f32 = 20.0;
const HU_BOWEL_FLUID: f32 = 25.0;
const HU_STOOL: f32 = -30.0;
const HU_URINE: f32 = 15.0;
const HU_GALLBLADDER: f32 = 10.0;
const HU_STOMACH_FLUID: f32 = 12.0;
/// Simple cysts are water density in every phase.
const HU_CYST: f32 = 8.0;

/// Nominal values of the tissues that enhance with intravenous contrast, for one phase.
struct Enhancement {
    liver: f32,
    spleen: f32,
    /// Amplitude of the arciform (zebra) pattern of the arterial-phase spleen.
    spleen_mottle: f32,
    kidney_cortex: f32,
    kidney_medulla: f32,
    aorta: f32,
    /// Range the aorta is drawn from when it varies more than the other vessels (arterial bolus
    /// timing); `None`: `aorta` plus the usual jitter.
    aorta_range: Option<[f32; 2]>,
    ivc: f32,
    /// Infrarenal IVC below `ivc`, and its streak amplitude (unenhanced blood from the legs).
    infrarenal_drop: f32,
    infrarenal_streak: f32,
    hepatic_vein: f32,
    renal_vein: f32,
    cardiac_blood: f32,
    myocardium: f32,
    portal: f32,
    pancreas: f32,
    adrenal: f32,
    bowel_wall: f32,
    stomach_wall: f32,
    esophagus: f32,
}

/// Unenhanced: blood 35-45 HU, liver 50-65 and about 10 HU above the spleen, kidneys 30-35 with no
/// cortico-medullary difference, pancreas 40-50, adrenals 10-30 (clinical reference values).
const NON_CONTRAST: Enhancement = Enhancement {
    liver: 55.0,
    spleen: 45.0,
    spleen_mottle: 0.0,
    kidney_cortex: 32.0,
    kidney_medulla: 28.0,
    aorta: 40.0,
    aorta_range: None,
    ivc: 38.0,
    infrarenal_drop: 0.0,
    infrarenal_streak: 0.0,
    hepatic_vein: 38.0,
    renal_vein: 38.0,
    cardiac_blood: 40.0,
    myocardium: 40.0,
    portal: 38.0,
    pancreas: 42.0,
    adrenal: 20.0,
    bowel_wall: 38.0,
    stomach_wall: 40.0,
    esophagus: 40.0,
};

/// Late arterial (about 35 s): aorta 250-350 HU, renal cortex 180-250 against a 80-100 HU medulla,
/// the spleen mottled around 110, liver only 65-75 (most of its supply is portal), pancreas at its
/// peak (110-130), hepatic veins and infrarenal IVC still unenhanced, renal veins already bright.
const ARTERIAL: Enhancement = Enhancement {
    liver: 70.0,
    spleen: 110.0,
    spleen_mottle: 35.0,
    kidney_cortex: 215.0,
    kidney_medulla: 90.0,
    aorta: 300.0,
    aorta_range: Some([250.0, 350.0]),
    ivc: 85.0,
    infrarenal_drop: 40.0,
    infrarenal_streak: 6.0,
    hepatic_vein: 55.0,
    renal_vein: 160.0,
    cardiac_blood: 230.0,
    myocardium: 90.0,
    portal: 130.0,
    pancreas: 120.0,
    adrenal: 60.0,
    bowel_wall: 80.0,
    stomach_wall: 85.0,
    esophagus: 60.0,
};

/// Portal venous (about 70 s), BTCV's phase: liver 100-120, spleen about 120, vessels 130-180.
const PORTAL_VENOUS: Enhancement = Enhancement {
    liver: 110.0,
    spleen: 124.0,
    spleen_mottle: 0.0,
    kidney_cortex: 168.0,
    kidney_medulla: 118.0,
    aorta: 175.0,
    aorta_range: None,
    ivc: 132.0,
    infrarenal_drop: 20.0,
    infrarenal_streak: 12.0,
    hepatic_vein: 147.0,
    renal_vein: 142.0,
    cardiac_blood: 142.0,
    myocardium: 55.0,
    portal: 160.0,
    pancreas: 100.0,
    adrenal: 50.0,
    bowel_wall: 65.0,
    stomach_wall: 70.0,
    esophagus: 56.0,
};

impl Phase {
    fn enhancement(self) -> &'static Enhancement {
        match self {
            Phase::NonContrast => &NON_CONTRAST,
            Phase::Arterial => &ARTERIAL,
            Phase::PortalVenous => &PORTAL_VENOUS,
        }
    }
}

// Intensities derived from the ones above.
/// Paraspinal muscles and psoas are a little denser than the thin abdominal wall.
const BACK_MUSCLE_OVER_WALL: f32 = 5.0;
/// The colon wall enhances less than small bowel.
const COLON_WALL_BELOW_BOWEL: f32 = 15.0;
/// Amplitudes of the mottling of stool and of small-bowel fluid.
const STOOL_MOTTLE: f32 = 90.0;
const BOWEL_FLUID_MOTTLE: f32 = 20.0;

/// Per-seed offset range for organ and vessel intensities.
const ORGAN_HU_JITTER: f32 = 10.0;
/// Per-seed offset range for fat, muscle and bowel.
const TISSUE_HU_JITTER: f32 = 6.0;
/// Standard deviation range of the white noise, HU: low-noise thin patients to noisy obese ones
/// (typical abdominal CT measures 5-25 HU in fat or liver).
const NOISE_SIGMA: [f32; 2] = [5.0, 25.0];
/// Reconstructed slice thickness (FWHM of the slice sensitivity profile), mm: 1-5 mm covers
/// thin-slice to routine thick-slice abdominal reconstructions.
const SLICE_FWHM_MM: [f32; 2] = [1.0, 5.0];
/// Gaussian blur standing in for partial volume and the scanner's point spread, in voxels.
const PARTIAL_VOLUME_SIGMA: f32 = 0.6;

/// Peak amplitude of the smooth texture inside each label (HU, typical values are a third of
/// this); index = label. The pancreas is lobulated, so it gets more.
const TEXTURE_HU: [f32; 14] =
    [15.0, 12.0, 15.0, 15.0, 8.0, 12.0, 15.0, 15.0, 10.0, 15.0, 12.0, 30.0, 12.0, 12.0];

/// Who is scanned and how: habitus, contrast phase and acquisition, per seed.
struct Patient {
    /// 0 = thin .. 1 = obese; drives fat thickness and noise.
    habitus: f32,
    phase: Phase,
    noise_sigma: f32,
    slice_fwhm_mm: f32,
    /// Radius (mm) of the reconstruction circle outside which the scanner writes air, if any.
    recon_radius: Option<f32>,
}

impl Patient {
    fn draw(seed: u64) -> Self {
        let mut r = PhantomRng::stream(seed, 5);
        // Skewed towards thin-to-average builds: a lateral diameter over 320 mm (cut by the
        // default field of view) for about a quarter of the seeds.
        let habitus = r.unit().powf(2.5);
        // Portal venous is the commonest abdominal protocol (and BTCV's); the other two are common
        // enough that a model must cope with them.
        let u = r.unit();
        let phase = if u < 0.25 {
            Phase::NonContrast
        } else if u < 0.55 {
            Phase::Arterial
        } else {
            Phase::PortalVenous
        };
        // Larger patients attenuate more, so the same protocol gives a noisier image.
        let noise_sigma = (r.range(NOISE_SIGMA[0], 0.7 * NOISE_SIGMA[1]) + 0.3 * NOISE_SIGMA[1] * habitus)
            .min(NOISE_SIGMA[1]);
        let slice_fwhm_mm = r.range(SLICE_FWHM_MM[0], SLICE_FWHM_MM[1]);
        // A fifth of the scans are reconstructed on a 300-350 mm circle that cuts the corners and,
        // in wide patients, the flanks.
        let recon_radius = (r.unit() < 0.2).then(|| r.range(150.0, 175.0));
        Self { habitus, phase, noise_sigma, slice_fwhm_mm, recon_radius }
    }
}

/// This seed's intensities (nominal values of its phase plus per-seed offsets).
struct Hu {
    subcutaneous_fat: f32,
    visceral_fat: f32,
    muscle: f32,
    bowel_wall: f32,
    bowel_fluid: f32,
    liver: f32,
    spleen: f32,
    spleen_mottle: f32,
    kidney_cortex: f32,
    kidney_medulla: f32,
    urine: f32,
    gallbladder: f32,
    esophagus: f32,
    stomach_wall: f32,
    stomach_fluid: f32,
    aorta: f32,
    ivc: f32,
    infrarenal_drop: f32,
    infrarenal_streak: f32,
    hepatic_vein: f32,
    renal_vein: f32,
    cardiac_blood: f32,
    myocardium: f32,
    portal: f32,
    pancreas: f32,
    adrenal: f32,
    phase: Phase,
}

impl Hu {
    fn draw(seed: u64, phase: Phase) -> Self {
        let e = phase.enhancement();
        let mut r = PhantomRng::stream(seed, 2);
        let kidney = r.sym(ORGAN_HU_JITTER);
        let ivc = e.ivc + r.sym(ORGAN_HU_JITTER);
        let aorta = match e.aorta_range {
            Some([lo, hi]) => r.range(lo, hi),
            None => e.aorta + r.sym(ORGAN_HU_JITTER),
        };
        Self {
            subcutaneous_fat: HU_SUBCUTANEOUS_FAT + r.sym(TISSUE_HU_JITTER),
            visceral_fat: HU_VISCERAL_FAT + r.sym(TISSUE_HU_JITTER),
            muscle: HU_MUSCLE + r.sym(TISSUE_HU_JITTER),
            bowel_wall: e.bowel_wall + r.sym(TISSUE_HU_JITTER),
            bowel_fluid: HU_BOWEL_FLUID + r.sym(TISSUE_HU_JITTER),
            liver: e.liver + r.sym(ORGAN_HU_JITTER),
            spleen: e.spleen + r.sym(ORGAN_HU_JITTER),
            spleen_mottle: e.spleen_mottle,
            kidney_cortex: e.kidney_cortex + kidney,
            kidney_medulla: e.kidney_medulla + kidney,
            urine: HU_URINE + r.sym(TISSUE_HU_JITTER),
            gallbladder: HU_GALLBLADDER + r.sym(ORGAN_HU_JITTER),
            esophagus: e.esophagus + r.sym(ORGAN_HU_JITTER),
            stomach_wall: e.stomach_wall + r.sym(ORGAN_HU_JITTER),
            stomach_fluid: HU_STOMACH_FLUID + r.sym(ORGAN_HU_JITTER),
            aorta,
            ivc,
            infrarenal_drop: e.infrarenal_drop,
            infrarenal_streak: e.infrarenal_streak,
            hepatic_vein: e.hepatic_vein + (ivc - e.ivc),
            renal_vein: e.renal_vein + (ivc - e.ivc),
            cardiac_blood: e.cardiac_blood + r.sym(ORGAN_HU_JITTER),
            myocardium: e.myocardium + r.sym(TISSUE_HU_JITTER),
            portal: e.portal + r.sym(ORGAN_HU_JITTER),
            pancreas: e.pancreas + r.sym(ORGAN_HU_JITTER),
            adrenal: e.adrenal + r.sym(ORGAN_HU_JITTER),
            phase,
        }
    }
}

/// Nominal centres (mm) the liver and the kidneys are scaled about, so that structures attached to
/// them (gallbladder, hepatic and portal veins, adrenals, renal veins) follow their size.
const LIVER_CENTRE: V3 = [58.0, -2.0, 36.0];
const KIDNEY_R_CENTRE: V3 = [68.0, -36.0, -18.0];
const KIDNEY_L_CENTRE: V3 = [-68.0, -34.0, 0.0];

/// Per-seed displacements (mm) and size factors shared by structures that must move together,
/// e.g. the pancreas and the splenic vein behind it.
struct Layout {
    liver: V3,
    spleen: V3,
    kidney_r: V3,
    kidney_l: V3,
    stomach: V3,
    pancreas: V3,
    aorta: V3,
    ivc: V3,
    liver_size: V3,
    spleen_size: V3,
    kidney_r_size: V3,
    kidney_l_size: V3,
}

impl Layout {
    fn draw(seed: u64) -> Self {
        let mut r = PhantomRng::stream(seed, 3);
        Self {
            // Organ positions vary by about a vertebral body between patients (more craniocaudally,
            // with breathing and build).
            liver: r.jitter([10.0, 8.0, 15.0]),
            spleen: r.jitter([10.0, 10.0, 16.0]),
            kidney_r: r.jitter([8.0, 6.0, 16.0]),
            kidney_l: r.jitter([8.0, 6.0, 16.0]),
            stomach: r.jitter([11.0, 10.0, 13.0]),
            pancreas: r.jitter([8.0, 6.0, 11.0]),
            aorta: r.jitter([5.0, 3.0, 0.0]),
            ivc: r.jitter([4.0, 3.0, 0.0]),
            // Adult volume ranges relative to the nominal organ: liver 0.7-1.4 (about 1.0-2.0 L),
            // spleen 0.6-1.7 (about 120-340 mL), kidneys 0.75-1.3 (about 120-210 mL) each.
            liver_size: r.volume_size(0.7, 1.4, 0.06),
            spleen_size: r.volume_size(0.6, 1.7, 0.06),
            kidney_r_size: r.volume_size(0.75, 1.3, 0.05),
            kidney_l_size: r.volume_size(0.75, 1.3, 0.05),
        }
    }

    /// Where the nominal point `p` in or on the liver lies in this patient.
    fn in_liver(&self, p: V3) -> V3 {
        add(add(LIVER_CENTRE, mul(sub(p, LIVER_CENTRE), self.liver_size)), self.liver)
    }

    /// Where the nominal point `p` near a kidney (`right` or left) lies in this patient.
    fn in_kidney(&self, right: bool, p: V3) -> V3 {
        let (c, size, shift) = if right {
            (KIDNEY_R_CENTRE, self.kidney_r_size, self.kidney_r)
        } else {
            (KIDNEY_L_CENTRE, self.kidney_l_size, self.kidney_l)
        };
        add(add(c, mul(sub(p, c), size)), shift)
    }
}

// ------------------------------------------------------------------------------------------------
// Body wall, ribs, lungs and the bowel-and-fat background
// ------------------------------------------------------------------------------------------------

/// Body outline: the abdominal cavity (inside the wall muscles) is a superellipse cross-section,
/// flatter at the back and varying along z; muscle and subcutaneous fat wrap it.
struct Body {
    /// Cavity half-axes, mm: lateral, anterior, posterior.
    half_width: f32,
    anterior: f32,
    posterior: f32,
    /// Superellipse exponent of the anterior half: 2 is an ellipse, larger is boxier.
    front_exp: f32,
    belly: f32,
    phase: f32,
    /// Subcutaneous fat thickness anteriorly, mm, and laterally relative to that.
    fat: f32,
    flank: f32,
    muscle: f32,
    /// Visceral fat, 0 .. 1: widens the cavity and spreads the bowel loops apart.
    visceral: f32,
}

impl Body {
    fn draw(r: &mut PhantomRng, habitus: f32) -> Self {
        let visceral = clamp01(habitus * r.range(0.5, 1.5));
        Self {
            half_width: 118.0 * (1.0 + r.sym(0.05)) + 8.0 * visceral,
            anterior: 72.0 * (1.0 + r.sym(0.06)) + 22.0 * visceral,
            posterior: 80.0 * (1.0 + r.sym(0.04)),
            front_exp: r.range(1.8, 2.5),
            belly: r.range(0.0, 0.12),
            phase: r.range(0.0, TAU),
            // Subcutaneous fat 4-50 mm anteriorly (thin to obese); with the cavity this gives a
            // lateral diameter of about 250-390 mm and an AP diameter of about 180-280 mm.
            fat: (4.0 + 40.0 * habitus) * r.range(0.85, 1.15),
            flank: r.range(0.6, 1.1),
            muscle: r.range(8.0, 12.0),
            visceral,
        }
    }

    /// Distance outside the cavity along the ray from the body axis, mm; negative inside.
    fn outside(&self, q: V3) -> f32 {
        let [x, y, z] = q;
        let a = self.half_width * (1.0 + 0.04 * (z * 0.021 + self.phase).sin());
        let (b, e) = if y >= 0.0 {
            (self.anterior * (1.0 + self.belly * clamp01((30.0 - z) / 150.0)), self.front_exp)
        } else {
            (self.posterior, 2.6)
        };
        let rho = ((x / a).abs().powf(e) + (y / b).abs().powf(e)).powf(1.0 / e);
        let r = (x * x + y * y).sqrt();
        if rho < 1e-6 { -a.min(b) } else { r * (1.0 - 1.0 / rho) }
    }

    /// Subcutaneous fat thickness at `q` (thinner at the back), mm.
    fn fat_at(&self, q: V3, n: f32) -> f32 {
        let r = (q[0] * q[0] + q[1] * q[1]).sqrt().max(1e-3);
        let (c, s) = (q[1] / r, q[0] / r);
        let weight = c.max(0.0).powi(2) + self.flank * s * s + 0.5 * c.min(0.0).powi(2);
        self.fat * weight * (1.0 + 0.3 * n)
    }
}

/// One rib: a band in z that runs from the spine around the flank, descending anteriorly.
struct Rib {
    z_back: f32,
    drop_per_rad: f32,
    reach: f32,
    half_height: f32,
}

fn draw_ribs(r: &mut PhantomRng) -> Vec<Rib> {
    let top = 125.0 + r.sym(8.0);
    let pitch = 24.0 + r.sym(2.0);
    (0..7)
        .map(|n| Rib {
            z_back: top - pitch * n as f32,
            drop_per_rad: 34.0 + r.sym(4.0),
            // The lowest ribs are short (floating ribs).
            reach: if n < 5 { 2.7 } else { 1.9 - 0.3 * (n - 5) as f32 },
            half_height: 4.5 + r.sym(0.8),
        })
        .collect()
}

fn in_rib(ribs: &[Rib], q: V3) -> bool {
    let angle = q[0].atan2(-q[1]).abs();
    if angle < 0.45 {
        return false;
    }
    ribs.iter().any(|rib| {
        angle <= rib.reach
            && (q[2] - (rib.z_back - rib.drop_per_rad * (angle - 0.45))).abs() < rib.half_height
    })
}

/// Height of the diaphragm (mm): the domes are higher on the right and fall away posteriorly and
/// laterally, where the lung bases reach down beside the liver and spleen.
fn diaphragm_z(q: V3, right_dome: f32, left_dome: f32) -> f32 {
    let base = if q[0] > 0.0 { right_dome } else { left_dome };
    let back = clamp01(-q[1] / 80.0);
    let side = clamp01((q[0].abs() - 50.0) / 60.0);
    let front = clamp01(q[1] / 60.0);
    base + 10.0 * front - 45.0 * back * back - 25.0 * side * side
}

/// Air, skin fat, wall muscle and ribs; inside the wall, lung bases above the diaphragm and a
/// mixture of mesenteric fat and bowel loops below it. Organs are painted over this later.
fn body_and_background(scene: &mut Scene, seed: u64, patient: &Patient, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 10);
    let body = Body::draw(&mut r, patient.habitus);
    let ribs = draw_ribs(&mut r);
    let right_dome = 106.0 + r.sym(6.0);
    let left_dome = 98.0 + r.sym(6.0);
    let gas_cut = r.range(0.28, 0.42);
    // Visceral fat pushes the loops apart: thinner bowel bands in more fat.
    let bowel_band = r.range(0.2, 0.28) * (1.0 - 0.35 * body.visceral);
    let (lo, hi) = scene.canon_bounds();
    let wall_noise = Lattice::new(seed, 11, 40.0, lo, hi);
    let loops = Lattice::new(seed, 12, 21.0, lo, hi);
    let gas = Lattice::new(seed, 13, 14.0, lo, hi);
    let fluid = Lattice::new(seed, 14, 9.0, lo, hi);
    let skin_max = 1.3 * (body.muscle + body.fat * body.flank.max(1.0));

    for ((&q, zone_out), hu_out) in scene.canon.iter().zip(&mut scene.zone).zip(&mut scene.hu) {
        let out = body.outside(q);
        // Ribs reach at most 8 mm into the cavity, and the wall noise changes a thickness by at most
        // 30%: voxels deeper in or well outside skip the noise.
        let wall = if out > skin_max {
            Some((Zone::Outside, HU_AIR))
        } else if out > -8.0 {
            let n = wall_noise.sample(q);
            let muscle = body.muscle * (1.0 + 0.3 * n);
            if out > muscle + body.fat_at(q, n) {
                Some((Zone::Outside, HU_AIR))
            } else if out < 0.7 * muscle && out > 0.7 * muscle - 8.0 && in_rib(&ribs, q) {
                Some((Zone::Wall, HU_THIN_BONE))
            } else if out > muscle {
                Some((Zone::Wall, hu.subcutaneous_fat))
            } else if out > 0.0 {
                Some((Zone::Wall, hu.muscle))
            } else {
                None
            }
        } else {
            None
        };
        let (zone, value) = if let Some(w) = wall {
            w
        } else if q[2] > diaphragm_z(q, right_dome, left_dome) {
            (Zone::Cavity, HU_LUNG)
        } else {
            // Bowel is densest anteriorly and low down; the retroperitoneum is mostly fat.
            let density = clamp01((q[1] + 45.0) / 50.0) * clamp01((75.0 - q[2]) / 50.0);
            let band = bowel_band * density;
            let n = loops.sample(q).abs();
            let value = if n >= band {
                hu.visceral_fat
            } else if n > 0.55 * band {
                hu.bowel_wall
            } else if gas.sample(q) > gas_cut {
                HU_GAS
            } else {
                hu.bowel_fluid + BOWEL_FLUID_MOTTLE * fluid.sample(q)
            };
            (Zone::Cavity, value)
        };
        *zone_out = zone;
        *hu_out = value;
    }
}

/// Vertebrae (bodies, discs, canal, arches, spinous and transverse processes), erector spinae,
/// quadratus lumborum and psoas. All protected from organ painting.
fn spine_and_back_muscles(scene: &mut Scene, seed: u64, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 20);
    let y_body = -38.0 + r.sym(3.0);
    let period = 31.0 + r.sym(2.0);
    let phase = r.range(0.0, period);
    let disc = 5.0 + r.sym(1.0);
    let rx = 22.0 + r.sym(2.0);
    let ry = 16.0 + r.sym(1.5);
    let canal = 8.0 + r.sym(1.0);
    let muscle = hu.muscle + BACK_MUSCLE_OVER_WALL;

    let lo = [-75.0, -110.0, -400.0];
    let hi = [75.0, -10.0, 400.0];
    scene.paint(lo, hi, Mode::Wall, |q, _| {
        let [x, y, z] = q;
        // Lumbar lordosis: lower vertebrae sit a little more anteriorly.
        let yc = y_body + 6.0 * clamp01(-z / 120.0);
        let within = (z - phase).rem_euclid(period);
        let in_disc = within < disc;
        let endplate = within < disc + 1.5 || within > period - 1.5;

        let body = (x / rx).powi(2) + ((y - yc) / ry).powi(2);
        if body < 1.0 {
            let value = if in_disc {
                HU_DISC
            } else if body > 0.72 || endplate {
                HU_CORTICAL_BONE
            } else {
                HU_CANCELLOUS_BONE
            };
            return Some((BACKGROUND, value));
        }
        let cy = yc - ry - canal - 1.0;
        let dc = ((x / 1.15).powi(2) + (y - cy).powi(2)).sqrt();
        if dc < canal {
            return Some((BACKGROUND, HU_CSF));
        }
        // The arch (pedicles, laminae, facets) overlaps the disc levels; the processes do not.
        let arch = dc < canal + 6.0;
        let spinous = !in_disc && x.abs() < 4.0 && y < cy - canal && y > cy - canal - 20.0;
        let transverse =
            (y - cy - 2.0).abs() < 3.5 && x.abs() < 36.0 && (within - 0.5 * (period + disc)).abs() < 5.0;
        if arch || spinous || transverse {
            return Some((BACKGROUND, HU_THIN_BONE));
        }
        let erector = ((x.abs() - 30.0) / 21.0).powi(2) + ((y - (cy - 10.0)) / 15.0).powi(2) < 1.0;
        let quadratus =
            z < 40.0 && ((x.abs() - 58.0) / 15.0).powi(2) + ((y - (yc - 28.0)) / 9.0).powi(2) < 1.0;
        let rp = 6.0 + 13.0 * clamp01((30.0 - z) / 110.0);
        let px = 30.0 + 0.1 * (30.0 - z).max(0.0);
        let psoas = z < 30.0 && ((x.abs() - px) / rp).powi(2) + ((y - (yc - 2.0)) / (0.9 * rp)).powi(2) < 1.0;
        (erector || quadratus || psoas).then_some((BACKGROUND, muscle))
    });
}

/// The bottom of the heart at the top of the field of view: blood pool inside myocardium.
fn heart(scene: &mut Scene, hu: &Hu) {
    let blob = Blob::new([-15.0, 42.0, 152.0], [72.0, 50.0, 58.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]);
    let (lo, hi) = blob.bounds();
    scene.paint(lo, hi, Mode::Viscera, |q, _| {
        let r2 = norm2(blob.local(q));
        (r2 < 1.0).then_some((BACKGROUND, if r2 < 0.6 { hu.cardiac_blood } else { hu.myocardium }))
    });
}

/// Colon from caecum round to the sigmoid: stool mottled with gas.
fn colon(scene: &mut Scene, seed: u64, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 30);
    let o = r.jitter([6.0, 6.0, 8.0]);
    let ctrl = [
        ([78.0, 15.0, -125.0], 24.0),
        ([86.0, -5.0, -60.0], 24.0),
        ([86.0, -5.0, -15.0], 22.0),
        ([72.0, 20.0, 5.0], 20.0),
        ([35.0, 58.0, 0.0], 20.0),
        ([-10.0, 62.0, -5.0], 19.0),
        ([-50.0, 50.0, 12.0], 19.0),
        ([-82.0, 10.0, 25.0], 18.0),
        ([-88.0, -12.0, -20.0], 17.0),
        ([-84.0, -10.0, -80.0], 17.0),
        ([-70.0, 0.0, -130.0], 16.0),
    ];
    let ctrl: Vec<(V3, f32)> =
        ctrl.iter().map(|&(p, rad)| (add(p, add(o, r.jitter([4.0; 3]))), rad)).collect();
    let tube = Tube::new(&ctrl, [1.0; 3], Wobble::draw(&mut r, 4.0, TAU / 60.0));
    let (lo, hi) = scene.canon_bounds();
    let content = Lattice::new(seed, 31, 12.0, lo, hi);
    let gas_cut = r.range(-0.1, 0.2);
    let wall = hu.bowel_wall - COLON_WALL_BELOW_BOWEL;
    scene.paint_tube(&tube, Mode::Viscera, |h, _| {
        let radius = tube.radius_at(h.t);
        let value = if h.rel * radius > radius - 3.0 {
            wall
        } else {
            let n = content.sample(h.q);
            if n > gas_cut { HU_GAS } else { HU_STOOL + STOOL_MOTTLE * n }
        };
        Some((BACKGROUND, value))
    });
}

/// Duodenal C-loop around the pancreatic head, from the pylorus to the duodenojejunal flexure.
fn duodenum(scene: &mut Scene, layout: &Layout, hu: &Hu) {
    let s = layout.stomach;
    let p = layout.pancreas;
    let ctrl = [
        (add([24.0, 34.0, 10.0], s), 11.0),
        (add([44.0, 22.0, 6.0], p), 12.0),
        (add([50.0, 6.0, -12.0], p), 12.0),
        (add([44.0, 0.0, -36.0], p), 12.0),
        (add([15.0, 2.0, -46.0], p), 11.0),
        (add([-15.0, 10.0, -40.0], p), 11.0),
        (add([-28.0, 16.0, -26.0], p), 11.0),
    ];
    let tube = Tube::new(&ctrl, [1.0; 3], Wobble::none());
    scene.paint_tube(&tube, Mode::Viscera, |h, _| {
        let radius = tube.radius_at(h.t);
        let value = if h.rel * radius > radius - 3.0 { hu.bowel_wall } else { hu.bowel_fluid };
        Some((BACKGROUND, value))
    });
}

// ------------------------------------------------------------------------------------------------
// Organs
// ------------------------------------------------------------------------------------------------

/// Liver: a large right lobe and a thinner left lobe draped anteriorly, with an oblique inferior
/// surface and enhancing hepatic veins converging on the IVC.
fn liver(scene: &mut Scene, seed: u64, layout: &Layout, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 40);
    let s = layout.liver_size;
    let right = Blob::new(
        layout.in_liver(LIVER_CENTRE),
        mul([80.0, 88.0, 88.0], s),
        r.tilt([0.0, 0.0, 1.0], 0.12),
        [1.0, 0.0, 0.0],
    )
    .wobbled(Wobble::draw(&mut r, 0.08, 2.2));
    let left = Blob::new(
        add(layout.in_liver([0.0, 34.0, 74.0]), r.jitter([6.0, 4.0, 5.0])),
        mul([66.0, 37.0, 32.0], s),
        r.tilt([0.0, 0.0, 1.0], 0.15),
        [1.0, -0.25, 0.0],
    )
    .wobbled(Wobble::draw(&mut r, 0.1, 2.5));
    // The oblique inferior surface scales with the liver's height.
    let cut_z = layout.in_liver([58.0, -2.0, -18.0])[2] + r.sym(6.0);
    let cut_x = layout.in_liver([118.0, 0.0, 0.0])[0];
    let cut_slope = 0.35 + r.sym(0.08);

    let (lo, hi) = union_bounds(right.bounds(), left.bounds());
    scene.paint(lo, hi, Mode::Viscera, |q, _| {
        let r2 = norm2(right.local(q)).min(norm2(left.local(q)));
        let above_cut = q[2] > cut_z - cut_slope * (q[0] - cut_x) - 0.15 * q[1];
        (r2 < 1.0 && above_cut).then_some((LIVER, hu.liver))
    });

    let top = add([18.0, 0.0, 98.0], layout.ivc);
    for end in [[88.0, -15.0, 68.0], [48.0, 30.0, 62.0], [-12.0, 34.0, 78.0]] {
        let end = add(layout.in_liver(end), r.jitter([6.0; 3]));
        let mid = add(scale(add(top, end), 0.5), r.jitter([5.0; 3]));
        let tube = Tube::new(&[(top, 5.5), (mid, 4.0), (end, 2.0)], [1.0; 3], Wobble::none());
        scene.paint_tube(&tube, Mode::Viscera, |_, current| {
            (current == LIVER).then_some((LIVER, hu.hepatic_vein))
        });
    }
}

/// Spleen: a crescent against the left posterolateral wall.
fn spleen(scene: &mut Scene, seed: u64, layout: &Layout, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 50);
    let centre = add([-80.0, -36.0, 58.0], layout.spleen);
    // Thin axis points out of the body, long axis tilted forward-down like the 10th rib.
    let outward = normalize([centre[0], centre[1], 0.0]);
    let up = r.tilt([0.3 * -outward[1], 0.3 * outward[0], 1.0], 0.15);
    let blob = Blob::new(centre, mul([22.0, 46.0, 54.0], layout.spleen_size), up, outward)
        .wobbled(Wobble::draw(&mut r, 0.08, 2.5))
        .bent([-0.45, -0.35]);
    let (lo, hi) = blob.bounds();
    // Arterial phase: arciform bands from the different flow of red and white pulp.
    let (clo, chi) = scene.canon_bounds();
    let mottle = (hu.spleen_mottle > 0.0).then(|| Lattice::new(seed, 15, 10.0, clo, chi));
    scene.paint(lo, hi, Mode::Viscera, |q, _| {
        let bands = mottle.as_ref().map_or(0.0, |m| (TAU * 1.3 * m.sample(q)).sin());
        (norm2(blob.local(q)) < 1.0).then_some((SPLEEN, hu.spleen + hu.spleen_mottle * bands))
    });
}

/// Kidneys: beans with cortex, darker medulla, a urine-filled pelvis and a fatty hilum facing
/// anteromedially; long axes tilted so the upper poles are medial and posterior.
fn kidneys(scene: &mut Scene, seed: u64, layout: &Layout, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 60);
    for (side, label, nominal, offset, size) in [
        (1.0, KIDNEY_R, KIDNEY_R_CENTRE, layout.kidney_r, layout.kidney_r_size),
        (-1.0, KIDNEY_L, KIDNEY_L_CENTRE, layout.kidney_l, layout.kidney_l_size),
    ] {
        let up = r.tilt([-0.25 * side, -0.15, 1.0], 0.1);
        let lateral = r.tilt([side, -0.45, 0.0], 0.1);
        let blob = Blob::new(add(nominal, offset), mul([28.0, 26.0, 57.0], size), up, lateral)
            .wobbled(Wobble::draw(&mut r, 0.05, 2.0))
            .bent([0.0, 0.3]);
        let (lo, hi) = blob.bounds();
        scene.paint(lo, hi, Mode::Viscera, |q, _| {
            let u = blob.local(q);
            let r2 = norm2(u);
            if r2 >= 1.0 {
                return None;
            }
            if u[0] < -0.62 && u[2].abs() < 0.35 {
                return Some((BACKGROUND, hu.visceral_fat));
            }
            let pelvis = norm2(sub(u, [-0.4, 0.05, 0.0])) < 0.09;
            let value = if pelvis {
                hu.urine
            } else if r2 > 0.5 {
                hu.kidney_cortex
            } else {
                hu.kidney_medulla
            };
            Some((label, value))
        });
    }
}

/// Renal veins (unlabelled): the left one crosses between the aorta and the SMA.
fn renal_veins(scene: &mut Scene, layout: &Layout, hu: &Hu) {
    let veins = [
        vec![
            (layout.in_kidney(true, [46.0, -30.0, -14.0]), 4.5),
            (add([26.0, -14.0, -10.0], layout.ivc), 5.0),
        ],
        vec![
            (layout.in_kidney(false, [-46.0, -28.0, 0.0]), 4.5),
            ([-26.0, -4.0, -2.0], 4.5),
            ([-8.0, 4.0, -4.0], 4.0),
            (add([22.0, -8.0, -6.0], layout.ivc), 5.0),
        ],
    ];
    for ctrl in &veins {
        let tube = Tube::new(ctrl, [1.0; 3], Wobble::none());
        scene.paint_tube(&tube, Mode::Viscera, |_, current| {
            (current != KIDNEY_R && current != KIDNEY_L).then_some((BACKGROUND, hu.renal_vein))
        });
    }
}

/// Stomach: a J-shaped tube from the fundus to the pylorus, wall around fluid with gas floating
/// anteriorly (the patient is supine).
fn stomach(scene: &mut Scene, seed: u64, layout: &Layout, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 70);
    let o = layout.stomach;
    // Collapsed to distended.
    let g = r.range(0.8, 1.25);
    let ctrl = [
        ([-48.0, -8.0, 88.0], 28.0),
        ([-58.0, 8.0, 62.0], 30.0),
        ([-50.0, 38.0, 36.0], 26.0),
        ([-18.0, 50.0, 18.0], 20.0),
        ([8.0, 46.0, 12.0], 15.0),
        ([24.0, 34.0, 10.0], 11.0),
    ];
    let ctrl: Vec<(V3, f32)> =
        ctrl.iter().map(|&(p, rad)| (add(add(p, o), r.jitter([4.0; 3])), rad * g)).collect();
    let tube = Tube::new(&ctrl, [1.0; 3], Wobble::draw(&mut r, 3.0, TAU / 50.0));
    let gas_level = r.range(0.35, 0.75);
    let wall = 5.0 + r.sym(1.0);
    scene.paint_tube(&tube, Mode::Viscera, |h, _| {
        let radius = tube.radius_at(h.t);
        let value = if h.rel * radius > radius - wall {
            hu.stomach_wall
        } else if h.q[1] - tube.point_at(h.t)[1] > gas_level * radius {
            HU_GAS
        } else {
            hu.stomach_fluid
        };
        Some((STOMACH, value))
    });
}

/// Esophagus: a collapsed tube anterior to the aorta, swinging left to the cardia, sometimes with
/// a little air in its lumen.
fn esophagus(scene: &mut Scene, seed: u64, layout: &Layout, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 80);
    let a = layout.aorta;
    let s = layout.stomach;
    let ctrl = [
        (add([-2.0, 6.0, 135.0], a), 8.0),
        (add([-6.0, 7.0, 108.0], a), 8.0),
        (add(add([-22.0, 5.0, 94.0], scale(add(a, s), 0.5)), r.jitter([2.0; 3])), 8.0),
        (add([-36.0, 0.0, 84.0], s), 9.0),
    ];
    let tube = Tube::new(&ctrl, [1.25, 0.9, 1.0], Wobble::draw(&mut r, 1.5, TAU / 40.0));
    let air = if r.unit() < 0.3 { 0.2 } else { 0.0 };
    scene.paint_tube(&tube, Mode::Viscera, |h, _| {
        Some((ESOPHAGUS, if h.rel < air { HU_GAS } else { hu.esophagus }))
    });
}

/// Gallbladder: a pear in the fossa on the liver's inferior surface, fundus anterior and low.
fn gallbladder(scene: &mut Scene, seed: u64, layout: &Layout, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 90);
    let centre = add(layout.in_liver([62.0, 34.0, -4.0]), r.jitter([5.0, 5.0, 5.0]));
    // Contracted after a meal to distended when fasting: 0.4-2.2 times the nominal volume.
    let blob = Blob::new(
        centre,
        mul([14.0, 15.0, 30.0], r.volume_size(0.4, 2.2, 0.06)),
        r.tilt([0.15, -0.45, 1.0], 0.2),
        [1.0, 0.0, 0.0],
    )
    .wobbled(Wobble::draw(&mut r, 0.06, 2.0));
    let (lo, hi) = blob.bounds();
    scene.paint(lo, hi, Mode::Viscera, |q, _| {
        let u = blob.local(q);
        // Pear: wider at the fundus (low end), narrowing to the neck.
        let taper = 1.0 + 0.25 * u[2];
        let r2 = (u[0] * taper).powi(2) + (u[1] * taper).powi(2) + u[2] * u[2];
        (r2 < 1.0).then_some((GALLBLADDER, hu.gallbladder))
    });
}

/// Pancreas: head in the duodenal loop, neck in front of the portal confluence, body across the
/// aorta and tail up to the splenic hilum; lobulated texture comes from `TEXTURE_HU`.
fn pancreas(scene: &mut Scene, seed: u64, layout: &Layout, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 100);
    // Thickness varies from atrophic (elderly) to full: about 0.8-1.15 of nominal.
    let g = r.range(0.8, 1.15);
    let ctrl: Vec<(V3, f32)> =
        pancreas_path(layout).iter().map(|&(p, rad)| (add(p, r.jitter([3.0; 3])), rad * g)).collect();
    let tube = Tube::new(&ctrl, [1.0, 1.0, 0.8], Wobble::draw(&mut r, 2.5, TAU / 30.0));
    scene.paint_tube(&tube, Mode::Viscera, |_, _| Some((PANCREAS, hu.pancreas)));
}

fn pancreas_path(layout: &Layout) -> [(V3, f32); 6] {
    let p = layout.pancreas;
    let spleen_tip = add([-76.0, -16.0, 34.0], scale(add(p, layout.spleen), 0.5));
    [
        (add([32.0, 18.0, -14.0], p), 17.0),
        (add([28.0, 20.0, -2.0], p), 18.0),
        (add([8.0, 28.0, 4.0], p), 13.0),
        (add([-22.0, 25.0, 14.0], p), 13.0),
        (add([-55.0, 5.0, 26.0], p), 12.0),
        (spleen_tip, 9.0),
    ]
}

/// Adrenals: thin inverted-Y plates above and medial to the upper pole of each kidney.
fn adrenals(scene: &mut Scene, seed: u64, layout: &Layout, hu: &Hu) {
    let mut r = PhantomRng::stream(seed, 110);
    for (right, label, apex) in
        [(true, ADRENAL_R, [40.0, -28.0, 62.0]), (false, ADRENAL_L, [-38.0, -22.0, 58.0])]
    {
        let side = if right { 1.0 } else { -1.0 };
        // Above the upper pole: follows the kidney's height and size, not its lateral shift.
        let apex = [apex[0], apex[1], layout.in_kidney(right, apex)[2]];
        let apex = add(apex, r.jitter([3.0, 3.0, 4.0]));
        let s = r.size(0.12, 0.05);
        let plate = [side * 0.2, 1.0, 0.0];
        let limbs = [[-0.25 * side, -0.35, -1.0], [0.45 * side, -0.45, -1.0]].map(|d| {
            let d = normalize(r.tilt(d, 0.12));
            let len = 15.0 * s[2];
            Blob::new(add(apex, scale(d, len * 0.8)), [5.5 * s[0], 9.0 * s[1], len], d, cross(d, plate))
                .wobbled(Wobble::draw(&mut r, 0.06, 2.0))
        });
        let knot = Blob::new(apex, mul([6.0, 8.0, 7.0], s), [0.0, 0.0, 1.0], [side, 0.0, 0.0]);
        let (lo, hi) = union_bounds(union_bounds(limbs[0].bounds(), limbs[1].bounds()), knot.bounds());
        scene.paint(lo, hi, Mode::Viscera, |q, _| {
            let inside = limbs.iter().chain([&knot]).any(|b| norm2(b.local(q)) < 1.0);
            inside.then_some((label, hu.adrenal))
        });
    }
}

/// Superior mesenteric artery and vein and the celiac trunk (all unlabelled, but as bright as the
/// labelled vessels).
fn mesenteric_vessels(scene: &mut Scene, layout: &Layout, hu: &Hu) {
    let a = layout.aorta;
    let p = layout.pancreas;
    let sma = vec![
        (add([-12.0, 0.0, 22.0], a), 4.5),
        (add([-10.0, 14.0, 8.0], p), 4.0),
        (add([-7.0, 20.0, -20.0], p), 3.5),
        (add([-4.0, 24.0, -70.0], p), 3.0),
    ];
    let celiac = vec![(add([-12.0, 0.0, 38.0], a), 4.0), (add([-8.0, 16.0, 40.0], a), 3.5)];
    let smv = vec![
        (add([6.0, 15.0, 2.0], p), 5.5),
        (add([10.0, 22.0, -25.0], p), 5.0),
        (add([12.0, 28.0, -70.0], p), 4.0),
    ];
    for (ctrl, value) in [(sma, hu.aorta), (celiac, hu.aorta), (smv, hu.portal)] {
        let tube = Tube::new(&ctrl, [1.0; 3], Wobble::none());
        scene.paint_tube(&tube, Mode::Viscera, |_, _| Some((BACKGROUND, value)));
    }
}

/// Splenic vein behind the pancreas to the confluence, and the portal vein up into the liver
/// hilum with its first right and left branches.
fn portal_and_splenic_veins(scene: &mut Scene, layout: &Layout, hu: &Hu) {
    let p = layout.pancreas;
    let l = layout.liver;
    let confluence = add([6.0, 15.0, 2.0], p);
    let hilum = layout.in_liver([46.0, 6.0, 48.0]);
    let splenic = vec![
        (add([-78.0, -24.0, 34.0], scale(add(p, layout.spleen), 0.5)), 5.0),
        (add([-56.0, -6.0, 24.0], p), 5.0),
        (add([-22.0, 12.0, 11.0], p), 5.0),
        (confluence, 6.5),
    ];
    let portal = vec![
        (confluence, 7.0),
        (add([22.0, 12.0, 20.0], scale(add(p, l), 0.5)), 7.5),
        (layout.in_liver([36.0, 8.0, 38.0]), 7.5),
        (hilum, 7.0),
    ];
    let right = vec![
        (hilum, 6.0),
        (layout.in_liver([64.0, 0.0, 56.0]), 4.5),
        (layout.in_liver([84.0, -6.0, 58.0]), 3.0),
    ];
    let left = vec![
        (hilum, 5.0),
        (layout.in_liver([24.0, 24.0, 62.0]), 4.0),
        (layout.in_liver([4.0, 34.0, 68.0]), 2.5),
    ];
    for ctrl in [splenic, portal, right, left] {
        let tube = Tube::new(&ctrl, [1.0; 3], Wobble::none());
        scene.paint_tube(&tube, Mode::Viscera, |_, _| Some((PORTAL_SPLENIC, hu.portal)));
    }
}

/// IVC: flattened, to the right of the spine, through the back of the liver to the heart. Below
/// the renal veins unenhanced blood from the legs mixes in, so it is darker and streaky there.
fn inferior_vena_cava(scene: &mut Scene, layout: &Layout, hu: &Hu) {
    let v = layout.ivc;
    let ctrl = [
        ([22.0, -10.0, -130.0], 11.0),
        ([24.0, -11.0, -60.0], 11.0),
        ([25.0, -11.0, 0.0], 11.5),
        ([26.0, -6.0, 50.0], 12.0),
        ([20.0, 0.0, 95.0], 12.0),
        ([10.0, 6.0, 135.0], 12.0),
    ];
    let ctrl: Vec<(V3, f32)> = ctrl.iter().map(|&(p, rad)| (add(p, v), rad)).collect();
    let tube = Tube::new(&ctrl, [1.25, 0.8, 1.0], Wobble::none());
    let renal_z = v[2] - 8.0;
    scene.paint_tube(&tube, Mode::Viscera, |h, _| {
        let value = if h.q[2] < renal_z {
            hu.ivc - hu.infrarenal_drop + hu.infrarenal_streak * (h.q[0] * 0.4).sin()
        } else {
            hu.ivc
        };
        Some((IVC, value))
    });
}

/// Aorta: just anterior to and slightly left of the vertebral bodies, tapering downwards.
fn aorta(scene: &mut Scene, layout: &Layout, hu: &Hu) {
    let a = layout.aorta;
    let ctrl = [
        ([-15.0, -14.0, 135.0], 12.5),
        ([-14.0, -11.0, 70.0], 12.0),
        ([-13.0, -8.0, 10.0], 11.0),
        ([-12.0, -6.0, -50.0], 10.0),
        ([-11.0, -5.0, -130.0], 9.5),
    ];
    let ctrl: Vec<(V3, f32)> = ctrl.iter().map(|&(p, rad)| (add(p, a), rad)).collect();
    let tube = Tube::new(&ctrl, [1.0; 3], Wobble::none());
    scene.paint_tube(&tube, Mode::Viscera, |_, _| Some((AORTA, hu.aorta)));
}

/// Lesions: about a third of the seeds get 1-3 cysts or hypo- or hyperdense solid lesions,
/// 5-30 mm across, in the liver, spleen or kidneys. They only repaint voxels of their organ and keep
/// its label, as BTCV's annotations do.
fn lesions(scene: &mut Scene, seed: u64, layout: &Layout, hu: &Hu) -> Vec<Lesion> {
    let mut r = PhantomRng::stream(seed, 120);
    if r.unit() >= 0.35 {
        return Vec::new();
    }
    let count = 1 + usize::from(r.unit() < 0.5) + usize::from(r.unit() < 0.4);
    let mut found = Vec::new();
    for _ in 0..count {
        let u = r.unit();
        // Liver lesions are the commonest; kidney lesions are mostly cysts.
        let (organ, centre, reach, base, p_cyst, p_hypo) = if u < 0.55 {
            (
                LIVER,
                layout.in_liver(LIVER_CENTRE),
                mul([32.0, 32.0, 26.0], layout.liver_size),
                hu.liver,
                0.3,
                0.7,
            )
        } else if u < 0.7 {
            (SPLEEN, add([-80.0, -36.0, 58.0], layout.spleen), [5.0, 12.0, 18.0], hu.spleen, 0.4, 1.0)
        } else {
            let right = u < 0.85;
            let label = if right { KIDNEY_R } else { KIDNEY_L };
            let c = if right { KIDNEY_R_CENTRE } else { KIDNEY_L_CENTRE };
            (label, layout.in_kidney(right, c), [7.0, 7.0, 22.0], hu.kidney_cortex, 0.7, 0.85)
        };
        let v = r.unit();
        let kind = if v < p_cyst {
            LesionKind::Cyst
        } else if v < p_hypo {
            LesionKind::Hypodense
        } else {
            LesionKind::Hyperdense
        };
        // Hypovascular lesions enhance less than the organ around them; hypervascular ones most in
        // the arterial phase and close to the organ (or washed out) unenhanced.
        let value = match (kind, hu.phase) {
            (LesionKind::Cyst, _) => HU_CYST + r.sym(8.0),
            (LesionKind::Hypodense, Phase::NonContrast) => base - r.range(15.0, 25.0),
            (LesionKind::Hypodense, _) => base - r.range(30.0, 60.0),
            (LesionKind::Hyperdense, Phase::NonContrast) => base - r.range(0.0, 12.0),
            (LesionKind::Hyperdense, Phase::Arterial) => base + r.range(60.0, 120.0),
            (LesionKind::Hyperdense, Phase::PortalVenous) => base + r.range(20.0, 45.0),
        };
        let radius = r.range(2.5, 15.0);
        let blob = Blob::new(
            add(centre, r.jitter(reach)),
            [0.85, 1.0, 1.15].map(|f| radius * f * r.range(0.9, 1.1)),
            r.direction(),
            r.direction(),
        )
        .wobbled(Wobble::draw(&mut r, 0.08, 2.0));
        if let Some((voxels, centre)) = scene.paint_lesion(&blob, organ, value) {
            found.push(Lesion { organ, kind, radius_mm: radius, hu: value, voxels, centre });
        }
    }
    found
}

// ------------------------------------------------------------------------------------------------
// Scene: the voxel grid, its canonical coordinates and painting
// ------------------------------------------------------------------------------------------------

/// What a voxel belongs to before organs are painted: organs only replace `Cavity` voxels, so they
/// are clipped by the body wall and never overwrite bone or back muscles.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zone {
    Outside,
    Wall,
    Cavity,
}

/// Which voxels a structure may paint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only voxels in the abdominal and thoracic cavity.
    Viscera,
    /// Anything inside the body; the voxels become protected wall.
    Wall,
}

impl Mode {
    fn allows(self, zone: Zone) -> bool {
        match self {
            Mode::Viscera => zone == Zone::Cavity,
            Mode::Wall => zone != Zone::Outside,
        }
    }
}

/// Maps a voxel's physical position to the canonical anatomy frame: a smooth random displacement,
/// then a per-seed shift and per-axis scale (patient size).
struct Frame {
    scale: V3,
    shift: V3,
    warp: [Lattice; 3],
    warp_amp: f32,
}

impl Frame {
    fn draw(seed: u64, lo: V3, hi: V3) -> Self {
        let mut r = PhantomRng::stream(seed, 1);
        let size = r.range(0.95, 1.05);
        let scale = [size * (1.0 + r.sym(0.04)), size * (1.0 + r.sym(0.04)), size * (1.0 + r.sym(0.04))];
        let shift = r.jitter([8.0, 6.0, 10.0]);
        let warp = [4, 5, 6].map(|s| Lattice::new(seed, s, 55.0, lo, hi));
        // How far the smooth deformation bends the anatomy: 3-14 mm, mild to strong.
        let warp_amp = r.range(3.0, 14.0);
        Self { scale, shift, warp, warp_amp }
    }

    fn canonical(&self, p: V3) -> V3 {
        let mut q = [0.0; 3];
        for (c, w) in self.warp.iter().enumerate() {
            q[c] = (p[c] + self.warp_amp * w.sample(p) - self.shift[c]) / self.scale[c];
        }
        q
    }
}

struct Scene {
    shape: [usize; 3],
    spacing: V3,
    /// Physical position of the centre of voxel (0, 0, 0), mm.
    origin: V3,
    frame: Frame,
    /// Canonical coordinates of every voxel centre.
    canon: Vec<V3>,
    hu: Vec<f32>,
    labels: Vec<u8>,
    zone: Vec<Zone>,
    /// Tube painting scratch: best normalised distance and curve parameter per voxel, and the
    /// voxels touched so far.
    best_rel: Vec<f32>,
    best_t: Vec<f32>,
    touched: Vec<usize>,
}

impl Scene {
    fn new(seed: u64, cfg: &PhantomConfig) -> Self {
        let shape = cfg.shape;
        let spacing = cfg.spacing.map(|s| if s.is_finite() && s > 0.0 { s } else { 1.0 });
        let extent = [0, 1, 2].map(|c| shape[c] as f32 * spacing[c]);
        let origin = [0, 1, 2].map(|c| 0.5 * spacing[c] - 0.5 * extent[c]);
        let frame = Frame::draw(seed, scale(extent, -0.5), scale(extent, 0.5));
        let n = shape[0] * shape[1] * shape[2];
        let mut canon = Vec::with_capacity(n);
        for i in 0..shape[0] {
            for j in 0..shape[1] {
                for k in 0..shape[2] {
                    let p = [
                        origin[0] + i as f32 * spacing[0],
                        origin[1] + j as f32 * spacing[1],
                        origin[2] + k as f32 * spacing[2],
                    ];
                    canon.push(frame.canonical(p));
                }
            }
        }
        Self {
            shape,
            spacing,
            origin,
            frame,
            canon,
            hu: vec![HU_AIR; n],
            labels: vec![BACKGROUND; n],
            zone: vec![Zone::Outside; n],
            best_rel: vec![f32::INFINITY; n],
            best_t: vec![0.0; n],
            touched: Vec::new(),
        }
    }

    /// Smallest box holding every voxel's canonical coordinates.
    fn canon_bounds(&self) -> (V3, V3) {
        let mut lo = [f32::INFINITY; 3];
        let mut hi = [f32::NEG_INFINITY; 3];
        for q in &self.canon {
            for c in 0..3 {
                lo[c] = lo[c].min(q[c]);
                hi[c] = hi[c].max(q[c]);
            }
        }
        if lo[0] > hi[0] { ([0.0; 3], [0.0; 3]) } else { (lo, hi) }
    }

    /// Voxel index ranges that can hold canonical points inside `[lo, hi]`.
    fn voxel_ranges(&self, lo: V3, hi: V3) -> [Range<usize>; 3] {
        [0, 1, 2].map(|c| {
            let f = &self.frame;
            let p_lo = lo[c] * f.scale[c] + f.shift[c] - f.warp_amp;
            let p_hi = hi[c] * f.scale[c] + f.shift[c] + f.warp_amp;
            let a = ((p_lo - self.origin[c]) / self.spacing[c]).ceil().max(0.0) as usize;
            let b = (((p_hi - self.origin[c]) / self.spacing[c]).floor() + 1.0).max(0.0) as usize;
            a.min(self.shape[c])..b.min(self.shape[c])
        })
    }

    /// Calls `f(canonical point, current label)` for every allowed voxel in the box; `Some((label,
    /// hu))` repaints the voxel.
    fn paint(&mut self, lo: V3, hi: V3, mode: Mode, mut f: impl FnMut(V3, u8) -> Option<(u8, f32)>) {
        let [ri, rj, rk] = self.voxel_ranges(lo, hi);
        let [_, n1, n2] = self.shape;
        for i in ri {
            for j in rj.clone() {
                for k in rk.clone() {
                    let idx = (i * n1 + j) * n2 + k;
                    if !mode.allows(self.zone[idx]) {
                        continue;
                    }
                    if let Some((label, value)) = f(self.canon[idx], self.labels[idx]) {
                        self.labels[idx] = label;
                        self.hu[idx] = value;
                        if mode == Mode::Wall {
                            self.zone[idx] = Zone::Wall;
                        }
                    }
                }
            }
        }
    }

    /// Paints the voxels inside `tube`: the nearest point on the centreline decides, per voxel, the
    /// normalised distance and position along the tube passed to `shade`.
    fn paint_tube(
        &mut self,
        tube: &Tube,
        mode: Mode,
        mut shade: impl FnMut(&TubeHit, u8) -> Option<(u8, f32)>,
    ) {
        let wobble = tube.wobble.bound();
        let [_, n1, n2] = self.shape;
        for s in 0..tube.scaled.len().saturating_sub(1) {
            let (a, b) = (tube.scaled[s], tube.scaled[s + 1]);
            let (ra, rb) = (tube.radii[s], tube.radii[s + 1]);
            let reach = ra.max(rb);
            let lo = [0, 1, 2].map(|c| (a[c].min(b[c]) - reach) * tube.anis[c] - wobble);
            let hi = [0, 1, 2].map(|c| (a[c].max(b[c]) + reach) * tube.anis[c] + wobble);
            let ab = sub(b, a);
            let len2 = dot(ab, ab).max(1e-6);
            let [ri, rj, rk] = self.voxel_ranges(lo, hi);
            for i in ri {
                for j in rj.clone() {
                    for k in rk.clone() {
                        let idx = (i * n1 + j) * n2 + k;
                        if !mode.allows(self.zone[idx]) {
                            continue;
                        }
                        let q = self.canon[idx];
                        let qs = div(add(q, tube.wobble.at(q)), tube.anis);
                        let t = clamp01(dot(sub(qs, a), ab) / len2);
                        let rel = norm(sub(qs, add(a, scale(ab, t)))) / lerp(ra, rb, t);
                        if rel < 1.0 && rel < self.best_rel[idx] {
                            if self.best_rel[idx] == f32::INFINITY {
                                self.touched.push(idx);
                            }
                            self.best_rel[idx] = rel;
                            self.best_t[idx] = s as f32 + t;
                        }
                    }
                }
            }
        }
        let mut touched = std::mem::take(&mut self.touched);
        for &idx in &touched {
            let hit = TubeHit { q: self.canon[idx], rel: self.best_rel[idx], t: self.best_t[idx] };
            if let Some((label, value)) = shade(&hit, self.labels[idx]) {
                self.labels[idx] = label;
                self.hu[idx] = value;
                if mode == Mode::Wall {
                    self.zone[idx] = Zone::Wall;
                }
            }
            self.best_rel[idx] = f32::INFINITY;
        }
        touched.clear();
        self.touched = touched;
    }

    /// Repaints the voxels of `organ` inside `blob` with `value`, keeping the label. Returns how
    /// many it painted and the voxel nearest the blob's centre, or `None` if it painted none.
    fn paint_lesion(&mut self, blob: &Blob, organ: u8, value: f32) -> Option<(usize, [usize; 3])> {
        let (lo, hi) = blob.bounds();
        let [ri, rj, rk] = self.voxel_ranges(lo, hi);
        let [_, n1, n2] = self.shape;
        let mut painted = 0;
        let mut nearest = (f32::INFINITY, [0usize; 3]);
        for i in ri {
            for j in rj.clone() {
                for k in rk.clone() {
                    let idx = (i * n1 + j) * n2 + k;
                    if self.labels[idx] != organ {
                        continue;
                    }
                    let r2 = norm2(blob.local(self.canon[idx]));
                    if r2 < 1.0 {
                        self.hu[idx] = value;
                        painted += 1;
                        if r2 < nearest.0 {
                            nearest = (r2, [i, j, k]);
                        }
                    }
                }
            }
        }
        (painted > 0).then_some((painted, nearest.1))
    }

    /// Whether the voxel column (i, j) lies outside a centred circle of `radius` mm.
    fn outside_circle(&self, i: usize, j: usize, radius: f32) -> bool {
        let x = self.origin[0] + i as f32 * self.spacing[0];
        let y = self.origin[1] + j as f32 * self.spacing[1];
        x * x + y * y > radius * radius
    }

    /// The scanner reconstructs only inside a circle: nothing is drawn outside it.
    fn cut_circle(&mut self, radius: f32) {
        let [n0, n1, n2] = self.shape;
        for i in 0..n0 {
            for j in 0..n1 {
                if self.outside_circle(i, j, radius) {
                    let row = (i * n1 + j) * n2;
                    self.zone[row..row + n2].fill(Zone::Outside);
                    self.hu[row..row + n2].fill(HU_AIR);
                }
            }
        }
    }

    /// Texture, partial-volume and slice-profile blur, white noise and the reconstruction circle;
    /// hands the volume over.
    fn finish(mut self, seed: u64, patient: &Patient, lesions: Vec<Lesion>) -> Phantom {
        let (lo, hi) = self.canon_bounds();
        let texture = Lattice::new(seed, 7, 5.0, lo, hi);
        for ((v, &label), &q) in self.hu.iter_mut().zip(&self.labels).zip(&self.canon) {
            if *v > HU_GAS + 50.0 {
                *v += TEXTURE_HU[usize::from(label)] * texture.sample(q);
            }
        }
        let kernel = gaussian_kernel(PARTIAL_VOLUME_SIGMA);
        for axis in 0..2 {
            blur_axis(&mut self.hu, self.shape, axis, &kernel);
        }
        // Thick slices: the slice sensitivity profile (a Gaussian of the drawn FWHM) on top of the
        // in-plane blur, still sampled on the same grid.
        let slice_sigma = patient.slice_fwhm_mm / (8.0 * std::f32::consts::LN_2).sqrt() / self.spacing[2];
        let kernel = gaussian_kernel(PARTIAL_VOLUME_SIGMA.hypot(slice_sigma));
        blur_axis(&mut self.hu, self.shape, 2, &kernel);
        let mut r = PhantomRng::stream(seed, 8);
        for v in &mut self.hu {
            *v += patient.noise_sigma * r.normal();
        }
        // Outside the reconstruction circle the scanner writes a constant, noiseless value.
        if let Some(radius) = patient.recon_radius {
            let [n0, n1, n2] = self.shape;
            for i in 0..n0 {
                for j in 0..n1 {
                    if self.outside_circle(i, j, radius) {
                        let row = (i * n1 + j) * n2;
                        self.hu[row..row + n2].fill(HU_AIR);
                    }
                }
            }
        }
        Phantom {
            hu: self.hu,
            labels: self.labels,
            shape: self.shape,
            spacing: self.spacing,
            phase: patient.phase,
            lesions,
        }
    }
}

fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil() as i32;
    let w: Vec<f32> = (-radius..=radius).map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = w.iter().sum();
    w.into_iter().map(|x| x / total).collect()
}

/// Convolves every line along `axis` with `kernel` (odd length), clamping at the edges.
fn blur_axis(data: &mut [f32], shape: [usize; 3], axis: usize, kernel: &[f32]) {
    let n = shape[axis];
    if n < 2 {
        return;
    }
    let strides = [shape[1] * shape[2], shape[2], 1];
    let stride = strides[axis];
    let radius = kernel.len() / 2;
    let mut line = vec![0.0f32; n];
    let (oa, ob) = match axis {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    for a in 0..shape[oa] {
        for b in 0..shape[ob] {
            let start = a * strides[oa] + b * strides[ob];
            for (m, v) in line.iter_mut().enumerate() {
                *v = data[start + m * stride];
            }
            for m in 0..n {
                let mut acc = 0.0;
                for (d, w) in kernel.iter().enumerate() {
                    let src = (m + d).saturating_sub(radius).min(n - 1);
                    acc += w * line[src];
                }
                data[start + m * stride] = acc;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Shapes
// ------------------------------------------------------------------------------------------------

/// Smooth random displacement: a sum of three sinusoids with random directions and phases.
#[derive(Clone, Copy)]
struct Wobble {
    freq: [V3; 3],
    phase: [f32; 3],
    amp: [V3; 3],
}

impl Wobble {
    fn none() -> Self {
        Self { freq: [[0.0; 3]; 3], phase: [0.0; 3], amp: [[0.0; 3]; 3] }
    }

    /// `amp` is the largest displacement of one term, `freq` its angular frequency.
    fn draw(r: &mut PhantomRng, amp: f32, freq: f32) -> Self {
        let mut w = Self::none();
        for m in 0..3 {
            w.freq[m] = scale(r.direction(), freq * r.range(0.7, 1.3));
            w.phase[m] = r.range(0.0, TAU);
            w.amp[m] = scale(r.direction(), amp * r.range(0.5, 1.0));
        }
        w
    }

    fn at(&self, u: V3) -> V3 {
        let mut d = [0.0; 3];
        for m in 0..3 {
            d = add(d, scale(self.amp[m], (dot(self.freq[m], u) + self.phase[m]).sin()));
        }
        d
    }

    fn bound(&self) -> f32 {
        self.amp.iter().map(|&a| norm(a)).sum()
    }
}

/// A deformed, optionally bent ellipsoid in its own rotated frame.
struct Blob {
    centre: V3,
    axes: V3,
    /// Local x, y, z unit vectors in canonical coordinates.
    basis: [V3; 3],
    wobble: Wobble,
    /// Shifts local x by `bend[0] * y^2 + bend[1] * z^2`: crescents and beans.
    bend: [f32; 2],
}

impl Blob {
    /// Local z along `up`; local x along `x_hint` made orthogonal to `up`.
    fn new(centre: V3, axes: V3, up: V3, x_hint: V3) -> Self {
        let ez = normalize(up);
        let ex = normalize(sub(x_hint, scale(ez, dot(x_hint, ez))));
        let ey = cross(ez, ex);
        Self { centre, axes, basis: [ex, ey, ez], wobble: Wobble::none(), bend: [0.0; 2] }
    }

    fn wobbled(self, wobble: Wobble) -> Self {
        Self { wobble, ..self }
    }

    fn bent(self, bend: [f32; 2]) -> Self {
        Self { bend, ..self }
    }

    /// Normalised local coordinates: inside where the squared norm is below 1.
    fn local(&self, q: V3) -> V3 {
        let d = sub(q, self.centre);
        let u = [0, 1, 2].map(|l| dot(self.basis[l], d) / self.axes[l]);
        let mut u = add(u, self.wobble.at(u));
        u[0] += self.bend[0] * u[1] * u[1] + self.bend[1] * u[2] * u[2];
        u
    }

    fn bounds(&self) -> (V3, V3) {
        let margin = 1.0 + self.wobble.bound() + self.bend[0].abs() + self.bend[1].abs();
        let e = [0, 1, 2].map(|c| {
            let s: f32 = (0..3).map(|l| (self.basis[l][c] * self.axes[l]).powi(2)).sum();
            s.sqrt() * margin
        });
        (sub(self.centre, e), add(self.centre, e))
    }
}

fn union_bounds(a: (V3, V3), b: (V3, V3)) -> (V3, V3) {
    ([0, 1, 2].map(|c| a.0[c].min(b.0[c])), [0, 1, 2].map(|c| a.1[c].max(b.1[c])))
}

/// A tube around a Catmull-Rom curve with a radius varying along it; `anis` stretches the
/// cross-section (e.g. the flat IVC).
struct Tube {
    pts: Vec<V3>,
    /// `pts` divided by `anis`: distances are measured in this space.
    scaled: Vec<V3>,
    radii: Vec<f32>,
    anis: V3,
    wobble: Wobble,
}

/// A voxel inside a tube: canonical position, distance / radius, and position along the curve.
struct TubeHit {
    q: V3,
    rel: f32,
    t: f32,
}

impl Tube {
    /// Control points with radii (mm); the curve passes through every control point.
    fn new(ctrl: &[(V3, f32)], anis: V3, wobble: Wobble) -> Self {
        let mut pts = Vec::new();
        let mut radii = Vec::new();
        let n = ctrl.len();
        for s in 0..n.saturating_sub(1) {
            let p0 = ctrl[s.saturating_sub(1)].0;
            let (p1, r1) = ctrl[s];
            let (p2, r2) = ctrl[s + 1];
            let p3 = ctrl[(s + 2).min(n - 1)].0;
            let steps = (norm(sub(p2, p1)) / 6.0).ceil().max(1.0) as usize;
            for m in 0..steps {
                let t = m as f32 / steps as f32;
                pts.push(catmull_rom(p0, p1, p2, p3, t));
                radii.push(lerp(r1, r2, t));
            }
        }
        if let Some(&(p, r)) = ctrl.last() {
            pts.push(p);
            radii.push(r);
        }
        let scaled = pts.iter().map(|&p| div(p, anis)).collect();
        Self { pts, scaled, radii, anis, wobble }
    }

    fn segment(&self, t: f32) -> (usize, f32) {
        let last = self.pts.len().saturating_sub(2);
        let s = (t.max(0.0) as usize).min(last);
        (s, clamp01(t - s as f32))
    }

    fn point_at(&self, t: f32) -> V3 {
        let (s, f) = self.segment(t);
        match (self.pts.get(s), self.pts.get(s + 1)) {
            (Some(&a), Some(&b)) => add(a, scale(sub(b, a), f)),
            (Some(&a), None) => a,
            _ => [0.0; 3],
        }
    }

    fn radius_at(&self, t: f32) -> f32 {
        let (s, f) = self.segment(t);
        match (self.radii.get(s), self.radii.get(s + 1)) {
            (Some(&a), Some(&b)) => lerp(a, b, f),
            (Some(&a), None) => a,
            _ => 1.0,
        }
    }
}

fn catmull_rom(p0: V3, p1: V3, p2: V3, p3: V3, t: f32) -> V3 {
    let t2 = t * t;
    let t3 = t2 * t;
    [0, 1, 2].map(|c| {
        0.5 * (2.0 * p1[c]
            + (p2[c] - p0[c]) * t
            + (2.0 * p0[c] - 5.0 * p1[c] + 4.0 * p2[c] - p3[c]) * t2
            + (3.0 * p1[c] - p0[c] - 3.0 * p2[c] + p3[c]) * t3)
    })
}

// ------------------------------------------------------------------------------------------------
// Random numbers and value noise
// ------------------------------------------------------------------------------------------------

/// The phantom's shape draws: glmae-core's `SplitMix64`, one stream per structure so adding
/// draws to one structure does not change the others. (The augmentations' generator is
/// `transforms::Rng`.)
struct PhantomRng {
    bits: SplitMix64,
    spare: Option<f32>,
}

impl PhantomRng {
    fn stream(seed: u64, tag: u64) -> Self {
        Self { bits: SplitMix64::new(mix64(seed ^ mix64(tag.wrapping_add(0x5EED_0000)))), spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.bits.next_u64()
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    fn sym(&mut self, a: f32) -> f32 {
        self.range(-a, a)
    }

    fn jitter(&mut self, a: V3) -> V3 {
        [self.sym(a[0]), self.sym(a[1]), self.sym(a[2])]
    }

    /// Uniform on the unit sphere.
    fn direction(&mut self) -> V3 {
        let z = self.range(-1.0, 1.0);
        let phi = self.range(0.0, TAU);
        let s = (1.0 - z * z).max(0.0).sqrt();
        [s * phi.cos(), s * phi.sin(), z]
    }

    /// `v` normalised and tilted by up to about `amount` radians.
    fn tilt(&mut self, v: V3, amount: f32) -> V3 {
        add(normalize(v), self.jitter([amount; 3]))
    }

    /// Per-axis size factors: a common factor within `+-iso` times independent `+-axis` factors.
    fn size(&mut self, iso: f32, axis: f32) -> V3 {
        let s = 1.0 + self.sym(iso);
        [s * (1.0 + self.sym(axis)), s * (1.0 + self.sym(axis)), s * (1.0 + self.sym(axis))]
    }

    /// Per-axis size factors for a volume factor uniform in `[lo, hi)`, each axis then jittered
    /// by `+-axis`.
    fn volume_size(&mut self, lo: f32, hi: f32, axis: f32) -> V3 {
        let s = self.range(lo, hi).cbrt();
        [s * (1.0 + self.sym(axis)), s * (1.0 + self.sym(axis)), s * (1.0 + self.sym(axis))]
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let u1 = ((self.next_u64() >> 40) + 1) as f32 / (1u64 << 24) as f32;
        let u2 = self.unit();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (TAU * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

/// Smooth value noise in `[-1, 1]`: random values on a lattice with spacing `step` mm, blended
/// with smoothstep weights. Lattice values are hashed from the global node index, so the field is
/// the same whatever part of space a volume covers.
struct Lattice {
    step: f32,
    lo: [i64; 3],
    dims: [usize; 3],
    vals: Vec<f32>,
}

impl Lattice {
    fn new(seed: u64, stream: u64, step: f32, lo: V3, hi: V3) -> Self {
        let first = lo.map(|v| (v / step).floor() as i64 - 1);
        let last = hi.map(|v| (v / step).floor() as i64 + 2);
        let dims = [0, 1, 2].map(|c| (last[c] - first[c] + 1).max(2) as usize);
        let key = mix64(seed ^ mix64(stream.wrapping_mul(0xA24B_AED4_963E_E407)));
        let mut vals = Vec::with_capacity(dims[0] * dims[1] * dims[2]);
        for a in 0..dims[0] {
            for b in 0..dims[1] {
                for c in 0..dims[2] {
                    let node = [first[0] + a as i64, first[1] + b as i64, first[2] + c as i64];
                    let h = mix64(
                        key ^ mix64(
                            (node[0] as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                                ^ (node[1] as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
                                ^ (node[2] as u64).wrapping_mul(0x1656_67B1_9E37_79F9),
                        ),
                    );
                    vals.push((h >> 40) as f32 / (1u64 << 23) as f32 - 1.0);
                }
            }
        }
        Self { step, lo: first, dims, vals }
    }

    fn sample(&self, p: V3) -> f32 {
        let mut base = [0usize; 3];
        let mut w = [0.0f32; 3];
        for c in 0..3 {
            let f = p[c] / self.step - self.lo[c] as f32;
            let i = (f.floor().max(0.0) as usize).min(self.dims[c] - 2);
            let t = clamp01(f - i as f32);
            base[c] = i;
            w[c] = t * t * (3.0 - 2.0 * t);
        }
        let [_, d1, d2] = self.dims;
        let at =
            |a: usize, b: usize, c: usize| self.vals[((base[0] + a) * d1 + base[1] + b) * d2 + base[2] + c];
        let plane = |a: usize| {
            let y0 = lerp(at(a, 0, 0), at(a, 0, 1), w[2]);
            let y1 = lerp(at(a, 1, 0), at(a, 1, 1), w[2]);
            lerp(y0, y1, w[1])
        };
        lerp(plane(0), plane(1), w[0])
    }
}

// ------------------------------------------------------------------------------------------------
// Small vector helpers
// ------------------------------------------------------------------------------------------------

type V3 = [f32; 3];

fn add(a: V3, b: V3) -> V3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn scale(a: V3, s: f32) -> V3 {
    [a[0] * s, a[1] * s, a[2] * s]
}

fn mul(a: V3, b: V3) -> V3 {
    [a[0] * b[0], a[1] * b[1], a[2] * b[2]]
}

fn div(a: V3, b: V3) -> V3 {
    [a[0] / b[0], a[1] / b[1], a[2] / b[2]]
}

fn dot(a: V3, b: V3) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: V3, b: V3) -> V3 {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn norm2(a: V3) -> f32 {
    dot(a, a)
}

fn norm(a: V3) -> f32 {
    dot(a, a).sqrt()
}

fn normalize(a: V3) -> V3 {
    let n = norm(a);
    if n > 1e-12 { scale(a, 1.0 / n) } else { [0.0, 0.0, 1.0] }
}

fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}

fn clamp01(x: f32) -> f32 {
    x.clamp(0.0, 1.0)
}
