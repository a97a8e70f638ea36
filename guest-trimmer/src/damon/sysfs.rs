//! DAMON's sysfs interface (`/sys/kernel/mm/damon/admin`, kernel doc
//! `Documentation/admin-guide/mm/damon/usage.rst`).
//!
//! The trimmer uses one kdamond with one context monitoring physical memory (`paddr`
//! operations), started at boot so that region ages are meaningful at snapshot time; schemes
//! (pageout of cold regions) are added to that context by the trim pipeline.
//!
//! Layout used here (all below the admin root):
//!
//! ```text
//! kdamonds/nr_kdamonds
//! kdamonds/0/{state,pid}
//! kdamonds/0/contexts/nr_contexts
//! kdamonds/0/contexts/0/{avail_operations,operations}
//! kdamonds/0/contexts/0/monitoring_attrs/intervals/{sample_us,aggr_us,update_us}
//! kdamonds/0/contexts/0/monitoring_attrs/nr_regions/{min,max}
//! kdamonds/0/contexts/0/targets/nr_targets
//! kdamonds/0/contexts/0/targets/0/regions/nr_regions
//! kdamonds/0/contexts/0/targets/0/regions/N/{start,end}
//! kdamonds/0/contexts/0/schemes/nr_schemes
//! ```
//!
//! Writing an `nr_*` file makes the kernel create (or recreate, empty) the numbered
//! directories below it, so setup writes from the top down, and checks after each such write
//! that the directories exist. Values are validated by the kernel only when the kdamond is
//! turned on (or committed); [`MonitoringAttrs::validate`] checks the same rules first so that
//! a bad value fails before anything is written.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Where the kernel puts the DAMON sysfs admin directory.
pub const DEFAULT_DAMON_ADMIN_ROOT: &str = "/sys/kernel/mm/damon/admin";

/// Default path of the physical memory map used to find System RAM.
pub const DEFAULT_IOMEM_PATH: &str = "/proc/iomem";

/// Page size DAMON regions are aligned to.
const PAGE_SIZE_BYTES: u64 = 4096;

/// Errors of DAMON sysfs operations. Each names the operation (`op`) that failed.
#[derive(Debug, thiserror::Error)]
pub enum DamonError {
    /// No DAMON sysfs interface below the root.
    #[error(
        "{op}: DAMON sysfs interface not found ({} is missing): the kernel lacks \
         CONFIG_DAMON_SYSFS or sysfs is not mounted",
        path.display()
    )]
    Absent {
        /// Operation.
        op: &'static str,
        /// The file whose absence shows it.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("{op}: read {}", path.display())]
    Read {
        /// Operation.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A value could not be written (the kernel answers EINVAL, EBUSY, ...).
    #[error("{op}: write {value:?} to {}", path.display())]
    Write {
        /// Operation.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holds something unexpected.
    #[error("{op}: {} holds {content:?}, expected {expected}", path.display())]
    Parse {
        /// Operation.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What it holds.
        content: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The kernel did not create a directory after its `nr_*` file was written.
    #[error("{op}: {} does not exist after writing its count", path.display())]
    Missing {
        /// Operation.
        op: &'static str,
        /// The directory.
        path: PathBuf,
    },
    /// A kdamond is running, so the configuration cannot be rebuilt.
    #[error("{op}: kdamond {index} is running; stop it first")]
    Busy {
        /// Operation.
        op: &'static str,
        /// The running kdamond.
        index: u64,
    },
    /// The kernel does not offer the monitoring operations set needed.
    #[error("{op}: operations {wanted:?} not supported by this kernel (available: {available:?})")]
    Unsupported {
        /// Operation.
        op: &'static str,
        /// What was needed.
        wanted: &'static str,
        /// What the kernel offers.
        available: Vec<String>,
    },
    /// Monitoring attributes or regions break a DAMON rule.
    #[error("{op}: {field}: {reason}")]
    InvalidAttrs {
        /// Operation.
        op: &'static str,
        /// The offending attribute.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The kernel's DAMON sysfs lacks a feature (detected by the file that is missing).
    #[error("{op}: this kernel's DAMON lacks {feature} ({} is missing)", path.display())]
    MissingFeature {
        /// Operation.
        op: &'static str,
        /// The feature.
        feature: &'static str,
        /// The file whose absence shows it.
        path: PathBuf,
    },
    /// No System RAM range was found in the memory map.
    #[error(
        "{op}: no System RAM range in {} (reading real addresses needs root)",
        path.display()
    )]
    NoSystemRam {
        /// Operation.
        op: &'static str,
        /// The memory map file.
        path: PathBuf,
    },
}

/// Whether a kdamond runs, as read from its `state` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KdamondState {
    /// Monitoring (and applying schemes).
    On,
    /// Stopped.
    Off,
}

impl KdamondState {
    /// The word the kernel uses in the `state` file.
    pub fn as_str(self) -> &'static str {
        match self {
            KdamondState::On => "on",
            KdamondState::Off => "off",
        }
    }
}

impl std::fmt::Display for KdamondState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// DAMON's monitoring attributes: sampling intervals and region count bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MonitoringAttrs {
    /// Interval between access checks of a region's sampled page.
    pub sample_us: u64,
    /// Interval over which access counts are aggregated (ages advance per aggregation).
    pub aggr_us: u64,
    /// Interval between updates of the monitored address ranges.
    pub update_us: u64,
    /// Fewest regions DAMON splits memory into (at least 3).
    pub min_nr_regions: u64,
    /// Most regions DAMON keeps.
    pub max_nr_regions: u64,
}

impl Default for MonitoringAttrs {
    /// The kernel's defaults: 5 ms sampling, 100 ms aggregation, 1 s updates, 10..1000 regions.
    fn default() -> Self {
        MonitoringAttrs {
            sample_us: 5_000,
            aggr_us: 100_000,
            update_us: 1_000_000,
            min_nr_regions: 10,
            max_nr_regions: 1_000,
        }
    }
}

impl MonitoringAttrs {
    /// Checks the rules the kernel applies when the kdamond starts: non-zero sampling,
    /// `sample_us <= aggr_us`, `3 <= min_nr_regions <= max_nr_regions`.
    pub fn validate(&self) -> Result<(), DamonError> {
        let invalid = |field, reason: String| DamonError::InvalidAttrs {
            op: "validate monitoring attributes",
            field,
            reason,
        };
        if self.sample_us == 0 {
            return Err(invalid("sample_us", "must be at least 1, got 0".into()));
        }
        if self.aggr_us < self.sample_us {
            return Err(invalid(
                "aggr_us",
                format!(
                    "must be at least sample_us ({}), got {}",
                    self.sample_us, self.aggr_us
                ),
            ));
        }
        if self.update_us == 0 {
            return Err(invalid("update_us", "must be at least 1, got 0".into()));
        }
        if self.min_nr_regions < 3 {
            return Err(invalid(
                "min_nr_regions",
                format!("must be at least 3, got {}", self.min_nr_regions),
            ));
        }
        if self.max_nr_regions < self.min_nr_regions {
            return Err(invalid(
                "max_nr_regions",
                format!(
                    "must be at least min_nr_regions ({}), got {}",
                    self.min_nr_regions, self.max_nr_regions
                ),
            ));
        }
        Ok(())
    }
}

/// A physical address range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AddrRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Parses `/proc/iomem` text into its top-level "System RAM" ranges, page aligned inwards,
/// sorted, adjacent ranges merged. Ranges shown as all zero (read without root) are skipped.
pub fn parse_system_ram(text: &str) -> Vec<AddrRange> {
    let mut ranges: Vec<AddrRange> = text
        .lines()
        // Top-level entries are not indented.
        .filter(|line| !line.starts_with(' '))
        .filter_map(|line| {
            let (span, name) = line.split_once(" : ")?;
            if name.trim() != "System RAM" {
                return None;
            }
            let (start, last) = span.trim().split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let last = u64::from_str_radix(last, 16).ok()?;
            let start = start.checked_next_multiple_of(PAGE_SIZE_BYTES)?;
            let end = last.checked_add(1)? / PAGE_SIZE_BYTES * PAGE_SIZE_BYTES;
            (end > start).then_some(AddrRange { start, end })
        })
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<AddrRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(prev) if r.start <= prev.end => prev.end = prev.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// What [`DamonSysfs::status`] found, for `guest-trimmer damon-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DamonStatus {
    /// The admin root read.
    pub root: PathBuf,
    /// `kdamonds/nr_kdamonds`.
    pub nr_kdamonds: u64,
    /// Each kdamond.
    pub kdamonds: Vec<KdamondStatus>,
}

impl DamonStatus {
    /// The operations sets the kernel offers, from the first context that shows them; `None`
    /// when no context exists yet (see [`DamonSysfs::probe_operations`]).
    pub fn avail_operations(&self) -> Option<&[String]> {
        self.kdamonds
            .iter()
            .flat_map(|k| &k.contexts)
            .find_map(|c| c.avail_operations.as_deref())
    }
}

/// One kdamond's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KdamondStatus {
    /// Its index.
    pub index: u64,
    /// `state`.
    pub state: KdamondState,
    /// `pid` of the kernel thread while running.
    pub pid: Option<u32>,
    /// Its contexts.
    pub contexts: Vec<ContextStatus>,
}

/// One context's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContextStatus {
    /// Its index.
    pub index: u64,
    /// `operations`: the operations set in use.
    pub operations: String,
    /// `avail_operations` (Linux ≥ 5.19 or so); `None` where the file does not exist.
    pub avail_operations: Option<Vec<String>>,
    /// `monitoring_attrs`.
    pub monitoring_attrs: MonitoringAttrs,
    /// `targets/nr_targets`.
    pub nr_targets: u64,
    /// `schemes/nr_schemes`.
    pub nr_schemes: u64,
}

/// Handle on the DAMON sysfs admin directory. Holds paths only; every call reads or writes
/// the files anew.
#[derive(Debug)]
pub struct DamonSysfs {
    root: PathBuf,
    iomem_path: PathBuf,
    /// kdamonds [`DamonSysfs::setup_paddr_monitor`] creates: kdamond 0 monitors physical
    /// memory, the others stay off for vaddr passes (see [`DamonSysfs::with_spare_kdamonds`]).
    nr_kdamonds: u64,
    /// Writes done, as (path relative to the root, value), for tests to check their order.
    #[cfg(test)]
    journal: std::sync::Mutex<Vec<(String, String)>>,
}

impl DamonSysfs {
    /// A handle on the admin directory at `root` (normally [`DEFAULT_DAMON_ADMIN_ROOT`]),
    /// finding System RAM in [`DEFAULT_IOMEM_PATH`]. Nothing is read yet.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DamonSysfs {
            root: root.into(),
            iomem_path: PathBuf::from(DEFAULT_IOMEM_PATH),
            nr_kdamonds: 1,
            #[cfg(test)]
            journal: Default::default(),
        }
    }

    /// Uses `path` instead of `/proc/iomem` to find System RAM.
    pub fn with_iomem_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.iomem_path = path.into();
        self
    }

    /// Makes [`DamonSysfs::setup_paddr_monitor`] also create `spare` idle kdamonds (1, 2, ...)
    /// besides kdamond 0, for virtual address space passes: the number of kdamonds cannot
    /// change while kdamond 0 runs.
    pub fn with_spare_kdamonds(mut self, spare: u64) -> Self {
        self.nr_kdamonds = 1 + spare;
        self
    }

    /// Opens the admin directory at `root` after checking that DAMON sysfs is there.
    pub fn detect(root: impl Into<PathBuf>) -> Result<Self, DamonError> {
        let damon = Self::new(root);
        damon.ensure_present("detect DAMON")?;
        Ok(damon)
    }

    /// The admin root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads the whole configuration tree (read only).
    pub fn status(&self) -> Result<DamonStatus, DamonError> {
        const OP: &str = "read DAMON status";
        self.ensure_present(OP)?;
        let nr_kdamonds = self.read_u64(OP, "kdamonds/nr_kdamonds")?;
        let mut kdamonds = Vec::new();
        for k in 0..nr_kdamonds {
            let kd = format!("kdamonds/{k}");
            let state = self.read_state(OP, k)?;
            let pid = self.read_trimmed(OP, &format!("{kd}/pid"))?;
            let pid = pid.parse::<i64>().ok().and_then(|p| u32::try_from(p).ok());
            let nr_contexts = self.read_u64(OP, &format!("{kd}/contexts/nr_contexts"))?;
            let mut contexts = Vec::new();
            for c in 0..nr_contexts {
                let ctx = format!("{kd}/contexts/{c}");
                let avail_path = format!("{ctx}/avail_operations");
                let avail_operations = if self.root.join(&avail_path).exists() {
                    Some(self.read_words(OP, &avail_path)?)
                } else {
                    None
                };
                let attrs = format!("{ctx}/monitoring_attrs");
                contexts.push(ContextStatus {
                    index: c,
                    operations: self.read_trimmed(OP, &format!("{ctx}/operations"))?,
                    avail_operations,
                    monitoring_attrs: MonitoringAttrs {
                        sample_us: self.read_u64(OP, &format!("{attrs}/intervals/sample_us"))?,
                        aggr_us: self.read_u64(OP, &format!("{attrs}/intervals/aggr_us"))?,
                        update_us: self.read_u64(OP, &format!("{attrs}/intervals/update_us"))?,
                        min_nr_regions: self.read_u64(OP, &format!("{attrs}/nr_regions/min"))?,
                        max_nr_regions: self.read_u64(OP, &format!("{attrs}/nr_regions/max"))?,
                    },
                    nr_targets: self.read_u64(OP, &format!("{ctx}/targets/nr_targets"))?,
                    nr_schemes: self.read_u64(OP, &format!("{ctx}/schemes/nr_schemes"))?,
                });
            }
            kdamonds.push(KdamondStatus {
                index: k,
                state,
                pid,
                contexts,
            });
        }
        Ok(DamonStatus {
            root: self.root.clone(),
            nr_kdamonds,
            kdamonds,
        })
    }

    /// The operations sets the kernel supports (`vaddr`, `fvaddr`, `paddr`). The list lives
    /// in a context directory; when none exists, this creates kdamond 0 with one context to
    /// read it and then removes them again (writes: only call where DAMON is ours to manage).
    pub fn probe_operations(&self) -> Result<Vec<String>, DamonError> {
        const OP: &str = "probe DAMON operations";
        self.ensure_present(OP)?;
        let path = "kdamonds/0/contexts/0/avail_operations";
        let nr_kdamonds = self.read_u64(OP, "kdamonds/nr_kdamonds")?;
        if nr_kdamonds > 0 {
            if self.read_u64(OP, "kdamonds/0/contexts/nr_contexts")? > 0 {
                return self.read_words(OP, path);
            }
            // kdamond 0 exists without a context: adding one is harmless while it is off.
            self.ensure_all_off(OP)?;
            self.write_count(
                OP,
                "kdamonds/0/contexts/nr_contexts",
                1,
                "kdamonds/0/contexts/0",
            )?;
            return self.read_words(OP, path);
        }
        self.write_count(OP, "kdamonds/nr_kdamonds", 1, "kdamonds/0")?;
        self.write_count(
            OP,
            "kdamonds/0/contexts/nr_contexts",
            1,
            "kdamonds/0/contexts/0",
        )?;
        let ops = self.read_words(OP, path);
        self.write(OP, "kdamonds/nr_kdamonds", "0")?;
        ops
    }

    /// Configures kdamond 0 to monitor all System RAM (from the memory map) with the `paddr`
    /// operations and the given attributes, replacing any previous DAMON sysfs
    /// configuration. Does not start it; see [`DamonSysfs::start`].
    pub fn setup_paddr_monitor(
        &self,
        sample_us: u64,
        aggr_us: u64,
        update_us: u64,
        min_regions: u64,
        max_regions: u64,
    ) -> Result<(), DamonError> {
        const OP: &str = "set up paddr monitor";
        let attrs = MonitoringAttrs {
            sample_us,
            aggr_us,
            update_us,
            min_nr_regions: min_regions,
            max_nr_regions: max_regions,
        };
        attrs.validate()?;
        let text =
            std::fs::read_to_string(&self.iomem_path).map_err(|source| DamonError::Read {
                op: OP,
                path: self.iomem_path.clone(),
                source,
            })?;
        let regions = parse_system_ram(&text);
        if regions.is_empty() {
            return Err(DamonError::NoSystemRam {
                op: OP,
                path: self.iomem_path.clone(),
            });
        }
        self.setup_paddr_monitor_regions(&attrs, &regions)
    }

    /// Like [`DamonSysfs::setup_paddr_monitor`] with explicit regions (sorted,
    /// non-overlapping, page aligned physical ranges).
    ///
    /// Order of writes: check that no kdamond runs; `nr_kdamonds` = 1 (the kernel recreates
    /// kdamond 0 empty); `nr_contexts` = 1; check `avail_operations` offers `paddr`;
    /// `operations`; the three intervals; `nr_regions/min` and `max`; `nr_targets` = 1;
    /// the target's `regions/nr_regions`; each region's `start` then `end`.
    pub fn setup_paddr_monitor_regions(
        &self,
        attrs: &MonitoringAttrs,
        regions: &[AddrRange],
    ) -> Result<(), DamonError> {
        const OP: &str = "set up paddr monitor";
        attrs.validate().map_err(|e| match e {
            DamonError::InvalidAttrs { field, reason, .. } => DamonError::InvalidAttrs {
                op: OP,
                field,
                reason,
            },
            other => other,
        })?;
        validate_regions(OP, regions)?;
        self.ensure_present(OP)?;
        self.ensure_all_off(OP)?;

        let ctx = "kdamonds/0/contexts/0";
        self.write_count(
            OP,
            "kdamonds/nr_kdamonds",
            self.nr_kdamonds,
            &format!("kdamonds/{}", self.nr_kdamonds - 1),
        )?;
        self.write_count(OP, "kdamonds/0/contexts/nr_contexts", 1, ctx)?;
        self.write_operations_and_attrs(OP, ctx, "paddr", attrs)?;
        let target = format!("{ctx}/targets/0");
        self.write_count(OP, &format!("{ctx}/targets/nr_targets"), 1, &target)?;
        let regions_dir = format!("{target}/regions");
        self.write_count(
            OP,
            &format!("{regions_dir}/nr_regions"),
            regions.len() as u64,
            &format!("{regions_dir}/{}", regions.len().saturating_sub(1)),
        )?;
        for (i, r) in regions.iter().enumerate() {
            self.write(
                OP,
                &format!("{regions_dir}/{i}/start"),
                &r.start.to_string(),
            )?;
            self.write(OP, &format!("{regions_dir}/{i}/end"), &r.end.to_string())?;
        }
        tracing::info!(
            sample_us = attrs.sample_us,
            aggr_us = attrs.aggr_us,
            update_us = attrs.update_us,
            min_nr_regions = attrs.min_nr_regions,
            max_nr_regions = attrs.max_nr_regions,
            nr_ranges = regions.len(),
            "DAMON paddr monitor configured"
        );
        Ok(())
    }

    /// Starts kdamond 0 (`state` = `on`); the kernel validates the configuration now.
    pub fn start(&self) -> Result<(), DamonError> {
        self.set_state("start kdamond 0", 0, "on", KdamondState::On)
    }

    /// Stops kdamond 0 (`state` = `off`).
    pub fn stop(&self) -> Result<(), DamonError> {
        self.set_state("stop kdamond 0", 0, "off", KdamondState::Off)
    }

    /// Starts kdamond `index`.
    pub fn start_kdamond(&self, index: u64) -> Result<(), DamonError> {
        self.set_state("start kdamond", index, "on", KdamondState::On)
    }

    /// Stops kdamond `index`.
    pub fn stop_kdamond(&self, index: u64) -> Result<(), DamonError> {
        self.set_state("stop kdamond", index, "off", KdamondState::Off)
    }

    /// Makes a running kdamond 0 apply configuration written since it started
    /// (`state` = `commit`).
    pub fn commit(&self) -> Result<(), DamonError> {
        const OP: &str = "commit kdamond 0";
        self.ensure_present(OP)?;
        self.write(OP, "kdamonds/0/state", "commit")
    }

    /// State of kdamond 0.
    pub fn state(&self) -> Result<KdamondState, DamonError> {
        const OP: &str = "read kdamond 0 state";
        self.ensure_present(OP)?;
        self.read_state(OP, 0)
    }

    /// Writes (as relative path, value) done so far, oldest first.
    #[cfg(test)]
    pub(crate) fn journal(&self) -> Vec<(String, String)> {
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_state(
        &self,
        op: &'static str,
        index: u64,
        value: &str,
        expected: KdamondState,
    ) -> Result<(), DamonError> {
        self.ensure_present(op)?;
        let rel = format!("kdamonds/{index}/state");
        self.write(op, &rel, value)?;
        let state = self.read_state(op, index)?;
        if state != expected {
            return Err(DamonError::Parse {
                op,
                path: self.root.join(rel),
                content: state.to_string(),
                expected: if expected == KdamondState::On {
                    "\"on\" after starting"
                } else {
                    "\"off\" after stopping"
                },
            });
        }
        tracing::info!(state = value, index, "kdamond");
        Ok(())
    }

    /// In context directory `ctx`: checks that the kernel offers `ops` (where it lists what it
    /// offers), selects them, and writes the monitoring attributes.
    pub(crate) fn write_operations_and_attrs(
        &self,
        op: &'static str,
        ctx: &str,
        ops: &'static str,
        attrs: &MonitoringAttrs,
    ) -> Result<(), DamonError> {
        let avail_path = format!("{ctx}/avail_operations");
        if self.root.join(&avail_path).exists() {
            let available = self.read_words(op, &avail_path)?;
            if !available.iter().any(|o| o == ops) {
                return Err(DamonError::Unsupported {
                    op,
                    wanted: ops,
                    available,
                });
            }
        }
        self.write(op, &format!("{ctx}/operations"), ops)?;
        for (file, value) in [
            ("intervals/sample_us", attrs.sample_us),
            ("intervals/aggr_us", attrs.aggr_us),
            ("intervals/update_us", attrs.update_us),
            ("nr_regions/min", attrs.min_nr_regions),
            ("nr_regions/max", attrs.max_nr_regions),
        ] {
            self.write(
                op,
                &format!("{ctx}/monitoring_attrs/{file}"),
                &value.to_string(),
            )?;
        }
        Ok(())
    }

    pub(crate) fn ensure_present(&self, op: &'static str) -> Result<(), DamonError> {
        let path = self.root.join("kdamonds/nr_kdamonds");
        if path.is_file() {
            Ok(())
        } else {
            Err(DamonError::Absent { op, path })
        }
    }

    pub(crate) fn ensure_all_off(&self, op: &'static str) -> Result<(), DamonError> {
        let nr = self.read_u64(op, "kdamonds/nr_kdamonds")?;
        for index in 0..nr {
            if self.read_state(op, index)? == KdamondState::On {
                return Err(DamonError::Busy { op, index });
            }
        }
        Ok(())
    }

    pub(crate) fn read_state(
        &self,
        op: &'static str,
        index: u64,
    ) -> Result<KdamondState, DamonError> {
        let rel = format!("kdamonds/{index}/state");
        match self.read_trimmed(op, &rel)?.as_str() {
            "on" => Ok(KdamondState::On),
            "off" => Ok(KdamondState::Off),
            other => Err(DamonError::Parse {
                op,
                path: self.root.join(rel),
                content: other.to_string(),
                expected: "\"on\" or \"off\"",
            }),
        }
    }

    pub(crate) fn read_trimmed(&self, op: &'static str, rel: &str) -> Result<String, DamonError> {
        let path = self.root.join(rel);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().to_string()),
            Err(source) => Err(DamonError::Read { op, path, source }),
        }
    }

    pub(crate) fn read_words(
        &self,
        op: &'static str,
        rel: &str,
    ) -> Result<Vec<String>, DamonError> {
        Ok(self
            .read_trimmed(op, rel)?
            .split_whitespace()
            .map(str::to_string)
            .collect())
    }

    pub(crate) fn read_u64(&self, op: &'static str, rel: &str) -> Result<u64, DamonError> {
        let text = self.read_trimmed(op, rel)?;
        text.parse().map_err(|_| DamonError::Parse {
            op,
            path: self.root.join(rel),
            content: text,
            expected: "an unsigned integer",
        })
    }

    /// Writes `value` to an existing file (never creates one: a missing file is an error,
    /// which catches wrong names against a fake tree as it would against the kernel).
    pub(crate) fn write(&self, op: &'static str, rel: &str, value: &str) -> Result<(), DamonError> {
        let path = self.root.join(rel);
        let result = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()));
        if let Err(source) = result {
            return Err(DamonError::Write {
                op,
                path,
                value: value.to_string(),
                source,
            });
        }
        tracing::debug!(path = %path.display(), value, "DAMON sysfs write");
        #[cfg(test)]
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((rel.to_string(), value.to_string()));
        Ok(())
    }

    /// Writes an `nr_*` file and checks that the kernel created `expect_dir`.
    pub(crate) fn write_count(
        &self,
        op: &'static str,
        rel: &str,
        count: u64,
        expect_dir: &str,
    ) -> Result<(), DamonError> {
        self.write(op, rel, &count.to_string())?;
        let dir = self.root.join(expect_dir);
        if count > 0 && !dir.is_dir() {
            return Err(DamonError::Missing { op, path: dir });
        }
        Ok(())
    }
}

fn validate_regions(op: &'static str, regions: &[AddrRange]) -> Result<(), DamonError> {
    let invalid = |reason: String| DamonError::InvalidAttrs {
        op,
        field: "regions",
        reason,
    };
    if regions.is_empty() {
        return Err(invalid("at least one region is needed".into()));
    }
    for (i, r) in regions.iter().enumerate() {
        if r.start >= r.end {
            return Err(invalid(format!(
                "region {i} [{:#x}, {:#x}) is empty or reversed",
                r.start, r.end
            )));
        }
        if r.start % PAGE_SIZE_BYTES != 0 || r.end % PAGE_SIZE_BYTES != 0 {
            return Err(invalid(format!(
                "region {i} [{:#x}, {:#x}) is not aligned to {PAGE_SIZE_BYTES} bytes",
                r.start, r.end
            )));
        }
        if i > 0 && r.start < regions[i - 1].end {
            return Err(invalid(format!(
                "region {i} starts at {:#x}, before the end of region {} ({:#x})",
                r.start,
                i - 1,
                regions[i - 1].end
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IOMEM: &str = "\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-0009ffff : Reserved
000f0000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-1ffdffff : System RAM
  01000000-01e00b46 : Kernel code
  02000000-0263bfff : Kernel rodata
1ffe0000-1fffffff : Reserved
d0000000-d0000fff : LNRO0005:00
100000000-13fffffff : System RAM
";

    /// Writes `value` to `root/rel`, creating directories.
    fn put(root: &Path, rel: &str, value: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, value).unwrap();
    }

    fn get(root: &Path, rel: &str) -> String {
        std::fs::read_to_string(root.join(rel)).unwrap()
    }

    /// A fake admin tree as the kernel shows it with one kdamond, one context, one target and
    /// `nr_region_dirs` region directories (pre-created, since writing `nr_*` files in a plain
    /// directory creates nothing).
    fn fake_tree(root: &Path, nr_kdamonds: u64, nr_region_dirs: usize) {
        put(root, "kdamonds/nr_kdamonds", &format!("{nr_kdamonds}\n"));
        let kd = "kdamonds/0";
        put(root, &format!("{kd}/state"), "off\n");
        put(root, &format!("{kd}/pid"), "-1\n");
        put(root, &format!("{kd}/contexts/nr_contexts"), "1\n");
        let ctx = format!("{kd}/contexts/0");
        put(
            root,
            &format!("{ctx}/avail_operations"),
            "vaddr\nfvaddr\npaddr\n",
        );
        put(root, &format!("{ctx}/operations"), "vaddr\n");
        let attrs = format!("{ctx}/monitoring_attrs");
        put(root, &format!("{attrs}/intervals/sample_us"), "5000\n");
        put(root, &format!("{attrs}/intervals/aggr_us"), "100000\n");
        put(root, &format!("{attrs}/intervals/update_us"), "1000000\n");
        put(root, &format!("{attrs}/nr_regions/min"), "10\n");
        put(root, &format!("{attrs}/nr_regions/max"), "1000\n");
        put(root, &format!("{ctx}/targets/nr_targets"), "0\n");
        put(root, &format!("{ctx}/targets/0/pid_target"), "0\n");
        put(root, &format!("{ctx}/targets/0/regions/nr_regions"), "0\n");
        for i in 0..nr_region_dirs {
            put(root, &format!("{ctx}/targets/0/regions/{i}/start"), "0\n");
            put(root, &format!("{ctx}/targets/0/regions/{i}/end"), "0\n");
        }
        put(root, &format!("{ctx}/schemes/nr_schemes"), "0\n");
    }

    fn fake(nr_region_dirs: usize) -> (tempfile::TempDir, DamonSysfs) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("admin");
        fake_tree(&root, 1, nr_region_dirs);
        std::fs::write(dir.path().join("iomem"), IOMEM).unwrap();
        let damon = DamonSysfs::detect(&root)
            .unwrap()
            .with_iomem_path(dir.path().join("iomem"));
        (dir, damon)
    }

    #[test]
    fn system_ram_from_iomem() {
        assert_eq!(
            parse_system_ram(IOMEM),
            vec![
                AddrRange {
                    start: 0x1000,
                    end: 0x9f000
                },
                AddrRange {
                    start: 0x10_0000,
                    end: 0x1ffe_0000
                },
                AddrRange {
                    start: 0x1_0000_0000,
                    end: 0x1_4000_0000
                },
            ]
        );
        // Without root, the kernel shows zeros.
        assert!(parse_system_ram("00000000-00000000 : System RAM\n").is_empty());
        // Adjacent ranges merge; nested ones are ignored.
        assert_eq!(
            parse_system_ram(
                "00100000-001fffff : System RAM\n00200000-002fffff : System RAM\n  00300000-003fffff : System RAM\n"
            ),
            vec![AddrRange {
                start: 0x10_0000,
                end: 0x30_0000
            }]
        );
        assert!(parse_system_ram("garbage\nffff-zz : System RAM\n").is_empty());
    }

    #[test]
    fn absent_interface_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = DamonSysfs::detect(dir.path().join("admin")).unwrap_err();
        assert!(matches!(err, DamonError::Absent { .. }));
        let msg = err.to_string();
        assert!(
            msg.starts_with("detect DAMON: DAMON sysfs interface not found"),
            "{msg}"
        );
        assert!(msg.contains("CONFIG_DAMON_SYSFS"), "{msg}");
        let damon = DamonSysfs::new(dir.path());
        assert!(matches!(damon.start(), Err(DamonError::Absent { .. })));
        assert!(matches!(damon.status(), Err(DamonError::Absent { .. })));
    }

    #[test]
    fn status_reads_the_tree() {
        let (_dir, damon) = fake(0);
        let status = damon.status().unwrap();
        assert_eq!(status.nr_kdamonds, 1);
        let k = &status.kdamonds[0];
        assert_eq!((k.index, k.state, k.pid), (0, KdamondState::Off, None));
        let c = &k.contexts[0];
        assert_eq!(c.operations, "vaddr");
        assert_eq!(
            status.avail_operations().unwrap(),
            ["vaddr", "fvaddr", "paddr"]
        );
        assert_eq!(c.monitoring_attrs, MonitoringAttrs::default());
        assert_eq!((c.nr_targets, c.nr_schemes), (0, 0));
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["kdamonds"][0]["state"], "off");

        // No kdamond yet: nothing to list, operations unknown.
        put(damon.root(), "kdamonds/nr_kdamonds", "0\n");
        let status = damon.status().unwrap();
        assert!(status.kdamonds.is_empty());
        assert_eq!(status.avail_operations(), None);
    }

    #[test]
    fn setup_writes_the_right_files_in_order() {
        let (_dir, damon) = fake(3);
        damon
            .setup_paddr_monitor(5_000, 100_000, 1_000_000, 10, 1_000)
            .unwrap();
        let ctx = "kdamonds/0/contexts/0";
        let expected: Vec<(String, String)> = [
            ("kdamonds/nr_kdamonds".to_string(), "1"),
            ("kdamonds/0/contexts/nr_contexts".to_string(), "1"),
            (format!("{ctx}/operations"), "paddr"),
            (
                format!("{ctx}/monitoring_attrs/intervals/sample_us"),
                "5000",
            ),
            (
                format!("{ctx}/monitoring_attrs/intervals/aggr_us"),
                "100000",
            ),
            (
                format!("{ctx}/monitoring_attrs/intervals/update_us"),
                "1000000",
            ),
            (format!("{ctx}/monitoring_attrs/nr_regions/min"), "10"),
            (format!("{ctx}/monitoring_attrs/nr_regions/max"), "1000"),
            (format!("{ctx}/targets/nr_targets"), "1"),
            (format!("{ctx}/targets/0/regions/nr_regions"), "3"),
            (format!("{ctx}/targets/0/regions/0/start"), "4096"),
            (format!("{ctx}/targets/0/regions/0/end"), "651264"),
            (format!("{ctx}/targets/0/regions/1/start"), "1048576"),
            (format!("{ctx}/targets/0/regions/1/end"), "536739840"),
            (format!("{ctx}/targets/0/regions/2/start"), "4294967296"),
            (format!("{ctx}/targets/0/regions/2/end"), "5368709120"),
        ]
        .into_iter()
        .map(|(p, v)| (p, v.to_string()))
        .collect();
        assert_eq!(damon.journal(), expected);
        // The files hold exactly the values (old longer contents truncated).
        assert_eq!(get(damon.root(), &format!("{ctx}/operations")), "paddr");
        assert_eq!(
            get(
                damon.root(),
                &format!("{ctx}/monitoring_attrs/nr_regions/min")
            ),
            "10"
        );
        let status = damon.status().unwrap();
        assert_eq!(status.kdamonds[0].contexts[0].operations, "paddr");
        assert_eq!(status.kdamonds[0].contexts[0].nr_targets, 1);
    }

    #[test]
    fn start_stop_state() {
        let (_dir, damon) = fake(1);
        assert_eq!(damon.state().unwrap(), KdamondState::Off);
        damon.start().unwrap();
        assert_eq!(damon.state().unwrap(), KdamondState::On);
        // A running kdamond blocks reconfiguration, before anything is written.
        let before = damon.journal().len();
        let err = damon
            .setup_paddr_monitor(5_000, 100_000, 1_000_000, 10, 1_000)
            .unwrap_err();
        assert!(matches!(err, DamonError::Busy { index: 0, .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "set up paddr monitor: kdamond 0 is running; stop it first"
        );
        assert_eq!(damon.journal().len(), before);
        damon.commit().unwrap();
        // The fake keeps what was written; a real kernel reads back "on" after commit.
        put(damon.root(), "kdamonds/0/state", "on\n");
        damon.stop().unwrap();
        assert_eq!(damon.state().unwrap(), KdamondState::Off);
        assert_eq!(
            damon
                .journal()
                .iter()
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>(),
            ["on", "commit", "off"]
        );
    }

    #[test]
    fn start_reports_a_failed_write() {
        let (_dir, damon) = fake(1);
        // A state file that cannot be written (a directory), as when the kernel refuses.
        let state = damon.root().join("kdamonds/0/state");
        std::fs::remove_file(&state).unwrap();
        std::fs::create_dir(&state).unwrap();
        let err = damon.start().unwrap_err();
        assert!(matches!(err, DamonError::Write { .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with("start kdamond 0: write \"on\" to "));
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn bad_state_content() {
        let (_dir, damon) = fake(1);
        put(damon.root(), "kdamonds/0/state", "sleepy\n");
        let err = damon.state().unwrap_err();
        assert!(
            err.to_string()
                .ends_with("holds \"sleepy\", expected \"on\" or \"off\""),
            "{err}"
        );
    }

    #[test]
    fn invalid_attrs_fail_before_writing() {
        let (_dir, damon) = fake(3);
        let cases = [
            (
                (0, 100_000, 1_000_000, 10, 1_000),
                "sample_us: must be at least 1, got 0",
            ),
            (
                (5_000, 1_000, 1_000_000, 10, 1_000),
                "aggr_us: must be at least sample_us (5000), got 1000",
            ),
            (
                (5_000, 100_000, 0, 10, 1_000),
                "update_us: must be at least 1, got 0",
            ),
            (
                (5_000, 100_000, 1_000_000, 2, 1_000),
                "min_nr_regions: must be at least 3, got 2",
            ),
            (
                (5_000, 100_000, 1_000_000, 10, 9),
                "max_nr_regions: must be at least min_nr_regions (10), got 9",
            ),
        ];
        for ((s, a, u, min, max), expected) in cases {
            let err = damon.setup_paddr_monitor(s, a, u, min, max).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("validate monitoring attributes: {expected}")
            );
        }
        let attrs = MonitoringAttrs::default();
        let bad_regions: [&[AddrRange]; 4] = [
            &[],
            &[AddrRange {
                start: 8192,
                end: 4096,
            }],
            &[AddrRange {
                start: 1,
                end: 4096,
            }],
            &[
                AddrRange {
                    start: 0,
                    end: 8192,
                },
                AddrRange {
                    start: 4096,
                    end: 16384,
                },
            ],
        ];
        for regions in bad_regions {
            let err = damon
                .setup_paddr_monitor_regions(&attrs, regions)
                .unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("set up paddr monitor: regions: "),
                "{err}"
            );
        }
        assert!(damon.journal().is_empty());
    }

    #[test]
    fn unsupported_operations() {
        let (_dir, damon) = fake(3);
        put(
            damon.root(),
            "kdamonds/0/contexts/0/avail_operations",
            "vaddr\nfvaddr\n",
        );
        let err = damon
            .setup_paddr_monitor(5_000, 100_000, 1_000_000, 10, 1_000)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "set up paddr monitor: operations \"paddr\" not supported by this kernel \
             (available: [\"vaddr\", \"fvaddr\"])"
        );
        // Stopped before choosing operations.
        assert!(!damon
            .journal()
            .iter()
            .any(|(p, _)| p.ends_with("operations")));
    }

    #[test]
    fn missing_region_dirs_are_reported() {
        // Three System RAM ranges but only one region directory: as if the kernel had not
        // created the others.
        let (_dir, damon) = fake(1);
        let err = damon
            .setup_paddr_monitor(5_000, 100_000, 1_000_000, 10, 1_000)
            .unwrap_err();
        assert!(matches!(err, DamonError::Missing { .. }), "{err}");
        assert!(
            err.to_string().contains("regions/2 does not exist"),
            "{err}"
        );
    }

    #[test]
    fn no_system_ram() {
        let (dir, damon) = fake(3);
        std::fs::write(dir.path().join("iomem"), "00000000-00000000 : System RAM\n").unwrap();
        let err = damon
            .setup_paddr_monitor(5_000, 100_000, 1_000_000, 10, 1_000)
            .unwrap_err();
        assert!(matches!(err, DamonError::NoSystemRam { .. }), "{err}");
        let damon = damon.with_iomem_path(dir.path().join("nope"));
        let err = damon
            .setup_paddr_monitor(5_000, 100_000, 1_000_000, 10, 1_000)
            .unwrap_err();
        assert!(matches!(err, DamonError::Read { .. }), "{err}");
    }

    #[test]
    fn probe_operations_reads_or_creates_a_context() {
        let (_dir, damon) = fake(0);
        assert_eq!(
            damon.probe_operations().unwrap(),
            ["vaddr", "fvaddr", "paddr"]
        );
        assert!(damon.journal().is_empty());

        // With no kdamond, the probe creates one and removes it again.
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path(), 0, 0);
        let damon = DamonSysfs::detect(dir.path()).unwrap();
        assert_eq!(
            damon.probe_operations().unwrap(),
            ["vaddr", "fvaddr", "paddr"]
        );
        let values: Vec<_> = damon.journal().into_iter().map(|(_, v)| v).collect();
        assert_eq!(values, ["1", "1", "0"]);
        assert_eq!(get(dir.path(), "kdamonds/nr_kdamonds"), "0");

        // A kdamond without a context gets one.
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path(), 1, 0);
        put(dir.path(), "kdamonds/0/contexts/nr_contexts", "0\n");
        let damon = DamonSysfs::detect(dir.path()).unwrap();
        assert_eq!(
            damon.probe_operations().unwrap(),
            ["vaddr", "fvaddr", "paddr"]
        );
        assert_eq!(
            damon.journal(),
            [(
                "kdamonds/0/contexts/nr_contexts".to_string(),
                "1".to_string()
            )]
        );
    }
}
