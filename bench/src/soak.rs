//! `bench soak`: many restore → work → snapshot/kill cycles and many clones at once under real
//! KVM (the nested rig on PVM hosts).
//!
//! Runs `bench/rig/soak.sh` in the rig and writes `bench-results/soak.{json,md,csv,svg}`: per
//! cycle the VMM's open fds, all open fds in the rig, the VMM's RSS and the snapshot store's disk
//! use (flat or not), and whether every clone read different /dev/urandom bytes.

use serde_json::{json, Value};

use crate::rig_script::{results_dir, write_results, Script, ScriptOutcome};

/// The in-rig script.
const SCRIPT: &str = include_str!("../rig/soak.sh");
/// Prefix of the script's result lines.
const MARKER: &str = "SOAK-BENCH ";

/// Arguments of `bench soak`.
#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// Cycles to run (fewer if the time budget ends first).
    #[arg(long, default_value_t = 200)]
    pub cycles: u32,
    /// Seconds of rig time the cycles may take.
    #[arg(long, default_value_t = 660)]
    pub budget_s: u64,
    /// Clones of one snapshot run at once.
    #[arg(long, default_value_t = 20)]
    pub clones: u32,
    /// Rig wall-clock limit in seconds.
    #[arg(long, default_value_t = 1100)]
    pub rig_timeout: u64,
}

/// `(min, max)` of field `f` over `rs`.
fn range(rs: &[&Value], f: &str) -> (u64, u64) {
    let v: Vec<u64> = rs.iter().filter_map(|r| r[f].as_u64()).collect();
    (
        v.iter().copied().min().unwrap_or(0),
        v.iter().copied().max().unwrap_or(0),
    )
}

/// Figures and the flatness verdict of a run's records (the first cycle is warm-up).
pub fn summarise(records: &[Value]) -> Value {
    let cycles: Vec<&Value> = records.iter().filter(|r| r["kind"] == "cycle").collect();
    let steady: Vec<&Value> = cycles.iter().skip(1).copied().collect();
    let (fd_lo, fd_hi) = range(&steady, "vmm_fds");
    let (all_lo, all_hi) = range(&steady, "all_fds");
    let (rss_lo, rss_hi) = range(&steady, "vmm_rss_kib");
    let (disk_lo, disk_hi) = range(&steady, "store_disk_kib");
    let clones = records.iter().find(|r| r["kind"] == "clones").cloned();
    let failed = cycles.iter().filter(|r| r["ok"] != true).count();
    let flat = fd_lo == fd_hi
        && all_hi <= all_lo + 8
        && rss_hi <= rss_lo + 16 * 1024
        && disk_hi <= disk_lo + 1024;
    let clones_ok = clones.as_ref().is_some_and(|c| {
        c["ok"] == true && c["distinct"] == c["clones"] && c["random_lines"] == c["clones"]
    });
    json!({
        "cycles": cycles.len(),
        "cycles_failed": failed,
        "vmm_fds": [fd_lo, fd_hi],
        "all_fds": [all_lo, all_hi],
        "vmm_rss_kib": [rss_lo, rss_hi],
        "store_disk_kib": [disk_lo, disk_hi],
        "flat": flat,
        "clones": clones,
        "pass": flat && failed == 0 && clones_ok && !steady.is_empty(),
    })
}

/// CSV of the per-cycle figures.
fn csv(records: &[Value]) -> String {
    let mut s = String::from("cycle,end,vmm_fds,all_fds,vmm_rss_kib,store_disk_kib\n");
    for r in records.iter().filter(|r| r["kind"] == "cycle") {
        s.push_str(&format!(
            "{},{},{},{},{},{}\n",
            r["cycle"],
            r["end"].as_str().unwrap_or(""),
            r["vmm_fds"],
            r["all_fds"],
            r["vmm_rss_kib"],
            r["store_disk_kib"]
        ));
    }
    s
}

/// A small SVG: one panel per figure, each a line over the cycles on its own axis from 0.
fn svg(records: &[Value]) -> String {
    let cycles: Vec<&Value> = records.iter().filter(|r| r["kind"] == "cycle").collect();
    let panels = [
        ("VMM fds", "vmm_fds", 1.0),
        ("all fds in the rig", "all_fds", 1.0),
        ("VMM RSS MiB", "vmm_rss_kib", 1.0 / 1024.0),
        ("store disk MiB", "store_disk_kib", 1.0 / 1024.0),
    ];
    let (w, h, pad) = (600.0, 110.0, 30.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        h * panels.len() as f64
    );
    let n = cycles.len().max(2) as f64 - 1.0;
    for (i, (title, field, scale)) in panels.iter().enumerate() {
        let top = i as f64 * h;
        let vals: Vec<f64> = cycles
            .iter()
            .map(|r| r[*field].as_f64().unwrap_or(0.0) * scale)
            .collect();
        let max = vals.iter().copied().fold(1.0, f64::max) * 1.1;
        let points: Vec<String> = vals
            .iter()
            .enumerate()
            .map(|(k, v)| {
                let x = pad + (w - 2.0 * pad) * k as f64 / n;
                let y = top + h - pad - (h - 2.0 * pad) * v / max;
                format!("{x:.1},{y:.1}")
            })
            .collect();
        out.push_str(&format!(
            "<text x=\"{pad}\" y=\"{:.0}\">{title} (0..{max:.0}) over {} cycles</text>\n\
             <line x1=\"{pad}\" y1=\"{:.0}\" x2=\"{:.0}\" y2=\"{:.0}\" stroke=\"#999\"/>\n\
             <polyline fill=\"none\" stroke=\"#1565c0\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            top + pad - 10.0,
            cycles.len(),
            top + h - pad,
            w - pad,
            top + h - pad,
            points.join(" ")
        ));
    }
    out.push_str("</svg>\n");
    out
}

/// The Markdown report.
fn markdown(s: &Value) -> String {
    let pair = |k: &str| format!("{} .. {}", s[k][0], s[k][1]);
    let c = &s["clones"];
    format!(
        "# Soak\n\nIn the nested KVM rig; `cargo run --release -p bench -- soak` (bench/rig/soak.sh). \
         Cycles: restore (chunks verified) → the guest works → snapshot over the same path or SIGKILL, \
         alternately. Ranges after the first cycle. Curves: soak.csv, soak.svg.\n\n\
         | figure | value |\n|---|---|\n\
         | cycles run (failed) | {} ({}) |\n\
         | VMM open fds | {} |\n| all open fds in the rig | {} |\n| VMM RSS KiB | {} |\n| store disk KiB | {} |\n\
         | flat | {} |\n\
         | clones at once / running / distinct urandom reads | {} / {} / {} |\n\
         | clones' total RSS MiB ({} MiB guests) | {} |\n\nVerdict: {}.\n",
        s["cycles"], s["cycles_failed"], pair("vmm_fds"), pair("all_fds"), pair("vmm_rss_kib"),
        pair("store_disk_kib"), s["flat"], c["clones"], c["running"], c["distinct"], c["mem_mib_each"],
        c["rss_total_kib"].as_u64().map_or("-".into(), |k| (k / 1024).to_string()),
        if s["pass"] == true { "pass" } else { "FAIL" }
    )
}

/// The in-rig script.
pub(crate) fn script(cycles: u32, budget_s: u64, clones: u32) -> Script {
    Script {
        file_name: "soak.sh",
        text: SCRIPT,
        args: vec![cycles.to_string(), budget_s.to_string(), clones.to_string()],
    }
}

/// Writes the results of the rig's `lines`; returns the exit code (1 unless the run passed).
pub(crate) fn report(outcome: &ScriptOutcome) -> anyhow::Result<i32> {
    let records = outcome.records(MARKER)?;
    let summary = summarise(&records);
    let md = markdown(&summary);
    let out = results_dir()?;
    std::fs::write(out.join("soak.csv"), csv(&records))?;
    std::fs::write(out.join("soak.svg"), svg(&records))?;
    write_results(
        "soak",
        &json!({ "summary": summary, "records": records }),
        &md,
    )?;
    Ok(i32::from(summary["pass"] != true))
}

/// Runs the benchmark; returns the exit code.
pub fn run(args: SoakArgs) -> anyhow::Result<i32> {
    let scripts = vec![script(args.cycles, args.budget_s, args.clones)];
    report(&crate::crash::run_scripts(scripts, args.rig_timeout)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cycle(n: u64, fds: u64, rss: u64) -> Value {
        json!({"kind":"cycle","cycle":n,"ok":true,"end":"kill","vmm_fds":fds,"all_fds":100,"vmm_rss_kib":rss,"store_disk_kib":5000})
    }

    #[test]
    fn growing_fds_or_rss_are_not_flat() {
        let clones = json!({"kind":"clones","ok":true,"clones":3,"running":3,"random_lines":3,"distinct":3,"rss_total_kib":1000,"mem_mib_each":128});
        let good = vec![
            cycle(1, 30, 9000),
            cycle(2, 20, 50000),
            cycle(3, 20, 50100),
            clones.clone(),
        ];
        let s = summarise(&good);
        assert_eq!(s["pass"], true, "{s}");
        assert!(markdown(&s).contains("Verdict: pass"));
        assert!(svg(&good).contains("<polyline"));
        assert_eq!(csv(&good).lines().count(), 4);
        let leaky = vec![
            cycle(1, 20, 9000),
            cycle(2, 20, 50000),
            cycle(3, 21, 50000),
            clones.clone(),
        ];
        assert_eq!(summarise(&leaky)["flat"], false);
        let fat = vec![
            cycle(1, 20, 9000),
            cycle(2, 20, 50000),
            cycle(3, 20, 90000),
            clones,
        ];
        assert_eq!(summarise(&fat)["flat"], false);
        let same =
            json!({"kind":"clones","ok":true,"clones":3,"running":3,"random_lines":3,"distinct":2});
        assert_eq!(
            summarise(&[cycle(1, 1, 1), cycle(2, 1, 1), same])["pass"],
            false
        );
    }
}
