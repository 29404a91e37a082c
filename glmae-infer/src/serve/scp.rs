//! The storage SCP: the accept loop, the association limit, and each association's C-STORE and
//! C-ECHO requests received and answered.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Result;
use dicom_ul::ServerAssociation;
use dicom_ul::association::Association as _;
use dicom_ul::association::server::{AcceptCalledAeTitle, DefaultNegotiation, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason, AssociationRJSource,
    PDataValue, PDataValueType, Pdu, PresentationContextResultReason,
};

use super::dimse::{C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP, parse_command, response, status};
use super::log;
use super::queue::SeriesQueue;
use super::store::{Stored, store};

/// The largest command set accepted (they are a few hundred bytes).
const MAX_COMMAND_BYTES: usize = 64 << 10;

/// What the association threads share: the spool, the queue, the limits.
pub(super) struct Inbox {
    pub(super) spool: PathBuf,
    pub(super) queue: Mutex<SeriesQueue>,
    pub(super) max_instance_bytes: usize,
    /// Associations open now.
    pub(super) active: AtomicUsize,
    pub(super) options: ServerAssociationOptions<'static, AcceptCalledAeTitle, DefaultNegotiation>,
}

impl Inbox {
    pub(super) fn queue(&self) -> MutexGuard<'_, SeriesQueue> {
        // A panic while the lock was held leaves the map consistent (every update is one
        // statement), so a poisoned lock is used as it is.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Holds one association slot; gives it back when dropped (by a thread that ends or panics,
/// or with a thread that could not be started).
struct Slot(Arc<Inbox>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts connections until `stop`; each association runs on its own thread.
pub(super) fn accept_loop(listener: &TcpListener, inbox: &Arc<Inbox>, max: usize, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => {
                log(format_args!("cannot accept a connection: {e}"));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if let Err(e) = stream.set_nonblocking(false) {
            log(format_args!("{peer}: cannot use the connection: {e}"));
            continue;
        }
        if inbox.active.fetch_add(1, Ordering::SeqCst) >= max {
            inbox.active.fetch_sub(1, Ordering::SeqCst);
            reject_busy(stream, peer, max);
            continue;
        }
        let slot = Slot(Arc::clone(inbox));
        let spawned = std::thread::Builder::new().name(format!("assoc {peer}")).spawn(move || {
            handle_connection(&slot.0, stream, peer);
            drop(slot);
        });
        if let Err(e) = spawned {
            // The closure, and the slot in it, is dropped with the error.
            log(format_args!("{peer}: cannot start a thread for the association: {e}"));
        }
    }
}

/// Reads the association request and rejects it: transient, local limit exceeded.
fn reject_busy(mut stream: TcpStream, peer: SocketAddr, max: usize) {
    use std::io::Read as _;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    // The A-ASSOCIATE-RQ is read (its 6-byte header says how long it is) before the answer,
    // so that closing does not reset the connection under the peer's unread request.
    let mut header = [0u8; 6];
    if stream.read_exact(&mut header).is_ok() {
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        let _ = std::io::copy(&mut (&mut stream).take(u64::from(len.min(1 << 16))), &mut std::io::sink());
    }
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut out = Vec::new();
    if dicom_ul::pdu::write_pdu(&mut out, &rj).is_ok() {
        let _ = stream.write_all(&out);
    }
    log(format_args!("{peer}: association rejected: {max} associations are open already"));
}

/// Negotiates and serves one association; logs what it received.
fn handle_connection(inbox: &Inbox, stream: TcpStream, peer: SocketAddr) {
    let assoc = match inbox.options.establish(stream) {
        Ok(a) => a,
        Err(e) => {
            log(format_args!("{peer}: association refused: {e}"));
            return;
        }
    };
    let peer_ae = assoc.peer_ae_title().to_string();
    let who = format!("{peer_ae} ({peer})");
    let stats = serve_association(inbox, assoc, &peer_ae, &who);
    if stats.stored + stats.refused + stats.ignored > 0 || stats.ended.is_some() {
        log(format_args!(
            "association with {who} ended{}: {} instance(s) stored, {} refused, {} without pixel data acknowledged",
            stats.ended.map(|e| format!(" ({e})")).unwrap_or_default(),
            stats.stored,
            stats.refused,
            stats.ignored
        ));
    }
}

/// Counts of one association.
#[derive(Default)]
struct AssocStats {
    stored: usize,
    refused: usize,
    ignored: usize,
    /// Why it ended, when not by a release.
    ended: Option<String>,
}

/// A DIMSE request whose data set is being received.
pub(super) struct Request {
    field: u16,
    message_id: u16,
    context: u8,
    pub(super) sop_class: String,
    pub(super) sop_instance: String,
}

pub(super) fn send_command(
    assoc: &mut ServerAssociation<TcpStream>,
    context: u8,
    data: Vec<u8>,
) -> Result<()> {
    let pdu = Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: context,
            value_type: PDataValueType::Command,
            is_last: true,
            data,
        }],
    };
    assoc.send(&pdu).map_err(|e| anyhow::anyhow!("cannot send a response: {e}"))
}

/// Receives C-STORE and C-ECHO requests until the peer releases or aborts the association, or
/// it breaks (then it is aborted).
fn serve_association(
    inbox: &Inbox,
    mut assoc: ServerAssociation<TcpStream>,
    peer_ae: &str,
    who: &str,
) -> AssocStats {
    let mut stats = AssocStats::default();
    let mut command: Vec<u8> = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let mut too_large = false;
    let mut request: Option<Request> = None;
    let ended = 'pdus: loop {
        let pdu = match assoc.receive() {
            Ok(p) => p,
            Err(e) => break 'pdus format!("{e}"),
        };
        let values = match pdu {
            Pdu::PData { data } => data,
            Pdu::ReleaseRQ => {
                if let Err(e) = assoc.send(&Pdu::ReleaseRP) {
                    stats.ended = Some(format!("cannot confirm the release: {e}"));
                }
                return stats;
            }
            Pdu::AbortRQ { source } => {
                stats.ended = Some(format!("aborted by the peer: {source:?}"));
                return stats;
            }
            other => break 'pdus format!("unexpected {}", other.short_description()),
        };
        for v in values {
            let context = v.presentation_context_id;
            let accepted = assoc
                .presentation_contexts()
                .iter()
                .find(|pc| pc.id == context && pc.reason == PresentationContextResultReason::Acceptance)
                .map(|pc| pc.transfer_syntax.clone());
            let Some(ts) = accepted else {
                break 'pdus format!("data on presentation context {context}, which was not accepted");
            };
            match v.value_type {
                PDataValueType::Command => {
                    command.extend_from_slice(&v.data);
                    if command.len() > MAX_COMMAND_BYTES {
                        break 'pdus format!("a command set over {MAX_COMMAND_BYTES} bytes");
                    }
                    if !v.is_last {
                        continue;
                    }
                    let cmd = match parse_command(&command) {
                        Ok(c) => c,
                        Err(e) => break 'pdus format!("{e:#}"),
                    };
                    command.clear();
                    if cmd.has_data_set {
                        request = Some(Request {
                            field: cmd.field,
                            message_id: cmd.message_id,
                            context,
                            sop_class: cmd.sop_class,
                            sop_instance: cmd.sop_instance,
                        });
                        data.clear();
                        too_large = false;
                        continue;
                    }
                    let reply = if cmd.field == C_ECHO_RQ {
                        response(C_ECHO_RSP, cmd.message_id, status::SUCCESS, &cmd.sop_class, "", "")
                    } else {
                        log(format_args!("{who}: DIMSE command 0x{:04X} is not served", cmd.field));
                        let field = if cmd.field == C_STORE_RQ { C_STORE_RSP } else { cmd.field | 0x8000 };
                        let code = if cmd.field == C_STORE_RQ {
                            status::CANNOT_UNDERSTAND
                        } else {
                            status::UNRECOGNIZED_OPERATION
                        };
                        response(
                            field,
                            cmd.message_id,
                            code,
                            &cmd.sop_class,
                            &cmd.sop_instance,
                            "no data set",
                        )
                    };
                    if let Err(e) = reply.and_then(|r| send_command(&mut assoc, context, r)) {
                        break 'pdus format!("{e:#}");
                    }
                }
                PDataValueType::Data => {
                    let Some(req) = &request else {
                        break 'pdus "a data set without a command".to_string();
                    };
                    if req.context != context {
                        break 'pdus format!(
                            "a data set on presentation context {context}, its command on {}",
                            req.context
                        );
                    }
                    if !too_large {
                        if data.len() + v.data.len() > inbox.max_instance_bytes {
                            too_large = true;
                            data = Vec::new();
                        } else {
                            data.extend_from_slice(&v.data);
                        }
                    }
                    if !v.is_last {
                        continue;
                    }
                    let Some(req) = request.take() else { continue };
                    let reply = if req.field != C_STORE_RQ {
                        log(format_args!("{who}: DIMSE command 0x{:04X} is not served", req.field));
                        response(
                            req.field | 0x8000,
                            req.message_id,
                            status::UNRECOGNIZED_OPERATION,
                            &req.sop_class,
                            &req.sop_instance,
                            "",
                        )
                    } else {
                        let outcome = if too_large {
                            Err((
                                status::OUT_OF_RESOURCES,
                                format!("larger than {} bytes", inbox.max_instance_bytes),
                            ))
                        } else {
                            store(inbox, &ts, &data, &req, peer_ae)
                        };
                        let (code, comment) = match outcome {
                            Ok(Stored::Spooled) => {
                                stats.stored += 1;
                                (status::SUCCESS, String::new())
                            }
                            Ok(Stored::Ignored) => {
                                stats.ignored += 1;
                                (status::SUCCESS, String::new())
                            }
                            Err((code, why)) => {
                                stats.refused += 1;
                                log(format_args!(
                                    "{who}: instance {} refused (status 0x{code:04X}): {why}",
                                    if req.sop_instance.is_empty() {
                                        "without a UID"
                                    } else {
                                        &req.sop_instance
                                    }
                                ));
                                (code, why)
                            }
                        };
                        response(
                            C_STORE_RSP,
                            req.message_id,
                            code,
                            &req.sop_class,
                            &req.sop_instance,
                            &comment,
                        )
                    };
                    data.clear();
                    if data.capacity() > (16 << 20) {
                        data.shrink_to(16 << 20);
                    }
                    if let Err(e) = reply.and_then(|r| send_command(&mut assoc, context, r)) {
                        break 'pdus format!("{e:#}");
                    }
                }
            }
        }
    };
    stats.ended = Some(ended);
    let _ = assoc.abort();
    stats
}
