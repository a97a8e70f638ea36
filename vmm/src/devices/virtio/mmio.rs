//! The virtio-mmio transport (virtio 1.2 §4.2, register layout version 2).
//!
//! One [`MmioTransport`] per device, on the MMIO bus at its own 4 KiB window. It owns the
//! registers, feature negotiation, the device status state machine and the queues' set-up,
//! and hands the queues to the [`VirtioDevice`] when the driver sets `DRIVER_OK`.
//!
//! Queue notifications normally never reach it: the VMM registers each queue's event as an
//! ioeventfd on the `QueueNotify` address (datamatch: the queue index), so KVM signals the event
//! without leaving the kernel. A notification that does reach the transport (no ioeventfd, e.g.
//! in tests) signals the same event. Interrupts go through [`MmioInterrupt`] (an irqfd).
//!
//! Everything here is driven by guest writes, so nothing may panic: accesses of the wrong width
//! or alignment, writes in the wrong device state and out-of-range selectors are ignored and
//! logged at debug level (rate limited).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ADMIN_VQ, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_NOTIF_CONFIG_DATA,
    VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_SR_IOV,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_device::{
    ActivateContext, GuestWriteLog, Interrupt, SavedQueue, VirtioDevice, VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::MmioInterrupt;
use crate::devices::bus::{BusDevice, GuestRequest};

/// `MagicValue`: "virt" in little-endian ASCII.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version`: the virtio 1.x (non-legacy) register layout.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` reported to the guest.
pub const VENDOR_ID: u32 = 0;
/// Offset of the device-specific configuration space in the window.
pub const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// Offset of `QueueNotify`, where the VMM registers each queue's ioeventfd.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Size of one device's register window; the configuration space ends here.
pub const MMIO_WINDOW_BYTES: u64 = 0x1000;

/// Feature bits this transport cannot serve (packed rings, notification data, queue reset,
/// SR-IOV, admin queues): never offered to the guest, whatever the device offers.
const UNSUPPORTED_TRANSPORT_FEATURES: u64 = (1 << VIRTIO_F_RING_PACKED)
    | (1 << VIRTIO_F_SR_IOV)
    | (1 << VIRTIO_F_NOTIFICATION_DATA)
    | (1 << VIRTIO_F_NOTIF_CONFIG_DATA)
    | (1 << VIRTIO_F_RING_RESET)
    | (1 << VIRTIO_F_ADMIN_VQ);

/// Status bits the driver sets.
const DRIVER_STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;

/// The three areas of a split virtqueue the driver places.
#[derive(Clone, Copy)]
enum Ring {
    /// The descriptor table (`QueueDesc`).
    Desc,
    /// The available ring (`QueueDriver`).
    Driver,
    /// The used ring (`QueueDevice`).
    Device,
}

/// Guest mistakes logged in full before the log thins out to powers of two.
const IGNORED_LOG_BURST: u64 = 32;

/// Errors creating a transport (VMM bugs or resource exhaustion, never guest input).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device asks for a queue size virtio does not allow.
    #[error("cannot create queue {index} of maximum size {max_size}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The size the device asked for.
        max_size: u16,
        /// Why it was refused.
        #[source]
        source: virtio_queue::Error,
    },
    /// Not one notification event per queue.
    #[error("the device has {queues} queues but {events} queue events were given")]
    QueueEventCount {
        /// Queues the device has.
        queues: usize,
        /// Events given.
        events: usize,
    },
}

/// Why activating the device at `DRIVER_OK` failed.
#[derive(Debug, thiserror::Error)]
enum ActivationError {
    /// A ready queue's rings are not inside guest memory.
    #[error("queue {0} is ready but its rings are not in guest memory")]
    InvalidQueue(usize),
    /// A queue's configuration cannot be copied for the device.
    #[error("cannot copy the configuration of queue {index}")]
    CopyQueue {
        /// Queue index.
        index: usize,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// A queue event cannot be duplicated for the device.
    #[error("cannot duplicate the notification event of queue {index}")]
    CloneEvent {
        /// Queue index.
        index: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The device refused.
    #[error("the device failed to activate")]
    Device(#[source] virtio_device::ActivateError),
}

/// Counts guest accesses the transport ignored and logs them, thinning out a flood.
#[derive(Debug, Default)]
struct IgnoredAccessLog {
    count: u64,
}

impl IgnoredAccessLog {
    fn record(&mut self, device: &str, what: fmt::Arguments) {
        self.count = self.count.saturating_add(1);
        if self.count <= IGNORED_LOG_BURST || self.count.is_power_of_two() {
            tracing::debug!(device, ignored = self.count, "virtio-mmio: ignored {what}");
        }
    }
}

/// What the API reports about a transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransportInfo {
    /// virtio device ID (5: balloon).
    pub device_id: u32,
    /// The `Status` register.
    pub status: u32,
    /// Whether the device is serving its queues (the driver set `DRIVER_OK`).
    pub activated: bool,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Interrupts raised but not yet acknowledged (`InterruptStatus`).
    pub interrupt_status: u32,
    /// `QueueNotify` writes that reached the VMM (0 when the ioeventfds absorb them all).
    pub exit_notifications: u64,
}

/// The virtio-mmio register block of one device.
pub struct MmioTransport {
    /// For logs, e.g. `balloon@0xd0000000`.
    label: String,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    /// One per queue; the ioeventfds KVM signals on `QueueNotify`.
    queue_events: Vec<EventFd>,
    /// The driver's view of each queue's set-up.
    queues: Vec<Queue>,
    /// Features offered: the device's, minus what this transport cannot serve.
    offered_features: u64,
    device_status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    /// The driver accepted a bit in a feature bank beyond 63: refused at `FEATURES_OK`.
    acked_unknown_features: bool,
    queue_select: u32,
    activated: bool,
    /// `QueueNotify` writes that exited to the VMM instead of hitting an ioeventfd.
    exit_notifications: u64,
    ignored: IgnoredAccessLog,
    /// Passed to the device at activation (see [`GuestWriteLog`]).
    write_log: Option<Arc<dyn GuestWriteLog>>,
}

impl MmioTransport {
    /// Wraps `device`, whose queues are notified through `queue_events` (one per queue, in
    /// order) and who interrupts the guest through `interrupt`.
    pub fn new(
        label: String,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<MmioInterrupt>,
        queue_events: Vec<EventFd>,
    ) -> Result<Self, TransportError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &max_size)| {
                Queue::new(max_size).map_err(|source| TransportError::QueueMaxSize {
                    index,
                    max_size,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if queue_events.len() != queues.len() {
            return Err(TransportError::QueueEventCount {
                queues: queues.len(),
                events: queue_events.len(),
            });
        }
        let offered_features = device.avail_features() & !UNSUPPORTED_TRANSPORT_FEATURES;
        Ok(Self {
            label,
            device,
            mem,
            interrupt,
            queue_events,
            queues,
            offered_features,
            device_status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            acked_unknown_features: false,
            queue_select: 0,
            activated: false,
            exit_notifications: 0,
            ignored: IgnoredAccessLog::default(),
            write_log: None,
        })
    }

    /// Makes the device record the guest memory it writes into `log` from its next activation
    /// on (snapshot diff layers need the VMM's own writes; KVM's dirty log misses them).
    pub fn set_write_log(&mut self, log: Arc<dyn GuestWriteLog>) {
        self.write_log = Some(log);
    }

    /// The device's state as the API reports it.
    pub fn info(&self) -> TransportInfo {
        TransportInfo {
            device_id: self.device.device_type(),
            status: self.device_status,
            activated: self.activated,
            acked_features: self.acked_features,
            interrupt_status: self.interrupt.status(),
            exit_notifications: self.exit_notifications,
        }
    }

    /// Number of guest accesses ignored so far (wrong width, state or selector).
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored.count
    }

    fn ignore(&mut self, what: fmt::Arguments) {
        self.ignored.record(&self.label, what);
    }

    fn has_status(&self, bits: u32) -> bool {
        self.device_status & bits == bits
    }

    /// Queue set-up registers are writable after `FEATURES_OK` and before `DRIVER_OK`.
    fn queue_setup_allowed(&self) -> bool {
        self.has_status(VIRTIO_CONFIG_S_FEATURES_OK)
            && self.device_status
                & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET)
                == 0
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// The selected queue, if the driver may change its set-up now (right state, queue exists
    /// and is not ready yet); otherwise logs why the write is ignored.
    fn queue_for_setup(&mut self, register: &str) -> Option<&mut Queue> {
        let select = self.queue_select;
        if !self.queue_setup_allowed() {
            let status = self.device_status;
            self.ignore(format_args!(
                "{register} write in device status {status:#x}"
            ));
            return None;
        }
        match self.queues.get(select as usize).map(|q| q.ready()) {
            None => {
                self.ignore(format_args!("{register} write to missing queue {select}"));
                None
            }
            Some(true) => {
                self.ignore(format_args!("{register} write to ready queue {select}"));
                None
            }
            Some(false) => self.queues.get_mut(select as usize),
        }
    }

    fn read_register(&mut self, register: u32) -> u32 {
        match register {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.device_status,
            // No shared memory regions: a length (and base) of all ones means "no such region".
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            other => {
                self.ignore(format_args!("read of register {other:#x}"));
                0
            }
        }
    }

    fn write_register(&mut self, register: u32, value: u32) {
        match register {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                let Some(queue) = self.queue_for_setup("QueueNum") else {
                    return;
                };
                let max = queue.max_size();
                let accepted = u16::try_from(value)
                    .ok()
                    .is_some_and(|size| queue.try_set_size(size).is_ok());
                if !accepted {
                    self.ignore(format_args!(
                        "QueueNum {value} (not a power of two in 1..={max})"
                    ));
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(queue) = self.queues.get(self.queue_select as usize) {
                    if value == 0 && !queue.ready() {
                        return; // Linux clears ready on queues it tears down: a no-op.
                    }
                }
                if value > 1 {
                    self.ignore(format_args!("QueueReady {value}"));
                } else if let Some(queue) = self.queue_for_setup("QueueReady") {
                    queue.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_address(register, value),
            // No shared memory regions: the selector only affects reads of all ones.
            VIRTIO_MMIO_SHM_SEL => {}
            other => self.ignore(format_args!("write of {value:#x} to register {other:#x}")),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let status = self.device_status;
        let negotiating = status & (DRIVER_STATUS_BITS | VIRTIO_CONFIG_S_NEEDS_RESET)
            == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        if !negotiating {
            self.ignore(format_args!(
                "DriverFeatures write in device status {status:#x}"
            ));
            return;
        }
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ if value == 0 => {}
            select => {
                self.acked_unknown_features = true;
                self.ignore(format_args!(
                    "DriverFeatures {value:#x} in feature bank {select}"
                ));
            }
        }
    }

    fn write_queue_address(&mut self, register: u32, value: u32) {
        let (ring, name) = match register {
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => (Ring::Desc, "QueueDesc"),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                (Ring::Driver, "QueueDriver")
            }
            _ => (Ring::Device, "QueueDevice"),
        };
        let high = matches!(
            register,
            VIRTIO_MMIO_QUEUE_DESC_HIGH
                | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
                | VIRTIO_MMIO_QUEUE_USED_HIGH
        );
        let Some(queue) = self.queue_for_setup(name) else {
            return;
        };
        let current = match ring {
            Ring::Desc => queue.desc_table(),
            Ring::Driver => queue.avail_ring(),
            Ring::Device => queue.used_ring(),
        };
        let address = GuestAddress(if high {
            (current & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (current & !0xffff_ffff) | u64::from(value)
        });
        // Misaligned addresses are refused by the queue and leave the old value.
        let result = match ring {
            Ring::Desc => queue.try_set_desc_table_address(address),
            Ring::Driver => queue.try_set_avail_ring_address(address),
            Ring::Device => queue.try_set_used_ring_address(address),
        };
        if let Err(err) = result {
            self.ignore(format_args!("{name} address {:#x}: {err}", address.0));
        }
    }

    /// A `QueueNotify` that KVM did not absorb through an ioeventfd.
    fn notify(&mut self, value: u32) {
        self.exit_notifications = self.exit_notifications.saturating_add(1);
        if !self.activated {
            self.ignore(format_args!("QueueNotify {value} before DRIVER_OK"));
            return;
        }
        let Some(event) = self.queue_events.get(value as usize) else {
            self.ignore(format_args!("QueueNotify of missing queue {value}"));
            return;
        };
        if let Err(err) = event.write(1) {
            tracing::warn!(device = %self.label, queue = value, %err, "cannot signal queue event");
        }
    }

    /// A write of the `Status` register: the virtio device initialization state machine
    /// (virtio 1.2 §3.1.1), with reset on 0.
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        // Drivers write back what they read plus a new bit; NEEDS_RESET is the device's.
        let new = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let old_driver = old & DRIVER_STATUS_BITS;
        if new & !DRIVER_STATUS_BITS != 0 || new & old_driver != old_driver {
            self.ignore(format_args!(
                "Status write {value:#x} in status {old:#x} (unknown or cleared bits)"
            ));
            return;
        }
        let added = new & !old_driver;
        if added == 0 {
            return;
        }
        if added == VIRTIO_CONFIG_S_FAILED {
            tracing::info!(device = %self.label, status = old, "the driver gave up on the device");
            self.device_status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if old & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) != 0 {
            self.ignore(format_args!(
                "Status write {value:#x} in status {old:#x} (the driver must reset first)"
            ));
            return;
        }
        const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
        const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
        const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
        const NEGOTIATING: u32 = ACK | DRIVER;
        const NEGOTIATED: u32 = ACK | DRIVER | FEATURES_OK;
        // Each step adds exactly the next bit.
        match (old_driver, added) {
            (0, ACK) | (ACK, DRIVER) => self.device_status |= added,
            (NEGOTIATING, FEATURES_OK) => self.features_ok(),
            (NEGOTIATED, DRIVER_OK) => {
                self.device_status |= DRIVER_OK;
                self.activate();
            }
            _ => self.ignore(format_args!(
                "Status write {value:#x} in status {old:#x} (out of order)"
            )),
        }
    }

    /// The driver asks to close feature negotiation: accept only a subset of the offer that
    /// includes `VIRTIO_F_VERSION_1`; otherwise leave `FEATURES_OK` clear, which the driver
    /// reads back as a refusal.
    fn features_ok(&mut self) {
        let acked = self.acked_features;
        let unoffered = acked & !self.offered_features;
        if unoffered != 0 || self.acked_unknown_features {
            tracing::warn!(
                device = %self.label,
                acked = format_args!("{acked:#x}"),
                unoffered = format_args!("{unoffered:#x}"),
                "refusing FEATURES_OK: the driver accepted features that were not offered"
            );
            return;
        }
        if acked & VIRTIO_F_VERSION_1 == 0 {
            tracing::warn!(
                device = %self.label,
                acked = format_args!("{acked:#x}"),
                "refusing FEATURES_OK: the driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
            );
            return;
        }
        self.device.set_acked_features(acked);
        self.device_status |= VIRTIO_CONFIG_S_FEATURES_OK;
    }

    /// `DRIVER_OK`: validate the queues and start the device. On failure the device asks for
    /// a reset (`DEVICE_NEEDS_RESET`, with a configuration change interrupt).
    fn activate(&mut self) {
        match self.try_activate() {
            Ok(()) => {
                self.activated = true;
                tracing::debug!(device = %self.label, features = format_args!("{:#x}", self.acked_features), "virtio device activated");
            }
            Err(err) => {
                tracing::warn!(device = %self.label, error = %crate::devices::virtio::error_chain(&err), "virtio device activation failed; it needs a reset");
                self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                if let Err(err) = self.interrupt.signal_config_change() {
                    tracing::warn!(device = %self.label, %err, "cannot interrupt the guest");
                }
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), ActivationError> {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut queue_events = Vec::with_capacity(self.queues.len());
        for (index, (queue, event)) in self.queues.iter().zip(&self.queue_events).enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(ActivationError::InvalidQueue(index));
            }
            let mut copy = Queue::try_from(queue.state())
                .map_err(|source| ActivationError::CopyQueue { index, source })?;
            copy.set_event_idx(event_idx);
            queues.push(copy);
            queue_events.push(
                event
                    .try_clone()
                    .map_err(|source| ActivationError::CloneEvent { index, source })?,
            );
        }
        // Notifications from before DRIVER_OK are not for the new activation.
        for event in &self.queue_events {
            let _ = event.read();
        }
        let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
        self.device
            .activate(ActivateContext {
                mem: self.mem.clone(),
                queues,
                queue_events,
                interrupt,
                write_log: self.write_log.clone(),
            })
            .map_err(ActivationError::Device)
    }

    /// Status 0: stop the device and return every register to its initial value. A device that
    /// cannot be reset keeps running and is marked `DEVICE_NEEDS_RESET`.
    fn reset(&mut self) {
        if self.activated {
            if !self.device.reset() {
                tracing::warn!(device = %self.label, "the device cannot be reset");
                self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                return;
            }
            self.activated = false;
        }
        self.device_status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.acked_unknown_features = false;
        self.queue_select = 0;
        for queue in &mut self.queues {
            queue.reset();
        }
        for event in &self.queue_events {
            let _ = event.read();
        }
        self.interrupt.clear();
    }

    fn config_access(&mut self, offset: u64, len: usize, write: bool) -> Option<u64> {
        let config_offset = offset - CONFIG_SPACE_OFFSET;
        let width_ok = matches!(len, 1 | 2 | 4 | 8) && offset & (len as u64 - 1) == 0;
        if !width_ok || offset + len as u64 > MMIO_WINDOW_BYTES {
            let kind = if write { "write" } else { "read" };
            self.ignore(format_args!(
                "{len}-byte config {kind} at offset {config_offset:#x}"
            ));
            return None;
        }
        Some(config_offset)
    }
}

/// The transport's registers and queue set-up in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// `Status`.
    pub device_status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// `QueueSel`.
    pub queue_select: u32,
    /// Whether the device was serving its queues.
    pub activated: bool,
    /// Each queue's set-up and ring positions.
    pub queues: Vec<SavedQueue>,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
}

/// Why a saved transport state cannot be restored (the state file is untrusted).
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    /// Another number of queues than the device has.
    #[error("the saved state has {found} queues, the device {expected}")]
    QueueCount {
        /// In the state.
        found: usize,
        /// The device's.
        expected: usize,
    },
    /// A queue's saved set-up is invalid.
    #[error("saved queue {index} is invalid")]
    Queue {
        /// Queue index.
        index: usize,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// Features outside the offer.
    #[error("the saved state acked features {acked:#x} that are not offered ({offered:#x})")]
    Features {
        /// Acked.
        acked: u64,
        /// Offered.
        offered: u64,
    },
    /// Re-activating the device failed.
    #[error("cannot re-activate the device: {0}")]
    Activate(String),
}

impl MmioTransport {
    /// The transport's state for a snapshot (take it with the vCPUs paused).
    pub fn save_state(&self) -> TransportState {
        TransportState {
            device_status: self.device_status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            activated: self.activated,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
        }
    }

    /// Puts a freshly created transport (whose device was restored from the same snapshot) in
    /// the saved state; an activated device is activated again with the saved queues.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), TransportRestoreError> {
        if state.queues.len() != self.queues.len() {
            return Err(TransportRestoreError::QueueCount {
                found: state.queues.len(),
                expected: self.queues.len(),
            });
        }
        if state.acked_features & !self.offered_features != 0 {
            return Err(TransportRestoreError::Features {
                acked: state.acked_features,
                offered: self.offered_features,
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, saved)| {
                Queue::try_from(virtio_queue::QueueState::from(*saved))
                    .map_err(|source| TransportRestoreError::Queue { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.device_status = state.device_status;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        if state.activated {
            self.device.set_acked_features(state.acked_features);
            self.try_activate().map_err(|e| {
                TransportRestoreError::Activate(crate::devices::virtio::error_chain(&e))
            })?;
            self.activated = true;
        }
        self.interrupt
            .restore(state.interrupt_status, state.config_generation);
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            match self.config_access(offset, data.len(), false) {
                Some(config_offset) => self.device.read_config(config_offset, data),
                None => data.fill(0),
            }
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            self.ignore(format_args!(
                "{}-byte register read at {offset:#x}",
                data.len()
            ));
            data.fill(0);
            return;
        }
        // In range: offset < CONFIG_SPACE_OFFSET.
        let value = self.read_register(offset as u32);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        if offset >= CONFIG_SPACE_OFFSET {
            if let Some(config_offset) = self.config_access(offset, data.len(), true) {
                let status = self.device_status;
                if self.has_status(VIRTIO_CONFIG_S_DRIVER) && status & VIRTIO_CONFIG_S_FAILED == 0 {
                    self.device.write_config(config_offset, data);
                } else {
                    self.ignore(format_args!("config write in device status {status:#x}"));
                }
            }
            return None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.ignore(format_args!(
                "{}-byte register write at {offset:#x}",
                data.len()
            ));
            return None;
        };
        if offset & 3 != 0 {
            self.ignore(format_args!("unaligned register write at {offset:#x}"));
            return None;
        }
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_device::ActivateError;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;

    use super::*;

    const DEVICE_ID: u32 = 42;
    const FEATURE_A: u64 = 1 << 0;
    const FEATURE_HIGH: u64 = 1 << 40; // VIRTIO_F_RING_RESET: hidden by the transport.
    const QUEUE_MAX: u16 = 16;
    const CONFIG_BYTES: usize = 8;
    const MEM_BYTES: usize = 0x10_0000;

    /// What the test device saw.
    #[derive(Default)]
    struct Seen {
        acked: Option<u64>,
        activations: usize,
        resets: usize,
        config: [u8; CONFIG_BYTES],
        last: Option<ActivateContext>,
    }

    struct TestDevice {
        seen: Arc<Mutex<Seen>>,
        fail_activate: bool,
        can_reset: bool,
        max_sizes: Vec<u16>,
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            DEVICE_ID
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | FEATURE_A | FEATURE_HIGH | (1 << VIRTIO_RING_F_EVENT_IDX)
        }
        fn set_acked_features(&mut self, features: u64) {
            self.seen.lock().unwrap().acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let seen = self.seen.lock().unwrap();
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = usize::try_from(offset)
                    .ok()
                    .and_then(|o| seen.config.get(o + i))
                    .copied()
                    .unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            // Bytes 4.. are writable; 0..4 are read-only.
            let mut seen = self.seen.lock().unwrap();
            for (i, byte) in data.iter().enumerate() {
                let at = offset as usize + i;
                if (4..CONFIG_BYTES).contains(&at) {
                    seen.config[at] = *byte;
                }
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::BadQueues("test refusal".into()));
            }
            let mut seen = self.seen.lock().unwrap();
            seen.activations += 1;
            seen.last = Some(ctx);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            let mut seen = self.seen.lock().unwrap();
            seen.resets += 1;
            seen.last = None;
            self.can_reset
        }
    }

    struct Rig {
        transport: MmioTransport,
        seen: Arc<Mutex<Seen>>,
        interrupt: Arc<MmioInterrupt>,
        mem: GuestMemoryMmap,
    }

    fn rig_with(fail_activate: bool, can_reset: bool) -> Rig {
        let seen = Arc::new(Mutex::new(Seen {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Seen::default()
        }));
        let device = TestDevice {
            seen: seen.clone(),
            fail_activate,
            can_reset,
            max_sizes: vec![QUEUE_MAX, QUEUE_MAX],
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
        let interrupt = Arc::new(MmioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let events = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let transport = MmioTransport::new(
            "test@0".into(),
            Box::new(device),
            mem.clone(),
            interrupt.clone(),
            events,
        )
        .unwrap();
        Rig {
            transport,
            seen,
            interrupt,
            mem,
        }
    }

    fn rig() -> Rig {
        rig_with(false, true)
    }

    fn read(t: &mut MmioTransport, register: u32) -> u32 {
        let mut data = [0xaa; 4];
        t.read(register.into(), &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, register: u32, value: u32) {
        assert_eq!(t.write(register.into(), &value.to_le_bytes()), None);
    }

    fn status(t: &mut MmioTransport) -> u32 {
        read(t, VIRTIO_MMIO_STATUS)
    }

    /// `virtio_add_status` as Linux does it: read, OR in the bit, write back.
    fn add_status(t: &mut MmioTransport, bit: u32) {
        let s = status(t);
        write(t, VIRTIO_MMIO_STATUS, s | bit);
    }

    fn ack_features(t: &mut MmioTransport, features: u64) {
        write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        write(t, VIRTIO_MMIO_STATUS, 0);
        add_status(t, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        add_status(t, VIRTIO_CONFIG_S_DRIVER);
        ack_features(t, features);
        add_status(t, VIRTIO_CONFIG_S_FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, q: &MockSplitQueue<GuestMemoryMmap>) {
        write(t, VIRTIO_MMIO_QUEUE_SEL, index);
        assert_eq!(read(t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(read(t, VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_MAX));
        write(t, VIRTIO_MMIO_QUEUE_NUM, QUEUE_MAX.into());
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc_table_addr()),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail_addr()),
            (VIRTIO_MMIO_QUEUE_USED_LOW, q.used_addr()),
        ] {
            write(t, low, addr.0 as u32);
            write(t, low + 4, (addr.0 >> 32) as u32);
        }
        write(t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read(t, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    /// The whole Linux driver sequence, up to DRIVER_OK with both queues set up.
    fn bring_up<'a>(
        t: &mut MmioTransport,
        mem: &'a GuestMemoryMmap,
    ) -> [MockSplitQueue<'a, GuestMemoryMmap>; 2] {
        let q0 = MockSplitQueue::create(mem, GuestAddress(0x1000), QUEUE_MAX);
        let q1 = MockSplitQueue::create(mem, GuestAddress(0x4000), QUEUE_MAX);
        negotiate(t, VIRTIO_F_VERSION_1 | FEATURE_A);
        assert_eq!(status(t), 0xb);
        setup_queue(t, 0, &q0);
        setup_queue(t, 1, &q1);
        add_status(t, VIRTIO_CONFIG_S_DRIVER_OK);
        [q0, q1]
    }

    #[test]
    fn saved_state_restores_registers_queues_and_reactivates() {
        let mut r = rig();
        let [q0, _q1] = bring_up(&mut r.transport, &r.mem);
        r.interrupt.signal_config_change().unwrap();
        let saved = r.transport.save_state();
        assert!(saved.activated);
        let json = serde_json::to_string(&saved).unwrap();
        let back: TransportState = serde_json::from_str(&json).unwrap();

        let mut fresh = rig();
        fresh.transport.restore_state(&back).unwrap();
        assert_eq!(fresh.transport.save_state(), saved);
        assert_eq!(status(&mut fresh.transport), 0xf);
        let seen = fresh.seen.lock().unwrap();
        assert_eq!(seen.activations, 1, "the restored device is active again");
        assert_eq!(seen.acked, Some(VIRTIO_F_VERSION_1 | FEATURE_A));
        let ctx = seen.last.as_ref().unwrap();
        assert_eq!(ctx.queues[0].desc_table(), q0.desc_table_addr().0);
        assert_eq!(fresh.interrupt.status(), r.interrupt.status());
        drop(seen);

        // Untrusted input: wrong queue count, unoffered features, a bad queue.
        let mut bad = saved.clone();
        bad.queues.pop();
        assert!(rig().transport.restore_state(&bad).is_err());
        let mut bad = saved.clone();
        bad.acked_features |= FEATURE_HIGH;
        assert!(rig().transport.restore_state(&bad).is_err());
        let mut bad = saved;
        bad.queues[0].size = 3;
        assert!(rig().transport.restore_state(&bad).is_err());
    }

    #[test]
    fn identity_registers() {
        let mut r = rig();
        let t = &mut r.transport;
        assert_eq!(read(t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read(t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read(t, VIRTIO_MMIO_DEVICE_ID), DEVICE_ID);
        assert_eq!(read(t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(read(t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(read(t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        write(t, VIRTIO_MMIO_SHM_SEL, 0);
        assert_eq!(read(t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(read(t, VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
        assert_eq!(t.ignored_accesses(), 0);
    }

    #[test]
    fn device_features_by_bank_without_unsupported_transport_features() {
        let mut r = rig();
        let t = &mut r.transport;
        write(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            read(t, VIRTIO_MMIO_DEVICE_FEATURES),
            (FEATURE_A | (1 << VIRTIO_RING_F_EVENT_IDX)) as u32
        );
        write(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read(t, VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 only, no RING_RESET"
        );
        write(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read(t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        write(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, u32::MAX);
        assert_eq!(read(t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_bring_up_activates_with_valid_queues_notify_and_interrupt() {
        let mut r = rig();
        let [q0, _q1] = bring_up(&mut r.transport, &r.mem);
        assert_eq!(status(&mut r.transport), 0xf);
        assert_eq!(r.transport.ignored_accesses(), 0);
        assert!(r.transport.info().activated);

        let mut seen = r.seen.lock().unwrap();
        assert_eq!(seen.acked, Some(VIRTIO_F_VERSION_1 | FEATURE_A));
        assert_eq!(seen.activations, 1);
        let ctx = seen.last.as_mut().unwrap();
        assert_eq!(ctx.queues.len(), 2);
        assert_eq!(ctx.queue_events.len(), 2);
        for q in &ctx.queues {
            assert!(q.ready() && q.is_valid(&r.mem));
            assert_eq!(q.size(), QUEUE_MAX);
            assert!(!q.event_idx_enabled(), "EVENT_IDX was not negotiated");
        }
        assert_eq!(ctx.queues[0].desc_table(), q0.desc_table_addr().0);
        assert_eq!(ctx.queues[0].avail_ring(), q0.avail_addr().0);
        assert_eq!(ctx.queues[0].used_ring(), q0.used_addr().0);

        // The driver publishes a buffer and notifies queue 0 (no ioeventfd in a unit test:
        // the transport signals the queue's event itself).
        q0.add_desc_chains(
            &[virtio_queue::desc::RawDescriptor::from(
                virtio_queue::desc::split::Descriptor::new(0x8000, 0x100, 0, 0),
            )],
            0,
        )
        .unwrap();
        let events: Vec<EventFd> = ctx
            .queue_events
            .iter()
            .map(|e| e.try_clone().unwrap())
            .collect();
        let mem = ctx.mem.clone();
        let interrupt = ctx.interrupt.clone();
        let mut queue = std::mem::replace(&mut ctx.queues[0], Queue::new(2).unwrap());
        drop(seen);
        write(&mut r.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(events[0].read().unwrap(), 1);
        assert!(events[1].read().is_err(), "queue 1 was not notified");
        write(&mut r.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        assert!(events[0].read().is_err() && events[1].read().is_err());
        assert_eq!(r.transport.info().exit_notifications, 2);

        // The device consumes it and interrupts; the status register shows why.
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let head = chain.head_index();
        queue.add_used(&mem, head, 0x100).unwrap();
        interrupt.signal_used_queue(0).unwrap();
        assert_eq!(
            read(&mut r.transport, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        assert_eq!(r.interrupt.irqfd().read().unwrap(), 1);
        assert_eq!(q0.used().idx().load(), 1);
        write(
            &mut r.transport,
            VIRTIO_MMIO_INTERRUPT_ACK,
            VIRTIO_MMIO_INT_VRING,
        );
        assert_eq!(read(&mut r.transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // Configuration changes bump the generation.
        let generation = read(&mut r.transport, VIRTIO_MMIO_CONFIG_GENERATION);
        interrupt.signal_config_change().unwrap();
        assert_eq!(
            read(&mut r.transport, VIRTIO_MMIO_CONFIG_GENERATION),
            generation + 1
        );
        assert_eq!(
            read(&mut r.transport, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
    }

    #[test]
    fn event_idx_is_passed_to_the_queues_when_negotiated() {
        let mut r = rig();
        let q0 = MockSplitQueue::create(&r.mem, GuestAddress(0x1000), QUEUE_MAX);
        negotiate(
            &mut r.transport,
            VIRTIO_F_VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX),
        );
        setup_queue(&mut r.transport, 0, &q0);
        add_status(&mut r.transport, VIRTIO_CONFIG_S_DRIVER_OK);
        let seen = r.seen.lock().unwrap();
        let ctx = seen.last.as_ref().unwrap();
        assert!(ctx.queues[0].event_idx_enabled());
        assert!(!ctx.queues[1].ready(), "queue 1 was never set up");
    }

    #[test]
    fn features_ok_is_refused_without_version_1_or_with_unoffered_features() {
        for features in [
            FEATURE_A,
            VIRTIO_F_VERSION_1 | (1 << 5),
            VIRTIO_F_VERSION_1 | FEATURE_HIGH,
        ] {
            let mut r = rig();
            negotiate(&mut r.transport, features);
            assert_eq!(status(&mut r.transport), 0x3, "features {features:#x}");
            assert_eq!(r.seen.lock().unwrap().acked, None);
            // DRIVER_OK without FEATURES_OK does nothing.
            add_status(&mut r.transport, VIRTIO_CONFIG_S_DRIVER_OK);
            assert_eq!(status(&mut r.transport), 0x3);
            assert_eq!(r.seen.lock().unwrap().activations, 0);
        }
        // A feature bit in bank 2 (bits 64..96) was never offered.
        let mut r = rig();
        let t = &mut r.transport;
        write(t, VIRTIO_MMIO_STATUS, 1);
        write(t, VIRTIO_MMIO_STATUS, 3);
        ack_features(t, VIRTIO_F_VERSION_1);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write(t, VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(status(t), 0x3);
        // After a reset, a clean negotiation works.
        negotiate(t, VIRTIO_F_VERSION_1);
        assert_eq!(status(t), 0xb);
    }

    #[test]
    fn status_bits_must_be_set_in_order() {
        let mut r = rig();
        let t = &mut r.transport;
        for (write_value, expect) in [
            (VIRTIO_CONFIG_S_DRIVER, 0),      // DRIVER before ACK
            (VIRTIO_CONFIG_S_FEATURES_OK, 0), // FEATURES_OK first
            (0xf, 0),                         // everything at once
            (0x1, 0x1),
            (0x1 | VIRTIO_CONFIG_S_DRIVER_OK, 0x1),
            (0x3, 0x3),
            (0x1, 0x3),                               // clearing DRIVER without a reset
            (0x3 | 0x10, 0x3),                        // a reserved bit
            (0x3 | VIRTIO_CONFIG_S_NEEDS_RESET, 0x3), // the device's bit: ignored, no change
        ] {
            write(t, VIRTIO_MMIO_STATUS, write_value);
            assert_eq!(status(t), expect, "after writing {write_value:#x}");
        }
        // FAILED can be set any time, and then only a reset helps.
        write(t, VIRTIO_MMIO_STATUS, 0x3 | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(status(t), 0x83);
        ack_features(t, VIRTIO_F_VERSION_1);
        write(t, VIRTIO_MMIO_STATUS, 0x8b);
        assert_eq!(status(t), 0x83);
        write(t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(status(t), 0);
    }

    #[test]
    fn queue_registers_are_only_writable_between_features_ok_and_driver_ok() {
        let mut r = rig();
        let q0 = MockSplitQueue::create(&r.mem, GuestAddress(0x1000), QUEUE_MAX);
        let t = &mut r.transport;
        // Before FEATURES_OK: ignored.
        write(t, VIRTIO_MMIO_STATUS, 1);
        write(t, VIRTIO_MMIO_STATUS, 3);
        write(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read(t, VIRTIO_MMIO_QUEUE_READY), 0);
        let before = t.ignored_accesses();
        assert!(before > 0);

        ack_features(t, VIRTIO_F_VERSION_1);
        add_status(t, VIRTIO_CONFIG_S_FEATURES_OK);
        setup_queue(t, 0, &q0);
        // A ready queue's set-up is frozen.
        write(t, VIRTIO_MMIO_QUEUE_NUM, 4);
        write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x9000);
        add_status(t, VIRTIO_CONFIG_S_DRIVER_OK);
        let seen = r.seen.lock().unwrap();
        let q = &seen.last.as_ref().unwrap().queues[0];
        assert_eq!(q.size(), QUEUE_MAX);
        assert_eq!(q.desc_table(), q0.desc_table_addr().0);
        drop(seen);

        // After DRIVER_OK: queue 1 stays untouched.
        let t = &mut r.transport;
        write(t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write(t, VIRTIO_MMIO_QUEUE_READY, 1);
        write(t, VIRTIO_MMIO_QUEUE_NUM, 8);
        assert_eq!(read(t, VIRTIO_MMIO_QUEUE_READY), 0);
        // Features cannot change after FEATURES_OK.
        write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.info().acked_features, VIRTIO_F_VERSION_1);
    }

    #[test]
    fn bad_queue_sizes_addresses_and_selectors_are_ignored() {
        let mut r = rig();
        let t = &mut r.transport;
        negotiate(t, VIRTIO_F_VERSION_1);
        write(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        for size in [0, 3, 32, 0x1_0000, u32::MAX] {
            write(t, VIRTIO_MMIO_QUEUE_NUM, size);
        }
        write(t, VIRTIO_MMIO_QUEUE_NUM, 8);
        // Misaligned rings are refused, leaving the old address.
        write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1001);
        write(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2001);
        write(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3002);
        assert_eq!(t.queues[0].size(), 8);
        assert_eq!(t.queues[0].desc_table() & 0xfff, 0);
        // High halves compose with low halves.
        write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x2);
        assert_eq!(t.queues[0].desc_table(), 0x2_0000_1000);
        write(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        assert_eq!(t.queues[0].desc_table(), 0x1000);
        // Out-of-range selectors: no queue there.
        for select in [2, 1000, u32::MAX] {
            write(t, VIRTIO_MMIO_QUEUE_SEL, select);
            assert_eq!(read(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
            assert_eq!(read(t, VIRTIO_MMIO_QUEUE_READY), 0);
            write(t, VIRTIO_MMIO_QUEUE_NUM, 4);
            write(t, VIRTIO_MMIO_QUEUE_READY, 1);
            write(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 1);
            write(t, VIRTIO_MMIO_QUEUE_NOTIFY, select);
        }
        write(t, VIRTIO_MMIO_QUEUE_READY, 2);
    }

    #[test]
    fn ready_queue_outside_guest_memory_fails_activation_with_needs_reset() {
        let mut r = rig();
        let t = &mut r.transport;
        negotiate(t, VIRTIO_F_VERSION_1);
        write(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
        write(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10); // 64 GiB: no memory there
        write(t, VIRTIO_MMIO_QUEUE_READY, 1);
        add_status(t, VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(status(t), 0xf | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert!(!t.info().activated);
        assert_eq!(r.seen.lock().unwrap().activations, 0);
        assert_eq!(
            read(t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        // Queue set-up is frozen, further status bits are refused, until a reset.
        write(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        assert_eq!(t.queues[0].desc_table(), 0x10_0000_0000);
        write(t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        write(t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(status(t), 0);
        assert_eq!(read(t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert!(!t.queues[0].ready());
        assert_eq!(r.seen.lock().unwrap().resets, 0, "never activated");
    }

    #[test]
    fn device_activation_failure_sets_needs_reset() {
        let mut r = rig_with(true, true);
        let _queues = bring_up(&mut r.transport, &r.mem);
        assert_eq!(status(&mut r.transport), 0xf | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert!(!r.transport.info().activated);
        assert_eq!(r.interrupt.irqfd().read().unwrap(), 1);
    }

    #[test]
    fn reset_after_activation_resets_the_device_and_all_registers() {
        let mut r = rig();
        let _queues = bring_up(&mut r.transport, &r.mem);
        r.interrupt.signal_used_queue(0).unwrap();
        let t = &mut r.transport;
        write(t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write(t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(status(t), 0);
        assert_eq!(read(t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(t.info().acked_features, 0);
        assert!(!t.info().activated);
        for q in 0..2 {
            write(t, VIRTIO_MMIO_QUEUE_SEL, q);
            assert_eq!(read(t, VIRTIO_MMIO_QUEUE_READY), 0);
            // Linux clears QueueReady on teardown after the reset: silently fine.
            write(t, VIRTIO_MMIO_QUEUE_READY, 0);
        }
        {
            let seen = r.seen.lock().unwrap();
            assert_eq!((seen.activations, seen.resets), (1, 1));
            assert!(seen.last.is_none());
        }
        // A second bring-up works and activates again.
        let _queues = bring_up(&mut r.transport, &r.mem);
        assert_eq!(r.seen.lock().unwrap().activations, 2);
    }

    #[test]
    fn a_device_that_cannot_reset_is_marked_needs_reset() {
        let mut r = rig_with(false, false);
        let _queues = bring_up(&mut r.transport, &r.mem);
        let t = &mut r.transport;
        write(t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(status(t), 0xf | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert!(t.info().activated);
        write(t, VIRTIO_MMIO_STATUS, 0xf | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(status(t), 0xf | VIRTIO_CONFIG_S_NEEDS_RESET);
    }

    #[test]
    fn config_space_reads_and_writes() {
        let mut r = rig();
        let t = &mut r.transport;
        let mut b = [0u8; 4];
        t.read(0x100, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        let mut b2 = [0u8; 2];
        t.read(0x106, &mut b2);
        assert_eq!(b2, [7, 8]);
        let mut b1 = [0u8; 1];
        t.read(0x103, &mut b1);
        assert_eq!(b1, [4]);
        let mut b8 = [0u8; 8];
        t.read(0x100, &mut b8);
        assert_eq!(b8, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Beyond the device's config: zeros; beyond the window or misaligned: ignored.
        t.read(0x200, &mut b);
        assert_eq!(b, [0; 4]);
        b = [9; 4];
        t.read(0xffe, &mut b);
        assert_eq!(b, [0; 4]);
        b = [9; 4];
        t.read(0x101, &mut b);
        assert_eq!(b, [0; 4]);
        let mut b3 = [9u8; 3];
        t.read(0x100, &mut b3);
        assert_eq!(b3, [0; 3]);

        // Writes need the DRIVER status bit.
        assert_eq!(t.write(0x104, &[0xee; 4]), None);
        assert_eq!(r.seen.lock().unwrap().config[4], 5);
        write(t, VIRTIO_MMIO_STATUS, 1);
        write(t, VIRTIO_MMIO_STATUS, 3);
        t.write(0x104, &[0xee; 4]);
        t.write(0x100, &[0xee; 4]); // read-only bytes: the device ignores them
        t.write(0xfff, &[0xee; 2]);
        assert_eq!(
            r.seen.lock().unwrap().config,
            [1, 2, 3, 4, 0xee, 0xee, 0xee, 0xee]
        );
    }

    #[test]
    fn odd_widths_and_unaligned_register_accesses_are_ignored() {
        let mut r = rig();
        let t = &mut r.transport;
        for len in [1usize, 2, 3, 8] {
            let mut data = vec![0xaa; len];
            t.read(0, &mut data);
            assert!(data.iter().all(|&b| b == 0), "{len}-byte read");
            t.write(VIRTIO_MMIO_STATUS.into(), &vec![1; len]);
        }
        let mut data = [0xaa; 4];
        t.read(2, &mut data);
        assert_eq!(data, [0; 4]);
        t.write(0x72, &1u32.to_le_bytes());
        t.write(0x71, &1u32.to_le_bytes());
        assert_eq!(status(t), 0);
        // Empty accesses and unknown or write-only registers.
        t.read(0, &mut []);
        t.write(0x70, &[]);
        for register in [0x18, 0x28, 0x38, 0x40, 0x50, 0x64, 0x80, 0xc0, 0xf8] {
            assert_eq!(read(t, register), 0, "register {register:#x}");
        }
        write(t, VIRTIO_MMIO_MAGIC_VALUE, 0);
        write(t, 0xf8, 0);
        assert_eq!(read(t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert!(t.ignored_accesses() >= 20);
    }

    #[test]
    fn hostile_register_fuzz_never_panics() {
        // A deterministic xorshift so failures reproduce.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let registers = [
            0x00, 0x04, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70,
            0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xac, 0xb0, 0xfc, 0x100, 0x104, 0xffc,
        ];
        for round in 0..20 {
            let mut r = rig_with(round % 3 == 0, round % 5 != 0);
            for _ in 0..2000 {
                let n = next();
                let offset = if n & 0xf == 0 {
                    (n >> 8) % 0x1100
                } else {
                    registers[(n >> 8) as usize % registers.len()]
                };
                let len = [4usize, 4, 4, 1, 2, 8, 3][(n >> 40) as usize % 7];
                let value = match (n >> 48) % 6 {
                    0 => (n >> 16) as u32 & 0xff,
                    1 => 0xb,
                    2 => 0xf,
                    3 => 0,
                    4 => 1,
                    _ => (n >> 16) as u32,
                };
                let mut bytes = value.to_le_bytes().to_vec();
                bytes.resize(len, 0);
                if n & 0x100 == 0 {
                    r.transport.read(offset, &mut bytes);
                } else {
                    r.transport.write(offset, &bytes);
                }
            }
            // Whatever happened, a reset and a clean bring-up work (unless reset is refused).
            write(&mut r.transport, VIRTIO_MMIO_STATUS, 0);
            if status(&mut r.transport) == 0 {
                let fails = round % 3 == 0;
                let _queues = bring_up(&mut r.transport, &r.mem);
                let expect = if fails { 0x4f } else { 0xf };
                assert_eq!(status(&mut r.transport), expect, "round {round}");
            }
        }
    }

    #[test]
    fn transport_creation_checks_queues_and_events() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let interrupt = Arc::new(MmioInterrupt::new(EventFd::new(0).unwrap()));
        let make = |max_sizes: Vec<u16>, events: usize| {
            let device = TestDevice {
                seen: Arc::default(),
                fail_activate: false,
                can_reset: true,
                max_sizes,
            };
            let events = (0..events).map(|_| EventFd::new(0).unwrap()).collect();
            MmioTransport::new(
                "t".into(),
                Box::new(device),
                mem.clone(),
                interrupt.clone(),
                events,
            )
        };
        assert!(matches!(
            make(vec![16, 3], 2),
            Err(TransportError::QueueMaxSize { index: 1, .. })
        ));
        assert!(matches!(
            make(vec![16], 2),
            Err(TransportError::QueueEventCount {
                queues: 1,
                events: 2
            })
        ));
        assert!(make(vec![], 0).is_ok());
    }
}
