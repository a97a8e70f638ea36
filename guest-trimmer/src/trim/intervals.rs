//! DAMON's intervals for the duration of a trim: short ones while it runs (the pageout scheme
//! is applied, and DAMON's requests are answered, at aggregation boundaries: the trim waits
//! whole aggregation intervals), the daemon's idle ones back when it ends, also when a step
//! failed or the budget ran out ([`TrimIntervals`] puts them back on drop).

use std::time::Instant;

use serde::Serialize;

use crate::damon::{DamonSysfs, KdamondState, MonitoringAttrs};
use crate::trim::pageout::PADDR_KDAMOND;

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
    /// Time of the switch to the trim's intervals (one commit at the idle intervals).
    pub switch_ms: u64,
    /// Time of the switch back (one commit at the trim's intervals).
    pub restore_ms: u64,
    /// Why a switch failed (the trim then runs at the idle intervals).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Short intervals in force on kdamond 0 until [`TrimIntervals::restore`] or drop.
pub struct TrimIntervals<'a> {
    damon: &'a DamonSysfs,
    idle: MonitoringAttrs,
    /// The attributes in force now (the trim's if the switch worked, else the idle ones).
    pub attrs: MonitoringAttrs,
    report: IntervalsReport,
    switched: bool,
}

fn ms_since(t: Instant) -> u64 {
    t.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
}

impl<'a> TrimIntervals<'a> {
    /// Switches running kdamond 0 from `idle` to (`sample_us`, `aggr_us`). A failure is
    /// reported, not fatal: the trim runs at the idle intervals.
    pub fn switch(
        damon: &'a DamonSysfs,
        idle: MonitoringAttrs,
        sample_us: u64,
        aggr_us: u64,
    ) -> Self {
        let t0 = Instant::now();
        let mut report = IntervalsReport {
            sample_us,
            aggr_us,
            idle_sample_us: idle.sample_us,
            idle_aggr_us: idle.aggr_us,
            ..IntervalsReport::default()
        };
        let result = match damon.state() {
            Ok(KdamondState::On) => damon
                .commit_intervals(PADDR_KDAMOND, sample_us, aggr_us)
                .inspect_err(|_| {
                    // A partly written configuration must not stay for the next commit.
                    let _ = damon.commit_intervals(PADDR_KDAMOND, idle.sample_us, idle.aggr_us);
                }),
            Ok(_) => Err(crate::damon::DamonError::Parse {
                op: "change DAMON monitoring intervals",
                path: damon.root().join("kdamonds/0/state"),
                content: "off".into(),
                expected: "\"on\": DAMON monitoring of physical memory (started by the daemon)",
            }),
            Err(e) => Err(e),
        };
        report.switch_ms = ms_since(t0);
        let switched = match result {
            Ok(()) => true,
            Err(e) => {
                let e = crate::error_chain(&e);
                tracing::warn!("trim runs at DAMON's idle intervals: {e}");
                report.error = Some(e);
                false
            }
        };
        let attrs = if switched {
            MonitoringAttrs {
                sample_us,
                aggr_us,
                ..idle
            }
        } else {
            idle
        };
        tracing::info!(sample_us, aggr_us, switched, "DAMON trim intervals");
        TrimIntervals {
            damon,
            idle,
            attrs,
            report,
            switched,
        }
    }

    /// Puts the idle intervals back and returns the report.
    pub fn restore(mut self) -> IntervalsReport {
        self.put_back();
        self.report.clone()
    }

    fn put_back(&mut self) {
        if !self.switched {
            return;
        }
        self.switched = false;
        let t0 = Instant::now();
        if let Err(e) =
            self.damon
                .commit_intervals(PADDR_KDAMOND, self.idle.sample_us, self.idle.aggr_us)
        {
            let e = crate::error_chain(&e);
            tracing::error!("putting DAMON's idle intervals back: {e}");
            self.report.error = Some(format!("restore: {e}"));
        }
        self.report.restore_ms = ms_since(t0);
        self.attrs = self.idle;
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
    fn switches_and_puts_back_also_on_drop() {
        let f = fake();
        let idle = f.env.attrs;
        let t = TrimIntervals::switch(&f.env.damon, idle, 500, 5_000);
        assert_eq!((t.attrs.sample_us, t.attrs.aggr_us), (500, 5_000));
        assert_eq!(f.read(&format!("{DIR}/aggr_us")), "5000");
        let r = t.restore();
        assert_eq!(r.error, None);
        assert_eq!(f.read(&format!("{DIR}/aggr_us")), idle.aggr_us.to_string());
        assert_eq!(
            f.read(&format!("{DIR}/sample_us")),
            idle.sample_us.to_string()
        );

        // The fake's state file keeps the last command; a kernel reads back "on".
        std::fs::write(f.path("sys/kernel/mm/damon/admin/kdamonds/0/state"), "on\n").unwrap();
        let t = TrimIntervals::switch(&f.env.damon, idle, 500, 5_000);
        assert_eq!(f.read(&format!("{DIR}/aggr_us")), "5000");
        drop(t);
        assert_eq!(f.read(&format!("{DIR}/aggr_us")), idle.aggr_us.to_string());
    }

    #[test]
    fn stopped_kdamond_keeps_idle_intervals() {
        let f = fake();
        std::fs::write(
            f.path("sys/kernel/mm/damon/admin/kdamonds/0/state"),
            "off\n",
        )
        .unwrap();
        let idle = f.env.attrs;
        let t = TrimIntervals::switch(&f.env.damon, idle, 500, 5_000);
        assert_eq!(t.attrs, idle);
        let r = t.restore();
        assert!(r.error.as_deref().unwrap_or("").contains("off"), "{r:?}");
    }
}
