//! The VM-wide KVM state for snapshots: the in-kernel interrupt controllers (both PICs, the
//! IOAPIC), the PIT and the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::vm::VmError;

/// The VM's interrupt controllers, timer and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmKvmState {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock: the guest's clock at the pause.
    pub clock: kvm_clock_data,
}

fn kvm_err(operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { operation, source }
}

fn read_chip(vm: &VmFd, chip_id: u32, operation: &'static str) -> Result<kvm_irqchip, VmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm_err(operation))?;
    Ok(chip)
}

impl VmKvmState {
    /// Saves the VM's state; its vCPUs must be paused.
    pub fn save(vm: &VmFd) -> Result<Self, VmError> {
        Ok(Self {
            pic_master: read_chip(vm, KVM_IRQCHIP_PIC_MASTER, "read the master PIC")?,
            pic_slave: read_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "read the slave PIC")?,
            ioapic: read_chip(vm, KVM_IRQCHIP_IOAPIC, "read the IOAPIC")?,
            pit: vm.get_pit2().map_err(kvm_err("read the PIT"))?,
            clock: vm.get_clock().map_err(kvm_err("read the kvmclock"))?,
        })
    }

    /// Restores it onto a VM created with [`super::vm::create_vm`] (irqchip and PIT exist).
    /// The clock goes on from the saved value: flags are cleared so KVM does not add the
    /// wall-clock time that passed since the snapshot.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmError> {
        vm.set_pit2(&self.pit).map_err(kvm_err("restore the PIT"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(kvm_err("restore the kvmclock"))?;
        for (chip, what) in [
            (&self.pic_master, "restore the master PIC"),
            (&self.pic_slave, "restore the slave PIC"),
            (&self.ioapic, "restore the IOAPIC"),
        ] {
            vm.set_irqchip(chip).map_err(kvm_err(what))?;
        }
        Ok(())
    }
}
