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
//!
//! The parts: `queue` (which series wait, and which is quiet), `scp` (associations and the DIMSE
//! exchange), `store` (one received instance into the spool), `spool` (its folders, recovered at
//! start-up), `worker` (each quiet series segmented and its SEG written), `scu` (the SEG sent
//! on), `dimse` (command sets and status codes).

mod dimse;
mod queue;
mod scp;
mod scu;
mod spool;
mod store;
mod worker;

use std::fmt;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use dicom_ul::association::server::ServerAssociationOptions;
use glmae_core::ModelFile;

use self::queue::SeriesQueue;
use self::scp::{Inbox, accept_loop};
use self::spool::recover_spool;
use self::worker::work_loop;
use crate::{Engine, SegmentOptions};

pub use dimse::status;
pub use scu::{Destination, check_ae_title, send_seg};

/// Segmentation Storage, the SOP class of the SEG objects sent.
pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
const VERIFICATION: &str = "1.2.840.10008.1.1";
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
/// The transfer syntaxes accepted: the native (uncompressed) ones, stored as received.
pub const NATIVE_TRANSFER_SYNTAXES: [&str; 3] = [EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE];

/// The largest PDU this SCP asks its peers to send.
const MAX_PDU_LENGTH: u32 = 128 << 10;

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
    let (year, month, day) = glmae_data::dicom::civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // 2024-02-29T12:34:56.789Z
        assert_eq!(utc_timestamp(t), "2024-02-29T12:34:56.789Z");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
