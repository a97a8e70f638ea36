//! Block scenarios: a real guest with virtio-blk drives, checked from both sides.
//!
//! `block_disks` boots one guest with three drives and runs every check in that one boot:
//! - vda: the data disk (`vmm image build`'s data.ext4, read-only): /init mounts it on
//!   /mnt/data and the guest checks every file (288 MiB) with `sha256sum -c SHA256SUMS`, the
//!   manifest the host wrote when it generated the files;
//! - the read-only disk refuses writes in the guest: remounting it read-write, creating a file
//!   on it and writing the block device all fail, and the VMM stays up;
//! - vdb: a writable scratch image: the guest writes 1 MiB with `dd conv=fsync` + `sync` and the
//!   host reads those bytes from the file;
//! - vdc: an image the host truncates while the guest runs: the guest's reads past the new end
//!   fail with I/O errors (dd fails, dmesg logs them), the VMM reports them in `GET /drives`
//!   and keeps running.
//!
//! The guest script lives on the kernel command line: no double quotes, well below 2048 bytes.

use super::{ensure, no_panic, raw_http, stop_via_api, Ctx, Outcome, READY_MARKER, READY_TIMEOUT};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Files on the data disk (guest_image::data_disk::DataDiskSpec::default: 16 cold + 4 hot).
const DATA_FILES: u32 = 20;
/// Size of the scratch and the shrinking images.
const SCRATCH_BYTES: u64 = 16 << 20;
/// The guest writes 1 MiB of this text (repeated) at 1 MiB into the scratch disk.
const PATTERN_LINE: &str = "VMM-BLK-PATTERN\n";
/// Generous for hashing 288 MiB under nested TCG.
const CHECKS_TIMEOUT: Duration = Duration::from_secs(240);

/// The guest's checks, each printing `VMM-BLK-<NAME> <exit status> [detail]`.
const SCRIPT: &str = concat!(
    "cd /mnt/data && sha256sum -c SHA256SUMS >/tmp/s 2>&1; echo VMM-BLK-SUMS $? $(grep -c ': OK' /tmp/s); cd /; ",
    "mount -o remount,rw /mnt/data; echo VMM-BLK-REMOUNT $?; ",
    "touch /mnt/data/new-file; echo VMM-BLK-TOUCH $?; ",
    "dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync; echo VMM-BLK-RODD $?; ",
    "yes VMM-BLK-PATTERN | head -c 1048576 >/tmp/p; ",
    "dd if=/tmp/p of=/dev/vdb bs=65536 seek=16 conv=fsync && sync; echo VMM-BLK-WROTE $?; ",
    "dd if=/dev/vdc of=/dev/null bs=4096 skip=4095 count=1; echo VMM-BLK-TAIL $?; ",
    "i=0; while [ $i -lt 240 ]; do echo 3 >/proc/sys/vm/drop_caches; ",
    "dd if=/dev/vdc of=/dev/null bs=4096 skip=4095 count=1 2>/dev/null || break; i=$((i+1)); sleep 0.5; done; ",
    "echo VMM-BLK-EIO $i $(dmesg | grep -c 'I/O error'); ",
    "echo VMM-BLK-DONE"
);

/// `vmm run --disk /nonexistent/...` is refused with the path in the error.
pub fn bad_disk_path(ctx: &Ctx) -> Outcome {
    let mut args = ctx.boot_args(256, 1, "");
    args.extend(["--disk".to_string(), "/nonexistent/disk.img,ro".to_string()]);
    super::expect_rejected(ctx, "", &args, &[], &["/nonexistent/disk.img"])
}

/// The numbers after `marker` on its console line.
fn marker_values(p: &crate::proc::Proc, marker: &str) -> Option<Vec<i64>> {
    let line = p.stdout.iter().rev().find_map(|(_, l)| {
        let at = l.find(marker)?;
        Some(l[at + marker.len()..].to_string())
    })?;
    Some(
        line.split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect(),
    )
}

fn make_image(path: &Path, byte: u8) -> Result<(), String> {
    std::fs::write(path, vec![byte; SCRATCH_BYTES as usize])
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// `GET path` on the API socket, parsed.
fn get(sock: &Path, path: &str) -> Result<Value, String> {
    let resp = raw_http(
        sock,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    )?;
    let status = resp.lines().next().unwrap_or("").to_string();
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    ensure(status.split_whitespace().nth(1) == Some("200"), || {
        format!("GET {path}: {status:?}, body {body:?}")
    })?;
    serde_json::from_str(body).map_err(|e| format!("GET {path}: not JSON ({e}): {body:?}"))
}

pub fn disks(ctx: &Ctx) -> Outcome {
    let data = ctx
        .data_disk
        .as_ref()
        .ok_or("no data disk: the runner needs --data-disk (vmm image build's data.ext4)")?;
    let scratch = ctx.work.join("scratch.img");
    let shrink = ctx.work.join("shrink.img");
    make_image(&scratch, 0)?;
    make_image(&shrink, 0x5a)?;
    let sock = ctx.work.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    ensure(!SCRIPT.contains('"') && SCRIPT.len() < 1500, || {
        format!("guest script unfit for the kernel command line: {SCRIPT:?}")
    })?;
    let mut args = ctx.boot_args(
        512,
        2,
        &format!("quiet vmm_run=\"{SCRIPT}\" vmm_after=shell"),
    );
    for spec in [
        format!("{},ro,id=data", data.display()),
        format!("{},id=scratch", scratch.display()),
        format!("{},id=shrink", shrink.display()),
    ] {
        args.extend(["--disk".to_string(), spec]);
    }
    args.extend(["--api-sock".to_string(), sock.display().to_string()]);
    let mut p = ctx.vmm("", &args, &[])?;
    p.wait_stdout(READY_MARKER, READY_TIMEOUT)?;
    ensure(marker_values(&p, "VMM-DATA-DISK ").is_some(), || {
        format!(
            "/init did not report mounting the data disk; {}",
            p.context()
        )
    })?;

    // Checksums, read-only refusals, the scratch write, then the tail read that works.
    p.wait_stdout("VMM-BLK-TAIL ", CHECKS_TIMEOUT)?;
    let value = |p: &crate::proc::Proc, m: &str| marker_values(p, m).unwrap_or_default();
    let sums = value(&p, "VMM-BLK-SUMS ");
    ensure(sums == [0, i64::from(DATA_FILES)], || {
        format!("sha256sum -c on the data disk: [status, files OK] = {sums:?}, want [0, {DATA_FILES}]; {}", p.context())
    })?;
    let refusals: Vec<_> = ["VMM-BLK-REMOUNT ", "VMM-BLK-TOUCH ", "VMM-BLK-RODD "]
        .iter()
        .map(|m| (m.trim(), value(&p, m)))
        .collect();
    for (name, v) in &refusals {
        ensure(v.first().is_some_and(|s| *s != 0), || {
            format!(
                "{name}: a write to the read-only disk succeeded ({v:?}); {}",
                p.context()
            )
        })?;
    }
    ensure(value(&p, "VMM-BLK-WROTE ") == [0], || {
        format!(
            "the guest's write to the scratch disk failed; {}",
            p.context()
        )
    })?;
    let file =
        std::fs::read(&scratch).map_err(|e| format!("reading {}: {e}", scratch.display()))?;
    let want: Vec<u8> = PATTERN_LINE.bytes().cycle().take(1 << 20).collect();
    ensure(
        file.len() as u64 == SCRATCH_BYTES && file[1 << 20..2 << 20] == want[..],
        || "the scratch image does not hold the guest's bytes at 1 MiB".to_string(),
    )?;
    ensure(
        file[..1 << 20]
            .iter()
            .chain(&file[2 << 20..])
            .all(|&b| b == 0),
        || "the scratch image changed outside the written range".to_string(),
    )?;
    ensure(value(&p, "VMM-BLK-TAIL ") == [0], || {
        format!(
            "reading the end of vdc failed before the file shrank; {}",
            p.context()
        )
    })?;

    // Shrink vdc's file under the running guest: its last 8 MiB are gone.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shrink)
        .and_then(|f| f.set_len(SCRATCH_BYTES / 2))
        .map_err(|e| format!("truncating {}: {e}", shrink.display()))?;
    p.wait_stdout("VMM-BLK-DONE", Duration::from_secs(180))?;
    let eio = value(&p, "VMM-BLK-EIO ");
    ensure(eio.len() == 2 && eio[0] < 240 && eio[1] >= 1, || {
        format!("reads past the shrunk file's end: [reads before failing, dmesg I/O errors] = {eio:?}; {}", p.context())
    })?;

    // The VMM is up and accounts for all of it.
    ensure(p.running(), || format!("the VMM exited; {}", p.context()))?;
    no_panic(&p)?;
    let drives = get(&sock, "/drives")?;
    let field = |id: &str, path: &str| {
        drives
            .as_array()
            .and_then(|a| a.iter().find(|d| d["drive_id"] == id))
            .and_then(|d| d.pointer(path))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let data_read = field("data", "/counters/read_bytes");
    let scratch_written = field("scratch", "/counters/write_bytes");
    let io_errors = field("shrink", "/counters/io_errors");
    ensure(
        data_read >= 288 << 20 && scratch_written >= 1 << 20 && io_errors >= 1,
        || {
            format!("GET /drives counters: data read {data_read} B, scratch written {scratch_written} B, shrink I/O errors {io_errors}: {drives}")
        },
    )?;
    ensure(get(&sock, "/drives/data")?["is_read_only"] == true, || {
        "GET /drives/data does not say read-only".to_string()
    })?;
    stop_via_api(ctx, &mut p, &sock)?;
    Ok(format!(
        "{DATA_FILES} files verified in the guest; read-only refusals {refusals:?}; 1 MiB written reached the file; \
         {} reads then I/O errors after the shrink ({} in dmesg); VMM counters: data read {} MiB, \
         scratch written {scratch_written} B, {io_errors} I/O errors",
        eio[0], eio[1], data_read >> 20
    ))
}
