//! Before-snapshot and after-restore hooks: run a command, send a signal, or write to a unix
//! socket, each bounded by a timeout.
//!
//! The trimmer never kills a process it did not start: a command hook runs in its own process
//! group, and only that group is killed (SIGKILL) when the hook outlives its timeout. Signal
//! hooks send only the signals a policy may name (never SIGKILL or SIGSTOP).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use policies::{Hook, HookAction};
use serde::Serialize;

/// How often a running hook is checked.
const POLL: Duration = Duration::from_millis(5);

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookStatus {
    /// It did what it should within its timeout.
    Ok,
    /// It failed (exit status, refused connection, wrong reply, ...).
    Failed,
    /// It did not finish within its timeout (a command is then killed).
    TimedOut,
}

/// What one hook did.
#[derive(Debug, Clone, Serialize)]
pub struct HookReport {
    /// The hook's name.
    pub name: String,
    /// `command`, `signal` or `unix_socket`.
    pub kind: &'static str,
    /// Outcome.
    pub status: HookStatus,
    /// Time taken.
    pub duration_ms: u64,
    /// The timeout applied (the hook's own, or less when the trim budget was short).
    pub timeout_ms: u64,
    /// What went wrong, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// CPU time the process the hook asked (a signalled pid, a unix socket's peer) spent while
    /// the hook waited for its answer, ms: its release work, which runs much slower in an
    /// emulated guest than on hardware. A command hook's CPU is the trimmer's (a waited-for
    /// child).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_cpu_ms: Option<u64>,
}

/// Where the hooks read other processes' CPU time.
const PROC_ROOT: &str = "/proc";

/// CPU time of `pid`, ms (`None` when unreadable).
fn target_cpu_ms(pid: u32) -> Option<u64> {
    super::cpu::process_cpu_ms(Path::new(PROC_ROOT), &pid.to_string(), false)
}

/// CPU time `pid` spent since it stood at `before` ms.
fn target_cpu_since(pid: Option<u32>, before: Option<u64>) -> Option<u64> {
    Some(target_cpu_ms(pid?)?.saturating_sub(before?))
}

/// Runs `hook` with at most `timeout` (never more than the hook's own timeout).
pub fn run_hook(hook: &Hook, timeout: Duration) -> HookReport {
    let timeout = timeout.min(Duration::from_millis(hook.timeout_ms));
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let result = match &hook.action {
        HookAction::Command { argv } => run_command(argv, deadline),
        HookAction::Signal {
            signal,
            pid_file,
            ack_file,
        } => send_signal(
            signal.number(),
            signal.name(),
            pid_file,
            ack_file.as_deref(),
            deadline,
        ),
        HookAction::UnixSocket {
            path,
            message,
            expect_reply,
        } => write_socket(path, message, expect_reply.as_deref(), deadline),
    };
    let (status, error, target_cpu_ms) = match result {
        Ok(cpu) => (HookStatus::Ok, None, cpu),
        Err(HookFailure::Failed(e)) => (HookStatus::Failed, Some(e), None),
        Err(HookFailure::TimedOut(e)) => (HookStatus::TimedOut, Some(e), None),
    };
    let report = HookReport {
        name: hook.name.clone(),
        kind: hook.action.kind(),
        status,
        duration_ms: t0.elapsed().as_millis() as u64,
        timeout_ms: timeout.as_millis() as u64,
        error,
        target_cpu_ms,
    };
    match &report.error {
        None => tracing::info!(hook = %report.name, duration_ms = report.duration_ms, "hook done"),
        Some(e) => tracing::warn!(hook = %report.name, status = ?report.status, "hook: {e}"),
    }
    report
}

/// A hook's outcome: on success the CPU time of the process it asked, where known.
type HookResult = Result<Option<u64>, HookFailure>;

enum HookFailure {
    Failed(String),
    TimedOut(String),
}

fn run_command(argv: &[String], deadline: Instant) -> HookResult {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| HookFailure::Failed("empty command".into()))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        // Its own process group, so that a timeout kills what the hook started and nothing else.
        .process_group(0)
        .spawn()
        .map_err(|e| HookFailure::Failed(format!("start {program}: {e}")))?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(None),
            Ok(Some(status)) => {
                return Err(HookFailure::Failed(format!(
                    "{program} exited with {status}"
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(HookFailure::Failed(format!("wait for {program}: {e}"))),
        }
        if Instant::now() >= deadline {
            let pgid = child.id() as i32;
            // SAFETY: kill(2) with a negative pid signals the process group the hook's child
            // leads (it was started with process_group(0)): only processes this hook started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookFailure::TimedOut(format!(
                "{program} still running at the timeout; killed its process group {pgid}"
            )));
        }
        std::thread::sleep(POLL);
    }
}

fn send_signal(
    number: i32,
    name: &str,
    pid_file: &Path,
    ack_file: Option<&Path>,
    deadline: Instant,
) -> HookResult {
    let text = std::fs::read_to_string(pid_file)
        .map_err(|e| HookFailure::Failed(format!("read pid file {}: {e}", pid_file.display())))?;
    let pid: i32 = text.trim().parse().ok().filter(|p| *p > 1).ok_or_else(|| {
        HookFailure::Failed(format!(
            "pid file {} holds {:?}, not a pid > 1",
            pid_file.display(),
            text.trim()
        ))
    })?;
    if let Some(ack) = ack_file {
        match std::fs::remove_file(ack) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(HookFailure::Failed(format!(
                    "remove old ack file {}: {e}",
                    ack.display()
                )))
            }
        }
    }
    let target = Some(pid as u32);
    let cpu_before = target_cpu_ms(pid as u32);
    // SAFETY: kill(2) with a positive pid and one of the policy's allowed signals (never
    // SIGKILL/SIGSTOP); no memory is passed.
    if unsafe { libc::kill(pid, number) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(HookFailure::Failed(format!(
            "send {name} to pid {pid}: {e}"
        )));
    }
    let Some(ack) = ack_file else {
        return Ok(target_cpu_since(target, cpu_before));
    };
    while Instant::now() < deadline {
        if ack.exists() {
            return Ok(target_cpu_since(target, cpu_before));
        }
        std::thread::sleep(POLL);
    }
    Err(HookFailure::TimedOut(format!(
        "pid {pid} did not create {} after {name}",
        ack.display()
    )))
}

fn write_socket(path: &Path, message: &str, expect: Option<&str>, deadline: Instant) -> HookResult {
    let remaining = |what: &str| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| HookFailure::TimedOut(format!("{what} {}: timeout", path.display())))
    };
    let mut stream = UnixStream::connect(path)
        .map_err(|e| HookFailure::Failed(format!("connect to {}: {e}", path.display())))?;
    let peer = peer_pid(&stream);
    let cpu_before = peer.and_then(target_cpu_ms);
    let io_err = |what: &str, e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            HookFailure::TimedOut(format!(
                "{what} {}: no answer within the timeout",
                path.display()
            ))
        } else {
            HookFailure::Failed(format!("{what} {}: {e}", path.display()))
        }
    };
    stream
        .set_write_timeout(Some(remaining("write to")?))
        .map_err(|e| io_err("write to", e))?;
    stream
        .write_all(message.as_bytes())
        .map_err(|e| io_err("write to", e))?;
    let Some(expect) = expect else {
        return Ok(target_cpu_since(peer, cpu_before));
    };
    stream
        .set_read_timeout(Some(remaining("read from")?))
        .map_err(|e| io_err("read from", e))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| io_err("read from", e))?;
    let got = line.trim_end_matches(['\n', '\r']);
    if got == expect {
        Ok(target_cpu_since(peer, cpu_before))
    } else {
        Err(HookFailure::Failed(format!(
            "{} answered {got:?}, expected {expect:?}",
            path.display()
        )))
    }
}

/// The pid of a unix socket's peer (`SO_PEERCRED`), when the kernel tells it.
fn peer_pid(stream: &UnixStream) -> Option<u32> {
    use std::os::unix::io::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live `ucred`, for an open
    // socket; nothing else is touched.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
}
