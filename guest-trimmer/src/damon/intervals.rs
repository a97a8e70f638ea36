//! Changing a running kdamond's sampling and aggregation intervals online (`commit`): the trim
//! runs with short intervals and puts the idle ones back afterwards. Linux (≥ 6.3,
//! `damon_update_monitoring_results`) rescales the regions' ages and access counts to the new
//! intervals, so ages built up since boot keep their meaning in time.

use super::sysfs::{DamonError, DamonSysfs};

impl DamonSysfs {
    /// Writes kdamond `kdamond`'s sampling and aggregation intervals and commits them; the
    /// kernel checks `sample_us <= aggr_us` when it applies the commit.
    pub fn commit_intervals(
        &self,
        kdamond: u64,
        sample_us: u64,
        aggr_us: u64,
    ) -> Result<(), DamonError> {
        self.write_intervals(kdamond, sample_us, aggr_us)?;
        self.commit_kdamond(kdamond)
    }

    /// Writes kdamond `kdamond`'s sampling and aggregation intervals without committing, so
    /// that they go in with the next commit (a scheme change): Linux before 6.14 answers every
    /// `commit` at the kdamond's next aggregation boundary and polls for the answer every
    /// 100 ms, so each commit saved is 100 ms or more off a trim.
    pub fn write_intervals(
        &self,
        kdamond: u64,
        sample_us: u64,
        aggr_us: u64,
    ) -> Result<(), DamonError> {
        const OP: &str = "change DAMON monitoring intervals";
        self.ensure_present(OP)?;
        let dir = format!("kdamonds/{kdamond}/contexts/0/monitoring_attrs/intervals");
        self.write(OP, &format!("{dir}/sample_us"), &sample_us.to_string())?;
        self.write(OP, &format!("{dir}/aggr_us"), &aggr_us.to_string())
    }
}

#[cfg(test)]
mod tests {
    use crate::test_utils::fake;

    #[test]
    fn writes_both_intervals_then_commits() {
        let f = fake();
        f.env.damon.commit_intervals(0, 2_000, 50_000).unwrap();
        let dir = "sys/kernel/mm/damon/admin/kdamonds/0/contexts/0/monitoring_attrs/intervals";
        assert_eq!(f.read(&format!("{dir}/sample_us")), "2000");
        assert_eq!(f.read(&format!("{dir}/aggr_us")), "50000");
        assert_eq!(
            f.read("sys/kernel/mm/damon/admin/kdamonds/0/state"),
            "commit"
        );
    }
}
