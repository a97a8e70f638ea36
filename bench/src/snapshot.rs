//! `bench snapshot`: snapshot and restore figures under real KVM (the nested rig on PVM hosts).
//!
//! Runs `bench/rig/snapshot.sh` in the rig (payload: the static `vmm`, the guest image and the
//! script), collects its `SNAPSHOT-BENCH {json}` lines and writes them with medians per case
//! (compact vs raw full dump, restore with and without chunk verification) to
//! `bench-results/snapshot.{json,md}`. Times are emulated (TCG): compare ratios only.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::rig_script::{records, run_script, write_results, Script, ScriptRun};

/// The in-rig script.
const SCRIPT: &str = include_str!("../rig/snapshot.sh");
/// Prefix of the script's result lines.
const MARKER: &str = "SNAPSHOT-BENCH ";

/// Arguments of `bench snapshot`.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// Rounds (each: a compact and a raw snapshot, each restored with and without verification).
    #[arg(long, default_value_t = 2)]
    pub runs: u32,
    /// Rig wall-clock limit in seconds.
    #[arg(long, default_value_t = 900)]
    pub rig_timeout: u64,
}

/// The median of `values` (None when empty).
pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// Medians per `(mode, verify)` of the numeric fields of `records`.
fn summarise(records: &[Value]) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut groups: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in records.iter().filter(|r| r["ok"] == json!(true)) {
        let key = format!(
            "{}/verify={}",
            r["mode"].as_str().unwrap_or("?"),
            r["verify"].as_str().unwrap_or("?")
        );
        groups.entry(key).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|(key, rs)| {
            let fields = [
                "memory_file_bytes",
                "snapshot_disk_kib",
                "snapshot_wall_ms",
                "save_state_ms",
                "write_ms",
                "restore_to_vcpus_running_ms",
                "restore_to_first_console_ms",
            ];
            let medians = fields
                .iter()
                .filter_map(|f| {
                    median(rs.iter().filter_map(|r| r[*f].as_f64()).collect())
                        .map(|m| (f.to_string(), m))
                })
                .collect();
            (key, medians)
        })
        .collect()
}

/// The Markdown table of the summary.
fn markdown(summary: &BTreeMap<String, BTreeMap<String, f64>>, runs: usize) -> String {
    let mut md = String::from(
        "# Snapshot benchmark\n\nIn the nested KVM rig (TCG: compare ratios only); medians over the runs; \
         `cargo run --release -p bench -- snapshot`.\n\n\
         | case | memory file MiB | on disk MiB | snapshot ms (wall) | save state ms | write ms | restore → vCPUs running ms | restore → first console ms |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (case, m) in summary {
        let get = |f: &str| m.get(f).copied();
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        md.push_str(&format!(
            "| {case} | {} | {} | {} | {} | {} | {} | {} |\n",
            fmt(get("memory_file_bytes").map(|b| b / 1048576.0)),
            fmt(get("snapshot_disk_kib").map(|k| k / 1024.0)),
            fmt(get("snapshot_wall_ms")),
            fmt(get("save_state_ms")),
            fmt(get("write_ms")),
            fmt(get("restore_to_vcpus_running_ms")),
            fmt(get("restore_to_first_console_ms")),
        ));
    }
    md.push_str(&format!("\n{runs} measurements.\n"));
    md
}

/// Runs the benchmark; returns the exit code.
pub fn run(args: SnapshotArgs) -> anyhow::Result<i32> {
    let outcome = run_script(ScriptRun {
        scripts: vec![Script {
            file_name: "snapshot.sh",
            text: SCRIPT,
            args: vec![args.runs.to_string()],
        }],
        env: Vec::new(),
        timeout_s: args.rig_timeout,
        data_disk: false,
        extra_files: Vec::new(),
    })?;
    write_snapshot_results(
        outcome.records(MARKER)?,
        json!({ "rig_exit": outcome.exit_code, "where": outcome.where_ }),
    )?;
    Ok(i32::from(outcome.exit_code != 0))
}

/// Turns saved `SNAPSHOT-BENCH` lines (e.g. from a manual rig run) into the results files.
pub fn from_log(log: &Path) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let records = records(&lines, MARKER);
    if records.is_empty() {
        bail!("{} holds no {MARKER}lines", log.display());
    }
    write_snapshot_results(records, json!({ "source": log }))?;
    Ok(0)
}

/// Writes `bench-results/snapshot.{json,md}` (records, medians, `origin`) and prints the table.
fn write_snapshot_results(records: Vec<Value>, origin: Value) -> anyhow::Result<()> {
    let summary = summarise(&records);
    let md = markdown(&summary, records.len());
    let report = json!({ "summary": summary, "records": records, "origin": origin });
    write_results("snapshot", &report, &md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_per_case_skip_failed_runs() {
        let records: Vec<Value> = [
            r#"{"mode":"compact","verify":"no","ok":true,"write_ms":10.0,"memory_file_bytes":1048576}"#,
            r#"{"mode":"compact","verify":"no","ok":true,"write_ms":30.0,"memory_file_bytes":1048576}"#,
            r#"{"mode":"compact","verify":"no","ok":true,"write_ms":20.0,"memory_file_bytes":1048576}"#,
            r#"{"mode":"raw","verify":"no","ok":false,"write_ms":99.0}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        let summary = summarise(&records);
        assert_eq!(summary.len(), 1);
        assert_eq!(summary["compact/verify=no"]["write_ms"], 20.0);
        let md = markdown(&summary, 4);
        assert!(md.contains("| compact/verify=no | 1.0 |"), "{md}");
    }
}
