//! Bad NIfTI input is an error that names the file and the problem, never a panic, and writing
//! never leaves a partial file.

use std::path::PathBuf;

use glmae_data::nifti_io::{StoredType, meta_for_spacing, write_nifti};
use glmae_data::read_nifti;

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("glmae-nii-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn good_nii(d: &std::path::Path) -> Vec<u8> {
    let p = d.join("good.nii");
    let data: Vec<f32> = (0..60).map(|i| i as f32 - 30.0).collect();
    write_nifti(
        &p,
        &data,
        [3, 4, 5],
        1,
        &meta_for_spacing([1.0, 1.5, 2.0], StoredType::I16),
        StoredType::I16,
    )
    .unwrap();
    let back = read_nifti(&p).unwrap();
    assert_eq!(back.volume.data, data);
    std::fs::read(p).unwrap()
}

fn err_of(d: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap();
    format!("{:#}", read_nifti(&p).unwrap_err())
}

#[test]
fn damaged_files_name_the_file_and_the_problem() {
    let d = temp("bad");
    let good = good_nii(&d);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.nii", vec![], "empty or truncated"),
        ("text.nii", b"hello, this is not an image at all".to_vec(), "not a NIfTI file"),
        ("short_header.nii", good[..200].to_vec(), "header is truncated"),
        ("short_data.nii", good[..good.len() - 10].to_vec(), "voxel data is truncated"),
        (
            "complex.nii",
            {
                let mut b = good.clone();
                b[70..72].copy_from_slice(&32i16.to_le_bytes());
                b
            },
            "datatype 32 (complex64) is not supported",
        ),
        (
            "zero_dim.nii",
            {
                let mut b = good.clone();
                b[44..46].copy_from_slice(&0i16.to_le_bytes());
                b
            },
            "must be positive",
        ),
        (
            "offset.nii",
            {
                let mut b = good.clone();
                b[108..112].copy_from_slice(&100f32.to_le_bytes());
                b
            },
            "vox_offset 100 points inside the header",
        ),
        (
            "nan_inter.nii",
            {
                let mut b = good.clone();
                b[112..116].copy_from_slice(&2f32.to_le_bytes());
                b[116..120].copy_from_slice(&f32::NAN.to_le_bytes());
                b
            },
            "non-finite scl_inter",
        ),
    ];
    for (name, bytes, problem) in cases {
        let e = err_of(&d, name, &bytes);
        assert!(e.contains(name) && e.contains(problem), "{name}: {e}");
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &good).unwrap();
    let gz = gz.finish().unwrap();
    let e = err_of(&d, "cut.nii.gz", &gz[..gz.len() / 2]);
    assert!(e.contains("cut.nii.gz") && e.contains("gzip stream is corrupt or truncated"), "{e}");
    let e = format!("{:#}", read_nifti(&d.join("absent.nii.gz")).unwrap_err());
    assert!(e.contains("absent.nii.gz"), "{e}");
    // A header-only pair whose .img is missing.
    let mut hdr = good[..348].to_vec();
    hdr[344..348].copy_from_slice(b"ni1\0");
    let e = err_of(&d, "lonely.hdr", &hdr);
    assert!(e.contains("lonely.img"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn unwritable_output_is_an_error_and_leaves_nothing_behind() {
    let d = temp("write");
    let meta = meta_for_spacing([1.0; 3], StoredType::U8);
    let e = write_nifti(&d.join("no/such/dir/out.nii.gz"), &[0.0; 8], [2, 2, 2], 1, &meta, StoredType::U8)
        .unwrap_err();
    assert!(format!("{e:#}").contains("no/such/dir/out.nii.gz"), "{e:#}");
    let e = write_nifti(&d.join("short.nii"), &[0.0; 7], [2, 2, 2], 1, &meta, StoredType::U8).unwrap_err();
    assert!(format!("{e:#}").contains("do not fill shape"), "{e:#}");
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "a failed write left a file");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn absurd_nifti2_dimensions_are_an_error_not_an_overflow() {
    let d = temp("huge");
    let mut h = vec![0u8; 548];
    h[0..4].copy_from_slice(&540i32.to_le_bytes());
    h[4..12].copy_from_slice(b"n+2\0\r\n\x1a\n");
    h[12..14].copy_from_slice(&16i16.to_le_bytes());
    h[14..16].copy_from_slice(&32i16.to_le_bytes());
    for (i, v) in [3i64, 1 << 40, 1 << 40, 1 << 40, 1, 1, 1, 1].iter().enumerate() {
        h[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    for i in 0..8 {
        h[104 + 8 * i..112 + 8 * i].copy_from_slice(&1f64.to_le_bytes());
    }
    h[168..176].copy_from_slice(&544i64.to_le_bytes());
    let e = err_of(&d, "huge.nii", &h);
    assert!(e.contains("huge.nii") && e.contains("too large"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Devices and folders are refused by name. A header that declares more voxel bytes than the
/// limit is refused before anything is allocated, and a gzip stream is inflated only as far as
/// the declared voxels: a bomb after a valid image is never inflated (it would fill memory).
#[cfg(unix)]
#[test]
fn devices_and_gzip_bombs_are_refused() {
    let e = read_nifti(std::path::Path::new("/dev/zero")).unwrap_err().to_string();
    assert!(e.contains("/dev/zero") && e.contains("not a regular file"), "{e}");
    let d = temp("bomb");
    assert!(read_nifti(&d).unwrap_err().to_string().contains("not a regular file"));
    let good = good_nii(&d);
    // A 64 x 64 x 64 float32 volume (1 MiB of voxels) against a limit of 64 KiB.
    let mut big = good[..352].to_vec();
    for (a, n) in [64i16, 64, 64].iter().enumerate() {
        big[42 + 2 * a..44 + 2 * a].copy_from_slice(&n.to_le_bytes());
    }
    big[70..72].copy_from_slice(&16i16.to_le_bytes());
    big[72..74].copy_from_slice(&32i16.to_le_bytes());
    let gzip = |bytes: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, bytes).unwrap();
        gz.finish().unwrap()
    };
    let bomb = d.join("bomb.nii.gz");
    std::fs::write(&bomb, gzip(&[big, vec![0u8; 1 << 20]].concat())).unwrap();
    let e = glmae_data::nifti_io::read_nifti_limited(&bomb, 1 << 16).unwrap_err().to_string();
    assert!(e.contains("bomb.nii.gz") && e.contains("1048576 bytes") && e.contains("limit of 65536"), "{e}");
    assert_eq!(read_nifti(&bomb).unwrap().volume.data.len(), 1 << 18);
    // A valid 60-voxel image followed by 16 MiB of zeros in the same gzip stream: the zeros
    // are never inflated, so the 64 KiB limit holds and the image reads back.
    let trailing = d.join("trailing.nii.gz");
    std::fs::write(&trailing, gzip(&[good.clone(), vec![0u8; 16 << 20]].concat())).unwrap();
    let back = glmae_data::nifti_io::read_nifti_limited(&trailing, 1 << 16).unwrap();
    assert_eq!(back.volume.data, read_nifti(&d.join("good.nii")).unwrap().volume.data);
    std::fs::remove_dir_all(&d).unwrap();
}

/// The channel-by-channel writer: a file appears only when every channel was written; one
/// dropped or finished early leaves nothing behind; uint8 with slope 1/255 reads back within
/// half a step of the float values.
#[test]
fn channel_writer_is_atomic_and_scales_uint8() {
    use glmae_data::nifti_io::ChannelWriter;
    let d = temp("channels");
    let meta = meta_for_spacing([1.0, 2.0, 3.0], StoredType::F32);
    let shape = [3, 4, 5];
    let block: Vec<f32> = (0..60).map(|i| i as f32 / 59.0).collect();
    let path = d.join("p.nii.gz");
    let mut w = ChannelWriter::create(&path, shape, 2, &meta, StoredType::U8, 1.0 / 255.0).unwrap();
    w.write_channel(&block).unwrap();
    let e = format!("{:#}", w.finish().unwrap_err());
    assert!(e.contains("1 of 2 channels"), "{e}");
    let mut w = ChannelWriter::create(&path, shape, 2, &meta, StoredType::U8, 1.0 / 255.0).unwrap();
    w.write_channel(&block).unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "an unfinished writer left a file");
    let mut w = ChannelWriter::create(&path, shape, 2, &meta, StoredType::U8, 1.0 / 255.0).unwrap();
    w.write_channel(&block).unwrap();
    let reversed: Vec<f32> = block.iter().rev().copied().collect();
    w.write_channel(&reversed).unwrap();
    assert!(w.write_channel(&block).is_err(), "a third channel was accepted");
    w.finish().unwrap();
    let back = read_nifti(&path).unwrap().volume;
    assert_eq!((back.shape, back.channels), (shape, 2));
    let expected: Vec<f32> = block.iter().chain(&reversed).copied().collect();
    let gap = back.data.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(gap <= 0.5 / 255.0 + 1e-6, "uint8 probabilities {gap} off");
    std::fs::remove_dir_all(&d).unwrap();
}
