//! `vmm snapshot`: snapshot a running microVM through its API socket (`PUT /snapshot/create`).

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::CliResult;
use crate::api::client;
use crate::snapshot::{AfterSnapshot, SNAPSHOT_TIMEOUT};

/// Arguments of `vmm snapshot`.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// The microVM's API socket.
    #[arg(long)]
    pub api_sock: PathBuf,
    /// The snapshot directory (an existing snapshot there is replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// What the VM does afterwards: resume, pause or stop.
    #[arg(long, value_enum, default_value = "resume")]
    pub after: AfterArg,
    /// Store every page of guest memory (a raw full dump, as Firecracker writes it), to compare
    /// with the compact default.
    #[arg(long)]
    pub raw_memory: bool,
    /// Write a diff layer on this snapshot: the one the VM was restored from or the last one
    /// taken of it (the VM must track dirty pages).
    #[arg(long)]
    pub parent: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--after` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AfterArg {
    /// Run again.
    Resume,
    /// Stay paused.
    Pause,
    /// Stop the VM and its VMM.
    Stop,
}

impl From<AfterArg> for AfterSnapshot {
    fn from(arg: AfterArg) -> Self {
        match arg {
            AfterArg::Resume => AfterSnapshot::Resume,
            AfterArg::Pause => AfterSnapshot::Pause,
            AfterArg::Stop => AfterSnapshot::Stop,
        }
    }
}

/// Sends the request and prints the summary.
pub fn run(args: SnapshotArgs) -> CliResult {
    // The VMM resolves the path relative to its own working directory: send an absolute one.
    let out = std::path::absolute(&args.out)
        .with_context(|| format!("invalid output path {}", args.out.display()))?;
    let body = json!({
        "snapshot_path": out,
        "snapshot_type": "Full",
        "after": AfterSnapshot::from(args.after),
        "raw_memory": args.raw_memory,
        "parent": args.parent.as_deref().map(std::path::absolute).transpose()
            .with_context(|| "invalid parent path")?,
    });
    let response = client::request_with_timeout(
        &args.api_sock,
        "PUT",
        "/snapshot/create",
        Some(&body),
        SNAPSHOT_TIMEOUT,
    )
    .context("snapshot request failed")?;
    if !response.is_success() {
        anyhow::bail!(
            "snapshot failed: {}",
            response.fault_message().unwrap_or("no reason given")
        );
    }
    let summary = response.body.unwrap_or_default();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let field = |name: &str| summary.get(name).cloned().unwrap_or_default();
        println!(
            "snapshot {} written to {}: memory file {} bytes ({} pages kept), state {} bytes, {:.1} ms",
            field("snapshot_id"),
            out.display(),
            field("memory_file_bytes"),
            summary.pointer("/pages/kept").cloned().unwrap_or_default(),
            field("state_bytes"),
            field("write_ms").as_f64().unwrap_or(0.0) + field("save_state_ms").as_f64().unwrap_or(0.0),
        );
    }
    Ok(0)
}
