//! The boot scenarios `e2e-runner` executes where real KVM is (inside the rig or on a host whose
//! /dev/kvm boots stock guests). Each returns `Ok(detail)` or `Err(detail)`; none may hang: every
//! wait has a timeout and the runner's watchdog kills what a scenario leaves running.
//!
//! Only the two plain boot scenarios print the kernel's full boot log: under the rig every console
//! byte is a nested exit, and `quiet` cuts a boot from ~45 s to ~8 s there.

mod balloon;
mod block;
mod crash;
mod hostile;
mod layers;
mod pipeline;
mod snapshot;
mod soak;
mod trim;
mod vsock;

use crate::proc::{describe, Proc};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Console line the guest's /init prints with its view of the machine (JSON follows).
pub const SYSINFO_MARKER: &str = "VMM-SYSINFO ";
/// Console line the guest's /init prints once userland is up.
pub const READY_MARKER: &str = "VMM-GUEST-READY";
/// Console line of the `counter` workload (a number follows).
pub const COUNTER_MARKER: &str = "VMM-COUNTER ";
/// Console line after the `vmm_run` command (its exit status follows).
pub const RUN_EXIT_MARKER: &str = "VMM-RUN-EXIT ";

/// Guest boot to [`READY_MARKER`], generous for a 2-vCPU guest in a 1-vCPU TCG rig.
const READY_TIMEOUT: Duration = Duration::from_secs(150);
/// A VMM rejecting bad input must do so quickly.
const REJECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A control command (`vmm pause|resume|status|stop`).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);

/// What a scenario reports: `Ok(detail)` when it passed, `Err(detail)` when it failed.
pub type Outcome = Result<String, String>;

/// One named scenario.
pub struct Scenario {
    /// Name, also the `#[test]` in `tests/tests/boot.rs` that asserts on it.
    pub name: &'static str,
    /// Watchdog: the runner fails the scenario and kills its processes after this.
    pub timeout: Duration,
    /// The scenario.
    pub run: fn(&Ctx) -> Outcome,
}

/// What scenarios run against.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The static `vmm` binary.
    pub vmm: PathBuf,
    /// Guest kernel (bzImage).
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// The data disk (`vmm image build`'s data.ext4), when the runner was given one.
    pub data_disk: Option<PathBuf>,
    /// A scratch directory of this scenario.
    pub work: PathBuf,
    /// The scenario's name (console prefix).
    pub name: String,
}

const fn sc(name: &'static str, secs: u64, run: fn(&Ctx) -> Outcome) -> Scenario {
    Scenario {
        name,
        timeout: Duration::from_secs(secs),
        run,
    }
}

/// Every scenario, in execution order.
pub fn all() -> Vec<Scenario> {
    vec![
        // Bad input first: quick, and they need no working guest.
        sc("bad_missing_kernel", 60, bad_missing_kernel),
        sc("bad_not_bzimage", 60, bad_not_bzimage),
        sc("bad_initrd_too_big", 60, bad_initrd_too_big),
        sc("bad_mem_too_small", 60, bad_mem_too_small),
        sc("bad_zero_vcpus", 60, bad_zero_vcpus),
        sc("bad_config_unknown_field", 60, bad_config_unknown_field),
        sc("bad_kvm_not_permitted", 60, bad_kvm_not_permitted),
        sc("bad_api_sock_in_use", 240, bad_api_sock_in_use),
        sc("bad_api_malformed_json", 240, bad_api_malformed_json),
        sc("boot_1vcpu", 240, boot_1vcpu),
        sc("boot_2vcpu", 240, boot_2vcpu),
        sc("poweroff_exits_fast", 240, poweroff_exits_fast),
        sc("sigterm_stops_cleanly", 240, sigterm_stops_cleanly),
        sc("pause_resume", 300, pause_resume),
        // Balloon (src/scenarios/balloon.rs): each boots a guest with a virtio-balloon.
        sc("balloon_statistics", 300, balloon::statistics),
        sc("balloon_inflate_deflate", 400, balloon::inflate_deflate),
        sc("balloon_deflate_on_oom", 400, balloon::deflate_on_oom),
        sc(
            "balloon_oom_without_deflate",
            400,
            balloon::oom_without_deflate,
        ),
        sc(
            "balloon_reporting_returns_memory",
            400,
            balloon::reporting_returns_memory,
        ),
        sc("balloon_hinting", 300, balloon::hinting),
        // Snapshots (src/scenarios/snapshot.rs).
        sc("snapshot_round_trip_1vcpu", 400, snapshot::round_trip_1vcpu),
        sc(
            "snapshot_round_trip_2vcpu_two_clones",
            500,
            snapshot::round_trip_2vcpu_two_clones,
        ),
        sc("snapshot_bad_input", 500, snapshot::bad_input),
        sc(
            "snapshot_fresh_1gib_is_compact",
            300,
            snapshot::fresh_1gib_is_compact,
        ),
        sc(
            "snapshot_reported_memory_is_left_out",
            400,
            snapshot::reported_memory_is_left_out,
        ),
        sc("snapshot_with_vsock", 400, snapshot::with_vsock),
        sc("snapshot_lazy_uffd", 400, snapshot::lazy_uffd),
        sc("snapshot_serve_load", 300, snapshot::serve_load),
        sc("snapshot_working_set", 400, snapshot::working_set),
        // Crash safety and soak (src/scenarios/{crash,soak}.rs).
        sc("crash_kill_while_writing", 240, crash::kill_while_writing),
        sc("soak_short", 360, soak::short),
        sc("hostile_guest_flood", 300, hostile::flood),
        // Layered snapshots (src/scenarios/layers.rs).
        sc("layers_chain", 420, layers::chain),
        // Block (src/scenarios/block.rs): virtio-blk drives.
        sc("block_bad_disk_path", 60, block::bad_disk_path),
        sc("block_disks", 420, block::disks),
        // vsock (src/scenarios/vsock.rs): each boots a guest with a virtio-vsock device.
        sc(
            "vsock_ping_concurrency_vanishing_client",
            300,
            vsock::ping_concurrency_vanishing_client,
        ),
        sc("vsock_bulk_both_ways", 400, vsock::bulk_both_ways),
        // Trimmer (src/scenarios/trim.rs).
        sc("trim_default_keeps_hot", 400, trim::default_keeps_hot),
        sc("trim_fast_keeps_hot", 400, trim::fast_keeps_hot),
        sc("trim_aggressive_drops_hot", 400, trim::aggressive_drops_hot),
        sc("trim_pipeline", 400, trim::pipeline),
        // Trim-then-snapshot pipeline (src/scenarios/pipeline.rs).
        sc(
            "pipeline_trim_then_snapshot",
            600,
            pipeline::trim_then_snapshot,
        ),
    ]
}

/// The names of [`all`].
pub fn names() -> Vec<&'static str> {
    all().iter().map(|s| s.name).collect()
}

impl Ctx {
    /// `vmm run` arguments for the guest image with `mem` MiB, `vcpus` and extra `cmdline`.
    fn boot_args(&self, mem: u32, vcpus: u32, cmdline: &str) -> Vec<String> {
        let mut a = vec![
            "run".to_string(),
            "--kernel".into(),
            self.kernel.display().to_string(),
            "--initrd".into(),
            self.initrd.display().to_string(),
            "--mem-mib".into(),
            mem.to_string(),
            "--vcpus".into(),
            vcpus.to_string(),
        ];
        if !cmdline.is_empty() {
            a.extend(["--cmdline".to_string(), cmdline.to_string()]);
        }
        a
    }

    /// Starts `vmm ARGS` with console tag `<scenario>[/suffix]`.
    fn vmm(&self, suffix: &str, args: &[String], env: &[(&str, &str)]) -> Result<Proc, String> {
        let tag = if suffix.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{suffix}", self.name)
        };
        // Every snapshot is checked against the VM it came from (see `vmm::snapshot::audit`).
        let mut env = env.to_vec();
        env.push((vmm::snapshot::audit::AUDIT_SNAPSHOTS_ENV, "1"));
        Proc::spawn(&tag, &self.vmm, args, &env)
    }

    /// Runs a control subcommand (`pause`, `status --json`, ...) against `sock` to completion,
    /// returning its stdout when it exits 0.
    fn control(&self, sub: &[&str], sock: &Path) -> Result<String, String> {
        let mut args: Vec<String> = sub.iter().map(|s| s.to_string()).collect();
        args.extend(["--api-sock".to_string(), sock.display().to_string()]);
        let mut p = self.vmm(sub[0], &args, &[])?;
        let st = p.wait_exit(CONTROL_TIMEOUT)?;
        if st.code() != Some(0) || p.panicked() {
            return Err(format!(
                "`vmm {}` ended with {}; {}",
                sub.join(" "),
                describe(&st),
                p.context()
            ));
        }
        Ok(p.stdout
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// The `state` field of `vmm status --json`.
    fn state(&self, sock: &Path) -> Result<String, String> {
        let out = self.control(&["status", "--json"], sock)?;
        let parsed = serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .or_else(|| {
                out.lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            });
        parsed
            .as_ref()
            .and_then(|v| v.get("state"))
            .and_then(|s| s.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("`vmm status --json` printed no JSON with a state: {out:?}"))
    }
}

/// Fails with `what` unless `cond`.
fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// Common checks of every VMM run: no panic.
fn no_panic(p: &Proc) -> Result<(), String> {
    ensure(!p.panicked(), || {
        format!("the VMM panicked; {}", p.context())
    })
}

// ---------------------------------------------------------------------------------------------
// Bad input

/// Runs `vmm ARGS` expecting a quick non-zero exit with `vmm: error:` on stderr that mentions one
/// of `keywords` (case-insensitive), and no panic.
fn expect_rejected(
    ctx: &Ctx,
    suffix: &str,
    args: &[String],
    env: &[(&str, &str)],
    keywords: &[&str],
) -> Outcome {
    let mut p = ctx.vmm(suffix, args, env)?;
    let st = p.wait_exit(REJECT_TIMEOUT)?;
    no_panic(&p)?;
    let Some(code) = st.code() else {
        return Err(format!(
            "killed by a signal ({}); {}",
            describe(&st),
            p.context()
        ));
    };
    ensure(code != 0, || {
        format!("exited 0 on bad input; {}", p.context())
    })?;
    let Some(err_line) = p.stderr.iter().find(|l| l.contains("vmm: error:")) else {
        return Err(format!(
            "exit {code} but no `vmm: error:` on stderr; {}",
            p.context()
        ));
    };
    let lower = err_line.to_lowercase();
    ensure(
        keywords.iter().any(|k| lower.contains(&k.to_lowercase())),
        || format!("error message does not mention any of {keywords:?}: {err_line:?}"),
    )?;
    Ok(format!("exit {code}: {err_line}"))
}

fn bad_missing_kernel(ctx: &Ctx) -> Outcome {
    let mut args = ctx.boot_args(256, 1, "");
    args[2] = "/nonexistent/vmlinuz".into();
    expect_rejected(ctx, "", &args, &[], &["/nonexistent/vmlinuz", "kernel"])
}

fn bad_not_bzimage(ctx: &Ctx) -> Outcome {
    let fake = ctx.work.join("not-a-bzimage");
    std::fs::write(&fake, "this is not a kernel\n".repeat(50_000))
        .map_err(|e| format!("writing {}: {e}", fake.display()))?;
    let mut args = ctx.boot_args(256, 1, "");
    args[2] = fake.display().to_string();
    expect_rejected(ctx, "", &args, &[], &["bzimage", "kernel", "not-a-bzimage"])
}

fn bad_initrd_too_big(ctx: &Ctx) -> Outcome {
    // A sparse 192 MiB initrd for a 128 MiB guest: costs no memory to make.
    let big = ctx.work.join("huge-initrd");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(192 << 20))
        .map_err(|e| format!("making {}: {e}", big.display()))?;
    let mut args = ctx.boot_args(128, 1, "");
    args[4] = big.display().to_string();
    expect_rejected(ctx, "", &args, &[], &["initrd", "memory", "large", "fit"])
}

fn bad_mem_too_small(ctx: &Ctx) -> Outcome {
    expect_rejected(ctx, "", &ctx.boot_args(16, 1, ""), &[], &["mem"])
}

fn bad_zero_vcpus(ctx: &Ctx) -> Outcome {
    expect_rejected(ctx, "", &ctx.boot_args(256, 0, ""), &[], &["vcpu"])
}

fn bad_config_unknown_field(ctx: &Ctx) -> Outcome {
    let cfg = ctx.work.join("bad-config.json");
    let body = serde_json::json!({ "no_such_field": 1 });
    std::fs::write(&cfg, body.to_string())
        .map_err(|e| format!("writing {}: {e}", cfg.display()))?;
    let mut args = ctx.boot_args(256, 1, "");
    args.extend(["--config".to_string(), cfg.display().to_string()]);
    expect_rejected(ctx, "", &args, &[], &["no_such_field", "unknown field"])
}

fn bad_kvm_not_permitted(ctx: &Ctx) -> Outcome {
    let file = ctx.work.join("not-kvm");
    std::fs::write(&file, b"").map_err(|e| format!("writing {}: {e}", file.display()))?;
    let file = file.display().to_string();
    let args = ctx.boot_args(256, 1, "");
    let a = expect_rejected(
        ctx,
        "devnull",
        &args,
        &[("VMM_KVM_DEVICE", "/dev/null")],
        &["kvm", "/dev/null"],
    )
    .map_err(|e| format!("VMM_KVM_DEVICE=/dev/null: {e}"))?;
    let b = expect_rejected(
        ctx,
        "file",
        &args,
        &[("VMM_KVM_DEVICE", &file)],
        &["kvm", &file],
    )
    .map_err(|e| format!("VMM_KVM_DEVICE=<regular file>: {e}"))?;
    Ok(format!("/dev/null: {a}; regular file: {b}"))
}

/// Starts a VMM with an API socket and waits until the socket answers `vmm status`.
fn start_with_api(ctx: &Ctx, sock: &Path, cmdline: &str) -> Result<Proc, String> {
    let _ = std::fs::remove_file(sock);
    let mut args = ctx.boot_args(256, 1, cmdline);
    args.extend(["--api-sock".to_string(), sock.display().to_string()]);
    let mut p = ctx.vmm("", &args, &[])?;
    let up = p.pump_until(Duration::from_secs(60), |_| sock.exists());
    ensure(up, || {
        format!(
            "API socket {} never appeared; {}",
            sock.display(),
            p.context()
        )
    })?;
    Ok(p)
}

/// Stops `p` through its API socket and checks it exits 0.
fn stop_via_api(ctx: &Ctx, p: &mut Proc, sock: &Path) -> Result<(), String> {
    ctx.control(&["stop"], sock)?;
    let st = p.wait_exit(Duration::from_secs(20))?;
    no_panic(p)?;
    ensure(st.code() == Some(0), || {
        format!("after `vmm stop`: {}; {}", describe(&st), p.context())
    })
}

fn bad_api_sock_in_use(ctx: &Ctx) -> Outcome {
    let sock = ctx.work.join("api.sock");
    let mut first = start_with_api(ctx, &sock, "quiet vmm_workload=idle")?;
    let mut args = ctx.boot_args(256, 1, "quiet vmm_workload=idle");
    args.extend(["--api-sock".to_string(), sock.display().to_string()]);
    let rejected = expect_rejected(
        ctx,
        "second",
        &args,
        &[],
        &["sock", "in use", "address", "exists"],
    );
    // Whatever the second did, the first must be unharmed and still reachable.
    ensure(first.running(), || {
        format!("the first VMM died; {}", first.context())
    })?;
    let state = ctx
        .state(&sock)
        .map_err(|e| format!("the first VMM's API broke: {e}"))?;
    stop_via_api(ctx, &mut first, &sock)?;
    Ok(format!("{}; first VMM still {state}", rejected?))
}

/// Sends a raw HTTP request on a unix socket and returns the whole response text.
fn raw_http(sock: &Path, request: &str) -> Result<String, String> {
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("connecting to {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                // Stop once headers and a Content-Length worth of body are in.
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(usize::MAX);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            Err(e) if buf.is_empty() => return Err(format!("reading the response: {e}")),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn bad_api_malformed_json(ctx: &Ctx) -> Outcome {
    let sock = ctx.work.join("api.sock");
    let mut p = start_with_api(ctx, &sock, "quiet vmm_workload=idle")?;
    let mut seen = Vec::new();
    for body in [
        r#"{"state": "Paused""#,
        r#"{"state": 42}"#,
        r#"not json at all"#,
    ] {
        let req = format!(
            "PATCH /vm HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let resp = raw_http(&sock, &req)?;
        let status_line = resp.lines().next().unwrap_or("").to_string();
        let resp_body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        ensure(status_line.split_whitespace().nth(1) == Some("400"), || {
            format!("PATCH /vm {body:?}: expected 400, got {status_line:?}; response {resp:?}")
        })?;
        let fault = serde_json::from_str::<serde_json::Value>(resp_body)
            .ok()
            .and_then(|v| {
                v.get("fault_message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            });
        let Some(fault) = fault.filter(|f| !f.is_empty()) else {
            return Err(format!(
                "PATCH /vm {body:?}: 400 without a fault_message: {resp_body:?}"
            ));
        };
        seen.push(format!("{body:?} -> 400 {fault:?}"));
    }
    ensure(p.running(), || {
        format!("the VMM died after malformed requests; {}", p.context())
    })?;
    let state = ctx.state(&sock)?;
    stop_via_api(ctx, &mut p, &sock)?;
    Ok(format!("{}; VMM still {state} afterwards", seen.join("; ")))
}

// ---------------------------------------------------------------------------------------------
// Boots

/// Parses the JSON of the first `VMM-SYSINFO` line.
fn sysinfo(p: &Proc) -> Result<serde_json::Value, String> {
    let line = p
        .stdout
        .iter()
        .find_map(|(_, l)| {
            l.find(SYSINFO_MARKER)
                .map(|i| &l[i + SYSINFO_MARKER.len()..])
        })
        .ok_or_else(|| format!("no {SYSINFO_MARKER:?} line; {}", p.context()))?;
    serde_json::from_str(line.trim())
        .map_err(|e| format!("VMM-SYSINFO is not JSON ({e}): {line:?}"))
}

/// Boots with `vcpus`, checks readiness, sysinfo and the exit after `vmm_run`.
fn boot(ctx: &Ctx, vcpus: u32) -> Outcome {
    const MEM: u32 = 512;
    let mut p = ctx.vmm(
        "",
        &ctx.boot_args(MEM, vcpus, "vmm_run=\"echo e2e-run-ok\""),
        &[],
    )?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    let ready_s = p.stdout[p.find_stdout(0, READY_MARKER).expect("seen")].0 - p.started;
    let info = sysinfo(&p)?;
    let cpus = info.get("cpus").and_then(|v| v.as_u64());
    ensure(cpus == Some(vcpus as u64), || {
        format!("VMM-SYSINFO cpus {cpus:?}, expected {vcpus}: {info}")
    })?;
    let kib = info
        .get("mem_total_kib")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let ratio = kib as f64 / (MEM as f64 * 1024.0);
    ensure((0.85..=1.0).contains(&ratio), || {
        format!(
            "VMM-SYSINFO mem_total_kib {kib} is {:.1}% of {MEM} MiB (want 85-100%)",
            ratio * 100.0
        )
    })?;
    p.wait_stdout(RUN_EXIT_MARKER, Duration::from_secs(60))?;
    let st = p.wait_exit(Duration::from_secs(30))?;
    no_panic(&p)?;
    ensure(st.code() == Some(0), || {
        format!("after poweroff: {}; {}", describe(&st), p.context())
    })?;
    Ok(format!(
        "ready after {:.1} s; cpus {vcpus}; MemTotal {kib} KiB = {:.1}% of {MEM} MiB; exit 0",
        ready_s.as_secs_f64(),
        ratio * 100.0
    ))
}

fn boot_1vcpu(ctx: &Ctx) -> Outcome {
    boot(ctx, 1)
}

fn boot_2vcpu(ctx: &Ctx) -> Outcome {
    boot(ctx, 2)
}

fn poweroff_exits_fast(ctx: &Ctx) -> Outcome {
    let mut p = ctx.vmm(
        "",
        &ctx.boot_args(256, 1, "quiet vmm_run=\"poweroff -f\""),
        &[],
    )?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    let st = p.wait_exit(Duration::from_secs(60))?;
    no_panic(&p)?;
    ensure(st.code() == Some(0), || {
        format!("after guest poweroff: {}; {}", describe(&st), p.context())
    })?;
    let (exit_at, _) = p.exit.expect("exited");
    let (last_at, last) = p.stdout.last().cloned().expect("READY was seen");
    let lag = exit_at.saturating_duration_since(last_at);
    ensure(lag <= Duration::from_secs(1), || {
        format!(
            "exit came {} ms after the last console line {last:?} (limit 1000 ms)",
            lag.as_millis()
        )
    })?;
    Ok(format!(
        "exit 0, {} ms after the last console line {last:?}",
        lag.as_millis()
    ))
}

fn sigterm_stops_cleanly(ctx: &Ctx) -> Outcome {
    let mut p = ctx.vmm("", &ctx.boot_args(256, 1, "quiet vmm_workload=idle"), &[])?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    p.pump_for(Duration::from_millis(500));
    ensure(p.running(), || {
        format!(
            "the VMM exited on its own during the idle workload; {}",
            p.context()
        )
    })?;
    let t0 = Instant::now();
    p.signal(libc::SIGTERM);
    let st = p.wait_exit(Duration::from_secs(10))?;
    let took = p.exit.expect("exited").0.saturating_duration_since(t0);
    no_panic(&p)?;
    let stopped_logged = p
        .stderr
        .iter()
        .chain(p.stdout.iter().map(|(_, l)| l))
        .any(|l| l.to_lowercase().contains("stopped"));
    ensure(took <= Duration::from_secs(5), || {
        format!("SIGTERM took {} ms to stop the VMM", took.as_millis())
    })?;
    ensure(
        st.code() == Some(0) || (st.code().is_some() && stopped_logged),
        || {
            format!(
                "after SIGTERM: {} and no \"stopped\" log; {}",
                describe(&st),
                p.context()
            )
        },
    )?;
    Ok(format!(
        "{} {} ms after SIGTERM",
        describe(&st),
        took.as_millis()
    ))
}

/// Counter values printed so far (`VMM-COUNTER <n>` lines).
fn counters(p: &Proc) -> Vec<u64> {
    p.stdout
        .iter()
        .filter_map(|(_, l)| {
            let i = l.find(COUNTER_MARKER)?;
            l[i + COUNTER_MARKER.len()..].trim().parse().ok()
        })
        .collect()
}

fn pause_resume(ctx: &Ctx) -> Outcome {
    let sock = ctx.work.join("api.sock");
    let mut p = start_with_api(ctx, &sock, "quiet vmm_workload=counter")?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    let counting = p.pump_until(Duration::from_secs(60), |p| counters(p).len() >= 3);
    ensure(counting, || {
        format!(
            "fewer than 3 VMM-COUNTER lines after ready; {}",
            p.context()
        )
    })?;

    ctx.control(&["pause"], &sock)?;
    let state = ctx.state(&sock)?;
    ensure(state == "Paused", || {
        format!("state after pause is {state:?}")
    })?;
    // Lines already in the pipe may still trickle in; then nothing may come for a second.
    p.pump_for(Duration::from_millis(300));
    let before = counters(&p);
    p.pump_for(Duration::from_millis(1200));
    let during = counters(&p);
    ensure(during.len() == before.len(), || {
        format!(
            "{} VMM-COUNTER lines while paused: {:?}",
            during.len() - before.len(),
            &during[before.len()..]
        )
    })?;
    ensure(p.running(), || {
        format!("the VMM exited while paused; {}", p.context())
    })?;

    ctx.control(&["resume"], &sock)?;
    let state = ctx.state(&sock)?;
    ensure(state == "Running", || {
        format!("state after resume is {state:?}")
    })?;
    let n = during.len();
    let resumed = p.pump_until(Duration::from_secs(30), |p| counters(p).len() >= n + 3);
    ensure(resumed, || {
        format!("counting did not continue after resume; {}", p.context())
    })?;
    let after = counters(&p);
    let (last_paused, first_resumed) = (during.last().copied().unwrap_or(0), after[n]);
    ensure(first_resumed > last_paused, || {
        format!("counter went from {last_paused} before pause to {first_resumed} after resume")
    })?;

    stop_via_api(ctx, &mut p, &sock)?;
    Ok(format!(
        "{} counts before pause (last {last_paused}), 0 in 1.2 s paused, resumed at {first_resumed}; stopped with exit 0",
        n
    ))
}
