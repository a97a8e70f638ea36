//! The virtio-blk device (virtio 1.2 §5.2), independent of the transport.
//!
//! One request queue. Features offered: `VERSION_1`, `SEG_MAX`, `FLUSH`, `RO` for read-only
//! drives, `DISCARD` and `WRITE_ZEROES` when the file is writable and its file system punches
//! holes. Configuration space (little-endian, read-only for the driver):
//!
//! | offset | field |
//! |--------|-------|
//! | 0      | `capacity` in 512-byte sectors |
//! | 12     | `seg_max` |
//! | 36..56 | discard / write-zeroes limits |
//! | 56     | `write_zeroes_may_unmap` |

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_device::{ActivateContext, ActivateError, QueueT, VirtioDevice, VIRTIO_F_VERSION_1};
use virtio_queue::QueueState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{DriveConfig, DriveConfigError};
pub use crate::execute::BlockCounters;
use crate::execute::Counters;
use crate::io::{DiskFile, DiskIoError};
use crate::request::{Limits, GET_ID_BYTES, MAX_RANGES, SECTOR_BYTES};
use crate::worker::{self, ActiveQueue, WorkerHandle};

/// Most segments in one request (`seg_max`).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// The disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// The device handles flush requests.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// The device handles discard requests.
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
/// The device handles write-zeroes requests.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// The virtio device ID of a block device.
pub const BLOCK_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per sector in the configuration space and requests.
pub const SECTOR_SIZE_BYTES: u64 = SECTOR_BYTES;
/// Size of the configuration space (up to `write_zeroes_may_unmap` and its padding).
pub const CONFIG_SPACE_BYTES: usize = 60;
/// Most sectors in one discard / write-zeroes range (2 GiB).
const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Discard alignment in sectors (4 KiB).
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

/// Locks `mutex`, recovering the data if a thread panicked while holding it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The drive configuration is invalid.
    #[error("create virtio-blk device: invalid drive configuration")]
    InvalidConfig(#[source] DriveConfigError),
    /// The backing file cannot be opened.
    #[error("create virtio-blk device {drive_id}")]
    Open {
        /// The drive.
        drive_id: String,
        /// Why.
        #[source]
        source: DiskIoError,
    },
    /// The backing file is smaller than one sector.
    #[error("create virtio-blk device {drive_id}: {} is smaller than 512 bytes", path.display())]
    TooSmall {
        /// The drive.
        drive_id: String,
        /// The file.
        path: std::path::PathBuf,
    },
    /// The control eventfd cannot be created.
    #[error("create virtio-blk device: cannot create the control eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Mutable device state.
#[derive(Debug, Default)]
pub(crate) struct DeviceState {
    /// Features the driver accepted.
    pub(crate) acked_features: u64,
    /// Between `activate` and `reset`.
    pub(crate) activated: bool,
}

/// What the device, its handles and its worker share.
pub(crate) struct Shared {
    pub(crate) config: DriveConfig,
    pub(crate) disk: DiskFile,
    pub(crate) serial: [u8; GET_ID_BYTES],
    pub(crate) capacity_sectors: u64,
    pub(crate) state: Mutex<DeviceState>,
    pub(crate) counters: Counters,
    pub(crate) control_evt: EventFd,
}

/// Host view of a drive (the `GET /drives/<id>` body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStatus {
    /// The drive id.
    pub drive_id: String,
    /// The backing file.
    pub path_on_host: std::path::PathBuf,
    /// Opened read-only.
    pub is_read_only: bool,
    /// Size of the file when opened.
    pub size_bytes: u64,
    /// Capacity the guest sees, in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Discard and write-zeroes are offered.
    pub discard_supported: bool,
    /// The guest driver runs the device.
    pub activated: bool,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Cumulative counters.
    pub counters: BlockCounters,
}

/// Host-side read access to a block device; cheap to clone.
#[derive(Clone)]
pub struct BlockHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BlockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHandle")
            .field("drive_id", &self.shared.config.drive_id)
            .finish_non_exhaustive()
    }
}

impl BlockHandle {
    /// The drive id.
    pub fn drive_id(&self) -> &str {
        &self.shared.config.drive_id
    }

    /// Configuration, negotiated features and counters.
    pub fn status(&self) -> BlockStatus {
        let state = lock(&self.shared.state);
        let shared = &self.shared;
        BlockStatus {
            drive_id: shared.config.drive_id.clone(),
            path_on_host: shared.config.path_on_host.clone(),
            is_read_only: shared.disk.read_only(),
            size_bytes: shared.disk.size_bytes(),
            capacity_sectors: shared.capacity_sectors,
            discard_supported: shared.disk.supports_punch_hole(),
            activated: state.activated,
            acked_features: state.acked_features,
            counters: shared.counters.snapshot(),
        }
    }
}

/// The virtio-blk device.
pub struct Block {
    pub(crate) shared: Arc<Shared>,
    avail_features: u64,
    queue_sizes: [u16; 1],
    worker: Option<WorkerHandle>,
    pub(crate) active: Option<Arc<Mutex<ActiveQueue>>>,
    /// Queue saved in a snapshot, applied at the next activation.
    pub(crate) restored: Option<QueueState>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("drive_id", &self.shared.config.drive_id)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

/// The features offered for `disk`.
pub fn avail_features(disk: &DiskFile) -> u64 {
    let mut features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH;
    if disk.read_only() {
        features |= VIRTIO_BLK_F_RO;
    }
    if disk.supports_punch_hole() {
        features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
    }
    features
}

impl Block {
    /// Opens the drive's file and creates the device.
    pub fn new(config: DriveConfig) -> Result<Self, BlockError> {
        Self::build(config, Counters::default(), DeviceState::default())
    }

    pub(crate) fn build(
        config: DriveConfig,
        counters: Counters,
        state: DeviceState,
    ) -> Result<Self, BlockError> {
        config.validate().map_err(BlockError::InvalidConfig)?;
        let disk = DiskFile::open(&config.path_on_host, config.is_read_only).map_err(|source| {
            BlockError::Open {
                drive_id: config.drive_id.clone(),
                source,
            }
        })?;
        Self::with_disk(config, disk, counters, state)
    }

    pub(crate) fn with_disk(
        config: DriveConfig,
        disk: DiskFile,
        counters: Counters,
        state: DeviceState,
    ) -> Result<Self, BlockError> {
        let capacity_sectors = disk.size_bytes() / SECTOR_BYTES;
        if capacity_sectors == 0 {
            return Err(BlockError::TooSmall {
                drive_id: config.drive_id.clone(),
                path: config.path_on_host.clone(),
            });
        }
        let mut serial = [0u8; GET_ID_BYTES];
        let id = config.drive_id.as_bytes();
        let n = id.len().min(GET_ID_BYTES);
        serial[..n].copy_from_slice(&id[..n]);
        let control_evt = EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        let avail_features = avail_features(&disk);
        Ok(Block {
            shared: Arc::new(Shared {
                config,
                disk,
                serial,
                capacity_sectors,
                state: Mutex::new(state),
                counters,
                control_evt,
            }),
            avail_features,
            queue_sizes: [QUEUE_SIZE],
            worker: None,
            active: None,
            restored: None,
        })
    }

    /// A handle for the API.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            shared: self.shared.clone(),
        }
    }

    /// The drive configuration.
    pub fn config(&self) -> &DriveConfig {
        &self.shared.config
    }

    /// Whether the worker runs.
    pub fn is_activated(&self) -> bool {
        self.worker.is_some()
    }

    /// The configuration space.
    fn config_bytes(&self) -> [u8; CONFIG_SPACE_BYTES] {
        let mut b = [0u8; CONFIG_SPACE_BYTES];
        let put32 = |b: &mut [u8; CONFIG_SPACE_BYTES], at: usize, v: u32| {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        b[0..8].copy_from_slice(&self.shared.capacity_sectors.to_le_bytes());
        // seg_max: a chain also holds the header and the status descriptors.
        put32(&mut b, 12, u32::from(QUEUE_SIZE) - 2);
        if self.avail_features & VIRTIO_BLK_F_DISCARD != 0 {
            put32(&mut b, 36, MAX_RANGE_SECTORS);
            put32(&mut b, 40, MAX_RANGES);
            put32(&mut b, 44, DISCARD_ALIGNMENT_SECTORS);
            put32(&mut b, 48, MAX_RANGE_SECTORS);
            put32(&mut b, 52, MAX_RANGES);
            b[56] = 1;
        }
        b
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        self.active = None;
    }

    /// The request limits under the negotiated features.
    pub(crate) fn limits(&self, acked: u64) -> Limits {
        Limits {
            capacity_sectors: self.shared.capacity_sectors,
            discard: acked & VIRTIO_BLK_F_DISCARD != 0,
            write_zeroes: acked & VIRTIO_BLK_F_WRITE_ZEROES != 0,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        if self.worker.is_some() {
            tracing::warn!(
                features,
                "virtio-blk: feature change after activation ignored"
            );
            return;
        }
        lock(&self.shared.state).acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        virtio_device::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // `writeback` (CONFIG_WCE) is not offered: every field is read-only.
        tracing::debug!(
            offset,
            len = data.len(),
            "virtio-blk: configuration write ignored"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::BadQueues(
                "the device is already active".into(),
            ));
        }
        let acked = lock(&self.shared.state).acked_features;
        let (Some(mut queue), Some(queue_event)) = (
            ctx.queues.into_iter().next(),
            ctx.queue_events.into_iter().next(),
        ) else {
            return Err(ActivateError::BadQueues(
                "no request queue or queue event given".into(),
            ));
        };
        if !queue.ready() {
            return Err(ActivateError::BadQueues(
                "the request queue is not ready".into(),
            ));
        }
        if !queue.is_valid(&ctx.mem) {
            return Err(ActivateError::BadQueues(
                "the request queue does not fit in guest memory".into(),
            ));
        }
        if let Some(saved) = &self.restored {
            let current = queue.state();
            let same_rings = saved.size == current.size
                && saved.desc_table == current.desc_table
                && saved.avail_ring == current.avail_ring
                && saved.used_ring == current.used_ring;
            if !same_rings {
                return Err(ActivateError::BadQueues(
                    "the request queue differs from the one saved in the snapshot".into(),
                ));
            }
            queue.set_next_avail(saved.next_avail);
            queue.set_next_used(saved.next_used);
        }
        let active = Arc::new(Mutex::new(ActiveQueue {
            mem: ctx.mem,
            queue,
            write_log: ctx.write_log,
            limits: self.limits(acked),
        }));
        let worker = worker::spawn(
            self.shared.clone(),
            active.clone(),
            queue_event,
            ctx.interrupt,
        )
        .map_err(ActivateError::Worker)?;
        lock(&self.shared.state).activated = true;
        self.worker = Some(worker);
        self.active = Some(active);
        self.restored = None;
        Ok(())
    }

    fn worker(&self) -> Option<&virtio_device::WorkerHandle> {
        self.worker.as_ref()
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.restored = None;
        let mut state = lock(&self.shared.state);
        state.activated = false;
        state.acked_features = 0;
        true
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
