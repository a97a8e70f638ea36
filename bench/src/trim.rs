//! `bench trim`: the guest-trimmer's cost while idle and a trim's time and bytes freed per step,
//! under real KVM (the nested rig on PVM hosts). Runs `bench/rig/trim.sh` there (static `vmm`,
//! the guest image), parses its `TRIM-BENCH {json}` lines and writes
//! `bench-results/trim.{json,md}`.

use anyhow::bail;
use serde_json::{json, Value};

use guest_trimmer::calibrate::{self, Calibration, SlowdownFactors};

use crate::chart::{write_svg, Chart, Group};
use crate::rig_script::{results_dir, run_script, write_results, Script, ScriptRun};
use crate::stats::Summary;

/// The in-rig script.
const SCRIPT: &str = include_str!("../rig/trim.sh");
/// Marker of a result line.
const MARKER: &str = "TRIM-BENCH ";

/// Arguments of `bench trim`.
#[derive(Debug, clap::Args)]
pub struct TrimArgs {
    /// Runs; each boots one guest per variant (one trim each).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Seconds of idle daemon between the two cost samples (also how long the cold set
    /// stays untouched before the trim: past the policy's 20 s cold age).
    #[arg(long, default_value_t = 40)]
    pub idle_s: u32,
    /// Variants, in rig order: `trim-intervals` (s512 as shipped: short DAMON intervals for
    /// the trim), `idle-intervals` (s512 at the daemon's idle intervals throughout), `fast`
    /// (fast.json: no compaction, no reporting wait).
    #[arg(long, value_delimiter = ',', default_values_t = [String::from(PRIMARY), String::from("idle-intervals")])]
    pub variants: Vec<String>,
    /// Rig wall-clock limit, s.
    #[arg(long, default_value_t = 1500)]
    pub rig_timeout: u64,
    /// No rig: summarize again the runs (and host calibration) recorded in this results file,
    /// e.g. bench-results/trim.json after the summary changed.
    #[arg(long)]
    pub resummarize: Option<std::path::PathBuf>,
}

/// The variant the top-level figures (and the README) are about.
const PRIMARY: &str = "trim-intervals";

/// Runs the benchmark; returns the exit code (1 when a run failed).
pub fn run(args: TrimArgs) -> anyhow::Result<i32> {
    if let Some(path) = &args.resummarize {
        return resummarize(path);
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if let Some(v) = args
        .variants
        .iter()
        .find(|v| !matches!(v.as_str(), "trim-intervals" | "idle-intervals" | "fast"))
    {
        bail!("unknown variant {v:?}: trim-intervals, idle-intervals or fast");
    }
    let outcome = run_script(ScriptRun {
        scripts: vec![Script {
            file_name: "trim.sh",
            text: SCRIPT,
            args: vec![args.runs.to_string()],
        }],
        env: vec![
            format!("TRIM_BENCH_IDLE_S={}", args.idle_s),
            format!("TRIM_BENCH_VARIANTS={}", args.variants.join(",")),
        ],
        timeout_s: args.rig_timeout,
        data_disk: true,
        extra_files: Vec::new(),
    })?;
    let samples = outcome.records(MARKER)?;
    // The same loops on this host, after the rig has finished (median of three).
    let host = host_calibration();
    let result = summarize(&samples, args.idle_s, outcome.where_, &host);
    write_all(&result)?;
    let failed = samples.iter().filter(|s| s["ok"] != true).count();
    Ok(i32::from(failed > 0))
}

/// `--resummarize FILE`: the recorded runs summarized again (date and place kept).
fn resummarize(path: &std::path::Path) -> anyhow::Result<i32> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let old: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let samples = old["runs"]
        .as_array()
        .cloned()
        .context("no \"runs\" in the results file")?;
    let host: Calibration = serde_json::from_value(old["host_calibration"].clone())
        .context("no \"host_calibration\" in the results file")?;
    let idle_s = old["idle_s"].as_u64().unwrap_or(0) as u32;
    let mut result = summarize(&samples, idle_s, old["where"].as_str().unwrap_or(""), &host);
    result["date"] = old["date"].clone();
    write_all(&result)?;
    Ok(0)
}

/// Writes bench-results/trim.{json,md,svg}.
fn write_all(result: &Value) -> anyhow::Result<()> {
    let md = markdown(result);
    write_results("trim", result, &md)?;
    let charts: Vec<Chart> = serde_json::from_value(result["charts"].clone())?;
    write_svg(
        &results_dir()?.join("trim.svg"),
        "bench-results/trim",
        &charts,
    )
}

/// The calibration loops on this host: the run with the median arithmetic time of three.
fn host_calibration() -> Calibration {
    let mut runs: Vec<Calibration> = (0..3).map(|_| calibrate::run(Default::default())).collect();
    runs.sort_by(|a, b| a.alu_ns_per_iter.total_cmp(&b.alu_ns_per_iter));
    runs[1]
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn med(values: impl IntoIterator<Item = Option<f64>>) -> Value {
    Summary::of_some(values).map_or(Value::Null, |s| json!(s))
}

/// How much slower the guest's CPU was than the host's in `sample`: the smallest of the
/// loops' factors (the most conservative hardware estimate), or the largest when `!smallest`.
fn slowdown_by(sample: &Value, host: &Calibration, smallest: bool) -> Option<f64> {
    let guest: Calibration = serde_json::from_value(sample["calibration"].clone()).ok()?;
    let factors = SlowdownFactors::of(&guest, host);
    let f = if smallest {
        factors.smallest()
    } else {
        factors.largest()
    };
    (f.is_finite() && f > 0.0).then_some(f)
}

/// The smallest slowdown factor of `sample` (see [`slowdown_by`]).
fn slowdown(sample: &Value, host: &Calibration) -> Option<f64> {
    slowdown_by(sample, host, true)
}

/// A step's (or a whole trim's) time on hardware, estimated from its emulated wall time and
/// CPU work (trimmer + kdamond + hooked processes): the CPU work runs `factor` times faster, the rest of the
/// wall time is waiting for timers (DAMON's intervals, the reporting delay), the same there.
pub fn hardware_ms(wall_ms: f64, cpu_ms: f64, factor: f64) -> f64 {
    let cpu = cpu_ms.min(wall_ms);
    (wall_ms - cpu) + cpu / factor
}

/// CPU work (trimmer + kdamond + the processes hooks asked, where measured) of a report's step
/// or whole report (`cpu` object).
fn cpu_work(cpu: &Value) -> Option<f64> {
    Some(
        num(&cpu["trimmer_ms"])? + num(&cpu["kdamond_ms"])? + num(&cpu["hooked_ms"]).unwrap_or(0.0),
    )
}

/// The DAMON pass of a step's detail (`damon_pageout`, or the cold pass of `drop_caches`).
fn damon_pass_detail(step: &Value) -> &Value {
    let d = &step["detail"];
    if d["cold_pageout"].is_object() {
        &d["cold_pageout"]
    } else {
        d
    }
}

/// A step's estimated hardware time ([`hardware_ms`]). A DAMON pass that read the region ages
/// because kdamond 0 was busy (falling behind its intervals) would not read them on hardware,
/// where kdamond's busy share is `factor` times smaller, below the trimmer's threshold of 0.1:
/// the read's wall time is left out then.
fn step_hardware_ms(step: &Value, factor: f64) -> Option<f64> {
    let mut wall = num(&step["duration_ms"])?;
    let pass = damon_pass_detail(step);
    if pass["ages_read"] == true
        && num(&pass["kdamond_busy_share"]).is_some_and(|b| b / factor < 0.1)
    {
        wall -= num(&pass["ages_read_ms"]).unwrap_or(0.0).min(wall);
    }
    Some(hardware_ms(wall, cpu_work(&step["cpu"])?, factor))
}

/// Per sample: the estimated hardware time of the trim without the reporting wait (steps
/// other than `wait_reported`, plus the DAMON interval switches, which are waits).
fn hardware_trim_ms(sample: &Value, factor: f64) -> Option<f64> {
    let r = &sample["reply"]["report"];
    let mut total = 0.0;
    for st in r["steps"].as_array()? {
        if st["kind"] == "wait_reported" {
            continue;
        }
        total += step_hardware_ms(st, factor)?;
    }
    let i = &r["damon_intervals"];
    // `switch_ms`: reports before the switch rode on the pageout commits (older results files).
    total += num(&i["switch_ms"]).unwrap_or(0.0) + num(&i["restore_ms"]).unwrap_or(0.0);
    Some(total)
}

/// Medians over the samples of one variant.
fn variant_summary(samples: &[&Value], host: &Calibration) -> Value {
    let report = |s: &Value| s["reply"]["report"].clone();
    let kinds: Vec<String> = samples
        .first()
        .map(|s| report(s)["steps"].clone())
        .and_then(|v| v.as_array().cloned())
        .into_iter()
        .flatten()
        .filter_map(|s| s["kind"].as_str().map(String::from))
        .collect();
    let steps: Vec<Value> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let at = |f: &'static str| samples.iter().map(move |s| num(&report(s)["steps"][i][f]));
            let cpu = |f: &'static str| {
                samples
                    .iter()
                    .map(move |s| num(&report(s)["steps"][i]["cpu"][f]))
            };
            json!({
                "index": i, "kind": k,
                "duration_ms": med(at("duration_ms")),
                "cpu_work_ms": med(samples.iter().map(|s| cpu_work(&report(s)["steps"][i]["cpu"]))),
                "trimmer_cpu_ms": med(cpu("trimmer_ms")),
                "kdamond_cpu_ms": med(cpu("kdamond_ms")),
                "hooked_cpu_ms": med(cpu("hooked_ms")),
                "guest_busy_ms": med(cpu("guest_busy_ms")),
                "hardware_ms": med(samples.iter().map(|s| {
                    step_hardware_ms(&report(s)["steps"][i], slowdown(s, host)?)
                })),
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
    let intervals = |f: &'static str| {
        med(samples
            .iter()
            .map(move |s| num(&report(s)["damon_intervals"][f])))
    };
    json!({
        "runs": samples.len(),
        "median": {
            "total_ms": top("total_ms"),
            "trim_ms": top("trim_ms"),
            "trim_cpu_work_ms": med(samples.iter().map(|s| cpu_work(&report(s)["cpu"]))),
            "trim_guest_busy_ms": med(samples.iter().map(|s| num(&report(s)["cpu"]["guest_busy_ms"]))),
            "cpu_slowdown_factor": med(samples.iter().map(|s| slowdown(s, host))),
            "hardware_trim_ms": med(samples.iter().map(|s| hardware_trim_ms(s, slowdown(s, host)?))),
            "cpu_slowdown_factor_largest": med(samples.iter().map(|s| slowdown_by(s, host, false))),
            "hardware_trim_ms_low": med(samples.iter().map(|s| hardware_trim_ms(s, slowdown_by(s, host, false)?))),
            "intervals_switch_ms": intervals("switch_ms"),
            "intervals_restore_ms": intervals("restore_ms"),
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
        "steps": steps,
    })
}

/// Medians per variant; the top-level `median` and `steps` are the primary variant's.
pub fn summarize(samples: &[Value], idle_s: u32, where_: &str, host: &Calibration) -> Value {
    let mut names: Vec<String> = Vec::new();
    for s in samples {
        let v = s["variant"].as_str().unwrap_or(PRIMARY).to_string();
        if !names.contains(&v) {
            names.push(v);
        }
    }
    let variants: serde_json::Map<String, Value> = names
        .iter()
        .map(|n| {
            let of: Vec<&Value> = samples
                .iter()
                .filter(|s| s["variant"].as_str().unwrap_or(PRIMARY) == n)
                .collect();
            (n.clone(), variant_summary(&of, host))
        })
        .collect();
    let primary = variants
        .get(PRIMARY)
        .or_else(|| variants.values().next())
        .cloned()
        .unwrap_or(Value::Null);
    let attrs = guest_trimmer::control::DAEMON_ATTRS;
    // The trim's intervals as the daemon reported them.
    let trim_intervals = samples.iter().find_map(|s| {
        let i = &s["reply"]["report"]["damon_intervals"];
        Some((i["sample_us"].as_u64()?, i["aggr_us"].as_u64()?))
    });
    let mut result = json!({
        "benchmark": "guest-trimmer: idle cost, trim time and memory freed per step, CPU work per step, estimated hardware time",
        "date": crate::clock::utc_now(),
        "command": "cargo run --release -p bench -- trim (bench/rig/trim.sh in the rig)",
        "where": where_,
        "guest": {"mem_mib": 512, "vcpus": 2, "cmdline": "quiet", "balloon": "free_page_reporting",
                  "workload": "S512: runtime with a 64 MiB heap cache (released by its hook), 64 MiB live anonymous data, 256 MiB of files read once (cold) and 32 MiB re-read in a loop (hot) from the data disk; policy s512 (default.json + the runtime hook; variant fast: fast.json, the runtime's hook registered)"},
        "damon": {"sample_us": attrs.sample_us, "aggr_us": attrs.aggr_us, "update_us": attrs.update_us, "min_nr_regions": attrs.min_nr_regions, "max_nr_regions": attrs.max_nr_regions,
                  "trim_sample_us": trim_intervals.map(|t| t.0), "trim_aggr_us": trim_intervals.map(|t| t.1)},
        "hardware_estimate": "per step: (wall - CPU work) + CPU work / factor, where CPU work = the trimmer's, kdamond 0's and (in a hooks step) the hooked processes' CPU time during the step (/proc/PID/stat; a unix socket hook's peer, a signal hook's pid, while the hook waited for them) and factor = the smallest of the guest/host time ratios of guest-trimmer cpu-calibrate's three loops (arithmetic, page faults, dependent loads), run in the same guest after the trim and on this host (hardware_trim_ms_low: the largest factor instead, the optimistic end); the trim's estimate adds the DAMON interval switches (waits) and leaves out wait_reported; a DAMON pass that read the region ages because kdamond 0 was busy leaves the read's wall time out when kdamond's busy share divided by the factor is below the trimmer's 0.1 threshold (on hardware the trimmer would not read them)",
        "host_calibration": host,
        "median": primary["median"],
        "steps": primary["steps"],
        "variants": variants,
        "idle_s": idle_s,
        "runs": samples,
    });
    result["charts"] = serde_json::to_value(charts(&result)).unwrap_or(Value::Null);
    result
}

/// The variants' names, the primary first.
fn variant_names(variants: &serde_json::Map<String, Value>) -> Vec<&String> {
    let mut names: Vec<&String> = variants.keys().collect();
    names.sort_by_key(|n| n.as_str() != PRIMARY);
    names
}

fn med_of(v: &Value) -> f64 {
    v["median"].as_f64().unwrap_or(0.0)
}

/// The charts of `bench-results/trim.svg`: step times per variant (rig and estimated
/// hardware), memory before and after.
fn charts(r: &Value) -> Vec<Chart> {
    let variants = r["variants"].as_object().cloned().unwrap_or_default();
    let step_chart = |title: &str, key: &str| Chart {
        title: title.into(),
        unit: "ms".into(),
        groups: variant_names(&variants)
            .into_iter()
            .map(|name| Group {
                label: name.clone(),
                bars: variants[name]["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        (
                            s["kind"].as_str().unwrap_or("?").to_string(),
                            med_of(&s[key]),
                        )
                    })
                    .collect(),
            })
            .collect(),
    };
    let m = &r["median"];
    vec![
        step_chart(
            "Trim steps: wall time in the rig (median, emulated)",
            "duration_ms",
        ),
        step_chart(
            "Trim steps: CPU work (trimmer + kdamond) in the rig (median)",
            "cpu_work_ms",
        ),
        step_chart(
            "Trim steps: estimated time on hardware (median)",
            "hardware_ms",
        ),
        Chart {
            title: "Memory before and after a trim (median, trim-intervals)".into(),
            unit: "MiB".into(),
            groups: vec![
                Group {
                    label: "guest used".into(),
                    bars: vec![
                        ("before".into(), med_of(&m["guest_used_before_mib"])),
                        ("after".into(), med_of(&m["guest_used_after_mib"])),
                    ],
                },
                Group {
                    label: "host RSS of guest RAM".into(),
                    bars: vec![
                        ("before".into(), med_of(&m["host_rss_before_mib"])),
                        ("after".into(), med_of(&m["host_rss_after_3s_mib"])),
                    ],
                },
            ],
        },
    ]
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

/// The figures of the main table: (label, key in `median`).
const FIGURES: [(&str, &str); 21] = [
    ("whole trim, ms", "total_ms"),
    ("trim without the reporting wait, ms", "trim_ms"),
    (
        "  of it CPU work (trimmer + kdamond), ms",
        "trim_cpu_work_ms",
    ),
    ("  all guest CPUs busy meanwhile, ms", "trim_guest_busy_ms"),
    ("  DAMON intervals switch / back, ms", "intervals_switch_ms"),
    ("", "intervals_restore_ms"),
    (
        "guest CPU slowdown vs this host (cpu-calibrate), smallest loop factor",
        "cpu_slowdown_factor",
    ),
    ("  largest loop factor", "cpu_slowdown_factor_largest"),
    (
        "**estimated trim on hardware (without the reporting wait), ms, by the smallest factor**",
        "hardware_trim_ms",
    ),
    ("  by the largest factor, ms", "hardware_trim_ms_low"),
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
];

/// The results as a Markdown note.
pub fn markdown(r: &Value) -> String {
    let variants = r["variants"].as_object().cloned().unwrap_or_default();
    let names = variant_names(&variants);
    let mut s = format!(
        "# Trim benchmark\n\n{} ({}), {}. Guest: 512 MiB, 2 vCPUs; {}.\n\n\
         DAMON idle intervals: sampling {} us, aggregation {} us; during the trim \
         (`trim-intervals`): sampling {} us, aggregation {} us. `idle-intervals` runs the same \
         policy with `trim --idle-intervals`; `fast` runs fast.json (no compaction, no reporting wait; \
         the runtime's release hook registered).\n\n\
         Hardware estimate: {}.\n\n\
         Medians (min-max) over the runs of each variant.\n\n| figure |",
        r["date"].as_str().unwrap_or(""),
        r["where"].as_str().unwrap_or(""),
        r["command"].as_str().unwrap_or(""),
        r["guest"]["workload"].as_str().unwrap_or(""),
        r["damon"]["sample_us"],
        r["damon"]["aggr_us"],
        r["damon"]["trim_sample_us"],
        r["damon"]["trim_aggr_us"],
        r["hardware_estimate"].as_str().unwrap_or(""),
    );
    for n in &names {
        s.push_str(&format!(" {n} ({} runs) |", variants[*n]["runs"]));
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(names.len()));
    s.push('\n');
    for (i, (label, key)) in FIGURES.iter().enumerate() {
        if key.is_empty() || label.is_empty() {
            continue;
        }
        s.push_str(&format!("| {label} |"));
        for n in &names {
            let m = &variants[*n]["median"];
            // The switch and its way back share a row.
            let text = if *key == "intervals_switch_ms" {
                format!("{} / {}", cell(&m[*key]), cell(&m[FIGURES[i + 1].1]))
            } else {
                cell(&m[*key])
            };
            s.push_str(&format!(" {text} |"));
        }
        s.push('\n');
    }
    for n in &names {
        s.push_str(&format!(
            "\n{n}: per step\n\n| step | kind | ms | CPU work ms (trimmer / kdamond / hooked processes) | all CPUs busy ms | est. hardware ms | freed MiB | file cache dropped MiB |\n|---|---|---|---|---|---|---|---|\n"
        ));
        for st in variants[*n]["steps"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "| {} | {} | {} | {} ({:.0} / {:.0} / {}) | {} | {} | {} | {} |\n",
                st["index"],
                st["kind"].as_str().unwrap_or("?"),
                cell(&st["duration_ms"]),
                cell(&st["cpu_work_ms"]),
                med_of(&st["trimmer_cpu_ms"]),
                med_of(&st["kdamond_cpu_ms"]),
                if st["hooked_cpu_ms"].is_null() {
                    "-".to_string()
                } else {
                    format!("{:.0}", med_of(&st["hooked_cpu_ms"]))
                },
                cell(&st["guest_busy_ms"]),
                cell(&st["hardware_ms"]),
                cell(&st["freed_mib"]),
                cell(&st["file_cache_dropped_mib"])
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cal(scale: f64) -> Calibration {
        Calibration {
            size: Default::default(),
            alu_ns_per_iter: 2.0 * scale,
            fault_ns_per_page: 1000.0 * scale,
            chase_ns_per_load: 100.0 * scale,
        }
    }

    #[test]
    fn hardware_estimate_scales_only_the_cpu_part() {
        // 1000 ms wall of which 400 ms CPU, 20x slower: 600 ms waiting + 20 ms CPU.
        assert_eq!(hardware_ms(1000.0, 400.0, 20.0), 620.0);
        // CPU over wall (two vCPUs) counts at most the wall time.
        assert_eq!(hardware_ms(100.0, 300.0, 10.0), 10.0);
    }

    #[test]
    fn the_hooked_processes_cpu_is_work_not_waiting() {
        let hooks =
            |cpu: Value| json!({"kind": "hooks", "duration_ms": 1000, "detail": {}, "cpu": cpu});
        // 1000 ms wall, 100 ms trimmer + 700 ms of the runtime releasing its cache, 10x.
        let with = hooks(json!({"trimmer_ms": 100, "kdamond_ms": 0, "hooked_ms": 700}));
        assert_eq!(step_hardware_ms(&with, 10.0), Some(280.0));
        // Reports from before the measurement count the runtime's work as waiting.
        let without = hooks(json!({"trimmer_ms": 100, "kdamond_ms": 0}));
        assert_eq!(step_hardware_ms(&without, 10.0), Some(910.0));
    }

    #[test]
    fn an_age_read_a_hardware_kdamond_would_skip_is_left_out() {
        let step = |busy: f64, nested: bool| {
            let pass = json!({"ages_read": true, "kdamond_busy_share": busy, "ages_read_ms": 300});
            let detail = if nested {
                json!({"cold_pageout": pass})
            } else {
                pass
            };
            json!({"kind": "damon_pageout", "duration_ms": 1000, "detail": detail,
                "cpu": {"trimmer_ms": 100, "kdamond_ms": 100}})
        };
        // Busy 0.6 at 10x: 0.06 on hardware, under 0.1: 1000 - 300 - 200 + 200 / 10.
        assert_eq!(step_hardware_ms(&step(0.6, false), 10.0), Some(520.0));
        assert_eq!(step_hardware_ms(&step(0.6, true), 10.0), Some(520.0));
        // Busy 0.6 at 2x: 0.3, the hardware trimmer would read the ages too.
        assert_eq!(step_hardware_ms(&step(0.6, false), 2.0), Some(900.0));
    }

    #[test]
    fn summary_of_two_runs_per_variant() {
        let run = |variant: &str, ms: u64, k0: u64, k1: u64| {
            let mut guest = serde_json::to_value(cal(1.0)).unwrap();
            // The guest is 20x slower on arithmetic, 30x on faults, 25x on loads.
            guest["alu_ns_per_iter"] = json!(40.0);
            guest["fault_ns_per_page"] = json!(30000.0);
            guest["chase_ns_per_load"] = json!(2500.0);
            json!({"ok": true, "variant": variant, "idle_s": 20, "uptime0_s": 10.0, "uptime1_s": 30.0,
                "stats0": {"kdamond": {"cpu_ms": k0}, "daemon": {"cpu_ms": 5, "rss_kib": 3000}},
                "stats1": {"kdamond": {"cpu_ms": k1}, "daemon": {"cpu_ms": 7, "rss_kib": 3100}},
                "host_rss_before_kib": 400 * 1024, "host_rss_after_kib": 300 * 1024, "host_rss_after_3s_kib": 250 * 1024,
                "cold_resident": "0 262144", "hot_resident": "32768 32768",
                "calibration": guest,
                "reply": {"report": {"total_ms": ms, "trim_ms": ms / 2, "freed_kib": 65536,
                    "cpu": {"trimmer_ms": 100, "kdamond_ms": 300, "guest_busy_ms": 900},
                    "damon_intervals": {"sample_us": 5000, "aggr_us": 100000, "switch_ms": 200, "restore_ms": 100},
                    "before": {"used_kib": 200 * 1024}, "after": {"used_kib": 136 * 1024},
                    "steps": [
                        {"kind": "hooks", "duration_ms": 40, "freed_kib": 65536, "file_cache_dropped_kib": 0,
                         "cpu": {"trimmer_ms": 20, "kdamond_ms": 0, "guest_busy_ms": 30}},
                        {"kind": "wait_reported", "duration_ms": 2000, "freed_kib": 0, "file_cache_dropped_kib": 0,
                         "cpu": {"trimmer_ms": 0, "kdamond_ms": 0, "guest_busy_ms": 30}}]}}})
        };
        let samples = [
            run("trim-intervals", 1000, 100, 300),
            run("trim-intervals", 3000, 100, 500),
            run("idle-intervals", 5000, 100, 500),
        ];
        let r = summarize(&samples, 20, "test", &cal(1.0));
        assert_eq!(r["median"]["total_ms"]["median"], 2000.0);
        assert_eq!(
            r["variants"]["idle-intervals"]["median"]["total_ms"]["median"],
            5000.0
        );
        assert_eq!(r["variants"]["trim-intervals"]["runs"], 2);
        // (200 + 400) / 2 ms of CPU over 20 s: 1.5 %.
        assert_eq!(r["median"]["idle_kdamond_cpu_percent"]["median"], 1.5);
        assert_eq!(r["median"]["idle_daemon_cpu_percent"]["median"], 0.01);
        assert_eq!(r["steps"][0]["freed_mib"]["median"], 64.0);
        assert_eq!(r["median"]["hot_cached_percent"]["median"], 100.0);
        assert_eq!(r["median"]["cold_cached_percent"]["median"], 0.0);
        // The smallest factor (20x): hooks 20 ms wall + 20 ms CPU -> 1 ms; wait_reported is
        // left out of the trim; the interval switches (300 ms) are waits. The largest (30x):
        // 20 + 20/30 + 300.
        assert_eq!(r["median"]["cpu_slowdown_factor_largest"]["median"], 30.0);
        let low = r["median"]["hardware_trim_ms_low"]["median"]
            .as_f64()
            .unwrap();
        assert!((low - (320.0 + 20.0 / 30.0)).abs() < 1e-9, "{low}");
        assert_eq!(r["median"]["cpu_slowdown_factor"]["median"], 20.0);
        assert_eq!(r["steps"][0]["hardware_ms"]["median"], 21.0);
        assert_eq!(r["median"]["hardware_trim_ms"]["median"], 321.0);
        assert_eq!(r["median"]["trim_cpu_work_ms"]["median"], 400.0);
        assert_eq!(r["damon"]["trim_aggr_us"], 100000);
        assert_eq!(r["charts"].as_array().map(Vec::len), Some(4));
        let md = markdown(&r);
        assert!(
            md.contains("| 0 | hooks | 40.0 (40.0-40.0) | 20.0 (20.0-20.0) (20 / 0 / -) | 30.0 (30.0-30.0) | 21.0 (21.0-21.0) | 64.0 (64.0-64.0) |"),
            "{md}"
        );
        assert!(
            md.contains("| idle: kdamond CPU, % of one vCPU | 1.5 (1.0-2.0) | 2.0 (2.0-2.0) |"),
            "{md}"
        );
        assert!(
            md.contains("| figure | trim-intervals (2 runs) | idle-intervals (1 runs) |"),
            "{md}"
        );
    }
}
