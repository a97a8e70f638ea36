//! DAMOS schemes over DAMON sysfs: what to do with regions of a given access pattern
//! (`pageout`, `stat`, ...), with quotas and filters, plus the counters and the regions the
//! kernel reports back (`stats/`, `tried_regions/`). Also virtual address space contexts
//! (`vaddr` operations) on a spare kdamond.
//!
//! Layout below a context (Linux 6.12, `Documentation/admin-guide/mm/damon/usage.rst`):
//!
//! ```text
//! schemes/nr_schemes
//! schemes/N/{action,apply_interval_us}
//! schemes/N/access_pattern/{sz,nr_accesses,age}/{min,max}
//! schemes/N/quotas/{ms,bytes,reset_interval_ms}
//! schemes/N/quotas/weights/{sz_permil,nr_accesses_permil,age_permil}
//! schemes/N/watermarks/{metric,interval_us,high,mid,low}
//! schemes/N/filters/nr_filters, filters/M/{type,matching,memcg_path,addr_start,addr_end}
//! schemes/N/stats/{nr_tried,sz_tried,nr_applied,sz_applied,qt_exceeds}
//! schemes/N/tried_regions/{total_bytes,M/{start,end,nr_accesses,age}}
//! ```
//!
//! Features are detected by the files that exist: `filters/` (Linux 6.3), `tried_regions/`
//! (6.2), `apply_interval_us` (6.7). A scheme that needs a missing one fails with
//! [`DamonError::MissingFeature`].

use serde::Serialize;

use super::sysfs::{DamonError, DamonSysfs};

/// What a scheme does to the regions it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DamosAction {
    /// Reclaim the pages (clean page cache is freed; anonymous memory needs swap).
    Pageout,
    /// Count only: stats and tried regions.
    Stat,
    /// Move to the head of the LRU (paddr).
    LruPrio,
    /// Move to the tail of the LRU (paddr).
    LruDeprio,
}

impl DamosAction {
    /// The kernel's word.
    pub fn as_str(self) -> &'static str {
        match self {
            DamosAction::Pageout => "pageout",
            DamosAction::Stat => "stat",
            DamosAction::LruPrio => "lru_prio",
            DamosAction::LruDeprio => "lru_deprio",
        }
    }
}

/// Which regions a scheme acts on. Ages count aggregation intervals, accesses count samples
/// per aggregation interval, as in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AccessPattern {
    /// Smallest region, bytes.
    pub sz_min_bytes: u64,
    /// Largest region, bytes.
    pub sz_max_bytes: u64,
    /// Fewest accesses seen in the last aggregation interval.
    pub nr_accesses_min: u64,
    /// Most accesses.
    pub nr_accesses_max: u64,
    /// Youngest age, in aggregation intervals.
    pub age_min_aggr: u64,
    /// Oldest age.
    pub age_max_aggr: u64,
}

impl AccessPattern {
    /// Every region.
    pub fn any() -> Self {
        AccessPattern {
            sz_min_bytes: 0,
            sz_max_bytes: u64::MAX,
            nr_accesses_min: 0,
            nr_accesses_max: u64::from(u32::MAX),
            age_min_aggr: 0,
            age_max_aggr: u64::from(u32::MAX),
        }
    }

    /// Regions not accessed in the last aggregation interval and unchanged for at least
    /// `cold_age_ms` (rounded up to whole aggregation intervals of `aggr_us`).
    pub fn cold(cold_age_ms: u64, aggr_us: u64) -> Self {
        AccessPattern {
            sz_min_bytes: 4096,
            nr_accesses_max: 0,
            age_min_aggr: cold_age_ms.saturating_mul(1000).div_ceil(aggr_us.max(1)),
            ..Self::any()
        }
    }
}

/// A scheme's quota: at most `bytes` (and `time_ms` of work) per `reset_interval_ms`; zero
/// means no limit. Under a quota the kernel acts on the highest-priority regions first
/// (for pageout: the coldest, by the weights).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Quota {
    /// CPU time per interval, ms.
    pub time_ms: u64,
    /// Bytes per interval.
    pub bytes: u64,
    /// The interval, ms.
    pub reset_interval_ms: u64,
}

/// A DAMOS filter: pages of `kind` are excluded when `matching` is true, pages not of `kind`
/// when it is false.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Filter {
    /// Filter type as the kernel names it: `anon`, `memcg`, `young`, `addr`, `unmapped`...
    pub kind: String,
    /// Exclude what matches (true) or what does not (false).
    pub matching: bool,
}

impl Filter {
    /// Excludes anonymous pages: without swap they cannot be paged out.
    pub fn spare_anon() -> Self {
        Filter {
            kind: "anon".into(),
            matching: true,
        }
    }

    /// Excludes pages accessed since DAMON last checked them (the kernel's `young` filter,
    /// Linux 6.10), so a pageout of a mostly idle region spares the hot pages inside it.
    /// DAMON's regions are coarse (about 1% of memory or more), so a region with a few hot
    /// pages among many cold ones can qualify as idle. The filter marks what it checks old, so a
    /// page untouched since the previous check goes at the scheme's next application. Linux
    /// 6.11+ installs it for `pageout` by itself; set explicitly it also works on 6.10 and says
    /// what the trimmer relies on.
    pub fn spare_young() -> Self {
        Filter {
            kind: "young".into(),
            matching: true,
        }
    }

    /// Excludes pages that some process maps (keeps only unmapped page cache eligible); needs
    /// a kernel with the `unmapped` filter type.
    pub fn only_unmapped() -> Self {
        Filter {
            kind: "unmapped".into(),
            matching: false,
        }
    }
}

/// One DAMOS scheme.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scheme {
    /// The action.
    pub action: DamosAction,
    /// Which regions.
    pub pattern: AccessPattern,
    /// Limits.
    pub quota: Quota,
    /// Page-level filters, in order.
    pub filters: Vec<Filter>,
}

impl Scheme {
    /// A `stat` scheme over every region: keeps the kernel's region list readable through
    /// `tried_regions` at no cost beyond counting.
    pub fn stat_all() -> Self {
        Scheme {
            action: DamosAction::Stat,
            pattern: AccessPattern::any(),
            quota: Quota::default(),
            filters: Vec::new(),
        }
    }
}

/// A scheme's counters (cumulative since the scheme was created).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SchemeStats {
    /// Regions the action was tried on.
    pub nr_tried: u64,
    /// Bytes of those regions.
    pub sz_tried_bytes: u64,
    /// Regions the action was applied to.
    pub nr_applied: u64,
    /// Bytes it was applied to (for pageout: reclaimed).
    pub sz_applied_bytes: u64,
    /// Times the quota was exceeded.
    pub qt_exceeds: u64,
}

/// A region the kernel last tried a scheme on, with DAMON's view of its access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TriedRegion {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Accesses in the last aggregation interval (samples).
    pub nr_accesses: u64,
    /// Aggregation intervals its access pattern has not changed.
    pub age_aggr: u64,
}

impl TriedRegion {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// Which optional parts of the scheme interface the kernel has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SchemeFeatures {
    /// `filters/`.
    pub filters: bool,
    /// `tried_regions/`.
    pub tried_regions: bool,
    /// `apply_interval_us`.
    pub apply_interval: bool,
}

/// Longest wait for the kernel to refill `tried_regions/` after an update request.
const TRIED_REGIONS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn ctx_dir(kdamond: u64) -> String {
    format!("kdamonds/{kdamond}/contexts/0")
}

impl DamonSysfs {
    /// Replaces the schemes of kdamond `kdamond`'s context with `schemes`. Works while it runs
    /// (then call [`DamonSysfs::commit_kdamond`]). Returns the features found.
    pub fn set_schemes(
        &self,
        kdamond: u64,
        schemes: &[Scheme],
    ) -> Result<SchemeFeatures, DamonError> {
        const OP: &str = "set DAMOS schemes";
        self.ensure_present(OP)?;
        let dir = format!("{}/schemes", ctx_dir(kdamond));
        let n = schemes.len() as u64;
        self.write_count(
            OP,
            &format!("{dir}/nr_schemes"),
            n,
            &format!("{dir}/{}", n.saturating_sub(1)),
        )?;
        let mut features = SchemeFeatures::default();
        for (i, s) in schemes.iter().enumerate() {
            features = self.write_scheme(OP, &format!("{dir}/{i}"), s)?;
        }
        tracing::debug!(kdamond, nr_schemes = n, "DAMOS schemes written");
        Ok(features)
    }

    fn write_scheme(
        &self,
        op: &'static str,
        dir: &str,
        s: &Scheme,
    ) -> Result<SchemeFeatures, DamonError> {
        let features = SchemeFeatures {
            filters: self.root().join(format!("{dir}/filters")).is_dir(),
            tried_regions: self.root().join(format!("{dir}/tried_regions")).is_dir(),
            apply_interval: self
                .root()
                .join(format!("{dir}/apply_interval_us"))
                .is_file(),
        };
        self.write(op, &format!("{dir}/action"), s.action.as_str())?;
        if features.apply_interval {
            // 0: apply every aggregation interval.
            self.write(op, &format!("{dir}/apply_interval_us"), "0")?;
        }
        let p = &s.pattern;
        for (file, v) in [
            ("sz/min", p.sz_min_bytes),
            ("sz/max", p.sz_max_bytes),
            ("nr_accesses/min", p.nr_accesses_min),
            ("nr_accesses/max", p.nr_accesses_max),
            ("age/min", p.age_min_aggr),
            ("age/max", p.age_max_aggr),
        ] {
            self.write(op, &format!("{dir}/access_pattern/{file}"), &v.to_string())?;
        }
        let q = &s.quota;
        for (file, v) in [
            ("ms", q.time_ms),
            ("bytes", q.bytes),
            ("reset_interval_ms", q.reset_interval_ms),
            // Coldest first under a quota: rank by access frequency and age, not size.
            ("weights/sz_permil", 0),
            ("weights/nr_accesses_permil", 1000),
            ("weights/age_permil", 1000),
        ] {
            self.write(op, &format!("{dir}/quotas/{file}"), &v.to_string())?;
        }
        // Watermarks off: the scheme is active whatever the free memory.
        self.write(op, &format!("{dir}/watermarks/metric"), "none")?;
        if s.filters.is_empty() {
            if features.filters {
                self.write(op, &format!("{dir}/filters/nr_filters"), "0")?;
            }
            return Ok(features);
        }
        if !features.filters {
            return Err(DamonError::MissingFeature {
                op,
                feature: "DAMOS filters (Linux 6.3)",
                path: self.root().join(format!("{dir}/filters")),
            });
        }
        let n = s.filters.len() as u64;
        self.write_count(
            op,
            &format!("{dir}/filters/nr_filters"),
            n,
            &format!("{dir}/filters/{}", n - 1),
        )?;
        for (i, f) in s.filters.iter().enumerate() {
            let fd = format!("{dir}/filters/{i}");
            // The kernel refuses a type it does not know (EINVAL): the error names the type.
            self.write(op, &format!("{fd}/type"), &f.kind)?;
            self.write(
                op,
                &format!("{fd}/matching"),
                if f.matching { "Y" } else { "N" },
            )?;
        }
        Ok(features)
    }

    /// Sends a command to kdamond `kdamond`'s `state` file (`commit`,
    /// `update_schemes_stats`, `update_schemes_tried_regions`, ...).
    pub fn kdamond_command(&self, kdamond: u64, command: &str) -> Result<(), DamonError> {
        const OP: &str = "send kdamond command";
        self.ensure_present(OP)?;
        self.write(OP, &format!("kdamonds/{kdamond}/state"), command)
    }

    /// Makes a running kdamond apply the configuration written since it started.
    pub fn commit_kdamond(&self, kdamond: u64) -> Result<(), DamonError> {
        self.kdamond_command(kdamond, "commit")
    }

    /// Asks the kernel to refresh, then reads, scheme `scheme`'s counters.
    pub fn scheme_stats(&self, kdamond: u64, scheme: u64) -> Result<SchemeStats, DamonError> {
        self.kdamond_command(kdamond, "update_schemes_stats")?;
        self.read_scheme_stats(kdamond, scheme)
    }

    /// Reads scheme `scheme`'s counters as the last refresh (of all schemes) left them.
    pub fn read_scheme_stats(&self, kdamond: u64, scheme: u64) -> Result<SchemeStats, DamonError> {
        const OP: &str = "read DAMOS scheme stats";
        let dir = format!("{}/schemes/{scheme}/stats", ctx_dir(kdamond));
        Ok(SchemeStats {
            nr_tried: self.read_u64(OP, &format!("{dir}/nr_tried"))?,
            sz_tried_bytes: self.read_u64(OP, &format!("{dir}/sz_tried"))?,
            nr_applied: self.read_u64(OP, &format!("{dir}/nr_applied"))?,
            sz_applied_bytes: self.read_u64(OP, &format!("{dir}/sz_applied"))?,
            qt_exceeds: self.read_u64(OP, &format!("{dir}/qt_exceeds"))?,
        })
    }

    /// Asks the kernel to record, then reads, the regions scheme `scheme` was last tried on
    /// (for a [`Scheme::stat_all`] scheme: every monitored region with its accesses and age).
    pub fn tried_regions(&self, kdamond: u64, scheme: u64) -> Result<Vec<TriedRegion>, DamonError> {
        const OP: &str = "read DAMOS tried regions";
        let dir = format!("{}/schemes/{scheme}/tried_regions", ctx_dir(kdamond));
        if !self.root().join(&dir).is_dir() {
            return Err(DamonError::MissingFeature {
                op: OP,
                feature: "DAMOS tried regions (Linux 6.2)",
                path: self.root().join(dir),
            });
        }
        self.kdamond_command(kdamond, "update_schemes_tried_regions")?;
        // The kernel clears the list and refills it while the kdamond next applies the
        // scheme: wait (bounded) for the first region to appear.
        let first = self.root().join(format!("{dir}/0"));
        let deadline = std::time::Instant::now() + TRIED_REGIONS_WAIT;
        while !first.is_dir() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut regions = Vec::new();
        for i in 0u64.. {
            let r = format!("{dir}/{i}");
            if !self.root().join(&r).is_dir() {
                break;
            }
            regions.push(TriedRegion {
                start: self.read_u64(OP, &format!("{r}/start"))?,
                end: self.read_u64(OP, &format!("{r}/end"))?,
                nr_accesses: self.read_u64(OP, &format!("{r}/nr_accesses"))?,
                age_aggr: self.read_u64(OP, &format!("{r}/age"))?,
            });
        }
        Ok(regions)
    }

    /// Configures (the stopped) kdamond `kdamond` to monitor the virtual address spaces of
    /// `pids` (`vaddr` operations, regions found by the kernel) with `attrs`, no schemes.
    pub fn setup_vaddr_monitor(
        &self,
        kdamond: u64,
        attrs: &super::MonitoringAttrs,
        pids: &[u32],
    ) -> Result<(), DamonError> {
        const OP: &str = "set up vaddr monitor";
        attrs.validate()?;
        self.ensure_present(OP)?;
        if pids.is_empty() {
            return Err(DamonError::InvalidAttrs {
                op: OP,
                field: "pids",
                reason: "at least one process is needed".into(),
            });
        }
        let nr = self.read_u64(OP, "kdamonds/nr_kdamonds")?;
        if kdamond >= nr {
            return Err(DamonError::Missing {
                op: OP,
                path: self.root().join(format!("kdamonds/{kdamond}")),
            });
        }
        if self.read_state(OP, kdamond)? == super::KdamondState::On {
            return Err(DamonError::Busy {
                op: OP,
                index: kdamond,
            });
        }
        let ctx = ctx_dir(kdamond);
        self.write_count(
            OP,
            &format!("kdamonds/{kdamond}/contexts/nr_contexts"),
            1,
            &ctx,
        )?;
        self.write_operations_and_attrs(OP, &ctx, "vaddr", attrs)?;
        let n = pids.len() as u64;
        self.write_count(
            OP,
            &format!("{ctx}/targets/nr_targets"),
            n,
            &format!("{ctx}/targets/{}", n - 1),
        )?;
        for (i, pid) in pids.iter().enumerate() {
            self.write(
                OP,
                &format!("{ctx}/targets/{i}/pid_target"),
                &pid.to_string(),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
