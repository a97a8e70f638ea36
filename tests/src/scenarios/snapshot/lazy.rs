//! Lazy restore (`vmm restore --lazy uffd`): two clones restored at once from one snapshot
//! re-hash the guest's 64 MiB buffer; the host RSS of a clone holds only pages its handler
//! served; a balloon inflated after the restore releases pages (userfaultfd REMOVE events) and
//! the guest keeps working with the memory given back; a memory file with a flipped byte in
//! every chunk stops a lazy clone with an error naming the file and a chunk.

use super::*;

/// `vmm restore --snapshot DIR --lazy uffd [--api-sock SOCK]`.
fn restore_lazy(ctx: &Ctx, suffix: &str, dir: &Path, sock: Option<&Path>) -> Result<Proc, String> {
    let mut args = vec![
        "restore".to_string(),
        "--snapshot".to_string(),
        dir.display().to_string(),
        "--lazy".to_string(),
        "uffd".to_string(),
    ];
    if let Some(sock) = sock {
        let _ = std::fs::remove_file(sock);
        args.extend(["--api-sock".to_string(), sock.display().to_string()]);
    }
    ctx.vmm(suffix, &args, &[])
}

/// `memory.lazy` of `vmm status --json`.
fn lazy_stats(ctx: &Ctx, sock: &Path) -> Result<serde_json::Value, String> {
    let out = ctx.control(&["status", "--json"], sock)?;
    let v = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .or_else(|| serde_json::from_str(&out).ok())
        .ok_or_else(|| format!("`vmm status --json` printed no JSON: {out:?}"))?;
    v.pointer("/memory/lazy")
        .filter(|l| !l.is_null())
        .cloned()
        .ok_or_else(|| format!("no memory.lazy in `vmm status --json`: {v}"))
}

fn stat(stats: &serde_json::Value, name: &str) -> u64 {
    stats.get(name).and_then(|v| v.as_u64()).unwrap_or(0)
}

/// `RssAnon` of process `pid` in bytes.
fn rss_anon_bytes(pid: i32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("no RssAnon in /proc/{pid}/status"))
}

/// The scenario (see the module docs).
pub fn lazy_uffd(ctx: &Ctx) -> Outcome {
    const MEM_MIB: u64 = 256;
    const INFLATE_MIB: u32 = 16;
    let mut vm = boot_hash_vm_with(
        ctx,
        "",
        MEM_MIB as u32,
        2,
        "",
        &["--balloon", "amount_mib=0"],
    )?;
    let dir = ctx.work.join("snap");
    let summary = snapshot(ctx, &vm.sock, &dir, "pause")?;
    let last_uptime = hashes(&vm.p).last().map(|h| h.1).unwrap_or(0.0);
    vm.p.signal(libc::SIGKILL);
    vm.p.wait_exit(Duration::from_secs(10))?;
    let data_bytes = summary
        .get("memory_file_bytes")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);

    // Two lazy clones at once.
    let socks = [ctx.work.join("clone0.sock"), ctx.work.join("clone1.sock")];
    let mut clones = Vec::new();
    for (i, sock) in socks.iter().enumerate() {
        clones.push(restore_lazy(ctx, &format!("clone{i}"), &dir, Some(sock))?);
    }
    let mut rands_seen = Vec::new();
    for p in &mut clones {
        check_restored(p, &vm.hash0, last_uptime)?;
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
        rands_seen.push(rands(p, first_hash)[0].0.clone());
    }
    ensure(rands_seen[0] != rands_seen[1], || {
        format!(
            "two lazy clones read the same urandom bytes {}",
            rands_seen[0]
        )
    })?;

    // The handler served pages; the clone's anonymous RSS holds served pages only (guest RAM
    // is empty anonymous memory until served), plus the VMM's own heap.
    let stats = lazy_stats(ctx, &socks[1])?;
    let served = stat(&stats, "served_bytes");
    let from_file = stat(&stats, "pages_from_file") * 4096;
    ensure(from_file >= 64 << 20 && from_file <= data_bytes, || {
        format!("clone 1 served {from_file} bytes from a {data_bytes}-byte memory file (the buffer alone is 64 MiB): {stats}")
    })?;
    ensure(stat(&stats, "chunks_verified") > 0, || {
        format!("no chunk verified on first touch: {stats}")
    })?;
    let rss = rss_anon_bytes(clones[1].pid())?;
    const VMM_HEAP_SLACK: u64 = 32 << 20;
    ensure(
        rss <= served + VMM_HEAP_SLACK && rss < MEM_MIB << 20,
        || format!("clone 1 RssAnon {rss} bytes, served {served} bytes: {stats}"),
    )?;

    // Balloon on clone 0: inflated pages are released (REMOVE events), then given back; the
    // guest uses them again (zero-filled) and its buffer still hashes right.
    ctx.control(
        &["balloon", "set", "--amount-mib", &INFLATE_MIB.to_string()],
        &socks[0],
    )?;
    // The guest inflates slowly under TCG: wait for the balloon to hold the target, then every
    // inflated page must have been released through the handler (a REMOVE event each).
    let actual_mib = |sock: &Path| -> Result<u64, String> {
        let resp =
            super::super::raw_http(sock, "GET /balloon HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let v: serde_json::Value =
            serde_json::from_str(body).map_err(|e| format!("GET /balloon: {e}: {body:?}"))?;
        v.pointer("/status/actual_mib")
            .and_then(|p| p.as_u64())
            .ok_or_else(|| format!("GET /balloon has no status.actual_mib: {v}"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut actual = actual_mib(&socks[0])?;
    while actual < u64::from(INFLATE_MIB) && std::time::Instant::now() < deadline {
        clones[0].pump_for(Duration::from_millis(500));
        actual = actual_mib(&socks[0])?;
    }
    ensure(actual == u64::from(INFLATE_MIB), || {
        format!(
            "the lazy clone's balloon holds {actual} MiB, target {INFLATE_MIB}; {}",
            clones[0].context()
        )
    })?;
    let removed = stat(&lazy_stats(ctx, &socks[0])?, "removed_bytes");
    ensure(removed >= actual << 20, || {
        format!("the balloon holds {actual} MiB but only {removed} bytes were released (REMOVE events); {}", clones[0].context())
    })?;
    ctx.control(&["balloon", "set", "--amount-mib", "0"], &socks[0])?;
    let after = hashes(&clones[0]).last().map(|h| h.1).unwrap_or(0.0);
    check_restored(&mut clones[0], &vm.hash0, after + 2.0)?;
    for p in &mut clones {
        stop_clone(p)?;
    }

    // Damage: one flipped byte in every chunk; the lazy clone stops with an error naming the
    // memory file and a chunk as soon as the guest touches one, and exits 1.
    let bad = ctx.work.join("snap-damaged");
    copy_snapshot(&dir, &bad)?;
    let pieces = memory_chunks(&bad)?;
    for &(offset, len) in &pieces {
        flip(&bad.join("memory"), offset + len / 2)?;
    }
    let mut p = restore_lazy(ctx, "damaged", &bad, None)?;
    let st = p.wait_exit(Duration::from_secs(60))?;
    no_panic(&p)?;
    let err = p.stderr_text();
    ensure(
        st.code() == Some(1)
            && err.contains("checksum mismatch")
            && err.contains("chunk")
            && err.contains("memory"),
        || format!("damaged lazy clone: {} and {err:?}", describe(&st)),
    )?;
    Ok(format!(
        "two lazy clones re-hashed {}… (different urandom); clone 1 served {:.1} MiB from the file ({:.1} MiB memory file), {} faults, {} chunks verified, RssAnon {:.1} MiB; inflating {INFLATE_MIB} MiB released {:.1} MiB and the guest re-hashed after deflate; damaged chunks stop a lazy clone with exit 1",
        &vm.hash0[..12],
        from_file as f64 / 1048576.0,
        data_bytes as f64 / 1048576.0,
        stat(&stats, "faults"),
        stat(&stats, "chunks_verified"),
        rss as f64 / 1048576.0,
        removed as f64 / 1048576.0,
    ))
}
