//! What the state file holds: the VM's configuration, every vCPU's and the VM's KVM state, the
//! devices' state and the index of the memory file.

use serde::{Deserialize, Serialize};

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

/// The memory file's index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryIndex {
    /// Guest RAM regions `(start_gpa, len_bytes)`, in address order.
    pub regions: Vec<(u64, u64)>,
    /// Stored chunks, in guest address order.
    pub chunks: Vec<MemoryChunk>,
    /// Bytes of page data in the memory file (after its header).
    pub data_bytes: u64,
    /// Pages stored and pages left out, by reason.
    pub pages: PageCounts,
    /// Every page's class, run-length encoded (format 3 on; `None` in older snapshots, whose
    /// `vmm inspect --map` then tells only kept from left-out pages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<super::map::PageClassRuns>,
}

/// One stored piece of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryChunk {
    /// Guest physical address of its first byte.
    pub gpa: u64,
    /// Length in bytes (a multiple of the page size).
    pub len_bytes: u64,
    /// Where it starts in the memory file (page aligned, past the header).
    pub file_offset: u64,
    /// CRC-32C of its bytes.
    pub crc32c: u32,
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
    /// Never resident on the host (the guest never touched them, or they were released).
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
