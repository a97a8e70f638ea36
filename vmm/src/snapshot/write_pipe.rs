//! Writing the memory file's pieces and checksumming them at the same time: where the process may
//! run on more than one CPU, the checksum of every piece is computed on a second thread while the
//! calling thread writes the pieces in order, so a save costs about max(write, checksum) instead
//! of their sum. Both threads only read guest memory (the vCPUs are paused). On one CPU (or
//! where the thread cannot be started) a second thread would only take turns with the first and
//! read every page a second time from cold cache, so each batch of pieces is checksummed and
//! then written at once, while it is still in the cache.
//!
//! The pieces go to the file with `writev` straight from guest memory, up to 1,024 of them
//! (Linux's `IOV_MAX`) per call: no copy through a user-space buffer (a trimmed guest's kept
//! memory is thousands of small runs, which a buffered writer copied twice) and few calls.
//! Each piece has its file offset: where one does not follow the previous piece, the writer
//! seeks past the gap, which stays a hole (see `memory_file::HOLE_MAX_BYTES`).

use std::io::{IoSlice, Seek, SeekFrom, Write};
use std::time::Instant;

use serde::Serialize;

use super::checksum::ChunkSum;

/// Where writing a snapshot spent its time, in ms (`vmm snapshot --json`: `write_phases_ms`).
/// `write_ms` and `checksum_ms` overlap (two threads).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WriteTimings {
    /// Choosing the pages (residency, page states, zero scan).
    pub classify_ms: f64,
    /// Writing the kept pages into the memory file (wall clock).
    pub write_ms: f64,
    /// CPU time the writing thread spent (the kernel's copy into the file included).
    pub write_cpu_ms: f64,
    /// Checksumming the kept pages (on its own thread, during the writes; wall clock).
    pub checksum_ms: f64,
    /// CPU time the checksum thread spent: with one free core the two threads share it, and
    /// the CPU times tell where the work went.
    pub checksum_cpu_ms: f64,
    /// Both threads done: from the first write to the last checksum.
    pub write_and_checksum_ms: f64,
    /// `fsync` of the memory file.
    pub fsync_memory_ms: f64,
    /// Encoding, writing and `fsync`ing the state file.
    pub state_file_ms: f64,
}

/// One piece of the memory file: guest bytes and where they go.
#[derive(Clone, Copy, Debug)]
pub struct Piece<'a> {
    /// Byte offset in the file.
    pub file_offset: u64,
    /// The bytes (guest memory).
    pub bytes: &'a [u8],
}

impl Piece<'_> {
    fn end(&self) -> u64 {
        self.file_offset + self.bytes.len() as u64
    }
}

/// Milliseconds since `t`.
pub(super) fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// CPU time of the calling thread, ms (0 where the clock cannot be read).
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// Writes `pieces` (in file offset order) to `out` at their offsets (then flushes) and returns
/// each piece's checksum (see the module documentation for how); records the times in
/// `timings`. `out` should be unbuffered (a `File`): the pieces are handed to it vectored, in
/// batches of pieces that follow each other in the file.
pub fn write_and_checksum<W: Write + Seek>(
    out: &mut W,
    pieces: &[Piece],
    timings: &mut WriteTimings,
) -> std::io::Result<Vec<ChunkSum>> {
    let parallel = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    write_and_checksum_with(out, pieces, timings, parallel)
}

/// [`write_and_checksum`] with the checksums on a second thread (`parallel`) or interleaved
/// with the writes.
fn write_and_checksum_with<W: Write + Seek>(
    out: &mut W,
    pieces: &[Piece],
    timings: &mut WriteTimings,
    parallel: bool,
) -> std::io::Result<Vec<ChunkSum>> {
    let started = Instant::now();
    let sums = if parallel {
        write_while_checksumming(out, pieces, timings)?
    } else {
        checksum_then_write_each(out, pieces, timings)?
    };
    timings.write_and_checksum_ms = ms_since(started);
    Ok(sums)
}

/// One thread: each piece checksummed, then written while its bytes are still cached.
fn checksum_then_write_each<W: Write + Seek>(
    out: &mut W,
    pieces: &[Piece],
    timings: &mut WriteTimings,
) -> std::io::Result<Vec<ChunkSum>> {
    let mut sums = Vec::with_capacity(pieces.len());
    let mut position = None;
    for batch in batches(pieces) {
        let (t, cpu) = (Instant::now(), thread_cpu_ms());
        sums.extend(batch.iter().map(|p| ChunkSum::of(p.bytes)));
        let (t2, cpu2) = (Instant::now(), thread_cpu_ms());
        timings.checksum_ms += (t2 - t).as_secs_f64() * 1e3;
        timings.checksum_cpu_ms += cpu2 - cpu;
        write_all_vectored(out, batch, &mut position)?;
        timings.write_ms += ms_since(t2);
        timings.write_cpu_ms += thread_cpu_ms() - cpu2;
    }
    let (t, cpu) = (Instant::now(), thread_cpu_ms());
    out.flush()?;
    timings.write_ms += ms_since(t);
    timings.write_cpu_ms += thread_cpu_ms() - cpu;
    Ok(sums)
}

/// Two threads: the calling thread writes, a second one checksums.
fn write_while_checksumming<W: Write + Seek>(
    out: &mut W,
    pieces: &[Piece],
    timings: &mut WriteTimings,
) -> std::io::Result<Vec<ChunkSum>> {
    let checksum = || {
        let (t, cpu) = (Instant::now(), thread_cpu_ms());
        let sums: Vec<ChunkSum> = pieces.iter().map(|p| ChunkSum::of(p.bytes)).collect();
        (sums, (ms_since(t), thread_cpu_ms() - cpu))
    };
    let (written, (sums, (checksum_ms, checksum_cpu_ms))) = std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name("snapshot-sum".into())
            .spawn_scoped(scope, checksum);
        let (t, cpu) = (Instant::now(), thread_cpu_ms());
        let mut position = None;
        let written = batches(pieces)
            .try_for_each(|batch| write_all_vectored(out, batch, &mut position))
            .and_then(|()| out.flush());
        let write_ms = (ms_since(t), thread_cpu_ms() - cpu);
        let sums = match helper {
            Ok(handle) => handle.join().unwrap_or_else(|_| checksum()),
            Err(err) => {
                tracing::debug!(%err, "no checksum thread: checksumming after the writes");
                checksum()
            }
        };
        ((written, write_ms), sums)
    });
    let (written, (write_ms, write_cpu_ms)) = written;
    written?;
    timings.write_ms = write_ms;
    timings.write_cpu_ms = write_cpu_ms;
    timings.checksum_ms = checksum_ms;
    timings.checksum_cpu_ms = checksum_cpu_ms;
    Ok(sums)
}

/// Most pieces one `writev` takes (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;
/// Bytes a batch stops growing at, so that on one CPU the pieces just checksummed are still in
/// the cache when they are written.
const BATCH_BYTES: usize = 8 << 20;

/// `pieces` in order, cut into batches of at most [`MAX_IOVECS`] pieces that stop growing once
/// they hold [`BATCH_BYTES`] or where the next piece does not follow in the file.
fn batches<'p, 'a>(pieces: &'p [Piece<'a>]) -> impl Iterator<Item = &'p [Piece<'a>]> {
    let mut rest = pieces;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = rest[0].bytes.len();
        let mut len = 1;
        while len < rest.len().min(MAX_IOVECS)
            && bytes < BATCH_BYTES
            && rest[len].file_offset == rest[len - 1].end()
        {
            bytes += rest[len].bytes.len();
            len += 1;
        }
        let (batch, tail) = rest.split_at(len);
        rest = tail;
        Some(batch)
    })
}

/// Writes every byte of `batch` (pieces that follow each other in the file) at its offset with
/// vectored writes, resuming after short writes. `position` is where the file stands (`None`:
/// unknown); the writer seeks only where that is not the batch's offset (first, past a hole).
fn write_all_vectored<W: Write + Seek>(
    out: &mut W,
    batch: &[Piece],
    position: &mut Option<u64>,
) -> std::io::Result<()> {
    let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
        return Ok(());
    };
    if *position != Some(first.file_offset) {
        *position = None;
        out.seek(SeekFrom::Start(first.file_offset))?;
    }
    let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|p| IoSlice::new(p.bytes)).collect();
    let mut left = &mut slices[..];
    // Drops leading empty pieces, so that a batch of empty pieces writes nothing instead of
    // reading `Ok(0)` from `write_vectored` as a full disk.
    IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        match out.write_vectored(left) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    *position = Some(last.end());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// `parts` laid end to end from offset 0.
    fn packed<'a>(parts: &[&'a [u8]]) -> Vec<Piece<'a>> {
        let mut offset = 0;
        parts
            .iter()
            .map(|bytes| {
                let piece = Piece {
                    file_offset: offset,
                    bytes,
                };
                offset += bytes.len() as u64;
                piece
            })
            .collect()
    }

    #[test]
    fn writes_every_piece_in_order_with_its_checksum() {
        let a: Vec<u8> = (0..9000u32).map(|i| (i * 13) as u8).collect();
        let b = vec![7u8; 4096];
        let c: Vec<u8> = (0..3u8).collect();
        let pieces = packed(&[&a, &b, &c]);
        for parallel in [true, false] {
            let mut out = Cursor::new(Vec::new());
            let mut timings = WriteTimings::default();
            let sums = write_and_checksum_with(&mut out, &pieces, &mut timings, parallel).unwrap();
            assert_eq!(
                out.into_inner(),
                [&a[..], &b[..], &c[..]].concat(),
                "parallel {parallel}"
            );
            assert_eq!(
                sums,
                vec![ChunkSum::of(&a), ChunkSum::of(&b), ChunkSum::of(&c)]
            );
            assert!(timings.write_and_checksum_ms >= timings.write_ms);
        }
    }

    #[test]
    fn pieces_after_a_gap_land_at_their_offset_and_the_gap_is_never_written() {
        let (a, b, c) = (vec![1u8; 4096], vec![2u8; 8192], vec![3u8; 4096]);
        // a at 100, a 4 KiB gap, b, c right after it.
        let pieces = [
            Piece {
                file_offset: 100,
                bytes: &a,
            },
            Piece {
                file_offset: 100 + 8192,
                bytes: &b,
            },
            Piece {
                file_offset: 100 + 16384,
                bytes: &c,
            },
        ];
        assert_eq!(
            batches(&pieces).map(|b| b.len()).collect::<Vec<_>>(),
            [1, 2]
        );
        for parallel in [true, false] {
            let mut out = Cursor::new(vec![0xeeu8; 100 + 8192]);
            write_and_checksum_with(&mut out, &pieces, &mut WriteTimings::default(), parallel)
                .unwrap();
            let out = out.into_inner();
            assert_eq!(out.len(), 100 + 20480);
            assert_eq!(&out[100..4196], &a[..]);
            assert!(
                out[4196..8292].iter().all(|&x| x == 0xee),
                "the gap was written"
            );
            assert_eq!(&out[8292..16484], &b[..]);
            assert_eq!(&out[16484..], &c[..]);
        }
    }

    /// A writer that fails after `left` bytes.
    struct Full {
        left: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Seek for Full {
        fn seek(&mut self, _: SeekFrom) -> std::io::Result<u64> {
            Ok(0)
        }
    }

    /// Takes at most `per_call` bytes per (vectored) write, like a file system under pressure.
    struct Short {
        out: Vec<u8>,
        per_call: usize,
        calls: usize,
    }

    impl Write for Short {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
            assert!(bufs.len() <= MAX_IOVECS);
            self.calls += 1;
            let mut left = self.per_call;
            for buf in bufs {
                let n = buf.len().min(left);
                self.out.extend_from_slice(&buf[..n]);
                left -= n;
            }
            Ok(self.per_call - left)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Seek for Short {
        /// Only where the output already stands (the pieces are packed).
        fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
            assert_eq!(to, SeekFrom::Start(self.out.len() as u64));
            Ok(self.out.len() as u64)
        }
    }

    #[test]
    fn short_vectored_writes_resume_and_batches_respect_both_limits() {
        let small: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![i as u8; 100 + (i % 7) as usize])
            .collect();
        let big = vec![9u8; 5 << 20];
        let mut parts: Vec<&[u8]> = small.iter().map(|p| &p[..]).collect();
        parts.insert(1500, &big);
        parts.insert(10, &[]);
        let pieces = packed(&parts);
        for b in batches(&pieces) {
            assert!(b.len() <= MAX_IOVECS);
            let bytes: usize = b.iter().map(|p| p.bytes.len()).sum();
            assert!(bytes - b.last().unwrap().bytes.len() < BATCH_BYTES);
        }
        assert_eq!(
            batches(&pieces).map(|b| b.len()).sum::<usize>(),
            pieces.len()
        );
        for parallel in [true, false] {
            let mut out = Short {
                out: Vec::new(),
                per_call: 777,
                calls: 0,
            };
            let sums =
                write_and_checksum_with(&mut out, &pieces, &mut WriteTimings::default(), parallel)
                    .unwrap();
            assert_eq!(out.out, parts.concat(), "parallel {parallel}");
            assert!(out.calls >= out.out.len() / 777);
            assert_eq!(sums.len(), pieces.len());
            assert_eq!(sums[1501], ChunkSum::of(&big));
        }
    }

    #[test]
    fn a_failed_write_is_an_error_not_a_result() {
        let data = vec![1u8; 10_000];
        let pieces = packed(&[&data, &data]);
        for parallel in [true, false] {
            let err = write_and_checksum_with(
                &mut Full { left: 12_000 },
                &pieces,
                &mut WriteTimings::default(),
                parallel,
            )
            .unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        }
    }
}
