//! VMGenID (virtual machine generation ID): a 16-byte ID in guest memory that changes whenever
//! the VM is cloned from a snapshot, so the guest kernel reseeds its RNG and userland can notice.
//!
//! The DSDT declares it as `\_SB_.VGEN` (`_HID "VMGENCTR"`, `_CID "VM_Gen_Counter"`) with an
//! `ADDR` package pointing at [`VMGENID_ADDR`] (a page of the BIOS area, reserved in e820).
//! The FADT is hardware-reduced, so there are no GPE blocks: a Generic Event Device
//! (`\_SB_.GED0`, `_HID "ACPI0013"`) owns [`GED_GSI`], and its `_EVT` method does
//! `Notify(\_SB_.VGEN, 0x80)`. On restore the VMM writes a new ID and raises that GSI before
//! any vCPU runs; the interrupt waits in the restored IOAPIC/local APIC until the guest runs.

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::layout::{GED_GSI, VMGENID_ADDR};

/// Bytes of the generation ID.
pub const VMGENID_BYTES: usize = 16;

/// Errors writing the ID or raising the notification.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    /// The ID cannot be written into guest memory.
    #[error("cannot write the VM generation ID at guest address {VMGENID_ADDR:#x}")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// The GED interrupt cannot be set up or raised.
    #[error("cannot {operation} the VM generation ID notification (GED, GSI {GED_GSI})")]
    Notify {
        /// What failed.
        operation: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A fresh random generation ID.
pub fn new_generation_id() -> [u8; VMGENID_BYTES] {
    crate::snapshot::writer::new_snapshot_id()
}

/// Writes `id` where the DSDT's `ADDR` points.
pub fn write_generation_id(
    mem: &GuestMemoryMmap,
    id: &[u8; VMGENID_BYTES],
) -> Result<(), VmGenIdError> {
    mem.write_slice(id, GuestAddress(VMGENID_ADDR))
        .map_err(VmGenIdError::Write)
}

/// Reads the current ID.
pub fn read_generation_id(mem: &GuestMemoryMmap) -> Result<[u8; VMGENID_BYTES], VmGenIdError> {
    let mut id = [0u8; VMGENID_BYTES];
    mem.read_slice(&mut id, GuestAddress(VMGENID_ADDR))
        .map_err(VmGenIdError::Write)?;
    Ok(id)
}

/// Gives a restored VM a new generation ID and raises the GED interrupt that makes the guest
/// notice it (through `_EVT` → `Notify(VGEN, 0x80)`). Call after the irqchip and vCPU state are
/// restored and before the vCPUs run. Returns the new ID.
pub fn regenerate_and_notify(
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
) -> Result<[u8; VMGENID_BYTES], VmGenIdError> {
    let id = new_generation_id();
    write_generation_id(mem, &id)?;
    // An edge on the GED's line (KVM_IRQ_LINE is synchronous: the IOAPIC latches it now).
    for level in [true, false] {
        vm_fd
            .set_irq_line(GED_GSI, level)
            .map_err(|e| VmGenIdError::Notify {
                operation: "raise",
                source: e.into(),
            })?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_land_at_the_advertised_address() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let a = new_generation_id();
        let b = new_generation_id();
        assert_ne!(a, b);
        write_generation_id(&mem, &a).unwrap();
        assert_eq!(read_generation_id(&mem).unwrap(), a);
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(write_generation_id(&small, &a).is_err());
    }
}
