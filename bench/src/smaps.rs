//! `/proc/PID/smaps`: the VMM's resident memory split into guest RAM and everything else.

use serde::{Deserialize, Serialize};

/// One mapping of smaps: its header line and the fields the overhead needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `rwxp`-style permissions.
    pub perms: String,
    /// The inode (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[anon:x]`), if any.
    pub path: Option<String>,
    /// `Size:` in KiB.
    pub size_kib: u64,
    /// `Rss:` in KiB.
    pub rss_kib: u64,
}

impl Mapping {
    /// Anonymous memory: no backing inode and either no name or an `[anon:...]` name.
    pub fn is_anonymous(&self) -> bool {
        self.inode == 0
            && match &self.path {
                None => true,
                Some(p) => p.starts_with("[anon:"),
            }
    }

    fn describe(&self) -> String {
        format!(
            "{:x}-{:x} {} {} KiB{}",
            self.start,
            self.end,
            self.perms,
            self.size_kib,
            self.path
                .as_deref()
                .map(|p| format!(" {p}"))
                .unwrap_or_default()
        )
    }
}

/// Errors reading smaps.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SmapsError {
    /// A header line did not have the `start-end perms offset dev inode [path]` shape.
    #[error("smaps line {line}: not a mapping header: {text:?}")]
    BadHeader {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A `Size:`/`Rss:` line had no number.
    #[error("smaps line {line}: bad {field} value: {text:?}")]
    BadField {
        /// 1-based line number.
        line: usize,
        /// `Size` or `Rss`.
        field: &'static str,
        /// The line.
        text: String,
    },
    /// No anonymous mapping has exactly the guest memory's size.
    #[error("no anonymous mapping of exactly {guest_kib} KiB (the guest memory) among {mappings} mappings")]
    NoGuestMapping {
        /// Guest memory size in KiB.
        guest_kib: u64,
        /// How many mappings there were.
        mappings: usize,
    },
}

/// Parses the text of `/proc/PID/smaps`.
pub fn parse(text: &str) -> Result<Vec<Mapping>, SmapsError> {
    let mut out: Vec<Mapping> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                out.push(parse_header(line, lineno, start, end)?);
                continue;
            }
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let field = match key {
            "Size" => "Size",
            "Rss" => "Rss",
            _ => continue,
        };
        let Some(current) = out.last_mut() else {
            continue;
        };
        let kib = value
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| SmapsError::BadField {
                line: lineno,
                field,
                text: line.to_string(),
            })?;
        if field == "Size" {
            current.size_kib = kib;
        } else {
            current.rss_kib = kib;
        }
    }
    Ok(out)
}

fn parse_header(line: &str, lineno: usize, start: u64, end: u64) -> Result<Mapping, SmapsError> {
    let bad = || SmapsError::BadHeader {
        line: lineno,
        text: line.to_string(),
    };
    // start-end perms offset dev inode [path (may contain spaces)]
    let mut rest = line;
    let mut fields = Vec::with_capacity(5);
    for _ in 0..5 {
        rest = rest.trim_start();
        let end_of = rest.find(char::is_whitespace).unwrap_or(rest.len());
        if end_of == 0 {
            return Err(bad());
        }
        fields.push(&rest[..end_of]);
        rest = &rest[end_of..];
    }
    let inode = fields[4].parse::<u64>().map_err(|_| bad())?;
    let path = rest.trim();
    Ok(Mapping {
        start,
        end,
        perms: fields[1].to_string(),
        inode,
        path: (!path.is_empty()).then(|| path.to_string()),
        size_kib: 0,
        rss_kib: 0,
    })
}

/// A VMM's resident memory, split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overhead {
    /// Sum of `Rss:` over all mappings, KiB.
    pub total_rss_kib: u64,
    /// `Rss:` of the guest RAM mapping, KiB.
    pub guest_rss_kib: u64,
    /// `total_rss_kib - guest_rss_kib`.
    pub overhead_kib: u64,
    /// The guest RAM mapping (address range, permissions, size).
    pub guest_mapping: String,
    /// Other anonymous mappings of the same size, when there were several (the one with the
    /// largest Rss was taken as guest RAM).
    pub ambiguous_with: Vec<String>,
    /// How many mappings the process had.
    pub mappings: usize,
}

/// Splits the process's Rss into the guest RAM mapping (the anonymous mapping whose size is
/// exactly `guest_bytes`) and the rest.
pub fn overhead(maps: &[Mapping], guest_bytes: u64) -> Result<Overhead, SmapsError> {
    let guest_kib = guest_bytes / 1024;
    let mut candidates: Vec<&Mapping> = maps
        .iter()
        .filter(|m| m.is_anonymous() && m.size_kib == guest_kib)
        .collect();
    candidates.sort_by_key(|m| std::cmp::Reverse(m.rss_kib));
    let Some(guest) = candidates.first() else {
        return Err(SmapsError::NoGuestMapping {
            guest_kib,
            mappings: maps.len(),
        });
    };
    let total: u64 = maps.iter().map(|m| m.rss_kib).sum();
    Ok(Overhead {
        total_rss_kib: total,
        guest_rss_kib: guest.rss_kib,
        overhead_kib: total - guest.rss_kib,
        guest_mapping: guest.describe(),
        ambiguous_with: candidates[1..].iter().map(|m| m.describe()).collect(),
        mappings: maps.len(),
    })
}

/// `VmHWM:` (peak resident set) from the text of `/proc/PID/status`, KiB.
pub fn vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
00400000-00800000 r-xp 00000000 00:1a 1234                               /payload/vmm
Size:               4096 kB
KernelPageSize:        4 kB
Rss:                2100 kB
Pss:                2100 kB
01000000-01100000 rw-p 00000000 00:00 0                                  [heap]
Size:               1024 kB
Rss:                 300 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:              101000 kB
7f1000000000-7f1000800000 rw-p 00000000 00:00 0 
Size:               8192 kB
Rss:                  40 kB
7f2000000000-7f2000001000 rw-s 00000000 00:0e 99                         /anon_inode:kvm-vcpu:0 (deleted)
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd wr sh mr mw me ms sd
";

    #[test]
    fn parses_headers_and_sizes() {
        let maps = parse(SAMPLE).unwrap();
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[0].path.as_deref(), Some("/payload/vmm"));
        assert_eq!((maps[0].size_kib, maps[0].rss_kib), (4096, 2100));
        assert_eq!(maps[1].path.as_deref(), Some("[heap]"));
        assert!(
            !maps[1].is_anonymous(),
            "[heap] is not a plain anonymous mapping"
        );
        assert!(maps[2].is_anonymous());
        assert_eq!(
            maps[4].path.as_deref(),
            Some("/anon_inode:kvm-vcpu:0 (deleted)")
        );
        assert!(!maps[4].is_anonymous());
    }

    #[test]
    fn guest_mapping_is_split_off() {
        let maps = parse(SAMPLE).unwrap();
        let o = overhead(&maps, 128 << 20).unwrap();
        assert_eq!(o.total_rss_kib, 2100 + 300 + 101000 + 40 + 4);
        assert_eq!(o.guest_rss_kib, 101000);
        assert_eq!(o.overhead_kib, 2100 + 300 + 40 + 4);
        assert!(o.guest_mapping.starts_with("7f0000000000-7f0008000000"));
        assert!(o.ambiguous_with.is_empty());
    }

    #[test]
    fn missing_guest_mapping_is_an_error() {
        let maps = parse(SAMPLE).unwrap();
        assert_eq!(
            overhead(&maps, 256 << 20),
            Err(SmapsError::NoGuestMapping {
                guest_kib: 262144,
                mappings: 5
            })
        );
    }

    #[test]
    fn several_candidates_take_the_largest_rss_and_say_so() {
        let text = "\
1000-2000 rw-p 00000000 00:00 0
Size: 4 kB
Rss: 1 kB
3000-4000 rw-p 00000000 00:00 0 [anon:guest]
Size: 4 kB
Rss: 4 kB
";
        let o = overhead(&parse(text).unwrap(), 4096).unwrap();
        assert_eq!(o.guest_rss_kib, 4);
        assert_eq!(o.overhead_kib, 1);
        assert_eq!(o.ambiguous_with.len(), 1);
    }

    #[test]
    fn bad_numbers_name_the_line() {
        let text = "1000-2000 rw-p 00000000 00:00 0\nRss: lots kB\n";
        assert!(matches!(
            parse(text),
            Err(SmapsError::BadField {
                line: 2,
                field: "Rss",
                ..
            })
        ));
        assert!(matches!(
            parse("1000-2000 rw-p\n"),
            Err(SmapsError::BadHeader { line: 1, .. })
        ));
    }

    #[test]
    fn hwm() {
        let status = "Name:\tvmm\nVmPeak:\t  1000 kB\nVmHWM:\t  5120 kB\nVmRSS:\t 4000 kB\n";
        assert_eq!(vm_hwm_kib(status), Some(5120));
        assert_eq!(vm_hwm_kib("Name: x\n"), None);
    }
}
