//! `bench host-io`: the snapshot writer and the restore's memory mapping on this machine's own
//! CPU and disk, outside any VM (no KVM needed): real, not emulated, time.
//!
//! Issue 7's real-KVM goals include writing ≥ 1 GiB/s of kept data and restoring with almost no
//! VMM work; the rig's emulated CPU cannot show either. The memory writer, the restore's
//! `mmap` of the memory file and its checksum pass are plain user-space code, so they are
//! measured here on guest memory laid out like S512 after a trim: `--kept-mib` of
//! pseudo-random pages in `--kept-runs` runs spread evenly with never-touched gaps between
//! them (a trimmed `default.json` snapshot kept 1,893 chunks in 1,850 runs), then `--zero-mib`
//! of touched zero pages. The restore maps the file twice: bridging the holes the writer left
//! between short gaps (what `vmm restore` does) and one `mmap` per kept run (the layout before
//! the holes), so the cost of each mapping call shows.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

use crate::rig_script::write_results;
use crate::stats::Summary;

/// Arguments of `bench host-io`.
#[derive(clap::Args, Debug)]
pub struct HostIoArgs {
    /// Guest memory size.
    #[arg(long, default_value_t = 512)]
    pub mem_mib: u64,
    /// Pseudo-random (kept) data.
    #[arg(long, default_value_t = 216)]
    pub kept_mib: u64,
    /// Runs the kept data is cut into, spread evenly over the memory before the zero pages.
    #[arg(long, default_value_t = 1850)]
    pub kept_runs: u64,
    /// Touched zero pages after it (skipped by the writer's zero scan).
    #[arg(long, default_value_t = 64)]
    pub zero_mib: u64,
    /// Measured snapshots and restores.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Where the memory files go (a directory on the disk snapshots would use).
    #[arg(long, default_value = "target/host-io")]
    pub dir: PathBuf,
}

/// A state around this run's memory index, encoded as formats 4 (JSON) and 5 (MessagePack),
/// and the time to check and decode each, in ms (the restore's `decode_state_ms`).
#[derive(Clone, Copy)]
struct StateDecode {
    chunks: usize,
    json_bytes: usize,
    messagepack_bytes: usize,
    json_ms: f64,
    messagepack_ms: f64,
}

/// Encodes an example state around `index` both ways and times `parse_state` on each file.
fn decode_times(index: vmm::snapshot::state::MemoryIndex) -> anyhow::Result<StateDecode> {
    use vmm::snapshot::format::{encode_state_body, state_file_bytes};
    let chunks = index.chunks.len();
    let state = vmm::snapshot::state::SnapshotState::example(index);
    let json = state_file_bytes(4, &serde_json::to_vec(&state)?);
    let messagepack = state_file_bytes(5, &encode_state_body(&state)?);
    let time = |bytes: &[u8]| -> anyhow::Result<f64> {
        let t = Instant::now();
        let decoded = vmm::snapshot::reader::parse_state(bytes, Path::new("example-state"))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(decoded.memory == state.memory, "the decoded index differs");
        Ok(ms)
    };
    Ok(StateDecode {
        chunks,
        json_bytes: json.len(),
        messagepack_bytes: messagepack.len(),
        json_ms: time(&json)?,
        messagepack_ms: time(&messagepack)?,
    })
}

/// One write and one restore mapping, in ms.
struct Sample {
    state: StateDecode,
    write_total_ms: f64,
    classify_ms: f64,
    write_and_checksum_ms: f64,
    fsync_ms: f64,
    map_ms: f64,
    mmap_calls: usize,
    map_per_run_ms: f64,
    mmap_calls_per_run: usize,
    verify_ms: f64,
    kept_bytes: u64,
}

fn fill(mem: &vm_memory::GuestMemoryMmap, args: &HostIoArgs) -> anyhow::Result<()> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut page = vec![0u8; 4096];
    for p in kept_pages(args) {
        for w in page.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            w.copy_from_slice(&seed.to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress(p << 12))
            .context("filling guest memory")?;
    }
    let zero = vec![0u8; 4096];
    let zero_start = (args.mem_mib - args.zero_mib) << 20;
    for p in 0..(args.zero_mib << 8) {
        mem.write_slice(&zero, GuestAddress(zero_start + (p << 12)))
            .context("touching zero pages")?;
    }
    Ok(())
}

/// The page numbers of the kept data: `--kept-runs` runs of (nearly) equal length, evenly
/// spaced over the memory before the zero pages.
fn kept_pages(args: &HostIoArgs) -> impl Iterator<Item = u64> {
    let kept = args.kept_mib << 8;
    let runs = args.kept_runs.clamp(1, kept.max(1));
    let stride = ((args.mem_mib - args.zero_mib) << 8) / runs;
    (0..runs).flat_map(move |r| {
        let len = kept / runs + u64::from(r < kept % runs);
        (0..len).map(move |p| r * stride + p)
    })
}

fn one_run(
    mem: &vm_memory::GuestMemoryMmap,
    args: &HostIoArgs,
    run: u32,
) -> anyhow::Result<Sample> {
    use vmm::snapshot::memory_file::{
        file_holes, map_into_guest, verify_file, write_memory_file_since, KeepRules,
    };
    let path = args.dir.join(format!("memory-{run}"));
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let rules = KeepRules {
        keep_all: false,
        residency: vmm::memory::Residency::PageTables { file_data: &[] },
        changed: None,
    };
    let t0 = Instant::now();
    let (index, _, timings) = write_memory_file_since(&mut file, &path, mem, None, rules, [7; 16])
        .with_context(|| format!("writing {}", path.display()))?;
    // The snapshot writer fsyncs the memory file before renaming the snapshot into place.
    let t_sync = Instant::now();
    file.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    let fsync_ms = t_sync.elapsed().as_secs_f64() * 1e3;
    let write_total_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Restore: fresh guest memory, the file's kept ranges mapped over it, then the checksums.
    let ranges = [(GuestAddress(0), (args.mem_mib << 20) as usize)];
    let fresh = || {
        vmm::memory::guest_ram::allocate_guest_memory(&ranges)
            .context("allocating the restore's guest memory")
    };
    let target = fresh()?;
    let t1 = Instant::now();
    let holes = file_holes(&index);
    let mmap_calls = map_into_guest(&target, &file, &path, &index.chunks, &holes)?;
    let map_ms = t1.elapsed().as_secs_f64() * 1e3;
    let per_run = fresh()?;
    let t1 = Instant::now();
    let mmap_calls_per_run = map_into_guest(&per_run, &file, &path, &index.chunks, &[])?;
    let map_per_run_ms = t1.elapsed().as_secs_f64() * 1e3;
    drop(per_run);
    let t2 = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    verify_file(&file, &index.chunks, &path, threads)?;
    let verify_ms = t2.elapsed().as_secs_f64() * 1e3;
    let mut a = [0u8; 64];
    let mut b = [0u8; 64];
    let middle = index.chunks.get(index.chunks.len() / 2);
    let probe = GuestAddress(middle.map_or(0, |c| c.gpa + c.len_bytes / 2) & !4095);
    mem.read_slice(&mut a, probe)?;
    target.read_slice(&mut b, probe)?;
    anyhow::ensure!(
        a == b,
        "the mapped memory file does not read back the guest's page"
    );
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    let state = decode_times(index.clone())?;
    Ok(Sample {
        state,
        write_total_ms,
        classify_ms: timings.classify_ms,
        write_and_checksum_ms: timings.write_and_checksum_ms,
        fsync_ms,
        map_ms,
        mmap_calls,
        map_per_run_ms,
        mmap_calls_per_run,
        verify_ms,
        kept_bytes: index.pages.kept * vmm::snapshot::format::PAGE_BYTES,
    })
}

/// Runs `bench host-io` and writes bench-results/host-io.{json,md}.
pub fn run(args: HostIoArgs) -> anyhow::Result<i32> {
    let (json, md) = measure(&args)?;
    write_results("host-io", &json, &md)?;
    Ok(0)
}

/// The measurements and their Markdown table.
fn measure(args: &HostIoArgs) -> anyhow::Result<(Value, String)> {
    anyhow::ensure!(
        args.kept_mib + args.zero_mib <= args.mem_mib,
        "--kept-mib + --zero-mib ({}) exceed --mem-mib ({})",
        args.kept_mib + args.zero_mib,
        args.mem_mib
    );
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let ranges = [(GuestAddress(0), (args.mem_mib << 20) as usize)];
    let mem = vmm::memory::guest_ram::allocate_guest_memory(&ranges)
        .context("allocating guest memory")?;
    fill(&mem, args)?;
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let s = one_run(&mem, args, run)?;
        eprintln!(
            "bench: host-io run {}: wrote {:.1} MiB in {:.1} ms, mapped in {:.2} ms ({} mmap; {:.2} ms with one per run: {}), verified in {:.1} ms",
            run + 1,
            s.kept_bytes as f64 / 1048576.0,
            s.write_total_ms,
            s.map_ms,
            s.mmap_calls,
            s.map_per_run_ms,
            s.mmap_calls_per_run,
            s.verify_ms
        );
        samples.push(s);
    }
    let summary =
        |f: &dyn Fn(&Sample) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<_>>());
    let kept = samples.first().map_or(0, |s| s.kept_bytes);
    let gib = kept as f64 / (1u64 << 30) as f64;
    let write = summary(&|s| s.write_total_ms);
    let rate = write.map(|w| gib / (w.median / 1e3));
    let unsynced = summary(&|s| s.write_total_ms - s.fsync_ms);
    let rate_unsynced = unsynced.map(|w| gib / (w.median / 1e3));
    let verify = summary(&|s| s.verify_ms);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let first_state = samples.first().map(|s| s.state);
    let json: Value = json!({
        "state_chunks": first_state.map(|s| s.chunks),
        "state_json_bytes": first_state.map(|s| s.json_bytes),
        "state_messagepack_bytes": first_state.map(|s| s.messagepack_bytes),
        "state_decode_json_ms": summary(&|s| s.state.json_ms),
        "state_decode_messagepack_ms": summary(&|s| s.state.messagepack_ms),
        "state_decode_json_first_ms": first_state.map(|s| s.json_ms),
        "state_decode_messagepack_first_ms": first_state.map(|s| s.messagepack_ms),
        "mem_mib": args.mem_mib, "kept_mib": args.kept_mib, "zero_mib": args.zero_mib,
        "kept_runs": args.kept_runs,
        "runs": args.runs, "dir": args.dir, "cpus": cpus, "kept_bytes": kept,
        "write_total_ms": write, "classify_ms": summary(&|s| s.classify_ms),
        "write_and_checksum_ms": summary(&|s| s.write_and_checksum_ms),
        "fsync_ms": summary(&|s| s.fsync_ms), "map_ms": summary(&|s| s.map_ms),
        "mmap_calls": samples.first().map(|s| s.mmap_calls), "verify_ms": verify,
        "map_per_run_ms": summary(&|s| s.map_per_run_ms),
        "mmap_calls_per_run": samples.first().map(|s| s.mmap_calls_per_run),
        "write_gib_per_s": rate,
        "write_gib_per_s_before_fsync": rate_unsynced,
        "verify_gib_per_s": verify.map(|v| gib / (v.median / 1e3)),
    });
    let cell = |v: &Value| {
        v.get("median")
            .and_then(Value::as_f64)
            .map_or("-".into(), |m| format!("{m:.2}"))
    };
    let md = format!(
        "# Snapshot writer and restore mapping on this host\n\n\
         `cargo run --release -p bench -- host-io` (bench/src/host_io.rs): no VM, this machine's \
         own CPU ({cpus} CPUs) and disk (`{}`), real time. Guest memory {} MiB: {} MiB \
         pseudo-random (kept) in {} runs spread evenly, {} MiB touched zero pages, the rest never \
         touched. Medians of {} runs.\n\n\
         | figure | median |\n|---|---|\n\
         | kept data written, MiB | {:.1} |\n\
         | write, whole (classify + write + checksum + fsync), ms | {} |\n\
         | of it: classify (residency, zero scan), ms | {} |\n\
         | of it: write and checksum, ms | {} |\n\
         | of it: fsync, ms | {} |\n\
         | **write rate of kept data, durable (fsync included), GiB/s** (goal ≥ 1) | **{:.2}** |\n\
         | write rate of kept data into the page cache (before fsync), GiB/s | {:.2} |\n\
         | restore: map the memory file over guest memory, ms ({} mmap calls, holes bridged) | {} |\n\
         | the same with one `mmap` per kept run (the layout without holes), ms ({} calls) | {} |\n\
         | restore: check every chunk's checksum (first restore of a file on a host), ms | {} |\n\
         | restore: check and decode the state file (an example state with this index: 2 vCPUs, {} chunks), format 5 MessagePack ({} bytes), ms (first run) | {} ({:.2}) |\n\
         | the same as format 4's JSON ({} bytes), ms (first run) | {} ({:.2}) |\n",
        args.dir.display(),
        args.mem_mib,
        args.kept_mib,
        args.kept_runs,
        args.zero_mib,
        args.runs,
        kept as f64 / 1048576.0,
        cell(&json["write_total_ms"]),
        cell(&json["classify_ms"]),
        cell(&json["write_and_checksum_ms"]),
        cell(&json["fsync_ms"]),
        rate.unwrap_or(0.0),
        rate_unsynced.unwrap_or(0.0),
        json["mmap_calls"],
        cell(&json["map_ms"]),
        json["mmap_calls_per_run"],
        cell(&json["map_per_run_ms"]),
        cell(&json["verify_ms"]),
        first_state.map_or(0, |s| s.chunks),
        json["state_messagepack_bytes"],
        cell(&json["state_decode_messagepack_ms"]),
        first_state.map_or(0.0, |s| s.messagepack_ms),
        json["state_json_bytes"],
        cell(&json["state_decode_json_ms"]),
        first_state.map_or(0.0, |s| s.json_ms),
    );
    Ok((json, md))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_maps_and_verifies_a_small_guest() {
        let dir = tempfile::tempdir().unwrap();
        let args = HostIoArgs {
            mem_mib: 8,
            kept_mib: 3,
            kept_runs: 4,
            zero_mib: 2,
            runs: 2,
            dir: dir.path().to_path_buf(),
        };
        let (json, md) = measure(&args).unwrap();
        assert_eq!(
            json["kept_bytes"],
            3 << 20,
            "only the pseudo-random pages are kept"
        );
        // 3 MiB in 4 runs over 6 MiB: 768 KiB runs, 768 KiB gaps, all bridged by holes.
        assert_eq!(json["mmap_calls"], 1);
        assert_eq!(json["mmap_calls_per_run"], 4);
        assert!(json["write_gib_per_s"].as_f64().unwrap() > 0.0);
        assert!(md.contains("| kept data written, MiB | 3.0 |"), "{md}");
        // The example state carries this run's index (decode checks it came back equal).
        assert!(json["state_chunks"].as_u64().unwrap() >= 4);
        assert!(
            json["state_messagepack_bytes"].as_u64() < json["state_json_bytes"].as_u64(),
            "{json}"
        );
        assert!(
            json["state_decode_messagepack_ms"]["median"]
                .as_f64()
                .unwrap()
                > 0.0
        );
        let bad = HostIoArgs {
            kept_mib: 8,
            ..args
        };
        assert!(measure(&bad)
            .unwrap_err()
            .to_string()
            .contains("exceed --mem-mib"));
    }
}
