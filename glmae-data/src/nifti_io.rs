//! NIfTI-1 and NIfTI-2 reading and NIfTI-1 writing that agree with nibabel.
//!
//! The `nifti` crate parses NIfTI-1 headers (either byte order, `.nii`, `.nii.gz`, `.hdr/.img`).
//! Around it, this module fixes the crate's measured defects (see `../shared/docs/data.md`):
//! voxel data is read from `vox_offset` (the crate reads from byte 352 when padding follows the
//! header), a NaN or zero `scl_slope` means no scaling (as nibabel), the affine is computed here
//! with nibabel's rules (the crate panics on `pixdim[0] = 0`), NIfTI-2 is read by our own header
//! parser, and writing is ours (the crate's writer drops slope/intercept and mangles names).
//!
//! Arrays are `[channel][i][j][k]` with `k` fastest: `nib.load(f).get_fdata()` indexed `[i, j, k, t]`
//! and moved to channel-first, so models trained with MONAI see the same axes.

use std::io::{BufRead, Cursor, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, ensure};
use nifti::{Endianness, NiftiHeader};

use crate::volume::{Affine, Volume};

/// What a NIfTI file's voxels were stored as, for writing results back faithfully.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredType {
    /// `uint8`.
    U8,
    /// `int8`.
    I8,
    /// `int16`.
    I16,
    /// `uint16`.
    U16,
    /// `int32`.
    I32,
    /// `uint32`.
    U32,
    /// `int64`.
    I64,
    /// `uint64`.
    U64,
    /// `float32`.
    F32,
    /// `float64`.
    F64,
}

impl StoredType {
    fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            2 => Self::U8,
            256 => Self::I8,
            4 => Self::I16,
            512 => Self::U16,
            8 => Self::I32,
            768 => Self::U32,
            1024 => Self::I64,
            1280 => Self::U64,
            16 => Self::F32,
            64 => Self::F64,
            _ => return None,
        })
    }

    /// NIfTI `datatype` code.
    pub fn code(self) -> i16 {
        match self {
            Self::U8 => 2,
            Self::I8 => 256,
            Self::I16 => 4,
            Self::U16 => 512,
            Self::I32 => 8,
            Self::U32 => 768,
            Self::I64 => 1024,
            Self::U64 => 1280,
            Self::F32 => 16,
            Self::F64 => 64,
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    /// Whether values are integers (labels are stored as integers).
    pub fn is_integer(self) -> bool {
        !matches!(self, Self::F32 | Self::F64)
    }
}

fn type_name(code: i16) -> &'static str {
    match code {
        1 => "binary (1 bit)",
        32 => "complex64",
        128 => "RGB24",
        1536 => "float128",
        1792 => "complex128",
        2048 => "complex256",
        2304 => "RGBA32",
        _ => "unknown",
    }
}

/// Header facts kept with a volume, enough to write a result on the same grid with the same codes.
#[derive(Clone, Debug, PartialEq)]
pub struct NiftiMeta {
    /// `qform_code` and the quaternion parameters (b, c, d, x, y, z) and `pixdim[0..4]`.
    pub qform_code: i16,
    /// `quatern_b/c/d` and `qoffset_x/y/z`.
    pub quatern: [f32; 6],
    /// `pixdim[0..8]` (pixdim[0] is qfac).
    pub pixdim: [f32; 8],
    /// `sform_code`.
    pub sform_code: i16,
    /// `srow_x`, `srow_y`, `srow_z`.
    pub srow: [[f32; 4]; 3],
    /// `xyzt_units`.
    pub xyzt_units: u8,
    /// How the voxels were stored.
    pub stored: StoredType,
    /// Whether the source was NIfTI-2.
    pub nifti2: bool,
}

/// A volume read from a NIfTI file, with what is needed to write results back onto its grid.
#[derive(Clone, Debug)]
pub struct NiftiImage {
    /// Voxels (scaled by slope/intercept) and the affine nibabel reports.
    pub volume: Volume,
    /// Header facts for writing on the same grid.
    pub meta: NiftiMeta,
}

/// The parts of a NIfTI-1 or NIfTI-2 header this module uses, widened to 64 bits.
struct Header {
    dim: [i64; 8],
    datatype: i16,
    pixdim: [f64; 8],
    vox_offset: f64,
    scl_slope: f64,
    scl_inter: f64,
    qform_code: i16,
    sform_code: i16,
    quatern: [f64; 6],
    srow: [[f64; 4]; 3],
    xyzt_units: u8,
    big_endian: bool,
    single_file: bool,
    nifti2: bool,
}

/// The most bytes [`read_nifti`] accepts in a file, inflated: 4 GiB (a 1024^3 float32 volume).
/// Larger files, and headers that declare more voxel bytes, are refused before anything is
/// allocated; a gzip stream is inflated only as far as the voxels its header declares.
pub const MAX_NIFTI_BYTES: u64 = 4 << 30;

/// Opens a regular file of at most `limit` bytes as a byte stream, inflating gzip as it is read.
/// Nothing is read ahead: the caller reads the header, checks what the header declares against
/// `limit`, and then reads exactly the voxels (a gzip bomb never inflates past them). Also
/// returns the length of an uncompressed file (`None` for gzip, whose length is known only by
/// inflating it).
fn open_stream(path: &Path, limit: u64) -> Result<(Box<dyn Read>, Option<u64>)> {
    let name = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {name}"))?;
    // /dev/zero, a pipe or a folder would be read until memory runs out, or fail obscurely.
    ensure!(meta.is_file(), "{name} is not a regular file (a device, pipe or folder)");
    ensure!(meta.len() <= limit, "{name} is {} bytes, more than the limit of {limit}", meta.len());
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {name}"))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let gzip = reader.fill_buf().with_context(|| format!("cannot read {name}"))?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        (Box::new(flate2::read::MultiGzDecoder::new(reader)), None)
    } else {
        (Box::new(reader), Some(meta.len()))
    })
}

/// Reads up to `n` bytes, fewer only at the end of the stream.
fn read_up_to(r: &mut dyn Read, n: usize, path: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    r.take(n as u64)
        .read_to_end(&mut out)
        .with_context(|| format!("{}: gzip stream is corrupt or truncated", path.display()))?;
    Ok(out)
}

/// Reads a header from the start of a stream: 348 bytes (NIfTI-1) or 540 (NIfTI-2), chosen by
/// the size field. Returns the header and how many bytes were consumed.
fn read_header(r: &mut dyn Read, path: &Path) -> Result<(Header, usize)> {
    let mut bytes = read_up_to(r, 4, path)?;
    let is_nifti2 = bytes.len() == 4 && {
        let b: [u8; 4] = [bytes[0], bytes[1], bytes[2], bytes[3]];
        i32::from_le_bytes(b) == 540 || i32::from_be_bytes(b) == 540
    };
    let total = if is_nifti2 { 540 } else { 348 };
    bytes.extend(read_up_to(r, total - bytes.len().min(total), path)?);
    let consumed = bytes.len();
    Ok((parse_header(&bytes, path)?, consumed))
}

fn header_from_nifti1(h: &NiftiHeader) -> Header {
    let f = |v: f32| v as f64;
    Header {
        dim: h.dim.map(|d| d as i16 as i64),
        datatype: h.datatype,
        pixdim: h.pixdim.map(f),
        vox_offset: f(h.vox_offset),
        scl_slope: f(h.scl_slope),
        scl_inter: f(h.scl_inter),
        qform_code: h.qform_code,
        sform_code: h.sform_code,
        quatern: [h.quatern_b, h.quatern_c, h.quatern_d, h.quatern_x, h.quatern_y, h.quatern_z].map(f),
        srow: [h.srow_x.map(f), h.srow_y.map(f), h.srow_z.map(f)],
        xyzt_units: h.xyzt_units,
        big_endian: h.endianness == Endianness::Big,
        single_file: &h.magic == b"n+1\0",
        nifti2: false,
    }
}

/// NIfTI-2: a 540-byte header with 64-bit dims and doubles (the `nifti` crate rejects it).
fn parse_nifti2(b: &[u8]) -> Result<Header> {
    ensure!(b.len() >= 540, "NIfTI-2 header is truncated ({} of 540 bytes)", b.len());
    let big_endian = i32::from_le_bytes(b[0..4].try_into()?) != 540;
    let u16_at = |o: usize| {
        let a = [b[o], b[o + 1]];
        if big_endian { i16::from_be_bytes(a) } else { i16::from_le_bytes(a) }
    };
    let i64_at = |o: usize| {
        let a: [u8; 8] = b[o..o + 8].try_into().unwrap_or_default();
        if big_endian { i64::from_be_bytes(a) } else { i64::from_le_bytes(a) }
    };
    let f64_at = |o: usize| {
        let a: [u8; 8] = b[o..o + 8].try_into().unwrap_or_default();
        if big_endian { f64::from_be_bytes(a) } else { f64::from_le_bytes(a) }
    };
    let magic = &b[4..12];
    ensure!(magic == b"n+2\0\r\n\x1a\n" || magic == b"ni2\0\r\n\x1a\n", "bad NIfTI-2 magic");
    let dim: [i64; 8] = std::array::from_fn(|i| i64_at(16 + 8 * i));
    let pixdim: [f64; 8] = std::array::from_fn(|i| f64_at(104 + 8 * i));
    let srow: [[f64; 4]; 3] = std::array::from_fn(|r| std::array::from_fn(|c| f64_at(400 + 32 * r + 8 * c)));
    let quatern: [f64; 6] = std::array::from_fn(|i| f64_at(352 + 8 * i));
    let i32_at = |o: usize| {
        let a: [u8; 4] = b[o..o + 4].try_into().unwrap_or_default();
        if big_endian { i32::from_be_bytes(a) } else { i32::from_le_bytes(a) }
    };
    Ok(Header {
        dim,
        datatype: u16_at(12),
        pixdim,
        vox_offset: i64_at(168) as f64,
        scl_slope: f64_at(176),
        scl_inter: f64_at(184),
        qform_code: i32_at(344) as i16,
        sform_code: i32_at(348) as i16,
        quatern,
        srow,
        xyzt_units: i32_at(500) as u8,
        big_endian,
        single_file: &magic[..4] == b"n+2\0",
        nifti2: true,
    })
}

fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
    ensure!(bytes.len() >= 4, "{}: file is empty or truncated", path.display());
    let le = i32::from_le_bytes(bytes[0..4].try_into()?);
    let be = i32::from_be_bytes(bytes[0..4].try_into()?);
    if le == 540 || be == 540 {
        return parse_nifti2(bytes).with_context(|| format!("{}: invalid NIfTI-2 header", path.display()));
    }
    ensure!(
        le == 348 || be == 348,
        "{}: not a NIfTI file (header size field is {le}, expected 348 or 540)",
        path.display()
    );
    ensure!(bytes.len() >= 348, "{}: header is truncated ({} of 348 bytes)", path.display(), bytes.len());
    let h = NiftiHeader::from_reader(Cursor::new(&bytes[..348]))
        .map_err(|e| anyhow!("{}: unreadable NIfTI-1 header: {e}", path.display()))?;
    Ok(header_from_nifti1(&h))
}

/// nibabel's `get_best_affine`: sform if its code is set, else qform, else the Analyze-style
/// base affine (x flipped, origin at the centre).
fn best_affine(h: &Header, shape: [usize; 3]) -> Affine {
    if h.sform_code > 0 {
        let s = &h.srow;
        return Affine([s[0], s[1], s[2], [0.0, 0.0, 0.0, 1.0]]);
    }
    if h.qform_code > 0 {
        return qform_affine(h);
    }
    let z = zooms(h);
    let zooms = [-z[0], z[1], z[2]];
    let mut m = [[0.0; 4]; 4];
    for a in 0..3 {
        m[a][a] = zooms[a];
        m[a][3] = -((shape[a] as f64 - 1.0) / 2.0) * zooms[a];
    }
    m[3][3] = 1.0;
    Affine(m)
}

/// nibabel's header fix-ups on load: pixdims 1-3 made positive, zeros replaced by 1.
fn zooms(h: &Header) -> [f64; 3] {
    [h.pixdim[1], h.pixdim[2], h.pixdim[3]].map(|v| if v == 0.0 { 1.0 } else { v.abs() })
}

/// The qform affine as nibabel computes it: w = sqrt(1 - b^2 - c^2 - d^2) (0 when rounding makes
/// that negative), the rotation from the normalised quaternion, and qfac = pixdim[0] read as 1
/// unless it is -1 (nibabel's load-time fix).
fn qform_affine(h: &Header) -> Affine {
    let [x, y, z, qx, qy, qz] = h.quatern;
    let w2 = 1.0 - (x * x + y * y + z * z);
    let w = if w2 < 0.0 { 0.0 } else { w2.sqrt() };
    let nq = w * w + x * x + y * y + z * z;
    let r = if nq < f64::EPSILON {
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    } else {
        let s = 2.0 / nq;
        let (xs, ys, zs) = (x * s, y * s, z * s);
        let (wx, wy, wz) = (w * xs, w * ys, w * zs);
        let (xx, xy, xz) = (x * xs, x * ys, x * zs);
        let (yy, yz, zz) = (y * ys, y * zs, z * zs);
        [
            [1.0 - (yy + zz), xy - wz, xz + wy],
            [xy + wz, 1.0 - (xx + zz), yz - wx],
            [xz - wy, yz + wx, 1.0 - (xx + yy)],
        ]
    };
    let qfac = if h.pixdim[0] == -1.0 { -1.0 } else { 1.0 };
    let mut v = zooms(h);
    v[2] *= qfac;
    let mut m = [[0.0; 4]; 4];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = r[i][j] * v[j];
        }
    }
    m[0][3] = qx;
    m[1][3] = qy;
    m[2][3] = qz;
    m[3][3] = 1.0;
    Affine(m)
}

fn image_file_for(path: &Path) -> PathBuf {
    let s = path.to_string_lossy();
    if let Some(stem) = s.strip_suffix(".hdr.gz") {
        PathBuf::from(format!("{stem}.img.gz"))
    } else if let Some(stem) = s.strip_suffix(".hdr") {
        PathBuf::from(format!("{stem}.img"))
    } else {
        path.to_path_buf()
    }
}

fn decode(raw: &[u8], stored: StoredType, big_endian: bool, slope: f64, inter: f64, out: &mut [f32]) {
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact($n)) {
                let a: [u8; $n] = c.try_into().unwrap_or([0; $n]);
                let v = if big_endian { <$t>::from_be_bytes(a) } else { <$t>::from_le_bytes(a) };
                *o = (v as f64 * slope + inter) as f32;
            }
        };
    }
    match stored {
        StoredType::U8 => conv!(u8, 1),
        StoredType::I8 => conv!(i8, 1),
        StoredType::I16 => conv!(i16, 2),
        StoredType::U16 => conv!(u16, 2),
        StoredType::I32 => conv!(i32, 4),
        StoredType::U32 => conv!(u32, 4),
        StoredType::I64 => conv!(i64, 8),
        StoredType::U64 => conv!(u64, 8),
        StoredType::F32 => conv!(f32, 4),
        StoredType::F64 => conv!(f64, 8),
    }
}

/// Reads a `.nii`, `.nii.gz` or `.hdr`/`.img` pair (NIfTI-1 or NIfTI-2). 3-D images give one
/// channel; a fourth dimension becomes channels; 1-D and 2-D images gain unit axes. Errors name
/// the file and say what is wrong.
pub fn read_nifti(path: &Path) -> Result<NiftiImage> {
    read_nifti_limited(path, MAX_NIFTI_BYTES)
}

/// [`read_nifti`] with another limit on the bytes a file may hold, inflated (a device with
/// little memory sets its own).
///
/// Memory: the voxels are streamed from the file (inflated on the fly) straight into the
/// float32 volume, a row (of at most 65,536 voxels) at a time, so reading takes the volume's 4
/// bytes per voxel and under 1 MiB of buffers, whatever the stored type or compression.
pub fn read_nifti_limited(path: &Path, max_bytes: u64) -> Result<NiftiImage> {
    /// Voxels read and decoded at a time.
    const PIECE: usize = 1 << 16;
    let (mut stream, header_file_len) = open_stream(path, max_bytes)?;
    let (h, consumed) = read_header(&mut *stream, path)?;
    let name = path.display();
    let ndim = h.dim[0];
    ensure!((1..=7).contains(&ndim), "{name}: invalid number of dimensions {ndim}");
    let dims: Vec<i64> = h.dim[1..=ndim as usize].to_vec();
    ensure!(dims.iter().all(|&d| d > 0), "{name}: dimensions {dims:?} must be positive");
    ensure!(dims.iter().skip(4).all(|&d| d == 1), "{name}: {ndim}-D images are not supported beyond 4-D");
    let get = |i: usize| dims.get(i).copied().unwrap_or(1) as usize;
    let shape = [get(0), get(1), get(2)];
    let channels = get(3);
    let stored = StoredType::from_code(h.datatype).ok_or_else(|| {
        anyhow!("{name}: datatype {} ({}) is not supported", h.datatype, type_name(h.datatype))
    })?;
    let count = shape
        .iter()
        .try_fold(channels, |a, &d| a.checked_mul(d))
        .with_context(|| format!("{name}: dimensions {dims:?} are too large"))?;
    let nbytes = count.checked_mul(stored.size()).context("image too large")?;

    // Where the voxels start, and the stream they are read from (positioned at byte `consumed`).
    let (mut data_stream, data_len, offset, consumed) = if h.single_file {
        let header_end = if h.nifti2 { 544 } else { 352 };
        ensure!(
            h.vox_offset >= header_end as f64 || h.vox_offset == 0.0,
            "{name}: vox_offset {} points inside the header",
            h.vox_offset
        );
        let off = if h.vox_offset == 0.0 { header_end } else { h.vox_offset as usize };
        (stream, header_file_len, off, consumed)
    } else {
        let img = image_file_for(path);
        ensure!(
            img != path,
            "{name}: header-only file (magic ni1/ni2) but no .hdr extension to find its .img"
        );
        let (img_stream, img_len) = open_stream(&img, max_bytes)?;
        (img_stream, img_len, h.vox_offset.max(0.0) as usize, 0)
    };
    let end = offset.checked_add(nbytes).filter(|&e| e as u64 <= max_bytes).with_context(|| {
        format!(
            "{name}: the header declares {nbytes} bytes of voxels after offset {offset} (shape {shape:?} x \
             {channels} of {stored:?}), more than the limit of {max_bytes}"
        )
    })?;
    let truncated = |have: usize| {
        anyhow!(
            "{name}: voxel data is truncated ({have} bytes after offset {offset}, shape {:?} x {channels} of {:?} \
             needs {nbytes})",
            shape,
            stored
        )
    };
    // An uncompressed file's length is known: refuse a truncated one before allocating.
    if let Some(len) = data_len.filter(|&len| len < end as u64) {
        return Err(truncated((len as usize).saturating_sub(offset)));
    }
    let skip = offset.saturating_sub(consumed) as u64;
    let skipped = std::io::copy(&mut (&mut *data_stream).take(skip), &mut std::io::sink())
        .with_context(|| format!("{name}: gzip stream is corrupt or truncated"))?;
    ensure!(skipped == skip, truncated(0));

    // nibabel: a zero or non-finite slope means "no scaling"; then the intercept is ignored too.
    let (slope, inter) = if h.scl_slope == 0.0 || !h.scl_slope.is_finite() {
        (1.0, 0.0)
    } else {
        ensure!(h.scl_inter.is_finite(), "{name}: valid scl_slope but non-finite scl_inter {}", h.scl_inter);
        (h.scl_slope, h.scl_inter)
    };

    // Disk order is i fastest; ours is k fastest, channel slowest. Rows are read in pieces of
    // at most PIECE voxels and scattered into place.
    let [ni, nj, nk] = shape;
    let mut data = vec![0.0f32; count];
    let mut raw = vec![0u8; ni.min(PIECE) * stored.size()];
    let mut values = vec![0.0f32; ni.min(PIECE)];
    let mut read = 0usize;
    for c in 0..channels {
        for k in 0..nk {
            for j in 0..nj {
                for i0 in (0..ni).step_by(PIECE) {
                    let n = (ni - i0).min(PIECE);
                    let bytes = &mut raw[..n * stored.size()];
                    read_full(&mut *data_stream, bytes).map_err(|e| match e {
                        Short::Eof(got) => truncated(read + got),
                        Short::Io(e) => anyhow!("{name}: gzip stream is corrupt or truncated ({e})"),
                    })?;
                    read += bytes.len();
                    decode(bytes, stored, h.big_endian, slope, inter, &mut values[..n]);
                    for (di, &v) in values[..n].iter().enumerate() {
                        data[((c * ni + i0 + di) * nj + j) * nk + k] = v;
                    }
                }
            }
        }
    }
    let affine = best_affine(&h, shape);
    let f = |v: f64| v as f32;
    let meta = NiftiMeta {
        qform_code: h.qform_code,
        quatern: h.quatern.map(f),
        pixdim: h.pixdim.map(f),
        sform_code: h.sform_code,
        srow: h.srow.map(|r| r.map(f)),
        xyzt_units: h.xyzt_units,
        stored,
        nifti2: h.nifti2,
    };
    Ok(NiftiImage { volume: Volume { data, shape, channels, affine }, meta })
}

/// Why [`read_full`] stopped short.
enum Short {
    /// The stream ended after this many bytes.
    Eof(usize),
    /// A read failed (a corrupt gzip stream).
    Io(std::io::Error),
}

/// `read_exact` that says how many bytes arrived before the end of the stream.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::result::Result<(), Short> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(Short::Eof(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Short::Io(e)),
        }
    }
    Ok(())
}

/// Integer types a label map can be written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelType {
    /// Up to 255 classes.
    U8,
    /// Up to 32767 classes.
    I16,
}

/// Metadata for writing a volume that has no source file: an affine of `spacing` along the axes.
pub fn meta_for_spacing(spacing: [f32; 3], stored: StoredType) -> NiftiMeta {
    meta_for_affine(&Affine::from_spacing(spacing.map(f64::from)), stored)
}

/// Metadata for writing a volume whose grid is `affine` (e.g. one read from DICOM): the sform
/// holds the affine and the qform the same grid as a rotation, voxel sizes and offset (the
/// quaternion of NIfTI's `nifti_mat44_to_quatern`), both with code 1 (scanner), so readers that
/// prefer either (nibabel the sform, ITK the qform) place the voxels alike.
pub fn meta_for_affine(affine: &Affine, stored: StoredType) -> NiftiMeta {
    let m = &affine.0;
    let zooms: [f64; 3] = std::array::from_fn(|j| (0..3).map(|i| m[i][j] * m[i][j]).sum::<f64>().sqrt());
    let mut r = [[0.0f64; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            r[i][j] = if zooms[j] > 0.0 {
                m[i][j] / zooms[j]
            } else if i == j {
                1.0
            } else {
                0.0
            };
        }
    }
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    // A left-handed grid is a rotation with the third axis flipped: qfac = -1.
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    for row in &mut r {
        row[2] *= qfac;
    }
    let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let (mut a, mut b, mut c, mut d);
    if trace > 0.5 {
        a = 0.5 * trace.sqrt();
        b = 0.25 * (r[2][1] - r[1][2]) / a;
        c = 0.25 * (r[0][2] - r[2][0]) / a;
        d = 0.25 * (r[1][0] - r[0][1]) / a;
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r[0][1] + r[1][0]) / b;
            d = 0.25 * (r[0][2] + r[2][0]) / b;
            a = 0.25 * (r[2][1] - r[1][2]) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r[0][1] + r[1][0]) / c;
            d = 0.25 * (r[1][2] + r[2][1]) / c;
            a = 0.25 * (r[0][2] - r[2][0]) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r[0][2] + r[2][0]) / d;
            c = 0.25 * (r[1][2] + r[2][1]) / d;
            a = 0.25 * (r[1][0] - r[0][1]) / d;
        }
        if a < 0.0 {
            (a, b, c, d) = (-a, -b, -c, -d);
        }
    }
    // The stored quaternion omits a = sqrt(1 - b^2 - c^2 - d^2), kept non-negative above.
    debug_assert!(a >= 0.0);
    NiftiMeta {
        qform_code: 1,
        quatern: [b as f32, c as f32, d as f32, m[0][3] as f32, m[1][3] as f32, m[2][3] as f32],
        pixdim: [qfac as f32, zooms[0] as f32, zooms[1] as f32, zooms[2] as f32, 1.0, 1.0, 1.0, 1.0],
        sform_code: 1,
        srow: std::array::from_fn(|i| std::array::from_fn(|j| m[i][j] as f32)),
        xyzt_units: 2 | 8, // mm, s
        stored,
        nifti2: false,
    }
}

/// A NIfTI-1 header (348 bytes, little-endian) for `shape` x `channels` values of `stored`,
/// with the grid and codes of `meta`.
fn nifti1_header(
    shape: [usize; 3],
    channels: usize,
    stored: StoredType,
    meta: &NiftiMeta,
    slope: f32,
) -> Result<Vec<u8>> {
    let mut h = vec![0u8; 352];
    let put_i16 = |h: &mut Vec<u8>, o: usize, v: i16| h[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put_i32 = |h: &mut Vec<u8>, o: usize, v: i32| h[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put_f32 = |h: &mut Vec<u8>, o: usize, v: f32| h[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put_i32(&mut h, 0, 348);
    let ndim = if channels > 1 { 4 } else { 3 };
    let dims = [ndim, shape[0], shape[1], shape[2], channels, 1, 1, 1];
    for (i, &d) in dims.iter().enumerate() {
        let d = i16::try_from(d).map_err(|_| anyhow!("dimension {d} is too large for NIfTI-1"))?;
        put_i16(&mut h, 40 + 2 * i, d);
    }
    put_i16(&mut h, 70, stored.code());
    put_i16(&mut h, 72, (stored.size() * 8) as i16);
    for (i, &p) in meta.pixdim.iter().enumerate() {
        put_f32(&mut h, 76 + 4 * i, p);
    }
    put_f32(&mut h, 108, 352.0); // vox_offset
    put_f32(&mut h, 112, slope); // scl_slope
    put_f32(&mut h, 116, 0.0); // scl_inter
    h[123] = meta.xyzt_units;
    let descrip = b"glmae";
    h[148..148 + descrip.len()].copy_from_slice(descrip);
    put_i16(&mut h, 252, meta.qform_code);
    put_i16(&mut h, 254, meta.sform_code);
    for (i, &q) in meta.quatern.iter().enumerate() {
        put_f32(&mut h, 256 + 4 * i, q);
    }
    for (r, row) in meta.srow.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            put_f32(&mut h, 280 + 16 * r + 4 * c, v);
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    Ok(h)
}

/// Writes `data` (`[channel][i][j][k]`, `k` fastest) as NIfTI-1, gzip-compressed when the path
/// ends in `.gz`, atomically: a temporary file in the same folder is renamed into place, so a
/// failure never leaves a partial file. Values are converted to `stored` (rounded for integers).
pub fn write_nifti(
    path: &Path,
    data: &[f32],
    shape: [usize; 3],
    channels: usize,
    meta: &NiftiMeta,
    stored: StoredType,
) -> Result<()> {
    ensure!(
        data.len() == shape.iter().product::<usize>() * channels,
        "{}: {} values do not fill shape {shape:?} x {channels}",
        path.display(),
        data.len()
    );
    let mut w = ChannelWriter::create(path, shape, channels, meta, stored, 1.0)?;
    for block in data.chunks_exact(shape.iter().product::<usize>().max(1)).take(channels) {
        w.write_channel(block)?;
    }
    w.finish()
}

/// A NIfTI-1 file written one channel at a time (the file stores channels as whole 3-D blocks),
/// so a many-channel output never has to be in memory at once: 14 probability maps of a
/// 512 x 512 x 300 CT are 4.4 GB as float32. The file appears only on [`ChannelWriter::finish`]
/// (a temporary file beside it, flushed and renamed, as [`crate::io::atomic_write`]); one dropped unfinished
/// removes its temporary file.
pub struct ChannelWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<Sink>,
    shape: [usize; 3],
    channels: usize,
    written: usize,
    stored: StoredType,
    slope: f32,
}

impl ChannelWriter {
    /// Starts `path` (gzip when it ends in `.gz`) for `channels` blocks of `shape` on `meta`'s
    /// grid, stored as `stored` with `scl_slope` = `slope` (values are written as `v / slope`,
    /// so readers get `v` back: uint8 with slope 1/255 holds probabilities to 0.002).
    pub fn create(
        path: &Path,
        shape: [usize; 3],
        channels: usize,
        meta: &NiftiMeta,
        stored: StoredType,
        slope: f32,
    ) -> Result<Self> {
        ensure!(slope.is_finite() && slope > 0.0, "{}: scl_slope {slope} must be positive", path.display());
        let header = nifti1_header(shape, channels, stored, meta, slope)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let target = crate::io::output_target(path)?;
        let dir = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let file = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", path.display()))?;
        let buffered = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut out = if name.ends_with(".gz") {
            Sink::Gz(Box::new(flate2::write::GzEncoder::new(buffered, flate2::Compression::new(6))))
        } else {
            Sink::Plain(buffered)
        };
        let mut w = Self { path: target, tmp, out: None, shape, channels, written: 0, stored, slope };
        out.write_all(&header).with_context(|| format!("cannot write {}", path.display()))?;
        w.out = Some(out);
        Ok(w)
    }

    /// Appends the next channel, `[i][j][k]` row-major (the [`Volume`] layout), of float32 values
    /// or of anything that widens to them (uint8 labels). Encoded one `k` slab at a time, so
    /// writing takes a buffer of one slab, not a copy of the channel.
    pub fn write_channel<T: Copy + Into<f32>>(&mut self, data: &[T]) -> Result<()> {
        let [ni, nj, nk] = self.shape;
        let name = self.path.display();
        ensure!(
            data.len() == ni * nj * nk,
            "{name}: {} values do not fill shape {:?}",
            data.len(),
            self.shape
        );
        ensure!(self.written < self.channels, "{name}: more than the {} channels announced", self.channels);
        let out = self.out.as_mut().ok_or_else(|| anyhow!("{name}: writer is closed"))?;
        let mut bytes = Vec::with_capacity(ni * nj * self.stored.size());
        let inv = 1.0 / self.slope;
        for k in 0..nk {
            bytes.clear();
            for j in 0..nj {
                for i in 0..ni {
                    let v: f32 = data[(i * nj + j) * nk + k].into();
                    encode_value(&mut bytes, if self.slope == 1.0 { v } else { v * inv }, self.stored);
                }
            }
            out.write_all(&bytes).with_context(|| format!("cannot write {name}"))?;
        }
        self.written += 1;
        Ok(())
    }

    /// Checks that every channel was written, flushes to disk and renames into place.
    pub fn finish(mut self) -> Result<()> {
        let name = self.path.display().to_string();
        ensure!(
            self.written == self.channels,
            "{name}: {} of {} channels written",
            self.written,
            self.channels
        );
        let out = self.out.take().ok_or_else(|| anyhow!("{name}: writer is closed"))?;
        let result = (|| -> Result<()> {
            let buffered = match out {
                Sink::Plain(b) => b,
                Sink::Gz(g) => g.finish()?,
            };
            buffered.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
            std::fs::rename(&self.tmp, &self.path)?;
            Ok(())
        })();
        result.with_context(|| format!("cannot write {name}"))
    }
}

/// Where a [`ChannelWriter`] writes: the temporary file, through gzip or not.
enum Sink {
    Plain(std::io::BufWriter<std::fs::File>),
    Gz(Box<flate2::write::GzEncoder<std::io::BufWriter<std::fs::File>>>),
}

impl Sink {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(bytes),
            Sink::Gz(w) => w.write_all(bytes),
        }
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        // Unfinished (an error on the way): no half-written output stays behind.
        if self.tmp.exists() {
            self.out = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn encode_value(out: &mut Vec<u8>, v: f32, stored: StoredType) {
    let r = v.round() as f64;
    match stored {
        StoredType::U8 => out.push(r.clamp(0.0, 255.0) as u8),
        StoredType::I8 => out.push(r.clamp(-128.0, 127.0) as i8 as u8),
        StoredType::I16 => out.extend_from_slice(&(r.clamp(-32768.0, 32767.0) as i16).to_le_bytes()),
        StoredType::U16 => out.extend_from_slice(&(r.clamp(0.0, 65535.0) as u16).to_le_bytes()),
        StoredType::I32 => out.extend_from_slice(&(r as i32).to_le_bytes()),
        StoredType::U32 => out.extend_from_slice(&(r.max(0.0) as u32).to_le_bytes()),
        StoredType::I64 => out.extend_from_slice(&(r as i64).to_le_bytes()),
        StoredType::U64 => out.extend_from_slice(&(r.max(0.0) as u64).to_le_bytes()),
        StoredType::F32 => out.extend_from_slice(&v.to_le_bytes()),
        StoredType::F64 => out.extend_from_slice(&(v as f64).to_le_bytes()),
    }
}

/// Writes a label map on a source image's grid, with its affine and codes, as uint8 or int16.
pub fn write_labels(
    path: &Path,
    labels: &[u8],
    shape: [usize; 3],
    source: &NiftiMeta,
    ty: LabelType,
) -> Result<()> {
    ensure!(
        labels.len() == shape.iter().product::<usize>(),
        "{}: {} labels do not fill shape {shape:?}",
        path.display(),
        labels.len()
    );
    let stored = match ty {
        LabelType::U8 => StoredType::U8,
        LabelType::I16 => StoredType::I16,
    };
    // Straight from the uint8 labels: no float32 copy of a source-sized volume.
    let mut w = ChannelWriter::create(path, shape, 1, source, stored, 1.0)?;
    w.write_channel(labels)?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grid written with [`meta_for_affine`] reads back as the same affine from its sform and,
    /// with the sform cleared, from its qform alone: axial RAS, LPS-like, sagittal, oblique and
    /// left-handed grids.
    #[test]
    fn affine_metadata_round_trips_through_sform_and_qform() -> Result<()> {
        let (c, s) = (15f64.to_radians().cos(), 15f64.to_radians().sin());
        let affines = [
            [[0.8, 0.0, 0.0, -10.0], [0.0, 0.9, 0.0, 20.0], [0.0, 0.0, 2.5, -30.0]],
            [[-0.7, 0.0, 0.0, 100.0], [0.0, -0.7, 0.0, 120.0], [0.0, 0.0, 3.0, -400.0]],
            [[0.0, 0.0, -2.0, 50.0], [-0.5, 0.0, 0.0, 10.0], [0.0, -0.6, 0.0, 5.0]],
            [[0.7 * c, 0.0, -2.0 * s, 1.0], [0.7 * s, 0.0, 2.0 * c, 2.0], [0.0, -0.8, 0.0, 3.0]],
            [[-0.7 * c, 0.7 * s, 0.0, 1.0], [0.7 * s, 0.7 * c, 0.0, 2.0], [0.0, 0.0, 1.5, 3.0]],
        ];
        let dir = std::env::temp_dir().join(format!("glmae-affine-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        for (n, rows) in affines.iter().enumerate() {
            let mut m = [[0.0; 4]; 4];
            m[..3].copy_from_slice(rows);
            m[3][3] = 1.0;
            let affine = Affine(m);
            let meta = meta_for_affine(&affine, StoredType::F32);
            let qform_only = NiftiMeta { sform_code: 0, ..meta.clone() };
            for (tag, meta) in [("sform", meta), ("qform", qform_only)] {
                let path = dir.join(format!("{n}-{tag}.nii"));
                write_nifti(&path, &[0.0; 8], [2, 2, 2], 1, &meta, StoredType::F32)?;
                let back = read_nifti(&path)?.volume.affine;
                for r in 0..3 {
                    for c in 0..4 {
                        let (a, b) = (back.0[r][c], affine.0[r][c]);
                        assert!((a - b).abs() < 1e-4, "affine {n} via {tag}: [{r}][{c}] {a} != {b}");
                    }
                }
            }
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
