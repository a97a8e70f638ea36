//! Balloon scenarios: a real guest with a virtio-balloon, driven with `vmm balloon ...` and
//! `guest-trimmer alloc`, each asserting a measured outcome (host RSS of guest memory, the
//! guest's /proc/meminfo, the balloon's page-state counts).
//!
//! The guest cannot read from the host here (the VMM's stdin is closed), so every guest script
//! moves on by itself, watching its own MemAvailable (the balloon is the signal), and prints
//! what it sees. Every guest runs a background loop printing `VMM-MEM MemTotal: N kB MemFree:
//! N kB MemAvailable: N kB` every 0.5 s. Scripts live on the kernel command line
//! (`vmm_run="..."`): no double quotes in them, and they stay well below its 2048 bytes.

use super::{ensure, no_panic, raw_http, stop_via_api, Ctx, Outcome, READY_MARKER, READY_TIMEOUT};
use crate::proc::Proc;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Prefix of the guest's meminfo lines.
const MEM_MARKER: &str = "VMM-MEM ";
/// Printed by `guest-trimmer alloc` once every page is written (MiB follow).
const ALLOC_DONE: &str = "ALLOC-DONE";
/// Printed by `guest-trimmer alloc` once the memory is freed.
const ALLOC_FREED: &str = "ALLOC-FREED";
/// The guest scripts print `VMM-ALLOC-EXIT <status>` after `guest-trimmer alloc`.
const ALLOC_EXIT: &str = "VMM-ALLOC-EXIT ";

/// Background loop printing the guest's memory every 0.5 s.
const MEM_LOOP: &str =
    "(while :; do echo VMM-MEM $(grep -E '^Mem' /proc/meminfo); sleep 0.5; done) &";
/// Shell function: the guest's MemAvailable in MiB.
const AVAIL_FN: &str = "m(){ awk '/^MemAvailable/{print int($2/1024)}' /proc/meminfo; };";

const MIB_KIB: u64 = 1024;
const PAGE: u64 = 4096;
/// A balloon operation (inflate or deflate by up to ~200 MiB) in a 1-vCPU TCG rig.
const BALLOON_TIMEOUT: Duration = Duration::from_secs(90);
/// `guest-trimmer alloc` of a few hundred MiB (random bytes, ~180 MiB/s in the rig).
const ALLOC_TIMEOUT: Duration = Duration::from_secs(120);

/// One `VMM-MEM` line.
#[derive(Debug, Clone, Copy)]
struct Mem {
    total_kib: u64,
    free_kib: u64,
    avail_kib: u64,
}

/// Parses `... VMM-MEM MemTotal: 1 kB MemFree: 2 kB MemAvailable: 3 kB`.
fn parse_mem(line: &str) -> Option<Mem> {
    let rest = &line[line.find(MEM_MARKER)? + MEM_MARKER.len()..];
    let words: Vec<&str> = rest.split_whitespace().collect();
    let field = |name: &str| {
        let i = words.iter().position(|w| *w == name)?;
        words.get(i + 1)?.parse::<u64>().ok()
    };
    Some(Mem {
        total_kib: field("MemTotal:")?,
        free_kib: field("MemFree:")?,
        avail_kib: field("MemAvailable:")?,
    })
}

/// A booted guest with a balloon and an API socket.
struct BalloonVm {
    p: Proc,
    sock: PathBuf,
    mem_mib: u32,
    pid: i32,
}

/// Boots `mem_mib` MiB / 2 vCPUs with `--balloon spec`, running `script` (after [`MEM_LOOP`]),
/// and waits for the guest to be ready.
fn boot(ctx: &Ctx, mem_mib: u32, spec: &str, script: &str) -> Result<BalloonVm, String> {
    let sock = ctx.work.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    let script = format!("{MEM_LOOP} {script}");
    ensure(!script.contains('"') && script.len() < 1500, || {
        format!("guest script unfit for the kernel command line: {script:?}")
    })?;
    let mut args = ctx.boot_args(mem_mib, 2, &format!("quiet vmm_run=\"{script}\""));
    args.extend([
        "--balloon".to_string(),
        spec.to_string(),
        "--api-sock".to_string(),
        sock.display().to_string(),
    ]);
    let mut p = ctx.vmm("", &args, &[])?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    let pid = vmm_pid(&sock)?;
    Ok(BalloonVm {
        p,
        sock,
        mem_mib,
        pid,
    })
}

/// The pid of the `vmm run ... --api-sock SOCK` process (`Proc` keeps its pid private).
fn vmm_pid(sock: &Path) -> Result<i32, String> {
    let sock = sock.display().to_string();
    let dir = std::fs::read_dir("/proc").map_err(|e| format!("reading /proc: {e}"))?;
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.get(1).map(String::as_str) == Some("run") && args.contains(&sock) {
            return Ok(pid);
        }
    }
    Err(format!(
        "no `vmm run ... --api-sock {sock}` process in /proc"
    ))
}

impl BalloonVm {
    /// RSS (KiB) of the VMM's anonymous mapping whose size is the guest's memory.
    fn guest_rss_kib(&self) -> Result<u64, String> {
        let path = format!("/proc/{}/smaps", self.pid);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        let want = u64::from(self.mem_mib) * MIB_KIB;
        let kib = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        };
        let (mut size, mut sizes) = (None, Vec::new());
        for line in text.lines() {
            if line.starts_with("Size:") {
                size = kib(line);
                sizes.extend(size);
            } else if line.starts_with("Rss:") && size == Some(want) {
                return kib(line).ok_or_else(|| format!("unreadable {path} line {line:?}"));
            }
        }
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes.truncate(5);
        Err(format!(
            "no mapping of {want} KiB (the guest memory) in {path}; largest: {sizes:?} KiB"
        ))
    }

    /// The guest's `VMM-MEM` lines so far.
    fn mems(&self) -> Vec<Mem> {
        self.p
            .stdout
            .iter()
            .filter_map(|(_, l)| parse_mem(l))
            .collect()
    }

    /// The newest `VMM-MEM` line that arrived at or after `after`, waiting up to 5 s for one.
    fn mem_after(&mut self, after: Instant) -> Result<Mem, String> {
        let got = self.p.pump_until(Duration::from_secs(5), |p| {
            p.stdout
                .iter()
                .any(|(at, l)| *at >= after && l.contains(MEM_MARKER))
        });
        ensure(got, || {
            format!(
                "no VMM-MEM line from the guest for 5 s; {}",
                self.p.context()
            )
        })?;
        Ok(*self.mems().last().expect("one was just seen"))
    }

    /// `GET path` on the API socket, parsed.
    fn get(&self, path: &str) -> Result<Value, String> {
        let resp = raw_http(
            &self.sock,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        )?;
        let status = resp.lines().next().unwrap_or("").to_string();
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        ensure(status.split_whitespace().nth(1) == Some("200"), || {
            format!("GET {path}: {status:?}, body {body:?}")
        })?;
        serde_json::from_str(body).map_err(|e| format!("GET {path}: not JSON ({e}): {body:?}"))
    }

    /// `status.<field>` of `GET /balloon` as a number.
    fn balloon_field(&self, field: &str) -> Result<u64, String> {
        let v = self.get("/balloon")?;
        v.pointer(&format!("/status/{field}"))
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("GET /balloon has no numeric status.{field}: {v}"))
    }

    /// `vmm balloon set --amount-mib N`, then waits until the guest's balloon holds N MiB.
    fn set_and_wait(&mut self, ctx: &Ctx, mib: u32) -> Result<Duration, String> {
        let t0 = Instant::now();
        ctx.control(
            &["balloon", "set", "--amount-mib", &mib.to_string()],
            &self.sock,
        )?;
        let deadline = t0 + BALLOON_TIMEOUT;
        let mut actual = u64::MAX;
        while Instant::now() < deadline {
            actual = self.balloon_field("actual_mib")?;
            if actual == u64::from(mib) {
                return Ok(t0.elapsed());
            }
            self.p.pump_for(Duration::from_millis(500));
            ensure(self.p.exit.is_none(), || {
                format!("the VMM exited; {}", self.p.context())
            })?;
        }
        Err(format!(
            "balloon actual_mib {actual} after {} s, target {mib}; {}",
            BALLOON_TIMEOUT.as_secs(),
            self.p.context()
        ))
    }

    /// Waits for `VMM-ALLOC-EXIT <n>` and returns n.
    fn alloc_exit(&mut self, timeout: Duration) -> Result<i32, String> {
        let i = self.p.wait_stdout(ALLOC_EXIT, timeout)?;
        let line = &self.p.stdout[i].1;
        line[line.find(ALLOC_EXIT).expect("found") + ALLOC_EXIT.len()..]
            .trim()
            .parse()
            .map_err(|_| format!("unreadable {line:?}"))
    }

    /// The number after `marker` on its first console line.
    fn number_after(&mut self, marker: &str, timeout: Duration) -> Result<u64, String> {
        let i = self.p.wait_stdout(marker, timeout)?;
        let line = &self.p.stdout[i].1;
        line[line.find(marker).expect("found") + marker.len()..]
            .split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| format!("no number after {marker:?} in {line:?}"))
    }

    /// Stops the VM through the API and checks it exits cleanly.
    fn stop(mut self, ctx: &Ctx) -> Result<(), String> {
        stop_via_api(ctx, &mut self.p, &self.sock)?;
        no_panic(&self.p)
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------

/// Free page reporting: memory the guest frees leaves the host within seconds.
pub(super) fn reporting_returns_memory(ctx: &Ctx) -> Outcome {
    const ALLOC_MIB: u64 = 300;
    const DROP_MIB: u64 = 250;
    const WITHIN: Duration = Duration::from_secs(10);
    let mut vm = boot(
        ctx,
        512,
        "amount_mib=0,free_page_reporting=true",
        &format!(
            "sleep 1; guest-trimmer alloc --mib {ALLOC_MIB} --hold-s 2; echo {ALLOC_EXIT}$?; sleep 60"
        ),
    )?;
    let base = vm.guest_rss_kib()?;
    vm.p.wait_stdout(ALLOC_DONE, ALLOC_TIMEOUT)?;
    let mut peak = vm.guest_rss_kib()?;
    while vm.p.find_stdout(0, ALLOC_FREED).is_none() {
        ensure(vm.p.running(), || {
            format!("the VMM exited before {ALLOC_FREED}; {}", vm.p.context())
        })?;
        ensure(
            vm.p.started.elapsed() < READY_TIMEOUT + ALLOC_TIMEOUT,
            || format!("no {ALLOC_FREED} in time; {}", vm.p.context()),
        )?;
        vm.p.pump_for(Duration::from_millis(100));
        peak = peak.max(vm.guest_rss_kib()?);
    }
    let freed_at = vm.p.stdout[vm.p.find_stdout(0, ALLOC_FREED).expect("seen")].0;
    let mut samples = Vec::new();
    let dropped_at = loop {
        let rss = vm.guest_rss_kib()?;
        let now = Instant::now();
        samples.push((now.saturating_duration_since(freed_at), rss));
        if rss + DROP_MIB * MIB_KIB <= peak {
            break Some(now);
        }
        if now.saturating_duration_since(freed_at) > WITHIN {
            break None;
        }
        vm.p.pump_for(Duration::from_millis(100));
    };
    let reported = vm.balloon_field("page_states/reported_pages")?;
    let trace: Vec<String> = samples
        .iter()
        .step_by((samples.len() / 12).max(1))
        .map(|(t, r)| format!("{:.1}s:{:.0}", t.as_secs_f64(), mib(*r)))
        .collect();
    let last = samples.last().map_or(peak, |s| s.1);
    let Some(dropped_at) = dropped_at else {
        return Err(format!(
            "guest-memory RSS went from {:.0} MiB (peak) to {:.0} MiB within {} s after {ALLOC_FREED} \
             (wanted a drop of >= {DROP_MIB} MiB); boot RSS {:.0} MiB; Reported pages {reported}; \
             samples (s after free: MiB) {}; {}",
            mib(peak),
            mib(last),
            WITHIN.as_secs(),
            mib(base),
            trace.join(" "),
            vm.p.context()
        ));
    };
    let code = vm.alloc_exit(Duration::from_secs(10))?;
    ensure(code == 0, || {
        format!("guest-trimmer alloc exited {code}; {}", vm.p.context())
    })?;
    vm.stop(ctx)?;
    Ok(format!(
        "guest-memory RSS: boot {:.0} MiB, peak {:.0} MiB with {ALLOC_MIB} MiB allocated, {:.0} MiB \
         {} ms after {ALLOC_FREED} (drop {:.0} MiB >= {DROP_MIB}); Reported pages {reported} \
         ({:.0} MiB)",
        mib(base),
        mib(peak),
        mib(last),
        dropped_at.saturating_duration_since(freed_at).as_millis(),
        mib(peak - last),
        (reported * PAGE) as f64 / (1 << 20) as f64
    ))
}

/// Inflate to 128 MiB: the guest's MemAvailable drops by that much and the host RSS does not
/// grow; deflate to 0: the guest can allocate the memory again.
pub(super) fn inflate_deflate(ctx: &Ctx) -> Outcome {
    const TARGET: u32 = 128;
    let mut vm = boot(
        ctx,
        512,
        "amount_mib=0,deflate_on_oom=false",
        &format!(
            "{AVAIL_FN} sleep 1; a=$(m); echo VMM-BASE $a; \
             while [ $(m) -gt $((a-100)) ]; do sleep 0.2; done; echo VMM-INFLATED; \
             while [ $(m) -lt $((a-20)) ]; do sleep 0.2; done; echo VMM-DEFLATED; \
             guest-trimmer alloc --mib $((a-64)) --hold-s 1; echo {ALLOC_EXIT}$?; sleep 60"
        ),
    )?;
    let base_avail = vm.number_after("VMM-BASE ", Duration::from_secs(30))?;
    let before = vm.mem_after(Instant::now())?;
    let rss0 = vm.guest_rss_kib()?;
    let took = vm.set_and_wait(ctx, TARGET)?;
    vm.p.wait_stdout("VMM-INFLATED", Duration::from_secs(30))?;
    // A line printed a full period after the balloon reached its size.
    let after = vm.mem_after(Instant::now() + Duration::from_millis(600))?;
    let rss1 = vm.guest_rss_kib()?;
    let drop_mib = mib(before.avail_kib.saturating_sub(after.avail_kib));
    let want = f64::from(TARGET);
    ensure((want * 0.9..=want * 1.1).contains(&drop_mib), || {
        format!(
            "inflating to {TARGET} MiB dropped MemAvailable by {drop_mib:.1} MiB ({} -> {} kB), \
             wanted {TARGET} ±10%; {}",
            before.avail_kib,
            after.avail_kib,
            vm.p.context()
        )
    })?;
    ensure(rss1 <= rss0 + 8 * MIB_KIB, || {
        format!(
            "guest-memory RSS grew from {:.1} to {:.1} MiB while inflating",
            mib(rss0),
            mib(rss1)
        )
    })?;
    let took_back = vm.set_and_wait(ctx, 0)?;
    vm.p.wait_stdout("VMM-DEFLATED", Duration::from_secs(30))?;
    let deflated = vm.mem_after(Instant::now())?;
    vm.p.wait_stdout(ALLOC_DONE, ALLOC_TIMEOUT)?;
    let code = vm.alloc_exit(Duration::from_secs(30))?;
    ensure(code == 0, || {
        format!(
            "after deflating, `guest-trimmer alloc --mib {}` exited {code}; {}",
            base_avail - 64,
            vm.p.context()
        )
    })?;
    vm.stop(ctx)?;
    Ok(format!(
        "inflate to {TARGET} MiB in {:.1} s: MemAvailable {:.1} -> {:.1} MiB (drop {drop_mib:.1}), \
         MemTotal {:.1} -> {:.1} MiB, guest-memory RSS {:.1} -> {:.1} MiB; deflate to 0 in {:.1} s: \
         MemAvailable {:.1} MiB; then allocated {} MiB (more than fit while inflated)",
        took.as_secs_f64(),
        mib(before.avail_kib),
        mib(after.avail_kib),
        mib(before.total_kib),
        mib(after.total_kib),
        mib(rss0),
        mib(rss1),
        took_back.as_secs_f64(),
        mib(deflated.avail_kib),
        base_avail - 64
    ))
}

/// What the deflate-on-OOM runs measured.
struct OomRun {
    vm: BalloonVm,
    target: u32,
    avail_inflated: u64,
    actual_inflated: u64,
}

/// 256 MiB guest, balloon inflated to min(200, MemAvailable - 40) MiB (the guest computes the
/// same number and prints it), then the guest allocates [`OOM_ALLOC_MIB`].
const OOM_ALLOC_MIB: u64 = 120;

fn oom_run(ctx: &Ctx, deflate_on_oom: bool) -> Result<OomRun, String> {
    let mut vm = boot(
        ctx,
        256,
        &format!("amount_mib=0,deflate_on_oom={deflate_on_oom}"),
        &format!(
            "{AVAIL_FN} sleep 1; a=$(m); t=$((a-40)); [ $t -gt 200 ] && t=200; echo VMM-TARGET $t; \
             while [ $(m) -gt $((a-t+16)) ]; do sleep 0.2; done; sleep 2; echo VMM-INFLATED $(m); \
             guest-trimmer alloc --mib {OOM_ALLOC_MIB} --hold-s 2; echo {ALLOC_EXIT}$?; sleep 60"
        ),
    )?;
    let target = vm.number_after("VMM-TARGET ", Duration::from_secs(30))? as u32;
    ensure(target >= 100, || {
        format!("the guest has too little memory for this test: target {target} MiB")
    })?;
    vm.set_and_wait(ctx, target)?;
    let avail_inflated = vm.number_after("VMM-INFLATED ", Duration::from_secs(30))?;
    let actual_inflated = vm.balloon_field("actual_mib")?;
    ensure(avail_inflated + 16 < OOM_ALLOC_MIB, || {
        format!(
            "with the balloon at {actual_inflated} MiB the guest still has {avail_inflated} MiB \
             available: allocating {OOM_ALLOC_MIB} MiB would prove nothing"
        )
    })?;
    Ok(OomRun {
        vm,
        target,
        avail_inflated,
        actual_inflated,
    })
}

/// deflate_on_oom=true: an allocation larger than what is left succeeds; the balloon shrinks.
pub(super) fn deflate_on_oom(ctx: &Ctx) -> Outcome {
    let OomRun {
        mut vm,
        target,
        avail_inflated,
        actual_inflated,
    } = oom_run(ctx, true)?;
    vm.p.wait_stdout(ALLOC_DONE, ALLOC_TIMEOUT)?;
    let actual_alloc = vm.balloon_field("actual_mib")?;
    let code = vm.alloc_exit(Duration::from_secs(30))?;
    ensure(code == 0, || {
        format!(
            "`guest-trimmer alloc --mib {OOM_ALLOC_MIB}` exited {code} with deflate_on_oom=true; {}",
            vm.p.context()
        )
    })?;
    ensure(actual_alloc < actual_inflated, || {
        format!(
            "the allocation succeeded but the balloon did not deflate: actual_mib {actual_inflated} \
             -> {actual_alloc}"
        )
    })?;
    vm.stop(ctx)?;
    Ok(format!(
        "256 MiB guest, balloon target {target} MiB (actual {actual_inflated}), MemAvailable {avail_inflated} \
         MiB; alloc {OOM_ALLOC_MIB} MiB succeeded, balloon deflated to {actual_alloc} MiB"
    ))
}

/// Control for [`deflate_on_oom`]: with deflate_on_oom=false the same allocation is OOM-killed
/// and the balloon keeps its size.
pub(super) fn oom_without_deflate(ctx: &Ctx) -> Outcome {
    let OomRun {
        mut vm,
        target,
        avail_inflated,
        actual_inflated,
    } = oom_run(ctx, false)?;
    let code = vm.alloc_exit(ALLOC_TIMEOUT)?;
    let done = vm.p.find_stdout(0, ALLOC_DONE).is_some();
    ensure(code != 0 && !done, || {
        format!(
            "`guest-trimmer alloc --mib {OOM_ALLOC_MIB}` exited {code} (ALLOC-DONE seen: {done}) \
             with deflate_on_oom=false and {avail_inflated} MiB available; {}",
            vm.p.context()
        )
    })?;
    let actual_after = vm.balloon_field("actual_mib")?;
    ensure(actual_after == actual_inflated, || {
        format!(
            "deflate_on_oom=false, yet the balloon went {actual_inflated} -> {actual_after} MiB"
        )
    })?;
    let killed =
        vm.p.stdout
            .iter()
            .any(|(_, l)| l.contains("Out of memory") || l.contains("oom-kill"));
    vm.stop(ctx)?;
    Ok(format!(
        "256 MiB guest, balloon target {target} MiB (actual {actual_inflated}), MemAvailable {avail_inflated} \
         MiB; alloc {OOM_ALLOC_MIB} MiB exited {code}{}; balloon stayed at {actual_after} MiB",
        if killed { " (OOM killer on the console)" } else { "" }
    ))
}

/// Statistics: the guest's reported total and free memory match its /proc/meminfo.
pub(super) fn statistics(ctx: &Ctx) -> Outcome {
    let mut vm = boot(
        ctx,
        512,
        "amount_mib=0,stats_polling_interval_s=1",
        "sleep 120",
    )?;
    // Let the guest send a few statistics.
    vm.p.pump_for(Duration::from_secs(3));
    let mut last_err = String::new();
    for attempt in 1..=4 {
        let asked = Instant::now();
        let out = ctx.control(&["balloon", "stats", "--json"], &vm.sock)?;
        let stats: Value = serde_json::from_str(&out)
            .map_err(|e| format!("`vmm balloon stats --json` is not JSON ({e}): {out:?}"))?;
        let field = |k: &str| stats.get(k).and_then(Value::as_u64);
        let (Some(total), Some(free)) = (field("total_memory_bytes"), field("free_memory_bytes"))
        else {
            return Err(format!(
                "`vmm balloon stats --json` lacks total_memory_bytes or free_memory_bytes: {stats}"
            ));
        };
        let mem = vm.mem_after(asked)?;
        let (total_kib, free_kib) = (total / 1024, free / 1024);
        let total_err = (total_kib as f64 - mem.total_kib as f64).abs() / mem.total_kib as f64;
        let free_err = (free_kib as f64 - mem.free_kib as f64).abs() / mem.free_kib as f64;
        let summary = format!(
            "stats total {total_kib} kB vs MemTotal {} kB ({:.2}%), free {free_kib} kB vs MemFree {} kB \
             ({:.2}%)",
            mem.total_kib,
            total_err * 100.0,
            mem.free_kib,
            free_err * 100.0
        );
        if total_err <= 0.01 && free_err <= 0.10 {
            vm.stop(ctx)?;
            return Ok(format!("attempt {attempt}: {summary}"));
        }
        last_err = summary;
        vm.p.pump_for(Duration::from_secs(1));
    }
    Err(format!(
        "4 attempts, last: {last_err} (limits 1% and 10%); {}",
        vm.p.context()
    ))
}

/// Free page hinting: a hinting run marks most of the guest's free memory Hinted; memory the
/// guest writes afterwards turns Live again (the VMM's dirty log), so the Hinted count drops by
/// about what the guest allocated.
///
/// The guest watches its MemFree: it dips while the run holds the hinted pages and comes back
/// when the run ends; 4 s later the guest allocates [`HINT_WRITE_MIB`] and holds it.
pub(super) fn hinting(ctx: &Ctx) -> Outcome {
    const HINT_WRITE_MIB: u64 = 100;
    let mut vm = boot(
        ctx,
        512,
        "amount_mib=0,free_page_hinting=true",
        &format!(
            "f(){{ awk '/^MemFree/{{print int($2/1024)}}' /proc/meminfo; }}; sleep 1; b=$(f); \
             while [ $(f) -gt $((b/2)) ]; do sleep 0.2; done; echo VMM-HINTING $(f); \
             while [ $(f) -lt $((b*9/10)) ]; do sleep 0.2; done; echo VMM-HINTED $(f); sleep 4; \
             guest-trimmer alloc --mib {HINT_WRITE_MIB} --hold-s 15; echo {ALLOC_EXIT}$?; sleep 60"
        ),
    )?;
    vm.p.pump_for(Duration::from_secs(2));
    let t0 = Instant::now();
    ctx.control(&["balloon", "hint", "start"], &vm.sock)?;
    let deadline = t0 + BALLOON_TIMEOUT;
    let status = loop {
        let s = vm.get("/balloon/hinting/status")?;
        let phase = s
            .get("phase")
            .and_then(Value::as_str)
            .unwrap_or("")
            .replace('_', "")
            .to_lowercase();
        let running = s.get("running").and_then(Value::as_bool).unwrap_or(true);
        let hinted = s.get("pages_hinted").and_then(Value::as_u64).unwrap_or(0);
        if !running && matches!(phase.as_str(), "gueststopped" | "idle") && hinted > 0 {
            break s;
        }
        ensure(Instant::now() < deadline, || {
            format!(
                "the hinting run did not finish in {} s: {s}; {}",
                BALLOON_TIMEOUT.as_secs(),
                vm.p.context()
            )
        })?;
        vm.p.pump_for(Duration::from_millis(300));
    };
    let took = t0.elapsed();
    // The guest got its hinted pages back when the run ended: compare with MemFree after that.
    vm.p.wait_stdout("VMM-HINTED ", Duration::from_secs(30))?;
    let mem = vm.mem_after(Instant::now())?;
    let hinted = vm.balloon_field("page_states/hinted_pages")?;
    let hinted_kib = hinted * PAGE / 1024;
    let ratio = hinted_kib as f64 / mem.free_kib as f64;
    ensure(ratio >= 0.5, || {
        format!(
            "Hinted pages {hinted} ({:.1} MiB) are {:.0}% of the guest's MemFree {:.1} MiB (wanted >= 50%); \
             hinting status {status}",
            mib(hinted_kib),
            ratio * 100.0,
            mib(mem.free_kib)
        )
    })?;

    // The guest writes HINT_WRITE_MIB: those pages must leave Hinted within a few dirty-log
    // syncs.
    vm.p.wait_stdout(ALLOC_DONE, ALLOC_TIMEOUT)?;
    let written_at = Instant::now();
    let want = HINT_WRITE_MIB as f64;
    let (lo, hi) = (want * 0.7, want * 1.3);
    let mut drop_mib = 0.0;
    let mut hinted_after = hinted;
    while written_at.elapsed() < Duration::from_secs(8) {
        vm.p.pump_for(Duration::from_millis(500));
        hinted_after = vm.balloon_field("page_states/hinted_pages")?;
        drop_mib = (hinted.saturating_sub(hinted_after) * PAGE) as f64 / (1 << 20) as f64;
        if drop_mib >= lo {
            // One more sync for the stragglers, then take the figure.
            vm.p.pump_for(Duration::from_millis(1500));
            hinted_after = vm.balloon_field("page_states/hinted_pages")?;
            drop_mib = (hinted.saturating_sub(hinted_after) * PAGE) as f64 / (1 << 20) as f64;
            break;
        }
    }
    ensure((lo..=hi).contains(&drop_mib), || {
        format!(
            "after the guest wrote {HINT_WRITE_MIB} MiB, Hinted went {hinted} -> {hinted_after} pages \
             (a drop of {drop_mib:.1} MiB; wanted {lo:.0}-{hi:.0} MiB); {}",
            vm.p.context()
        )
    })?;
    let code = vm.alloc_exit(Duration::from_secs(40))?;
    ensure(code == 0, || {
        format!("guest-trimmer alloc exited {code}; {}", vm.p.context())
    })?;
    vm.stop(ctx)?;
    Ok(format!(
        "hinting run finished in {:.1} s ({} pages in the run); Hinted {:.1} MiB = {:.0}% of MemFree {:.1} MiB; \
         after the guest wrote {HINT_WRITE_MIB} MiB, Hinted dropped by {drop_mib:.1} MiB to {:.1} MiB",
        took.as_secs_f64(),
        status.get("pages_hinted").and_then(Value::as_u64).unwrap_or(0),
        mib(hinted_kib),
        ratio * 100.0,
        mib(mem.free_kib),
        (hinted_after * PAGE) as f64 / (1 << 20) as f64
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_lines_parse() {
        let m =
            parse_mem("[x] VMM-MEM MemTotal: 493996 kB MemFree: 400000 kB MemAvailable: 420000 kB")
                .unwrap();
        assert_eq!(
            (m.total_kib, m.free_kib, m.avail_kib),
            (493996, 400000, 420000)
        );
        assert!(parse_mem("VMM-MEM MemTotal: 1 kB").is_none());
        assert!(parse_mem("nothing").is_none());
    }

    #[test]
    fn guest_scripts_fit_the_command_line() {
        for s in [MEM_LOOP, AVAIL_FN] {
            assert!(!s.contains('"'), "{s}");
        }
    }
}
