//! The worker: takes each quiet series from the queue, segments it, writes its SEG and sends it,
//! one series at a time.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use glmae_core::ModelFile;

use super::queue::Waiting;
use super::scp::Inbox;
use super::scu::send_seg;
use super::spool::move_to_failed;
use super::{ServeConfig, ServeSummary, log};

/// Segments each series once it is quiet, one at a time, until `stop`.
pub(super) fn work_loop(
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
    // Encoded once: the same bytes are written and sent.
    let seg = s
        .encode_seg(class_names, &cfg.seg)
        .with_context(|| format!("cannot write DICOM SEG {}", seg_path.display()))?;
    glmae_data::io::atomic_write(&seg_path, &seg)?;
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
