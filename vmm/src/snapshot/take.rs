//! Taking a snapshot of a paused VM: collecting the vCPUs' state (each saves its own, on its
//! thread), the VM's and the devices' state, then writing the directory.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use virtio_device::{VirtioDevice, WorkerError, WorkerHandle};

use super::devices::{save_device, SnapshotHandle};
use super::layer::{LayerError, LayerInfo, Layering, Lineage};
use super::state::SnapshotState;
use super::writer::{new_snapshot_id, write_snapshot, SnapshotParts, SnapshotSummary};
use super::SnapshotError;
use crate::config::VmConfig;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::AttachedDevice;
use crate::kvm::vcpu::VcpuControl;
use crate::kvm::vm_state::VmKvmState;
use crate::memory::{DirtyTracker, GuestRam};

/// How long a snapshot request may take end to end (writing GiBs on a slow disk).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long parked vCPUs get to save their state.
const VCPU_SAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the VM does once the snapshot is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSnapshot {
    /// Run again (if it was running).
    #[default]
    Resume,
    /// Stay paused.
    Pause,
    /// Stop the VM and the VMM.
    Stop,
}

/// A request to snapshot the VM into a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The snapshot directory (replaced atomically if it holds a snapshot).
    pub path: PathBuf,
    /// What the VM does afterwards.
    pub after: AfterSnapshot,
    /// Store every page (a raw full dump, as Firecracker writes it), for comparison.
    pub raw_memory: bool,
    /// Write a diff layer on this snapshot (which must be the VM's lineage, see
    /// [`super::layer::Lineage`]) instead of a full snapshot.
    pub parent: Option<PathBuf>,
}

/// The outcome the VM's event loop sends back.
pub type SnapshotReply = Result<SnapshotSummary, String>;

/// The parts of a running VM a snapshot reads (borrowed from [`crate::vm::Vm`]).
pub struct LiveVm<'a> {
    /// Its configuration.
    pub config: &'a VmConfig,
    /// The KVM VM.
    pub vm_fd: &'a VmFd,
    /// The vCPUs' controller (they must be parked).
    pub control: &'a VcpuControl,
    /// Number of vCPUs.
    pub vcpu_count: usize,
    /// MSRs to save.
    pub msr_indices: Arc<[u32]>,
    /// COM1.
    pub serial: &'a Mutex<SerialDevice>,
    /// Guest memory.
    pub ram: &'a GuestRam,
    /// Dirty page tracking, synced before the page-state map is read.
    pub dirty: Option<&'a DirtyTracker>,
    /// The virtio devices.
    pub virtio_devices: &'a [AttachedDevice],
    /// The balloon's page-state map, if any.
    pub page_states: Option<Arc<Mutex<balloon::PageStateMap>>>,
    /// Diff-layer bookkeeping, when the VM tracks dirty pages.
    pub layering: Option<&'a Layering>,
}

/// Snapshots the paused `vm` into `path`. `started` is when the request arrived.
pub fn take(
    vm: &LiveVm,
    request: &SnapshotRequest,
    started: Instant,
) -> Result<SnapshotSummary, SnapshotError> {
    let path = request.path.as_path();
    // Device workers are parked from before their state is saved until the memory file is
    // written (or the snapshot fails): they neither write guest memory nor move queues.
    let _paused = PausedWorkers::pause(vm.virtio_devices)?;
    // The page-state map is final from here on (vCPUs parked, workers paused): the balloon's
    // saved state and the memory file's classification both read it after this last sync.
    // Saving the map before it once left pages the guest had written since the previous sync
    // marked free in the state while the memory file kept their data; the clone's next
    // snapshot then dropped them (the intermittent `layers_chain` failure).
    if let Some(dirty) = vm.dirty {
        if let Err(err) = dirty.sync() {
            // Pages whose state is stale stay in the state the map has: sync failures only
            // make a snapshot keep pages (the map counts them Live), never lose them, except for
            // pages written after a hint; refuse rather than risk that.
            return Err(SnapshotError::Vcpus(format!(
                "cannot sync the dirty log before reading the page-state map: {err}"
            )));
        }
    }
    // Devices first: a VM with a device whose state cannot be saved gets no snapshot at all.
    let devices = vm
        .virtio_devices
        .iter()
        .map(save_device)
        .collect::<Result<Vec<_>, _>>()?;
    let answers = vm
        .control
        .save_parked(vm.vcpu_count, vm.msr_indices.clone(), VCPU_SAVE_TIMEOUT)
        .ok_or_else(|| SnapshotError::Vcpus("the parked vCPUs did not answer in time".into()))?;
    let vcpus = answers.into_iter().collect::<Result<Vec<_>, _>>()?;
    let vm_state = VmKvmState::save(vm.vm_fd)?;
    let serial = vm
        .serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .save_state();
    let layer = match (&request.parent, vm.layering) {
        (None, _) => None,
        (Some(_), None) => return Err(LayerError::NotTracking.into()),
        (Some(parent), Some(layering)) => {
            let lineage = layering.lineage().ok_or_else(|| LayerError::NoLineage {
                parent: parent.clone(),
            })?;
            Some(LayerInfo {
                parent: lineage.check_parent(parent, path)?,
                freed: Vec::new(),
                inherited_pages: 0,
            })
        }
    };
    let mut changed = vm.layering.map(|l| l.changed.take());
    if let Some(set) = changed.as_mut() {
        // The devices write used rings without logging them (see `GuestWriteLog`).
        for queue in devices.iter().flat_map(|d| &d.transport().queues) {
            if queue.ready {
                set.insert_range(queue.used_ring, 6 + 8 * u64::from(queue.size));
            }
        }
    }
    let snapshot_id = new_snapshot_id();
    let map_guard = vm
        .page_states
        .as_ref()
        .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
    let state = SnapshotState {
        snapshot_id,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        config: vm.config.clone(),
        vcpus,
        vm: vm_state,
        serial,
        devices,
        memory: Default::default(),
        layer,
    };
    let summary = write_snapshot(
        path,
        SnapshotParts {
            state,
            mem: vm.ram.memory(),
            page_states: map_guard.as_deref(),
            keep_all: request.raw_memory,
            residency: vm.ram.residency(),
            started,
            changed: changed.as_ref(),
        },
    );
    // Still paused (vCPUs and device workers): what was left out must be what memory holds.
    let summary = summary.and_then(|summary| {
        if super::audit::enabled() {
            let mem = vm.ram.memory();
            if let Some(map) = map_guard.as_deref() {
                super::audit::check_released_pages(path, mem, map)?;
            }
            if request.parent.is_some() {
                super::audit::check_layer(path, mem, map_guard.as_deref(), changed.as_ref())?;
            }
        }
        Ok(summary)
    });
    let summary = match (summary, vm.layering) {
        (Ok(summary), Some(layering)) => {
            layering.set_lineage(Lineage {
                path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
                snapshot_id,
                hash: summary.state_hash.clone(),
            });
            summary
        }
        (Ok(summary), None) => summary,
        (Err(err), layering) => {
            if let (Some(layering), Some(set)) = (layering, &changed) {
                layering.changed.merge(set);
            }
            return Err(err);
        }
    };
    tracing::info!(
        path = %path.display(),
        kept_pages = summary.pages.kept,
        skipped_pages = summary.pages.skipped(),
        memory_file_bytes = summary.memory_file_bytes,
        save_state_ms = summary.save_state_ms,
        write_ms = summary.write_ms,
        "snapshot written"
    );
    Ok(summary)
}

/// How long a device worker gets to finish its current pass and park.
const WORKER_PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The device workers parked for a snapshot; resumed when dropped.
struct PausedWorkers<'a> {
    handles: Vec<&'a SnapshotHandle>,
}

impl<'a> PausedWorkers<'a> {
    /// Parks every device worker; on failure resumes those already parked.
    fn pause(devices: &'a [AttachedDevice]) -> Result<Self, SnapshotError> {
        let mut paused = Self {
            handles: Vec::new(),
        };
        for handle in devices.iter().filter_map(|d| d.snapshot.as_ref()) {
            let result = with_worker(handle, |w| w.pause(WORKER_PAUSE_TIMEOUT));
            // Pushed first: a worker whose pause timed out is resumed too.
            paused.handles.push(handle);
            result.map_err(SnapshotError::PauseWorker)?;
        }
        Ok(paused)
    }
}

impl Drop for PausedWorkers<'_> {
    fn drop(&mut self) {
        for handle in &self.handles {
            with_worker(handle, |w| {
                w.resume();
                Ok(())
            })
            .ok();
        }
    }
}

/// Runs `f` on the device's worker, if the device is active (an inactive one has nothing in
/// flight).
fn with_worker(
    handle: &SnapshotHandle,
    f: impl FnOnce(&WorkerHandle) -> Result<(), WorkerError>,
) -> Result<(), WorkerError> {
    let worker_of = |d: &dyn VirtioDevice| d.worker().map_or(Ok(()), f);
    match handle {
        SnapshotHandle::Balloon(d) => worker_of(&*lock(d)),
        SnapshotHandle::Block(d) => worker_of(&*lock(d)),
        SnapshotHandle::Vsock(d) => worker_of(&*lock(d)),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
