//! `bench trim`: the guest-trimmer's cost while idle and a trim's time and bytes freed per step,
//! under real KVM (the nested rig on PVM hosts). Runs `bench/rig/trim.sh` there (static `vmm`,
//! the guest image), parses its `TRIM-BENCH {json}` lines and writes
//! `bench-results/trim.{json,md}`.

use anyhow::bail;
use serde_json::{json, Value};

use crate::rig_script::{run_script, write_results, Script, ScriptRun};
use crate::stats::Summary;

/// The in-rig script.
const SCRIPT: &str = include_str!("../rig/trim.sh");
/// Marker of a result line.
const MARKER: &str = "TRIM-BENCH ";

/// Arguments of `bench trim`.
#[derive(Debug, clap::Args)]
pub struct TrimArgs {
    /// Guest boots (one trim each).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Seconds of idle daemon between the two cost samples (also how long the cold set
    /// stays untouched before the trim: past the policy's 20 s cold age).
    #[arg(long, default_value_t = 40)]
    pub idle_s: u32,
    /// Rig wall-clock limit, s.
    #[arg(long, default_value_t = 1500)]
    pub rig_timeout: u64,
}

/// Runs the benchmark; returns the exit code (1 when a run failed).
pub fn run(args: TrimArgs) -> anyhow::Result<i32> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let outcome = run_script(ScriptRun {
        scripts: vec![Script {
            file_name: "trim.sh",
            text: SCRIPT,
            args: vec![args.runs.to_string()],
        }],
        env: vec![format!("TRIM_BENCH_IDLE_S={}", args.idle_s)],
        timeout_s: args.rig_timeout,
        data_disk: true,
        extra_files: Vec::new(),
    })?;
    let samples = outcome.records(MARKER)?;
    let result = summarize(&samples, args.idle_s, outcome.where_);
    let md = markdown(&result);
    write_results("trim", &result, &md)?;
    let failed = samples.iter().filter(|s| s["ok"] != true).count();
    Ok(i32::from(failed > 0))
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn med(values: impl IntoIterator<Item = Option<f64>>) -> Value {
    Summary::of_some(values).map_or(Value::Null, |s| json!(s))
}

/// Medians over runs: per step (duration, MiB freed), whole trim, host RSS, idle cost.
pub fn summarize(samples: &[Value], idle_s: u32, where_: &str) -> Value {
    let report = |s: &Value| s["reply"]["report"].clone();
    let kinds: Vec<String> = report(&samples[0])["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["kind"].as_str().map(String::from))
        .collect();
    let steps: Vec<Value> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let at = |f: &'static str| samples.iter().map(move |s| num(&report(s)["steps"][i][f]));
            json!({
                "index": i, "kind": k,
                "duration_ms": med(at("duration_ms")),
                "freed_mib": med(at("freed_kib").map(|v| v.map(|k| k / 1024.0))),
                "file_cache_dropped_mib": med(at("file_cache_dropped_kib").map(|v| v.map(|k| k / 1024.0))),
            })
        })
        .collect();
    let top = |f: &str| med(samples.iter().map(|s| num(&report(s)[f])));
    let mib = |f: &str| med(samples.iter().map(|s| num(&s[f]).map(|k| k / 1024.0)));
    // Idle cost: CPU time used between the two samples, as a share of the elapsed time.
    let share = |who: &str| {
        med(samples.iter().map(|s| {
            let cpu0 = num(&s["stats0"][who]["cpu_ms"])?;
            let cpu1 = num(&s["stats1"][who]["cpu_ms"])?;
            let dt_ms = (num(&s["uptime1_s"])? - num(&s["uptime0_s"])?) * 1000.0;
            (dt_ms > 0.0).then(|| 100.0 * (cpu1 - cpu0) / dt_ms)
        }))
    };
    // `resident_kib total_kib` from mincore after the trim, as a percentage.
    let resident = |f: &str| {
        med(samples.iter().map(|s| {
            let text = s[f].as_str()?;
            let mut n = text
                .split_whitespace()
                .filter_map(|w| w.parse::<f64>().ok());
            let (r, t) = (n.next()?, n.next()?);
            (t > 0.0).then(|| 100.0 * r / t)
        }))
    };
    let attrs = guest_trimmer::control::DAEMON_ATTRS;
    json!({
        "benchmark": "guest-trimmer: idle cost, trim time and memory freed per step",
        "date": crate::clock::utc_now(),
        "command": "cargo run --release -p bench -- trim (bench/rig/trim.sh in the rig)",
        "where": where_,
        "guest": {"mem_mib": 512, "vcpus": 2, "cmdline": "quiet", "balloon": "free_page_reporting",
                  "workload": "S512: runtime with a 64 MiB heap cache (released by its hook), 64 MiB live anonymous data, 256 MiB of files read once (cold) and 32 MiB re-read in a loop (hot) from the data disk; policy s512 (default.json + the runtime hook)"},
        "damon": {"sample_us": attrs.sample_us, "aggr_us": attrs.aggr_us, "update_us": attrs.update_us, "min_nr_regions": attrs.min_nr_regions, "max_nr_regions": attrs.max_nr_regions},
        "median": {
            "total_ms": top("total_ms"),
            "trim_ms": top("trim_ms"),
            "freed_mib": med(samples.iter().map(|s| num(&report(s)["freed_kib"]).map(|k| k / 1024.0))),
            "guest_used_before_mib": med(samples.iter().map(|s| num(&report(s)["before"]["used_kib"]).map(|k| k / 1024.0))),
            "guest_used_after_mib": med(samples.iter().map(|s| num(&report(s)["after"]["used_kib"]).map(|k| k / 1024.0))),
            "host_rss_before_mib": mib("host_rss_before_kib"),
            "host_rss_after_mib": mib("host_rss_after_kib"),
            "host_rss_after_3s_mib": mib("host_rss_after_3s_kib"),
            "idle_kdamond_cpu_percent": share("kdamond"),
            "idle_daemon_cpu_percent": share("daemon"),
            "idle_daemon_rss_kib": med(samples.iter().map(|s| num(&s["stats1"]["daemon"]["rss_kib"]))),
            "cold_cached_percent": resident("cold_resident"),
            "hot_cached_percent": resident("hot_resident"),
        },
        "idle_s": idle_s,
        "steps": steps,
        "runs": samples,
    })
}

fn cell(v: &Value) -> String {
    match v.get("median").and_then(Value::as_f64) {
        Some(m) => {
            let (lo, hi) = (
                v["min"].as_f64().unwrap_or(m),
                v["max"].as_f64().unwrap_or(m),
            );
            format!("{m:.1} ({lo:.1}-{hi:.1})")
        }
        None => "–".into(),
    }
}

/// The results as a Markdown note.
pub fn markdown(r: &Value) -> String {
    let m = &r["median"];
    let mut s = format!(
        "# Trim benchmark\n\n{} ({}), {}. Guest: 512 MiB, 2 vCPUs; {}.\n\n\
         Medians (min-max) over {} runs.\n\n| figure | value |\n|---|---|\n",
        r["date"].as_str().unwrap_or(""),
        r["where"].as_str().unwrap_or(""),
        r["command"].as_str().unwrap_or(""),
        r["guest"]["workload"].as_str().unwrap_or(""),
        r["runs"].as_array().map_or(0, Vec::len),
    );
    for (name, key) in [
        ("whole trim, ms", "total_ms"),
        ("trim without the reporting wait, ms", "trim_ms"),
        ("memory freed in the guest, MiB", "freed_mib"),
        (
            "guest used (MemTotal - MemFree) before, MiB",
            "guest_used_before_mib",
        ),
        ("guest used after, MiB", "guest_used_after_mib"),
        ("host RSS of guest RAM before, MiB", "host_rss_before_mib"),
        ("host RSS after the trim, MiB", "host_rss_after_mib"),
        ("host RSS 3 s later, MiB", "host_rss_after_3s_mib"),
        (
            "idle: kdamond CPU, % of one vCPU",
            "idle_kdamond_cpu_percent",
        ),
        ("idle: daemon CPU, % of one vCPU", "idle_daemon_cpu_percent"),
        ("idle: daemon RSS, KiB", "idle_daemon_rss_kib"),
        (
            "cold files still cached after the trim, %",
            "cold_cached_percent",
        ),
        (
            "hot files still cached after the trim, %",
            "hot_cached_percent",
        ),
    ] {
        let label = if name.is_empty() {
            "guest used after, MiB"
        } else {
            name
        };
        s.push_str(&format!("| {label} | {} |\n", cell(&m[key])));
    }
    s.push_str(
        "\n| step | kind | ms | freed MiB | file cache dropped MiB |\n|---|---|---|---|---|\n",
    );
    for st in r["steps"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            st["index"],
            st["kind"].as_str().unwrap_or("?"),
            cell(&st["duration_ms"]),
            cell(&st["freed_mib"]),
            cell(&st["file_cache_dropped_mib"])
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_two_runs() {
        let run = |ms: u64, k0: u64, k1: u64| {
            json!({"ok": true, "idle_s": 20, "uptime0_s": 10.0, "uptime1_s": 30.0,
                "stats0": {"kdamond": {"cpu_ms": k0}, "daemon": {"cpu_ms": 5, "rss_kib": 3000}},
                "stats1": {"kdamond": {"cpu_ms": k1}, "daemon": {"cpu_ms": 7, "rss_kib": 3100}},
                "host_rss_before_kib": 400 * 1024, "host_rss_after_kib": 300 * 1024, "host_rss_after_3s_kib": 250 * 1024,
                "cold_resident": "0 262144", "hot_resident": "32768 32768",
                "reply": {"report": {"total_ms": ms, "trim_ms": ms / 2, "freed_kib": 65536,
                    "before": {"used_kib": 200 * 1024}, "after": {"used_kib": 136 * 1024},
                    "steps": [{"kind": "hooks", "duration_ms": 40, "freed_kib": 65536, "file_cache_dropped_kib": 0}]}}})
        };
        let r = summarize(&[run(1000, 100, 300), run(3000, 100, 500)], 20, "test");
        assert_eq!(r["median"]["total_ms"]["median"], 2000.0);
        // (200 + 400) / 2 ms of CPU over 20 s: 1.5 %.
        assert_eq!(r["median"]["idle_kdamond_cpu_percent"]["median"], 1.5);
        assert_eq!(r["median"]["idle_daemon_cpu_percent"]["median"], 0.01);
        assert_eq!(r["steps"][0]["freed_mib"]["median"], 64.0);
        assert_eq!(r["median"]["hot_cached_percent"]["median"], 100.0);
        assert_eq!(r["median"]["cold_cached_percent"]["median"], 0.0);
        let md = markdown(&r);
        assert!(
            md.contains("| 0 | hooks | 40.0 (40.0-40.0) | 64.0 (64.0-64.0) |"),
            "{md}"
        );
        assert!(
            md.contains("| idle: kdamond CPU, % of one vCPU | 1.5 (1.0-2.0) |"),
            "{md}"
        );
    }
}
