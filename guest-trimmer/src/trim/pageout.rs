//! DAMON-guided pageout passes: install a DAMOS `pageout` scheme for regions cold for at least
//! the cold age, let the running kdamond apply it until nothing more is paged out (or the time
//! bound), then remove it again so monitoring goes on unchanged.
//!
//! Physical memory passes use kdamond 0, which the daemon started at boot (so region ages are
//! known); the scheme is added with `commit`, which keeps the regions and their ages. A pass
//! makes two commits (install, removal) and usually two counter refreshes: each is a request
//! that Linux before 6.14 answers after 100 ms at the soonest, so the trim's interval switch
//! rides on them ([`PassIntervals`]) rather than costing commits of its own.
//! Virtual address space passes (processes named by pid files) configure and start the spare
//! kdamond 1 for the duration of the pass: their ages start at zero.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::damon::{
    AccessPattern, DamonError, DamonSysfs, Filter, KdamondState, MonitoringAttrs, Quota, Scheme,
    SchemeStats,
};

/// The kdamond monitoring physical memory from boot.
pub const PADDR_KDAMOND: u64 = 0;
/// The spare kdamond for virtual address space passes.
pub const VADDR_KDAMOND: u64 = 1;
/// Polls with unchanged counters after which a pass counts as finished. Regions an action was
/// applied to restart at age zero, so once every cold region was tried the counters stop.
const STABLE_POLLS: u32 = 1;

/// What kdamond 0 runs with as far as this process knows; `None` while a commit's outcome is
/// unknown (it failed, or is under way).
pub type InForce = std::cell::Cell<Option<MonitoringAttrs>>;

/// kdamond 0's intervals for a physical memory pass: committed with its scheme (`during`) and
/// with the scheme's removal (`after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassIntervals {
    /// While the pass runs.
    pub during: MonitoringAttrs,
    /// Once it is over.
    pub after: MonitoringAttrs,
}

impl PassIntervals {
    /// The same intervals throughout (no trim intervals).
    pub fn unchanged(attrs: MonitoringAttrs) -> Self {
        PassIntervals {
            during: attrs,
            after: attrs,
        }
    }
}

/// What a pass does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageoutParams {
    /// Regions idle at least this long.
    pub cold_age_ms: u64,
    /// Bytes per `reset_interval_ms`, coldest first; `None` = no limit.
    pub quota_bytes: Option<u64>,
    /// The quota's interval.
    pub reset_interval_ms: u64,
    /// Exclude anonymous pages.
    pub spare_anon: bool,
    /// Only page cache no process maps.
    pub only_unmapped: bool,
    /// Bound on the pass.
    pub max_duration: Duration,
    /// Processes whose virtual address spaces to page out; empty = physical memory.
    pub pids: Vec<u32>,
    /// The aggregation interval the kdamond actually achieves (see [`achieved_aggr_us`]); ages
    /// are converted from `cold_age_ms` with it. `None`: the configured interval.
    pub achieved_aggr_us: Option<u64>,
}

/// The aggregation interval kdamond 0 really achieved since monitoring started `monitoring_ms`
/// ago, from the oldest region's age (memory untouched since then ages once per
/// aggregation). A loaded or emulated guest runs fewer aggregations than configured; converting
/// a cold age with the configured interval would then ask for more aggregations than have
/// passed and nothing would ever be cold. Never shorter than `configured_us`; `None` while
/// monitoring is too young (under 2 s) or no region has aged.
pub fn achieved_aggr_us(
    ages_aggr: impl IntoIterator<Item = u64>,
    monitoring_ms: u64,
    configured_us: u64,
) -> Option<u64> {
    let oldest = ages_aggr.into_iter().max().filter(|&a| a > 0)?;
    if monitoring_ms < 2_000 {
        return None;
    }
    Some((monitoring_ms.saturating_mul(1000) / oldest).max(configured_us))
}

/// What a pass did, from the scheme's counters.
#[derive(Debug, Clone, Serialize)]
pub struct PageoutOutcome {
    /// `paddr` or `vaddr`.
    pub operations: &'static str,
    /// Whether pages accessed since DAMON's last check were spared (the `young` filter).
    pub spare_young: bool,
    /// The scheme's minimum age, in aggregation intervals.
    pub age_min_aggr: u64,
    /// The aggregation interval ages were converted with (the achieved one, when known).
    pub aggr_us: u64,
    /// The scheme's counters at the end.
    pub stats: SchemeStats,
    /// Whether the counters stopped moving before the bound.
    pub converged: bool,
    /// Polls of the counters.
    pub polls: u32,
}

impl PageoutParams {
    fn aggr_us(&self, attrs: &MonitoringAttrs) -> u64 {
        self.achieved_aggr_us
            .unwrap_or(attrs.aggr_us)
            .max(attrs.aggr_us)
    }

    fn scheme(&self, attrs: &MonitoringAttrs) -> Scheme {
        let mut filters = Vec::new();
        if self.spare_anon {
            filters.push(Filter::spare_anon());
        }
        if self.only_unmapped {
            filters.push(Filter::only_unmapped());
        }
        Scheme {
            action: crate::damon::DamosAction::Pageout,
            pattern: AccessPattern::cold(self.cold_age_ms, self.aggr_us(attrs)),
            quota: Quota {
                time_ms: 0,
                bytes: self.quota_bytes.unwrap_or(0),
                reset_interval_ms: if self.quota_bytes.is_some() {
                    self.reset_interval_ms.max(1)
                } else {
                    0
                },
            },
            filters,
        }
    }
}

/// Runs one pass. For physical memory kdamond 0 must be running with `base` (the schemes it
/// runs outside trims) as its schemes; they are restored afterwards, also on failure, with
/// `intervals.after`; `in_force` follows the commits.
pub fn pageout_pass(
    damon: &DamonSysfs,
    intervals: &PassIntervals,
    in_force: &InForce,
    base: &[Scheme],
    p: &PageoutParams,
) -> Result<PageoutOutcome, DamonError> {
    let attrs = &intervals.during;
    let scheme = p.scheme(attrs);
    if p.pids.is_empty() {
        if damon.state()? != KdamondState::On {
            return Err(DamonError::Parse {
                op: "DAMON pageout",
                path: damon.root().join("kdamonds/0/state"),
                content: "off".into(),
                expected: "\"on\": DAMON monitoring of physical memory (started by the daemon)",
            });
        }
        // Schemes and intervals go in with one commit; intervals already in force are not
        // written again.
        let written = std::cell::Cell::new(in_force.get());
        let commit = |schemes: &[Scheme], attrs: &MonitoringAttrs| -> Result<(), DamonError> {
            if written.get() != Some(*attrs) {
                in_force.set(None);
                damon.write_intervals(PADDR_KDAMOND, attrs.sample_us, attrs.aggr_us)?;
                written.set(Some(*attrs));
            }
            damon.set_schemes(PADDR_KDAMOND, schemes)?;
            damon.commit_kdamond(PADDR_KDAMOND)?;
            in_force.set(Some(*attrs));
            Ok(())
        };
        let index = base.len() as u64;
        // Spare pages accessed since the last check; a kernel without the `young` filter type
        // (before 6.10) refuses it: page out by region then.
        let mut spared = scheme.clone();
        spared.filters.push(Filter::spare_young());
        let mut spare_young = true;
        let with_young = [base, std::slice::from_ref(&spared)].concat();
        if let Err(e) = commit(&with_young, attrs) {
            tracing::warn!(
                "DAMON refused the `young` filter, paging out whole idle regions: {}",
                crate::error_chain(&e)
            );
            spare_young = false;
            let schemes = [base, std::slice::from_ref(&scheme)].concat();
            commit(&schemes, attrs)?;
        }
        let result = watch(damon, PADDR_KDAMOND, index, p.aggr_us(attrs), p, 0, Some(0));
        let restored = commit(base, &intervals.after);
        let (stats, converged, polls) = result?;
        restored?;
        Ok(PageoutOutcome {
            spare_young,
            operations: "paddr",
            age_min_aggr: scheme.pattern.age_min_aggr,
            aggr_us: p.aggr_us(attrs),
            stats,
            converged,
            polls,
        })
    } else {
        damon.setup_vaddr_monitor(VADDR_KDAMOND, attrs, &p.pids)?;
        damon.set_schemes(VADDR_KDAMOND, std::slice::from_ref(&scheme))?;
        damon.start_kdamond(VADDR_KDAMOND)?;
        // Ages start at zero: nothing is cold before the cold age has passed; wait twice that
        // (the kdamond's aggregations lag wall time on a loaded guest).
        let min_wait_ms = p.cold_age_ms.saturating_mul(2);
        let result = watch(
            damon,
            VADDR_KDAMOND,
            0,
            p.aggr_us(attrs),
            p,
            min_wait_ms,
            None,
        );
        let stopped = damon.stop_kdamond(VADDR_KDAMOND);
        let (stats, converged, polls) = result?;
        stopped?;
        Ok(PageoutOutcome {
            spare_young: false,
            operations: "vaddr",
            age_min_aggr: scheme.pattern.age_min_aggr,
            aggr_us: p.aggr_us(attrs),
            stats,
            converged,
            polls,
        })
    }
}

/// Polls scheme `index`'s counters until a whole apply pass is seen (physical memory), or until
/// they stop moving (after `min_wait_ms` and at least two aggregation intervals), or until
/// `p.max_duration`. The kernel refreshes the counters when asked, at the kdamond's next
/// sampling, and the asking `write` returns after 100 ms at the soonest (Linux < 6.14), so
/// each poll takes that by itself; the sleep between polls is short. `aggr_us` is the
/// kdamond's achieved aggregation interval. The scheme is new: its counters start at zero, no
/// refresh is spent on reading them first.
///
/// Counters that never left zero prove nothing by standing still: the kdamond may not have
/// applied the scheme yet (a loaded kdamond runs aggregations late, and the scheme is removed
/// at the next aggregation boundary before that boundary's apply). With `base` (the index of a
/// scheme that matches every region, the daemon's `stat` scheme), zero counters count as
/// converged only once `base` was tried again since the first poll: an apply pass ran and
/// nothing matched.
fn watch(
    damon: &DamonSysfs,
    kdamond: u64,
    index: u64,
    aggr_us: u64,
    p: &PageoutParams,
    min_wait_ms: u64,
    base: Option<u64>,
) -> Result<(SchemeStats, bool, u32), DamonError> {
    let t0 = Instant::now();
    let max = p.max_duration;
    let poll = Duration::from_micros(aggr_us).max(Duration::from_millis(10));
    let min_wait = (poll * 2).max(Duration::from_millis(min_wait_ms));
    let mut last = SchemeStats::default();
    let base_tried = |d: &DamonSysfs| -> Result<Option<u64>, DamonError> {
        base.map(|b| d.read_scheme_stats(kdamond, b).map(|s| s.nr_tried))
            .transpose()
    };
    let mut base0 = None;
    let (mut stable, mut polls) = (0u32, 0u32);
    loop {
        let left = max.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Ok((last, false, polls));
        }
        std::thread::sleep((poll / 4).min(left));
        let now = damon.scheme_stats(kdamond, index)?;
        polls += 1;
        let moved = now.sz_tried_bytes != last.sz_tried_bytes
            || now.sz_applied_bytes != last.sz_applied_bytes
            || now.nr_tried != last.nr_tried;
        stable = if moved { 0 } else { stable + 1 };
        last = now;
        let base_now = base_tried(damon)?;
        let base_moved = match base0 {
            None => {
                base0 = Some(base_now);
                false
            }
            Some(b0) => b0 != base_now,
        };
        let applied = last.nr_tried > 0 || base_moved;
        // One apply pass tries every region that is cold at that moment, and the regions it
        // acted on restart at age zero: a physical memory pass that tried something without
        // ever hitting its quota has done its work. The counters are refreshed between two
        // kdamond iterations, never halfway through a pass.
        // (The kernel counts `qt_exceeds` only when a quota window ends: compare with the
        // quota too.)
        let whole_pass = base.is_some()
            && last.nr_tried > 0
            && last.qt_exceeds == 0
            && p.quota_bytes.is_none_or(|q| last.sz_tried_bytes < q);
        if whole_pass && t0.elapsed() >= Duration::from_millis(min_wait_ms) {
            return Ok((last, true, polls));
        }
        if stable >= STABLE_POLLS && t0.elapsed() >= min_wait && applied {
            return Ok((last, true, polls));
        }
    }
}
