//! A short soak under real KVM (CI's version of `bench soak`): cycles of restore → guest work →
//! snapshot over the same path (or SIGKILL), checking that the VMM's open files, all open files
//! on the machine, the VMM's RSS and the disk use stay flat; then clones from one snapshot run at
//! once and each reads different /dev/urandom bytes after its restore.

use super::snapshot::{restore, snapshot, stop_clone};
use super::{ensure, no_panic, Ctx, Outcome, READY_MARKER, READY_TIMEOUT};
use crate::proc::Proc;
use std::path::Path;
use std::time::Duration;

/// Cycles in CI (`bench soak` runs 200).
const CYCLES: usize = 8;
/// Clones at once in CI (`bench soak` runs 20).
const CLONES: usize = 5;
/// Guest RAM: small, so many clones fit in the rig.
const MEM_MIB: u32 = 128;
/// Console line of the guest's loop: `SOAK-TICK <uptime> <16 random bytes, hex>`.
const TICK_MARKER: &str = "SOAK-TICK ";
/// The guest's work: rewrite 4 MiB of tmpfs, print uptime and fresh random bytes, every second.
const SOAK_SCRIPT: &str = "while :; do dd if=/dev/urandom of=/tmp/work bs=1M count=4 2>/dev/null; \
     echo SOAK-TICK $(cut -d' ' -f1 /proc/uptime) $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); sleep 1; done";

/// `(uptime, random hex)` of each tick line of `p` from line `from`.
fn ticks(p: &Proc, from: usize) -> Vec<(f64, String)> {
    p.stdout[from.min(p.stdout.len())..]
        .iter()
        .filter_map(|(_, l)| {
            let rest = &l[l.find(TICK_MARKER)? + TICK_MARKER.len()..];
            let mut w = rest.split_whitespace();
            let up = w.next()?.parse().ok()?;
            let hex = w.next()?.to_string();
            (hex.len() == 32).then_some((up, hex))
        })
        .collect()
}

/// Open file descriptors of `pid`.
fn fds_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Open file descriptors of every process on the machine.
fn fds_total() -> usize {
    std::fs::read_dir("/proc").map_or(0, |d| {
        d.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .map(fds_of)
            .sum()
    })
}

/// VmRSS of `pid` in KiB (0 when it cannot be read).
pub(super) fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Bytes allocated on disk under `dir` (st_blocks), recursively.
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => disk_bytes(&e.path()),
                Ok(m) => m.blocks() * 512,
                Err(_) => 0,
            })
            .sum()
    })
}

/// What one cycle measured just before its snapshot or kill.
#[derive(Debug)]
struct Sample {
    vmm_fds: usize,
    all_fds: usize,
    rss_kib: u64,
    disk_bytes: u64,
}

/// Waits for a tick printed after the restore (uptime past `after`): the guest works again.
fn wait_working(p: &mut Proc, after: f64) -> Result<f64, String> {
    let fresh = |p: &Proc| ticks(p, 0).into_iter().find(|t| t.0 > after);
    let got = p.pump_until(Duration::from_secs(90), |p| fresh(p).is_some());
    no_panic(p)?;
    ensure(got, || {
        format!(
            "no SOAK-TICK past uptime {after} after the restore; {}",
            p.context()
        )
    })?;
    Ok(fresh(p).map(|t| t.0).unwrap_or(after))
}

/// Restores from the snapshot at `snap` with an API socket `sock`.
fn restore_with_api(ctx: &Ctx, tag: &str, snap: &Path, sock: &Path) -> Result<Proc, String> {
    let _ = std::fs::remove_file(sock);
    let args: Vec<String> = [
        "restore",
        "--snapshot",
        &snap.display().to_string(),
        "--api-sock",
        &sock.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ctx.vmm(tag, &args, &[])
}

/// The short soak; see the module documentation.
pub fn short(ctx: &Ctx) -> Outcome {
    let sock = ctx.work.join("api.sock");
    let store = ctx.work.join("store");
    std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
    let snap = store.join("snap");
    let mut args = ctx.boot_args(MEM_MIB, 1, &format!("quiet vmm_run=\"{SOAK_SCRIPT}\""));
    args.extend(["--api-sock".to_string(), sock.display().to_string()]);
    let mut vm = ctx.vmm("boot", &args, &[])?;
    vm.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    let mut uptime = wait_working(&mut vm, 0.0)?;
    snapshot(ctx, &sock, &snap, "stop")?;
    vm.wait_exit(Duration::from_secs(30))?;

    let mut samples = Vec::new();
    for cycle in 0..CYCLES {
        let mut p = restore_with_api(ctx, &format!("cycle{cycle}"), &snap, &sock)?;
        uptime = wait_working(&mut p, uptime)?;
        samples.push(Sample {
            vmm_fds: fds_of(p.pid()),
            all_fds: fds_total(),
            rss_kib: rss_kib(p.pid()),
            disk_bytes: disk_bytes(&store),
        });
        if cycle % 2 == 0 {
            // Over the snapshot this VMM was restored from (and still maps).
            snapshot(ctx, &sock, &snap, "stop")?;
            p.wait_exit(Duration::from_secs(30))?;
        } else {
            p.signal(libc::SIGKILL);
            p.wait_exit(Duration::from_secs(10))?;
        }
        no_panic(&p)?;
    }
    let first = &samples[1];
    let last = samples.last().expect("cycles ran");
    let max_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let min_rss = samples.iter().map(|s| s.rss_kib).min().unwrap_or(0);
    let max_disk = samples.iter().map(|s| s.disk_bytes).max().unwrap_or(0);
    let min_disk = samples.iter().map(|s| s.disk_bytes).min().unwrap_or(0);
    ensure(
        samples.iter().skip(1).all(|s| s.vmm_fds == first.vmm_fds),
        || format!("the VMM's open files changed between cycles: {samples:?}"),
    )?;
    ensure(last.all_fds <= first.all_fds + 8, || {
        format!("open files on the machine grew: {samples:?}")
    })?;
    ensure(max_rss <= min_rss + 16 * 1024, || {
        format!("the VMM's RSS grew by more than 16 MiB over the cycles: {samples:?}")
    })?;
    ensure(max_disk <= min_disk + (1 << 20), || {
        format!("disk use grew over the cycles: {samples:?}")
    })?;

    // Clones from the one snapshot, at once: each reads its own random bytes.
    let mut clones: Vec<Proc> = (0..CLONES)
        .map(|i| restore(ctx, &format!("clone{i}"), &snap))
        .collect::<Result<_, _>>()?;
    let mut randoms = Vec::new();
    for (i, p) in clones.iter_mut().enumerate() {
        // The first tick after a restore may hold bytes read before the snapshot: take the
        // second one this clone printed.
        let got = p.pump_until(Duration::from_secs(120), |p| ticks(p, 0).len() >= 2);
        no_panic(p)?;
        ensure(got, || {
            format!("clone {i} printed fewer than 2 ticks; {}", p.context())
        })?;
        randoms.push(ticks(p, 0)[1].1.clone());
    }
    let mut distinct = randoms.clone();
    distinct.sort();
    distinct.dedup();
    ensure(distinct.len() == randoms.len(), || {
        format!("clones read the same /dev/urandom bytes: {randoms:?}")
    })?;
    for p in &mut clones {
        stop_clone(p)?;
    }
    Ok(format!(
        "{CYCLES} cycles (snapshot over the restored-from path / SIGKILL alternately): VMM fds {} → {}, \
         all fds {} → {}, VMM RSS {}..{} MiB, disk {:.1}..{:.1} MiB; {CLONES} clones at once read distinct urandom bytes",
        first.vmm_fds,
        last.vmm_fds,
        first.all_fds,
        last.all_fds,
        min_rss / 1024,
        max_rss / 1024,
        min_disk as f64 / 1048576.0,
        max_disk as f64 / 1048576.0
    ))
}
