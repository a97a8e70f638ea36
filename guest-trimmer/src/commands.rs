//! The trimmer's daemon-side subcommands: `daemon` (DAMON monitoring from boot plus the
//! control protocol on a unix socket), `trim` (by hand: send a policy file to the daemon, or
//! run it here), `ctl` (send one raw request), and the hidden `workload` test loads.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use guest_trimmer::control::{Controller, ControllerConfig, DAEMON_ATTRS};
use guest_trimmer::error_chain;
use guest_trimmer::unix_server::{self, UnixError};
use guest_trimmer::workload::{self, WorkloadError};
use policies::Policy;
use serde_json::Value;

/// Where `daemon --unix` listens by default and where `trim` and `ctl` look for it.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/guest-trimmer.sock";

/// Errors of these subcommands.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The policy file is unreadable or invalid.
    #[error("load policy")]
    Policy(#[source] policies::PolicyError),
    /// The daemon could not be reached.
    #[error("talk to the daemon")]
    Unix(#[source] UnixError),
    /// The daemon's reply is not JSON.
    #[error("daemon reply {0:?} is not JSON")]
    Reply(String),
    /// The trim ran but the snapshot should not proceed, or the daemon refused the request.
    #[error("the daemon answered ok={ok}, ready={ready}")]
    NotReady {
        /// The reply's `ok`.
        ok: Value,
        /// The reply's `ready`.
        ready: Value,
    },
    /// The daemon refused the request.
    #[error("the daemon refused the request: {0}")]
    Refused(Value),
    /// A workload failed.
    #[error("workload")]
    Workload(#[source] WorkloadError),
}

/// `guest-trimmer daemon`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Serve the JSON-lines control protocol on this unix socket too.
    #[arg(long, num_args = 0..=1, default_missing_value = DEFAULT_CONTROL_SOCKET)]
    pub unix: Option<PathBuf>,
    /// Serve the same protocol on this vsock port too (the host's control channel, default 52
    /// from /init when a vsock device is present).
    #[arg(long)]
    pub vsock_port: Option<u32>,
    /// DAMON sampling interval.
    #[arg(long, default_value_t = DAEMON_ATTRS.sample_us)]
    pub sample_us: u64,
    /// DAMON aggregation interval (ages advance by one per interval).
    #[arg(long, default_value_t = DAEMON_ATTRS.aggr_us)]
    pub aggr_us: u64,
    /// Fewest DAMON regions.
    #[arg(long, default_value_t = DAEMON_ATTRS.min_nr_regions)]
    pub min_regions: u64,
    /// Most DAMON regions.
    #[arg(long, default_value_t = DAEMON_ATTRS.max_nr_regions)]
    pub max_regions: u64,
    /// Leave the kernel's multi-generational LRU on. By default the daemon switches it off:
    /// under it DAMON does not see reads of cached files, and pageout would take the hot set.
    #[arg(long)]
    pub keep_lru_gen: bool,
}

/// `guest-trimmer trim`.
#[derive(Debug, Args)]
pub struct TrimArgs {
    /// Policy file.
    #[arg(long, conflicts_with = "builtin", required_unless_present = "builtin")]
    pub policy: Option<PathBuf>,
    /// A built-in policy: default, aggressive, runtime-hooks, s512.
    #[arg(long)]
    pub builtin: Option<String>,
    /// The daemon's control socket (used if it exists, unless --local).
    #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
    pub unix: PathBuf,
    /// Run the pipeline in this process (DAMON steps then need a running monitor).
    #[arg(long)]
    pub local: bool,
    /// Print the whole report as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Run at DAMON's idle intervals: drop the policy's `trim_aggregation_ms` and
    /// `trim_sampling_us` (to compare the two in one boot).
    #[arg(long)]
    pub idle_intervals: bool,
}

/// `guest-trimmer ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket.
    #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
    pub unix: PathBuf,
    /// The request, e.g. '{"op":"status"}'.
    pub request: String,
}

/// `guest-trimmer workload ...` (test loads).
#[derive(Debug, Subcommand)]
pub enum WorkloadCmd {
    /// Read every file below DIR once.
    ColdRead {
        /// Directory.
        dir: PathBuf,
    },
    /// Re-read every file below DIR in a loop.
    HotLoop {
        /// Directory.
        dir: PathBuf,
        /// Stop once this file exists.
        #[arg(long)]
        until_file: Option<PathBuf>,
    },
    /// Hold MiB of pseudo-random anonymous data; verify its hash whenever CHECK_FILE appears.
    LiveAnon {
        /// MiB.
        #[arg(long)]
        mib: usize,
        /// Trigger file.
        #[arg(long)]
        check_file: PathBuf,
    },
    /// A runtime holding a heap cache it releases on SIGUSR1 or a `trim` line on SOCKET.
    Runtime {
        /// MiB of cache.
        #[arg(long)]
        mib: usize,
        /// Where to write its pid.
        #[arg(long)]
        pid_file: PathBuf,
        /// Unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Register the socket as a before-snapshot hook in this directory (as a runtime
        /// would, so that every policy's hooks step asks it to release its cache), e.g.
        /// /run/guest-trimmer/hooks.d.
        #[arg(long)]
        register_hook_in: Option<PathBuf>,
    },
    /// Print the page cache residency of the files below DIR (mincore).
    Mincore {
        /// Directory.
        dir: PathBuf,
        /// Label for the output line.
        #[arg(long, default_value = "files")]
        label: String,
    },
}

/// Runs the daemon: starts DAMON monitoring, serves the unix socket if asked, never returns.
pub fn daemon(args: &DaemonArgs, proc_root: &Path, sys_root: &Path) -> ! {
    let attrs = guest_trimmer::damon::MonitoringAttrs {
        sample_us: args.sample_us,
        aggr_us: args.aggr_us,
        min_nr_regions: args.min_regions,
        max_nr_regions: args.max_regions,
        ..DAEMON_ATTRS
    };
    let controller = Arc::new(Controller::start(ControllerConfig {
        proc_root: proc_root.to_path_buf(),
        sys_root: sys_root.to_path_buf(),
        attrs,
        start_monitoring: true,
        keep_lru_gen: args.keep_lru_gen,
    }));
    let handler = controller.handler();
    if let Some(path) = args.unix.clone() {
        let h = handler.clone();
        std::thread::spawn(move || {
            if let Err(e) = unix_server::serve(&path, h) {
                tracing::error!("{}", error_chain(&e));
            }
        });
    }
    if let Some(port) = args.vsock_port {
        let h = handler.clone();
        std::thread::spawn(move || {
            if let Err(e) = guest_trimmer::vsock::serve(port, h) {
                tracing::error!("{}", error_chain(&e));
            }
        });
    }
    println!("GUEST-TRIMMER-DAEMON ready");
    loop {
        std::thread::park();
    }
}

/// Sends a policy to the daemon (or runs it locally) and prints the report.
pub fn trim(args: &TrimArgs, proc_root: &Path, sys_root: &Path) -> Result<(), CommandError> {
    let policy = match (&args.policy, &args.builtin) {
        (Some(path), _) => Policy::load(path),
        (None, Some(name)) => Policy::builtin(name),
        (None, None) => unreachable!("clap requires --policy or --builtin"),
    }
    .map_err(CommandError::Policy)?;
    let policy = if args.idle_intervals {
        Policy {
            trim_aggregation_ms: None,
            trim_sampling_us: None,
            ..policy
        }
    } else {
        policy
    };
    let reply: Value = if !args.local && args.unix.exists() {
        let req = serde_json::json!({"op": "trim", "policy": policy});
        let text =
            unix_server::request(&args.unix, &req.to_string()).map_err(CommandError::Unix)?;
        serde_json::from_str(&text).map_err(|_| CommandError::Reply(text))?
    } else {
        let controller = Controller::start(ControllerConfig {
            proc_root: proc_root.to_path_buf(),
            sys_root: sys_root.to_path_buf(),
            attrs: DAEMON_ATTRS,
            start_monitoring: false,
            keep_lru_gen: true,
        });
        controller.trim(policy)
    };
    if args.json {
        println!("{reply}");
    } else {
        print_trim_summary(&reply);
    }
    if reply["ok"] == true && reply["ready"] == true {
        Ok(())
    } else {
        Err(CommandError::NotReady {
            ok: reply["ok"].clone(),
            ready: reply["ready"].clone(),
        })
    }
}

fn print_trim_summary(reply: &Value) {
    if reply["ok"] != true {
        println!("trim refused: {}", reply["error"]);
        return;
    }
    let r = &reply["report"];
    println!(
        "policy {}: ready {}, {} ms ({} ms trimming), freed {} KiB, used {} -> {} KiB",
        r["policy"],
        reply["ready"],
        r["total_ms"],
        r["trim_ms"],
        r["freed_kib"],
        r["before"]["used_kib"],
        r["after"]["used_kib"]
    );
    for s in r["steps"].as_array().into_iter().flatten() {
        let err = s["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        println!(
            "  {:>2} {:<15} {:<8} {:>6} ms  freed {:>8} KiB{err}",
            s["index"],
            s["kind"].as_str().unwrap_or("?"),
            s["status"].as_str().unwrap_or("?"),
            s["duration_ms"],
            s["freed_kib"]
        );
    }
}

/// Sends one raw request and prints the reply.
pub fn ctl(args: &CtlArgs) -> Result<(), CommandError> {
    let text = unix_server::request(&args.unix, &args.request).map_err(CommandError::Unix)?;
    println!("{text}");
    let v: Value = serde_json::from_str(&text).map_err(|_| CommandError::Reply(text))?;
    if v["ok"] == true {
        Ok(())
    } else {
        Err(CommandError::Refused(v["error"].clone()))
    }
}

/// Runs a test load.
pub fn workload(cmd: &WorkloadCmd) -> Result<(), CommandError> {
    match cmd {
        WorkloadCmd::ColdRead { dir } => workload::cold_read(dir),
        WorkloadCmd::HotLoop { dir, until_file } => workload::hot_loop(dir, until_file.as_deref()),
        WorkloadCmd::LiveAnon { mib, check_file } => workload::live_anon(*mib, check_file),
        WorkloadCmd::Runtime {
            mib,
            pid_file,
            socket,
            register_hook_in,
        } => workload::runtime(*mib, pid_file, socket, register_hook_in.as_deref()),
        WorkloadCmd::Mincore { dir, label } => workload::mincore(dir, label),
    }
    .map_err(CommandError::Workload)
}
