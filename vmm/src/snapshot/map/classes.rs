//! Page classes and their run-length record in the state file (`memory.classes`).
//!
//! The record is a string of runs in guest address order over the RAM regions of the index,
//! e.g. `"k12 z3 n100"`: 12 kept pages, 3 zero pages, 100 never touched. A 512 MiB guest needs
//! a few hundred to a few thousand runs. Snapshots written before the record existed have none;
//! [`PageClassRuns::from_chunks`] then tells kept pages from left-out ones only.

use serde::{Deserialize, Serialize};

use crate::snapshot::format::PAGE_BYTES;
use crate::snapshot::state::{MemoryIndex, PageCounts};

/// Why a page is (or is not) in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageClass {
    /// Stored in the memory file.
    Kept,
    /// Inflated into the balloon.
    Inflated,
    /// Reported free by free page reporting.
    Reported,
    /// Hinted free by free page hinting and not written since.
    Hinted,
    /// Never touched by the guest (or released).
    NeverTouched,
    /// Resident but all zero.
    Zero,
    /// In a diff layer: unchanged since the parent, so stored in the parent.
    Inherited,
    /// Left out, reason not recorded (a snapshot written before classes were recorded).
    Skipped,
}

impl PageClass {
    /// Every class, in legend order.
    pub const ALL: [PageClass; 8] = [
        PageClass::Kept,
        PageClass::Inflated,
        PageClass::Reported,
        PageClass::Hinted,
        PageClass::NeverTouched,
        PageClass::Zero,
        PageClass::Inherited,
        PageClass::Skipped,
    ];

    /// The letter of the run-length record.
    pub fn letter(self) -> char {
        match self {
            PageClass::Kept => 'k',
            PageClass::Inflated => 'b',
            PageClass::Reported => 'r',
            PageClass::Hinted => 'h',
            PageClass::NeverTouched => 'n',
            PageClass::Zero => 'z',
            PageClass::Inherited => 'i',
            PageClass::Skipped => 's',
        }
    }

    fn from_letter(letter: char) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.letter() == letter)
    }

    /// A short human name (legend, JSON keys).
    pub fn name(self) -> &'static str {
        match self {
            PageClass::Kept => "kept",
            PageClass::Inflated => "freed by the balloon (inflated)",
            PageClass::Reported => "reported free",
            PageClass::Hinted => "hinted free",
            PageClass::NeverTouched => "never touched",
            PageClass::Zero => "zero",
            PageClass::Inherited => "unchanged, in the parent",
            PageClass::Skipped => "left out (reason not recorded)",
        }
    }

    /// The class's colour (`#rrggbb`).
    pub fn colour(self) -> &'static str {
        match self {
            PageClass::Kept => "#c0392b",
            PageClass::Inflated => "#8e44ad",
            PageClass::Reported => "#27ae60",
            PageClass::Hinted => "#a3e4a0",
            PageClass::NeverTouched => "#e6e6e6",
            PageClass::Zero => "#f4d03f",
            PageClass::Inherited => "#85c1e9",
            PageClass::Skipped => "#b0b0b0",
        }
    }
}

/// What is wrong with a run-length record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassRecordError {
    /// A run is not a known letter followed by a positive count.
    #[error(
        "page class run {index} ({run:?}) is not a class letter (k b r h n z i s) and a page count"
    )]
    BadRun {
        /// Run number.
        index: usize,
        /// Its text (truncated).
        run: String,
    },
    /// The RAM regions are not sorted, disjoint, page-aligned ranges below 2^52.
    #[error("the memory index's RAM regions are invalid: {0}")]
    Regions(String),
    /// The runs do not cover the guest RAM regions exactly.
    #[error("the page classes cover {recorded} pages but guest RAM has {ram} pages")]
    Coverage {
        /// Pages in the record.
        recorded: u64,
        /// Pages in the regions.
        ram: u64,
    },
}

/// Every page's class as runs `(class, pages)`, in guest address order over the RAM regions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PageClassRuns {
    runs: Vec<(PageClass, u64)>,
}

impl PageClassRuns {
    /// Appends `pages` pages of `class` (merged with the last run when it is the same class).
    pub fn push(&mut self, class: PageClass, pages: u64) {
        if pages == 0 {
            return;
        }
        match self.runs.last_mut() {
            Some((last, n)) if *last == class => *n += pages,
            _ => self.runs.push((class, pages)),
        }
    }

    /// The runs.
    pub fn runs(&self) -> &[(PageClass, u64)] {
        &self.runs
    }

    /// Pages covered (saturating: a hostile record cannot overflow it).
    pub fn total_pages(&self) -> u64 {
        self.runs.iter().fold(0u64, |n, r| n.saturating_add(r.1))
    }

    /// Pages of each class, in [`PageClass::ALL`] order.
    pub fn totals(&self) -> Vec<(PageClass, u64)> {
        PageClass::ALL
            .into_iter()
            .map(|c| {
                let pages = self.runs.iter().filter(|r| r.0 == c);
                (c, pages.fold(0u64, |n, r| n.saturating_add(r.1)))
            })
            .collect()
    }

    /// The classes an index recorded, checked to cover its regions; `None` when the snapshot
    /// predates the record.
    pub fn recorded(index: &MemoryIndex) -> Result<Option<&PageClassRuns>, ClassRecordError> {
        check_regions(&index.regions)?;
        let Some(runs) = index.classes.as_ref() else {
            return Ok(None);
        };
        let ram = ram_pages(index);
        if runs.total_pages() != ram {
            return Err(ClassRecordError::Coverage {
                recorded: runs.total_pages(),
                ram,
            });
        }
        Ok(Some(runs))
    }

    /// What the chunks alone tell: kept pages and left-out ones (reason unknown). For
    /// snapshots written before classes were recorded.
    pub fn from_chunks(index: &MemoryIndex) -> PageClassRuns {
        let mut runs = PageClassRuns::default();
        let mut chunks = index.chunks.iter().peekable();
        for &(start, len) in &index.regions {
            let end = start + len;
            let mut at = start;
            while at < end {
                // Chunks are in address order; skip any before `at` (a damaged index).
                while chunks
                    .next_if(|c| c.gpa.saturating_add(c.len_bytes) <= at)
                    .is_some()
                {}
                match chunks.peek() {
                    Some(c) if c.gpa <= at => {
                        let stop = c.gpa.saturating_add(c.len_bytes).min(end);
                        runs.push(PageClass::Kept, (stop - at) / PAGE_BYTES);
                        at = stop;
                    }
                    Some(c) if c.gpa < end => {
                        runs.push(PageClass::Skipped, (c.gpa - at) / PAGE_BYTES);
                        at = c.gpa;
                    }
                    _ => {
                        runs.push(PageClass::Skipped, (end - at) / PAGE_BYTES);
                        at = end;
                    }
                }
            }
        }
        runs
    }

    /// Whether the record agrees with the index's counts (every class but `Inherited` and
    /// `Skipped` has a counter there).
    pub fn matches_counts(&self, counts: &PageCounts) -> bool {
        let t = |class| {
            self.totals()
                .into_iter()
                .find(|(c, _)| *c == class)
                .map_or(0, |(_, n)| n)
        };
        t(PageClass::Kept) == counts.kept
            && t(PageClass::Inflated) == counts.skipped_inflated
            && t(PageClass::Reported) == counts.skipped_reported
            && t(PageClass::Hinted) == counts.skipped_hinted
            && t(PageClass::NeverTouched) == counts.skipped_never_touched
            && t(PageClass::Zero) == counts.skipped_zero
    }
}

/// Pages in the index's RAM regions (saturating).
pub fn ram_pages(index: &MemoryIndex) -> u64 {
    index
        .regions
        .iter()
        .fold(0u64, |n, r| n.saturating_add(r.1 / PAGE_BYTES))
}

/// Highest guest address a map covers (x86-64's 52-bit physical address limit).
const MAX_GPA: u64 = 1 << 52;

/// Checks that the regions (from a state file, so untrusted) are sorted, disjoint, non-empty,
/// page-aligned and below [`MAX_GPA`]: the map's arithmetic relies on it.
pub fn check_regions(regions: &[(u64, u64)]) -> Result<(), ClassRecordError> {
    let mut prev_end = 0;
    for (i, &(start, len)) in regions.iter().enumerate() {
        let end = start.checked_add(len).filter(|e| *e <= MAX_GPA);
        let ok = len > 0
            && (start | len) % PAGE_BYTES == 0
            && (i == 0 || start >= prev_end)
            && end.is_some();
        if !ok {
            return Err(ClassRecordError::Regions(format!(
                "region {i} ({start:#x}, {len:#x} bytes) is empty, unaligned, overlapping, out of order or beyond 2^52"
            )));
        }
        prev_end = end.unwrap_or(MAX_GPA);
    }
    Ok(())
}

impl From<PageClassRuns> for String {
    fn from(runs: PageClassRuns) -> String {
        let mut out = String::with_capacity(runs.runs.len() * 6);
        for (i, (class, pages)) in runs.runs.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push(class.letter());
            out.push_str(&pages.to_string());
        }
        out
    }
}

impl TryFrom<String> for PageClassRuns {
    type Error = ClassRecordError;

    fn try_from(text: String) -> Result<Self, ClassRecordError> {
        let mut runs = PageClassRuns::default();
        for (index, run) in text.split_whitespace().enumerate() {
            let bad = || ClassRecordError::BadRun {
                index,
                run: run.chars().take(24).collect(),
            };
            let mut chars = run.chars();
            let class = chars
                .next()
                .and_then(PageClass::from_letter)
                .ok_or_else(bad)?;
            let pages: u64 = chars.as_str().parse().map_err(|_| bad())?;
            if pages == 0 {
                return Err(bad());
            }
            runs.runs.push((class, pages));
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::state::MemoryChunk;

    const MIB: u64 = 1 << 20;

    #[test]
    fn runs_round_trip_as_text_and_bad_text_is_refused() {
        let mut runs = PageClassRuns::default();
        runs.push(PageClass::Kept, 12);
        runs.push(PageClass::Kept, 3);
        runs.push(PageClass::Zero, 0);
        runs.push(PageClass::NeverTouched, 100);
        let text = String::from(runs.clone());
        assert_eq!(text, "k15 n100");
        assert_eq!(PageClassRuns::try_from(text).unwrap(), runs);
        let json = serde_json::to_string(&runs).unwrap();
        assert_eq!(serde_json::from_str::<PageClassRuns>(&json).unwrap(), runs);
        for bad in ["x3", "k", "k0", "k-1", "kk"] {
            let err = PageClassRuns::try_from(bad.to_string()).unwrap_err();
            assert!(err.to_string().contains("run 0"), "{bad}: {err}");
        }
        assert!(serde_json::from_str::<PageClassRuns>("\"k1 q2\"")
            .unwrap_err()
            .to_string()
            .contains("run 1"));
    }

    #[test]
    fn hostile_records_and_regions_are_errors_not_panics() {
        let huge = PageClassRuns::try_from(format!("k{} z{}", u64::MAX, u64::MAX)).unwrap();
        assert_eq!(huge.total_pages(), u64::MAX);
        let index = MemoryIndex {
            regions: vec![(0, MIB)],
            classes: Some(huge),
            ..MemoryIndex::default()
        };
        assert!(PageClassRuns::recorded(&index).is_err());
        for regions in [
            vec![(0, 0)],
            vec![(1, MIB)],
            vec![(2 * MIB, MIB), (0, MIB)],
            vec![(0, 2 * MIB), (MIB, MIB)],
            vec![(u64::MAX - 4095, 8192)],
            vec![(0, 1 << 53)],
        ] {
            let index = MemoryIndex {
                regions: regions.clone(),
                ..MemoryIndex::default()
            };
            assert!(
                matches!(
                    PageClassRuns::recorded(&index),
                    Err(ClassRecordError::Regions(_))
                ),
                "{regions:?}"
            );
        }
    }

    #[test]
    fn old_snapshots_give_kept_and_skipped_from_the_chunks() {
        let chunk = |gpa, len_bytes| MemoryChunk {
            gpa,
            len_bytes,
            file_offset: 4096,
            sum: crate::snapshot::checksum::ChunkSum::PENDING,
        };
        let index = MemoryIndex {
            regions: vec![(0, 2 * MIB), (4 * MIB, MIB)],
            chunks: vec![
                chunk(0, 4096),
                chunk(4096, 2 * 4096),
                chunk(MIB, MIB),
                chunk(4 * MIB + 8192, 4096),
            ],
            ..MemoryIndex::default()
        };
        assert_eq!(PageClassRuns::recorded(&index), Ok(None));
        let runs = PageClassRuns::from_chunks(&index);
        assert_eq!(
            runs.runs(),
            &[
                (PageClass::Kept, 3),
                (PageClass::Skipped, 253),
                (PageClass::Kept, 256),
                (PageClass::Skipped, 2),
                (PageClass::Kept, 1),
                (PageClass::Skipped, 253),
            ]
        );
        assert_eq!(runs.total_pages(), ram_pages(&index));
        let recorded = MemoryIndex {
            classes: Some(runs.clone()),
            ..index.clone()
        };
        assert_eq!(PageClassRuns::recorded(&recorded), Ok(Some(&runs)));
        let mut short = runs;
        short.runs.pop();
        let bad = MemoryIndex {
            classes: Some(short),
            ..index
        };
        assert_eq!(
            PageClassRuns::recorded(&bad),
            Err(ClassRecordError::Coverage {
                recorded: 515,
                ram: 768
            })
        );
    }
}
