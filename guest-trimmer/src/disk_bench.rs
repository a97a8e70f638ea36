//! `guest-trimmer disk-bench` (hidden test tool): sequential read throughput and 4 KiB
//! random-read IOPS of a block device, with `O_DIRECT` so every read reaches the device
//! instead of the guest's page cache.
//!
//! Prints one line `DISK-BENCH {json}` for the host to parse.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

/// Printed before the JSON result.
pub const MARKER: &str = "DISK-BENCH";
/// Alignment of `O_DIRECT` buffers and offsets.
const ALIGN_BYTES: usize = 4096;
/// Random read size.
const RAND_READ_BYTES: usize = 4096;

/// Arguments of `guest-trimmer disk-bench`.
#[derive(Debug, Args)]
pub struct DiskBenchArgs {
    /// The block device (or file) to read.
    #[arg(long)]
    pub device: PathBuf,
    /// Bytes to read sequentially from the start (capped at the device size), MiB.
    #[arg(long, default_value_t = 256)]
    pub seq_mib: u64,
    /// Sequential read size, KiB.
    #[arg(long, default_value_t = 1024)]
    pub seq_block_kib: usize,
    /// How long to issue random 4 KiB reads, ms.
    #[arg(long, default_value_t = 5000)]
    pub rand_ms: u64,
    /// PRNG seed of the random offsets.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Errors of the benchmark, each naming the operation.
#[derive(Debug, thiserror::Error)]
pub enum DiskBenchError {
    /// Opening the device failed.
    #[error("open {path} with O_DIRECT")]
    Open {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A read failed.
    #[error("{what} read at offset {offset}")]
    Read {
        /// Sequential or random.
        what: &'static str,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
}

/// The result line.
#[derive(Debug, Serialize)]
struct Report {
    device: String,
    size_bytes: u64,
    seq_bytes: u64,
    seq_ms: f64,
    seq_read_mib_s: f64,
    rand_ops: u64,
    rand_ms: f64,
    rand_read_iops: f64,
}

/// A heap buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN_BYTES];
        let offset = storage.as_ptr().align_offset(ALIGN_BYTES);
        AlignedBuf {
            storage,
            offset,
            len,
        }
    }

    fn slice(&mut self, len: usize) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + len.min(self.len)]
    }
}

/// Runs the benchmark and prints `DISK-BENCH {json}`.
pub fn run(args: &DiskBenchArgs) -> Result<(), DiskBenchError> {
    let block_bytes = args.seq_block_kib * 1024;
    if block_bytes == 0 || block_bytes % ALIGN_BYTES != 0 {
        return Err(DiskBenchError::Invalid(format!(
            "--seq-block-kib {} must be a non-zero multiple of 4",
            args.seq_block_kib
        )));
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&args.device)
        .map_err(|source| DiskBenchError::Open {
            path: args.device.clone(),
            source,
        })?;
    let size_bytes = file
        .seek(SeekFrom::End(0))
        .map_err(|source| DiskBenchError::Read {
            what: "seek to the end for the size",
            offset: 0,
            source,
        })?;
    let mut buf = AlignedBuf::new(block_bytes);

    let seq_bytes = (args.seq_mib << 20).min(size_bytes) / ALIGN_BYTES as u64 * ALIGN_BYTES as u64;
    let t0 = Instant::now();
    let mut offset = 0u64;
    while offset < seq_bytes {
        let len = (seq_bytes - offset).min(block_bytes as u64) as usize;
        read_full(&file, buf.slice(len), offset, "sequential")?;
        offset += len as u64;
    }
    let seq = t0.elapsed();

    let blocks = size_bytes / RAND_READ_BYTES as u64;
    if blocks == 0 {
        return Err(DiskBenchError::Invalid(format!(
            "{} is smaller than 4 KiB",
            args.device.display()
        )));
    }
    let mut rng = args.seed;
    let deadline = Duration::from_millis(args.rand_ms);
    let t0 = Instant::now();
    let mut rand_ops = 0u64;
    while t0.elapsed() < deadline {
        let block = splitmix(&mut rng) % blocks;
        let at = block * RAND_READ_BYTES as u64;
        read_full(&file, buf.slice(RAND_READ_BYTES), at, "random")?;
        rand_ops += 1;
    }
    let rand = t0.elapsed();

    let secs = |d: Duration| d.as_secs_f64().max(1e-9);
    let report = Report {
        device: args.device.display().to_string(),
        size_bytes,
        seq_bytes,
        seq_ms: seq.as_secs_f64() * 1000.0,
        seq_read_mib_s: seq_bytes as f64 / (1 << 20) as f64 / secs(seq),
        rand_ops,
        rand_ms: rand.as_secs_f64() * 1000.0,
        rand_read_iops: rand_ops as f64 / secs(rand),
    };
    let json = serde_json::to_string(&report)
        .map_err(|e| DiskBenchError::Invalid(format!("encoding the report: {e}")))?;
    println!("{MARKER} {json}");
    Ok(())
}

fn read_full(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<(), DiskBenchError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| DiskBenchError::Read {
            what,
            offset,
            source,
        })
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_offsets_spread() {
        let mut b = AlignedBuf::new(8192);
        assert_eq!(b.slice(4096).as_ptr() as usize % ALIGN_BYTES, 0);
        assert_eq!(b.slice(100_000).len(), 8192);
        let mut s = 1;
        let picks: std::collections::BTreeSet<u64> =
            (0..100).map(|_| splitmix(&mut s) % 1000).collect();
        assert!(picks.len() > 80);
    }

    #[test]
    fn bad_block_size_and_missing_device_are_errors() {
        let args = DiskBenchArgs {
            device: "/nonexistent/dev".into(),
            seq_mib: 1,
            seq_block_kib: 3,
            rand_ms: 1,
            seed: 1,
        };
        assert!(matches!(run(&args), Err(DiskBenchError::Invalid(_))));
        let args = DiskBenchArgs {
            seq_block_kib: 4,
            ..args
        };
        let err = run(&args).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/dev"), "{err}");
    }
}
