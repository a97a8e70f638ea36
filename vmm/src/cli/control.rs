//! `vmm pause|resume|status|stop`: control a running microVM through its API socket.
//!
//! Each command sends one request with [`crate::api::client`]. An API error prints the
//! response's `fault_message` and fails the command (non-zero exit code).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use super::CliResult;
use crate::api::client::{self, ApiResponse};

/// How long `vmm stop` waits for the VMM to go away after accepting the shutdown.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Arguments of the commands that only need the socket.
#[derive(clap::Args)]
pub struct SocketArgs {
    /// The microVM's API socket.
    #[arg(long)]
    pub api_sock: PathBuf,
}

/// Arguments of `vmm status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Print the raw JSON from the API instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// `vmm pause`: `PATCH /vm {"state": "Paused"}`.
pub fn pause(args: SocketArgs) -> CliResult {
    call(
        &args.api_sock,
        "PATCH",
        "/vm",
        Some(&json!({"state": "Paused"})),
        "pause",
    )?;
    println!("paused");
    Ok(0)
}

/// `vmm resume`: `PATCH /vm {"state": "Resumed"}`.
pub fn resume(args: SocketArgs) -> CliResult {
    call(
        &args.api_sock,
        "PATCH",
        "/vm",
        Some(&json!({"state": "Resumed"})),
        "resume",
    )?;
    println!("resumed");
    Ok(0)
}

/// `vmm status`: `GET /`, summarised (state, uptime, vCPUs, memory) or raw with `--json`.
pub fn status(args: StatusArgs) -> CliResult {
    let response = call(&args.socket.api_sock, "GET", "/", None, "status")?;
    let info = response.body.unwrap_or(Value::Null);
    let text = if args.json {
        serde_json::to_string_pretty(&info)? + "\n"
    } else {
        summary(&info)
    };
    write_stdout(&mut std::io::stdout().lock(), &text)?;
    Ok(0)
}

/// Writes `text` to `out` (stdout). A reader that stopped reading (`vmm status --json | grep -q
/// running`, `| head`) is not an error: `println!` would panic on the broken pipe and, with
/// `panic = "abort"`, kill the process with SIGABRT.
pub(crate) fn write_stdout(out: &mut impl std::io::Write, text: &str) -> std::io::Result<()> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result,
    }
}

/// `vmm stop`: `PUT /actions {"action_type": "Shutdown"}`, then wait (up to 10 s) until the
/// VMM stops answering on its socket.
pub fn stop(args: SocketArgs) -> CliResult {
    call(
        &args.api_sock,
        "PUT",
        "/actions",
        Some(&json!({"action_type": "Shutdown"})),
        "stop",
    )?;
    let deadline = Instant::now() + STOP_WAIT;
    while std::os::unix::net::UnixStream::connect(&args.api_sock).is_ok() {
        if Instant::now() >= deadline {
            eprintln!(
                "vmm: shutdown requested, but the VMM still answers on {} after {}s",
                args.api_sock.display(),
                STOP_WAIT.as_secs()
            );
            return Ok(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("stopped");
    Ok(0)
}

/// Sends a request; turns a non-2xx answer into an error carrying its `fault_message`.
/// Shared by the subcommands that talk to the API socket.
pub(super) fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    what: &str,
) -> anyhow::Result<ApiResponse> {
    let response =
        client::request(socket, method, path, body).with_context(|| format!("{what} failed"))?;
    if !response.is_success() {
        let message = response
            .fault_message()
            .map(str::to_string)
            .or_else(|| response.body.as_ref().map(Value::to_string))
            .unwrap_or_else(|| "no details".to_string());
        anyhow::bail!("{what} failed: {message} (HTTP {})", response.status);
    }
    Ok(response)
}

/// The human-readable `vmm status` output. Fields are looked up by name anywhere in the
/// object (see [`crate::api::VmInfo`]); missing ones print as `unknown`.
fn summary(info: &Value) -> String {
    let state = find(info, "state")
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let uptime = find(info, "uptime_ms")
        .and_then(Value::as_u64)
        .map(|ms| format_uptime(Duration::from_millis(ms)))
        .or_else(|| {
            find(info, "uptime_secs")
                .and_then(Value::as_f64)
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| format_uptime(Duration::from_secs_f64(s.min(1e12))))
        })
        .unwrap_or_else(|| "unknown".into());
    let vcpus = find(info, "vcpu_count")
        .and_then(Value::as_u64)
        .map_or_else(|| "unknown".into(), |n| n.to_string());
    let memory = find(info, "mem_size_mib")
        .and_then(Value::as_u64)
        .map_or_else(|| "unknown".into(), |mib| format!("{mib} MiB"));
    format!("state:   {state}\nuptime:  {uptime}\nvcpus:   {vcpus}\nmemory:  {memory}\n")
}

/// Finds `key` in `value`, preferring shallower matches (breadth-first, a few levels deep).
fn find<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    let mut level = vec![value];
    for _ in 0..4 {
        let mut next = Vec::new();
        for value in level {
            if let Value::Object(map) = value {
                if let Some(found) = map.get(key) {
                    return Some(found);
                }
                next.extend(map.values().filter(|v| v.is_object()));
            }
        }
        level = next;
    }
    None
}

/// `3723.4 s` → `1h 02m 03s`; under a minute keeps tenths: `12.3s`.
fn format_uptime(uptime: Duration) -> String {
    let secs = uptime.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{}.{}s", s, uptime.subsec_millis() / 100)
    }
}

#[cfg(test)]
mod tests {

    /// A writer whose reader went away.
    struct ClosedPipe;

    impl std::io::Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_stdout_is_not_an_error_other_failures_are() {
        assert!(super::write_stdout(&mut ClosedPipe, "{}\n").is_ok());
        let mut buf = Vec::new();
        super::write_stdout(&mut buf, "x\n").unwrap();
        assert_eq!(buf, b"x\n");
        let mut full: &mut [u8] = &mut [0u8; 1];
        assert!(super::write_stdout(&mut full, "too long").is_err());
    }

    use super::*;

    #[test]
    fn summary_of_vm_info() {
        let info = serde_json::to_value(crate::api::VmInfo {
            state: "Running".into(),
            uptime_ms: 3_723_400,
            vcpu_count: 2,
            mem_size_mib: 256,
        })
        .unwrap();
        assert_eq!(
            summary(&info),
            "state:   Running\nuptime:  1h 02m 03s\nvcpus:   2\nmemory:  256 MiB\n"
        );
    }

    #[test]
    fn summary_finds_nested_fields_and_tolerates_missing_ones() {
        let info = json!({"state": "Paused", "config": {"machine": {"vcpu_count": 1}}});
        assert_eq!(
            summary(&info),
            "state:   Paused\nuptime:  unknown\nvcpus:   1\nmemory:  unknown\n"
        );
        assert!(summary(&Value::Null).starts_with("state:   unknown\n"));
    }

    #[test]
    fn uptime_format() {
        assert_eq!(format_uptime(Duration::from_millis(12_345)), "12.3s");
        assert_eq!(format_uptime(Duration::from_secs(61)), "1m 01s");
        assert_eq!(format_uptime(Duration::from_secs(90_000)), "25h 00m 00s");
    }
}
