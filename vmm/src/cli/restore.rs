//! `vmm restore`: a new VMM process recreating a microVM from a snapshot directory and serving
//! it like `vmm run` does.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use super::CliResult;
use crate::api::ApiServer;
use crate::config::SerialOutput;
use crate::metrics::{mark_process_start, BootTimeline};
use crate::snapshot::restore::RestoreOptions;
use crate::vm::Vm;

/// Arguments of `vmm restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot directory (written by `vmm snapshot`).
    #[arg(long)]
    pub snapshot: PathBuf,
    /// Serve the control API on this unix socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Where the serial console goes: `stdout` (default) or a file.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// Do not check the memory chunks' checksums (the state file is always checked).
    #[arg(long)]
    pub skip_memory_verify: bool,
    /// Log dirty pages so diff layers can be written on this snapshot (`vmm snapshot --parent`).
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// Write timings and the exit reason as JSON to this file when the VM ends.
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,
}

/// Restores the VM and serves it; returns the exit code.
pub fn run(args: RestoreArgs) -> CliResult {
    let start = mark_process_start();
    let signals = super::run::termination_signals();
    signals
        .thread_block()
        .context("cannot block termination signals")?;
    let api_server = args.api_sock.as_deref().map(ApiServer::bind).transpose()?;
    let timeline = Arc::new(BootTimeline::new(start));
    let options = RestoreOptions {
        serial: Some(SerialOutput::parse(&args.serial)),
        skip_memory_verify: args.skip_memory_verify,
        track_dirty_pages: args.track_dirty_pages,
    };
    let vm = Vm::restore(&args.snapshot, &options, timeline)
        .with_context(|| format!("cannot restore {}", args.snapshot.display()))?;
    super::run::serve(vm, api_server, signals, args.metrics_file.as_deref())
}
