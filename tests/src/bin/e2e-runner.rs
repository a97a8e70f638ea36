//! `e2e-runner`: runs the boot scenarios in sequence where real KVM is (inside the rig, or on a
//! host whose /dev/kvm boots stock guests) and prints one `E2E-RESULT {json}` line per scenario,
//! with every guest console streamed as `[scenario] line`.
//!
//! Usage: `e2e-runner --vmm PATH --kernel PATH --initrd PATH [--data-disk PATH] [--only NAME,NAME] [--work DIR]`
//! or `e2e-runner --list`. Exits 0 when every scenario passed, 1 when one failed, 2 on bad usage.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;
use tests::protocol::{truncate, ScenarioResult, BEGIN_MARKER, SUMMARY_MARKER};
use tests::scenarios::{self, Ctx};

struct Args {
    vmm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    data_disk: Option<PathBuf>,
    only: Option<Vec<String>>,
    work: PathBuf,
}

fn usage(msg: &str) -> ! {
    eprintln!("e2e-runner: {msg}");
    eprintln!(
        "usage: e2e-runner --vmm PATH --kernel PATH --initrd PATH [--data-disk PATH] [--only NAME,NAME] [--work DIR] | --list"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let (mut vmm, mut kernel, mut initrd, mut only, mut work) = (None, None, None, None, None);
    let mut data_disk = None;
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--list" => {
                for n in scenarios::names() {
                    println!("{n}");
                }
                std::process::exit(0);
            }
            "--vmm" => vmm = Some(PathBuf::from(val())),
            "--kernel" => kernel = Some(PathBuf::from(val())),
            "--initrd" => initrd = Some(PathBuf::from(val())),
            "--data-disk" => data_disk = Some(PathBuf::from(val())),
            "--only" => only = Some(val().split(',').map(str::to_string).collect()),
            "--work" => work = Some(PathBuf::from(val())),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let abs = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    Args {
        vmm: abs(vmm.unwrap_or_else(|| usage("--vmm is required"))),
        kernel: abs(kernel.unwrap_or_else(|| usage("--kernel is required"))),
        initrd: abs(initrd.unwrap_or_else(|| usage("--initrd is required"))),
        data_disk: data_disk.map(abs),
        only,
        work: work.unwrap_or_else(|| std::env::temp_dir().join("e2e-work")),
    }
}

/// One line about where we run, for the log.
fn environment() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpus = read("/proc/cpuinfo").matches("processor\t:").count();
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let kvm = std::path::Path::new("/dev/kvm").exists();
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    format!(
        "cpus {cpus}, {}, /dev/kvm {}, kvm_pvm {}, kernel {}",
        mem.split_whitespace().collect::<Vec<_>>().join(" "),
        if kvm { "present" } else { "absent" },
        if pvm { "loaded" } else { "absent" },
        read("/proc/sys/kernel/osrelease").trim()
    )
}

fn main() {
    let args = parse_args();
    let all = scenarios::all();
    if let Some(only) = &args.only {
        for n in only {
            if !all.iter().any(|s| s.name == n) {
                usage(&format!("no scenario named {n:?}"));
            }
        }
    }
    println!("e2e-runner: {}", environment());
    let (mut passed, mut failed) = (0, 0);
    for s in all {
        if let Some(only) = &args.only {
            if !only.iter().any(|n| n == s.name) {
                continue;
            }
        }
        println!("{BEGIN_MARKER}{}", s.name);
        let work = args.work.join(s.name);
        let _ = std::fs::remove_dir_all(&work);
        let ctx = Ctx {
            vmm: args.vmm.clone(),
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            data_disk: args.data_disk.clone(),
            work: work.clone(),
            name: s.name.to_string(),
        };
        let start = Instant::now();
        let outcome = match std::fs::create_dir_all(&work) {
            Err(e) => Err(format!("creating {}: {e}", work.display())),
            Ok(()) => {
                // Run on a thread so a stuck scenario fails by the watchdog instead of hanging
                // the suite; its processes are killed, which unblocks the thread.
                let (tx, rx) = mpsc::channel();
                let run = s.run;
                std::thread::spawn(move || {
                    let _ = tx.send(run(&ctx));
                });
                match rx.recv_timeout(s.timeout) {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        let killed = tests::proc::kill_all_live();
                        Err(format!(
                            "watchdog: no result within {} s (killed {killed} process(es))",
                            s.timeout.as_secs()
                        ))
                    }
                }
            }
        };
        // Nothing a scenario started may leak into the next one: neither processes nor files
        // (in the rig /tmp is RAM, and snapshots left behind starve later scenarios' guests).
        tests::proc::kill_all_live();
        if let Err(e) = std::fs::remove_dir_all(&work) {
            println!("e2e-runner: cannot remove {}: {e}", work.display());
        }
        let result = ScenarioResult {
            name: s.name.to_string(),
            passed: outcome.is_ok(),
            detail: truncate(&outcome.unwrap_or_else(|e| e), 3000),
            duration_ms: start.elapsed().as_millis() as u64,
        };
        if result.passed {
            passed += 1;
        } else {
            failed += 1;
        }
        println!("{}", result.to_line());
        println!("{}", result.to_hex_line());
    }
    println!(
        "{SUMMARY_MARKER}{}",
        serde_json::json!({ "passed": passed, "failed": failed })
    );
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
