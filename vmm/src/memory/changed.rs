//! Pages changed since the last snapshot (or the restore), for diff layers.
//!
//! [`ChangedPages`] accumulates every dirty bitmap the [`super::DirtyTracker`] fetches from KVM
//! (vCPU writes) and every write the VMM's device emulation reports through
//! [`virtio_device::GuestWriteLog`] (KVM's log misses those). A layered snapshot takes the set
//! ([`ChangedPages::take`]) while the VM is paused; a failed snapshot gives it back
//! ([`ChangedPages::merge`]) so no change is ever lost.

use std::sync::Mutex;

use super::dirty::{MemorySlot, DIRTY_PAGE_SIZE_BYTES};

/// One slot's bitmap of changed pages.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SlotBits {
    first_pfn: u64,
    nr_pages: u64,
    bits: Vec<u64>,
}

/// A set of changed guest pages: one bitmap per RAM region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangedSet {
    slots: Vec<SlotBits>,
}

impl ChangedSet {
    /// An empty set over `slots`.
    pub fn new(slots: &[MemorySlot]) -> Self {
        Self {
            slots: slots
                .iter()
                .map(|s| {
                    let nr_pages = s.memory_size / DIRTY_PAGE_SIZE_BYTES;
                    SlotBits {
                        first_pfn: s.pfns().start,
                        nr_pages,
                        bits: vec![0; nr_pages.div_ceil(64) as usize],
                    }
                })
                .collect(),
        }
    }

    /// Whether page frame `pfn` changed.
    pub fn contains(&self, pfn: u64) -> bool {
        self.slots.iter().any(|s| {
            pfn >= s.first_pfn && pfn < s.first_pfn + s.nr_pages && {
                let i = pfn - s.first_pfn;
                s.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
            }
        })
    }

    /// Marks every page touched by `len_bytes` bytes at `gpa` (parts outside RAM are ignored).
    pub fn insert_range(&mut self, gpa: u64, len_bytes: u64) {
        if len_bytes == 0 {
            return;
        }
        let first = gpa / DIRTY_PAGE_SIZE_BYTES;
        let last = gpa.saturating_add(len_bytes - 1) / DIRTY_PAGE_SIZE_BYTES;
        for s in &mut self.slots {
            let lo = first.max(s.first_pfn);
            if s.nr_pages == 0 || lo > last.min(s.first_pfn + s.nr_pages - 1) {
                continue;
            }
            for pfn in lo..=last.min(s.first_pfn + s.nr_pages - 1) {
                let i = pfn - s.first_pfn;
                s.bits[(i / 64) as usize] |= 1 << (i % 64);
            }
        }
    }

    /// ORs a KVM dirty bitmap of the slot starting at `first_pfn` into the set.
    pub fn or_bitmap(&mut self, first_pfn: u64, bitmap: &[u64]) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.first_pfn == first_pfn) {
            for (dst, src) in s.bits.iter_mut().zip(bitmap) {
                *dst |= *src;
            }
        }
    }

    /// Adds every page of `other` (same layout) to the set.
    pub fn merge(&mut self, other: &ChangedSet) {
        for s in &other.slots {
            self.or_bitmap(s.first_pfn, &s.bits);
        }
    }

    /// Number of changed pages.
    pub fn len(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| {
                s.bits
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum::<u64>()
            })
            .sum()
    }

    /// Whether no page changed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The changed pages of a running VM, shared by the dirty tracker, the devices and the
/// snapshot writer.
#[derive(Debug)]
pub struct ChangedPages {
    set: Mutex<ChangedSet>,
}

impl ChangedPages {
    /// Nothing changed yet, over guest RAM's `slots`.
    pub fn new(slots: &[MemorySlot]) -> Self {
        Self {
            set: Mutex::new(ChangedSet::new(slots)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChangedSet> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// ORs a fetched KVM dirty bitmap (slot starting at `first_pfn`) in.
    pub fn or_bitmap(&self, first_pfn: u64, bitmap: &[u64]) {
        self.lock().or_bitmap(first_pfn, bitmap);
    }

    /// Marks `len_bytes` bytes at `gpa` changed.
    pub fn insert_range(&self, gpa: u64, len_bytes: u64) {
        self.lock().insert_range(gpa, len_bytes);
    }

    /// Takes the set, leaving it empty (a snapshot is the new reference point).
    pub fn take(&self) -> ChangedSet {
        let mut set = self.lock();
        let empty = ChangedSet {
            slots: set
                .slots
                .iter()
                .map(|s| SlotBits {
                    bits: vec![0; s.bits.len()],
                    ..*s
                })
                .collect(),
        };
        std::mem::replace(&mut *set, empty)
    }

    /// Gives a taken set back (the snapshot that took it failed).
    pub fn merge(&self, set: &ChangedSet) {
        self.lock().merge(set);
    }
}

impl virtio_device::GuestWriteLog for ChangedPages {
    fn record_write(&self, gpa: u64, len_bytes: u64) {
        self.insert_range(gpa, len_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<MemorySlot> {
        vec![
            MemorySlot {
                slot: 0,
                guest_phys_addr: 0,
                memory_size: 1 << 20,
                userspace_addr: 0,
            },
            MemorySlot {
                slot: 1,
                guest_phys_addr: 4 << 20,
                memory_size: 1 << 20,
                userspace_addr: 0,
            },
        ]
    }

    #[test]
    fn accumulates_takes_and_merges_back() {
        let pages = ChangedPages::new(&slots());
        pages.or_bitmap(0, &[0b101]);
        pages.insert_range(4096 * 3 + 10, 4096);
        pages.insert_range((4 << 20) - 4096, 8192);
        // Outside RAM: ignored.
        pages.insert_range(2 << 20, 4096);
        let set = pages.take();
        assert!(set.contains(0) && set.contains(2) && set.contains(3) && set.contains(4));
        assert!(!set.contains(1) && !set.contains(5));
        assert!(set.contains((4 << 20) / 4096));
        assert_eq!(set.len(), 5);
        assert!(pages.take().is_empty());
        pages.merge(&set);
        assert_eq!(pages.take(), set);
    }
}
