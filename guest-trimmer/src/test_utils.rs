//! A fake guest for unit tests: /proc and /sys trees as the trimmer reads them, with DAMON
//! sysfs (kdamond 0 running paddr, a stopped spare kdamond 1).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::damon::MonitoringAttrs;
use crate::meminfo::fixtures::{MEMINFO, VMSTAT};
use crate::trim::TrimEnv;

const BUDDYINFO: &str = "Node 0, zone DMA32 10 10 10 10 10 10 10 10 10 3 20\n";

pub(crate) struct Fake {
    pub dir: tempfile::TempDir,
    pub env: TrimEnv,
}

impl Fake {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }
}

pub(crate) fn put(root: &Path, rel: &str, value: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, value).unwrap();
}

/// Fake /proc and /sys with a running kdamond 0 (paddr, 2 scheme directories) and a stopped
/// kdamond 1.
pub(crate) fn fake() -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let proc_root = dir.path().join("proc");
    let sys_root = dir.path().join("sys");
    put(&proc_root, "meminfo", MEMINFO);
    put(&proc_root, "vmstat", VMSTAT);
    put(&proc_root, "buddyinfo", BUDDYINFO);
    put(&proc_root, "iomem", "00100000-1ffdffff : System RAM\n");
    put(&proc_root, "sys/vm/drop_caches", "0");
    put(&proc_root, "sys/vm/compact_memory", "0");
    put(
        &sys_root,
        "module/page_reporting/parameters/page_reporting_order",
        "9\n",
    );
    let admin = sys_root.join("kernel/mm/damon/admin");
    put(&admin, "kdamonds/nr_kdamonds", "2\n");
    for k in 0..2 {
        let kd = format!("kdamonds/{k}");
        put(
            &admin,
            &format!("{kd}/state"),
            if k == 0 { "on\n" } else { "off\n" },
        );
        put(&admin, &format!("{kd}/contexts/nr_contexts"), "1\n");
        let ctx = format!("{kd}/contexts/0");
        put(&admin, &format!("{ctx}/avail_operations"), "vaddr\npaddr\n");
        put(&admin, &format!("{ctx}/operations"), "paddr\n");
        put(&admin, &format!("{ctx}/schemes/nr_schemes"), "1\n");
        put(&admin, &format!("{ctx}/targets/nr_targets"), "0\n");
        put(&admin, &format!("{ctx}/targets/0/pid_target"), "0\n");
        put(
            &admin,
            &format!("{ctx}/targets/0/regions/nr_regions"),
            "0\n",
        );
        put(&admin, &format!("{ctx}/targets/0/regions/0/start"), "0\n");
        put(&admin, &format!("{ctx}/targets/0/regions/0/end"), "0\n");
        for a in [
            "intervals/sample_us",
            "intervals/aggr_us",
            "intervals/update_us",
            "nr_regions/min",
            "nr_regions/max",
        ] {
            put(&admin, &format!("{ctx}/monitoring_attrs/{a}"), "0\n");
        }
        for s in 0..2 {
            fake_scheme_dir(&admin, &format!("{ctx}/schemes/{s}"), Some(1), [3; 5]);
        }
    }
    let mut env = TrimEnv::new(
        &proc_root,
        &sys_root,
        MonitoringAttrs {
            sample_us: 1_000,
            aggr_us: 10_000,
            ..MonitoringAttrs::default()
        },
    );
    env.reporting_delay = Duration::ZERO;
    env.hooks_dir = dir.path().join("run/guest-trimmer/hooks.d");
    Fake { dir, env }
}

/// One scheme directory `sd` below `root` as the kernel creates it: `filters` filter
/// directories (`None`: no `filters/` at all, a kernel before 6.3) and `stats` for `nr_tried`,
/// `sz_tried`, `nr_applied`, `sz_applied`, `qt_exceeds`.
pub(crate) fn fake_scheme_dir(root: &Path, sd: &str, filters: Option<usize>, stats: [u64; 5]) {
    put(root, &format!("{sd}/action"), "stat\n");
    put(root, &format!("{sd}/apply_interval_us"), "0\n");
    for f in ["sz", "nr_accesses", "age"] {
        put(root, &format!("{sd}/access_pattern/{f}/min"), "0\n");
        put(root, &format!("{sd}/access_pattern/{f}/max"), "0\n");
    }
    for f in [
        "ms",
        "bytes",
        "reset_interval_ms",
        "weights/sz_permil",
        "weights/nr_accesses_permil",
        "weights/age_permil",
    ] {
        put(root, &format!("{sd}/quotas/{f}"), "0\n");
    }
    put(root, &format!("{sd}/watermarks/metric"), "none\n");
    if let Some(n) = filters {
        put(root, &format!("{sd}/filters/nr_filters"), "0\n");
        for f in 0..n {
            put(root, &format!("{sd}/filters/{f}/type"), "anon\n");
            put(root, &format!("{sd}/filters/{f}/matching"), "N\n");
        }
    }
    let names = [
        "nr_tried",
        "sz_tried",
        "nr_applied",
        "sz_applied",
        "qt_exceeds",
    ];
    for (f, v) in names.iter().zip(stats) {
        put(root, &format!("{sd}/stats/{f}"), &format!("{v}\n"));
    }
    put(root, &format!("{sd}/tried_regions/total_bytes"), "0\n");
}
