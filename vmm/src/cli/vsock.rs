//! `vmm vsock ...`: talk to a guest's vsock listeners from the host, in Firecracker's
//! convention (the VM's unix socket, `CONNECT <port>\n`, `OK <host_port>\n`), and the
//! `vmm run --vsock-uds PATH [--vsock-cid N]` flags.
//!
//! - `vmm vsock ping --uds PATH [--port 52] [--count N] [--timeout-ms N] [--json]`: sends
//!   `{"op":"ping"}` to the guest-trimmer's listener and prints its reply and the round trip.
//! - `vmm vsock connect --uds PATH --port P`: bridges stdin/stdout to a guest port.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use vsock::{connect_to_guest, VsockConfig, DEFAULT_GUEST_CID};

use super::CliResult;
use crate::config::VmConfig;

/// The guest-trimmer's default vsock port.
pub const DEFAULT_TRIMMER_PORT: u32 = 52;

/// `vmm run` flags adding a virtio-vsock device.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct VsockRunArgs {
    /// Add a virtio-vsock device whose host side is this unix socket (Firecracker's
    /// convention: host clients connect and write `CONNECT <port>\n`; guest connections to
    /// host port P go to `PATH_P`).
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// The guest's CID (needs --vsock-uds or a vsock section in --config).
    #[arg(long)]
    pub vsock_cid: Option<u32>,
}

/// Applies the flags over the configuration (flags win over the config file).
pub fn apply_run_args(args: &VsockRunArgs, config: &mut VmConfig) {
    if let Some(uds_path) = &args.vsock_uds {
        let existing = config.vsock.take();
        config.vsock = Some(VsockConfig {
            vsock_id: existing.as_ref().and_then(|v| v.vsock_id.clone()),
            guest_cid: existing.map_or(DEFAULT_GUEST_CID, |v| v.guest_cid),
            uds_path: uds_path.clone(),
        });
    }
    if let (Some(cid), Some(vsock)) = (args.vsock_cid, config.vsock.as_mut()) {
        vsock.guest_cid = cid;
    }
}

/// `vmm vsock` subcommands.
#[derive(clap::Subcommand)]
pub enum VsockCommand {
    /// Ping the guest-trimmer's vsock listener; prints its reply and the round-trip time.
    Ping(PingArgs),
    /// Bridge stdin and stdout to a guest vsock port.
    Connect(ConnectArgs),
}

/// Arguments of `vmm vsock ping`.
#[derive(clap::Args)]
pub struct PingArgs {
    /// The VM's vsock unix socket (`--vsock-uds` of `vmm run`).
    #[arg(long)]
    pub uds: PathBuf,
    /// The guest port.
    #[arg(long, default_value_t = DEFAULT_TRIMMER_PORT)]
    pub port: u32,
    /// Pings to send on the connection (round-trip statistics over all of them).
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Give up on the handshake or a reply after this long.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `vmm vsock connect`.
#[derive(clap::Args)]
pub struct ConnectArgs {
    /// The VM's vsock unix socket.
    #[arg(long)]
    pub uds: PathBuf,
    /// The guest port.
    #[arg(long)]
    pub port: u32,
}

/// Runs a `vmm vsock` subcommand.
pub fn run(cmd: VsockCommand) -> CliResult {
    match cmd {
        VsockCommand::Ping(args) => ping(args),
        VsockCommand::Connect(args) => connect(args),
    }
}

/// The value at `q` (0..=1) of sorted `values`.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ping(args: PingArgs) -> CliResult {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let started = Instant::now();
    let (stream, host_port) = connect_to_guest(&args.uds, args.port, Some(timeout))?;
    let connect_us = started.elapsed().as_micros() as u64;
    let mut writer = stream
        .try_clone()
        .context("cannot clone the vsock stream")?;
    let mut reader = BufReader::new(stream);
    let mut rtts_us = Vec::with_capacity(args.count as usize);
    let mut reply = Value::Null;
    for _ in 0..args.count.max(1) {
        let t = Instant::now();
        writer
            .write_all(b"{\"op\":\"ping\"}\n")
            .context("cannot send the ping")?;
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .context("no reply from the guest")?;
        rtts_us.push(t.elapsed().as_micros() as u64);
        anyhow::ensure!(n > 0, "the guest closed the connection without replying");
        reply = serde_json::from_str(line.trim_end())
            .with_context(|| format!("the guest's reply is not JSON: {line:?}"))?;
    }
    let mut sorted = rtts_us.clone();
    sorted.sort_unstable();
    let ok = reply.get("ok").and_then(Value::as_bool) == Some(true);
    if args.json {
        println!(
            "{}",
            json!({
                "reply": reply,
                "host_port": host_port,
                "connect_us": connect_us,
                "count": rtts_us.len(),
                "rtt_us": rtts_us.first(),
                "rtt_median_us": quantile(&sorted, 0.5),
                "rtt_p99_us": quantile(&sorted, 0.99),
            })
        );
    } else {
        println!("{reply}");
        println!(
            "port {} via host port {host_port}: connect {connect_us} us, round trip median {} us, p99 {} us over {} ping(s)",
            args.port,
            quantile(&sorted, 0.5),
            quantile(&sorted, 0.99),
            rtts_us.len()
        );
    }
    Ok(if ok { 0 } else { 1 })
}

fn connect(args: ConnectArgs) -> CliResult {
    let (stream, _) = connect_to_guest(&args.uds, args.port, Some(Duration::from_secs(10)))?;
    stream
        .set_read_timeout(None)
        .context("cannot clear the read timeout")?;
    stream
        .set_write_timeout(None)
        .context("cannot clear the write timeout")?;
    let mut to_guest: UnixStream = stream.try_clone().context("cannot clone the stream")?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_guest);
        let _ = to_guest.shutdown(std::net::Shutdown::Write);
    });
    let mut from_guest = stream;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from_guest
            .read(&mut buf)
            .context("reading from the guest")?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        vsock: VsockRunArgs,
    }

    #[test]
    fn flags_add_or_override_the_vsock_section() {
        let mut config: VmConfig = serde_json::from_str(
            r#"{"boot-source": {"kernel_image_path": "k"},
                "vsock": {"vsock_id": "v0", "guest_cid": 9, "uds_path": "/a"}}"#,
        )
        .unwrap();
        let args = Wrap::parse_from(["x", "--vsock-uds", "/b"]).vsock;
        apply_run_args(&args, &mut config);
        let v = config.vsock.clone().unwrap();
        assert_eq!(
            (v.guest_cid, v.uds_path, v.vsock_id.as_deref()),
            (9, "/b".into(), Some("v0"))
        );
        let args = Wrap::parse_from(["x", "--vsock-cid", "5"]).vsock;
        apply_run_args(&args, &mut config);
        assert_eq!(config.vsock.as_ref().unwrap().guest_cid, 5);
        config.vsock = None;
        apply_run_args(&args, &mut config);
        assert!(config.vsock.is_none(), "a CID alone adds no device");
        let args = Wrap::parse_from(["x", "--vsock-uds", "/c"]).vsock;
        apply_run_args(&args, &mut config);
        assert_eq!(config.vsock.unwrap().guest_cid, DEFAULT_GUEST_CID);
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[], 0.5), 0);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!((quantile(&v, 0.5), quantile(&v, 0.99)), (51, 99));
    }
}
