//! The storage SCU: a C-STORE destination and the SEG sent to it.

use std::fmt;
use std::io::Write as _;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_ul::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu, PresentationContextResultReason};

use super::dimse::{C_STORE_RQ, encode_command, implicit_le, status, text, transfer_syntax};
use super::{EXPLICIT_VR_LE, IMPLICIT_VR_LE, MAX_PDU_LENGTH, log};

/// A C-STORE destination, `AE@host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The called AE title.
    pub ae_title: String,
    /// `host:port`.
    pub address: String,
}

impl FromStr for Destination {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let Some((ae, address)) = s.split_once('@') else { bail!("destination {s:?} is not AE@host:port") };
        check_ae_title(ae).with_context(|| format!("destination {s:?}"))?;
        let Some((host, port)) = address.rsplit_once(':') else {
            bail!("destination {s:?} is not AE@host:port (no port)")
        };
        ensure!(!host.is_empty(), "destination {s:?} has no host");
        ensure!(port.parse::<u16>().is_ok_and(|p| p > 0), "destination {s:?}: port {port:?} is not 1-65535");
        Ok(Self { ae_title: ae.to_string(), address: address.to_string() })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.ae_title, self.address)
    }
}

/// An AE title: 1 to 16 characters of printable ASCII other than `\`, not all spaces.
pub fn check_ae_title(ae: &str) -> Result<()> {
    ensure!(!ae.trim().is_empty() && ae.len() <= 16, "AE title {ae:?} must have 1 to 16 characters");
    ensure!(
        ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\'),
        "AE title {ae:?} may hold printable ASCII other than a backslash only"
    );
    Ok(())
}

/// Sends a SEG file (its bytes) to `dest` by C-STORE and checks the response status.
pub fn send_seg(dest: &Destination, calling_ae: &str, file: &[u8]) -> Result<()> {
    let after_preamble = file.get(128..).context("the SEG file is shorter than its preamble")?;
    let meta = dicom_object::FileMetaTable::from_reader(after_preamble)
        .map_err(|e| anyhow::anyhow!("the SEG file's meta group does not parse: {e}"))?;
    let sop_class = meta.media_storage_sop_class_uid().trim_end_matches('\0').to_string();
    let sop_instance = meta.media_storage_sop_instance_uid().trim_end_matches('\0').to_string();
    let stored_syntax = meta.transfer_syntax().trim_end_matches('\0').to_string();
    // The data set follows "DICM" and the meta group: its length element (12 bytes) and the
    // length it gives.
    let data_start = 128 + 4 + 12 + meta.information_group_length as usize;
    let timeout = Duration::from_secs(60);
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title(calling_ae.to_string())
        .called_ae_title(dest.ae_title.clone())
        .with_presentation_context(
            sop_class.clone(),
            vec![EXPLICIT_VR_LE.to_string(), IMPLICIT_VR_LE.to_string()],
        )
        .max_pdu_length(MAX_PDU_LENGTH)
        .connection_timeout(Duration::from_secs(10))
        .read_timeout(timeout)
        .write_timeout(timeout)
        .establish(dest.address.as_str())
        .map_err(|e| anyhow::anyhow!("cannot open an association with {dest}: {e}"))?;
    let result = (|| -> Result<()> {
        let pc = assoc
            .presentation_contexts()
            .iter()
            .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .cloned()
            .with_context(|| format!("{dest} does not accept Segmentation Storage ({sop_class})"))?;
        // Sent as stored when the peer takes the file's transfer syntax, else re-encoded.
        let reencoded;
        let data: &[u8] = if pc.transfer_syntax == stored_syntax {
            file.get(data_start..).context("the SEG file ends inside its meta group")?
        } else {
            let obj = dicom_object::from_reader(after_preamble)
                .map_err(|e| anyhow::anyhow!("the SEG file does not parse: {e}"))?;
            let mut out = Vec::new();
            obj.write_dataset_with_ts(&mut out, transfer_syntax(&pc.transfer_syntax)?)
                .map_err(|e| anyhow::anyhow!("cannot encode the SEG in {}: {e}", pc.transfer_syntax))?;
            reencoded = out;
            &reencoded
        };
        let command = encode_command(vec![
            DataElement::new(tags::AFFECTED_SOP_CLASS_UID, VR::UI, PrimitiveValue::from(sop_class.as_str())),
            DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(C_STORE_RQ)),
            DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(1u16)),
            DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0u16)),
            DataElement::new(tags::COMMAND_DATA_SET_TYPE, VR::US, PrimitiveValue::from(0x0000u16)),
            DataElement::new(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(sop_instance.as_str()),
            ),
        ])?;
        assoc
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc.id,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: command,
                }],
            })
            .map_err(|e| anyhow::anyhow!("cannot send the C-STORE request: {e}"))?;
        {
            // Split into P-DATA PDUs within the peer's maximum PDU length.
            let mut w = assoc.send_pdata(pc.id);
            w.write_all(data).and_then(|()| w.finish()).context("cannot send the SEG data set")?;
        }
        let mut reply = Vec::new();
        loop {
            match assoc.receive().map_err(|e| anyhow::anyhow!("no C-STORE response: {e}"))? {
                Pdu::PData { data } => {
                    let mut last = false;
                    for v in data {
                        if v.value_type == PDataValueType::Command {
                            reply.extend_from_slice(&v.data);
                            last |= v.is_last;
                        }
                    }
                    if last {
                        break;
                    }
                }
                other => bail!("unexpected {} instead of the C-STORE response", other.short_description()),
            }
        }
        let rsp = InMemDicomObject::read_dataset_with_ts(reply.as_slice(), implicit_le()?)
            .map_err(|e| anyhow::anyhow!("the C-STORE response does not parse: {e}"))?;
        let code = rsp
            .get(tags::STATUS)
            .and_then(|e| e.to_int::<u16>().ok())
            .context("the C-STORE response has no status")?;
        // 0xB000-0xB007: warnings (stored with coercion), success all the same.
        ensure!(
            code == status::SUCCESS || (0xB000..=0xB007).contains(&code),
            "{dest} answered status 0x{code:04X}{}",
            Some(text(&rsp, tags::ERROR_COMMENT))
                .filter(|c| !c.is_empty())
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        );
        Ok(())
    })();
    match result {
        Ok(()) => {
            if let Err(e) = assoc.release() {
                log(format_args!("{dest}: the SEG was stored; the association release failed: {e}"));
            }
            Ok(())
        }
        Err(e) => {
            let _ = assoc.abort();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use dicom_object::FileMetaTableBuilder;
    use dicom_ul::association::server::ServerAssociationOptions;

    use super::*;
    use crate::serve::SEGMENTATION_STORAGE;
    use crate::serve::dimse::{C_STORE_RSP, parse_command, response};
    use crate::serve::scp::send_command;

    /// The thread of a test SCP: the data set it received and the P-DATA PDUs it took.
    type TestScp = std::thread::JoinHandle<Result<(Vec<u8>, usize)>>;

    #[test]
    fn destinations_parse_and_bad_ones_are_named() -> Result<()> {
        let d: Destination = "PACS@10.0.0.5:104".parse()?;
        assert_eq!(d, Destination { ae_title: "PACS".into(), address: "10.0.0.5:104".into() });
        assert_eq!(d.to_string(), "PACS@10.0.0.5:104");
        let d: Destination = "A@[::1]:11112".parse()?;
        assert_eq!(d.address, "[::1]:11112");
        for bad in [
            "PACS",
            "PACS@host",
            "@host:104",
            "PACS@:104",
            "PACS@host:0",
            "PACS@host:x",
            "A\\B@h:1",
            "SEVENTEEN_CHARS_X@h:1",
        ] {
            // Every error names the destination as given.
            let e =
                format!("{:#}", bad.parse::<Destination>().err().with_context(|| format!("{bad:?} parsed"))?);
            assert!(e.contains(&format!("destination {bad:?}")), "{bad}: {e}");
        }
        Ok(())
    }

    /// A storage SCP on localhost that takes `syntax` only, with 4 KiB PDUs, and answers
    /// `code`; returns the data set it received and the number of P-DATA PDUs it took.
    fn one_store_scp(syntax: &'static str, code: u16) -> Result<(String, TestScp)> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let scp = std::thread::spawn(move || -> Result<(Vec<u8>, usize)> {
            let (stream, _) = listener.accept()?;
            let mut assoc = ServerAssociationOptions::new()
                .accept_called_ae_title()
                .ae_title("DEST")
                .with_abstract_syntax(SEGMENTATION_STORAGE)
                .with_transfer_syntax(syntax)
                .max_pdu_length(4096)
                .establish(stream)?;
            let (mut command, mut data, mut pdus) = (Vec::new(), Vec::new(), 0);
            loop {
                match assoc.receive()? {
                    Pdu::PData { data: values } => {
                        pdus += 1;
                        for v in values {
                            let last = v.is_last;
                            match v.value_type {
                                PDataValueType::Command => command.extend(v.data),
                                PDataValueType::Data => data.extend(v.data),
                            }
                            if last && !data.is_empty() {
                                let c = parse_command(&command)?;
                                assert_eq!((c.field, c.has_data_set), (C_STORE_RQ, true));
                                let rsp = response(
                                    C_STORE_RSP,
                                    c.message_id,
                                    code,
                                    &c.sop_class,
                                    &c.sop_instance,
                                    "",
                                )?;
                                send_command(&mut assoc, v.presentation_context_id, rsp)?;
                            }
                        }
                    }
                    Pdu::ReleaseRQ => {
                        assoc.send(&Pdu::ReleaseRP)?;
                        break;
                    }
                    Pdu::AbortRQ { .. } => break,
                    other => bail!("unexpected {other:?}"),
                }
            }
            Ok((data, pdus))
        });
        Ok((addr, scp))
    }

    /// What the SCP of [`one_store_scp`] received, or why it failed.
    fn received(scp: TestScp) -> Result<(Vec<u8>, usize)> {
        scp.join().map_err(|_| anyhow::anyhow!("the test SCP panicked"))?
    }

    /// `send_seg` sends the stored bytes to a peer that takes explicit VR little endian, a
    /// re-encoded data set to one that takes implicit VR only, both split into PDUs within the
    /// peer's maximum length, and reports a failure status by the peer's name.
    #[test]
    fn segs_are_sent_in_the_syntax_the_peer_takes() -> Result<()> {
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(tags::SOP_CLASS_UID, VR::UI, PrimitiveValue::from(SEGMENTATION_STORAGE)),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from("1.2.3.4")),
            DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(vec![7u8; 20_000])),
        ]);
        let meta = FileMetaTableBuilder::new()
            .transfer_syntax(EXPLICIT_VR_LE)
            .media_storage_sop_class_uid(SEGMENTATION_STORAGE)
            .media_storage_sop_instance_uid("1.2.3.4");
        let mut file = Vec::new();
        obj.with_meta(meta)?.write_all(&mut file)?;
        for syntax in [EXPLICIT_VR_LE, IMPLICIT_VR_LE] {
            let (addr, scp) = one_store_scp(syntax, status::SUCCESS)?;
            let dest = Destination { ae_title: "DEST".into(), address: addr };
            send_seg(&dest, "GLMAE", &file)?;
            let (data, pdus) = received(scp)?;
            let back = InMemDicomObject::read_dataset_with_ts(data.as_slice(), transfer_syntax(syntax)?)?;
            assert_eq!(text(&back, tags::SOP_INSTANCE_UID), "1.2.3.4", "{syntax}");
            assert_eq!(
                back.get(tags::PIXEL_DATA).context("no PixelData")?.to_bytes()?.len(),
                20_000,
                "{syntax}"
            );
            assert!(pdus >= 5, "{pdus} PDUs for 20 kB at 4 kB ({syntax})");
        }
        let (addr, scp) = one_store_scp(EXPLICIT_VR_LE, status::OUT_OF_RESOURCES)?;
        let dest = Destination { ae_title: "DEST".into(), address: addr.clone() };
        let e = format!(
            "{:#}",
            send_seg(&dest, "GLMAE", &file).err().context("status A700 was taken for success")?
        );
        assert!(e.contains(&format!("DEST@{addr} answered status 0xA700")), "{e}");
        received(scp)?;
        Ok(())
    }
}
