//! `bench host-restore`: `vmm restore` from process start to the first `KVM_RUN`, phase by
//! phase, on this machine's own `/dev/kvm` and CPU: real time, not the rig's emulated time.
//!
//! Issue 7's real-KVM goal is restore → vCPUs running in ≤ 1 ms of VMM work. The rig's TCG CPU
//! runs the VMM 10-50x slower and translates every piece of code on its first run, so it cannot
//! show that. This host's `/dev/kvm` is `kvm_pvm` on our machines: it runs a stock kernel for
//! about two seconds before KVM's instruction emulator gives up, which is long enough to snapshot
//! a booting guest with the balloon (free page reporting) and vsock, and to restore that
//! snapshot again and again. Each restore is stopped (SIGTERM) after `--run-ms`, or ends by
//! itself when the emulator fails; either way the VMM writes its metrics file, whose `phases`
//! give the timeline. On a hardware-KVM host the same command measures the real thing.
//!
//! "VMM work" is process start → first `KVM_RUN` minus the KVM VM phase (`KVM_CREATE_VM`, the
//! memory slot, irqchip, PIT and clock state: kernel work, whose cost is the host KVM's, and
//! PVM's memory slot alone takes 5-7 ms here).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::console::TimedChild;
use crate::host::{build_image, build_static_vmm, dev_kvm_kind, say, vmm_run_argv, workspace_root};
use crate::protocol::VmmMetrics;
use crate::rig_script::write_results;
use crate::stats::Summary;

/// Arguments of `bench host-restore`.
#[derive(clap::Args, Debug)]
pub struct HostRestoreArgs {
    /// Measured restores.
    #[arg(long, default_value_t = 20)]
    pub runs: u32,
    /// Guest memory.
    #[arg(long, default_value_t = 512)]
    pub mem_mib: u32,
    /// How long the original guest boots before it is snapshotted (PVM fails a stock guest
    /// about 2 s after its start).
    #[arg(long, default_value_t = 800)]
    pub snapshot_after_ms: u64,
    /// How long each restored VM runs before it is stopped.
    #[arg(long, default_value_t = 300)]
    pub run_ms: u64,
    /// Working directory (the snapshot, sockets, metrics).
    #[arg(long, default_value = "target/host-restore")]
    pub dir: PathBuf,
}

/// The restore's steps: label, the phase it starts at (`None`: process start), the phase it
/// ends at (`None`: the first `KVM_RUN`, `setup_ms`).
const STEPS: [(&str, Option<&str>, Option<&str>); 10] = [
    ("command line parsed, logging", None, Some("cli_ms")),
    (
        "API socket, seccomp set-up",
        Some("cli_ms"),
        Some("seccomp_setup_ms"),
    ),
    (
        "state file read, checked and decoded; memory file matched",
        Some("seccomp_setup_ms"),
        Some("load_ms"),
    ),
    (
        "guest memory allocated, the memory file mapped (and checked once per host)",
        Some("load_ms"),
        Some("verify_memory_ms"),
    ),
    (
        "KVM VM: create, memory slot, irqchip, PIT and clock state (kernel work)",
        Some("verify_memory_ms"),
        Some("kvm_vm_ms"),
    ),
    (
        "device state restored",
        Some("kvm_vm_ms"),
        Some("device_state_ms"),
    ),
    (
        "dirty tracking started, devices attached",
        Some("device_state_ms"),
        Some("devices_ms"),
    ),
    (
        "vCPUs created, their state set",
        Some("devices_ms"),
        Some("vcpus_ms"),
    ),
    (
        "VMGenID, working set, vCPUs handed to their threads",
        Some("vcpus_ms"),
        Some("threads_ms"),
    ),
    ("vCPU 0's first KVM_RUN", Some("threads_ms"), None),
];

/// The step that is the host kernel's KVM work, left out of "VMM work".
const KVM_VM_STEP: usize = 4;

/// One restore's timeline: `setup_ms` and the phases, ms since process start.
struct Sample {
    setup_ms: f64,
    phases: BTreeMap<String, f64>,
    exit_reason: String,
}

impl Sample {
    fn at(&self, phase: Option<&str>) -> anyhow::Result<f64> {
        match phase {
            None => Ok(0.0),
            Some(name) => {
                self.phases.get(name).copied().with_context(|| {
                    format!("the metrics file has no phase {name:?} (an older vmm?)")
                })
            }
        }
    }

    /// Each step's duration, in [`STEPS`] order.
    fn steps_ms(&self) -> anyhow::Result<Vec<f64>> {
        STEPS
            .iter()
            .map(|(_, from, to)| {
                let end = match to {
                    Some(_) => self.at(*to)?,
                    None => self.setup_ms,
                };
                Ok(end - self.at(*from)?)
            })
            .collect()
    }
}

/// Runs `bench host-restore` and writes bench-results/host-restore.{json,md}.
pub fn run(args: HostRestoreArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let root = workspace_root();
    let vmm = build_static_vmm(&root)?;
    let image = build_image(&vmm, &root)?;
    let dir = if args.dir.is_absolute() {
        args.dir.clone()
    } else {
        root.join(&args.dir)
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let snapshot = dir.join("snapshot");
    take_snapshot(&vmm, &image, &args, &dir, &snapshot)?;
    let mut samples = Vec::new();
    for i in 0..args.runs {
        let sample = restore_once(&vmm, &args, &dir, &snapshot)
            .with_context(|| format!("restore {} of {}", i + 1, args.runs))?;
        say(&format!(
            "host-restore run {}: first KVM_RUN at {:.3} ms ({})",
            i + 1,
            sample.setup_ms,
            sample.exit_reason
        ));
        samples.push(sample);
    }
    let (json, md) = report(&args, &vmm, &snapshot, &samples)?;
    write_results("host-restore", &json, &md)?;
    print!("{md}");
    Ok(0)
}

/// Boots the image with a balloon (free page reporting) and vsock and snapshots it after
/// `--snapshot-after-ms`, stopping it.
fn take_snapshot(
    vmm: &Path,
    image: &crate::host::Image,
    args: &HostRestoreArgs,
    dir: &Path,
    snapshot: &Path,
) -> anyhow::Result<()> {
    let api = dir.join("boot-api.sock");
    let (vsock, api_arg) = (dir.join("vsock.sock"), api.display().to_string());
    let vsock_arg = vsock.display().to_string();
    let argv = vmm_run_argv(
        vmm,
        image,
        args.mem_mib,
        &[
            "--balloon",
            "amount_mib=0,free_page_reporting=true",
            "--vsock-cid",
            "3",
            "--vsock-uds",
            &vsock_arg,
            "--api-sock",
            &api_arg,
        ],
    );
    say(&format!(
        "booting the guest on this host's /dev/kvm ({}) to snapshot it after {} ms",
        dev_kvm_kind(),
        args.snapshot_after_ms
    ));
    let mut original = TimedChild::spawn(&argv, "")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api.exists() {
        if Instant::now() > deadline {
            original.signal(libc::SIGKILL);
            bail!(
                "the VMM did not bind its API socket {} within 10 s",
                api.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(args.snapshot_after_ms));
    let out = std::process::Command::new(vmm)
        .args(["snapshot", "--after", "stop", "--api-sock"])
        .arg(&api)
        .arg("--out")
        .arg(snapshot)
        .output()
        .with_context(|| format!("running {} snapshot", vmm.display()))?;
    let exit = original.wait_exit(Instant::now() + Duration::from_secs(20))?;
    if !out.status.success() {
        let (stdout, stderr) = original.tails();
        bail!(
            "snapshotting the booting guest failed: {} (the VMM's last lines: {}). On a kvm_pvm \
             host a stock guest fails after about 2 s: try a smaller --snapshot-after-ms",
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout
                .into_iter()
                .chain(stderr)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    say(&format!(
        "snapshot written: {} (the original VMM {})",
        String::from_utf8_lossy(&out.stdout).trim(),
        if exit.killed { "was killed" } else { "stopped" }
    ));
    Ok(())
}

/// Restores `snapshot` once, stops it after `--run-ms` and reads its metrics file.
fn restore_once(
    vmm: &Path,
    args: &HostRestoreArgs,
    dir: &Path,
    snapshot: &Path,
) -> anyhow::Result<Sample> {
    let metrics = dir.join("restore-metrics.json");
    let _ = std::fs::remove_file(&metrics);
    // The restored vsock device binds the original's socket path again.
    let _ = std::fs::remove_file(dir.join("vsock.sock"));
    let argv: Vec<String> = vec![
        vmm.display().to_string(),
        "restore".into(),
        "--snapshot".into(),
        snapshot.display().to_string(),
        "--metrics-file".into(),
        metrics.display().to_string(),
    ];
    let mut child = TimedChild::spawn(&argv, "")?;
    std::thread::sleep(Duration::from_millis(args.run_ms));
    child.signal(libc::SIGTERM);
    let exit = child.wait_exit(Instant::now() + Duration::from_secs(20))?;
    let text = std::fs::read_to_string(&metrics).with_context(|| {
        let (stdout, stderr) = child.tails();
        format!(
            "no metrics file {} (exit {:?}; last lines: {})",
            metrics.display(),
            exit.status,
            stdout
                .into_iter()
                .chain(stderr)
                .collect::<Vec<_>>()
                .join(" | ")
        )
    })?;
    let parsed: VmmMetrics =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", metrics.display()))?;
    let setup_ms = parsed
        .setup_ms
        .with_context(|| format!("{} has no setup_ms: {text}", metrics.display()))?;
    Ok(Sample {
        setup_ms,
        phases: parsed.phases,
        exit_reason: parsed.exit_reason.unwrap_or_else(|| "?".into()),
    })
}

/// The results file and its Markdown table.
fn report(
    args: &HostRestoreArgs,
    vmm: &Path,
    snapshot: &Path,
    samples: &[Sample],
) -> anyhow::Result<(Value, String)> {
    let steps: Vec<Vec<f64>> = samples
        .iter()
        .map(Sample::steps_ms)
        .collect::<anyhow::Result<_>>()?;
    let column = |i: usize| Summary::of(&steps.iter().map(|s| s[i]).collect::<Vec<_>>());
    let setup = Summary::of(&samples.iter().map(|s| s.setup_ms).collect::<Vec<_>>());
    let vmm_work: Vec<f64> = samples
        .iter()
        .zip(&steps)
        .map(|(s, st)| s.setup_ms - st[KVM_VM_STEP])
        .collect();
    let vmm_work = Summary::of(&vmm_work);
    let seccomp: Vec<f64> = samples
        .iter()
        .filter_map(|s| {
            Some(s.at(Some("vcpu_seccomp_ms")).ok()? - s.at(Some("vcpu_thread_ms")).ok()?)
        })
        .collect();
    let seccomp = Summary::of(&seccomp);
    let snapshot_bytes = dir_bytes(snapshot)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let median = |s: &Option<Summary>| {
        s.as_ref()
            .map_or("-".into(), |s| format!("{:.3}", s.median))
    };
    let range = |s: &Option<Summary>| {
        s.as_ref()
            .map_or("-".into(), |s| format!("{:.3}-{:.3}", s.min, s.max))
    };
    let json = json!({
        "dev_kvm": dev_kvm_kind(),
        "vmm": vmm.display().to_string(),
        "cpus": cpus,
        "runs": samples.len(),
        "mem_mib": args.mem_mib,
        "snapshot_after_ms": args.snapshot_after_ms,
        "snapshot_bytes": snapshot_bytes,
        "setup_ms": setup,
        "vmm_work_ms": vmm_work,
        "vcpu_seccomp_install_ms": seccomp,
        "steps": STEPS.iter().enumerate().map(|(i, (label, from, to))| json!({
            "step": label, "from": from, "to": to.unwrap_or("setup_ms"), "ms": column(i),
        })).collect::<Vec<_>>(),
        "exit_reasons": samples.iter().map(|s| s.exit_reason.clone()).collect::<Vec<_>>(),
    });
    let mut md = format!(
        "# Restore → first KVM_RUN on this host's own /dev/kvm\n\n\
         `cargo run --release -p bench -- host-restore --runs {}` (bench/src/host_restore.rs): \
         the static `vmm`, this machine's CPU ({cpus} CPUs) and `/dev/kvm` ({}), real time. The \
         snapshot: the image's guest ({} MiB, 2 vCPUs, balloon with free page reporting, vsock) \
         {} ms into its boot, {:.1} MiB on disk. Medians of {} restores (min-max).\n\n\
         | step | ms | min-max |\n|---|---|---|\n",
        args.runs,
        dev_kvm_kind(),
        args.mem_mib,
        args.snapshot_after_ms,
        snapshot_bytes as f64 / 1048576.0,
        samples.len(),
    );
    for (i, (label, _, _)) in STEPS.iter().enumerate() {
        let s = column(i);
        md.push_str(&format!("| {label} | {} | {} |\n", median(&s), range(&s)));
    }
    md.push_str(&format!(
        "| vCPU 0's seccomp filter, installed on its thread while the main thread sets up the devices | {} | {} |\n\
         | **process start → first KVM_RUN** | **{}** | {} |\n\
         | **VMM work: the same without the KVM VM step** (real-KVM goal ≤ 1) | **{}** | {} |\n",
        median(&seccomp),
        range(&seccomp),
        median(&setup),
        range(&setup),
        median(&vmm_work),
        range(&vmm_work),
    ));
    Ok((json, md))
}

/// Bytes the files of `dir` occupy on disk (allocated blocks).
fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        total += entry?.metadata()?.blocks() * 512;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(phases: &[(&str, f64)], setup_ms: f64) -> Sample {
        Sample {
            setup_ms,
            phases: phases.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            exit_reason: "shutdown".into(),
        }
    }

    #[test]
    fn steps_cover_process_start_to_the_first_kvm_run() {
        let names = STEPS.iter().filter_map(|(_, _, to)| *to);
        let phases: Vec<(&str, f64)> = names.zip(1..).map(|(n, i)| (n, f64::from(i))).collect();
        let s = sample(&phases, 12.5);
        let steps = s.steps_ms().unwrap();
        assert_eq!(steps.len(), STEPS.len());
        assert!((steps.iter().sum::<f64>() - 12.5).abs() < 1e-9);
        assert_eq!(STEPS[KVM_VM_STEP].2, Some("kvm_vm_ms"));
    }

    #[test]
    fn a_missing_phase_is_named() {
        let err = sample(&[("cli_ms", 0.1)], 5.0).steps_ms().unwrap_err();
        assert!(err.to_string().contains("seccomp_setup_ms"), "{err}");
    }
}
