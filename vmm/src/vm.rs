//! A running microVM: builds guest memory, the KVM VM, devices and vCPUs from a
//! [`VmConfig`], then serves control requests (pause, resume, info, shutdown) and guest
//! events (power off, reset) until it ends. virtio devices (the balloon) are built and placed
//! by [`crate::devices::virtio`]; their host-side controls travel in the [`VmHandle`].

use std::io::Read;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::Serialize;
use serde_json::json;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot::acpi::{build_acpi_tables, AcpiConfig, AcpiError};
use crate::boot::e820::ram_ranges;
use crate::boot::layout::{ACPI_SLEEP_CONTROL_PORT, COM1_GSI, COM1_PORT, COM1_PORT_COUNT};
use crate::boot::loader::{load_linux, BootSource, LoadError};
use crate::config::{ConfigError, SerialOutput, VmConfig};
use crate::devices::acpi_pm::{self, AcpiPmDevice};
use crate::devices::bus::{Bus, BusError, GuestRequest};
use crate::devices::serial::{ConsoleOutput, SerialDevice};
use crate::devices::virtio::{self, AttachError, AttachedDevice, BuildError};
use crate::kvm::vcpu::{self, RunState, Vcpu, VcpuControl, VcpuError, VcpuEvent, VcpuSetup};
use crate::kvm::vm::{create_vm, VmError};
use crate::kvm::{kvm_device_path, open_kvm, KvmError};
use crate::memory::dirty::{dirty_logging_wanted, dirty_sync_interval, memory_slots};
use crate::memory::{allocate_guest_memory, DirtyLogError, DirtyTracker, GuestRam};
use crate::metrics::BootTimeline;
use crate::snapshot::SnapshotError;

/// How long vCPUs get to park when pausing.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a control request waits for the VM's event loop.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on CPUID entries asked of KVM.
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

/// Errors building and booting a VM.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM cannot be used.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest memory cannot be reserved.
    #[error("cannot reserve {mem_mib} MiB of guest memory")]
    GuestMemory {
        /// Requested size.
        mem_mib: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Creating the KVM VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A KVM query failed.
    #[error("KVM failed to {operation}")]
    KvmQuery {
        /// What the VMM asked.
        operation: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The ACPI tables cannot be built.
    #[error("cannot build the ACPI tables")]
    Acpi(#[from] AcpiError),
    /// Loading the kernel, initrd or command line failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The boot page tables cannot be written.
    #[error("cannot write the boot page tables into guest memory")]
    BootTables(#[source] vm_memory::GuestMemoryError),
    /// A device cannot be set up.
    #[error("cannot set up {device}")]
    Device {
        /// Which device.
        device: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The virtio devices of the configuration cannot be created.
    #[error("cannot create the virtio devices")]
    VirtioBuild(#[from] BuildError),
    /// The virtio devices cannot be attached to the VM.
    #[error("cannot attach the virtio devices")]
    VirtioAttach(#[from] AttachError),
    /// Two devices claim the same addresses (a VMM bug).
    #[error("device layout conflict")]
    Bus(#[from] BusError),
    /// The serial output file cannot be opened.
    #[error("cannot open serial output file {path}")]
    SerialFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The page-state map for dirty tracking cannot describe guest RAM.
    #[error("cannot create the page-state map for dirty page tracking")]
    DirtyPageStates(#[source] balloon::PageStateError),
    /// Dirty page tracking cannot be set up.
    #[error("cannot set up dirty page tracking")]
    DirtyTracking(#[source] DirtyLogError),
    /// A vCPU cannot be created or configured.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The snapshot to restore cannot be loaded or applied.
    #[error("cannot restore the snapshot")]
    Snapshot(#[from] SnapshotError),
    /// The VM generation ID cannot be written or announced.
    #[error(transparent)]
    VmGenId(#[from] crate::devices::vmgenid::VmGenIdError),
    /// A vCPU thread cannot be started.
    #[error("cannot start the thread of vCPU {id}")]
    Thread {
        /// Which vCPU.
        id: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The VM's state as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
}

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted or triple-faulted; the VMM does not restart it.
    Reset,
    /// A signal (SIGINT/SIGTERM/SIGHUP) stopped the VMM.
    Signal(i32),
    /// The control API asked for shutdown.
    Shutdown,
    /// A vCPU failed.
    VcpuFailed(String),
}

impl ExitReason {
    /// The VMM's exit code: 0 for a clean stop, 1 for a failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::VcpuFailed(_) => 1,
            _ => 0,
        }
    }

    /// A short machine-readable name.
    pub fn name(&self) -> &'static str {
        match self {
            ExitReason::PowerOff => "poweroff",
            ExitReason::Reset => "reset",
            ExitReason::Signal(_) => "signal",
            ExitReason::Shutdown => "shutdown",
            ExitReason::VcpuFailed(_) => "vcpu-failed",
        }
    }
}

/// A request from the control API (or another thread) to the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// State, configuration, uptime and boot timings.
    Info,
    /// Park all vCPUs.
    Pause,
    /// Un-park them.
    Resume,
    /// Stop the VM.
    Shutdown,
}

/// Errors answering a control request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The request cannot be honoured in the VM's state.
    #[error("{0}")]
    Conflict(String),
    /// The VM did not answer (it is ending or stuck).
    #[error("the VM did not answer the control request in time")]
    Timeout,
    /// The VM has ended.
    #[error("the VM has stopped")]
    Stopped,
}

type ControlReply = Result<Option<serde_json::Value>, ControlError>;

/// Everything the VM's event loop reacts to.
pub enum VmEvent {
    /// From a vCPU thread.
    Vcpu(VcpuEvent),
    /// A termination signal arrived.
    Signal(i32),
    /// A control request, with where to send the answer.
    Control(ControlRequest, Sender<ControlReply>),
    /// Write a snapshot (see [`crate::snapshot`]), with where to send the outcome.
    Snapshot(
        crate::snapshot::SnapshotRequest,
        Sender<crate::snapshot::SnapshotReply>,
    ),
    /// Guest memory cannot be served any more (lazy restore's handler failed).
    MemoryFailed(String),
}

/// A cloneable way to send control requests to a running VM.
#[derive(Clone)]
pub struct VmHandle {
    events: Sender<VmEvent>,
    /// The balloon's controls and its configuration at start, if the VM has one.
    balloon: Option<(balloon::BalloonHandle, balloon::BalloonConfig)>,
    /// The drives, in guest order.
    drives: Vec<block::BlockHandle>,
    /// Dirty page tracking, while the VM lives (empty without dirty logging).
    dirty: Weak<DirtyTracker>,
    /// The vsock device's status, if the VM has one.
    vsock: Option<vsock::VsockHandle>,
}

impl VmHandle {
    /// Sends `request` and waits for the answer.
    pub fn request(&self, request: ControlRequest) -> ControlReply {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.events
            .send(VmEvent::Control(request, reply_tx))
            .map_err(|_| ControlError::Stopped)?;
        match reply_rx.recv_timeout(CONTROL_TIMEOUT) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => Err(ControlError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(ControlError::Stopped),
        }
    }

    /// Asks the VM to write a snapshot and waits for the outcome.
    pub fn snapshot(
        &self,
        request: crate::snapshot::SnapshotRequest,
    ) -> crate::snapshot::SnapshotReply {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.events
            .send(VmEvent::Snapshot(request, reply_tx))
            .map_err(|_| ControlError::Stopped.to_string())?;
        reply_rx
            .recv_timeout(crate::snapshot::SNAPSHOT_TIMEOUT)
            .map_err(|_| ControlError::Timeout.to_string())?
    }

    /// Tells the VM a termination signal arrived.
    pub fn signal(&self, signal: i32) {
        let _ = self.events.send(VmEvent::Signal(signal));
    }

    /// The balloon's controls and its configuration at start, if the VM has a balloon.
    ///
    /// Every balloon API request comes through here, so this first brings the page-state map
    /// up to date with KVM's dirty log ([`VmHandle::sync_dirty_pages`]): `GET /balloon` then
    /// counts the pages the guest wrote since they were inflated, reported or hinted as live.
    pub fn balloon(&self) -> Option<&(balloon::BalloonHandle, balloon::BalloonConfig)> {
        if let Err(err) = self.sync_dirty_pages() {
            tracing::warn!(error = %DisplayChain(&err), "cannot sync the dirty log");
        }
        self.balloon.as_ref()
    }

    /// The drives (virtio-blk devices), in guest order.
    pub fn drives(&self) -> &[block::BlockHandle] {
        &self.drives
    }

    /// The vsock device's status handle, if the VM has one.
    pub fn vsock(&self) -> Option<&vsock::VsockHandle> {
        self.vsock.as_ref()
    }

    /// Marks every page the guest wrote since the last sync live in the page-state map (see
    /// [`DirtyTracker::sync`]). Returns how many pages changed state, or `None` when the VM
    /// does not log dirty pages (or has ended).
    pub fn sync_dirty_pages(&self) -> Result<Option<u64>, DirtyLogError> {
        self.dirty.upgrade().map(|t| t.sync()).transpose()
    }
}

/// Displays an error with its sources, `outer: inner: ...`.
struct DisplayChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

/// A booted microVM.
pub struct Vm {
    config: VmConfig,
    // Field order matters on drop: vCPU threads are joined in `stop`, then the VM fd closes,
    // then guest memory is unmapped.
    vcpu_threads: Vec<JoinHandle<()>>,
    // virtio devices (and their workers) stop when their transports drop, after the vCPUs.
    virtio_devices: Vec<AttachedDevice>,
    balloon: Option<balloon::BalloonHandle>,
    drives: Vec<block::BlockHandle>,
    vsock: Option<vsock::VsockHandle>,
    /// Dirty page tracking; holds a reference to the VM fd, dropped with it.
    dirty: Option<Arc<DirtyTracker>>,
    /// When the event loop last synced the dirty log.
    last_dirty_sync: Instant,
    /// How often it syncs ([`crate::memory::dirty::DIRTY_SYNC_INTERVAL`] by default).
    dirty_sync_interval: Duration,
    /// Whether a free page hinting run was accepting hints at the last event loop pass.
    hinting_was_running: bool,
    /// Diff-layer bookkeeping, with `track_dirty_pages`.
    layering: Option<crate::snapshot::layer::Layering>,
    /// A working-set recording still to take (`vmm restore --record-working-set-ms`).
    working_set_recording: Option<crate::snapshot::working_set::Recording>,
    vm_fd: Arc<VmFd>,
    _kvm: Kvm,
    /// MSRs a snapshot saves (`KVM_GET_MSR_INDEX_LIST`).
    msr_indices: Arc<[u32]>,
    ram: Arc<GuestRam>,
    serial: Arc<Mutex<SerialDevice>>,
    control: Arc<VcpuControl>,
    timeline: Arc<BootTimeline>,
    state: VmState,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
}

/// Brings in the working set recorded for the snapshot in `dir`, if any, as `mode` says:
/// from a thread of its own, or through the first vCPU before any vCPU runs. A bad record is
/// logged and ignored.
fn bring_in_working_set(
    dir: &std::path::Path,
    snapshot_id: &[u8; 16],
    mem: &GuestMemoryMmap,
    vcpus: &[Vcpu],
    mode: crate::snapshot::working_set::WorkingSetMode,
    phases: &mut crate::snapshot::restore::Phases,
) {
    use crate::snapshot::working_set::{self, WorkingSetMode};
    let Some(vcpu) = vcpus.first() else { return };
    if mode == WorkingSetMode::Off {
        return;
    }
    match working_set::load(dir, snapshot_id) {
        Ok(None) => {}
        Ok(Some(set)) if mode == WorkingSetMode::Background => {
            working_set::prefetch_in_background(mem, &set.ranges);
        }
        Ok(Some(set)) => {
            working_set::prefetch(mem, vcpu, &set.ranges);
        }
        Err(err) => tracing::warn!(
            error = %crate::devices::virtio::error_chain(&err),
            "working set ignored"
        ),
    }
    phases.mark("working_set_ms");
}

fn open_serial_sink(output: &SerialOutput) -> Result<Box<dyn std::io::Write + Send>, BootError> {
    Ok(match output {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BootError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

impl Vm {
    /// The host side of the VM's vsock device, if it has one.
    pub fn vsock_uds_path(&self) -> Option<std::path::PathBuf> {
        self.config.vsock.as_ref().map(|v| v.uds_path.clone())
    }

    /// Builds the VM described by `config` and starts its vCPUs.
    pub fn boot(config: VmConfig, timeline: Arc<BootTimeline>) -> Result<Self, BootError> {
        config.validate()?;
        let machine = &config.machine_config;
        let (events_tx, events_rx) = mpsc::channel();
        let control = Arc::new(VcpuControl::default());
        let vcpu_threads = VcpuThreads::start(machine.vcpu_count, &control, &timeline, &events_tx)?;
        let mem_bytes = machine.mem_size_mib << 20;
        let serial_sink = open_serial_sink(&config.serial.output)?;

        let kvm = open_kvm(&kvm_device_path())?;
        let ranges: Vec<_> = ram_ranges(mem_bytes)
            .into_iter()
            .map(|(s, l)| (GuestAddress(s), l as usize))
            .collect();
        let mem = allocate_guest_memory(&ranges).map_err(|source| BootError::GuestMemory {
            mem_mib: machine.mem_size_mib,
            source,
        })?;
        let log_dirty = dirty_logging_wanted(config.balloon.as_ref())
            || config.machine_config.track_dirty_pages;
        let vm_fd = Arc::new(create_vm(&kvm, &mem, log_dirty)?);
        let ram = Arc::new(GuestRam::new(mem.clone()));
        let layering = new_layering(&config, &mem, None);
        let dirty_sync_interval = upkeep_interval(&config);

        let devices = virtio::build_virtio_devices(&config, &ram)?;
        let dirty = log_dirty
            .then(|| {
                start_dirty_tracking(&vm_fd, &ram, devices.balloon.as_ref(), layering.as_ref())
            })
            .transpose()?;
        let mut mmio = Bus::default();
        let virtio_devices =
            virtio::attach_virtio_devices(&*vm_fd, &mem, &mut mmio, devices.specs)?;
        log_device_writes(&virtio_devices, layering.as_ref());
        let mmio = Arc::new(mmio);

        let acpi = build_acpi_tables(&AcpiConfig {
            vcpu_count: machine.vcpu_count,
            virtio_mmio: virtio_devices.iter().map(AttachedDevice::acpi).collect(),
        })?;
        let boot = config.boot_source.clone();
        let entry = load_linux(
            &mem,
            mem_bytes,
            &BootSource {
                kernel: &boot.kernel_image_path,
                initrd: boot.initrd_path.as_deref(),
                extra_cmdline: boot.boot_args.as_deref(),
            },
            &acpi,
        )?;
        crate::kvm::regs::write_boot_tables(&mem).map_err(BootError::BootTables)?;
        crate::devices::vmgenid::write_generation_id(
            &mem,
            &crate::devices::vmgenid::new_generation_id(),
        )?;

        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq(&vm_fd)?,
            ConsoleOutput::new(serial_sink, timeline.clone()),
        )));
        let pio = pio_bus(&serial)?;

        let supported_cpuid = kvm
            .get_supported_cpuid(MAX_CPUID_ENTRIES)
            .map_err(|source| BootError::KvmQuery {
                operation: "report supported CPUID",
                source,
            })?;
        for entry in supported_cpuid.as_slice() {
            tracing::trace!(
                function = format_args!("{:#x}", entry.function),
                index = entry.index,
                eax = format_args!("{:#x}", entry.eax),
                ebx = format_args!("{:#x}", entry.ebx),
                ecx = format_args!("{:#x}", entry.ecx),
                edx = format_args!("{:#x}", entry.edx),
                "supported CPUID"
            );
        }
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(|source| BootError::KvmQuery {
                operation: "list MSRs",
                source,
            })?;
        let setup = VcpuSetup {
            supported_cpuid: &supported_cpuid,
            msr_indices: msr_list.as_slice(),
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            vcpu_count: machine.vcpu_count,
        };
        let vcpus = (0..machine.vcpu_count)
            .map(|id| {
                Vcpu::new(
                    &vm_fd,
                    id,
                    &setup,
                    (id == 0).then_some(entry),
                    pio.clone(),
                    mmio.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;

        let vcpu_threads = vcpu_threads.run(vcpus);
        tracing::info!(
            vcpus = machine.vcpu_count,
            mem_mib = machine.mem_size_mib,
            kernel = %boot.kernel_image_path.display(),
            virtio_devices = virtio_devices.len(),
            "microVM started"
        );
        Ok(Self {
            config,
            vcpu_threads,
            virtio_devices,
            balloon: devices.balloon,
            drives: devices.drives,
            vsock: devices.vsock,
            dirty,
            last_dirty_sync: Instant::now(),
            dirty_sync_interval,
            hinting_was_running: false,
            layering,
            working_set_recording: None,
            vm_fd,
            _kvm: kvm,
            msr_indices: Arc::from(msr_list.as_slice()),
            ram,
            serial,
            control,
            timeline,
            state: VmState::Running,
            events_tx,
            events_rx,
        })
    }

    /// Recreates the VM of the snapshot in `dir` and starts its vCPUs where the original
    /// paused (see [`crate::snapshot::restore`]).
    pub fn restore(
        dir: &std::path::Path,
        options: &crate::snapshot::restore::RestoreOptions,
        timeline: Arc<BootTimeline>,
    ) -> Result<Self, BootError> {
        let restored = crate::snapshot::restore::prepare(dir, options)?;
        let crate::snapshot::restore::Prepared {
            config,
            kvm,
            vm_fd,
            ram,
            vcpu_states,
            serial_state,
            devices,
            log_dirty,
            msr_indices,
            mut phases,
            lazy,
            snapshot_id,
            lineage,
        } = restored;
        let (events_tx, events_rx) = mpsc::channel();
        let control = Arc::new(VcpuControl::default());
        let vcpu_threads = VcpuThreads::start(
            config.machine_config.vcpu_count,
            &control,
            &timeline,
            &events_tx,
        )?;
        let layering = new_layering(&config, ram.memory(), lineage);
        let dirty_sync_interval = upkeep_interval(&config);
        let state_path = dir.join(crate::snapshot::format::STATE_FILE);
        let restored_devices = crate::snapshot::devices::restore_devices(
            &devices,
            &ram,
            config.vsock.as_ref(),
            &state_path,
        )?;
        phases.mark("device_state_ms");
        let dirty = log_dirty
            .then(|| {
                start_dirty_tracking(
                    &vm_fd,
                    &ram,
                    restored_devices.balloon.as_ref(),
                    layering.as_ref(),
                )
            })
            .transpose()?;
        phases.mark("dirty_tracking_ms");
        let mut mmio = Bus::default();
        let virtio_devices = virtio::attach_virtio_devices(
            &*vm_fd,
            ram.memory(),
            &mut mmio,
            restored_devices.specs,
        )?;
        log_device_writes(&virtio_devices, layering.as_ref());
        for (device, state) in virtio_devices.iter().zip(&devices) {
            device
                .transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(state.transport())
                .map_err(|e| SnapshotError::Invalid {
                    path: state_path.clone(),
                    reason: format!(
                        "device {}: transport: {}",
                        state.name(),
                        crate::devices::virtio::error_chain(&e)
                    ),
                })?;
        }
        phases.mark("devices_ms");
        let serial_sink = open_serial_sink(&config.serial.output)?;
        let serial = SerialDevice::restored(
            &serial_state,
            serial_irq(&vm_fd)?,
            ConsoleOutput::new(serial_sink, timeline.clone()),
        )
        .map_err(|source| BootError::Device {
            device: "the serial console (saved state)",
            source,
        })?;
        let serial = Arc::new(Mutex::new(serial));
        let pio = pio_bus(&serial)?;
        let mmio = Arc::new(mmio);
        let vcpus = vcpu_states
            .iter()
            .map(|state| Vcpu::restored(&vm_fd, state, pio.clone(), mmio.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        phases.mark("vcpus_ms");
        let generation = crate::devices::vmgenid::regenerate_and_notify(&vm_fd, ram.memory())?;
        if let Some(layering) = &layering {
            layering.changed.insert_range(
                crate::boot::layout::VMGENID_ADDR,
                crate::devices::vmgenid::VMGENID_BYTES as u64,
            );
        }
        phases.mark("vmgenid_ms");
        if options.record_working_set_ms.is_none() {
            bring_in_working_set(
                dir,
                &snapshot_id,
                ram.memory(),
                &vcpus,
                options.working_set,
                &mut phases,
            );
        }
        tracing::debug!(
            vmgenid = %crate::snapshot::format::id_hex(&generation),
            "new VM generation ID, guest notified"
        );
        if let Some(lazy) = &lazy {
            let events = events_tx.clone();
            lazy.on_failure(move |error| {
                let _ = events.send(VmEvent::MemoryFailed(error));
            });
        }
        if options.start_paused {
            // Set before the vCPUs are handed over: each parks at its first checkpoint.
            control.set(RunState::Paused);
        }
        let vcpu_threads = vcpu_threads.run(vcpus);
        phases.mark("threads_ms");
        let working_set_recording =
            options
                .record_working_set_ms
                .map(|after_ms| crate::snapshot::working_set::Recording {
                    at: Instant::now() + Duration::from_millis(after_ms),
                    after_ms,
                    dir: dir.to_owned(),
                    snapshot_id,
                });
        phases.record_on(&timeline);
        tracing::info!(
            snapshot = %dir.display(),
            vcpus = config.machine_config.vcpu_count,
            mem_mib = config.machine_config.mem_size_mib,
            phases_ms = %phases,
            "microVM restored"
        );
        Ok(Self {
            config,
            vcpu_threads,
            virtio_devices,
            balloon: restored_devices.balloon,
            drives: restored_devices.drives,
            vsock: restored_devices.vsock,
            dirty,
            last_dirty_sync: Instant::now(),
            dirty_sync_interval,
            hinting_was_running: false,
            layering,
            working_set_recording,
            vm_fd,
            _kvm: kvm,
            msr_indices,
            ram,
            serial,
            control,
            timeline,
            state: if options.start_paused {
                VmState::Paused
            } else {
                VmState::Running
            },
            events_tx,
            events_rx,
        })
    }

    /// Pauses the VM (if it runs), writes a snapshot, then resumes, stays paused or stops as
    /// `request` asks. A failed snapshot resumes a VM that was running. Returns whether the VM
    /// must stop.
    fn snapshot(
        &mut self,
        request: &crate::snapshot::SnapshotRequest,
    ) -> (crate::snapshot::SnapshotReply, bool) {
        use crate::snapshot::AfterSnapshot;
        let started = Instant::now();
        let was_running = self.state == VmState::Running;
        if let Err(err) = self.pause() {
            return (
                Err(format!("cannot pause the VM for the snapshot: {err}")),
                false,
            );
        }
        let result = crate::snapshot::take(
            &crate::snapshot::LiveVm {
                config: &self.config,
                vm_fd: &self.vm_fd,
                control: &self.control,
                vcpu_count: self.vcpu_threads.len(),
                msr_indices: self.msr_indices.clone(),
                serial: &self.serial,
                ram: &self.ram,
                dirty: self.dirty.as_deref(),
                virtio_devices: &self.virtio_devices,
                page_states: self.balloon.as_ref().map(|b| b.page_states()),
                layering: self.layering.as_ref(),
            },
            request,
            started,
        );
        let stop = result.is_ok() && request.after == AfterSnapshot::Stop;
        if was_running && (result.is_err() || request.after == AfterSnapshot::Resume) {
            let _ = self.resume();
        }
        (result.map_err(|e| DisplayChain(&e).to_string()), stop)
    }

    /// A handle for control requests from other threads.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            events: self.events_tx.clone(),
            balloon: self.balloon.clone().zip(self.config.balloon.clone()),
            drives: self.drives.clone(),
            dirty: self.dirty.as_ref().map(Arc::downgrade).unwrap_or_default(),
            vsock: self.vsock.clone(),
        }
    }

    /// Dirty page tracking, if the VM logs dirty pages: the snapshot writer pauses the vCPUs,
    /// then calls [`DirtyTracker::sync`] before it reads the page-state map.
    pub fn dirty_tracker(&self) -> Option<&Arc<DirtyTracker>> {
        self.dirty.as_ref()
    }

    /// Marks every page the guest wrote since the last sync live in the page-state map; see
    /// [`DirtyTracker::sync`]. `Ok(None)` when the VM does not log dirty pages.
    pub fn sync_dirty_pages(&self) -> Result<Option<u64>, DirtyLogError> {
        self.dirty.as_ref().map(|t| t.sync()).transpose()
    }

    /// The event loop's dirty log upkeep: a sync every
    /// [`DIRTY_SYNC_INTERVAL`](crate::memory::dirty::DIRTY_SYNC_INTERVAL), and one as soon as a
    /// free page hinting run stops accepting hints.
    fn dirty_upkeep(&mut self) {
        let Some(tracker) = &self.dirty else {
            return;
        };
        let hinting = self
            .balloon
            .as_ref()
            .is_some_and(|b| b.hinting_status().running);
        let hinting_stopped = self.hinting_was_running && !hinting;
        self.hinting_was_running = hinting;
        if !hinting_stopped && self.last_dirty_sync.elapsed() < self.dirty_sync_interval {
            return;
        }
        self.last_dirty_sync = Instant::now();
        match tracker.sync() {
            Ok(made_live) if hinting_stopped => {
                tracing::info!(
                    pages_made_live = made_live,
                    "hinting run stopped: dirty log synced"
                )
            }
            Ok(_) => {}
            Err(err) => {
                // A failing ioctl fails every second: log the 1st, 2nd, 4th, 8th... failure.
                if tracker.stats().sync_errors.is_power_of_two() {
                    tracing::warn!(error = %DisplayChain(&err), "cannot sync the dirty log");
                }
            }
        }
    }

    /// Feeds the host's standard input to the guest's serial console, on a background thread.
    pub fn forward_stdin(&self) {
        let serial = self.serial.clone();
        let _ = std::thread::Builder::new()
            .name("serial-in".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Helper);
                let mut stdin = std::io::stdin();
                let mut buf = [0u8; 256];
                while let Ok(count) = stdin.read(&mut buf) {
                    if count == 0 {
                        break;
                    }
                    let mut pending = &buf[..count];
                    while !pending.is_empty() {
                        let taken = serial
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .enqueue_input(pending);
                        pending = &pending[taken..];
                        if taken == 0 {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            });
    }

    /// The VM's boot timeline, readable after the VM has ended.
    pub fn timings_source(&self) -> Arc<BootTimeline> {
        self.timeline.clone()
    }

    fn info(&self) -> serde_json::Value {
        let machine = &self.config.machine_config;
        json!({
            "state": self.state,
            "vcpu_count": machine.vcpu_count,
            "mem_size_mib": machine.mem_size_mib,
            "vmm_version": env!("CARGO_PKG_VERSION"),
            "uptime_ms": self.timeline.uptime_ms(),
            "config": self.config,
            "boot_timings_ms": self.timeline.timings(),
            "devices": self
                .virtio_devices
                .iter()
                .map(AttachedDevice::info)
                .collect::<Vec<_>>(),
            "balloon": self.balloon.as_ref().map(balloon::BalloonHandle::status),
            "drives": self.drives.iter().map(block::BlockHandle::status).collect::<Vec<_>>(),
            "vsock": self.vsock.as_ref().map(vsock::VsockHandle::status),
            "memory": {
                "released_bytes": self.ram.released_bytes(),
                "dirty_log": self.dirty.as_ref().map(|t| t.stats()),
                "lazy": self.ram.backing_status(),
            },
        })
    }

    fn kick_vcpus(&self) {
        for thread in &self.vcpu_threads {
            if !thread.is_finished() {
                let _ = thread.kill(vcpu::kick_signal());
            }
        }
    }

    fn pause(&mut self) -> ControlReply {
        if self.state == VmState::Paused {
            return Ok(None);
        }
        self.control.set(RunState::Paused);
        self.kick_vcpus();
        if !self
            .control
            .wait_parked(self.vcpu_threads.len(), PAUSE_TIMEOUT)
        {
            self.control.set(RunState::Running);
            return Err(ControlError::Conflict(
                "vCPUs did not pause in time; the VM keeps running".into(),
            ));
        }
        self.state = VmState::Paused;
        tracing::info!("microVM paused");
        Ok(None)
    }

    fn resume(&mut self) -> ControlReply {
        if self.state == VmState::Running {
            return Ok(None);
        }
        self.control.set(RunState::Running);
        self.state = VmState::Running;
        tracing::info!("microVM resumed");
        Ok(None)
    }

    /// How long the event loop may wait for an event before it has upkeep to do (`None`:
    /// indefinitely).
    fn event_wait(&self) -> Option<Duration> {
        let dirty = self.dirty.is_some().then_some(self.dirty_sync_interval);
        let recording = self
            .working_set_recording
            .as_ref()
            .map(|r| r.at.saturating_duration_since(Instant::now()));
        match (dirty, recording) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes the working-set recording once it is due (`vmm restore --record-working-set-ms`).
    fn working_set_upkeep(&mut self) {
        let now = Instant::now();
        let Some(recording) = self.working_set_recording.take_if(|r| now >= r.at) else {
            return;
        };
        match recording.take(self.ram.memory()) {
            Ok((path, pages)) => tracing::info!(
                path = %path.display(),
                pages,
                after_ms = recording.after_ms,
                "working set recorded"
            ),
            Err(err) => tracing::warn!(
                error = %virtio::error_chain(&err),
                "cannot record the working set"
            ),
        }
    }

    /// Serves events until the VM ends, then stops the vCPUs and returns why it ended.
    pub fn run(mut self) -> ExitReason {
        let reason = loop {
            self.dirty_upkeep();
            self.working_set_upkeep();
            let event = if let Some(timeout) = self.event_wait() {
                match self.events_rx.recv_timeout(timeout) {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        break ExitReason::VcpuFailed("event channel closed".into())
                    }
                }
            } else {
                let Ok(event) = self.events_rx.recv() else {
                    break ExitReason::VcpuFailed("event channel closed".into());
                };
                event
            };
            match event {
                VmEvent::Vcpu(VcpuEvent::Guest(GuestRequest::PowerOff)) => {
                    break ExitReason::PowerOff
                }
                VmEvent::Vcpu(VcpuEvent::Guest(GuestRequest::Reset)) => break ExitReason::Reset,
                VmEvent::Vcpu(VcpuEvent::Failed { id, error }) => {
                    break ExitReason::VcpuFailed(format!("vCPU {id}: {error}"))
                }
                VmEvent::Signal(signal) => break ExitReason::Signal(signal),
                VmEvent::MemoryFailed(error) => {
                    break ExitReason::VcpuFailed(format!("guest memory: {error}"))
                }
                VmEvent::Snapshot(request, reply) => {
                    let (answer, stop) = self.snapshot(&request);
                    let _ = reply.send(answer);
                    if stop {
                        break ExitReason::Shutdown;
                    }
                }
                VmEvent::Control(request, reply) => {
                    let answer = match request {
                        ControlRequest::Info => Ok(Some(self.info())),
                        ControlRequest::Pause => self.pause(),
                        ControlRequest::Resume => self.resume(),
                        ControlRequest::Shutdown => {
                            let _ = reply.send(Ok(None));
                            break ExitReason::Shutdown;
                        }
                    };
                    let _ = reply.send(answer);
                }
            }
        };
        self.stop();
        match &reason {
            ExitReason::VcpuFailed(error) => tracing::error!(%error, "microVM failed"),
            other => tracing::info!(reason = other.name(), "microVM stopped"),
        }
        reason
    }

    fn stop(&mut self) {
        self.control.set(RunState::Exiting);
        self.kick_vcpus();
        for thread in self.vcpu_threads.drain(..) {
            let _ = thread.join();
        }
        // Answer requests that raced with the stop.
        while let Ok(event) = self.events_rx.try_recv() {
            if let VmEvent::Control(_, reply) = event {
                let _ = reply.send(Err(ControlError::Stopped));
            }
        }
    }
}

/// Turns on dirty page tracking over the balloon's page-state map (or, with
/// `VMM_DIRTY_LOG=always` and no balloon, a map of its own, all Live, so the cost of logging and
/// syncing can be measured). The memory slots must have been registered with dirty logging.
fn start_dirty_tracking(
    vm_fd: &Arc<VmFd>,
    ram: &GuestRam,
    balloon: Option<&balloon::BalloonHandle>,
    layering: Option<&crate::snapshot::layer::Layering>,
) -> Result<Arc<DirtyTracker>, BootError> {
    let page_states = match balloon {
        Some(balloon) => balloon.page_states(),
        None => Arc::new(Mutex::new(
            balloon::PageStateMap::new(&ram.page_layout()).map_err(BootError::DirtyPageStates)?,
        )),
    };
    let tracker = DirtyTracker::new(vm_fd.clone(), memory_slots(ram.memory()), page_states)
        .map_err(BootError::DirtyTracking)?;
    let tracker = match layering {
        Some(l) => tracker.with_changed_pages(l.changed.clone()),
        None => tracker,
    };
    tracing::info!(
        slots = tracker.slots().len(),
        interval_ms = dirty_sync_interval().as_millis() as u64,
        "dirty page logging on"
    );
    let tracker = Arc::new(tracker);
    if let Some(balloon) = balloon {
        balloon.set_write_tracker(tracker.clone());
    }
    Ok(tracker)
}

/// Diff-layer bookkeeping for a VM with `track_dirty_pages` (`lineage`: the snapshot it was
/// restored from).
fn new_layering(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    lineage: Option<crate::snapshot::layer::Lineage>,
) -> Option<crate::snapshot::layer::Layering> {
    config
        .machine_config
        .track_dirty_pages
        .then(|| crate::snapshot::layer::Layering {
            changed: Arc::new(crate::memory::ChangedPages::new(&memory_slots(mem))),
            lineage: Mutex::new(lineage),
        })
}

/// Has every device record its writes into guest memory in the changed pages (KVM's dirty
/// log misses them). Before any transport is restored or activated.
fn log_device_writes(
    devices: &[AttachedDevice],
    layering: Option<&crate::snapshot::layer::Layering>,
) {
    if let Some(layering) = layering {
        for device in devices {
            device
                .transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_write_log(layering.changed.clone());
        }
    }
}

/// How often the event loop syncs the dirty log: every second when the balloon needs it, else
/// (dirty pages tracked only for diff layers, read at the snapshot) once a minute, which keeps
/// KVM's write-protection faults down.
fn upkeep_interval(config: &VmConfig) -> Duration {
    if dirty_logging_wanted(config.balloon.as_ref()) {
        dirty_sync_interval()
    } else {
        Duration::from_secs(60)
    }
}

/// Creates the serial console's interrupt: an eventfd registered as an irqfd on COM1's GSI.
fn serial_irq(vm_fd: &VmFd) -> Result<EventFd, BootError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BootError::Device {
        device: "the serial interrupt",
        source,
    })?;
    vm_fd
        .register_irqfd(&irq, COM1_GSI)
        .map_err(|e| BootError::Device {
            device: "the serial interrupt",
            source: e.into(),
        })?;
    Ok(irq)
}

/// The port-I/O bus: COM1 and the ACPI sleep/reset ports.
fn pio_bus(serial: &Arc<Mutex<SerialDevice>>) -> Result<Arc<Bus>, BootError> {
    let mut pio = Bus::default();
    pio.insert(COM1_PORT.into(), COM1_PORT_COUNT.into(), serial.clone())?;
    pio.insert(
        ACPI_SLEEP_CONTROL_PORT.into(),
        acpi_pm::PORT_COUNT,
        Arc::new(Mutex::new(AcpiPmDevice)),
    )?;
    Ok(Arc::new(pio))
}

/// The vCPU threads, started before their vCPUs exist: each installs its seccomp filter at once
/// and then waits for its vCPU. The kernel checks, translates and JIT-compiles a filter when a
/// thread installs it (0.35-0.65 ms for the vCPU filter on a host CPU, measured with `bench
/// host-restore`); started early, that overlaps the main thread's set-up of the VM instead of
/// delaying the first `KVM_RUN`.
struct VcpuThreads {
    /// One per thread, in vCPU order: where its vCPU is handed over.
    handoffs: Vec<mpsc::Sender<Vcpu>>,
    threads: Vec<JoinHandle<()>>,
}

impl VcpuThreads {
    /// Starts `count` threads; their vCPUs' events go to `events_tx`. Threads whose vCPU never
    /// comes (the set-up failed and `self` was dropped) end quietly.
    fn start(
        count: u8,
        control: &Arc<VcpuControl>,
        timeline: &Arc<BootTimeline>,
        events_tx: &Sender<VmEvent>,
    ) -> Result<Self, BootError> {
        vcpu::install_kick_handler().map_err(|source| BootError::Device {
            device: "the vCPU kick signal",
            source,
        })?;
        let mut started = Self {
            handoffs: Vec::with_capacity(count.into()),
            threads: Vec::with_capacity(count.into()),
        };
        for id in 0..count {
            let (control, timeline) = (control.clone(), timeline.clone());
            let events = events_tx.clone();
            let (handoff, vcpu_rx) = mpsc::channel::<Vcpu>();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if id == 0 {
                        timeline.mark_phase("vcpu_thread_ms");
                    }
                    crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Vcpu);
                    if id == 0 {
                        timeline.mark_phase("vcpu_seccomp_ms");
                    }
                    let Ok(vcpu) = vcpu_rx.recv() else { return };
                    vcpu.run(control, timeline, |event| {
                        drop(events.send(VmEvent::Vcpu(event)))
                    })
                })
                .map_err(|source| BootError::Thread { id, source })?;
            started.handoffs.push(handoff);
            started.threads.push(thread);
        }
        Ok(started)
    }

    /// Hands each thread its vCPU (in vCPU order), which it then runs.
    fn run(self, vcpus: Vec<Vcpu>) -> Vec<JoinHandle<()>> {
        debug_assert_eq!(vcpus.len(), self.handoffs.len());
        for (handoff, vcpu) in self.handoffs.iter().zip(vcpus) {
            // A thread gone already (its filter refused; it exited the process) has nothing
            // to run this on.
            drop(handoff.send(vcpu));
        }
        self.threads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_whose_vcpus_never_come_end() {
        let (events, _rx) = mpsc::channel();
        let timeline = Arc::new(BootTimeline::new(Instant::now()));
        let started =
            VcpuThreads::start(2, &Arc::new(VcpuControl::default()), &timeline, &events).unwrap();
        let VcpuThreads { handoffs, threads } = started;
        assert_eq!(threads.len(), 2);
        // What a failed set-up does: the handoffs go, and each thread must end, not wait.
        drop(handoffs);
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(timeline.timings().phases.contains_key("vcpu_thread_ms"));
    }
    use crate::api::{ApiError, ApiHandler, ApiRequest, BalloonRequest};

    #[test]
    fn balloon_requests_without_a_balloon_are_409_with_how_to_add_one() {
        let (events, _rx) = mpsc::channel();
        let handle = VmHandle {
            events,
            balloon: None,
            drives: Vec::new(),
            dirty: Weak::new(),
            vsock: None,
        };
        let config = balloon::BalloonConfig {
            amount_mib: 0,
            deflate_on_oom: true,
            stats_polling_interval_s: 0,
            free_page_reporting: false,
            free_page_hinting: false,
        };
        for request in [
            BalloonRequest::Configure(config),
            BalloonRequest::SetTarget { amount_mib: 1 },
            BalloonRequest::Get,
        ] {
            match handle.handle(ApiRequest::Balloon(request)) {
                Err(ApiError::Conflict(message)) => assert!(
                    message.contains("the balloon must be configured at start: vmm run --balloon"),
                    "{message}"
                ),
                other => panic!("expected 409, got {other:?}"),
            }
        }
    }
}
