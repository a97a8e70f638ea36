//! A child process (normally `vmm`) whose output is streamed live, prefixed by a tag, and kept
//! with arrival times so scenarios can wait for lines and measure latencies.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// PIDs of children still running, so a scenario's watchdog can kill what it left behind.
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Kills (SIGKILL) every child started through [`Proc`] that has not exited yet.
pub fn kill_all_live() -> usize {
    let pids: Vec<i32> = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    for pid in &pids {
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet (the waiter thread
        // removes it from LIVE before reaping completes); touches no memory.
        unsafe {
            libc::kill(*pid, libc::SIGKILL);
        }
    }
    pids.len()
}

/// Prints one console line (`[tag] text`) to stdout in one write, so lines from concurrent
/// processes do not interleave.
pub fn console(tag: &str, text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[{tag}] {text}");
    let _ = out.flush();
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

enum Event {
    Line(Stream, Instant, String),
    Closed,
    Exit(Instant, ExitStatus),
}

/// A running (or finished) child with streamed, timestamped output.
pub struct Proc {
    /// Prefix of its console lines.
    pub tag: String,
    pid: i32,
    rx: Receiver<Event>,
    /// When it was started.
    pub started: Instant,
    /// Stdout lines with arrival times.
    pub stdout: Vec<(Instant, String)>,
    /// Stderr lines.
    pub stderr: Vec<String>,
    /// Exit time and status, once exited.
    pub exit: Option<(Instant, ExitStatus)>,
    open_streams: u8,
}

impl Proc {
    /// Starts `program args` with extra `env`, stdin closed, streaming its output as
    /// `[tag] ...` (stdout) and `[tag!] ...` (stderr).
    pub fn spawn<S: AsRef<OsStr>>(
        tag: &str,
        program: &std::path::Path,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Result<Proc, String> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        console(
            tag,
            &format!("$ {env:?} {} {}", program.display(), shown.join(" ")),
        );
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        let pid = child.id() as i32;
        if let Ok(mut live) = LIVE.lock() {
            live.push(pid);
        }
        let (tx, rx) = mpsc::channel();
        let out = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let err = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        for (stream, pipe, shown_tag) in [
            (Stream::Stdout, out, tag.to_string()),
            (Stream::Stderr, err, format!("{tag}!")),
        ] {
            let tx = tx.clone();
            let pipe = pipe.expect("piped");
            std::thread::spawn(move || read_lines(stream, pipe, &shown_tag, tx));
        }
        std::thread::spawn(move || {
            let status = child.wait();
            let at = Instant::now();
            if let Ok(mut live) = LIVE.lock() {
                live.retain(|p| *p != pid);
            }
            if let Ok(status) = status {
                let _ = tx.send(Event::Exit(at, status));
            }
        });
        Ok(Proc {
            tag: tag.to_string(),
            pid,
            rx,
            started,
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit: None,
            open_streams: 2,
        })
    }

    /// Takes in events until `done(self)` holds (true) or `timeout` passes (false); `done` is
    /// checked after every event and at least every 50 ms. Also returns false early once the
    /// process has exited and its output is drained without `done`.
    pub fn pump_until(&mut self, timeout: Duration, mut done: impl FnMut(&Proc) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            if self.exit.is_some() && self.open_streams == 0 {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Wake up now and then: `done` may watch something other than output (a file).
            match self
                .rx
                .recv_timeout((deadline - now).min(Duration::from_millis(50)))
            {
                Ok(ev) => self.take(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Every sender is gone: output closed and exit seen (or wait failed).
                    self.open_streams = 0;
                    if self.exit.is_none() {
                        return done(self);
                    }
                }
            }
        }
    }

    /// Takes in events for `d` (or until exit).
    pub fn pump_for(&mut self, d: Duration) {
        self.pump_until(d, |_| false);
    }

    fn take(&mut self, ev: Event) {
        match ev {
            Event::Line(Stream::Stdout, at, l) => self.stdout.push((at, l)),
            Event::Line(Stream::Stderr, _, l) => self.stderr.push(l),
            Event::Closed => self.open_streams = self.open_streams.saturating_sub(1),
            Event::Exit(at, st) => self.exit = Some((at, st)),
        }
    }

    /// Index of the first stdout line at or after `from` containing `pat`.
    pub fn find_stdout(&self, from: usize, pat: &str) -> Option<usize> {
        self.stdout
            .iter()
            .skip(from)
            .position(|(_, l)| l.contains(pat))
            .map(|i| i + from)
    }

    /// Waits for a stdout line containing `pat`; returns its index.
    pub fn wait_stdout(&mut self, pat: &str, timeout: Duration) -> Result<usize, String> {
        let t0 = Instant::now();
        if self.pump_until(timeout, |p| p.find_stdout(0, pat).is_some()) {
            let i = self.find_stdout(0, pat).expect("just found");
            tracing::debug!(tag = %self.tag, pat, after = ?t0.elapsed(), "line seen");
            return Ok(i);
        }
        let why = match &self.exit {
            Some((_, st)) => format!("the process exited ({}) first", describe(st)),
            None => format!("not within {} s", timeout.as_secs()),
        };
        Err(format!(
            "no {pat:?} on the console: {why}; {}",
            self.context()
        ))
    }

    /// Waits for the process to exit and its output to close (output gets 2 s after the exit).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        if !self.pump_until(timeout, |p| p.exit.is_some()) {
            return Err(format!(
                "still running after {} s; {}",
                timeout.as_secs(),
                self.context()
            ));
        }
        self.pump_until(Duration::from_secs(2), |p| p.open_streams == 0);
        Ok(self.exit.expect("exited").1)
    }

    /// Sends `signal` to the process (if it has not exited).
    pub fn signal(&self, signal: i32) {
        if self.exit.is_none() {
            // SAFETY: kill(2) on our own unreaped child; touches no memory.
            unsafe {
                libc::kill(self.pid, signal);
            }
        }
    }

    /// Its process ID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether it is still running (as far as the events taken in so far tell).
    pub fn running(&mut self) -> bool {
        self.pump_for(Duration::ZERO);
        self.exit.is_none()
    }

    /// The whole stderr as one string.
    pub fn stderr_text(&self) -> String {
        self.stderr.join("\n")
    }

    /// Whether any output says the process panicked.
    pub fn panicked(&self) -> bool {
        self.stderr
            .iter()
            .chain(self.stdout.iter().map(|(_, l)| l))
            .any(|l| l.contains("panicked at"))
    }

    /// The last console and stderr lines, for failure details.
    pub fn context(&self) -> String {
        let tail = |v: Vec<&str>| {
            let n = v.len();
            v[n.saturating_sub(6)..].join(" | ")
        };
        let out = tail(self.stdout.iter().map(|(_, l)| l.as_str()).collect());
        let err = tail(self.stderr.iter().map(String::as_str).collect());
        crate::protocol::truncate(
            &format!(
                "{}: last console lines: [{out}]; last stderr lines: [{err}]",
                self.tag
            ),
            1500,
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.signal(libc::SIGKILL);
            self.pump_until(Duration::from_secs(5), |p| p.exit.is_some());
        }
    }
}

/// A short description of an exit status: `exit 0`, `signal 9`.
pub fn describe(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{st}"),
    }
}

fn read_lines(stream: Stream, pipe: Box<dyn Read + Send>, tag: &str, tx: Sender<Event>) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let at = Instant::now();
                let line = strip_ansi(
                    &String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .replace('\r', ""),
                );
                console(tag, &line);
                if tx.send(Event::Line(stream, at, line)).is_err() {
                    break;
                }
            }
        }
    }
    let _ = tx.send(Event::Closed);
}

/// `s` without ANSI escape sequences (the VMM's log colours), so logs and details read plainly.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(
            strip_ansi("\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m a \x1b[3mk\x1b[0m\x1b[2m=\x1b[0m1"),
            "2026  INFO a k=1"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn waits_for_lines_and_exit_with_times() {
        let mut p = Proc::spawn(
            "t",
            Path::new("/bin/sh"),
            &[
                "-c",
                "echo a; echo oops >&2; sleep 0.3; echo READY; sleep 0.2; exit 3",
            ],
            &[],
        )
        .unwrap();
        let i = p.wait_stdout("READY", Duration::from_secs(10)).unwrap();
        assert_eq!(i, 1);
        let st = p.wait_exit(Duration::from_secs(10)).unwrap();
        assert_eq!(st.code(), Some(3));
        assert_eq!(p.stderr, vec!["oops"]);
        let (exit_at, _) = p.exit.unwrap();
        let last = p.stdout.last().unwrap().0;
        assert!(exit_at - last >= Duration::from_millis(150));
        assert!(!p.panicked());
    }

    #[test]
    fn missing_line_reports_exit_and_context() {
        let mut p = Proc::spawn(
            "t",
            Path::new("/bin/sh"),
            &["-c", "echo hello; exit 1"],
            &[],
        )
        .unwrap();
        let e = p.wait_stdout("NEVER", Duration::from_secs(10)).unwrap_err();
        assert!(e.contains("exited (exit 1)") && e.contains("hello"), "{e}");
    }

    #[test]
    fn timeouts_and_kill_on_drop() {
        let mut p = Proc::spawn("t", Path::new("/bin/sleep"), &["30"], &[]).unwrap();
        let t0 = Instant::now();
        assert!(p.wait_exit(Duration::from_millis(300)).is_err());
        assert!(p.running());
        drop(p);
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
