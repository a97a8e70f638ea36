//! Lazy restore (`vmm restore --lazy uffd`): guest RAM is private anonymous memory registered
//! with a userfaultfd for missing-page faults, and a handler thread fills each page on its first
//! touch — from the memory file (`UFFDIO_COPY` out of a read-only mapping of the file) or with
//! the zero page (`UFFDIO_ZEROPAGE`) for ranges the snapshot skipped.
//!
//! - Lookup: guest RAM is a flat sorted list of [`segments::Segment`]s (`gpa, len, File | Zero`)
//!   built from the memory index; each fault is one binary search.
//! - Batch: a fault is served with the run of still-missing pages around it inside its aligned
//!   [`BATCH_BYTES`] window, clipped to its segment: a guest touching memory sequentially (page
//!   tables, a kernel walking a buffer) costs one fault and one ioctl per 64 KiB instead of per
//!   page, while a random toucher gets at most 15 pages it did not ask for (the host RSS stays
//!   close to the pages actually used).
//! - Checksums are verified lazily: a chunk's CRC-32C is computed over the whole chunk the first
//!   time any page of it is served; a mismatch stops the VM with an error naming the file and
//!   the chunk, before any byte of that chunk reaches the guest. Chunks never touched are never
//!   read (nor checked).
//! - Released ranges: the balloon releases guest pages with `MADV_DONTNEED`, which on a
//!   registered range is a `UFFD_EVENT_REMOVE` event; the handler marks those pages zero-on-
//!   fault, so a later touch reads zeros, never the file's old contents.
//! - The handler thread never touches guest memory itself (only the kernel does, in its
//!   ioctls), so a device worker or vCPU blocked on a fault cannot deadlock it.
//! - A handler error is logged and reported to the VM's event loop (which stops the VM with
//!   exit code 1); the handler then closes the userfaultfd so that nothing stays blocked on a
//!   fault while the VM stops.
//!
//! Syscalls of the handler thread (for a seccomp filter): `poll`, `read` (events and the stop
//! eventfd), `ioctl` (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_WAKE`), `close`, `munmap` (the
//! file mapping, on exit), plus what `tracing` and `mpsc` use (`write`, `futex`). Setup, on the
//! restoring thread: `userfaultfd`, `ioctl` (`UFFDIO_API`, `UFFDIO_REGISTER`), `mmap`, `eventfd2`.

mod handler;
pub mod segments;
pub mod uffd;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::state::MemoryIndex;
use super::SnapshotError;
use segments::{SegmentError, SegmentMap};

/// Pages served per fault at most: the aligned window around the faulting page.
pub const BATCH_BYTES: u64 = 64 << 10;

/// How guest memory is restored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LazyMode {
    /// Private mappings of the memory file (copy-on-write, shared page cache).
    #[default]
    Off,
    /// Anonymous memory filled on first touch by a userfaultfd handler.
    Uffd,
}

/// Errors of lazy restore.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// Lazy restore serves one memory file; a chain of diff layers is mapped instead.
    #[error("--lazy uffd restores a single snapshot, and this one is a chain of {layers} layers: restore it without --lazy, or flatten it first (vmm flatten)")]
    Layered {
        /// Layers in the chain.
        layers: usize,
    },
    /// The userfaultfd could not be created (kernel without it, or no permission to handle
    /// kernel faults: the VMM needs CAP_SYS_PTRACE or `vm.unprivileged_userfaultfd=1`).
    #[error("cannot create a userfaultfd")]
    Create(#[source] nix::errno::Errno),
    /// Registering guest RAM failed.
    #[error("cannot register {len_bytes} bytes of guest RAM at guest address {gpa:#x} with the userfaultfd")]
    Register {
        /// Guest start.
        gpa: u64,
        /// Length.
        len_bytes: u64,
        /// errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// The memory index does not describe guest RAM.
    #[error("{path}: invalid memory index")]
    Index {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: SegmentError,
    },
    /// Mapping the memory file read-only failed.
    #[error("cannot map {path} read-only")]
    MapFile {
        /// The memory file.
        path: PathBuf,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// The stop eventfd or the handler thread could not be created.
    #[error("cannot start the page fault handler")]
    Start(#[source] std::io::Error),
    /// Reading or polling the userfaultfd failed.
    #[error("cannot read page fault events")]
    Events(#[source] nix::errno::Errno),
    /// A fault outside guest RAM (a kernel bug or a foreign registration).
    #[error("page fault at host address {0:#x}, outside guest RAM")]
    OutsideRam(u64),
    /// Filling a page failed.
    #[error("cannot {operation} {len_bytes} bytes at guest address {gpa:#x}")]
    Fill {
        /// `UFFDIO_COPY` or `UFFDIO_ZEROPAGE`.
        operation: &'static str,
        /// Guest start.
        gpa: u64,
        /// Length.
        len_bytes: u64,
        /// errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// A chunk failed its checksum when first touched.
    #[error(transparent)]
    Checksum(#[from] SnapshotError),
}

/// Counters of the handler, for `GET /` and the benchmark.
#[derive(Debug, Default)]
pub struct LazyStats {
    faults: AtomicU64,
    pages_from_file: AtomicU64,
    pages_zero: AtomicU64,
    chunks_verified: AtomicU64,
    removed_bytes: AtomicU64,
}

impl LazyStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "mode": "uffd",
            "faults": get(&self.faults),
            "pages_from_file": get(&self.pages_from_file),
            "pages_zero": get(&self.pages_zero),
            "served_bytes": (get(&self.pages_from_file) + get(&self.pages_zero)) * 4096,
            "chunks_verified": get(&self.chunks_verified),
            "removed_bytes": get(&self.removed_bytes),
            "batch_bytes": BATCH_BYTES,
        })
    }
}

/// Where a handler failure goes: the VM's event loop once it exists (an error before that is
/// kept and delivered when the hook is set).
#[derive(Default)]
struct FatalHook {
    pending: Option<String>,
    hook: Option<Box<dyn FnOnce(String) + Send>>,
}

/// The running page fault handler of a lazily restored VM. Dropping it stops the handler
/// (guest RAM must still be mapped then; [`crate::memory::GuestRam`] drops it first).
pub struct LazyMemory {
    stop: EventFd,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<LazyStats>,
    fatal: Arc<Mutex<FatalHook>>,
}

impl std::fmt::Debug for LazyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyMemory")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl LazyMemory {
    /// Registers guest RAM `mem` (fresh anonymous memory nothing has touched) with a new
    /// userfaultfd and starts the handler serving it from `memory` (the memory file at
    /// `memory_path`, already matched to `index` by the reader) — verifying chunk checksums on
    /// first touch when `verify`. `state_path` names the index in errors.
    pub fn start(
        mem: &GuestMemoryMmap,
        index: &MemoryIndex,
        memory: &File,
        memory_path: &Path,
        state_path: &Path,
        verify: bool,
    ) -> Result<Self, LazyError> {
        let segments = SegmentMap::from_index(index, 0).map_err(|source| LazyError::Index {
            path: state_path.to_owned(),
            source,
        })?;
        let file = handler::FileMap::new(memory, memory_path)?;
        let uffd = uffd::Uffd::new(uffd::FEATURE_EVENT_REMOVE).map_err(LazyError::Create)?;
        let mut regions = Vec::new();
        for region in mem.iter() {
            let host = region.as_ptr() as u64;
            let gpa = region.start_addr().0;
            let len_bytes = region.len();
            uffd.register(host, len_bytes)
                .map_err(|source| LazyError::Register {
                    gpa,
                    len_bytes,
                    source,
                })?;
            regions.push(handler::RamRegion::new(gpa, host, len_bytes));
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(LazyError::Start)?;
        let stats = Arc::new(LazyStats::default());
        let fatal = Arc::new(Mutex::new(FatalHook::default()));
        let handler = handler::Handler {
            uffd,
            stop: stop.try_clone().map_err(LazyError::Start)?,
            regions,
            segments,
            files: vec![file],
            verified: vec![vec![!verify; index.chunks.len()]],
            stats: stats.clone(),
        };
        let thread_fatal = fatal.clone();
        let thread = std::thread::Builder::new()
            .name("lazy-memory".into())
            .spawn(move || {
                if let Err(err) = handler.run() {
                    let message = crate::devices::virtio::error_chain(&err);
                    tracing::error!(error = %message, "lazy memory handler failed; stopping the VM");
                    let mut slot = thread_fatal.lock().unwrap_or_else(|p| p.into_inner());
                    match slot.hook.take() {
                        Some(hook) => hook(message),
                        None => slot.pending = Some(message),
                    }
                }
                // The handler (and its userfaultfd) is dropped here: waiting faults return.
            })
            .map_err(LazyError::Start)?;
        Ok(Self {
            stop,
            thread: Mutex::new(Some(thread)),
            stats,
            fatal,
        })
    }

    /// Calls `hook` with the error if the handler fails (at once if it already has).
    pub fn on_failure(&self, hook: impl FnOnce(String) + Send + 'static) {
        let mut slot = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        match slot.pending.take() {
            Some(message) => hook(message),
            None => slot.hook = Some(Box::new(hook)),
        }
    }

    /// The handler's counters.
    pub fn stats(&self) -> &LazyStats {
        &self.stats
    }
}

impl crate::memory::MemoryBacking for LazyMemory {
    fn status(&self) -> serde_json::Value {
        self.stats.to_json()
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use crate::snapshot::memory_file::write_memory_file;
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;

    fn ranges() -> [(GuestAddress, usize); 2] {
        [
            (GuestAddress(0), 2 * MIB as usize),
            (GuestAddress(4 * MIB), 6 * MIB as usize),
        ]
    }

    /// A memory file of a guest whose RAM holds a pattern in a few places.
    fn snapshot(dir: &Path) -> (PathBuf, MemoryIndex) {
        let mem = GuestMemoryMmap::from_ranges(&ranges()).unwrap();
        mem.write_slice(&[0xab; 3 * 4096], GuestAddress(4096))
            .unwrap();
        let pattern: Vec<u8> = (0..5 * MIB).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(4 * MIB + 8192))
            .unwrap();
        let path = dir.join("memory");
        let mut file = File::create(&path).unwrap();
        let index = write_memory_file(
            &mut file,
            &path,
            &mem,
            None,
            false,
            crate::memory::Residency::PageTables { file_data: &[] },
            [1; 16],
        )
        .unwrap();
        (path, index)
    }

    fn stat(lazy: &LazyMemory, name: &str) -> u64 {
        lazy.stats().to_json()[name].as_u64().unwrap()
    }

    #[test]
    fn faults_are_served_from_the_file_or_zero_and_released_pages_read_zero() {
        let dir = tempfile::tempdir().unwrap();
        let (path, index) = snapshot(dir.path());
        assert!(index.chunks.len() >= 3, "{:?}", index.chunks);
        let mem = GuestMemoryMmap::from_ranges(&ranges()).unwrap();
        let file = File::open(&path).unwrap();
        let lazy = Arc::new(
            LazyMemory::start(&mem, &index, &file, &path, &dir.path().join("state"), true).unwrap(),
        );
        let ram = GuestRam::lazily_filled(mem.clone(), lazy.clone(), Vec::new());
        assert!(ram.is_lazily_filled());
        // Touches from another thread, as a device worker would.
        let reader = mem.clone();
        let byte = std::thread::spawn(move || reader.read_obj::<u8>(GuestAddress(4096)).unwrap())
            .join()
            .unwrap();
        assert_eq!(byte, 0xab);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(3 * 4096 + 17)).unwrap(),
            0xab
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(5 * 4096)).unwrap(), 0);
        let mut buf = vec![0u8; 5 * MIB as usize];
        mem.read_slice(&mut buf, GuestAddress(4 * MIB + 8192))
            .unwrap();
        assert!(buf
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i * 7 % 251) as u8));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(10 * MIB - 1)).unwrap(), 0);
        let from_file = stat(&lazy, "pages_from_file");
        assert!(from_file >= 3 + 5 * 256, "{}", lazy.stats().to_json());
        assert!(from_file <= index.pages.kept);
        // Batching: a sequential read of 5 MiB took far fewer faults than pages.
        assert!(
            stat(&lazy, "faults") < 5 * 256 / 4,
            "{}",
            lazy.stats().to_json()
        );
        assert!(stat(&lazy, "chunks_verified") >= 2);

        // A released page reads zero afterwards, served or not yet served.
        mem.write_obj(0x5au8, GuestAddress(4096)).unwrap();
        ram.release(0, 4 * 4096).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * 4096)).unwrap(), 0);
        let never_served = 4 * MIB + 8192 + 5 * MIB - 4096;
        ram.release(4 * MIB, 2 * MIB).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4 * MIB + 8192)).unwrap(), 0);
        assert_eq!(stat(&lazy, "removed_bytes"), 4 * 4096 + 2 * MIB);
        // The pattern elsewhere is intact and the guest can write released pages again.
        mem.write_obj(0x77u8, GuestAddress(4 * MIB + 8192)).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(4 * MIB + 8192)).unwrap(),
            0x77
        );
        let i = (never_served - 4 * MIB - 8192) as usize;
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(never_served)).unwrap(),
            (i * 7 % 251) as u8
        );
        drop(ram);
        drop(lazy);
    }

    #[test]
    fn a_damaged_chunk_is_refused_when_first_touched_naming_file_and_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let (path, index) = snapshot(dir.path());
        // Flip a byte of the second chunk.
        let target = index.chunks[1];
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        use std::os::unix::fs::FileExt;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, target.file_offset + 100)
            .unwrap();
        file.write_all_at(&[byte[0] ^ 1], target.file_offset + 100)
            .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&ranges()).unwrap();
        let lazy =
            LazyMemory::start(&mem, &index, &file, &path, &dir.path().join("state"), true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        lazy.on_failure(move |error| tx.send(error).unwrap());
        // The first chunk is fine.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0xab);
        // Touching the damaged chunk: the handler reports and closes the userfaultfd, so the
        // touch returns (with zeros: the VM is being stopped) instead of hanging.
        let value = mem.read_obj::<u8>(GuestAddress(target.gpa + 100)).unwrap();
        assert_eq!(value, 0, "no byte of a damaged chunk reaches guest memory");
        let error = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert!(error.contains("chunk 1"), "{error}");
        assert!(error.contains(&path.display().to_string()), "{error}");
        drop(lazy);
    }

    #[test]
    fn a_snapshot_of_lazily_filled_memory_keeps_the_pages_not_served_yet() {
        let dir = tempfile::tempdir().unwrap();
        let (path, index) = snapshot(dir.path());
        let mem = GuestMemoryMmap::from_ranges(&ranges()).unwrap();
        let file = File::open(&path).unwrap();
        let lazy =
            LazyMemory::start(&mem, &index, &file, &path, &dir.path().join("state"), true).unwrap();
        assert_eq!(stat(&lazy, "faults"), 0);
        // A snapshot of the lazily filled memory, before anything was served, keeps every page
        // the original kept (the pages are read through the handler).
        let again = dir.path().join("again");
        let mut again_file = File::create(&again).unwrap();
        let again_index = write_memory_file(
            &mut again_file,
            &again,
            &mem,
            None,
            false,
            crate::memory::Residency::Unknown,
            [2; 16],
        )
        .unwrap();
        assert_eq!(again_index.pages.kept, index.pages.kept);
        assert_eq!(again_index.chunks.len(), index.chunks.len());
        assert!(stat(&lazy, "pages_from_file") >= index.pages.kept);
        drop(lazy);
    }
}
