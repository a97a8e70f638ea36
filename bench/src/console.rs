//! Running a VMM as a child process and timing its console: spawn → first stdout byte, spawn →
//! the readiness line, spawn → exit.
//!
//! Both VMMs send the guest's serial console to stdout (ours by default, QEMU with
//! `-serial stdio`) and their own diagnostics to stderr, so the first stdout byte is the guest's
//! first console byte. A reader thread per stream timestamps each `read()`; a waiter thread
//! timestamps the exit.

use std::collections::VecDeque;
use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How many trailing lines of each stream are kept for failure reports.
pub const TAIL_LINES: usize = 40;
/// Longest line kept in a tail (longer ones are cut).
const MAX_LINE: usize = 400;

/// Splits a byte stream into lines, remembers the last [`TAIL_LINES`] of them and says when a
/// line containing the marker (or matching a predicate) completes.
#[derive(Debug)]
pub struct LineScanner {
    marker: String,
    partial: Vec<u8>,
    tail: VecDeque<String>,
    /// Total bytes fed.
    pub bytes: u64,
    /// Whether the marker line has been seen.
    pub marker_seen: bool,
    /// The first line that starts a `Kernel command line:` message, if any.
    pub kernel_cmdline: Option<String>,
    /// Whether the kernel's `reboot: Power down` line was seen.
    pub power_down_seen: bool,
    /// Deduplicated lines containing `warning` (for stderr).
    pub warnings: Vec<String>,
}

impl LineScanner {
    /// A scanner looking for lines that contain `marker`.
    pub fn new(marker: &str) -> Self {
        LineScanner {
            marker: marker.to_string(),
            partial: Vec::new(),
            tail: VecDeque::with_capacity(TAIL_LINES + 1),
            bytes: 0,
            marker_seen: false,
            kernel_cmdline: None,
            power_down_seen: false,
            warnings: Vec::new(),
        }
    }

    /// Feeds a chunk; returns true when this chunk completed the first marker line.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        self.bytes += chunk.len() as u64;
        let mut completed_marker = false;
        for &b in chunk {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                completed_marker |= self.line_done(&line);
            } else if self.partial.len() < 64 * 1024 {
                self.partial.push(b);
            }
        }
        completed_marker
    }

    /// Ends the stream: a last line without newline counts too.
    pub fn finish(&mut self) -> bool {
        if self.partial.is_empty() {
            return false;
        }
        let line = std::mem::take(&mut self.partial);
        self.line_done(&line)
    }

    fn line_done(&mut self, raw: &[u8]) -> bool {
        let text = String::from_utf8_lossy(raw);
        let text = text.trim_end_matches('\r');
        let mut hit = false;
        if !self.marker_seen && !self.marker.is_empty() && text.contains(&self.marker) {
            self.marker_seen = true;
            hit = true;
        }
        if self.kernel_cmdline.is_none() {
            if let Some(at) = text.find("Kernel command line: ") {
                self.kernel_cmdline = Some(text[at + "Kernel command line: ".len()..].to_string());
            }
        }
        if text.contains("reboot: Power down") {
            self.power_down_seen = true;
        }
        if text.to_ascii_lowercase().contains("warning")
            && self.warnings.len() < 10
            && !self.warnings.iter().any(|w| w == text)
        {
            self.warnings.push(text.to_string());
        }
        let mut kept: String = text.chars().take(MAX_LINE).collect();
        if kept.len() < text.len() {
            kept.push_str(" [...]");
        }
        self.tail.push_back(kept);
        if self.tail.len() > TAIL_LINES {
            self.tail.pop_front();
        }
        hit
    }

    /// The last lines seen (plus an unterminated last line).
    pub fn tail(&self) -> Vec<String> {
        let mut t: Vec<String> = self.tail.iter().cloned().collect();
        if !self.partial.is_empty() {
            t.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        t
    }
}

/// What the reader threads record.
#[derive(Debug)]
struct Watch {
    first_byte: Option<Duration>,
    ready: Option<Duration>,
    stdout: LineScanner,
    stderr: LineScanner,
    stdout_closed: bool,
}

/// How a child ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// Spawn → exit (None when it had to be killed after the deadline).
    pub at: Option<Duration>,
    /// Its status.
    pub status: Option<ExitStatus>,
    /// Whether the deadline passed and it was killed.
    pub killed: bool,
}

/// `exit N` or `signal N`.
pub fn describe_status(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".to_string(),
    }
}

/// A running VMM whose console is being timed.
pub struct TimedChild {
    pid: i32,
    start: Instant,
    watch: Arc<(Mutex<Watch>, Condvar)>,
    exited: mpsc::Receiver<(Instant, std::io::Result<ExitStatus>)>,
    readers: Vec<JoinHandle<()>>,
    exit: Option<Exit>,
}

impl TimedChild {
    /// Starts `argv` (stdin from /dev/null) and starts timing from just before `spawn()`.
    pub fn spawn(argv: &[String], marker: &str) -> anyhow::Result<TimedChild> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("empty command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {program}: {e}"))?;
        let pid = child.id() as i32;
        let watch = Arc::new((
            Mutex::new(Watch {
                first_byte: None,
                ready: None,
                stdout: LineScanner::new(marker),
                stderr: LineScanner::new(""),
                stdout_closed: false,
            }),
            Condvar::new(),
        ));
        let mut readers = Vec::new();
        let stdout = child.stdout.take().expect("stdout is piped");
        let w = Arc::clone(&watch);
        readers.push(std::thread::spawn(move || {
            read_stream(stdout, start, &w, true)
        }));
        let stderr = child.stderr.take().expect("stderr is piped");
        let w = Arc::clone(&watch);
        readers.push(std::thread::spawn(move || {
            read_stream(stderr, start, &w, false)
        }));
        let (tx, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send((Instant::now(), status));
        });
        Ok(TimedChild {
            pid,
            start,
            watch,
            exited,
            readers,
            exit: None,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits until the readiness line appeared, stdout closed, or `deadline`; returns spawn →
    /// readiness when it appeared.
    pub fn wait_ready(&self, deadline: Instant) -> Option<Duration> {
        let (lock, cv) = &*self.watch;
        let mut w = lock.lock().expect("watch lock");
        loop {
            if w.ready.is_some() || w.stdout_closed {
                return w.ready;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            w = cv.wait_timeout(w, deadline - now).expect("watch lock").0;
        }
    }

    /// Sends `signal` to the child (ignored if it already exited and was reaped).
    pub fn signal(&self, signal: i32) {
        if self.exit.is_none() {
            // SAFETY: kill(2) on our own child's pid; it is not reaped before `exited` reports,
            // so the pid cannot have been reused.
            unsafe {
                libc::kill(self.pid, signal);
            }
        }
    }

    /// Waits for the exit until `deadline`, then kills it (SIGKILL) and waits for that.
    pub fn wait_exit(&mut self, deadline: Instant) -> anyhow::Result<Exit> {
        if let Some(e) = &self.exit {
            return Ok(e.clone());
        }
        let now = Instant::now();
        let (at, status, killed) = match self
            .exited
            .recv_timeout(deadline.saturating_duration_since(now))
        {
            Ok((t, st)) => (Some(t - self.start), st, false),
            Err(_) => {
                self.signal(libc::SIGKILL);
                let (_, st) = self
                    .exited
                    .recv_timeout(Duration::from_secs(30))
                    .map_err(|_| {
                        anyhow::anyhow!("pid {} did not die within 30 s of SIGKILL", self.pid)
                    })?;
                (None, st, true)
            }
        };
        let status = status.map_err(|e| anyhow::anyhow!("waiting for pid {}: {e}", self.pid))?;
        // The pipes close at exit (unless a grandchild holds them); give the readers a moment.
        for r in self.readers.drain(..) {
            let until = Instant::now() + Duration::from_secs(5);
            while !r.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
        let exit = Exit {
            at,
            status: Some(status),
            killed,
        };
        self.exit = Some(exit.clone());
        Ok(exit)
    }

    /// Spawn → first stdout byte, spawn → readiness.
    pub fn times(&self) -> (Option<Duration>, Option<Duration>) {
        let w = self.watch.0.lock().expect("watch lock");
        (w.first_byte, w.ready)
    }

    /// Facts from the console: bytes, kernel command line, power-down seen, stderr warnings.
    pub fn console_facts(&self) -> (u64, Option<String>, bool, Vec<String>) {
        let w = self.watch.0.lock().expect("watch lock");
        (
            w.stdout.bytes,
            w.stdout.kernel_cmdline.clone(),
            w.stdout.power_down_seen,
            w.stderr.warnings.clone(),
        )
    }

    /// The last console and stderr lines.
    pub fn tails(&self) -> (Vec<String>, Vec<String>) {
        let w = self.watch.0.lock().expect("watch lock");
        (w.stdout.tail(), w.stderr.tail())
    }
}

impl Drop for TimedChild {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.signal(libc::SIGKILL);
        }
    }
}

fn read_stream(
    mut stream: impl Read,
    start: Instant,
    watch: &(Mutex<Watch>, Condvar),
    is_stdout: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let at = start.elapsed();
        let mut w = watch.0.lock().expect("watch lock");
        if is_stdout {
            if w.first_byte.is_none() {
                w.first_byte = Some(at);
            }
            if w.stdout.feed(&buf[..n]) && w.ready.is_none() {
                w.ready = Some(at);
                watch.1.notify_all();
            }
        } else {
            w.stderr.feed(&buf[..n]);
        }
    }
    let mut w = watch.0.lock().expect("watch lock");
    if is_stdout {
        if w.stdout.finish() && w.ready.is_none() {
            w.ready = Some(start.elapsed());
        }
        w.stdout_closed = true;
    } else {
        w.stderr.finish();
    }
    watch.1.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_split_across_chunks_completes_on_newline() {
        let mut s = LineScanner::new("VMM-GUEST-READY");
        assert!(!s.feed(b"boot\r\nVMM-GUEST-"));
        assert!(!s.feed(b"REA"));
        assert!(s.feed(b"DY\r\nafter\n"));
        assert!(s.marker_seen);
        // Only the first occurrence counts.
        assert!(!s.feed(b"VMM-GUEST-READY\n"));
        assert_eq!(s.bytes, 6 + 10 + 3 + 10 + 16);
        assert_eq!(s.tail()[..3], ["boot", "VMM-GUEST-READY", "after"]);
    }

    #[test]
    fn console_facts_are_picked_up() {
        let mut s = LineScanner::new("X");
        s.feed(b"[    0.2] Kernel command line: console=ttyS0 quiet\n");
        s.feed(b"[    1.0] reboot: Power down\r\n");
        s.feed(b"qemu: warning: thing\nqemu: warning: thing\nWarning: other\n");
        assert_eq!(s.kernel_cmdline.as_deref(), Some("console=ttyS0 quiet"));
        assert!(s.power_down_seen);
        assert_eq!(s.warnings, ["qemu: warning: thing", "Warning: other"]);
    }

    #[test]
    fn tail_keeps_the_last_lines_and_the_unterminated_one() {
        let mut s = LineScanner::new("");
        for i in 0..100 {
            s.feed(format!("line {i}\n").as_bytes());
        }
        s.feed(b"partial");
        let t = s.tail();
        assert_eq!(t.len(), TAIL_LINES + 1);
        assert_eq!(t[0], format!("line {}", 100 - TAIL_LINES));
        assert_eq!(t.last().unwrap(), "partial");
        assert!(!s.finish(), "an empty marker never matches");
    }

    #[test]
    fn marker_on_an_unterminated_last_line_counts_at_finish() {
        let mut s = LineScanner::new("READY");
        s.feed(b"READY");
        assert!(!s.marker_seen);
        assert!(s.finish());
    }

    #[test]
    fn times_a_real_child() {
        let argv: Vec<String> = [
            "/bin/sh",
            "-c",
            "echo w: warning x >&2; sleep 0.2; echo hello; sleep 0.3; echo READY; exit 3",
        ]
        .map(String::from)
        .to_vec();
        let mut c = TimedChild::spawn(&argv, "READY").unwrap();
        let ready = c
            .wait_ready(Instant::now() + Duration::from_secs(20))
            .unwrap();
        let exit = c
            .wait_exit(Instant::now() + Duration::from_secs(20))
            .unwrap();
        let (first, ready2) = c.times();
        let first = first.unwrap();
        assert_eq!(ready2, Some(ready));
        assert!(first >= Duration::from_millis(150), "{first:?}");
        assert!(ready >= first + Duration::from_millis(250), "{ready:?}");
        // (No order between `ready` and the exit: a busy reader may see READY after the exit.)
        assert!(exit.at.is_some());
        assert_eq!(describe_status(&exit.status.unwrap()), "exit 3");
        assert!(!exit.killed);
        assert_eq!(c.console_facts().3, ["w: warning x"]);
    }

    #[test]
    fn deadline_kills() {
        let argv: Vec<String> = ["/bin/sh", "-c", "exec sleep 100"]
            .map(String::from)
            .to_vec();
        let mut c = TimedChild::spawn(&argv, "READY").unwrap();
        let t = Instant::now();
        assert!(c
            .wait_ready(Instant::now() + Duration::from_millis(200))
            .is_none());
        let exit = c
            .wait_exit(Instant::now() + Duration::from_millis(100))
            .unwrap();
        assert!(exit.killed && exit.at.is_none());
        assert_eq!(describe_status(&exit.status.unwrap()), "signal 9");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
