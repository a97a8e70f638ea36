//! What the guest sees of its machine: online CPUs, memory, kernel release, uptime.
//!
//! The guest's /init prints this on the console at boot (`guest-trimmer sysinfo --json`) and
//! end-to-end tests check the vCPU count and memory size the VMM configured against it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::meminfo::{MemInfoError, ProcFs};

/// Default mount point of sysfs.
pub const DEFAULT_SYS_ROOT: &str = "/sys";

/// Why a CPU list such as `0-1,3` could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuListError {
    /// The list is empty.
    #[error("empty CPU list")]
    Empty,
    /// An item is neither `N` nor `N-M`.
    #[error("item {item:?}: expected `N` or `N-M`")]
    BadItem {
        /// The item.
        item: String,
    },
    /// A range ends before it starts.
    #[error("range {item:?}: ends before it starts")]
    Reversed {
        /// The item.
        item: String,
    },
    /// Items overlap or are not in increasing order.
    #[error("item {item:?}: overlaps or precedes the previous item")]
    Unordered {
        /// The item.
        item: String,
    },
}

/// Parses a kernel CPU list (`/sys/devices/system/cpu/online`, e.g. `0-1,3`) into inclusive
/// ranges, in increasing order and non-overlapping.
pub fn parse_cpu_list(text: &str) -> Result<Vec<(u32, u32)>, CpuListError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(CpuListError::Empty);
    }
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for item in text.split(',') {
        let bad = || CpuListError::BadItem {
            item: item.to_string(),
        };
        let number = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(item)?;
                (n, n)
            }
        };
        if last < first {
            return Err(CpuListError::Reversed {
                item: item.to_string(),
            });
        }
        if ranges
            .last()
            .is_some_and(|&(_, prev_last)| first <= prev_last)
        {
            return Err(CpuListError::Unordered {
                item: item.to_string(),
            });
        }
        ranges.push((first, last));
    }
    Ok(ranges)
}

/// Number of CPUs in a parsed CPU list.
pub fn cpu_count(ranges: &[(u32, u32)]) -> u64 {
    ranges
        .iter()
        .map(|&(first, last)| u64::from(last - first) + 1)
        .sum()
}

/// Parses `/proc/uptime` (`"432.88 714.19"`) into whole milliseconds of uptime.
pub fn parse_uptime_ms(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    if secs.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    // Take the first three fractional digits, padded: ".5" is 500 ms, ".88" is 880 ms.
    let mut ms = 0u64;
    for i in 0..3 {
        let digit = frac.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
        ms = ms * 10 + digit;
    }
    secs.checked_mul(1000)?.checked_add(ms)
}

/// Why [`SysInfo::read`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SysInfoError {
    /// A file could not be read.
    #[error("read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The online CPU list could not be parsed.
    #[error("parse online CPU list {}", path.display())]
    CpuList {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: CpuListError,
    },
    /// The uptime could not be parsed.
    #[error("parse uptime {}: expected `seconds.fraction idle`, got {text:?}", path.display())]
    Uptime {
        /// The file.
        path: PathBuf,
        /// What it held.
        text: String,
    },
    /// The memory size could not be read.
    #[error("read total memory")]
    MemInfo(#[source] MemInfoError),
}

/// The guest's view of its machine. Serialized (one JSON line) in field order:
/// `{"cpus":2,"mem_total_kib":497996,"kernel_release":"6.12.x","uptime_ms":1234}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SysInfo {
    /// Online CPUs.
    pub cpus: u64,
    /// `MemTotal` from `/proc/meminfo`.
    pub mem_total_kib: u64,
    /// `uname -r`, from `/proc/sys/kernel/osrelease`.
    pub kernel_release: String,
    /// Time since boot.
    pub uptime_ms: u64,
}

impl SysInfo {
    /// Reads the guest's view below `proc_root` (normally `/proc`) and `sys_root` (`/sys`).
    pub fn read(proc_root: &Path, sys_root: &Path) -> Result<SysInfo, SysInfoError> {
        let read = |path: PathBuf| match std::fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            Err(source) => Err(SysInfoError::Read { path, source }),
        };
        let (path, text) = read(sys_root.join("devices/system/cpu/online"))?;
        let cpus = cpu_count(
            &parse_cpu_list(&text).map_err(|source| SysInfoError::CpuList { path, source })?,
        );
        let mem_total_kib = ProcFs::new(proc_root)
            .meminfo()
            .map_err(SysInfoError::MemInfo)?
            .mem_total_kib;
        let (_, release) = read(proc_root.join("sys/kernel/osrelease"))?;
        let (path, text) = read(proc_root.join("uptime"))?;
        let uptime_ms = parse_uptime_ms(&text).ok_or_else(|| SysInfoError::Uptime {
            path,
            text: text.trim().to_string(),
        })?;
        Ok(SysInfo {
            cpus,
            mem_total_kib,
            kernel_release: release.trim().to_string(),
            uptime_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meminfo::fixtures::MEMINFO;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n").unwrap(), vec![(0, 0)]);
        assert_eq!(parse_cpu_list("0-1,3").unwrap(), vec![(0, 1), (3, 3)]);
        assert_eq!(cpu_count(&parse_cpu_list("0-1,3").unwrap()), 3);
        assert_eq!(cpu_count(&parse_cpu_list("0-3,8-11,16").unwrap()), 9);
        assert_eq!(parse_cpu_list(" \n"), Err(CpuListError::Empty));
        assert_eq!(
            parse_cpu_list("0-"),
            Err(CpuListError::BadItem { item: "0-".into() })
        );
        assert!(matches!(
            parse_cpu_list("a"),
            Err(CpuListError::BadItem { .. })
        ));
        assert!(matches!(
            parse_cpu_list("0,,1"),
            Err(CpuListError::BadItem { .. })
        ));
        assert_eq!(
            parse_cpu_list("3-1"),
            Err(CpuListError::Reversed { item: "3-1".into() })
        );
        assert!(matches!(
            parse_cpu_list("0-2,2"),
            Err(CpuListError::Unordered { .. })
        ));
        assert!(matches!(
            parse_cpu_list("4,1"),
            Err(CpuListError::Unordered { .. })
        ));
        // No overflow on the widest range.
        assert_eq!(
            cpu_count(&parse_cpu_list(&format!("0-{}", u32::MAX)).unwrap()),
            1 << 32
        );
    }

    #[test]
    fn uptime() {
        assert_eq!(parse_uptime_ms("432.88 714.19\n"), Some(432_880));
        assert_eq!(parse_uptime_ms("0.5 0.1"), Some(500));
        assert_eq!(parse_uptime_ms("12.3456 1"), Some(12_345));
        assert_eq!(parse_uptime_ms("7 1"), Some(7000));
        assert_eq!(parse_uptime_ms(""), None);
        assert_eq!(parse_uptime_ms(".5 1"), None);
        assert_eq!(parse_uptime_ms("1.x 1"), None);
        assert_eq!(parse_uptime_ms("-1.0 1"), None);
        assert_eq!(parse_uptime_ms("99999999999999999999.0 1"), None);
    }

    /// Writes a fake /proc and /sys with the files `SysInfo::read` uses.
    fn fake_roots(dir: &Path, online: &str) -> (PathBuf, PathBuf) {
        let proc_root = dir.join("proc");
        let sys_root = dir.join("sys");
        std::fs::create_dir_all(proc_root.join("sys/kernel")).unwrap();
        std::fs::create_dir_all(sys_root.join("devices/system/cpu")).unwrap();
        std::fs::write(proc_root.join("meminfo"), MEMINFO).unwrap();
        std::fs::write(
            proc_root.join("sys/kernel/osrelease"),
            "6.12.57+deb12-cloud-amd64\n",
        )
        .unwrap();
        std::fs::write(proc_root.join("uptime"), "1.234 2.00\n").unwrap();
        std::fs::write(sys_root.join("devices/system/cpu/online"), online).unwrap();
        (proc_root, sys_root)
    }

    #[test]
    fn reads_fake_roots_and_prints_one_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let (proc_root, sys_root) = fake_roots(dir.path(), "0-1\n");
        let info = SysInfo::read(&proc_root, &sys_root).unwrap();
        assert_eq!(
            info,
            SysInfo {
                cpus: 2,
                mem_total_kib: 497_996,
                kernel_release: "6.12.57+deb12-cloud-amd64".into(),
                uptime_ms: 1234,
            }
        );
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            r#"{"cpus":2,"mem_total_kib":497996,"kernel_release":"6.12.57+deb12-cloud-amd64","uptime_ms":1234}"#
        );
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (proc_root, sys_root) = fake_roots(dir.path(), "0-x\n");
        let err = SysInfo::read(&proc_root, &sys_root).unwrap_err();
        assert_eq!(
            crate::error_chain(&err),
            format!(
                "parse online CPU list {}: item \"0-x\": expected `N` or `N-M`",
                sys_root.join("devices/system/cpu/online").display()
            )
        );
        std::fs::write(sys_root.join("devices/system/cpu/online"), "0\n").unwrap();
        std::fs::write(proc_root.join("uptime"), "soon\n").unwrap();
        let err = SysInfo::read(&proc_root, &sys_root).unwrap_err();
        assert!(matches!(err, SysInfoError::Uptime { .. }), "{err}");
        std::fs::remove_file(proc_root.join("meminfo")).unwrap();
        let err = SysInfo::read(&proc_root, &sys_root).unwrap_err();
        assert!(
            crate::error_chain(&err).starts_with("read total memory: read "),
            "{err}"
        );
    }
}
