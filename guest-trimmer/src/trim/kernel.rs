//! The kernel knobs the pipeline turns, below injectable proc and sys roots: `drop_caches`,
//! `compact_memory`, free page reporting's order, the multi-generational LRU switch, and
//! `/proc/buddyinfo`.

use std::path::{Path, PathBuf};

/// Free page reporting's block order when the parameter cannot be read (pageblock order on
/// x86-64: 2 MiB).
pub const DEFAULT_PAGE_REPORTING_ORDER: u32 = 9;

/// Errors of kernel knob operations, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A knob could not be written.
    #[error("write {value:?} to {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be read.
    #[error("read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holds something unexpected.
    #[error("{} holds {content:?}, expected {expected}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it holds.
        content: String,
        /// What was expected.
        expected: &'static str,
    },
}

/// The knobs, below a proc root and a sys root.
#[derive(Debug, Clone)]
pub struct KernelKnobs {
    proc_root: PathBuf,
    sys_root: PathBuf,
}

fn write(path: PathBuf, value: &str) -> Result<(), KernelError> {
    // Never create: a missing knob is an error, on a fake tree as on the kernel.
    let result = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, value.as_bytes()));
    result.map_err(|source| KernelError::Write {
        path,
        value: value.to_string(),
        source,
    })
}

fn read(path: PathBuf) -> Result<(PathBuf, String), KernelError> {
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((path, text)),
        Err(source) => Err(KernelError::Read { path, source }),
    }
}

impl KernelKnobs {
    /// Knobs below `proc_root` (normally `/proc`) and `sys_root` (normally `/sys`).
    pub fn new(proc_root: impl Into<PathBuf>, sys_root: impl Into<PathBuf>) -> Self {
        KernelKnobs {
            proc_root: proc_root.into(),
            sys_root: sys_root.into(),
        }
    }

    /// The proc root.
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// `echo value > /proc/sys/vm/drop_caches`: 1 page cache, 2 slab, 3 both. Only clean
    /// cache is dropped.
    pub fn drop_caches(&self, value: u8) -> Result<(), KernelError> {
        write(
            self.proc_root.join("sys/vm/drop_caches"),
            &value.to_string(),
        )
    }

    /// `echo 1 > /proc/sys/vm/compact_memory`: compacts all zones (synchronous).
    pub fn compact_memory(&self) -> Result<(), KernelError> {
        write(self.proc_root.join("sys/vm/compact_memory"), "1")
    }

    fn reporting_order_path(&self) -> PathBuf {
        self.sys_root
            .join("module/page_reporting/parameters/page_reporting_order")
    }

    /// Free page reporting's minimum order; `None` if the kernel lacks the parameter or no
    /// reporting device has registered yet (the kernel shows `-1` until one does).
    pub fn page_reporting_order(&self) -> Result<Option<u32>, KernelError> {
        let path = self.reporting_order_path();
        if !path.exists() {
            return Ok(None);
        }
        let (path, text) = read(path)?;
        if text.trim() == "-1" {
            return Ok(None);
        }
        text.trim()
            .parse()
            .map(Some)
            .map_err(|_| KernelError::Parse {
                path,
                content: text.trim().to_string(),
                expected: "an order (unsigned integer)",
            })
    }

    /// Sets free page reporting's minimum order.
    pub fn set_page_reporting_order(&self, order: u32) -> Result<(), KernelError> {
        write(self.reporting_order_path(), &order.to_string())
    }

    fn lru_gen_path(&self) -> PathBuf {
        self.sys_root.join("kernel/mm/lru_gen/enabled")
    }

    /// The multi-generational LRU's capability mask (`/sys/kernel/mm/lru_gen/enabled`,
    /// e.g. `0x0007`; 0 = off), if the kernel has it.
    pub fn lru_gen_caps(&self) -> Result<Option<u32>, KernelError> {
        let path = self.lru_gen_path();
        if !path.exists() {
            return Ok(None);
        }
        let (path, text) = read(path)?;
        let t = text.trim();
        u32::from_str_radix(t.trim_start_matches("0x"), 16)
            .map(Some)
            .map_err(|_| KernelError::Parse {
                path,
                content: t.to_string(),
                expected: "a hexadecimal capability mask such as 0x0007",
            })
    }

    /// Switches the multi-generational LRU off (the classic active/inactive lists take
    /// over; the kernel moves every page across).
    ///
    /// Why: with it on, a `read()` of a cached file only counts the access in the LRU's
    /// generation bits and leaves the page's idle flag set, so DAMON's physical-memory
    /// monitoring never sees page cache that is read but not mapped as accessed and a
    /// pageout takes the hot set with the cold (Linux 6.12 `folio_mark_accessed`). With the
    /// classic LRU the same read clears the idle flag and DAMON sees it.
    pub fn disable_lru_gen(&self) -> Result<(), KernelError> {
        write(self.lru_gen_path(), "n")
    }

    /// Free memory in blocks of at least `min_order`, in KiB, summed over zones, from
    /// `/proc/buddyinfo`: what free page reporting can report.
    pub fn free_kib_at_order(&self, min_order: u32) -> Result<u64, KernelError> {
        let (path, text) = read(self.proc_root.join("buddyinfo"))?;
        parse_buddyinfo_kib(&text, min_order).ok_or_else(|| KernelError::Parse {
            path,
            content: text.lines().next().unwrap_or("").to_string(),
            expected: "lines `Node N, zone NAME c0 c1 ...`",
        })
    }
}

/// Sums free blocks of order ≥ `min_order` in buddyinfo text, in KiB (4 KiB pages). `None` if a
/// line is malformed.
pub fn parse_buddyinfo_kib(text: &str, min_order: u32) -> Option<u64> {
    let mut total = 0u64;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (_, counts) = line.split_once("zone")?;
        let mut words = counts.split_whitespace();
        words.next()?; // zone name
        for (order, count) in words.enumerate() {
            let count: u64 = count.parse().ok()?;
            if order as u32 >= min_order {
                total = total.saturating_add(count.saturating_mul(4u64 << order));
            }
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDDYINFO: &str = "\
Node 0, zone      DMA      1      1      0      0      2      1      1      0      1      1      3
Node 0, zone    DMA32    100     50     10      4      2      1      0      0      0      1     20
";

    #[test]
    fn lru_gen_switch_reads_and_writes_the_mask() {
        let dir = tempfile::tempdir().unwrap();
        let k = KernelKnobs::new(dir.path().join("proc"), dir.path().join("sys"));
        assert_eq!(k.lru_gen_caps().unwrap(), None, "a kernel without MGLRU");
        assert!(
            k.disable_lru_gen().is_err(),
            "a missing knob is never created"
        );
        let p = dir.path().join("sys/kernel/mm/lru_gen");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("enabled"), "0x0007\n").unwrap();
        assert_eq!(k.lru_gen_caps().unwrap(), Some(7));
        k.disable_lru_gen().unwrap();
        assert_eq!(std::fs::read_to_string(p.join("enabled")).unwrap(), "n");
        std::fs::write(p.join("enabled"), "on\n").unwrap();
        let e = k.lru_gen_caps().unwrap_err().to_string();
        assert!(e.contains("lru_gen/enabled") && e.contains("\"on\""), "{e}");
    }

    #[test]
    fn buddyinfo_sums_blocks_by_order() {
        // Order 9 (2 MiB) and up: DMA 1*2048 + 3*4096, DMA32 1*2048 + 20*4096.
        assert_eq!(
            parse_buddyinfo_kib(BUDDYINFO, 9),
            Some(2048 + 3 * 4096 + 2048 + 20 * 4096)
        );
        let all: u64 = parse_buddyinfo_kib(BUDDYINFO, 0).unwrap();
        assert!(all > parse_buddyinfo_kib(BUDDYINFO, 9).unwrap());
        assert_eq!(parse_buddyinfo_kib("Node 0, zone DMA 1 x\n", 0), None);
        assert_eq!(parse_buddyinfo_kib("garbage\n", 0), None);
    }

    #[test]
    fn knobs_write_existing_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        let sys_root = dir.path().join("sys");
        let k = KernelKnobs::new(&proc_root, &sys_root);
        let err = k.drop_caches(1).unwrap_err();
        assert!(err.to_string().starts_with("write \"1\" to "), "{err}");
        assert!(
            err.to_string().ends_with("proc/sys/vm/drop_caches"),
            "{err}"
        );
        std::fs::create_dir_all(proc_root.join("sys/vm")).unwrap();
        std::fs::write(proc_root.join("sys/vm/drop_caches"), "0").unwrap();
        std::fs::write(proc_root.join("sys/vm/compact_memory"), "").unwrap();
        k.drop_caches(3).unwrap();
        k.compact_memory().unwrap();
        assert_eq!(
            std::fs::read_to_string(proc_root.join("sys/vm/drop_caches")).unwrap(),
            "3"
        );
        assert_eq!(k.page_reporting_order().unwrap(), None);
        let p = sys_root.join("module/page_reporting/parameters");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("page_reporting_order"), "-1\n").unwrap();
        assert_eq!(
            k.page_reporting_order().unwrap(),
            None,
            "no device registered yet"
        );
        std::fs::write(p.join("page_reporting_order"), "9\n").unwrap();
        assert_eq!(k.page_reporting_order().unwrap(), Some(9));
        k.set_page_reporting_order(0).unwrap();
        assert_eq!(k.page_reporting_order().unwrap(), Some(0));
        std::fs::write(proc_root.join("buddyinfo"), BUDDYINFO).unwrap();
        assert_eq!(k.free_kib_at_order(10).unwrap(), 23 * 4096);
    }
}
