//! `guest-trimmer serve` (the vsock JSON-lines endpoint with a `ping` handler) and
//! `guest-trimmer vsock sink|source|connect`: guest-side peers for end-to-end tests and
//! benchmarks that move bulk data and check it with [`Fnv1a64`] over a [`Pattern`].
//!
//! - `sink --port P`: for every connection, reads to end of file, then answers
//!   `{"bytes":N,"fnv1a64":"..","elapsed_us":N}` and closes.
//! - `source --port P`: for every connection, reads one request line
//!   `{"bytes":N,"seed":S}`, writes N bytes of the pattern for S, shuts its write side.
//! - `connect --port P --bytes N --seed S`: connects to the host's port P (retrying while
//!   refused), writes the pattern, shuts its write side, prints the host's reply line.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use guest_trimmer::vsock::{
    connect, serve, Fnv1a64, Pattern, VsockListener, VsockServeError, VsockStream, VMADDR_CID_HOST,
};
use serde_json::{json, Value};

/// Bytes per read or write.
const CHUNK_BYTES: usize = 64 * 1024;

/// Arguments of `guest-trimmer serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The vsock port to listen on.
    #[arg(long, default_value_t = 52)]
    pub vsock_port: u32,
}

/// `guest-trimmer vsock` subcommands.
#[derive(Debug, Subcommand)]
pub enum VsockCommand {
    /// Read each connection to its end, answer its size and checksum.
    Sink(PortArg),
    /// Write the requested number of pattern bytes to each connection.
    Source(PortArg),
    /// Connect to a host port and send pattern bytes; print the host's reply.
    Connect(ConnectArgs),
}

/// A port to listen on.
#[derive(Debug, Args)]
pub struct PortArg {
    /// The vsock port.
    #[arg(long)]
    pub port: u32,
}

/// Arguments of `guest-trimmer vsock connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The host port (the VMM connects it to `<uds_path>_<port>`).
    #[arg(long)]
    pub port: u32,
    /// Pattern bytes to send.
    #[arg(long)]
    pub bytes: u64,
    /// Pattern seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep retrying a refused connect this long.
    #[arg(long, default_value_t = 60)]
    pub retry_s: u64,
}

/// Errors of the vsock tools.
#[derive(Debug, thiserror::Error)]
pub enum VsockToolError {
    /// A socket call failed.
    #[error("vsock")]
    Socket(#[from] VsockServeError),
    /// Reading or writing a connection failed.
    #[error("vsock transfer")]
    Io(#[from] std::io::Error),
}

/// The `ping` handler: `{"op":"ping"}` → `{"ok":true,"op":"ping","version":..,"uptime_ms":..}`.
pub fn ping_handler(request: &str) -> String {
    let op = serde_json::from_str::<Value>(request)
        .ok()
        .and_then(|v| v.get("op").and_then(Value::as_str).map(str::to_string));
    match op.as_deref() {
        Some("ping") => json!({
            "ok": true,
            "op": "ping",
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_ms": uptime_ms(),
        })
        .to_string(),
        Some(other) => json!({"ok": false, "error": format!("unknown op {other:?}")}).to_string(),
        None => json!({"ok": false, "error": "expected a JSON object with an \"op\" string"})
            .to_string(),
    }
}

/// The guest's uptime from /proc/uptime (0 if unreadable).
fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64)
}

/// `guest-trimmer serve`.
pub fn run_serve(args: &ServeArgs) -> Result<(), VsockToolError> {
    serve(args.vsock_port, Arc::new(ping_handler))?;
    Ok(())
}

/// `guest-trimmer vsock ...`.
pub fn run(cmd: &VsockCommand) -> Result<(), VsockToolError> {
    match cmd {
        VsockCommand::Sink(a) => listen_each(a.port, sink_one),
        VsockCommand::Source(a) => listen_each(a.port, source_one),
        VsockCommand::Connect(a) => connect_and_send(a),
    }
}

/// Accepts forever, one thread per connection running `each`.
fn listen_each(
    port: u32,
    each: fn(VsockStream) -> std::io::Result<()>,
) -> Result<(), VsockToolError> {
    let listener = VsockListener::bind(port)?;
    println!("VSOCK-LISTENING {port}");
    loop {
        let stream = listener.accept()?;
        std::thread::spawn(move || {
            if let Err(err) = each(stream) {
                eprintln!("guest-trimmer: vsock connection on port {port}: {err}");
            }
        });
    }
}

/// Reads `stream` to its end, returning (bytes, checksum).
fn drain(stream: &mut impl Read) -> std::io::Result<(u64, Fnv1a64)> {
    let mut buf = vec![0u8; CHUNK_BYTES];
    let (mut total, mut sum) = (0u64, Fnv1a64::default());
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((total, sum)),
            Ok(n) => {
                sum.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `bytes` of the pattern for `seed`.
fn send_pattern(stream: &mut impl Write, bytes: u64, seed: u64) -> std::io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK_BYTES as u64) as usize;
        pattern.fill(&mut buf[..n]);
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn sink_one(mut stream: VsockStream) -> std::io::Result<()> {
    let start = Instant::now();
    let (bytes, sum) = drain(&mut stream)?;
    let reply = json!({
        "bytes": bytes,
        "fnv1a64": sum.hex(),
        "elapsed_us": start.elapsed().as_micros() as u64,
    });
    println!("VSOCK-SINK {reply}");
    stream.write_all(format!("{reply}\n").as_bytes())
}

fn source_one(stream: VsockStream) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut line = String::new();
    BufReader::new(stream).take(4096).read_line(&mut line)?;
    let request: Value = serde_json::from_str(line.trim()).map_err(std::io::Error::other)?;
    let bytes = request.get("bytes").and_then(Value::as_u64).unwrap_or(0);
    let seed = request.get("seed").and_then(Value::as_u64).unwrap_or(1);
    send_pattern(&mut writer, bytes, seed)?;
    writer.shutdown_write()
}

fn connect_and_send(a: &ConnectArgs) -> Result<(), VsockToolError> {
    let deadline = Instant::now() + Duration::from_secs(a.retry_s);
    let mut stream = loop {
        match connect(VMADDR_CID_HOST, a.port) {
            Ok(s) => break s,
            Err(err) if Instant::now() < deadline => {
                eprintln!("guest-trimmer: {err}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(err) => return Err(err.into()),
        }
    };
    let start = Instant::now();
    send_pattern(&mut stream, a.bytes, a.seed)?;
    stream.shutdown_write()?;
    let mut reply = String::new();
    BufReader::new(&mut stream)
        .take(4096)
        .read_line(&mut reply)?;
    println!(
        "VSOCK-CONNECT {}",
        json!({
            "bytes": a.bytes,
            "fnv1a64": Pattern::checksum(a.seed, a.bytes),
            "elapsed_us": start.elapsed().as_micros() as u64,
            "host_reply": reply.trim(),
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_and_errors() {
        let v: Value = serde_json::from_str(&ping_handler(r#"{"op":"ping"}"#)).unwrap();
        assert_eq!(
            (v["ok"].as_bool(), v["op"].as_str()),
            (Some(true), Some("ping"))
        );
        assert!(v["uptime_ms"].is_u64() && v["version"].is_string());
        let v: Value = serde_json::from_str(&ping_handler(r#"{"op":"trim"}"#)).unwrap();
        assert_eq!(v["ok"], false);
        let v: Value = serde_json::from_str(&ping_handler("garbage")).unwrap();
        assert_eq!(v["ok"], false);
        assert!(!ping_handler("x").contains('\n'));
    }

    #[test]
    fn pattern_round_trip_through_drain() {
        let mut buf = Vec::new();
        send_pattern(&mut buf, 200_000, 5).unwrap();
        let (n, sum) = drain(&mut buf.as_slice()).unwrap();
        assert_eq!((n, sum.hex()), (200_000, Pattern::checksum(5, 200_000)));
    }
}
