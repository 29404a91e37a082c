//! DICOM series in: a folder of files (any names, nested) grouped by `SeriesInstanceUID`, one
//! series chosen, its slices sorted along the slice normal and decoded into a volume in the
//! modality's units (Hounsfield units for CT, `RescaleSlope` and `RescaleIntercept` applied), with
//! the affine in this crate's convention (RAS, voxel `(column, row, slice)`), the one nibabel gives
//! for `dcm2niix`'s conversion of the same series.
//!
//! Only native (uncompressed) pixel data is decoded: implicit and explicit VR little endian,
//! explicit VR big endian and deflated explicit VR little endian. A series we cannot stack as a
//! volume (gantry tilt, uneven, duplicated or missing slices, mixed orientation or size, colour or
//! multi-frame images, compressed pixel data) is an error naming the series and the problem.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use dicom_core::value::{PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};

use crate::volume::{Affine, Volume};

/// Transfer syntaxes whose pixel data is stored natively (uncompressed).
const NATIVE_SYNTAXES: [(&str, &str); 4] = [
    ("1.2.840.10008.1.2", "implicit VR little endian"),
    ("1.2.840.10008.1.2.1", "explicit VR little endian"),
    ("1.2.840.10008.1.2.2", "explicit VR big endian"),
    ("1.2.840.10008.1.2.1.99", "deflated explicit VR little endian"),
];

/// Largest angle, in degrees, between the slice normal and the line through the slice
/// positions: above it the slices are sheared (a tilted gantry) and do not stack into a volume.
pub const MAX_TILT_DEGREES: f64 = 0.1;

/// Largest deviation of one slice step from the series' median step, as a fraction of it (with
/// 0.01 mm for rounding in the stored positions).
pub const MAX_STEP_DEVIATION: f64 = 0.01;

/// What one file's header says about its image.
#[derive(Clone, Debug)]
pub struct SliceHeader {
    /// The file.
    pub path: PathBuf,
    /// `SOPInstanceUID`.
    pub sop_instance_uid: String,
    /// `SOPClassUID`.
    pub sop_class_uid: String,
    /// `InstanceNumber`, when present.
    pub instance_number: Option<i32>,
    /// `Rows`.
    pub rows: usize,
    /// `Columns`.
    pub columns: usize,
    /// `ImagePositionPatient` (LPS, mm).
    pub position: Option<[f64; 3]>,
    /// `ImageOrientationPatient`: the row direction then the column direction (LPS).
    pub orientation: Option<[f64; 6]>,
    /// `PixelSpacing`: between rows, then between columns (mm).
    pub pixel_spacing: Option<[f64; 2]>,
    /// `RescaleSlope` (1 when absent).
    pub slope: f64,
    /// `RescaleIntercept` (0 when absent).
    pub intercept: f64,
    /// `BitsAllocated`.
    pub bits_allocated: u16,
    /// `BitsStored`.
    pub bits_stored: u16,
    /// `PixelRepresentation` is 1: two's complement samples.
    pub signed: bool,
    /// `SamplesPerPixel`.
    pub samples_per_pixel: u16,
    /// `NumberOfFrames` (1 when absent).
    pub frames: u32,
    /// The file's transfer syntax UID.
    pub transfer_syntax: String,
}

/// The identity of a series and the headers of its files.
#[derive(Clone, Debug)]
pub struct SeriesInfo {
    /// `SeriesInstanceUID`.
    pub series_uid: String,
    /// `StudyInstanceUID`.
    pub study_uid: String,
    /// `FrameOfReferenceUID` (empty when absent).
    pub frame_of_reference_uid: String,
    /// `Modality`, e.g. `CT`.
    pub modality: String,
    /// `SeriesDescription` (empty when absent).
    pub description: String,
    /// `SeriesNumber`, when present.
    pub number: Option<i32>,
    /// `PatientID` (empty when absent).
    pub patient_id: String,
    /// `PatientName` (empty when absent).
    pub patient_name: String,
    /// One header per file, in no particular order.
    pub slices: Vec<SliceHeader>,
}

impl SeriesInfo {
    /// `UID (CT, 120 files, "description")`, for messages.
    pub fn label(&self) -> String {
        let mut s = format!("series {} ({}, {} files", self.series_uid, self.modality, self.slices.len());
        if !self.description.is_empty() {
            s.push_str(&format!(", \"{}\"", self.description));
        }
        s.push(')');
        s
    }
}

/// The series found under a folder, and the files that were not DICOM images.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Series, largest first.
    pub series: Vec<SeriesInfo>,
    /// Files skipped, each with the reason (not DICOM, no pixel data, unreadable).
    pub skipped: Vec<(PathBuf, String)>,
}

/// A series stacked into a volume.
#[derive(Clone, Debug)]
pub struct DicomVolume {
    /// Values after `RescaleSlope`/`RescaleIntercept`, voxel `(column, row, slice)`, RAS affine.
    pub volume: Volume,
    /// The series.
    pub series: SeriesInfo,
    /// The slices in volume order (index `k` of the volume is `slices[k]`).
    pub slices: Vec<SliceHeader>,
}

/// Finds every DICOM image under `dir` (any file names, sub-folders included) and groups them
/// by series. Files that are not DICOM images are listed in [`Scan::skipped`], not errors.
pub fn scan(dir: &Path) -> Result<Scan> {
    ensure!(dir.is_dir(), "{} is not a folder", dir.display());
    let mut files = Vec::new();
    // Any file name (DICOM files often have none), hidden files and folders aside.
    let visible = |p: &Path| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
    crate::dataset::walk_files(dir, &visible, &|p: &Path| visible(p) && p.is_file(), &mut files)?;
    files.sort();
    let mut by_uid: BTreeMap<String, SeriesInfo> = BTreeMap::new();
    let mut skipped = Vec::new();
    for path in files {
        match read_header(&path) {
            Ok(Some((series, slice))) => {
                by_uid
                    .entry(series.series_uid.clone())
                    .or_insert_with(|| SeriesInfo { slices: Vec::new(), ..series })
                    .slices
                    .push(slice);
            }
            Ok(None) => skipped.push((path, "a DICOM object without pixel data".to_string())),
            Err(e) => skipped.push((path, format!("{e:#}"))),
        }
    }
    let mut series: Vec<SeriesInfo> = by_uid.into_values().collect();
    series.sort_by(|a, b| b.slices.len().cmp(&a.slices.len()).then(a.series_uid.cmp(&b.series_uid)));
    Ok(Scan { series, skipped })
}

/// The series `uid`, or else the CT series with the most files (then any series with the most).
pub fn choose<'a>(scan: &'a Scan, dir: &Path, uid: Option<&str>) -> Result<&'a SeriesInfo> {
    if scan.series.is_empty() {
        let why = scan.skipped.first().map(|(p, e)| format!(" (e.g. {}: {e})", p.display()));
        bail!("{}: no DICOM images found{}", dir.display(), why.unwrap_or_default());
    }
    if let Some(uid) = uid {
        return scan.series.iter().find(|s| s.series_uid == uid).with_context(|| {
            let have: Vec<String> = scan.series.iter().map(SeriesInfo::label).collect();
            format!("{}: no series {uid}; found {}", dir.display(), have.join(", "))
        });
    }
    // Largest first, so the first CT is the CT with the most slices.
    Ok(scan.series.iter().find(|s| s.modality == "CT").unwrap_or(&scan.series[0]))
}

/// Scans `dir`, chooses a series ([`choose`]) and stacks it ([`read_series`]).
pub fn read_dicom_folder(dir: &Path, uid: Option<&str>) -> Result<DicomVolume> {
    let scan = scan(dir)?;
    let info = choose(&scan, dir, uid)?;
    read_series(info)
}

/// Sorts the series' slices along their normal, checks that they stack into a volume, and
/// decodes their pixels.
pub fn read_series(info: &SeriesInfo) -> Result<DicomVolume> {
    let label = info.label();
    let (slices, affine) = stack(info).with_context(|| label.clone())?;
    let (rows, columns) = (slices[0].rows, slices[0].columns);
    let n = slices.len();
    let mut data = vec![0f32; rows * columns * n];
    let mut plane = Vec::with_capacity(rows * columns);
    for (k, s) in slices.iter().enumerate() {
        read_pixels(s, &mut plane).with_context(|| format!("{label}: {}", s.path.display()))?;
        // Pixel (row j, column i) is voxel (i, j, k); the volume's k index runs fastest.
        for j in 0..rows {
            for i in 0..columns {
                data[(i * rows + j) * n + k] = plane[j * columns + i];
            }
        }
    }
    let volume = Volume::new(data, [columns, rows, n], affine);
    Ok(DicomVolume { volume, series: info.clone(), slices })
}

/// The civil date `(year, month, day)` of `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian): for DICOM dates and UTC log stamps without a date crate.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Whether the file has DICOM Part 10's `DICM` marker after its 128-byte preamble.
fn has_dicom_marker(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut head = [0u8; 132];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..])? {
            0 => return Ok(false),
            n => got += n,
        }
    }
    Ok(&head[128..] == b"DICM")
}

/// The text of element `tag` with DICOM's padding (trailing NUL or space) removed; empty when
/// absent or not text.
pub fn text(obj: &dicom_object::InMemDicomObject, tag: dicom_core::Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
        .unwrap_or_default()
}

fn floats<const N: usize>(
    obj: &DefaultDicomObject,
    tag: dicom_core::Tag,
    name: &str,
) -> Result<Option<[f64; N]>> {
    let Some(e) = obj.get(tag) else { return Ok(None) };
    let v = e.to_multi_float64().with_context(|| format!("{name} is not numeric"))?;
    ensure!(v.len() == N, "{name} has {} values, expected {N}", v.len());
    ensure!(v.iter().all(|x| x.is_finite()), "{name} is not finite: {v:?}");
    Ok(Some(std::array::from_fn(|i| v[i])))
}

/// The header of `path` as a slice of its series, `None` for a DICOM object without pixel data
/// (a report, a presentation state), an error for a file that is not DICOM.
fn read_header(path: &Path) -> Result<Option<(SeriesInfo, SliceHeader)>> {
    ensure!(has_dicom_marker(path)?, "not a DICOM file (no DICM marker)");
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| anyhow::anyhow!("not a readable DICOM file: {e}"))?;
    if obj.get(tags::ROWS).is_none() || obj.get(tags::COLUMNS).is_none() {
        return Ok(None);
    }
    let series_uid = text(&obj, tags::SERIES_INSTANCE_UID);
    ensure!(!series_uid.is_empty(), "no SeriesInstanceUID");
    let uint = |tag, name: &str| -> Result<u32> {
        let e = obj.get(tag).with_context(|| format!("no {name}"))?;
        e.to_int::<u32>().with_context(|| format!("{name} is not a number"))
    };
    let opt_uint = |tag, default: u32| obj.get(tag).and_then(|e| e.to_int::<u32>().ok()).unwrap_or(default);
    let opt_float = |tag, default: f64| obj.get(tag).and_then(|e| e.to_float64().ok()).unwrap_or(default);
    let bits_allocated = uint(tags::BITS_ALLOCATED, "BitsAllocated")? as u16;
    let slice = SliceHeader {
        path: path.to_path_buf(),
        sop_instance_uid: text(&obj, tags::SOP_INSTANCE_UID),
        sop_class_uid: text(&obj, tags::SOP_CLASS_UID),
        instance_number: obj.get(tags::INSTANCE_NUMBER).and_then(|e| e.to_int::<i32>().ok()),
        rows: uint(tags::ROWS, "Rows")? as usize,
        columns: uint(tags::COLUMNS, "Columns")? as usize,
        position: floats(&obj, tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient")?,
        orientation: floats(&obj, tags::IMAGE_ORIENTATION_PATIENT, "ImageOrientationPatient")?,
        pixel_spacing: floats(&obj, tags::PIXEL_SPACING, "PixelSpacing")?,
        slope: opt_float(tags::RESCALE_SLOPE, 1.0),
        intercept: opt_float(tags::RESCALE_INTERCEPT, 0.0),
        bits_allocated,
        bits_stored: opt_uint(tags::BITS_STORED, u32::from(bits_allocated)) as u16,
        signed: opt_uint(tags::PIXEL_REPRESENTATION, 0) == 1,
        samples_per_pixel: opt_uint(tags::SAMPLES_PER_PIXEL, 1) as u16,
        frames: opt_uint(tags::NUMBER_OF_FRAMES, 1),
        transfer_syntax: obj.meta().transfer_syntax().trim_end_matches('\0').to_string(),
    };
    let series = SeriesInfo {
        series_uid,
        study_uid: text(&obj, tags::STUDY_INSTANCE_UID),
        frame_of_reference_uid: text(&obj, tags::FRAME_OF_REFERENCE_UID),
        modality: text(&obj, tags::MODALITY),
        description: text(&obj, tags::SERIES_DESCRIPTION),
        number: obj.get(tags::SERIES_NUMBER).and_then(|e| e.to_int::<i32>().ok()),
        patient_id: text(&obj, tags::PATIENT_ID),
        patient_name: text(&obj, tags::PATIENT_NAME),
        slices: Vec::new(),
    };
    Ok(Some((series, slice)))
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}

fn instance(s: &SliceHeader) -> String {
    match s.instance_number {
        Some(n) => format!("instance {n} ({})", s.path.display()),
        None => s.path.display().to_string(),
    }
}

/// The slices sorted along the normal and the RAS affine, after every check that they form
/// one regular volume.
fn stack(info: &SeriesInfo) -> Result<(Vec<SliceHeader>, Affine)> {
    let first = info.slices.first().context("no slices")?;
    for s in &info.slices {
        ensure!(
            s.samples_per_pixel == 1,
            "{}: colour images ({} samples per pixel)",
            instance(s),
            s.samples_per_pixel
        );
        ensure!(s.frames == 1, "{}: multi-frame images ({} frames) are not read", instance(s), s.frames);
        if !NATIVE_SYNTAXES.iter().any(|(uid, _)| *uid == s.transfer_syntax) {
            bail!(
                "{}: transfer syntax {} holds compressed pixel data, which is not decoded; convert the \
                 series to explicit VR little endian first (e.g. `dcmdjpeg` or `gdcmconv --raw`)",
                instance(s),
                s.transfer_syntax
            );
        }
        ensure!(
            (s.rows, s.columns) == (first.rows, first.columns),
            "mixed image sizes: {} is {}x{}, {} is {}x{}",
            instance(first),
            first.rows,
            first.columns,
            instance(s),
            s.rows,
            s.columns
        );
        ensure!(s.rows > 0 && s.columns > 0, "{}: an empty image", instance(s));
    }
    ensure!(info.slices.len() >= 2, "one slice is not a volume");
    let orientation =
        first.orientation.with_context(|| format!("{}: no ImageOrientationPatient", instance(first)))?;
    let spacing = first.pixel_spacing.with_context(|| format!("{}: no PixelSpacing", instance(first)))?;
    ensure!(
        spacing.iter().all(|&v| v > 0.0),
        "{}: PixelSpacing {spacing:?} is not positive",
        instance(first)
    );
    let row_dir = [orientation[0], orientation[1], orientation[2]];
    let col_dir = [orientation[3], orientation[4], orientation[5]];
    ensure!(
        (norm(row_dir) - 1.0).abs() < 1e-3
            && (norm(col_dir) - 1.0).abs() < 1e-3
            && dot(row_dir, col_dir).abs() < 1e-3,
        "{}: ImageOrientationPatient {orientation:?} is not two orthogonal unit vectors",
        instance(first)
    );
    let normal = cross(row_dir, col_dir);
    let mut keyed = Vec::with_capacity(info.slices.len());
    for s in &info.slices {
        let o = s.orientation.with_context(|| format!("{}: no ImageOrientationPatient", instance(s)))?;
        ensure!(
            o.iter().zip(&orientation).all(|(a, b)| (a - b).abs() < 1e-4),
            "mixed orientations: {} has {orientation:?}, {} has {o:?}",
            instance(first),
            instance(s)
        );
        let sp = s.pixel_spacing.with_context(|| format!("{}: no PixelSpacing", instance(s)))?;
        ensure!(
            sp.iter().zip(&spacing).all(|(a, b)| (a - b).abs() < 1e-4),
            "mixed pixel spacings: {} has {spacing:?}, {} has {sp:?}",
            instance(first),
            instance(s)
        );
        let p = s.position.with_context(|| format!("{}: no ImagePositionPatient", instance(s)))?;
        keyed.push((dot(p, normal), s));
    }
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let steps: Vec<f64> = keyed.windows(2).map(|w| w[1].0 - w[0].0).collect();
    for (w, step) in keyed.windows(2).zip(&steps) {
        ensure!(
            *step > 1e-3,
            "duplicated slice position: {} and {} are both at {:.3} mm along the normal",
            instance(w[0].1),
            instance(w[1].1),
            w[0].0
        );
    }
    let mut sorted_steps = steps.clone();
    sorted_steps.sort_by(f64::total_cmp);
    let median = sorted_steps[sorted_steps.len() / 2];
    for (w, step) in keyed.windows(2).zip(&steps) {
        let tolerance = (median * MAX_STEP_DEVIATION).max(0.01);
        if (step - median).abs() > tolerance {
            let (a, b) = (instance(w[0].1), instance(w[1].1));
            if *step > 1.5 * median {
                bail!(
                    "missing slices: a gap of {step:.3} mm between {a} and {b}, where slices are {median:.3} mm apart"
                );
            }
            bail!(
                "uneven slice spacing: {step:.3} mm between {a} and {b}, where slices are {median:.3} mm apart"
            );
        }
    }
    let p0 = keyed[0].1.position.context("no position")?;
    let pn = keyed[keyed.len() - 1].1.position.context("no position")?;
    let along = [pn[0] - p0[0], pn[1] - p0[1], pn[2] - p0[2]];
    let cos = (dot(along, normal) / norm(along)).clamp(-1.0, 1.0);
    let tilt = cos.acos().to_degrees();
    ensure!(
        tilt <= MAX_TILT_DEGREES,
        "gantry tilt: the slice positions run {tilt:.2} degrees off the slice normal (at most \
         {MAX_TILT_DEGREES}); the slices are sheared and do not stack into a volume without resampling"
    );
    let n = keyed.len();
    let step = (keyed[n - 1].0 - keyed[0].0) / (n - 1) as f64;
    // LPS columns: i along the row direction (PixelSpacing[1] apart), j along the column
    // direction (PixelSpacing[0]), k along the normal; RAS negates x and y.
    let cols = [row_dir.map(|v| v * spacing[1]), col_dir.map(|v| v * spacing[0]), normal.map(|v| v * step)];
    let mut m = [[0.0; 4]; 4];
    for r in 0..3 {
        let sign = if r < 2 { -1.0 } else { 1.0 };
        for (c, col) in cols.iter().enumerate() {
            m[r][c] = sign * col[r];
        }
        m[r][3] = sign * p0[r];
    }
    m[3][3] = 1.0;
    Ok((keyed.into_iter().map(|(_, s)| s.clone()).collect(), Affine(m)))
}

/// Decodes one slice's pixel data into `out` (rows x columns values, row-major), rescaled.
fn read_pixels(s: &SliceHeader, out: &mut Vec<f32>) -> Result<()> {
    let obj = OpenFileOptions::new()
        .open_file(&s.path)
        .map_err(|e| anyhow::anyhow!("not a readable DICOM file: {e}"))?;
    let e = obj.get(tags::PIXEL_DATA).context("no PixelData")?;
    let bytes: Cow<'_, [u8]> = match e.value() {
        // OW arrives as 16-bit words in the host's order: put them back in little endian.
        Value::Primitive(PrimitiveValue::U16(words)) => {
            Cow::Owned(words.iter().flat_map(|w| w.to_le_bytes()).collect())
        }
        Value::Primitive(PrimitiveValue::U8(b)) => Cow::Borrowed(&b[..]),
        Value::Primitive(_) => bail!("PixelData is neither OB nor OW"),
        Value::PixelSequence(_) => bail!("encapsulated (compressed) PixelData is not decoded"),
        Value::Sequence(_) => bail!("PixelData is a sequence"),
    };
    let n = s.rows * s.columns;
    let width = match s.bits_allocated {
        8 => 1,
        16 => 2,
        32 => 4,
        b => bail!("BitsAllocated {b} is not read (8, 16 or 32)"),
    };
    ensure!(
        bytes.len() >= n * width,
        "PixelData holds {} bytes, {} rows x {} columns x {} bytes need {}",
        bytes.len(),
        s.rows,
        s.columns,
        width,
        n * width
    );
    ensure!(
        s.bits_stored >= 1 && s.bits_stored <= s.bits_allocated,
        "BitsStored {} does not fit BitsAllocated {}",
        s.bits_stored,
        s.bits_allocated
    );
    // Samples occupy the low BitsStored bits (HighBit = BitsStored - 1, as CT writes them);
    // signed samples are sign-extended from there.
    let shift = 64 - u32::from(s.bits_stored);
    out.clear();
    out.extend(bytes[..n * width].chunks_exact(width).map(|c| {
        let raw = match width {
            1 => u64::from(c[0]),
            2 => u64::from(u16::from_le_bytes([c[0], c[1]])),
            _ => u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        };
        let v =
            if s.signed { ((raw << shift) as i64 >> shift) as f64 } else { ((raw << shift) >> shift) as f64 };
        (v * s.slope + s.intercept) as f32
    }));
    Ok(())
}
