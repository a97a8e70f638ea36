//! Guest CPUID: what KVM supports, with the topology and identity of each vCPU filled in.
//!
//! Linux derives the number of packages, cores and threads from CPUID leaves 0x1, 0x4, 0xB/0x1F
//! (Intel) and 0x8000_0008/0x8000_001E (AMD); the values must agree with the MADT (one core per
//! vCPU, one thread per core, one package).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// CPUID.1:ECX bit: the TSC-deadline timer of the local APIC.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CPUID.0xB/0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of bits needed to hold `count` distinct IDs.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Fills `entry` for vCPU `cpu_id` of `vcpu_count`.
fn patch_entry(entry: &mut kvm_cpuid_entry2, cpu_id: u32, vcpu_count: u32, tsc_deadline: bool) {
    match entry.function {
        0x1 => {
            // EBX: [31:24] initial APIC ID, [23:16] logical processors per package,
            // [15:8] CLFLUSH line size in quadwords.
            entry.ebx =
                (cpu_id << 24) | (vcpu_count.min(255) << 16) | (8 << 8) | (entry.ebx & 0xff);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if tsc_deadline {
                entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
            }
            if vcpu_count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        0x4 => {
            // EAX: [31:26] cores per package - 1, [25:14] threads sharing this cache - 1.
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { vcpu_count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff)
                | ((sharing & 0xfff) << 14)
                | (((vcpu_count - 1) & 0x3f) << 26);
        }
        0xb | 0x1f => {
            entry.edx = cpu_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = id_bits(vcpu_count);
                    entry.ebx = vcpu_count;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        0x8000_0008 => {
            // ECX: [15:12] APIC ID size, [7:0] number of cores - 1.
            entry.ecx =
                (entry.ecx & !0xf0ff) | (id_bits(vcpu_count) << 12) | ((vcpu_count - 1) & 0xff);
        }
        0x8000_001e => {
            entry.eax = cpu_id;
            // EBX: [15:8] threads per core - 1 (0), [7:0] core ID.
            entry.ebx = cpu_id & 0xff;
            // ECX: [10:8] nodes per processor - 1 (0), [7:0] node ID (0).
            entry.ecx = 0;
        }
        _ => {}
    }
}

/// Adds the SMT and core sub-leaves of the extended topology leaves (0xB, 0x1F) that KVM
/// lists with only sub-leaf 0: without the core level, Linux counts each vCPU as a package.
fn add_topology_subleaves(cpuid: &mut CpuId) {
    for function in [0xb, 0x1f] {
        let present: Vec<u32> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == function)
            .map(|e| e.index)
            .collect();
        if present.is_empty() {
            continue;
        }
        for index in [0, 1] {
            if !present.contains(&index) {
                let entry = kvm_cpuid_entry2 {
                    function,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                };
                if cpuid.push(entry).is_err() {
                    tracing::warn!(function, index, "no room to add a CPUID topology sub-leaf");
                }
            }
        }
    }
}

/// Returns the CPUID for vCPU `cpu_id` of `vcpu_count`, derived from KVM's supported set.
pub fn vcpu_cpuid(supported: &CpuId, cpu_id: u8, vcpu_count: u8, tsc_deadline: bool) -> CpuId {
    let mut cpuid = supported.clone();
    add_topology_subleaves(&mut cpuid);
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, cpu_id.into(), vcpu_count.into(), tsc_deadline);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let mut e = entry(1, 0);
        patch_entry(&mut e, 3, 4, true);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(e.edx & LEAF1_EDX_HTT, 0);
        let mut single = entry(1, 0);
        single.edx = LEAF1_EDX_HTT;
        patch_entry(&mut single, 0, 1, false);
        assert_eq!(single.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(single.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn extended_topology_has_one_thread_per_core() {
        let mut smt = entry(0xb, 0);
        let mut core = entry(0xb, 1);
        patch_entry(&mut smt, 1, 2, false);
        patch_entry(&mut core, 1, 2, false);
        assert_eq!(
            (smt.ebx, (smt.ecx >> 8) & 0xff, smt.edx),
            (1, LEVEL_TYPE_SMT, 1)
        );
        assert_eq!(
            (core.eax, core.ebx, (core.ecx >> 8) & 0xff),
            (1, 2, LEVEL_TYPE_CORE)
        );
    }

    #[test]
    fn amd_core_count() {
        let mut e = entry(0x8000_0008, 0);
        patch_entry(&mut e, 0, 6, false);
        assert_eq!(e.ecx & 0xff, 5);
        assert_eq!((e.ecx >> 12) & 0xf, 3);
    }

    #[test]
    fn missing_core_subleaf_is_added() {
        let supported =
            CpuId::from_entries(&[entry(0, 0), entry(0xb, 0), entry(0x8000_0008, 0)]).unwrap();
        let cpuid = vcpu_cpuid(&supported, 1, 2, false);
        let core = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0xb && e.index == 1)
            .expect("core level");
        assert_eq!(
            (core.ebx, (core.ecx >> 8) & 0xff, core.edx),
            (2, LEVEL_TYPE_CORE, 1)
        );
        assert_eq!(core.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        assert!(
            !cpuid.as_slice().iter().any(|e| e.function == 0x1f),
            "absent leaves stay absent"
        );
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
