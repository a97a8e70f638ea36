//! ACPI tables for a hardware-reduced x86 microVM: RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! Why ACPI: Debian's cloud kernel has no virtio-mmio command-line devices, so devices must be
//! described in the DSDT; ACPI also gives the guest a clean `poweroff` (sleep control register,
//! `\_S5_`) and `reboot` (reset register) without emulating legacy PM hardware.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use zerocopy::{Immutable, IntoBytes};

use super::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT, ACPI_START, COM1_GSI, COM1_PORT, COM1_PORT_COUNT, GED_GSI, IOAPIC_ADDR,
    LAPIC_ADDR, VMGENID_ADDR,
};

const OEM_ID: [u8; 6] = *b"SNAPVM";
const OEM_REVISION: u32 = 1;
/// FADT IAPC_BOOT_ARCH: VGA is not present.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
/// FADT IAPC_BOOT_ARCH: no CMOS real-time clock.
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

/// A virtio-mmio device as the DSDT announces it (`_HID "LNRO0005"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest physical base of its register window.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// Its interrupt (GSI on the IOAPIC).
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Clone, Debug, Default)]
pub struct AcpiConfig {
    /// Number of vCPUs: one local APIC each, APIC IDs 0..n.
    pub vcpu_count: u8,
    /// virtio-mmio devices to declare, in order (`_UID` 0, 1, ...).
    pub virtio_mmio: Vec<VirtioMmioDevice>,
}

/// The tables, each with the guest physical address it must be written to.
#[derive(Debug)]
pub struct AcpiTables {
    /// `(guest address, bytes)` for every table, RSDP first.
    pub tables: Vec<(u64, Vec<u8>)>,
    /// Where the RSDP is: the zero page's `acpi_rsdp_addr`.
    pub rsdp_addr: u64,
}

/// Errors building the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables outgrew the BIOS area reserved for them.
    #[error("ACPI tables need {needed} bytes but only {available} are reserved")]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// More vCPUs than xAPIC IDs in one MADT entry type.
    #[error("{0} vCPUs do not fit in the MADT (at most 254)")]
    TooManyVcpus(u8),
}

/// MADT Interrupt Source Override (type 2): maps an ISA IRQ to a GSI.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: [u8; 4],
    flags: [u8; 2],
}

impl InterruptSourceOverride {
    fn new(source: u8, gsi: u32) -> Self {
        Self {
            kind: 2,
            length: 10,
            bus: 0,
            source,
            gsi: gsi.to_le_bytes(),
            flags: [0; 2],
        }
    }
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn aml_bytes(item: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    item.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT: COM1, the virtio-mmio devices and the `\_S5_` soft-off package.
fn build_dsdt(config: &AcpiConfig) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"SNAPDSDT", OEM_REVISION);

    // Temporaries in one statement live until its end, which is what the AML builders need.
    dsdt.append_slice(&aml_bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_COUNT as u8),
                    &aml::Interrupt::new(true, true, false, false, COM1_GSI),
                ]),
            ),
        ],
    )));

    for (index, device) in config.virtio_mmio.iter().enumerate() {
        let uid = index as u32;
        let name = format!("_SB_.V{index:03X}");
        dsdt.append_slice(&aml_bytes(&aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, device.base as u32, device.size as u32),
                        &aml::Interrupt::new(true, true, false, false, device.gsi),
                    ]),
                ),
            ],
        )));
    }

    // VMGenID: the ID's address, and a Generic Event Device whose interrupt notifies it.
    dsdt.append_slice(&aml_bytes(&aml::Device::new(
        "_SB_.VGEN".into(),
        vec![
            &aml::Name::new("_HID".into(), &"VMGENCTR"),
            &aml::Name::new("_CID".into(), &"VM_Gen_Counter"),
            &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &aml::Name::new(
                "ADDR".into(),
                &aml::Package::new(vec![&(VMGENID_ADDR as u32), &((VMGENID_ADDR >> 32) as u32)]),
            ),
        ],
    )));
    dsdt.append_slice(&aml_bytes(&aml::Device::new(
        "_SB_.GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, true, false, false, GED_GSI,
                )]),
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![&aml::If::new(
                    &aml::Equal::new(&aml::Arg(0), &GED_GSI),
                    vec![&aml::Notify::new(&aml::Path::new("\\_SB_.VGEN"), &0x80u8)],
                )],
            ),
        ],
    )));

    dsdt.append_slice(&aml_bytes(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&ACPI_S5_SLEEP_TYPE]),
    )));
    dsdt.as_slice().to_vec()
}

/// The FADT: hardware-reduced ACPI with sleep control/status and reset registers on I/O ports.
fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"SNAPFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // No CMOS RTC (the kernel would spend seconds probing ports 0x70/0x71), no VGA, no 8042:
    // kvm-clock provides wall-clock time.
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.reset_reg = io_gas(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_gas(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_gas(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"SNAPVMM\0").into();
    aml_bytes(&fadt.finalize())
}

/// The MADT: one enabled local APIC per vCPU, the IOAPIC, and ISA IRQ 0 routed to GSI 2 (as
/// KVM's default routing does for the PIT).
fn build_madt(vcpu_count: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"SNAPMADT",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..vcpu_count {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    madt.add_structure(InterruptSourceOverride::new(0, 2));
    aml_bytes(&madt)
}

fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// Builds all tables and lays them out from [`ACPI_START`]: RSDP, DSDT, FADT, MADT, XSDT.
pub fn build_acpi_tables(config: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    if config.vcpu_count == 0 || config.vcpu_count > 254 {
        return Err(AcpiError::TooManyVcpus(config.vcpu_count));
    }
    let rsdp_addr = ACPI_START;
    let dsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    let dsdt = build_dsdt(config);
    let fadt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let fadt = build_fadt(dsdt_addr);
    let madt_addr = align16(fadt_addr + fadt.len() as u64);
    let madt = build_madt(config.vcpu_count);
    let xsdt_addr = align16(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, *b"SNAPXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > VMGENID_ADDR {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_START,
            available: VMGENID_ADDR - ACPI_START,
        });
    }
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(AcpiTables {
        tables: vec![
            (rsdp_addr, rsdp),
            (dsdt_addr, dsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (xsdt_addr, xsdt),
        ],
        rsdp_addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn table<'a>(tables: &'a AcpiTables, signature: &[u8]) -> (u64, &'a [u8]) {
        tables
            .tables
            .iter()
            .find(|(_, bytes)| bytes.starts_with(signature))
            .map(|(addr, bytes)| (*addr, bytes.as_slice()))
            .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(signature)))
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    fn build(vcpus: u8, devices: usize) -> AcpiTables {
        let virtio_mmio = (0..devices)
            .map(|i| VirtioMmioDevice {
                base: 0xd000_0000 + i as u64 * 0x1000,
                size: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        build_acpi_tables(&AcpiConfig {
            vcpu_count: vcpus,
            virtio_mmio,
        })
        .unwrap()
    }

    #[test]
    fn every_table_checksums_to_zero_and_has_its_length() {
        let tables = build(2, 3);
        let (_, rsdp) = table(&tables, b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        for sig in [&b"DSDT"[..], b"FACP", b"APIC", b"XSDT"] {
            let (_, bytes) = table(&tables, sig);
            assert_eq!(sum(bytes), 0, "{} checksum", String::from_utf8_lossy(sig));
            assert_eq!(
                u32_at(bytes, 4) as usize,
                bytes.len(),
                "{} length",
                String::from_utf8_lossy(sig)
            );
        }
    }

    #[test]
    fn tables_are_linked_and_do_not_overlap() {
        let tables = build(4, 0);
        assert_eq!(tables.rsdp_addr, ACPI_START);
        let (_, rsdp) = table(&tables, b"RSD PTR ");
        let (xsdt_addr, xsdt) = table(&tables, b"XSDT");
        assert_eq!(u64_at(rsdp, 24), xsdt_addr);
        let (fadt_addr, fadt) = table(&tables, b"FACP");
        let (madt_addr, _) = table(&tables, b"APIC");
        assert_eq!(u64_at(xsdt, 36), fadt_addr);
        assert_eq!(u64_at(xsdt, 44), madt_addr);
        let (dsdt_addr, _) = table(&tables, b"DSDT");
        assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
        let mut spans: Vec<_> = tables
            .tables
            .iter()
            .map(|(a, b)| (*a, *a + b.len() as u64))
            .collect();
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0);
        }
        assert!(spans.last().unwrap().1 <= VMGENID_ADDR);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let tables = build(1, 0);
        let (_, fadt) = table(&tables, b"FACP");
        assert_eq!(fadt.len(), 276);
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG GAS at 116: I/O space, port.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(fadt, 120), ACPI_RESET_PORT as u64);
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        // IAPC_BOOT_ARCH at 109: no CMOS RTC, no VGA.
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]),
            IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC
        );
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(u64_at(fadt, 248), ACPI_SLEEP_CONTROL_PORT as u64);
        assert_eq!(u64_at(fadt, 260), ACPI_SLEEP_STATUS_PORT as u64);
    }

    #[test]
    fn madt_has_one_lapic_per_vcpu_and_the_ioapic() {
        for vcpus in [1u8, 2, 8] {
            let tables = build(vcpus, 0);
            let (_, madt) = table(&tables, b"APIC");
            assert_eq!(u32_at(madt, 36), LAPIC_ADDR as u32);
            let mut offset = 44;
            let (mut lapics, mut ioapics, mut overrides) = (vec![], 0, 0);
            while offset < madt.len() {
                let (kind, len) = (madt[offset], madt[offset + 1] as usize);
                match kind {
                    0 => lapics.push(madt[offset + 3]),
                    1 => {
                        ioapics += 1;
                        assert_eq!(u32_at(madt, offset + 4), IOAPIC_ADDR as u32);
                    }
                    2 => overrides += 1,
                    other => panic!("unexpected MADT entry {other}"),
                }
                offset += len;
            }
            assert_eq!(offset, madt.len());
            assert_eq!(lapics, (0..vcpus).collect::<Vec<_>>());
            assert_eq!((ioapics, overrides), (1, 1));
        }
    }

    #[test]
    fn dsdt_declares_com1_s5_and_virtio_devices() {
        let tables = build(1, 2);
        let (_, dsdt) = table(&tables, b"DSDT");
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"COM1"));
        assert!(has(b"_S5_"));
        assert!(has(b"LNRO0005"));
        assert!(has(b"V000") && has(b"V001") && !has(b"V002"));
        // The serial port's I/O descriptor (0x47) names 0x3f8.
        assert!(has(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03]));
    }

    #[test]
    fn zero_vcpus_is_an_error() {
        assert!(matches!(
            build_acpi_tables(&AcpiConfig {
                vcpu_count: 0,
                virtio_mmio: vec![]
            }),
            Err(AcpiError::TooManyVcpus(0))
        ));
    }
}
