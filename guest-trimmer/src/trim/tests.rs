//! The pipeline against fake proc/sys trees: step order, the time budget, hooks that hang or
//! fail, `require_trim`, DAMON passes and the reporting order.

use super::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;

use crate::test_utils::{fake, put};

fn policy(text: &str) -> Policy {
    Policy::from_json_str(text).unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)))
}

fn kinds(r: &TrimReport) -> Vec<(&'static str, StepStatus)> {
    r.steps.iter().map(|s| (s.kind, s.status)).collect()
}

#[test]
fn steps_run_in_policy_order_and_are_measured() {
    let f = fake();
    let log = f.path("log");
    let p = policy(&format!(
        r#"{{"name": "order", "cold_age_ms": 0,
            "hooks": [
              {{"name": "a", "command": ["/bin/sh", "-c", "echo a >> {log}"], "timeout_ms": 5000}},
              {{"name": "b", "command": ["/bin/sh", "-c", "echo b >> {log}"], "timeout_ms": 5000}}
            ],
            "steps": [
              {{"hooks": {{"names": ["b"]}}}},
              {{"drop_caches": {{"page_cache": "all", "slab": true}}}},
              {{"compact_memory": {{}}}},
              {{"hooks": {{"names": ["a"]}}}},
              {{"wait_reported": {{"timeout_ms": 2000, "quiet_ms": 50}}}}
            ]}}"#,
        log = log.display()
    ));
    let r = run(&f.env, &p);
    assert!(r.ok && r.ready, "{r:#?}");
    assert_eq!(
        kinds(&r),
        [
            ("hooks", StepStatus::Ok),
            ("drop_caches", StepStatus::Ok),
            ("compact_memory", StepStatus::Ok),
            ("hooks", StepStatus::Ok),
            ("wait_reported", StepStatus::Ok)
        ]
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "b\na\n");
    assert_eq!(f.read("proc/sys/vm/drop_caches"), "3");
    assert_eq!(f.read("proc/sys/vm/compact_memory"), "1");
    let wait = &r.steps[4].detail;
    assert_eq!(wait["order"], 9);
    assert_eq!(wait["reportable_free_kib"], 3 * 2048 + 20 * 4096);
    assert_eq!(wait["stable"], true);
    assert!(r.steps[4].duration_ms < 1500, "{r:#?}");
    // Memory figures come from /proc/meminfo (unchanged in a fake tree).
    assert_eq!(r.before.total_kib, r.after.total_kib);
    assert!(r.before.total_kib > 0);
    assert_eq!(r.freed_kib, 0);
    assert!(r.trim_ms <= r.total_ms);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["steps"][0]["detail"]["hooks"][0]["status"], "ok");
}

#[test]
fn a_hanging_hook_is_killed_at_its_timeout_and_the_trim_completes() {
    let f = fake();
    let p = policy(
        r#"{"name": "hang", "cold_age_ms": 0,
            "hooks": [{"name": "hang", "command": ["/bin/sleep", "30"], "timeout_ms": 300}],
            "steps": [{"hooks": {}}, {"drop_caches": {"page_cache": "all", "slab": false}}]}"#,
    );
    let t0 = Instant::now();
    let r = run(&f.env, &p);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(!r.ok && r.ready, "{r:#?}");
    assert_eq!(
        kinds(&r),
        [
            ("hooks", StepStatus::Failed),
            ("drop_caches", StepStatus::Ok)
        ]
    );
    let hook = &r.steps[0].detail["hooks"][0];
    assert_eq!(hook["status"], "timed_out");
    assert!(hook["duration_ms"].as_u64().unwrap() >= 300);
    assert!(
        r.steps[0]
            .error
            .as_deref()
            .unwrap()
            .contains("killed its process group"),
        "{r:#?}"
    );
    assert_eq!(f.read("proc/sys/vm/drop_caches"), "1");
}

#[test]
fn the_budget_cuts_hooks_short_and_skips_later_steps() {
    let f = fake();
    let p = policy(
        r#"{"name": "budget", "cold_age_ms": 0, "budget_ms": 300,
            "hooks": [{"name": "slow", "command": ["/bin/sleep", "30"], "timeout_ms": 5000}],
            "steps": [{"hooks": {}}, {"compact_memory": {}}, {"wait_reported": {"timeout_ms": 5000}}]}"#,
    );
    let t0 = Instant::now();
    let r = run(&f.env, &p);
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(2000), "{took:?}");
    assert_eq!(
        kinds(&r),
        [
            ("hooks", StepStatus::Failed),
            ("compact_memory", StepStatus::Skipped),
            ("wait_reported", StepStatus::Skipped)
        ]
    );
    let hook = &r.steps[0].detail["hooks"][0];
    assert!(hook["timeout_ms"].as_u64().unwrap() <= 300, "{hook}");
    assert_eq!(
        r.steps[1].error.as_deref(),
        Some("the trim budget (budget_ms) was used up")
    );
    assert_eq!(f.read("proc/sys/vm/compact_memory"), "0");
    assert!(r.ready);
    assert_eq!(r.budget_ms, Some(300));
}

#[test]
fn require_trim_stops_at_the_first_failure() {
    let f = fake();
    let p = policy(
        r#"{"name": "strict", "cold_age_ms": 0, "require_trim": true,
            "hooks": [{"name": "fails", "command": ["/bin/false"], "timeout_ms": 2000}],
            "steps": [{"hooks": {}}, {"compact_memory": {}}]}"#,
    );
    let r = run(&f.env, &p);
    assert!(!r.ok && !r.ready);
    assert_eq!(
        kinds(&r),
        [
            ("hooks", StepStatus::Failed),
            ("compact_memory", StepStatus::Skipped)
        ]
    );
    assert!(
        r.steps[0]
            .error
            .as_deref()
            .unwrap()
            .contains("/bin/false exited with"),
        "{r:#?}"
    );
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives on this stack.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[test]
fn signal_and_socket_hooks() {
    let f = fake();
    let pid_file = f.path("app.pid");
    let ack = f.path("app.ack");
    // A process that creates the ack file on SIGUSR1.
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("trap 'touch {}' USR1; echo $$ > {}; i=0; while [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done", ack.display(), pid_file.display()))
        .spawn()
        .unwrap();
    while std::fs::read_to_string(&pid_file)
        .map(|s| s.trim().is_empty())
        .unwrap_or(true)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let sock = f.path("rt.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let mut answers = Vec::new();
        for reply in ["ok\n", "nope\n"] {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            answers.push(line);
            // The release work the hook waits for: 300 ms of this thread's CPU (the peer is
            // this process), however busy the machine is (bounded by 10 s of wall time).
            let t = std::time::Instant::now();
            while thread_cpu() < Duration::from_millis(300) * (answers.len() as u32)
                && t.elapsed() < Duration::from_secs(10)
            {
                std::hint::black_box(0u64.wrapping_add(1));
            }
            s.write_all(reply.as_bytes()).unwrap();
        }
        answers
    });
    let p = policy(&format!(
        r#"{{"name": "hooks", "cold_age_ms": 0,
            "hooks": [
              {{"name": "usr1", "signal": "SIGUSR1", "pid_file": "{pid}", "ack_file": "{ack}", "timeout_ms": 5000}},
              {{"name": "sock", "unix_socket": "{sock}", "message": "trim\n", "expect_reply": "ok", "timeout_ms": 5000}},
              {{"name": "sock2", "unix_socket": "{sock}", "message": "trim\n", "expect_reply": "ok", "timeout_ms": 5000}},
              {{"name": "nobody", "unix_socket": "{missing}", "message": "trim\n", "timeout_ms": 500}}
            ],
            "steps": [{{"hooks": {{}}}}]}}"#,
        pid = pid_file.display(),
        ack = ack.display(),
        sock = sock.display(),
        missing = f.path("missing.sock").display(),
    ));
    let r = run(&f.env, &p);
    let _ = child.kill();
    let _ = child.wait();
    let hooks = &r.steps[0].detail["hooks"];
    assert_eq!(hooks[0]["status"], "ok", "{hooks}");
    assert!(ack.exists());
    assert_eq!(hooks[1]["status"], "ok", "{hooks}");
    // The socket's peer's CPU while the hook waited is counted (ticks of 10 ms; other tests
    // may add to this process's time, never take from it); the signalled shell's is known too.
    let peer_ms = hooks[1]["target_cpu_ms"]
        .as_u64()
        .expect("peer CPU measured");
    assert!(peer_ms >= 200, "{hooks}");
    assert!(hooks[0]["target_cpu_ms"].is_u64(), "{hooks}");
    assert!(r.steps[0].cpu.hooked_ms.unwrap() >= peer_ms);
    assert_eq!(hooks[2]["status"], "failed");
    assert!(
        hooks[2]["error"]
            .as_str()
            .unwrap()
            .ends_with("answered \"nope\", expected \"ok\""),
        "{hooks}"
    );
    assert_eq!(hooks[3]["status"], "failed");
    assert!(
        hooks[3]["error"]
            .as_str()
            .unwrap()
            .starts_with("connect to "),
        "{hooks}"
    );
    assert_eq!(server.join().unwrap(), ["trim\n", "trim\n"]);

    // A pid file without a pid.
    std::fs::write(&pid_file, "x\n").unwrap();
    let r = run(&f.env, &p);
    let e = r.steps[0].detail["hooks"][0]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(e.ends_with("holds \"x\", not a pid > 1"), "{e}");
}

#[test]
fn damon_pageout_installs_then_removes_its_scheme() {
    let f = fake();
    let p = policy(
        r#"{"name": "cold", "cold_age_ms": 1000, "keep_hot_mib": 16,
            "steps": [
              {"damon_pageout": {"quota_mib_per_s": 64, "spare_anon": true, "max_duration_ms": 2000}}
            ]}"#,
    );
    let r = run(&f.env, &p);
    assert!(r.ok, "{r:#?}");
    let d = &r.steps[0].detail;
    assert_eq!(d["operations"], "paddr");
    // 1000 ms at 10 ms aggregation.
    assert_eq!(d["age_min_aggr"], 100);
    assert_eq!(d["converged"], true);
    assert_eq!(d["stats"]["sz_applied_bytes"], 3);
    // Afterwards only the base stat scheme is left, committed.
    let ctx = "sys/kernel/mm/damon/admin/kdamonds/0/contexts/0/schemes";
    assert_eq!(f.read(&format!("{ctx}/nr_schemes")), "1");
    assert_eq!(f.read(&format!("{ctx}/0/action")), "stat");
    assert_eq!(
        f.read("sys/kernel/mm/damon/admin/kdamonds/0/state"),
        "commit"
    );
    // The pageout scheme had the anon filter and a quota bounded by the page cache above
    // keep_hot_mib (fixture: 2408 + 132764 - 12548 KiB of file cache).
    assert_eq!(f.read(&format!("{ctx}/1/action")), "pageout");
    assert_eq!(f.read(&format!("{ctx}/1/filters/0/type")), "anon");
    let quota: u64 = f.read(&format!("{ctx}/1/quotas/bytes")).parse().unwrap();
    assert_eq!(quota, (2408 + 132_764 - 12_548 - 16 * 1024) * 1024);

    // drop_caches "cold" is a pass without quota (the fake's state file keeps the last
    // command; the kernel's reads back "on").
    put(
        f.dir.path(),
        "sys/kernel/mm/damon/admin/kdamonds/0/state",
        "on\n",
    );
    let p = policy(
        r#"{"name": "cold", "cold_age_ms": 1000, "steps": [{"drop_caches": {"page_cache": "cold", "slab": true}}]}"#,
    );
    let r = run(&f.env, &p);
    assert!(r.ok, "{r:#?}");
    assert_eq!(r.steps[0].detail["cold_pageout"]["operations"], "paddr");
    assert_eq!(r.steps[0].detail["drop_caches"], 2);
    assert_eq!(f.read(&format!("{ctx}/1/quotas/bytes")), "0");
    assert_eq!(f.read("proc/sys/vm/drop_caches"), "2");
}

#[test]
fn damon_pageout_needs_running_monitoring() {
    let f = fake();
    put(
        f.dir.path(),
        "sys/kernel/mm/damon/admin/kdamonds/0/state",
        "off\n",
    );
    let p = policy(
        r#"{"name": "cold", "cold_age_ms": 0, "steps": [{"damon_pageout": {}}, {"compact_memory": {}}]}"#,
    );
    let r = run(&f.env, &p);
    assert_eq!(
        kinds(&r),
        [
            ("damon_pageout", StepStatus::Failed),
            ("compact_memory", StepStatus::Ok)
        ]
    );
    let e = r.steps[0].error.as_deref().unwrap();
    assert!(
        e.contains("expected \"on\": DAMON monitoring of physical memory"),
        "{e}"
    );

    // Without DAMON at all, the step says so.
    std::fs::remove_dir_all(f.path("sys/kernel/mm/damon")).unwrap();
    let r = run(&f.env, &p);
    let e = r.steps[0].error.as_deref().unwrap();
    assert!(e.contains("DAMON sysfs interface not found"), "{e}");
}

#[test]
fn vaddr_pass_runs_on_the_spare_kdamond() {
    let f = fake();
    let pid_file = f.path("p.pid");
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
    let p = policy(&format!(
        r#"{{"name": "v", "cold_age_ms": 50, "steps": [{{"damon_pageout": {{"pid_files": ["{}"], "max_duration_ms": 1000}}}}]}}"#,
        pid_file.display()
    ));
    let r = run(&f.env, &p);
    assert!(r.ok, "{r:#?}");
    assert_eq!(r.steps[0].detail["operations"], "vaddr");
    assert_eq!(
        f.read("sys/kernel/mm/damon/admin/kdamonds/1/contexts/0/operations"),
        "vaddr"
    );
    assert_eq!(
        f.read("sys/kernel/mm/damon/admin/kdamonds/1/contexts/0/targets/0/pid_target"),
        std::process::id().to_string()
    );
    assert_eq!(f.read("sys/kernel/mm/damon/admin/kdamonds/1/state"), "off");
}

#[test]
fn reporting_order_is_lowered_for_the_run_and_restored() {
    let f = fake();
    let p = policy(
        r#"{"name": "order", "cold_age_ms": 0, "page_reporting_order": 0,
            "steps": [{"wait_reported": {"timeout_ms": 1000, "quiet_ms": 50}}]}"#,
    );
    let r = run(&f.env, &p);
    assert!(r.ok, "{r:#?}");
    assert_eq!(r.steps[0].detail["order"], 0);
    assert_eq!(
        f.read("sys/module/page_reporting/parameters/page_reporting_order"),
        "9"
    );
}

#[test]
fn after_restore_runs_its_hooks_in_order() {
    let f = fake();
    let log = f.path("log");
    let p = policy(&format!(
        r#"{{"name": "restore", "cold_age_ms": 0,
            "hooks": [
              {{"name": "x", "command": ["/bin/sh", "-c", "echo x >> {log}"], "timeout_ms": 2000}},
              {{"name": "y", "command": ["/bin/sh", "-c", "echo y >> {log}"], "timeout_ms": 2000}}
            ],
            "after_restore": ["y", "x"],
            "steps": [{{"compact_memory": {{}}}}]}}"#,
        log = log.display()
    ));
    let r = after_restore(&f.env, &p);
    assert!(r.ok);
    assert_eq!(r.hooks.len(), 2);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "y\nx\n");
}

#[test]
fn registered_hooks_run_after_the_policys_own() {
    let f = fake();
    let log = f.path("log");
    let dir = &f.env.hooks_dir;
    std::fs::create_dir_all(dir).unwrap();
    let hook = |name: &str| {
        format!(
            r#"{{"name": "{name}", "command": ["/bin/sh", "-c", "echo {name} >> {log}"], "timeout_ms": 2000}}"#,
            log = log.display()
        )
    };
    std::fs::write(
        dir.join("b-app.json"),
        format!(
            r#"{{"before_snapshot": {}, "after_restore": {}}}"#,
            hook("app-release"),
            hook("app-reseed")
        ),
    )
    .unwrap();
    // Same name as the policy's own hook: run once, as the policy's.
    std::fs::write(
        dir.join("a-dup.json"),
        format!(r#"{{"before_snapshot": {}}}"#, hook("own")),
    )
    .unwrap();
    std::fs::write(dir.join("c-broken.json"), "{\"before_snapshot\": 3}").unwrap();
    let p = policy(&format!(
        r#"{{"name": "reg", "cold_age_ms": 0,
            "hooks": [{}],
            "steps": [{{"hooks": {{}}}}]}}"#,
        hook("own")
    ));
    let r = run(&f.env, &p);
    let hooks = r.steps[0].detail["hooks"].as_array().unwrap().clone();
    let names: Vec<&str> = hooks.iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 3, "{hooks:?}");
    assert_eq!(names[..2], ["own", "app-release"]);
    assert!(names[2].ends_with("c-broken.json"), "{names:?}");
    assert_eq!(hooks[2]["status"], "failed");
    assert!(
        hooks[2]["error"].as_str().unwrap().contains("line 1"),
        "{hooks:?}"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "own\napp-release\n");

    // The step can leave registrations out; after a restore they run after the policy's.
    let p = policy(
        r#"{"name": "noreg", "cold_age_ms": 0, "steps": [{"hooks": {"registered": false}}]}"#,
    );
    std::fs::remove_file(&log).unwrap();
    let r = run(&f.env, &p);
    assert_eq!(r.steps[0].detail["hooks"].as_array().unwrap().len(), 0);
    assert!(!log.exists());
    let r = after_restore(&f.env, &p);
    assert_eq!(r.hooks.len(), 2, "the reseed hook and the broken file");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "app-reseed\n");
}

#[test]
fn achieved_aggregation_interval_follows_the_oldest_region() {
    use super::pageout::achieved_aggr_us;
    // 60 s of monitoring, the oldest region aged 150 aggregations: 400 ms each, not 100 ms.
    assert_eq!(
        achieved_aggr_us([3, 150, 0], 60_000, 100_000),
        Some(400_000)
    );
    // A kdamond keeping pace is never credited with a shorter interval than configured.
    assert_eq!(achieved_aggr_us([900], 60_000, 100_000), Some(100_000));
    // Too young, or nothing aged yet: unknown.
    assert_eq!(achieved_aggr_us([10], 1_000, 100_000), None);
    assert_eq!(achieved_aggr_us([0, 0], 60_000, 100_000), None);
    assert_eq!(achieved_aggr_us([], 60_000, 100_000), None);
}

#[test]
fn trim_intervals_are_switched_for_damon_steps_and_put_back() {
    let f = fake();
    let dir = "sys/kernel/mm/damon/admin/kdamonds/0/contexts/0/monitoring_attrs/intervals";
    // A vaddr pass (kdamond 1): the fake's kdamond 0 `state` keeps the last command written,
    // where a kernel reads back "on", so a paddr pass after a commit cannot run here.
    let pid_file = f.path("p.pid");
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
    let p = policy(&format!(
        r#"{{"name": "fast", "cold_age_ms": 100, "trim_aggregation_ms": 20, "trim_sampling_us": 2000,
            "steps": [{{"damon_pageout": {{"pid_files": ["{}"], "max_duration_ms": 1000}}}}]}}"#,
        pid_file.display()
    ));
    let r = run(&f.env, &p);
    assert!(r.ok, "{r:#?}");
    let i = r.damon_intervals.as_ref().expect("intervals switched");
    assert_eq!((i.sample_us, i.aggr_us), (2_000, 20_000));
    assert_eq!((i.idle_sample_us, i.idle_aggr_us), (1_000, 10_000));
    assert_eq!(i.error, None, "{r:#?}");
    // The pass ran with the trim's intervals: 100 ms is 5 aggregations of 20 ms.
    assert_eq!(r.steps[0].detail["age_min_aggr"], 5, "{r:#?}");
    assert_eq!(
        f.read(
            "sys/kernel/mm/damon/admin/kdamonds/1/contexts/0/monitoring_attrs/intervals/aggr_us"
        ),
        "20000"
    );
    // kdamond 0 was never committed to: its intervals were not touched, and no commit was
    // spent on putting them back.
    assert!(!i.restore_commit, "{r:#?}");
    let journal = f.env.damon.journal();
    let kdamond0: Vec<&str> = journal
        .iter()
        .filter(|(rel, _)| rel.starts_with("kdamonds/0/"))
        .map(|(rel, _)| rel.as_str())
        .collect();
    assert!(kdamond0.is_empty(), "{kdamond0:?}");
    let _ = dir;

    // No DAMON step: the intervals are left alone.
    let p = policy(
        r#"{"name": "nodamon", "cold_age_ms": 0, "trim_aggregation_ms": 20,
            "steps": [{"compact_memory": {}}]}"#,
    );
    let r = run(&f.env, &p);
    assert!(r.damon_intervals.is_none());
    // Every step reports its CPU time (the fake tree has no /proc/stat or self).
    assert_eq!(r.steps[0].cpu.guest_busy_ms, None);
}

#[test]
fn a_paddr_pass_carries_the_interval_switch_in_its_two_commits() {
    let f = fake();
    // The fake's pass tried regions and never hit a quota.
    put(
        f.dir.path(),
        "sys/kernel/mm/damon/admin/kdamonds/0/contexts/0/schemes/1/stats/qt_exceeds",
        "0\n",
    );
    let p = policy(
        r#"{"name": "cold", "cold_age_ms": 1000, "trim_aggregation_ms": 20, "trim_sampling_us": 2000,
            "steps": [{"damon_pageout": {"max_duration_ms": 2000}}]}"#,
    );
    let r = run(&f.env, &p);
    assert!(r.ok, "{r:#?}");
    let i = r.damon_intervals.as_ref().expect("trim intervals");
    assert!(!i.restore_commit, "{r:#?}");
    assert_eq!(i.restore_ms, 0);
    // 1000 ms at the trim's 20 ms aggregation.
    assert_eq!(r.steps[0].detail["age_min_aggr"], 50, "{r:#?}");
    let journal = f.env.damon.journal();
    let writes: Vec<(String, String)> = journal
        .iter()
        .filter(|(rel, _)| {
            rel == "kdamonds/0/state"
                || rel == "kdamonds/0/contexts/0/monitoring_attrs/intervals/aggr_us"
        })
        .map(|(rel, v)| (rel.rsplit('/').next().unwrap().to_string(), v.clone()))
        .collect();
    let w = |a: &str, b: &str| (a.to_string(), b.to_string());
    // Scheme and trim intervals in one commit; one counter refresh shows the fake's whole
    // apply pass (regions tried, quota never hit); removal and idle intervals in one commit.
    assert_eq!(
        writes,
        [
            w("aggr_us", "20000"),
            w("state", "commit"),
            w("state", "update_schemes_stats"),
            w("aggr_us", "10000"),
            w("state", "commit"),
        ],
        "{r:#?}"
    );
    assert_eq!(r.steps[0].detail["polls"], 1, "{r:#?}");
    assert_eq!(r.steps[0].detail["converged"], true, "{r:#?}");
}

#[test]
fn zero_counters_are_not_convergence_until_an_apply_pass_ran() {
    let f = fake();
    // The pageout scheme's counters stay zero and the base stat scheme never moves: the
    // kdamond has not applied the scheme yet, so the pass waits to its bound.
    let stats = "sys/kernel/mm/damon/admin/kdamonds/0/contexts/0/schemes/1/stats";
    for c in [
        "nr_tried",
        "sz_tried",
        "nr_applied",
        "sz_applied",
        "qt_exceeds",
    ] {
        put(f.dir.path(), &format!("{stats}/{c}"), "0\n");
    }
    let p = policy(
        r#"{"name": "cold", "cold_age_ms": 1000,
            "steps": [{"damon_pageout": {"max_duration_ms": 300}}]}"#,
    );
    let r = run(&f.env, &p);
    assert!(r.ok, "{r:#?}");
    assert_eq!(r.steps[0].detail["converged"], false, "{r:#?}");
    assert!(r.steps[0].duration_ms >= 300, "{r:#?}");
}
