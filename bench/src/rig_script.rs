//! Running one benchmark's shell script under real KVM: in the nested rig, or directly on a
//! host whose `/dev/kvm` boots a stock guest. The script gets the static `vmm`, the guest image
//! (`vmlinuz`, `initramfs.cpio`, optionally the data disk `data.ext4`) in its working directory
//! and prints one `MARKER {json}` line per measurement; those lines are the benchmark's records.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use rig::{KvmBackend, Payload, RigOptions};
use serde_json::Value;

use crate::host::{build_image, output_of, say, workspace_root};

/// One script run.
pub(crate) struct ScriptRun<'a> {
    /// The script's file name in the payload (`snapshot.sh`).
    pub file_name: &'a str,
    /// The script's text.
    pub script: &'a str,
    /// Its arguments.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs set in its environment.
    pub env: Vec<String>,
    /// The prefix of its record lines (`SNAPSHOT-BENCH `).
    pub marker: &'a str,
    /// Wall-clock limit of the whole run, seconds.
    pub timeout_s: u64,
    /// Whether the script needs the data disk (the standard scenario's file sets).
    pub data_disk: bool,
}

/// What a script run gave.
pub(crate) struct ScriptOutcome {
    /// The JSON records, in order.
    pub records: Vec<Value>,
    /// Where it ran, for the results file (rig times are emulated).
    pub where_: &'static str,
    /// The script's exit status.
    pub exit_code: i32,
}

/// Builds the static binaries and the guest image, runs the script and collects its records;
/// a run that printed no record is an error naming the script and how it ended.
pub(crate) fn run_script(run: ScriptRun<'_>) -> anyhow::Result<ScriptOutcome> {
    let root = workspace_root();
    say("building the static vmm and guest-trimmer (scripts/build-static.sh)");
    let text = output_of(&root.join("scripts/build-static.sh"), &[], &root)?;
    let bin_dir = PathBuf::from(
        text.lines()
            .last()
            .context("build-static.sh printed no bin dir")?,
    );
    let vmm = bin_dir.join("vmm");
    let image = build_image(&vmm, &root)?;
    let mut payload = Payload::new()?;
    payload
        .add_file(&vmm, "vmm", 0o755)?
        .add_file(&image.kernel, "vmlinuz", 0o644)?
        .add_file(&image.initrd, "initramfs.cpio", 0o644)?
        .add_bytes(run.file_name, run.script.as_bytes(), 0o755)?;
    if run.data_disk {
        let disk = image
            .data_disk
            .as_ref()
            .context("`vmm image build` made no data disk (the standard scenario's file sets)")?;
        payload.add_file(disk, "data.ext4", 0o444)?;
    }
    let mut cmd: Vec<&str> = vec!["env"];
    cmd.extend(run.env.iter().map(String::as_str));
    cmd.extend(["sh", run.file_name]);
    cmd.extend(run.args.iter().map(String::as_str));
    let echo = |l: &str| eprintln!("  {l}");
    let (where_, outcome) = match rig::detect() {
        KvmBackend::NestedRig { script } => {
            let opts = RigOptions {
                timeout_s: run.timeout_s,
                ..RigOptions::default()
            };
            let o = rig::run_in_rig(&script, payload.path(), &cmd, opts, echo)
                .with_context(|| format!("running {} in the rig", run.file_name))?;
            (
                "nested KVM rig (QEMU TCG + SVM): emulated time, 10-50x native",
                o,
            )
        }
        KvmBackend::HostKvm => {
            let o = rig::run_local(
                Path::new("/usr/bin/env"),
                &cmd[1..],
                payload.path(),
                Duration::from_secs(run.timeout_s),
                echo,
            )
            .with_context(|| format!("running {} on the host", run.file_name))?;
            ("this host's /dev/kvm", o)
        }
        KvmBackend::Unavailable { reason } => bail!("no KVM that can boot a stock guest: {reason}"),
    };
    let records = records(&outcome.lines, run.marker);
    if records.is_empty() {
        bail!(
            "{} printed no {}line (exit {}, timed out {})",
            run.file_name,
            run.marker,
            outcome.exit_code,
            outcome.timed_out
        );
    }
    Ok(ScriptOutcome {
        records,
        where_,
        exit_code: outcome.exit_code,
    })
}

/// The JSON documents after `marker` in `lines` (lines that do not parse are not records).
pub(crate) fn records(lines: &[String], marker: &str) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| l.find(marker).map(|i| &l[i + marker.len()..]))
        .filter_map(|t| serde_json::from_str(t.trim()).ok())
        .collect()
}

/// Writes `bench-results/NAME.json` and `NAME.md` (the directory `out` when given) and prints
/// the Markdown.
pub(crate) fn write_results(
    out: Option<&Path>,
    name: &str,
    json: &Value,
    markdown: &str,
) -> anyhow::Result<()> {
    let dir = out.map_or_else(|| workspace_root().join("bench-results"), Path::to_path_buf);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join(format!("{name}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(json)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = dir.join(format!("{name}.md"));
    std::fs::write(&md_path, markdown).with_context(|| format!("writing {}", md_path.display()))?;
    print!("{markdown}");
    say(&format!(
        "results in {} and {}",
        json_path.display(),
        md_path.display()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_the_json_after_the_marker() {
        let lines: Vec<String> = [
            "noise",
            "X-BENCH {\"a\":1}",
            "[ 1.0] console X-BENCH {\"a\":2} ",
            "X-BENCH {broken",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let r = records(&lines, "X-BENCH ");
        assert_eq!(r.len(), 2);
        assert_eq!(r[1]["a"], 2);
    }
}
