//! Interrupt delivery for a virtio-mmio device: the `InterruptStatus` register shared between
//! the device (which sets bits) and the transport (which the guest reads and acknowledges), and
//! an eventfd registered with KVM as an irqfd on the device's GSI.

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_device::Interrupt;
use vmm_sys_util::eventfd::EventFd;

/// The interrupt line of one virtio-mmio device.
///
/// Bits are set in the status register *before* the irqfd is signalled, so a guest handler
/// woken by the interrupt always finds the reason in `InterruptStatus`.
#[derive(Debug)]
pub struct MmioInterrupt {
    /// `InterruptStatus`: [`VIRTIO_MMIO_INT_VRING`] | [`VIRTIO_MMIO_INT_CONFIG`].
    status: AtomicU32,
    /// `ConfigGeneration`: bumped on every configuration change the device announces.
    config_generation: AtomicU32,
    /// Written to raise the interrupt (an irqfd in a VM, a plain eventfd in tests).
    irqfd: EventFd,
}

impl MmioInterrupt {
    /// An interrupt raised by writing `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irqfd,
        }
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clears the acknowledged bits.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every pending bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets both registers from a snapshot (no interrupt is raised: one the guest had not
    /// acknowledged is still pending in the restored interrupt controller).
    pub fn restore(&self, status: u32, config_generation: u32) {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
    }

    /// The `ConfigGeneration` register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The eventfd that raises the interrupt (registered as an irqfd).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    fn raise(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }
}

impl Interrupt for MmioInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_VRING)
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_set_before_the_eventfd_fires_and_acks_clear_bits() {
        let interrupt = MmioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        assert_eq!(interrupt.status(), 0);
        assert!(interrupt.irqfd().read().is_err(), "nothing signalled yet");

        interrupt.signal_used_queue(3).unwrap();
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);

        let generation = interrupt.config_generation();
        interrupt.signal_config_change().unwrap();
        assert_eq!(
            interrupt.status(),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(interrupt.config_generation(), generation + 1);

        interrupt.acknowledge(VIRTIO_MMIO_INT_VRING);
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
        interrupt.acknowledge(0xffff_fffc);
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
        interrupt.clear();
        assert_eq!(interrupt.status(), 0);
    }
}
