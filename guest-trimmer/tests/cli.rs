//! Runs the `guest-trimmer` binary against fake /proc and /sys trees and checks the output
//! formats the guest's /init and the end-to-end tests rely on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MEMINFO: &str = "\
MemTotal:         497996 kB
MemFree:          301232 kB
MemAvailable:     420516 kB
Buffers:            2408 kB
Cached:           132764 kB
SwapCached:            0 kB
Active(anon):      25652 kB
Inactive(anon):    11336 kB
Active(file):      26496 kB
Inactive(file):    96112 kB
Unevictable:           0 kB
Mlocked:               0 kB
SwapTotal:             0 kB
SwapFree:              0 kB
Dirty:                 8 kB
Writeback:             0 kB
AnonPages:         24440 kB
Mapped:            18972 kB
Shmem:             12548 kB
Slab:              24012 kB
SReclaimable:      11112 kB
SUnreclaim:        12900 kB
KernelStack:        1664 kB
PageTables:          712 kB
Committed_AS:      62096 kB
HugePages_Total:       0
";

const VMSTAT: &str = "\
nr_free_pages 75308
nr_inactive_anon 2834
nr_active_anon 6413
nr_inactive_file 24028
nr_active_file 6624
nr_unevictable 0
nr_slab_reclaimable 2778
nr_slab_unreclaimable 3225
nr_anon_pages 6110
nr_mapped 4743
nr_file_pages 33793
nr_dirty 2
nr_writeback 0
nr_shmem 3137
pgpgin 262144
pgpgout 40
pswpin 0
pswpout 0
pgfree 200000
pgfault 90000
pgmajfault 300
";

const IOMEM: &str = "\
00001000-0009fbff : System RAM
00100000-1fffffff : System RAM
";

fn put(root: &Path, rel: &str, value: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, value).unwrap();
}

/// Fake /proc and /sys below `dir`; with `damon`, a DAMON admin tree with one kdamond ready
/// for a two-range paddr setup.
fn fake_roots(dir: &Path, damon: bool) -> (PathBuf, PathBuf) {
    let proc_root = dir.join("proc");
    let sys_root = dir.join("sys");
    put(&proc_root, "meminfo", MEMINFO);
    put(&proc_root, "vmstat", VMSTAT);
    put(&proc_root, "iomem", IOMEM);
    put(&proc_root, "uptime", "3.5 1.0\n");
    put(
        &proc_root,
        "sys/kernel/osrelease",
        "6.12.57+deb12-cloud-amd64\n",
    );
    put(&sys_root, "devices/system/cpu/online", "0-1\n");
    if damon {
        let a = "kernel/mm/damon/admin/kdamonds";
        put(&sys_root, &format!("{a}/nr_kdamonds"), "0\n");
        put(&sys_root, &format!("{a}/0/state"), "off\n");
        put(&sys_root, &format!("{a}/0/pid"), "-1\n");
        put(&sys_root, &format!("{a}/0/contexts/nr_contexts"), "0\n");
        let c = format!("{a}/0/contexts/0");
        put(
            &sys_root,
            &format!("{c}/avail_operations"),
            "vaddr\nfvaddr\npaddr\n",
        );
        put(&sys_root, &format!("{c}/operations"), "vaddr\n");
        for (f, v) in [
            ("intervals/sample_us", "5000"),
            ("intervals/aggr_us", "100000"),
            ("intervals/update_us", "1000000"),
            ("nr_regions/min", "10"),
            ("nr_regions/max", "1000"),
        ] {
            put(&sys_root, &format!("{c}/monitoring_attrs/{f}"), v);
        }
        put(&sys_root, &format!("{c}/targets/nr_targets"), "0\n");
        put(
            &sys_root,
            &format!("{c}/targets/0/regions/nr_regions"),
            "0\n",
        );
        for i in 0..2 {
            put(
                &sys_root,
                &format!("{c}/targets/0/regions/{i}/start"),
                "0\n",
            );
            put(&sys_root, &format!("{c}/targets/0/regions/{i}/end"), "0\n");
        }
        put(&sys_root, &format!("{c}/schemes/nr_schemes"), "0\n");
    }
    (proc_root, sys_root)
}

fn run(proc_root: &Path, sys_root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guest-trimmer"))
        .arg("--proc-root")
        .arg(proc_root)
        .arg("--sys-root")
        .arg(sys_root)
        .args(args)
        .env_remove("GUEST_TRIMMER_LOG")
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn sysinfo_json_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = fake_roots(dir.path(), false);
    let text = stdout(&run(&p, &s, &["sysinfo", "--json"]));
    assert_eq!(
        text,
        "{\"cpus\":2,\"mem_total_kib\":497996,\"kernel_release\":\"6.12.57+deb12-cloud-amd64\",\"uptime_ms\":3500}\n"
    );
    let text = stdout(&run(&p, &s, &["sysinfo"]));
    assert!(
        text.starts_with("cpus: 2\nmem_total_kib: 497996\n"),
        "{text}"
    );
}

#[test]
fn meminfo_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = fake_roots(dir.path(), false);
    let text = stdout(&run(&p, &s, &["meminfo", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["meminfo"]["anon_kib"], 24440);
    assert_eq!(
        json["meminfo"]["kernel_reclaimable_kib"],
        serde_json::Value::Null
    );
    assert_eq!(json["vmstat"]["free_pages"], 75308);
    let text = stdout(&run(&p, &s, &["meminfo"]));
    assert!(text.contains("meminfo.cached_kib: 132764\n"), "{text}");
    assert!(text.contains("meminfo.percpu_kib: -\n"), "{text}");
}

#[test]
fn errors_go_to_stderr_with_the_failed_operation() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = fake_roots(dir.path(), false);
    std::fs::remove_file(p.join("vmstat")).unwrap();
    let out = run(&p, &s, &["meminfo"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&format!(
            "guest-trimmer: meminfo: read {}: No such file",
            p.join("vmstat").display()
        )),
        "{err}"
    );
}

#[test]
fn damon_status_absent_and_present() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = fake_roots(dir.path(), false);
    let text = stdout(&run(&p, &s, &["damon-status", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["present"], false);
    assert!(json["reason"]
        .as_str()
        .unwrap()
        .contains("CONFIG_DAMON_SYSFS"));

    let dir = tempfile::tempdir().unwrap();
    let (p, s) = fake_roots(dir.path(), true);
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&run(&p, &s, &["damon-status", "--json"]))).unwrap();
    assert_eq!(json["present"], true);
    assert_eq!(json["nr_kdamonds"], 0);
    assert_eq!(json["avail_operations"], serde_json::Value::Null);
    let json: serde_json::Value = serde_json::from_str(&stdout(&run(
        &p,
        &s,
        &["damon-status", "--json", "--probe"],
    )))
    .unwrap();
    assert_eq!(
        json["avail_operations"],
        serde_json::json!(["vaddr", "fvaddr", "paddr"])
    );
}

#[test]
fn damon_monitor_start_and_stop_on_a_fake_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = fake_roots(dir.path(), true);
    let text = stdout(&run(
        &p,
        &s,
        &[
            "damon-monitor",
            "start",
            "--sample-us",
            "10000",
            "--aggr-us",
            "200000",
        ],
    ));
    assert_eq!(text, "kdamond 0: on\n");
    let ctx = s.join("kernel/mm/damon/admin/kdamonds/0/contexts/0");
    let read = |rel: &str| std::fs::read_to_string(ctx.join(rel)).unwrap();
    assert_eq!(read("operations"), "paddr");
    assert_eq!(read("monitoring_attrs/intervals/sample_us"), "10000");
    assert_eq!(read("monitoring_attrs/intervals/aggr_us"), "200000");
    assert_eq!(read("targets/0/regions/nr_regions"), "2");
    assert_eq!(read("targets/0/regions/1/start"), "1048576");
    assert_eq!(read("targets/0/regions/1/end"), "536870912");
    let text = stdout(&run(&p, &s, &["damon-status"]));
    assert!(text.contains("kdamond 0: state on"), "{text}");
    assert_eq!(
        stdout(&run(&p, &s, &["damon-monitor", "stop"])),
        "kdamond 0: off\n"
    );
}

/// The daemon serves the control protocol on a unix socket; `ctl` and `trim` talk to it.
/// DAMON is absent in this fake tree: the daemon still answers and says why.
#[test]
fn daemon_ctl_and_trim_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (proc_root, sys_root) = fake_roots(dir.path(), false);
    put(&proc_root, "sys/vm/drop_caches", "0");
    put(&proc_root, "sys/vm/compact_memory", "0");
    put(
        &proc_root,
        "buddyinfo",
        "Node 0, zone DMA32 1 1 1 1 1 1 1 1 1 1 1\n",
    );
    let sock = dir.path().join("ctl.sock");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_guest-trimmer"))
        .arg("--proc-root")
        .arg(&proc_root)
        .arg("--sys-root")
        .arg(&sys_root)
        .args(["--log-level", "off", "daemon", "--unix"])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock_s = sock.display().to_string();
    let mut status = None;
    for _ in 0..300 {
        let out = run(
            &proc_root,
            &sys_root,
            &["ctl", "--unix", &sock_s, r#"{"op":"status"}"#],
        );
        if out.status.success() {
            status = Some(String::from_utf8(out.stdout).unwrap());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status: serde_json::Value =
        serde_json::from_str(status.as_deref().expect("daemon answered")).unwrap();
    assert_eq!(status["monitoring"]["started"], false);
    assert!(status["monitoring"]["error"]
        .as_str()
        .unwrap()
        .contains("DAMON sysfs interface not found"));

    let bad = run(
        &proc_root,
        &sys_root,
        &["ctl", "--unix", &sock_s, r#"{"op":"nope"}"#],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("the daemon refused the request"));

    let policy = dir.path().join("p.json");
    std::fs::write(
        &policy,
        r#"{"name": "cli", "cold_age_ms": 0, "steps": [{"drop_caches": {"page_cache": "all", "slab": true}}, {"compact_memory": {}}]}"#,
    )
    .unwrap();
    let out = run(
        &proc_root,
        &sys_root,
        &[
            "trim",
            "--policy",
            policy.to_str().unwrap(),
            "--unix",
            &sock_s,
            "--json",
        ],
    );
    let reply: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(reply["ready"], true, "{reply}");
    assert_eq!(reply["report"]["steps"][1]["kind"], "compact_memory");
    assert_eq!(
        std::fs::read_to_string(proc_root.join("sys/vm/drop_caches")).unwrap(),
        "3"
    );

    // A policy with a typo fails before anything is sent, naming line and column.
    std::fs::write(&policy, "{\n  \"name\": \"x\",\n  \"cold_age\": 1\n}").unwrap();
    let out = run(
        &proc_root,
        &sys_root,
        &[
            "trim",
            "--policy",
            policy.to_str().unwrap(),
            "--unix",
            &sock_s,
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("at line 3, column") && err.contains("unknown field `cold_age`"),
        "{err}"
    );
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
