//! virtio-blk device (virtio 1.2 §5.2) over a raw image file.
//!
//! - [`config::DriveConfig`] is the user configuration, in Firecracker's drive shape.
//! - [`io::DiskFile`] is the backing file: positioned reads and writes straight between the
//!   file and guest memory, `fdatasync` for flushes, `fallocate` for discard and write-zeroes.
//! - [`request`] parses and validates the descriptor chains the (untrusted) guest submits.
//! - [`Block`] is the device behind the [`virtio_device::VirtioDevice`] contract; one worker
//!   thread serves its single queue, one request at a time, synchronously, so a paused device
//!   never has a request in flight.
//! - [`persist::BlockState`] is the device's snapshot state, validated on restore.

pub mod config;
pub mod device;
mod execute;
pub mod io;
pub mod persist;
pub mod request;
mod worker;

#[cfg(test)]
mod test_utils;

pub use config::{DriveConfig, DriveConfigError};
pub use device::{
    Block, BlockCounters, BlockError, BlockHandle, BlockStatus, BLOCK_DEVICE_TYPE,
    CONFIG_SPACE_BYTES, QUEUE_SIZE, SECTOR_SIZE_BYTES, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
pub use io::{DiskFile, DiskIoError};
pub use persist::{BlockState, PersistError, BLOCK_STATE_VERSION};
pub use virtio_device::SavedQueue;
#[cfg(test)]
mod tests;
