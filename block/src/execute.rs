//! Carrying out a validated request against the backing file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_device::GuestWriteLog;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::io::{DiskFile, DiskIoError};
use crate::request::{
    Request, RequestKind, SectorRange, GET_ID_BYTES, SECTOR_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
};

/// Cumulative device counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockCounters {
    /// Read requests completed successfully.
    pub reads: u64,
    /// Bytes read into the guest.
    pub read_bytes: u64,
    /// Write requests completed successfully.
    pub writes: u64,
    /// Bytes written to the file.
    pub write_bytes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Discard and write-zeroes requests.
    pub discards: u64,
    /// Requests answered with `IOERR` because the file operation failed.
    pub io_errors: u64,
    /// Requests refused (bad buffers, out of range, writes to a read-only disk...).
    pub invalid_requests: u64,
    /// Chains without a usable status byte, completed with nothing written.
    pub invalid_chains: u64,
}

/// Live counters; see [`BlockCounters`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) reads: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) write_bytes: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) discards: AtomicU64,
    pub(crate) io_errors: AtomicU64,
    pub(crate) invalid_requests: AtomicU64,
    pub(crate) invalid_chains: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> BlockCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockCounters {
            reads: get(&self.reads),
            read_bytes: get(&self.read_bytes),
            writes: get(&self.writes),
            write_bytes: get(&self.write_bytes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            io_errors: get(&self.io_errors),
            invalid_requests: get(&self.invalid_requests),
            invalid_chains: get(&self.invalid_chains),
        }
    }

    pub(crate) fn from_snapshot(c: &BlockCounters) -> Self {
        Counters {
            reads: AtomicU64::new(c.reads),
            read_bytes: AtomicU64::new(c.read_bytes),
            writes: AtomicU64::new(c.writes),
            write_bytes: AtomicU64::new(c.write_bytes),
            flushes: AtomicU64::new(c.flushes),
            discards: AtomicU64::new(c.discards),
            io_errors: AtomicU64::new(c.io_errors),
            invalid_requests: AtomicU64::new(c.invalid_requests),
            invalid_chains: AtomicU64::new(c.invalid_chains),
        }
    }
}

/// What a request needs besides itself.
pub(crate) struct ExecCtx<'a> {
    pub(crate) disk: &'a DiskFile,
    pub(crate) mem: &'a GuestMemoryMmap,
    /// The GET_ID answer (the drive id, NUL-padded).
    pub(crate) serial: &'a [u8; GET_ID_BYTES],
    pub(crate) write_log: Option<&'a Arc<dyn GuestWriteLog>>,
    pub(crate) counters: &'a Counters,
}

impl ExecCtx<'_> {
    /// Runs `req`; returns the status byte and the bytes written into guest buffers before it.
    pub(crate) fn execute(&self, req: &Request) -> (u8, u64) {
        match self.run(req) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(err) => {
                Counters::add(&self.counters.io_errors, 1);
                tracing::warn!(
                    disk = %self.disk.path().display(),
                    err = %error_chain(&err),
                    "virtio-blk: request failed; the guest gets an I/O error"
                );
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    fn run(&self, req: &Request) -> Result<u64, DiskIoError> {
        // Validated against the capacity, so the byte offset cannot overflow.
        let mut offset = req.sector * SECTOR_BYTES;
        match &req.kind {
            RequestKind::In => {
                for seg in &req.data {
                    self.disk
                        .read_to_guest(self.mem, seg.gpa, seg.len_bytes, offset)?;
                    self.log(seg.gpa, seg.len_bytes);
                    offset += seg.len_bytes;
                }
                Counters::add(&self.counters.reads, 1);
                Counters::add(&self.counters.read_bytes, req.data_len_bytes);
                Ok(req.data_len_bytes)
            }
            RequestKind::Out => {
                for seg in &req.data {
                    self.disk
                        .write_from_guest(self.mem, seg.gpa, seg.len_bytes, offset)?;
                    offset += seg.len_bytes;
                }
                Counters::add(&self.counters.writes, 1);
                Counters::add(&self.counters.write_bytes, req.data_len_bytes);
                Ok(0)
            }
            RequestKind::Flush => {
                self.disk.flush()?;
                Counters::add(&self.counters.flushes, 1);
                Ok(0)
            }
            RequestKind::GetId => {
                let mut at = 0usize;
                for seg in &req.data {
                    let len = seg.len_bytes as usize;
                    self.mem
                        .write_slice(&self.serial[at..at + len], GuestAddress(seg.gpa))
                        .map_err(|_| DiskIoError::GuestMemory {
                            op: "write the serial into",
                            gpa: seg.gpa,
                            len_bytes: seg.len_bytes,
                        })?;
                    self.log(seg.gpa, seg.len_bytes);
                    at += len;
                }
                Ok(GET_ID_BYTES as u64)
            }
            RequestKind::Discard(ranges) => self.deallocate(ranges, |r| self.disk.punch(r.0, r.1)),
            RequestKind::WriteZeroes(ranges) => self.deallocate(ranges, |(off, len, unmap)| {
                if unmap {
                    self.disk.punch(off, len)
                } else {
                    self.disk.write_zeroes(off, len)
                }
            }),
        }
    }

    fn deallocate(
        &self,
        ranges: &[SectorRange],
        op: impl Fn((u64, u64, bool)) -> Result<(), DiskIoError>,
    ) -> Result<u64, DiskIoError> {
        for r in ranges {
            op((
                r.sector * SECTOR_BYTES,
                u64::from(r.num_sectors) * SECTOR_BYTES,
                r.unmap,
            ))?;
        }
        Counters::add(&self.counters.discards, 1);
        Ok(0)
    }

    /// Records a VMM write into guest memory.
    pub(crate) fn log(&self, gpa: u64, len_bytes: u64) {
        if let Some(log) = self.write_log {
            log.record_write(gpa, len_bytes);
        }
    }
}

pub(crate) use error_text::error_chain;
