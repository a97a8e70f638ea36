//! What the host side asks the in-rig driver to do ([`Plan`], a JSON file in the payload) and
//! what the driver reports back ([`Message`], one line each on its stdout).
//!
//! The driver's stdout reaches the host through the rig's serial console, and the rig's `run.sh`
//! drops every line containing `reboot: Power down` (a console tail may quote it), so each
//! message is printed twice: readable (`BENCH-BOOT {json}` and friends, for people) and
//! hex-encoded (`BENCH-HEX <hex of the JSON>`), which is what the host parses.

use serde::{Deserialize, Serialize};

/// Prefix of a hex-encoded [`Message`]; it may appear anywhere in a console line.
pub const HEX_MARKER: &str = "BENCH-HEX ";

/// Stands for QEMU's `-M` value in QEMU argvs; the driver substitutes the machine variant it
/// chose in the probe (see [`Plan::qemu_machines`]).
pub const MACHINE_PLACEHOLDER: &str = "{machine}";

/// Which VMM a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Our static `vmm run`.
    Ours,
    /// QEMU's microvm machine.
    Qemu,
}

impl Kind {
    /// The name used in tables.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Ours => "ours (vmm)",
            Kind::Qemu => "QEMU microvm",
        }
    }
}

/// One way of booting the guest: which VMM, how big, which command line, the exact argv.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// The configuration this case belongs to (e.g. `2vcpu-default`); ours and QEMU share it.
    pub group: String,
    /// Which VMM.
    pub kind: Kind,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Whether `quiet` is on the kernel command line.
    pub quiet: bool,
    /// The full command (program first).
    pub argv: Vec<String>,
    /// Where `vmm run --metrics-file` writes its JSON (ours only).
    pub metrics_file: Option<String>,
}

/// How the memory measurement stops the VMM once it has been measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopHow {
    /// Run this command (e.g. `vmm stop --api-sock S`).
    Command(Vec<String>),
    /// Send SIGTERM.
    Sigterm,
}

/// One memory-overhead measurement: boot, wait for readiness, read `/proc/PID/smaps`, stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemCase {
    /// Which VMM.
    pub kind: Kind,
    /// Guest memory in MiB (the size of the guest RAM mapping looked for in smaps).
    pub mem_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// The full command (program first).
    pub argv: Vec<String>,
    /// A file to remove before starting (the API socket).
    pub remove_before: Option<String>,
    /// How to stop it.
    pub stop: StopHow,
    /// How many times to measure it.
    pub runs: u32,
}

/// Everything the in-rig driver runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Measured boots of each case.
    pub runs: u32,
    /// Unmeasured warm-up boots of our VMM in the probe group, before the QEMU probe.
    pub warmup: u32,
    /// QEMU `-M` variants to probe; the one whose probe boots all succeeded with the smallest
    /// median time to readiness is used for every QEMU boot after the probe.
    pub qemu_machines: Vec<String>,
    /// Index into `groups` of the configuration the probe boots use.
    pub probe_group: usize,
    /// Probe boots of each QEMU variant (reported, not summarised).
    pub probe_runs: u32,
    /// Time limit of one boot in seconds (the VMM is killed after it).
    pub boot_timeout_s: u64,
    /// The console line that marks readiness.
    pub ready_marker: String,
    /// Cases grouped by configuration. Round `r` runs every group in order; within a group the
    /// cases alternate, starting with case `r % len`, so neither VMM always goes first.
    pub groups: Vec<Vec<Case>>,
    /// Memory measurements, each run its `runs` times (alternating while both have runs left).
    pub memory: Vec<MemCase>,
    /// Milliseconds to wait after readiness before reading smaps.
    pub memory_settle_ms: u64,
    /// A command printing the benchmarked QEMU's version (run once inside).
    pub qemu_version_argv: Vec<String>,
}

/// `vmm run --metrics-file` contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmmMetrics {
    /// Process start → first `KVM_RUN`.
    pub setup_ms: Option<f64>,
    /// Process start → first console byte (seen by the VMM's serial device).
    pub first_console_ms: Option<f64>,
    /// Process start → the readiness line (seen by the VMM's serial device).
    pub ready_ms: Option<f64>,
    /// Why the VM ended.
    pub exit_reason: Option<String>,
    /// The VMM's exit code.
    pub exit_code: Option<i32>,
    /// Named milestones, ms since process start (a restore's phases; absent for a boot).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub phases: std::collections::BTreeMap<String, f64>,
}

/// One boot's measurement. Times are from the driver's `spawn()` (emulated rig time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootRecord {
    /// The case's group.
    pub group: String,
    /// Which VMM.
    pub kind: Kind,
    /// Round number (0-based; warm-ups have their own count).
    pub round: u32,
    /// A warm-up or probe boot (not summarised).
    pub warmup: bool,
    /// QEMU's `-M` value (QEMU only).
    pub qemu_machine: Option<String>,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// `quiet` on the command line.
    pub quiet: bool,
    /// Whether the guest reached readiness and the VMM ended cleanly after power-off.
    pub ok: bool,
    /// Why not, when not ok.
    pub failure: Option<String>,
    /// Spawn → first byte on the VMM's stdout (the guest console).
    pub first_console_ms: Option<f64>,
    /// Spawn → the readiness line on stdout.
    pub ready_ms: Option<f64>,
    /// Spawn → process exit.
    pub exit_ms: Option<f64>,
    /// The process's exit status (`signal N` when killed).
    pub exit_status: Option<String>,
    /// Ours: the VMM's own timings.
    pub vmm_metrics: Option<VmmMetrics>,
    /// Bytes of console output.
    pub console_bytes: u64,
    /// The `Kernel command line:` the guest printed (only visible without `quiet`).
    pub kernel_cmdline: Option<String>,
    /// Warnings the VMM printed on stderr (deduplicated `warning` lines).
    pub warnings: Vec<String>,
    /// The last console lines, when the boot failed.
    pub console_tail: Vec<String>,
    /// The last stderr lines, when the boot failed.
    pub stderr_tail: Vec<String>,
}

/// One memory measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemRecord {
    /// Which VMM.
    pub kind: Kind,
    /// QEMU's `-M` value (QEMU only).
    pub qemu_machine: Option<String>,
    /// Repetition number.
    pub round: u32,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Whether everything was measured and the VMM stopped as asked.
    pub ok: bool,
    /// Why not.
    pub failure: Option<String>,
    /// Spawn → readiness line.
    pub ready_ms: Option<f64>,
    /// The breakdown from smaps.
    pub smaps: Option<crate::smaps::Overhead>,
    /// `VmHWM` from /proc/PID/status (peak RSS), KiB.
    pub vm_hwm_kib: Option<u64>,
    /// How it was stopped and how long that took.
    pub stopped: Option<String>,
    /// The process's exit status.
    pub exit_status: Option<String>,
    /// The last console lines, when it failed.
    pub console_tail: Vec<String>,
    /// The last stderr lines, when it failed.
    pub stderr_tail: Vec<String>,
}

/// Facts about the rig, gathered inside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RigFacts {
    /// CPUs this process may run on.
    pub cpus: usize,
    /// `/sys/devices/system/cpu/online`.
    pub cpus_online: Option<String>,
    /// The rig kernel (`uname -r`).
    pub kernel: String,
    /// `MemTotal` of the rig, KiB.
    pub mem_total_kib: Option<u64>,
    /// The rig CPU's model name.
    pub cpu_model: Option<String>,
    /// The first line of the benchmarked QEMU's `--version`, run inside.
    pub qemu_version: Option<String>,
    /// Whether `/dev/kvm` exists in the rig.
    pub dev_kvm: bool,
}

/// How one QEMU machine variant did in the probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The `-M` value.
    pub machine: String,
    /// Probe boots.
    pub runs: usize,
    /// Of which succeeded.
    pub ok: usize,
    /// Median spawn → readiness of the successful ones, ms.
    pub median_ready_ms: Option<f64>,
}

/// The driver's choice of QEMU machine variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineChoice {
    /// The `-M` value used from now on.
    pub machine: String,
    /// Why.
    pub reason: String,
    /// Every variant's probe.
    pub probes: Vec<ProbeResult>,
}

/// Picks the variant whose probe boots all succeeded with the smallest median readiness; when
/// none fully succeeded, the first variant (its boots will then fail visibly).
pub fn choose_machine(probes: &[ProbeResult]) -> MachineChoice {
    let best = probes
        .iter()
        .filter(|p| p.runs > 0 && p.ok == p.runs)
        .filter_map(|p| p.median_ready_ms.map(|m| (p, m)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    match best {
        Some((p, m)) => MachineChoice {
            machine: p.machine.clone(),
            reason: format!(
                "fastest to readiness among the variants that booted in the probe ({m:.0} ms)"
            ),
            probes: probes.to_vec(),
        },
        None => MachineChoice {
            machine: probes
                .first()
                .map(|p| p.machine.clone())
                .unwrap_or_default(),
            reason: "no variant booted in the probe; using the first".into(),
            probes: probes.to_vec(),
        },
    }
}

/// `argv` with [`MACHINE_PLACEHOLDER`] replaced by `machine`.
pub fn with_machine(argv: &[String], machine: &str) -> Vec<String> {
    argv.iter()
        .map(|a| {
            if a == MACHINE_PLACEHOLDER {
                machine.to_string()
            } else {
                a.clone()
            }
        })
        .collect()
}

/// A message from the driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Sent first.
    Facts(RigFacts),
    /// One per boot.
    Boot(BootRecord),
    /// After the probe.
    Choice(MachineChoice),
    /// One per memory measurement.
    Memory(MemRecord),
    /// Sent last.
    Done {
        /// Boots run (warm-ups included).
        boots: usize,
        /// Of which failed.
        failed: usize,
    },
}

impl Message {
    /// The readable line (`BENCH-BOOT {json}`, ...) for people.
    pub fn text_line(&self) -> String {
        let tag = match self {
            Message::Facts(_) => "BENCH-FACTS",
            Message::Boot(_) => "BENCH-BOOT",
            Message::Choice(_) => "BENCH-CHOICE",
            Message::Memory(_) => "BENCH-MEMORY",
            Message::Done { .. } => "BENCH-DONE",
        };
        format!("{tag} {}", self.json())
    }

    /// The hex-encoded line the host parses ([`decode`]).
    pub fn hex_line(&self) -> String {
        let hex: String = self.json().bytes().map(|b| format!("{b:02x}")).collect();
        format!("{HEX_MARKER}{hex}")
    }

    fn json(&self) -> String {
        serde_json::to_string(self).expect("a Message serializes")
    }
}

/// Errors decoding a hex line.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// Odd length or a non-hex digit.
    #[error("the hex payload is not valid hex (odd length or a non-hex digit)")]
    Hex,
    /// The bytes are not a [`Message`].
    #[error("the decoded payload is not a bench message: {0}")]
    Json(String),
}

/// Decodes the [`HEX_MARKER`] message in `line`; `None` when the line has no marker (console
/// noise before the marker is ignored).
pub fn decode(line: &str) -> Option<Result<Message, DecodeError>> {
    let at = line.find(HEX_MARKER)?;
    let hex = line[at + HEX_MARKER.len()..].trim().as_bytes();
    Some(decode_hex(hex))
}

fn decode_hex(hex: &[u8]) -> Result<Message, DecodeError> {
    if hex.len() % 2 != 0 {
        return Err(DecodeError::Hex);
    }
    let bytes = hex
        .chunks_exact(2)
        .map(|c| {
            std::str::from_utf8(c)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or(DecodeError::Hex)?;
    serde_json::from_slice(&bytes).map_err(|e| DecodeError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot() -> BootRecord {
        BootRecord {
            group: "2vcpu-quiet".into(),
            kind: Kind::Qemu,
            round: 3,
            warmup: false,
            qemu_machine: Some("microvm".into()),
            vcpus: 2,
            mem_mib: 512,
            quiet: true,
            ok: false,
            failure: Some("no readiness line".into()),
            first_console_ms: Some(12.5),
            ready_ms: None,
            exit_ms: Some(900.0),
            exit_status: Some("exit 0".into()),
            vmm_metrics: None,
            console_bytes: 10,
            kernel_cmdline: None,
            warnings: vec![],
            console_tail: vec!["reboot: Power down".into()],
            stderr_tail: vec![],
        }
    }

    #[test]
    fn hex_round_trip_after_console_noise() {
        let msg = Message::Boot(boot());
        let line = format!("[  12.3] some kernel noise {}", msg.hex_line());
        assert_eq!(decode(&line).unwrap().unwrap(), msg);
        // The readable form names the kind of message and carries the same JSON.
        assert!(msg.text_line().starts_with("BENCH-BOOT {\"type\":\"boot\""));
    }

    #[test]
    fn lines_without_marker_or_with_damage() {
        assert!(decode("BENCH-BOOT {}").is_none());
        assert_eq!(decode("BENCH-HEX 7b7").unwrap(), Err(DecodeError::Hex));
        assert_eq!(decode("BENCH-HEX zz").unwrap(), Err(DecodeError::Hex));
        assert!(matches!(
            decode("BENCH-HEX 7b7d").unwrap(),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn machine_choice() {
        let p = |m: &str, runs, ok, med| ProbeResult {
            machine: m.into(),
            runs,
            ok,
            median_ready_ms: med,
        };
        let probes = [
            p("a", 1, 1, Some(300.0)),
            p("b", 2, 1, Some(100.0)), // one probe boot failed: not chosen
            p("c", 1, 1, Some(200.0)),
        ];
        let c = choose_machine(&probes);
        assert_eq!(c.machine, "c");
        assert_eq!(c.probes.len(), 3);
        let none = choose_machine(&[p("a", 1, 0, None), p("b", 1, 0, None)]);
        assert_eq!(none.machine, "a");
        assert!(none.reason.contains("no variant"));
        let argv: Vec<String> = ["q", "-M", MACHINE_PLACEHOLDER, "-m", "1"]
            .map(String::from)
            .to_vec();
        assert_eq!(with_machine(&argv, "microvm,rtc=off")[2], "microvm,rtc=off");
    }

    #[test]
    fn done_and_plan_serialize() {
        let done = Message::Done {
            boots: 4,
            failed: 1,
        };
        assert_eq!(decode(&done.hex_line()).unwrap().unwrap(), done);
        let plan = Plan {
            runs: 10,
            warmup: 1,
            qemu_machines: vec!["microvm".into()],
            probe_group: 0,
            probe_runs: 1,
            boot_timeout_s: 60,
            ready_marker: "VMM-GUEST-READY".into(),
            groups: vec![vec![Case {
                group: "g".into(),
                kind: Kind::Ours,
                vcpus: 1,
                mem_mib: 128,
                quiet: false,
                argv: vec!["./vmm".into(), "run".into()],
                metrics_file: Some("m.json".into()),
            }]],
            memory: vec![MemCase {
                kind: Kind::Qemu,
                mem_mib: 128,
                vcpus: 1,
                argv: vec!["q".into()],
                remove_before: None,
                stop: StopHow::Sigterm,
                runs: 1,
            }],
            memory_settle_ms: 1000,
            qemu_version_argv: vec!["q".into(), "--version".into()],
        };
        let text = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&text).unwrap(), plan);
    }
}
