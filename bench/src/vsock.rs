//! `bench vsock`: virtio-vsock throughput each way and small-message round trips, in the rig.
//!
//! The host side builds the static `vmm` and `bench` and the guest image, then runs
//! `bench rig-vsock` in one rig run. That driver boots the guest (512 MiB, 2 vCPUs) with
//! `--vsock-uds`, whose /init starts `guest-trimmer serve` (port 52) and whose script starts
//! `guest-trimmer vsock sink` (5001) and `source` (5002); per run it measures, through the
//! VM's unix socket in Firecracker's convention:
//! - host → guest: N MiB written to the sink until its reply (bytes checked);
//! - guest → host: N MiB read from the source to end of file (bytes and checksum checked);
//! - round trips: `{"op":"ping"}` lines on one connection, median and p99.
//!
//! Results go to `bench-results/vsock.json` and `vsock.md`. Times in the rig are emulated
//! (TCG): compare ratios, not absolute figures, with hardware KVM.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use guest_trimmer::vsock::{Fnv1a64, Pattern};
use rig::{KvmBackend, Payload, RigOptions};
use serde_json::{json, Value};

use crate::host::{build, build_image, say, workspace_root};

/// Prefix of the driver's result lines.
const RESULT_MARKER: &str = "VSOCK-BENCH ";
/// Guest ports of the trimmer, the sink and the source.
const PING_PORT: u32 = 52;
const SINK_PORT: u32 = 5001;
const SOURCE_PORT: u32 = 5002;

/// What one benchmark run measures (shared by the host side and the in-rig driver).
#[derive(clap::Args, Debug)]
pub struct Workload {
    /// Guest boots (one measurement set each).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// MiB moved each way per run.
    #[arg(long, default_value_t = 64)]
    pub mib: u64,
    /// Ping round trips per run.
    #[arg(long, default_value_t = 500)]
    pub pings: u32,
}

/// Arguments of `bench vsock`.
#[derive(clap::Args, Debug)]
pub struct VsockArgs {
    #[command(flatten)]
    pub workload: Workload,
    /// The JSON result file; the Markdown goes next to it with the extension `.md`.
    #[arg(long, default_value = "bench-results/vsock.json")]
    pub out: PathBuf,
    /// Seconds the whole rig run may take.
    #[arg(long, default_value_t = 900)]
    pub rig_timeout: u64,
}

/// Arguments of `bench rig-vsock` (the in-rig driver).
#[derive(clap::Args, Debug)]
pub struct RigVsockArgs {
    #[command(flatten)]
    pub workload: Workload,
}

/// The value at `q` of sorted `v`.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * q).round() as usize]
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Kills the VMM when dropped.
struct VmmProcess(Child);

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `bench rig-vsock`: boots and measures; prints one `VSOCK-BENCH {json}` line per run.
pub fn rig_run(args: RigVsockArgs) -> anyhow::Result<()> {
    for run in 1..=args.workload.runs {
        let result = measure_once(&args.workload)
            .unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")}));
        println!("{RESULT_MARKER}{}", json!({"run": run, "result": result}));
    }
    Ok(())
}

fn measure_once(args: &Workload) -> anyhow::Result<Value> {
    let uds = PathBuf::from("v.sock");
    let script = format!(
        "guest-trimmer vsock sink --port {SINK_PORT} & guest-trimmer vsock source --port {SOURCE_PORT} & sleep 3600"
    );
    let child = Command::new("./vmm")
        .args([
            "run",
            "--kernel",
            "vmlinuz",
            "--initrd",
            "initrd",
            "--mem-mib",
            "512",
            "--vcpus",
            "2",
        ])
        .args(["--cmdline", &format!("quiet vmm_run=\"{script}\"")])
        .arg("--vsock-uds")
        .arg(&uds)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ./vmm")?;
    let _vmm = VmmProcess(child);
    let boot = Instant::now();
    let (stream, _) = loop {
        match vsock::connect_to_guest(&uds, PING_PORT, Some(Duration::from_secs(30))) {
            Ok(c) => break c,
            Err(_) if boot.elapsed() < Duration::from_secs(240) => {
                std::thread::sleep(Duration::from_millis(250))
            }
            Err(e) => return Err(e).context("the guest's vsock endpoint never answered"),
        }
    };
    let ready_s = boot.elapsed().as_secs_f64();
    // Round trips on one connection.
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut rtts_us = Vec::with_capacity(args.pings as usize);
    for _ in 0..args.pings {
        let t = Instant::now();
        writer.write_all(b"{\"op\":\"ping\"}\n")?;
        let mut line = String::new();
        reader.read_line(&mut line)?;
        rtts_us.push(t.elapsed().as_secs_f64() * 1e6);
        if !line.contains("\"ok\":true") {
            bail!("unexpected ping reply {line:?}");
        }
    }
    rtts_us.sort_by(f64::total_cmp);
    let bytes = args.mib << 20;
    let timeout = Some(Duration::from_secs(600));
    // Wait for the sink and source listeners (started after READY).
    let connect = |port| -> anyhow::Result<std::os::unix::net::UnixStream> {
        let t = Instant::now();
        loop {
            match vsock::connect_to_guest(&uds, port, timeout) {
                Ok((s, _)) => return Ok(s),
                Err(_) if t.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(250))
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to guest port {port}"))
                }
            }
        }
    };
    // Host → guest.
    let mut buf = vec![0u8; 1 << 20];
    Pattern::new(5).fill(&mut buf);
    let mut sink = connect(SINK_PORT)?;
    let t = Instant::now();
    for _ in 0..args.mib {
        sink.write_all(&buf)?;
    }
    sink.shutdown(std::net::Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(sink).read_line(&mut line)?;
    let h2g_s = t.elapsed().as_secs_f64();
    let reply: Value =
        serde_json::from_str(line.trim()).with_context(|| format!("sink reply {line:?}"))?;
    if reply["bytes"] != bytes {
        bail!("the sink counted {reply}, {bytes} bytes were sent");
    }
    // Guest → host.
    let mut source = connect(SOURCE_PORT)?;
    let t = Instant::now();
    source.write_all(format!("{{\"bytes\":{bytes},\"seed\":7}}\n").as_bytes())?;
    let mut sum = Fnv1a64::default();
    let mut got = 0u64;
    loop {
        let n = source.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        got += n as u64;
    }
    let g2h_s = t.elapsed().as_secs_f64();
    let want = Pattern::checksum(7, bytes);
    if got != bytes || sum.hex() != want {
        bail!(
            "guest → host: {got} bytes, checksum {}, expected {bytes} / {want}",
            sum.hex()
        );
    }
    let mib = args.mib as f64;
    Ok(json!({
        "ok": true,
        "ready_s": ready_s,
        "host_to_guest_mib_per_s": mib / h2g_s,
        "guest_to_host_mib_per_s": mib / g2h_s,
        "rtt_median_us": quantile(&rtts_us, 0.5),
        "rtt_p99_us": quantile(&rtts_us, 0.99),
        "pings": rtts_us.len(),
        "mib_each_way": args.mib,
    }))
}

/// `bench vsock`: the host side.
pub fn run(args: VsockArgs) -> anyhow::Result<i32> {
    let w = &args.workload;
    let root = workspace_root();
    let (vmm, bench) = build(&root)?;
    let image = build_image(&vmm, &root)?;
    let KvmBackend::NestedRig { script } = rig::detect() else {
        bail!("bench vsock runs through the nested rig (this host's KVM backend is not the rig)");
    };
    let mut payload = Payload::new().context("creating the rig payload")?;
    payload
        .add_file(&vmm, "vmm", 0o755)
        .and_then(|x| x.add_file(&bench, "bench", 0o755))
        .and_then(|x| x.add_file(&image.kernel, "vmlinuz", 0o644))
        .and_then(|x| x.add_file(&image.initrd, "initrd", 0o644))
        .context("assembling the rig payload")?;
    let cmd: Vec<String> = [
        "./bench".to_string(),
        "rig-vsock".into(),
        "--runs".into(),
        w.runs.to_string(),
        "--mib".into(),
        w.mib.to_string(),
        "--pings".into(),
        w.pings.to_string(),
    ]
    .to_vec();
    say(&format!("running {} vsock runs in the rig", w.runs));
    let opts = RigOptions {
        timeout_s: args.rig_timeout,
        ..RigOptions::default()
    };
    let mut runs: Vec<Value> = Vec::new();
    let outcome = rig::run_in_rig(&script, payload.path(), &cmd, opts, |line| {
        if let Some(at) = line.find(RESULT_MARKER) {
            if let Ok(v) = serde_json::from_str::<Value>(&line[at + RESULT_MARKER.len()..]) {
                say(&format!("run: {v}"));
                runs.push(v);
            }
        }
    })
    .context("running the driver in the rig")?;
    let ok: Vec<&Value> = runs
        .iter()
        .map(|r| &r["result"])
        .filter(|r| r["ok"] == true)
        .collect();
    let med = |k: &str| median(ok.iter().filter_map(|r| r[k].as_f64()).collect());
    let summary = json!({
        "host_to_guest_mib_per_s": med("host_to_guest_mib_per_s"),
        "guest_to_host_mib_per_s": med("guest_to_host_mib_per_s"),
        "rtt_median_us": med("rtt_median_us"),
        "rtt_p99_us": med("rtt_p99_us"),
    });
    let report = json!({
        "benchmark": "virtio-vsock: bulk throughput each way, small-message round trips",
        "command": format!("cargo run --release -p bench -- vsock --runs {} --mib {} --pings {}", w.runs, w.mib, w.pings),
        "where": "nested KVM rig (QEMU TCG + SVM, 1 rig vCPU): emulated time, 10-50x slower than hardware KVM",
        "guest": {"mem_mib": 512, "vcpus": 2, "cmdline": "quiet", "vsock": "guest_cid 3, host side = unix socket (Firecracker convention)"},
        "goals": {"host_to_guest_mib_per_s": 1024, "rtt_median_us": 100, "note": "goals are for hardware KVM; rig figures are emulated"},
        "median": summary,
        "median_note": "median over runs of each run's figure (round trips: each run's median and p99 of its pings)",
        "runs": runs,
        "rig": {"exit_code": outcome.exit_code, "timed_out": outcome.timed_out, "duration_s": outcome.duration.as_secs_f64()},
    });
    write_results(&args.out, &report)?;
    println!("{}", serde_json::to_string_pretty(&report["median"])?);
    Ok(if ok.len() == w.runs as usize { 0 } else { 1 })
}

fn write_results(out: &Path, report: &Value) -> anyhow::Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    let m = &report["median"];
    let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
    let md = format!(
        "# virtio-vsock benchmark\n\n`{}`\n\n{}\n\n| metric | median over runs |\n|---|---|\n\
         | host → guest | {:.1} MiB/s |\n| guest → host | {:.1} MiB/s |\n\
         | ping round trip, median | {:.0} µs |\n| ping round trip, p99 | {:.0} µs |\n\n\
         Goals (hardware KVM): ≥ 1 GiB/s host → guest, median round trip ≤ 100 µs.\n",
        report["command"].as_str().unwrap_or(""),
        report["where"].as_str().unwrap_or(""),
        f("host_to_guest_mib_per_s"),
        f("guest_to_host_mib_per_s"),
        f("rtt_median_us"),
        f("rtt_p99_us"),
    );
    let md_path = out.with_extension("md");
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))
}
