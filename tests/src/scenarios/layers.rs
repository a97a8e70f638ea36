//! Layered (diff) snapshots on a real guest: a base, a layer with new data, a layer with more
//! data and part of the first data freed (free page reporting), each taken from a VM restored
//! from the one before. The guest advances a phase each time its VM generation ID changes (each
//! restore) and prints the hashes of its files; the chain must restore them all, the freed pages
//! must resolve to zero (not the base's data), the layers must be small, `vmm flatten` must
//! give a snapshot equal to the chain page for page, and a changed parent must be refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::snapshot::{copy_snapshot, inspect, stop_clone};
use super::{ensure, no_panic, Ctx, Outcome, READY_MARKER, READY_TIMEOUT};
use crate::proc::{describe, Proc};

/// Guest RAM of the scenario.
const MEM_MIB: u32 = 256;
/// One phase of the guest script (hashing and writing MiBs under nested TCG).
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
/// `vmm snapshot`, `vmm flatten`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Phase 0 writes A (a1 8 MiB, a2 24 MiB); after the 1st restore B (8 MiB); after the 2nd C
/// (8 MiB) and deletes a2, and hashes B again (the first restore of a layer); after every later
/// restore it prints the hashes it has. B's lines end with a short hash of each of its MiBs,
/// so that a mismatch says where.
const SCRIPT: &str = "g=$(devmem 0xff000 64); \
     m() { i=0; while [ $i -lt 8 ]; do dd if=$1 bs=1M skip=$i count=1 2>/dev/null | md5sum | cut -c1-8; i=$((i+1)); done | tr '\\n' ' '; }; \
     dd if=/dev/urandom of=/tmp/a1 bs=1M count=8 2>/dev/null; \
     dd if=/dev/urandom of=/tmp/a2 bs=1M count=24 2>/dev/null; \
     echo VMM-LA $(sha256sum /tmp/a1 | cut -c1-64); \
     w() { while [ $(devmem 0xff000 64) = $g ]; do sleep 1; done; g=$(devmem 0xff000 64); }; \
     w; dd if=/dev/urandom of=/tmp/b bs=1M count=8 2>/dev/null; \
     echo VMM-LB $(sha256sum /tmp/b | cut -c1-64) $(m /tmp/b); \
     w; dd if=/dev/urandom of=/tmp/c bs=1M count=8 2>/dev/null; rm /tmp/a2; \
     echo VMM-LC $(sha256sum /tmp/c | cut -c1-64) $(sha256sum /tmp/b | cut -c1-64) $(m /tmp/b); \
     while :; do w; echo VMM-CHECK $(sha256sum /tmp/a1 | cut -c1-64) $(sha256sum /tmp/b | cut -c1-64) $(sha256sum /tmp/c | cut -c1-64) $(ls /tmp/a2 2>/dev/null | wc -l) $(m /tmp/b); done";

/// Number of words before B's per-MiB hashes on a `VMM-LB`, `VMM-LC` and `VMM-CHECK` line.
const LB_WORDS: usize = 1;
const LC_WORDS: usize = 2;
const CHECK_WORDS: usize = 4;

/// Which MiBs of B differ between two lines' per-MiB hashes (`expected` from `VMM-LB`).
fn b_mib_diff(expected: &[String], got: &[String]) -> String {
    let bad: Vec<String> = expected
        .iter()
        .zip(got)
        .enumerate()
        .filter(|(_, (e, g))| e != g)
        .map(|(i, _)| i.to_string())
        .collect();
    format!("B's MiBs that differ: [{}]", bad.join(","))
}

/// The 64-hex-digit words after `marker` on the first line of `p` from line `from` holding it.
fn words_after(p: &Proc, from: usize, marker: &str) -> Option<Vec<String>> {
    p.stdout[from.min(p.stdout.len())..]
        .iter()
        .find_map(|(_, l)| {
            let rest = &l[l.find(marker)? + marker.len()..];
            Some(rest.split_whitespace().map(str::to_string).collect())
        })
}

/// Waits for `marker` and returns its words.
fn wait_words(p: &mut Proc, marker: &str) -> Result<Vec<String>, String> {
    let from = p.stdout.len();
    let got = p.pump_until(PHASE_TIMEOUT, |p| words_after(p, from, marker).is_some());
    no_panic(p)?;
    ensure(got, || format!("no {marker:?} line; {}", p.context()))?;
    Ok(words_after(p, from, marker).expect("seen"))
}

/// Runs a `vmm` subcommand to its end: (exit code, stdout, stderr).
fn run(ctx: &Ctx, tag: &str, args: &[String]) -> Result<(i32, String, String), String> {
    let mut p = ctx.vmm(tag, args, &[])?;
    let st = p.wait_exit(COMMAND_TIMEOUT)?;
    no_panic(&p)?;
    let out: Vec<_> = p.stdout.iter().map(|(_, l)| l.as_str()).collect();
    Ok((st.code().unwrap_or(-1), out.join("\n"), p.stderr_text()))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `vmm snapshot --after stop [--parent P] --json`; Ok(summary) or Err(stderr) when it failed.
fn snapshot(
    ctx: &Ctx,
    sock: &Path,
    out: &Path,
    parent: Option<&Path>,
    after: &str,
) -> Result<Result<serde_json::Value, String>, String> {
    let (sock, out) = (sock.display().to_string(), out.display().to_string());
    let mut args = strings(&[
        "snapshot",
        "--api-sock",
        &sock,
        "--out",
        &out,
        "--after",
        after,
        "--json",
    ]);
    if let Some(parent) = parent {
        args.extend(["--parent".to_string(), parent.display().to_string()]);
    }
    let (code, stdout, stderr) = run(ctx, "snapshot", &args)?;
    if code != 0 {
        return Ok(Err(stderr));
    }
    let summary = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .ok_or_else(|| format!("`vmm snapshot --json` printed no JSON: {stdout}"))?;
    Ok(Ok(summary))
}

/// A successful snapshot after which the VMM stops; waits for it to exit.
fn snapshot_and_stop(
    ctx: &Ctx,
    vm: &mut Proc,
    sock: &Path,
    out: &Path,
    parent: Option<&Path>,
) -> Result<serde_json::Value, String> {
    let summary = snapshot(ctx, sock, out, parent, "stop")?
        .map_err(|e| format!("snapshot {} failed: {e}", out.display()))?;
    let st = vm.wait_exit(Duration::from_secs(30))?;
    ensure(st.code() == Some(0), || {
        format!(
            "VMM after --after stop: {}; {}",
            describe(&st),
            vm.context()
        )
    })?;
    Ok(summary)
}

/// Starts `vmm restore --snapshot DIR [--api-sock SOCK] [flags]`.
fn restore(
    ctx: &Ctx,
    tag: &str,
    dir: &Path,
    sock: Option<&Path>,
    flags: &[&str],
) -> Result<Proc, String> {
    restore_with_env(ctx, tag, dir, sock, flags, &[])
}

/// [`restore`] with extra environment variables for the VMM.
fn restore_with_env(
    ctx: &Ctx,
    tag: &str,
    dir: &Path,
    sock: Option<&Path>,
    flags: &[&str],
    env: &[(&str, &str)],
) -> Result<Proc, String> {
    let mut args = strings(&["restore", "--snapshot"]);
    args.push(dir.display().to_string());
    if let Some(sock) = sock {
        let _ = std::fs::remove_file(sock);
        args.extend(["--api-sock".to_string(), sock.display().to_string()]);
    }
    args.extend(strings(flags));
    ctx.vmm(tag, &args, env)
}

/// Pages the guest's balloon holds as reported.
fn reported_pages(sock: &Path) -> Result<u64, String> {
    let resp = super::raw_http(sock, "GET /balloon HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("GET /balloon: {e}: {body:?}"))?;
    v.pointer("/status/page_states/reported_pages")
        .and_then(|p| p.as_u64())
        .ok_or_else(|| format!("GET /balloon has no reported_pages: {v}"))
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v.get(name).and_then(|x| x.as_u64()).unwrap_or(0)
}

/// The whole chain: base, L1, L2, restore, flatten, tampered parent.
pub fn chain(ctx: &Ctx) -> Outcome {
    let dir = |n: &str| -> PathBuf { ctx.work.join(n) };
    let (base, l1, l2, flat) = (dir("base"), dir("l1"), dir("l2"), dir("flat"));
    let sock = dir("api.sock");
    let _ = std::fs::remove_file(&sock);
    let mut args = ctx.boot_args(MEM_MIB, 1, &format!("quiet vmm_run=\"{SCRIPT}\""));
    args.extend(strings(&[
        "--track-dirty-pages",
        "--balloon",
        "amount_mib=0,free_page_reporting=true",
        "--api-sock",
    ]));
    args.push(sock.display().to_string());
    let mut vm = ctx.vmm("", &args, &[])?;
    vm.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    let a1 = wait_words(&mut vm, "VMM-LA ")?[0].clone();
    let base_sum = snapshot_and_stop(ctx, &mut vm, &sock, &base, None)?;

    // L1: restored from the base (the flag, not only the saved configuration, asks for tracking).
    // No periodic dirty-log sync: B's writes into pages the base had as reported reach the
    // page-state map only at L1's snapshot, which must still save them as live (a map saved
    // before that last sync once named them free, and L2 then dropped B's data).
    let mut vm = restore_with_env(
        ctx,
        "r1",
        &base,
        Some(&sock),
        &["--track-dirty-pages"],
        &[(vmm::memory::dirty::DIRTY_SYNC_MS_ENV, "3600000")],
    )?;
    let lb = wait_words(&mut vm, "VMM-LB ")?;
    let (b, b_mibs) = (lb[0].clone(), lb[LB_WORDS..].to_vec());
    let l1_sum = snapshot_and_stop(ctx, &mut vm, &sock, &l1, Some(&base))?;

    // L2: C written, a2 deleted and (partly) reported free.
    let mut vm = restore(ctx, "r2", &l1, Some(&sock), &[])?;
    // The restored VMM's API answers once it runs; the guest needs seconds to get to the delete.
    let deadline = Instant::now() + Duration::from_secs(60);
    let reported_before = loop {
        match reported_pages(&sock) {
            Ok(pages) => break pages,
            Err(e) if Instant::now() > deadline => return Err(format!("restored L1: {e}")),
            Err(_) => vm.pump_for(Duration::from_millis(200)),
        }
    };
    let lc = wait_words(&mut vm, "VMM-LC ")?;
    let c = lc[0].clone();
    // B as the restored L1 sees it: a mismatch here is the base or L1, not L2.
    ensure(lc.get(1) == Some(&b), || {
        format!(
            "the clone restored from L1 hashes B as {:?}, want {b}; {}",
            lc.get(1),
            b_mib_diff(&b_mibs, &lc[LC_WORDS.min(lc.len())..])
        )
    })?;
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut reported = reported_pages(&sock)?;
    while reported < reported_before + 1024 && Instant::now() < deadline {
        vm.pump_for(Duration::from_millis(500));
        reported = reported_pages(&sock)?;
    }
    ensure(reported >= reported_before + 1024, || {
        format!(
            "after deleting 24 MiB only {} pages newly reported",
            reported.saturating_sub(reported_before)
        )
    })?;
    // Layering on anything but the snapshot this VM came from is refused, the VM keeps running.
    let wrong = snapshot(ctx, &sock, &dir("wrong"), Some(&base), "resume")?;
    let err = wrong
        .err()
        .ok_or("a layer on the grandparent was accepted")?;
    ensure(
        err.contains("cannot layer on") && err.contains("l1"),
        || format!("unclear error for a wrong parent: {err}"),
    )?;
    let l2_sum = snapshot_and_stop(ctx, &mut vm, &sock, &l2, Some(&l1))?;

    // Sizes: each layer much smaller than the base.
    let base_bytes = field(&base_sum, "memory_file_bytes");
    for (name, s) in [("l1", &l1_sum), ("l2", &l2_sum)] {
        let bytes = field(s, "memory_file_bytes");
        ensure(bytes * 2 < base_bytes, || {
            format!("layer {name} memory file {bytes} bytes is not much smaller than the base's {base_bytes}: {s}")
        })?;
    }
    ensure(field(&l2_sum, "freed_pages") > 0, || {
        format!("L2 records no freed pages: {l2_sum}")
    })?;

    // Restore L2: every file's hash, a2 gone.
    let want = vec![a1.clone(), b.clone(), c.clone(), "0".to_string()];
    let mut clone = restore(ctx, "r3", &l2, None, &[])?;
    let got = wait_words(&mut clone, "VMM-CHECK ")?;
    ensure(got[..CHECK_WORDS.min(got.len())] == want[..], || {
        format!(
            "restored chain prints {got:?}, want {want:?}; {}",
            b_mib_diff(&b_mibs, &got[CHECK_WORDS.min(got.len())..])
        )
    })?;
    stop_clone(&mut clone)?;

    // inspect: the chain, base first.
    let (code, report, stderr) = inspect(ctx, &l2)?;
    let report = report.ok_or_else(|| format!("inspect printed no JSON: {stderr}"))?;
    ensure(
        code == 0 && report.pointer("/chain/depth").and_then(|d| d.as_u64()) == Some(3),
        || format!("inspect of L2: exit {code}, chain {}", report["chain"]),
    )?;
    let shared = report
        .pointer("/chain/shared_bytes")
        .and_then(|d| d.as_u64())
        .unwrap_or(0);

    // Offline: freed pages of L2 that held base data resolve to zero.
    let chain =
        vmm::snapshot::chain::Chain::load(&l2).map_err(|e| format!("loading the chain: {e}"))?;
    let segments = chain.segments();
    let freed = chain
        .top()
        .state
        .layer
        .as_ref()
        .map(|l| l.freed.clone())
        .unwrap_or_default();
    let base_chunks = &chain.links[0].loaded.state.memory.chunks;
    let overlaps = |a: u64, al: u64, b: u64, bl: u64| a < b + bl && b < a + al;
    let mut freed_over_base = 0u64;
    for &(gpa, len) in &freed {
        for c in base_chunks
            .iter()
            .filter(|c| overlaps(gpa, len, c.gpa, c.len_bytes))
        {
            freed_over_base += (gpa + len).min(c.gpa + c.len_bytes) - gpa.max(c.gpa);
        }
        let bad = segments.iter().find(|s| {
            overlaps(gpa, len, s.gpa, s.len) && s.source != vmm::snapshot::chain::Source::Zero
        });
        ensure(bad.is_none(), || {
            format!("freed range {gpa:#x}+{len:#x} resolves to {bad:?}")
        })?;
    }
    ensure(freed_over_base >= 2 << 20, || {
        format!("only {freed_over_base} bytes freed in L2 held data in the base")
    })?;

    // flatten: restores to the same hashes and equals the chain page for page.
    let (code, out, stderr) = run(
        ctx,
        "flatten",
        &strings(&[
            "flatten",
            "--snapshot",
            &l2.display().to_string(),
            "--out",
            &flat.display().to_string(),
            "--json",
        ]),
    )?;
    ensure(code == 0, || format!("vmm flatten exited {code}: {stderr}"))?;
    let (regions, chain_mem) =
        vmm::snapshot::flatten::chain_memory(&l2).map_err(|e| e.to_string())?;
    let (_, flat_mem) = vmm::snapshot::flatten::chain_memory(&flat).map_err(|e| e.to_string())?;
    if let Some(gpa) = vmm::snapshot::flatten::first_difference(&chain_mem, &flat_mem, &regions) {
        return Err(format!(
            "flattened snapshot differs from the chain at page {gpa:#x}"
        ));
    }
    drop((chain_mem, flat_mem));
    let mut clone = restore(ctx, "r4", &flat, None, &[])?;
    let got = wait_words(&mut clone, "VMM-CHECK ")?;
    ensure(got[..CHECK_WORDS.min(got.len())] == want[..], || {
        format!(
            "restored flat snapshot prints {got:?}, want {want:?}; {}",
            b_mib_diff(&b_mibs, &got[CHECK_WORDS.min(got.len())..])
        )
    })?;
    stop_clone(&mut clone)?;

    // A changed parent: another valid snapshot at the base's path is detected.
    copy_snapshot(&l1, &base)?;
    let mut bad = restore(ctx, "tampered", &l2, None, &[])?;
    let st = bad.wait_exit(Duration::from_secs(60))?;
    no_panic(&bad)?;
    let stderr = bad.stderr_text();
    ensure(
        st.code() == Some(1) && stderr.contains("has changed") && stderr.contains("base"),
        || format!("restore over a changed parent: {}; {stderr}", describe(&st)),
    )?;

    Ok(format!(
        "memory files: base {base_bytes} B, L1 {} B, L2 {} B ({} pages freed, {freed_over_base} B of them base data, resolved to zero); shared below L2 {shared} B on disk; flat {}; chain, flat and hashes agree; changed parent refused",
        field(&l1_sum, "memory_file_bytes"),
        field(&l2_sum, "memory_file_bytes"),
        field(&l2_sum, "freed_pages"),
        out.lines().last().unwrap_or("")
    ))
}
