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
    let (status, error) = match result {
        Ok(()) => (HookStatus::Ok, None),
        Err(HookFailure::Failed(e)) => (HookStatus::Failed, Some(e)),
        Err(HookFailure::TimedOut(e)) => (HookStatus::TimedOut, Some(e)),
    };
    let report = HookReport {
        name: hook.name.clone(),
        kind: hook.action.kind(),
        status,
        duration_ms: t0.elapsed().as_millis() as u64,
        timeout_ms: timeout.as_millis() as u64,
        error,
    };
    match &report.error {
        None => tracing::info!(hook = %report.name, duration_ms = report.duration_ms, "hook done"),
        Some(e) => tracing::warn!(hook = %report.name, status = ?report.status, "hook: {e}"),
    }
    report
}

enum HookFailure {
    Failed(String),
    TimedOut(String),
}

fn run_command(argv: &[String], deadline: Instant) -> Result<(), HookFailure> {
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
            Ok(Some(status)) if status.success() => return Ok(()),
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
) -> Result<(), HookFailure> {
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
    // SAFETY: kill(2) with a positive pid and one of the policy's allowed signals (never
    // SIGKILL/SIGSTOP); no memory is passed.
    if unsafe { libc::kill(pid, number) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(HookFailure::Failed(format!(
            "send {name} to pid {pid}: {e}"
        )));
    }
    let Some(ack) = ack_file else {
        return Ok(());
    };
    while Instant::now() < deadline {
        if ack.exists() {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
    Err(HookFailure::TimedOut(format!(
        "pid {pid} did not create {} after {name}",
        ack.display()
    )))
}

fn write_socket(
    path: &Path,
    message: &str,
    expect: Option<&str>,
    deadline: Instant,
) -> Result<(), HookFailure> {
    let remaining = |what: &str| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| HookFailure::TimedOut(format!("{what} {}: timeout", path.display())))
    };
    let mut stream = UnixStream::connect(path)
        .map_err(|e| HookFailure::Failed(format!("connect to {}: {e}", path.display())))?;
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
        return Ok(());
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
        Ok(())
    } else {
        Err(HookFailure::Failed(format!(
            "{} answered {got:?}, expected {expect:?}",
            path.display()
        )))
    }
}
