//! Initial vCPU registers for the 64-bit boot protocol: long mode with identity-mapped page
//! tables, flat segments, `%rip` at the kernel's 64-bit entry and `%rsi` at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::layout::{BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, PDE_ADDR, PDPTE_ADDR, PML4_ADDR};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry bits: present, writable, and (in a PDE) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;
/// How much the boot page tables identity-map: 4 GiB, one page directory per GiB.
const IDENTITY_MAPPED_GIB: u64 = 4;

/// The flat GDT: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_SELECTOR: u16 = 1 << 3;
const DATA_SELECTOR: u16 = 2 << 3;
const TSS_SELECTOR: u16 = 3 << 3;

/// Encodes a segment descriptor from its flags (access byte and granularity nibble), base and
/// limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The `kvm_segment` KVM wants for a descriptor.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base,
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity page tables into guest memory. Done once per
/// VM, before any vCPU starts.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (index, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + index as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    mem.write_obj(PDPTE_ADDR | PTE_PRESENT_RW, GuestAddress(PML4_ADDR))?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pde_table = PDE_ADDR + gib * 0x1000;
        mem.write_obj(
            pde_table | PTE_PRESENT_RW,
            GuestAddress(PDPTE_ADDR + gib * 8),
        )?;
        for entry in 0..512u64 {
            let phys = (gib << 30) | (entry << 21);
            mem.write_obj(
                phys | PTE_PRESENT_RW | PDE_HUGE,
                GuestAddress(pde_table + entry * 8),
            )?;
        }
    }
    Ok(())
}

/// Special registers for long mode, starting from the vCPU's current ones.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(GDT[1], CODE_SELECTOR);
    let data = segment_from_gdt(GDT[2], DATA_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(GDT[3], TSS_SELECTOR);
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the kernel's 64-bit entry.
pub fn boot_regs(entry: GuestAddress, zero_page: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rsi: zero_page.0,
        ..Default::default()
    }
}

/// The FPU after reset: x87 control word and MXCSR defaults.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64bit_present_executable() {
        let cs = segment_from_gdt(GDT[1], CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[2], DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 0x3));
        let tr = segment_from_gdt(GDT[3], TSS_SELECTOR);
        assert_eq!((tr.s, tr.type_), (0, 0xb));
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_ADDR);
        for gib in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_ADDR + gib * 8)).unwrap();
            let pd = pdpte & !0xfff;
            let last: u64 = mem.read_obj(GuestAddress(pd + 511 * 8)).unwrap();
            assert_eq!(last & !0xfff, (gib << 30) + (511 << 21));
            assert_eq!(last & 0xff, PTE_PRESENT_RW | PDE_HUGE);
        }
    }

    #[test]
    fn sregs_enable_long_mode_paging() {
        let s = boot_sregs(kvm_sregs::default());
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
    }
}
