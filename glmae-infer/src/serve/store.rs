//! One received instance: its data set checked (it parses, its UIDs, its pixel data) and written
//! to the spool, or the status that refuses it.

use std::time::Instant;

use anyhow::Context;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use super::SEGMENTATION_STORAGE;
use super::dimse::{status, text, transfer_syntax};
use super::scp::{Inbox, Request};
use super::spool::is_uid;

/// What became of an instance that was accepted.
pub(super) enum Stored {
    /// Written to the spool.
    Spooled,
    /// Acknowledged and dropped: no pixel data, or a SEG.
    Ignored,
}

/// Parses a received data set, checks its UIDs and writes it as a DICOM file (its transfer
/// syntax kept) to `SPOOL/<series>/<instance>.dcm`. The error is the status and why.
pub(super) fn store(
    inbox: &Inbox,
    ts_uid: &str,
    bytes: &[u8],
    req: &Request,
    peer_ae: &str,
) -> Result<Stored, (u16, String)> {
    let cannot = |why: String| (status::CANNOT_UNDERSTAND, why);
    let ts = transfer_syntax(ts_uid).map_err(|e| cannot(format!("{e:#}")))?;
    let (series, instance, sop_class, has_pixels, pixel_problem) = {
        let obj = InMemDicomObject::read_dataset_with_ts(bytes, ts)
            .map_err(|e| cannot(format!("the data set does not parse: {e}")))?;
        (
            text(&obj, tags::SERIES_INSTANCE_UID),
            text(&obj, tags::SOP_INSTANCE_UID),
            text(&obj, tags::SOP_CLASS_UID),
            obj.get(tags::PIXEL_DATA).is_some(),
            pixel_data_problem(&obj),
        )
    };
    if !is_uid(&instance) {
        return Err(cannot(format!("SOPInstanceUID {instance:?} is missing or not a UID")));
    }
    if !req.sop_instance.is_empty() && req.sop_instance != instance {
        return Err(cannot(format!("SOPInstanceUID {instance} is not the command's {}", req.sop_instance)));
    }
    if !is_uid(&series) {
        return Err(cannot(format!("SeriesInstanceUID {series:?} is missing or not a UID")));
    }
    if !has_pixels || sop_class == SEGMENTATION_STORAGE {
        return Ok(Stored::Ignored);
    }
    // Caught here, a bad slice is refused alone; in the spool it would spoil its series.
    if let Some(why) = pixel_problem {
        return Err(cannot(why));
    }
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(if sop_class.is_empty() {
            req.sop_class.as_str()
        } else {
            sop_class.as_str()
        })
        .media_storage_sop_instance_uid(instance.as_str())
        .transfer_syntax(ts_uid)
        .source_application_entity_title(peer_ae.trim())
        .build()
        .map_err(|e| cannot(format!("cannot make the file meta group: {e}")))?;
    let mut file = Vec::with_capacity(bytes.len() + 512);
    file.extend_from_slice(&[0u8; 128]);
    file.extend_from_slice(b"DICM");
    meta.write(&mut file).map_err(|e| cannot(format!("cannot write the file meta group: {e}")))?;
    file.extend_from_slice(bytes);

    inbox
        .queue()
        .begin(&series, Instant::now())
        .map_err(|r| (status::OUT_OF_RESOURCES, format!("series {series}: {r}")))?;
    let dir = inbox.spool.join(&series);
    let written = std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))
        .and_then(|()| glmae_data::io::atomic_write(&dir.join(format!("{instance}.dcm")), &file));
    inbox.queue().end(&series, Instant::now(), written.is_ok());
    written.map_err(|e| (status::OUT_OF_RESOURCES, format!("{e:#}")))?;
    Ok(Stored::Spooled)
}

/// Why the native pixel data of `obj` cannot be an image (fewer bytes than its Rows, Columns,
/// SamplesPerPixel, BitsAllocated and NumberOfFrames say, or attributes missing), if it cannot.
fn pixel_data_problem(obj: &InMemDicomObject) -> Option<String> {
    let pixels = obj.get(tags::PIXEL_DATA)?;
    let int = |tag: Tag| obj.get(tag).and_then(|e| e.to_int::<u64>().ok());
    let (Some(rows), Some(columns), Some(bits)) =
        (int(tags::ROWS), int(tags::COLUMNS), int(tags::BITS_ALLOCATED))
    else {
        return Some("pixel data without Rows, Columns or BitsAllocated".to_string());
    };
    let samples = int(tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let frames = int(tags::NUMBER_OF_FRAMES).unwrap_or(1);
    let Ok(data) = pixels.to_bytes() else {
        return Some("the pixel data is not a native (uncompressed) value".to_string());
    };
    let need = rows
        .saturating_mul(columns)
        .saturating_mul(samples)
        .saturating_mul(frames)
        .saturating_mul(bits)
        .div_ceil(8);
    (rows == 0 || columns == 0 || (data.len() as u64) < need).then(|| {
        format!(
            "the pixel data holds {} bytes; {rows} rows x {columns} columns x {samples} samples x {frames} frame(s) of {bits} bits need {need}",
            data.len()
        )
    })
}
