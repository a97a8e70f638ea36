//! What the state file holds: the VM's configuration, every vCPU's and the VM's KVM state, the
//! devices' state and the index of the memory file.

use serde::{Deserialize, Serialize};

use super::checksum::ChunkSum;

pub use super::devices::DeviceState;
use crate::config::VmConfig;
use crate::devices::serial::SavedSerial;
use crate::kvm::vcpu_state::VcpuState;
use crate::kvm::vm_state::VmKvmState;

/// The state file's body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// Links the state to its memory file (the memory file's header holds the same bytes).
    pub snapshot_id: [u8; 16],
    /// When the snapshot was taken, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The VMM that wrote it.
    pub vmm_version: String,
    /// The VM's configuration at boot.
    pub config: VmConfig,
    /// One entry per vCPU, in vCPU order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT, kvmclock.
    pub vm: VmKvmState,
    /// The serial console (COM1).
    pub serial: SavedSerial,
    /// The virtio devices, in slot order (see [`DeviceState`]).
    pub devices: Vec<DeviceState>,
    /// Where each kept range of guest memory is in the memory file.
    pub memory: MemoryIndex,
    /// Set when this snapshot is a diff layer: its parent and the pages freed since it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<super::layer::LayerInfo>,
}

impl SnapshotState {
    /// A state shaped like a restored VM's around `memory`, for benchmarks and tests (never
    /// restored): two vCPUs with 30 CPUID entries and 40 MSRs each and patterned XSAVE areas, a
    /// 512 MiB configuration, the serial port's registers and no devices. Only in test builds
    /// and with the `examples` feature (which `bench` turns on), not in the product.
    #[cfg(any(test, feature = "examples"))]
    pub fn example(memory: MemoryIndex) -> Self {
        let vcpu = |id: u8| {
            let mut xsave = kvm_bindings::kvm_xsave::default();
            for (i, word) in xsave.region.iter_mut().enumerate() {
                *word = (i as u32).wrapping_mul(2_654_435_761) ^ u32::from(id);
            }
            let mut lapic = kvm_bindings::kvm_lapic_state::default();
            lapic.regs[0x20] = id as i8;
            VcpuState {
                id,
                cpuid: (0..30)
                    .map(|i| kvm_bindings::kvm_cpuid_entry2 {
                        function: i,
                        eax: i * 7,
                        ..Default::default()
                    })
                    .collect(),
                msrs: (0..40)
                    .map(|i| kvm_bindings::kvm_msr_entry {
                        index: 0xc000_0080 + i,
                        data: (u64::from(i) << 40) | u64::from(id),
                        ..Default::default()
                    })
                    .collect(),
                regs: kvm_bindings::kvm_regs {
                    rip: 0xffff_ffff_8100_0000 + u64::from(id),
                    ..Default::default()
                },
                sregs: Default::default(),
                xsave,
                xcrs: Default::default(),
                lapic,
                vcpu_events: Default::default(),
                mp_state: Default::default(),
                debug_regs: Default::default(),
                tsc_khz: Some(2_500_000),
            }
        };
        SnapshotState {
            snapshot_id: [9; 16],
            created_unix_ms: 1_764_000_000_000,
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            config: serde_json::from_str(
                r#"{"boot-source": {"kernel_image_path": "/k"},
                    "machine-config": {"vcpu_count": 2, "mem_size_mib": 512}}"#,
            )
            .expect("the example configuration parses"),
            vcpus: vec![vcpu(0), vcpu(1)],
            vm: VmKvmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            serial: SavedSerial {
                baud_divisor_low: 1,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: Vec::new(),
            },
            devices: Vec::new(),
            memory,
            layer: None,
        }
    }
}

/// The memory file's index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryIndex {
    /// Guest RAM regions `(start_gpa, len_bytes)`, in address order.
    pub regions: Vec<(u64, u64)>,
    /// Stored chunks, in guest address order.
    pub chunks: Vec<MemoryChunk>,
    /// Bytes of the memory file after its header: the kept pages and the holes between them
    /// (see `memory_file::HOLE_MAX_BYTES`).
    pub data_bytes: u64,
    /// Pages stored and pages left out, by reason.
    pub pages: PageCounts,
    /// Every page's class, run-length encoded (format 3 on; `None` in older snapshots, whose
    /// `vmm inspect --map` then tells only kept from left-out pages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<super::map::PageClassRuns>,
}

/// One stored piece of guest memory.
///
/// JSON (formats 1 to 4) spells it as a map ([`StoredChunk`]); MessagePack (format 5, not
/// human-readable) as the array `[gpa, len_bytes, file_offset, checksum kind, checksum]` with
/// kind 1 for XXH64 and 2 for CRC-32C: a trimmed guest's index has thousands of chunks, and the
/// field names were two thirds of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryChunk {
    /// Guest physical address of its first byte.
    pub gpa: u64,
    /// Length in bytes (a multiple of the page size).
    pub len_bytes: u64,
    /// Where it starts in the memory file (page aligned, past the header).
    pub file_offset: u64,
    /// Checksum of its bytes (XXH64; CRC-32C in snapshots of formats 1 to 3).
    pub sum: ChunkSum,
}

impl MemoryChunk {
    /// The guest range it holds, `(gpa, len_bytes)`.
    pub fn guest_range(&self) -> (u64, u64) {
        (self.gpa, self.len_bytes)
    }
}

/// A [`MemoryChunk`] as the state file spells it: the checksum under its algorithm's name
/// (`"xxh64"`, or `"crc32c"` in formats 1 to 3), exactly one of them.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredChunk {
    gpa: u64,
    len_bytes: u64,
    file_offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc32c: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    xxh64: Option<u64>,
}

/// [`MemoryChunk`]'s checksum kinds in the binary encoding.
const XXH64_KIND: u8 = 1;
const CRC32C_KIND: u8 = 2;

impl Serialize for MemoryChunk {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            return StoredChunk::from(*self).serialize(serializer);
        }
        let (kind, sum) = match self.sum {
            ChunkSum::Xxh64(sum) => (XXH64_KIND, sum),
            ChunkSum::Crc32c(sum) => (CRC32C_KIND, u64::from(sum)),
        };
        (self.gpa, self.len_bytes, self.file_offset, kind, sum).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for MemoryChunk {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        if deserializer.is_human_readable() {
            let stored = StoredChunk::deserialize(deserializer)?;
            return MemoryChunk::try_from(stored).map_err(D::Error::custom);
        }
        let (gpa, len_bytes, file_offset, kind, sum) =
            <(u64, u64, u64, u8, u64)>::deserialize(deserializer)?;
        let sum = match (kind, u32::try_from(sum)) {
            (XXH64_KIND, _) => ChunkSum::Xxh64(sum),
            (CRC32C_KIND, Ok(sum)) => ChunkSum::Crc32c(sum),
            _ => {
                return Err(D::Error::custom(format!(
                    "memory chunk at gpa {gpa:#x}: checksum kind {kind} with value {sum:#x} (expected kind {XXH64_KIND}, XXH64, or {CRC32C_KIND}, a 32-bit CRC-32C)"
                )))
            }
        };
        Ok(Self {
            gpa,
            len_bytes,
            file_offset,
            sum,
        })
    }
}

impl TryFrom<StoredChunk> for MemoryChunk {
    type Error = String;

    fn try_from(c: StoredChunk) -> Result<Self, String> {
        let sum = match (c.crc32c, c.xxh64) {
            (None, Some(sum)) => ChunkSum::Xxh64(sum),
            (Some(sum), None) => ChunkSum::Crc32c(sum),
            (None, None) => {
                return Err(format!(
                    "memory chunk at gpa {:#x} has no checksum (expected \"xxh64\" or \"crc32c\")",
                    c.gpa
                ))
            }
            (Some(_), Some(_)) => {
                return Err(format!(
                    "memory chunk at gpa {:#x} has two checksums (expected one of \"xxh64\" and \"crc32c\")",
                    c.gpa
                ))
            }
        };
        Ok(Self {
            gpa: c.gpa,
            len_bytes: c.len_bytes,
            file_offset: c.file_offset,
            sum,
        })
    }
}

impl From<MemoryChunk> for StoredChunk {
    fn from(c: MemoryChunk) -> Self {
        let (crc32c, xxh64) = match c.sum {
            ChunkSum::Crc32c(sum) => (Some(sum), None),
            ChunkSum::Xxh64(sum) => (None, Some(sum)),
        };
        Self {
            gpa: c.gpa,
            len_bytes: c.len_bytes,
            file_offset: c.file_offset,
            crc32c,
            xxh64,
        }
    }
}

/// How many pages the memory file keeps, and why the others were left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageCounts {
    /// Stored in the memory file.
    pub kept: u64,
    /// Inflated into the balloon.
    pub skipped_inflated: u64,
    /// Reported free by free page reporting.
    pub skipped_reported: u64,
    /// Hinted free by free page hinting and not written since.
    pub skipped_hinted: u64,
    /// Never touched by the guest (never mapped on the host nor swapped out, and not data of
    /// the snapshot the VM was restored from), or released.
    pub skipped_never_touched: u64,
    /// Resident but all zero.
    pub skipped_zero: u64,
}

impl PageCounts {
    /// Pages left out, all reasons together.
    pub fn skipped(&self) -> u64 {
        self.skipped_inflated
            + self.skipped_reported
            + self.skipped_hinted
            + self.skipped_never_touched
            + self.skipped_zero
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_compact_arrays_in_messagepack() {
        for sum in [ChunkSum::Xxh64(u64::MAX - 5), ChunkSum::Crc32c(0xdead_beef)] {
            let chunk = MemoryChunk {
                gpa: 0x10_0000,
                len_bytes: 8192,
                file_offset: 4096,
                sum,
            };
            let bytes = rmp_serde::to_vec_named(&chunk).unwrap();
            assert!(bytes.len() <= 24, "{} bytes", bytes.len());
            assert_eq!(rmp_serde::from_slice::<MemoryChunk>(&bytes).unwrap(), chunk);
        }
        for bad in [
            (1u64, 2u64, 3u64, 9u8, 4u64),
            (1, 2, 3, CRC32C_KIND, 1 << 40),
        ] {
            let bytes = rmp_serde::to_vec(&bad).unwrap();
            let err = rmp_serde::from_slice::<MemoryChunk>(&bytes).unwrap_err();
            assert!(err.to_string().contains("checksum kind"), "{err}");
        }
    }

    #[test]
    fn chunks_spell_their_checksum_by_algorithm_and_need_exactly_one() {
        let chunk = MemoryChunk {
            gpa: 0x1000,
            len_bytes: 4096,
            file_offset: 4096,
            sum: ChunkSum::Xxh64(u64::MAX - 1),
        };
        let json = serde_json::to_string(&chunk).unwrap();
        assert_eq!(
            json,
            r#"{"gpa":4096,"len_bytes":4096,"file_offset":4096,"xxh64":18446744073709551614}"#
        );
        assert_eq!(serde_json::from_str::<MemoryChunk>(&json).unwrap(), chunk);
        // Formats 1 to 3 wrote CRC-32C: still read.
        let old = r#"{"gpa":0,"len_bytes":4096,"file_offset":4096,"crc32c":7}"#;
        assert_eq!(
            serde_json::from_str::<MemoryChunk>(old).unwrap().sum,
            ChunkSum::Crc32c(7)
        );
        for (bad, expected) in [
            (
                r#"{"gpa":8192,"len_bytes":4096,"file_offset":4096}"#,
                "gpa 0x2000 has no checksum",
            ),
            (
                r#"{"gpa":0,"len_bytes":4096,"file_offset":4096,"crc32c":1,"xxh64":2}"#,
                "has two checksums",
            ),
            (
                r#"{"gpa":0,"len_bytes":4096,"file_offset":4096,"sha":1}"#,
                "unknown field `sha`",
            ),
        ] {
            let err = serde_json::from_str::<MemoryChunk>(bad).unwrap_err();
            assert!(err.to_string().contains(expected), "{bad}: {err}");
        }
    }
}
