//! `vmm demo`: the main job end to end. Builds the guest image if needed, boots it (512 MiB,
//! 2 vCPUs) with a `vmm_run` command that prints system information and powers off, then
//! prints the boot timings and how the VM ended.
//!
//! Where the host's /dev/kvm cannot boot a stock guest (PVM), it says so in one line and runs
//! itself inside the nested KVM rig (see the `rig` crate), streaming the rig's output; that needs
//! this executable to be statically linked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rig::{KvmBackend, Payload, RigOptions};

use super::CliResult;

/// The command the guest runs after boot (its output is the demo's "sysinfo").
const DEMO_RUN: &str = "vmm_run=\"uname -sr; nproc; free -m; cat /proc/cmdline\"";

/// Arguments of `vmm demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem_mib: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Boot this kernel instead of the one `vmm image build` makes (needs --initrd).
    #[arg(long, requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// Boot this initramfs instead of the one `vmm image build` makes (needs --kernel).
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Static guest-trimmer for `vmm image build` [default: its own default].
    #[arg(long, value_name = "PATH")]
    pub trimmer: Option<PathBuf>,
    /// Seconds the guest may take from start to power-off.
    #[arg(long, default_value_t = 300)]
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

/// Kernel and initrd: from the arguments, or built by `vmm image build --json`.
fn image(args: &DemoArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    if let (Some(k), Some(i)) = (&args.kernel, &args.initrd) {
        return Ok((k.clone(), i.clone()));
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
    Ok((get("kernel")?, get("initrd")?))
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
    let (kernel, initrd) = image(args)?;
    let mut payload = Payload::new().context("creating the rig payload")?;
    payload
        .add_file(&exe, "vmm", 0o755)
        .and_then(|p| p.add_file(&kernel, "vmlinuz", 0o644))
        .and_then(|p| p.add_file(&initrd, "initrd", 0o644))
        .context("assembling the rig payload")?;
    let command: Vec<String> = [
        "./vmm",
        "demo",
        "--kernel",
        "./vmlinuz",
        "--initrd",
        "./initrd",
        "--mem-mib",
        &args.mem_mib.to_string(),
        "--vcpus",
        &args.vcpus.to_string(),
        "--timeout",
        &args.timeout.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let opts = RigOptions {
        mem_mib: (args.mem_mib + 1024).max(2048),
        smp: 1,
        timeout_s: args.timeout + 120,
    };
    let outcome = rig::run_in_rig(script, payload.path(), &command, opts, |line| {
        println!("{line}")
    })
    .context("running the demo in the rig")?;
    if outcome.timed_out {
        bail!("the rig timed out after {} s", opts.timeout_s);
    }
    Ok(outcome.exit_code)
}

/// Boots the image with this host's KVM and reports the timings.
fn run_here(args: &DemoArgs) -> CliResult {
    let (kernel, initrd) = image(args)?;
    let exe = self_exe()?;
    let metrics =
        std::env::temp_dir().join(format!("vmm-demo-{}.metrics.json", std::process::id()));
    let _ = std::fs::remove_file(&metrics);
    println!(
        "vmm demo: booting {} + {} ({} MiB, {} vCPUs)",
        kernel.display(),
        initrd.display(),
        args.mem_mib,
        args.vcpus
    );
    let mut child = Command::new(&exe)
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--mem-mib", &args.mem_mib.to_string()])
        .args(["--vcpus", &args.vcpus.to_string()])
        .args(["--cmdline", DEMO_RUN])
        .arg("--metrics-file")
        .arg(&metrics)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} run", exe.display()))?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.timeout);
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for `vmm run`")? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the guest did not power off within {} s; killed it",
                args.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = start.elapsed();
    let code = status.code().unwrap_or(1);
    match std::fs::read_to_string(&metrics) {
        Ok(text) => {
            let _ = std::fs::remove_file(&metrics);
            let m: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing the metrics file {text:?}"))?;
            let ms = |k: &str| match m.get(k).and_then(|v| v.as_f64()) {
                Some(v) => format!("{v:.1} ms"),
                None => "n/a".to_string(),
            };
            println!(
                "vmm demo: boot timings: setup {}, first console {}, ready {}",
                ms("setup_ms"),
                ms("first_console_ms"),
                ms("ready_ms")
            );
            let reason = m
                .get("exit_reason")
                .map(|r| r.to_string())
                .unwrap_or_default();
            println!(
                "vmm demo: exit: {reason}, vmm exit code {code} after {:.2} s",
                wall.as_secs_f64()
            );
        }
        Err(e) => println!(
            "vmm demo: no boot timings ({}: {e}); vmm exit code {code} after {:.2} s",
            metrics.display(),
            wall.as_secs_f64()
        ),
    }
    Ok(code)
}
