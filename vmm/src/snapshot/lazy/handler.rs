//! The page fault handler thread: reads userfaultfd events and fills missing guest pages.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use vmm_sys_util::eventfd::EventFd;

use super::segments::{SegmentMap, Source};
use super::uffd::{Event, Uffd};
use super::{LazyError, LazyStats, BATCH_BYTES};
use crate::snapshot::checksum::ChunkSum;
use crate::snapshot::format::PAGE_BYTES;
use crate::snapshot::SnapshotError;

/// A memory file mapped read-only (shared with the page cache): the source of `UFFDIO_COPY`.
pub(super) struct FileMap {
    ptr: *const u8,
    len: usize,
    path: PathBuf,
}

// SAFETY: the mapping is read-only and owned by this value; the pointer is only read.
unsafe impl Send for FileMap {}

impl FileMap {
    /// Maps all of `file` read-only.
    pub(super) fn new(file: &File, path: &Path) -> Result<Self, LazyError> {
        let map_err = |source| LazyError::MapFile {
            path: path.to_owned(),
            source,
        };
        let len = file.metadata().map_err(map_err)?.len() as usize;
        // SAFETY: a new read-only shared mapping of a whole open file; nothing else is
        // affected. The reader checked the file holds every chunk of the index.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            path: path.to_owned(),
        })
    }

    /// The bytes `offset..offset + len` (inside the file: checked by the reader).
    fn slice(&self, offset: u64, len: u64) -> &[u8] {
        assert!(
            offset + len <= self.len as u64,
            "memory file range checked by the reader"
        );
        // SAFETY: the range lies inside the live read-only mapping (asserted above).
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset as usize), len as usize) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created; no slice of it outlives `self`.
        unsafe { libc::munmap(self.ptr as *mut _, self.len.max(1)) };
    }
}

/// What the handler knows about one guest page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Page {
    /// Never served: its segment says what it holds.
    Missing,
    /// Present in guest memory.
    Served,
    /// Released by the guest (`MADV_DONTNEED`): reads zero from now on.
    Released,
}

/// One registered RAM region and the state of its pages.
pub(super) struct RamRegion {
    gpa: u64,
    host: u64,
    len_bytes: u64,
    pages: Vec<Page>,
}

impl RamRegion {
    /// Region at guest address `gpa`, mapped at host address `host`.
    pub(super) fn new(gpa: u64, host: u64, len_bytes: u64) -> Self {
        Self {
            gpa,
            host,
            len_bytes,
            pages: vec![Page::Missing; (len_bytes / PAGE_BYTES) as usize],
        }
    }

    fn contains_host(&self, addr: u64) -> bool {
        addr >= self.host && addr - self.host < self.len_bytes
    }
}

/// What became of one fault.
enum Served {
    Done,
    /// The address space is changing (an event is pending): read events, then try again.
    Retry,
}

/// The handler's state, moved into its thread.
pub(super) struct Handler {
    pub(super) uffd: Uffd,
    pub(super) stop: EventFd,
    pub(super) regions: Vec<RamRegion>,
    pub(super) segments: SegmentMap,
    pub(super) files: Vec<FileMap>,
    /// Per file, per chunk: already checked (all `true` without verification).
    pub(super) verified: Vec<Vec<bool>>,
    pub(super) stats: Arc<LazyStats>,
}

impl Handler {
    /// Serves faults until the stop eventfd fires or an error occurs.
    pub(super) fn run(mut self) -> Result<(), LazyError> {
        let mut events = Vec::new();
        let mut faults: Vec<u64> = Vec::new();
        loop {
            if faults.is_empty() && !self.wait()? {
                return Ok(());
            }
            self.uffd
                .read_events(&mut events)
                .map_err(LazyError::Events)?;
            // Releases first: a page released while its fault waited reads zero, which is
            // what the guest gave up anyway.
            for event in &events {
                match *event {
                    Event::Pagefault { addr } => faults.push(addr),
                    Event::Remove { start, end } | Event::Unmap { start, end } => {
                        self.released(start, end)
                    }
                    Event::Other(code) => {
                        tracing::warn!(code, "unexpected userfaultfd event ignored")
                    }
                }
            }
            let mut retry = Vec::new();
            for addr in faults.drain(..) {
                if let Served::Retry = self.serve(addr)? {
                    retry.push(addr);
                }
            }
            faults = retry;
        }
    }

    /// Blocks until the userfaultfd has events (`true`) or the handler must stop (`false`).
    fn wait(&self) -> Result<bool, LazyError> {
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a valid array of two pollfd structures.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let errno = Errno::last();
                if errno == Errno::EINTR {
                    continue;
                }
                return Err(LazyError::Events(errno));
            }
            if fds[1].revents != 0 {
                return Ok(false);
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return Err(LazyError::Events(Errno::EIO));
            }
            return Ok(true);
        }
    }

    /// Marks the pages of host range `start..end` zero-on-fault.
    fn released(&mut self, start: u64, end: u64) {
        LazyStats::add(&self.stats.removed_bytes, end.saturating_sub(start));
        for region in &mut self.regions {
            let lo = start.max(region.host);
            let hi = end.min(region.host + region.len_bytes);
            if lo >= hi {
                continue;
            }
            let first = ((lo - region.host) / PAGE_BYTES) as usize;
            let last = (hi - region.host).div_ceil(PAGE_BYTES) as usize;
            region.pages[first..last].fill(Page::Released);
        }
    }

    /// Serves the fault at host address `addr` (see the module docs for the batch).
    fn serve(&mut self, addr: u64) -> Result<Served, LazyError> {
        LazyStats::add(&self.stats.faults, 1);
        let r = self
            .regions
            .iter()
            .position(|region| region.contains_host(addr))
            .ok_or(LazyError::OutsideRam(addr))?;
        let (region_gpa, region_host, region_len) = {
            let region = &self.regions[r];
            (region.gpa, region.host, region.len_bytes)
        };
        let page = (addr - region_host) / PAGE_BYTES;
        let gpa = region_gpa + page * PAGE_BYTES;
        let state = self.regions[r].pages[page as usize];
        if state == Page::Served {
            // Another thread's fault on this page was served first.
            let _ = self.uffd.wake(region_host + page * PAGE_BYTES, PAGE_BYTES);
            return Ok(Served::Done);
        }
        let segment = *self.segments.find(gpa).ok_or(LazyError::OutsideRam(addr))?;
        // The aligned window, clipped to the segment and the region, then to the run of pages
        // in the same state around the faulting one.
        let window = gpa & !(BATCH_BYTES - 1);
        let lo_gpa = window.max(segment.gpa).max(region_gpa);
        let hi_gpa = (window + BATCH_BYTES)
            .min(segment.end())
            .min(region_gpa + region_len);
        let pages = &self.regions[r].pages;
        let first_page = (lo_gpa - region_gpa) / PAGE_BYTES;
        let mut lo = page;
        while lo > first_page && pages[lo as usize - 1] == state {
            lo -= 1;
        }
        let end_page = (hi_gpa - region_gpa) / PAGE_BYTES;
        let mut hi = page + 1;
        while hi < end_page && pages[hi as usize] == state {
            hi += 1;
        }
        let start_gpa = region_gpa + lo * PAGE_BYTES;
        let len = (hi - lo) * PAGE_BYTES;
        let dst = region_host + lo * PAGE_BYTES;
        let zero = state == Page::Released || segment.source == Source::Zero;
        let result = match segment.source {
            Source::File {
                file,
                offset,
                chunk,
                sum: expected,
            } if !zero => {
                self.verify(
                    file,
                    chunk,
                    offset,
                    segment.gpa,
                    segment.len_bytes,
                    expected,
                )?;
                let src = self.files[file].slice(offset + (start_gpa - segment.gpa), len);
                // SAFETY: `src` is `len` readable bytes of the file mapping.
                unsafe { self.uffd.copy(dst, src.as_ptr(), len) }
            }
            _ => self.uffd.zeropage(dst, len),
        };
        let operation = if zero {
            "zero (UFFDIO_ZEROPAGE)"
        } else {
            "copy (UFFDIO_COPY)"
        };
        match result {
            Ok(_) => {}
            Err(Errno::EAGAIN) => return Ok(Served::Retry),
            Err(Errno::EEXIST) => {
                // A page of the batch was present (should not happen: the handler alone fills
                // pages). Serve the faulting page alone; if it is the present one, wake its
                // waiters.
                tracing::debug!(gpa = format_args!("{gpa:#x}"), "page already present");
                let dst = region_host + page * PAGE_BYTES;
                let single = match segment.source {
                    Source::File { file, offset, .. } if !zero => {
                        let src = self.files[file].slice(offset + (gpa - segment.gpa), PAGE_BYTES);
                        // SAFETY: `src` is one readable page of the file mapping.
                        unsafe { self.uffd.copy(dst, src.as_ptr(), PAGE_BYTES) }
                    }
                    _ => self.uffd.zeropage(dst, PAGE_BYTES),
                };
                match single {
                    Ok(_) => {}
                    Err(Errno::EAGAIN) => return Ok(Served::Retry),
                    Err(Errno::EEXIST) => {
                        let _ = self.uffd.wake(dst, PAGE_BYTES);
                    }
                    Err(source) => {
                        return Err(LazyError::Fill {
                            operation,
                            gpa,
                            len_bytes: PAGE_BYTES,
                            source,
                        })
                    }
                }
                self.regions[r].pages[page as usize] = Page::Served;
                return Ok(Served::Done);
            }
            Err(source) => {
                return Err(LazyError::Fill {
                    operation,
                    gpa: start_gpa,
                    len_bytes: len,
                    source,
                })
            }
        }
        self.regions[r].pages[lo as usize..hi as usize].fill(Page::Served);
        let counter = if zero {
            &self.stats.pages_zero
        } else {
            &self.stats.pages_from_file
        };
        LazyStats::add(counter, hi - lo);
        Ok(Served::Done)
    }

    /// Checks chunk `chunk` of file `file` once, before any of it is served.
    fn verify(
        &mut self,
        file: usize,
        chunk: usize,
        offset: u64,
        gpa: u64,
        len_bytes: u64,
        expected: ChunkSum,
    ) -> Result<(), LazyError> {
        if self.verified[file].get(chunk).copied().unwrap_or(true) {
            return Ok(());
        }
        let map = &self.files[file];
        if !expected.matches(map.slice(offset, len_bytes)) {
            return Err(SnapshotError::ChunkChecksum {
                path: map.path.clone(),
                index: chunk,
                gpa,
                len_bytes,
                file_offset: offset,
            }
            .into());
        }
        self.verified[file][chunk] = true;
        LazyStats::add(&self.stats.chunks_verified, 1);
        Ok(())
    }
}
