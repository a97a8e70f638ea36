//! Saving and restoring the block device in a snapshot.
//!
//! [`BlockState`] holds the drive configuration, the backing file's size, the negotiated
//! features, the queue's ring positions and the counters. Requests are served synchronously
//! under the queue lock, so [`Block::save_state`] never sees one in flight. A state file is
//! untrusted: [`Block::restore`] checks it against the drive configuration (the file is named
//! by path there; a file whose size differs from the saved one is refused) and guest memory.
//! The restored device applies the saved queue positions when the transport activates it.

use serde::{Deserialize, Serialize};
use virtio_device::{SavedQueue, VIRTIO_F_VERSION_1};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::config::DriveConfig;
use crate::device::{avail_features, lock, Block, BlockError, DeviceState, QUEUE_SIZE};
use crate::execute::{BlockCounters, Counters};
use crate::io::DiskFile;

/// Version of [`BlockState`] this code writes and accepts.
pub const BLOCK_STATE_VERSION: u32 = 1;

/// The block device's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// [`BLOCK_STATE_VERSION`].
    pub version: u32,
    /// The drive configuration.
    pub config: DriveConfig,
    /// Size of the backing file.
    pub size_bytes: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the driver had activated the device.
    pub activated: bool,
    /// The request queue (present when activated).
    pub queue: Option<SavedQueue>,
    /// Counters.
    pub counters: BlockCounters,
}

/// Errors restoring a block device.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Another state version.
    #[error("restore virtio-blk: state version {found}, expected {expected}")]
    UnsupportedVersion {
        /// In the state.
        found: u32,
        /// [`BLOCK_STATE_VERSION`].
        expected: u32,
    },
    /// The drive id or read-only flag differ from the saved ones.
    #[error("restore virtio-blk {drive_id}: {what} differs from the snapshot")]
    ConfigMismatch {
        /// The drive.
        drive_id: String,
        /// Which field.
        what: &'static str,
    },
    /// The file's size is not the saved one.
    #[error("restore virtio-blk {drive_id}: {} is {found} bytes, the snapshot's disk was {expected}", path.display())]
    SizeMismatch {
        /// The drive.
        drive_id: String,
        /// The file.
        path: std::path::PathBuf,
        /// Now.
        found: u64,
        /// Saved.
        expected: u64,
    },
    /// Features that this disk does not offer.
    #[error("restore virtio-blk: acked features {acked:#x} are not a subset of {offered:#x}")]
    UnknownFeatures {
        /// Saved.
        acked: u64,
        /// Offered now.
        offered: u64,
    },
    /// An activated device without VERSION_1, or an inconsistent queue presence.
    #[error("restore virtio-blk: {0}")]
    Inconsistent(&'static str),
    /// The saved queue is invalid.
    #[error("restore virtio-blk: invalid queue: {0}")]
    BadQueue(String),
    /// The device cannot be created.
    #[error("restore virtio-blk")]
    Device(#[source] BlockError),
}

impl Block {
    /// The device's state. Takes the queue lock, so any pass over the queue has finished:
    /// with the vCPUs paused no request is in flight.
    pub fn save_state(&self) -> BlockState {
        let queue = self
            .active
            .as_ref()
            .map(|active| SavedQueue::from(lock(active).queue.state()))
            .or(self.restored.map(SavedQueue::from));
        let state = lock(&self.shared.state);
        BlockState {
            version: BLOCK_STATE_VERSION,
            config: self.shared.config.clone(),
            size_bytes: self.shared.disk.size_bytes(),
            acked_features: state.acked_features,
            activated: state.activated || self.restored.is_some(),
            queue,
            counters: self.shared.counters.snapshot(),
        }
    }

    /// Rebuilds a device from `state` over the file `config` names, after checking both
    /// against each other and the queue against `mem`.
    pub fn restore(
        config: DriveConfig,
        state: &BlockState,
        mem: &GuestMemoryMmap,
    ) -> Result<Block, PersistError> {
        if state.version != BLOCK_STATE_VERSION {
            return Err(PersistError::UnsupportedVersion {
                found: state.version,
                expected: BLOCK_STATE_VERSION,
            });
        }
        let mismatch = |what| PersistError::ConfigMismatch {
            drive_id: config.drive_id.clone(),
            what,
        };
        if config.drive_id != state.config.drive_id {
            return Err(mismatch("drive_id"));
        }
        if config.is_read_only != state.config.is_read_only {
            return Err(mismatch("is_read_only"));
        }
        config
            .validate()
            .map_err(|e| PersistError::Device(BlockError::InvalidConfig(e)))?;
        let disk = DiskFile::open(&config.path_on_host, config.is_read_only).map_err(|source| {
            PersistError::Device(BlockError::Open {
                drive_id: config.drive_id.clone(),
                source,
            })
        })?;
        if disk.size_bytes() != state.size_bytes {
            return Err(PersistError::SizeMismatch {
                drive_id: config.drive_id.clone(),
                path: config.path_on_host.clone(),
                found: disk.size_bytes(),
                expected: state.size_bytes,
            });
        }
        let offered = avail_features(&disk);
        if state.acked_features & !offered != 0 {
            return Err(PersistError::UnknownFeatures {
                acked: state.acked_features,
                offered,
            });
        }
        let restored = match (state.activated, state.queue) {
            (false, None) => None,
            (true, Some(saved)) => {
                if state.acked_features & VIRTIO_F_VERSION_1 == 0 {
                    return Err(PersistError::Inconsistent(
                        "an activated device without VIRTIO_F_VERSION_1",
                    ));
                }
                Some(check_queue(saved, mem)?)
            }
            (true, None) => return Err(PersistError::Inconsistent("activated without a queue")),
            (false, Some(_)) => {
                return Err(PersistError::Inconsistent("a queue but not activated"))
            }
        };
        let device_state = DeviceState {
            acked_features: state.acked_features,
            activated: false,
        };
        let mut block = Block::with_disk(
            config,
            disk,
            Counters::from_snapshot(&state.counters),
            device_state,
        )
        .map_err(PersistError::Device)?;
        block.restored = restored;
        Ok(block)
    }

    /// The queue saved in the snapshot, until the device is activated again: what the
    /// transport should hand back to `activate`.
    pub fn restored_queue(&self) -> Option<Queue> {
        self.restored.and_then(|q| Queue::try_from(q).ok())
    }
}

/// Checks a saved queue: size, readiness and that its rings lie in guest memory.
fn check_queue(saved: SavedQueue, mem: &GuestMemoryMmap) -> Result<QueueState, PersistError> {
    if saved.max_size != QUEUE_SIZE {
        return Err(PersistError::BadQueue(format!(
            "max size {}, the device offers {QUEUE_SIZE}",
            saved.max_size
        )));
    }
    if saved.event_idx_enabled {
        return Err(PersistError::BadQueue("EVENT_IDX is never offered".into()));
    }
    if !saved.ready {
        return Err(PersistError::BadQueue("not ready".into()));
    }
    let state = QueueState::from(saved);
    let queue = Queue::try_from(state).map_err(|e| PersistError::BadQueue(format!("{e:?}")))?;
    if !queue.is_valid(mem) {
        return Err(PersistError::BadQueue(
            "its rings do not fit in guest memory".into(),
        ));
    }
    Ok(state)
}
