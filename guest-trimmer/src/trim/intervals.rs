//! DAMON's intervals for the duration of a trim: short ones while it runs (the pageout scheme
//! is applied, and DAMON's requests are answered, at aggregation boundaries: the trim waits
//! whole aggregation intervals), the daemon's idle ones back when it ends, also when a step
//! failed or the budget ran out ([`TrimIntervals`] puts them back on drop).
//!
//! The switch costs no request of its own: Linux before 6.14 answers each `commit` only at the
//! kdamond's next aggregation boundary and polls for the answer every 100 ms, so the trim's
//! intervals go in with the first physical memory pass's scheme commit and the idle ones with
//! the last pass's removal commit ([`PassIntervals`]). An extra commit is made only when no
//! pass left the idle intervals in force (a pass failed, or the budget skipped it).

use std::cell::Cell;
use std::time::Instant;

use serde::Serialize;

use crate::damon::{DamonSysfs, KdamondState, MonitoringAttrs};
use crate::trim::pageout::{InForce, PassIntervals, PADDR_KDAMOND};

/// What the switch did, for the trim report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IntervalsReport {
    /// Sampling interval during the trim, µs.
    pub sample_us: u64,
    /// Aggregation interval during the trim, µs.
    pub aggr_us: u64,
    /// The idle sampling interval put back, µs.
    pub idle_sample_us: u64,
    /// The idle aggregation interval put back, µs.
    pub idle_aggr_us: u64,
    /// Time of a commit of its own for the way back: 0 when the last pageout pass's removal
    /// commit put the idle intervals back.
    pub restore_ms: u64,
    /// Whether the way back needed writes of its own (and a commit, to a running kdamond).
    pub restore_commit: bool,
    /// Why putting the idle intervals back failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The trim's intervals for kdamond 0, and what is in force, until [`TrimIntervals::restore`]
/// or drop.
pub struct TrimIntervals<'a> {
    damon: &'a DamonSysfs,
    idle: MonitoringAttrs,
    /// The attributes physical memory passes run with.
    pub attrs: MonitoringAttrs,
    /// What kdamond 0 runs with now, as the passes' commits left it.
    pub in_force: InForce,
    report: IntervalsReport,
    done: bool,
}

fn ms_since(t: Instant) -> u64 {
    t.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
}

impl<'a> TrimIntervals<'a> {
    /// The trim's intervals (`sample_us`, `aggr_us`) instead of `idle`; nothing is written
    /// until a pass commits.
    pub fn new(damon: &'a DamonSysfs, idle: MonitoringAttrs, sample_us: u64, aggr_us: u64) -> Self {
        tracing::info!(sample_us, aggr_us, "DAMON trim intervals");
        TrimIntervals {
            damon,
            idle,
            attrs: MonitoringAttrs {
                sample_us,
                aggr_us,
                ..idle
            },
            in_force: Cell::new(Some(idle)),
            report: IntervalsReport {
                sample_us,
                aggr_us,
                idle_sample_us: idle.sample_us,
                idle_aggr_us: idle.aggr_us,
                ..IntervalsReport::default()
            },
            done: false,
        }
    }

    /// The intervals of a physical memory pass: the trim's while it runs; after it the idle
    /// ones when it is the trim's last pass, else the trim's.
    pub fn for_pass(&self, last: bool) -> PassIntervals {
        PassIntervals {
            during: self.attrs,
            after: if last { self.idle } else { self.attrs },
        }
    }

    /// Puts the idle intervals back if no pass did, and returns the report.
    pub fn restore(mut self) -> IntervalsReport {
        self.put_back();
        self.report.clone()
    }

    fn put_back(&mut self) {
        if std::mem::replace(&mut self.done, true) || self.in_force.get() == Some(self.idle) {
            return;
        }
        let t0 = Instant::now();
        let (sample_us, aggr_us) = (self.idle.sample_us, self.idle.aggr_us);
        // A stopped kdamond takes no commit; its files must still hold the idle intervals for
        // the next start.
        let result = match self.damon.state() {
            Ok(KdamondState::On) => self
                .damon
                .commit_intervals(PADDR_KDAMOND, sample_us, aggr_us),
            _ => self
                .damon
                .write_intervals(PADDR_KDAMOND, sample_us, aggr_us),
        };
        if let Err(e) = result {
            let e = crate::error_chain(&e);
            tracing::error!("putting DAMON's idle intervals back: {e}");
            self.report.error = Some(e);
        } else {
            self.in_force.set(Some(self.idle));
        }
        self.report.restore_commit = true;
        self.report.restore_ms = ms_since(t0);
    }
}

impl Drop for TrimIntervals<'_> {
    fn drop(&mut self) {
        self.put_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::fake;

    const DIR: &str = "sys/kernel/mm/damon/admin/kdamonds/0/contexts/0/monitoring_attrs/intervals";

    #[test]
    fn passes_carry_the_switch_and_the_way_back() {
        let f = fake();
        let idle = f.env.attrs;
        let aggr_file = f.read(&format!("{DIR}/aggr_us"));
        let t = TrimIntervals::new(&f.env.damon, idle, 500, 5_000);
        assert_eq!((t.attrs.sample_us, t.attrs.aggr_us), (500, 5_000));
        // Nothing is written up front.
        assert_eq!(f.read(&format!("{DIR}/aggr_us")), aggr_file);
        let first = t.for_pass(false);
        assert_eq!((first.during, first.after), (t.attrs, t.attrs));
        let last = t.for_pass(true);
        assert_eq!((last.during, last.after), (t.attrs, idle));
        // The last pass left the idle intervals in force: no commit of its own.
        t.in_force.set(Some(idle));
        let r = t.restore();
        assert!(!r.restore_commit, "{r:?}");
        assert_eq!(r.error, None);
        assert_eq!(f.read(&format!("{DIR}/aggr_us")), aggr_file);
    }

    #[test]
    fn puts_back_what_no_pass_did_also_on_drop() {
        let f = fake();
        // The fake's state file keeps the last command; a kernel reads back "on".
        std::fs::write(f.path("sys/kernel/mm/damon/admin/kdamonds/0/state"), "on\n").unwrap();
        let idle = f.env.attrs;
        let t = TrimIntervals::new(&f.env.damon, idle, 500, 5_000);
        t.in_force.set(Some(t.attrs));
        let r = t.restore();
        assert!(r.restore_commit, "{r:?}");
        assert_eq!(r.error, None);
        assert_eq!(f.read(&format!("{DIR}/aggr_us")), idle.aggr_us.to_string());
        assert_eq!(
            f.read(&format!("{DIR}/sample_us")),
            idle.sample_us.to_string()
        );
        assert_eq!(
            f.read("sys/kernel/mm/damon/admin/kdamonds/0/state"),
            "commit"
        );

        // Unknown (a commit failed): put back on drop as well.
        std::fs::write(f.path("sys/kernel/mm/damon/admin/kdamonds/0/state"), "on\n").unwrap();
        std::fs::write(f.path(&format!("{DIR}/aggr_us")), "5000").unwrap();
        let t = TrimIntervals::new(&f.env.damon, idle, 500, 5_000);
        t.in_force.set(None);
        drop(t);
        assert_eq!(f.read(&format!("{DIR}/aggr_us")), idle.aggr_us.to_string());
    }

    #[test]
    fn stopped_kdamond_gets_the_idle_intervals_written() {
        let f = fake();
        std::fs::write(
            f.path("sys/kernel/mm/damon/admin/kdamonds/0/state"),
            "off\n",
        )
        .unwrap();
        std::fs::write(f.path(&format!("{DIR}/aggr_us")), "5000").unwrap();
        let idle = f.env.attrs;
        let t = TrimIntervals::new(&f.env.damon, idle, 500, 5_000);
        t.in_force.set(None);
        let r = t.restore();
        assert_eq!(r.error, None);
        assert_eq!(f.read(&format!("{DIR}/aggr_us")), idle.aggr_us.to_string());
        // No commit to a stopped kdamond.
        assert_eq!(
            f.read("sys/kernel/mm/damon/admin/kdamonds/0/state"),
            "off\n"
        );
    }
}
