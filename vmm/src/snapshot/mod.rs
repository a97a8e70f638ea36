//! Snapshots: a paused VM written to a directory (a state file and a compact memory file), and
//! a new VMM process recreating the VM from it without copying guest memory.
//!
//! - [`format`]: file names, magic numbers, version, header framing;
//! - [`state`]: what the state file holds;
//! - [`memory_file`]: choosing the pages to keep, writing them, mapping them back;
//! - [`take`]: collecting the state of a paused VM;
//! - [`restore`]: recreating a VM from a snapshot (memory mapped, not copied);
//! - [`lazy`]: restoring memory on first touch instead (`--lazy uffd`, a userfaultfd handler);
//! - [`write_pipe`]: writing the kept pages while a second thread checksums them;
//! - [`writer`]: the snapshot directory, written under a temporary name, fsynced and renamed;
//! - [`reader`]: loading and validating a snapshot for restore and `inspect`;
//! - [`layer`], [`chain`]: diff layers, their parents, and a chain resolved into segments;
//! - [`map`]: every page's class and the picture of guest memory `vmm inspect --map` draws;
//! - [`checksum`]: the memory chunks' checksum (XXH64; CRC-32C in older formats);
//! - [`working_set`]: the pages a clone touches first, recorded once and brought in by later
//!   restores;
//! - [`crc32c`]: the checksum of the state file and the headers.

pub mod audit;
pub mod chain;
pub mod checksum;
pub mod crc32c;
pub mod devices;
pub mod flatten;
pub mod format;
pub mod layer;
pub mod lazy;
pub mod map;
pub mod memory_file;
pub mod prefault;
pub mod reader;
pub mod restore;
pub mod state;
pub mod take;
pub mod verified;
pub mod working_set;
pub mod write_pipe;
pub mod writer;

pub use take::{take, AfterSnapshot, LiveVm, SnapshotReply, SnapshotRequest, SNAPSHOT_TIMEOUT};
pub use writer::SnapshotSummary;

use std::path::PathBuf;

use format::HeaderError;

/// Errors writing, reading or restoring a snapshot. Each names the file (and chunk) at fault.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("cannot {operation} {path}")]
    Io {
        /// What the VMM was doing.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A header is damaged, of another format or version.
    #[error("{path}: invalid header")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: HeaderError,
    },
    /// The state body does not match its checksum.
    #[error("{path}: state checksum mismatch (expected {expected:#010x}, found {found:#010x}): the file is corrupt")]
    StateChecksum {
        /// The state file.
        path: PathBuf,
        /// From the header.
        expected: u32,
        /// Computed.
        found: u32,
    },
    /// The state body is not a valid state.
    #[error("{path}: cannot decode the state")]
    StateDecode {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: format::StateBodyError,
    },
    /// A file is shorter than its header or index says.
    #[error("{path}: truncated: {actual} bytes, the snapshot needs {needed}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes there.
        actual: u64,
    },
    /// The memory file belongs to another snapshot.
    #[error("{path} belongs to snapshot {found}, but the state file is of snapshot {expected}")]
    ForeignMemoryFile {
        /// The memory file.
        path: PathBuf,
        /// The state's snapshot ID.
        expected: String,
        /// The memory file's.
        found: String,
    },
    /// A memory chunk does not match its checksum.
    #[error("{path}: chunk {index} (guest address {gpa:#x}, {len_bytes} bytes at file offset {file_offset:#x}) checksum mismatch: the file is corrupt")]
    ChunkChecksum {
        /// The memory file.
        path: PathBuf,
        /// Chunk number in the index.
        index: usize,
        /// Its guest address.
        gpa: u64,
        /// Its length.
        len_bytes: u64,
        /// Its offset in the file.
        file_offset: u64,
    },
    /// Bytes between memory chunks, which the writer never wrote, do not read zero.
    #[error("{path}: byte {file_offset:#x} is not zero, but it lies in the hole of {hole_bytes} bytes at file offset {hole_offset:#x} between memory chunks, which must read zero: the file is corrupt")]
    HoleNotZero {
        /// The memory file.
        path: PathBuf,
        /// The first non-zero byte.
        file_offset: u64,
        /// Where the hole starts.
        hole_offset: u64,
        /// Its length.
        hole_bytes: u64,
    },
    /// The state is self-inconsistent (e.g. a chunk outside guest RAM).
    #[error("{path}: invalid snapshot: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A diff layer or a chain of them is refused.
    #[error(transparent)]
    Layer(#[from] layer::LayerError),
    /// The VM has a device whose state cannot be saved yet.
    #[error("cannot snapshot this VM: device {0} does not support snapshots yet")]
    UnsupportedDevice(String),
    /// The output path exists and is not a snapshot (it is never overwritten then).
    #[error("{0} exists and is not a snapshot directory; refusing to replace it")]
    NotASnapshotDir(PathBuf),
    /// Pausing the vCPUs or collecting their state failed.
    #[error("cannot save the vCPUs: {0}")]
    Vcpus(String),
    /// A vCPU's state cannot be read or set.
    #[error(transparent)]
    Vcpu(#[from] crate::kvm::vcpu::VcpuError),
    /// The VM's state cannot be read or set.
    #[error(transparent)]
    Vm(#[from] crate::kvm::vm::VmError),
    /// A device worker could not be paused for the snapshot.
    #[error("cannot pause the device workers")]
    PauseWorker(#[source] virtio_device::WorkerError),
    /// Lazy restore (userfaultfd) could not be set up.
    #[error(transparent)]
    Lazy(#[from] Box<lazy::LazyError>),
    /// Mapping the memory file into guest memory failed.
    #[error("cannot map {len_bytes} bytes of {path} at guest address {gpa:#x}")]
    Map {
        /// The memory file.
        path: PathBuf,
        /// Guest address.
        gpa: u64,
        /// Length.
        len_bytes: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl SnapshotError {
    /// An [`SnapshotError::Io`] for `operation` on `path`.
    pub fn io(
        operation: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> SnapshotError {
        let path = path.into();
        move |source| SnapshotError::Io {
            operation,
            path,
            source,
        }
    }
}
