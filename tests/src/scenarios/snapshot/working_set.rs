//! Working set (`vmm restore --record-working-set-ms`): a clone records the guest pages it
//! touched in its first seconds into the snapshot's `working-set.json`; a later restore brings
//! those pages in before its vCPUs run (host page tables and KVM's nested ones, the default),
//! another one from a thread while its vCPUs run (`--working-set background`), and both guests
//! still re-hash the 64 MiB buffer to the original's hash.

use super::*;

/// Waits for `line` in the stderr of `p` (the VMM's log).
fn wait_log(p: &mut Proc, line: &str, timeout: Duration) -> Result<String, String> {
    let found = p.pump_until(timeout, |p| p.stderr_text().contains(line));
    ensure(found, || {
        format!("no {line:?} in the VMM's log; {}", p.context())
    })?;
    Ok(crate::proc::strip_ansi(&p.stderr_text())
        .lines()
        .find(|l| l.contains(line))
        .unwrap_or_default()
        .to_string())
}

/// The number after `key=` in a log line.
fn field(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = line[at..].trim_start_matches("Some(");
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Record with one clone, bring in with the next.
pub fn working_set(ctx: &Ctx) -> Outcome {
    let mut vm = boot_hash_vm(ctx, "", 256, 1)?;
    let dir = ctx.work.join("snap-ws");
    snapshot(ctx, &vm.sock, &dir, "pause")?;
    let last_uptime = hashes(&vm.p).last().map(|h| h.1).unwrap_or(0.0);
    vm.p.signal(libc::SIGKILL);
    vm.p.wait_exit(Duration::from_secs(10))?;

    let args = |extra: &[&str]| {
        let mut a = vec!["restore".to_string(), "--snapshot".to_string()];
        a.push(dir.display().to_string());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let mut recorder = ctx.vmm(
        "ws-record",
        &args(&["--record-working-set-ms", "3000"]),
        &[],
    )?;
    check_restored(&mut recorder, &vm.hash0, last_uptime)?;
    let recorded = wait_log(
        &mut recorder,
        "working set recorded",
        Duration::from_secs(120),
    )?;
    stop_clone(&mut recorder)?;
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("working-set.json"))
            .map_err(|e| format!("reading working-set.json: {e} (log: {recorded})"))?,
    )
    .map_err(|e| format!("decoding working-set.json: {e}"))?;
    let pages = record.get("pages").and_then(|v| v.as_u64()).unwrap_or(0);
    // The guest ran 3 s (kernel, shell, part of its 64 MiB buffer): some thousands of pages,
    // far from all 65536 of the guest (verification read the file, not the mapping, so it
    // touched none).
    ensure((1000..49152).contains(&pages), || {
        format!("the record holds {pages} pages: expected what 3 s of the guest touched, well under the guest's 65536; {record}")
    })?;

    // A clone restored with `extra` must bring in all `pages` in `mode` (as the log spells it),
    // then re-hash the buffer; returns its "working set brought in" log line.
    let bring_in = |name: &str, extra: &[&str], mode: &str| -> Result<String, String> {
        let mut clone = ctx.vmm(name, &args(extra), &[])?;
        let line = wait_log(
            &mut clone,
            "working set brought in",
            Duration::from_secs(120),
        )?;
        check_restored(&mut clone, &vm.hash0, last_uptime)?;
        stop_clone(&mut clone)?;
        let got = field(&line, "pages").unwrap_or(0.0) as u64;
        ensure(
            got == pages && line.contains(&format!("mode={mode}")),
            || {
                format!("{name}: the clone brought in {got} pages ({mode} expected), the record has {pages}: {line}")
            },
        )?;
        Ok(line)
    };
    let background = bring_in(
        "ws-background",
        &["--working-set", "background"],
        "Background",
    )?;
    let background_ms = field(&background, "populate_ms").unwrap_or(0.0);
    // The default: before the vCPUs run.
    let brought = bring_in("ws-before-start", &[], "BeforeStart")?;
    let kvm_ms = field(&brought, "kvm_pre_fault_ms");
    ensure(kvm_ms.is_some(), || {
        format!("KVM_PRE_FAULT_MEMORY did not run (the rig's kernel has it since 6.10): {brought}")
    })?;
    let populate_ms = field(&brought, "populate_ms").unwrap_or(0.0);
    Ok(format!(
        "recorded {pages} pages after 3 s; a clone brought them in from a thread while its vCPUs ran (populate {background_ms:.0} ms), another before its vCPUs ran (populate {populate_ms:.0} ms, KVM pre-fault {:.0} ms); both re-hashed {}…",
        kvm_ms.unwrap_or(0.0),
        &vm.hash0[..12]
    ))
}
