//! Recreating a VM from a snapshot: the state loaded and checked, guest memory built from
//! anonymous memory with the memory file's kept ranges mapped over it (private, copy-on-write,
//! one `mmap` per range, nothing copied), the KVM VM created and its interrupt controllers,
//! PIT and clock restored. [`crate::vm::Vm::restore`] then restores the devices and vCPUs.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestAddress;

use super::chain::Chain;
use super::lazy::{LazyMemory, LazyMode};
use super::memory_file::{map_into_guest, verify_mapped};
use super::state::MemoryChunk;
use super::SnapshotError;
use crate::config::{SerialOutput, VmConfig};
use crate::devices::serial::SavedSerial;
use crate::kvm::vcpu_state::VcpuState;
use crate::kvm::vm::create_vm;
use crate::kvm::{kvm_device_path, open_kvm};
use crate::memory::dirty::dirty_logging_wanted;
use crate::memory::{allocate_guest_memory, GuestRam};
use crate::vm::BootError;

/// How to restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Where the console goes instead of the snapshot's configuration.
    pub serial: Option<SerialOutput>,
    /// Skip checking memory chunk checksums (faster; the state file is always checked).
    pub skip_memory_verify: bool,
    /// Check every chunk even when this host wrote or verified the memory file before.
    pub reverify: bool,
    /// Map the memory file (`Off`) or fill pages on first touch (`Uffd`).
    pub lazy: LazyMode,
    /// Track dirty pages from the restore on (diff layers on this snapshot), whatever the
    /// snapshot's configuration says.
    pub track_dirty_pages: bool,
    /// Leave the vCPUs parked (the VM paused) until resumed (`PUT /snapshot/load` without
    /// `resume_vm`): the guest does not run a single instruction before that.
    pub start_paused: bool,
    /// Populate the mapped memory in the background (see [`super::prefault`]).
    pub prefault: bool,
    /// When to bring in the snapshot's recorded working set (see [`super::working_set`]).
    pub working_set: super::working_set::WorkingSetMode,
    /// Record the working set this many ms after the vCPUs start (verification then reads
    /// the memory file instead of the mapping, which would touch every page).
    pub record_working_set_ms: Option<u64>,
}

/// Time since the restore began at each phase's end, for the log and the benchmark.
#[derive(Clone, Debug)]
pub struct Phases {
    start: Instant,
    marks: Vec<(&'static str, f64)>,
}

impl Phases {
    /// Starts the clock.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            marks: Vec::new(),
        }
    }

    /// Records that phase `name` ended now.
    pub fn mark(&mut self, name: &'static str) {
        self.marks
            .push((name, self.start.elapsed().as_secs_f64() * 1e3));
    }

    /// `(phase, ms since the start)` in order.
    pub fn marks(&self) -> &[(&'static str, f64)] {
        &self.marks
    }

    /// Copies the phases onto `timeline` (as ms since its start, under their own names), so
    /// the metrics file shows them beside the later milestones.
    pub fn record_on(&self, timeline: &crate::metrics::BootTimeline) {
        let offset_ms = self
            .start
            .saturating_duration_since(timeline.start())
            .as_secs_f64()
            * 1e3;
        for &(name, ms) in &self.marks {
            timeline.mark_phase_at(name, offset_ms + ms);
        }
    }
}

impl Default for Phases {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, ms)) in self.marks.iter().enumerate() {
            if i > 0 {
                write!(f, " ")?;
            }
            write!(f, "{name}={ms:.3}")?;
        }
        Ok(())
    }
}

/// The VM half-restored: memory and KVM VM ready, devices and vCPUs still to create.
pub struct Prepared {
    /// The configuration (with the console override applied).
    pub config: VmConfig,
    /// `/dev/kvm`.
    pub kvm: Kvm,
    /// The VM, its irqchip, PIT and clock restored.
    pub vm_fd: Arc<VmFd>,
    /// Guest memory, file-backed where the snapshot kept pages.
    pub ram: Arc<GuestRam>,
    /// The vCPUs' saved state.
    pub vcpu_states: Vec<VcpuState>,
    /// The console's saved state.
    pub serial_state: SavedSerial,
    /// The virtio devices' saved state, in slot order.
    pub devices: Vec<super::devices::DeviceState>,
    /// Whether the memory slots log dirty pages (the balloon reports or hints).
    pub log_dirty: bool,
    /// MSRs a later snapshot saves.
    pub msr_indices: Arc<[u32]>,
    /// Phase timings so far.
    pub phases: Phases,
    /// The page fault handler when memory is filled lazily.
    pub lazy: Option<Arc<LazyMemory>>,
    /// The restored snapshot's ID.
    pub snapshot_id: [u8; 16],
    /// The snapshot restored, as the parent a diff layer of this VM must name (only when the VM
    /// tracks dirty pages).
    pub lineage: Option<super::layer::Lineage>,
}

/// Loads the snapshot in `dir` and prepares memory and the KVM VM.
pub fn prepare(dir: &Path, options: &RestoreOptions) -> Result<Prepared, BootError> {
    let mut phases = Phases::new();
    let mut chain = Chain::load(dir)?;
    phases.mark("load_ms");
    let kvm = open_kvm(&kvm_device_path())?;
    let ranges: Vec<_> = chain
        .top()
        .state
        .memory
        .regions
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = allocate_guest_memory(&ranges).map_err(|source| BootError::GuestMemory {
        mem_mib: chain.top().state.config.machine_config.mem_size_mib,
        source,
    })?;
    phases.mark("guest_memory_ms");
    // `file_data`: the guest ranges holding the snapshots' kept pages (mapped, or served lazily).
    let (mmaps, chunks, lazy, file_data): (_, _, _, Vec<(u64, u64)>) = match options.lazy {
        LazyMode::Uffd if chain.links.len() > 1 => {
            let layers = chain.links.len();
            return Err(
                SnapshotError::Lazy(Box::new(super::lazy::LazyError::Layered { layers })).into(),
            );
        }
        LazyMode::Uffd => {
            let loaded = chain.top();
            let lazy = LazyMemory::start(
                &mem,
                &loaded.state.memory,
                &loaded.memory,
                &loaded.memory_path,
                &dir.join(super::format::STATE_FILE),
                !options.skip_memory_verify,
            )
            .map_err(|e| SnapshotError::from(Box::new(e)))?;
            // Chunks are verified by the handler when first touched.
            phases.mark("uffd_register_ms");
            let chunks = &loaded.state.memory.chunks;
            let file_data = chunks.iter().map(MemoryChunk::guest_range).collect();
            (0, chunks.len(), Some(Arc::new(lazy)), file_data)
        }
        LazyMode::Off if chain.links.len() == 1 => {
            let loaded = chain.top();
            let chunks = &loaded.state.memory.chunks;
            let mmaps = map_into_guest(
                &mem,
                &loaded.memory,
                &loaded.memory_path,
                chunks,
                &loaded.memory_holes,
            )?;
            phases.mark("map_memory_ms");
            let path = &loaded.memory_path;
            if !options.skip_memory_verify {
                super::verified::check_once(path, options.reverify, || {
                    if options.record_working_set_ms.is_some() {
                        // Reading through the mapping would make every kept page "touched".
                        loaded.verify_file()
                    } else {
                        verify_mapped(&mem, chunks, path)?;
                        loaded.verify_holes()
                    }
                })?;
            }
            phases.mark("verify_memory_ms");
            let file_data = chunks.iter().map(MemoryChunk::guest_range).collect();
            (mmaps, chunks.len(), None, file_data)
        }
        LazyMode::Off => {
            let segments = chain.segments();
            let file_runs = chain.file_runs(&segments);
            let mut mmaps = 0;
            for (link, runs) in chain.links.iter().zip(&file_runs) {
                let loaded = &link.loaded;
                let (file, path) = (&loaded.memory, &loaded.memory_path);
                mmaps += map_into_guest(&mem, file, path, runs, &loaded.memory_holes)?;
            }
            phases.mark("map_memory_ms");
            if !options.skip_memory_verify {
                chain.verify_files(options.reverify)?;
            }
            phases.mark("verify_memory_ms");
            let file_data = file_runs.iter().flatten().map(MemoryChunk::guest_range);
            (mmaps, segments.len(), None, file_data.collect())
        }
    };
    if options.prefault && lazy.is_none() {
        let host = super::prefault::host_ranges(&mem, file_data.iter().copied());
        super::prefault::spawn_all(host);
    }
    let top = chain.links.pop().expect("a chain has a top").loaded;
    let top_load_timings = top.timings;
    let mut state = top.state;
    if let Some(serial) = &options.serial {
        state.config.serial.output = serial.clone();
    }
    if options.track_dirty_pages {
        state.config.machine_config.track_dirty_pages = true;
    }
    let track_dirty_pages = state.config.machine_config.track_dirty_pages;
    // Only diff layers name their parent by the hash of its state file: hashing it otherwise
    // would cost every restore (0.5 ms of SHA-256 on a host CPU for a trimmed guest's state).
    let lineage = track_dirty_pages
        .then(|| super::layer::Lineage::of(dir, state.snapshot_id))
        .transpose()?;
    let log_dirty = dirty_logging_wanted(state.config.balloon.as_ref()) || track_dirty_pages;
    let vm_fd = Arc::new(create_vm(&kvm, &mem, log_dirty)?);
    state.vm.restore(&vm_fd).map_err(SnapshotError::from)?;
    let msr_indices: Arc<[u32]> = kvm
        .get_msr_index_list()
        .map_err(|source| BootError::KvmQuery {
            operation: "list MSRs",
            source,
        })?
        .as_slice()
        .into();
    phases.mark("kvm_vm_ms");
    let load = top_load_timings;
    tracing::info!(
        mmaps,
        chunks,
        layers = chain.links.len() + 1,
        lazy = ?options.lazy,
        read_state_ms = load.read_state_ms,
        decode_state_ms = load.decode_state_ms,
        memory_file_ms = load.memory_file_ms,
        "snapshot memory ready"
    );
    Ok(Prepared {
        config: state.config,
        kvm,
        vm_fd,
        ram: Arc::new(match &lazy {
            Some(lazy) => GuestRam::lazily_filled(mem, lazy.clone(), file_data),
            None => GuestRam::file_backed(mem, file_data),
        }),
        vcpu_states: state.vcpus,
        serial_state: state.serial,
        devices: state.devices,
        log_dirty,
        msr_indices,
        phases,
        lazy,
        snapshot_id: state.snapshot_id,
        lineage,
    })
}
