//! DICOM SEG out: a label map on a DICOM series' grid written as a binary Segmentation Storage
//! object (one segment per class, SNOMED CT anatomy codes, every frame tied to its source slice),
//! the form PACS viewers, 3D Slicer, OHIF and highdicom read.
//!
//! The object follows the Segmentation IOD as highdicom 0.28 writes it: explicit VR little
//! endian, `BINARY` segmentation with 1-bit pixels packed bit-contiguously across frames, one
//! frame per (segment, source slice) that holds voxels of that segment, a dimension index of
//! (ReferencedSegmentNumber, ImagePositionPatient), and the study, patient and frame of reference
//! of the source series.
//!
//! Decisions:
//! - One segment per class `1..K` of `class_names`, present in the labels or not, so that segment
//!   number `c` is class `c` in every file (as in the NIfTI label map); a class with no voxel has
//!   a segment and no frames, which the standard and highdicom allow.
//! - Frames that would be empty are omitted. When no voxel is labelled at all, the object holds
//!   one empty frame (segment 1 on the first slice), as highdicom does: a SEG needs one frame.
//! - New Series, SOP Instance and Dimension Organization UIDs are `2.25.` UUID-derived UIDs from
//!   std's randomly keyed hasher over the time, process id, a counter and the source series UID.
//! - Text goes in the source's character set when it holds every value, else in UTF-8.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use dicom_core::value::{C, DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{InMemDicomObject, OpenFileOptions};

use crate::dicom::{DicomVolume, SeriesInfo, SliceHeader};
use crate::volume::Affine;
use crate::volume::Labels;

/// A coded concept: (CodeValue, CodingSchemeDesignator, CodeMeaning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Code {
    /// `CodeValue`, e.g. `78961009`.
    pub value: &'static str,
    /// `CodingSchemeDesignator`, e.g. `SCT` (SNOMED CT) or `DCM`.
    pub scheme: &'static str,
    /// `CodeMeaning`, e.g. `Spleen`.
    pub meaning: &'static str,
}

const fn sct(value: &'static str, meaning: &'static str) -> Code {
    Code { value, scheme: "SCT", meaning }
}

/// CID 7150 "Anatomical Structure" (SNOMED CT 91723000; DICOM's older 123037004 was replaced by
/// it, and pydicom and highdicom use it).
pub const ANATOMICAL_STRUCTURE: Code = sct("91723000", "Anatomical Structure");
/// SNOMED CT "Tissue": category and type of a class whose name has no code here.
pub const TISSUE: Code = sct("85756007", "Tissue");
const RIGHT: Code = sct("24028007", "Right");
const LEFT: Code = sct("7771000", "Left");
const KIDNEY: Code = sct("64033007", "Kidney");
const ADRENAL_GLAND: Code = sct("23451007", "Adrenal gland");
const PORTAL_VEIN: Code = sct("32764006", "Portal vein");

/// What a segment is: `SegmentedPropertyCategoryCodeSequence`, `SegmentedPropertyTypeCodeSequence`
/// and its laterality in `SegmentedPropertyTypeModifierCodeSequence`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentProperty {
    /// The category (CID 7150).
    pub category: Code,
    /// The structure (CID 7151 for anatomy).
    pub property_type: Code,
    /// Right or left, for paired organs (CID 244).
    pub modifier: Option<Code>,
}

/// Class names (normalised: lower case, `_`/`-` as spaces) and their SNOMED CT codes: the 13
/// BTCV organs of `glmae_core::preprocessing::BTCV_CLASSES` and common spellings of them.
const ANATOMY: &[(&[&str], Code, Option<Code>)] = &[
    (&["spleen"], sct("78961009", "Spleen"), None),
    (&["right kidney", "kidney right"], KIDNEY, Some(RIGHT)),
    (&["left kidney", "kidney left"], KIDNEY, Some(LEFT)),
    (&["kidney", "kidneys"], KIDNEY, None),
    (&["gallbladder", "gall bladder"], sct("28231008", "Gallbladder"), None),
    (&["esophagus", "oesophagus"], sct("32849002", "Esophagus"), None),
    (&["liver"], sct("10200004", "Liver"), None),
    (&["stomach"], sct("69695003", "Stomach"), None),
    (&["aorta"], sct("15825003", "Aorta"), None),
    (&["inferior vena cava", "ivc", "postcava"], sct("64131007", "Inferior vena cava"), None),
    // BTCV's class joins two veins; SNOMED CT has no code for the pair, the portal vein stands
    // for it (the label keeps the full name).
    (
        &[
            "portal and splenic veins",
            "portal vein and splenic vein",
            "portal vein and splenic veins",
            "portal vein",
        ],
        PORTAL_VEIN,
        None,
    ),
    (&["splenic vein"], sct("35819009", "Splenic vein"), None),
    (&["pancreas"], sct("15776009", "Pancreas"), None),
    (&["right adrenal gland", "adrenal gland right", "right adrenal"], ADRENAL_GLAND, Some(RIGHT)),
    (&["left adrenal gland", "adrenal gland left", "left adrenal"], ADRENAL_GLAND, Some(LEFT)),
    (&["adrenal gland", "adrenal glands"], ADRENAL_GLAND, None),
];

/// The coded property of a class name: its SNOMED CT anatomy code when the name is one of the
/// organs above (case, `_` and `-` ignored), else [`TISSUE`] as category and type.
pub fn segment_property(class_name: &str) -> SegmentProperty {
    let key =
        class_name.to_lowercase().replace(['_', '-'], " ").split_whitespace().collect::<Vec<_>>().join(" ");
    match ANATOMY.iter().find(|(names, _, _)| names.contains(&key.as_str())) {
        Some(&(_, property_type, modifier)) => {
            SegmentProperty { category: ANATOMICAL_STRUCTURE, property_type, modifier }
        }
        None => SegmentProperty { category: TISSUE, property_type: TISSUE, modifier: None },
    }
}

/// Descriptive attributes of the SEG object; [`Default`] describes glmae's UNETR.
#[derive(Clone, Debug)]
pub struct SegOptions {
    /// `SeriesDescription` of the new series.
    pub series_description: String,
    /// `SeriesNumber`; `None`: the source's number plus 1000 (1000 without one).
    pub series_number: Option<i32>,
    /// `InstanceNumber`.
    pub instance_number: i32,
    /// `ContentLabel` (a code string: upper case letters, digits, `_` and space are kept, at most
    /// 16 characters).
    pub content_label: String,
    /// `ContentDescription`.
    pub content_description: String,
    /// `ContentCreatorName` (a person name; may be empty).
    pub content_creator_name: String,
    /// `Manufacturer`.
    pub manufacturer: String,
    /// `ManufacturerModelName`.
    pub manufacturer_model_name: String,
    /// `SoftwareVersions`.
    pub software_versions: String,
    /// `DeviceSerialNumber` (type 1 in the Enhanced General Equipment module).
    pub device_serial_number: String,
    /// `SegmentAlgorithmName` and `AlgorithmName`.
    pub algorithm_name: String,
    /// `AlgorithmVersion`.
    pub algorithm_version: String,
}

impl Default for SegOptions {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION").to_string();
        Self {
            series_description: "glmae UNETR segmentation".into(),
            series_number: None,
            instance_number: 1,
            content_label: "SEGMENTATION".into(),
            content_description: "Automatic segmentation by glmae UNETR".into(),
            content_creator_name: String::new(),
            manufacturer: "glmae".into(),
            manufacturer_model_name: "glmae UNETR".into(),
            software_versions: version.clone(),
            device_serial_number: "0".into(),
            algorithm_name: "glmae UNETR".into(),
            algorithm_version: version,
        }
    }
}

/// What a SEG is made for: the source series, its slices in volume order, and their grid.
/// [`DicomVolume`] gives one (`SegSource::from(&volume)`); a caller that has handed the volume's
/// voxels on (to the preprocessing) keeps the series, the slices and the grid.
#[derive(Clone, Copy, Debug)]
pub struct SegSource<'a> {
    /// The series.
    pub series: &'a SeriesInfo,
    /// Its slices; volume index `k` is `slices[k]`.
    pub slices: &'a [SliceHeader],
    /// Voxels per axis, `(columns, rows, slices)`.
    pub shape: [usize; 3],
    /// The RAS affine of the series' grid.
    pub affine: Affine,
}

impl<'a> From<&'a DicomVolume> for SegSource<'a> {
    fn from(v: &'a DicomVolume) -> Self {
        Self { series: &v.series, slices: &v.slices, shape: v.volume.shape, affine: v.volume.affine }
    }
}

/// Writes `labels` (on `source`'s grid: voxel `(i, j, k)` is pixel (row `j`, column `i`) of
/// slice `source.slices[k]`) as a binary DICOM SEG at `path`, atomically. `class_names[c]` names
/// label value `c`; `class_names[0]` is the background and gets no segment.
///
/// Errors (naming `path`): a label grid other than the source's, a label value without a class
/// name, fewer than two class names, a source without the UIDs a SEG must reference, an output
/// that cannot be written. After an error the file at `path` (if any) is as it was and no
/// temporary file remains.
pub fn write_seg(
    path: &Path,
    source: &SegSource<'_>,
    labels: &Labels,
    class_names: &[String],
    opts: &SegOptions,
) -> Result<()> {
    let bytes = encode_seg(source, labels, class_names, opts)
        .with_context(|| format!("cannot write DICOM SEG {}", path.display()))?;
    crate::io::atomic_write(path, &bytes)
}

/// The SEG object as the bytes of a DICOM file (preamble, file meta group, data set).
pub fn encode_seg(
    source: &SegSource<'_>,
    labels: &Labels,
    class_names: &[String],
    opts: &SegOptions,
) -> Result<Vec<u8>> {
    let geometry = check_inputs(source, labels, class_names)?;
    let frames = frames_of(labels, class_names.len());
    let (mut obj, sop_uid, source_charset) = build(source, labels, class_names, opts, &geometry, &frames)?;
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .media_storage_sop_class_uid(uids::SEGMENTATION_STORAGE)
        .media_storage_sop_instance_uid(sop_uid)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot make the file meta group: {e}"))?;
    // Text is written in the source's character set, which archives that read the source read,
    // unless some text (a class name, an option) is outside it: then in UTF-8. dicom-rs encodes
    // strictly, so such text is an encoding error rather than mangled bytes.
    if let Some(charset) = source_charset {
        put_str(&mut obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, &charset);
        let file = obj.with_exact_meta(meta.clone());
        let mut bytes = Vec::new();
        if file.write_all(&mut bytes).is_ok() {
            return Ok(bytes);
        }
        obj = file.into_inner();
    }
    put_str(&mut obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
    let mut bytes = Vec::new();
    obj.with_exact_meta(meta)
        .write_all(&mut bytes)
        .map_err(|e| anyhow::anyhow!("cannot encode the SEG object: {e}"))?;
    Ok(bytes)
}

/// The source geometry every frame shares.
struct Geometry {
    orientation: [f64; 6],
    pixel_spacing: [f64; 2],
    slice_step: f64,
}

fn check_inputs(source: &SegSource<'_>, labels: &Labels, class_names: &[String]) -> Result<Geometry> {
    let shape = source.shape;
    ensure!(
        labels.shape == shape && labels.channels == 1,
        "the labels are {}x{}x{} voxels ({} channels), the source series {} is {}x{}x{}",
        labels.shape[0],
        labels.shape[1],
        labels.shape[2],
        labels.channels,
        source.series.series_uid,
        shape[0],
        shape[1],
        shape[2]
    );
    ensure!(
        labels.data.len() == labels.voxels(),
        "the labels hold {} values for {} voxels",
        labels.data.len(),
        labels.voxels()
    );
    let (a, b) = (&labels.affine.0, &source.affine.0);
    let off = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max);
    // NaN fails this comparison too.
    ensure!(
        off <= 1e-4,
        "the labels' affine {:?} is not the source series' {:?}: the labels are on another grid",
        labels.affine.0,
        source.affine.0
    );
    ensure!(
        source.slices.len() == shape[2],
        "the source has {} slices for a volume of {} slices",
        source.slices.len(),
        shape[2]
    );
    ensure!(
        class_names.len() >= 2,
        "{} class names: need the background and at least one class",
        class_names.len()
    );
    ensure!(
        class_names.len() <= usize::from(u16::MAX),
        "{} classes do not fit DICOM's 16-bit segment numbers",
        class_names.len()
    );
    if let Some(&max) = labels.data.iter().max() {
        ensure!(
            usize::from(max) < class_names.len(),
            "label value {max} has no class name ({} names: 0..{})",
            class_names.len(),
            class_names.len() - 1
        );
    }
    ensure!(!source.series.study_uid.is_empty(), "the source series has no StudyInstanceUID");
    ensure!(
        !source.series.frame_of_reference_uid.is_empty(),
        "the source series has no FrameOfReferenceUID, which a SEG on its grid must share"
    );
    for s in source.slices {
        ensure!(
            s.rows == shape[1] && s.columns == shape[0],
            "{}: {}x{} pixels in a {}x{} (rows x columns) volume",
            s.path.display(),
            s.rows,
            s.columns,
            shape[1],
            shape[0]
        );
        ensure!(
            !s.sop_instance_uid.is_empty() && !s.sop_class_uid.is_empty(),
            "{}: no SOPInstanceUID or SOPClassUID to reference",
            s.path.display()
        );
        ensure!(s.position.is_some(), "{}: no ImagePositionPatient", s.path.display());
    }
    let first = source.slices.first().context("the source has no slices")?;
    let orientation =
        first.orientation.with_context(|| format!("{}: no ImageOrientationPatient", first.path.display()))?;
    let pixel_spacing =
        first.pixel_spacing.with_context(|| format!("{}: no PixelSpacing", first.path.display()))?;
    Ok(Geometry { orientation, pixel_spacing, slice_step: source.affine.spacing()[2] })
}

/// One frame: the segment (= class value) and the source slice `k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    segment: u8,
    slice: usize,
}

/// The frames to write, segment-major then slice (highdicom's order): every (class, slice) pair
/// with a voxel of that class, or one empty frame when nothing is labelled.
fn frames_of(labels: &Labels, classes: usize) -> Vec<Frame> {
    let n = labels.shape[2];
    let mut present = vec![false; classes * n];
    // k runs fastest in memory: one pass, no strided reads.
    for (v, &c) in labels.data.iter().enumerate() {
        if c != 0
            && let Some(p) = present.get_mut(usize::from(c) * n + v % n)
        {
            *p = true;
        }
    }
    // Label values are u8: classes past 255 have no voxels.
    let mut frames: Vec<Frame> = (1..classes.min(256))
        .flat_map(|c| (0..n).map(move |k| (c, k)))
        .filter(|&(c, k)| present[c * n + k])
        .map(|(c, k)| Frame { segment: c as u8, slice: k })
        .collect();
    if frames.is_empty() {
        frames.push(Frame { segment: 1, slice: 0 });
    }
    frames
}

/// The frames' 1-bit pixels, concatenated without padding between frames: pixel `p` of the
/// stream (frame-major, then row, then column) is bit `p % 8` (least significant first) of byte
/// `p / 8`, as PS3.5 8.1.1 packs them; padded to an even length.
fn pack_frames(labels: &Labels, frames: &[Frame]) -> Vec<u8> {
    let [columns, rows, n] = labels.shape;
    let per_frame = rows * columns;
    let mut frame_of = vec![usize::MAX; 256 * n];
    for (f, fr) in frames.iter().enumerate() {
        frame_of[usize::from(fr.segment) * n + fr.slice] = f;
    }
    let bits = frames.len() * per_frame;
    let mut bytes = vec![0u8; bits.div_ceil(8) + bits.div_ceil(8) % 2];
    for i in 0..columns {
        for j in 0..rows {
            let base = labels.index(i, j, 0);
            for (k, &c) in labels.data[base..base + n].iter().enumerate() {
                let f = frame_of[usize::from(c) * n + k];
                if c != 0 && f != usize::MAX {
                    let p = f * per_frame + j * columns + i;
                    bytes[p / 8] |= 1 << (p % 8);
                }
            }
        }
    }
    bytes
}

fn elem(tag: Tag, vr: VR, value: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, value.into())
}

fn put_str(obj: &mut InMemDicomObject, tag: Tag, vr: VR, value: &str) {
    obj.put(elem(tag, vr, value));
}

fn put_seq(obj: &mut InMemDicomObject, tag: Tag, items: Vec<InMemDicomObject>) {
    obj.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

fn put_u16(obj: &mut InMemDicomObject, tag: Tag, value: u16) {
    obj.put(elem(tag, VR::US, value));
}

fn code_item(code: Code) -> InMemDicomObject {
    let mut item = InMemDicomObject::new_empty();
    put_str(&mut item, tags::CODE_VALUE, VR::SH, code.value);
    put_str(&mut item, tags::CODING_SCHEME_DESIGNATOR, VR::SH, code.scheme);
    put_str(&mut item, tags::CODE_MEANING, VR::LO, code.meaning);
    item
}

/// A decimal string of at most 16 characters (DS), as precise as fits.
fn ds(v: f64) -> String {
    for precision in (0..=15).rev() {
        let s = format!("{v:.precision$}");
        let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { &s };
        let s = if s == "-0" { "0" } else { s };
        if s.len() <= 16 {
            return s.to_string();
        }
    }
    format!("{v:.6e}")
}

fn put_ds(obj: &mut InMemDicomObject, tag: Tag, values: &[f64]) {
    let strs: C<String> = values.iter().map(|&v| ds(v)).collect();
    obj.put(DataElement::new(tag, VR::DS, PrimitiveValue::Strs(strs)));
}

/// A long string (LO): at most 64 characters, no backslash (the value separator) or control
/// characters.
fn lo(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\\' || c.is_control() { ' ' } else { c })
        .take(64)
        .collect::<String>()
        .trim()
        .to_string()
}

/// A code string (CS): upper case letters, digits, `_` and space, at most 16 characters.
fn cs(s: &str, fallback: &str) -> String {
    let s: String = s
        .to_uppercase()
        .chars()
        .map(|c| if c.is_ascii_uppercase() || c.is_ascii_digit() || c == ' ' { c } else { '_' })
        .take(16)
        .collect();
    let s = s.trim().to_string();
    if s.is_empty() { fallback.to_string() } else { s }
}

/// A new `2.25.` UID: a version 4 UUID (ISO/IEC 9834-8) from std's randomly keyed SipHash over
/// the time, process id, a per-process counter and `salt` (the source series UID).
fn new_uid(salt: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut halves = [0u64; 2];
    for (h, half) in halves.iter_mut().enumerate() {
        *half = RandomState::new().hash_one((h, count, nanos, std::process::id(), salt));
    }
    let mut v = (u128::from(halves[0]) << 64) | u128::from(halves[1]);
    v = (v & !(0xF << 76)) | (0x4 << 76); // version 4
    v = (v & !(0x3 << 62)) | (0x2 << 62); // variant 10
    format!("2.25.{v}")
}

/// UTC date `YYYYMMDD` and time `HHMMSS` now (std has no time zone; the object says +0000).
fn utc_now() -> (String, String) {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let rem = secs % 86_400;
    (civil_date((secs / 86_400) as i64), format!("{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60))
}

/// Days since 1970-01-01 as a `YYYYMMDD` date.
fn civil_date(days: i64) -> String {
    let (year, month, day) = crate::dicom::civil_from_days(days);
    format!("{year:04}{month:02}{day:02}")
}

/// Patient and study attributes copied from the source's first file, with their VR; those of
/// type 2 in the SEG IOD are written empty when the source lacks them.
const COPIED: &[(Tag, VR, bool)] = &[
    (tags::PATIENT_NAME, VR::PN, true),
    (tags::PATIENT_ID, VR::LO, true),
    (tags::ISSUER_OF_PATIENT_ID, VR::LO, false),
    (tags::PATIENT_BIRTH_DATE, VR::DA, true),
    (tags::PATIENT_SEX, VR::CS, true),
    (tags::PATIENT_AGE, VR::AS, false),
    (tags::PATIENT_SIZE, VR::DS, false),
    (tags::PATIENT_WEIGHT, VR::DS, false),
    (tags::STUDY_DATE, VR::DA, true),
    (tags::STUDY_TIME, VR::TM, true),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN, true),
    (tags::STUDY_ID, VR::SH, true),
    (tags::ACCESSION_NUMBER, VR::SH, true),
    (tags::STUDY_DESCRIPTION, VR::LO, false),
    (tags::POSITION_REFERENCE_INDICATOR, VR::LO, true),
];

/// Copies [`COPIED`] from the source's first readable file; without one (the files moved), the
/// patient name and ID the series was read with, and the rest empty.
fn copy_patient_and_study(source: &SegSource<'_>, obj: &mut InMemDicomObject) -> SourceHints {
    let header = source
        .slices
        .iter()
        .find_map(|s| OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(&s.path).ok());
    for &(tag, vr, type2) in COPIED {
        let value = header
            .as_ref()
            .and_then(|h| h.get(tag))
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string());
        let value = value.or_else(|| match header {
            Some(_) => None,
            None if tag == tags::PATIENT_NAME => Some(source.series.patient_name.clone()),
            None if tag == tags::PATIENT_ID => Some(source.series.patient_id.clone()),
            None => None,
        });
        match value {
            Some(v) => put_str(obj, tag, vr, &v),
            None if type2 => put_str(obj, tag, vr, ""),
            None => {}
        }
    }
    let text = |tag| {
        let e = header.as_ref().and_then(|h| h.get(tag)).and_then(|e| e.to_str().ok());
        e.map(|v| v.trim_end_matches(['\0', ' ']).trim().to_string()).unwrap_or_default()
    };
    let charset = text(tags::SPECIFIC_CHARACTER_SET);
    // The default repertoire (ASCII) is a subset of UTF-8, and code extensions (several values)
    // are not written here: both become UTF-8.
    let single = !charset.is_empty() && !charset.contains('\\') && !charset.ends_with(" 6");
    SourceHints { lossy: text(tags::LOSSY_IMAGE_COMPRESSION) == "01", charset: single.then_some(charset) }
}

/// What the SEG takes from the source beyond the copied attributes.
struct SourceHints {
    /// `LossyImageCompression` is 01: the source went through lossy compression, so the
    /// segmentation derived from it did too.
    lossy: bool,
    /// The source's `SpecificCharacterSet`, when it is one character set other than the default.
    charset: Option<String>,
}

fn build(
    source: &SegSource<'_>,
    labels: &Labels,
    class_names: &[String],
    opts: &SegOptions,
    geometry: &Geometry,
    frames: &[Frame],
) -> Result<(InMemDicomObject, String, Option<String>)> {
    let [columns, rows, _] = labels.shape;
    let (Ok(rows16), Ok(columns16)) = (u16::try_from(rows), u16::try_from(columns)) else {
        bail!("{rows}x{columns} pixels do not fit DICOM's 16-bit Rows and Columns")
    };
    let pixels = pack_frames(labels, frames);
    ensure!(
        pixels.len() < u32::MAX as usize - 1,
        "{} frames of {rows}x{columns} pixels need {} bytes, more than one DICOM object holds",
        frames.len(),
        pixels.len()
    );
    let series = &source.series;
    let series_uid = new_uid(&series.series_uid);
    let sop_uid = new_uid(&series.series_uid);
    let dimension_uid = new_uid(&series.series_uid);
    let (date, time) = utc_now();
    let series_number =
        opts.series_number.unwrap_or_else(|| series.number.and_then(|n| n.checked_add(1000)).unwrap_or(1000));

    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::IMAGE_TYPE,
        VR::CS,
        PrimitiveValue::Strs(["DERIVED", "PRIMARY"].iter().map(|s| s.to_string()).collect()),
    ));
    put_str(&mut obj, tags::INSTANCE_CREATION_DATE, VR::DA, &date);
    put_str(&mut obj, tags::INSTANCE_CREATION_TIME, VR::TM, &time);
    put_str(&mut obj, tags::SOP_CLASS_UID, VR::UI, uids::SEGMENTATION_STORAGE);
    put_str(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, &sop_uid);
    put_str(&mut obj, tags::CONTENT_DATE, VR::DA, &date);
    put_str(&mut obj, tags::CONTENT_TIME, VR::TM, &time);
    put_str(&mut obj, tags::MODALITY, VR::CS, "SEG");
    put_str(&mut obj, tags::MANUFACTURER, VR::LO, &lo(&opts.manufacturer));
    put_str(&mut obj, tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH, "+0000");
    put_str(&mut obj, tags::SERIES_DESCRIPTION, VR::LO, &lo(&opts.series_description));
    put_str(&mut obj, tags::MANUFACTURER_MODEL_NAME, VR::LO, &lo(&opts.manufacturer_model_name));
    let hints = copy_patient_and_study(source, &mut obj);

    // Common Instance Reference: the source series and every instance in it.
    let instances = source
        .slices
        .iter()
        .map(|s| {
            let mut item = InMemDicomObject::new_empty();
            put_str(&mut item, tags::REFERENCED_SOP_CLASS_UID, VR::UI, &s.sop_class_uid);
            put_str(&mut item, tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, &s.sop_instance_uid);
            item
        })
        .collect();
    let mut referenced_series = InMemDicomObject::new_empty();
    put_seq(&mut referenced_series, tags::REFERENCED_INSTANCE_SEQUENCE, instances);
    put_str(&mut referenced_series, tags::SERIES_INSTANCE_UID, VR::UI, &series.series_uid);
    put_seq(&mut obj, tags::REFERENCED_SERIES_SEQUENCE, vec![referenced_series]);

    put_str(&mut obj, tags::DEVICE_SERIAL_NUMBER, VR::LO, &lo(&opts.device_serial_number));
    put_str(&mut obj, tags::SOFTWARE_VERSIONS, VR::LO, &lo(&opts.software_versions));
    put_str(&mut obj, tags::STUDY_INSTANCE_UID, VR::UI, &series.study_uid);
    put_str(&mut obj, tags::SERIES_INSTANCE_UID, VR::UI, &series_uid);
    put_str(&mut obj, tags::SERIES_NUMBER, VR::IS, &series_number.to_string());
    put_str(&mut obj, tags::INSTANCE_NUMBER, VR::IS, &opts.instance_number.to_string());
    put_str(&mut obj, tags::FRAME_OF_REFERENCE_UID, VR::UI, &series.frame_of_reference_uid);

    // Multi-frame Dimension: frames indexed by (segment, position), as highdicom writes them.
    let mut organization = InMemDicomObject::new_empty();
    put_str(&mut organization, tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dimension_uid);
    put_seq(&mut obj, tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![organization]);
    let dimension = |index: Tag, group: Tag, label: &str| {
        let mut item = InMemDicomObject::new_empty();
        put_str(&mut item, tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dimension_uid);
        item.put(elem(tags::DIMENSION_INDEX_POINTER, VR::AT, index));
        item.put(elem(tags::FUNCTIONAL_GROUP_POINTER, VR::AT, group));
        put_str(&mut item, tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label);
        item
    };
    let dimensions = vec![
        dimension(
            tags::REFERENCED_SEGMENT_NUMBER,
            tags::SEGMENT_IDENTIFICATION_SEQUENCE,
            "Referenced Segment Number",
        ),
        dimension(tags::IMAGE_POSITION_PATIENT, tags::PLANE_POSITION_SEQUENCE, "Image Position Patient"),
    ];
    put_seq(&mut obj, tags::DIMENSION_INDEX_SEQUENCE, dimensions);

    // Image Pixel and Segmentation Image modules.
    put_u16(&mut obj, tags::SAMPLES_PER_PIXEL, 1);
    put_str(&mut obj, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
    put_str(&mut obj, tags::NUMBER_OF_FRAMES, VR::IS, &frames.len().to_string());
    put_u16(&mut obj, tags::ROWS, rows16);
    put_u16(&mut obj, tags::COLUMNS, columns16);
    put_u16(&mut obj, tags::BITS_ALLOCATED, 1);
    put_u16(&mut obj, tags::BITS_STORED, 1);
    put_u16(&mut obj, tags::HIGH_BIT, 0);
    put_u16(&mut obj, tags::PIXEL_REPRESENTATION, 0);
    put_str(&mut obj, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, if hints.lossy { "01" } else { "00" });
    put_str(&mut obj, tags::SEGMENTATION_TYPE, VR::CS, "BINARY");

    let segments = (1..class_names.len())
        .map(|c| {
            let name = lo(&class_names[c]);
            let name = if name.is_empty() { format!("class {c}") } else { name };
            let property = segment_property(&class_names[c]);
            let mut item = InMemDicomObject::new_empty();
            put_seq(
                &mut item,
                tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
                vec![code_item(property.category)],
            );
            put_u16(&mut item, tags::SEGMENT_NUMBER, c as u16);
            put_str(&mut item, tags::SEGMENT_LABEL, VR::LO, &name);
            let mut algorithm = InMemDicomObject::new_empty();
            let family = Code { value: "123110", scheme: "DCM", meaning: "Artificial Intelligence" };
            put_seq(&mut algorithm, tags::ALGORITHM_FAMILY_CODE_SEQUENCE, vec![code_item(family)]);
            put_str(&mut algorithm, tags::ALGORITHM_VERSION, VR::LO, &lo(&opts.algorithm_version));
            put_str(&mut algorithm, tags::ALGORITHM_NAME, VR::LO, &lo(&opts.algorithm_name));
            put_seq(&mut item, tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE, vec![algorithm]);
            put_str(&mut item, tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC");
            put_str(&mut item, tags::SEGMENT_ALGORITHM_NAME, VR::LO, &lo(&opts.algorithm_name));
            let mut type_item = code_item(property.property_type);
            if let Some(modifier) = property.modifier {
                put_seq(
                    &mut type_item,
                    tags::SEGMENTED_PROPERTY_TYPE_MODIFIER_CODE_SEQUENCE,
                    vec![code_item(modifier)],
                );
            }
            put_seq(&mut item, tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE, vec![type_item]);
            item
        })
        .collect();
    put_seq(&mut obj, tags::SEGMENT_SEQUENCE, segments);
    put_str(&mut obj, tags::SEGMENTS_OVERLAP, VR::CS, "NO");
    put_str(&mut obj, tags::CONTENT_LABEL, VR::CS, &cs(&opts.content_label, "SEGMENTATION"));
    put_str(&mut obj, tags::CONTENT_DESCRIPTION, VR::LO, &lo(&opts.content_description));
    put_str(&mut obj, tags::CONTENT_CREATOR_NAME, VR::PN, &opts.content_creator_name.replace('\\', " "));
    put_str(&mut obj, tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY");

    // Functional groups: orientation and spacing shared, position and source per frame.
    let mut orientation = InMemDicomObject::new_empty();
    put_ds(&mut orientation, tags::IMAGE_ORIENTATION_PATIENT, &geometry.orientation);
    let mut measures = InMemDicomObject::new_empty();
    put_ds(&mut measures, tags::SLICE_THICKNESS, &[geometry.slice_step]);
    put_ds(&mut measures, tags::SPACING_BETWEEN_SLICES, &[geometry.slice_step]);
    put_ds(&mut measures, tags::PIXEL_SPACING, &geometry.pixel_spacing);
    let mut shared = InMemDicomObject::new_empty();
    put_seq(&mut shared, tags::PLANE_ORIENTATION_SEQUENCE, vec![orientation]);
    put_seq(&mut shared, tags::PIXEL_MEASURES_SEQUENCE, vec![measures]);
    put_seq(&mut obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]);

    let purpose =
        Code { value: "121322", scheme: "DCM", meaning: "Source image for image processing operation" };
    let derivation = Code { value: "113076", scheme: "DCM", meaning: "Segmentation" };
    let mut per_frame = Vec::with_capacity(frames.len());
    for fr in frames {
        let s = &source.slices[fr.slice];
        let position =
            s.position.with_context(|| format!("{}: no ImagePositionPatient", s.path.display()))?;
        let mut src = InMemDicomObject::new_empty();
        put_str(&mut src, tags::REFERENCED_SOP_CLASS_UID, VR::UI, &s.sop_class_uid);
        put_str(&mut src, tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, &s.sop_instance_uid);
        put_str(&mut src, tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES");
        put_seq(&mut src, tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE, vec![code_item(purpose)]);
        let mut derived = InMemDicomObject::new_empty();
        put_seq(&mut derived, tags::SOURCE_IMAGE_SEQUENCE, vec![src]);
        put_seq(&mut derived, tags::DERIVATION_CODE_SEQUENCE, vec![code_item(derivation)]);
        let mut content = InMemDicomObject::new_empty();
        let index: C<u32> = [u32::from(fr.segment), fr.slice as u32 + 1].into_iter().collect();
        content.put(DataElement::new(tags::DIMENSION_INDEX_VALUES, VR::UL, PrimitiveValue::U32(index)));
        let mut plane = InMemDicomObject::new_empty();
        put_ds(&mut plane, tags::IMAGE_POSITION_PATIENT, &position);
        let mut segment = InMemDicomObject::new_empty();
        put_u16(&mut segment, tags::REFERENCED_SEGMENT_NUMBER, u16::from(fr.segment));
        let mut item = InMemDicomObject::new_empty();
        put_seq(&mut item, tags::DERIVATION_IMAGE_SEQUENCE, vec![derived]);
        put_seq(&mut item, tags::FRAME_CONTENT_SEQUENCE, vec![content]);
        put_seq(&mut item, tags::PLANE_POSITION_SEQUENCE, vec![plane]);
        put_seq(&mut item, tags::SEGMENT_IDENTIFICATION_SEQUENCE, vec![segment]);
        per_frame.push(item);
    }
    put_seq(&mut obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame);
    obj.put(DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(pixels)));
    Ok((obj, sop_uid, hints.charset))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::dicom::{SeriesInfo, SliceHeader};
    use crate::volume::{Affine, Volume};

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    /// A series of `n` axial `rows` x `columns` slices whose files do not exist (the patient
    /// module then comes from the series' header values).
    fn source(columns: usize, rows: usize, n: usize) -> DicomVolume {
        let slices = (0..n)
            .map(|k| SliceHeader {
                path: PathBuf::from(format!("/nonexistent/glmae-seg/{k}.dcm")),
                sop_instance_uid: format!("1.2.826.0.1.99.{k}"),
                sop_class_uid: CT.into(),
                instance_number: Some(k as i32 + 1),
                rows,
                columns,
                position: Some([-10.0, 20.0, 2.5 * k as f64]),
                orientation: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
                pixel_spacing: Some([0.8, 0.7]),
                slope: 1.0,
                intercept: -1024.0,
                bits_allocated: 16,
                bits_stored: 16,
                signed: true,
                samples_per_pixel: 1,
                frames: 1,
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
            })
            .collect();
        let series = SeriesInfo {
            series_uid: "1.2.826.0.1.99".into(),
            study_uid: "1.2.826.0.1.98".into(),
            frame_of_reference_uid: "1.2.826.0.1.97".into(),
            modality: "CT".into(),
            description: String::new(),
            number: Some(3),
            patient_id: "P-7".into(),
            patient_name: "Doe^Jane".into(),
            slices: Vec::new(),
        };
        let volume = Volume::new(
            vec![0.0; columns * rows * n],
            [columns, rows, n],
            Affine::from_spacing([0.7, 0.8, 2.5]),
        );
        DicomVolume { volume, series, slices }
    }

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|c| if c == 0 { "background".into() } else { format!("organ {c}") }).collect()
    }

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("glmae-seg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// 5 x 3 frames are 15 bits: frames run on without padding, bit 0 of a byte is its first
    /// pixel, and only the end is padded (with zeros, to an even byte count).
    #[test]
    fn frames_pack_bit_contiguously_lsb_first() {
        let src = source(5, 3, 4);
        let mut labels = Labels::new(vec![0; 60], [5, 3, 4], src.volume.affine);
        // One voxel of class 1 at column 1, row 2 of slice 0: pixel 2 * 5 + 1 = 11, byte 1 bit 3.
        let v = labels.index(1, 2, 0);
        labels.data[v] = 1;
        let frames = frames_of(&labels, 2);
        assert_eq!(frames, [Frame { segment: 1, slice: 0 }]);
        assert_eq!(pack_frames(&labels, &frames), [0x00, 0x08]);

        // Classes 1..=3 on a pattern; class 3 absent from slice 2, class 2 absent from slice 1.
        for i in 0..5 {
            for j in 0..3 {
                for k in 0..4 {
                    let mut c = ((i * 7 + j * 3 + k * 5) % 4) as u8;
                    if (c == 3 && k == 2) || (c == 2 && k == 1) {
                        c = 0;
                    }
                    let v = labels.index(i, j, k);
                    labels.data[v] = c;
                }
            }
        }
        let frames = frames_of(&labels, 4);
        let expected: Vec<Frame> = (1..4u8)
            .flat_map(|c| (0..4).map(move |k| Frame { segment: c, slice: k }))
            .filter(|f| ![(3, 2), (2, 1)].contains(&(f.segment, f.slice)))
            .collect();
        assert_eq!(frames, expected);
        let bytes = pack_frames(&labels, &frames);
        let bits = frames.len() * 15;
        assert_eq!(bytes.len(), bits.div_ceil(8) + bits.div_ceil(8) % 2);
        for p in 0..bytes.len() * 8 {
            let bit = bytes[p / 8] >> (p % 8) & 1 == 1;
            let want = p < bits && {
                let (f, j, i) = (p / 15, p % 15 / 5, p % 5);
                labels.data[labels.index(i, j, frames[f].slice)] == frames[f].segment
            };
            assert_eq!(bit, want, "bit {p}");
        }
    }

    #[test]
    fn nothing_labelled_is_one_empty_frame() {
        let src = source(5, 3, 4);
        let labels = Labels::new(vec![0; 60], [5, 3, 4], src.volume.affine);
        let frames = frames_of(&labels, 3);
        assert_eq!(frames, [Frame { segment: 1, slice: 0 }]);
        assert_eq!(pack_frames(&labels, &frames), [0, 0]);
    }

    #[test]
    fn writes_a_readable_seg() {
        let dir = temp("read");
        let src = source(5, 3, 4);
        let mut labels = Labels::new(vec![0; 60], [5, 3, 4], src.volume.affine);
        let v = labels.index(4, 0, 3);
        labels.data[v] = 2;
        let v = labels.index(0, 1, 1);
        labels.data[v] = 2;
        let path = dir.join("out.dcm");
        write_seg(&path, &(&src).into(), &labels, &names(4), &SegOptions::default()).unwrap();
        let obj = OpenFileOptions::new().open_file(&path).unwrap();
        let text = |tag| obj.get(tag).unwrap().to_str().unwrap().trim_end_matches(['\0', ' ']).to_string();
        assert_eq!(text(tags::SOP_CLASS_UID), uids::SEGMENTATION_STORAGE);
        assert_eq!(obj.meta().transfer_syntax().trim_end_matches('\0'), uids::EXPLICIT_VR_LITTLE_ENDIAN);
        assert_eq!(text(tags::NUMBER_OF_FRAMES), "2");
        assert_eq!(text(tags::PATIENT_NAME), "Doe^Jane");
        assert_eq!(text(tags::PATIENT_ID), "P-7");
        assert_eq!(text(tags::SERIES_NUMBER), "1003");
        assert_eq!(text(tags::STUDY_INSTANCE_UID), "1.2.826.0.1.98");
        let items = |tag| obj.get(tag).unwrap().items().unwrap().len();
        assert_eq!(items(tags::SEGMENT_SEQUENCE), 3, "one segment per class, voxels or not");
        assert_eq!(items(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE), 2);
        // Frames (segment 2, slice 1) then (segment 2, slice 3): 30 bits in 4 bytes; pixel 5
        // (row 1, column 0) of frame 1 is bit 5 of byte 0, pixel 4 of frame 2 is bit 19.
        let pixels = obj.get(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        assert_eq!(&pixels[..], [0b0010_0000, 0b0000_0000, 0b0000_1000, 0]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "a temporary file was left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Errors name the file and the problem; the file that was there stays as it was, and no
    /// temporary file is left.
    #[test]
    fn errors_name_the_file_and_leave_nothing() {
        let dir = temp("errors");
        let src = source(5, 3, 4);
        let labels = Labels::new(vec![1; 60], [5, 3, 4], src.volume.affine);
        let path = dir.join("out.dcm");
        std::fs::write(&path, b"previous").unwrap();
        let fails = |labels: &Labels, names: &[String], path: &Path| {
            format!(
                "{:#}",
                write_seg(path, &(&src).into(), labels, names, &SegOptions::default()).unwrap_err()
            )
        };
        let wrong = Labels::new(vec![0; 48], [4, 3, 4], src.volume.affine);
        let e = fails(&wrong, &names(3), &path);
        assert!(e.contains("out.dcm") && e.contains("4x3x4") && e.contains("5x3x4"), "{e}");
        let shifted = Labels::new(vec![0; 60], [5, 3, 4], Affine::from_spacing([1.0, 1.0, 1.0]));
        let e = fails(&shifted, &names(3), &path);
        assert!(e.contains("out.dcm") && e.contains("another grid"), "{e}");
        let mut big = labels.clone();
        big.data[7] = 3;
        let e = fails(&big, &names(3), &path);
        assert!(e.contains("out.dcm") && e.contains("label value 3 has no class name"), "{e}");
        let e = fails(&labels, &names(1), &path);
        assert!(e.contains("out.dcm") && e.contains("at least one class"), "{e}");
        let mut no_for = source(5, 3, 4);
        no_for.series.frame_of_reference_uid.clear();
        let e = format!(
            "{:#}",
            write_seg(&path, &(&no_for).into(), &labels, &names(3), &SegOptions::default()).unwrap_err()
        );
        assert!(e.contains("out.dcm") && e.contains("FrameOfReferenceUID"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"previous");
        let missing = dir.join("no-such-folder").join("out.dcm");
        let e = fails(&labels, &names(3), &missing);
        assert!(e.contains("no-such-folder/out.dcm"), "{e}");
        let e = fails(&labels, &names(3), &dir);
        assert!(e.contains("a folder"), "{e}");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["out.dcm"], "files left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_btcv_class_has_an_anatomy_code() {
        for name in &glmae_core::preprocessing::BTCV_CLASSES[1..] {
            let p = segment_property(name);
            assert_eq!(p.category, ANATOMICAL_STRUCTURE, "{name}");
            assert_ne!(p.property_type, TISSUE, "{name}");
        }
        let p = segment_property("Right_Kidney");
        assert_eq!((p.property_type, p.modifier), (KIDNEY, Some(RIGHT)));
        assert_eq!(
            segment_property("lesion"),
            SegmentProperty { category: TISSUE, property_type: TISSUE, modifier: None }
        );
    }

    #[test]
    fn uids_dates_and_strings_are_well_formed() {
        let (a, b) = (new_uid("x"), new_uid("x"));
        assert_ne!(a, b);
        for u in [&a, &b] {
            let v: u128 = u.strip_prefix("2.25.").unwrap().parse().unwrap();
            assert!(u.len() <= 64 && !u.ends_with('.'), "{u}");
            assert_eq!((v >> 76) & 0xF, 4, "UUID version 4: {u}");
            assert_eq!(v >> 62 & 0x3, 2, "UUID variant: {u}");
        }
        assert_eq!(civil_date(0), "19700101");
        assert_eq!(civil_date(11_016), "20000229");
        assert_eq!(civil_date(19_723), "20240101");
        assert_eq!(utc_now().0.len(), 8);
        for (v, s) in [
            (2.5, "2.5"),
            (-0.0, "0"),
            (-37.812_412_345_678_9, "-37.812412345679"),
            (0.906_307_787, "0.906307787"),
        ] {
            assert_eq!(ds(v), s);
        }
        assert!(ds(-123_456_789.123_456_79).len() <= 16);
        assert!(ds(1e20).len() <= 16);
        assert_eq!(cs("ct seg-v2", "X"), "CT SEG_V2");
        assert_eq!(cs("", "SEGMENTATION"), "SEGMENTATION");
        assert_eq!(lo("a\\b"), "a b");
    }
}
