//! The trim-then-snapshot pipeline (`vmm snapshot --policy` / `--no-trim`) on a real guest
//! running the S512 workload from the data disk: the trimmed snapshot is smaller than the
//! untrimmed one, a missing, hung or required-but-absent trimmer gives the fallback behaviour,
//! and the restored clone runs the policy's after-restore hook and verifies its live data.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::snapshot::{restore, stop_clone};
use super::trim::{data_disk_args, words_after, PREAMBLE};
use super::{ensure, no_panic, stop_via_api, Ctx, Outcome, READY_MARKER, READY_TIMEOUT};
use crate::proc::Proc;

/// The guest printed this once the workload is set up.
const MARK_READY: &str = "PIPE-READY";
/// Bound on one `vmm snapshot` (pipeline included) in the rig.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on a restored clone's check.
const CLONE_TIMEOUT: Duration = Duration::from_secs(120);
const MIB: f64 = 1048576.0;

/// The policy the trimmed snapshot uses: aggressive.json's steps, plus an after-restore hook
/// that lets the clone's live-anon workload verify its data.
fn trim_policy() -> Value {
    json!({
        "name": "e2e-pipeline",
        "cold_age_ms": 0,
        "hooks": [{"name": "check", "command": ["/bin/touch", "/run/chk"], "timeout_ms": 5000}],
        "steps": [
            {"drop_caches": {"page_cache": "all", "slab": true}},
            {"compact_memory": {}},
            {"wait_reported": {"timeout_ms": 10000, "quiet_ms": 500}}
        ],
        "after_restore": ["check"],
        "page_reporting_order": 0,
        "budget_ms": 30000
    })
}

/// Writes `policy` to `name` in the scenario's directory.
fn write_policy(ctx: &Ctx, name: &str, policy: &Value) -> Result<String, String> {
    let path = ctx.work.join(name);
    std::fs::write(&path, policy.to_string()).map_err(|e| format!("writing {name}: {e}"))?;
    Ok(path.display().to_string())
}

/// Runs `vmm snapshot --api-sock SOCK --out DIR --json EXTRA...`: (exit code, JSON, stderr).
fn snapshot(
    ctx: &Ctx,
    sock: &Path,
    dir: &Path,
    extra: &[&str],
) -> Result<(i32, Option<Value>, String), String> {
    let mut args: Vec<String> = vec![
        "snapshot".into(),
        "--api-sock".into(),
        sock.display().to_string(),
        "--out".into(),
        dir.display().to_string(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = ctx.vmm("snapshot", &args, &[])?;
    let st = p.wait_exit(SNAPSHOT_TIMEOUT)?;
    no_panic(&p)?;
    let json = p
        .stdout
        .iter()
        .rev()
        .find_map(|(_, l)| serde_json::from_str(l.trim()).ok());
    Ok((st.code().unwrap_or(-1), json, p.stderr_text()))
}

/// [`snapshot`] that must succeed; returns the pipeline summary.
fn snapshot_ok(ctx: &Ctx, sock: &Path, dir: &Path, extra: &[&str]) -> Result<Value, String> {
    let (code, json, stderr) = snapshot(ctx, sock, dir, extra)?;
    match (code, json) {
        (0, Some(v)) => Ok(v),
        (code, json) => Err(format!(
            "`vmm snapshot {extra:?}` exited {code}, JSON {json:?}; stderr: {stderr}"
        )),
    }
}

/// `status` of step `name` in a pipeline summary.
fn step<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step"] == name))
        .unwrap_or(&Value::Null)
}

fn memory_file_bytes(summary: &Value) -> u64 {
    summary["snapshot"]["memory_file_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// Whether the VM behind `sock` is running (`vmm status --json`).
fn running(ctx: &Ctx, sock: &Path) -> Result<bool, String> {
    Ok(ctx.state(sock)? == "Running")
}

/// Boots the S512 workload with vsock, balloon (reporting + hinting) and the data disk.
fn boot(ctx: &Ctx) -> Result<(Proc, std::path::PathBuf, std::path::PathBuf), String> {
    let sock = ctx.work.join("api.sock");
    let uds = ctx.work.join("v.sock");
    for f in [&sock, &uds] {
        let _ = std::fs::remove_file(f);
    }
    let script = format!(
        "{PREAMBLE} $G workload live-anon --mib 64 --check-file /run/chk & A=$!; \
         $G workload cold-read /mnt/data/cold; \
         $G workload hot-loop /mnt/data/hot --until-file /run/stophot & \
         sleep 3; echo {MARK_READY}; wait $A; sleep 1"
    );
    let mut args = ctx.boot_args(512, 2, &format!("quiet vmm_run=\"{script}\""));
    args.extend(data_disk_args(ctx)?);
    args.extend(
        [
            "--balloon",
            "amount_mib=0,free_page_reporting=true,free_page_hinting=true",
            "--vsock-uds",
            &uds.display().to_string(),
            "--api-sock",
            &sock.display().to_string(),
        ]
        .map(String::from),
    );
    let mut p = ctx.vmm("", &args, &[])?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    p.wait_stdout(MARK_READY, Duration::from_secs(240))?;
    Ok((p, sock, uds))
}

/// The whole pipeline, its fallbacks, and a restored clone of the trimmed snapshot.
pub(super) fn trim_then_snapshot(ctx: &Ctx) -> Outcome {
    let (mut vm, sock, _uds) = boot(ctx)?;
    let hash0 = words_after(&mut vm, "WORKLOAD-LIVE-ANON ")?
        .get(1)
        .cloned()
        .ok_or("no hash on the WORKLOAD-LIVE-ANON line")?;

    // Untrimmed, with the hinting pass.
    let untrimmed_dir = ctx.work.join("untrimmed");
    let untrimmed = snapshot_ok(
        ctx,
        &sock,
        &untrimmed_dir,
        &["--no-trim", "--hint-timeout-ms", "20000"],
    )?;
    ensure(step(&untrimmed, "trim")["status"] == "skipped", || {
        format!("--no-trim ran a trim: {untrimmed}")
    })?;
    ensure(step(&untrimmed, "hint")["status"] != "skipped", || {
        format!("the hinting pass did not run: {untrimmed}")
    })?;

    // Trimmed by a policy sent from the host.
    let policy = write_policy(ctx, "pipeline.json", &trim_policy())?;
    let trimmed_dir = ctx.work.join("trimmed");
    let trimmed = snapshot_ok(
        ctx,
        &sock,
        &trimmed_dir,
        &["--policy", &policy, "--no-hint"],
    )?;
    let trim = step(&trimmed, "trim");
    let freed_mib = trim["detail"]["freed_kib"].as_f64().unwrap_or(0.0) / 1024.0;
    ensure(trim["status"] == "ok" && freed_mib >= 200.0, || {
        format!("the trim step did not free >= 200 MiB: {trimmed}")
    })?;
    let (untrimmed_bytes, trimmed_bytes) =
        (memory_file_bytes(&untrimmed), memory_file_bytes(&trimmed));
    ensure(trimmed_bytes + (200 << 20) <= untrimmed_bytes, || {
        format!(
            "trimmed memory file {:.1} MiB is not 200 MiB smaller than untrimmed {:.1} MiB",
            trimmed_bytes as f64 / MIB,
            untrimmed_bytes as f64 / MIB
        )
    })?;

    // No trimmer on that port: snapshot anyway, with a warning.
    let absent = snapshot_ok(
        ctx,
        &sock,
        &ctx.work.join("absent"),
        &[
            "--policy",
            "aggressive",
            "--trimmer-port",
            "53",
            "--no-hint",
        ],
    )?;
    ensure(
        step(&absent, "trim")["status"] == "failed"
            && absent["warnings"].to_string().contains("port 53"),
        || format!("an absent trimmer gave no warning: {absent}"),
    )?;
    // The same with a policy that requires the trim: refused, nothing written, VM running.
    let mut required = policies::Policy::builtin("aggressive").map_err(|e| e.to_string())?;
    required.require_trim = true;
    let required_policy = write_policy(
        ctx,
        "required.json",
        &serde_json::to_value(&required).map_err(|e| e.to_string())?,
    )?;
    let required_dir = ctx.work.join("required");
    let (code, _, stderr) = snapshot(
        ctx,
        &sock,
        &required_dir,
        &["--policy", &required_policy, "--trimmer-port", "53"],
    )?;
    ensure(
        code != 0 && stderr.contains("requires a trim") && !required_dir.exists(),
        || {
            format!(
                "a required trim that failed: exit {code}, dir exists {}; stderr {stderr}",
                required_dir.exists()
            )
        },
    )?;
    ensure(running(ctx, &sock)?, || {
        "the VM is not running after the refused snapshot".to_string()
    })?;
    // A trimmer that does not answer in time: snapshot anyway after the bound.
    let hang = json!({
        "name": "hang", "cold_age_ms": 0,
        "hooks": [{"name": "slow", "command": ["/bin/sleep", "6"], "timeout_ms": 10000}],
        "steps": [{"hooks": {}}]
    });
    let hang_policy = write_policy(ctx, "hang.json", &hang)?;
    let hung = snapshot_ok(
        ctx,
        &sock,
        &ctx.work.join("hung"),
        &[
            "--policy",
            &hang_policy,
            "--trim-timeout-ms",
            "1500",
            "--no-hint",
        ],
    )?;
    ensure(
        step(&hung, "trim")["status"] == "failed"
            && hung["warnings"].to_string().contains("1500 ms"),
        || format!("a hung trimmer gave no timeout warning: {hung}"),
    )?;
    stop_via_api(ctx, &mut vm, &sock)?;

    // The clone of the trimmed snapshot: after-restore hook, then its live data verified.
    let mut clone = restore(ctx, "clone", &trimmed_dir)?;
    let check = clone.pump_until(CLONE_TIMEOUT, |p| {
        p.stdout
            .iter()
            .any(|(_, l)| l.contains("WORKLOAD-LIVE-ANON-CHECK "))
    });
    no_panic(&clone)?;
    ensure(check, || {
        format!(
            "the clone never checked its live data (after-restore hook not run?); {}",
            clone.context()
        )
    })?;
    let words = words_after(&mut clone, "WORKLOAD-LIVE-ANON-CHECK ")?;
    ensure(
        words.first().map(String::as_str) == Some("ok") && words.get(1) == Some(&hash0),
        || format!("the clone's live data check: {words:?}, original hash {hash0}"),
    )?;
    ensure(clone.stderr_text().contains("after-restore hooks"), || {
        format!(
            "the restored VMM did not log the after-restore run; {}",
            clone.context()
        )
    })?;
    // The live-anon workload keeps running (it checks again whenever asked): stop the clone.
    stop_clone(&mut clone)?;
    Ok(format!(
        "untrimmed {:.1} MiB (hint {}), trimmed {:.1} MiB (freed {freed_mib:.1} MiB in {:.0} ms); absent/required/hung trimmer fallbacks held; the clone ran its after-restore hook and verified its 64 MiB",
        untrimmed_bytes as f64 / MIB,
        step(&untrimmed, "hint")["detail"],
        trimmed_bytes as f64 / MIB,
        trim["duration_ms"].as_f64().unwrap_or(0.0)
    ))
}
