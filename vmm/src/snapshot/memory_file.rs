//! The memory file: which guest pages to keep, writing them, and mapping them back.
//!
//! A page is kept when the guest touched it (this process mapped it or it was swapped out, as
//! `/proc/self/pagemap` says, or it holds data of the snapshot the VM was restored from: see
//! [`Residency`]), it is not known free by the balloon's page-state map (inflated, reported,
//! hinted), and it is not all zero.
//! Kept pages form ranges; each range is stored contiguously at a page-aligned file offset, cut
//! into chunks of at most [`CHUNK_MAX_BYTES`], each with its own checksum. Where two kept ranges
//! of one RAM region are at most [`HOLE_MAX_BYTES`] apart in the guest, the second is stored as
//! far after the first in the file, and the bytes between are never written: a hole, which
//! takes no disk blocks and reads zero, like the left-out pages it stands for.
//!
//! Restore maps the kept ranges with `mmap(MAP_PRIVATE | MAP_FIXED)` over the anonymous guest
//! memory: no copy, one system call per run of ranges bridged by holes, pages shared in the host
//! page cache by every clone of the snapshot and copied only when a clone writes them. A trimmed
//! guest keeps thousands of small ranges, so without the holes restore made thousands of calls.
//! Other skipped pages stay anonymous zero memory. Holes are checked to read zero, like chunks
//! are checked against their checksums.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use balloon::{PageState, PageStateMap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::checksum::ChunkSum;
use super::format::{MemoryHeader, MEMORY_HEADER_BYTES, PAGE_BYTES};
use super::map::{PageClass, PageClassRuns};
use super::state::{MemoryChunk, MemoryIndex, PageCounts};
use super::write_pipe::{ms_since, write_and_checksum, Piece, WriteTimings};
use super::SnapshotError;
use crate::memory::{pagemap, ChangedSet, Residency};

/// Largest chunk: the unit of checksums (and of the error that names a damaged one).
pub const CHUNK_MAX_BYTES: u64 = 4 << 20;

/// Longest run of left-out pages between two kept ranges that the memory file stores as a hole,
/// so that restore maps both ranges and the hole with one call. A hole costs no disk and no
/// memory until the guest touches it; then a read gets a page of zeros from the host page cache
/// (shared by the clones) instead of the shared zero page, and a write copies it. Longer runs
/// (free memory the balloon reported, in blocks of 2 MiB and more) stay anonymous memory, which
/// the guest allocates from after restore at the cost of a plain anonymous fault.
pub const HOLE_MAX_BYTES: u64 = 1 << 20;

/// Why a page is left out (or kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageFate {
    Keep,
    Inflated,
    Reported,
    Hinted,
    NeverTouched,
    Zero,
    /// Unchanged since the parent of a diff layer: not stored, taken from the parent.
    Inherit,
}

impl PageFate {
    /// The class a page of this fate has in the snapshot's map.
    fn class(self) -> PageClass {
        match self {
            PageFate::Keep => PageClass::Kept,
            PageFate::Inflated => PageClass::Inflated,
            PageFate::Reported => PageClass::Reported,
            PageFate::Hinted => PageClass::Hinted,
            PageFate::NeverTouched => PageClass::NeverTouched,
            PageFate::Zero => PageClass::Zero,
            PageFate::Inherit => PageClass::Inherited,
        }
    }
}

impl PageCounts {
    fn add(&mut self, fate: PageFate, pages: u64) {
        let slot = match fate {
            PageFate::Keep => &mut self.kept,
            PageFate::Inflated => &mut self.skipped_inflated,
            PageFate::Reported => &mut self.skipped_reported,
            PageFate::Hinted => &mut self.skipped_hinted,
            PageFate::NeverTouched => &mut self.skipped_never_touched,
            PageFate::Zero => &mut self.skipped_zero,
            PageFate::Inherit => return,
        };
        *slot += pages;
    }
}

/// The host view of one RAM region: its guest start and its bytes.
struct RegionView<'a> {
    gpa: u64,
    bytes: &'a [u8],
}

/// Host views of every RAM region of `mem`, in address order.
///
/// # Safety
///
/// Nothing may write guest memory while the views live: the vCPUs are paused and no device
/// touches guest memory (the caller guarantees both).
unsafe fn region_views(mem: &GuestMemoryMmap) -> Vec<RegionView<'_>> {
    let mut views: Vec<_> = mem
        .iter()
        .map(|region| {
            let host = region.as_ptr();
            // SAFETY: the region's mapping is `len` bytes, alive as long as `mem`; the caller
            // guarantees no concurrent writes.
            let bytes = unsafe { std::slice::from_raw_parts(host, region.len() as usize) };
            RegionView {
                gpa: region.start_addr().0,
                bytes,
            }
        })
        .collect();
    views.sort_by_key(|v| v.gpa);
    views
}

/// Which pages of `view` the guest touched (see [`Residency`]): this process's page tables,
/// then the ranges backed by snapshot data.
fn touched_pages(view: &RegionView, residency: Residency) -> std::io::Result<Vec<bool>> {
    let pages = view.bytes.len() / PAGE_BYTES as usize;
    let file_data = match residency {
        Residency::Unknown => return Ok(vec![true; pages]),
        Residency::PageTables { file_data } => file_data,
    };
    let mut touched = vec![false; pages];
    pagemap::for_each_entry(view.bytes.as_ptr() as u64, pages as u64, |i, entry| {
        touched[i as usize] = entry & (pagemap::PRESENT | pagemap::SWAPPED) != 0;
    })?;
    let view_end = view.gpa + view.bytes.len() as u64;
    for &(gpa, len) in file_data {
        let (from, to) = (gpa.max(view.gpa), (gpa + len).min(view_end));
        if from < to {
            let first = ((from - view.gpa) / PAGE_BYTES) as usize;
            let last = (to - view.gpa).div_ceil(PAGE_BYTES) as usize;
            touched[first..last].fill(true);
        }
    }
    Ok(touched)
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && tail.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0)
}

/// Decides the fate of every page of one region.
fn classify(
    view: &RegionView,
    page_states: Option<&PageStateMap>,
    keep_all: bool,
    residency: Residency,
    changed: Option<&ChangedSet>,
) -> std::io::Result<Vec<PageFate>> {
    if keep_all {
        return Ok(vec![PageFate::Keep; view.bytes.len() / PAGE_BYTES as usize]);
    }
    let touched = touched_pages(view, residency)?;
    let first_pfn = view.gpa / PAGE_BYTES;
    let mut fates = Vec::with_capacity(touched.len());
    for (i, page) in view.bytes.chunks(PAGE_BYTES as usize).enumerate() {
        let state = page_states
            .and_then(|m| m.state(first_pfn + i as u64).ok())
            .unwrap_or(PageState::Live);
        let pfn = first_pfn + i as u64;
        let fate = match state {
            PageState::Live if changed.is_some_and(|c| !c.contains(pfn)) => PageFate::Inherit,
            PageState::Inflated => PageFate::Inflated,
            PageState::Reported => PageFate::Reported,
            PageState::Hinted => PageFate::Hinted,
            PageState::Live if !touched[i] => PageFate::NeverTouched,
            PageState::Live if is_zero(page) => PageFate::Zero,
            PageState::Live => PageFate::Keep,
        };
        fates.push(fate);
    }
    Ok(fates)
}

/// Writes the memory file at `path` (header, then the kept pages) and returns its index.
/// `file` must be empty. Nothing may write guest memory meanwhile (vCPUs paused).
pub fn write_memory_file(
    file: &mut File,
    path: &Path,
    mem: &GuestMemoryMmap,
    page_states: Option<&PageStateMap>,
    keep_all: bool,
    residency: Residency,
    snapshot_id: [u8; 16],
) -> Result<MemoryIndex, SnapshotError> {
    let rules = KeepRules {
        keep_all,
        residency,
        changed: None,
    };
    write_memory_file_since(file, path, mem, page_states, rules, snapshot_id)
        .map(|(index, _, _)| index)
}

/// What a diff layer's memory file leaves to its parent and what it frees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerPageSets {
    /// Ranges `(gpa, len_bytes)` that now read zero (freed or zeroed since the parent), sorted.
    pub freed: Vec<(u64, u64)>,
    /// Pages unchanged since the parent.
    pub inherited_pages: u64,
}

/// Which pages a memory file keeps, besides what the page-state map says.
#[derive(Clone, Copy, Debug)]
pub struct KeepRules<'a> {
    /// Every page (a raw full dump).
    pub keep_all: bool,
    /// How never-touched pages are told.
    pub residency: Residency<'a>,
    /// Pages written since the parent (a diff layer), or `None` for a full snapshot.
    pub changed: Option<&'a ChangedSet>,
}

/// Like [`write_memory_file`]; with `changed` (pages written since the parent) it writes a diff
/// layer: live pages not in `changed` are left to the parent, changed pages that are now zero or
/// never touched and pages the page-state map holds free are listed as freed ranges. Also returns
/// where the time went (the pages are checksummed on a second thread while they are written).
pub fn write_memory_file_since(
    file: &mut File,
    path: &Path,
    mem: &GuestMemoryMmap,
    page_states: Option<&PageStateMap>,
    rules: KeepRules,
    snapshot_id: [u8; 16],
) -> Result<(MemoryIndex, LayerPageSets, WriteTimings), SnapshotError> {
    let KeepRules {
        keep_all,
        residency,
        changed,
    } = rules;
    let mut sets = LayerPageSets::default();
    // SAFETY: the caller has paused the vCPUs and the VM has no device writing guest memory.
    let views = unsafe { region_views(mem) };
    let mut index = MemoryIndex {
        regions: views
            .iter()
            .map(|v| (v.gpa, v.bytes.len() as u64))
            .collect(),
        ..MemoryIndex::default()
    };
    let write_err = || SnapshotError::io("write the memory file", path);
    file.write_all(&[0u8; MEMORY_HEADER_BYTES as usize])
        .map_err(write_err())?;
    let mut timings = WriteTimings::default();
    let classify_start = std::time::Instant::now();
    let mut offset = MEMORY_HEADER_BYTES;
    let mut classes = PageClassRuns::default();
    // The kept pieces in file order (each one chunk of the index, its checksum filled in below).
    let mut pieces: Vec<Piece> = Vec::new();
    for view in &views {
        let fates = classify(view, page_states, keep_all, residency, changed).map_err(
            SnapshotError::io("read page residency (/proc/self/pagemap) for", path),
        )?;
        let mut page = 0usize;
        // Where the region's last kept range ended, and whether a page since then is left to
        // the parent (such pages must not become a hole: it would hide the parent's bytes).
        let mut kept_end_gpa: Option<u64> = None;
        let mut inherited_since = false;
        while page < fates.len() {
            let fate = fates[page];
            let run = fates[page..].iter().take_while(|f| **f == fate).count();
            index.pages.add(fate, run as u64);
            classes.push(fate.class(), run as u64);
            if fate == PageFate::Keep {
                let start = page * PAGE_BYTES as usize;
                let end = start + run * PAGE_BYTES as usize;
                let run_gpa = view.gpa + start as u64;
                if let Some(gap) = kept_end_gpa
                    .map(|end| run_gpa - end)
                    .filter(|&gap| gap <= HOLE_MAX_BYTES && !inherited_since)
                {
                    offset += gap;
                }
                for piece in view.bytes[start..end].chunks(CHUNK_MAX_BYTES as usize) {
                    let gpa = view.gpa + (piece.as_ptr() as u64 - view.bytes.as_ptr() as u64);
                    index.chunks.push(MemoryChunk {
                        gpa,
                        len_bytes: piece.len() as u64,
                        file_offset: offset,
                        sum: ChunkSum::PENDING,
                    });
                    pieces.push(Piece {
                        file_offset: offset,
                        bytes: piece,
                    });
                    offset += piece.len() as u64;
                }
                kept_end_gpa = Some(view.gpa + end as u64);
                inherited_since = false;
            } else if fate == PageFate::Inherit {
                sets.inherited_pages += run as u64;
                inherited_since = true;
            } else if changed.is_some() {
                let gpa = view.gpa + page as u64 * PAGE_BYTES;
                let len = run as u64 * PAGE_BYTES;
                match sets.freed.last_mut() {
                    Some(last) if last.0 + last.1 == gpa => last.1 += len,
                    _ => sets.freed.push((gpa, len)),
                }
            }
            page += run;
        }
    }
    timings.classify_ms = ms_since(classify_start);
    let sums = write_and_checksum(&mut *file, &pieces, &mut timings).map_err(write_err())?;
    for (chunk, sum) in index.chunks.iter_mut().zip(sums) {
        chunk.sum = sum;
    }
    index.data_bytes = offset - MEMORY_HEADER_BYTES;
    index.classes = Some(classes);
    let header = MemoryHeader {
        snapshot_id,
        data_bytes: index.data_bytes,
    };
    file.write_all_at(&header.encode(), 0)
        .map_err(write_err())?;
    Ok((index, sets, timings))
}

/// Checks the index against guest RAM and the file's length (a chunk past the end of the file
/// would fault the guest with SIGBUS on first touch). `file_bytes` is the file's length.
pub fn validate_index(
    index: &MemoryIndex,
    path: &Path,
    file_bytes: u64,
) -> Result<(), SnapshotError> {
    let invalid = |reason: String| SnapshotError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let needed = MEMORY_HEADER_BYTES
        .checked_add(index.data_bytes)
        .ok_or_else(|| invalid(format!("{} data bytes is not a length", index.data_bytes)))?;
    if file_bytes < needed {
        return Err(SnapshotError::Truncated {
            path: path.to_owned(),
            needed,
            actual: file_bytes,
        });
    }
    for (i, chunk) in index.chunks.iter().enumerate() {
        let aligned = (chunk.gpa | chunk.len_bytes | chunk.file_offset) % PAGE_BYTES == 0;
        let in_file = chunk.file_offset >= MEMORY_HEADER_BYTES
            && chunk
                .file_offset
                .checked_add(chunk.len_bytes)
                .is_some_and(|end| end <= needed);
        let in_ram = index.regions.iter().any(|&(start, len)| {
            chunk.gpa >= start
                && chunk
                    .gpa
                    .checked_add(chunk.len_bytes)
                    .is_some_and(|end| end <= start + len)
        });
        if !aligned || !in_file || !in_ram || chunk.len_bytes == 0 {
            return Err(invalid(format!(
                "chunk {i} (guest address {:#x}, {} bytes at file offset {:#x}) is not page aligned, outside the memory file or outside guest RAM",
                chunk.gpa, chunk.len_bytes, chunk.file_offset
            )));
        }
    }
    Ok(())
}

/// The byte ranges `(file_offset, len_bytes)` of the memory file's data (after the header, up
/// to `data_bytes`) that no chunk covers, in file order: the holes the writer left between kept
/// ranges (see [`HOLE_MAX_BYTES`]). They must read zero. The index must have passed
/// [`validate_index`].
pub fn file_holes(index: &MemoryIndex) -> Vec<(u64, u64)> {
    let mut covered: Vec<(u64, u64)> = index
        .chunks
        .iter()
        .map(|c| (c.file_offset, c.file_offset + c.len_bytes))
        .collect();
    covered.sort_unstable();
    let mut holes = Vec::new();
    let mut position = MEMORY_HEADER_BYTES;
    for (start, end) in covered {
        if start > position {
            holes.push((position, start - position));
        }
        position = position.max(end);
    }
    let data_end = MEMORY_HEADER_BYTES + index.data_bytes;
    if data_end > position {
        holes.push((position, data_end - position));
    }
    holes
}

/// Whether `offset..offset + len` lies inside one of `holes` (sorted, as [`file_holes`] gives).
fn inside_hole(holes: &[(u64, u64)], offset: u64, len: u64) -> bool {
    let after = holes.partition_point(|&(start, _)| start <= offset);
    after > 0 && {
        let (start, hole_len) = holes[after - 1];
        offset + len <= start + hole_len
    }
}

/// Checks that every hole of the memory file (see [`file_holes`]) reads zero: where the file
/// system reports a hole (`SEEK_DATA`) nothing is read; what it reports as data is read and
/// must be all zero. A damaged hole is an error naming the file and the offset.
pub fn verify_holes(file: &File, holes: &[(u64, u64)], path: &Path) -> Result<(), SnapshotError> {
    let read_err = || SnapshotError::io("read the memory file", path);
    let mut buf = Vec::new();
    for &(start, len) in holes {
        let end = start + len;
        let mut position = start;
        while position < end {
            let Some((data, data_end)) = next_data(file, position).map_err(read_err())? else {
                break;
            };
            if data >= end {
                break;
            }
            let stop = data_end.min(end);
            let mut at = data;
            while at < stop {
                let n = (stop - at).min(1 << 20) as usize;
                buf.resize(n, 0);
                file.read_exact_at(&mut buf, at).map_err(read_err())?;
                if let Some(i) = buf.iter().position(|&b| b != 0) {
                    return Err(SnapshotError::HoleNotZero {
                        path: path.to_owned(),
                        file_offset: at + i as u64,
                        hole_offset: start,
                        hole_bytes: len,
                    });
                }
                at += n as u64;
            }
            position = stop;
        }
    }
    Ok(())
}

/// The next range of `file` the file system holds as data at or after `offset`
/// (`SEEK_DATA`, `SEEK_HOLE`), or `None` when there is none before the end of the file.
/// A file system without hole support reports everything up to the end as data.
fn next_data(file: &File, offset: u64) -> std::io::Result<Option<(u64, u64)>> {
    let seek = |from: u64, whence| {
        // SAFETY: lseek on an open descriptor reads and moves only the file position, which
        // nothing here relies on (every read of the memory file is positioned).
        let rc = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc as u64)
        }
    };
    let data = match seek(offset, libc::SEEK_DATA) {
        Ok(data) => data,
        Err(err) if err.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(err) => return Err(err),
    };
    Ok(Some((data, seek(data, libc::SEEK_HOLE)?)))
}

/// One `mmap` of the memory file: `len_bytes` from `file_offset`, at guest address `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpan {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len_bytes: u64,
    /// Where it starts in the memory file.
    pub file_offset: u64,
}

/// Plans the mappings of `runs` (kept ranges of one memory file, in guest address order, each
/// read from its file offset, all inside the file: checked by [`validate_index`]) over guest RAM
/// `regions` (`(start, len)`): runs contiguous in guest and file, or separated by the same
/// distance in both where the file's bytes between lie in one of its `holes` (see
/// [`file_holes`]), share one span; a span never crosses a region. `Err(i)`: run `i` does not
/// lie inside one region.
pub fn plan_mappings(
    runs: &[MemoryChunk],
    holes: &[(u64, u64)],
    regions: &[(u64, u64)],
) -> Result<Vec<MapSpan>, usize> {
    let mut spans: Vec<MapSpan> = Vec::new();
    let mut last_region = None;
    for (i, run) in runs.iter().enumerate() {
        let run_end = run.gpa.checked_add(run.len_bytes).ok_or(i)?;
        let region = regions
            .iter()
            .position(|&(start, len)| {
                run.gpa >= start && start.checked_add(len).is_some_and(|end| run_end <= end)
            })
            .ok_or(i)?;
        if let Some(last) = spans.last_mut().filter(|_| last_region == Some(region)) {
            let end_gpa = last.gpa + last.len_bytes;
            let end_offset = last.file_offset + last.len_bytes;
            let follows = run.gpa.checked_sub(end_gpa).is_some_and(|gap| {
                end_offset.checked_add(gap) == Some(run.file_offset)
                    && (gap == 0 || inside_hole(holes, end_offset, gap))
            });
            if follows {
                last.len_bytes = run_end - last.gpa;
                continue;
            }
        }
        last_region = Some(region);
        spans.push(MapSpan {
            gpa: run.gpa,
            len_bytes: run.len_bytes,
            file_offset: run.file_offset,
        });
    }
    Ok(spans)
}

/// Maps `runs` of the memory file `file` over guest memory `mem` (private, copy-on-write), one
/// `mmap` per span [`plan_mappings`] gives. The index must have passed [`validate_index`].
/// Returns the number of `mmap` calls.
pub fn map_into_guest(
    mem: &GuestMemoryMmap,
    file: &File,
    path: &Path,
    runs: &[MemoryChunk],
    holes: &[(u64, u64)],
) -> Result<usize, SnapshotError> {
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let spans = plan_mappings(runs, holes, &regions).map_err(|i| SnapshotError::Map {
        path: path.to_owned(),
        gpa: runs[i].gpa,
        len_bytes: runs[i].len_bytes,
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "range is not inside one guest RAM region",
        ),
    })?;
    for span in &spans {
        let map_err = |source| SnapshotError::Map {
            path: path.to_owned(),
            gpa: span.gpa,
            len_bytes: span.len_bytes,
            source,
        };
        let host = mem
            .get_host_address(GuestAddress(span.gpa))
            .map_err(|e| map_err(std::io::Error::other(e.to_string())))?;
        // SAFETY: the span lies inside one region's live anonymous mapping (`plan_mappings`
        // checked it against the regions of `mem`), which `mem` keeps and unmaps as a whole;
        // MAP_FIXED replaces those pages with a private copy-on-write mapping of the file range,
        // which lies inside the file (`validate_index` checked the runs; the holes between them
        // are file ranges between chunks). No Rust reference into guest memory exists (it is
        // accessed through volatile accessors only) and no vCPU runs yet.
        let addr = unsafe {
            libc::mmap(
                host.cast(),
                span.len_bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                span.file_offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
    }
    Ok(spans.len())
}

/// Checks every chunk's CRC-32C, reading through `read(chunk) -> bytes`; the first mismatch is
/// an error naming the file and the chunk.
pub fn verify_chunks<'a>(
    chunks: &[MemoryChunk],
    path: &Path,
    mut read: impl FnMut(&MemoryChunk) -> Result<&'a [u8], SnapshotError>,
) -> Result<(), SnapshotError> {
    for (index, chunk) in chunks.iter().enumerate() {
        let bytes = read(chunk)?;
        if !chunk.sum.matches(bytes) {
            return Err(SnapshotError::ChunkChecksum {
                path: path.to_owned(),
                index,
                gpa: chunk.gpa,
                len_bytes: chunk.len_bytes,
                file_offset: chunk.file_offset,
            });
        }
    }
    Ok(())
}

/// Checks every chunk's CRC-32C by reading the memory file itself (`pread` into one reusable
/// buffer per thread; the chunks are split in contiguous runs across `threads` threads).
/// Unlike [`verify_mapped`] nothing is faulted into guest memory: the guest's page tables stay
/// empty until it touches its pages. The same bytes are checked (the private mapping reads the
/// file's page cache), so the guarantee is the same: the first damaged chunk (lowest index) is
/// an error naming the file and the chunk.
pub fn verify_file(
    file: &File,
    chunks: &[MemoryChunk],
    path: &Path,
    threads: usize,
) -> Result<(), SnapshotError> {
    let threads = threads.clamp(1, chunks.len().max(1));
    let per_thread = chunks.len().div_ceil(threads).max(1);
    // The lowest damaged chunk found so far: a thread stops once it is past it (chunks below it
    // must still be checked, so that the error names the lowest damaged chunk).
    let lowest_failed = std::sync::atomic::AtomicUsize::new(usize::MAX);
    let check_run = |first: usize, run: &[MemoryChunk]| -> Result<(), SnapshotError> {
        let longest = run.iter().map(|c| c.len_bytes).max().unwrap_or(0) as usize;
        let mut buf = vec![0u8; longest];
        for (i, chunk) in run.iter().enumerate() {
            if first + i > lowest_failed.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(());
            }
            let bytes = &mut buf[..chunk.len_bytes as usize];
            file.read_exact_at(bytes, chunk.file_offset)
                .map_err(SnapshotError::io("read the memory file", path))?;
            if !chunk.sum.matches(bytes) {
                lowest_failed.fetch_min(first + i, std::sync::atomic::Ordering::Relaxed);
                return Err(SnapshotError::ChunkChecksum {
                    path: path.to_owned(),
                    index: first + i,
                    gpa: chunk.gpa,
                    len_bytes: chunk.len_bytes,
                    file_offset: chunk.file_offset,
                });
            }
        }
        Ok(())
    };
    let results: Vec<Result<(), SnapshotError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .chunks(per_thread)
            .enumerate()
            .map(|(t, run)| {
                let check_run = &check_run;
                scope.spawn(move || check_run(t * per_thread, run))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("verification thread panicked"))
            .collect()
    });
    // Runs are in chunk order: the first error is the lowest damaged chunk found.
    results.into_iter().collect()
}

/// Verifies the chunks through guest memory after [`map_into_guest`] (reading the mapped page
/// cache; nothing is copied).
pub fn verify_mapped(
    mem: &GuestMemoryMmap,
    chunks: &[MemoryChunk],
    path: &Path,
) -> Result<(), SnapshotError> {
    // SAFETY: no vCPU runs yet and no device is active: nothing writes guest memory.
    let views = unsafe { region_views(mem) };
    verify_chunks(chunks, path, |chunk| {
        views
            .iter()
            .find(|v| {
                chunk.gpa >= v.gpa && chunk.gpa + chunk.len_bytes <= v.gpa + v.bytes.len() as u64
            })
            .map(|v| {
                let start = (chunk.gpa - v.gpa) as usize;
                &v.bytes[start..start + chunk.len_bytes as usize]
            })
            .ok_or_else(|| SnapshotError::Invalid {
                path: path.to_owned(),
                reason: format!(
                    "chunk at guest address {:#x} is outside guest RAM",
                    chunk.gpa
                ),
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    #[test]
    fn keeps_only_nonzero_live_pages_and_maps_them_back() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 * MIB as usize),
            (GuestAddress(4 * MIB), MIB as usize),
        ])
        .unwrap();
        // Pages 1-2 hold data, page 3 is written with zeros, page 10 reported, 4 MiB + 1 page data.
        mem.write_slice(&[0xab; 8192], GuestAddress(4096)).unwrap();
        mem.write_slice(&[0; 4096], GuestAddress(3 * 4096)).unwrap();
        mem.write_slice(&[0x11; 4096], GuestAddress(10 * 4096))
            .unwrap();
        mem.write_obj(0x77u8, GuestAddress(4 * MIB + 4096 + 5))
            .unwrap();
        let mut states = PageStateMap::new(&[
            balloon::GuestRamRegion {
                start_gpa: 0,
                len_bytes: 2 * MIB,
            },
            balloon::GuestRamRegion {
                start_gpa: 4 * MIB,
                len_bytes: MIB,
            },
        ])
        .unwrap();
        states
            .mark_range(10 * 4096, 4096, PageState::Reported)
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mut file = File::create(&path).unwrap();
        let index = write_memory_file(
            &mut file,
            &path,
            &mem,
            Some(&states),
            false,
            crate::memory::Residency::PageTables { file_data: &[] },
            [3; 16],
        )
        .unwrap();
        drop(file);
        assert_eq!(index.pages.kept, 3);
        assert_eq!(index.pages.skipped_reported, 1);
        assert_eq!(index.pages.skipped_zero, 1);
        assert_eq!(index.pages.kept + index.pages.skipped(), (3 * MIB) / 4096);
        // Every page's class, in address order across both regions.
        let classes = index.classes.as_ref().unwrap();
        assert_eq!(String::from(classes.clone()), "n1 k2 z1 n6 r1 n502 k1 n254");
        assert!(classes.matches_counts(&index.pages));
        assert_eq!(PageClassRuns::recorded(&index), Ok(Some(classes)));
        assert_eq!(index.chunks.len(), 2);
        assert_eq!(index.data_bytes, 3 * 4096);
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, MEMORY_HEADER_BYTES + 3 * 4096);
        validate_index(&index, &path, len).unwrap();
        assert!(matches!(
            validate_index(&index, &path, len - 1),
            Err(SnapshotError::Truncated { .. })
        ));

        let restored = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 * MIB as usize),
            (GuestAddress(4 * MIB), MIB as usize),
        ])
        .unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(
            map_into_guest(&restored, &file, &path, &index.chunks, &[]).unwrap(),
            2
        );
        verify_mapped(&restored, &index.chunks, &path).unwrap();
        assert_eq!(file_holes(&index), []);
        assert_eq!(restored.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0xab);
        assert_eq!(restored.read_obj::<u8>(GuestAddress(10 * 4096)).unwrap(), 0);
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress(4 * MIB + 4096 + 5))
                .unwrap(),
            0x77
        );
        // A flipped byte is found and named.
        let mut bad = index.chunks.clone();
        bad[1].sum = bad[1].sum.flipped();
        let err = verify_mapped(&restored, &bad, &path).unwrap_err();
        assert!(err.to_string().contains("chunk 1"), "{err}");
        // Copy-on-write: writing the clone does not change the file.
        restored.write_obj(0x55u8, GuestAddress(4096)).unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, MEMORY_HEADER_BYTES).unwrap();
        assert_eq!(byte[0], 0xab);

        // Releasing a file-backed page must give zeros, not the file's contents back.
        let ram = crate::memory::GuestRam::file_backed(restored.clone(), Vec::new());
        ram.release(4096, 8192).unwrap();
        assert_eq!(restored.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0);
        assert_eq!(restored.read_obj::<u8>(GuestAddress(2 * 4096)).unwrap(), 0);
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress(4 * MIB + 4096 + 5))
                .unwrap(),
            0x77
        );
    }

    /// A memory file of `mem` (every non-zero page kept).
    fn write(mem: &GuestMemoryMmap, dir: &Path) -> (std::path::PathBuf, MemoryIndex) {
        let path = dir.join("memory");
        let mut file = File::create(&path).unwrap();
        let index = write_memory_file(
            &mut file,
            &path,
            mem,
            None,
            false,
            crate::memory::Residency::PageTables { file_data: &[] },
            [5; 16],
        )
        .unwrap();
        (path, index)
    }

    /// A restored clone's pages hold the snapshot's data whether or not the clone ever touched
    /// them, and whether or not the host still has them in its page cache: a snapshot of the
    /// clone keeps them. (`mincore`, used before, said "not resident" for pages evicted from the
    /// page cache, and such pages were left out as never touched.)
    #[test]
    fn a_clones_untouched_pages_are_kept_even_out_of_the_page_cache() {
        let regions = [(GuestAddress(0), 4 * MIB as usize)];
        let mem = GuestMemoryMmap::from_ranges(&regions).unwrap();
        mem.write_slice(&vec![0x5a; 64 << 10], GuestAddress(MIB))
            .unwrap();
        mem.write_obj(0x5bu8, GuestAddress(3 * MIB)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (path, index) = write(&mem, dir.path());
        assert_eq!(index.pages.kept, 17);

        let restored = GuestMemoryMmap::from_ranges(&regions).unwrap();
        let file = File::open(&path).unwrap();
        map_into_guest(&restored, &file, &path, &index.chunks, &file_holes(&index)).unwrap();
        // SAFETY: advice on an open file descriptor; it only drops clean cached pages.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        // The clone writes one page of its own.
        restored.write_obj(0x11u8, GuestAddress(2 * MIB)).unwrap();
        let file_data = index.chunks.iter().map(MemoryChunk::guest_range).collect();
        let ram = crate::memory::GuestRam::file_backed(restored.clone(), file_data);

        let again_path = dir.path().join("again");
        let mut again = File::create(&again_path).unwrap();
        let again_index = write_memory_file(
            &mut again,
            &again_path,
            &restored,
            None,
            false,
            ram.residency(),
            [6; 16],
        )
        .unwrap();
        assert_eq!(again_index.pages.kept, 18, "{:?}", again_index.pages);
        let copy = GuestMemoryMmap::from_ranges(&regions).unwrap();
        let again = File::open(&again_path).unwrap();
        map_into_guest(
            &copy,
            &again,
            &again_path,
            &again_index.chunks,
            &file_holes(&again_index),
        )
        .unwrap();
        for gpa in [MIB, MIB + (64 << 10) - 1, 2 * MIB, 3 * MIB] {
            assert_eq!(
                copy.read_obj::<u8>(GuestAddress(gpa)).unwrap(),
                restored.read_obj::<u8>(GuestAddress(gpa)).unwrap(),
                "gpa {gpa:#x}"
            );
        }
    }

    /// Without the snapshot's ranges the page tables alone see only what this process mapped:
    /// written pages, not the file's pages it never read.
    #[test]
    fn page_tables_tell_touched_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        mem.write_obj(1u8, GuestAddress(5 * 4096)).unwrap();
        let _ = mem.read_obj::<u8>(GuestAddress(7 * 4096)).unwrap();
        // SAFETY: nothing writes `mem` meanwhile.
        let views = unsafe { region_views(&mem) };
        let touched = touched_pages(&views[0], Residency::PageTables { file_data: &[] }).unwrap();
        let which: Vec<usize> = (0..touched.len()).filter(|&i| touched[i]).collect();
        // A read maps the shared zero page: touched, and then found zero.
        assert_eq!(which, [5, 7]);
        let with_file = Residency::PageTables {
            file_data: &[(0x1000, 0x2000), (MIB - 4096, 8192)],
        };
        let touched = touched_pages(&views[0], with_file).unwrap();
        let which: Vec<usize> = (0..touched.len()).filter(|&i| touched[i]).collect();
        assert_eq!(which, [1, 2, 5, 7, 255]);
        assert!(touched_pages(&views[0], Residency::Unknown)
            .unwrap()
            .iter()
            .all(|t| *t));
    }

    #[test]
    fn chunks_contiguous_in_guest_and_file_are_mapped_with_one_call() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap();
        // 9 MiB of data (three chunks, contiguous in guest and file), a zero gap, one page.
        mem.write_slice(&vec![0x42; 9 * MIB as usize], GuestAddress(MIB))
            .unwrap();
        mem.write_obj(0x43u8, GuestAddress(12 * MIB)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (path, index) = write(&mem, dir.path());
        assert_eq!(index.chunks.len(), 4, "{:?}", index.chunks);
        let file = File::open(&path).unwrap();
        let restored =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap();
        assert_eq!(
            map_into_guest(&restored, &file, &path, &index.chunks, &[]).unwrap(),
            2
        );
        // Contiguous in the guest but not in the file: two calls.
        let mut split = index.chunks[..2].to_vec();
        split[1].file_offset += PAGE_BYTES;
        let restored =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap();
        let longer = File::options().append(true).open(&path).unwrap();
        longer
            .set_len(std::fs::metadata(&path).unwrap().len() + PAGE_BYTES)
            .unwrap();
        assert_eq!(
            map_into_guest(&restored, &file, &path, &split, &[]).unwrap(),
            2
        );
        // Verification by reading the file agrees with verification through the mapping.
        for threads in [1, 2, 3, 8] {
            verify_file(&file, &index.chunks, &path, threads).unwrap();
            let mut bad = index.chunks.clone();
            bad[2].sum = bad[2].sum.flipped();
            bad[3].sum = bad[3].sum.flipped();
            let err = verify_file(&file, &bad, &path, threads).unwrap_err();
            assert!(err.to_string().contains("chunk 2"), "{threads}: {err}");
        }
    }

    #[test]
    fn short_gaps_become_holes_mapped_with_their_neighbours_in_one_call() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * MIB as usize)]).unwrap();
        // Kept: page 0, pages 2-3 (after a zero page), page 100 (after 96 untouched pages),
        // then after a gap longer than HOLE_MAX_BYTES, the page at 6 MiB.
        for (gpa, byte) in [(0, 1u8), (2 * 4096, 2), (3 * 4096, 3), (100 * 4096, 4)] {
            mem.write_slice(&[byte; 4096], GuestAddress(gpa)).unwrap();
        }
        mem.write_slice(&[0; 4096], GuestAddress(4096)).unwrap();
        mem.write_slice(&[6; 4096], GuestAddress(6 * MIB)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (path, index) = write(&mem, dir.path());
        assert_eq!(index.pages.kept, 5);
        let offsets: Vec<_> = index.chunks.iter().map(|c| c.file_offset).collect();
        let h = MEMORY_HEADER_BYTES;
        // Holes keep the guest distances up to page 100; the page at 6 MiB follows directly.
        assert_eq!(offsets, [h, h + 2 * 4096, h + 100 * 4096, h + 101 * 4096]);
        assert_eq!(index.data_bytes, 102 * 4096);
        let holes = file_holes(&index);
        assert_eq!(holes, [(h + 4096, 4096), (h + 4 * 4096, 96 * 4096)]);
        let file = File::open(&path).unwrap();
        verify_holes(&file, &holes, &path).unwrap();
        // The holes take no disk (where the file system has holes: tmpfs, ext4, xfs, btrfs).
        let disk = std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap()) * 512;
        assert!(disk <= h + 16 * 4096, "{disk} bytes on disk");

        let restored =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * MIB as usize)]).unwrap();
        assert_eq!(
            map_into_guest(&restored, &file, &path, &index.chunks, &holes).unwrap(),
            2
        );
        for (gpa, byte) in [
            (0, 1u8),
            (4096, 0),
            (2 * 4096, 2),
            (3 * 4096, 3),
            (50 * 4096, 0),
            (100 * 4096, 4),
            (6 * MIB, 6),
        ] {
            assert_eq!(restored.read_obj::<u8>(GuestAddress(gpa)).unwrap(), byte);
        }
        // Without the holes (another layer's runs): every run is its own call.
        let restored =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * MIB as usize)]).unwrap();
        assert_eq!(
            map_into_guest(&restored, &file, &path, &index.chunks, &[]).unwrap(),
            4
        );

        // A byte written into a hole is found and named.
        let rw = File::options().write(true).open(&path).unwrap();
        rw.write_all_at(&[9], h + 50 * 4096 + 7).unwrap();
        let err = verify_holes(&file, &holes, &path).unwrap_err();
        assert!(
            matches!(err, SnapshotError::HoleNotZero { file_offset, .. } if file_offset == h + 50 * 4096 + 7),
            "{err}"
        );
        assert!(err.to_string().contains("memory"), "{err}");
    }

    #[test]
    fn runs_of_one_chunk_split_by_another_layer_are_never_bridged() {
        // One layer's chunk of three pages, whose middle page a layer above freed: its runs are
        // as far apart in guest and file, but the bytes between are data, not a hole.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        mem.write_slice(&[7; 3 * 4096], GuestAddress(0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (path, index) = write(&mem, dir.path());
        let holes = file_holes(&index);
        assert_eq!(holes, []);
        let h = MEMORY_HEADER_BYTES;
        let run = |page: u64| MemoryChunk {
            gpa: page * 4096,
            len_bytes: 4096,
            file_offset: h + page * 4096,
            sum: ChunkSum::PENDING,
        };
        let file = File::open(&path).unwrap();
        let restored = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        assert_eq!(
            map_into_guest(&restored, &file, &path, &[run(0), run(2)], &holes).unwrap(),
            2
        );
        assert_eq!(restored.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0);
        assert_eq!(restored.read_obj::<u8>(GuestAddress(2 * 4096)).unwrap(), 7);
    }

    #[test]
    fn spans_never_cross_regions_and_bridge_only_holes() {
        let h = MEMORY_HEADER_BYTES;
        let run = |gpa: u64, len: u64, off: u64| MemoryChunk {
            gpa,
            len_bytes: len,
            file_offset: h + off,
            sum: ChunkSum::PENDING,
        };
        let span = |gpa, len_bytes, off| MapSpan {
            gpa,
            len_bytes,
            file_offset: h + off,
        };
        // Two regions that touch: contiguous in guest and file across the boundary, still two.
        let regions = [(0, MIB), (MIB, MIB)];
        let runs = [run(MIB - 4096, 4096, 0), run(MIB, 4096, 4096)];
        assert_eq!(
            plan_mappings(&runs, &[], &regions),
            Ok(vec![span(MIB - 4096, 4096, 0), span(MIB, 4096, 4096)])
        );
        // A gap bridged only where the file has a hole exactly there.
        let runs = [run(0, 4096, 0), run(3 * 4096, 4096, 3 * 4096)];
        let hole = [(h + 4096, 2 * 4096)];
        assert_eq!(
            plan_mappings(&runs, &hole, &regions),
            Ok(vec![span(0, 4 * 4096, 0)])
        );
        let short_hole = [(h + 4096, 4096)];
        assert_eq!(
            plan_mappings(&runs, &short_hole, &regions).unwrap().len(),
            2
        );
        // A run outside RAM is named.
        let runs = [run(0, 4096, 0), run(2 * MIB, 4096, 4096)];
        assert_eq!(plan_mappings(&runs, &[], &regions), Err(1));
    }

    /// Restore's verification cost: through the guest mapping vs reading the file, 1 and 2
    /// threads. `cargo test --release -p vmm verification_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn verification_cost() {
        const SIZE: usize = 512 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap();
        let pattern: Vec<u8> = (0..SIZE as u64)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        mem.write_slice(&pattern, GuestAddress(0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (path, index) = write(&mem, dir.path());
        let file = File::open(&path).unwrap();
        let time = |f: &dyn Fn()| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        };
        for round in 0..2 {
            let restored = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap();
            map_into_guest(&restored, &file, &path, &index.chunks, &[]).unwrap();
            let mapped = time(&|| verify_mapped(&restored, &index.chunks, &path).unwrap());
            let one = time(&|| verify_file(&file, &index.chunks, &path, 1).unwrap());
            let two = time(&|| verify_file(&file, &index.chunks, &path, 2).unwrap());
            println!("round {round}: 512 MiB: verify_mapped {mapped:.1} ms, verify_file 1 thread {one:.1} ms, 2 threads {two:.1} ms");
        }
    }
}
