//! `bench crash`: crash-safety trials under real KVM (the nested rig on PVM hosts).
//!
//! Runs `bench/rig/crash.sh` in the rig: many SIGKILLs of the VMM at random moments while it
//! writes a snapshot over a previous one (each followed by `vmm inspect`, some by a restore), a
//! snapshot into a full tmpfs (ENOSPC) and onto ext2 on a loop device whose backing store fills
//! (the error surfaces at fsync). Writes `bench-results/crash.{json,md}`.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::rig_script::{run_script, write_results, Script, ScriptOutcome, ScriptRun};

/// The in-rig script.
const SCRIPT: &str = include_str!("../rig/crash.sh");
/// Prefix of the script's result lines.
const MARKER: &str = "CRASH-BENCH ";

/// Arguments of `bench crash`.
#[derive(clap::Args, Debug)]
pub struct CrashArgs {
    /// Kill trials.
    #[arg(long, default_value_t = 40)]
    pub trials: u32,
    /// Rig wall-clock limit in seconds.
    #[arg(long, default_value_t = 900)]
    pub rig_timeout: u64,
}

/// The rig kernel's loop module, decompressed into a temporary file (None if not found).
fn loop_module() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let modules = PathBuf::from(home).join(".cache/kvm-rig/k/lib/modules");
    let release = std::fs::read_dir(&modules).ok()?.flatten().next()?.path();
    let xz = release.join("kernel/drivers/block/loop.ko.xz");
    let out = std::env::temp_dir().join(format!("bench-loop-{}.ko", std::process::id()));
    let data = std::process::Command::new("xz")
        .arg("-dc")
        .arg(&xz)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    std::fs::write(&out, data.stdout).ok()?;
    Some(out)
}

/// Counts and verdicts of a run's records.
pub fn summarise(records: &[Value]) -> Value {
    let kills: Vec<&Value> = records.iter().filter(|r| r["kind"] == "kill").collect();
    let count = |f: &str, v: &str| kills.iter().filter(|r| r[f] == v).count();
    let restores: Vec<&Value> = kills
        .iter()
        .filter(|r| r["restored"].is_boolean())
        .copied()
        .collect();
    let case = |kind: &str| records.iter().find(|r| r["kind"] == kind).cloned();
    let damaged = count("found", "damaged") + count("found", "missing");
    let failed_restores = restores.iter().filter(|r| r["restored"] != true).count();
    json!({
        "trials": kills.len(),
        "previous_kept": count("found", "previous"),
        "new_complete": count("found", "new"),
        "damaged_or_missing": damaged,
        "trials_not_run": kills.iter().filter(|r| r["ok"] != true).count(),
        "temporaries_left_max": kills.iter().filter_map(|r| r["temporaries"].as_u64()).max(),
        "temporaries_verifying": kills.iter().filter_map(|r| r["temporaries_verifying"].as_u64()).sum::<u64>(),
        "restores_checked": restores.len(),
        "restores_failed": failed_restores,
        "setup": case("setup"),
        "sweep": case("sweep"),
        "enospc_tmpfs": case("enospc_tmpfs"),
        "writeback_error_loop": case("writeback_error_loop"),
        "pass": damaged == 0 && failed_restores == 0 && !restores.is_empty()
            && case("sweep").is_some_and(|s| s["ok"] == true),
    })
}

/// The Markdown report of a summary.
fn markdown(s: &Value) -> String {
    let case = |k: &str| {
        let c = &s[k];
        if c.is_null() {
            "not run".to_string()
        } else {
            format!(
                "ok={} rc={} vm_alive={} entries_left={} error: `{}`",
                c["ok"],
                c["snapshot_rc"],
                c["vm_alive"],
                c["entries_left"],
                c["error"].as_str().unwrap_or("")
            )
        }
    };
    format!(
        "# Crash-safety trials\n\nIn the nested KVM rig; `cargo run --release -p bench -- crash` (bench/rig/crash.sh).\n\n\
         | figure | value |\n|---|---|\n\
         | SIGKILL trials (random delay after the snapshot request) | {} |\n\
         | path held the previous snapshot (verifies) | {} |\n\
         | path held the finished new snapshot (verifies) | {} |\n\
         | damaged or missing | {} |\n\
         | hidden temporaries left by a kill (most at once) | {} |\n\
         | of them complete (verify) | {} |\n\
         | restores of the survivor checked / failed | {} / {} |\n\
         | a finished snapshot swept the temporaries | {} |\n\
         | ENOSPC (8 MiB tmpfs) | {} |\n\
         | write-back error at fsync (ext2 on a loop device over a full tmpfs) | {} |\n\n\
         Verdict: {}.\n",
        s["trials"], s["previous_kept"], s["new_complete"], s["damaged_or_missing"],
        s["temporaries_left_max"], s["temporaries_verifying"], s["restores_checked"],
        s["restores_failed"], s["sweep"]["ok"], case("enospc_tmpfs"), case("writeback_error_loop"),
        if s["pass"] == true { "pass" } else { "FAIL" }
    )
}

/// The in-rig script for `trials` kill trials.
pub(crate) fn script(trials: u32) -> Script {
    Script {
        file_name: "crash.sh",
        text: SCRIPT,
        args: vec![trials.to_string()],
    }
}

/// The extra payload files (the loop module, when found).
pub(crate) fn extra_files() -> Vec<(PathBuf, String)> {
    loop_module()
        .map(|m| (m, "loop.ko".to_string()))
        .into_iter()
        .collect()
}

/// Runs `scripts` in one boot with the extra files, which are removed afterwards.
pub(crate) fn run_scripts(scripts: Vec<Script>, timeout_s: u64) -> anyhow::Result<ScriptOutcome> {
    let extra_files = extra_files();
    let outcome = run_script(ScriptRun {
        scripts,
        env: Vec::new(),
        timeout_s,
        data_disk: false,
        extra_files: extra_files.clone(),
    });
    for (m, _) in &extra_files {
        let _ = std::fs::remove_file(m);
    }
    outcome
}

/// Writes the results of the rig's `lines`; returns the exit code (1 unless the run passed).
pub(crate) fn report(outcome: &ScriptOutcome) -> anyhow::Result<i32> {
    let records = outcome.records(MARKER)?;
    let summary = summarise(&records);
    let md = markdown(&summary);
    write_results(
        "crash",
        &json!({ "summary": summary, "records": records }),
        &md,
    )?;
    Ok(i32::from(summary["pass"] != true))
}

/// Runs the benchmark; returns the exit code.
pub fn run(args: CrashArgs) -> anyhow::Result<i32> {
    report(&run_scripts(vec![script(args.trials)], args.rig_timeout)?)
}

/// Arguments of `bench hardening`: crash trials and the soak in one rig boot.
#[derive(clap::Args, Debug)]
pub struct HardeningArgs {
    /// Kill trials.
    #[arg(long, default_value_t = 30)]
    pub trials: u32,
    /// Soak cycles (fewer if the time budget ends first).
    #[arg(long, default_value_t = 200)]
    pub cycles: u32,
    /// Seconds of rig time the soak cycles may take.
    #[arg(long, default_value_t = 480)]
    pub budget_s: u64,
    /// Clones of one snapshot run at once.
    #[arg(long, default_value_t = 20)]
    pub clones: u32,
    /// Rig wall-clock limit in seconds.
    #[arg(long, default_value_t = 1800)]
    pub rig_timeout: u64,
}

/// `bench crash` and `bench soak` in one rig boot (one wait for the shared rig); writes both
/// results; returns 1 unless both passed.
pub fn run_hardening(args: HardeningArgs) -> anyhow::Result<i32> {
    let scripts = vec![
        script(args.trials),
        crate::soak::script(args.cycles, args.budget_s, args.clones),
    ];
    let outcome = run_scripts(scripts, args.rig_timeout)?;
    let crash = report(&outcome);
    let soak = crate::soak::report(&outcome);
    Ok(crash?.max(soak?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_trial_fails_the_run() {
        let lines = [
            r#"{"kind":"kill","trial":1,"ok":true,"found":"previous","temporaries":1,"temporaries_verifying":0,"restored":null}"#,
            r#"{"kind":"kill","trial":2,"ok":true,"found":"new","temporaries":1,"temporaries_verifying":0,"restored":true}"#,
            r#"{"kind":"sweep","ok":true}"#,
        ];
        let mut records: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let s = summarise(&records);
        assert_eq!(s["pass"], true, "{s}");
        assert_eq!(s["previous_kept"], 1);
        assert!(markdown(&s).contains("Verdict: pass"));
        records.push(
            serde_json::from_str(
                r#"{"kind":"kill","trial":3,"ok":true,"found":"damaged","restored":null}"#,
            )
            .unwrap(),
        );
        let s = summarise(&records);
        assert_eq!(s["pass"], false);
        assert_eq!(s["damaged_or_missing"], 1);
    }
}
