//! `vmm run`: boot a microVM and serve it until the guest powers off or the VMM is stopped.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};
use serde_json::json;

use super::CliResult;
use crate::api::ApiServer;
use crate::config::{BootSource, MachineConfig, SerialConfig, SerialOutput, VmConfig};
use crate::metrics::{mark_process_start, BootTimeline};
use crate::vm::Vm;

/// Arguments of `vmm run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The guest kernel (bzImage). Default: the image built by `vmm image build`.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The initramfs. Default: the image built by `vmm image build` (when --kernel is not given).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel parameters appended to the VMM's defaults (e.g. `vmm_run="uname -a"`).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// Number of vCPUs.
    #[arg(long)]
    pub vcpus: Option<u8>,
    /// Log dirty pages so diff layers can be written (`vmm snapshot --parent`).
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// Serve the control API on this unix socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Where the serial console goes: `stdout` or a file.
    #[arg(long)]
    pub serial: Option<String>,
    /// Add a virtio-balloon: comma-separated `key=value` pairs, e.g.
    /// `amount_mib=0,deflate_on_oom=true,stats_polling_interval_s=1,free_page_reporting=true,free_page_hinting=true`
    /// (missing keys: 0 / false).
    #[arg(long, value_parser = super::balloon::parse_balloon_spec)]
    pub balloon: Option<balloon::BalloonConfig>,
    /// Add a virtio-blk drive over a raw image: `PATH[,ro][,id=NAME]`; repeat for more
    /// (guest order /dev/vda, /dev/vdb...; appended after the config file's drives).
    #[arg(long = "disk", value_parser = super::drive::parse_disk_spec)]
    pub disks: Vec<block::DriveConfig>,
    /// virtio-vsock (`--vsock-uds`, `--vsock-cid`).
    #[command(flatten)]
    pub vsock: super::vsock::VsockRunArgs,
    /// A JSON VM configuration (Firecracker's shape); flags given too override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Write boot timings and the exit reason as JSON to this file when the VM ends.
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,
    /// Do not install the per-thread seccomp filters (debugging only; logs a warning).
    #[arg(long)]
    pub no_seccomp: bool,
}

/// Merges the config file (if any) with the flags.
fn resolve_config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    let mut config = match &args.config {
        Some(path) => VmConfig::load(path)?,
        None => {
            let (kernel, initrd) = match &args.kernel {
                Some(kernel) => (kernel.clone(), args.initrd.clone()),
                None => {
                    let image = default_image()?;
                    (image.0, args.initrd.clone().or(Some(image.1)))
                }
            };
            VmConfig {
                boot_source: BootSource {
                    kernel_image_path: kernel,
                    initrd_path: initrd,
                    boot_args: None,
                },
                machine_config: MachineConfig::default(),
                serial: SerialConfig::default(),
                balloon: None,
                drives: Vec::new(),
                vsock: None,
                seccomp: true,
            }
        }
    };
    if args.config.is_some() {
        if let Some(kernel) = &args.kernel {
            config.boot_source.kernel_image_path = kernel.clone();
        }
        if let Some(initrd) = &args.initrd {
            config.boot_source.initrd_path = Some(initrd.clone());
        }
    }
    if let Some(cmdline) = &args.cmdline {
        config.boot_source.boot_args = Some(match config.boot_source.boot_args.take() {
            Some(existing) => format!("{existing} {cmdline}"),
            None => cmdline.clone(),
        });
    }
    if let Some(mem_mib) = args.mem_mib {
        config.machine_config.mem_size_mib = mem_mib;
    }
    if let Some(vcpus) = args.vcpus {
        config.machine_config.vcpu_count = vcpus;
    }
    if args.track_dirty_pages {
        config.machine_config.track_dirty_pages = true;
    }
    if let Some(serial) = &args.serial {
        config.serial.output = SerialOutput::parse(serial);
    }
    if let Some(balloon) = &args.balloon {
        config.balloon = Some(balloon.clone());
    }
    let first_flag_drive = config.drives.len();
    config.drives.extend(args.disks.iter().cloned());
    super::drive::name_drives(&mut config.drives[first_flag_drive..]);
    super::vsock::apply_run_args(&args.vsock, &mut config);
    config.validate()?;
    if !config.boot_source.kernel_image_path.is_file() {
        anyhow::bail!(
            "kernel {} does not exist or is not a file",
            config.boot_source.kernel_image_path.display()
        );
    }
    if let Some(initrd) = config
        .boot_source
        .initrd_path
        .as_deref()
        .filter(|p| !p.is_file())
    {
        anyhow::bail!(
            "initrd {} does not exist or is not a file",
            initrd.display()
        );
    }
    Ok(config)
}

/// Whether to forward our stdin to the guest console: not when stdin is a terminal we do not
/// own (a background job reading it would be stopped by SIGTTIN).
fn should_forward_stdin() -> bool {
    // SAFETY: isatty, tcgetpgrp and getpgrp only read process state.
    unsafe { libc::isatty(0) == 0 || libc::tcgetpgrp(0) == libc::getpgrp() }
}

/// The termination signals the VMM turns into a clean stop.
pub(crate) fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    set
}

/// Boots the VM and serves it; returns the exit code.
pub fn run(args: RunArgs) -> CliResult {
    let start = mark_process_start();
    let config = resolve_config(&args)?;
    if crate::kvm::is_pvm_host() {
        tracing::warn!("this host's /dev/kvm is kvm_pvm, which cannot boot a stock distribution kernel; use a host with hardware KVM (or the nested rig)");
    }

    // Block termination signals before any thread exists so that every thread inherits the
    // mask and only the signal thread below receives them.
    let signals = termination_signals();
    signals
        .thread_block()
        .context("cannot block termination signals")?;

    // Bind the API socket before booting, so a socket already in use fails fast.
    let api_server = args.api_sock.as_deref().map(ApiServer::bind).transpose()?;
    let timeline = Arc::new(BootTimeline::new(start));
    crate::seccomp::set_enabled(config.seccomp && !args.no_seccomp)?;
    let vm = Vm::boot(config, timeline)?;
    serve(vm, api_server, signals, args.metrics_file.as_deref())
}

/// Serves a booted or restored VM until it ends: the API (if bound), termination signals
/// (`signals`, blocked in every thread), stdin to the console; writes the metrics file.
pub(crate) fn serve(
    vm: Vm,
    api_server: Option<ApiServer>,
    signals: SigSet,
    metrics_file: Option<&std::path::Path>,
) -> CliResult {
    let handle = vm.handle();
    let api_server = match api_server {
        Some(server) => Some(server.spawn(Arc::new(handle.clone()))?),
        None => None,
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Helper);
            while let Ok(signal) = signals.wait() {
                tracing::info!(signal = %signal, "stopping on signal");
                handle.signal(signal as i32);
            }
        })
        .context("cannot start the signal thread")?;
    if should_forward_stdin() {
        vm.forward_stdin();
    }

    let timeline_probe = vm.timings_source();
    crate::seccomp::install(crate::seccomp::ThreadKind::Main)?;
    let reason = vm.run();
    drop(api_server);
    if let Some(path) = metrics_file {
        let timings = timeline_probe.timings();
        let report = json!({
            "setup_ms": timings.setup_ms,
            "first_console_ms": timings.first_console_ms,
            "ready_ms": timings.ready_ms,
            "phases": timings.phases,
            "exit_reason": reason.name(),
            "exit_code": reason.exit_code(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write metrics file {}", path.display()))?;
    }
    if let crate::vm::ExitReason::VcpuFailed(error) = &reason {
        anyhow::bail!("the microVM failed: {error}");
    }
    Ok(reason.exit_code())
}

/// The kernel and initramfs of the image `vmm image build` made in the default cache.
fn default_image() -> anyhow::Result<(PathBuf, PathBuf)> {
    let cache_dir = guest_image::default_cache_dir();
    let image = guest_image::locate(&cache_dir).with_context(|| {
        format!(
            "no --kernel given and no guest image in {}: run `vmm image build` first, \
             or pass --kernel BZIMAGE --initrd INITRAMFS",
            cache_dir.display()
        )
    })?;
    Ok((image.kernel, image.initrd))
}
