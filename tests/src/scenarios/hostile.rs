//! A hostile guest under real KVM: the host inflates and deflates the balloon in a loop, then
//! the guest unbinds its balloon and vsock drivers and floods both devices with garbage queues
//! (`guest-trimmer hostile`: random descriptors, available indices far past the queue size,
//! notifies in a tight loop, resets). The VMM's RSS must stay within a fixed margin of its RSS
//! before, its log must stay short (guest-triggered warnings are thinned), its API must answer
//! during the flood, and once the flood ends its CPU use must drop back (no device left
//! spinning); the guest keeps running.

use super::{ensure, no_panic, Ctx, Outcome, READY_MARKER, READY_TIMEOUT};
use crate::proc::Proc;
use std::time::{Duration, Instant};

/// Guest RAM.
const MEM_MIB: u32 = 256;
/// Seconds each device is flooded.
const FLOOD_S: u64 = 15;
/// RSS the floods may add over the VMM's RSS before them (guest pages the tool touches,
/// allocator slack); a leak per bad request would pass this within seconds.
const RSS_MARGIN_KIB: u64 = 24 * 1024;
/// The most VMM log lines the whole scenario may produce.
const MAX_LOG_LINES: usize = 3000;
/// Printed by the guest when the floods are over.
const ALIVE_MARKER: &str = "VMM-ALIVE ";

/// `(utime + stime)` clock ticks and VmRSS KiB of `pid`.
fn cpu_and_rss(pid: i32) -> (u64, u64) {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at state (field 3).
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    (ticks, super::soak::rss_kib(pid))
}

/// CPU use (share of one CPU) and the highest RSS of `p` while pumping its output for `d`.
fn watch(p: &mut Proc, d: Duration) -> (f64, u64) {
    let pid = p.pid();
    let hz = 100.0; // USER_HZ on Linux
    let (t0, mut max_rss) = cpu_and_rss(pid);
    let start = Instant::now();
    while start.elapsed() < d {
        p.pump_for(Duration::from_millis(500));
        max_rss = max_rss.max(cpu_and_rss(pid).1);
    }
    let (t1, _) = cpu_and_rss(pid);
    (
        t1.saturating_sub(t0) as f64 / hz / start.elapsed().as_secs_f64(),
        max_rss,
    )
}

/// The scenario; see the module documentation.
pub fn flood(ctx: &Ctx) -> Outcome {
    let sock = ctx.work.join("api.sock");
    let uds = ctx.work.join("v.sock");
    let script = format!(
        "sleep 20; echo HOSTILE-FLOOD; \
         guest-trimmer hostile --device-id 5 --seconds {FLOOD_S}; \
         guest-trimmer hostile --device-id 19 --seconds {FLOOD_S}; \
         while :; do echo {ALIVE_MARKER}$(cut -d' ' -f1 /proc/uptime); sleep 1; done"
    );
    let mut args = ctx.boot_args(MEM_MIB, 1, &format!("quiet vmm_run=\"{script}\""));
    args.extend(
        [
            "--balloon",
            "amount_mib=0,free_page_reporting=true,free_page_hinting=true,stats_polling_interval_s=1",
            "--vsock-uds",
            &uds.display().to_string(),
            "--api-sock",
            &sock.display().to_string(),
        ]
        .map(String::from),
    );
    let mut p = ctx.vmm("", &args, &[])?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    let (idle_cpu, rss_idle) = watch(&mut p, Duration::from_secs(2));

    // The host drives the balloon up and down while the guest's driver follows.
    // The reference RSS is the highest seen before the flood (deflated pages the guest touched
    // again count; inflated ones were handed back).
    let mut cycles = 0;
    let mut rss_before = rss_idle;
    let loop_start = Instant::now();
    while p.find_stdout(0, "HOSTILE-FLOOD").is_none() && loop_start.elapsed().as_secs() < 60 {
        let mib = if cycles % 2 == 0 { "64" } else { "0" };
        ctx.control(&["balloon", "set", "--amount-mib", mib], &sock)?;
        p.pump_for(Duration::from_millis(800));
        rss_before = rss_before.max(cpu_and_rss(p.pid()).1);
        cycles += 1;
    }
    ctx.control(&["balloon", "set", "--amount-mib", "0"], &sock)?;
    p.wait_stdout("HOSTILE-FLOOD", Duration::from_secs(60))?;

    // The floods: sample CPU and RSS, and time an API round trip in the middle.
    let (flood_cpu, flood_rss) = watch(&mut p, Duration::from_secs(FLOOD_S / 2));
    let t = Instant::now();
    let status = status_json(ctx, &sock)?;
    let api_ms = t.elapsed().as_millis();
    let state = status["state"].as_str().unwrap_or("").to_string();
    let balloon_mid = status["balloon"].clone();
    let (flood_cpu2, flood_rss2) = watch(&mut p, Duration::from_secs(FLOOD_S / 2));
    let done = p.pump_until(Duration::from_secs(FLOOD_S * 4), |p| {
        p.stdout
            .iter()
            .filter(|(_, l)| l.contains("HOSTILE-DONE"))
            .count()
            >= 2
    });
    no_panic(&p)?;
    ensure(done, || {
        format!("the guest's floods did not both finish; {}", p.context())
    })?;
    let starts: Vec<String> = p
        .stdout
        .iter()
        .filter(|(_, l)| l.contains("HOSTILE-"))
        .map(|(_, l)| l.trim().to_string())
        .collect();
    let (_, rss_vsock) = watch(&mut p, Duration::from_secs(1));
    let max_rss = flood_rss.max(flood_rss2).max(rss_vsock);

    // After the floods: the guest runs on, the VMM calms down.
    p.wait_stdout(ALIVE_MARKER, Duration::from_secs(60))?;
    let (after_cpu, _) = watch(&mut p, Duration::from_secs(5));
    let alive = p
        .stdout
        .iter()
        .filter(|(_, l)| l.contains(ALIVE_MARKER))
        .count();
    ensure(p.running(), || {
        format!("the VMM ended during the floods; {}", p.context())
    })?;
    ensure(state.eq_ignore_ascii_case("running"), || {
        format!("the API reported {state:?} during the flood")
    })?;
    ensure(max_rss <= rss_before + RSS_MARGIN_KIB, || {
        format!(
            "the VMM's RSS rose from {rss_before} KiB to {max_rss} KiB under the flood (margin {RSS_MARGIN_KIB} KiB)"
        )
    })?;
    ensure(after_cpu < 0.5, || {
        format!(
            "the VMM still used {:.0}% CPU after the flood ended",
            after_cpu * 100.0
        )
    })?;
    ensure(p.stderr.len() <= MAX_LOG_LINES, || {
        format!(
            "the flood produced {} VMM log lines (more than {MAX_LOG_LINES}): the log is not bounded",
            p.stderr.len()
        )
    })?;
    let after = status_json(ctx, &sock)?;
    p.signal(libc::SIGKILL);
    let _ = p.wait_exit(Duration::from_secs(10));
    Ok(format!(
        "{cycles} balloon set calls (64/0 MiB); floods {starts:?}; VMM RSS {} MiB idle, {} MiB before the flood, \
         at most {} MiB during it; CPU {:.0}% idle, {:.0}%/{:.0}% flooding, {:.0}% after; API answered in {api_ms} ms \
         mid-flood; {} VMM log lines; guest alive ({alive} lines after); balloon mid-flood: activated {} counters {}; \
         after: balloon counters {}, vsock counters {}",
        rss_idle / 1024,
        rss_before / 1024,
        max_rss / 1024,
        idle_cpu * 100.0,
        flood_cpu * 100.0,
        flood_cpu2 * 100.0,
        after_cpu * 100.0,
        p.stderr.len(),
        balloon_mid["activated"],
        balloon_mid["counters"],
        after["balloon"]["counters"],
        after["vsock"]["counters"],
    ))
}

/// `vmm status --json`, parsed.
fn status_json(ctx: &Ctx, sock: &std::path::Path) -> Result<serde_json::Value, String> {
    let out = ctx.control(&["status", "--json"], sock)?;
    serde_json::from_str(&out).map_err(|e| format!("`vmm status --json` is not JSON ({e}): {out}"))
}
