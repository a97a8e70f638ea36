//! `bench-boot`: boot-time benchmark of our VMM against QEMU's microvm machine, both under the same
//! real KVM (one rig run, alternating boots), writing `bench-results/boot.json`.
//!
//! Host side (default): `cargo run --release -p tests --bin bench-boot -- [--runs N] [--out FILE]`
//! builds the static binaries and the guest image (like the e2e harness), bundles the host's
//! `qemu-system-x86_64` with its shared libraries and firmware into the payload, runs
//! `bench-boot --inside ...` in the rig (or on the host if its /dev/kvm boots stock guests) and
//! writes medians and every sample as JSON.
//!
//! Inside: boots the image N times with each VMM (512 MiB, 2 vCPUs, `vmm_run="poweroff -f"`),
//! measuring from spawn to the `VMM-GUEST-READY` console line and to process exit, and prints one
//! `BENCH-BOOT {json}` line per boot.

use rig::{KvmBackend, Payload, RigOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tests::harness::{self, say};
use tests::proc::Proc;
use tests::scenarios::READY_MARKER;

/// Marker of one boot's measurement.
const SAMPLE_MARKER: &str = "BENCH-BOOT ";
/// Guest size of the benchmark (the project's standard S512 guest).
const MEM_MIB: u32 = 512;
const VCPUS: u32 = 2;
/// The VMM's default kernel command line, given to QEMU too so both guests boot the same way.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=a panic=-1 pci=off i8042.noaux i8042.nomux \
                            i8042.nopnp i8042.dumbkbd tsc=reliable";
/// What both guests run after boot (then power off).
const GUEST_RUN: &str = "quiet vmm_run=\"poweroff -f\"";
/// Firmware files QEMU's microvm machine may load (from its data directory).
const QEMU_FIRMWARE: &[&str] = &[
    "qboot.rom",
    "bios-microvm.bin",
    "linuxboot_dma.bin",
    "linuxboot.bin",
    "kvmvapic.bin",
    "pvh.bin",
    "multiboot_dma.bin",
];

/// One boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sample {
    /// `ours` or `qemu`.
    vmm: String,
    run: u32,
    ok: bool,
    /// Spawn → `VMM-GUEST-READY` on the console.
    ready_ms: Option<f64>,
    /// Spawn → process exit after the guest's poweroff.
    exit_ms: Option<f64>,
    error: Option<String>,
}

fn fail(msg: &str) -> ! {
    eprintln!("bench-boot: error: {msg}");
    std::process::exit(1);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runs: u32 = opt("--runs").map_or(10, |r| r.parse().unwrap_or_else(|_| fail("--runs N")));
    if args.iter().any(|a| a == "--inside") {
        let path = |n: &str| PathBuf::from(opt(n).unwrap_or_else(|| fail(&format!("{n} PATH"))));
        inside(
            &path("--vmm"),
            &path("--kernel"),
            &path("--initrd"),
            &path("--qemu-dir"),
            runs,
        );
        return;
    }
    let root = harness::workspace_root();
    let out = opt("--out").map_or_else(|| root.join("bench-results/boot.json"), PathBuf::from);
    if let Err(e) = host(&root, runs, &out) {
        fail(&e);
    }
}

/// A copy of `qemu-system-x86_64` that runs without the host's /usr: the binary, its shared
/// libraries (run through the bundled dynamic loader) and its firmware.
fn bundle_qemu(payload: &mut Payload) -> Result<(), String> {
    let qemu = std::env::var_os("BENCH_QEMU")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("qemu-system-x86_64"))
                    .find(|c| c.is_file())
            })
        })
        .ok_or(
            "no qemu-system-x86_64 on PATH (apt-get install qemu-system-x86, or set BENCH_QEMU)",
        )?;
    let ldd = Command::new("ldd")
        .arg(&qemu)
        .output()
        .map_err(|e| format!("running ldd {}: {e}", qemu.display()))?;
    if !ldd.status.success() {
        return Err(format!(
            "ldd {} failed: {}",
            qemu.display(),
            String::from_utf8_lossy(&ldd.stderr)
        ));
    }
    let mut loader = None;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.starts_with("ld-linux") {
            loader = Some(name.clone());
        }
        payload
            .add_file(path, &format!("qemu/lib/{name}"), 0o755)
            .map_err(|e| harness::error_chain(&e))?;
    }
    let loader = loader.ok_or("ldd named no dynamic loader for qemu")?;
    payload
        .add_file(&qemu, "qemu/bin/qemu-system-x86_64", 0o755)
        .map_err(|e| harness::error_chain(&e))?;
    let share = Path::new("/usr/share/qemu");
    for fw in QEMU_FIRMWARE {
        let src = share.join(fw);
        if src.exists() {
            payload
                .add_file(&src, &format!("qemu/share/{fw}"), 0o644)
                .map_err(|e| harness::error_chain(&e))?;
        }
    }
    payload
        .add_bytes("qemu/loader", loader.as_bytes(), 0o644)
        .map_err(|e| harness::error_chain(&e))?;
    Ok(())
}

fn host(root: &Path, runs: u32, out: &Path) -> Result<(), String> {
    let backend = rig::detect();
    say(&format!("KVM backend: {backend}"));
    if let KvmBackend::Unavailable { reason } = &backend {
        return Err(format!("no real KVM to benchmark on: {reason}"));
    }
    let bins = harness::binaries(root).map_err(|e| harness::error_chain(&e))?;
    let bench = bins.runner.with_file_name("bench-boot");
    if !rig::is_static_executable(&bench).unwrap_or(false) {
        return Err(format!("{} is missing or not static", bench.display()));
    }
    let img = harness::image(&bins.vmm, &bins.trimmer).map_err(|e| harness::error_chain(&e))?;
    let mut payload = Payload::new().map_err(|e| harness::error_chain(&e))?;
    payload
        .add_file(&bins.vmm, "vmm", 0o755)
        .and_then(|p| p.add_file(&bench, "bench-boot", 0o755))
        .and_then(|p| p.add_file(&img.kernel, "vmlinuz", 0o644))
        .and_then(|p| p.add_file(&img.initrd, "initrd", 0o644))
        .map_err(|e| harness::error_chain(&e))?;
    bundle_qemu(&mut payload)?;

    let args: Vec<String> = [
        "--inside",
        "--vmm",
        "./vmm",
        "--kernel",
        "./vmlinuz",
        "--initrd",
        "./initrd",
        "--qemu-dir",
        "./qemu",
        "--runs",
    ]
    .map(String::from)
    .into_iter()
    .chain([runs.to_string()])
    .collect();
    let timeout_s = 300 + u64::from(runs) * 2 * 200;
    let on_line = |l: &str| eprintln!("{l}");
    let outcome = match &backend {
        KvmBackend::NestedRig { script } => {
            let mut cmd = vec!["./bench-boot".to_string()];
            cmd.extend(args);
            let opts = RigOptions {
                mem_mib: harness::env_num("VMM_E2E_RIG_MEM", 3072),
                smp: harness::env_num("VMM_E2E_RIG_SMP", 1),
                timeout_s,
            };
            rig::run_in_rig(script, payload.path(), &cmd, opts, on_line)
        }
        KvmBackend::HostKvm => rig::run_local(
            &payload.path().join("bench-boot"),
            &args,
            payload.path(),
            Duration::from_secs(timeout_s),
            on_line,
        ),
        KvmBackend::Unavailable { .. } => unreachable!("handled above"),
    }
    .map_err(|e| harness::error_chain(&e))?;

    let samples: Vec<Sample> = outcome
        .lines
        .iter()
        .filter_map(|l| l.find(SAMPLE_MARKER).map(|i| &l[i + SAMPLE_MARKER.len()..]))
        .filter_map(|j| serde_json::from_str(j.trim()).ok())
        .collect();
    let summary = |vmm: &str| {
        let of = |f: fn(&Sample) -> Option<f64>| {
            let mut v: Vec<f64> = samples
                .iter()
                .filter(|s| s.vmm == vmm && s.ok)
                .filter_map(f)
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let ready = of(|s| s.ready_ms);
        let exit = of(|s| s.exit_ms);
        let failures = samples.iter().filter(|s| s.vmm == vmm && !s.ok).count();
        serde_json::json!({
            "boots_ok": ready.len(),
            "failures": failures,
            "median_ready_ms": median(&ready),
            "median_exit_ms": median(&exit),
            "min_ready_ms": ready.first(),
            "max_ready_ms": ready.last(),
        })
    };
    let (ours, qemu) = (summary("ours"), summary("qemu"));
    let ratio = match (
        ours["median_ready_ms"].as_f64(),
        qemu["median_ready_ms"].as_f64(),
    ) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let report = serde_json::json!({
        "benchmark": "boot time to VMM-GUEST-READY, our vmm vs qemu-system-x86_64 -M microvm,acpi=on",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "where": backend.to_string(),
        "note": "inside the TCG rig times are 10-50x native; only the ratio between the two compares",
        "guest": { "mem_mib": MEM_MIB, "vcpus": VCPUS, "cmdline": format!("{BASE_CMDLINE} {GUEST_RUN}") },
        "runs_per_vmm": runs,
        "runner_exit_code": outcome.exit_code,
        "ours": ours,
        "qemu_microvm": qemu,
        "ready_ratio_ours_over_qemu": ratio,
        "samples": samples,
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&report).expect("JSON serializes");
    std::fs::write(out, text + "\n").map_err(|e| format!("writing {}: {e}", out.display()))?;
    say(&format!(
        "ours: median ready {} ms, exit {} ms ({} ok, {} failed); qemu microvm: median ready {} ms, exit {} ms ({} ok, {} failed); ratio {}; wrote {}",
        ours["median_ready_ms"], ours["median_exit_ms"], ours["boots_ok"], ours["failures"],
        qemu["median_ready_ms"], qemu["median_exit_ms"], qemu["boots_ok"], qemu["failures"],
        ratio.map_or("n/a".into(), |r| format!("{r:.2}")),
        out.display()
    ));
    let complete = ours["failures"] == 0 && qemu["failures"] == 0 && ratio.is_some();
    if complete {
        Ok(())
    } else {
        Err(format!(
            "some boots failed or none succeeded; see {}",
            out.display()
        ))
    }
}

fn median(v: &[f64]) -> Option<f64> {
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Runs inside the rig: alternates our VMM and QEMU, `runs` boots each.
fn inside(vmm: &Path, kernel: &Path, initrd: &Path, qemu_dir: &Path, runs: u32) {
    let abs = |p: &Path| {
        std::fs::canonicalize(p).unwrap_or_else(|e| fail(&format!("{}: {e}", p.display())))
    };
    let (vmm, kernel, initrd, qemu_dir) = (abs(vmm), abs(kernel), abs(initrd), abs(qemu_dir));
    let loader = std::fs::read_to_string(qemu_dir.join("loader"))
        .unwrap_or_else(|e| fail(&format!("reading the bundled loader's name: {e}")));
    let loader = qemu_dir.join("lib").join(loader.trim());
    let ours_args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--mem-mib".into(),
        MEM_MIB.to_string(),
        "--vcpus".into(),
        VCPUS.to_string(),
        "--cmdline".into(),
        GUEST_RUN.into(),
    ];
    let qemu_args: Vec<String> = vec![
        "--library-path".into(),
        qemu_dir.join("lib").display().to_string(),
        qemu_dir
            .join("bin/qemu-system-x86_64")
            .display()
            .to_string(),
        "-L".into(),
        qemu_dir.join("share").display().to_string(),
        "-enable-kvm".into(),
        "-cpu".into(),
        "host".into(),
        "-M".into(),
        "microvm,acpi=on".into(),
        "-m".into(),
        MEM_MIB.to_string(),
        "-smp".into(),
        VCPUS.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        format!("{BASE_CMDLINE} {GUEST_RUN}"),
    ];
    let mut failed = 0;
    for run in 0..runs {
        for (name, program, args) in [
            ("ours", vmm.as_path(), &ours_args),
            ("qemu", loader.as_path(), &qemu_args),
        ] {
            let s = boot_once(name, run, program, args);
            if !s.ok {
                failed += 1;
            }
            println!(
                "{SAMPLE_MARKER}{}",
                serde_json::to_string(&s).expect("serializes")
            );
        }
    }
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

fn boot_once(name: &str, run: u32, program: &Path, args: &[String]) -> Sample {
    let mut sample = Sample {
        vmm: name.to_string(),
        run,
        ok: false,
        ready_ms: None,
        exit_ms: None,
        error: None,
    };
    let tag = format!("{name}#{run}");
    let mut p = match Proc::spawn(&tag, program, args, &[]) {
        Ok(p) => p,
        Err(e) => {
            sample.error = Some(e);
            return sample;
        }
    };
    // Milliseconds to 0.1 ms (finer digits are noise here).
    let ms = |d: Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
    match p.wait_stdout(READY_MARKER, Duration::from_secs(180)) {
        Ok(i) => sample.ready_ms = Some(ms(p.stdout[i].0 - p.started)),
        Err(e) => {
            sample.error = Some(e);
            return sample;
        }
    }
    match p.wait_exit(Duration::from_secs(60)) {
        Ok(st) if st.code() == Some(0) => {
            sample.exit_ms = p.exit.map(|(at, _)| ms(at - p.started));
            sample.ok = true;
        }
        Ok(st) => sample.error = Some(format!("exited {st}; {}", p.context())),
        Err(e) => sample.error = Some(e),
    }
    sample
}
