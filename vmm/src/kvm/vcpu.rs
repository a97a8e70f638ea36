//! A vCPU: its boot configuration and the thread that runs it, dispatching exits to the
//! device buses, and parking when the VM is paused.
//!
//! Pausing: the controller sets the desired state and "kicks" each vCPU thread with a
//! real-time signal whose handler sets `kvm_run.immediate_exit`, so `KVM_RUN` returns `EINTR`
//! at once (or right away if the signal came just before entry); the thread then parks on a
//! condition variable until resumed or told to exit.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_run, CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::vcpu_state::VcpuState;

vmm_sys_util::ioctl_iowr_nr!(
    KVM_PRE_FAULT_MEMORY,
    kvm_bindings::KVMIO,
    0xd5,
    kvm_bindings::kvm_pre_fault_memory
);
use super::{cpuid, msrs, regs};
use crate::boot::loader::BootEntry;
use crate::devices::bus::{Bus, GuestRequest};
use crate::metrics::BootTimeline;

/// Offset from `SIGRTMIN` of the signal that kicks a vCPU out of `KVM_RUN`.
const KICK_SIGNAL_OFFSET: i32 = 0;
/// Local APIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The signal number used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(
    _signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own `kvm_run` mapping, set while its `VcpuFd`
            // is alive and cleared before it is dropped; a single byte store is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// What the VM should be doing, as the controller wants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs run the guest.
    Running,
    /// vCPUs are parked.
    Paused,
    /// vCPU threads end.
    Exiting,
}

#[derive(Debug)]
struct ControlState {
    desired: RunState,
    parked: usize,
    /// Bumped for each snapshot; parked vCPUs save their state once per generation.
    save_generation: u64,
    /// MSRs the current save request reads.
    save_msrs: Arc<[u32]>,
    /// Answers to the current save request.
    saved: Vec<Result<VcpuState, VcpuError>>,
}

/// Shared between the controller and the vCPU threads.
#[derive(Debug)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            state: Mutex::new(ControlState {
                desired: RunState::Running,
                parked: 0,
                save_generation: 0,
                save_msrs: Arc::from(Vec::new()),
                saved: Vec::new(),
            }),
            changed: Condvar::new(),
        }
    }
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the desired state and wakes parked vCPUs. Exiting is final.
    pub fn set(&self, desired: RunState) {
        let mut state = self.lock();
        if state.desired != RunState::Exiting {
            state.desired = desired;
        }
        self.changed.notify_all();
    }

    /// The desired state.
    pub fn desired(&self) -> RunState {
        self.lock().desired
    }

    /// Waits on `state` until `done` holds, up to `deadline`; returns the guard and whether it
    /// holds.
    fn wait_until<'a>(
        &'a self,
        mut state: std::sync::MutexGuard<'a, ControlState>,
        deadline: Instant,
        done: impl Fn(&ControlState) -> bool,
    ) -> (std::sync::MutexGuard<'a, ControlState>, bool) {
        while !done(&state) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (state, false);
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        (state, true)
    }

    /// Waits until `count` vCPUs are parked, up to `timeout`. Returns whether they are.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.wait_until(self.lock(), deadline, |s| s.parked >= count)
            .1
    }

    /// Asks the `count` parked vCPUs to save their state (reading `msr_indices`) and waits up
    /// to `timeout` for all answers, returned in vCPU order. The vCPUs must be paused.
    pub fn save_parked(
        &self,
        count: usize,
        msr_indices: Arc<[u32]>,
        timeout: Duration,
    ) -> Option<Vec<Result<VcpuState, VcpuError>>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        state.saved.clear();
        state.save_msrs = msr_indices;
        state.save_generation += 1;
        self.changed.notify_all();
        let (mut state, answered) = self.wait_until(state, deadline, |s| s.saved.len() >= count);
        if !answered {
            return None;
        }
        let mut saved = std::mem::take(&mut state.saved);
        saved.sort_by_key(|r| match r {
            Ok(s) => s.id,
            Err(e) => e.id,
        });
        Some(saved)
    }

    /// Called by a vCPU thread between runs: parks while paused, saving its state through
    /// `save` when asked; returns `false` when the thread must exit.
    fn checkpoint(&self, save: &mut dyn FnMut(&[u32]) -> Result<VcpuState, VcpuError>) -> bool {
        let mut state = self.lock();
        if state.desired == RunState::Paused {
            state.parked += 1;
            self.changed.notify_all();
            let mut seen_generation = state.save_generation;
            while state.desired == RunState::Paused {
                if state.save_generation != seen_generation {
                    seen_generation = state.save_generation;
                    let msrs = state.save_msrs.clone();
                    drop(state);
                    let result = save(&msrs);
                    state = self.lock();
                    state.saved.push(result);
                    self.changed.notify_all();
                    continue;
                }
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            state.parked -= 1;
            self.changed.notify_all();
        }
        state.desired != RunState::Exiting
    }
}

/// What a vCPU thread tells the controller.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The guest asked to power off or reset.
    Guest(GuestRequest),
    /// The vCPU failed and stopped.
    Failed {
        /// Which vCPU.
        id: u8,
        /// What happened.
        error: String,
    },
}

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
#[error("KVM failed to {operation} for vCPU {id}")]
pub struct VcpuError {
    /// Which vCPU.
    pub id: u8,
    /// What the VMM was doing.
    pub operation: &'static str,
    /// The ioctl's error.
    #[source]
    pub source: kvm_ioctls::Error,
}

/// One vCPU with the buses its exits go to.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

/// What every vCPU's configuration needs from KVM.
pub struct VcpuSetup<'a> {
    /// `KVM_GET_SUPPORTED_CPUID`.
    pub supported_cpuid: &'a CpuId,
    /// MSRs KVM can save and restore.
    pub msr_indices: &'a [u32],
    /// Whether the local APIC offers the TSC-deadline timer.
    pub tsc_deadline: bool,
    /// Number of vCPUs in the VM.
    pub vcpu_count: u8,
}

impl Vcpu {
    /// Creates vCPU `id` and configures CPUID, MSRs, local APIC, and for the boot vCPU the
    /// registers at the kernel's entry.
    pub fn new(
        vm: &VmFd,
        id: u8,
        setup: &VcpuSetup,
        boot: Option<BootEntry>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
    ) -> Result<Self, VcpuError> {
        let err = |operation| {
            move |source| VcpuError {
                id,
                operation,
                source,
            }
        };
        let fd = vm.create_vcpu(id.into()).map_err(err("create the vCPU"))?;
        let cpuid = cpuid::vcpu_cpuid(
            setup.supported_cpuid,
            id,
            setup.vcpu_count,
            setup.tsc_deadline,
        );
        fd.set_cpuid2(&cpuid).map_err(err("set CPUID"))?;
        let boot_msrs = msrs::boot_msrs(setup.msr_indices);
        let written = fd.set_msrs(&boot_msrs).map_err(err("set MSRs"))?;
        if written != boot_msrs.as_slice().len() {
            tracing::warn!(
                vcpu = id,
                written,
                wanted = boot_msrs.as_slice().len(),
                "KVM accepted only some boot MSRs"
            );
        }
        let mut lapic = fd.get_lapic().map_err(err("read the local APIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(err("set the local APIC"))?;
        fd.set_fpu(&regs::boot_fpu()).map_err(err("set the FPU"))?;
        if let Some(boot) = boot {
            let sregs = fd.get_sregs().map_err(err("read special registers"))?;
            fd.set_sregs(&regs::boot_sregs(sregs))
                .map_err(err("set special registers"))?;
            fd.set_regs(&regs::boot_regs(boot.entry, boot.zero_page))
                .map_err(err("set registers"))?;
        }
        Ok(Self { id, fd, pio, mmio })
    }

    /// Creates vCPU `state.id` with the saved state of a snapshot (see [`VcpuState::restore`]).
    pub fn restored(
        vm: &VmFd,
        state: &VcpuState,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
    ) -> Result<Self, VcpuError> {
        let id = state.id;
        let fd = vm.create_vcpu(id.into()).map_err(|source| VcpuError {
            id,
            operation: "create the vCPU",
            source,
        })?;
        state.restore(&fd)?;
        Ok(Self { id, fd, pio, mmio })
    }

    /// Builds KVM's nested page tables for guest range `gpa..gpa + len` as a first touch would
    /// (`KVM_PRE_FAULT_MEMORY`, Linux 6.10+), resuming after interruptions. Only before the
    /// vCPU runs. `ENOTTY`/`EINVAL` mean the kernel does not offer it.
    pub fn pre_fault_memory(&self, gpa: u64, len: u64) -> Result<(), vmm_sys_util::errno::Error> {
        let mut range = kvm_bindings::kvm_pre_fault_memory {
            gpa,
            size: len,
            ..Default::default()
        };
        while range.size > 0 {
            // SAFETY: the ioctl reads and updates `range`, a valid kvm_pre_fault_memory that
            // lives across the call, on this process's own vCPU fd; it touches no other memory.
            let rc = unsafe {
                vmm_sys_util::ioctl::ioctl_with_mut_ref(
                    &self.fd,
                    KVM_PRE_FAULT_MEMORY(),
                    &mut range,
                )
            };
            if rc < 0 {
                let err = vmm_sys_util::errno::Error::last();
                if !matches!(err.errno(), libc::EINTR | libc::EAGAIN) {
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Runs the vCPU until the controller says exit or the guest powers off, resets or fails.
    /// `report` receives the event that ended the vCPU, if any.
    pub fn run(
        mut self,
        control: Arc<VcpuControl>,
        timeline: Arc<BootTimeline>,
        report: impl FnOnce(VcpuEvent),
    ) {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
        let id = self.id;
        loop {
            let fd = &self.fd;
            if !control.checkpoint(&mut |msrs| VcpuState::save(fd, id, msrs)) {
                break;
            }
            if self.id == 0 {
                timeline.mark_first_kvm_run();
            }
            let outcome = match self.fd.run() {
                Ok(exit) => handle_exit(self.id, exit, &self.pio, &self.mmio),
                Err(e) if e.errno() == libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    Ok(None)
                }
                Err(e) if e.errno() == libc::EAGAIN => Ok(None),
                Err(e) => Err(format!("KVM_RUN failed: {e}")),
            };
            let event = match outcome {
                Ok(None) => continue,
                Ok(Some(request)) => VcpuEvent::Guest(request),
                Err(error) => VcpuEvent::Failed { id: self.id, error },
            };
            control.set(RunState::Exiting);
            report(event);
            break;
        }
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
    }
}

/// Sets the delivery mode (bits 8-10) of a local APIC LVT register.
fn set_lvt_mode(regs: &mut [libc::c_char], offset: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (slot, byte) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *slot = byte as libc::c_char;
    }
}

/// Serves one exit. `Ok(Some(_))` ends the VM, `Err` is a fatal vCPU error.
fn handle_exit(
    id: u8,
    exit: VcpuExit,
    pio: &Bus,
    mmio: &Bus,
) -> Result<Option<GuestRequest>, String> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(port.into(), data) {
                tracing::trace!(port, "read from unclaimed port");
            }
            Ok(None)
        }
        VcpuExit::IoOut(port, data) => {
            let (request, claimed) = pio.write(port.into(), data);
            if !claimed {
                tracing::trace!(port, "write to unclaimed port");
            }
            Ok(request)
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                tracing::debug!(addr, "read from unclaimed MMIO address");
            }
            Ok(None)
        }
        VcpuExit::MmioWrite(addr, data) => {
            let (request, claimed) = mmio.write(addr, data);
            if !claimed {
                tracing::debug!(addr, "write to unclaimed MMIO address");
            }
            Ok(request)
        }
        VcpuExit::Shutdown => {
            tracing::info!(vcpu = id, "guest triple-faulted or asked for a reset");
            Ok(Some(GuestRequest::Reset))
        }
        VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
            Ok(Some(GuestRequest::PowerOff))
        }
        VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_RESET => {
            Ok(Some(GuestRequest::Reset))
        }
        VcpuExit::Hlt => Err("vCPU halted with interrupts disabled".into()),
        VcpuExit::FailEntry(reason, cpu) => Err(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
        )),
        VcpuExit::InternalError => {
            Err("KVM internal error (emulation failure): this KVM cannot run this guest".into())
        }
        other => {
            tracing::debug!(vcpu = id, exit = ?other, "unhandled vCPU exit");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_is_set_without_touching_other_bits() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT0] = 0x11;
        regs[APIC_LVT0 + 2] = 0x01; // mask bit 16
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        let value = u32::from_le_bytes(std::array::from_fn(|i| regs[APIC_LVT0 + i] as u8));
        assert_eq!(value, 0x1_0711);
    }

    fn no_save(_: &[u32]) -> Result<VcpuState, VcpuError> {
        Err(VcpuError {
            id: 7,
            operation: "save in a test",
            source: kvm_ioctls::Error::new(libc::ENOSYS),
        })
    }

    #[test]
    fn parked_vcpus_answer_save_requests_once_each() {
        let control = Arc::new(VcpuControl::default());
        control.set(RunState::Paused);
        let worker = {
            let control = control.clone();
            std::thread::spawn(move || control.checkpoint(&mut no_save))
        };
        assert!(control.wait_parked(1, Duration::from_secs(5)));
        let answers = control
            .save_parked(1, Arc::from(vec![1u32]), Duration::from_secs(5))
            .expect("the parked vCPU answers");
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].as_ref().unwrap_err().id, 7);
        // A second request gets a second answer; no request, no answer.
        assert_eq!(
            control
                .save_parked(1, Arc::from(vec![]), Duration::from_secs(5))
                .map(|a| a.len()),
            Some(1)
        );
        assert!(control
            .save_parked(2, Arc::from(vec![]), Duration::from_millis(50))
            .is_none());
        control.set(RunState::Running);
        assert!(worker.join().unwrap());
    }

    #[test]
    fn paused_vcpus_park_and_resume() {
        let control = Arc::new(VcpuControl::default());
        control.set(RunState::Paused);
        let worker = {
            let control = control.clone();
            std::thread::spawn(move || control.checkpoint(&mut no_save))
        };
        assert!(control.wait_parked(1, Duration::from_secs(5)));
        control.set(RunState::Running);
        assert!(worker.join().unwrap());
        control.set(RunState::Exiting);
        control.set(RunState::Running);
        assert_eq!(control.desired(), RunState::Exiting, "exiting is final");
        assert!(!control.checkpoint(&mut no_save));
        assert!(!control.wait_parked(1, Duration::from_millis(10)));
    }
}
