//! The e820 memory map handed to the kernel in the zero page.

use super::layout::{ACPI_START, BIOS_END, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved: the kernel must not use it (BIOS area holding our ACPI tables).
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// Guest RAM ranges `(start, len)` for a guest of `mem_bytes`: below the MMIO gap, and the rest
/// above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// The e820 map for a guest of `mem_bytes`: low RAM up to the EBDA, the BIOS area (with the
/// ACPI tables) reserved, RAM from 1 MiB to the MMIO gap, RAM above 4 GiB.
pub fn build_e820(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(mem_bytes) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START {
            len
        } else {
            start + len
        };
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_has_low_ram_bios_hole_and_high_ram() {
        let map = build_e820(512 * MIB);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert!(map[1].addr <= ACPI_START && map[1].addr + map[1].size >= BIOS_END);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: 512 * MIB - HIMEM_START,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let mem = 4096 * MIB;
        let map = build_e820(mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything except the 384 KiB between the EBDA and 1 MiB is RAM.
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
        assert_eq!(map.last().unwrap().addr, MMIO_GAP_END);
        assert_eq!(map.last().unwrap().size, mem - MMIO_GAP_START);
    }

    #[test]
    fn entries_do_not_overlap_and_are_sorted() {
        for mem_mib in [64, 128, 3072, 3073, 8192] {
            let map = build_e820(mem_mib * MIB);
            for pair in map.windows(2) {
                assert!(
                    pair[0].addr + pair[0].size <= pair[1].addr,
                    "{mem_mib}: {pair:?}"
                );
            }
        }
    }

    #[test]
    fn ram_ranges_cover_exactly_the_requested_size() {
        for mem_mib in [64u64, 3072, 3073, 8192] {
            let total: u64 = ram_ranges(mem_mib * MIB).iter().map(|r| r.1).sum();
            assert_eq!(total, mem_mib * MIB);
        }
    }
}
