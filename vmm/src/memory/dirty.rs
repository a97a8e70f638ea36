//! Dirty page tracking: KVM's dirty log turns pages the guest wrote back into
//! [`PageState::Live`](balloon::PageState::Live) in the balloon's page-state map.
//!
//! The balloon device marks pages Inflated, Reported or Hinted when the guest gives them up, but
//! only the guest knows when it uses them again. A page the guest writes afterwards holds data
//! again (ARCHITECTURE.md, "Page classes"), so a snapshot that trusted the stale state would lose
//! it. Memory slots are registered with `KVM_MEM_LOG_DIRTY_PAGES` (see
//! [`dirty_logging_wanted`]) and [`DirtyTracker::sync`] fetches each slot's bitmap with
//! `KVM_GET_DIRTY_LOG` and feeds it to
//! [`PageStateMap::mark_written_bitmap`](balloon::PageStateMap::mark_written_bitmap).
//!
//! # Ordering: why a page written after it was given up always ends up Live
//!
//! `KVM_GET_DIRTY_LOG` atomically fetches and clears a slot's bitmap (and first flushes the
//! vCPUs' page-modification logs, so every write a vCPU completed before the ioctl is in it).
//! The device marks pages under the map's lock; [`DirtyTracker::sync`] applies a fetched bitmap
//! under the same lock, after the fetch. Take a page the device marks at time `T` (under the
//! lock) and a guest write to it at `W`:
//!
//! - `W > T` (the unsafe direction, must end Live): the write sets the page's dirty bit after
//!   `T`. That bit is cleared only by a fetch at some `F >= W > T`, and every fetch is applied
//!   after it happened, so after `T`: the page ends Live. A fetched bitmap is always applied,
//!   even when another slot fails (see [`DirtyTracker::sync`]), so no bit is dropped.
//! - `W < T` (written, then given up; should end Inflated/Reported/Hinted): if the bit is
//!   fetched before `T` and applied before `T`, the page ends in the device's state. If the
//!   fetch, or only the apply, comes after `T`, the page ends Live: the safe direction (a
//!   snapshot stores a page it could have skipped).
//!
//! For `W > T` to be the only way the guest reuses a page, the device must mark before it gives
//! the page back: reporting_vq marks (and releases) before returning the chain, and hinted pages
//! stay allocated in the guest until the host sends DONE; inflated pages are the guest's again
//! only after a deflate.
//!
//! How often the safe-but-wasteful case happens depends on the guest. Free page reporting
//! reports blocks about 2 s after they were freed, so the periodic sync (every
//! [`DIRTY_SYNC_INTERVAL`]) usually fetches the last writes before the report. Pages the guest
//! *allocates* to hand them over (balloon inflate, free page hinting) are zeroed by the
//! allocator when the guest runs with `init_on_alloc=1` (Debian's default), milliseconds before
//! the device marks them. So the balloon syncs under the map lock right before it marks pages
//! (`balloon::WriteTracker`, implemented here through [`DirtyTracker::sync_locked`]): those
//! earlier writes are applied first and the pages keep the device's state.
//!
//! # Writes by the VMM
//!
//! KVM's dirty log holds only vCPU writes. The VMM's own writes into guest memory (virtio used
//! rings, device-writable buffers such as the balloon's statistics answer) go through the
//! `GuestMemoryMmap` accessors and are not in it. That is safe for the page-state map today:
//! the VMM writes only into rings and buffers the guest allocated and published to the device,
//! and the guest writes a ring or a buffer's descriptor page before it publishes it, so such a
//! page was in use (Live, or marked Live by the guest's own write after it reused the page)
//! before the VMM wrote it; and a page the guest gave up is not a buffer the guest offers to a
//! device. Devices that write into pages the guest did not touch first (a block device reading
//! into a freshly reported page) must mark what they write with
//! [`PageStateMap::mark_written`](balloon::PageStateMap::mark_written).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use balloon::{GuestRamRegion, PageStateError, PageStateMap};
use kvm_ioctls::VmFd;
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest page size KVM's dirty bitmaps count in, in bytes.
pub const DIRTY_PAGE_SIZE_BYTES: u64 = 4096;

/// How often the VM's event loop brings the page-state map up to date with the dirty log.
///
/// Shorter than free page reporting's ~2 s delay, so writes made before the guest freed a block
/// are usually fetched before the block is reported (see the module documentation).
///
/// Correctness does not depend on it (every reader syncs first); it trades write-protection
/// faults for fewer pages turned Live by writes that preceded the report. Measured in the kvm
/// rig (`vmm/tests/rig/dirty.sh cost`, 512 MiB guest, nested KVM under TCG where each exit is
/// far dearer than on hardware): rewriting 200 MiB 3 times took 1.1 s without logging, 1.3-1.4 s
/// with logging but no periodic sync, and 18-22 s with a sync every second. A sync of 512 MiB
/// itself took 0.1-11 ms (about 3 ms on average while the guest wrote).
pub const DIRTY_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Environment variable that overrides when dirty logging is on: `always` (also without a
/// balloon that reports or hints; for measuring its cost) or `auto` (the default).
pub const DIRTY_LOG_ENV: &str = "VMM_DIRTY_LOG";

/// Environment variable that overrides [`DIRTY_SYNC_INTERVAL`], in milliseconds (at least 10;
/// for measuring what periodic syncs cost).
pub const DIRTY_SYNC_MS_ENV: &str = "VMM_DIRTY_SYNC_MS";

/// The event loop's sync interval: [`DIRTY_SYNC_INTERVAL`] unless [`DIRTY_SYNC_MS_ENV`] holds a
/// number of milliseconds >= 10.
pub fn dirty_sync_interval() -> Duration {
    std::env::var(DIRTY_SYNC_MS_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms >= 10)
        .map_or(DIRTY_SYNC_INTERVAL, Duration::from_millis)
}

/// One KVM memory slot: a guest RAM region and the host mapping behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Length in bytes.
    pub memory_size: u64,
    /// Host virtual address of the first byte.
    pub userspace_addr: u64,
}

impl MemorySlot {
    /// The page frames the slot covers.
    pub fn pfns(&self) -> std::ops::Range<u64> {
        let first = self.guest_phys_addr / DIRTY_PAGE_SIZE_BYTES;
        first..first + self.memory_size / DIRTY_PAGE_SIZE_BYTES
    }
}

/// The memory slots of `mem`: slot `i` is the `i`-th region in address order (the order
/// `GuestMemoryMmap` keeps its regions in).
pub fn memory_slots(mem: &GuestMemoryMmap) -> Vec<MemorySlot> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| MemorySlot {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        })
        .collect()
}

/// Whether the VM's memory slots log dirty pages.
///
/// On when the balloon reports or hints free pages: only then can the page-state map hold pages
/// the guest may reuse without telling the device. Dirty logging is not free: KVM maps a logged
/// slot with 4 KiB pages only (no huge pages in the second-level page tables, so more TLB
/// misses), and every page written since the last sync takes a write-protection fault on its
/// next write after each sync. In the kvm rig, the guest's first write of 200 MiB took 9-13 s
/// instead of 1.3-1.4 s (51,200 4 KiB faults instead of 100 2 MiB ones; the rig's host has THP
/// on), so it is off unless the balloon needs it. `VMM_DIRTY_LOG=always` turns it on for every
/// VM (to measure it).
pub fn dirty_logging_wanted(balloon: Option<&balloon::BalloonConfig>) -> bool {
    let always = std::env::var(DIRTY_LOG_ENV).is_ok_and(|v| v == "always");
    always || balloon.is_some_and(|b| b.free_page_reporting || b.free_page_hinting)
}

/// Where dirty bitmaps come from: KVM ([`VmFd`]) or, in tests, a script.
pub trait DirtyLog: Send + Sync {
    /// Fetches and clears the dirty bitmap of `slot` (`memory_size` bytes): bit `i` (word
    /// `i / 64`, bit `i % 64`) set means page `i` of the slot was written since the last fetch.
    fn get_dirty_log(&self, slot: u32, memory_size: usize) -> Result<Vec<u64>, kvm_ioctls::Error>;
}

impl DirtyLog for VmFd {
    fn get_dirty_log(&self, slot: u32, memory_size: usize) -> Result<Vec<u64>, kvm_ioctls::Error> {
        VmFd::get_dirty_log(self, slot, memory_size)
    }
}

/// Errors of dirty tracking. Each names the slot and what failed.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// A memory slot is not one region of the page-state map (a VMM bug: both come from the
    /// same guest memory).
    #[error(
        "memory slot {slot} (guest {guest_phys_addr:#x}, {memory_size:#x} bytes) is not a region of the page-state map"
    )]
    SlotNotInMap {
        /// KVM slot number.
        slot: u32,
        /// Its guest physical start.
        guest_phys_addr: u64,
        /// Its length.
        memory_size: u64,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM failed to get the dirty log of memory slot {slot}")]
    GetDirtyLog {
        /// KVM slot number.
        slot: u32,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The fetched bitmap cannot be applied to the page-state map.
    #[error("cannot mark the pages written in memory slot {slot} live in the page-state map")]
    MarkWritten {
        /// KVM slot number.
        slot: u32,
        /// Why.
        #[source]
        source: PageStateError,
    },
}

/// What dirty tracking has done so far, for `GET /` (`memory.dirty_log`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirtyTrackerStats {
    /// Completed [`DirtyTracker::sync`] calls.
    pub syncs: u64,
    /// Failed ones.
    pub sync_errors: u64,
    /// Dirty bits fetched (a page written between two syncs counts once per sync).
    pub dirty_pages_seen: u64,
    /// Pages that were Inflated, Reported or Hinted and became Live.
    pub pages_made_live: u64,
    /// Duration of the last sync, in microseconds.
    pub last_sync_us: u64,
    /// Longest sync, in microseconds.
    pub max_sync_us: u64,
    /// Time spent in syncs in total, in microseconds.
    pub total_sync_us: u64,
}

#[derive(Debug, Default)]
struct Counters {
    syncs: AtomicU64,
    sync_errors: AtomicU64,
    dirty_pages_seen: AtomicU64,
    pages_made_live: AtomicU64,
    last_sync_us: AtomicU64,
    max_sync_us: AtomicU64,
    total_sync_us: AtomicU64,
}

/// Feeds KVM's dirty log into the balloon's page-state map. Shared (`Arc`) between the VM's
/// event loop (periodic syncs), the API (a sync before balloon requests, so `GET /balloon`
/// counts right) and, later, the snapshot writer. Concurrent syncs are fine: each fetch clears
/// what it returns and each returned bitmap is applied (see the module documentation).
pub struct DirtyTracker {
    log: Arc<dyn DirtyLog>,
    slots: Vec<MemorySlot>,
    page_states: Arc<Mutex<PageStateMap>>,
    counters: Counters,
    /// Also collects every fetched bitmap, for diff layers (see [`super::ChangedPages`]).
    changed: Option<Arc<super::ChangedPages>>,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("slots", &self.slots)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The balloon syncs through this right before it marks pages free.
impl balloon::WriteTracker for DirtyTracker {
    fn sync_into(
        &self,
        map: &mut PageStateMap,
    ) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.sync_locked(map)?)
    }
}

impl DirtyTracker {
    /// A tracker of `slots` (registered with `KVM_MEM_LOG_DIRTY_PAGES` in `log`'s VM) that
    /// updates `page_states`. Every slot must be exactly one region of the map.
    pub fn new(
        log: Arc<dyn DirtyLog>,
        slots: Vec<MemorySlot>,
        page_states: Arc<Mutex<PageStateMap>>,
    ) -> Result<Self, DirtyLogError> {
        {
            let layout = lock(&page_states).layout();
            for s in &slots {
                let region = GuestRamRegion {
                    start_gpa: s.guest_phys_addr,
                    len_bytes: s.memory_size,
                };
                if !layout.contains(&region) {
                    return Err(DirtyLogError::SlotNotInMap {
                        slot: s.slot,
                        guest_phys_addr: s.guest_phys_addr,
                        memory_size: s.memory_size,
                    });
                }
            }
        }
        Ok(Self {
            log,
            slots,
            page_states,
            counters: Counters::default(),
            changed: None,
        })
    }

    /// Also ORs every fetched bitmap into `changed` (pages changed since the last snapshot).
    pub fn with_changed_pages(mut self, changed: Arc<super::ChangedPages>) -> Self {
        self.changed = Some(changed);
        self
    }

    /// The slots tracked.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// Fetches (and clears) KVM's dirty log of every slot and marks every page written since
    /// the previous sync [`Live`](balloon::PageState::Live) in the page-state map. Returns how
    /// many pages changed state (were Inflated, Reported or Hinted).
    ///
    /// For the snapshot writer: pause the vCPUs first, then sync; the map then accounts for
    /// every vCPU write up to the pause. If a slot fails, the others are still synced (a
    /// fetched bitmap is never dropped) and the first error is returned; the failed slot's dirty
    /// bits stay in KVM for the next sync.
    pub fn sync(&self) -> Result<u64, DirtyLogError> {
        // Applied after the fetch, under the lock the device marks under: see the module
        // documentation for why this order keeps every later write.
        self.sync_with(|first_pfn, nr_pages, bitmap| {
            lock(&self.page_states).mark_written_bitmap(first_pfn, nr_pages, bitmap)
        })
    }

    /// Like [`DirtyTracker::sync`], into `map`: the tracker's page-state map, which the caller
    /// has locked. This is the hook for a device that is about to mark pages Inflated, Reported
    /// or Hinted: syncing under the same lock hold right before marking applies every write the
    /// guest made before it handed the pages over (allocator zeroing with `init_on_alloc=1`)
    /// before the mark, so those pages keep the device's state instead of turning Live later.
    pub fn sync_locked(&self, map: &mut PageStateMap) -> Result<u64, DirtyLogError> {
        self.sync_with(|first_pfn, nr_pages, bitmap| {
            map.mark_written_bitmap(first_pfn, nr_pages, bitmap)
        })
    }

    /// Fetches each slot's bitmap and hands it to `apply(first_pfn, nr_pages, bitmap)`; keeps
    /// the statistics.
    fn sync_with<F>(&self, mut apply: F) -> Result<u64, DirtyLogError>
    where
        F: FnMut(u64, u64, &[u64]) -> Result<u64, PageStateError>,
    {
        let started = Instant::now();
        let mut made_live = 0;
        let mut seen = 0;
        let mut first_error = None;
        for s in &self.slots {
            let bitmap = match self.log.get_dirty_log(s.slot, s.memory_size as usize) {
                Ok(bitmap) => bitmap,
                Err(source) => {
                    first_error.get_or_insert(DirtyLogError::GetDirtyLog {
                        slot: s.slot,
                        source,
                    });
                    continue;
                }
            };
            let nr_pages = s.memory_size / DIRTY_PAGE_SIZE_BYTES;
            if let Some(changed) = &self.changed {
                changed.or_bitmap(s.pfns().start, &bitmap);
            }
            let dirty = count_dirty(&bitmap, nr_pages);
            if dirty == 0 {
                continue;
            }
            seen += dirty;
            match apply(s.pfns().start, nr_pages, &bitmap) {
                Ok(changed) => made_live += changed,
                Err(source) => {
                    first_error.get_or_insert(DirtyLogError::MarkWritten {
                        slot: s.slot,
                        source,
                    });
                }
            }
        }
        let us = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        let c = &self.counters;
        c.dirty_pages_seen.fetch_add(seen, Ordering::Relaxed);
        c.pages_made_live.fetch_add(made_live, Ordering::Relaxed);
        c.last_sync_us.store(us, Ordering::Relaxed);
        c.max_sync_us.fetch_max(us, Ordering::Relaxed);
        c.total_sync_us.fetch_add(us, Ordering::Relaxed);
        match first_error {
            None => {
                c.syncs.fetch_add(1, Ordering::Relaxed);
                if made_live > 0 {
                    tracing::debug!(
                        dirty_pages = seen,
                        pages_made_live = made_live,
                        sync_us = us,
                        "dirty log synced"
                    );
                }
                Ok(made_live)
            }
            Some(err) => {
                c.sync_errors.fetch_add(1, Ordering::Relaxed);
                Err(err)
            }
        }
    }

    /// What the tracker has done so far.
    pub fn stats(&self) -> DirtyTrackerStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirtyTrackerStats {
            syncs: get(&c.syncs),
            sync_errors: get(&c.sync_errors),
            dirty_pages_seen: get(&c.dirty_pages_seen),
            pages_made_live: get(&c.pages_made_live),
            last_sync_us: get(&c.last_sync_us),
            max_sync_us: get(&c.max_sync_us),
            total_sync_us: get(&c.total_sync_us),
        }
    }
}

/// Number of set bits among the first `nr_pages` bits of `bitmap`.
pub fn count_dirty(bitmap: &[u64], nr_pages: u64) -> u64 {
    let full = (nr_pages / 64) as usize;
    let mut n: u64 = bitmap
        .iter()
        .take(full)
        .map(|w| u64::from(w.count_ones()))
        .sum();
    let tail = nr_pages % 64;
    if tail > 0 {
        if let Some(w) = bitmap.get(full) {
            n += u64::from((w & ((1u64 << tail) - 1)).count_ones());
        }
    }
    n
}

/// Locks the map; a poisoned lock still holds a consistent map (every update is one call).
fn lock(map: &Mutex<PageStateMap>) -> std::sync::MutexGuard<'_, PageStateMap> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use balloon::PageState;
    use vm_memory::GuestAddress;

    use super::*;

    const MIB: u64 = 1 << 20;

    type Hook = Box<dyn Fn() + Send + Sync>;

    /// A dirty log that hands out queued bitmaps per slot, and runs a hook inside a fetch.
    #[derive(Default)]
    struct FakeLog {
        bitmaps: Mutex<HashMap<u32, Vec<Vec<u64>>>>,
        fail_slot: Option<u32>,
        on_fetch: Mutex<Option<Hook>>,
    }

    impl FakeLog {
        fn push(&self, slot: u32, bitmap: Vec<u64>) {
            self.bitmaps
                .lock()
                .unwrap()
                .entry(slot)
                .or_default()
                .push(bitmap);
        }
    }

    impl DirtyLog for FakeLog {
        fn get_dirty_log(
            &self,
            slot: u32,
            memory_size: usize,
        ) -> Result<Vec<u64>, kvm_ioctls::Error> {
            if self.fail_slot == Some(slot) {
                return Err(kvm_ioctls::Error::new(libc::ENOENT));
            }
            // Runs once, inside the first fetch after it was set.
            if let Some(hook) = self.on_fetch.lock().unwrap().take() {
                hook();
            }
            let words = (memory_size as u64 / DIRTY_PAGE_SIZE_BYTES).div_ceil(64) as usize;
            let mut queued = self.bitmaps.lock().unwrap();
            let bitmap = queued
                .get_mut(&slot)
                .filter(|q| !q.is_empty())
                .map(|q| q.remove(0))
                .unwrap_or_default();
            let mut out = vec![0; words];
            for (o, b) in out.iter_mut().zip(bitmap) {
                *o = b;
            }
            Ok(out)
        }
    }

    /// Two regions with a hole, like guest RAM around the 32-bit MMIO gap (scaled down).
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 * MIB as usize),
            (GuestAddress(8 * MIB), MIB as usize),
        ])
        .unwrap()
    }

    fn map_of(mem: &GuestMemoryMmap) -> Arc<Mutex<PageStateMap>> {
        let layout: Vec<_> = memory_slots(mem)
            .iter()
            .map(|s| GuestRamRegion {
                start_gpa: s.guest_phys_addr,
                len_bytes: s.memory_size,
            })
            .collect();
        Arc::new(Mutex::new(PageStateMap::new(&layout).unwrap()))
    }

    fn tracker(log: Arc<FakeLog>) -> (DirtyTracker, Arc<Mutex<PageStateMap>>) {
        let mem = mem();
        let map = map_of(&mem);
        (
            DirtyTracker::new(log, memory_slots(&mem), map.clone()).unwrap(),
            map,
        )
    }

    fn state(map: &Mutex<PageStateMap>, pfn: u64) -> PageState {
        map.lock().unwrap().state(pfn).unwrap()
    }

    #[test]
    fn slots_follow_the_regions_in_address_order() {
        let mem = mem();
        let slots = memory_slots(&mem);
        assert_eq!(slots.len(), 2);
        assert_eq!(
            (
                slots[0].slot,
                slots[0].guest_phys_addr,
                slots[0].memory_size
            ),
            (0, 0, 2 * MIB)
        );
        assert_eq!(
            (
                slots[1].slot,
                slots[1].guest_phys_addr,
                slots[1].memory_size
            ),
            (1, 8 * MIB, MIB)
        );
        assert_eq!(slots[1].pfns(), 2048..2304);
        let host = mem.get_host_address(GuestAddress(8 * MIB)).unwrap() as u64;
        assert_eq!(slots[1].userspace_addr, host);
    }

    #[test]
    fn count_dirty_ignores_bits_past_the_slot() {
        assert_eq!(count_dirty(&[], 0), 0);
        assert_eq!(count_dirty(&[u64::MAX, u64::MAX], 128), 128);
        assert_eq!(count_dirty(&[u64::MAX, u64::MAX], 70), 70);
        assert_eq!(count_dirty(&[0b1011, u64::MAX], 3), 2);
        // A short bitmap counts what it has.
        assert_eq!(count_dirty(&[1], 200), 1);
    }

    #[test]
    fn written_pages_become_live_in_the_right_slot() {
        let log = Arc::new(FakeLog::default());
        let (tracker, map) = tracker(log.clone());
        {
            let mut m = map.lock().unwrap();
            m.mark_range(0, 2 * MIB, PageState::Reported).unwrap();
            m.mark_range(8 * MIB, MIB, PageState::Hinted).unwrap();
        }
        // Slot 0: pages 0, 1 and 64; slot 1: its page 3 (pfn 2048 + 3) and its last page.
        log.push(0, vec![0b11, 1]);
        log.push(1, vec![1 << 3, 0, 0, 1 << 63]);
        assert_eq!(tracker.sync().unwrap(), 5);
        for pfn in [0, 1, 64, 2051, 2303] {
            assert_eq!(state(&map, pfn), PageState::Live, "pfn {pfn}");
        }
        for pfn in [2, 63, 65, 2048, 2302] {
            assert_ne!(state(&map, pfn), PageState::Live, "pfn {pfn}");
        }
        // The same bits again change nothing; an empty log changes nothing.
        log.push(0, vec![0b11]);
        assert_eq!(tracker.sync().unwrap(), 0);
        assert_eq!(tracker.sync().unwrap(), 0);
        let stats = tracker.stats();
        assert_eq!(stats.syncs, 3);
        assert_eq!(stats.dirty_pages_seen, 7);
        assert_eq!(stats.pages_made_live, 5);
        let counts = map.lock().unwrap().count_by_state();
        assert_eq!(counts.live_pages, 5);
    }

    /// The device marks a page at T while a sync is between its fetch (which returned the
    /// page's bit from a write before T) and its apply: the page ends Live (the safe direction).
    /// A write after the mark shows up in the next fetch and also ends Live.
    #[test]
    fn a_mark_between_fetch_and_apply_ends_live() {
        let log = Arc::new(FakeLog::default());
        let (tracker, map) = tracker(log.clone());
        let device_map = map.clone();
        *log.on_fetch.lock().unwrap() = Some(Box::new(move || {
            device_map
                .lock()
                .unwrap()
                .mark_range(
                    10 * DIRTY_PAGE_SIZE_BYTES,
                    DIRTY_PAGE_SIZE_BYTES,
                    PageState::Reported,
                )
                .unwrap();
        }));
        log.push(0, vec![1 << 10]);
        assert_eq!(tracker.sync().unwrap(), 1);
        assert_eq!(state(&map, 10), PageState::Live);

        // Written, fetched, then reported: stays Reported until written again.
        log.push(0, vec![1 << 11]);
        tracker.sync().unwrap();
        map.lock()
            .unwrap()
            .mark_range(
                11 * DIRTY_PAGE_SIZE_BYTES,
                DIRTY_PAGE_SIZE_BYTES,
                PageState::Reported,
            )
            .unwrap();
        tracker.sync().unwrap();
        assert_eq!(state(&map, 11), PageState::Reported);
        log.push(0, vec![1 << 11]);
        assert_eq!(tracker.sync().unwrap(), 1);
        assert_eq!(state(&map, 11), PageState::Live);
    }

    /// The hook a device would call under the map lock right before marking: a page written
    /// before it was handed over keeps the device's state; one written after turns Live.
    #[test]
    fn a_sync_right_before_marking_keeps_pages_written_before() {
        let log = Arc::new(FakeLog::default());
        let (tracker, map) = tracker(log.clone());
        // The guest's allocator zeroes pages 20..24, then the guest hints them.
        log.push(0, vec![0b1111 << 20]);
        {
            let mut m = map.lock().unwrap();
            assert_eq!(tracker.sync_locked(&mut m).unwrap(), 0);
            m.mark_range(
                20 * DIRTY_PAGE_SIZE_BYTES,
                4 * DIRTY_PAGE_SIZE_BYTES,
                PageState::Hinted,
            )
            .unwrap();
        }
        assert_eq!(tracker.sync().unwrap(), 0);
        assert_eq!(state(&map, 20), PageState::Hinted);
        // The guest writes page 21 after the hint.
        log.push(0, vec![1 << 21]);
        assert_eq!(tracker.sync().unwrap(), 1);
        assert_eq!(state(&map, 20), PageState::Hinted);
        assert_eq!(state(&map, 21), PageState::Live);
        assert_eq!(tracker.stats().dirty_pages_seen, 5);
    }

    #[test]
    fn a_failing_slot_does_not_drop_the_others_bits() {
        let log = Arc::new(FakeLog {
            fail_slot: Some(0),
            ..FakeLog::default()
        });
        let (tracker, map) = tracker(log.clone());
        map.lock()
            .unwrap()
            .mark_range(8 * MIB, MIB, PageState::Inflated)
            .unwrap();
        log.push(1, vec![0b111]);
        let err = tracker.sync().unwrap_err();
        assert!(matches!(err, DirtyLogError::GetDirtyLog { slot: 0, .. }));
        assert_eq!(
            err.to_string(),
            "KVM failed to get the dirty log of memory slot 0"
        );
        assert_eq!(map.lock().unwrap().count_by_state().live_pages, 512 + 3);
        let stats = tracker.stats();
        assert_eq!((stats.syncs, stats.sync_errors), (0, 1));
        assert_eq!(stats.pages_made_live, 3);
    }

    #[test]
    fn slots_must_match_the_map() {
        let mem = mem();
        let map = Arc::new(Mutex::new(PageStateMap::with_ram_size(2 * MIB).unwrap()));
        let err =
            DirtyTracker::new(Arc::new(FakeLog::default()), memory_slots(&mem), map).unwrap_err();
        assert!(matches!(err, DirtyLogError::SlotNotInMap { slot: 1, .. }));
        assert!(err.to_string().contains("memory slot 1"), "{err}");
    }

    #[test]
    fn logging_is_wanted_with_reporting_or_hinting() {
        let config = |free_page_reporting, free_page_hinting| balloon::BalloonConfig {
            amount_mib: 0,
            deflate_on_oom: true,
            stats_polling_interval_s: 0,
            free_page_reporting,
            free_page_hinting,
        };
        if std::env::var(DIRTY_LOG_ENV).is_ok() {
            return;
        }
        assert!(!dirty_logging_wanted(None));
        assert!(!dirty_logging_wanted(Some(&config(false, false))));
        assert!(dirty_logging_wanted(Some(&config(true, false))));
        assert!(dirty_logging_wanted(Some(&config(false, true))));
    }
}
