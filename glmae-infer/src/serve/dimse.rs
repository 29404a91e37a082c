//! DIMSE command sets, in implicit VR little endian: the command fields and status codes used,
//! parsing a request's command set and encoding a response's.

use anyhow::{Context, Result};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::{TransferSyntax, TransferSyntaxIndex, TransferSyntaxRegistry};

use super::IMPLICIT_VR_LE;

/// DIMSE status codes used here.
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (queue full, instance too large, disk full).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: cannot understand (the data set does not parse or lacks its UIDs).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Unrecognized operation (a DIMSE command other than C-STORE and C-ECHO).
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
}

pub(super) const C_STORE_RQ: u16 = 0x0001;
pub(super) const C_STORE_RSP: u16 = 0x8001;
pub(super) const C_ECHO_RQ: u16 = 0x0030;
pub(super) const C_ECHO_RSP: u16 = 0x8030;
/// CommandDataSetType: no data set follows.
const NO_DATA_SET: u16 = 0x0101;

/// The command set of a request, in implicit VR little endian.
pub(super) struct Command {
    pub(super) field: u16,
    pub(super) message_id: u16,
    pub(super) has_data_set: bool,
    pub(super) sop_class: String,
    pub(super) sop_instance: String,
}

pub(super) fn implicit_le() -> Result<&'static TransferSyntax> {
    transfer_syntax(IMPLICIT_VR_LE)
}

pub(super) fn transfer_syntax(uid: &str) -> Result<&'static TransferSyntax> {
    TransferSyntaxRegistry
        .get(uid)
        .filter(|ts| !ts.is_unsupported())
        .with_context(|| format!("transfer syntax {uid} is not supported"))
}

pub(super) use glmae_data::dicom::text;

pub(super) fn parse_command(bytes: &[u8]) -> Result<Command> {
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, implicit_le()?)
        .map_err(|e| anyhow::anyhow!("the command set does not parse: {e}"))?;
    let int = |tag: Tag, name: &str| -> Result<u16> {
        obj.get(tag)
            .with_context(|| format!("the command has no {name}"))?
            .to_int::<u16>()
            .map_err(|e| anyhow::anyhow!("the command's {name} is not a number: {e}"))
    };
    let field = int(tags::COMMAND_FIELD, "CommandField")?;
    let message_id = int(tags::MESSAGE_ID, "MessageID").unwrap_or(0);
    let has_data_set = int(tags::COMMAND_DATA_SET_TYPE, "CommandDataSetType")? != NO_DATA_SET;
    Ok(Command {
        field,
        message_id,
        has_data_set,
        sop_class: text(&obj, tags::AFFECTED_SOP_CLASS_UID),
        sop_instance: text(&obj, tags::AFFECTED_SOP_INSTANCE_UID),
    })
}

/// A response command set: `field`, the request's message ID, `status`, the affected UIDs
/// where given, an error comment where given.
pub(super) fn response(
    field: u16,
    message_id: u16,
    status: u16,
    sop_class: &str,
    sop_instance: &str,
    comment: &str,
) -> Result<Vec<u8>> {
    let mut elements = vec![
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(field)),
        DataElement::new(tags::MESSAGE_ID_BEING_RESPONDED_TO, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(tags::COMMAND_DATA_SET_TYPE, VR::US, PrimitiveValue::from(NO_DATA_SET)),
        DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(status)),
    ];
    if !sop_class.is_empty() {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ));
    }
    if !sop_instance.is_empty() {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance),
        ));
    }
    if !comment.is_empty() {
        // ErrorComment is LO: at most 64 characters.
        let c: String = comment.chars().filter(|c| c.is_ascii() && !c.is_ascii_control()).take(64).collect();
        elements.push(DataElement::new(tags::ERROR_COMMENT, VR::LO, PrimitiveValue::from(c)));
    }
    encode_command(elements)
}

pub(super) fn encode_command(elements: Vec<dicom_object::mem::InMemElement>) -> Result<Vec<u8>> {
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, implicit_le()?)
        .map_err(|e| anyhow::anyhow!("cannot encode a command set: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Command sets round-trip: a C-STORE-RSP encodes with its group length and parses back.
    #[test]
    fn responses_encode_as_command_sets() -> Result<()> {
        let bytes =
            response(C_STORE_RSP, 7, status::CANNOT_UNDERSTAND, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "why")?;
        let obj = InMemDicomObject::read_dataset_with_ts(bytes.as_slice(), implicit_le()?)?;
        let len = obj.get(Tag(0, 0)).context("no CommandGroupLength")?.to_int::<u32>()?;
        assert_eq!(len as usize, bytes.len() - 12);
        assert_eq!(obj.get(tags::STATUS).context("no Status")?.to_int::<u16>()?, 0xC000);
        assert_eq!(text(&obj, tags::AFFECTED_SOP_INSTANCE_UID), "1.2.3");
        let cmd = parse_command(&bytes)?;
        assert_eq!((cmd.field, cmd.has_data_set, cmd.sop_instance.as_str()), (C_STORE_RSP, false, "1.2.3"));
        Ok(())
    }
}
