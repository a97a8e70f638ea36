//! A vCPU's complete KVM state for snapshots: saved on the vCPU's own thread while it is parked
//! (out of `KVM_RUN`), restored onto a freshly created vCPU before its thread starts.
//!
//! Restore order matters (KVM validates some state against other state): CPUID first (it decides
//! which MSRs and XSAVE features exist), the TSC frequency, MSRs, special registers, registers,
//! XSAVE and XCRs, debug registers, the local APIC, pending events, and the MP state last.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::vcpu::VcpuError;

/// `IA32_TSC_DEADLINE`: KVM ignores writes while the local APIC timer is not in TSC-deadline
/// mode, so it is written again after the local APIC is restored.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Most MSRs asked of KVM in one `KVM_GET_MSRS`/`KVM_SET_MSRS` (KVM's own limit is higher).
const MSR_BATCH: usize = 128;

/// Everything KVM holds about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// The vCPU's index (its APIC ID).
    pub id: u8,
    /// CPUID as the guest saw it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM could read of those `KVM_GET_MSR_INDEX_LIST` reports.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the 4 KiB `KVM_GET_XSAVE` area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts and NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// Runnable, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// TSC frequency in kHz, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

fn err(id: u8, operation: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError {
        id,
        operation,
        source,
    }
}

/// Reads every MSR of `indices` KVM can read. `KVM_GET_MSRS` stops at the first MSR it cannot
/// read and returns how many it read, so that one is dropped and the rest retried.
fn read_msrs(fd: &VcpuFd, id: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError {
            id,
            operation: "build the MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(err(id, "read MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        if read < batch.len() {
            tracing::debug!(
                vcpu = id,
                msr = format_args!("{:#x}", batch[read]),
                "MSR not readable: left out of the snapshot"
            );
            rest = &rest[read + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    Ok(saved)
}

impl VcpuState {
    /// Saves vCPU `id`'s state. The vCPU must be out of `KVM_RUN` (parked). Also tells KVM the
    /// guest was paused (`KVM_KVMCLOCK_CTRL`), so its soft-lockup watchdog does not fire.
    pub fn save(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<Self, VcpuError> {
        if let Err(error) = fd.kvmclock_ctrl() {
            // EINVAL when the guest has not enabled kvmclock: harmless.
            tracing::debug!(vcpu = id, %error, "KVM_KVMCLOCK_CTRL failed");
        }
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err(id, "read CPUID"))?
            .as_slice()
            .to_vec();
        // Events before MSRs and registers, as KVM's own selftests save them.
        let mp_state = fd.get_mp_state().map_err(err(id, "read the MP state"))?;
        let vcpu_events = fd.get_vcpu_events().map_err(err(id, "read vCPU events"))?;
        let regs = fd.get_regs().map_err(err(id, "read registers"))?;
        let sregs = fd.get_sregs().map_err(err(id, "read special registers"))?;
        let xsave = fd.get_xsave().map_err(err(id, "read the XSAVE area"))?;
        let xcrs = fd.get_xcrs().map_err(err(id, "read XCRs"))?;
        let debug_regs = fd
            .get_debug_regs()
            .map_err(err(id, "read debug registers"))?;
        let lapic = fd.get_lapic().map_err(err(id, "read the local APIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let msrs = read_msrs(fd, id, msr_indices)?;
        Ok(Self {
            id,
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            lapic,
            vcpu_events,
            mp_state,
            debug_regs,
            tsc_khz,
        })
    }

    /// Puts this state onto `fd`, a vCPU created for the restored VM and not yet run.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuError> {
        let id = self.id;
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuError {
            id,
            operation: "build the saved CPUID (too many entries)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid).map_err(err(id, "set CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz)
                    .map_err(err(id, "set the TSC frequency"))?;
            }
        }
        for batch in self.msrs.chunks(MSR_BATCH) {
            let msrs = Msrs::from_entries(batch).map_err(|_| VcpuError {
                id,
                operation: "build the MSR list",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let written = fd.set_msrs(&msrs).map_err(err(id, "set MSRs"))?;
            if written != batch.len() {
                return Err(VcpuError {
                    id,
                    operation: "set MSRs (KVM refused one of the saved MSRs)",
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
        }
        fd.set_sregs(&self.sregs)
            .map_err(err(id, "set special registers"))?;
        fd.set_regs(&self.regs).map_err(err(id, "set registers"))?;
        // SAFETY: `self.xsave` is a full `kvm_xsave` (4 KiB) as `KVM_GET_XSAVE` returned it; the
        // VMM enables no dynamic XSTATE features (AMX), so KVM reads no more than that.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(err(id, "set the XSAVE area"))?;
        fd.set_xcrs(&self.xcrs).map_err(err(id, "set XCRs"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(err(id, "set debug registers"))?;
        fd.set_lapic(&self.lapic)
            .map_err(err(id, "set the local APIC"))?;
        if let Some(deadline) = self.msrs.iter().find(|e| e.index == MSR_IA32_TSC_DEADLINE) {
            let msrs = Msrs::from_entries(&[*deadline]).expect("one MSR fits");
            fd.set_msrs(&msrs)
                .map_err(err(id, "set the TSC deadline after the local APIC"))?;
        }
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(err(id, "set vCPU events"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(err(id, "set the MP state"))?;
        Ok(())
    }
}
