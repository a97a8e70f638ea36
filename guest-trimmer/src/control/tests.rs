//! The control protocol through strings, against a fake guest.

use super::*;
use crate::test_utils::{fake, put, Fake};

fn controller(f: &Fake, start_monitoring: bool) -> Controller {
    let mut c = Controller::start(ControllerConfig {
        proc_root: f.path("proc"),
        sys_root: f.path("sys"),
        attrs: DAEMON_ATTRS,
        start_monitoring,
        keep_lru_gen: false,
    });
    c.env.reporting_delay = std::time::Duration::ZERO;
    c.env.hooks_dir = f.env.hooks_dir.clone();
    c
}

fn reply(c: &Controller, line: &str) -> Value {
    let text = c.handle_line(line);
    assert!(!text.contains('\n'), "one line per reply: {text:?}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn start_sets_up_and_starts_paddr_monitoring() {
    let f = fake();
    put(
        f.dir.path(),
        "sys/kernel/mm/damon/admin/kdamonds/0/state",
        "off\n",
    );
    let c = controller(&f, true);
    let s = reply(&c, r#"{"op":"status"}"#);
    assert_eq!(s["ok"], true);
    assert_eq!(s["monitoring"]["started"], true, "{s}");
    assert_eq!(s["monitoring"]["kdamond0"], "on");
    assert_eq!(s["monitoring"]["attrs"]["min_nr_regions"], 100);
    let admin = "sys/kernel/mm/damon/admin";
    assert_eq!(f.read(&format!("{admin}/kdamonds/nr_kdamonds")), "2");
    assert_eq!(
        f.read(&format!("{admin}/kdamonds/0/contexts/0/operations")),
        "paddr"
    );
    assert_eq!(
        f.read(&format!("{admin}/kdamonds/0/contexts/0/schemes/0/action")),
        "stat"
    );
    assert_eq!(
        f.read(&format!(
            "{admin}/kdamonds/0/contexts/0/monitoring_attrs/intervals/sample_us"
        )),
        DAEMON_ATTRS.sample_us.to_string()
    );
}

#[test]
fn without_damon_the_daemon_still_answers_and_says_why() {
    let f = fake();
    std::fs::remove_dir_all(f.path("sys/kernel/mm/damon")).unwrap();
    let c = controller(&f, true);
    let s = reply(&c, r#"{"op":"status"}"#);
    assert_eq!(s["monitoring"]["started"], false);
    assert!(
        s["monitoring"]["error"]
            .as_str()
            .unwrap()
            .contains("CONFIG_DAMON_SYSFS"),
        "{s}"
    );
    assert_eq!(reply(&c, r#"{"op":"ping"}"#)["pong"], true);
}

#[test]
fn malformed_requests_get_an_error_reply() {
    let f = fake();
    let c = controller(&f, false);
    for (line, want) in [
        ("not json", "malformed request"),
        (r#"{"op":"dance"}"#, "unknown variant `dance`"),
        (r#"{"nop":"ping"}"#, "missing field `op`"),
        (r#"{"op":"trim","polcy":{}}"#, "unknown field `polcy`"),
    ] {
        let r = reply(&c, line);
        assert_eq!(r["ok"], false, "{line}");
        assert!(r["error"].as_str().unwrap().contains(want), "{line}: {r}");
    }
    let r = reply(&c, r#"{"op":"trim"}"#);
    assert_eq!(r["error"], "give \"policy\" (an object) or \"policy_name\"");
    let r = reply(&c, r#"{"op":"trim","policy_name":"default","policy":{}}"#);
    assert!(r["error"].as_str().unwrap().contains("not both"));
    let r = reply(&c, r#"{"op":"trim","policy_name":"nope"}"#);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("unknown, expected one of"),
        "{r}"
    );
    // A bad inline policy names the field and its place.
    let r = reply(
        &c,
        r#"{"op":"trim","policy":{"name":"x","cold_age_ms":0,"stepz":[]}}"#,
    );
    let e = r["error"].as_str().unwrap();
    assert!(e.starts_with("parse policy text at line"), "{e}");
    assert!(e.contains("unknown field `stepz`"), "{e}");
    let r = reply(&c, r#"{"op":"after_restore"}"#);
    assert_eq!(r["error"], "no policy: give one, or trim first");
}

#[test]
fn trim_then_status_stats_and_after_restore() {
    let f = fake();
    let log = f.path("restore.log");
    let c = controller(&f, false);
    let policy = json!({
        "name": "t", "cold_age_ms": 0,
        "hooks": [{"name": "r", "command": ["/bin/sh", "-c", format!("echo restored >> {}", log.display())], "timeout_ms": 2000}],
        "after_restore": ["r"],
        "steps": [{"drop_caches": {"page_cache": "all", "slab": true}}, {"compact_memory": {}}]
    });
    let r = reply(&c, &json!({"op": "trim", "policy": policy}).to_string());
    assert_eq!(
        (r["ok"].clone(), r["ready"].clone()),
        (json!(true), json!(true)),
        "{r}"
    );
    assert_eq!(r["report"]["steps"][0]["kind"], "drop_caches");
    assert_eq!(f.read("proc/sys/vm/drop_caches"), "3");

    let s = reply(&c, r#"{"op":"status"}"#);
    assert_eq!(s["trims"], 1);
    assert_eq!(s["last_trim"]["policy"], "t");
    assert_eq!(s["busy"], false);

    let a = reply(&c, r#"{"op":"after_restore"}"#);
    assert_eq!(a["report"]["ok"], true, "{a}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "restored\n");

    // Stats: memory from /proc, DAMON regions from the stat scheme's tried regions.
    let dir = "sys/kernel/mm/damon/admin/kdamonds/0/contexts/0/schemes/0/tried_regions";
    for (i, (start, end, acc, age)) in [(0u64, 4u64 << 20, 3u64, 0u64), (4 << 20, 12 << 20, 0, 400)]
        .iter()
        .enumerate()
    {
        put(
            f.dir.path(),
            &format!("{dir}/{i}/start"),
            &start.to_string(),
        );
        put(f.dir.path(), &format!("{dir}/{i}/end"), &end.to_string());
        put(
            f.dir.path(),
            &format!("{dir}/{i}/nr_accesses"),
            &acc.to_string(),
        );
        put(f.dir.path(), &format!("{dir}/{i}/age"), &age.to_string());
    }
    let st = reply(&c, r#"{"op":"stats"}"#);
    assert_eq!(st["damon"]["regions"], 2, "{st}");
    assert_eq!(st["damon"]["accessed_kib"], 4096);
    assert_eq!(st["damon"]["idle_ge_30s_kib"], 8192);
    assert!(st["mem"]["meminfo"]["mem_total_kib"].as_u64().unwrap() > 0);
    assert!(
        st["daemon"]["rss_kib"].is_null(),
        "fake proc has no self: {st}"
    );
}

#[test]
fn one_trim_at_a_time() {
    let f = fake();
    let c = std::sync::Arc::new(controller(&f, false));
    let slow = json!({"op": "trim", "policy": {
        "name": "slow", "cold_age_ms": 0,
        "hooks": [{"name": "s", "command": ["/bin/sleep", "1"], "timeout_ms": 3000}],
        "steps": [{"hooks": {}}]}})
    .to_string();
    let c2 = c.clone();
    let t = std::thread::spawn(move || c2.handle_line(&slow));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = reply(&c, r#"{"op":"trim","policy_name":"aggressive"}"#);
    assert_eq!(r["error"], "a trim is already running");
    assert_eq!(reply(&c, r#"{"op":"status"}"#)["busy"], true);
    let first: Value = serde_json::from_str(&t.join().unwrap()).unwrap();
    assert_eq!(first["report"]["ok"], true, "{first}");
    let handler = c.clone().handler();
    assert!(handler(r#"{"op":"ping"}"#).contains("\"pong\":true"));
}

#[test]
fn daemon_start_switches_the_multi_generational_lru_off() {
    let f = fake();
    put(f.dir.path(), "sys/kernel/mm/lru_gen/enabled", "0x0007\n");
    let c = controller(&f, true);
    assert_eq!(f.read("sys/kernel/mm/lru_gen/enabled"), "n");
    let s = reply(&c, r#"{"op":"status"}"#);
    assert_eq!(
        s["monitoring"]["lru_gen"]["disabled_by_daemon"], true,
        "{s}"
    );
    assert_eq!(s["monitoring"]["lru_gen"]["caps_before"], "0x0007");

    // Kept on when asked; a one-off local trim leaves it alone.
    let f = fake();
    put(f.dir.path(), "sys/kernel/mm/lru_gen/enabled", "0x0007\n");
    let kept = Controller::start(ControllerConfig {
        proc_root: f.path("proc"),
        sys_root: f.path("sys"),
        attrs: DAEMON_ATTRS,
        start_monitoring: true,
        keep_lru_gen: true,
    });
    assert_eq!(f.read("sys/kernel/mm/lru_gen/enabled"), "0x0007\n");
    let s = reply(&kept, r#"{"op":"status"}"#);
    assert_eq!(
        s["monitoring"]["lru_gen"]["disabled_by_daemon"], false,
        "{s}"
    );
    let _local = controller(&f, false);
    assert_eq!(f.read("sys/kernel/mm/lru_gen/enabled"), "0x0007\n");
}
