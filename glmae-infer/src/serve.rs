//! `glmae-infer serve`: a DICOM storage SCP that segments every series it receives and sends the
//! result back as a DICOM SEG.
//!
//! A scanner or PACS sends a series by C-STORE; each instance is written as received (its
//! transfer syntax kept) to `SPOOL/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`, atomically, before
//! the C-STORE-RSP says success, so an acknowledged instance is on disk. A series that has been
//! quiet (no instance) for `quiet` is taken by the one worker, read from its spool folder
//! ([`crate::segment_dicom`]), segmented, written as `OUT/<SeriesInstanceUID>.seg.dcm` and,
//! with a destination, sent there by C-STORE. One log line per series says how long each step
//! took.
//!
//! Decisions:
//! - Synchronous: one thread accepts, one thread per association (at most
//!   [`ServeConfig::max_associations`]; more are rejected with "local limit exceeded"), one worker
//!   segments, one series at a time, so memory holds one series' volume.
//! - Any abstract syntax is accepted (promiscuous), with the native transfer syntaxes only
//!   (implicit and explicit VR little endian, explicit VR big endian): what is stored can be
//!   read without a codec. Objects without pixel data (reports, presentation states) and DICOM
//!   SEGs are acknowledged and not kept: there is nothing to segment in them.
//! - Bounded: an instance larger than [`ServeConfig::max_instance_bytes`], an instance of a new
//!   series while [`ServeConfig::max_pending_series`] series wait, or a series past
//!   [`ServeConfig::max_instances_per_series`] get status A700 (out of resources); an instance
//!   that does not parse, or whose SOP Instance or Series Instance UID is missing or not a UID,
//!   gets C000 (cannot understand). Either way the association goes on.
//! - A series that fails (it does not stack, its pixels are compressed, the model fails, even a
//!   panic) is logged and its spool folder moved to `SPOOL/failed/`; the server goes on.
//! - Stop (Ctrl-C): no new associations; the series in hand is finished; series still waiting
//!   stay in the spool and are queued again at the next start, as are any found in
//!   `SPOOL/processing/` (a series whose segmentation was cut short).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::{TransferSyntax, TransferSyntaxIndex, TransferSyntaxRegistry};
use dicom_ul::association::Association as _;
use dicom_ul::association::server::{AcceptCalledAeTitle, DefaultNegotiation, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason, AssociationRJSource,
    PDataValue, PDataValueType, Pdu, PresentationContextResultReason,
};
use dicom_ul::{ClientAssociationOptions, ServerAssociation};
use glmae_core::ModelFile;

use crate::{DicomSegmentation, Engine, SegmentOptions};

/// Segmentation Storage, the SOP class of the SEG objects sent.
pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
const VERIFICATION: &str = "1.2.840.10008.1.1";
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
/// The transfer syntaxes accepted: the native (uncompressed) ones, stored as received.
pub const NATIVE_TRANSFER_SYNTAXES: [&str; 3] = [EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE];

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

const C_STORE_RQ: u16 = 0x0001;
const C_STORE_RSP: u16 = 0x8001;
const C_ECHO_RQ: u16 = 0x0030;
const C_ECHO_RSP: u16 = 0x8030;
/// CommandDataSetType: no data set follows.
const NO_DATA_SET: u16 = 0x0101;
/// The largest command set accepted (they are a few hundred bytes).
const MAX_COMMAND_BYTES: usize = 64 << 10;
/// The largest PDU this SCP asks its peers to send.
const MAX_PDU_LENGTH: u32 = 128 << 10;

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

/// Everything `serve` needs besides the model.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// This SCP's AE title; associations calling another are rejected. Also the calling AE
    /// title when sending to the destination.
    pub ae_title: String,
    /// Address to listen on, `host:port` (port 0: any free port, logged at start).
    pub listen: String,
    /// Where the SEG objects are written, `<SeriesInstanceUID>.seg.dcm`.
    pub out_dir: PathBuf,
    /// Where received instances wait, one folder per series.
    pub spool_dir: PathBuf,
    /// A series with no new instance for this long is complete.
    pub quiet: Duration,
    /// Where each SEG is sent, if anywhere.
    pub destination: Option<Destination>,
    /// At most this many series wait in the spool; instances of further series get A700.
    pub max_pending_series: usize,
    /// At most this many instances in one series (A700 past it).
    pub max_instances_per_series: usize,
    /// The largest instance received (A700 past it): what one association holds in memory.
    pub max_instance_bytes: usize,
    /// Associations served at once; more are rejected (transient, local limit exceeded).
    pub max_associations: usize,
    /// An association with nothing received for this long is dropped.
    pub idle_timeout: Duration,
    /// How series are segmented (threads, overlap).
    pub segment: SegmentOptions,
    /// The forward pass.
    pub engine: Engine,
    /// Descriptive attributes of the SEG objects.
    pub seg: glmae_data::dicom_seg::SegOptions,
}

impl ServeConfig {
    /// The defaults: listen on all interfaces at `port`, spool in `OUT/spool`, 5 s quiet, 8
    /// pending series, 8 associations, instances up to 256 MiB, 4096 instances per series, 2
    /// threads, overlap 0.5 with Gaussian blending, no destination.
    pub fn new(ae_title: &str, port: u16, out_dir: &Path) -> Self {
        Self {
            ae_title: ae_title.to_string(),
            listen: format!("0.0.0.0:{port}"),
            out_dir: out_dir.to_path_buf(),
            spool_dir: out_dir.join("spool"),
            quiet: Duration::from_secs(5),
            destination: None,
            max_pending_series: 8,
            max_instances_per_series: 4096,
            max_instance_bytes: 256 << 20,
            max_associations: 8,
            idle_timeout: Duration::from_secs(60),
            segment: SegmentOptions {
                overlap: 0.5,
                blend: glmae_data::sliding_window::Blend::Gaussian,
                threads: 2,
                probabilities: None,
                probabilities_u8: false,
                progress: false,
            },
            engine: Engine::Fast,
            seg: glmae_data::dicom_seg::SegOptions::default(),
        }
    }
}

/// What happened to each series while serving.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServeSummary {
    /// Series segmented (SEG written; sent too, where there is a destination).
    pub segmented: usize,
    /// Series segmented whose SEG could not be sent.
    pub unsent: usize,
    /// Series skipped (moved to `SPOOL/failed/`).
    pub failed: usize,
    /// Series left in the spool at the stop, for the next start.
    pub left: usize,
}

/// One log line on stderr, with a UTC time stamp.
pub fn log(msg: impl fmt::Display) {
    eprintln!("{} {msg}", utc_timestamp(SystemTime::now()));
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn utc_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Whether `s` is a UID that can name a file: 1 to 64 characters, dot-separated numbers.
fn is_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('.').all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
}

/// A series waiting in the spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Waiting {
    /// When its first instance arrived.
    first: Instant,
    /// When its last instance was stored.
    last: Instant,
    /// Instances stored.
    instances: usize,
    /// Instances being written now: the series is not taken while any is.
    writers: usize,
    /// Found in the spool at start-up (received by an earlier run).
    recovered: bool,
}

/// Why an instance is refused before it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// `max_pending_series` series already wait.
    TooManySeries(usize),
    /// The series already has `max_instances_per_series` instances.
    TooManyInstances(usize),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::TooManySeries(n) => write!(f, "{n} series already wait (--max-pending-series)"),
            Refusal::TooManyInstances(n) => write!(f, "the series already has {n} instances"),
        }
    }
}

/// The series waiting to be segmented: when each last received an instance, and the bound on
/// how many may wait.
#[derive(Debug)]
struct SeriesQueue {
    series: BTreeMap<String, Waiting>,
    max_series: usize,
    max_instances: usize,
}

impl SeriesQueue {
    fn new(max_series: usize, max_instances: usize) -> Self {
        Self { series: BTreeMap::new(), max_series: max_series.max(1), max_instances: max_instances.max(1) }
    }

    /// An instance of `uid` is about to be written: admits it (a new series only while fewer
    /// than `max_series` wait) and holds the series until [`SeriesQueue::end`].
    fn begin(&mut self, uid: &str, now: Instant) -> Result<(), Refusal> {
        if let Some(w) = self.series.get_mut(uid) {
            if w.instances + w.writers >= self.max_instances {
                return Err(Refusal::TooManyInstances(w.instances));
            }
            w.writers += 1;
            return Ok(());
        }
        if self.series.len() >= self.max_series {
            return Err(Refusal::TooManySeries(self.series.len()));
        }
        self.series.insert(
            uid.to_string(),
            Waiting { first: now, last: now, instances: 0, writers: 1, recovered: false },
        );
        Ok(())
    }

    /// The write begun by [`SeriesQueue::begin`] is over; `stored` says whether it succeeded.
    fn end(&mut self, uid: &str, now: Instant, stored: bool) {
        let Some(w) = self.series.get_mut(uid) else { return };
        w.writers = w.writers.saturating_sub(1);
        if stored {
            w.instances += 1;
            w.last = now;
        }
        if w.instances == 0 && w.writers == 0 {
            self.series.remove(uid);
        }
    }

    /// The series quiet for `quiet` (nothing written to it since), the longest-quiet first;
    /// it leaves the queue.
    fn take_quiet(&mut self, now: Instant, quiet: Duration) -> Option<(String, Waiting)> {
        let uid = self
            .series
            .iter()
            .filter(|(_, w)| {
                w.writers == 0 && w.instances > 0 && now.saturating_duration_since(w.last) >= quiet
            })
            .min_by_key(|(_, w)| w.last)
            .map(|(uid, _)| uid.clone())?;
        let w = self.series.remove(&uid)?;
        Some((uid, w))
    }

    /// A series found in the spool at start-up: it waits `quiet` from now, whatever the bound.
    fn requeue(&mut self, uid: &str, instances: usize, now: Instant) {
        self.series.insert(
            uid.to_string(),
            Waiting { first: now, last: now, instances, writers: 0, recovered: true },
        );
    }

    /// The waiting series and their instance counts.
    fn waiting(&self) -> Vec<(String, usize)> {
        self.series.iter().map(|(uid, w)| (uid.clone(), w.instances)).collect()
    }
}

/// What the association threads share: the spool, the queue, the limits.
struct Inbox {
    spool: PathBuf,
    queue: Mutex<SeriesQueue>,
    max_instance_bytes: usize,
    /// Associations open now.
    active: AtomicUsize,
    options: ServerAssociationOptions<'static, AcceptCalledAeTitle, DefaultNegotiation>,
}

impl Inbox {
    fn queue(&self) -> MutexGuard<'_, SeriesQueue> {
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

/// Runs the SCP until `stop` is set: binds `cfg.listen`, queues the series already in the
/// spool, accepts associations, segments each quiet series. On stop, finishes the series in
/// hand, waits a little for open associations, and returns what happened.
///
/// Errors only at start-up (the address cannot be bound, the folders cannot be made); every
/// failure after that is logged and served around.
pub fn serve(model: &ModelFile<'_>, cfg: &ServeConfig, stop: &AtomicBool) -> Result<ServeSummary> {
    check_ae_title(&cfg.ae_title)?;
    let class_names: Vec<String> = model.preprocessing.class_names.iter().map(|s| s.to_string()).collect();
    std::fs::create_dir_all(&cfg.out_dir)
        .with_context(|| format!("cannot create {}", cfg.out_dir.display()))?;
    std::fs::create_dir_all(&cfg.spool_dir)
        .with_context(|| format!("cannot create {}", cfg.spool_dir.display()))?;
    let listener =
        TcpListener::bind(&cfg.listen).with_context(|| format!("cannot listen on {}", cfg.listen))?;
    listener.set_nonblocking(true).with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let local = listener.local_addr().with_context(|| format!("cannot listen on {}", cfg.listen))?;

    let mut queue = SeriesQueue::new(cfg.max_pending_series, cfg.max_instances_per_series);
    let found = recover_spool(&cfg.spool_dir)?;
    let now = Instant::now();
    for (uid, n) in &found {
        queue.requeue(uid, *n, now);
    }
    let mut options = ServerAssociationOptions::new()
        .accept_called_ae_title()
        .ae_title(cfg.ae_title.clone())
        .promiscuous(true)
        .with_abstract_syntax(VERIFICATION)
        .max_pdu_length(MAX_PDU_LENGTH)
        .read_timeout(cfg.idle_timeout)
        .write_timeout(cfg.idle_timeout);
    for ts in NATIVE_TRANSFER_SYNTAXES {
        options = options.with_transfer_syntax(ts);
    }
    let inbox = Arc::new(Inbox {
        spool: cfg.spool_dir.clone(),
        queue: Mutex::new(queue),
        max_instance_bytes: cfg.max_instance_bytes,
        active: AtomicUsize::new(0),
        options,
    });
    log(format_args!(
        "listening on {local} as {}; SEGs to {}{}; quiet {} s, at most {} series waiting",
        cfg.ae_title,
        cfg.out_dir.display(),
        cfg.destination.as_ref().map(|d| format!(" and {d}")).unwrap_or_default(),
        cfg.quiet.as_secs_f64(),
        cfg.max_pending_series
    ));
    if !found.is_empty() {
        let n: usize = found.iter().map(|(_, n)| n).sum();
        log(format_args!("{} series ({n} instances) found in the spool, queued again", found.len()));
    }

    let summary = std::thread::scope(|scope| {
        let accepting = {
            let inbox = Arc::clone(&inbox);
            let max = cfg.max_associations.max(1);
            std::thread::Builder::new()
                .name("accept".into())
                .spawn_scoped(scope, move || accept_loop(&listener, &inbox, max, stop))
                .context("cannot start the accepting thread")?
        };
        let summary = work_loop(model, cfg, &class_names, &inbox, stop);
        if accepting.join().is_err() {
            log("the accepting thread panicked");
        }
        Ok::<_, anyhow::Error>(summary)
    })?;

    // Open associations get a moment to finish what they are sending; an instance cut short
    // was never acknowledged, so its sender knows to send it again.
    let deadline = Instant::now() + Duration::from_secs(2);
    while inbox.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let open = inbox.active.load(Ordering::SeqCst);
    let left = inbox.queue().waiting();
    let mut summary = summary;
    summary.left = left.len();
    let list: Vec<String> = left.iter().map(|(uid, n)| format!("{uid} ({n} instances)")).collect();
    log(format_args!(
        "stopped: {} series segmented, {} failed, {} left in the spool for the next start{}{}",
        summary.segmented + summary.unsent,
        summary.failed,
        left.len(),
        if list.is_empty() { String::new() } else { format!(": {}", list.join(", ")) },
        if open > 0 { format!("; {open} association(s) still open were cut") } else { String::new() }
    ));
    Ok(summary)
}

/// Accepts connections until `stop`; each association runs on its own thread.
fn accept_loop(listener: &TcpListener, inbox: &Arc<Inbox>, max: usize, stop: &AtomicBool) {
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
struct Request {
    field: u16,
    message_id: u16,
    context: u8,
    sop_class: String,
    sop_instance: String,
}

/// The command set of a request, in implicit VR little endian.
struct Command {
    field: u16,
    message_id: u16,
    has_data_set: bool,
    sop_class: String,
    sop_instance: String,
}

fn implicit_le() -> Result<&'static TransferSyntax> {
    transfer_syntax(IMPLICIT_VR_LE)
}

fn transfer_syntax(uid: &str) -> Result<&'static TransferSyntax> {
    TransferSyntaxRegistry
        .get(uid)
        .filter(|ts| !ts.is_unsupported())
        .with_context(|| format!("transfer syntax {uid} is not supported"))
}

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
        .unwrap_or_default()
}

fn parse_command(bytes: &[u8]) -> Result<Command> {
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
fn response(
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

fn encode_command(elements: Vec<dicom_object::mem::InMemElement>) -> Result<Vec<u8>> {
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, implicit_le()?)
        .map_err(|e| anyhow::anyhow!("cannot encode a command set: {e}"))?;
    Ok(out)
}

fn send_command(assoc: &mut ServerAssociation<TcpStream>, context: u8, data: Vec<u8>) -> Result<()> {
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

/// What became of an instance that was accepted.
enum Stored {
    /// Written to the spool.
    Spooled,
    /// Acknowledged and dropped: no pixel data, or a SEG.
    Ignored,
}

/// Parses a received data set, checks its UIDs and writes it as a DICOM file (its transfer
/// syntax kept) to `SPOOL/<series>/<instance>.dcm`. The error is the status and why.
fn store(
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

/// Moves series cut short in `SPOOL/processing/` back to the spool, removes temporary files
/// left by an interrupted write, and lists the series waiting with their instance counts.
fn recover_spool(spool: &Path) -> Result<Vec<(String, usize)>> {
    let processing = spool.join("processing");
    if processing.is_dir() {
        for e in read_dir(&processing)? {
            let name = e.file_name().to_string_lossy().into_owned();
            let back = spool.join(&name);
            if !back.exists() {
                std::fs::rename(e.path(), &back).with_context(|| {
                    format!("cannot move {} back to {}", e.path().display(), back.display())
                })?;
                continue;
            }
            for f in read_dir(&e.path())? {
                let to = back.join(f.file_name());
                std::fs::rename(f.path(), &to)
                    .with_context(|| format!("cannot move {} to {}", f.path().display(), to.display()))?;
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let mut found = Vec::new();
    for e in read_dir(spool)? {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_uid(&name) || !e.path().is_dir() {
            continue;
        }
        let mut n = 0;
        for f in read_dir(&e.path())? {
            let fname = f.file_name().to_string_lossy().into_owned();
            if fname.starts_with('.') && fname.contains(".tmp-") {
                let _ = std::fs::remove_file(f.path());
            } else if fname.ends_with(".dcm") {
                n += 1;
            }
        }
        if n == 0 {
            let _ = std::fs::remove_dir(e.path());
        } else {
            found.push((name, n));
        }
    }
    found.sort();
    Ok(found)
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    std::fs::read_dir(dir)
        .and_then(|it| it.collect::<std::io::Result<Vec<_>>>())
        .with_context(|| format!("cannot list {}", dir.display()))
}

/// Segments each series once it is quiet, one at a time, until `stop`.
fn work_loop(
    model: &ModelFile<'_>,
    cfg: &ServeConfig,
    class_names: &[String],
    inbox: &Inbox,
    stop: &AtomicBool,
) -> ServeSummary {
    let mut summary = ServeSummary::default();
    let processing = inbox.spool.join("processing");
    while !stop.load(Ordering::SeqCst) {
        let job = {
            let mut queue = inbox.queue();
            match queue.take_quiet(Instant::now(), cfg.quiet) {
                None => None,
                Some((uid, waiting)) => {
                    // Moved while the queue is locked: an instance of this series arriving
                    // from now on starts a new folder (and a new series entry).
                    let work = processing.join(&uid);
                    let moved = std::fs::create_dir_all(&processing)
                        .and_then(|()| {
                            if work.exists() {
                                std::fs::remove_dir_all(&work)?;
                            }
                            Ok(())
                        })
                        .and_then(|()| std::fs::rename(inbox.spool.join(&uid), &work));
                    match moved {
                        Ok(()) => Some((uid, waiting, work)),
                        Err(e) => {
                            log(format_args!(
                                "series {uid}: skipped: cannot move its spool folder to {}: {e}",
                                work.display()
                            ));
                            summary.failed += 1;
                            None
                        }
                    }
                }
            }
        };
        let Some((uid, waiting, work)) = job else {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            process_series(model, cfg, class_names, &uid, &work, waiting)
        }));
        let failure = match outcome {
            Ok(Ok(Processed { line, sent })) => {
                log(format_args!("series {uid}: {line}"));
                if sent {
                    summary.segmented += 1
                } else {
                    summary.unsent += 1
                }
                if let Err(e) = std::fs::remove_dir_all(&work) {
                    log(format_args!("series {uid}: cannot remove {}: {e}", work.display()));
                }
                None
            }
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Some(format!("panicked: {what}"))
            }
        };
        if let Some(why) = failure {
            summary.failed += 1;
            let kept = move_to_failed(&inbox.spool, &uid, &work);
            log(format_args!("series {uid}: skipped: {why} ({kept})"));
        }
    }
    summary
}

/// Moves a failed series' folder to `SPOOL/failed/<uid>` (another name if that exists); says
/// where it went.
fn move_to_failed(spool: &Path, uid: &str, work: &Path) -> String {
    let failed = spool.join("failed");
    let mut to = failed.join(uid);
    let mut n = 1;
    while to.exists() {
        to = failed.join(format!("{uid}-{n}"));
        n += 1;
    }
    match std::fs::create_dir_all(&failed).and_then(|()| std::fs::rename(work, &to)) {
        Ok(()) => format!("its files are in {}", to.display()),
        Err(e) => format!("its files stay in {}: cannot move them to {}: {e}", work.display(), to.display()),
    }
}

struct Processed {
    line: String,
    sent: bool,
}

/// Segments the series in `work`, writes its SEG and sends it; the log line's text.
fn process_series(
    model: &ModelFile<'_>,
    cfg: &ServeConfig,
    class_names: &[String],
    uid: &str,
    work: &Path,
    waiting: Waiting,
) -> Result<Processed> {
    let started = Instant::now();
    let s = crate::segment_dicom(model, work, Some(uid), &cfg.segment, cfg.engine)?;
    let segmented = started.elapsed();
    let seg_path = cfg.out_dir.join(format!("{uid}.seg.dcm"));
    let seg = write_seg_file(&seg_path, &s, class_names, &cfg.seg)?;
    let written = started.elapsed();
    let received = if waiting.recovered {
        "found in the spool at start-up".to_string()
    } else {
        format!("received in {:.1} s", waiting.last.saturating_duration_since(waiting.first).as_secs_f64())
    };
    let head = format!(
        "{} slices, {received}, segmented in {:.1} s, SEG written in {:.2} s",
        s.slices.len(),
        segmented.as_secs_f64(),
        (written - segmented).as_secs_f64()
    );
    let Some(dest) = &cfg.destination else {
        let total = waiting.last.elapsed().as_secs_f64();
        return Ok(Processed {
            line: format!("{head} to {} (last slice to SEG written: {total:.1} s)", seg_path.display()),
            sent: true,
        });
    };
    let send_start = Instant::now();
    match send_seg(dest, &cfg.ae_title, &seg) {
        Ok(()) => {
            let total = waiting.last.elapsed().as_secs_f64();
            Ok(Processed {
                line: format!(
                    "{head}, SEG sent in {:.2} s (last slice to SEG sent: {total:.1} s)",
                    send_start.elapsed().as_secs_f64()
                ),
                sent: true,
            })
        }
        Err(e) => Ok(Processed {
            line: format!("{head} to {} but not sent to {dest}: {e:#}", seg_path.display()),
            sent: false,
        }),
    }
}

/// Writes the SEG of a segmented series to `path` and returns the file's bytes.
fn write_seg_file(
    path: &Path,
    s: &DicomSegmentation,
    class_names: &[String],
    opts: &glmae_data::dicom_seg::SegOptions,
) -> Result<Vec<u8>> {
    s.write_seg(path, class_names, opts)?;
    std::fs::read(path).with_context(|| format!("cannot read back {}", path.display()))
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
    use super::*;

    #[test]
    fn quiet_series_are_taken_in_turn_and_not_while_written() {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let quiet = Duration::from_secs(5);
        let mut q = SeriesQueue::new(8, 100);
        q.begin("1.1", s(0.0)).unwrap();
        q.end("1.1", s(0.0), true);
        q.begin("1.2", s(1.0)).unwrap();
        q.end("1.2", s(1.0), true);
        q.begin("1.1", s(2.0)).unwrap();
        q.end("1.1", s(3.0), true);
        // 1.2 (last at 1 s) is quiet at 6 s; 1.1 (last at 3 s) only at 8 s.
        assert_eq!(q.take_quiet(s(5.9), quiet), None);
        let (uid, w) = q.take_quiet(s(6.0), quiet).unwrap();
        assert_eq!((uid.as_str(), w.instances), ("1.2", 1));
        assert_eq!(q.take_quiet(s(7.0), quiet), None);
        // An instance being written holds the series, however long it takes.
        q.begin("1.1", s(7.5)).unwrap();
        assert_eq!(q.take_quiet(s(20.0), quiet), None);
        q.end("1.1", s(20.0), true);
        assert_eq!(q.take_quiet(s(24.0), quiet), None);
        let (uid, w) = q.take_quiet(s(25.0), quiet).unwrap();
        assert_eq!((uid.as_str(), w.instances, w.first, w.last), ("1.1", 3, s(0.0), s(20.0)));
        assert!(q.waiting().is_empty());
    }

    #[test]
    fn the_queue_is_bounded() {
        let now = Instant::now();
        let mut q = SeriesQueue::new(2, 3);
        q.begin("1.1", now).unwrap();
        q.end("1.1", now, true);
        q.begin("1.2", now).unwrap();
        // A third series is refused while two wait (one still being written counts).
        assert_eq!(q.begin("1.3", now), Err(Refusal::TooManySeries(2)));
        // More instances of a waiting series are welcome, up to the instance bound.
        q.begin("1.1", now).unwrap();
        q.end("1.1", now, true);
        q.begin("1.1", now).unwrap();
        q.end("1.1", now, true);
        assert_eq!(q.begin("1.1", now), Err(Refusal::TooManyInstances(3)));
        // A first write that fails leaves no series behind, and frees its place.
        q.end("1.2", now, false);
        assert_eq!(q.waiting(), vec![("1.1".to_string(), 3)]);
        q.begin("1.3", now).unwrap();
        q.end("1.3", now, true);
        // Once a series is taken, its place is free again.
        let later = now + Duration::from_secs(10);
        assert_eq!(q.take_quiet(later, Duration::from_secs(1)).map(|(u, _)| u), Some("1.1".to_string()));
        q.begin("1.4", later).unwrap();
        // Series found at start-up are queued whatever the bound.
        q.requeue("1.5", 7, later);
        assert_eq!(q.waiting().len(), 3);
    }

    #[test]
    fn uids_that_could_escape_the_spool_are_refused() {
        for good in ["1.2.840.10008.1.1", "2.25.1234567890", "1"] {
            assert!(is_uid(good), "{good}");
        }
        for bad in ["", "..", "1..2", ".1", "1.", "../../etc", "1.2/3", "1.2 ", "a.b", &"1".repeat(65)] {
            assert!(!is_uid(bad), "{bad}");
        }
    }

    #[test]
    fn destinations_parse_and_bad_ones_are_named() {
        let d: Destination = "PACS@10.0.0.5:104".parse().unwrap();
        assert_eq!(d, Destination { ae_title: "PACS".into(), address: "10.0.0.5:104".into() });
        assert_eq!(d.to_string(), "PACS@10.0.0.5:104");
        let d: Destination = "A@[::1]:11112".parse().unwrap();
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
            let e = format!("{:#}", bad.parse::<Destination>().unwrap_err());
            assert!(e.contains(&format!("destination {bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn timestamps_are_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // 2024-02-29T12:34:56.789Z
        assert_eq!(utc_timestamp(t), "2024-02-29T12:34:56.789Z");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    /// Series cut short in `processing/` go back to the spool (merged with newer instances of
    /// the same series), temporary files are removed, empty folders dropped.
    #[test]
    fn the_spool_is_recovered_at_start_up() {
        let spool = std::env::temp_dir().join(format!("glmae-serve-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&spool);
        let mk = |p: PathBuf| {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        };
        mk(spool.join("1.2/1.2.1.dcm"));
        mk(spool.join("1.2/.1.2.2.dcm.tmp-99"));
        mk(spool.join("processing/1.3/1.3.1.dcm"));
        mk(spool.join("processing/1.3/1.3.2.dcm"));
        mk(spool.join("processing/1.2/1.2.3.dcm"));
        mk(spool.join("failed/1.4/1.4.1.dcm"));
        std::fs::create_dir_all(spool.join("1.5")).unwrap();
        let found = recover_spool(&spool).unwrap();
        assert_eq!(found, vec![("1.2".to_string(), 2), ("1.3".to_string(), 2)]);
        assert!(!spool.join("1.2/.1.2.2.dcm.tmp-99").exists());
        assert!(!spool.join("1.5").exists());
        assert!(spool.join("failed/1.4/1.4.1.dcm").exists());
        assert_eq!(std::fs::read_dir(spool.join("processing")).unwrap().count(), 0);
        std::fs::remove_dir_all(&spool).unwrap();
    }

    /// A storage SCP on localhost that takes `syntax` only, with 4 KiB PDUs, and answers
    /// `code`; returns the data set it received and the number of P-DATA PDUs it took.
    fn one_store_scp(syntax: &'static str, code: u16) -> (String, std::thread::JoinHandle<(Vec<u8>, usize)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let scp = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut assoc = ServerAssociationOptions::new()
                .accept_called_ae_title()
                .ae_title("DEST")
                .with_abstract_syntax(SEGMENTATION_STORAGE)
                .with_transfer_syntax(syntax)
                .max_pdu_length(4096)
                .establish(stream)
                .unwrap();
            let (mut command, mut data, mut pdus) = (Vec::new(), Vec::new(), 0);
            loop {
                match assoc.receive().unwrap() {
                    Pdu::PData { data: values } => {
                        pdus += 1;
                        for v in values {
                            let last = v.is_last;
                            match v.value_type {
                                PDataValueType::Command => command.extend(v.data),
                                PDataValueType::Data => data.extend(v.data),
                            }
                            if last && !data.is_empty() {
                                let c = parse_command(&command).unwrap();
                                assert_eq!((c.field, c.has_data_set), (C_STORE_RQ, true));
                                let rsp = response(
                                    C_STORE_RSP,
                                    c.message_id,
                                    code,
                                    &c.sop_class,
                                    &c.sop_instance,
                                    "",
                                )
                                .unwrap();
                                send_command(&mut assoc, v.presentation_context_id, rsp).unwrap();
                            }
                        }
                    }
                    Pdu::ReleaseRQ => {
                        assoc.send(&Pdu::ReleaseRP).unwrap();
                        break;
                    }
                    Pdu::AbortRQ { .. } => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            (data, pdus)
        });
        (addr, scp)
    }

    /// `send_seg` sends the stored bytes to a peer that takes explicit VR little endian, a
    /// re-encoded data set to one that takes implicit VR only, both split into PDUs within the
    /// peer's maximum length, and reports a failure status by the peer's name.
    #[test]
    fn segs_are_sent_in_the_syntax_the_peer_takes() {
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
        obj.with_meta(meta).unwrap().write_all(&mut file).unwrap();
        for syntax in [EXPLICIT_VR_LE, IMPLICIT_VR_LE] {
            let (addr, scp) = one_store_scp(syntax, status::SUCCESS);
            let dest = Destination { ae_title: "DEST".into(), address: addr };
            send_seg(&dest, "GLMAE", &file).unwrap();
            let (data, pdus) = scp.join().unwrap();
            let back =
                InMemDicomObject::read_dataset_with_ts(data.as_slice(), transfer_syntax(syntax).unwrap())
                    .unwrap();
            assert_eq!(text(&back, tags::SOP_INSTANCE_UID), "1.2.3.4", "{syntax}");
            assert_eq!(back.get(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().len(), 20_000, "{syntax}");
            assert!(pdus >= 5, "{pdus} PDUs for 20 kB at 4 kB ({syntax})");
        }
        let (addr, scp) = one_store_scp(EXPLICIT_VR_LE, status::OUT_OF_RESOURCES);
        let dest = Destination { ae_title: "DEST".into(), address: addr.clone() };
        let e = format!("{:#}", send_seg(&dest, "GLMAE", &file).unwrap_err());
        assert!(e.contains(&format!("DEST@{addr} answered status 0xA700")), "{e}");
        scp.join().unwrap();
    }

    /// Command sets round-trip: a C-STORE-RSP encodes with its group length and parses back.
    #[test]
    fn responses_encode_as_command_sets() {
        let bytes =
            response(C_STORE_RSP, 7, status::CANNOT_UNDERSTAND, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "why")
                .unwrap();
        let obj = InMemDicomObject::read_dataset_with_ts(bytes.as_slice(), implicit_le().unwrap()).unwrap();
        let len = obj.get(Tag(0, 0)).unwrap().to_int::<u32>().unwrap();
        assert_eq!(len as usize, bytes.len() - 12);
        assert_eq!(obj.get(tags::STATUS).unwrap().to_int::<u16>().unwrap(), 0xC000);
        assert_eq!(text(&obj, tags::AFFECTED_SOP_INSTANCE_UID), "1.2.3");
        let cmd = parse_command(&bytes).unwrap();
        assert_eq!((cmd.field, cmd.has_data_set, cmd.sop_instance.as_str()), (C_STORE_RSP, false, "1.2.3"));
    }
}
