//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC, IOAPIC, local APICs) and PIT.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::boot::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::memory::dirty::memory_slots;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed while setting up the VM.
    #[error("KVM failed to {operation}")]
    Kvm {
        /// What the VMM was doing.
        operation: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { operation, source }
}

/// Creates the VM with its irqchip and PIT, and maps every region of `mem` into it as the slots
/// [`memory_slots`] lists. With `log_dirty` the slots are registered with
/// `KVM_MEM_LOG_DIRTY_PAGES`, for [`crate::memory::DirtyTracker`].
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("create the VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm_err("set the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("set the identity map address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(kvm_err("create the in-kernel PIT"))?;
    let flags = if log_dirty {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for slot in memory_slots(mem) {
        let region_desc = kvm_userspace_memory_region {
            slot: slot.slot,
            flags,
            guest_phys_addr: slot.guest_phys_addr,
            memory_size: slot.memory_size,
            userspace_addr: slot.userspace_addr,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which the
        // caller keeps alive (in `Vm`) for as long as the VM exists; slots do not overlap
        // because the regions of a `GuestMemoryMmap` do not.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(kvm_err("map guest memory"))?;
    }
    Ok(vm)
}
