//! Where things live in guest physical memory on x86-64.
//!
//! The low megabyte holds the boot structures (GDT, zero page, page tables, stack, command
//! line) and the ACPI tables; the kernel loads at 1 MiB; RAM above 3 GiB moves above 4 GiB so
//! that the 32-bit MMIO gap (virtio-mmio devices, IOAPIC, local APIC) stays free.

/// Global descriptor table used to enter 64-bit mode.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty; the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// The Linux "zero page" (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity page tables: one PML4, one PDPT, four page directories (4 GiB in 2 MiB pages).
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// First of the four page directories.
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line, including its NUL.
pub const CMDLINE_MAX_BYTES: usize = 4096;
/// Start of the Extended BIOS Data Area: low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first) live in the legacy BIOS area, which the e820 map reserves.
pub const ACPI_START: u64 = 0xe0000;
/// End of the legacy BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// The kernel's protected-mode code is loaded at 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap: guest RAM beyond this moves above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Window for virtio-mmio devices, inside the MMIO gap.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC's registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) just below the BIOS ROM area at the top of the 32-bit space.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page, right before the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// I/O port of the ACPI sleep control register (hardware-reduced ACPI).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// I/O port of the ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// I/O port of the ACPI reset register.
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to the reset register to reboot.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The sleep type the DSDT's `\_S5_` package announces for soft-off.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

/// COM1's I/O ports and interrupt.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 occupies eight ports.
pub const COM1_PORT_COUNT: u16 = 8;
/// COM1's ISA interrupt (GSI).
pub const COM1_GSI: u32 = 4;

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// The VM generation ID (16 bytes): the last page of the BIOS area, reserved in e820 and kept
/// clear of the ACPI tables.
pub const VMGENID_ADDR: u64 = 0xf_f000;
/// GSI of the Generic Event Device that notifies the guest of a new generation ID (the last
/// IOAPIC pin; virtio-mmio devices use the ones below).
pub const GED_GSI: u32 = 23;
