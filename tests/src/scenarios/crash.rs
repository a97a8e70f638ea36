//! Crash safety of snapshot writing under real KVM: the VMM is SIGKILLed at a random moment while
//! it writes a snapshot over a previous one. After every kill the path must still hold a complete
//! snapshot whose checksums verify (the previous one, or the new one when the write finished
//! before the kill), never a half-written one; the last one is restored and re-hashes the
//! guest's buffer; the next successful snapshot sweeps the killed writers' hidden temporaries.
//! `bench crash` (bench/rig/crash.sh) runs the same trial many more times.

use super::snapshot::{boot_hash_vm, check_restored, copy_snapshot, inspect, snapshot, stop_clone};
use super::{ensure, no_panic, Ctx, Outcome};
use crate::proc::Proc;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Kill trials in CI (each one restore, one interrupted snapshot and one `vmm inspect`).
const TRIALS: u32 = 5;
/// A restored VMM answering `vmm status` as running.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

/// A small xorshift generator: the kill delays only need to spread, and the seed is reported so
/// a failing trial can be replayed.
struct Rng(u64);

impl Rng {
    fn from_clock() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Rng(nanos | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// `vmm restore --snapshot DIR --api-sock SOCK --skip-memory-verify` (the source is a snapshot
/// already verified), waiting until the API reports it running.
fn restore_serving(ctx: &Ctx, suffix: &str, dir: &Path, sock: &Path) -> Result<Proc, String> {
    let _ = std::fs::remove_file(sock);
    let args: Vec<String> = [
        "restore",
        "--snapshot",
        &dir.display().to_string(),
        "--api-sock",
        &sock.display().to_string(),
        "--skip-memory-verify",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = ctx.vmm(suffix, &args, &[])?;
    let deadline = Instant::now() + RUNNING_TIMEOUT;
    loop {
        if sock.exists()
            && ctx
                .state(sock)
                .is_ok_and(|s| s.eq_ignore_ascii_case("running"))
        {
            return Ok(p);
        }
        if Instant::now() > deadline || !p.running() {
            return Err(format!(
                "the restored VMM {suffix} did not report running; {}",
                p.context()
            ));
        }
        p.pump_for(Duration::from_millis(200));
    }
}

/// The snapshot ID at `dir` if `vmm inspect` verifies every checksum there.
fn verified_id(ctx: &Ctx, dir: &Path) -> Result<String, String> {
    let (code, report, err) = inspect(ctx, dir)?;
    let ok = report
        .as_ref()
        .and_then(|r| r.pointer("/checksums/ok"))
        .and_then(|v| v.as_bool());
    ensure(code == 0 && ok == Some(true), || {
        format!(
            "{} does not verify (inspect exit {code}): {report:?} {err}",
            dir.display()
        )
    })?;
    report
        .as_ref()
        .and_then(|r| r.get("snapshot_id"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("inspect printed no snapshot_id: {report:?}"))
}

/// The hidden temporary directories snapshot writers left next to `target`.
fn temporaries(target: &Path) -> Vec<PathBuf> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let prefix = format!(".{name}.tmp-");
    let parent = target.parent().unwrap_or(Path::new("."));
    std::fs::read_dir(parent)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// What one kill trial found at the path.
#[derive(Debug, PartialEq)]
enum Found {
    /// The previous snapshot, whole.
    Previous,
    /// The new snapshot, whole: the write finished before the kill.
    New,
}

/// One trial: restore `base`, start a snapshot into `target`, SIGKILL the VMM after `delay`,
/// then check `target` verifies and is the previous or the new snapshot.
fn trial(
    ctx: &Ctx,
    i: u32,
    base: &Path,
    target: &Path,
    previous_id: &str,
    delay: Duration,
) -> Result<(Found, String), String> {
    let sock = ctx.work.join(format!("trial{i}.sock"));
    let mut vm = restore_serving(ctx, &format!("trial{i}"), base, &sock)?;
    let args: Vec<String> = [
        "snapshot",
        "--api-sock",
        &sock.display().to_string(),
        "--out",
        &target.display().to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut writer = ctx.vmm(&format!("trial{i}-snapshot"), &args, &[])?;
    std::thread::sleep(delay);
    vm.signal(libc::SIGKILL);
    vm.wait_exit(Duration::from_secs(10))?;
    let _ = writer.wait_exit(Duration::from_secs(30));
    no_panic(&writer)?;
    let id = verified_id(ctx, target).map_err(|e| {
        format!(
            "trial {i} (kill after {} ms): the snapshot path is damaged: {e}",
            delay.as_millis()
        )
    })?;
    let found = if id == previous_id {
        Found::Previous
    } else {
        Found::New
    };
    Ok((found, id))
}

/// SIGKILL while writing, [`TRIALS`] times at random delays; see the module documentation.
pub fn kill_while_writing(ctx: &Ctx) -> Outcome {
    let mut vm = boot_hash_vm(ctx, "", 192, 1)?;
    let base = ctx.work.join("base");
    let summary = snapshot(ctx, &vm.sock, &base, "pause")?;
    vm.p.signal(libc::SIGKILL);
    vm.p.wait_exit(Duration::from_secs(10))?;
    let write_ms = summary
        .get("write_ms")
        .and_then(|v| v.as_f64())
        .unwrap_or(1000.0);
    let target = ctx.work.join("target");
    copy_snapshot(&base, &target)?;
    let mut previous = verified_id(ctx, &target)?;

    // Kill anywhere from the request to a little after a whole write would have ended.
    let span_ms = (write_ms * 1.5) as u64 + 300;
    let mut rng = Rng::from_clock();
    let seed = rng.0;
    let mut kept = 0;
    let mut replaced = 0;
    let mut delays = Vec::new();
    for i in 0..TRIALS {
        let delay = Duration::from_millis(rng.below(span_ms));
        let (found, id) = trial(ctx, i, &base, &target, &previous, delay)?;
        delays.push(format!("{}ms:{found:?}", delay.as_millis()));
        match found {
            Found::Previous => kept += 1,
            Found::New => replaced += 1,
        }
        previous = id;
    }
    let left = temporaries(&target).len();

    // The surviving snapshot restores and holds the guest's buffer; a finished snapshot from it
    // sweeps the killed writers' temporaries.
    let sock = ctx.work.join("final.sock");
    let mut clone = restore_serving(ctx, "final", &target, &sock)?;
    check_restored(&mut clone, &vm.hash0, 0.0)?;
    snapshot(ctx, &sock, &target, "resume")?;
    let after = temporaries(&target);
    ensure(after.is_empty(), || {
        format!("a finished snapshot left the killed writers' temporaries {after:?}")
    })?;
    stop_clone(&mut clone)?;
    Ok(format!(
        "{TRIALS} kills at random delays in 0..{span_ms} ms (seed {seed:#x}; whole write {write_ms:.0} ms): \
         path held the previous snapshot {kept}x, the finished new one {replaced}x, never a damaged one \
         [{}]; {left} hidden temporaries left by kills, swept by the next snapshot; the survivor restored and re-hashed",
        delays.join(" ")
    ))
}
