//! The device's snapshot state.
//!
//! Host connections cannot be saved (their peers are host processes), so saving resets them:
//! [`Vsock::save_state`] closes every host socket and queues an RST for each connection (so a
//! VM that keeps running sees them end), and a restored device, once the guest driver
//! re-activates it, sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue. The guest
//! then drops every connection; its listeners survive and host clients reconnect.

use serde::{Deserialize, Serialize};
use virtio_device::{SavedQueue, VIRTIO_F_VERSION_1};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::config::VsockConfig;
use crate::device::{lock, Restored, Vsock, VsockError, QUEUE_SIZE};

/// Version of [`VsockState`] this code writes and reads.
pub const VSOCK_STATE_VERSION: u32 = 1;

/// The vsock device's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockState {
    /// [`VSOCK_STATE_VERSION`].
    pub version: u32,
    /// The guest's CID (the guest read it at probe; a restore must keep it).
    pub guest_cid: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the driver had activated the device.
    pub activated: bool,
    /// rx, tx and event queues (empty if not activated).
    pub queues: Vec<SavedQueue>,
}

/// Why a [`VsockState`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Unknown version.
    #[error("restore vsock: state version {found}, expected {expected}")]
    UnsupportedVersion {
        /// Version in the state.
        found: u32,
        /// [`VSOCK_STATE_VERSION`].
        expected: u32,
    },
    /// The configuration gives another CID than the guest knows.
    #[error(
        "restore vsock: the snapshot's guest CID is {saved}, the configuration says {configured}"
    )]
    CidMismatch {
        /// CID in the state.
        saved: u32,
        /// CID in the configuration.
        configured: u32,
    },
    /// Features the device does not offer, or an active device without VERSION_1.
    #[error("restore vsock: acked features {acked:#x} invalid (the device offers {offered:#x}, VERSION_1 required when active)")]
    BadFeatures {
        /// Saved features.
        acked: u64,
        /// Offered features.
        offered: u64,
    },
    /// Wrong number of queues.
    #[error("restore vsock: {found} queues saved, expected {expected}")]
    QueueCount {
        /// Saved.
        found: usize,
        /// Expected.
        expected: usize,
    },
    /// A saved queue is invalid.
    #[error("restore vsock: queue {index}: {reason}")]
    InvalidQueue {
        /// Queue index.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The device cannot be created.
    #[error("restore vsock: cannot create the device")]
    Device(#[source] VsockError),
}

impl Vsock {
    /// The device's state for a snapshot. Resets every connection (see the module docs).
    pub fn save_state(&self) -> VsockState {
        let queues: Vec<SavedQueue> = match (&self.active, &self.restored) {
            (Some(active), _) => {
                let mut active = lock(active);
                active.muxer.reset_all();
                active
                    .queues
                    .iter()
                    .map(|q| SavedQueue::from(q.state()))
                    .collect()
            }
            (None, Some(restored)) => restored
                .queues
                .iter()
                .map(|q| SavedQueue::from(*q))
                .collect(),
            (None, None) => Vec::new(),
        };
        if self.active.is_some() {
            self.kick_worker();
        }
        VsockState {
            version: VSOCK_STATE_VERSION,
            guest_cid: self.shared.config.guest_cid,
            acked_features: self.acked_features,
            activated: !queues.is_empty(),
            queues,
        }
    }

    /// Rebuilds a device from `state` (untrusted) with `config` (its socket bound anew) for
    /// the guest memory `mem`. Once the driver activates it again, the guest gets a transport
    /// reset event.
    pub fn restore(
        config: VsockConfig,
        state: &VsockState,
        mem: &GuestMemoryMmap,
    ) -> Result<Vsock, PersistError> {
        if state.version != VSOCK_STATE_VERSION {
            return Err(PersistError::UnsupportedVersion {
                found: state.version,
                expected: VSOCK_STATE_VERSION,
            });
        }
        if state.guest_cid != config.guest_cid {
            return Err(PersistError::CidMismatch {
                saved: state.guest_cid,
                configured: config.guest_cid,
            });
        }
        let offered = VIRTIO_F_VERSION_1;
        if state.acked_features & !offered != 0
            || (state.activated && state.acked_features & VIRTIO_F_VERSION_1 == 0)
        {
            return Err(PersistError::BadFeatures {
                acked: state.acked_features,
                offered,
            });
        }
        let expected = if state.activated { 3 } else { 0 };
        if state.queues.len() != expected {
            return Err(PersistError::QueueCount {
                found: state.queues.len(),
                expected,
            });
        }
        let mut queues = Vec::with_capacity(expected);
        for (index, saved) in state.queues.iter().enumerate() {
            let invalid = |reason| PersistError::InvalidQueue { index, reason };
            if saved.max_size != QUEUE_SIZE {
                return Err(invalid("max_size differs from the device's queue size"));
            }
            if !saved.ready {
                return Err(invalid("not ready"));
            }
            if saved.event_idx_enabled {
                return Err(invalid("VIRTIO_RING_F_EVENT_IDX is not offered"));
            }
            let queue = Queue::try_from(QueueState::from(*saved))
                .map_err(|_| invalid("size or ring addresses invalid"))?;
            if !queue.is_valid(mem) {
                return Err(invalid("rings outside guest memory"));
            }
            if saved.next_avail.wrapping_sub(saved.next_used) > saved.size {
                return Err(invalid(
                    "next_avail and next_used are more than a queue apart",
                ));
            }
            queues.push(QueueState::from(*saved));
        }
        let mut vsock = Vsock::new(config).map_err(PersistError::Device)?;
        vsock.acked_features = state.acked_features;
        if state.activated {
            vsock.restored = Some(Restored { queues });
        }
        Ok(vsock)
    }

    /// The queues saved in the snapshot, until the device is activated again: what the
    /// transport should hand back to `activate`.
    pub fn restored_queues(&self) -> Option<Vec<Queue>> {
        let restored = self.restored.as_ref()?;
        restored
            .queues
            .iter()
            .map(|q| Queue::try_from(*q).ok())
            .collect()
    }
}
