//! Running benchmark shell scripts under real KVM: in the nested rig, or directly on a host
//! whose `/dev/kvm` boots a stock guest. The scripts run one after the other in one boot; they
//! get the static `vmm`, the guest image (`vmlinuz`, `initramfs.cpio`, optionally the data disk
//! `data.ext4`) and any extra files in their working directory and print one `MARKER {json}`
//! line per measurement; those lines are the benchmark's records.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use rig::{KvmBackend, Payload, RigOptions};
use serde_json::Value;

use crate::host::{build_image, output_of, say, workspace_root};

/// The shell helpers every script sources (`. ./lib.sh`).
pub(crate) const SHELL_LIB: &str = include_str!("../rig/lib.sh");

/// One script of a run.
pub(crate) struct Script {
    /// Its file name in the payload (`snapshot.sh`).
    pub file_name: &'static str,
    /// Its text.
    pub text: &'static str,
    /// Its arguments.
    pub args: Vec<String>,
}

/// One boot running scripts one after the other.
pub(crate) struct ScriptRun {
    /// The scripts, in order.
    pub scripts: Vec<Script>,
    /// `KEY=VALUE` pairs set in their environment.
    pub env: Vec<String>,
    /// Wall-clock limit of the whole run, seconds.
    pub timeout_s: u64,
    /// Whether the scripts need the data disk (the standard scenario's file sets).
    pub data_disk: bool,
    /// Further files for the payload: (host path, name in the payload).
    pub extra_files: Vec<(PathBuf, String)>,
}

/// What a run gave.
pub(crate) struct ScriptOutcome {
    /// Every line the scripts (and the rig) printed.
    pub lines: Vec<String>,
    /// Where it ran, for the results file (rig times are emulated).
    pub where_: &'static str,
    /// The last script's exit status.
    pub exit_code: i32,
    /// Whether the time limit ended the run.
    pub timed_out: bool,
}

impl ScriptOutcome {
    /// The records after `marker`; none is an error saying how the run ended.
    pub(crate) fn records(&self, marker: &str) -> anyhow::Result<Vec<Value>> {
        let found = records(&self.lines, marker);
        if found.is_empty() {
            bail!(
                "the run printed no {marker}line (exit {}, timed out {})",
                self.exit_code,
                self.timed_out
            );
        }
        Ok(found)
    }
}

/// Builds the static binaries and the guest image, then runs the scripts in one boot.
pub(crate) fn run_script(run: ScriptRun) -> anyhow::Result<ScriptOutcome> {
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
        .add_file(&image.initrd, "initramfs.cpio", 0o644)?;
    payload.add_bytes("lib.sh", SHELL_LIB.as_bytes(), 0o644)?;
    for script in &run.scripts {
        payload.add_bytes(script.file_name, script.text.as_bytes(), 0o755)?;
    }
    for (path, name) in &run.extra_files {
        payload.add_file(path, name, 0o644)?;
    }
    if run.data_disk {
        let disk = image
            .data_disk
            .as_ref()
            .context("`vmm image build` made no data disk (the standard scenario's file sets)")?;
        payload.add_file(disk, "data.ext4", 0o444)?;
    }
    let sequence = run
        .scripts
        .iter()
        .map(|s| format!("sh {} {}", s.file_name, s.args.join(" ")))
        .collect::<Vec<_>>()
        .join("; ");
    let mut cmd: Vec<&str> = vec!["env"];
    cmd.extend(run.env.iter().map(String::as_str));
    cmd.extend(["sh", "-c", sequence.as_str()]);
    let what = run
        .scripts
        .iter()
        .map(|s| s.file_name)
        .collect::<Vec<_>>()
        .join(", ");
    let echo = |l: &str| eprintln!("  {l}");
    let (where_, outcome) = match rig::detect() {
        KvmBackend::NestedRig { script } => {
            let opts = RigOptions {
                timeout_s: run.timeout_s,
                ..RigOptions::default()
            };
            let o = rig::run_in_rig(&script, payload.path(), &cmd, opts, echo)
                .with_context(|| format!("running {what} in the rig"))?;
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
            .with_context(|| format!("running {what} on the host"))?;
            ("this host's /dev/kvm", o)
        }
        KvmBackend::Unavailable { reason } => bail!("no KVM that can boot a stock guest: {reason}"),
    };
    Ok(ScriptOutcome {
        lines: outcome.lines,
        where_,
        exit_code: outcome.exit_code,
        timed_out: outcome.timed_out,
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

/// Writes `bench-results/NAME.json` and `NAME.md` and prints the Markdown.
pub(crate) fn write_results(name: &str, json: &Value, markdown: &str) -> anyhow::Result<()> {
    let dir = results_dir()?;
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

/// `bench-results/` of the workspace, created when missing.
pub(crate) fn results_dir() -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("bench-results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
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
