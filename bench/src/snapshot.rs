//! `bench snapshot`: snapshot and restore figures under real KVM (the nested rig on PVM hosts).
//!
//! Runs `bench/rig/snapshot.sh` in the rig (payload: the static `vmm`, the guest image and the
//! script), collects its `SNAPSHOT-BENCH {json}` lines and writes them with medians per case
//! (compact vs raw full dump, restore with and without chunk verification) to
//! `bench-results/snapshot.{json,md}`. Times are emulated (TCG): compare ratios only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};

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
    /// The static `vmm` (default: built into target/static).
    #[arg(long)]
    pub vmm: Option<PathBuf>,
    /// Guest kernel (default: the image `vmm image build` made).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (default: the image `vmm image build` made).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Rig wall-clock limit in seconds.
    #[arg(long, default_value_t = 900)]
    pub rig_timeout: u64,
}

/// Where `vmm image build` puts the image.
pub(crate) fn image_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let cache = var("VMM_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| var("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("vmm")))
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/vmm")))
        .unwrap_or_else(|| PathBuf::from("/tmp/vmm-cache"));
    cache.join("image")
}

/// The static vmm: `--vmm`, or built with [`rig::build_static`].
pub(crate) fn static_vmm(root: &Path, given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(vmm) = given {
        return Ok(vmm);
    }
    let built = rig::build_static(root, &["vmm"], &root.join("target/static"))
        .context("building the static vmm")?;
    built
        .into_iter()
        .find(|p| p.file_name().is_some_and(|f| f == "vmm"))
        .context("cargo built no vmm binary")
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
pub fn run(args: SnapshotArgs, root: &Path) -> anyhow::Result<i32> {
    let image = image_dir();
    let kernel = args.kernel.unwrap_or_else(|| image.join("vmlinuz"));
    let initrd = args.initrd.unwrap_or_else(|| image.join("initramfs.cpio"));
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            bail!(
                "{} does not exist: run `vmm image build` first",
                f.display()
            );
        }
    }
    let vmm = static_vmm(root, args.vmm)?;
    let mut payload = rig::Payload::new()?;
    payload
        .add_file(&vmm, "vmm", 0o755)?
        .add_file(&kernel, "vmlinuz", 0o644)?
        .add_file(&initrd, "initramfs.cpio", 0o644)?
        .add_bytes("snapshot.sh", SCRIPT.as_bytes(), 0o755)?;
    let rig::KvmBackend::NestedRig { script } = rig::detect() else {
        bail!("bench snapshot runs in the nested KVM rig; no rig script found");
    };
    let opts = rig::RigOptions {
        mem_mib: 3072,
        smp: 1,
        timeout_s: args.rig_timeout,
    };
    let runs = args.runs.to_string();
    let outcome = rig::run_in_rig(
        &script,
        payload.path(),
        &["sh", "snapshot.sh", runs.as_str()],
        opts,
        |l| eprintln!("rig: {l}"),
    )
    .context("running the snapshot benchmark in the rig")?;
    let records: Vec<Value> = outcome
        .lines
        .iter()
        .filter_map(|l| serde_json::from_str(&l[l.find(MARKER)? + MARKER.len()..]).ok())
        .collect();
    if records.is_empty() {
        bail!(
            "the rig printed no {MARKER}lines (exit {})",
            outcome.exit_code
        );
    }
    write_results(records, root, json!({ "rig_exit": outcome.exit_code }))?;
    Ok(i32::from(outcome.exit_code != 0))
}

/// Turns saved `SNAPSHOT-BENCH` lines (e.g. from a manual rig run) into the results files.
pub fn from_log(log: &Path, root: &Path) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let records: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(&l[l.find(MARKER)? + MARKER.len()..]).ok())
        .collect();
    if records.is_empty() {
        bail!("{} holds no {MARKER}lines", log.display());
    }
    write_results(records, root, json!({ "source": log }))?;
    Ok(0)
}

/// Writes `bench-results/snapshot.{json,md}` (records, medians, `origin`) and prints the table.
fn write_results(records: Vec<Value>, root: &Path, origin: Value) -> anyhow::Result<()> {
    let summary = summarise(&records);
    let out = root.join("bench-results");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let md = markdown(&summary, records.len());
    let report = json!({ "summary": summary, "records": records, "origin": origin });
    std::fs::write(
        out.join("snapshot.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(out.join("snapshot.md"), &md)?;
    print!("{md}");
    Ok(())
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
