//! The suite's results: parsing `suite.sh`'s lines, medians per variant, ours/QEMU ratios
//! computed within each run, the issues' goals, and the Markdown table.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::snapshot::median;

/// Prefix of a result line.
pub const MARKER: &str = "SUITE-BENCH ";
/// Prefix of a line carrying our `vmm snapshot --json` output: `<run> <variant> {json}`.
pub const SNAP_MARKER: &str = "SUITE-SNAPJSON ";

/// The variants, in table order: (key, description).
pub const VARIANTS: &[(&str, &str)] = &[
    ("raw", "ours, raw full dump (`--raw-memory`)"),
    ("untrimmed", "ours, compact untrimmed (`--no-trim`)"),
    ("default", "ours, trimmed (default.json)"),
    ("aggressive", "ours, trimmed (aggressive.json)"),
    ("qemu-plain", "QEMU, `migrate` to a file (plain stream)"),
    (
        "qemu-mapped-ram",
        "QEMU, `mapped-ram` + cache drop + reporting order 0",
    ),
];
/// Our variants compared with QEMU.
const OURS: &[&str] = &["untrimmed", "default", "aggressive"];
/// QEMU's variants.
const QEMU: &[&str] = &["qemu-plain", "qemu-mapped-ram"];
/// The figures of each record (all: smaller is better).
pub const FIELDS: &[&str] = &[
    "snapshot_alloc_bytes",
    "snapshot_apparent_bytes",
    "snapshot_ms",
    "restore_running_ms",
    "restore_answer_ms",
    "first_request_ms",
    "rss_kib",
    "boot_ms",
];
/// The hot set the live floor counts (the standard scenario's 32 MiB).
const HOT_SET_BYTES: f64 = 32.0 * 1048576.0;

/// The results of one rig run, as parsed from its output.
#[derive(Debug, Default)]
pub struct Parsed {
    /// `SUITE-BENCH` records.
    pub records: Vec<Value>,
    /// `(run, variant)` → our snapshot's JSON summary.
    pub snapshots: BTreeMap<(u64, String), Value>,
}

/// Reads `SUITE-BENCH` and `SUITE-SNAPJSON` lines out of the rig's output (lines may carry a
/// prefix, e.g. a timestamp); anything else is ignored.
pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Parsed {
    let mut p = Parsed::default();
    for line in lines {
        if let Some(i) = line.find(MARKER) {
            if let Ok(v) = serde_json::from_str::<Value>(line[i + MARKER.len()..].trim()) {
                p.records.push(v);
            }
        } else if let Some(i) = line.find(SNAP_MARKER) {
            let mut it = line[i + SNAP_MARKER.len()..].splitn(3, ' ');
            let (Some(run), Some(variant), Some(text)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if let (Ok(run), Ok(v)) = (run.parse(), serde_json::from_str::<Value>(text.trim())) {
                p.snapshots.insert((run, variant.to_string()), v);
            }
        }
    }
    p
}

/// Guest RAM of the S512 guest.
const GUEST_RAM_BYTES: f64 = 512.0 * 1048576.0;

/// Memory the guest kernel holds from boot and never counts in `MemTotal` (its code and data,
/// the page map, firmware reservations): guest RAM − `MemTotal`, from a trimmed snapshot's
/// summary. Unreclaimable too, but not in /proc/meminfo, so shown as a second floor. A few of
/// these pages are zero (skipped by ours), so it slightly overstates what a snapshot must hold.
pub fn kernel_image_bytes(snapshot: &Value) -> Option<f64> {
    let total_kib = trim_after(snapshot)?["total_kib"].as_f64()?;
    Some((GUEST_RAM_BYTES - total_kib * 1024.0).max(0.0))
}

/// The guest's memory figures after the trim (`/proc/meminfo`, as the trimmer measured them),
/// from a trimmed snapshot's summary.
fn trim_after(snapshot: &Value) -> Option<&Value> {
    let trim = snapshot["steps"]
        .as_array()?
        .iter()
        .find(|s| s["step"] == "trim")?;
    Some(&trim["detail"]["report"]["after"])
}

/// The live floor of a trimmed snapshot's summary: anonymous memory + the kernel's
/// unreclaimable memory after the trim (as the trimmer measured it in the guest) + the hot set.
pub fn live_floor_bytes(snapshot: &Value) -> Option<f64> {
    let after = trim_after(snapshot)?;
    let kib = |k: &str| after[k].as_f64().map(|v| v * 1024.0);
    Some(kib("anon_kib")? + kib("kernel_unreclaimable_kib")? + HOT_SET_BYTES)
}

/// Looks figures up by run and variant (successful records only).
struct Table<'a> {
    by_key: BTreeMap<(u64, &'a str), &'a Value>,
    runs: Vec<u64>,
}

impl<'a> Table<'a> {
    fn new(records: &'a [Value]) -> Self {
        let by_key: BTreeMap<(u64, &str), &Value> = records
            .iter()
            .filter(|r| r["ok"] == true)
            .filter_map(|r| Some(((r["run"].as_u64()?, r["variant"].as_str()?), r)))
            .collect();
        let mut runs: Vec<u64> = records.iter().filter_map(|r| r["run"].as_u64()).collect();
        runs.sort_unstable();
        runs.dedup();
        Table { by_key, runs }
    }

    fn get(&self, run: u64, variant: &str, field: &str) -> Option<f64> {
        self.by_key.get(&(run, variant))?[field].as_f64()
    }

    /// QEMU's best (smallest) value of `field` in `run`.
    fn qemu_best(&self, run: u64, field: &str) -> Option<f64> {
        QEMU.iter()
            .filter_map(|q| self.get(run, q, field))
            .min_by(f64::total_cmp)
    }

    /// Median over runs of `f(run)` (runs where it is None are left out).
    fn median_of(&self, f: impl Fn(u64) -> Option<f64>) -> Option<f64> {
        median(self.runs.iter().filter_map(|&r| f(r)).collect())
    }
}

/// `a / b` when both exist and `b` is not zero.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (b != 0.0).then_some(a / b)
}

/// A goal: the measured value against the target.
fn goal(name: &str, target: &str, value: Option<f64>, met: impl Fn(f64) -> bool) -> Value {
    json!({
        "goal": name,
        "target": target,
        "value": value,
        "met": value.map(met),
    })
}

/// Medians per variant, ratios ours/QEMU (per run, then the median), live floor and goals.
pub fn summarise(p: &Parsed) -> Value {
    let t = Table::new(&p.records);
    let mut variants = serde_json::Map::new();
    for (key, desc) in VARIANTS {
        let all: Vec<&Value> = p.records.iter().filter(|r| r["variant"] == *key).collect();
        let ok = all.iter().filter(|r| r["ok"] == true).count();
        let errors: Vec<&Value> = all
            .iter()
            .filter(|r| r["ok"] != true)
            .map(|r| &r["error"])
            .collect();
        let medians: serde_json::Map<String, Value> = FIELDS
            .iter()
            .map(|f| (f.to_string(), json!(t.median_of(|r| t.get(r, key, f)))))
            .collect();
        variants.insert(
            key.to_string(),
            json!({"description": desc, "runs_ok": ok, "runs_failed": all.len() - ok,
                   "errors": errors, "median": medians}),
        );
    }
    // Ours / QEMU, each ratio within one run, then the median over runs.
    let mut ratios = serde_json::Map::new();
    for ours in OURS {
        let mut per_qemu = serde_json::Map::new();
        for q in QEMU.iter().copied().chain(["qemu-best"]) {
            let fields: serde_json::Map<String, Value> = FIELDS
                .iter()
                .map(|f| {
                    let m = t.median_of(|r| {
                        let theirs = if q == "qemu-best" {
                            t.qemu_best(r, f)
                        } else {
                            t.get(r, q, f)
                        };
                        ratio(t.get(r, ours, f), theirs)
                    });
                    (f.to_string(), json!(m))
                })
                .collect();
            per_qemu.insert(q.to_string(), Value::Object(fields));
        }
        ratios.insert(ours.to_string(), Value::Object(per_qemu));
    }
    let default_snapshot = |r: u64| p.snapshots.get(&(r, "default".into()));
    let floor_with_image = |r: u64| {
        let s = default_snapshot(r)?;
        Some(live_floor_bytes(s)? + kernel_image_bytes(s)?)
    };
    let floor_only = |r: u64| live_floor_bytes(default_snapshot(r)?);
    let floor = t.median_of(floor_only);
    let floor_image = t.median_of(floor_with_image);
    // default.json's snapshot on disk over a floor, per run, then the median.
    let over_floor = |floor_of: &dyn Fn(u64) -> Option<f64>| {
        t.median_of(|r| ratio(t.get(r, "default", "snapshot_alloc_bytes"), floor_of(r)))
    };
    let floor_ratio = over_floor(&floor_only);
    let floor_image_ratio = over_floor(&floor_with_image);
    // QEMU / ours: how many times smaller / faster ours is.
    let times = |ours: &str, q: Option<&str>, f: &str| {
        t.median_of(|r| {
            let theirs = match q {
                Some(q) => t.get(r, q, f),
                None => t.qemu_best(r, f),
            };
            ratio(theirs, t.get(r, ours, f))
        })
    };
    let first_req = t.median_of(|r| {
        ratio(
            t.get(r, "default", "first_request_ms"),
            t.get(r, "untrimmed", "first_request_ms"),
        )
    });
    let goals = vec![
        goal(
            "ours trimmed (default.json) on disk / live floor",
            "<= 1.10",
            floor_ratio,
            |v| v <= 1.10,
        ),
        goal(
            "ours trimmed (default.json) on disk / (live floor + kernel image: RAM - MemTotal)",
            "<= 1.10",
            floor_image_ratio,
            |v| v <= 1.10,
        ),
        goal(
            "QEMU best (mapped-ram, drop, reporting) on disk / ours trimmed (default.json)",
            ">= 1.3",
            times("default", Some("qemu-mapped-ram"), "snapshot_alloc_bytes"),
            |v| v >= 1.3,
        ),
        goal(
            "QEMU untrimmed (plain stream) on disk / ours trimmed (default.json)",
            ">= 2.5",
            times("default", Some("qemu-plain"), "snapshot_alloc_bytes"),
            |v| v >= 2.5,
        ),
        goal(
            "QEMU's fastest save / our save (default.json, pause -> written)",
            ">= 3",
            times("default", None, "snapshot_ms"),
            |v| v >= 3.0,
        ),
        goal(
            "QEMU's fastest -incoming restore / ours (process start -> vCPUs running)",
            ">= 10",
            times("default", None, "restore_running_ms"),
            |v| v >= 10.0,
        ),
        goal(
            "QEMU's fastest -incoming restore / ours (process start -> first guest answer)",
            ">= 10",
            times("default", None, "restore_answer_ms"),
            |v| v >= 10.0,
        ),
        goal(
            "first request after restore: default-trimmed / untrimmed",
            "<= 1.10",
            first_req,
            |v| v <= 1.10,
        ),
    ];
    json!({
        "runs": t.runs.len(),
        "variants": variants,
        "ratios_ours_over_qemu": ratios,
        "live_floor_bytes": floor,
        "live_floor_with_kernel_image_bytes": floor_image,
        "goals": goals,
    })
}

fn cell(v: &Value, scale: f64) -> String {
    v.as_f64()
        .map_or("-".to_string(), |x| format!("{:.1}", x / scale))
}

/// The Markdown report of [`summarise`]'s output.
pub fn markdown(s: &Value, header: &str) -> String {
    let mib = 1048576.0;
    let mut md = format!(
        "# Benchmark suite vs QEMU\n\n{header}\n\n\
         | variant | on disk MiB (allocated) | apparent MiB | snapshot ms | restore → vCPUs running ms | restore → first answer ms | first request ms | clone RSS MiB | boot ms | runs ok |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    for (key, desc) in VARIANTS {
        let v = &s["variants"][key];
        let m = &v["median"];
        md.push_str(&format!(
            "| {desc} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} |\n",
            cell(&m["snapshot_alloc_bytes"], mib),
            cell(&m["snapshot_apparent_bytes"], mib),
            cell(&m["snapshot_ms"], 1.0),
            cell(&m["restore_running_ms"], 1.0),
            cell(&m["restore_answer_ms"], 1.0),
            cell(&m["first_request_ms"], 1.0),
            cell(&m["rss_kib"], 1024.0),
            cell(&m["boot_ms"], 1.0),
            v["runs_ok"],
            v["runs_ok"].as_u64().unwrap_or(0) + v["runs_failed"].as_u64().unwrap_or(0),
        ));
    }
    md.push_str(&format!(
        "\nLive floor (median; live anonymous + the kernel's unreclaimable memory in /proc/meminfo + \
         the 32 MiB hot set): {} MiB; with the kernel image and page map (RAM − MemTotal): {} MiB.\n\n## Ratios ours / QEMU (within each run, median over runs; < 1 = ours smaller or faster)\n\n\
         | ours | vs | on disk | snapshot | restore → running | restore → answer | first request | clone RSS |\n|---|---|---|---|---|---|---|---|\n",
        cell(&s["live_floor_bytes"], mib),
        cell(&s["live_floor_with_kernel_image_bytes"], mib)
    ));
    let r2 = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    for ours in OURS {
        for q in QEMU.iter().copied().chain(["qemu-best"]) {
            let r = &s["ratios_ours_over_qemu"][ours][q];
            md.push_str(&format!(
                "| {ours} | {q} | {} | {} | {} | {} | {} | {} |\n",
                r2(&r["snapshot_alloc_bytes"]),
                r2(&r["snapshot_ms"]),
                r2(&r["restore_running_ms"]),
                r2(&r["restore_answer_ms"]),
                r2(&r["first_request_ms"]),
                r2(&r["rss_kib"]),
            ));
        }
    }
    md.push_str("\n## Goals\n\n| goal | target | measured | |\n|---|---|---|---|\n");
    for g in s["goals"].as_array().into_iter().flatten() {
        let verdict = match g["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        md.push_str(&format!(
            "| {} | {} | {} | {verdict} |\n",
            g["goal"].as_str().unwrap_or("?"),
            g["target"].as_str().unwrap_or("?"),
            r2(&g["value"]),
        ));
    }
    let mut failures = String::new();
    for (key, _) in VARIANTS {
        for e in s["variants"][key]["errors"]
            .as_array()
            .into_iter()
            .flatten()
        {
            failures.push_str(&format!("- {key}: {}\n", e.as_str().unwrap_or("?")));
        }
    }
    if !failures.is_empty() {
        md.push_str(&format!("\n## Failed runs\n\n{failures}"));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(run: u64, variant: &str, alloc: f64, snap: f64, running: f64, first: f64) -> String {
        format!(
            "rig: SUITE-BENCH {{\"run\":{run},\"variant\":\"{variant}\",\"ok\":true,\"error\":\"\",\
             \"snapshot_alloc_bytes\":{alloc},\"snapshot_ms\":{snap},\"restore_running_ms\":{running},\
             \"restore_answer_ms\":{running},\"first_request_ms\":{first}}}"
        )
    }

    const SNAP: &str = r#"SUITE-SNAPJSON 1 default {"steps":[{"step":"hint"},{"step":"trim","detail":{"report":{"after":{"anon_kib":65536,"kernel_unreclaimable_kib":32768}}}}]}"#;

    #[test]
    fn parses_records_and_snapshot_summaries() {
        let lines = [
            rec(1, "default", 1.0, 2.0, 3.0, 4.0),
            "noise SUITE-BENCH {broken".to_string(),
            SNAP.to_string(),
            "SUITE-SNAPJSON 1 raw not-json".to_string(),
        ];
        let p = parse(lines.iter().map(String::as_str));
        assert_eq!(p.records.len(), 1);
        assert_eq!(p.snapshots.len(), 1);
        let floor = live_floor_bytes(&p.snapshots[&(1, "default".to_string())]).unwrap();
        assert_eq!(floor, (64.0 + 32.0 + 32.0) * 1048576.0);
    }

    #[test]
    fn ratios_are_per_run_then_median_and_goals_are_judged() {
        let mib = 1048576.0;
        let mut lines = vec![SNAP.to_string()];
        // Run 1: ours 100 MiB vs QEMU best 200 MiB; run 2: 100 vs 400; run 3: 100 vs 150.
        for (run, q) in [(1, 200.0), (2, 400.0), (3, 150.0)] {
            lines.push(rec(run, "default", 100.0 * mib, 10.0, 5.0, 50.0));
            lines.push(rec(run, "untrimmed", 300.0 * mib, 10.0, 5.0, 50.0));
            lines.push(rec(run, "qemu-mapped-ram", q * mib, 40.0, 100.0, 60.0));
            lines.push(rec(run, "qemu-plain", 3.0 * q * mib, 30.0, 80.0, 60.0));
        }
        lines.push(
            "SUITE-BENCH {\"run\":3,\"variant\":\"aggressive\",\"ok\":false,\"error\":\"boom\"}"
                .into(),
        );
        let s = summarise(&parse(lines.iter().map(String::as_str)));
        assert_eq!(s["runs"], 3);
        assert_eq!(
            s["variants"]["default"]["median"]["snapshot_alloc_bytes"],
            100.0 * mib
        );
        assert_eq!(s["variants"]["aggressive"]["runs_failed"], 1);
        // Per-run ratios 0.5, 0.25, 0.667: median 0.5 (not 100 / median(200, 400, 150)).
        assert_eq!(
            s["ratios_ours_over_qemu"]["default"]["qemu-mapped-ram"]["snapshot_alloc_bytes"],
            0.5
        );
        // QEMU's best save is the plain one (30 ms).
        assert_eq!(
            s["ratios_ours_over_qemu"]["default"]["qemu-best"]["snapshot_ms"],
            10.0 / 30.0
        );
        let goals = s["goals"].as_array().unwrap();
        let by = |name: &str| {
            goals
                .iter()
                .find(|g| g["goal"].as_str().unwrap().starts_with(name))
                .unwrap()
        };
        // Floor only in run 1: 100 MiB / 128 MiB.
        assert_eq!(by("ours trimmed")["met"], true);
        assert_eq!(by("QEMU best")["value"], 2.0);
        assert_eq!(by("QEMU best")["met"], true);
        assert_eq!(by("QEMU's fastest save")["value"], 3.0);
        assert_eq!(by("QEMU's fastest save")["met"], true);
        assert_eq!(
            by("QEMU's fastest -incoming restore / ours (process start -> vCPUs")["value"],
            16.0
        );
        assert_eq!(by("first request")["value"], 1.0);
        let md = markdown(&s, "test");
        assert!(
            md.contains("| ours, trimmed (default.json) | 100.0 |"),
            "{md}"
        );
        assert!(md.contains("- aggressive: boom"), "{md}");
        assert!(md.contains("| met |"), "{md}");
    }

    #[test]
    fn a_missing_figure_is_not_measured_not_met() {
        let s = summarise(&parse([
            "SUITE-BENCH {\"run\":1,\"variant\":\"default\",\"ok\":true}",
        ]));
        assert!(s["goals"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["met"].is_null()));
        assert!(markdown(&s, "").contains("not measured"));
    }
}
