//! Checks of a snapshot against the paused VM it was just taken from, for the tests: what the
//! snapshot leaves out or leaves to a parent must really be what the VM holds.
//!
//! - A diff layer stores only the pages the dirty log, the devices and the used rings recorded
//!   as changed. A write none of them saw would leave the parent's stale bytes in every clone of
//!   the chain, and show up much later as a wrong file or a crashed guest kernel.
//!   [`check_layer`] reads the whole chain back and compares it with guest memory.
//! - A page the balloon holds Inflated or Reported is left out (it reads zero in a clone). The
//!   balloon released it when it marked it, so it reads zero here too, unless the guest wrote
//!   it since and the dirty log missed that write: [`check_released_pages`] reads them.
//!
//! Both run while the vCPUs and device workers are still paused, so a miss fails the snapshot
//! that made it, naming the pages. They cost reading the chain and guest memory, so they are
//! off unless [`AUDIT_SNAPSHOTS_ENV`] is `1` (the end-to-end tests set it).

use std::path::Path;

use balloon::{PageState, PageStateMap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::format::PAGE_BYTES;
use super::SnapshotError;
use crate::memory::ChangedSet;

/// Environment variable that turns the audit of every snapshot on (`1`).
pub const AUDIT_SNAPSHOTS_ENV: &str = "VMM_AUDIT_SNAPSHOTS";

/// Most differing pages a report lists.
const LISTED_PAGES: usize = 16;

/// Bytes compared per step.
const STEP_BYTES: u64 = 1 << 20;

/// Whether [`AUDIT_SNAPSHOTS_ENV`] asks for the audit.
pub fn enabled() -> bool {
    std::env::var(AUDIT_SNAPSHOTS_ENV).is_ok_and(|v| v == "1")
}

/// Copies guest memory at `gpa` into `buf`; an error names the snapshot being audited.
fn read(mem: &GuestMemoryMmap, gpa: u64, buf: &mut [u8], path: &Path) -> Result<(), SnapshotError> {
    mem.read_slice(buf, GuestAddress(gpa))
        .map_err(|e| SnapshotError::Invalid {
            path: path.to_owned(),
            reason: format!("audit cannot read guest memory at {gpa:#x}: {e}"),
        })
}

/// Reads every page `page_states` holds Inflated or Reported and fails, naming the snapshot at
/// `path` and the first such pages, if any is not all zero (see the module documentation; a
/// failed release, counted in the balloon's `release_errors`, would also explain one).
pub fn check_released_pages(
    path: &Path,
    mem: &GuestMemoryMmap,
    page_states: &PageStateMap,
) -> Result<(), SnapshotError> {
    let mut page = vec![0u8; PAGE_BYTES as usize];
    let (mut checked, mut non_zero) = (0u64, 0u64);
    let mut listed = Vec::new();
    for run in page_states.iter_runs() {
        if !matches!(run.state, PageState::Inflated | PageState::Reported) {
            continue;
        }
        for pfn in run.start_pfn..run.start_pfn + run.nr_pages {
            let gpa = pfn * PAGE_BYTES;
            read(mem, gpa, &mut page, path)?;
            checked += 1;
            if page.iter().any(|b| *b != 0) {
                non_zero += 1;
                if listed.len() < LISTED_PAGES {
                    listed.push(format!("{gpa:#x} ({:?})", run.state));
                }
            }
        }
    }
    if non_zero == 0 {
        return Ok(());
    }
    Err(SnapshotError::Invalid {
        path: path.to_owned(),
        reason: format!(
            "snapshot audit: {non_zero} of the {checked} pages left out as inflated or reported hold data (a guest write the dirty log missed): {}",
            listed.join(", ")
        ),
    })
}

/// Compares the chain ending at `top` with `mem`, page by page, over the pages the page-state
/// map holds live (free pages may hold anything). `changed` is the set the layer was written
/// from, to say whether a differing page was in it. Returns an error naming the layer and the
/// first differing pages if any differ.
pub fn check_layer(
    top: &Path,
    mem: &GuestMemoryMmap,
    page_states: Option<&PageStateMap>,
    changed: Option<&ChangedSet>,
) -> Result<(), SnapshotError> {
    let (regions, chain) = super::flatten::chain_memory(top)?;
    let (mut live, mut stored) = (
        vec![0u8; STEP_BYTES as usize],
        vec![0u8; STEP_BYTES as usize],
    );
    let mut differing = 0u64;
    let mut listed = Vec::new();
    for &(start, len) in &regions {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(STEP_BYTES);
            read(mem, start + off, &mut live[..n as usize], top)?;
            read(&chain, start + off, &mut stored[..n as usize], top)?;
            let pages = live[..n as usize]
                .chunks(PAGE_BYTES as usize)
                .zip(stored[..n as usize].chunks(PAGE_BYTES as usize));
            for (i, (l, s)) in pages.enumerate() {
                let gpa = start + off + i as u64 * PAGE_BYTES;
                let pfn = gpa / PAGE_BYTES;
                let state = page_states
                    .and_then(|m| m.state(pfn).ok())
                    .unwrap_or(PageState::Live);
                if state != PageState::Live || l == s {
                    continue;
                }
                differing += 1;
                if listed.len() < LISTED_PAGES {
                    let in_changed = changed.map(|c| c.contains(pfn));
                    let stored_zero = s.iter().all(|b| *b == 0);
                    listed.push(format!(
                        "{gpa:#x} (changed set: {in_changed:?}, chain has {})",
                        if stored_zero { "zeros" } else { "other bytes" }
                    ));
                }
            }
            off += n;
        }
    }
    if differing == 0 {
        return Ok(());
    }
    Err(SnapshotError::Invalid {
        path: top.to_owned(),
        reason: format!(
            "layer audit: {differing} live pages of the paused VM differ from what the chain restores: {}",
            listed.join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::memory::{dirty::memory_slots, Residency};
    use crate::snapshot::layer::{LayerInfo, Lineage};
    use crate::snapshot::state::{MemoryIndex, SnapshotState};
    use crate::snapshot::writer::{new_snapshot_id, write_snapshot, SnapshotParts};

    /// Writes a snapshot of `mem` into `dir`: a layer on `parent` (with its lineage) made of
    /// `changed`, or a full one.
    fn write(
        dir: &Path,
        mem: &GuestMemoryMmap,
        parent: Option<&Lineage>,
        changed: Option<&ChangedSet>,
    ) -> Lineage {
        let mut state = SnapshotState::example(MemoryIndex::default());
        let snapshot_id = new_snapshot_id();
        state.snapshot_id = snapshot_id;
        state.layer = parent.map(|p| LayerInfo {
            parent: p.check_parent(&p.path, dir).unwrap(),
            freed: Vec::new(),
            inherited_pages: 0,
        });
        let summary = write_snapshot(
            dir,
            SnapshotParts {
                state,
                mem,
                page_states: None,
                keep_all: false,
                residency: Residency::PageTables { file_data: &[] },
                started: Instant::now(),
                changed,
            },
        )
        .unwrap();
        Lineage {
            path: dir.to_owned(),
            snapshot_id,
            hash: summary.state_hash,
        }
    }

    #[test]
    fn a_write_missing_from_a_layer_is_named_and_a_complete_layer_passes() {
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[1; 4096], GuestAddress(0x1000)).unwrap();
        let base = write(&dir.path().join("base"), &mem, None, None);
        check_layer(&base.path, &mem, None, None).unwrap();

        // The guest writes two pages; the layer hears of one.
        mem.write_slice(&[2; 4096], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[3; 4096], GuestAddress(0x5000)).unwrap();
        let mut told = ChangedSet::new(&memory_slots(&mem));
        told.insert_range(0x5000, 4096);
        let partial = write(&dir.path().join("partial"), &mem, Some(&base), Some(&told));
        let err = check_layer(&partial.path, &mem, None, Some(&told))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1 live pages") && err.contains("0x1000 (changed set: Some(false)"),
            "{err}"
        );

        told.insert_range(0x1000, 4096);
        let whole = write(&dir.path().join("whole"), &mem, Some(&base), Some(&told));
        check_layer(&whole.path, &mem, None, Some(&told)).unwrap();
    }

    #[test]
    fn a_left_out_page_that_holds_data_is_named() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut map = PageStateMap::with_ram_size(1 << 20).unwrap();
        map.mark_range(0x10000, 0x4000, PageState::Reported)
            .unwrap();
        map.mark_range(0x20000, 0x1000, PageState::Hinted).unwrap();
        // Live and hinted pages may hold anything.
        mem.write_slice(&[7; 4096], GuestAddress(0x20000)).unwrap();
        mem.write_slice(&[7; 4096], GuestAddress(0x30000)).unwrap();
        let path = Path::new("snap");
        check_released_pages(path, &mem, &map).unwrap();
        mem.write_obj(1u8, GuestAddress(0x12000 + 100)).unwrap();
        let err = check_released_pages(path, &mem, &map)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1 of the 4 pages") && err.contains("0x12000 (Reported)"),
            "{err}"
        );
    }
}
