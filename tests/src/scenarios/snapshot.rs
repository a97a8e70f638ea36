//! Snapshot scenarios: a real guest writes a 64 MiB random buffer in tmpfs (guest RAM) and
//! re-hashes it in a loop, printing `VMM-HASH <sha256> <uptime>`; the host snapshots it with
//! `vmm snapshot`, SIGKILLs the VMM, restores with `vmm restore` and checks the restored guest
//! prints the same hash with a later uptime (memory, vCPU state, console and clock carried
//! over). Bad input: damaged, truncated, foreign and other-version snapshots are refused with an
//! error naming the file (and chunk); an interrupted snapshot leaves the previous one whole.

mod lazy;
mod load;
mod working_set;
pub use lazy::lazy_uffd;
pub use load::serve_load;
pub use working_set::working_set;

use super::{ensure, no_panic, Ctx, Outcome, READY_MARKER, READY_TIMEOUT};
use crate::proc::{describe, Proc};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Printed once by the guest: the buffer's hash right after writing it.
const HASH0_MARKER: &str = "VMM-HASH0 ";
/// Printed by the guest's loop: `VMM-HASH <sha256> <uptime seconds>`.
const HASH_MARKER: &str = "VMM-HASH ";
/// A snapshot request (pause, write, answer), generous for the rig.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// From `vmm restore` to the restored guest's next two full hash lines: two clones with
/// 2 vCPUs each hash 64 MiB on the rig's one emulated CPU, which a loaded host slows a lot.
const RESTORED_TIMEOUT: Duration = Duration::from_secs(240);

/// The guest script: 64 MiB of random bytes in /tmp, its hash, then hash + uptime forever.
const HASH_SCRIPT: &str = "dd if=/dev/urandom of=/tmp/buf bs=1M count=64 2>/dev/null; \
     echo VMM-HASH0 $(sha256sum /tmp/buf | cut -c1-64); \
     while :; do h=$(sha256sum /tmp/buf | cut -c1-64); echo VMM-HASH $h $(cut -d' ' -f1 /proc/uptime); \
     echo VMM-RAND $(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n') $(devmem 0xff000 64)$(devmem 0xff008 64) $(dmesg | grep -c 'machine fork'); sleep 1; done";

/// `(hash, uptime)` of each `VMM-HASH` line of `p`.
pub(super) fn hashes(p: &Proc) -> Vec<(String, f64)> {
    p.stdout
        .iter()
        .filter_map(|(_, l)| {
            let rest = &l[l.find(HASH_MARKER)? + HASH_MARKER.len()..];
            let mut words = rest.split_whitespace();
            let hash = words.next()?.to_string();
            let uptime = words.next()?.parse().ok()?;
            (hash.len() == 64).then_some((hash, uptime))
        })
        .collect()
}

/// Printed by the guest's loop after each hash: `VMM-RAND <32 random bytes, hex> <VMGenID>
/// <count of "crng reseeded due to virtual machine fork" kernel messages>`.
const RAND_MARKER: &str = "VMM-RAND ";

/// `(random hex, vmgenid, reseed messages)` of each `VMM-RAND` line of `p` after line `from`.
pub(super) fn rands(p: &Proc, from: usize) -> Vec<(String, String, u32)> {
    p.stdout[from.min(p.stdout.len())..]
        .iter()
        .filter_map(|(_, l)| {
            let rest = &l[l.find(RAND_MARKER)? + RAND_MARKER.len()..];
            let mut words = rest.split_whitespace();
            let random = words.next()?.to_string();
            let genid = words.next()?.to_string();
            let reseeds = words.next()?.parse().ok()?;
            (random.len() == 64).then_some((random, genid, reseeds))
        })
        .collect()
}

/// A guest running [`HASH_SCRIPT`] with an API socket, its reference hash printed.
pub(super) struct HashVm {
    pub(super) p: Proc,
    pub(super) sock: PathBuf,
    pub(super) hash0: String,
}

pub(super) fn boot_hash_vm(
    ctx: &Ctx,
    suffix: &str,
    mem_mib: u32,
    vcpus: u32,
) -> Result<HashVm, String> {
    boot_hash_vm_with(ctx, suffix, mem_mib, vcpus, "", &[])
}

/// [`boot_hash_vm`] running `before` ahead of the hash script, with extra `vmm run` flags.
fn boot_hash_vm_with(
    ctx: &Ctx,
    suffix: &str,
    mem_mib: u32,
    vcpus: u32,
    before: &str,
    flags: &[&str],
) -> Result<HashVm, String> {
    let sock = ctx.work.join(format!("api-{suffix}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut args = ctx.boot_args(
        mem_mib,
        vcpus,
        &format!("quiet vmm_run=\"{before}{HASH_SCRIPT}\""),
    );
    args.extend(flags.iter().map(|f| f.to_string()));
    args.extend(["--api-sock".to_string(), sock.display().to_string()]);
    let mut p = ctx.vmm(suffix, &args, &[])?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    let i = p.wait_stdout(HASH0_MARKER, Duration::from_secs(120))?;
    let line = &p.stdout[i].1;
    let hash0 = line[line.find(HASH0_MARKER).expect("matched") + HASH0_MARKER.len()..]
        .trim()
        .to_string();
    ensure(hash0.len() == 64, || format!("bad VMM-HASH0 line {line:?}"))?;
    let looping = p.pump_until(Duration::from_secs(120), |p| !rands(p, 0).is_empty());
    ensure(looping, || {
        format!(
            "no VMM-HASH and VMM-RAND lines after VMM-HASH0; {}",
            p.context()
        )
    })?;
    Ok(HashVm { p, sock, hash0 })
}

/// `vmm snapshot --api-sock SOCK --out DIR --after AFTER --json`, returning the summary.
pub(super) fn snapshot(
    ctx: &Ctx,
    sock: &Path,
    dir: &Path,
    after: &str,
) -> Result<serde_json::Value, String> {
    let args: Vec<String> = [
        "snapshot",
        "--api-sock",
        &sock.display().to_string(),
        "--out",
        &dir.display().to_string(),
        "--after",
        after,
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = ctx.vmm("snapshot", &args, &[])?;
    let st = p.wait_exit(SNAPSHOT_TIMEOUT)?;
    no_panic(&p)?;
    ensure(st.code() == Some(0), || {
        format!(
            "`vmm snapshot` ended with {}; {}",
            describe(&st),
            p.context()
        )
    })?;
    p.stdout
        .iter()
        .rev()
        .find_map(|(_, l)| serde_json::from_str(l.trim()).ok())
        .ok_or_else(|| format!("`vmm snapshot --json` printed no JSON; {}", p.context()))
}

/// `vmm inspect DIR --json`: (exit code, parsed JSON if any, stderr).
pub(super) fn inspect(
    ctx: &Ctx,
    dir: &Path,
) -> Result<(i32, Option<serde_json::Value>, String), String> {
    let args = vec![
        "inspect".to_string(),
        dir.display().to_string(),
        "--json".to_string(),
    ];
    let mut p = ctx.vmm("inspect", &args, &[])?;
    let st = p.wait_exit(Duration::from_secs(60))?;
    no_panic(&p)?;
    let text: String = p
        .stdout
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    Ok((
        st.code().unwrap_or(-1),
        serde_json::from_str(&text).ok(),
        p.stderr_text(),
    ))
}

/// Starts `vmm restore --snapshot DIR`.
pub(super) fn restore(ctx: &Ctx, suffix: &str, dir: &Path) -> Result<Proc, String> {
    let args = vec![
        "restore".to_string(),
        "--snapshot".to_string(),
        dir.display().to_string(),
    ];
    ctx.vmm(suffix, &args, &[])
}

/// Waits for the restored guest to print the reference hash with an uptime past `after_uptime`,
/// then a later line (its clock moves on). Returns the two uptimes.
pub(super) fn check_restored(
    p: &mut Proc,
    hash0: &str,
    after_uptime: f64,
) -> Result<(f64, f64), String> {
    let fresh = |p: &Proc| {
        hashes(p)
            .into_iter()
            .filter(|(_, up)| *up >= after_uptime)
            .collect::<Vec<_>>()
    };
    let got = p.pump_until(RESTORED_TIMEOUT, |p| fresh(p).len() >= 2);
    no_panic(p)?;
    ensure(got, || {
        format!(
            "the restored guest printed fewer than 2 VMM-HASH lines after uptime {after_uptime}; {}",
            p.context()
        )
    })?;
    let lines = fresh(p);
    for (hash, up) in &lines {
        ensure(hash == hash0, || {
            format!("restored guest hashed {hash} at uptime {up}, the buffer was {hash0}")
        })?;
    }
    ensure(lines[1].1 > lines[0].1, || {
        format!("the restored guest's clock did not move on: {lines:?}")
    })?;
    Ok((lines[0].1, lines[1].1))
}

/// Snapshot, SIGKILL, restore (twice at once with `clones`), check hash, console and clock.
fn round_trip(ctx: &Ctx, vcpus: u32, clones: usize) -> Outcome {
    let mut vm = boot_hash_vm(ctx, "", 256, vcpus)?;
    let dir = ctx.work.join("snap");
    let summary = snapshot(ctx, &vm.sock, &dir, "pause")?;
    let last_uptime = hashes(&vm.p).last().map(|h| h.1).unwrap_or(0.0);
    vm.p.signal(libc::SIGKILL);
    vm.p.wait_exit(Duration::from_secs(10))?;
    let kept = summary
        .pointer("/pages/kept")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    ensure(kept * 4096 >= 64 << 20, || {
        format!("the snapshot kept {kept} pages, fewer than the 64 MiB buffer: {summary}")
    })?;
    let (code, report, err) = inspect(ctx, &dir)?;
    ensure(code == 0, || format!("vmm inspect exit {code}: {err}"))?;
    let ok = report
        .as_ref()
        .and_then(|r| r.pointer("/checksums/ok"))
        .and_then(|v| v.as_bool());
    ensure(ok == Some(true), || {
        format!("inspect: checksums not ok: {report:?}")
    })?;

    let mut restored: Vec<Proc> = (0..clones)
        .map(|i| restore(ctx, &format!("clone{i}"), &dir))
        .collect::<Result<_, _>>()?;
    let mut details = Vec::new();
    let original = rands(&vm.p, 0);
    let original_genid = original.last().map(|r| r.1.clone()).unwrap_or_default();
    let original_reseeds = original.last().map(|r| r.2).unwrap_or(0);
    let mut clone_rands = Vec::new();
    for p in &mut restored {
        let (first, second) = check_restored(p, &vm.hash0, last_uptime)?;
        details.push(format!(
            "uptime {last_uptime:.1} -> {first:.1} -> {second:.1}"
        ));
        // The first VMM-RAND line after the clone's first full hash: its random bytes were read
        // after the restore (a line printed right after the restore may hold bytes the
        // original read before the snapshot).
        let first_hash = p
            .stdout
            .iter()
            .position(|(_, l)| l.contains(HASH_MARKER))
            .unwrap_or(0);
        let got = p.pump_until(Duration::from_secs(60), |p| {
            !rands(p, first_hash).is_empty()
        });
        ensure(got, || {
            format!("no VMM-RAND line from the clone; {}", p.context())
        })?;
        clone_rands.push(rands(p, first_hash)[0].clone());
    }
    if clones >= 2 {
        let (a, b) = (&clone_rands[0], &clone_rands[1]);
        ensure(a.0 != b.0, || {
            format!(
                "two clones read the same /dev/urandom bytes after restore: {}",
                a.0
            )
        })?;
        for (i, c) in clone_rands.iter().enumerate() {
            ensure(c.1 != original_genid && !original_genid.is_empty(), || {
                format!(
                    "clone {i}'s VMGenID {} is the original's {original_genid}",
                    c.1
                )
            })?;
            ensure(c.2 > original_reseeds, || {
                format!("clone {i}'s kernel logged no new VM fork reseed (VMGenID notify): {c:?}, original had {original_reseeds}")
            })?;
        }
        ensure(a.1 != b.1, || format!("both clones have VMGenID {}", a.1))?;
        details.push(format!(
            "clones read different urandom bytes ({}… vs {}…), VMGenIDs {} / {} (original {original_genid}), kernel reseeded",
            &a.0[..8],
            &b.0[..8],
            a.1,
            b.1
        ));
    }
    for p in &mut restored {
        stop_clone(p)?;
    }
    Ok(format!(
        "{vcpus} vCPU(s): snapshot kept {kept} pages ({} bytes memory file, {:.0} ms); {} clone(s) re-hashed {}…: {}",
        summary.get("memory_file_bytes").cloned().unwrap_or_default(),
        summary.get("write_ms").and_then(|v| v.as_f64()).unwrap_or(0.0),
        clones,
        &vm.hash0[..12],
        details.join("; ")
    ))
}

/// Round trip with 1 vCPU.
pub fn round_trip_1vcpu(ctx: &Ctx) -> Outcome {
    round_trip(ctx, 1, 1)
}

/// Round trip with 2 vCPUs, two clones restored from the snapshot at the same time.
pub fn round_trip_2vcpu_two_clones(ctx: &Ctx) -> Outcome {
    round_trip(ctx, 2, 2)
}

/// Stops a restored VMM with SIGTERM and checks it exits 0 without a panic.
pub(super) fn stop_clone(p: &mut Proc) -> Result<(), String> {
    p.signal(libc::SIGTERM);
    let st = p.wait_exit(Duration::from_secs(20))?;
    no_panic(p)?;
    ensure(st.code() == Some(0), || {
        format!(
            "restored VMM after SIGTERM: {}; {}",
            describe(&st),
            p.context()
        )
    })
}

/// Copies snapshot directory `from` to `to` (two files).
pub(super) fn copy_snapshot(from: &Path, to: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).map_err(|e| format!("mkdir {}: {e}", to.display()))?;
    for name in ["state", "memory"] {
        std::fs::copy(from.join(name), to.join(name))
            .map_err(|e| format!("copying {name}: {e}"))?;
    }
    Ok(())
}

/// The memory chunks `(file_offset, len_bytes)` of a snapshot's state file, in file order
/// (read by the VMM's own state reader: its header and checksum are checked too).
fn memory_chunks(dir: &Path) -> Result<Vec<(u64, u64)>, String> {
    let state = vmm::snapshot::reader::read_state(dir)
        .map_err(|e| format!("reading the state of {}: {e}", dir.display()))?;
    Ok(state
        .state
        .memory
        .chunks
        .iter()
        .map(|c| (c.file_offset, c.len_bytes))
        .collect())
}

/// Flips one bit at `offset` of `path`.
fn flip(path: &Path, offset: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset)
        .and_then(|()| f.write_all_at(&[b[0] ^ 0x10], offset))
        .map_err(|e| format!("flipping a byte of {}: {e}", path.display()))
}

/// `vmm restore` of `dir` must fail fast with an error containing every one of `words`.
fn expect_refused(ctx: &Ctx, what: &str, dir: &Path, words: &[&str]) -> Result<String, String> {
    let mut p = restore(ctx, what, dir)?;
    let st = p.wait_exit(Duration::from_secs(60))?;
    no_panic(&p)?;
    ensure(st.code().is_some_and(|c| c != 0), || {
        format!(
            "{what}: restore did not fail ({}); {}",
            describe(&st),
            p.context()
        )
    })?;
    let line = p
        .stderr
        .iter()
        .find(|l| l.contains("vmm: error:"))
        .cloned()
        .ok_or_else(|| format!("{what}: no `vmm: error:` line; {}", p.context()))?;
    for word in words {
        ensure(line.contains(word), || {
            format!("{what}: the error does not mention {word:?}: {line}")
        })?;
    }
    Ok(format!("{what}: refused"))
}

/// Damaged, truncated, foreign and other-version snapshots are refused; a full disk fails the
/// snapshot cleanly; a VMM killed while writing leaves the previous snapshot whole.
pub fn bad_input(ctx: &Ctx) -> Outcome {
    let mut vm = boot_hash_vm(ctx, "", 192, 1)?;
    let good = ctx.work.join("good");
    let other = ctx.work.join("other");
    snapshot(ctx, &vm.sock, &good, "resume")?;
    snapshot(ctx, &vm.sock, &other, "resume")?;
    let mut seen = Vec::new();

    let case = ctx.work.join("case");
    copy_snapshot(&good, &case)?;
    flip(&case.join("state"), 200)?;
    seen.push(expect_refused(
        ctx,
        "state-flip",
        &case,
        &["state", "checksum"],
    )?);

    copy_snapshot(&good, &case)?;
    let mem_len = std::fs::metadata(case.join("memory"))
        .map_err(|e| e.to_string())?
        .len();
    let chunks = memory_chunks(&good)?;
    let (last_offset, last_len) = *chunks.last().ok_or("the snapshot kept no memory")?;
    flip(&case.join("memory"), last_offset + last_len / 2)?;
    seen.push(expect_refused(
        ctx,
        "memory-flip",
        &case,
        &["memory", "chunk"],
    )?);

    // A byte in a hole between chunks (left out pages the file stores as holes, which must
    // read zero). A booted guest's kept pages are scattered: short gaps must exist.
    let hole = chunks
        .windows(2)
        .find(|w| w[1].0 > w[0].0 + w[0].1)
        .map(|w| w[0].0 + w[0].1)
        .ok_or("the memory file has no hole between its chunks")?;
    copy_snapshot(&good, &case)?;
    flip(&case.join("memory"), hole + 100)?;
    seen.push(expect_refused(
        ctx,
        "memory-hole-flip",
        &case,
        &["memory", "hole", "corrupt"],
    )?);

    copy_snapshot(&good, &case)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(case.join("memory"))
        .and_then(|f| f.set_len(mem_len / 2))
        .map_err(|e| format!("truncating: {e}"))?;
    seen.push(expect_refused(
        ctx,
        "memory-truncated",
        &case,
        &["memory", "truncated"],
    )?);

    copy_snapshot(&good, &case)?;
    let state_len = std::fs::metadata(case.join("state"))
        .map_err(|e| e.to_string())?
        .len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(case.join("state"))
        .and_then(|f| f.set_len(state_len - 100))
        .map_err(|e| format!("truncating: {e}"))?;
    seen.push(expect_refused(
        ctx,
        "state-truncated",
        &case,
        &["state", "truncated"],
    )?);

    copy_snapshot(&good, &case)?;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(case.join("state"))
            .map_err(|e| e.to_string())?;
        f.write_all_at(&99u32.to_le_bytes(), 8)
            .map_err(|e| e.to_string())?;
    }
    seen.push(expect_refused(
        ctx,
        "other-version",
        &case,
        &["state", "version 99"],
    )?);

    copy_snapshot(&good, &case)?;
    std::fs::copy(other.join("memory"), case.join("memory")).map_err(|e| e.to_string())?;
    seen.push(expect_refused(
        ctx,
        "foreign-memory",
        &case,
        &["memory", "belongs to snapshot"],
    )?);

    // A full small tmpfs: the snapshot fails clearly, leaves nothing there, the VM runs on.
    let small = ctx.work.join("small");
    std::fs::create_dir_all(&small).map_err(|e| e.to_string())?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&small)
        .status()
        .map_err(|e| format!("running mount: {e}"))?;
    ensure(mounted.success(), || {
        format!("mounting a small tmpfs failed: {mounted}")
    })?;
    let full_dir = small.join("snap");
    let full = snapshot(ctx, &vm.sock, &full_dir, "resume");
    let leftovers: Vec<_> = std::fs::read_dir(&small)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let _ = std::process::Command::new("umount").arg(&small).status();
    let err = match full {
        Ok(s) => return Err(format!("a snapshot into an 8 MiB tmpfs succeeded: {s}")),
        Err(e) => e,
    };
    ensure(
        err.contains("No space left") || err.contains("space"),
        || format!("the full-disk error does not say so: {err}"),
    )?;
    ensure(leftovers.is_empty(), || {
        format!("the failed snapshot left {leftovers:?} in the full tmpfs")
    })?;
    let n = hashes(&vm.p).len();
    let alive =
        vm.p.pump_until(Duration::from_secs(60), |p| hashes(p).len() > n);
    ensure(alive, || {
        format!(
            "the VM stopped printing after the failed snapshot; {}",
            vm.p.context()
        )
    })?;
    seen.push("full-tmpfs: clear error, nothing left, VM still running".into());

    // SIGKILL while writing over `good`: `good` stays whole and restorable.
    let args: Vec<String> = [
        "snapshot",
        "--api-sock",
        &vm.sock.display().to_string(),
        "--out",
        &good.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut writer = ctx.vmm("snapshot-killed", &args, &[])?;
    std::thread::sleep(Duration::from_millis(300));
    vm.p.signal(libc::SIGKILL);
    vm.p.wait_exit(Duration::from_secs(10))?;
    let _ = writer.wait_exit(Duration::from_secs(30));
    let (code, report, err) = inspect(ctx, &good)?;
    ensure(code == 0, || {
        format!("after the killed snapshot, inspect exit {code}: {err}")
    })?;
    let ok = report
        .as_ref()
        .and_then(|r| r.pointer("/checksums/ok"))
        .and_then(|v| v.as_bool());
    ensure(ok == Some(true), || {
        format!("previous snapshot damaged: {report:?}")
    })?;
    let mut clone = restore(ctx, "after-kill", &good)?;
    check_restored(&mut clone, &vm.hash0, 0.0)?;
    clone.signal(libc::SIGKILL);
    let _ = clone.wait_exit(Duration::from_secs(10));
    seen.push("killed-while-writing: previous snapshot verifies and restores".into());
    Ok(seen.join("; "))
}

/// A freshly booted 1 GiB guest snapshots to about the memory it touched: the memory file takes
/// no more disk than the guest's used memory (MemTotal − MemFree) plus what the kernel reserved
/// outside MemTotal, and is far smaller than guest RAM.
pub fn fresh_1gib_is_compact(ctx: &Ctx) -> Outcome {
    const MEM_MIB: u64 = 1024;
    let sock = ctx.work.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    let script = "while :; do echo VMM-MEMINFO $(awk '/^MemTotal|^MemFree/{print $2}' /proc/meminfo); sleep 1; done";
    let mut args = ctx.boot_args(MEM_MIB as u32, 1, &format!("quiet vmm_run=\"{script}\""));
    args.extend(["--api-sock".to_string(), sock.display().to_string()]);
    let mut p = ctx.vmm("", &args, &[])?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    let meminfo = |p: &Proc| {
        p.stdout.iter().rev().find_map(|(_, l)| {
            let rest = &l[l.find("VMM-MEMINFO ")? + "VMM-MEMINFO ".len()..];
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            (v.len() == 2).then(|| (v[0], v[1]))
        })
    };
    let got = p.pump_until(Duration::from_secs(60), |p| meminfo(p).is_some());
    ensure(got, || format!("no VMM-MEMINFO line; {}", p.context()))?;
    let dir = ctx.work.join("snap");
    let summary = snapshot(ctx, &sock, &dir, "stop")?;
    let (total_kib, free_kib) = meminfo(&p).expect("seen");
    let st = p.wait_exit(Duration::from_secs(30))?;
    no_panic(&p)?;
    ensure(st.code() == Some(0), || {
        format!(
            "after `vmm snapshot --after stop`: {}; {}",
            describe(&st),
            p.context()
        )
    })?;
    let file = summary
        .get("memory_file_bytes")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| format!("no memory_file_bytes in {summary}"))?;
    // What the snapshot costs is its disk blocks: the file's apparent size also counts the
    // holes between kept ranges, which take none.
    let on_disk = std::fs::metadata(dir.join("memory"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .map_err(|e| format!("stat {}: {e}", dir.join("memory").display()))?;
    let used = (total_kib - free_kib) * 1024;
    let reserved = (MEM_MIB << 20).saturating_sub(total_kib * 1024);
    let bound = used + reserved + (16 << 20);
    ensure(on_disk <= bound, || {
        format!(
            "memory file {on_disk} bytes on disk > used {used} + kernel-reserved {reserved} + 16 MiB: {summary}"
        )
    })?;
    ensure(file < (MEM_MIB << 20) / 4, || {
        format!("memory file {file} bytes is not much smaller than {MEM_MIB} MiB of RAM")
    })?;
    Ok(format!(
        "1 GiB guest: memory file {:.1} MiB ({:.1} MiB on disk) for {:.1} MiB used + {:.1} MiB kernel-reserved; pages {}",
        file as f64 / 1048576.0,
        on_disk as f64 / 1048576.0,
        used as f64 / 1048576.0,
        reserved as f64 / 1048576.0,
        summary.get("pages").cloned().unwrap_or_default()
    ))
}

/// After the guest frees 300 MiB that free page reporting hands back, the memory file is
/// smaller than guest RAM by at least that much; the balloon (device, transport, page-state
/// map) is restored with the rest and the clone re-hashes its buffer.
pub fn reported_memory_is_left_out(ctx: &Ctx) -> Outcome {
    const MEM_MIB: u64 = 512;
    const FREED_MIB: u64 = 300;
    let mut vm = boot_hash_vm_with(
        ctx,
        "",
        MEM_MIB as u32,
        1,
        &format!("guest-trimmer alloc --mib {FREED_MIB} --hold-s 1; sleep 4; "),
        &["--balloon", "amount_mib=0,free_page_reporting=true"],
    )?;
    // Reporting runs ~2 s after the free; the hash loop started after 4 s more. Wait until the
    // balloon has most of the freed memory as reported.
    let reported_mib = |sock: &Path| -> Result<u64, String> {
        let resp = super::raw_http(sock, "GET /balloon HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let v: serde_json::Value =
            serde_json::from_str(body).map_err(|e| format!("GET /balloon: {e}: {body:?}"))?;
        v.pointer("/status/page_states/reported_pages")
            .and_then(|p| p.as_u64())
            .map(|pages| (pages * 4096) >> 20)
            .ok_or_else(|| format!("GET /balloon has no reported_pages: {v}"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut reported = reported_mib(&vm.sock)?;
    while reported < FREED_MIB * 8 / 10 && std::time::Instant::now() < deadline {
        vm.p.pump_for(Duration::from_millis(500));
        reported = reported_mib(&vm.sock)?;
    }
    ensure(reported >= FREED_MIB * 8 / 10, || {
        format!("only {reported} MiB reported after freeing {FREED_MIB} MiB")
    })?;
    let dir = ctx.work.join("snap");
    let summary = snapshot(ctx, &vm.sock, &dir, "pause")?;
    let last_uptime = hashes(&vm.p).last().map(|h| h.1).unwrap_or(0.0);
    vm.p.signal(libc::SIGKILL);
    vm.p.wait_exit(Duration::from_secs(10))?;
    let file = summary
        .get("memory_file_bytes")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| format!("no memory_file_bytes in {summary}"))?;
    let skipped_reported = summary
        .pointer("/pages/skipped_reported")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let on_disk = std::fs::metadata(dir.join("memory"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(u64::MAX);
    ensure(on_disk + (FREED_MIB << 20) <= MEM_MIB << 20, || {
        format!(
            "memory file takes {on_disk} bytes on disk, not {FREED_MIB} MiB less than {MEM_MIB} MiB of RAM: {summary}"
        )
    })?;
    let mut clone = restore(ctx, "clone", &dir)?;
    check_restored(&mut clone, &vm.hash0, last_uptime)?;
    stop_clone(&mut clone)?;
    Ok(format!(
        "{reported} MiB reported; memory file {:.1} MiB ({:.1} MiB on disk) for {MEM_MIB} MiB of RAM, {:.1} MiB skipped as reported; the clone with the restored balloon re-hashed its buffer",
        file as f64 / 1048576.0,
        on_disk as f64 / 1048576.0,
        (skipped_reported * 4096) as f64 / 1048576.0
    ))
}

/// One JSON ping to the guest's `guest-trimmer serve` endpoint (port 52) through the VM's
/// vsock unix socket.
fn vsock_ping(uds: &Path) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    let (s, _) = vsock::connect_to_guest(uds, 52, Some(Duration::from_secs(20)))
        .map_err(|e| format!("connecting to guest port 52: {e}"))?;
    let mut writer = s.try_clone().map_err(|e| e.to_string())?;
    writer
        .write_all(b"{\"op\":\"ping\"}\n")
        .map_err(|e| format!("sending a ping: {e}"))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("reading the ping reply: {e}"))?;
    ensure(line.contains("\"ok\":true"), || {
        format!("unexpected ping reply {line:?}")
    })
}

/// Retries [`vsock_ping`] for up to `limit`.
fn vsock_ping_within(uds: &Path, limit: Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match vsock_ping(uds) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// A VM with a vsock device: snapshot, SIGKILL, restore; the restored guest re-hashes its
/// buffer and its vsock endpoint answers again after the transport reset.
pub fn with_vsock(ctx: &Ctx) -> Outcome {
    let uds = ctx.work.join("v.sock");
    let uds_arg = uds.display().to_string();
    let mut vm = boot_hash_vm_with(ctx, "", 256, 1, "", &["--vsock-uds", &uds_arg])?;
    vsock_ping_within(&uds, Duration::from_secs(30)).map_err(|e| format!("before: {e}"))?;
    let dir = ctx.work.join("snap");
    snapshot(ctx, &vm.sock, &dir, "pause")?;
    let last_uptime = hashes(&vm.p).last().map(|h| h.1).unwrap_or(0.0);
    vm.p.signal(libc::SIGKILL);
    vm.p.wait_exit(Duration::from_secs(10))?;
    // The killed VMM could not remove its socket file.
    let _ = std::fs::remove_file(&uds);
    let mut clone = restore(ctx, "clone", &dir)?;
    check_restored(&mut clone, &vm.hash0, last_uptime)?;
    vsock_ping_within(&uds, Duration::from_secs(60)).map_err(|e| {
        format!(
            "the restored guest's vsock endpoint: {e}; {}",
            clone.context()
        )
    })?;
    stop_clone(&mut clone)?;
    Ok("vsock endpoint answered before the snapshot and after the restore (transport reset); the clone re-hashed its buffer".into())
}
