//! The contract between a virtio device and the transport that exposes it to the guest.
//!
//! A device (the balloon, later vsock and blk) implements [`VirtioDevice`]: its features, its
//! configuration space, and what to do once the guest driver has set up its queues
//! ([`VirtioDevice::activate`]). The transport (virtio-mmio, in the `vmm` crate) owns the
//! registers, feature negotiation and queue set-up, turns guest queue notifications into
//! [`EventFd`] signals (ioeventfd) and delivers the device's interrupts ([`Interrupt`]). Devices
//! never see the transport, so they are testable with `virtio-queue`'s mock queues.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

mod thread_hook;
pub mod worker;
pub use thread_hook::{set_worker_thread_hook, worker_thread_started};

pub use virtio_queue::{Queue, QueueT};
pub use vm_memory::GuestMemoryMmap;
pub use vmm_sys_util::eventfd::EventFd;
pub use worker::{WorkerError, WorkerGate, WorkerHandle};

/// `VIRTIO_F_VERSION_1`: every device offers it; the transport requires the guest to accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// How a device tells the guest something happened.
pub trait Interrupt: Send + Sync {
    /// The device added buffers to the used ring of queue `queue_index`.
    fn signal_used_queue(&self, queue_index: u16) -> std::io::Result<()>;
    /// The device's configuration space changed (e.g. a new balloon target).
    fn signal_config_change(&self) -> std::io::Result<()>;
}

/// What a device receives when the guest driver sets `DRIVER_OK`.
pub struct ActivateContext {
    /// Guest memory; queues' rings and buffers live there. Cheap to clone.
    pub mem: GuestMemoryMmap,
    /// The queues the driver set up, in queue-index order (ready or not).
    pub queues: Vec<Queue>,
    /// One event per queue, signalled when the guest notifies that queue.
    pub queue_events: Vec<EventFd>,
    /// How to interrupt the guest.
    pub interrupt: Arc<dyn Interrupt>,
    /// Where to record guest memory the device writes (used-ring entries aside), when the VMM
    /// tracks writes for snapshot diff layers; `None` when nothing tracks them.
    pub write_log: Option<Arc<dyn GuestWriteLog>>,
}

/// Records guest memory the VMM writes on the guest's behalf (e.g. a block device filling a
/// read buffer, vsock copying received bytes). KVM's dirty log only sees writes by vCPUs, so a
/// snapshot layer that stores "pages changed since the parent" must also learn of these.
pub trait GuestWriteLog: Send + Sync {
    /// `len_bytes` bytes at guest physical address `gpa` were written by the VMM.
    fn record_write(&self, gpa: u64, len_bytes: u64);
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer queues than the device needs, or invalid ones.
    #[error("invalid queue set-up: {0}")]
    BadQueues(String),
    /// The device could not start its worker.
    #[error("cannot start the device's worker")]
    Worker(#[source] std::io::Error),
}

/// A virtio device, independent of the transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`virtio_bindings::virtio_ids`), e.g. 5 for the balloon.
    fn device_type(&self) -> u32;

    /// The largest size the driver may give each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers, including [`VIRTIO_F_VERSION_1`].
    fn avail_features(&self) -> u64;

    /// Records the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);

    /// Reads `data.len()` bytes of configuration space at `offset`; out-of-range bytes read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes configuration space; writes to read-only or out-of-range bytes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts serving the queues. Called once per driver initialisation.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// Stops serving and returns to the pre-activation state (driver reset). Returns `false`
    /// when the device cannot be reset, in which case the transport marks it failed.
    fn reset(&mut self) -> bool;

    /// The device's running worker thread, if it is active: a snapshot parks it (nothing in
    /// flight while device state is saved and memory scanned) and lets it go on afterwards.
    fn worker(&self) -> Option<&WorkerHandle> {
        None
    }
}

/// One queue's state ([`virtio_queue::QueueState`] in serializable form), as every device's
/// snapshot state stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedQueue {
    /// Largest size the device offered.
    pub max_size: u16,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` in use (never: not offered).
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        SavedQueue {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// Copies `data.len()` bytes of a device's configuration space `config` from `offset` into
/// `data`; bytes past its end (or an offset that overflows) read 0, as
/// [`VirtioDevice::read_config`] requires.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, out) in data.iter_mut().enumerate() {
        *out = offset
            .checked_add(i as u64)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| config.get(at).copied())
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_zero_fill_outside_the_space() {
        let mut out = [0xaa; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut out);
        assert_eq!(out, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
