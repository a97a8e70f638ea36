//! `bench rig-boot --plan FILE`: the in-rig driver. Runs the boots of a [`Plan`] (alternating
//! between the VMMs), then the memory measurements, and prints one [`Message`] per result on
//! stdout (readable and hex-encoded, see [`crate::protocol`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::console::{describe_status, TimedChild};
use crate::protocol::{
    choose_machine, with_machine, BootRecord, Case, Kind, MemCase, MemRecord, Message, Plan,
    ProbeResult, RigFacts, StopHow, VmmMetrics,
};
use crate::smaps;
use crate::stats::Summary;

/// Arguments of `bench rig-boot`.
#[derive(clap::Args, Debug)]
pub struct RigBootArgs {
    /// The plan (JSON) the host side wrote into the payload.
    #[arg(long)]
    pub plan: PathBuf,
}

/// Prints a message both ways.
fn emit(msg: &Message) {
    println!("{}", msg.text_line());
    println!("{}", msg.hex_line());
}

/// Runs the plan; exits non-zero only when the plan cannot be read (failed boots are results).
pub fn run(args: RigBootArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.plan)
        .with_context(|| format!("reading the plan {}", args.plan.display()))?;
    let plan: Plan = serde_json::from_str(&text)
        .with_context(|| format!("parsing the plan {}", args.plan.display()))?;
    emit(&Message::Facts(facts(&plan)));

    let mut tally = Tally::default();
    let mut machine = plan.qemu_machines.first().cloned().unwrap_or_default();
    if let Some(group) = plan.groups.get(plan.probe_group) {
        let ours = group.iter().find(|c| c.kind == Kind::Ours);
        let qemu = group.iter().find(|c| c.kind == Kind::Qemu);
        if let Some(ours) = ours {
            for round in 0..plan.warmup {
                tally.emit(boot(&plan, ours, round, true, ""));
            }
        }
        if let Some(qemu) = qemu {
            let mut ready: Vec<Vec<Option<f64>>> = vec![Vec::new(); plan.qemu_machines.len()];
            for round in 0..plan.probe_runs {
                for (i, m) in plan.qemu_machines.iter().enumerate() {
                    let r = boot(&plan, qemu, round, true, m);
                    ready[i].push(r.ok.then_some(r.ready_ms).flatten());
                    tally.emit(r);
                }
            }
            let probes: Vec<ProbeResult> = plan
                .qemu_machines
                .iter()
                .zip(&ready)
                .map(|(m, r)| ProbeResult {
                    machine: m.clone(),
                    runs: r.len(),
                    ok: r.iter().filter(|x| x.is_some()).count(),
                    median_ready_ms: Summary::of_some(r.iter().copied()).map(|s| s.median),
                })
                .collect();
            let choice = choose_machine(&probes);
            machine = choice.machine.clone();
            emit(&Message::Choice(choice));
        }
    }
    for round in 0..plan.runs {
        for group in &plan.groups {
            for case in rotated(group, round) {
                tally.emit(boot(&plan, case, round, false, &machine));
            }
        }
    }
    let memory_rounds = plan.memory.iter().map(|c| c.runs).max().unwrap_or(0);
    for round in 0..memory_rounds {
        for case in rotated(&plan.memory, round).filter(|c| round < c.runs) {
            emit(&Message::Memory(memory(&plan, case, round, &machine)));
        }
    }
    let Tally { boots, failed } = tally;
    emit(&Message::Done { boots, failed });
    Ok(())
}

/// Counts boots while emitting their records.
#[derive(Default)]
struct Tally {
    boots: usize,
    failed: usize,
}

impl Tally {
    fn emit(&mut self, r: BootRecord) {
        self.boots += 1;
        if !r.ok {
            self.failed += 1;
        }
        emit(&Message::Boot(r));
    }
}

/// The group's cases starting at `round % len` (so the first VMM alternates between rounds).
fn rotated<T>(cases: &[T], round: u32) -> impl Iterator<Item = &T> {
    let n = cases.len().max(1);
    let k = round as usize % n;
    cases[k..].iter().chain(cases[..k].iter())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One boot of `case`; QEMU runs with the `-M` value `machine`.
fn boot(plan: &Plan, case: &Case, round: u32, warmup: bool, machine: &str) -> BootRecord {
    let argv = match case.kind {
        Kind::Qemu => with_machine(&case.argv, machine),
        Kind::Ours => case.argv.clone(),
    };
    let mut rec = BootRecord {
        group: case.group.clone(),
        kind: case.kind,
        round,
        warmup,
        qemu_machine: (case.kind == Kind::Qemu).then(|| machine.to_string()),
        vcpus: case.vcpus,
        mem_mib: case.mem_mib,
        quiet: case.quiet,
        ok: false,
        failure: None,
        first_console_ms: None,
        ready_ms: None,
        exit_ms: None,
        exit_status: None,
        vmm_metrics: None,
        console_bytes: 0,
        kernel_cmdline: None,
        warnings: vec![],
        console_tail: vec![],
        stderr_tail: vec![],
    };
    if let Some(m) = &case.metrics_file {
        let _ = std::fs::remove_file(m);
    }
    let mut child = match TimedChild::spawn(&argv, &plan.ready_marker) {
        Ok(c) => c,
        Err(e) => {
            rec.failure = Some(format!("{e:#}"));
            return rec;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(plan.boot_timeout_s);
    let exit = child.wait_exit(deadline);
    let (first, ready) = child.times();
    rec.first_console_ms = first.map(ms);
    rec.ready_ms = ready.map(ms);
    let (bytes, cmdline, power_down, warnings) = child.console_facts();
    rec.console_bytes = bytes;
    rec.kernel_cmdline = cmdline;
    rec.warnings = warnings;
    let mut problems: Vec<String> = Vec::new();
    match exit {
        Err(e) => problems.push(format!("{e:#}")),
        Ok(exit) => {
            rec.exit_ms = exit.at.map(ms);
            rec.exit_status = exit.status.as_ref().map(describe_status);
            if exit.killed {
                problems.push(format!(
                    "did not exit within {} s; killed",
                    plan.boot_timeout_s
                ));
            } else if !exit.status.is_some_and(|s| s.success()) {
                problems.push(format!(
                    "exited with {}",
                    rec.exit_status.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    if ready.is_none() {
        problems.push(format!("no {:?} line on the console", plan.ready_marker));
    }
    match case.kind {
        Kind::Ours => match case.metrics_file.as_deref().map(read_metrics) {
            Some(Ok(m)) => {
                if m.exit_reason.as_deref() != Some("poweroff") {
                    problems.push(format!(
                        "the VM ended with {:?}, not a power-off",
                        m.exit_reason
                    ));
                }
                rec.vmm_metrics = Some(m);
            }
            Some(Err(e)) => problems.push(format!("{e:#}")),
            None => problems.push("the case has no metrics file".into()),
        },
        Kind::Qemu => {
            if ready.is_some() && !power_down {
                problems.push("the guest did not print `reboot: Power down` (reset?)".into());
            }
        }
    }
    rec.ok = problems.is_empty();
    if !rec.ok {
        rec.failure = Some(problems.join("; "));
        let (console, stderr) = child.tails();
        rec.console_tail = console;
        rec.stderr_tail = stderr;
    }
    rec
}

fn read_metrics(path: &str) -> anyhow::Result<VmmMetrics> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the VMM's metrics file {path}"))?;
    serde_json::from_str(&text).with_context(|| format!("parsing the metrics file {path}: {text}"))
}

/// One memory measurement of `case`; QEMU runs with the `-M` value `machine`.
fn memory(plan: &Plan, case: &MemCase, round: u32, machine: &str) -> MemRecord {
    let argv = match case.kind {
        Kind::Qemu => with_machine(&case.argv, machine),
        Kind::Ours => case.argv.clone(),
    };
    let mut rec = MemRecord {
        kind: case.kind,
        qemu_machine: (case.kind == Kind::Qemu).then(|| machine.to_string()),
        round,
        mem_mib: case.mem_mib,
        vcpus: case.vcpus,
        ok: false,
        failure: None,
        ready_ms: None,
        smaps: None,
        vm_hwm_kib: None,
        stopped: None,
        exit_status: None,
        console_tail: vec![],
        stderr_tail: vec![],
    };
    if let Some(p) = &case.remove_before {
        let _ = std::fs::remove_file(p);
    }
    let mut child = match TimedChild::spawn(&argv, &plan.ready_marker) {
        Ok(c) => c,
        Err(e) => {
            rec.failure = Some(format!("{e:#}"));
            return rec;
        }
    };
    let mut problems: Vec<String> = Vec::new();
    let timeout = Duration::from_secs(plan.boot_timeout_s);
    match child.wait_ready(Instant::now() + timeout) {
        None => problems.push(format!(
            "no {:?} line within {} s",
            plan.ready_marker, plan.boot_timeout_s
        )),
        Some(ready) => {
            rec.ready_ms = Some(ms(ready));
            std::thread::sleep(Duration::from_millis(plan.memory_settle_ms));
            let pid = child.pid();
            match std::fs::read_to_string(format!("/proc/{pid}/smaps")) {
                Err(e) => problems.push(format!("reading /proc/{pid}/smaps: {e}")),
                Ok(text) => {
                    match smaps::parse(&text)
                        .and_then(|m| smaps::overhead(&m, u64::from(case.mem_mib) << 20))
                    {
                        Ok(o) => rec.smaps = Some(o),
                        Err(e) => problems.push(format!("/proc/{pid}/smaps: {e}")),
                    }
                }
            }
            rec.vm_hwm_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| smaps::vm_hwm_kib(&s));
        }
    }
    // Stop it the way the case says, even when the measurement failed.
    let asked = Instant::now();
    let how = match &case.stop {
        StopHow::Sigterm => {
            child.signal(libc::SIGTERM);
            "SIGTERM".to_string()
        }
        StopHow::Command(argv) => match run_quiet(argv, Duration::from_secs(30)) {
            Ok(()) => format!("`{}`", argv.join(" ")),
            Err(e) => {
                problems.push(format!("{e:#}; sending SIGTERM instead"));
                child.signal(libc::SIGTERM);
                "SIGTERM (after the stop command failed)".to_string()
            }
        },
    };
    match child.wait_exit(Instant::now() + Duration::from_secs(30)) {
        Ok(exit) => {
            rec.exit_status = exit.status.as_ref().map(describe_status);
            if exit.killed {
                problems.push(format!("still running 30 s after {how}; killed"));
                rec.stopped = Some(format!("{how}, then SIGKILL"));
            } else {
                rec.stopped = Some(format!("{how}: exited {:.0} ms later", ms(asked.elapsed())));
            }
        }
        Err(e) => problems.push(format!("{e:#}")),
    }
    rec.ok = problems.is_empty();
    if !rec.ok {
        rec.failure = Some(problems.join("; "));
        let (console, stderr) = child.tails();
        rec.console_tail = console;
        rec.stderr_tail = stderr;
    }
    rec
}

/// Runs `argv` to completion within `timeout`; an error says how it failed, with its output.
fn run_quiet(argv: &[String], timeout: Duration) -> anyhow::Result<()> {
    let mut c = TimedChild::spawn(argv, "")?;
    let exit = c.wait_exit(Instant::now() + timeout)?;
    if exit.killed || !exit.status.is_some_and(|s| s.success()) {
        let (out, err) = c.tails();
        anyhow::bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            if exit.killed {
                "timed out".to_string()
            } else {
                exit.status
                    .as_ref()
                    .map(describe_status)
                    .unwrap_or_default()
            },
            out.iter()
                .chain(err.iter())
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(())
}

/// Facts about the rig this runs in.
fn facts(plan: &Plan) -> RigFacts {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let qemu_version = if plan.qemu_version_argv.is_empty() {
        None
    } else {
        TimedChild::spawn(&plan.qemu_version_argv, "")
            .ok()
            .and_then(|mut c| {
                let exit = c.wait_exit(Instant::now() + Duration::from_secs(60)).ok()?;
                let (out, err) = c.tails();
                let first = out.into_iter().next();
                match (exit.status.is_some_and(|s| s.success()), first) {
                    (true, Some(line)) => Some(line),
                    (_, first) => Some(format!(
                        "`{}` failed: {} {}",
                        plan.qemu_version_argv.join(" "),
                        first.unwrap_or_default(),
                        err.join(" | ")
                    )),
                }
            })
    };
    RigFacts {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpus_online: read("/sys/devices/system/cpu/online").map(|s| s.trim().to_string()),
        kernel: uname_release(),
        mem_total_kib: read("/proc/meminfo").and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        }),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()),
        qemu_version,
        dev_kvm: std::path::Path::new("/dev/kvm").exists(),
    }
}

/// `uname -r`.
pub fn uname_release() -> String {
    // SAFETY: uname fills the zeroed struct; the release field is NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "unknown".into();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_alternates_the_first_case() {
        let cases = ["ours", "qemu"];
        let r0: Vec<_> = rotated(&cases, 0).copied().collect();
        let r1: Vec<_> = rotated(&cases, 1).copied().collect();
        let r2: Vec<_> = rotated(&cases, 2).copied().collect();
        assert_eq!(r0, ["ours", "qemu"]);
        assert_eq!(r1, ["qemu", "ours"]);
        assert_eq!(r2, r0);
        let none: [u8; 0] = [];
        assert_eq!(rotated(&none, 3).count(), 0);
    }

    #[test]
    fn milliseconds_keep_microseconds() {
        assert_eq!(ms(Duration::from_micros(1_234_567)), 1234.567);
    }

    #[test]
    fn a_plan_with_a_failing_and_a_passing_boot() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("m.json");
        let ok_script = format!(
            "echo boot; echo READY; printf '{{\"setup_ms\":1.5,\"first_console_ms\":2,\"ready_ms\":3,\"exit_reason\":\"poweroff\",\"exit_code\":0}}' > {}",
            metrics.display()
        );
        let plan = Plan {
            runs: 1,
            warmup: 0,
            qemu_machines: vec![],
            probe_group: 0,
            probe_runs: 0,
            boot_timeout_s: 20,
            ready_marker: "READY".into(),
            groups: vec![],
            memory: vec![],
            memory_settle_ms: 0,
            qemu_version_argv: vec![],
        };
        let case = |kind, script: &str| Case {
            group: "g".into(),
            kind,
            vcpus: 1,
            mem_mib: 16,
            quiet: true,
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            metrics_file: Some(metrics.display().to_string()),
        };
        let good = boot(&plan, &case(Kind::Ours, &ok_script), 0, false, "");
        assert!(good.ok, "{good:?}");
        assert_eq!(good.vmm_metrics.as_ref().unwrap().setup_ms, Some(1.5));
        assert!(good.ready_ms.is_some() && good.exit_ms.is_some());
        assert!(good.console_tail.is_empty());

        let bad = boot(
            &plan,
            &case(Kind::Qemu, "echo panic; exit 1"),
            0,
            false,
            "m",
        );
        assert_eq!(bad.qemu_machine.as_deref(), Some("m"));
        assert!(!bad.ok);
        let why = bad.failure.unwrap();
        assert!(
            why.contains("exited with exit 1") && why.contains("no \"READY\" line"),
            "{why}"
        );
        assert_eq!(bad.console_tail, ["panic"]);
    }
}
