//! `vmm demo`: the main job end to end on the standard scenario (S512): builds the guest image
//! if needed, boots it with the data disk, runs the workload, takes a raw full dump, a compact
//! untrimmed and a trimmed snapshot, restores the trimmed one, checks the workload's live data
//! and prints a table of sizes and times (see [`s512`]).
//!
//! Where the host's /dev/kvm cannot boot a stock guest (PVM), it says so in one line and runs
//! itself inside the nested KVM rig (see the `rig` crate), streaming the rig's output; that needs
//! this executable to be statically linked.

mod child;
mod s512;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use rig::{KvmBackend, Payload, RigOptions};

use super::CliResult;

/// Arguments of `vmm demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Boot this kernel instead of the one `vmm image build` makes (needs --initrd and
    /// --data-disk).
    #[arg(long, requires_all = ["initrd", "data_disk"])]
    pub kernel: Option<PathBuf>,
    /// Boot this initramfs instead of the one `vmm image build` makes.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Use this S512 data disk instead of the one `vmm image build` makes.
    #[arg(long, requires = "kernel")]
    pub data_disk: Option<PathBuf>,
    /// Where snapshots, sockets and logs go [default: a new directory under the system's
    /// temporary directory].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Static guest-trimmer for `vmm image build` [default: its own default].
    #[arg(long, value_name = "PATH")]
    pub trimmer: Option<PathBuf>,
    /// Seconds the whole demo may take in the rig.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

/// Runs the demo here (host KVM) or inside the rig (PVM host).
pub fn run(args: DemoArgs) -> CliResult {
    match rig::detect() {
        KvmBackend::HostKvm => run_here(&args),
        KvmBackend::NestedRig { script } => run_in_rig(&args, &script),
        KvmBackend::Unavailable { reason } => bail!("no KVM that can boot a stock guest: {reason}"),
    }
}

/// This executable, for sub-invocations (`vmm image build`, `vmm run`).
fn self_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding this executable's path")
}

/// Kernel, initrd and data disk: from the arguments, or built by `vmm image build --json`.
fn image(args: &DemoArgs) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    if let (Some(k), Some(i), Some(d)) = (&args.kernel, &args.initrd, &args.data_disk) {
        return Ok((k.clone(), i.clone(), d.clone()));
    }
    let exe = self_exe()?;
    let mut cmd = Command::new(&exe);
    cmd.args(["image", "build", "--json"]);
    if let Some(t) = &args.trimmer {
        cmd.arg("--trimmer").arg(t);
    }
    println!("vmm demo: building the guest image (vmm image build)...");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} image build --json", exe.display()))?;
    if !out.status.success() {
        bail!(
            "building the guest image: `vmm image build` failed ({})",
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("parsing `vmm image build --json` output {text:?}"))?;
    let get = |key: &str| {
        v.get(key)
            .and_then(|p| p.as_str())
            .map(PathBuf::from)
            .with_context(|| format!("`vmm image build --json` printed no {key:?}: {v}"))
    };
    Ok((get("kernel")?, get("initrd")?, get("data_disk")?))
}

/// Re-runs `vmm demo` inside the nested KVM rig with this executable and the image as payload.
fn run_in_rig(args: &DemoArgs, script: &Path) -> CliResult {
    let why = if Path::new("/sys/module/kvm_pvm").exists() {
        "is kvm_pvm (PVM), which cannot boot a stock guest"
    } else {
        "cannot boot a stock guest"
    };
    println!(
        "vmm demo: this host's /dev/kvm {why}; re-running inside the nested KVM rig ({})",
        script.display()
    );
    let exe = self_exe()?;
    let is_static = rig::is_static_executable(&exe)
        .with_context(|| format!("checking whether {} is statically linked", exe.display()))?;
    if !is_static {
        bail!(
            "{} is dynamically linked, but the rig's busybox userland needs a static binary; build \
             one with `RUSTFLAGS=\"{}\" cargo build --release --target {} -p vmm -p guest-trimmer` \
             and run target/{}/release/vmm demo (scripts/demo does both)",
            exe.display(),
            rig::STATIC_RUSTFLAGS,
            rig::STATIC_TARGET,
            rig::STATIC_TARGET
        );
    }
    let (kernel, initrd, data_disk) = image(args)?;
    let mut payload = Payload::new().context("creating the rig payload")?;
    payload
        .add_file(&exe, "vmm", 0o755)
        .and_then(|p| p.add_file(&kernel, "vmlinuz", 0o644))
        .and_then(|p| p.add_file(&initrd, "initrd", 0o644))
        .and_then(|p| p.add_file(&data_disk, "data.ext4", 0o444))
        .context("assembling the rig payload")?;
    let command: Vec<String> = [
        "./vmm",
        "demo",
        "--kernel",
        "./vmlinuz",
        "--initrd",
        "./initrd",
        "--data-disk",
        "./data.ext4",
        "--work-dir",
        "/tmp/vmm-demo",
    ]
    .map(String::from)
    .to_vec();
    let opts = RigOptions {
        mem_mib: 3072,
        smp: 1,
        timeout_s: args.timeout,
    };
    // The figures come back on the rig's console as one JSON line.
    let mut results_line = None;
    let outcome = rig::run_in_rig(script, payload.path(), &command, opts, |line| {
        match line.strip_prefix(RESULTS_MARKER) {
            Some(json) => results_line = Some(json.to_string()),
            None => println!("{line}"),
        }
    })
    .context("running the demo in the rig")?;
    if outcome.timed_out {
        bail!("the rig timed out after {} s", opts.timeout_s);
    }
    if let (Some(path), Some(json)) = (&args.results, &results_line) {
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        println!("vmm demo: figures written to {}", path.display());
    }
    Ok(outcome.exit_code)
}

/// Prefix of the line carrying the figures as JSON (read back from the rig's console).
const RESULTS_MARKER: &str = "VMM-DEMO-RESULTS ";

/// Runs the scenario with this host's KVM and prints the table.
fn run_here(args: &DemoArgs) -> CliResult {
    let (kernel, initrd, data_disk) = image(args)?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("vmm-demo-{}", std::process::id())));
    let inputs = s512::Inputs {
        exe: self_exe()?,
        kernel,
        initrd,
        data_disk,
        work,
    };
    let started = Instant::now();
    let results = match s512::run(&inputs) {
        Ok(r) => r,
        Err(err) => {
            // The VMMs' own logs say what went wrong inside; show their ends.
            for log in ["vm.log", "restore.log"] {
                let path = inputs.work.join(log);
                if let Ok(text) = std::fs::read_to_string(&path) {
                    let lines: Vec<&str> = text.lines().collect();
                    println!("vmm demo: last lines of {}:", path.display());
                    for l in &lines[lines.len().saturating_sub(15)..] {
                        println!("  {l}");
                    }
                }
            }
            return Err(err);
        }
    };
    s512::print_table(&results);
    let json = serde_json::to_string(&results)?;
    println!("{RESULTS_MARKER}{json}");
    if let Some(path) = &args.results {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "vmm demo: done in {:.0} s; snapshots and logs in {}",
        started.elapsed().as_secs_f64(),
        inputs.work.display()
    );
    Ok(0)
}
