//! Virtio device state in snapshots, generic over device types.
//!
//! A device that can be saved is built behind a [`SharedDevice`] so the VMM keeps a typed handle
//! ([`SnapshotHandle`]) next to the transport's `Box<dyn VirtioDevice>`. Saving and restoring a
//! device type is one arm in [`save_device`] and one in [`restore_devices`], calling the device
//! crate's own versioned `save_state()` / validating `restore(...)` (the balloon's is the model;
//! vsock and blk plug in the same way). A device without a handle makes the snapshot fail with
//! an error naming it, never a snapshot that silently lacks it.

use std::sync::{Arc, Mutex};

use balloon::{Balloon, BalloonHandle, BalloonState, PageStateMap, PageStateMapState};
use serde::{Deserialize, Serialize};
use virtio_device::{ActivateContext, ActivateError, VirtioDevice};

use super::SnapshotError;
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::{AttachedDevice, VirtioDeviceSpec};
use crate::memory::GuestRam;

/// A device shared between its transport and the snapshot code.
pub struct SharedDevice<D> {
    inner: Arc<Mutex<D>>,
    queue_max_sizes: Vec<u16>,
}

impl<D: VirtioDevice> SharedDevice<D> {
    /// Wraps `device`; returns the wrapper and the shared handle.
    pub fn new(device: D) -> (Self, Arc<Mutex<D>>) {
        let queue_max_sizes = device.queue_max_sizes().to_vec();
        let inner = Arc::new(Mutex::new(device));
        (
            Self {
                inner: inner.clone(),
                queue_max_sizes,
            },
            inner,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, D> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<D: VirtioDevice> VirtioDevice for SharedDevice<D> {
    fn device_type(&self) -> u32 {
        self.lock().device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }
    fn avail_features(&self) -> u64 {
        self.lock().avail_features()
    }
    fn set_acked_features(&mut self, features: u64) {
        self.lock().set_acked_features(features)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.lock().read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.lock().write_config(offset, data)
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.lock().activate(ctx)
    }
    fn reset(&mut self) -> bool {
        self.lock().reset()
    }
}

/// A typed handle to a device whose state a snapshot can save: one variant per device type.
#[derive(Clone)]
pub enum SnapshotHandle {
    /// The virtio-balloon.
    Balloon(Arc<Mutex<Balloon>>),
    /// A virtio-blk drive.
    Block(Arc<Mutex<block::Block>>),
    /// The virtio-vsock device.
    Vsock(Arc<Mutex<vsock::Vsock>>),
}

/// One virtio device's state: one variant per device type, each with the transport's state
/// and the device crate's own versioned state.
///
/// The vsock device sends the guest its transport reset event itself once the restored
/// transport re-activates it (host-side connections do not survive the process).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceState {
    /// The virtio-balloon, with the page-state map it maintains.
    Balloon {
        /// The virtio-mmio transport.
        transport: TransportState,
        /// The device.
        device: BalloonState,
        /// Which pages are inflated, reported or hinted.
        page_states: PageStateMapState,
    },
    /// A virtio-blk drive (its state holds its drive configuration).
    Block {
        /// The virtio-mmio transport.
        transport: TransportState,
        /// The device.
        device: block::BlockState,
    },
    /// The virtio-vsock device. Host connections are reset when saving; once re-activated on
    /// restore the device sends the guest `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
    Vsock {
        /// The virtio-mmio transport.
        transport: TransportState,
        /// The device.
        device: vsock::VsockState,
    },
}

impl DeviceState {
    /// The transport's part.
    pub fn transport(&self) -> &TransportState {
        match self {
            DeviceState::Balloon { transport, .. }
            | DeviceState::Block { transport, .. }
            | DeviceState::Vsock { transport, .. } => transport,
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceState::Balloon { .. } => "balloon",
            DeviceState::Block { .. } => "block",
            DeviceState::Vsock { .. } => "vsock",
        }
    }
}

/// Saves one attached device (vCPUs paused). Call without holding the page-state map's lock.
pub fn save_device(device: &AttachedDevice) -> Result<DeviceState, SnapshotError> {
    let transport = device
        .transport
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .save_state();
    match &device.snapshot {
        Some(SnapshotHandle::Balloon(balloon)) => {
            let balloon = balloon.lock().unwrap_or_else(|p| p.into_inner());
            let state = balloon.save_state();
            let page_states = balloon
                .handle()
                .page_states()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state();
            Ok(DeviceState::Balloon {
                transport,
                device: state,
                page_states,
            })
        }
        Some(SnapshotHandle::Block(device)) => Ok(DeviceState::Block {
            transport,
            device: device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state(),
        }),
        Some(SnapshotHandle::Vsock(device)) => Ok(DeviceState::Vsock {
            transport,
            device: device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state(),
        }),
        None => Err(SnapshotError::UnsupportedDevice(format!(
            "{}@{:#x}",
            device.name, device.base
        ))),
    }
}

/// The devices of a snapshot, rebuilt (not yet attached) with the handles the VM keeps.
pub struct RestoredDevices {
    /// To attach, in slot order.
    pub specs: Vec<VirtioDeviceSpec>,
    /// The balloon's controls, if there is one.
    pub balloon: Option<BalloonHandle>,
    /// The drives' handles, in guest order.
    pub drives: Vec<block::BlockHandle>,
    /// The vsock device's handle, if there is one.
    pub vsock: Option<vsock::VsockHandle>,
}

/// Marks the pages of `data_ranges` (guest ranges the snapshot holds data for) live in `map`.
///
/// A page the memory file keeps is live by construction: the writer classifies pages with the
/// map and keeps only live ones. Snapshots written before the writer synced the dirty log ahead
/// of saving the map could still name such a page free (the guest wrote it since the previous
/// sync); trusting that, the clone's next snapshot would have left the page's data out. A raw
/// full dump keeps free pages too, so after its restore no page is free in the map: the clone's
/// next snapshot then leaves inflated and reported pages out as zero (they were released) and
/// keeps hinted ones, larger but never lossy. Returns how many pages changed (logged when any
/// did).
pub fn live_where_data(
    map: &mut PageStateMap,
    data_ranges: &[(u64, u64)],
) -> Result<u64, balloon::PageStateError> {
    let page = super::format::PAGE_BYTES;
    let mut changed = 0;
    for &(gpa, len) in data_ranges {
        changed += map.mark_written(gpa / page..(gpa + len).div_ceil(page))?;
    }
    if changed > 0 {
        tracing::info!(
            pages = changed,
            "page-state map: pages the snapshot holds data for were marked free; now live"
        );
    }
    Ok(changed)
}

/// Rebuilds each device from its saved state (validated by the device crate). The guest ranges
/// the snapshot restored data into ([`GuestRam::snapshot_data`]) stay live in the balloon's
/// page-state map whatever the saved map says (see [`live_where_data`]).
pub fn restore_devices(
    states: &[DeviceState],
    ram: &Arc<GuestRam>,
    vsock_config: Option<&vsock::VsockConfig>,
    state_path: &std::path::Path,
) -> Result<RestoredDevices, SnapshotError> {
    let mut restored = RestoredDevices {
        specs: Vec::with_capacity(states.len()),
        balloon: None,
        drives: Vec::new(),
        vsock: None,
    };
    let invalid = |name: &str, reason: String| SnapshotError::Invalid {
        path: state_path.to_owned(),
        reason: format!("device {name}: {reason}"),
    };
    for state in states {
        match state {
            DeviceState::Balloon {
                device,
                page_states,
                ..
            } => {
                let mut map = PageStateMap::restore(page_states, &ram.page_layout())
                    .map_err(|e| invalid("balloon", format!("page-state map: {e}")))?;
                live_where_data(&mut map, ram.snapshot_data())
                    .map_err(|e| invalid("balloon", format!("page-state map: {e}")))?;
                let balloon =
                    Balloon::restore(device, Arc::new(Mutex::new(map)), ram.clone(), ram.memory())
                        .map_err(|e| invalid("balloon", crate::devices::virtio::error_chain(&e)))?;
                restored.balloon = Some(balloon.handle());
                let (device, handle) = SharedDevice::new(balloon);
                restored.specs.push(VirtioDeviceSpec {
                    name: "balloon",
                    device: Box::new(device),
                    snapshot: Some(SnapshotHandle::Balloon(handle)),
                });
            }
            DeviceState::Block { device, .. } => {
                let drive = block::Block::restore(device.config.clone(), device, ram.memory())
                    .map_err(|e| invalid("block", crate::devices::virtio::error_chain(&e)))?;
                restored.drives.push(drive.handle());
                let (drive, handle) = SharedDevice::new(drive);
                restored.specs.push(VirtioDeviceSpec {
                    name: "block",
                    device: Box::new(drive),
                    snapshot: Some(SnapshotHandle::Block(handle)),
                });
            }
            DeviceState::Vsock { device, .. } => {
                let config = vsock_config.ok_or_else(|| {
                    invalid("vsock", "the configuration has no vsock section".into())
                })?;
                let vsock = vsock::Vsock::restore(config.clone(), device, ram.memory())
                    .map_err(|e| invalid("vsock", crate::devices::virtio::error_chain(&e)))?;
                restored.vsock = Some(vsock.handle());
                let (vsock, handle) = SharedDevice::new(vsock);
                restored.specs.push(VirtioDeviceSpec {
                    name: "vsock",
                    device: Box::new(vsock),
                    snapshot: Some(SnapshotHandle::Vsock(handle)),
                });
            }
        }
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use balloon::PageState;

    use super::*;

    /// A saved map that names a page free while the memory file holds its data (written by a
    /// VMM that saved the map before its last dirty-log sync) gets the page back live.
    #[test]
    fn pages_the_snapshot_holds_data_for_are_live() {
        let mut map = PageStateMap::with_ram_size(1 << 20).unwrap();
        map.mark_range(0, 1 << 20, PageState::Reported).unwrap();
        let changed = live_where_data(&mut map, &[(0x3000, 0x2000), (0x10000, 0x1000)]).unwrap();
        assert_eq!(changed, 3);
        for (pfn, state) in [
            (2, PageState::Reported),
            (3, PageState::Live),
            (4, PageState::Live),
            (5, PageState::Reported),
            (0x10, PageState::Live),
        ] {
            assert_eq!(map.state(pfn).unwrap(), state, "pfn {pfn}");
        }
        // Already live: nothing changes; outside RAM: an error.
        assert_eq!(live_where_data(&mut map, &[(0x3000, 0x1000)]).unwrap(), 0);
        assert!(live_where_data(&mut map, &[(2 << 20, 0x1000)]).is_err());
    }
}
