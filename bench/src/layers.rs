//! `bench layers`: layered snapshots under real KVM (the nested rig on PVM hosts).
//!
//! Runs `bench/rig/layers.sh` in the rig: a base, a runtime layer and N application layers on
//! it, each application state also written as a full snapshot; a three-level chain flattened;
//! chain, flattened and full snapshots restored. Writes `bench-results/layers.{json,md}`:
//! bytes on disk of base + runtime + N layers against N full snapshots (goal ≤ 10%), time to
//! write a layer against a full snapshot, restore time of the chain against a flat snapshot.
//! Times are emulated (TCG): compare ratios only.

use serde_json::{json, Value};

use crate::rig_script::{run_script, write_results, Script, ScriptRun};
use crate::snapshot::median;

/// The in-rig script.
const SCRIPT: &str = include_str!("../rig/layers.sh");
/// Prefix of the script's result lines.
const MARKER: &str = "LAYERS-BENCH ";

/// Arguments of `bench layers`.
#[derive(clap::Args, Debug)]
pub struct LayersArgs {
    /// Application layers (and full snapshots) to write.
    #[arg(long, default_value_t = 10)]
    pub apps: u32,
    /// Rig wall-clock limit in seconds.
    #[arg(long, default_value_t = 900)]
    pub rig_timeout: u64,
}

/// The figures of a run's records.
pub fn summarise(records: &[Value]) -> Value {
    let snaps = |pred: &dyn Fn(&str) -> bool| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["kind"] == "snapshot" && pred(r["name"].as_str().unwrap_or("")))
            .collect()
    };
    let kib = |rs: &[&Value]| {
        rs.iter()
            .filter_map(|r| r["disk_kib"].as_f64())
            .sum::<f64>()
    };
    let med = |rs: &[&Value], f: &str| median(rs.iter().filter_map(|r| r[f].as_f64()).collect());
    let apps = snaps(&|n| n.starts_with("app"));
    let fulls = snaps(&|n| n.starts_with("full"));
    let base_rt = snaps(&|n| n == "base" || n == "rt");
    let layered_kib = kib(&base_rt) + kib(&apps);
    let full_kib = kib(&fulls);
    let restore = |name: &str, f: &str| {
        median(
            records
                .iter()
                .filter(|r| r["kind"] == "restore" && r["name"] == name && r["ok"] == true)
                .filter_map(|r| r[f].as_f64())
                .collect(),
        )
    };
    json!({
        "apps": apps.len(),
        "layered_disk_kib": layered_kib,
        "full_disk_kib": full_kib,
        "layered_over_full": if full_kib > 0.0 { Some(layered_kib / full_kib) } else { None },
        "base_disk_kib": kib(&snaps(&|n| n == "base")),
        "runtime_layer_disk_kib": kib(&snaps(&|n| n == "rt")),
        "app_layer_disk_kib_median": med(&apps, "disk_kib"),
        "full_disk_kib_median": med(&fulls, "disk_kib"),
        "app_layer_write_ms_median": med(&apps, "write_ms"),
        "full_write_ms_median": med(&fulls, "write_ms"),
        "app_layer_wall_ms_median": med(&apps, "wall_ms"),
        "full_wall_ms_median": med(&fulls, "wall_ms"),
        "restore_chain3_to_vcpus_running_ms": restore("app1", "to_vcpus_running_ms"),
        "restore_flat_to_vcpus_running_ms": restore("flat1", "to_vcpus_running_ms"),
        "restore_full_to_vcpus_running_ms": restore("full1", "to_vcpus_running_ms"),
        "restore_chain3_to_first_console_ms": restore("app1", "to_first_console_ms"),
        "restore_flat_to_first_console_ms": restore("flat1", "to_first_console_ms"),
    })
}

/// The Markdown report.
fn markdown(s: &Value) -> String {
    let f = |k: &str| s[k].as_f64().map_or("-".to_string(), |v| format!("{v:.1}"));
    let mib = |k: &str| {
        s[k].as_f64()
            .map_or("-".to_string(), |v| format!("{:.1}", v / 1024.0))
    };
    format!(
        "# Layered snapshot benchmark\n\nIn the nested KVM rig (TCG: compare ratios only), 256 MiB / 1 vCPU guest; \
         `cargo run --release -p bench -- layers`.\n\n\
         | storage | MiB on disk |\n|---|---|\n\
         | base | {} |\n| runtime layer (32 MiB written) | {} |\n| application layer (4 MiB written), median | {} |\n\
         | full snapshot of an application state, median | {} |\n\
         | base + runtime + {} application layers | {} |\n| {} full snapshots | {} |\n\n\
         Layered / full: **{}** (goal ≤ 0.10).\n\n\
         | time (ms, medians) | diff layer | full snapshot |\n|---|---|---|\n\
         | write (memory + state, fsync) | {} | {} |\n| `vmm snapshot` wall | {} | {} |\n\n\
         | restore (ms, medians of 3) | 3-level chain | flattened | full |\n|---|---|---|---|\n\
         | process start → vCPUs running | {} | {} | {} |\n| → first console output | {} | {} | - |\n",
        mib("base_disk_kib"),
        mib("runtime_layer_disk_kib"),
        mib("app_layer_disk_kib_median"),
        mib("full_disk_kib_median"),
        s["apps"],
        mib("layered_disk_kib"),
        s["apps"],
        mib("full_disk_kib"),
        s["layered_over_full"].as_f64().map_or("-".into(), |v| format!("{v:.3}")),
        f("app_layer_write_ms_median"),
        f("full_write_ms_median"),
        f("app_layer_wall_ms_median"),
        f("full_wall_ms_median"),
        f("restore_chain3_to_vcpus_running_ms"),
        f("restore_flat_to_vcpus_running_ms"),
        f("restore_full_to_vcpus_running_ms"),
        f("restore_chain3_to_first_console_ms"),
        f("restore_flat_to_first_console_ms"),
    )
}

/// Runs the benchmark; returns the exit code.
pub fn run(args: LayersArgs) -> anyhow::Result<i32> {
    let outcome = run_script(ScriptRun {
        scripts: vec![Script {
            file_name: "layers.sh",
            text: SCRIPT,
            args: vec![args.apps.to_string()],
        }],
        env: Vec::new(),
        timeout_s: args.rig_timeout,
        data_disk: false,
        extra_files: Vec::new(),
    })?;
    let records = outcome.records(MARKER)?;
    let summary = summarise(&records);
    let md = markdown(&summary);
    let report = json!({
        "summary": summary,
        "records": records,
        "rig_exit": outcome.exit_code,
        "where": outcome.where_,
    });
    write_results("layers", &report, &md)?;
    Ok(i32::from(outcome.exit_code != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_ratio_and_medians() {
        let records: Vec<Value> = [
            r#"{"kind":"snapshot","name":"base","disk_kib":1000}"#,
            r#"{"kind":"snapshot","name":"rt","disk_kib":200}"#,
            r#"{"kind":"snapshot","name":"app1","disk_kib":50,"write_ms":10}"#,
            r#"{"kind":"snapshot","name":"app2","disk_kib":70,"write_ms":30}"#,
            r#"{"kind":"snapshot","name":"full1","disk_kib":6000,"write_ms":100}"#,
            r#"{"kind":"snapshot","name":"full2","disk_kib":7000,"write_ms":120}"#,
            r#"{"kind":"restore","name":"app1","ok":true,"to_vcpus_running_ms":40}"#,
            r#"{"kind":"restore","name":"app1","ok":false,"to_vcpus_running_ms":99}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        let s = summarise(&records);
        assert_eq!(s["layered_disk_kib"], 1320.0);
        assert_eq!(s["full_disk_kib"], 13000.0);
        assert_eq!(s["app_layer_write_ms_median"], 30.0);
        assert_eq!(s["restore_chain3_to_vcpus_running_ms"], 40.0);
        assert!(markdown(&s).contains("| base | 1.0 |"));
    }
}
