//! A `vmm` child process of the demo whose console (stdout) is collected line by line, so the
//! demo can wait for the guest's markers while the child runs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A running `vmm` subcommand with its stdout lines.
pub struct VmmChild {
    what: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl VmmChild {
    /// Starts `exe args...`; stderr goes to `stderr_log` (the VMM's own log).
    pub fn spawn(
        exe: &Path,
        args: &[String],
        what: &str,
        stderr_log: &Path,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(stderr_log)
            .with_context(|| format!("creating {}", stderr_log.display()))?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {what} ({} {})", exe.display(), args.join(" ")))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().context("the child has no stdout")?;
        let sink = lines.clone();
        let tag = what.trim_start_matches("the ").to_string();
        // Read until the pipe closes whatever the guest prints (a console may carry bytes that
        // are not UTF-8): a reader that stopped would leave the VMM blocked on a full pipe.
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        println!("  {tag}| {line}");
                        sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                    }
                }
            }
        });
        Ok(VmmChild {
            what: what.to_string(),
            child,
            lines,
        })
    }

    /// Waits until a console line contains `marker`; returns the text after it.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rest) = self
                .lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find_map(|l| {
                    l.find(marker)
                        .map(|i| l[i + marker.len()..].trim().to_string())
                })
            {
                return Ok(rest);
            }
            if let Some(st) = self.child.try_wait().context("waiting for the child")? {
                bail!("{} ended ({st}) before printing {marker:?}", self.what);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} printed no {marker:?} within {} s",
                    self.what,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the child to exit, killing it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().context("waiting for the child")? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "{} did not exit within {} s; killed it",
                    self.what,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for VmmChild {
    fn drop(&mut self) {
        // Never leave a VM behind when the demo fails half-way.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `exe args...` to completion (bounded) and returns its stdout; fails with its stderr.
pub fn run_to_end(
    exe: &Path,
    args: &[String],
    what: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    // Collect the output while it runs (a child writing more than a pipe holds would otherwise
    // block before it exits) and bound the wait.
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.context("collecting output")?,
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped (the
            // collecting thread is still waiting for it).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            bail!(
                "{what} did not finish within {} s; killed it",
                timeout.as_secs()
            );
        }
    };
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
