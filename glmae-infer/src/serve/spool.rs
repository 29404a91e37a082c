//! The spool's layout: `SPOOL/<SeriesInstanceUID>/<SOPInstanceUID>.dcm` for series waiting,
//! `SPOOL/processing/<uid>` for the series in hand, `SPOOL/failed/<uid>` for series that failed;
//! recovered at start-up.

use std::path::Path;

use anyhow::{Context, Result};

/// Whether `s` is a UID that can name a file: 1 to 64 characters, dot-separated numbers.
pub(super) fn is_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('.').all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
}

/// Moves series cut short in `SPOOL/processing/` back to the spool, removes temporary files
/// left by an interrupted write, and lists the series waiting with their instance counts.
pub(super) fn recover_spool(spool: &Path) -> Result<Vec<(String, usize)>> {
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

/// Moves a failed series' folder to `SPOOL/failed/<uid>` (another name if that exists); says
/// where it went.
pub(super) fn move_to_failed(spool: &Path, uid: &str, work: &Path) -> String {
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn uids_that_could_escape_the_spool_are_refused() {
        for good in ["1.2.840.10008.1.1", "2.25.1234567890", "1"] {
            assert!(is_uid(good), "{good}");
        }
        for bad in ["", "..", "1..2", ".1", "1.", "../../etc", "1.2/3", "1.2 ", "a.b", &"1".repeat(65)] {
            assert!(!is_uid(bad), "{bad}");
        }
    }

    /// Series cut short in `processing/` go back to the spool (merged with newer instances of
    /// the same series), temporary files are removed, empty folders dropped.
    #[test]
    fn the_spool_is_recovered_at_start_up() -> Result<()> {
        let spool = std::env::temp_dir().join(format!("glmae-serve-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&spool);
        let mk = |p: PathBuf| -> Result<()> {
            std::fs::create_dir_all(p.parent().context("a spool file without a folder")?)?;
            std::fs::write(p, b"x")?;
            Ok(())
        };
        mk(spool.join("1.2/1.2.1.dcm"))?;
        mk(spool.join("1.2/.1.2.2.dcm.tmp-99"))?;
        mk(spool.join("processing/1.3/1.3.1.dcm"))?;
        mk(spool.join("processing/1.3/1.3.2.dcm"))?;
        mk(spool.join("processing/1.2/1.2.3.dcm"))?;
        mk(spool.join("failed/1.4/1.4.1.dcm"))?;
        std::fs::create_dir_all(spool.join("1.5"))?;
        let found = recover_spool(&spool)?;
        assert_eq!(found, vec![("1.2".to_string(), 2), ("1.3".to_string(), 2)]);
        assert!(!spool.join("1.2/.1.2.2.dcm.tmp-99").exists());
        assert!(!spool.join("1.5").exists());
        assert!(spool.join("failed/1.4/1.4.1.dcm").exists());
        assert_eq!(std::fs::read_dir(spool.join("processing"))?.count(), 0);
        std::fs::remove_dir_all(&spool)?;
        Ok(())
    }
}
