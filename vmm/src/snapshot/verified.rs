//! Memory files whose chunk checksums are known good on this host, so that restoring many clones
//! from one snapshot reads and checks its memory file once instead of once per clone.
//!
//! A file is known good when this host's VMM wrote it (the writer computed every chunk's
//! checksum from the bytes it wrote) or a restore here checked every chunk. The record is keyed by
//! the file's identity: device, inode, size, modification and status-change times in
//! nanoseconds. Any write to the file changes its status-change time, which no user can set
//! back, so a file changed after it was recorded is checked again. What the record cannot see is
//! the storage itself flipping bits under an unchanged file: `--reverify` checks every chunk
//! regardless.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The directory holding the records (one empty file per known-good file identity).
fn records_dir() -> PathBuf {
    guest_image::default_cache_dir().join("verified-memory")
}

/// The record's name for the file at `path`, from its identity (None when it cannot be read).
fn record_name(path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    let ns = |secs: i64, nsecs: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsecs);
    Some(format!(
        "{:x}-{:x}-{:x}-{:x}-{:x}",
        m.dev(),
        m.ino(),
        m.size(),
        ns(m.mtime(), m.mtime_nsec()),
        ns(m.ctime(), m.ctime_nsec())
    ))
}

/// Whether the memory file at `path`, as it is now, was verified (or written) on this host.
pub fn is_known_good(path: &Path) -> bool {
    is_known_good_in(&records_dir(), path)
}

/// Records the memory file at `path`, as it is now, as known good. Best effort: without a
/// record the next restore checks the file again, which is slower but safe.
pub fn record_known_good(path: &Path) {
    record_known_good_in(&records_dir(), path);
}

/// Runs `check` on the memory file at `path` unless this host already knows the file, as it is
/// now, to be good (always with `reverify`); records it after a passing check. The one place
/// restores decide whether to read a memory file's checksums.
pub fn check_once<E>(
    path: &Path,
    reverify: bool,
    check: impl FnOnce() -> Result<(), E>,
) -> Result<(), E> {
    check_once_in(&records_dir(), path, reverify, check)
}

fn check_once_in<E>(
    dir: &Path,
    path: &Path,
    reverify: bool,
    check: impl FnOnce() -> Result<(), E>,
) -> Result<(), E> {
    if reverify || !is_known_good_in(dir, path) {
        check()?;
        record_known_good_in(dir, path);
    }
    Ok(())
}

fn is_known_good_in(dir: &Path, path: &Path) -> bool {
    record_name(path).is_some_and(|name| dir.join(name).is_file())
}

fn record_known_good_in(dir: &Path, path: &Path) {
    let Some(name) = record_name(path) else {
        return;
    };
    let result = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(dir.join(name), b""));
    if let Err(err) = result {
        tracing::debug!(%err, dir = %dir.display(), "cannot record a verified memory file; the next restore checks it again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_file_is_known_good_until_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let records = tmp.path().join("records");
        let file = tmp.path().join("memory");
        std::fs::write(&file, b"chunk").unwrap();
        assert!(!is_known_good_in(&records, &file));
        record_known_good_in(&records, &file);
        assert!(is_known_good_in(&records, &file));
        // Any write changes the status-change time: the file must be checked again.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&file, b"chunK").unwrap();
        assert!(!is_known_good_in(&records, &file));
        assert!(!is_known_good_in(&records, &tmp.path().join("absent")));
    }

    #[test]
    fn check_once_checks_until_a_check_passes_then_only_with_reverify() {
        let tmp = tempfile::tempdir().unwrap();
        let records = tmp.path().join("records");
        let file = tmp.path().join("memory");
        std::fs::write(&file, b"chunk").unwrap();
        let mut checks = 0;
        let failing = check_once_in(&records, &file, false, || Err::<(), _>("damaged"));
        assert_eq!(failing, Err("damaged"));
        assert!(
            !is_known_good_in(&records, &file),
            "a failed check records nothing"
        );
        for reverify in [false, false, true] {
            check_once_in(&records, &file, reverify, || {
                checks += 1;
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        assert_eq!(checks, 2, "checked once, then again only with reverify");
    }
}
