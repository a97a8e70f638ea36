//! The guest's RAM as the VMM holds it, and releasing ranges the guest gave up.
//!
//! Guest RAM is private anonymous memory (`GuestMemoryMmap::from_ranges`). Releasing a range
//! (`madvise(MADV_DONTNEED)` on its host mapping) frees the host pages at once; the guest reads
//! zeros there afterwards, and the pages count against the VMM's RSS again only when touched.
//! This is what the balloon device calls (through [`balloon::RamReleaser`]) for inflated and
//! reported pages.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

/// Granularity of a release: the guest page size (and the host's, on x86-64).
pub const RELEASE_ALIGN_BYTES: u64 = 4096;

/// Why a range cannot be released. The guest chose the range, so none of these is a VMM bug.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReleaseError {
    /// Start or length is not a multiple of 4 KiB.
    #[error("cannot release {len_bytes:#x} bytes at guest address {gpa:#x}: not 4 KiB aligned")]
    Unaligned {
        /// Guest physical start.
        gpa: u64,
        /// Length.
        len_bytes: u64,
    },
    /// The range is not entirely inside one RAM region.
    #[error("cannot release {len_bytes:#x} bytes at guest address {gpa:#x}: not inside guest RAM")]
    OutOfRange {
        /// Guest physical start.
        gpa: u64,
        /// Length.
        len_bytes: u64,
    },
    /// `madvise` failed.
    #[error("madvise(MADV_DONTNEED) of {len_bytes:#x} bytes at guest address {gpa:#x} failed")]
    Madvise {
        /// Guest physical start.
        gpa: u64,
        /// Length.
        len_bytes: u64,
        /// errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// Remapping anonymous memory over a snapshot-file-backed range failed.
    #[error(
        "remapping anonymous memory over {len_bytes:#x} bytes at guest address {gpa:#x} failed"
    )]
    Remap {
        /// Guest physical start.
        gpa: u64,
        /// Length.
        len_bytes: u64,
        /// errno.
        #[source]
        source: nix::errno::Errno,
    },
}

impl ReleaseError {
    /// A [`ReleaseError::Remap`] with the current `errno`.
    fn remap(gpa: u64, len_bytes: u64) -> Self {
        ReleaseError::Remap {
            gpa,
            len_bytes,
            source: nix::errno::Errno::last(),
        }
    }
}

impl From<ReleaseError> for std::io::Error {
    fn from(err: ReleaseError) -> Self {
        let kind = match &err {
            ReleaseError::Madvise { source, .. } | ReleaseError::Remap { source, .. } => {
                std::io::Error::from(*source).kind()
            }
            _ => std::io::ErrorKind::InvalidInput,
        };
        std::io::Error::new(kind, err)
    }
}

/// Something that fills guest memory on demand and must live exactly as long as the mappings
/// (lazy restore's page fault handler); [`GuestRam`] drops it before unmapping.
pub trait MemoryBacking: Send + Sync + std::fmt::Debug {
    /// What it has done so far, as JSON (for `GET /`).
    fn status(&self) -> serde_json::Value;
}

/// Guest RAM: the mappings plus release accounting. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct GuestRam {
    /// Declared before `mem`: stopped before the memory it serves is unmapped.
    backing: Option<std::sync::Arc<dyn MemoryBacking>>,
    mem: GuestMemoryMmap,
    released_bytes: AtomicU64,
    /// Parts of guest memory are private mappings of a snapshot's memory file: releasing
    /// remaps anonymous memory (`MADV_DONTNEED` would bring back the file's old contents).
    file_backed: bool,
    /// The guest ranges `(gpa, len_bytes)`, sorted, that a restored snapshot holds data for
    /// (mapped from its memory file, or served lazily); empty for a booted VM.
    snapshot_data: Vec<(u64, u64)>,
}

/// How the snapshot writer tells the pages the guest never touched: they read zero and are left
/// out of the memory file.
#[derive(Clone, Copy, Debug)]
pub enum Residency<'a> {
    /// It cannot: every page may hold data. Lazily filled memory: a page not served yet still
    /// waits in the parent snapshot's memory file.
    Unknown,
    /// This process's page tables (`/proc/self/pagemap`): a page neither mapped nor swapped out
    /// was never touched. Not `mincore`: that calls a swapped-out page absent, and in a private
    /// file mapping it reports whether the file's page is in the host page cache, so a clone's
    /// pages evicted from the cache would have been dropped. Pages in `file_data`, guest ranges
    /// `(gpa, len_bytes)` (sorted) privately mapped from a snapshot's memory file, hold the
    /// file's data even when this process never mapped them, so they always count as touched.
    PageTables {
        /// Guest ranges backed by snapshot data.
        file_data: &'a [(u64, u64)],
    },
}

/// Allocates anonymous guest memory for `ranges` (guest address, bytes) and marks it
/// `MADV_DONTDUMP`: a VMM core dump then holds the VMM, not the guest's data (large, and possibly
/// secret). The distinct flag also keeps the kernel from merging guest memory with a neighbouring
/// anonymous mapping (a thread stack, a malloc arena), so each region stays one mapping of its
/// own size in `/proc/PID/smaps`, where tests and benchmarks find it.
pub fn allocate_guest_memory(
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    let mem = GuestMemoryMmap::from_ranges(ranges)?;
    for region in mem.iter() {
        // SAFETY: the range is exactly the mapping the region owns; MADV_DONTDUMP only changes
        // whether core dumps include it.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_DONTDUMP,
            )
        };
        if rc != 0 {
            tracing::warn!(
                err = %std::io::Error::last_os_error(),
                gpa = region.start_addr().0,
                "madvise(MADV_DONTDUMP) of guest memory failed; core dumps would include it"
            );
        }
    }
    Ok(mem)
}

fn sorted(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    ranges
}

impl GuestRam {
    /// Wraps the guest's memory.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        Self {
            backing: None,
            mem,
            released_bytes: AtomicU64::new(0),
            file_backed: false,
            snapshot_data: Vec::new(),
        }
    }

    /// Wraps anonymous guest memory that `backing` fills on first touch (lazy restore), with
    /// the data for `snapshot_data`, guest ranges `(gpa, len_bytes)`. Releasing stays
    /// `MADV_DONTNEED`: the backing sees it and serves zeros afterwards.
    pub fn lazily_filled(
        mem: GuestMemoryMmap,
        backing: std::sync::Arc<dyn MemoryBacking>,
        snapshot_data: Vec<(u64, u64)>,
    ) -> Self {
        Self {
            backing: Some(backing),
            snapshot_data: sorted(snapshot_data),
            ..Self::new(mem)
        }
    }

    /// Whether pages are filled on first touch (a page not resident may hold data).
    pub fn is_lazily_filled(&self) -> bool {
        self.backing.is_some()
    }

    /// The on-demand backing's status, if memory is filled lazily.
    pub fn backing_status(&self) -> Option<serde_json::Value> {
        self.backing.as_ref().map(|b| b.status())
    }

    /// Wraps guest memory restored from a snapshot, where ranges are private file mappings;
    /// `snapshot_data` are the guest ranges `(gpa, len_bytes)` that hold the snapshots' kept
    /// pages (holes between them read zero and need not be listed).
    pub fn file_backed(mem: GuestMemoryMmap, snapshot_data: Vec<(u64, u64)>) -> Self {
        Self {
            file_backed: true,
            snapshot_data: sorted(snapshot_data),
            ..Self::new(mem)
        }
    }

    /// The guest ranges `(gpa, len_bytes)`, sorted, that the restored snapshot holds data for;
    /// empty for a booted VM.
    pub fn snapshot_data(&self) -> &[(u64, u64)] {
        &self.snapshot_data
    }

    /// How a snapshot of this memory tells never-touched pages.
    pub fn residency(&self) -> Residency<'_> {
        if self.is_lazily_filled() {
            Residency::Unknown
        } else {
            Residency::PageTables {
                file_data: &self.snapshot_data,
            }
        }
    }

    /// The guest memory mappings.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// `(guest physical start, length in bytes)` of each RAM region, in address order.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        let mut regions: Vec<_> = self
            .mem
            .iter()
            .map(|region| (region.start_addr().0, region.len()))
            .collect();
        regions.sort_unstable();
        regions
    }

    /// The RAM regions as the balloon's page-state map describes guest RAM.
    pub fn page_layout(&self) -> Vec<balloon::GuestRamRegion> {
        self.regions()
            .into_iter()
            .map(|(start_gpa, len_bytes)| balloon::GuestRamRegion {
                start_gpa,
                len_bytes,
            })
            .collect()
    }

    /// Bytes released since boot (counting a range released twice twice).
    pub fn released_bytes(&self) -> u64 {
        self.released_bytes.load(Ordering::Relaxed)
    }

    /// Gives the host pages behind `gpa..gpa + len_bytes` back to the host; the guest reads
    /// zeros there afterwards. The range must be 4 KiB aligned and lie inside one RAM region. A
    /// zero length does nothing.
    pub fn release(&self, gpa: u64, len_bytes: u64) -> Result<(), ReleaseError> {
        if (gpa | len_bytes) & (RELEASE_ALIGN_BYTES - 1) != 0 {
            return Err(ReleaseError::Unaligned { gpa, len_bytes });
        }
        if len_bytes == 0 {
            return Ok(());
        }
        let out_of_range = ReleaseError::OutOfRange { gpa, len_bytes };
        let end = gpa.checked_add(len_bytes).ok_or(out_of_range.clone())?;
        let region = self
            .mem
            .find_region(GuestAddress(gpa))
            .ok_or(out_of_range.clone())?;
        let region_start = region.start_addr().0;
        let region_end = region_start + region.len();
        if end > region_end {
            return Err(out_of_range);
        }
        let host = region
            .get_host_address(MemoryRegionAddress(gpa - region_start))
            .map_err(|_| out_of_range)?;
        // SAFETY: `host..host + len_bytes` lies inside the region's live mapping (checked
        // above), which `self.mem` keeps mapped. MADV_DONTNEED on private anonymous memory only
        // drops the pages' contents (they read as zero afterwards); it cannot unmap or change
        // protection, so no Rust reference into guest memory is invalidated — the VMM accesses
        // guest memory only through volatile accessors, and the guest gave these pages up.
        let rc = if self.file_backed {
            // SAFETY: as above, the range lies inside the region's live mapping; MAP_FIXED
            // replaces exactly those pages with fresh anonymous zero pages (the region is still
            // unmapped as a whole on drop), and nothing holds a reference into them.
            let addr = unsafe {
                libc::mmap(
                    host.cast::<libc::c_void>(),
                    len_bytes as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(ReleaseError::remap(gpa, len_bytes));
            }
            0
        } else {
            // SAFETY: see above.
            unsafe {
                libc::madvise(
                    host.cast::<libc::c_void>(),
                    len_bytes as usize,
                    libc::MADV_DONTNEED,
                )
            }
        };
        if rc != 0 {
            return Err(ReleaseError::Madvise {
                gpa,
                len_bytes,
                source: nix::errno::Errno::last(),
            });
        }
        self.released_bytes.fetch_add(len_bytes, Ordering::Relaxed);
        Ok(())
    }
}

impl balloon::RamReleaser for GuestRam {
    fn release(&self, gpa: u64, len_bytes: u64) -> std::io::Result<()> {
        GuestRam::release(self, gpa, len_bytes).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn guest_memory_is_left_out_of_core_dumps_and_stays_one_mapping() {
        let mem = allocate_guest_memory(&[(GuestAddress(0), 64 * MIB as usize)]).unwrap();
        let start = mem.iter().next().unwrap().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let header = lines
            .by_ref()
            .find(|l| l.starts_with(&format!("{start:x}-")))
            .expect("the guest memory mapping is in smaps");
        let end = usize::from_str_radix(header.split(['-', ' ']).nth(1).unwrap(), 16).unwrap();
        assert_eq!(end - start, 64 * MIB as usize, "{header}");
        let flags = lines.find(|l| l.starts_with("VmFlags:")).unwrap();
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    fn ram() -> GuestRam {
        GuestRam::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), MIB as usize),
                (GuestAddress(4 * MIB), 2 * MIB as usize),
            ])
            .unwrap(),
        )
    }

    /// How many of the pages of `gpa..gpa + len` are resident in the host mapping.
    fn resident_pages(ram: &GuestRam, gpa: u64, len: u64) -> usize {
        let region = ram.memory().find_region(GuestAddress(gpa)).unwrap();
        let host = region
            .get_host_address(MemoryRegionAddress(gpa - region.start_addr().0))
            .unwrap();
        let mut vec = vec![0u8; (len / RELEASE_ALIGN_BYTES) as usize];
        // SAFETY: the range is mapped (inside the region) and `vec` has one byte per page.
        let rc = unsafe { libc::mincore(host.cast(), len as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn released_pages_read_zero_and_leave_the_host() {
        let ram = ram();
        let mem = ram.memory();
        let start = 4 * MIB + 0x10000;
        let len = 16 * RELEASE_ALIGN_BYTES;
        mem.write_slice(
            &vec![0xab; (len + 2 * RELEASE_ALIGN_BYTES) as usize],
            GuestAddress(start - RELEASE_ALIGN_BYTES),
        )
        .unwrap();
        assert_eq!(resident_pages(&ram, start, len), 16);
        ram.release(start, len).unwrap();
        assert_eq!(resident_pages(&ram, start, len), 0);
        let mut buf = vec![0xffu8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(start)).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        // The neighbouring pages keep their contents.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(start - 1)).unwrap(), 0xab);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(start + len)).unwrap(), 0xab);
        assert_eq!(ram.released_bytes(), len);
        // A region's last page can be released.
        ram.release(MIB - RELEASE_ALIGN_BYTES, RELEASE_ALIGN_BYTES)
            .unwrap();
        ram.release(0, 0).unwrap();
    }

    #[test]
    fn bad_ranges_are_refused_without_touching_memory() {
        let ram = ram();
        ram.memory()
            .write_obj(0x5au8, GuestAddress(MIB - 1))
            .unwrap();
        for (gpa, len) in [
            (1, RELEASE_ALIGN_BYTES),
            (0, 100),
            (MIB - RELEASE_ALIGN_BYTES, 2 * RELEASE_ALIGN_BYTES), // crosses a region's end
            (2 * MIB, RELEASE_ALIGN_BYTES),                       // in the hole
            (6 * MIB, RELEASE_ALIGN_BYTES),                       // past the end
            (!0xfff, RELEASE_ALIGN_BYTES),                        // wraps
            (4 * MIB, !0xfff),
        ] {
            let err = ram.release(gpa, len).unwrap_err();
            let io: std::io::Error = err.clone().into();
            assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput, "{err}");
        }
        assert_eq!(
            ram.memory().read_obj::<u8>(GuestAddress(MIB - 1)).unwrap(),
            0x5a
        );
        assert_eq!(ram.released_bytes(), 0);
        assert_eq!(ram.regions(), [(0, MIB), (4 * MIB, 2 * MIB)]);
    }
}
