//! Schemes, stats, tried regions and vaddr contexts against a fake DAMON sysfs tree.

use super::*;
use crate::damon::{KdamondState, MonitoringAttrs};
use std::path::Path;

use crate::test_utils::{fake_scheme_dir, put};

fn get(root: &Path, rel: &str) -> String {
    std::fs::read_to_string(root.join(rel)).unwrap()
}

/// A fake tree of `nr_kdamonds` kdamonds each with one context and `nr_scheme_dirs` scheme
/// directories of `nr_filter_dirs` filters (pre-created: writing `nr_*` in a plain directory
/// creates nothing). `with_filters` false leaves out `filters/` (a kernel before 6.3).
fn fake(
    nr_kdamonds: u64,
    nr_scheme_dirs: usize,
    nr_filter_dirs: usize,
    with_filters: bool,
) -> (tempfile::TempDir, DamonSysfs) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    put(root, "kdamonds/nr_kdamonds", &format!("{nr_kdamonds}\n"));
    for k in 0..nr_kdamonds {
        let kd = format!("kdamonds/{k}");
        put(root, &format!("{kd}/state"), "off\n");
        put(root, &format!("{kd}/pid"), "-1\n");
        put(root, &format!("{kd}/contexts/nr_contexts"), "1\n");
        let ctx = format!("{kd}/contexts/0");
        put(
            root,
            &format!("{ctx}/avail_operations"),
            "vaddr\nfvaddr\npaddr\n",
        );
        put(root, &format!("{ctx}/operations"), "paddr\n");
        for f in [
            "intervals/sample_us",
            "intervals/aggr_us",
            "intervals/update_us",
            "nr_regions/min",
            "nr_regions/max",
        ] {
            put(root, &format!("{ctx}/monitoring_attrs/{f}"), "0\n");
        }
        put(root, &format!("{ctx}/targets/nr_targets"), "0\n");
        for t in 0..2 {
            put(root, &format!("{ctx}/targets/{t}/pid_target"), "0\n");
        }
        put(root, &format!("{ctx}/schemes/nr_schemes"), "0\n");
        for s in 0..nr_scheme_dirs {
            let filters = with_filters.then_some(nr_filter_dirs);
            let stats = [7, 7 << 20, 5, 5 << 20, 1];
            fake_scheme_dir(root, &format!("{ctx}/schemes/{s}"), filters, stats);
        }
    }
    let damon = DamonSysfs::detect(root).unwrap();
    (dir, damon)
}

fn pageout_scheme() -> Scheme {
    Scheme {
        action: DamosAction::Pageout,
        pattern: AccessPattern::cold(20_000, 100_000),
        quota: Quota {
            time_ms: 0,
            bytes: 256 << 20,
            reset_interval_ms: 1000,
        },
        filters: vec![Filter::spare_anon()],
    }
}

#[test]
fn cold_pattern_rounds_age_up_to_aggregations() {
    let p = AccessPattern::cold(20_000, 100_000);
    assert_eq!(
        (p.age_min_aggr, p.nr_accesses_min, p.nr_accesses_max),
        (200, 0, 0)
    );
    assert_eq!(AccessPattern::cold(150, 100_000).age_min_aggr, 2);
    assert_eq!(AccessPattern::cold(0, 100_000).age_min_aggr, 0);
    // A zero aggregation interval (never valid) does not divide by zero.
    assert_eq!(AccessPattern::cold(1, 0).age_min_aggr, 1000);
}

#[test]
fn set_schemes_writes_stat_and_pageout_in_order() {
    let (_dir, damon) = fake(1, 2, 1, true);
    let features = damon
        .set_schemes(0, &[Scheme::stat_all(), pageout_scheme()])
        .unwrap();
    assert_eq!(
        features,
        SchemeFeatures {
            filters: true,
            tried_regions: true,
            apply_interval: true
        }
    );
    let s1 = "kdamonds/0/contexts/0/schemes/1";
    let journal = damon.journal();
    assert_eq!(
        journal[0],
        (
            "kdamonds/0/contexts/0/schemes/nr_schemes".to_string(),
            "2".to_string()
        )
    );
    let tail: Vec<(String, String)> = journal
        .iter()
        .skip_while(|(p, _)| !p.starts_with(s1))
        .cloned()
        .collect();
    let expected: Vec<(String, String)> = [
        ("action", "pageout"),
        ("apply_interval_us", "0"),
        ("access_pattern/sz/min", "4096"),
        ("access_pattern/sz/max", "18446744073709551615"),
        ("access_pattern/nr_accesses/min", "0"),
        ("access_pattern/nr_accesses/max", "0"),
        ("access_pattern/age/min", "200"),
        ("access_pattern/age/max", "4294967295"),
        ("quotas/ms", "0"),
        ("quotas/bytes", "268435456"),
        ("quotas/reset_interval_ms", "1000"),
        ("quotas/weights/sz_permil", "0"),
        ("quotas/weights/nr_accesses_permil", "1000"),
        ("quotas/weights/age_permil", "1000"),
        ("watermarks/metric", "none"),
        ("filters/nr_filters", "1"),
        ("filters/0/type", "anon"),
        ("filters/0/matching", "Y"),
    ]
    .into_iter()
    .map(|(p, v)| (format!("{s1}/{p}"), v.to_string()))
    .collect();
    assert_eq!(tail, expected);
    // Scheme 0 (stat) has no filters and says so.
    assert_eq!(
        get(
            damon.root(),
            "kdamonds/0/contexts/0/schemes/0/filters/nr_filters"
        ),
        "0"
    );
    assert_eq!(
        get(damon.root(), "kdamonds/0/contexts/0/schemes/0/action"),
        "stat"
    );
    damon.commit_kdamond(0).unwrap();
    assert_eq!(damon.journal().last().unwrap().1, "commit");
}

#[test]
fn filters_on_a_kernel_without_them_fail_clearly() {
    let (_dir, damon) = fake(1, 1, 0, false);
    // Without filters the scheme is fine.
    let mut s = pageout_scheme();
    s.filters.clear();
    let f = damon.set_schemes(0, &[s]).unwrap();
    assert!(!f.filters);
    let err = damon.set_schemes(0, &[pageout_scheme()]).unwrap_err();
    assert!(matches!(err, DamonError::MissingFeature { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("set DAMOS schemes: this kernel's DAMON lacks DAMOS filters (Linux 6.3) ("),
        "{msg}"
    );
    assert!(msg.ends_with("schemes/0/filters is missing)"), "{msg}");
}

#[test]
fn missing_scheme_dirs_are_reported() {
    let (_dir, damon) = fake(1, 1, 0, true);
    let err = damon
        .set_schemes(0, &[Scheme::stat_all(), pageout_scheme()])
        .unwrap_err();
    assert!(matches!(err, DamonError::Missing { .. }), "{err}");
    assert!(
        err.to_string().contains("schemes/1 does not exist"),
        "{err}"
    );
}

#[test]
fn stats_are_refreshed_then_read() {
    let (_dir, damon) = fake(1, 1, 0, true);
    let st = damon.scheme_stats(0, 0).unwrap();
    assert_eq!(
        st,
        SchemeStats {
            nr_tried: 7,
            sz_tried_bytes: 7 << 20,
            nr_applied: 5,
            sz_applied_bytes: 5 << 20,
            qt_exceeds: 1
        }
    );
    assert_eq!(
        damon.journal(),
        [(
            "kdamonds/0/state".to_string(),
            "update_schemes_stats".to_string()
        )]
    );
    put(
        damon.root(),
        "kdamonds/0/contexts/0/schemes/0/stats/nr_tried",
        "many\n",
    );
    let err = damon.scheme_stats(0, 0).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("holds \"many\", expected an unsigned integer"),
        "{err}"
    );
}

#[test]
fn tried_regions_are_read_with_accesses_and_age() {
    let (_dir, damon) = fake(1, 1, 0, true);
    let dir = "kdamonds/0/contexts/0/schemes/0/tried_regions";
    for (i, (start, end, acc, age)) in [(4096u64, 1 << 20, 0u64, 300u64), (1 << 20, 3 << 20, 12, 0)]
        .iter()
        .enumerate()
    {
        put(
            damon.root(),
            &format!("{dir}/{i}/start"),
            &format!("{start}\n"),
        );
        put(damon.root(), &format!("{dir}/{i}/end"), &format!("{end}\n"));
        put(
            damon.root(),
            &format!("{dir}/{i}/nr_accesses"),
            &format!("{acc}\n"),
        );
        put(damon.root(), &format!("{dir}/{i}/age"), &format!("{age}\n"));
    }
    let regions = damon.tried_regions(0, 0).unwrap();
    assert_eq!(regions.len(), 2);
    assert_eq!(regions[0].size_bytes(), (1 << 20) - 4096);
    assert_eq!((regions[0].nr_accesses, regions[0].age_aggr), (0, 300));
    assert_eq!((regions[1].nr_accesses, regions[1].age_aggr), (12, 0));
    assert_eq!(
        damon.journal().last().unwrap().1,
        "update_schemes_tried_regions"
    );

    std::fs::remove_dir_all(damon.root().join(dir)).unwrap();
    let err = damon.tried_regions(0, 0).unwrap_err();
    assert!(
        err.to_string().contains("lacks DAMOS tried regions"),
        "{err}"
    );
}

#[test]
fn vaddr_monitor_on_a_spare_kdamond() {
    let (_dir, damon) = fake(2, 0, 0, true);
    let attrs = MonitoringAttrs::default();
    damon.setup_vaddr_monitor(1, &attrs, &[42, 43]).unwrap();
    let ctx = "kdamonds/1/contexts/0";
    assert_eq!(get(damon.root(), &format!("{ctx}/operations")), "vaddr");
    assert_eq!(get(damon.root(), &format!("{ctx}/targets/nr_targets")), "2");
    assert_eq!(
        get(damon.root(), &format!("{ctx}/targets/1/pid_target")),
        "43"
    );
    assert_eq!(
        get(
            damon.root(),
            &format!("{ctx}/monitoring_attrs/intervals/aggr_us")
        ),
        "100000"
    );
    // Nothing below kdamond 0 was touched.
    assert!(damon
        .journal()
        .iter()
        .all(|(p, _)| p.starts_with("kdamonds/1/")));

    damon.start_kdamond(1).unwrap();
    assert_eq!(damon.read_state("test", 1).unwrap(), KdamondState::On);
    let err = damon.setup_vaddr_monitor(1, &attrs, &[42]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "set up vaddr monitor: kdamond 1 is running; stop it first"
    );
    damon.stop_kdamond(1).unwrap();

    let err = damon.setup_vaddr_monitor(2, &attrs, &[42]).unwrap_err();
    assert!(
        err.to_string().contains("kdamonds/2 does not exist"),
        "{err}"
    );
    let err = damon.setup_vaddr_monitor(1, &attrs, &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "set up vaddr monitor: pids: at least one process is needed"
    );
    put(damon.root(), &format!("{ctx}/avail_operations"), "paddr\n");
    let err = damon.setup_vaddr_monitor(1, &attrs, &[42]).unwrap_err();
    assert!(
        err.to_string()
            .contains("operations \"vaddr\" not supported"),
        "{err}"
    );
}

#[test]
fn spare_kdamonds_are_created_with_the_paddr_monitor() {
    let (dir, damon) = fake(2, 0, 0, true);
    std::fs::write(dir.path().join("iomem"), "00100000-1ffdffff : System RAM\n").unwrap();
    for i in 0..1 {
        put(
            damon.root(),
            &format!("kdamonds/0/contexts/0/targets/0/regions/{i}/start"),
            "0",
        );
        put(
            damon.root(),
            &format!("kdamonds/0/contexts/0/targets/0/regions/{i}/end"),
            "0",
        );
    }
    put(
        damon.root(),
        "kdamonds/0/contexts/0/targets/0/regions/nr_regions",
        "0",
    );
    let damon = DamonSysfs::new(damon.root())
        .with_iomem_path(dir.path().join("iomem"))
        .with_spare_kdamonds(1);
    damon
        .setup_paddr_monitor(5_000, 100_000, 1_000_000, 10, 1_000)
        .unwrap();
    assert_eq!(
        damon.journal()[0],
        ("kdamonds/nr_kdamonds".to_string(), "2".to_string())
    );
}
