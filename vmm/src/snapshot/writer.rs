//! Writing a snapshot directory so that a crash never leaves a half snapshot that looks whole.
//!
//! Everything goes into a hidden sibling directory `.NAME.tmp-PID` first: the memory file,
//! then the state file, each fsynced, then the directory itself. Only then does the snapshot
//! take its name: `rename`, or, when a previous snapshot is at that path, an atomic exchange
//! (`renameat2(RENAME_EXCHANGE)`) after which the old one is deleted. A VMM killed at any point
//! leaves the previous snapshot (or nothing) at the path, plus at most a hidden temporary
//! directory; a full disk fails the write, removes the temporary directory and leaves the VM
//! running.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use balloon::PageStateMap;
use serde::Serialize;
use vm_memory::GuestMemoryMmap;

use super::format::{MEMORY_FILE, STATE_FILE};
use super::memory_file::write_memory_file_since;
use super::state::{PageCounts, SnapshotState};
use super::write_pipe::{ms_since, WriteTimings};
use super::SnapshotError;

/// What a finished snapshot reports.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotSummary {
    /// The snapshot directory.
    pub path: PathBuf,
    /// Snapshot ID (hex).
    pub snapshot_id: String,
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Apparent bytes of the memory file.
    pub memory_file_bytes: u64,
    /// Pages kept and skipped.
    pub pages: PageCounts,
    /// Time to save the vCPU, VM and device state, in ms.
    pub save_state_ms: f64,
    /// Time to write and fsync both files and rename the directory, in ms.
    pub write_ms: f64,
    /// Where `write_ms` went.
    pub write_phases_ms: WriteTimings,
    /// SHA-256 of the state file (hex): what a layer on this snapshot records as its parent.
    pub state_hash: String,
    /// For a diff layer: the parent's state hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_hash: Option<String>,
    /// For a diff layer: pages recorded freed since the parent.
    pub freed_pages: u64,
    /// For a diff layer: pages left to the parent.
    pub inherited_pages: u64,
}

/// A fresh random snapshot ID.
pub fn new_snapshot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `id.len()` bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // Fall back to time and pid: IDs need to be distinct, not secret.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        id = (nanos ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    id
}

fn fsync_dir(path: &Path) -> Result<(), SnapshotError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(SnapshotError::io("fsync directory", path))
}

/// Whether `path` is something a snapshot may replace: a directory holding nothing but
/// snapshot files.
fn is_replaceable(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|entries| {
        entries.flatten().all(|e| {
            let name = e.file_name();
            (name == STATE_FILE || name == MEMORY_FILE) && e.file_type().is_ok_and(|t| t.is_file())
        })
    })
}

/// Removes the hidden temporary directories (`.NAME.tmp-PID`) that VMMs killed while writing a
/// snapshot to `NAME` left in `parent`, so repeated kills do not fill the disk. A directory whose
/// PID still runs (another VMM writing there now) is left alone.
fn remove_stale_temporaries(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() as i32 || pid_alive(pid) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                tracing::info!(path = %entry.path().display(), "removed a killed writer's temporary snapshot directory")
            }
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a stale temporary snapshot directory")
            }
        }
    }
}

/// Whether process `pid` exists (signal 0 probes without sending anything).
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks whether the process exists; it sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Atomically swaps `a` and `b` (both must exist).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The parts of a paused VM a snapshot is made of (memory is read in place).
pub struct SnapshotParts<'a> {
    /// The state, with `memory` left default (filled in while writing).
    pub state: SnapshotState,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The balloon's page-state map (synced with the dirty log), if the VM has one.
    pub page_states: Option<&'a PageStateMap>,
    /// Keep every page (raw full dump) instead of only the live, non-zero, resident ones.
    pub keep_all: bool,
    /// How never-touched pages are told ([`crate::memory::GuestRam::residency`]).
    pub residency: crate::memory::Residency<'a>,
    /// When saving the state started (for the summary).
    pub started: Instant,
    /// For a diff layer (`state.layer` set): the pages changed since the parent.
    pub changed: Option<&'a crate::memory::ChangedSet>,
}

/// Writes the snapshot directory `dir` from `parts` (see the module documentation).
pub fn write_snapshot(dir: &Path, parts: SnapshotParts) -> Result<SnapshotSummary, SnapshotError> {
    let save_state_ms = parts.started.elapsed().as_secs_f64() * 1e3;
    let write_start = Instant::now();
    let name = dir
        .file_name()
        .ok_or_else(|| SnapshotError::NotASnapshotDir(dir.to_owned()))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if dir.exists() && !is_replaceable(dir) {
        return Err(SnapshotError::NotASnapshotDir(dir.to_owned()));
    }
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    remove_stale_temporaries(&parent, &name.to_string_lossy());
    std::fs::create_dir(&tmp).map_err(SnapshotError::io("create directory", &tmp))?;
    let result = write_into(&tmp, parts).and_then(
        |(state_bytes, memory_file_bytes, state, state_hash, timings)| {
            fsync_dir(&tmp)?;
            if dir.exists() {
                exchange(&tmp, dir).map_err(SnapshotError::io("replace the snapshot at", dir))?;
                // `tmp` now holds the previous snapshot.
                let _ = std::fs::remove_dir_all(&tmp);
            } else {
                std::fs::rename(&tmp, dir).map_err(SnapshotError::io("rename into place", dir))?;
            }
            fsync_dir(&parent)?;
            // The chunk checksums were computed from the bytes just written.
            super::verified::record_known_good(&dir.join(MEMORY_FILE));
            Ok(SnapshotSummary {
                path: dir.to_owned(),
                snapshot_id: super::format::id_hex(&state.snapshot_id),
                state_bytes,
                memory_file_bytes,
                pages: state.memory.pages,
                save_state_ms,
                write_ms: write_start.elapsed().as_secs_f64() * 1e3,
                write_phases_ms: timings,
                state_hash,
                parent_hash: state.layer.as_ref().map(|l| l.parent.hash.clone()),
                freed_pages: state.layer.as_ref().map_or(0, |l| {
                    l.freed.iter().map(|r| r.1).sum::<u64>() / super::format::PAGE_BYTES
                }),
                inherited_pages: state.layer.as_ref().map_or(0, |l| l.inherited_pages),
            })
        },
    );
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes both files into `tmp`, each fsynced; returns their sizes, the final state, the state
/// file's hash and where the time went.
fn write_into(
    tmp: &Path,
    parts: SnapshotParts,
) -> Result<(u64, u64, SnapshotState, String, WriteTimings), SnapshotError> {
    let memory_path = tmp.join(MEMORY_FILE);
    let mut memory = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&memory_path)
        .map_err(SnapshotError::io("create", &memory_path))?;
    let mut state = parts.state;
    let changed = parts.changed.filter(|_| state.layer.is_some());
    let (index, sets, mut timings) = write_memory_file_since(
        &mut memory,
        &memory_path,
        parts.mem,
        parts.page_states,
        super::memory_file::KeepRules {
            keep_all: parts.keep_all,
            residency: parts.residency,
            changed,
        },
        state.snapshot_id,
    )?;
    state.memory = index;
    if let Some(layer) = &mut state.layer {
        layer.freed = sets.freed;
        layer.inherited_pages = sets.inherited_pages;
    }
    let fsync_start = Instant::now();
    memory
        .sync_all()
        .map_err(SnapshotError::io("fsync", &memory_path))?;
    timings.fsync_memory_ms = ms_since(fsync_start);
    let state_start = Instant::now();
    let memory_file_bytes = super::format::MEMORY_HEADER_BYTES + state.memory.data_bytes;

    let state_path = tmp.join(STATE_FILE);
    let body = super::format::encode_state_body(&state).map_err(|e| SnapshotError::Io {
        operation: "encode the state for",
        path: state_path.clone(),
        source: std::io::Error::other(e),
    })?;
    let bytes = super::format::state_file_bytes(super::format::FORMAT_VERSION, &body);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&state_path)
        .map_err(SnapshotError::io("create", &state_path))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(SnapshotError::io("write", &state_path))?;
    let state_bytes = bytes.len() as u64;
    let hash = super::layer::hash_hex(&bytes);
    timings.state_file_ms = ms_since(state_start);
    Ok((state_bytes, memory_file_bytes, state, hash, timings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_of_dead_writers_are_removed_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("stale-tmp-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A PID above the kernel's maximum (4194304) never runs.
        let dead = dir.join(".snap.tmp-99999999");
        let live = dir.join(format!(".snap.tmp-{}", std::process::id()));
        let other_name = dir.join(".other.tmp-99999999");
        let not_a_pid = dir.join(".snap.tmp-abc");
        for d in [&dead, &live, &other_name, &not_a_pid] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join(MEMORY_FILE), b"partial").unwrap();
        }
        // Our own PID counts as live here (write_snapshot clears its own directory itself).
        remove_stale_temporaries(&dir, "snap");
        assert!(!dead.exists(), "a dead writer's directory stays");
        assert!(live.exists() && other_name.exists() && not_a_pid.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pid_alive_tells_running_from_gone() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(99_999_999));
        assert!(!pid_alive(0));
    }
}
