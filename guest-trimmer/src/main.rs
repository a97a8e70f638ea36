//! `guest-trimmer` command line. Runs inside the guest (statically linked into the initramfs);
//! logs go to stderr, results to stdout.

mod alloc;
mod commands;
mod disk_bench;
mod hostile;
mod vsock_tool;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use guest_trimmer::damon::{DamonError, DamonSysfs, MonitoringAttrs};
use guest_trimmer::error_chain;
use guest_trimmer::meminfo::{ProcFs, DEFAULT_PROC_ROOT};
use guest_trimmer::sysinfo::{SysInfo, DEFAULT_SYS_ROOT};
use serde::Serialize;
use tracing::level_filters::LevelFilter;

/// In-guest daemon that frees memory before a snapshot.
#[derive(Debug, Parser)]
#[command(name = "guest-trimmer", version)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options of every subcommand.
#[derive(Debug, Args)]
struct GlobalArgs {
    /// Log level on stderr: off, error, warn, info, debug, trace.
    #[arg(long, global = true, env = "GUEST_TRIMMER_LOG", default_value = "info")]
    log_level: LevelFilter,
    /// Where procfs is mounted (a fake tree in tests).
    #[arg(long, global = true, default_value = DEFAULT_PROC_ROOT)]
    proc_root: PathBuf,
    /// Where sysfs is mounted (a fake tree in tests).
    #[arg(long, global = true, default_value = DEFAULT_SYS_ROOT)]
    sys_root: PathBuf,
}

impl GlobalArgs {
    /// The DAMON admin directory below the sysfs root.
    fn damon_root(&self) -> PathBuf {
        self.sys_root.join("kernel/mm/damon/admin")
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print online CPUs, total memory, kernel release and uptime.
    Sysinfo(JsonArg),
    /// Print the /proc/meminfo and /proc/vmstat figures the trimmer uses.
    Meminfo(JsonArg),
    /// Print whether DAMON's sysfs interface is present and how it is configured.
    DamonStatus(DamonStatusArgs),
    /// Configure and start (or stop) DAMON monitoring of all physical memory.
    DamonMonitor(DamonMonitorArgs),
    /// Allocate and write N MiB of anonymous memory, hold it, then free it (a test load).
    Alloc(alloc::AllocArgs),
    /// Sequential and 4 KiB random O_DIRECT read speed of a block device (a benchmark tool).
    #[command(hide = true)]
    DiskBench(disk_bench::DiskBenchArgs),
    /// Serve the JSON-lines control endpoint on vsock (answers `{"op":"ping"}`).
    Serve(vsock_tool::ServeArgs),
    /// vsock test peers: sink, source, connect.
    #[command(subcommand)]
    Vsock(vsock_tool::VsockCommand),
    /// Run the trim daemon: DAMON monitoring from now on, control requests on a unix socket.
    Daemon(commands::DaemonArgs),
    /// Trim now by a policy (through the daemon if it runs, else here) and print the report.
    Trim(commands::TrimArgs),
    /// Send one JSON request line to the daemon and print its reply.
    Ctl(commands::CtlArgs),
    /// A misbehaving virtio driver flooding a device with garbage (hardening tests).
    #[command(hide = true)]
    Hostile(hostile::HostileArgs),
    /// Test loads for the trim scenarios.
    #[command(subcommand, hide = true)]
    Workload(commands::WorkloadCmd),
    /// Time fixed CPU loops (prints `CPU-CALIBRATE {json}`): the trim benchmark runs them in
    /// the guest and on the host to scale CPU time between the two.
    #[command(hide = true)]
    CpuCalibrate,
}

#[derive(Debug, Args)]
struct JsonArg {
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DamonStatusArgs {
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// If no DAMON context exists, create one briefly to learn the supported operations
    /// (writes to DAMON sysfs).
    #[arg(long)]
    probe: bool,
}

#[derive(Debug, Args)]
struct DamonMonitorArgs {
    #[command(subcommand)]
    action: MonitorAction,
}

#[derive(Debug, Subcommand)]
enum MonitorAction {
    /// Monitor all System RAM with the paddr operations and start kdamond 0.
    Start {
        /// Sampling interval.
        #[arg(long, default_value_t = MonitoringAttrs::default().sample_us)]
        sample_us: u64,
        /// Aggregation interval.
        #[arg(long, default_value_t = MonitoringAttrs::default().aggr_us)]
        aggr_us: u64,
        /// Target update interval.
        #[arg(long, default_value_t = MonitoringAttrs::default().update_us)]
        update_us: u64,
        /// Fewest monitoring regions.
        #[arg(long, default_value_t = MonitoringAttrs::default().min_nr_regions)]
        min_regions: u64,
        /// Most monitoring regions.
        #[arg(long, default_value_t = MonitoringAttrs::default().max_nr_regions)]
        max_regions: u64,
    },
    /// Stop kdamond 0.
    Stop,
}

/// Errors of the command line itself, each naming the subcommand's operation.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("sysinfo")]
    SysInfo(#[source] guest_trimmer::sysinfo::SysInfoError),
    #[error("meminfo")]
    MemInfo(#[source] guest_trimmer::meminfo::MemInfoError),
    #[error("damon-status")]
    DamonStatus(#[source] DamonError),
    #[error("damon-monitor")]
    DamonMonitor(#[source] DamonError),
    #[error("serialize output")]
    Json(#[source] serde_json::Error),
    #[error("alloc")]
    Alloc(#[source] alloc::AllocError),
    #[error("disk-bench")]
    DiskBench(#[source] disk_bench::DiskBenchError),
    #[error("vsock")]
    Vsock(#[source] vsock_tool::VsockToolError),
    #[error("trim")]
    Trim(#[source] commands::CommandError),
    #[error("ctl")]
    Ctl(#[source] commands::CommandError),
    #[error("hostile")]
    Hostile(#[source] hostile::HostileError),
    #[error("workload")]
    Workload(#[source] commands::CommandError),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.global.log_level)
        .with_target(false)
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("guest-trimmer: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), CliError> {
    let g = &cli.global;
    match &cli.command {
        Command::Sysinfo(args) => {
            let info = SysInfo::read(&g.proc_root, &g.sys_root).map_err(CliError::SysInfo)?;
            if args.json {
                print_json(&info)
            } else {
                println!("cpus: {}", info.cpus);
                println!("mem_total_kib: {}", info.mem_total_kib);
                println!("kernel_release: {}", info.kernel_release);
                println!("uptime_ms: {}", info.uptime_ms);
                Ok(())
            }
        }
        Command::Meminfo(args) => {
            let snap = ProcFs::new(&g.proc_root)
                .snapshot()
                .map_err(CliError::MemInfo)?;
            if args.json {
                print_json(&snap)
            } else {
                print_key_values(&snap)
            }
        }
        Command::DamonStatus(args) => damon_status(&g.damon_root(), args),
        Command::Alloc(args) => alloc::run(args).map_err(CliError::Alloc),
        Command::DiskBench(args) => disk_bench::run(args).map_err(CliError::DiskBench),
        Command::Serve(args) => vsock_tool::run_serve(args).map_err(CliError::Vsock),
        Command::Vsock(cmd) => vsock_tool::run(cmd).map_err(CliError::Vsock),
        Command::Daemon(args) => commands::daemon(args, &g.proc_root, &g.sys_root),
        Command::Trim(args) => {
            commands::trim(args, &g.proc_root, &g.sys_root).map_err(CliError::Trim)
        }
        Command::Ctl(args) => commands::ctl(args).map_err(CliError::Ctl),
        Command::Hostile(args) => hostile::run(args).map_err(CliError::Hostile),
        Command::Workload(cmd) => commands::workload(cmd).map_err(CliError::Workload),
        Command::CpuCalibrate => {
            let c = guest_trimmer::calibrate::run(Default::default());
            let text = serde_json::to_string(&c).map_err(CliError::Json)?;
            println!("CPU-CALIBRATE {text}");
            Ok(())
        }
        Command::DamonMonitor(args) => {
            let damon = DamonSysfs::detect(g.damon_root())
                .map_err(CliError::DamonMonitor)?
                .with_iomem_path(g.proc_root.join("iomem"));
            match args.action {
                MonitorAction::Start {
                    sample_us,
                    aggr_us,
                    update_us,
                    min_regions,
                    max_regions,
                } => {
                    damon
                        .setup_paddr_monitor(
                            sample_us,
                            aggr_us,
                            update_us,
                            min_regions,
                            max_regions,
                        )
                        .and_then(|()| damon.start())
                        .map_err(CliError::DamonMonitor)?;
                    println!("kdamond 0: on");
                }
                MonitorAction::Stop => {
                    damon.stop().map_err(CliError::DamonMonitor)?;
                    println!("kdamond 0: off");
                }
            }
            Ok(())
        }
    }
}

/// `damon-status` output when the interface is absent.
#[derive(Serialize)]
struct DamonAbsent {
    present: bool,
    root: PathBuf,
    reason: String,
}

/// `damon-status` output when the interface is present.
#[derive(Serialize)]
struct DamonPresent<'a> {
    present: bool,
    #[serde(flatten)]
    status: &'a guest_trimmer::damon::DamonStatus,
    /// Supported operations, if known.
    avail_operations: Option<Vec<String>>,
}

fn damon_status(root: &Path, args: &DamonStatusArgs) -> Result<(), CliError> {
    let damon = match DamonSysfs::detect(root) {
        Ok(damon) => damon,
        Err(err @ DamonError::Absent { .. }) => {
            // Absence is an answer, not a failure of this command.
            let reason = error_chain(&err);
            if args.json {
                return print_json(&DamonAbsent {
                    present: false,
                    root: root.to_path_buf(),
                    reason,
                });
            }
            println!("DAMON sysfs: absent ({reason})");
            return Ok(());
        }
        Err(err) => return Err(CliError::DamonStatus(err)),
    };
    let avail = if args.probe {
        Some(damon.probe_operations().map_err(CliError::DamonStatus)?)
    } else {
        None
    };
    let status = damon.status().map_err(CliError::DamonStatus)?;
    let avail_operations = avail.or_else(|| status.avail_operations().map(<[String]>::to_vec));
    if args.json {
        return print_json(&DamonPresent {
            present: true,
            status: &status,
            avail_operations,
        });
    }
    println!("DAMON sysfs: present at {}", status.root.display());
    match &avail_operations {
        Some(ops) => println!("operations: {}", ops.join(" ")),
        None => println!("operations: unknown (no context yet; --probe creates one)"),
    }
    println!("kdamonds: {}", status.nr_kdamonds);
    for k in &status.kdamonds {
        let pid = k.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
        println!("kdamond {}: state {}, pid {pid}", k.index, k.state);
        for c in &k.contexts {
            let a = &c.monitoring_attrs;
            println!(
                "  context {}: operations {}, sample_us {}, aggr_us {}, update_us {}, \
                 regions {}..{}, targets {}, schemes {}",
                c.index,
                c.operations,
                a.sample_us,
                a.aggr_us,
                a.update_us,
                a.min_nr_regions,
                a.max_nr_regions,
                c.nr_targets,
                c.nr_schemes
            );
        }
    }
    Ok(())
}

fn print_json(value: &impl Serialize) -> Result<(), CliError> {
    println!("{}", serde_json::to_string(value).map_err(CliError::Json)?);
    Ok(())
}

/// Prints a struct of structs as `section.field: value` lines (absent values as `-`).
fn print_key_values(value: &impl Serialize) -> Result<(), CliError> {
    let json = serde_json::to_value(value).map_err(CliError::Json)?;
    if let serde_json::Value::Object(sections) = json {
        for (section, fields) in sections {
            if let serde_json::Value::Object(fields) = fields {
                for (name, v) in fields {
                    let v = if v.is_null() {
                        "-".to_string()
                    } else {
                        v.to_string()
                    };
                    println!("{section}.{name}: {v}");
                }
            }
        }
    }
    Ok(())
}
