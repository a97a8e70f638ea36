//! The result file (`boot.json`) and its Markdown table (`boot.md`): summaries of the raw
//! records, ratios ours/QEMU and the goals, met or missed.

use serde::Serialize;

use crate::protocol::{BootRecord, Kind, MachineChoice, MemRecord};
use crate::stats::{median_ratio, Summary};

/// Goal: ours reaches readiness in at most this fraction of QEMU's time.
pub const GOAL_READY_RATIO: f64 = 0.5;
/// Goal: VMM set-up (process start → first KVM_RUN) is at most this percentage of the boot.
pub const GOAL_SETUP_PCT: f64 = 2.0;
/// Goal: set-up on the host's own /dev/kvm, ms.
pub const GOAL_HOST_SETUP_MS: f64 = 10.0;
/// Goal: VMM memory overhead, MiB.
pub const GOAL_OVERHEAD_MIB: f64 = 5.0;

/// Summaries of one VMM's boots in one configuration (measured boots only, ok ones only).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KindStats {
    /// Measured boots run.
    pub runs: usize,
    /// Of which reached readiness and ended cleanly.
    pub ok: usize,
    /// Spawn → first console byte (driver clock).
    pub first_console_ms: Option<Summary>,
    /// Spawn → readiness line (driver clock).
    pub ready_ms: Option<Summary>,
    /// Spawn → exit after the guest's power-off (driver clock).
    pub exit_ms: Option<Summary>,
    /// Ours: process start (`main`) → first KVM_RUN, the VMM's own clock.
    pub vmm_setup_ms: Option<Summary>,
    /// Ours: process start → first console byte, the VMM's own clock.
    pub vmm_first_console_ms: Option<Summary>,
    /// Ours: process start → readiness line, the VMM's own clock.
    pub vmm_ready_ms: Option<Summary>,
    /// Ours: set-up as a percentage of the VMM's own start → readiness, per boot.
    pub setup_pct_of_ready: Option<Summary>,
    /// Ours: set-up as a percentage of the driver's spawn → exit, per boot.
    pub setup_pct_of_exit: Option<Summary>,
}

impl KindStats {
    /// Summarises the measured (non-warm-up) records of `kind` in `group`.
    pub fn of(records: &[BootRecord], group: &str, kind: Kind) -> KindStats {
        let mine: Vec<&BootRecord> = records
            .iter()
            .filter(|r| r.group == group && r.kind == kind && !r.warmup)
            .collect();
        let ok: Vec<&BootRecord> = mine.iter().copied().filter(|r| r.ok).collect();
        let metric = |f: fn(&crate::protocol::VmmMetrics) -> Option<f64>| {
            Summary::of_some(ok.iter().map(|r| r.vmm_metrics.as_ref().and_then(f)))
        };
        let pct = |num: Option<f64>, den: Option<f64>| match (num, den) {
            (Some(n), Some(d)) if d > 0.0 => Some(100.0 * n / d),
            _ => None,
        };
        KindStats {
            runs: mine.len(),
            ok: ok.len(),
            first_console_ms: Summary::of_some(ok.iter().map(|r| r.first_console_ms)),
            ready_ms: Summary::of_some(ok.iter().map(|r| r.ready_ms)),
            exit_ms: Summary::of_some(ok.iter().map(|r| r.exit_ms)),
            vmm_setup_ms: metric(|m| m.setup_ms),
            vmm_first_console_ms: metric(|m| m.first_console_ms),
            vmm_ready_ms: metric(|m| m.ready_ms),
            setup_pct_of_ready: Summary::of_some(ok.iter().map(|r| {
                let m = r.vmm_metrics.as_ref()?;
                pct(m.setup_ms, m.ready_ms)
            })),
            setup_pct_of_exit: Summary::of_some(ok.iter().map(|r| {
                let m = r.vmm_metrics.as_ref()?;
                pct(m.setup_ms, r.exit_ms)
            })),
        }
    }
}

/// Ratios ours/QEMU of the medians.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ratios {
    /// First console byte.
    pub first_console: Option<f64>,
    /// Readiness line.
    pub ready: Option<f64>,
    /// Exit.
    pub exit: Option<f64>,
}

/// One configuration's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupStats {
    /// `2vcpu-quiet` etc.
    pub name: String,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// `quiet` on the command line.
    pub quiet: bool,
    /// Our VMM.
    pub ours: KindStats,
    /// QEMU.
    pub qemu: KindStats,
    /// ours/QEMU.
    pub ratios: Ratios,
    /// ready ratio ≤ [`GOAL_READY_RATIO`] (None: not measurable).
    pub goal_ready_met: Option<bool>,
    /// median set-up share of readiness ≤ [`GOAL_SETUP_PCT`].
    pub goal_setup_met: Option<bool>,
}

impl GroupStats {
    /// Summarises one configuration.
    pub fn of(records: &[BootRecord], name: &str, vcpus: u32, mem_mib: u32, quiet: bool) -> Self {
        let ours = KindStats::of(records, name, Kind::Ours);
        let qemu = KindStats::of(records, name, Kind::Qemu);
        let ratios = Ratios {
            first_console: median_ratio(
                ours.first_console_ms.as_ref(),
                qemu.first_console_ms.as_ref(),
            ),
            ready: median_ratio(ours.ready_ms.as_ref(), qemu.ready_ms.as_ref()),
            exit: median_ratio(ours.exit_ms.as_ref(), qemu.exit_ms.as_ref()),
        };
        GroupStats {
            name: name.to_string(),
            vcpus,
            mem_mib,
            quiet,
            goal_ready_met: ratios.ready.map(|r| r <= GOAL_READY_RATIO),
            goal_setup_met: ours.setup_pct_of_ready.map(|s| s.median <= GOAL_SETUP_PCT),
            ours,
            qemu,
            ratios,
        }
    }
}

/// Set-up time on the host's own /dev/kvm.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostSetup {
    /// What /dev/kvm is here (`kvm_pvm` or real KVM).
    pub dev_kvm: String,
    /// The command (one run).
    pub argv: Vec<String>,
    /// Runs made.
    pub runs: usize,
    /// `setup_ms` of every run that reported one.
    pub samples_ms: Vec<f64>,
    /// Their summary.
    pub setup_ms: Option<Summary>,
    /// How each run ended (`exit_reason`, exit status): on PVM the guest fails after KVM_RUN.
    pub endings: Vec<String>,
    /// Runs that reported no set-up time, and why.
    pub failures: Vec<String>,
    /// median ≤ [`GOAL_HOST_SETUP_MS`].
    pub goal_met: Option<bool>,
}

/// Memory overhead of one VMM.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MemStats {
    /// Measurements made.
    pub runs: usize,
    /// Of which succeeded.
    pub ok: usize,
    /// Total Rss, MiB.
    pub total_rss_mib: Option<Summary>,
    /// Guest RAM mapping's Rss, MiB.
    pub guest_rss_mib: Option<Summary>,
    /// Total − guest RAM, MiB.
    pub overhead_mib: Option<Summary>,
    /// Peak RSS (VmHWM), MiB.
    pub vm_hwm_mib: Option<Summary>,
}

impl MemStats {
    /// Summarises `kind`'s memory records.
    pub fn of(records: &[MemRecord], kind: Kind) -> MemStats {
        let mine: Vec<&MemRecord> = records.iter().filter(|r| r.kind == kind).collect();
        let ok: Vec<&MemRecord> = mine.iter().copied().filter(|r| r.ok).collect();
        let mib = |kib: u64| kib as f64 / 1024.0;
        MemStats {
            runs: mine.len(),
            ok: ok.len(),
            total_rss_mib: Summary::of_some(
                ok.iter()
                    .map(|r| r.smaps.as_ref().map(|s| mib(s.total_rss_kib))),
            ),
            guest_rss_mib: Summary::of_some(
                ok.iter()
                    .map(|r| r.smaps.as_ref().map(|s| mib(s.guest_rss_kib))),
            ),
            overhead_mib: Summary::of_some(
                ok.iter()
                    .map(|r| r.smaps.as_ref().map(|s| mib(s.overhead_kib))),
            ),
            vm_hwm_mib: Summary::of_some(ok.iter().map(|r| r.vm_hwm_kib.map(mib))),
        }
    }
}

/// Size of the static `vmm`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BinarySize {
    /// The binary measured.
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// The size after `strip` of a copy (None: strip unavailable, see `note`).
    pub stripped_bytes: Option<u64>,
    /// What happened when stripping.
    pub note: String,
    /// QEMU's binary + shared libraries + loader, bytes (for scale).
    pub qemu_with_libs_bytes: u64,
}

fn fmt_ms(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max),
        None => "–".to_string(),
    }
}

fn fmt_fine_ms(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        None => "–".to_string(),
    }
}

fn fmt_mib(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        None => "–".to_string(),
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "–".into())
}

fn goal(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// Everything the Markdown needs.
pub struct MarkdownInput<'a> {
    /// When.
    pub date: &'a str,
    /// How it was invoked.
    pub command: &'a str,
    /// Free-form facts shown above the tables (`- ` lines).
    pub facts: &'a [String],
    /// Boot figures per configuration.
    pub groups: &'a [GroupStats],
    /// Which configuration is the headline and why.
    pub headline: &'a str,
    /// Host set-up.
    pub host: Option<&'a HostSetup>,
    /// Memory, ours and QEMU.
    pub memory: &'a [(Kind, MemStats)],
    /// Guest size of the memory runs (MiB, vCPUs).
    pub memory_guest: (u32, u32),
    /// Binary size.
    pub binary: Option<&'a BinarySize>,
    /// The QEMU machine probe.
    pub probe: Option<&'a MachineChoice>,
    /// Failures and anything that did not work, one line each.
    pub problems: &'a [String],
}

/// Renders `boot.md`.
pub fn markdown(m: &MarkdownInput<'_>) -> String {
    let mut s = String::new();
    s.push_str("# Boot benchmark: ours vs QEMU microvm under the same KVM\n\n");
    s.push_str(&format!("Date: {}. Command: `{}`.\n\n", m.date, m.command));
    for f in m.facts {
        s.push_str(&format!("- {f}\n"));
    }
    s.push_str(&format!("\n{}\n\n", m.headline));
    s.push_str("## 1. Boot inside the rig (emulated time: compare ratios, not absolute ms)\n\n");
    s.push_str("Median (min–max) in ms over the boots that succeeded. Our set-up is the VMM's own \
        `setup_ms` (from `main`); every other column is measured by the in-rig driver from `spawn()` \
        of the VMM process to the first byte on its stdout (the guest's serial console), to the \
        `VMM-GUEST-READY` line, and to the process's exit after the guest's `poweroff -f`.\n\n");
    s.push_str("| config | VMM | boots ok | set-up → 1st KVM_RUN | → 1st console byte | → VMM-GUEST-READY | → exit |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for g in m.groups {
        for (kind, k) in [(Kind::Ours, &g.ours), (Kind::Qemu, &g.qemu)] {
            s.push_str(&format!(
                "| {} | {} | {}/{} | {} | {} | {} | {} |\n",
                g.name,
                kind.label(),
                k.ok,
                k.runs,
                match kind {
                    Kind::Ours => fmt_fine_ms(&k.vmm_setup_ms),
                    Kind::Qemu => "n/a".into(),
                },
                fmt_ms(&k.first_console_ms),
                fmt_ms(&k.ready_ms),
                fmt_ms(&k.exit_ms),
            ));
        }
    }
    s.push_str("\n| config | ours/QEMU 1st console | ours/QEMU ready | ours/QEMU exit | goal ready ≤ 0.5× QEMU | our set-up, % of ready | goal set-up ≤ 2 % |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for g in m.groups {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            g.name,
            fmt_ratio(g.ratios.first_console),
            fmt_ratio(g.ratios.ready),
            fmt_ratio(g.ratios.exit),
            goal(g.goal_ready_met),
            g.ours
                .setup_pct_of_ready
                .map(|p| format!("{:.2} % ({:.2}–{:.2})", p.median, p.min, p.max))
                .unwrap_or_else(|| "–".into()),
            goal(g.goal_setup_met),
        ));
    }
    if let Some(c) = m.probe {
        s.push_str(&format!(
            "\nQEMU machine variants probed before the measured boots (unmeasured boots; the \
             measured QEMU boots use **`-M {}`**: {}):\n\n| `-M` | probe boots ok | ready, ms |\n|---|---|---|\n",
            c.machine, c.reason
        ));
        for p in &c.probes {
            s.push_str(&format!(
                "| `{}` | {}/{} | {} |\n",
                p.machine,
                p.ok,
                p.runs,
                p.median_ready_ms
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_else(|| "–".into())
            ));
        }
    }
    s.push_str("\n## 2. VMM set-up on the host's own /dev/kvm\n\n");
    match m.host {
        Some(h) => {
            s.push_str(&format!(
                "`{}` ({}): process start → first KVM_RUN (`setup_ms`). The guest then fails, as expected on this KVM.\n\n",
                h.argv.join(" "),
                h.dev_kvm
            ));
            s.push_str("| runs | with set-up time | set-up ms, median (min–max) | goal ≤ 10 ms |\n|---|---|---|---|\n");
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                h.runs,
                h.samples_ms.len(),
                fmt_fine_ms(&h.setup_ms),
                goal(h.goal_met)
            ));
        }
        None => s.push_str("Not measured.\n"),
    }
    s.push_str(&format!(
        "\n## 3. Memory overhead inside the rig ({} MiB, {} vCPU, after VMM-GUEST-READY, `vmm_workload=idle`)\n\n",
        m.memory_guest.0, m.memory_guest.1
    ));
    s.push_str("From `/proc/PID/smaps`: overhead = total Rss − Rss of the anonymous mapping whose size is the guest memory size. MiB, median (min–max).\n\n");
    s.push_str("| VMM | runs ok | total Rss | guest RAM Rss | overhead | peak Rss (VmHWM) | goal overhead ≤ 5 MiB |\n|---|---|---|---|---|---|---|\n");
    for (kind, st) in m.memory {
        let g = match kind {
            Kind::Ours => goal(st.overhead_mib.map(|o| o.median <= GOAL_OVERHEAD_MIB)),
            Kind::Qemu => "(reference)",
        };
        s.push_str(&format!(
            "| {} | {}/{} | {} | {} | {} | {} | {} |\n",
            kind.label(),
            st.ok,
            st.runs,
            fmt_mib(&st.total_rss_mib),
            fmt_mib(&st.guest_rss_mib),
            fmt_mib(&st.overhead_mib),
            fmt_mib(&st.vm_hwm_mib),
            g
        ));
    }
    s.push_str("\n## 4. Binary size\n\n");
    match m.binary {
        Some(b) => {
            s.push_str("| binary | bytes | after `strip` | QEMU + its shared libraries (for scale) |\n|---|---|---|---|\n");
            s.push_str(&format!(
                "| static `vmm` | {} ({:.2} MiB) | {} | {} ({:.1} MiB) |\n\n{}\n",
                b.bytes,
                b.bytes as f64 / 1048576.0,
                b.stripped_bytes
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "–".into()),
                b.qemu_with_libs_bytes,
                b.qemu_with_libs_bytes as f64 / 1048576.0,
                b.note
            ));
        }
        None => s.push_str("Not measured.\n"),
    }
    s.push_str("\n## Failures and what did not work\n\n");
    if m.problems.is_empty() {
        s.push_str("None.\n");
    } else {
        for p in m.problems {
            s.push_str(&format!("- {p}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::VmmMetrics;

    fn rec(kind: Kind, ok: bool, warmup: bool, ready: f64, setup: f64) -> BootRecord {
        BootRecord {
            group: "2vcpu-quiet".into(),
            kind,
            round: 0,
            warmup,
            qemu_machine: None,
            vcpus: 2,
            mem_mib: 512,
            quiet: true,
            ok,
            failure: (!ok).then(|| "x".into()),
            first_console_ms: Some(ready / 2.0),
            ready_ms: Some(ready),
            exit_ms: Some(ready + 100.0),
            exit_status: Some("exit 0".into()),
            vmm_metrics: (kind == Kind::Ours).then_some(VmmMetrics {
                setup_ms: Some(setup),
                first_console_ms: Some(ready / 2.0 - 1.0),
                ready_ms: Some(ready - 1.0),
                exit_reason: Some("poweroff".into()),
                exit_code: Some(0),
                phases: Default::default(),
            }),
            console_bytes: 1,
            kernel_cmdline: None,
            warnings: vec![],
            console_tail: vec![],
            stderr_tail: vec![],
        }
    }

    #[test]
    fn group_stats_skip_warmups_and_failures_and_compare_medians() {
        let records = vec![
            rec(Kind::Ours, true, true, 1.0, 1.0), // warm-up: ignored
            rec(Kind::Ours, true, false, 1001.0, 10.0),
            rec(Kind::Ours, true, false, 3001.0, 30.0),
            rec(Kind::Ours, false, false, 50.0, 1.0), // failed: counted, not summarised
            rec(Kind::Qemu, true, false, 4000.0, 0.0),
            rec(Kind::Qemu, true, false, 4000.0, 0.0),
        ];
        let g = GroupStats::of(&records, "2vcpu-quiet", 2, 512, true);
        assert_eq!((g.ours.runs, g.ours.ok), (3, 2));
        assert_eq!(g.ours.ready_ms.unwrap().median, 2001.0);
        assert_eq!(g.ratios.ready, Some(2001.0 / 4000.0));
        assert_eq!(g.goal_ready_met, Some(false));
        // set-up 10 of ready 1000 = 1 %, 30 of 3000 = 1 %.
        let pct = g.ours.setup_pct_of_ready.unwrap();
        assert!((pct.median - 1.0).abs() < 1e-9, "{pct:?}");
        assert_eq!(g.goal_setup_met, Some(true));
        assert!(g.qemu.vmm_setup_ms.is_none());
        let md = markdown(&MarkdownInput {
            date: "d",
            command: "c",
            facts: &["f".into()],
            groups: &[g],
            headline: "h",
            host: None,
            memory: &[],
            memory_guest: (128, 1),
            binary: None,
            probe: None,
            problems: &["p".into()],
        });
        assert!(md.contains("| 2vcpu-quiet | ours (vmm) | 2/3 |"), "{md}");
        assert!(md.contains("| 0.50 |") || md.contains("0.50"), "{md}");
        assert!(md.contains("**missed**"), "{md}");
        assert!(md.contains("- p\n"), "{md}");
    }

    #[test]
    fn memory_stats() {
        let m = |ok, overhead_kib| MemRecord {
            kind: Kind::Ours,
            qemu_machine: None,
            round: 0,
            mem_mib: 128,
            vcpus: 1,
            ok,
            failure: None,
            ready_ms: Some(1.0),
            smaps: Some(crate::smaps::Overhead {
                total_rss_kib: 10240 + overhead_kib,
                guest_rss_kib: 10240,
                overhead_kib,
                guest_mapping: "m".into(),
                ambiguous_with: vec![],
                mappings: 3,
            }),
            vm_hwm_kib: Some(20480),
            stopped: None,
            exit_status: None,
            console_tail: vec![],
            stderr_tail: vec![],
        };
        let st = MemStats::of(&[m(true, 2048), m(true, 4096), m(false, 1)], Kind::Ours);
        assert_eq!((st.runs, st.ok), (3, 2));
        assert_eq!(st.overhead_mib.unwrap().median, 3.0);
        assert_eq!(st.guest_rss_mib.unwrap().median, 10.0);
        assert_eq!(st.vm_hwm_mib.unwrap().median, 20.0);
        assert_eq!(MemStats::of(&[], Kind::Qemu).ok, 0);
    }
}
