//! `vmm trimmer ...`: talk to a running guest's guest-trimmer over vsock from the host.
//!
//! - `vmm trimmer trim --uds PATH --policy FILE|NAME [--json]`: send a policy, trim, print the
//!   report (each step's time and bytes freed);
//! - `vmm trimmer status|stats|after-restore --uds PATH`: the other requests of its protocol.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use super::CliResult;
use crate::pipeline::{TrimmerClient, DEFAULT_TRIMMER_PORT};

/// Where the trimmer is.
#[derive(clap::Args, Debug)]
pub struct TrimmerTarget {
    /// The VM's vsock unix socket (`--vsock-uds` of `vmm run`).
    #[arg(long)]
    pub uds: PathBuf,
    /// The guest-trimmer's vsock port.
    #[arg(long, default_value_t = DEFAULT_TRIMMER_PORT)]
    pub port: u32,
    /// Bound on the answer [default: the policy's budget + 10 s for `trim`, 60 s otherwise].
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Print the guest's JSON reply as it came.
    #[arg(long)]
    pub json: bool,
}

impl TrimmerTarget {
    fn timeout_or_default(&self) -> Duration {
        self.timeout_ms
            .map_or(DEFAULT_TIMEOUT, Duration::from_millis)
    }
}

/// `vmm trimmer` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum TrimmerCommand {
    /// Trim the guest by a policy (a file, or a built-in name: default, aggressive,
    /// runtime-hooks).
    Trim {
        /// Where the trimmer is.
        #[command(flatten)]
        target: TrimmerTarget,
        /// The policy.
        #[arg(long, value_name = "FILE|NAME")]
        policy: String,
    },
    /// The daemon's state: DAMON monitoring, the last trim.
    Status(TrimmerTarget),
    /// Memory figures, DAMON's view of idle memory, the daemon's own CPU and memory use.
    Stats(TrimmerTarget),
    /// Run the after-restore hooks of the last trim's policy.
    AfterRestore(TrimmerTarget),
}

/// Default bound for requests other than `trim`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a `vmm trimmer` subcommand.
pub fn run(cmd: TrimmerCommand) -> CliResult {
    let (target, request, timeout) = match &cmd {
        TrimmerCommand::Trim { target, policy } => {
            let policy = super::snapshot::load_policy(policy)?;
            let timeout = target.timeout_ms.map_or_else(
                || crate::pipeline::PipelineRequest::new(None).trim_timeout(&policy),
                Duration::from_millis,
            );
            (target, json!({"op": "trim", "policy": policy}), timeout)
        }
        TrimmerCommand::Status(t) => (t, json!({"op": "status"}), t.timeout_or_default()),
        TrimmerCommand::Stats(t) => (t, json!({"op": "stats"}), t.timeout_or_default()),
        TrimmerCommand::AfterRestore(t) => {
            (t, json!({"op": "after_restore"}), t.timeout_or_default())
        }
    };
    let client = TrimmerClient::new(&target.uds, target.port);
    let reply = client
        .request(&request, timeout)
        .with_context(|| format!("guest-trimmer request via {}", target.uds.display()))?;
    if target.json || !matches!(cmd, TrimmerCommand::Trim { .. }) {
        println!("{reply}");
    } else {
        print_trim_report(&reply);
    }
    Ok(0)
}

/// One line per step, then the totals.
fn print_trim_report(reply: &Value) {
    let report = &reply["report"];
    for step in report["steps"].as_array().into_iter().flatten() {
        println!(
            "  {:<15} {:<8} {:>7} ms  freed {:>8.1} MiB{}",
            step["kind"].as_str().unwrap_or("?"),
            step["status"].as_str().unwrap_or("?"),
            step["duration_ms"],
            step["freed_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            step.get("error")
                .and_then(Value::as_str)
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    println!(
        "policy {}: freed {:.1} MiB in {} ms (trim steps {} ms); ready: {}",
        report["policy"],
        report["freed_kib"].as_f64().unwrap_or(0.0) / 1024.0,
        report["total_ms"],
        report["trim_ms"],
        reply["ready"]
    );
}
