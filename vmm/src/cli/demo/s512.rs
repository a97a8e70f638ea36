//! The standard scenario (S512, `../shared/README.md` §2) end to end: boot 512 MiB / 2 vCPUs
//! with the data disk, vsock and a reporting balloon; run the workload (64 MiB live data with
//! its hash, 256 MiB read once, 32 MiB re-read in a loop, a runtime holding a 64 MiB cache);
//! take a raw full dump, a compact untrimmed and a trimmed snapshot (policy `s512`); restore
//! the trimmed one, let the after-restore hook verify the live data; report the figures.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde::Serialize;
use serde_json::Value;

use super::child::{run_to_end, VmmChild};

/// The guest's workload (on the kernel command line, run by /init's `vmm_run`).
const WORKLOAD: &str = "G=guest-trimmer; \
    $G workload runtime --mib 64 --pid-file /run/rt.pid --socket /run/rt.sock & \
    $G workload live-anon --mib 64 --check-file /run/chk & \
    $G workload cold-read /mnt/data/cold; \
    $G workload hot-loop /mnt/data/hot & \
    echo DEMO-WORKLOAD-READY; while true; do sleep 60; done";
/// How long the cold set is left alone before the trim: past the policy's 20 s cold age, with
/// room for DAMON's regions to settle.
const COLD_WAIT: Duration = Duration::from_secs(40);
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: f64 = 1048576.0;

/// Where the demo's inputs are.
pub struct Inputs {
    /// This executable.
    pub exe: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// The S512 data disk (`vmm image build`'s data.ext4).
    pub data_disk: PathBuf,
    /// Scratch directory (snapshots, sockets, logs).
    pub work: PathBuf,
}

/// One snapshot's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotFigures {
    /// Apparent size of the memory file.
    pub memory_file_bytes: u64,
    /// Blocks allocated on disk for the whole snapshot (state + memory).
    pub on_disk_bytes: u64,
    /// Pause → written, as the VMM measured it.
    pub snapshot_ms: f64,
}

/// What the demo measured.
#[derive(Debug, Clone, Serialize)]
pub struct DemoResults {
    /// Guest RAM.
    pub guest_ram_mib: u64,
    /// Live anonymous memory + the hot set + the kernel's unreclaimable memory after the trim.
    pub live_floor_bytes: u64,
    /// Every page.
    pub raw_full_dump: SnapshotFigures,
    /// Compact, no trim.
    pub compact_untrimmed: SnapshotFigures,
    /// Compact after the `s512` trim.
    pub compact_trimmed: SnapshotFigures,
    /// The trimmer's whole run (hooks, pageout, compaction, reporting wait).
    pub trim_ms: f64,
    /// Memory the trim freed in the guest.
    pub trim_freed_bytes: u64,
    /// Restore: process start → vCPUs running (the VMM's own measure).
    pub restore_to_running_ms: Option<f64>,
    /// Restore: process start → the clone verified its live data (after-restore hook).
    pub restore_to_verified_ms: f64,
    /// The live data's hash, before and after.
    pub live_data_hash: String,
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// Bytes allocated on disk under `dir` (its files' st_blocks).
fn on_disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// `vmm snapshot ... --json` into `dir`; returns the JSON and the figures.
fn snapshot(
    inputs: &Inputs,
    sock: &Path,
    name: &str,
    extra: &[&str],
) -> anyhow::Result<(Value, SnapshotFigures)> {
    let dir = inputs.work.join(name);
    let mut a = args(&[
        "snapshot",
        "--api-sock",
        &path_arg(sock),
        "--out",
        &path_arg(&dir),
        "--json",
    ]);
    a.extend(args(extra));
    let out = run_to_end(
        &inputs.exe,
        &a,
        &format!("the {name} snapshot"),
        SNAPSHOT_TIMEOUT,
    )?;
    let v: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("`vmm snapshot` printed no JSON for {name}: {out:?}"))?;
    let summary = v.get("snapshot").unwrap_or(&v);
    let figures = SnapshotFigures {
        memory_file_bytes: summary["memory_file_bytes"].as_u64().unwrap_or(0),
        on_disk_bytes: on_disk_bytes(&dir),
        snapshot_ms: summary["save_state_ms"].as_f64().unwrap_or(0.0)
            + summary["write_ms"].as_f64().unwrap_or(0.0),
    };
    println!(
        "vmm demo: {name}: {:.1} MiB memory file, {:.1} MiB on disk, {:.0} ms",
        figures.memory_file_bytes as f64 / MIB,
        figures.on_disk_bytes as f64 / MIB,
        figures.snapshot_ms
    );
    Ok((v, figures))
}

/// The trim step of a pipeline summary.
fn trim_step(summary: &Value) -> &Value {
    summary["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step"] == "trim"))
        .unwrap_or(&Value::Null)
}

/// Runs the scenario; returns the figures.
pub fn run(inputs: &Inputs) -> anyhow::Result<DemoResults> {
    std::fs::create_dir_all(&inputs.work)
        .with_context(|| format!("creating {}", inputs.work.display()))?;
    let sock = inputs.work.join("api.sock");
    let uds = inputs.work.join("vsock.sock");
    for f in [&sock, &uds] {
        let _ = std::fs::remove_file(f);
    }
    let cmdline = format!("quiet vmm_run=\"{WORKLOAD}\"");
    let run_args = args(&[
        "run",
        "--kernel",
        &path_arg(&inputs.kernel),
        "--initrd",
        &path_arg(&inputs.initrd),
        "--mem-mib",
        "512",
        "--vcpus",
        "2",
        "--disk",
        &format!("{},ro", inputs.data_disk.display()),
        "--balloon",
        "amount_mib=0,free_page_reporting=true",
        "--vsock-uds",
        &path_arg(&uds),
        "--api-sock",
        &path_arg(&sock),
        "--cmdline",
        &cmdline,
    ]);
    println!("vmm demo: booting the S512 guest (512 MiB, 2 vCPUs, data disk, vsock, balloon)");
    let mut vm = VmmChild::spawn(
        &inputs.exe,
        &run_args,
        "the guest",
        &inputs.work.join("vm.log"),
    )?;
    let hash = vm
        .wait_for("WORKLOAD-LIVE-ANON 64 ", GUEST_TIMEOUT)?
        .split_whitespace()
        .next()
        .context("no hash on the live-data line")?
        .to_string();
    vm.wait_for("DEMO-WORKLOAD-READY", GUEST_TIMEOUT)?;
    println!(
        "vmm demo: workload running (live data hash {hash}); waiting {} s so DAMON sees the cold set go cold",
        COLD_WAIT.as_secs()
    );
    std::thread::sleep(COLD_WAIT);

    let (_, raw) = snapshot(inputs, &sock, "raw", &["--raw-memory"])?;
    let (_, untrimmed) = snapshot(inputs, &sock, "untrimmed", &["--no-trim"])?;
    let (trimmed_json, trimmed) = snapshot(
        inputs,
        &sock,
        "trimmed",
        &["--policy", "s512", "--after", "stop"],
    )?;
    let trim = trim_step(&trimmed_json);
    for step in trim["detail"]["report"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "vmm demo:   trim step {:<15} {:<8} {:>7} ms, freed {:>7.1} MiB",
            step["kind"].as_str().unwrap_or("?"),
            step["status"].as_str().unwrap_or("?"),
            step["duration_ms"],
            step["freed_kib"].as_f64().unwrap_or(0.0) / 1024.0
        );
    }
    // The pipeline's other steps (hinting pass, snapshot) and why pages were left out.
    for step in trimmed_json["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["step"] != "trim")
    {
        println!(
            "vmm demo:   pipeline step {:<9} {:<8} {:>7} ms {}",
            step["step"].as_str().unwrap_or("?"),
            step["status"].as_str().unwrap_or("?"),
            step["duration_ms"],
            step["detail"]
        );
    }
    let pages = &trimmed_json["snapshot"]["pages"];
    if pages.is_object() {
        println!("vmm demo:   trimmed snapshot pages: {pages}");
    }
    if let Some(w) = trimmed_json["warnings"]
        .as_array()
        .filter(|w| !w.is_empty())
    {
        println!("vmm demo: warnings: {w:?}");
    }
    if trim["status"] != "ok" {
        println!("vmm demo: the trim did not complete; the trimmed row below is untrimmed");
    }
    let after = &trim["detail"]["report"]["after"];
    let kib = |v: &Value| v.as_u64().unwrap_or(0) * 1024;
    let live_floor_bytes =
        kib(&after["anon_kib"]) + kib(&after["kernel_unreclaimable_kib"]) + (32 << 20);
    let status = vm.wait(Duration::from_secs(60))?;
    ensure!(
        status.success(),
        "the original VM's VMM ended with {status}"
    );

    println!("vmm demo: restoring the trimmed snapshot");
    let metrics = inputs.work.join("restore-metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let restore_sock = inputs.work.join("restore-api.sock");
    let _ = std::fs::remove_file(&restore_sock);
    let started = Instant::now();
    let mut clone = VmmChild::spawn(
        &inputs.exe,
        &args(&[
            "restore",
            "--snapshot",
            &path_arg(&inputs.work.join("trimmed")),
            "--api-sock",
            &path_arg(&restore_sock),
            "--metrics-file",
            &path_arg(&metrics),
        ]),
        "the restored clone",
        &inputs.work.join("restore.log"),
    )?;
    let check = clone.wait_for("WORKLOAD-LIVE-ANON-CHECK ", GUEST_TIMEOUT)?;
    let restore_to_verified_ms = started.elapsed().as_secs_f64() * 1000.0;
    let words: Vec<&str> = check.split_whitespace().collect();
    if words.first() != Some(&"ok") || words.get(1) != Some(&hash.as_str()) {
        bail!("the restored clone's live data check failed: {check:?} (original hash {hash})");
    }
    println!("vmm demo: the clone verified its 64 MiB of live data (hash {hash})");
    run_to_end(
        &inputs.exe,
        &args(&["stop", "--api-sock", &path_arg(&restore_sock)]),
        "stopping the clone",
        Duration::from_secs(30),
    )?;
    clone.wait(Duration::from_secs(30))?;
    let restore_to_running_ms = std::fs::read_to_string(&metrics)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|m| m["setup_ms"].as_f64());
    Ok(DemoResults {
        guest_ram_mib: 512,
        live_floor_bytes,
        raw_full_dump: raw,
        compact_untrimmed: untrimmed,
        compact_trimmed: trimmed,
        trim_ms: trim["duration_ms"].as_f64().unwrap_or(0.0),
        trim_freed_bytes: kib(&trim["detail"]["freed_kib"]),
        restore_to_running_ms,
        restore_to_verified_ms,
        live_data_hash: hash,
    })
}

/// Prints the results as a table.
pub fn print_table(r: &DemoResults) {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / MIB);
    let floor = r.live_floor_bytes.max(1) as f64;
    let row = |name: &str, s: &SnapshotFigures| {
        println!(
            "| {name:<28} | {:>11} | {:>11} | {:>6.2} | {:>9.0} ms |",
            mib(s.memory_file_bytes),
            mib(s.on_disk_bytes),
            s.on_disk_bytes as f64 / floor,
            s.snapshot_ms
        )
    };
    println!();
    println!(
        "guest RAM {} MiB, live floor {}",
        r.guest_ram_mib,
        mib(r.live_floor_bytes)
    );
    println!(
        "| snapshot                     | memory file |     on disk | /floor |  snapshot time |"
    );
    println!(
        "|------------------------------|-------------|-------------|--------|----------------|"
    );
    row("raw full dump", &r.raw_full_dump);
    row("compact, untrimmed", &r.compact_untrimmed);
    row("compact, trimmed (s512)", &r.compact_trimmed);
    println!(
        "trim {:.0} ms (freed {}); restore to vCPUs running {}, to live data verified {:.0} ms",
        r.trim_ms,
        mib(r.trim_freed_bytes),
        r.restore_to_running_ms
            .map_or("n/a".to_string(), |ms| format!("{ms:.1} ms")),
        r.restore_to_verified_ms
    );
}
