//! The page-state map: one [`PageState`] per 4 KiB guest page.
//!
//! The balloon device (inflate, free page reporting, free page hinting), dirty tracking and the
//! snapshot writer meet here (see ARCHITECTURE.md, "Page classes"): the device records pages the
//! guest gave up, dirty tracking turns written pages back into [`PageState::Live`], and the
//! snapshot writer walks [`PageStateMap::iter_runs`] to skip pages whose content does not matter.
//!
//! Pages are indexed by guest page frame number (`pfn = gpa / 4096`), so a map can describe guest
//! RAM with holes (e.g. the 32-bit MMIO gap): it holds one bitmap per RAM region, 2 bits per page
//! (1 GiB of guest RAM costs 64 KiB). Every operation checks its bounds and returns an error,
//! never panics, on addresses outside guest RAM or not page aligned.
//!
//! The map itself is not synchronized; the owner wraps it in a lock when several threads (device
//! queues, dirty log harvesting) update it.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Size of a guest page tracked by the map, in bytes.
pub const PAGE_SIZE_BYTES: u64 = 4096;

/// log2 of [`PAGE_SIZE_BYTES`].
const PAGE_SHIFT: u32 = 12;

/// Largest amount of guest RAM a map accepts, in bytes (1 TiB: a 64 MiB map). Bounds the
/// allocation made for a layout read from an untrusted state file.
pub const MAX_GUEST_RAM_BYTES: u64 = 1 << 40;

/// Most RAM regions a map accepts. Real layouts have one to a handful.
pub const MAX_REGIONS: usize = 64;

/// Version of [`PageStateMapState`] this code writes and accepts.
pub const PAGE_STATE_MAP_STATE_VERSION: u32 = 1;

/// Pages stored per `u64` word (2 bits each).
const PAGES_PER_WORD: u64 = 32;

/// What a snapshot must do with one guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageState {
    /// The content matters: stored in a snapshot (unless not resident or all zero).
    Live = 0,
    /// Inflated into the balloon: the guest may not use it; reads zero after restore.
    Inflated = 1,
    /// Reported free (free page reporting) and released by the host; reads zero after restore.
    Reported = 2,
    /// Hinted free (free page hinting) and not written since; reads zero after restore.
    Hinted = 3,
}

impl PageState {
    /// All states, in encoding order.
    pub const ALL: [PageState; 4] = [
        PageState::Live,
        PageState::Inflated,
        PageState::Reported,
        PageState::Hinted,
    ];

    /// Whether a snapshot must keep the page's content.
    pub fn is_live(self) -> bool {
        self == PageState::Live
    }

    /// The 2-bit encoding.
    fn bits(self) -> u64 {
        self as u64
    }

    /// Decodes the 2-bit encoding (only the low two bits are looked at).
    fn from_bits(bits: u64) -> PageState {
        match bits & 0b11 {
            0 => PageState::Live,
            1 => PageState::Inflated,
            2 => PageState::Reported,
            _ => PageState::Hinted,
        }
    }

    /// The state repeated over all 32 slots of a word.
    fn fill_word(self) -> u64 {
        self.bits() * 0x5555_5555_5555_5555
    }
}

/// One contiguous range of guest RAM, as the VMM lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRamRegion {
    /// Guest physical address of the first byte; a multiple of [`PAGE_SIZE_BYTES`].
    pub start_gpa: u64,
    /// Length in bytes; a non-zero multiple of [`PAGE_SIZE_BYTES`].
    pub len_bytes: u64,
}

impl GuestRamRegion {
    /// Frame numbers covered by the region.
    pub fn pfns(&self) -> Range<u64> {
        let start = self.start_gpa >> PAGE_SHIFT;
        start..start + (self.len_bytes >> PAGE_SHIFT)
    }
}

/// A maximal run of pages in the same state, as yielded by [`PageStateMap::iter_runs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageRun {
    /// Frame number of the first page.
    pub start_pfn: u64,
    /// Number of pages in the run (at least 1).
    pub nr_pages: u64,
    /// State shared by every page of the run.
    pub state: PageState,
}

impl PageRun {
    /// Guest physical address of the run's first byte.
    pub fn start_gpa(&self) -> u64 {
        self.start_pfn << PAGE_SHIFT
    }

    /// Length of the run in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.nr_pages << PAGE_SHIFT
    }
}

/// Number of pages in each state, from [`PageStateMap::count_by_state`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageStateCounts {
    /// Pages in [`PageState::Live`].
    pub live_pages: u64,
    /// Pages in [`PageState::Inflated`].
    pub inflated_pages: u64,
    /// Pages in [`PageState::Reported`].
    pub reported_pages: u64,
    /// Pages in [`PageState::Hinted`].
    pub hinted_pages: u64,
}

impl PageStateCounts {
    /// Pages counted for `state`.
    pub fn pages(&self, state: PageState) -> u64 {
        match state {
            PageState::Live => self.live_pages,
            PageState::Inflated => self.inflated_pages,
            PageState::Reported => self.reported_pages,
            PageState::Hinted => self.hinted_pages,
        }
    }

    /// Total pages counted.
    pub fn total_pages(&self) -> u64 {
        self.live_pages + self.inflated_pages + self.reported_pages + self.hinted_pages
    }

    /// Pages whose content a snapshot may skip (every state but live).
    pub fn discardable_pages(&self) -> u64 {
        self.inflated_pages + self.reported_pages + self.hinted_pages
    }
}

/// Errors of page-state map operations. Each names what was asked and why it was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PageStateError {
    /// The layout given to [`PageStateMap::new`] (or found in a state file) has no region.
    #[error("guest RAM layout: no region")]
    NoRegions,
    /// More regions than [`MAX_REGIONS`].
    #[error("guest RAM layout: {count} regions, at most {max} are supported")]
    TooManyRegions {
        /// Regions given.
        count: usize,
        /// [`MAX_REGIONS`].
        max: usize,
    },
    /// A region is empty, unaligned or wraps around the address space.
    #[error(
        "guest RAM region {index} (start_gpa {start_gpa:#x}, len_bytes {len_bytes:#x}): {reason}"
    )]
    InvalidRegion {
        /// Position of the region in the layout.
        index: usize,
        /// Its start.
        start_gpa: u64,
        /// Its length.
        len_bytes: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two regions overlap.
    #[error("guest RAM regions {first} and {second} overlap")]
    OverlappingRegions {
        /// Index (after sorting by address) of the lower region.
        first: usize,
        /// Index of the region overlapping it.
        second: usize,
    },
    /// The layout is larger than [`MAX_GUEST_RAM_BYTES`].
    #[error("guest RAM layout: {total_bytes} bytes in total, at most {max_bytes} are supported")]
    TooMuchRam {
        /// Sum of the region lengths (saturated).
        total_bytes: u64,
        /// [`MAX_GUEST_RAM_BYTES`].
        max_bytes: u64,
    },
    /// `mark_range` was given an address or length that is not a multiple of the page size.
    #[error(
        "mark range gpa {gpa:#x} len_bytes {len_bytes:#x}: not aligned to {PAGE_SIZE_BYTES} bytes"
    )]
    Unaligned {
        /// Requested start.
        gpa: u64,
        /// Requested length.
        len_bytes: u64,
    },
    /// Some page of the requested frame range is not guest RAM (or the range wraps around).
    #[error("pages {start_pfn:#x}..{end_pfn:#x}: not within one guest RAM region")]
    OutOfRange {
        /// First frame asked for.
        start_pfn: u64,
        /// One past the last frame asked for (saturated on overflow).
        end_pfn: u64,
    },
    /// The state file has a version this code does not know.
    #[error("restore page-state map: state version {found}, expected {expected}")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// [`PAGE_STATE_MAP_STATE_VERSION`].
        expected: u32,
    },
    /// The state file describes another guest RAM layout than the VM being restored.
    #[error("restore page-state map: saved guest RAM layout differs from the VM's")]
    LayoutMismatch,
    /// A saved run is empty, outside guest RAM, or out of order.
    #[error("restore page-state map: run {index} (start_pfn {start_pfn:#x}, nr_pages {nr_pages}): {reason}")]
    InvalidRun {
        /// Position of the run in the state.
        index: usize,
        /// Its first frame.
        start_pfn: u64,
        /// Its length in pages.
        nr_pages: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The states of one RAM region's pages, 2 bits per page.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RegionMap {
    /// First frame of the region.
    start_pfn: u64,
    /// Pages in the region.
    nr_pages: u64,
    /// 32 pages per word, page `i` at bits `2*(i%32)..2*(i%32)+2` of word `i/32`. Slots past
    /// `nr_pages` are always zero (Live).
    words: Vec<u64>,
}

impl RegionMap {
    fn end_pfn(&self) -> u64 {
        self.start_pfn + self.nr_pages
    }

    fn get(&self, idx: u64) -> PageState {
        let word = self.words[(idx / PAGES_PER_WORD) as usize];
        PageState::from_bits(word >> ((idx % PAGES_PER_WORD) * 2))
    }

    /// Sets pages `from..to` (region-relative indices, `to <= nr_pages`) to `state`.
    fn fill(&mut self, from: u64, to: u64, state: PageState) {
        let mut idx = from;
        let pattern = state.fill_word();
        while idx < to {
            let word_idx = (idx / PAGES_PER_WORD) as usize;
            let slot = idx % PAGES_PER_WORD;
            let n = (PAGES_PER_WORD - slot).min(to - idx);
            let mask = slot_mask(slot, n);
            let word = &mut self.words[word_idx];
            *word = (*word & !mask) | (pattern & mask);
            idx += n;
        }
    }

    /// Sets pages `from..to` to Live and returns how many were not Live before.
    fn fill_live_counting(&mut self, from: u64, to: u64) -> u64 {
        let mut idx = from;
        let mut changed = 0;
        while idx < to {
            let word_idx = (idx / PAGES_PER_WORD) as usize;
            let slot = idx % PAGES_PER_WORD;
            let n = (PAGES_PER_WORD - slot).min(to - idx);
            let mask = slot_mask(slot, n);
            let word = &mut self.words[word_idx];
            changed += non_live_in(*word & mask);
            *word &= !mask;
            idx += n;
        }
        changed
    }

    fn count(&self, counts: &mut PageStateCounts) {
        const LOW: u64 = 0x5555_5555_5555_5555;
        let full_words = self.nr_pages / PAGES_PER_WORD;
        let tail = self.nr_pages % PAGES_PER_WORD;
        for (i, &word) in self.words.iter().enumerate() {
            let valid = if (i as u64) < full_words {
                LOW
            } else {
                slot_mask(0, tail) & LOW
            };
            let lo = word & valid;
            let hi = (word >> 1) & valid;
            counts.inflated_pages += u64::from((lo & !hi).count_ones());
            counts.reported_pages += u64::from((!lo & hi & valid).count_ones());
            counts.hinted_pages += u64::from((lo & hi).count_ones());
            counts.live_pages += u64::from((!lo & !hi & valid).count_ones());
        }
    }
}

/// Mask covering `n` 2-bit slots starting at `slot` (`slot + n <= 32`, `n >= 1` or 0).
fn slot_mask(slot: u64, n: u64) -> u64 {
    let bits = n * 2;
    let ones = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    ones << (slot * 2)
}

/// Number of non-zero 2-bit slots in `word`.
fn non_live_in(word: u64) -> u64 {
    const LOW: u64 = 0x5555_5555_5555_5555;
    u64::from(((word | (word >> 1)) & LOW).count_ones())
}

/// Per-page state of all guest RAM. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageStateMap {
    /// Regions sorted by address, non-overlapping.
    regions: Vec<RegionMap>,
}

impl PageStateMap {
    /// Creates a map of `layout` with every page [`PageState::Live`].
    ///
    /// Regions may come in any order; they must be non-empty, page aligned and must not overlap.
    /// Adjacent regions are kept apart (runs never cross a region boundary).
    pub fn new(layout: &[GuestRamRegion]) -> Result<Self, PageStateError> {
        let sorted = validate_layout(layout)?;
        let regions = sorted
            .iter()
            .map(|r| {
                let nr_pages = r.len_bytes >> PAGE_SHIFT;
                RegionMap {
                    start_pfn: r.start_gpa >> PAGE_SHIFT,
                    nr_pages,
                    words: vec![0; nr_pages.div_ceil(PAGES_PER_WORD) as usize],
                }
            })
            .collect();
        Ok(PageStateMap { regions })
    }

    /// Creates a map of one region of `len_bytes` starting at guest physical address 0.
    pub fn with_ram_size(len_bytes: u64) -> Result<Self, PageStateError> {
        Self::new(&[GuestRamRegion {
            start_gpa: 0,
            len_bytes,
        }])
    }

    /// The guest RAM layout, sorted by address.
    pub fn layout(&self) -> Vec<GuestRamRegion> {
        self.regions
            .iter()
            .map(|r| GuestRamRegion {
                start_gpa: r.start_pfn << PAGE_SHIFT,
                len_bytes: r.nr_pages << PAGE_SHIFT,
            })
            .collect()
    }

    /// Number of pages tracked.
    pub fn nr_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.nr_pages).sum()
    }

    /// Sets the state of every page in `gpa..gpa + len_bytes`.
    ///
    /// Both `gpa` and `len_bytes` must be page aligned and the whole range must lie in one RAM
    /// region; otherwise nothing changes and an error says why. A zero length changes nothing.
    pub fn mark_range(
        &mut self,
        gpa: u64,
        len_bytes: u64,
        state: PageState,
    ) -> Result<(), PageStateError> {
        if gpa % PAGE_SIZE_BYTES != 0 || len_bytes % PAGE_SIZE_BYTES != 0 {
            return Err(PageStateError::Unaligned { gpa, len_bytes });
        }
        if len_bytes == 0 {
            return Ok(());
        }
        let start_pfn = gpa >> PAGE_SHIFT;
        let nr_pages = len_bytes >> PAGE_SHIFT;
        let (region, from, to) = self.locate_mut(start_pfn, nr_pages)?;
        region.fill(from, to, state);
        Ok(())
    }

    /// Records that the guest (or the VMM) wrote the pages in `pfns`: they become
    /// [`PageState::Live`], whatever they were (a hinted or reported page that is written again
    /// holds data). Returns how many pages changed state. An empty range changes nothing.
    pub fn mark_written(&mut self, pfns: Range<u64>) -> Result<u64, PageStateError> {
        if pfns.end <= pfns.start {
            return Ok(0);
        }
        let (region, from, to) = self.locate_mut(pfns.start, pfns.end - pfns.start)?;
        Ok(region.fill_live_counting(from, to))
    }

    /// Like [`PageStateMap::mark_written`] for a dirty bitmap as KVM returns it: bit `i` of
    /// `bitmap` (word `i / 64`, bit `i % 64`) set means page `first_pfn + i` was written.
    /// `nr_pages` bounds the bitmap; all of `first_pfn..first_pfn + nr_pages` must lie in one
    /// RAM region. Returns how many pages changed state.
    pub fn mark_written_bitmap(
        &mut self,
        first_pfn: u64,
        nr_pages: u64,
        bitmap: &[u64],
    ) -> Result<u64, PageStateError> {
        if nr_pages == 0 {
            return Ok(0);
        }
        let bits_available = (bitmap.len() as u64).saturating_mul(64);
        if bits_available < nr_pages {
            return Err(PageStateError::OutOfRange {
                start_pfn: first_pfn,
                end_pfn: first_pfn.saturating_add(nr_pages),
            });
        }
        let (region, from, _to) = self.locate_mut(first_pfn, nr_pages)?;
        let mut changed = 0;
        for (w, &bits) in bitmap.iter().enumerate() {
            let base = w as u64 * 64;
            if base >= nr_pages {
                break;
            }
            let mut bits = bits;
            if nr_pages - base < 64 {
                bits &= (1u64 << (nr_pages - base)) - 1;
            }
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                // Extend over a run of set bits to write whole words at once.
                let run = u64::from((!(bits >> bit)).trailing_zeros());
                let start = from + base + bit;
                changed += region.fill_live_counting(start, start + run);
                bits &= if bit + run >= 64 {
                    0
                } else {
                    !((1u64 << (bit + run)) - 1)
                };
            }
        }
        Ok(changed)
    }

    /// State of page `pfn`; an error if it is not guest RAM.
    pub fn state(&self, pfn: u64) -> Result<PageState, PageStateError> {
        let region =
            self.region_index(pfn)
                .map(|i| &self.regions[i])
                .ok_or(PageStateError::OutOfRange {
                    start_pfn: pfn,
                    end_pfn: pfn.saturating_add(1),
                })?;
        Ok(region.get(pfn - region.start_pfn))
    }

    /// Maximal runs of pages in equal state, in address order. Runs never cross a region
    /// boundary; together they cover every page exactly once.
    pub fn iter_runs(&self) -> Runs<'_> {
        Runs {
            map: self,
            region: 0,
            idx: 0,
        }
    }

    /// Number of pages in each state.
    pub fn count_by_state(&self) -> PageStateCounts {
        let mut counts = PageStateCounts::default();
        for region in &self.regions {
            region.count(&mut counts);
        }
        counts
    }

    /// The plain state to serialize into a snapshot: the layout and the non-live runs.
    pub fn save_state(&self) -> PageStateMapState {
        PageStateMapState {
            version: PAGE_STATE_MAP_STATE_VERSION,
            layout: self.layout(),
            runs: self.iter_runs().filter(|r| !r.state.is_live()).collect(),
        }
    }

    /// Rebuilds a map from `state` (untrusted: read from a snapshot) for a VM whose guest RAM is
    /// `expected_layout`. Checks the version, that the saved layout equals the VM's, and that
    /// runs are non-empty, in increasing address order, non-overlapping and inside one region.
    pub fn restore(
        state: &PageStateMapState,
        expected_layout: &[GuestRamRegion],
    ) -> Result<Self, PageStateError> {
        if state.version != PAGE_STATE_MAP_STATE_VERSION {
            return Err(PageStateError::UnsupportedVersion {
                found: state.version,
                expected: PAGE_STATE_MAP_STATE_VERSION,
            });
        }
        let mut map = Self::new(&state.layout)?;
        if map.layout() != validate_layout(expected_layout)? {
            return Err(PageStateError::LayoutMismatch);
        }
        let mut next_free_pfn = 0u64;
        for (index, run) in state.runs.iter().enumerate() {
            let invalid = |reason| PageStateError::InvalidRun {
                index,
                start_pfn: run.start_pfn,
                nr_pages: run.nr_pages,
                reason,
            };
            if run.nr_pages == 0 {
                return Err(invalid("empty run"));
            }
            if run.start_pfn < next_free_pfn {
                return Err(invalid("overlaps or precedes the previous run"));
            }
            let (region, from, to) = map
                .locate_mut(run.start_pfn, run.nr_pages)
                .map_err(|_| invalid("not within one guest RAM region"))?;
            region.fill(from, to, run.state);
            // locate_mut succeeded, so start + nr_pages does not overflow.
            next_free_pfn = run.start_pfn + run.nr_pages;
        }
        Ok(map)
    }

    /// Index of the region holding `pfn`.
    fn region_index(&self, pfn: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.end_pfn() <= pfn);
        (i < self.regions.len() && self.regions[i].start_pfn <= pfn).then_some(i)
    }

    /// The region holding all of `start_pfn..start_pfn + nr_pages` (`nr_pages >= 1`) and the
    /// range as region-relative indices.
    fn locate_mut(
        &mut self,
        start_pfn: u64,
        nr_pages: u64,
    ) -> Result<(&mut RegionMap, u64, u64), PageStateError> {
        let out_of_range = PageStateError::OutOfRange {
            start_pfn,
            end_pfn: start_pfn.saturating_add(nr_pages),
        };
        let end_pfn = start_pfn
            .checked_add(nr_pages)
            .ok_or(out_of_range.clone())?;
        let i = self.region_index(start_pfn).ok_or(out_of_range.clone())?;
        let region = &mut self.regions[i];
        if end_pfn > region.end_pfn() {
            return Err(out_of_range);
        }
        let from = start_pfn - region.start_pfn;
        Ok((region, from, from + nr_pages))
    }
}

/// Checks a layout and returns it sorted by address.
fn validate_layout(layout: &[GuestRamRegion]) -> Result<Vec<GuestRamRegion>, PageStateError> {
    if layout.is_empty() {
        return Err(PageStateError::NoRegions);
    }
    if layout.len() > MAX_REGIONS {
        return Err(PageStateError::TooManyRegions {
            count: layout.len(),
            max: MAX_REGIONS,
        });
    }
    let mut total_bytes = 0u64;
    for (index, r) in layout.iter().enumerate() {
        let invalid = |reason| PageStateError::InvalidRegion {
            index,
            start_gpa: r.start_gpa,
            len_bytes: r.len_bytes,
            reason,
        };
        if r.len_bytes == 0 {
            return Err(invalid("empty"));
        }
        if r.start_gpa % PAGE_SIZE_BYTES != 0 || r.len_bytes % PAGE_SIZE_BYTES != 0 {
            return Err(invalid("not aligned to 4096 bytes"));
        }
        if r.start_gpa.checked_add(r.len_bytes).is_none() {
            return Err(invalid("ends past the end of the address space"));
        }
        total_bytes = total_bytes.saturating_add(r.len_bytes);
    }
    if total_bytes > MAX_GUEST_RAM_BYTES {
        return Err(PageStateError::TooMuchRam {
            total_bytes,
            max_bytes: MAX_GUEST_RAM_BYTES,
        });
    }
    let mut sorted = layout.to_vec();
    sorted.sort_by_key(|r| r.start_gpa);
    for i in 1..sorted.len() {
        if sorted[i - 1].start_gpa + sorted[i - 1].len_bytes > sorted[i].start_gpa {
            return Err(PageStateError::OverlappingRegions {
                first: i - 1,
                second: i,
            });
        }
    }
    Ok(sorted)
}

/// Iterator over maximal runs of equal state; see [`PageStateMap::iter_runs`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    map: &'a PageStateMap,
    /// Region being walked.
    region: usize,
    /// Region-relative index of the next page to yield.
    idx: u64,
}

impl Iterator for Runs<'_> {
    type Item = PageRun;

    fn next(&mut self) -> Option<PageRun> {
        loop {
            let region = self.map.regions.get(self.region)?;
            if self.idx >= region.nr_pages {
                self.region += 1;
                self.idx = 0;
                continue;
            }
            let start = self.idx;
            let state = region.get(start);
            let pattern = state.fill_word();
            let mut idx = start + 1;
            while idx < region.nr_pages {
                if idx % PAGES_PER_WORD == 0 {
                    // Skip whole words in the same state.
                    let word = region.words[(idx / PAGES_PER_WORD) as usize];
                    let remaining = region.nr_pages - idx;
                    if remaining >= PAGES_PER_WORD && word == pattern {
                        idx += PAGES_PER_WORD;
                        continue;
                    }
                }
                if region.get(idx) != state {
                    break;
                }
                idx += 1;
            }
            self.idx = idx;
            return Some(PageRun {
                start_pfn: region.start_pfn + start,
                nr_pages: idx - start,
                state,
            });
        }
    }
}

/// Serializable form of a [`PageStateMap`] for snapshots: the layout and the runs that are not
/// live (every page not covered by a run is live). Restore with [`PageStateMap::restore`], which
/// validates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageStateMapState {
    /// Format version, [`PAGE_STATE_MAP_STATE_VERSION`].
    pub version: u32,
    /// Guest RAM layout the map covers.
    pub layout: Vec<GuestRamRegion>,
    /// Runs in increasing address order, non-overlapping, each within one region.
    pub runs: Vec<PageRun>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// xorshift64* — a small seeded PRNG so property tests are reproducible without extra deps.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn state(&mut self) -> PageState {
            PageState::ALL[self.below(4) as usize]
        }
    }

    /// A naive model: one entry per page of each region.
    struct Model {
        layout: Vec<GuestRamRegion>,
        pages: Vec<(u64, PageState)>,
    }

    impl Model {
        fn new(layout: &[GuestRamRegion]) -> Self {
            let mut layout = layout.to_vec();
            layout.sort_by_key(|r| r.start_gpa);
            let pages = layout
                .iter()
                .flat_map(|r| r.pfns().map(|p| (p, PageState::Live)))
                .collect();
            Model { layout, pages }
        }

        fn region_of(&self, pfn: u64) -> Option<usize> {
            self.layout.iter().position(|r| r.pfns().contains(&pfn))
        }

        fn in_one_region(&self, start: u64, n: u64) -> bool {
            match (self.region_of(start), start.checked_add(n - 1)) {
                (Some(a), Some(last)) => self.region_of(last) == Some(a),
                _ => false,
            }
        }

        fn set(&mut self, start: u64, n: u64, f: impl Fn(PageState) -> PageState) -> u64 {
            let mut changed = 0;
            for (pfn, st) in &mut self.pages {
                if *pfn >= start && *pfn < start + n {
                    let new = f(*st);
                    changed += u64::from(new != *st);
                    *st = new;
                }
            }
            changed
        }

        fn runs(&self) -> Vec<PageRun> {
            let mut runs: Vec<PageRun> = Vec::new();
            for &(pfn, state) in &self.pages {
                let same_region = |r: &PageRun| self.region_of(r.start_pfn) == self.region_of(pfn);
                match runs.last_mut() {
                    Some(r)
                        if r.state == state
                            && r.start_pfn + r.nr_pages == pfn
                            && same_region(r) =>
                    {
                        r.nr_pages += 1
                    }
                    _ => runs.push(PageRun {
                        start_pfn: pfn,
                        nr_pages: 1,
                        state,
                    }),
                }
            }
            runs
        }
    }

    fn two_regions() -> Vec<GuestRamRegion> {
        // Unsorted on purpose, with a gap between them and an odd page count.
        vec![
            GuestRamRegion {
                start_gpa: 4096 * 200,
                len_bytes: 4096 * 77,
            },
            GuestRamRegion {
                start_gpa: 0,
                len_bytes: 4096 * 130,
            },
        ]
    }

    #[test]
    fn new_map_is_all_live() {
        let map = PageStateMap::with_ram_size(512 * MIB).unwrap();
        assert_eq!(map.nr_pages(), 131072);
        let runs: Vec<_> = map.iter_runs().collect();
        assert_eq!(
            runs,
            vec![PageRun {
                start_pfn: 0,
                nr_pages: 131072,
                state: PageState::Live
            }]
        );
        assert_eq!(map.count_by_state().live_pages, 131072);
        assert_eq!(map.count_by_state().discardable_pages(), 0);
    }

    #[test]
    fn mark_range_and_state() {
        let mut map = PageStateMap::with_ram_size(MIB).unwrap();
        map.mark_range(4096 * 3, 4096 * 40, PageState::Reported)
            .unwrap();
        assert_eq!(map.state(2).unwrap(), PageState::Live);
        assert_eq!(map.state(3).unwrap(), PageState::Reported);
        assert_eq!(map.state(42).unwrap(), PageState::Reported);
        assert_eq!(map.state(43).unwrap(), PageState::Live);
        let c = map.count_by_state();
        assert_eq!(c.reported_pages, 40);
        assert_eq!(c.live_pages, 256 - 40);
        assert_eq!(c.total_pages(), 256);
    }

    #[test]
    fn mark_range_rejects_unaligned() {
        let mut map = PageStateMap::with_ram_size(MIB).unwrap();
        assert_eq!(
            map.mark_range(100, 4096, PageState::Hinted),
            Err(PageStateError::Unaligned {
                gpa: 100,
                len_bytes: 4096
            })
        );
        assert!(matches!(
            map.mark_range(4096, 10, PageState::Hinted),
            Err(PageStateError::Unaligned { .. })
        ));
        assert_eq!(map.count_by_state().live_pages, 256);
    }

    #[test]
    fn mark_range_rejects_out_of_range_without_partial_change() {
        let mut map = PageStateMap::new(&two_regions()).unwrap();
        // Past the end of the last region.
        let err = map
            .mark_range(4096 * 270, 4096 * 10, PageState::Inflated)
            .unwrap_err();
        assert_eq!(
            err,
            PageStateError::OutOfRange {
                start_pfn: 270,
                end_pfn: 280
            }
        );
        // Starting in the gap.
        assert!(map
            .mark_range(4096 * 150, 4096, PageState::Inflated)
            .is_err());
        // Crossing from region 0 into the gap.
        assert!(map
            .mark_range(4096 * 120, 4096 * 20, PageState::Inflated)
            .is_err());
        // Wrapping around the address space.
        assert!(map
            .mark_range(u64::MAX - 4095, 8192, PageState::Inflated)
            .is_err());
        assert_eq!(map.count_by_state().discardable_pages(), 0);
        // A zero length is a no-op, even outside RAM.
        map.mark_range(4096 * 150, 0, PageState::Inflated).unwrap();
        assert!(map.state(150).is_err());
        assert!(map.state(u64::MAX).is_err());
    }

    #[test]
    fn written_pages_become_live() {
        let mut map = PageStateMap::with_ram_size(MIB).unwrap();
        map.mark_range(0, 4096 * 100, PageState::Hinted).unwrap();
        map.mark_range(4096 * 100, 4096 * 10, PageState::Inflated)
            .unwrap();
        assert_eq!(map.mark_written(10..20).unwrap(), 10);
        assert_eq!(map.mark_written(10..20).unwrap(), 0);
        assert_eq!(map.mark_written(95..105).unwrap(), 10);
        assert_eq!(map.mark_written(5..5).unwrap(), 0);
        assert!(map.mark_written(250..260).is_err());
        assert_eq!(map.state(9).unwrap(), PageState::Hinted);
        assert_eq!(map.state(10).unwrap(), PageState::Live);
        assert_eq!(map.state(104).unwrap(), PageState::Live);
        assert_eq!(map.state(105).unwrap(), PageState::Inflated);
    }

    #[test]
    fn written_bitmap() {
        let mut map = PageStateMap::with_ram_size(MIB).unwrap();
        map.mark_range(0, MIB, PageState::Hinted).unwrap();
        // Pages 64+0, 64+1, 64+63, 128+5 (relative to first_pfn 64).
        let bitmap = [0b11 | (1 << 63), 1 << 5];
        assert_eq!(map.mark_written_bitmap(64, 128, &bitmap).unwrap(), 4);
        let live: Vec<u64> = (0..256)
            .filter(|&p| map.state(p).unwrap().is_live())
            .collect();
        assert_eq!(live, vec![64, 65, 127, 133]);
        // Bits past nr_pages are ignored.
        assert_eq!(map.mark_written_bitmap(0, 3, &[u64::MAX]).unwrap(), 3);
        // Too short a bitmap, or a range outside RAM.
        assert!(map.mark_written_bitmap(0, 65, &[u64::MAX]).is_err());
        assert!(map.mark_written_bitmap(250, 64, &[1]).is_err());
        // A full word of set bits.
        assert_eq!(map.mark_written_bitmap(192, 64, &[u64::MAX]).unwrap(), 64);
    }

    #[test]
    fn runs_do_not_cross_regions() {
        let map = PageStateMap::new(&two_regions()).unwrap();
        let runs: Vec<_> = map.iter_runs().collect();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].start_pfn, runs[0].nr_pages), (0, 130));
        assert_eq!((runs[1].start_pfn, runs[1].nr_pages), (200, 77));
        assert_eq!(runs[1].start_gpa(), 200 * 4096);
        assert_eq!(runs[1].len_bytes(), 77 * 4096);
    }

    #[test]
    fn layout_validation() {
        let r = |start_gpa, len_bytes| GuestRamRegion {
            start_gpa,
            len_bytes,
        };
        assert_eq!(PageStateMap::new(&[]), Err(PageStateError::NoRegions));
        assert!(matches!(
            PageStateMap::new(&[r(0, 0)]),
            Err(PageStateError::InvalidRegion {
                reason: "empty",
                ..
            })
        ));
        assert!(matches!(
            PageStateMap::new(&[r(1, 4096)]),
            Err(PageStateError::InvalidRegion { .. })
        ));
        assert!(matches!(
            PageStateMap::new(&[r(u64::MAX - 4095, 8192)]),
            Err(PageStateError::InvalidRegion { .. })
        ));
        assert!(matches!(
            PageStateMap::new(&[r(0, 8192), r(4096, 8192)]),
            Err(PageStateError::OverlappingRegions { .. })
        ));
        assert!(matches!(
            PageStateMap::new(&[r(0, MAX_GUEST_RAM_BYTES + 4096)]),
            Err(PageStateError::TooMuchRam { .. })
        ));
        let many: Vec<_> = (0..65).map(|i| r(i * 8192, 4096)).collect();
        assert!(matches!(
            PageStateMap::new(&many),
            Err(PageStateError::TooManyRegions { count: 65, .. })
        ));
        // Errors name the operation and the values.
        let msg = PageStateMap::new(&[r(1, 4096)]).unwrap_err().to_string();
        assert!(msg.contains("guest RAM region 0"), "{msg}");
        assert!(msg.contains("not aligned"), "{msg}");
    }

    #[test]
    fn save_restore_round_trip() {
        let mut map = PageStateMap::new(&two_regions()).unwrap();
        map.mark_range(4096 * 5, 4096 * 50, PageState::Reported)
            .unwrap();
        map.mark_range(4096 * 100, 4096 * 30, PageState::Inflated)
            .unwrap();
        map.mark_range(4096 * 200, 4096 * 3, PageState::Hinted)
            .unwrap();
        map.mark_written(7..9).unwrap();
        let state = map.save_state();
        assert!(state.runs.iter().all(|r| !r.state.is_live()));
        let json = serde_json::to_string(&state).unwrap();
        let parsed: PageStateMapState = serde_json::from_str(&json).unwrap();
        let restored = PageStateMap::restore(&parsed, &two_regions()).unwrap();
        assert_eq!(restored, map);
        assert_eq!(restored.count_by_state(), map.count_by_state());
    }

    #[test]
    fn restore_rejects_bad_state() {
        let layout = two_regions();
        let good = PageStateMap::new(&layout).unwrap().save_state();
        let run = |start_pfn, nr_pages| PageRun {
            start_pfn,
            nr_pages,
            state: PageState::Hinted,
        };
        let with_runs = |runs: Vec<PageRun>| PageStateMapState {
            runs,
            ..good.clone()
        };

        let mut s = good.clone();
        s.version = 2;
        assert!(matches!(
            PageStateMap::restore(&s, &layout),
            Err(PageStateError::UnsupportedVersion { found: 2, .. })
        ));
        assert_eq!(
            PageStateMap::restore(&good, &layout[..1]),
            Err(PageStateError::LayoutMismatch)
        );
        let bad_runs = [
            (vec![run(0, 0)], "empty run"),
            (vec![run(120, 20)], "not within one guest RAM region"),
            (vec![run(300, 1)], "not within one guest RAM region"),
            (vec![run(u64::MAX, 2)], "not within one guest RAM region"),
            (
                vec![run(10, 10), run(15, 10)],
                "overlaps or precedes the previous run",
            ),
            (
                vec![run(20, 1), run(10, 1)],
                "overlaps or precedes the previous run",
            ),
        ];
        for (runs, expected) in bad_runs {
            match PageStateMap::restore(&with_runs(runs.clone()), &layout) {
                Err(PageStateError::InvalidRun { reason, .. }) => {
                    assert_eq!(reason, expected, "{runs:?}")
                }
                other => panic!("{runs:?}: {other:?}"),
            }
        }
        // Unknown fields and unknown states in the file are rejected by serde.
        let json = serde_json::to_string(&good).unwrap();
        let extra = json.replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<PageStateMapState>(&extra).is_err());
        assert!(serde_json::from_str::<PageRun>(
            r#"{"start_pfn":0,"nr_pages":1,"state":"zapped"}"#
        )
        .is_err());
    }

    /// Random operations against the naive model, on several layouts.
    #[test]
    fn random_ops_match_model() {
        let layouts = [
            vec![GuestRamRegion {
                start_gpa: 0,
                len_bytes: 4096 * 300,
            }],
            two_regions(),
            vec![
                GuestRamRegion {
                    start_gpa: 4096 * 64,
                    len_bytes: 4096 * 64,
                },
                GuestRamRegion {
                    start_gpa: 4096 * 128,
                    len_bytes: 4096 * 33,
                },
            ],
        ];
        for (seed, layout) in [0x1234_5678_9abc_def1u64, 42, 7].iter().zip(layouts.iter()) {
            let mut rng = Rng(*seed);
            let mut map = PageStateMap::new(layout).unwrap();
            let mut model = Model::new(layout);
            let max_pfn = layout.iter().map(|r| r.pfns().end).max().unwrap() + 20;
            for step in 0..3000 {
                let start = rng.below(max_pfn);
                let max_len = if rng.below(4) == 0 { 200 } else { 40 };
                let n = 1 + rng.below(max_len);
                let ok = model.in_one_region(start, n);
                match rng.below(3) {
                    0 => {
                        let st = rng.state();
                        let res = map.mark_range(start * 4096, n * 4096, st);
                        assert_eq!(res.is_ok(), ok, "step {step}");
                        if ok {
                            model.set(start, n, |_| st);
                        }
                    }
                    1 => {
                        let res = map.mark_written(start..start + n);
                        if ok {
                            let changed = model.set(start, n, |_| PageState::Live);
                            assert_eq!(res.unwrap(), changed, "step {step}");
                        } else {
                            assert!(res.is_err(), "step {step}");
                        }
                    }
                    _ => {
                        let words: Vec<u64> = (0..n.div_ceil(64))
                            .map(|_| rng.next() & rng.next())
                            .collect();
                        let res = map.mark_written_bitmap(start, n, &words);
                        if ok {
                            let mut changed = 0;
                            for i in 0..n {
                                if words[(i / 64) as usize] >> (i % 64) & 1 == 1 {
                                    changed += model.set(start + i, 1, |_| PageState::Live);
                                }
                            }
                            assert_eq!(res.unwrap(), changed, "step {step}");
                        } else {
                            assert!(res.is_err(), "step {step}");
                        }
                    }
                }
                if step % 100 == 0 {
                    assert_eq!(map.iter_runs().collect::<Vec<_>>(), model.runs());
                }
            }
            for &(pfn, st) in &model.pages {
                assert_eq!(map.state(pfn).unwrap(), st);
            }
            let runs: Vec<_> = map.iter_runs().collect();
            assert_eq!(runs, model.runs());
            let mut expected = PageStateCounts::default();
            for &(_, st) in &model.pages {
                match st {
                    PageState::Live => expected.live_pages += 1,
                    PageState::Inflated => expected.inflated_pages += 1,
                    PageState::Reported => expected.reported_pages += 1,
                    PageState::Hinted => expected.hinted_pages += 1,
                }
            }
            assert_eq!(map.count_by_state(), expected);
            let restored = PageStateMap::restore(&map.save_state(), layout).unwrap();
            assert_eq!(restored, map);
        }
    }

    /// Runs are maximal: no two consecutive runs in one region share a state.
    #[test]
    fn runs_are_maximal() {
        let mut rng = Rng(99);
        let mut map = PageStateMap::with_ram_size(4096 * 1000).unwrap();
        for _ in 0..200 {
            let start = rng.below(990);
            let n = 1 + rng.below(10);
            map.mark_range(start * 4096, n * 4096, rng.state()).unwrap();
        }
        let runs: Vec<_> = map.iter_runs().collect();
        assert_eq!(runs.iter().map(|r| r.nr_pages).sum::<u64>(), 1000);
        for w in runs.windows(2) {
            assert_ne!(w[0].state, w[1].state);
            assert_eq!(w[0].start_pfn + w[0].nr_pages, w[1].start_pfn);
        }
    }

    #[test]
    fn state_serializes_as_snake_case() {
        assert_eq!(
            serde_json::to_string(&PageState::Reported).unwrap(),
            "\"reported\""
        );
    }
}
