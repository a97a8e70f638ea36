//! Running a command in the rig (or on the host) while streaming its output line by line.

use crate::{Result, RigError};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Exit status `run.sh` (and [`run_local`]'s guard) reports for a timeout.
pub const TIMEOUT_EXIT: i32 = 124;

/// Extra time granted on top of [`RigOptions::timeout_s`] before the rig process group is
/// killed from here: `run.sh` may first install QEMU, download its kernel and boot the rig.
const RIG_GUARD_SLACK: Duration = Duration::from_secs(600);

/// How big the rig is and how long the command may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RigOptions {
    /// Rig memory in MiB (`run.sh --mem`).
    pub mem_mib: u32,
    /// Rig vCPUs (`run.sh --smp`; run.sh itself falls back to 1 on QEMU < 10).
    pub smp: u32,
    /// Wall-clock limit of the rig in seconds (`run.sh --timeout`).
    pub timeout_s: u64,
}

impl Default for RigOptions {
    /// 3072 MiB, 1 vCPU (the safe setting for QEMU 7.2, see `kvm-rig/NOTES.md`), 25 minutes.
    fn default() -> Self {
        RigOptions {
            mem_mib: 3072,
            smp: 1,
            timeout_s: 1500,
        }
    }
}

/// How a command in the rig (or on the host) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RigOutcome {
    /// The command's exit status (124 on timeout, 125 when the rig ended without reporting one).
    pub exit_code: i32,
    /// Whether the time limit ended it.
    pub timed_out: bool,
    /// Wall-clock time from start to exit.
    pub duration: Duration,
    /// Every output line (stdout and stderr interleaved as received, without line endings).
    pub lines: Vec<String>,
}

/// Runs `command` inside the nested KVM rig: `script` is `run.sh`, `payload` the directory copied
/// to `/payload` (the command's working directory there). Each output line (stdout and stderr,
/// `\r` stripped) goes to `on_line` as it arrives.
pub fn run_in_rig<S: AsRef<OsStr>>(
    script: &Path,
    payload: impl AsRef<Path>,
    command: &[S],
    opts: RigOptions,
    on_line: impl FnMut(&str),
) -> Result<RigOutcome> {
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .args(["--mem", &opts.mem_mib.to_string()])
        .args(["--smp", &opts.smp.to_string()])
        .args(["--timeout", &opts.timeout_s.to_string()])
        .arg(payload.as_ref())
        .arg("--")
        .args(command);
    // One rig at a time per host: each saturates every core, and two at once slow both past
    // their timeouts. The lock is released when `_lock` drops (or the process dies).
    let _lock = RigLock::acquire(
        |path| tracing::info!(lock = %path.display(), "another KVM rig is running; waiting for it"),
    )?;
    tracing::info!(script = %script.display(), payload = %payload.as_ref().display(), ?opts, "starting the KVM rig");
    let guard = Duration::from_secs(opts.timeout_s) + RIG_GUARD_SLACK;
    let mut outcome = run_streaming(cmd, "kvm-rig run.sh", guard, on_line)?;
    if outcome.exit_code == TIMEOUT_EXIT
        && outcome
            .lines
            .iter()
            .any(|l| l.starts_with("kvm-rig: timed out"))
    {
        outcome.timed_out = true;
    }
    Ok(outcome)
}

/// The host-wide rig lock file (`$VMM_KVM_RIG_LOCK`, default `/tmp/kvm-rig.lock`); shell users
/// share it with `flock /tmp/kvm-rig.lock run.sh ...`.
pub fn rig_lock_path() -> std::path::PathBuf {
    std::env::var_os("VMM_KVM_RIG_LOCK")
        .filter(|p| !p.is_empty())
        .map(Into::into)
        .unwrap_or_else(|| "/tmp/kvm-rig.lock".into())
}

/// An exclusive `flock(2)` on the host-wide rig lock, held until dropped: one rig (or one
/// timing-sensitive run on a host with real KVM) at a time. [`run_in_rig`] takes it itself, so
/// it must not be held around that call (a second `flock` from this process would wait for
/// itself).
pub struct RigLock {
    _file: std::fs::File,
}

impl RigLock {
    /// Takes the lock; while another holder has it, calls `on_wait` once with the lock's path
    /// and then blocks.
    pub fn acquire(on_wait: impl FnOnce(&Path)) -> Result<RigLock> {
        use std::os::fd::AsRawFd;
        let path = rig_lock_path();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| RigError::Lock {
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            on_wait(&path);
            // SAFETY: as above, blocking this time.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(RigError::Lock {
                    path,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(RigLock { _file: file })
    }
}

/// Runs `program args...` on the host in `cwd`, streaming its output like [`run_in_rig`] and
/// killing its process group after `timeout`.
pub fn run_local<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    cwd: &Path,
    timeout: Duration,
    on_line: impl FnMut(&str),
) -> Result<RigOutcome> {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd);
    run_streaming(cmd, &program.display().to_string(), timeout, on_line)
}

/// Kills the child's process group unless disarmed (so a panicking callback leaks nothing).
struct GroupKiller {
    pgid: i32,
    armed: bool,
}

impl GroupKiller {
    fn kill(&self) {
        // SAFETY: kill(2) with a negative pid signals the process group we created; no memory
        // is touched.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

fn run_streaming(
    mut cmd: Command,
    program: &str,
    timeout: Duration,
    mut on_line: impl FnMut(&str),
) -> Result<RigOutcome> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let start = Instant::now();
    let mut child: Child = cmd.spawn().map_err(|source| RigError::Spawn {
        program: program.to_string(),
        source,
    })?;
    let mut killer = GroupKiller {
        pgid: child.id() as i32,
        armed: true,
    };
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let tx = tx.clone();
        std::thread::spawn(move || forward_lines(stream, tx))
    })
    .collect();
    drop(tx);

    let deadline = start + timeout;
    let mut lines = Vec::new();
    let mut timed_out = false;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let until = drain_deadline.unwrap_or(deadline);
        if now >= until {
            if drain_deadline.is_some() {
                tracing::warn!(program, "output still open after the kill; giving up on it");
                break;
            }
            tracing::warn!(
                program,
                ?timeout,
                "time limit reached; killing the process group"
            );
            timed_out = true;
            killer.kill();
            drain_deadline = Some(now + Duration::from_secs(5));
            continue;
        }
        match rx.recv_timeout(until - now) {
            Ok(line) => {
                on_line(&line);
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if timed_out {
        killer.kill();
    }
    let status = child.wait().map_err(|source| RigError::Wait {
        program: program.to_string(),
        source,
    })?;
    // Other members of the group (say a backgrounded helper) must not outlive the run.
    killer.kill();
    killer.armed = false;
    if drain_deadline.is_none() {
        for r in readers {
            let _ = r.join();
        }
    }
    let exit_code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(_)) if timed_out => TIMEOUT_EXIT,
        (None, Some(signal)) => {
            return Err(RigError::Signaled {
                program: program.to_string(),
                signal,
            })
        }
        (None, None) => unreachable!("an exit status has a code or a signal"),
    };
    let duration = start.elapsed();
    tracing::info!(program, exit_code, timed_out, ?duration, "finished");
    Ok(RigOutcome {
        exit_code,
        timed_out,
        duration,
        lines,
    })
}

/// Sends each line of `stream` (lossy UTF-8, without `\n` / `\r\n`) until EOF or a closed channel.
fn forward_lines(stream: Box<dyn Read + Send>, tx: mpsc::Sender<String>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                let line = String::from_utf8_lossy(&buf).replace('\r', "");
                if tx.send(line).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration) -> (RigOutcome, Vec<(Duration, String)>) {
        let start = Instant::now();
        let mut seen = Vec::new();
        let out = run_local(
            Path::new("/bin/sh"),
            &["-c", script],
            Path::new("/"),
            timeout,
            |l| seen.push((start.elapsed(), l.to_string())),
        )
        .unwrap();
        (out, seen)
    }

    #[test]
    fn streams_lines_as_they_come_and_returns_the_exit_code() {
        let (out, seen) = sh(
            "echo one; echo err >&2; sleep 1; printf 'two\\r\\n'; printf 'tail'; exit 7",
            Duration::from_secs(30),
        );
        assert_eq!(out.exit_code, 7);
        assert!(!out.timed_out);
        let texts: Vec<_> = seen.iter().map(|(_, l)| l.as_str()).collect();
        assert!(
            texts.contains(&"one") && texts.contains(&"err"),
            "{texts:?}"
        );
        assert!(texts.ends_with(&["two", "tail"]), "{texts:?}");
        // "one" arrived before the sleep ended: streamed, not collected at exit.
        let one = seen.iter().find(|(_, l)| l == "one").unwrap().0;
        let two = seen.iter().find(|(_, l)| l == "two").unwrap().0;
        assert!(two - one >= Duration::from_millis(700), "{one:?} {two:?}");
        assert_eq!(out.lines.len(), 4);
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let start = Instant::now();
        // The backgrounded sleep keeps stdout open: only a group kill ends it.
        let (out, seen) = sh("echo start; sleep 100 & sleep 100", Duration::from_secs(1));
        assert!(out.timed_out);
        assert_eq!(out.exit_code, TIMEOUT_EXIT);
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(seen[0].1, "start");
    }

    #[test]
    fn spawn_failure_names_the_program() {
        let e = run_local(
            Path::new("/nonexistent/prog"),
            &[] as &[&str],
            Path::new("/"),
            Duration::from_secs(1),
            |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/prog"), "{e}");
    }

    /// A trivial payload through the real rig (~15-60 s): `cargo test -p rig -- --ignored`.
    #[test]
    #[ignore = "boots the QEMU rig; run with --ignored"]
    fn real_rig_streams_and_returns_exit_code() {
        let Some(script) = crate::find_rig_script() else {
            panic!("the rig script was not found (set $VMM_KVM_RIG)");
        };
        let mut p = crate::Payload::new().unwrap();
        p.add_bytes(
            "t.sh",
            b"echo payload-line-1\nsleep 1\necho payload-line-2\nexit 9\n",
            0o755,
        )
        .unwrap();
        let mut seen = Vec::new();
        let out = run_in_rig(
            &script,
            p.path(),
            &["sh", "./t.sh"],
            RigOptions {
                mem_mib: 512,
                smp: 1,
                timeout_s: 300,
            },
            |l| seen.push(l.to_string()),
        )
        .unwrap();
        assert_eq!(out.exit_code, 9, "{seen:?}");
        assert!(seen.iter().any(|l| l == "payload-line-2"), "{seen:?}");
    }
}
