//! `bench suite`: the benchmark suite on the standard scenario (S512), ours and QEMU side by
//! side in ONE rig boot (issues 7 and 9): a raw full dump, our compact untrimmed snapshot, ours
//! trimmed with default.json and with aggressive.json, QEMU's plain `migrate` to a file and
//! QEMU's `mapped-ram` after an in-guest cache drop with free page reporting at order 0. Figures:
//! snapshot bytes (allocated and apparent), snapshot time, restore time (to vCPUs running and to
//! the first guest answer), first request after restore (the hot set re-read), the clone's RSS
//! after it, boot time; medians over runs and ours/QEMU ratios within each run, written to
//! `bench-results/suite.{json,md}`.
//!
//! QEMU: bookworm-backports' QEMU (with mapped-ram) unpacked by `scripts/get-qemu-backports`
//! into the cache (never installed over the host's QEMU, which runs the rig); the host's QEMU
//! 7.2 when that is not possible, with mapped-ram reported unavailable and why.

pub mod charts;
mod qmp;
mod summary;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rig::{KvmBackend, Payload, RigOptions};
use serde_json::{json, Value};

use crate::host::{build, build_image, say, workspace_root};
use crate::qemu::{self, QemuBundle};

pub use qmp::{rig_run as rig_qmp, RigQmpArgs};

/// The in-rig script.
const SCRIPT: &str = include_str!("../rig/suite.sh");
/// The host's QEMU, the fallback.
const SYSTEM_QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// Arguments of `bench suite`.
#[derive(clap::Args, Debug)]
pub struct SuiteArgs {
    /// Runs (each: one boot of ours with four snapshots and their restores, one boot of QEMU
    /// with two saves and their restores); every figure is the median over runs. One run takes
    /// about 10 minutes of rig time on the 2-core development machine, so the default is 1
    /// (`--runs 5`: about 50 minutes).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Development mode: one run.
    #[arg(long)]
    pub quick: bool,
    /// Seconds the cold set stays untouched before the snapshots (past default.json's 20 s
    /// cold age, so DAMON sees it cold).
    #[arg(long, default_value_t = 25)]
    pub cold_wait_s: u32,
    /// The QEMU to compare with [default: bookworm-backports' QEMU unpacked in the cache,
    /// fetched when missing; the host's QEMU if that fails].
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// Restore our clones with `--prefault` (to measure what populating the mapped memory in
    /// the background does).
    #[arg(long)]
    pub prefault: bool,
    /// Before each measured restore of ours, let one unmeasured clone answer, serve the first
    /// request and record its working set (`vmm restore --record-working-set-ms`), which the
    /// measured restore then brings in.
    #[arg(long)]
    pub working_set: bool,
    /// How the measured restores bring the working set in (`vmm restore --working-set`).
    #[arg(long, default_value = "before-start", value_parser = ["before-start", "background"])]
    pub working_set_mode: String,
    /// Development: run only `ours` or only `qemu`.
    #[arg(long, value_parser = ["ours", "qemu"])]
    pub only: Option<String>,
    /// Run the rig itself under the cached bookworm-backports QEMU 10 with 2 vCPUs instead of
    /// the host's QEMU with 1 (`kvm-rig/NOTES.md`). QEMU 7.2's TCG keys translated code by
    /// virtual address, so each start of a position-independent binary (our VMM and QEMU
    /// alike) is translated afresh: `vmm --version` took 83-133 ms under 7.2 against 21-24 ms
    /// for the same VMM linked non-PIE, and 35-39 ms under QEMU 10 (PIE or not).
    #[arg(long)]
    pub rig_qemu10: bool,
    /// Rig memory, MiB (four of our snapshots of a 512 MiB guest sit in the rig's tmpfs at once).
    #[arg(long, default_value_t = 4096)]
    pub rig_mem: u32,
    /// Rig wall-clock limit, s.
    #[arg(long, default_value_t = 3600)]
    pub rig_timeout: u64,
    /// Do not run: re-summarise the `SUITE-*` lines saved from an earlier rig run (e.g.
    /// bench-results/suite.log) into the results files.
    #[arg(long, value_name = "LOG")]
    pub from_log: Option<PathBuf>,
    /// Results file (the .md goes beside it).
    #[arg(long, default_value = "bench-results/suite.json")]
    pub out: PathBuf,
}

/// The cache directory of `vmm` (as `vmm image build` uses it).
fn cache_dir() -> PathBuf {
    guest_image::default_cache_dir()
}

/// The QEMU chosen, where from, and whether it can do mapped-ram (`Err` = why not).
struct ChosenQemu {
    bundle: QemuBundle,
    source: String,
    mapped_ram: Result<(), String>,
}

/// bookworm-backports' QEMU from the cache (fetched by `scripts/get-qemu-backports` when
/// missing), else the host's.
/// Points `run.sh` at the QEMU 10 unpacked in `bpo` as the rig's own (outer) QEMU, through the
/// environment variables `kvm-rig/NOTES.md` documents.
fn use_qemu10_for_the_rig(bpo: &Path) -> anyhow::Result<()> {
    let binary = bpo.join("usr/bin/qemu-system-x86_64");
    if !binary.is_file() {
        bail!(
            "--rig-qemu10: {} is missing (the suite fetches it with scripts/get-qemu-backports)",
            binary.display()
        );
    }
    let fw = format!(
        "-L {} -L {}",
        bpo.join("usr/share/seabios").display(),
        bpo.join("usr/share/qemu").display()
    );
    // The bench is single-threaded here; run.sh inherits these.
    std::env::set_var("KVM_RIG_QEMU", &binary);
    std::env::set_var("QEMU_MODULE_DIR", bpo.join("usr/lib/x86_64-linux-gnu/qemu"));
    std::env::set_var("KVM_RIG_QEMU_ARGS", fw);
    say(&format!(
        "the rig runs under {} with 2 vCPUs",
        binary.display()
    ));
    Ok(())
}

fn choose_qemu(root: &Path, given: Option<&Path>) -> anyhow::Result<ChosenQemu> {
    let chosen = |bundle: QemuBundle, source: String| {
        let mapped_ram = qemu::mapped_ram_support(&bundle.version);
        ChosenQemu {
            bundle,
            source,
            mapped_ram,
        }
    };
    if let Some(q) = given {
        let b = qemu::bundle(q).with_context(|| format!("bundling {}", q.display()))?;
        return Ok(chosen(b, format!("--qemu {}", q.display())));
    }
    let bpo = cache_dir().join("qemu-bpo/root");
    let binary = bpo.join("usr/bin/qemu-system-x86_64");
    let mut why_not = String::new();
    if !binary.is_file() {
        say("fetching bookworm-backports' QEMU into the cache (scripts/get-qemu-backports)");
        let status = std::process::Command::new(root.join("scripts/get-qemu-backports"))
            .arg(cache_dir().join("qemu-bpo"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => why_not = format!("scripts/get-qemu-backports failed ({s})"),
            Err(e) => why_not = format!("scripts/get-qemu-backports could not run: {e}"),
        }
    }
    if binary.is_file() {
        let fw = [bpo.join("usr/share/qemu"), bpo.join("usr/share/seabios")];
        match qemu::bundle_from(&binary, Some(&bpo.join("usr/lib/x86_64-linux-gnu")), &fw) {
            Ok(b) if qemu::parse_version(&b.version).is_some() => {
                return Ok(chosen(
                    b,
                    format!("bookworm-backports, unpacked in {}", bpo.display()),
                ))
            }
            Ok(b) => why_not = format!("{} --version printed {:?}", binary.display(), b.version),
            Err(e) => why_not = format!("{e:#}"),
        }
    }
    say(&format!(
        "backports QEMU unavailable ({why_not}); falling back to {SYSTEM_QEMU}"
    ));
    let b =
        qemu::bundle(Path::new(SYSTEM_QEMU)).with_context(|| format!("bundling {SYSTEM_QEMU}"))?;
    let mut c = chosen(
        b,
        format!("{SYSTEM_QEMU} (backports QEMU unavailable: {why_not})"),
    );
    if let Err(e) = &mut c.mapped_ram {
        *e = format!("{e}; backports QEMU unavailable: {why_not}");
    }
    Ok(c)
}

/// The payload: our static binaries, the image with its data disk, QEMU with its loader,
/// libraries and firmware, the script and its settings.
fn payload(root: &Path, q: &ChosenQemu, env: &str) -> anyhow::Result<Payload> {
    let (vmm, bench) = build(root)?;
    let image = build_image(&vmm, root)?;
    let data_disk = image
        .data_disk
        .as_ref()
        .context("`vmm image build` made no data disk (the S512 cold and hot file sets)")?;
    let source = root.join(crate::cmdline::CMDLINE_SOURCE);
    let cmdline = crate::cmdline::extract_default_cmdline(
        &std::fs::read_to_string(&source)
            .with_context(|| format!("reading {}", source.display()))?,
    )?;
    let mut p = Payload::new().context("creating the rig payload")?;
    p.add_file(&vmm, "vmm", 0o755)
        .and_then(|x| x.add_file(&bench, "bench", 0o755))
        .and_then(|x| x.add_file(&image.kernel, "vmlinuz", 0o644))
        .and_then(|x| x.add_file(&image.initrd, "initrd", 0o644))
        .and_then(|x| x.add_file(data_disk, "data.ext4", 0o444))
        .and_then(|x| x.add_file(&q.bundle.binary, "qemu-system-x86_64", 0o755))
        .and_then(|x| x.add_file(&q.bundle.loader, "lib/ld-linux-x86-64.so.2", 0o755))
        .and_then(|x| x.add_bytes("qemu-append.txt", cmdline.as_bytes(), 0o644))
        .and_then(|x| x.add_bytes("suite.env", env.as_bytes(), 0o644))
        .and_then(|x| x.add_bytes("suite.sh", SCRIPT.as_bytes(), 0o755))
        .and_then(|x| x.add_bytes("lib.sh", crate::rig_script::SHELL_LIB.as_bytes(), 0o644))
        .context("assembling the rig payload")?;
    for lib in &q.bundle.libs {
        p.add_file(&lib.path, &format!("lib/{}", lib.name), 0o755)
            .context("assembling the rig payload (QEMU's libraries)")?;
    }
    for (name, path) in &q.bundle.firmware {
        p.add_file(path, &format!("fw/{name}"), 0o644)
            .context("assembling the rig payload (QEMU's firmware)")?;
    }
    Ok(p)
}

/// Shell-quotes `s` for `suite.env` (single quotes).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs the suite; returns the exit code (1 when a run failed).
pub fn run(args: SuiteArgs) -> anyhow::Result<i32> {
    let runs = if args.quick { 1 } else { args.runs };
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let root = workspace_root();
    if let Some(log) = &args.from_log {
        let text =
            std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
        let parsed = summary::parse(text.lines());
        if parsed.records.is_empty() {
            bail!("{} holds no {}lines", log.display(), summary::MARKER);
        }
        let s = summary::summarise(&parsed);
        let header = format!(
            "Re-summarised from the rig output saved in `{}`.",
            log.display()
        );
        let report = json!({"summary": s, "records": parsed.records, "source": log});
        return write_results(
            &root,
            &args.out,
            &report,
            &summary::markdown(&s, &header),
            &parsed,
        );
    }
    let KvmBackend::NestedRig { script } = rig::detect() else {
        bail!("bench suite runs in the nested KVM rig (ours and QEMU in one rig boot); no rig script found");
    };
    let q = choose_qemu(&root, args.qemu.as_deref())?;
    say(&format!(
        "QEMU: {} ({}); mapped-ram: {}",
        q.bundle.version,
        q.source,
        q.mapped_ram
            .as_ref()
            .map_or_else(|e| e.clone(), |()| "yes".into())
    ));
    let env = format!(
        "SUITE_COLD_WAIT_S={}\nSUITE_ONLY={}\nSUITE_PREFAULT={}\nSUITE_WORKING_SET={}\nSUITE_WORKING_SET_MODE={}\nSUITE_QEMU_MAPPED_RAM={}\nSUITE_QEMU_MAPPED_RAM_WHY={}\n",
        args.cold_wait_s,
        args.only.as_deref().unwrap_or(""),
        u8::from(args.prefault),
        u8::from(args.working_set),
        args.working_set_mode,
        u8::from(q.mapped_ram.is_ok()),
        sh_quote(q.mapped_ram.as_ref().err().map_or("", String::as_str)),
    );
    let payload = payload(&root, &q, &env)?;
    let mut opts = RigOptions {
        mem_mib: args.rig_mem,
        timeout_s: args.rig_timeout,
        ..RigOptions::default()
    };
    if args.rig_qemu10 {
        use_qemu10_for_the_rig(&cache_dir().join("qemu-bpo/root"))?;
        opts.smp = 2;
    }
    let runs_s = runs.to_string();
    let cmd = ["sh", "suite.sh", runs_s.as_str()];
    say(&format!("running {runs} run(s) in the rig (one rig boot)"));
    let outcome = rig::run_in_rig(&script, payload.path(), &cmd, opts, |l| eprintln!("  {l}"))
        .context("running suite.sh in the rig")?;
    let parsed = summary::parse(outcome.lines.iter().map(String::as_str));
    if parsed.records.is_empty() {
        bail!(
            "suite.sh printed no {}line (exit {}, timed out {})",
            summary::MARKER,
            outcome.exit_code,
            outcome.timed_out
        );
    }
    let s = summary::summarise(&parsed);
    let header = format!(
        "`cargo run --release -p bench -- suite{}` (or `scripts/bench-suite`): {runs} run(s) in one \
         nested KVM rig boot (QEMU TCG + SVM: emulated time, compare ratios only; {}), rig {:.0} s. \
         S512 guest (512 MiB, 2 vCPUs, data disk, the standard workload, cold set idle {} s; \
         its runtime registers its release hook in /run/guest-trimmer/hooks.d, which our trims \
         call and QEMU, having no hook mechanism, does not). \
         QEMU: {} ({}), `-M microvm,acpi=on`, virtio-balloon free-page-reporting=on; mapped-ram: {}. \
         Medians over runs; snapshot time = pause → written; restore → running = process start → \
         vCPUs running (ours: the VMM's own measure; QEMU: `cont` done after `migrate-incoming`); \
         first answer = the guest's reply on its console; first request = the guest re-reading the \
         32 MiB hot set (guest clock); clone RSS = VmRSS after that request.{}",
        [
            (args.quick, " --quick".to_string()),
            (!args.quick, format!(" --runs {runs}")),
            (args.rig_qemu10, " --rig-qemu10".into()),
            (args.working_set, " --working-set".into()),
            (
                args.working_set && args.working_set_mode != "before-start",
                format!(" --working-set-mode {}", args.working_set_mode),
            ),
            (args.prefault, " --prefault".into()),
        ]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect::<String>(),
        if args.rig_qemu10 {
            "the rig under QEMU 10 with 2 vCPUs, `--rig-qemu10`"
        } else {
            "the rig under the host's QEMU with 1 vCPU"
        },
        outcome.duration.as_secs_f64(),
        args.cold_wait_s,
        q.bundle.version,
        q.source,
        q.mapped_ram
            .as_ref()
            .map_or_else(|e| format!("unavailable: {e}"), |()| "yes".into()),
        if !args.working_set {
            String::new()
        } else {
            format!(
                " Ours with `--working-set`: before each measured restore, one unmeasured clone \
                 answered, served the first request and recorded the pages it touched in 15 s; \
                 the measured restore brought them in {}.",
                if args.working_set_mode == "background" {
                    "from a thread while its vCPUs ran (`vmm restore --working-set background`)"
                } else {
                    "before its vCPUs ran (`vmm restore --working-set before-start`)"
                }
            )
        },
    );
    let md = summary::markdown(&s, &header);
    let snapshots: Vec<Value> = parsed
        .snapshots
        .iter()
        .map(|((run, variant), v)| json!({"run": run, "variant": variant, "summary": v}))
        .collect();
    let report = json!({
        "summary": s,
        "records": parsed.records,
        "our_snapshots": snapshots,
        "qemu": {
            "version": q.bundle.version, "source": q.source,
            "mapped_ram": q.mapped_ram.as_ref().map_or_else(|e| json!({"available": false, "why": e}), |()| json!({"available": true})),
            "libraries": q.bundle.libs.len(),
        },
        "rig": {"exit_code": outcome.exit_code, "timed_out": outcome.timed_out,
                "duration_s": outcome.duration.as_secs_f64(), "mem_mib": opts.mem_mib, "smp": opts.smp,
                "outer_qemu": if args.rig_qemu10 { "bookworm-backports QEMU 10" } else { "host" }},
        "runs": runs, "cold_wait_s": args.cold_wait_s,
    });
    // The rig's result lines, so the files can be re-made with --from-log.
    let log: String = outcome
        .lines
        .iter()
        .filter(|l| l.contains("SUITE-"))
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out.with_extension("log"), log)
        .with_context(|| format!("writing {}", out.with_extension("log").display()))?;
    let code = write_results(&root, &args.out, &report, &md, &parsed)?;
    Ok(code.max(i32::from(outcome.exit_code != 0)))
}

/// Writes `out` (JSON) and the Markdown beside it, prints the Markdown; 1 when a run failed.
fn write_results(
    root: &Path,
    out: &Path,
    report: &Value,
    md: &str,
    parsed: &summary::Parsed,
) -> anyhow::Result<i32> {
    let out = if out.is_absolute() {
        out.to_path_buf()
    } else {
        root.join(out)
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    std::fs::write(out.with_extension("md"), md)
        .with_context(|| format!("writing {}", out.with_extension("md").display()))?;
    let charts = charts::suite_charts(&report["summary"]);
    crate::chart::write_svg(
        &out.with_extension("svg"),
        "Benchmark suite vs QEMU (S512, nested KVM rig, medians)",
        &charts,
    )?;
    println!("{md}");
    let failed = parsed.records.iter().filter(|r| r["ok"] != true).count();
    Ok(i32::from(failed > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_are_quoted_for_sh() {
        assert_eq!(
            sh_quote("QEMU 7.2 has no 'mapped-ram'"),
            r"'QEMU 7.2 has no '\''mapped-ram'\'''"
        );
    }
}
