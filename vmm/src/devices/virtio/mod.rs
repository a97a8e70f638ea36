//! virtio devices on the virtio-mmio transport.
//!
//! - [`mmio`]: the transport (registers, feature negotiation, queue set-up, activation);
//! - [`interrupt`]: the `InterruptStatus` register and the irqfd behind it;
//! - this module: building the devices a [`VmConfig`] asks for ([`build_virtio_devices`]) and
//!   placing them ([`attach_virtio_devices`]) — device `i` gets the 4 KiB window at
//!   `VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE` and IOAPIC GSI `5 + i`, an ioeventfd per queue
//!   on its `QueueNotify` register, an irqfd on its GSI, a slot on the MMIO bus and an entry in
//!   the DSDT.

pub mod interrupt;
pub mod mmio;

use std::sync::{Arc, Mutex};

use balloon::{Balloon, BalloonError, BalloonHandle, PageStateError, PageStateMap};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::Serialize;
use virtio_device::VirtioDevice;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use self::interrupt::MmioInterrupt;
use self::mmio::{MmioTransport, TransportError, TransportInfo, QUEUE_NOTIFY_OFFSET};
use crate::boot::acpi::VirtioMmioDevice;
use crate::boot::layout::{VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::config::VmConfig;
use crate::devices::bus::{Bus, BusError};
use crate::memory::GuestRam;

/// GSI of the first virtio-mmio device (0-4 are the PIT, keyboard, cascade and COM1 lines).
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// Last GSI usable for a virtio-mmio device: the IOAPIC has 24 pins, the last is the GED's.
pub const LAST_VIRTIO_GSI: u32 = crate::boot::layout::GED_GSI - 1;
/// Most virtio-mmio devices one VM can have (one GSI each).
pub const MAX_VIRTIO_DEVICES: usize = (LAST_VIRTIO_GSI - FIRST_VIRTIO_GSI + 1) as usize;

/// Errors attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// More devices than GSIs.
    #[error("{0} virtio devices requested; at most {MAX_VIRTIO_DEVICES} fit")]
    TooManyDevices(usize),
    /// An eventfd cannot be created.
    #[error("cannot create the {what} eventfd of virtio device {device}")]
    EventFd {
        /// Which device.
        device: String,
        /// Queue notification or interrupt.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused an ioeventfd or irqfd.
    #[error("KVM failed to {operation} for virtio device {device}")]
    Kvm {
        /// Which device.
        device: String,
        /// What was asked.
        operation: String,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The transport cannot wrap the device.
    #[error("cannot create the virtio-mmio transport of {device}")]
    Transport {
        /// Which device.
        device: String,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The device's window overlaps another device (a VMM bug).
    #[error("cannot place virtio device {device} on the MMIO bus")]
    Bus {
        /// Which device.
        device: String,
        /// Why.
        #[source]
        source: BusError,
    },
}

/// Errors creating the virtio devices of a configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The page-state map cannot describe guest RAM.
    #[error("cannot create the page-state map of guest RAM")]
    PageStateMap(#[source] PageStateError),
    /// The balloon device cannot be created.
    #[error("cannot create the balloon device")]
    Balloon(#[source] BalloonError),
    /// A block device cannot be created.
    #[error("cannot create the block device of drive {drive_id}")]
    Block {
        /// The drive.
        drive_id: String,
        /// Why.
        #[source]
        source: block::BlockError,
    },
    /// The vsock device cannot be created.
    #[error("cannot create the vsock device")]
    Vsock(#[source] vsock::VsockError),
}

/// The devices a configuration asks for, in slot order, and host-side handles to them.
pub struct VirtioDevices {
    /// Devices to attach with [`attach_virtio_devices`].
    pub specs: Vec<VirtioDeviceSpec>,
    /// Control of the balloon, if there is one.
    pub balloon: Option<BalloonHandle>,
    /// The drives, in configuration (= guest) order.
    pub drives: Vec<block::BlockHandle>,
    /// Status of the vsock device, if there is one.
    pub vsock: Option<vsock::VsockHandle>,
}

/// Creates the virtio devices `config` asks for. The balloon gets a page-state map over all of
/// guest RAM and releases pages through `ram`.
pub fn build_virtio_devices(
    config: &VmConfig,
    ram: &Arc<GuestRam>,
) -> Result<VirtioDevices, BuildError> {
    let mut devices = VirtioDevices {
        specs: Vec::new(),
        balloon: None,
        drives: Vec::new(),
        vsock: None,
    };
    if let Some(balloon_config) = &config.balloon {
        let page_states =
            PageStateMap::new(&ram.page_layout()).map_err(BuildError::PageStateMap)?;
        let device = Balloon::new(
            balloon_config.clone(),
            Arc::new(Mutex::new(page_states)),
            ram.clone(),
        )
        .map_err(BuildError::Balloon)?;
        devices.balloon = Some(device.handle());
        let (device, handle) = crate::snapshot::devices::SharedDevice::new(device);
        devices.specs.push(VirtioDeviceSpec {
            name: "balloon",
            device: Box::new(device),
            snapshot: Some(crate::snapshot::devices::SnapshotHandle::Balloon(handle)),
        });
    }
    for drive in &config.drives {
        let device = block::Block::new(drive.clone()).map_err(|source| BuildError::Block {
            drive_id: drive.drive_id.clone(),
            source,
        })?;
        devices.drives.push(device.handle());
        let (device, handle) = crate::snapshot::devices::SharedDevice::new(device);
        devices.specs.push(VirtioDeviceSpec {
            name: "block",
            device: Box::new(device),
            snapshot: Some(crate::snapshot::devices::SnapshotHandle::Block(handle)),
        });
    }
    if let Some(vsock_config) = &config.vsock {
        let device = vsock::Vsock::new(vsock_config.clone()).map_err(BuildError::Vsock)?;
        devices.vsock = Some(device.handle());
        let (device, handle) = crate::snapshot::devices::SharedDevice::new(device);
        devices.specs.push(VirtioDeviceSpec {
            name: "vsock",
            device: Box::new(device),
            snapshot: Some(crate::snapshot::devices::SnapshotHandle::Vsock(handle)),
        });
    }
    Ok(devices)
}

/// Where KVM delivers a device's queue notifications and takes its interrupts. Implemented by
/// [`VmFd`]; tests substitute a recorder.
pub trait IrqEventRegistry {
    /// Signals `event` when the guest writes `queue` (4 bytes) to MMIO address `addr`.
    fn register_queue_notify(
        &self,
        event: &EventFd,
        addr: u64,
        queue: u32,
    ) -> Result<(), kvm_ioctls::Error>;
    /// Raises `gsi` when `event` is written.
    fn register_irq(&self, event: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
}

impl IrqEventRegistry for VmFd {
    fn register_queue_notify(
        &self,
        event: &EventFd,
        addr: u64,
        queue: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        // A `u32` datamatch: KVM matches 4-byte writes of exactly `queue`.
        self.register_ioevent(event, &IoEventAddress::Mmio(addr), queue)
    }

    fn register_irq(&self, event: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        self.register_irqfd(event, gsi)
    }
}

/// A device to attach: a short name (`"balloon"`) and the device.
pub struct VirtioDeviceSpec {
    /// Name for logs and the API.
    pub name: &'static str,
    /// The device.
    pub device: Box<dyn VirtioDevice>,
    /// How a snapshot saves it (`None`: snapshots of the VM are refused).
    pub snapshot: Option<crate::snapshot::devices::SnapshotHandle>,
}

/// A device on the MMIO bus.
pub struct AttachedDevice {
    /// Its name.
    pub name: &'static str,
    /// Guest physical base of its register window.
    pub base: u64,
    /// Its interrupt.
    pub gsi: u32,
    /// The transport (also held by the bus).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// How a snapshot saves the device (`None`: snapshots of the VM are refused).
    pub snapshot: Option<crate::snapshot::devices::SnapshotHandle>,
}

/// What `GET /` reports about one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachedDeviceInfo {
    /// Its name.
    pub name: &'static str,
    /// Register window base, e.g. `"0xd0000000"`.
    pub mmio_base: String,
    /// Its GSI.
    pub gsi: u32,
    /// The transport's state.
    #[serde(flatten)]
    pub transport: TransportInfo,
}

impl AttachedDevice {
    /// The DSDT entry that tells the guest about the device.
    pub fn acpi(&self) -> VirtioMmioDevice {
        VirtioMmioDevice {
            base: self.base,
            size: VIRTIO_MMIO_SIZE,
            gsi: self.gsi,
        }
    }

    /// The device's state for the API.
    pub fn info(&self) -> AttachedDeviceInfo {
        let transport = self
            .transport
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .info();
        AttachedDeviceInfo {
            name: self.name,
            mmio_base: format!("{:#x}", self.base),
            gsi: self.gsi,
            transport,
        }
    }
}

/// Window base and GSI of the `index`-th virtio-mmio device.
pub fn slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
        FIRST_VIRTIO_GSI + index as u32,
    )
}

/// Puts each device behind a virtio-mmio transport at its slot: queue notifications through
/// ioeventfds, interrupts through an irqfd, registers on `mmio`. Returns the devices in slot
/// order (their DSDT entries come from [`AttachedDevice::acpi`]).
pub fn attach_virtio_devices(
    registry: &dyn IrqEventRegistry,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    devices: Vec<VirtioDeviceSpec>,
) -> Result<Vec<AttachedDevice>, AttachError> {
    if devices.len() > MAX_VIRTIO_DEVICES {
        return Err(AttachError::TooManyDevices(devices.len()));
    }
    let mut attached = Vec::with_capacity(devices.len());
    for (index, spec) in devices.into_iter().enumerate() {
        let (base, gsi) = slot(index);
        let label = format!("{}@{base:#x}", spec.name);
        let event = |what| {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| AttachError::EventFd {
                device: label.clone(),
                what,
                source,
            })
        };
        let queue_count = spec.device.queue_max_sizes().len();
        let queue_events = (0..queue_count)
            .map(|_| event("queue notification"))
            .collect::<Result<Vec<_>, _>>()?;
        for (queue, queue_event) in queue_events.iter().enumerate() {
            registry
                .register_queue_notify(queue_event, base + QUEUE_NOTIFY_OFFSET, queue as u32)
                .map_err(|source| AttachError::Kvm {
                    device: label.clone(),
                    operation: format!("register the ioeventfd of queue {queue}"),
                    source,
                })?;
        }
        let irq = event("interrupt")?;
        registry
            .register_irq(&irq, gsi)
            .map_err(|source| AttachError::Kvm {
                device: label.clone(),
                operation: format!("register the irqfd on GSI {gsi}"),
                source,
            })?;
        let interrupt = Arc::new(MmioInterrupt::new(irq));
        let transport = MmioTransport::new(
            label.clone(),
            spec.device,
            mem.clone(),
            interrupt,
            queue_events,
        )
        .map_err(|source| AttachError::Transport {
            device: label.clone(),
            source,
        })?;
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())
            .map_err(|source| AttachError::Bus {
                device: label.clone(),
                source,
            })?;
        tracing::debug!(device = %label, gsi, queues = queue_count, "virtio-mmio device attached");
        attached.push(AttachedDevice {
            name: spec.name,
            base,
            gsi,
            transport,
            snapshot: spec.snapshot,
        });
    }
    Ok(attached)
}

pub(crate) use error_text::error_chain;

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use virtio_device::{ActivateContext, ActivateError, VIRTIO_F_VERSION_1};
    use vm_memory::GuestAddress;

    use super::*;

    struct Dummy(Vec<u16>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            5
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.0
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn set_acked_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: ActivateContext) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) -> bool {
            true
        }
    }

    #[derive(Default)]
    struct Recorder {
        notifies: RefCell<Vec<(u64, u32)>>,
        irqs: RefCell<Vec<u32>>,
        fail_irq: bool,
    }

    impl IrqEventRegistry for Recorder {
        fn register_queue_notify(
            &self,
            _: &EventFd,
            addr: u64,
            queue: u32,
        ) -> Result<(), kvm_ioctls::Error> {
            self.notifies.borrow_mut().push((addr, queue));
            Ok(())
        }
        fn register_irq(&self, _: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            if self.fail_irq {
                return Err(kvm_ioctls::Error::new(libc::EBUSY));
            }
            self.irqs.borrow_mut().push(gsi);
            Ok(())
        }
    }

    fn spec(queues: usize) -> VirtioDeviceSpec {
        VirtioDeviceSpec {
            name: "dummy",
            device: Box::new(Dummy(vec![64; queues])),
            snapshot: None,
        }
    }

    #[test]
    fn devices_get_consecutive_windows_gsis_and_ioeventfds() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let recorder = Recorder::default();
        let mut bus = Bus::default();
        let attached =
            attach_virtio_devices(&recorder, &mem, &mut bus, vec![spec(3), spec(1)]).unwrap();
        assert_eq!(attached.len(), 2);
        assert_eq!(
            attached
                .iter()
                .map(AttachedDevice::acpi)
                .collect::<Vec<_>>(),
            [
                VirtioMmioDevice {
                    base: 0xd000_0000,
                    size: 0x1000,
                    gsi: 5
                },
                VirtioMmioDevice {
                    base: 0xd000_1000,
                    size: 0x1000,
                    gsi: 6
                },
            ]
        );
        assert_eq!(
            *recorder.notifies.borrow(),
            [
                (0xd000_0050, 0),
                (0xd000_0050, 1),
                (0xd000_0050, 2),
                (0xd000_1050, 0)
            ]
        );
        assert_eq!(*recorder.irqs.borrow(), [5, 6]);
        // The bus routes the windows to the transports.
        let mut magic = [0u8; 4];
        assert!(bus.read(0xd000_1000, &mut magic));
        assert_eq!(u32::from_le_bytes(magic), mmio::MMIO_MAGIC_VALUE);
        assert!(!bus.read(0xd000_2000, &mut magic));
        let info = attached[1].info();
        assert_eq!(info.mmio_base, "0xd0001000");
        assert_eq!((info.gsi, info.transport.device_id), (6, 5));
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["status"], 0);
        assert_eq!(json["name"], "dummy");
    }

    #[test]
    fn failures_name_the_device_and_operation() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let recorder = Recorder {
            fail_irq: true,
            ..Recorder::default()
        };
        let err = attach_virtio_devices(&recorder, &mem, &mut Bus::default(), vec![spec(1)])
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "KVM failed to register the irqfd on GSI 5 for virtio device dummy@0xd0000000"
        );
        let too_many = (0..=MAX_VIRTIO_DEVICES).map(|_| spec(1)).collect();
        assert!(matches!(
            attach_virtio_devices(&Recorder::default(), &mem, &mut Bus::default(), too_many),
            Err(AttachError::TooManyDevices(19))
        ));
        let bad = VirtioDeviceSpec {
            name: "bad",
            device: Box::new(Dummy(vec![100])),
            snapshot: None,
        };
        let err = attach_virtio_devices(&Recorder::default(), &mem, &mut Bus::default(), vec![bad])
            .err()
            .unwrap();
        assert!(matches!(err, AttachError::Transport { .. }), "{err}");
        assert!(
            error_chain(&err).contains("maximum size 100"),
            "{}",
            error_chain(&err)
        );
    }
}
