//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC, IOAPIC, local APICs) and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

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

/// Creates the VM with its irqchip and PIT, and maps every region of `mem` into it.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
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
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which the
        // caller keeps alive (in `Vm`) for as long as the VM exists; slots do not overlap
        // because the regions of a `GuestMemoryMmap` do not.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(kvm_err("map guest memory"))?;
    }
    Ok(vm)
}
