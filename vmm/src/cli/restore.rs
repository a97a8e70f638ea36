//! `vmm restore`: a new VMM process recreating a microVM from a snapshot directory and serving
//! it like `vmm run` does.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use super::CliResult;
use crate::api::ApiServer;
use crate::config::SerialOutput;
use crate::metrics::{mark_process_start, BootTimeline};
use crate::snapshot::lazy::LazyMode;
use crate::snapshot::restore::RestoreOptions;
use crate::snapshot::working_set::WorkingSetMode;
use crate::vm::Vm;

/// How memory is restored unless asked otherwise. The defaults are shared by the clap
/// definitions below and `main.rs`'s plain parser of `vmm restore`.
pub const DEFAULT_LAZY: LazyMode = LazyMode::Off;
/// Where the console goes by default.
pub const DEFAULT_SERIAL: &str = "stdout";
/// When the working set comes in by default.
pub const DEFAULT_WORKING_SET: WorkingSetMode = WorkingSetMode::BeforeStart;

/// Arguments of `vmm restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot directory (written by `vmm snapshot`).
    #[arg(long)]
    pub snapshot: PathBuf,
    /// Serve the control API on this unix socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// How guest memory is restored: `off` maps the memory file (private, copy-on-write);
    /// `uffd` fills each page on first touch with a userfaultfd handler.
    #[arg(long, value_enum, default_value_t = DEFAULT_LAZY)]
    pub lazy: LazyMode,
    /// Log dirty pages so diff layers can be written on this snapshot (`vmm snapshot --parent`).
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// What every restored VM takes (shared with `vmm serve`).
    #[command(flatten)]
    pub vm: RestoredVmArgs,
}

/// Options of a restored VM, the same for `vmm restore` and `vmm serve`'s loads.
#[derive(clap::Args, Debug)]
pub struct RestoredVmArgs {
    /// Where the serial console goes: `stdout` (default) or a file.
    #[arg(long, default_value = DEFAULT_SERIAL)]
    pub serial: String,
    /// Do not check the memory chunks' checksums (the state file is always checked).
    #[arg(long)]
    pub skip_memory_verify: bool,
    /// Check every memory chunk even when this host wrote or verified the memory file before
    /// (by default a file is checked once per host and version: see `snapshot/verified.rs`).
    #[arg(long, conflicts_with = "skip_memory_verify")]
    pub reverify: bool,
    /// Populate the mapped guest memory from the memory file in the background: a thread maps
    /// every kept page read-only right away, so the clone's first touches take no host page
    /// fault. Off by default: it needs a spare CPU, and the clone's RSS then counts every kept
    /// page (see `snapshot/prefault.rs` for what it measured).
    #[arg(long)]
    pub prefault: bool,
    /// When to bring in the snapshot's recorded working set (`working-set.json`, see
    /// `snapshot/working_set.rs`): `before-start` maps those pages and builds KVM's page tables
    /// for them before the vCPUs run (later start, fewer faults after); `background` maps them
    /// from a thread while the vCPUs already run; `off` leaves them.
    #[arg(long, value_enum, default_value_t = DEFAULT_WORKING_SET)]
    pub working_set: WorkingSetMode,
    /// Record the guest pages this clone touches in its first MS milliseconds into the
    /// snapshot's `working-set.json`, for later restores to bring in.
    #[arg(long, value_name = "MS", conflicts_with = "prefault")]
    pub record_working_set_ms: Option<u64>,
    /// Write timings and the exit reason as JSON to this file when the VM ends.
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,
    /// Do not tell the guest-trimmer (over vsock) that the guest was restored; by default it
    /// is told, so the policy's after-restore hooks run in the clone.
    #[arg(long)]
    pub no_after_restore: bool,
    /// The guest-trimmer's vsock port.
    #[arg(long, default_value_t = crate::pipeline::DEFAULT_TRIMMER_PORT)]
    pub trimmer_port: u32,
    /// Do not install the per-thread seccomp filters (debugging only; logs a warning).
    #[arg(long)]
    pub no_seccomp: bool,
}

impl RestoredVmArgs {
    /// The restore options for memory mode `lazy`.
    pub fn restore_options(
        &self,
        lazy: LazyMode,
        track_dirty_pages: bool,
        start_paused: bool,
    ) -> RestoreOptions {
        RestoreOptions {
            serial: Some(SerialOutput::parse(&self.serial)),
            skip_memory_verify: self.skip_memory_verify,
            reverify: self.reverify,
            lazy,
            track_dirty_pages,
            start_paused,
            prefault: self.prefault,
            working_set: self.working_set,
            record_working_set_ms: self.record_working_set_ms,
        }
    }

    /// Tells the guest-trimmer in the background that `vm` was restored (unless turned off).
    pub fn notify_trimmer(&self, vm: &Vm) {
        if let Some(uds) = vm.vsock_uds_path().filter(|_| !self.no_after_restore) {
            crate::pipeline::after_restore::notify_in_background(
                uds,
                self.trimmer_port,
                vm.timings_source(),
            );
        }
    }
}

/// Restores the VM and serves it; returns the exit code.
pub fn run(args: RestoreArgs) -> CliResult {
    let timeline = Arc::new(BootTimeline::new(mark_process_start()));
    // What comes before the restore proper is timed too: in the nested rig it was a third of
    // process start → vCPUs running.
    timeline.mark_phase("cli_ms");
    let signals = super::run::termination_signals();
    signals
        .thread_block()
        .context("cannot block termination signals")?;
    let api_server = args.api_sock.as_deref().map(ApiServer::bind).transpose()?;
    timeline.mark_phase("api_socket_ms");
    crate::seccomp::set_enabled(!args.vm.no_seccomp)?;
    timeline.mark_phase("seccomp_setup_ms");
    let options = args
        .vm
        .restore_options(args.lazy, args.track_dirty_pages, false);
    let vm = Vm::restore(&args.snapshot, &options, timeline)
        .with_context(|| format!("cannot restore {}", args.snapshot.display()))?;
    args.vm.notify_trimmer(&vm);
    super::run::serve(vm, api_server, signals, args.vm.metrics_file.as_deref())
}
