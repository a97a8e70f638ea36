//! A small QMP client (QEMU's JSON control protocol over a unix socket) and `bench rig-qmp`,
//! the in-rig helper `bench/rig/suite.sh` uses to save QEMU to a file (`stop`, optional
//! `mapped-ram`, `migrate`, poll `query-migrate`) and restore it (`-incoming defer`,
//! `migrate-incoming`, poll `query-status`, `cont`), timing each with a monotonic clock.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket never accepted a connection.
    #[error("connecting to QMP socket {path} for {waited_ms} ms")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// How long we tried.
        waited_ms: u128,
        /// The last error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O during {op}")]
    Io {
        /// The command or step.
        op: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection during {0}")]
    Closed(String),
    /// A line that is not JSON.
    #[error("QMP sent a line that is not JSON during {op}: {line:?}")]
    BadJson {
        /// The command or step.
        op: String,
        /// The line.
        line: String,
    },
    /// QEMU answered with an error.
    #[error("QMP command {op} failed: {class}: {desc}")]
    Command {
        /// The command.
        op: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A migration ended in a state other than `completed`.
    #[error("migration ended as {status}: {detail}")]
    Migration {
        /// `failed`, `cancelled`, ...
        status: String,
        /// QEMU's error description, if any.
        detail: String,
    },
    /// A wait ran out.
    #[error("{what} did not finish within {limit_s} s (last state {last})")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// The bound.
        limit_s: u64,
        /// The last state seen.
        last: String,
    },
}

/// Classifies one QMP reply line: `Ok(Some(return))`, `Ok(None)` for an event (skip it), or
/// the command's error.
pub fn classify_reply(op: &str, line: &str) -> Result<Option<Value>, QmpError> {
    let v: Value = serde_json::from_str(line).map_err(|_| QmpError::BadJson {
        op: op.to_string(),
        line: line.chars().take(200).collect(),
    })?;
    if let Some(r) = v.get("return") {
        return Ok(Some(r.clone()));
    }
    if let Some(e) = v.get("error") {
        return Err(QmpError::Command {
            op: op.to_string(),
            class: e["class"].as_str().unwrap_or("?").to_string(),
            desc: e["desc"].as_str().unwrap_or("?").to_string(),
        });
    }
    // Events (`{"event": ...}`) and anything else without a return or error.
    Ok(None)
}

/// What `query-migrate` says: `Ok(true)` when completed, `Ok(false)` while under way, an error
/// when it failed or was cancelled.
pub fn migration_done(reply: &Value) -> Result<bool, QmpError> {
    match reply["status"].as_str() {
        Some("completed") => Ok(true),
        Some(s @ ("failed" | "cancelled")) => Err(QmpError::Migration {
            status: s.to_string(),
            detail: reply["error-desc"].as_str().unwrap_or("").to_string(),
        }),
        _ => Ok(false),
    }
}

/// A connected QMP session (capabilities negotiated).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `path`, retrying for up to `wait` (QEMU creates the socket after start-up),
    /// reads the greeting and enters command mode.
    pub fn connect(path: &Path, wait: Duration) -> Result<Qmp, QmpError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) if started.elapsed() >= wait => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        waited_ms: started.elapsed().as_millis(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let io = |op: &str| {
            let op = op.to_string();
            move |source| QmpError::Io { op, source }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io("setting a read timeout"))?;
        let writer = stream.try_clone().map_err(io("cloning the socket"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        qmp.read_line("the greeting")?;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_line(&mut self, op: &str) -> Result<String, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                op: op.to_string(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed(op.to_string()));
        }
        Ok(line)
    }

    /// Runs `command` with `arguments`; returns its `return` value (events in between are
    /// skipped).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let text = msg.to_string() + "\n";
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QmpError::Io {
                op: command.to_string(),
                source,
            })?;
        loop {
            let line = self.read_line(command)?;
            if let Some(r) = classify_reply(command, line.trim())? {
                return Ok(r);
            }
        }
    }

    /// Turns the `mapped-ram` migration capability on (both sides need it).
    pub fn enable_mapped_ram(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "mapped-ram", "state": true}]})),
        )
        .map(drop)
    }

    /// Polls `query-migrate` every 5 ms until the migration completed.
    pub fn wait_migration(&mut self, limit: Duration) -> Result<Value, QmpError> {
        let started = Instant::now();
        loop {
            let r = self.execute("query-migrate", None)?;
            if migration_done(&r)? {
                return Ok(r);
            }
            if started.elapsed() > limit {
                return Err(QmpError::Timeout {
                    what: "the migration",
                    limit_s: limit.as_secs(),
                    last: r["status"].to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// CLOCK_BOOTTIME in ms: the clock `/proc/uptime` shows, so the rig script can subtract.
fn boottime_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own and reads nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6
}

/// What `bench rig-qmp` does.
#[derive(clap::Subcommand, Debug)]
pub enum QmpOp {
    /// `stop`, (mapped-ram), `migrate` to URI, wait until written; prints `save_ms`.
    Save(Target),
    /// `migrate-incoming` from URI into a QEMU started with `-incoming defer`, wait, `cont`;
    /// prints `running_at_ms` (CLOCK_BOOTTIME, as /proc/uptime).
    Load(Target),
    /// Resume the vCPUs.
    Cont(Sock),
    /// End QEMU.
    Quit(Sock),
}

/// A QMP socket.
#[derive(clap::Args, Debug)]
pub struct Sock {
    /// QEMU's `-qmp unix:` socket.
    #[arg(long)]
    pub sock: PathBuf,
}

/// A QMP socket and a migration stream.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// QEMU's `-qmp unix:` socket.
    #[arg(long)]
    pub sock: PathBuf,
    /// Migration URI (`file:/path`).
    #[arg(long)]
    pub uri: String,
    /// Use the `mapped-ram` capability (QEMU ≥ 9.0).
    #[arg(long)]
    pub mapped_ram: bool,
    /// Bound on the whole operation, s.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
}

/// Arguments of `bench rig-qmp`.
#[derive(clap::Args, Debug)]
pub struct RigQmpArgs {
    /// The operation.
    #[command(subcommand)]
    pub op: QmpOp,
}

fn save(t: &Target) -> Result<Value, QmpError> {
    let mut q = Qmp::connect(&t.sock, Duration::from_secs(10))?;
    if t.mapped_ram {
        q.enable_mapped_ram()?;
    }
    let started = Instant::now();
    q.execute("stop", None)?;
    q.execute("migrate", Some(json!({ "uri": t.uri })))?;
    let r = q.wait_migration(Duration::from_secs(t.timeout_s))?;
    let save_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(json!({
        "op": "save", "ok": true, "save_ms": save_ms, "mapped_ram": t.mapped_ram,
        "qemu_total_time_ms": r["total-time"], "ram": r["ram"],
    }))
}

fn load(t: &Target) -> Result<Value, QmpError> {
    let started = Instant::now();
    let limit = Duration::from_secs(t.timeout_s);
    let mut q = Qmp::connect(&t.sock, limit)?;
    let connected_ms = started.elapsed().as_secs_f64() * 1000.0;
    if t.mapped_ram {
        q.enable_mapped_ram()?;
    }
    q.execute("migrate-incoming", Some(json!({ "uri": t.uri })))?;
    let status = loop {
        let s = q.execute("query-status", None)?;
        let status = s["status"].as_str().unwrap_or("?").to_string();
        if status != "inmigrate" {
            break status;
        }
        // A failed incoming migration leaves the status at inmigrate: ask query-migrate too.
        migration_done(&q.execute("query-migrate", None)?)?;
        if started.elapsed() > limit {
            return Err(QmpError::Timeout {
                what: "the incoming migration",
                limit_s: t.timeout_s,
                last: status,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let loaded_ms = started.elapsed().as_secs_f64() * 1000.0;
    if status != "running" {
        q.execute("cont", None)?;
    }
    Ok(json!({
        "op": "load", "ok": true, "status_after_load": status, "connected_ms": connected_ms,
        "loaded_ms": loaded_ms, "running_at_ms": boottime_ms(), "mapped_ram": t.mapped_ram,
    }))
}

/// Runs `bench rig-qmp`: prints one JSON line; exit code 1 (with the error in the line) on
/// failure.
pub fn rig_run(args: RigQmpArgs) -> anyhow::Result<i32> {
    let result = match &args.op {
        QmpOp::Save(t) => save(t),
        QmpOp::Load(t) => load(t),
        QmpOp::Cont(s) => Qmp::connect(&s.sock, Duration::from_secs(10))
            .and_then(|mut q| q.execute("cont", None))
            .map(|_| json!({"op": "cont", "ok": true})),
        QmpOp::Quit(s) => Qmp::connect(&s.sock, Duration::from_secs(10))
            .and_then(|mut q| q.execute("quit", None))
            .map(|_| json!({"op": "quit", "ok": true})),
    };
    match result {
        Ok(v) => {
            println!("{v}");
            Ok(0)
        }
        Err(e) => {
            let mut chain = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                chain.push_str(&format!(": {s}"));
                src = s.source();
            }
            println!("{}", json!({"ok": false, "error": chain}));
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_events_and_errors() {
        assert_eq!(
            classify_reply("stop", r#"{"return": {}}"#).unwrap(),
            Some(json!({}))
        );
        assert_eq!(
            classify_reply("stop", r#"{"event": "STOP", "timestamp": {}}"#).unwrap(),
            None
        );
        let e = classify_reply(
            "migrate",
            r#"{"error": {"class": "GenericError", "desc": "no mapped-ram"}}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("migrate failed: GenericError: no mapped-ram"),
            "{e}"
        );
        assert!(matches!(
            classify_reply("x", "not json"),
            Err(QmpError::BadJson { .. })
        ));
    }

    #[test]
    fn migration_states() {
        assert!(migration_done(&json!({"status": "completed"})).unwrap());
        assert!(!migration_done(&json!({"status": "active"})).unwrap());
        assert!(!migration_done(&json!({})).unwrap());
        let e =
            migration_done(&json!({"status": "failed", "error-desc": "disk full"})).unwrap_err();
        assert!(e.to_string().contains("failed: disk full"), "{e}");
    }

    #[test]
    fn a_fake_qemu_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
            let mut seen = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 {
                let v: Value = serde_json::from_str(line.trim()).unwrap();
                seen.push(v["execute"].as_str().unwrap().to_string());
                let reply = match v["execute"].as_str().unwrap() {
                    "query-migrate"
                        if seen.iter().filter(|c| *c == "query-migrate").count() < 3 =>
                    {
                        "{\"event\":\"MIGRATION\"}\n{\"return\":{\"status\":\"active\"}}\n"
                    }
                    "query-migrate" => "{\"return\":{\"status\":\"completed\",\"total-time\":7}}\n",
                    _ => "{\"return\":{}}\n",
                };
                w.write_all(reply.as_bytes()).unwrap();
                line.clear();
            }
            seen
        });
        let out = save(&Target {
            sock: path,
            uri: "file:/x".into(),
            mapped_ram: true,
            timeout_s: 10,
        })
        .unwrap();
        assert_eq!(out["qemu_total_time_ms"], 7);
        assert!(out["save_ms"].as_f64().unwrap() >= 0.0);
        let seen = server.join().unwrap();
        assert_eq!(
            seen[..4],
            [
                "qmp_capabilities",
                "migrate-set-capabilities",
                "stop",
                "migrate"
            ]
        );
        assert_eq!(seen.len(), 7);
    }
}
