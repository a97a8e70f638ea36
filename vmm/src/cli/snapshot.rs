//! `vmm snapshot`: snapshot a running microVM through its API socket (`PUT /snapshot/create`).

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use std::time::Duration;

use serde_json::Value;

use super::CliResult;
use crate::api::client;
use crate::pipeline::PipelineRequest;
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
    /// Trim the guest first by this policy (a policy file, or a built-in name: default,
    /// aggressive, runtime-hooks) through its guest-trimmer over vsock, run a free page hinting
    /// pass, then snapshot; prints each step's time and bytes.
    #[arg(long, value_name = "FILE|NAME", conflicts_with = "no_trim")]
    pub policy: Option<String>,
    /// Run the pipeline without the trim (hinting pass and snapshot), to compare with --policy.
    #[arg(long)]
    pub no_trim: bool,
    /// The guest-trimmer's vsock port.
    #[arg(long, default_value_t = crate::pipeline::DEFAULT_TRIMMER_PORT)]
    pub trimmer_port: u32,
    /// Bound on the trimmer's answer [default: twice the policy's budget + 10 s].
    #[arg(long)]
    pub trim_timeout_ms: Option<u64>,
    /// Skip the pipeline's free page hinting pass.
    #[arg(long)]
    pub no_hint: bool,
    /// Bound on the hinting pass of the pipeline.
    #[arg(long, default_value_t = crate::pipeline::DEFAULT_HINT_TIMEOUT_MS)]
    pub hint_timeout_ms: u64,
    /// Write a diff layer on this snapshot: the one the VM was restored from or the last one
    /// taken of it (the VM must track dirty pages).
    #[arg(long)]
    pub parent: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Loads `--policy`: a file if one exists at that path, else a built-in policy by name.
pub fn load_policy(arg: &str) -> anyhow::Result<policies::Policy> {
    let path = std::path::Path::new(arg);
    if path.exists() || !policies::BUILTIN_POLICY_NAMES.contains(&arg) {
        return policies::Policy::load(path)
            .map_err(|e| anyhow::anyhow!(policies::error_chain(&e)));
    }
    policies::Policy::builtin(arg).map_err(|e| anyhow::anyhow!(policies::error_chain(&e)))
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
    let mut body = json!({
        "snapshot_path": out,
        "snapshot_type": "Full",
        "after": AfterSnapshot::from(args.after),
        "raw_memory": args.raw_memory,
        "parent": args.parent.as_deref().map(std::path::absolute).transpose()
            .with_context(|| "invalid parent path")?,
    });
    let pipeline = if args.no_trim || args.policy.is_some() {
        let policy = match &args.policy {
            Some(arg) => Some(serde_json::to_value(load_policy(arg)?)?),
            None => None,
        };
        let mut pipeline = PipelineRequest::new(policy);
        pipeline.trimmer_port = args.trimmer_port;
        pipeline.hint_timeout_ms = args.hint_timeout_ms;
        pipeline.trim_timeout_ms = args.trim_timeout_ms;
        pipeline.hint = !args.no_hint;
        body["pipeline"] = serde_json::to_value(&pipeline)?;
        Some(pipeline)
    } else {
        None
    };
    // The pipeline's own bounds come on top of the snapshot's.
    let timeout = SNAPSHOT_TIMEOUT
        + pipeline
            .as_ref()
            .map_or(Duration::ZERO, PipelineRequest::max_duration);
    let response = client::request_with_timeout(
        &args.api_sock,
        "PUT",
        "/snapshot/create",
        Some(&body),
        timeout,
    )
    .context("snapshot request failed")?;
    if !response.is_success() {
        anyhow::bail!(
            "snapshot failed: {}",
            response.fault_message().unwrap_or("no reason given")
        );
    }
    let body = response.body.unwrap_or_default();
    if args.json {
        println!("{}", serde_json::to_string(&body)?);
        return Ok(0);
    }
    let summary = match pipeline {
        Some(_) => {
            print_pipeline(&body);
            body.get("snapshot").cloned().unwrap_or_default()
        }
        None => body,
    };
    {
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

/// Prints the pipeline's steps, one line each, and its warnings.
fn print_pipeline(body: &Value) {
    for step in body
        .get("steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let detail = &step["detail"];
        let extra = match step["step"].as_str() {
            Some("trim") if detail.get("freed_kib").is_some() => format!(
                "policy {}, freed {:.1} MiB",
                detail["policy"],
                detail["freed_kib"].as_f64().unwrap_or(0.0) / 1024.0
            ),
            Some("hint") if detail.get("pages_hinted").is_some() => {
                format!("{} pages hinted", detail["pages_hinted"])
            }
            Some("snapshot") => format!("{} bytes of memory file", detail["memory_file_bytes"]),
            _ => detail
                .get("reason")
                .or(detail.get("error"))
                .map(|r| r.to_string())
                .unwrap_or_default(),
        };
        println!(
            "  {:<9} {:<8} {:>9.1} ms  {extra}",
            step["step"].as_str().unwrap_or("?"),
            step["status"].as_str().unwrap_or("?"),
            step["duration_ms"].as_f64().unwrap_or(0.0)
        );
    }
    for w in body
        .get("warnings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!("  warning: {}", w.as_str().unwrap_or_default());
    }
}
