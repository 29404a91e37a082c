//! Writing outputs so that a crash never leaves a half-written file behind.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed to disk, then
/// renamed over `path`. A symbolic link is followed (its target gets the data, as a shell's `>`
/// does, and the link stays); a path that exists and is not a regular file (a device such as
/// `/dev/null`, a folder, a pipe) is refused rather than replaced by a file. Errors name the path.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let resolved = output_target(path)?;
    let path = resolved.as_path();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else { bail!("{} is not a file path", path.display()) };
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Where writing `path` must go: the final target of a chain of symbolic links (which need not
/// exist yet), or `path`; an error when that exists and is not a regular file.
pub(crate) fn output_target(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target =
                    std::fs::read_link(&p).with_context(|| format!("cannot read link {}", p.display()))?;
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            Ok(m) if !m.is_file() => {
                let kind =
                    if m.is_dir() { "a folder" } else { "not a regular file (a device, pipe or socket)" };
                bail!("{} is {kind}; refusing to replace it with an output file", path.display())
            }
            _ => return Ok(p),
        }
    }
    bail!("{}: too many levels of symbolic links", path.display())
}

/// Refuses an `output` that is the file `input` (by any path: `./`, symbolic or hard links):
/// writing there would replace the user's image with a result.
pub fn ensure_not_input(input: &Path, output: &Path) -> Result<()> {
    let (Ok(a), Ok(b)) = (std::fs::metadata(input), std::fs::metadata(output)) else { return Ok(()) };
    #[cfg(unix)]
    let same = {
        use std::os::unix::fs::MetadataExt;
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    };
    #[cfg(not(unix))]
    let same = {
        let _ = (a, b);
        std::fs::canonicalize(input).ok() == std::fs::canonicalize(output).ok()
    };
    if same {
        bail!(
            "output {} is the input {}: refusing to overwrite the input image; choose another output path",
            output.display(),
            input.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_names_unwritable_paths() {
        let dir = std::env::temp_dir().join(format!("glmae-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.bin");
        atomic_write(&path, b"first").unwrap();
        atomic_write(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temporary file left behind");
        let bad = dir.join("missing-folder").join("b.bin");
        let e = atomic_write(&bad, b"x").unwrap_err();
        assert!(format!("{e:#}").contains("missing-folder/b.bin"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A symbolic link output writes its target and stays a link; a device or folder output is
    /// refused and left as it was; an output that is the input (by another path or a link) is
    /// refused.
    #[cfg(unix)]
    #[test]
    fn links_are_followed_and_devices_and_inputs_refused() {
        let dir = std::env::temp_dir().join(format!("glmae-io-links-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target.bin");
        let link = dir.join("link.bin");
        std::os::unix::fs::symlink("target.bin", &link).unwrap();
        atomic_write(&link, b"through").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
        assert_eq!(std::fs::read(&target).unwrap(), b"through");

        let e = format!("{:#}", atomic_write(Path::new("/dev/null"), b"x").unwrap_err());
        assert!(e.contains("/dev/null") && e.contains("not a regular file"), "{e}");
        assert!(!std::fs::metadata("/dev/null").unwrap().is_file(), "/dev/null became a file");
        let e = format!("{:#}", atomic_write(&dir, b"x").unwrap_err());
        assert!(e.contains("a folder"), "{e}");

        ensure_not_input(&target, &dir.join("other.bin")).unwrap();
        let e = ensure_not_input(&target, &dir.join(".").join("target.bin")).unwrap_err().to_string();
        assert!(e.contains("refusing to overwrite the input"), "{e}");
        assert!(ensure_not_input(&target, &link).is_err(), "a link to the input is the input");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
