//! Guest memory accounting from `/proc/meminfo` and `/proc/vmstat`.
//!
//! The trimmer logs these before and after each step to show what a step freed, and the
//! end-to-end tests compute the S512 live floor from them. Parsing takes text, so unit tests use
//! fixed input; [`ProcFs`] reads the files below an injectable proc root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Default mount point of procfs.
pub const DEFAULT_PROC_ROOT: &str = "/proc";

/// Why `/proc/meminfo` or `/proc/vmstat` text could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// A line is not `Key: value [kB]` (meminfo) or `key value` (vmstat).
    #[error("line {line_no}: expected {expected}, got {line:?}")]
    MalformedLine {
        /// 1-based line number.
        line_no: usize,
        /// The line.
        line: String,
        /// The expected shape.
        expected: &'static str,
    },
    /// A field this code needs is absent.
    #[error("field {name:?} is missing")]
    MissingField {
        /// The kernel's name of the field.
        name: &'static str,
    },
    /// A field has a unit other than the one expected (`kB` or none).
    #[error("field {name:?}: expected {expected}")]
    UnexpectedUnit {
        /// The kernel's name of the field.
        name: &'static str,
        /// What was expected.
        expected: &'static str,
    },
}

/// Why reading the kernel's memory accounting failed.
#[derive(Debug, thiserror::Error)]
pub enum MemInfoError {
    /// A file could not be read.
    #[error("read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be parsed.
    #[error("parse {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ParseError,
    },
}

/// The `/proc/meminfo` fields the trimmer uses, in KiB unless the name says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemInfo {
    /// `MemTotal`: usable RAM.
    pub mem_total_kib: u64,
    /// `MemFree`: unused RAM.
    pub mem_free_kib: u64,
    /// `MemAvailable`: estimate of memory available without swapping.
    pub mem_available_kib: u64,
    /// `Buffers`: block device page cache.
    pub buffers_kib: u64,
    /// `Cached`: file page cache, including shmem/tmpfs.
    pub cached_kib: u64,
    /// `SwapCached`: swapped-out memory also still in RAM.
    pub swap_cached_kib: u64,
    /// `Active(anon)`.
    pub active_anon_kib: u64,
    /// `Inactive(anon)`.
    pub inactive_anon_kib: u64,
    /// `Active(file)`.
    pub active_file_kib: u64,
    /// `Inactive(file)`.
    pub inactive_file_kib: u64,
    /// `Unevictable`.
    pub unevictable_kib: u64,
    /// `Mlocked`.
    pub mlocked_kib: u64,
    /// `SwapTotal`.
    pub swap_total_kib: u64,
    /// `SwapFree`.
    pub swap_free_kib: u64,
    /// `Dirty`: waiting to be written back.
    pub dirty_kib: u64,
    /// `Writeback`: being written back.
    pub writeback_kib: u64,
    /// `AnonPages`: anonymous memory mapped into user page tables.
    pub anon_kib: u64,
    /// `Mapped`: files mapped into processes.
    pub mapped_kib: u64,
    /// `Shmem`: shared memory and tmpfs (counted in `Cached`, not reclaimable without swap).
    pub shmem_kib: u64,
    /// `KReclaimable`: kernel memory the kernel can reclaim (Linux ≥ 4.20).
    pub kernel_reclaimable_kib: Option<u64>,
    /// `Slab`: all slab.
    pub slab_kib: u64,
    /// `SReclaimable`: reclaimable slab (dentries, inodes...).
    pub slab_reclaimable_kib: u64,
    /// `SUnreclaim`: unreclaimable slab.
    pub slab_unreclaimable_kib: u64,
    /// `KernelStack`.
    pub kernel_stack_kib: u64,
    /// `PageTables`.
    pub page_tables_kib: u64,
    /// `Percpu` (Linux ≥ 4.16).
    pub percpu_kib: Option<u64>,
    /// `Committed_AS`.
    pub committed_as_kib: u64,
    /// `AnonHugePages` (with transparent huge pages).
    pub anon_huge_pages_kib: Option<u64>,
    /// `HugePages_Total`: number of preallocated huge pages (a count, not KiB).
    pub huge_pages_total: Option<u64>,
    /// `Hugepagesize`.
    pub huge_page_size_kib: Option<u64>,
}

impl MemInfo {
    /// File-backed page cache that dropping or pageout can free: `Buffers + Cached - Shmem`.
    pub fn file_cache_kib(&self) -> u64 {
        (self.buffers_kib + self.cached_kib).saturating_sub(self.shmem_kib)
    }

    /// Kernel memory no trim step can free: unreclaimable slab, kernel stacks, page tables
    /// and per-CPU allocations. Part of the S512 live floor.
    pub fn kernel_unreclaimable_kib(&self) -> u64 {
        self.slab_unreclaimable_kib
            + self.kernel_stack_kib
            + self.page_tables_kib
            + self.percpu_kib.unwrap_or(0)
    }

    /// Memory in use (`MemTotal - MemFree`).
    pub fn used_kib(&self) -> u64 {
        self.mem_total_kib.saturating_sub(self.mem_free_kib)
    }
}

/// Parses `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, ParseError> {
    // Field name -> (value, whether it had a "kB" unit).
    let mut fields: HashMap<&str, (u64, bool)> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let malformed = || ParseError::MalformedLine {
            line_no: i + 1,
            line: line.to_string(),
            expected: "`Name: value [kB]`",
        };
        let (name, rest) = line.split_once(':').ok_or_else(malformed)?;
        let mut words = rest.split_whitespace();
        let value = words
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(malformed)?;
        let kib = match (words.next(), words.next()) {
            (None, None) => false,
            (Some("kB"), None) => true,
            _ => return Err(malformed()),
        };
        fields.entry(name.trim()).or_insert((value, kib));
    }
    let kib = |name: &'static str| -> Result<Option<u64>, ParseError> {
        match fields.get(name) {
            None => Ok(None),
            Some(&(v, true)) => Ok(Some(v)),
            Some(&(_, false)) => Err(ParseError::UnexpectedUnit {
                name,
                expected: "a value in kB",
            }),
        }
    };
    let req = |name: &'static str| kib(name)?.ok_or(ParseError::MissingField { name });
    let count = |name: &'static str| -> Result<Option<u64>, ParseError> {
        match fields.get(name) {
            None => Ok(None),
            Some(&(v, false)) => Ok(Some(v)),
            Some(&(_, true)) => Err(ParseError::UnexpectedUnit {
                name,
                expected: "a count without unit",
            }),
        }
    };
    Ok(MemInfo {
        mem_total_kib: req("MemTotal")?,
        mem_free_kib: req("MemFree")?,
        mem_available_kib: req("MemAvailable")?,
        buffers_kib: req("Buffers")?,
        cached_kib: req("Cached")?,
        swap_cached_kib: req("SwapCached")?,
        active_anon_kib: req("Active(anon)")?,
        inactive_anon_kib: req("Inactive(anon)")?,
        active_file_kib: req("Active(file)")?,
        inactive_file_kib: req("Inactive(file)")?,
        unevictable_kib: req("Unevictable")?,
        mlocked_kib: req("Mlocked")?,
        swap_total_kib: req("SwapTotal")?,
        swap_free_kib: req("SwapFree")?,
        dirty_kib: req("Dirty")?,
        writeback_kib: req("Writeback")?,
        anon_kib: req("AnonPages")?,
        mapped_kib: req("Mapped")?,
        shmem_kib: req("Shmem")?,
        kernel_reclaimable_kib: kib("KReclaimable")?,
        slab_kib: req("Slab")?,
        slab_reclaimable_kib: req("SReclaimable")?,
        slab_unreclaimable_kib: req("SUnreclaim")?,
        kernel_stack_kib: req("KernelStack")?,
        page_tables_kib: req("PageTables")?,
        percpu_kib: kib("Percpu")?,
        committed_as_kib: req("Committed_AS")?,
        anon_huge_pages_kib: kib("AnonHugePages")?,
        huge_pages_total: count("HugePages_Total")?,
        huge_page_size_kib: kib("Hugepagesize")?,
    })
}

/// The `/proc/vmstat` counters the trimmer uses. `_pages` fields are current page counts
/// (4 KiB pages); `_count` and event `_pages`/`_kib` fields are cumulative since boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmStat {
    /// `nr_free_pages`.
    pub free_pages: u64,
    /// `nr_inactive_anon`.
    pub inactive_anon_pages: u64,
    /// `nr_active_anon`.
    pub active_anon_pages: u64,
    /// `nr_inactive_file`.
    pub inactive_file_pages: u64,
    /// `nr_active_file`.
    pub active_file_pages: u64,
    /// `nr_unevictable`.
    pub unevictable_pages: u64,
    /// `nr_slab_reclaimable`.
    pub slab_reclaimable_pages: u64,
    /// `nr_slab_unreclaimable`.
    pub slab_unreclaimable_pages: u64,
    /// `nr_anon_pages`.
    pub anon_pages: u64,
    /// `nr_mapped`.
    pub mapped_pages: u64,
    /// `nr_file_pages`.
    pub file_pages: u64,
    /// `nr_dirty`.
    pub dirty_pages: u64,
    /// `nr_writeback`.
    pub writeback_pages: u64,
    /// `nr_shmem`.
    pub shmem_pages: u64,
    /// `pgpgin`: read from block devices since boot.
    pub paged_in_kib: u64,
    /// `pgpgout`: written to block devices since boot.
    pub paged_out_kib: u64,
    /// `pswpin`: pages swapped in since boot.
    pub swapped_in_pages: u64,
    /// `pswpout`: pages swapped out since boot.
    pub swapped_out_pages: u64,
    /// `pgfault`: page faults since boot.
    pub page_fault_count: u64,
    /// `pgmajfault`: major (I/O) page faults since boot.
    pub major_fault_count: u64,
    /// `pgfree`: pages freed since boot.
    pub freed_pages: u64,
    /// `pgsteal_kswapd`: pages reclaimed by kswapd since boot.
    pub reclaimed_kswapd_pages: Option<u64>,
    /// `pgsteal_direct`: pages reclaimed by direct reclaim since boot.
    pub reclaimed_direct_pages: Option<u64>,
    /// `workingset_refault_file`: file pages read again soon after eviction (Linux ≥ 5.9):
    /// a trim that evicted hot data shows here after restore.
    pub refault_file_pages: Option<u64>,
    /// `drop_pagecache`: writes of 1 or 3 to `drop_caches` since boot.
    pub drop_pagecache_count: Option<u64>,
    /// `drop_slab`: writes of 2 or 3 to `drop_caches` since boot.
    pub drop_slab_count: Option<u64>,
    /// `compact_stall`: direct compactions since boot.
    pub compact_stall_count: Option<u64>,
    /// `compact_success`.
    pub compact_success_count: Option<u64>,
    /// `compact_fail`.
    pub compact_fail_count: Option<u64>,
    /// `balloon_inflate`: pages inflated into a balloon since boot.
    pub balloon_inflated_pages: Option<u64>,
    /// `balloon_deflate`: pages deflated from a balloon since boot.
    pub balloon_deflated_pages: Option<u64>,
}

/// Parses `/proc/vmstat` text.
pub fn parse_vmstat(text: &str) -> Result<VmStat, ParseError> {
    let mut fields: HashMap<&str, u64> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|v| v.parse::<u64>().ok()),
            words.next(),
        ) {
            (Some(name), Some(value), None) => {
                fields.entry(name).or_insert(value);
            }
            _ => {
                return Err(ParseError::MalformedLine {
                    line_no: i + 1,
                    line: line.to_string(),
                    expected: "`name value`",
                })
            }
        }
    }
    let opt = |name: &str| fields.get(name).copied();
    let req = |name: &'static str| opt(name).ok_or(ParseError::MissingField { name });
    Ok(VmStat {
        free_pages: req("nr_free_pages")?,
        inactive_anon_pages: req("nr_inactive_anon")?,
        active_anon_pages: req("nr_active_anon")?,
        inactive_file_pages: req("nr_inactive_file")?,
        active_file_pages: req("nr_active_file")?,
        unevictable_pages: req("nr_unevictable")?,
        slab_reclaimable_pages: req("nr_slab_reclaimable")?,
        slab_unreclaimable_pages: req("nr_slab_unreclaimable")?,
        anon_pages: req("nr_anon_pages")?,
        mapped_pages: req("nr_mapped")?,
        file_pages: req("nr_file_pages")?,
        dirty_pages: req("nr_dirty")?,
        writeback_pages: req("nr_writeback")?,
        shmem_pages: req("nr_shmem")?,
        paged_in_kib: req("pgpgin")?,
        paged_out_kib: req("pgpgout")?,
        swapped_in_pages: req("pswpin")?,
        swapped_out_pages: req("pswpout")?,
        page_fault_count: req("pgfault")?,
        major_fault_count: req("pgmajfault")?,
        freed_pages: req("pgfree")?,
        reclaimed_kswapd_pages: opt("pgsteal_kswapd"),
        reclaimed_direct_pages: opt("pgsteal_direct"),
        refault_file_pages: opt("workingset_refault_file"),
        drop_pagecache_count: opt("drop_pagecache"),
        drop_slab_count: opt("drop_slab"),
        compact_stall_count: opt("compact_stall"),
        compact_success_count: opt("compact_success"),
        compact_fail_count: opt("compact_fail"),
        balloon_inflated_pages: opt("balloon_inflate"),
        balloon_deflated_pages: opt("balloon_deflate"),
    })
}

/// Both files read at (nearly) the same moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemSnapshot {
    /// From `/proc/meminfo`.
    pub meminfo: MemInfo,
    /// From `/proc/vmstat`.
    pub vmstat: VmStat,
}

/// Reads procfs files below a root (`/proc` normally, a fake tree in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        ProcFs::new(DEFAULT_PROC_ROOT)
    }
}

impl ProcFs {
    /// A reader of procfs mounted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ProcFs { root: root.into() }
    }

    /// The procfs root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads the file at `relative` below the root as text.
    pub fn read(&self, relative: &str) -> Result<(PathBuf, String), MemInfoError> {
        let path = self.root.join(relative);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            Err(source) => Err(MemInfoError::Read { path, source }),
        }
    }

    /// Reads and parses `meminfo`.
    pub fn meminfo(&self) -> Result<MemInfo, MemInfoError> {
        let (path, text) = self.read("meminfo")?;
        parse_meminfo(&text).map_err(|source| MemInfoError::Parse { path, source })
    }

    /// Reads and parses `vmstat`.
    pub fn vmstat(&self) -> Result<VmStat, MemInfoError> {
        let (path, text) = self.read("vmstat")?;
        parse_vmstat(&text).map_err(|source| MemInfoError::Parse { path, source })
    }

    /// Reads both files.
    pub fn snapshot(&self) -> Result<MemSnapshot, MemInfoError> {
        Ok(MemSnapshot {
            meminfo: self.meminfo()?,
            vmstat: self.vmstat()?,
        })
    }
}

/// Fixed procfs text for tests, taken from a Debian 6.12 guest with 512 MiB of RAM.
#[cfg(test)]
pub(crate) mod fixtures {
    pub const MEMINFO: &str = "\
MemTotal:         497996 kB
MemFree:          301232 kB
MemAvailable:     420516 kB
Buffers:            2408 kB
Cached:           132764 kB
SwapCached:            0 kB
Active:            52148 kB
Inactive:         107448 kB
Active(anon):      25652 kB
Inactive(anon):    11336 kB
Active(file):      26496 kB
Inactive(file):    96112 kB
Unevictable:           0 kB
Mlocked:               0 kB
SwapTotal:             0 kB
SwapFree:              0 kB
Zswap:                 0 kB
Zswapped:              0 kB
Dirty:                 8 kB
Writeback:             0 kB
AnonPages:         24440 kB
Mapped:            18972 kB
Shmem:             12548 kB
KReclaimable:      11112 kB
Slab:              24012 kB
SReclaimable:      11112 kB
SUnreclaim:        12900 kB
KernelStack:        1664 kB
PageTables:          712 kB
SecPageTables:         0 kB
NFS_Unstable:          0 kB
Bounce:                0 kB
WritebackTmp:          0 kB
CommitLimit:      248996 kB
Committed_AS:      62096 kB
VmallocTotal:   34359738367 kB
VmallocUsed:        6480 kB
VmallocChunk:          0 kB
Percpu:              608 kB
HardwareCorrupted:     0 kB
AnonHugePages:         0 kB
ShmemHugePages:        0 kB
ShmemPmdMapped:        0 kB
FileHugePages:         0 kB
FilePmdMapped:         0 kB
Unaccepted:            0 kB
HugePages_Total:       0
HugePages_Free:        0
HugePages_Rsvd:        0
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:               0 kB
DirectMap4k:       38784 kB
DirectMap2M:      485376 kB
";

    pub const VMSTAT: &str = "\
nr_free_pages 75308
nr_zone_inactive_anon 2834
nr_zone_active_anon 6413
nr_inactive_anon 2834
nr_active_anon 6413
nr_inactive_file 24028
nr_active_file 6624
nr_unevictable 0
nr_slab_reclaimable 2778
nr_slab_unreclaimable 3225
nr_anon_pages 6110
nr_mapped 4743
nr_file_pages 33793
nr_dirty 2
nr_writeback 0
nr_shmem 3137
workingset_refault_file 12
pgpgin 262144
pgpgout 40
pswpin 0
pswpout 0
pgalloc_normal 123456
pgfree 200000
pgfault 90000
pgmajfault 300
pgsteal_kswapd 0
pgsteal_direct 0
drop_pagecache 0
drop_slab 0
compact_stall 0
compact_fail 0
compact_success 0
balloon_inflate 0
balloon_deflate 0
";
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn parses_meminfo() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.mem_total_kib, 497_996);
        assert_eq!(m.mem_free_kib, 301_232);
        assert_eq!(m.cached_kib, 132_764);
        assert_eq!(m.anon_kib, 24_440);
        assert_eq!(m.active_anon_kib, 25_652);
        assert_eq!(m.slab_reclaimable_kib, 11_112);
        assert_eq!(m.slab_unreclaimable_kib, 12_900);
        assert_eq!(m.kernel_reclaimable_kib, Some(11_112));
        assert_eq!(m.percpu_kib, Some(608));
        assert_eq!(m.huge_pages_total, Some(0));
        assert_eq!(m.huge_page_size_kib, Some(2048));
        assert_eq!(m.file_cache_kib(), 2408 + 132_764 - 12_548);
        assert_eq!(m.kernel_unreclaimable_kib(), 12_900 + 1664 + 712 + 608);
        assert_eq!(m.used_kib(), 497_996 - 301_232);
    }

    #[test]
    fn meminfo_optional_fields_may_be_absent() {
        let text: String = MEMINFO
            .lines()
            .filter(|l| !l.starts_with("KReclaimable") && !l.starts_with("Percpu"))
            .map(|l| format!("{l}\n"))
            .collect();
        let m = parse_meminfo(&text).unwrap();
        assert_eq!(m.kernel_reclaimable_kib, None);
        assert_eq!(m.percpu_kib, None);
    }

    #[test]
    fn meminfo_errors() {
        assert_eq!(
            parse_meminfo("MemTotal: 10 kB\n"),
            Err(ParseError::MissingField { name: "MemFree" })
        );
        assert_eq!(
            parse_meminfo("MemTotal 10 kB\n"),
            Err(ParseError::MalformedLine {
                line_no: 1,
                line: "MemTotal 10 kB".into(),
                expected: "`Name: value [kB]`",
            })
        );
        assert!(matches!(
            parse_meminfo("MemTotal: ten kB\n"),
            Err(ParseError::MalformedLine { .. })
        ));
        assert!(matches!(
            parse_meminfo("MemTotal: 10 MB\n"),
            Err(ParseError::MalformedLine { .. })
        ));
        let no_unit = MEMINFO.replace("MemFree:          301232 kB", "MemFree: 301232");
        assert_eq!(
            parse_meminfo(&no_unit),
            Err(ParseError::UnexpectedUnit {
                name: "MemFree",
                expected: "a value in kB"
            })
        );
        let msg = parse_meminfo("x\n").unwrap_err().to_string();
        assert_eq!(msg, "line 1: expected `Name: value [kB]`, got \"x\"");
    }

    #[test]
    fn parses_vmstat() {
        let v = parse_vmstat(VMSTAT).unwrap();
        assert_eq!(v.free_pages, 75_308);
        assert_eq!(v.inactive_file_pages, 24_028);
        assert_eq!(v.slab_unreclaimable_pages, 3225);
        assert_eq!(v.paged_in_kib, 262_144);
        assert_eq!(v.freed_pages, 200_000);
        assert_eq!(v.refault_file_pages, Some(12));
        assert_eq!(v.compact_stall_count, Some(0));
        assert_eq!(v.balloon_inflated_pages, Some(0));
        let without: String = VMSTAT
            .lines()
            .filter(|l| !l.starts_with("balloon") && !l.starts_with("compact"))
            .map(|l| format!("{l}\n"))
            .collect();
        let v = parse_vmstat(&without).unwrap();
        assert_eq!(v.balloon_inflated_pages, None);
        assert_eq!(v.compact_success_count, None);
    }

    #[test]
    fn vmstat_errors() {
        assert_eq!(
            parse_vmstat("nr_free_pages 1\n"),
            Err(ParseError::MissingField {
                name: "nr_inactive_anon"
            })
        );
        assert!(matches!(
            parse_vmstat("nr_free_pages 1 2\n"),
            Err(ParseError::MalformedLine { line_no: 1, .. })
        ));
        assert!(matches!(
            parse_vmstat("nr_free_pages\n"),
            Err(ParseError::MalformedLine { .. })
        ));
        assert!(matches!(
            parse_vmstat("nr_free_pages -1\n"),
            Err(ParseError::MalformedLine { .. })
        ));
    }

    #[test]
    fn reads_from_injected_root() {
        let dir = tempfile::tempdir().unwrap();
        let proc = ProcFs::new(dir.path());
        let err = proc.meminfo().unwrap_err();
        assert!(matches!(err, MemInfoError::Read { .. }));
        assert_eq!(
            err.to_string(),
            format!("read {}", dir.path().join("meminfo").display())
        );
        std::fs::write(dir.path().join("meminfo"), MEMINFO).unwrap();
        std::fs::write(dir.path().join("vmstat"), "garbage line here\n").unwrap();
        assert_eq!(proc.meminfo().unwrap().mem_total_kib, 497_996);
        let err = proc.snapshot().unwrap_err();
        assert!(matches!(err, MemInfoError::Parse { .. }), "{err}");
        std::fs::write(dir.path().join("vmstat"), VMSTAT).unwrap();
        let snap = proc.snapshot().unwrap();
        let json = serde_json::to_value(&snap).unwrap();
        assert_eq!(json["meminfo"]["mem_total_kib"], 497_996);
        assert_eq!(json["vmstat"]["free_pages"], 75_308);
    }
}
