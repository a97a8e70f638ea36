//! A snapshot's working set: the guest pages a clone touched in its first moments, recorded
//! once, then brought in by later clones: by default before their vCPUs run, or from a thread
//! while they already run ([`WorkingSetMode`]).
//!
//! Why: a clone maps its memory file and faults each page in on first touch. Every such touch
//! is a nested page fault (an exit to KVM) plus a host fault on the file mapping; the suite
//! measured a clone's first request 3-5x slower than QEMU's, whose `-incoming` reads all
//! memory in before the guest runs. Reading everything in would copy guest memory and make the
//! restore as slow as QEMU's. Instead one clone records which pages it touched
//! (`vmm restore --record-working-set-ms N`: after N ms, every page present in the VMM's page
//! tables, from `/proc/self/pagemap`), and later restores of the same snapshot map those pages
//! (`MADV_POPULATE_READ`, nothing copied: still the shared page cache) and build KVM's nested
//! page tables for them (`KVM_PRE_FAULT_MEMORY`, Linux 6.10+), one call per range, before the
//! vCPUs start. This is the record-and-prefetch idea of REAP (Ustiugov et al., ASPLOS '21).
//!
//! Bringing pages in before the vCPUs run delays them by that much (155-443 ms in the nested
//! rig, most of it KVM's page tables), against the goal of vCPUs running within a
//! millisecond of VMM work. `--working-set background` instead fills only the host page tables,
//! from a thread, while the vCPUs already run (KVM's pre-fault takes a vCPU that is not
//! running). Measured in the rig (`bench-results/suite-ws-background.md` against the three-run
//! `suite.md`): vCPUs running 3.0x sooner than QEMU's best instead of 2.5x, but the first
//! request after restore 7.3x slower than QEMU's instead of 1.6x for the untrimmed clone: every
//! page of the working set still took a nested fault, and those are what costs under
//! emulation. So the default stays before-start; on hardware, where a nested fault costs
//! microseconds, background may be the better trade: measure there.
//!
//! The record is `working-set.json` in the snapshot directory. It is an optimisation only: a
//! missing record changes nothing, and a damaged one or one of another snapshot is reported
//! in the log and ignored.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::format::{id_hex, PAGE_BYTES};
use super::prefault::{host_ranges, populate};
use super::SnapshotError;
use crate::kvm::vcpu::Vcpu;
use crate::memory::pagemap;

/// Name of the record inside a snapshot directory.
pub const WORKING_SET_FILE: &str = "working-set.json";
/// Largest record read (a guest of 64 GiB fragmented page by page needs less).
const MAX_RECORD_BYTES: u64 = 64 << 20;

/// The record on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingSet {
    /// The snapshot the pages belong to (hex, as `vmm inspect` shows it).
    pub snapshot_id: String,
    /// How long the recording clone ran before its pages were read, ms.
    pub recorded_after_ms: u64,
    /// Pages in `ranges`.
    pub pages: u64,
    /// Touched guest memory, `(gpa, len_bytes)`, page aligned, in address order.
    pub ranges: Vec<(u64, u64)>,
}

/// The guest pages present in this process's page tables, as merged `(gpa, len_bytes)` ranges
/// (from `/proc/self/pagemap`; a page is present once the guest or the VMM touched it).
pub fn record(mem: &GuestMemoryMmap) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().0;
        pagemap::for_each_entry(
            region.as_ptr() as u64,
            region.len() / PAGE_BYTES,
            |i, entry| {
                if entry & pagemap::PRESENT == 0 {
                    return;
                }
                let gpa = start + i * PAGE_BYTES;
                match ranges.last_mut() {
                    Some(last) if last.0 + last.1 == gpa => last.1 += PAGE_BYTES,
                    _ => ranges.push((gpa, PAGE_BYTES)),
                }
            },
        )
        .map_err(SnapshotError::io("read", Path::new(pagemap::PAGEMAP_PATH)))?;
    }
    Ok(ranges)
}

/// Writes the record into `dir` (a temporary file renamed into place, so a reader never sees
/// half a record).
pub fn save(dir: &Path, set: &WorkingSet) -> Result<PathBuf, SnapshotError> {
    let path = dir.join(WORKING_SET_FILE);
    let tmp = dir.join(format!(".{WORKING_SET_FILE}.tmp-{}", std::process::id()));
    let body = serde_json::to_vec(set).map_err(|e| SnapshotError::Io {
        operation: "encode",
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(&body).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(SnapshotError::Io {
            operation: "write",
            path,
            source,
        });
    }
    Ok(path)
}

/// Reads the record of the snapshot `snapshot_id` in `dir`: `Ok(None)` when there is none.
pub fn load(dir: &Path, snapshot_id: &[u8; 16]) -> Result<Option<WorkingSet>, SnapshotError> {
    let path = dir.join(WORKING_SET_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SnapshotError::io("open", &path)(e)),
    };
    let len = file
        .metadata()
        .map_err(SnapshotError::io("stat", &path))?
        .len();
    if len > MAX_RECORD_BYTES {
        return Err(SnapshotError::Invalid {
            path,
            reason: format!("{len} bytes, more than a record can be ({MAX_RECORD_BYTES})"),
        });
    }
    let set: WorkingSet = serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| {
        SnapshotError::Invalid {
            path: path.clone(),
            reason: format!("not a working-set record: {e}"),
        }
    })?;
    let expected = id_hex(snapshot_id);
    if set.snapshot_id != expected {
        return Err(SnapshotError::Invalid {
            path,
            reason: format!(
                "recorded for snapshot {}, this snapshot is {expected}",
                set.snapshot_id
            ),
        });
    }
    if let Some(&(gpa, len)) = set
        .ranges
        .iter()
        .find(|(gpa, len)| gpa % PAGE_BYTES != 0 || len % PAGE_BYTES != 0 || *len == 0)
    {
        return Err(SnapshotError::Invalid {
            path,
            reason: format!("range {gpa:#x}+{len:#x} is not whole pages"),
        });
    }
    Ok(Some(set))
}

/// When a restore brings the snapshot's recorded working set in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WorkingSetMode {
    /// The pages are mapped and KVM's nested page tables built (`KVM_PRE_FAULT_MEMORY`) before
    /// the vCPUs run: a later start, the fewest faults after it.
    #[default]
    BeforeStart,
    /// A thread maps the pages (`MADV_POPULATE_READ`) while the vCPUs already run; the guest's
    /// first touches take a KVM nested fault but no host fault. Wants a spare host CPU.
    Background,
    /// Not brought in: the guest faults every page in itself.
    Off,
}

/// What bringing a working set in did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PrefetchReport {
    /// Pages in the record that lie in guest RAM.
    pub pages: u64,
    /// Ranges asked for.
    pub ranges: usize,
    /// Host page tables filled (`MADV_POPULATE_READ`), ms.
    pub populate_ms: f64,
    /// KVM's nested page tables built (`KVM_PRE_FAULT_MEMORY`), ms; `None` when the kernel
    /// does not offer it or in the background mode (the guest then takes one nested fault
    /// per page, no host fault).
    pub kvm_pre_fault_ms: Option<f64>,
}

impl PrefetchReport {
    fn new(host: &[super::prefault::HostRange]) -> Self {
        PrefetchReport {
            pages: host.iter().map(|r| r.len as u64 / PAGE_BYTES).sum(),
            ranges: host.len(),
            ..PrefetchReport::default()
        }
    }

    fn log(&self, mode: WorkingSetMode) {
        tracing::info!(
            ?mode,
            pages = self.pages,
            ranges = self.ranges,
            populate_ms = self.populate_ms,
            kvm_pre_fault_ms = ?self.kvm_pre_fault_ms,
            "working set brought in"
        );
    }
}

/// Maps `ranges` from a thread of its own ([`WorkingSetMode::Background`]) and logs the
/// report when done. The thread holds host addresses only: if the VM ends first, its
/// `madvise` fails on the unmapped range and it stops.
pub fn prefetch_in_background(mem: &GuestMemoryMmap, ranges: &[(u64, u64)]) {
    let host = host_ranges(mem, ranges.iter().copied());
    let mut report = PrefetchReport::new(&host);
    super::prefault::spawn(host, "working-set", move |result, ms| {
        if let Err(e) = result {
            tracing::warn!(error = %e, "working set: populating host page tables stopped");
        }
        report.populate_ms = ms;
        report.log(WorkingSetMode::Background);
    });
}

/// Brings `ranges` in before the vCPUs run ([`WorkingSetMode::BeforeStart`]): host page
/// tables first, then KVM's through `vcpu` (which must not run yet), and logs the report.
/// Failures are not errors: the guest faults what is missing in itself.
pub fn prefetch(mem: &GuestMemoryMmap, vcpu: &Vcpu, ranges: &[(u64, u64)]) {
    let host = host_ranges(mem, ranges.iter().copied());
    let mut report = PrefetchReport::new(&host);
    let t0 = Instant::now();
    if let Err(e) = populate(&host) {
        tracing::warn!(error = %e, "working set: populating host page tables stopped");
    }
    report.populate_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let mut supported = true;
    for &(gpa, len) in ranges {
        match vcpu.pre_fault_memory(gpa, len) {
            Ok(()) => {}
            Err(e) if matches!(e.errno(), libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP) => {
                tracing::info!(error = %e, "KVM_PRE_FAULT_MEMORY is not available: the guest builds its nested page tables on first touch");
                supported = false;
                break;
            }
            Err(e) => {
                // A range outside every memory slot (ENOENT) or a signal: skip the range.
                tracing::debug!(error = %e, gpa, len, "KVM_PRE_FAULT_MEMORY refused a range");
            }
        }
    }
    report.kvm_pre_fault_ms = supported.then(|| t1.elapsed().as_secs_f64() * 1e3);
    report.log(WorkingSetMode::BeforeStart);
}

/// A recording the event loop takes when it is due (`vmm restore --record-working-set-ms`).
#[derive(Debug, Clone)]
pub struct Recording {
    /// When to read the page tables.
    pub at: Instant,
    /// How long after the vCPUs started that is, ms (kept in the record).
    pub after_ms: u64,
    /// The snapshot directory the record goes into.
    pub dir: PathBuf,
    /// The snapshot's ID.
    pub snapshot_id: [u8; 16],
}

impl Recording {
    /// Records the pages present now and writes the record; returns its path and page count.
    pub fn take(&self, mem: &GuestMemoryMmap) -> Result<(PathBuf, u64), SnapshotError> {
        let ranges = record(mem)?;
        let pages = ranges.iter().map(|r| r.1 / PAGE_BYTES).sum();
        let set = WorkingSet {
            snapshot_id: id_hex(&self.snapshot_id),
            recorded_after_ms: self.after_ms,
            pages,
            ranges,
        };
        Ok((save(&self.dir, &set)?, pages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn record_finds_the_touched_pages_and_the_record_round_trips() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 64 * 4096),
            (GuestAddress(1 << 20), 16 * 4096),
        ])
        .unwrap();
        for page in [3u64, 4, 5, 40] {
            mem.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        mem.write_obj(1u8, GuestAddress((1 << 20) + 2 * 4096))
            .unwrap();
        let ranges = record(&mem).unwrap();
        assert_eq!(
            ranges,
            vec![
                (3 * 4096, 3 * 4096),
                (40 * 4096, 4096),
                ((1 << 20) + 2 * 4096, 4096)
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let id = [0xab; 16];
        assert_eq!(load(dir.path(), &id).unwrap(), None);
        let set = WorkingSet {
            snapshot_id: id_hex(&id),
            recorded_after_ms: 1000,
            pages: 5,
            ranges,
        };
        save(dir.path(), &set).unwrap();
        assert_eq!(load(dir.path(), &id).unwrap(), Some(set.clone()));
        let err = load(dir.path(), &[0xcd; 16]).unwrap_err();
        assert!(
            err.to_string().contains("recorded for snapshot abab"),
            "{err}"
        );
        let path = dir.path().join(WORKING_SET_FILE);
        std::fs::write(&path, b"{\"snapshot_id\":1}").unwrap();
        let err = load(dir.path(), &id).unwrap_err();
        assert!(
            err.to_string().contains("not a working-set record"),
            "{err}"
        );
        let mut odd = set;
        odd.ranges = vec![(4096, 100)];
        save(dir.path(), &odd).unwrap();
        let err = load(dir.path(), &id).unwrap_err();
        assert!(err.to_string().contains("not whole pages"), "{err}");
    }
}
