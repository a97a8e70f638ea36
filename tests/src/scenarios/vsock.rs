//! virtio-vsock scenarios: a real guest with a vsock device, its `guest-trimmer serve`
//! endpoint (started by /init on port 52) and `guest-trimmer vsock sink|source|connect` peers,
//! reached from the host through the VM's unix socket in Firecracker's convention
//! (`CONNECT <port>\n` / `OK <host_port>\n`, guest connections to `<uds>_<port>`).
//!
//! Each scenario boots one guest and runs several checks on it (boots are the expensive part).

use super::{ensure, no_panic, raw_http, stop_via_api, Ctx, Outcome, READY_MARKER, READY_TIMEOUT};
use crate::harness::error_chain;
use crate::proc::{describe, Proc};
use guest_trimmer::vsock::{Fnv1a64, Pattern};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vsock::connect_to_guest;

/// The trimmer's vsock port (init's default).
const TRIMMER_PORT: u32 = 52;
/// `guest-trimmer vsock sink` port in the guest scripts.
const SINK_PORT: u32 = 5001;
/// `guest-trimmer vsock source` port.
const SOURCE_PORT: u32 = 5002;
/// Host port the guest connects to (`<uds>_6000`).
const HOST_PORT: u32 = 6000;
/// Bulk transfer size each way.
const BULK_BYTES: u64 = 64 << 20;
/// One 64 MiB transfer in a 1-vCPU TCG rig.
const BULK_TIMEOUT: Duration = Duration::from_secs(120);
/// A handshake or a ping.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Concurrent host connections.
const CONCURRENT: usize = 100;

/// A booted guest with a vsock device and an API socket.
struct VsockVm {
    p: Proc,
    api: PathBuf,
    uds: PathBuf,
}

/// Boots 256 MiB / 2 vCPUs with `--vsock-uds`, running `script`, and waits for READY and
/// the trimmer's endpoint.
fn boot(ctx: &Ctx, script: &str) -> Result<VsockVm, String> {
    let api = ctx.work.join("api.sock");
    let uds = ctx.work.join("v.sock");
    let _ = std::fs::remove_file(&api);
    let mut args = ctx.boot_args(256, 2, &format!("quiet vmm_run=\"{script}\""));
    args.extend([
        "--vsock-uds".to_string(),
        uds.display().to_string(),
        "--api-sock".to_string(),
        api.display().to_string(),
    ]);
    let mut p = ctx.vmm("", &args, &[])?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    let vm = VsockVm { p, api, uds };
    vm.wait_for_ping()?;
    Ok(vm)
}

/// One JSON ping on an open stream; returns the reply.
fn ping_on(reader: &mut BufReader<UnixStream>, writer: &mut UnixStream) -> Result<Value, String> {
    writer
        .write_all(b"{\"op\":\"ping\"}\n")
        .map_err(|e| format!("sending a ping: {e}"))?;
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("reading the ping reply: {e}"))?;
    let v: Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("ping reply {line:?}: {e}"))?;
    ensure(v["ok"] == true && v["op"] == "ping", || {
        format!("unexpected ping reply {v}")
    })?;
    Ok(v)
}

/// Connects to a guest port and pings once.
fn connect_and_ping(uds: &Path) -> Result<Value, String> {
    let (s, _) =
        connect_to_guest(uds, TRIMMER_PORT, Some(IO_TIMEOUT)).map_err(|e| error_chain(&e))?;
    let mut writer = s.try_clone().map_err(|e| e.to_string())?;
    ping_on(&mut BufReader::new(s), &mut writer)
}

impl VsockVm {
    /// Retries a ping until the guest's endpoint answers (it starts just before READY).
    fn wait_for_ping(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match connect_and_ping(&self.uds) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("the guest's vsock endpoint never answered: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }

    /// `GET /vsock`, parsed.
    fn status(&self) -> Result<Value, String> {
        let resp = raw_http(&self.api, "GET /vsock HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        ensure(resp.starts_with("HTTP/1.1 200"), || {
            format!("GET /vsock: {resp:?}")
        })?;
        serde_json::from_str(body).map_err(|e| format!("GET /vsock body {body:?}: {e}"))
    }

    /// Fails unless the VMM still runs.
    fn alive(&mut self) -> Result<(), String> {
        ensure(self.p.running(), || {
            format!("the VMM exited; {}", self.p.context())
        })?;
        no_panic(&self.p)
    }

    /// Stops the VM, checks a clean exit and that the socket file is gone.
    fn stop(mut self, ctx: &Ctx) -> Result<(), String> {
        stop_via_api(ctx, &mut self.p, &self.api)?;
        ensure(!self.uds.exists(), || {
            format!("{} still exists after the VMM exited", self.uds.display())
        })
    }
}

/// `vmm vsock ping --json --count N`: the CLI helper end to end.
fn cli_ping(ctx: &Ctx, uds: &Path, count: u32) -> Result<Value, String> {
    let args: Vec<String> = [
        "vsock",
        "ping",
        "--uds",
        &uds.display().to_string(),
        "--json",
        "--count",
        &count.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = ctx.vmm("ping", &args, &[])?;
    let st = p.wait_exit(IO_TIMEOUT * 3)?;
    ensure(st.code() == Some(0) && !p.panicked(), || {
        format!(
            "`vmm vsock ping` ended with {}; {}",
            describe(&st),
            p.context()
        )
    })?;
    let out = p
        .stdout
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str(out.trim())
        .map_err(|e| format!("`vmm vsock ping --json` printed {out:?}: {e}"))
}

/// Ping through the CLI, 100 concurrent connections, a host client vanishing mid-stream,
/// and the VMM serving new connections afterwards.
pub(super) fn ping_concurrency_vanishing_client(ctx: &Ctx) -> Outcome {
    let mut vm = boot(
        ctx,
        &format!("guest-trimmer vsock source --port {SOURCE_PORT} & sleep 3600"),
    )?;
    let ping = cli_ping(ctx, &vm.uds, 20)?;
    ensure(ping["reply"]["ok"] == true && ping["count"] == 20, || {
        format!("`vmm vsock ping` reply {ping}")
    })?;
    let median_us = ping["rtt_median_us"].as_u64().unwrap_or(0);

    // 100 connections open at once, each pinging 3 times.
    let barrier = Arc::new(Barrier::new(CONCURRENT));
    let threads: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let (uds, barrier) = (vm.uds.clone(), barrier.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let got = connect_to_guest(&uds, TRIMMER_PORT, Some(IO_TIMEOUT * 3));
                barrier.wait();
                let (s, _) = got.map_err(|e| error_chain(&e))?;
                let mut writer = s.try_clone().map_err(|e| e.to_string())?;
                let mut reader = BufReader::new(s);
                for _ in 0..3 {
                    ping_on(&mut reader, &mut writer)?;
                }
                Ok(())
            })
        })
        .collect();
    let failures: Vec<String> = threads
        .into_iter()
        .filter_map(|t| {
            t.join()
                .unwrap_or_else(|_| Err("thread panicked".into()))
                .err()
        })
        .collect();
    ensure(failures.is_empty(), || {
        format!(
            "{} of {CONCURRENT} concurrent connections failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        )
    })?;
    vm.alive()?;

    // A host client asks for 64 MiB, reads 1 MiB and vanishes; twice.
    for _ in 0..2 {
        let (mut s, _) = connect_to_guest(&vm.uds, SOURCE_PORT, Some(IO_TIMEOUT))
            .map_err(|e| error_chain(&e))?;
        s.write_all(format!("{{\"bytes\":{BULK_BYTES},\"seed\":9}}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        s.read_exact(&mut buf)
            .map_err(|e| format!("reading the first MiB: {e}"))?;
        let mut expect = vec![0u8; 1 << 20];
        Pattern::new(9).fill(&mut expect);
        ensure(buf == expect, || {
            "the first MiB differs from the pattern".into()
        })?;
        drop(s);
    }
    vm.p.pump_for(Duration::from_secs(1));
    vm.alive()?;
    // New connections still work: a ping and a full 4 MiB transfer.
    connect_and_ping(&vm.uds)?;
    let (bytes, sum) = read_source(&vm.uds, 4 << 20, 11)?;
    ensure(
        sum == Pattern::checksum(11, 4 << 20) && bytes == 4 << 20,
        || format!("after the vanished clients: {bytes} bytes, checksum {sum}"),
    )?;
    let status = vm.status()?;
    let c = &status["counters"];
    ensure(
        c["host_connects"].as_u64().unwrap_or(0) >= (CONCURRENT + 4) as u64
            && status["guest_cid"] == 3
            && status["activated"] == true,
        || format!("GET /vsock: {status}"),
    )?;
    vm.alive()?;
    let summary = format!(
        "ping via CLI median {median_us} us (TCG rig); {CONCURRENT} concurrent connections x 3 pings ok; \
         2 clients vanished mid-stream, VMM kept serving; counters {c}"
    );
    vm.stop(ctx)?;
    Ok(summary)
}

/// Asks the guest's source for `bytes` of the pattern `seed`; returns (bytes read, checksum).
fn read_source(uds: &Path, bytes: u64, seed: u64) -> Result<(u64, String), String> {
    let (mut s, _) =
        connect_to_guest(uds, SOURCE_PORT, Some(BULK_TIMEOUT)).map_err(|e| error_chain(&e))?;
    s.write_all(format!("{{\"bytes\":{bytes},\"seed\":{seed}}}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let (n, sum) = drain(&mut s).map_err(|e| format!("reading from the guest source: {e}"))?;
    Ok((n, sum.hex()))
}

/// Reads a stream to its end: (bytes, checksum).
fn drain(s: &mut impl Read) -> std::io::Result<(u64, Fnv1a64)> {
    let mut buf = vec![0u8; 256 * 1024];
    let (mut n, mut sum) = (0u64, Fnv1a64::default());
    loop {
        match s.read(&mut buf)? {
            0 => return Ok((n, sum)),
            k => {
                sum.update(&buf[..k]);
                n += k as u64;
            }
        }
    }
}

/// Writes the pattern to the guest's sink and returns its reply.
fn write_sink(uds: &Path, bytes: u64, seed: u64) -> Result<Value, String> {
    let (mut s, _) =
        connect_to_guest(uds, SINK_PORT, Some(BULK_TIMEOUT)).map_err(|e| error_chain(&e))?;
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..k]);
        s.write_all(&buf[..k])
            .map_err(|e| format!("writing to the guest sink: {e}"))?;
        left -= k as u64;
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("reading the sink's reply: {e}"))?;
    serde_json::from_str(line.trim()).map_err(|e| format!("sink reply {line:?}: {e}"))
}

/// 64 MiB host → guest and guest → host with checksums, and a guest-initiated connection to
/// `<uds>_6000` carrying 64 MiB.
pub(super) fn bulk_both_ways(ctx: &Ctx) -> Outcome {
    // The host listener for the guest's connect exists before the guest boots.
    let uds = ctx.work.join("v.sock");
    let host_path = PathBuf::from(format!("{}_{HOST_PORT}", uds.display()));
    let _ = std::fs::remove_file(&host_path);
    let host = UnixListener::bind(&host_path)
        .map_err(|e| format!("binding {}: {e}", host_path.display()))?;
    let acceptor = std::thread::spawn(move || -> Result<(u64, String), String> {
        let (mut s, _) = host.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(BULK_TIMEOUT * 2))
            .map_err(|e| e.to_string())?;
        let (n, sum) = drain(&mut s).map_err(|e| format!("reading the guest's connection: {e}"))?;
        let reply = format!("{{\"bytes\":{n},\"fnv1a64\":\"{}\"}}\n", sum.hex());
        s.write_all(reply.as_bytes()).map_err(|e| e.to_string())?;
        Ok((n, sum.hex()))
    });
    let script = format!(
        "guest-trimmer vsock sink --port {SINK_PORT} & guest-trimmer vsock source --port {SOURCE_PORT} & \
         guest-trimmer vsock connect --port {HOST_PORT} --bytes {BULK_BYTES} --seed 3; echo VMM-VSOCK-CONNECT-EXIT $?; sleep 3600"
    );
    let mut vm = boot(ctx, &script)?;
    ensure(vm.uds == uds, || "socket path mismatch".into())?;

    // Guest → host connect.
    let t = Instant::now();
    vm.p.wait_stdout("VMM-VSOCK-CONNECT-EXIT 0", BULK_TIMEOUT)?;
    let (n, sum) = acceptor
        .join()
        .map_err(|_| "acceptor panicked".to_string())??;
    let want = Pattern::checksum(3, BULK_BYTES);
    ensure(n == BULK_BYTES && sum == want, || {
        format!("guest→host connect: {n} bytes, checksum {sum}, expected {BULK_BYTES} / {want}")
    })?;
    let connect_s = t.elapsed().as_secs_f64();

    // Host → guest.
    let t = Instant::now();
    let reply = write_sink(&vm.uds, BULK_BYTES, 5)?;
    let h2g_s = t.elapsed().as_secs_f64();
    let want = Pattern::checksum(5, BULK_BYTES);
    ensure(
        reply["bytes"] == BULK_BYTES && reply["fnv1a64"] == want.as_str(),
        || format!("host→guest: guest counted {reply}, expected {BULK_BYTES} bytes / {want}"),
    )?;

    // Guest → host over a host-initiated connection.
    let t = Instant::now();
    let (n, sum) = read_source(&vm.uds, BULK_BYTES, 7)?;
    let g2h_s = t.elapsed().as_secs_f64();
    let want = Pattern::checksum(7, BULK_BYTES);
    ensure(n == BULK_BYTES && sum == want, || {
        format!("guest→host: {n} bytes, checksum {sum}, expected {BULK_BYTES} / {want}")
    })?;
    vm.alive()?;
    let status = vm.status()?;
    let mib = (BULK_BYTES >> 20) as f64;
    let summary = format!(
        "64 MiB with matching FNV-1a each way: host→guest {:.1} MiB/s, guest→host {:.1} MiB/s, \
         guest-initiated to <uds>_{HOST_PORT} done {:.1} s after READY (TCG rig figures); counters {}",
        mib / h2g_s,
        mib / g2h_s,
        connect_s,
        status["counters"]
    );
    vm.stop(ctx)?;
    Ok(summary)
}
