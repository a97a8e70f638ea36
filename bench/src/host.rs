//! `bench boot`: the host side. Builds the static binaries and the guest image, measures set-up
//! on this host's /dev/kvm and the binary size, bundles QEMU, runs the in-rig driver
//! (`bench rig-boot`) in one rig run, and writes `boot.json` and `boot.md`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rig::{KvmBackend, Payload, RigOptions};
use serde::Serialize;
use serde_json::json;

use crate::cmdline::{self, GroupSpec, IDLE_WORKLOAD, POWEROFF_RUN};
use crate::console::{describe_status, TimedChild};
use crate::protocol::{
    self, BootRecord, Case, Kind, MachineChoice, MemCase, MemRecord, Message, Plan, RigFacts,
    StopHow, VmmMetrics,
};
use crate::qemu::{self, QemuBundle};
use crate::report::{self, BinarySize, GroupStats, HostSetup, MarkdownInput, MemStats};
use crate::stats::Summary;

/// The readiness line the guest image prints.
pub const READY_MARKER: &str = "VMM-GUEST-READY";
/// Guest memory of the boot benchmark (the project's standard S512 guest).
pub const BOOT_MEM_MIB: u32 = 512;
/// QEMU microvm variants probed by default: ACPI (no PCI needed) with QEMU's default legacy
/// devices, and without RTC, PIT and PIC (our VMM has no RTC; the guest's `rtc_cmos` probe took
/// 19 s of a 2-vCPU boot in one trial). `rtc=off` alone was probed once too (30 s vs 35 s and
/// 21 s for these two); it is left out to keep a full run under 20 minutes.
pub const DEFAULT_MACHINES: [&str; 2] =
    ["microvm,acpi=on", "microvm,acpi=on,pit=off,pic=off,rtc=off"];

/// Arguments of `bench boot`.
#[derive(clap::Args, Debug)]
pub struct BootArgs {
    /// Measured boots of each VMM in each configuration.
    #[arg(long, default_value_t = 10)]
    pub runs: u32,
    /// Unmeasured warm-up boots of our VMM before the QEMU probe (reported in the JSON; the
    /// probe boots already warm the rig's page cache, so none by default).
    #[arg(long, default_value_t = 0)]
    pub warmup: u32,
    /// The JSON result file; the Markdown goes next to it with the extension `.md`.
    #[arg(long, default_value = "bench-results/boot.json")]
    pub out: PathBuf,
    /// Configurations as `VCPUS:default|quiet`, comma-separated (`quiet` appends `quiet` to the
    /// kernel command line; `default` is the VMM's default command line).
    #[arg(long, value_delimiter = ',', default_value = "2:default,2:quiet")]
    pub groups: Vec<GroupSpec>,
    /// `vmm run` set-up measurements on this host's own /dev/kvm.
    #[arg(long, default_value_t = 10)]
    pub host_runs: u32,
    /// Memory-overhead measurements of our VMM inside the rig.
    #[arg(long, default_value_t = 3)]
    pub memory_runs: u32,
    /// Memory-overhead measurements of QEMU (a reference figure, not a goal).
    #[arg(long, default_value_t = 1)]
    pub qemu_memory_runs: u32,
    /// The QEMU to compare against (copied into the rig with its libraries and firmware).
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// QEMU `-M` variants (repeat the flag). Each gets `--probe-runs` probe boots first (in the
    /// first `quiet` configuration); all measured QEMU boots use the variant that booted fastest.
    #[arg(long = "qemu-machine", action = clap::ArgAction::Append, default_values = DEFAULT_MACHINES)]
    pub qemu_machines: Vec<String>,
    /// Probe boots of each QEMU variant.
    #[arg(long, default_value_t = 1)]
    pub probe_runs: u32,
    /// Rig memory, MiB.
    #[arg(long, default_value_t = 2048)]
    pub rig_mem: u32,
    /// Rig vCPUs (run.sh uses 1 with QEMU < 10 anyway, see shared/kvm-rig/NOTES.md).
    #[arg(long, default_value_t = 1)]
    pub rig_smp: u32,
    /// Seconds one boot may take inside the rig before it is killed and reported as failed.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    /// Seconds the whole rig run may take (a safety net: a full run needs about 15 minutes on
    /// an idle host, but the rig's TCG slows down 2-3x while other work shares the 2 cores).
    #[arg(long, default_value_t = 3600)]
    pub rig_timeout: u64,
}

/// Prints a progress line on stderr.
pub(crate) fn say(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "bench: {msg}");
}

/// The workspace root (this crate's parent).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ has a parent")
        .to_path_buf()
}

/// Takes the host-wide rig lock around work that must not share the machine with a rig (host
/// timings, the driver on a host with real KVM), saying so while it waits.
fn acquire_rig_lock(what: &str) -> anyhow::Result<rig::RigLock> {
    let waited = std::cell::Cell::new(None);
    let lock = rig::RigLock::acquire(|path| {
        say(&format!(
            "waiting for {} (another rig or benchmark is running) before {what}",
            path.display()
        ));
        waited.set(Some(Instant::now()));
    })?;
    if let Some(t) = waited.get() {
        say(&format!(
            "got the rig lock after {:.0} s",
            t.elapsed().as_secs_f64()
        ));
    }
    Ok(lock)
}

/// Runs `program args` and returns its stdout; stderr goes to ours. Fails with the status.
pub(crate) fn output_of(program: &Path, args: &[&str], cwd: &Path) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} {}", program.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({})",
            program.display(),
            args.join(" "),
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The guest image.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Image {
    pub(crate) kernel: PathBuf,
    pub(crate) initrd: PathBuf,
    /// The S512 data disk, when the image build made one.
    pub(crate) data_disk: Option<PathBuf>,
    kernel_version: Option<String>,
    kernel_package: Option<String>,
    kernel_bytes: u64,
    initrd_bytes: u64,
}

pub(crate) fn build_image(vmm: &Path, root: &Path) -> anyhow::Result<Image> {
    let text =
        output_of(vmm, &["image", "build", "--json"], root).context("building the guest image")?;
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("parsing `vmm image build --json` output {text:?}"))?;
    let path = |k: &str| {
        v.get(k)
            .and_then(|p| p.as_str())
            .map(PathBuf::from)
            .with_context(|| format!("`vmm image build --json` printed no {k:?}: {v}"))
    };
    let (kernel, initrd) = (path("kernel")?, path("initrd")?);
    let size = |p: &Path| -> anyhow::Result<u64> {
        Ok(std::fs::metadata(p)
            .with_context(|| format!("stat {}", p.display()))?
            .len())
    };
    Ok(Image {
        kernel_bytes: size(&kernel)?,
        initrd_bytes: size(&initrd)?,
        kernel_version: v
            .get("kernel_version")
            .and_then(|s| s.as_str())
            .map(String::from),
        kernel_package: v
            .get("kernel_package")
            .and_then(|s| s.as_str())
            .map(String::from),
        data_disk: path("data_disk").ok(),
        kernel,
        initrd,
    })
}

/// Builds `vmm` + `guest-trimmer` with `scripts/build-static.sh` and `bench` with
/// [`rig::build_static`]; returns (vmm, bench).
pub(crate) fn build(root: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    Ok((build_static_vmm(root)?, build_static_bench(root)?))
}

/// Builds `vmm` + `guest-trimmer` with `scripts/build-static.sh`; returns the static `vmm`.
pub(crate) fn build_static_vmm(root: &Path) -> anyhow::Result<PathBuf> {
    say("building the static vmm and guest-trimmer (scripts/build-static.sh)");
    let text = output_of(&root.join("scripts/build-static.sh"), &[], root)
        .context("building the static vmm")?;
    let bin_dir = text
        .lines()
        .last()
        .map(PathBuf::from)
        .context("scripts/build-static.sh printed no bin dir")?;
    let vmm = bin_dir.join("vmm");
    if !rig::is_static_executable(&vmm).with_context(|| format!("checking {}", vmm.display()))? {
        bail!("{} is not statically linked", vmm.display());
    }
    Ok(vmm)
}

/// Builds the static `bench` binary (the in-rig driver) and returns its path.
pub(crate) fn build_static_bench(root: &Path) -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join("static"))
        .unwrap_or_else(|| root.join("target/bench-static"));
    say(&format!(
        "building the static bench driver into {}",
        target.display()
    ));
    let built =
        rig::build_static(root, &["bench"], &target).context("building the static bench")?;
    built
        .into_iter()
        .find(|p| p.file_name().is_some_and(|f| f == "bench"))
        .context("cargo built no bench binary")
}

/// The size of `vmm`, and of a stripped copy.
fn binary_size(vmm: &Path, qemu: &QemuBundle) -> anyhow::Result<BinarySize> {
    let bytes = std::fs::metadata(vmm)
        .with_context(|| format!("stat {}", vmm.display()))?
        .len();
    let dir = tempfile_dir()?;
    let copy = dir.join("vmm.stripped");
    let (stripped_bytes, note) = match Command::new("strip").arg("-o").arg(&copy).arg(vmm).status()
    {
        Ok(st) if st.success() => {
            let s = std::fs::metadata(&copy)?.len();
            let note = if s == bytes {
                "`strip` changes nothing: the release profile (`strip = \"symbols\"`) already strips it.".to_string()
            } else {
                format!(
                    "`strip` removes {} more bytes (the release profile strips symbols; the rest is other non-loaded sections).",
                    bytes - s
                )
            };
            (Some(s), note)
        }
        Ok(st) => (None, format!("`strip -o` failed ({st})")),
        Err(e) => (None, format!("`strip` could not run: {e}")),
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(BinarySize {
        path: vmm.display().to_string(),
        bytes,
        stripped_bytes,
        note,
        qemu_with_libs_bytes: qemu.bytes,
    })
}

pub(crate) fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// What /dev/kvm is on this host.
pub(crate) fn dev_kvm_kind() -> String {
    if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (PVM: a stock guest runs for about 2 s, then KVM's instruction emulator fails it)"
            .into()
    } else if Path::new("/dev/kvm").exists() {
        "hardware KVM".into()
    } else {
        "absent".into()
    }
}

/// `vmm run` of the image with `mem_mib` and 2 vCPUs, then `extra`.
pub(crate) fn vmm_run_argv(vmm: &Path, image: &Image, mem_mib: u32, extra: &[&str]) -> Vec<String> {
    let mut argv = vec![
        vmm.display().to_string(),
        "run".into(),
        "--kernel".into(),
        image.kernel.display().to_string(),
        "--initrd".into(),
        image.initrd.display().to_string(),
        "--mem-mib".into(),
        mem_mib.to_string(),
        "--vcpus".into(),
        "2".into(),
    ];
    argv.extend(extra.iter().map(|a| a.to_string()));
    argv
}

/// `setup_ms` of `runs` `vmm run`s on this host's /dev/kvm.
fn host_setup(vmm: &Path, image: &Image, runs: u32) -> anyhow::Result<HostSetup> {
    let dir = tempfile_dir()?;
    let metrics = dir.join("host-metrics.json");
    let metrics_arg = metrics.display().to_string();
    let argv = vmm_run_argv(
        vmm,
        image,
        BOOT_MEM_MIB,
        &["--cmdline", POWEROFF_RUN, "--metrics-file", &metrics_arg],
    );
    let mut h = HostSetup {
        dev_kvm: dev_kvm_kind(),
        argv: argv.clone(),
        runs: runs as usize,
        samples_ms: vec![],
        setup_ms: None,
        endings: vec![],
        failures: vec![],
        goal_met: None,
    };
    for i in 0..runs {
        let _ = std::fs::remove_file(&metrics);
        let mut child = TimedChild::spawn(&argv, READY_MARKER)?;
        let exit = child.wait_exit(Instant::now() + Duration::from_secs(120))?;
        let status = exit
            .status
            .as_ref()
            .map(describe_status)
            .unwrap_or_default();
        let parsed: anyhow::Result<VmmMetrics> = std::fs::read_to_string(&metrics)
            .with_context(|| format!("no metrics file {}", metrics.display()))
            .and_then(|t| serde_json::from_str(&t).context("parsing the metrics file"));
        match parsed {
            Ok(m) => {
                h.endings.push(format!(
                    "{} ({status}{})",
                    m.exit_reason.as_deref().unwrap_or("?"),
                    if exit.killed {
                        ", killed after 120 s"
                    } else {
                        ""
                    }
                ));
                match m.setup_ms {
                    Some(s) => h.samples_ms.push(s),
                    None => h
                        .failures
                        .push(format!("run {i}: the metrics file has no setup_ms")),
                }
            }
            Err(e) => {
                let (out, err) = child.tails();
                let all: Vec<String> = out.into_iter().chain(err).collect();
                h.failures.push(format!(
                    "run {i}: {e:#} ({status}); last output: {}",
                    all[all.len().saturating_sub(5)..].join(" | ")
                ));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    h.setup_ms = Summary::of(&h.samples_ms);
    h.goal_met = h.setup_ms.map(|s| s.median <= report::GOAL_HOST_SETUP_MS);
    Ok(h)
}

/// Paths of the payload's files as the driver will see them.
struct Layout {
    root: String,
}

impl Layout {
    fn p(&self, name: &str) -> String {
        format!("{}/{name}", self.root)
    }

    fn qemu_prefix(&self) -> Vec<String> {
        vec![
            self.p("lib/ld-linux-x86-64.so.2"),
            "--library-path".into(),
            self.p("lib"),
            self.p("qemu-system-x86_64"),
        ]
    }
}

/// The plan: for each configuration our `vmm run` and QEMU with the same kernel, initramfs,
/// memory, vCPUs and command line; then the memory cases.
fn make_plan(args: &BootArgs, l: &Layout, default_cmdline: &str) -> Plan {
    let ours = |mem: u32, vcpus: u32, extra: &str, tail: &[String]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            l.p("vmm"),
            "run".into(),
            "--kernel".into(),
            l.p("vmlinuz"),
            "--initrd".into(),
            l.p("initrd"),
            "--mem-mib".into(),
            mem.to_string(),
            "--vcpus".into(),
            vcpus.to_string(),
            "--cmdline".into(),
            extra.into(),
        ];
        v.extend_from_slice(tail);
        v
    };
    let qemu = |mem: u32, vcpus: u32, extra: &str| -> Vec<String> {
        let mut v = l.qemu_prefix();
        v.extend(
            [
                "-L",
                &l.p("fw"),
                "-enable-kvm",
                "-M",
                protocol::MACHINE_PLACEHOLDER,
                "-cpu",
                "host",
                "-m",
                &mem.to_string(),
                "-smp",
                &vcpus.to_string(),
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-serial",
                "stdio",
                "-no-reboot",
                "-kernel",
                &l.p("vmlinuz"),
                "-initrd",
                &l.p("initrd"),
                "-append",
                &format!("{default_cmdline} {extra}"),
            ]
            .map(String::from),
        );
        v
    };
    let metrics = l.p("metrics.json");
    let groups = args
        .groups
        .iter()
        .map(|g| {
            let extra = g.extra_cmdline(POWEROFF_RUN);
            let case = |kind, argv, metrics_file| Case {
                group: g.name(),
                kind,
                vcpus: g.vcpus,
                mem_mib: BOOT_MEM_MIB,
                quiet: g.quiet,
                argv,
                metrics_file,
            };
            vec![
                case(
                    Kind::Ours,
                    ours(
                        BOOT_MEM_MIB,
                        g.vcpus,
                        &extra,
                        &["--metrics-file".into(), metrics.clone()],
                    ),
                    Some(metrics.clone()),
                ),
                case(Kind::Qemu, qemu(BOOT_MEM_MIB, g.vcpus, &extra), None),
            ]
        })
        .collect();
    let sock = l.p("mem.sock");
    let idle = format!("quiet {IDLE_WORKLOAD}");
    let memory = vec![
        MemCase {
            kind: Kind::Ours,
            mem_mib: 128,
            vcpus: 1,
            argv: ours(128, 1, &idle, &["--api-sock".into(), sock.clone()]),
            remove_before: Some(sock.clone()),
            stop: StopHow::Command(vec![l.p("vmm"), "stop".into(), "--api-sock".into(), sock]),
            runs: args.memory_runs,
        },
        MemCase {
            kind: Kind::Qemu,
            mem_mib: 128,
            vcpus: 1,
            argv: qemu(128, 1, &idle),
            remove_before: None,
            stop: StopHow::Sigterm,
            runs: args.qemu_memory_runs,
        },
    ];
    let mut qemu_version_argv = l.qemu_prefix();
    qemu_version_argv.push("--version".into());
    Plan {
        runs: args.runs,
        warmup: args.warmup,
        qemu_machines: args.qemu_machines.clone(),
        probe_group: args.groups.iter().position(|g| g.quiet).unwrap_or(0),
        probe_runs: args.probe_runs,
        boot_timeout_s: args.boot_timeout,
        ready_marker: READY_MARKER.into(),
        groups,
        memory,
        memory_settle_ms: 1000,
        qemu_version_argv,
    }
}

/// What came back from the driver.
#[derive(Default)]
struct Collected {
    facts: Option<RigFacts>,
    choice: Option<MachineChoice>,
    boots: Vec<BootRecord>,
    memory: Vec<MemRecord>,
    done: Option<(usize, usize)>,
    damaged: Vec<String>,
    tail: std::collections::VecDeque<String>,
}

impl Collected {
    fn line(&mut self, line: &str, expected: usize) {
        self.tail.push_back(line.to_string());
        if self.tail.len() > 60 {
            self.tail.pop_front();
        }
        match protocol::decode(line) {
            Some(Ok(Message::Facts(f))) => {
                say(&format!(
                    "rig: {} CPU(s), kernel {}, {}",
                    f.cpus,
                    f.kernel,
                    f.qemu_version.as_deref().unwrap_or("QEMU version unknown")
                ));
                self.facts = Some(f);
            }
            Some(Ok(Message::Boot(b))) => {
                say(&format!(
                    "boot {}/{expected}: {}{} {}{} {} ready {} ms, exit {} ms{}",
                    self.boots.len() + 1,
                    if b.warmup { "warm-up/probe " } else { "" },
                    b.group,
                    b.kind.label(),
                    b.qemu_machine
                        .as_deref()
                        .map(|m| format!(" -M {m}"))
                        .unwrap_or_default(),
                    if b.ok { "ok" } else { "FAILED" },
                    b.ready_ms.map(|v| format!("{v:.0}")).unwrap_or("–".into()),
                    b.exit_ms.map(|v| format!("{v:.0}")).unwrap_or("–".into()),
                    b.failure
                        .as_deref()
                        .map(|f| format!(": {f}"))
                        .unwrap_or_default()
                ));
                if !b.ok {
                    for l in &b.console_tail {
                        say(&format!("  console| {l}"));
                    }
                }
                self.boots.push(b);
            }
            Some(Ok(Message::Choice(c))) => {
                say(&format!("QEMU machine: -M {} ({})", c.machine, c.reason));
                self.choice = Some(c);
            }
            Some(Ok(Message::Memory(m))) => {
                say(&format!(
                    "memory {}: {} overhead {} KiB{}",
                    m.kind.label(),
                    if m.ok { "ok" } else { "FAILED" },
                    m.smaps
                        .as_ref()
                        .map(|s| s.overhead_kib.to_string())
                        .unwrap_or("–".into()),
                    m.failure
                        .as_deref()
                        .map(|f| format!(": {f}"))
                        .unwrap_or_default()
                ));
                self.memory.push(m);
            }
            Some(Ok(Message::Done { boots, failed })) => self.done = Some((boots, failed)),
            Some(Err(e)) => self.damaged.push(format!("{e}: {:.120}", line)),
            None => {
                if !line.starts_with("BENCH-") {
                    say(&format!("rig| {line}"));
                }
            }
        }
    }
}

/// What the host prepared before any measurement.
struct Prepared {
    vmm: PathBuf,
    bench: PathBuf,
    image: Image,
    default_cmdline: String,
    qemu: QemuBundle,
    binary: BinarySize,
}

/// Builds the binaries and the image, reads the default command line, bundles QEMU, sizes
/// the binary.
fn prepare(root: &Path, args: &BootArgs) -> anyhow::Result<Prepared> {
    let (vmm, bench) = build(root)?;
    let image = build_image(&vmm, root)?;
    let source = root.join(cmdline::CMDLINE_SOURCE);
    let default_cmdline = cmdline::extract_default_cmdline(
        &std::fs::read_to_string(&source)
            .with_context(|| format!("reading {}", source.display()))?,
    )
    .with_context(|| format!("reading DEFAULT_CMDLINE from {}", source.display()))?;
    let qemu = qemu::bundle(&args.qemu)
        .with_context(|| format!("bundling {} for the rig", args.qemu.display()))?;
    let binary = binary_size(&vmm, &qemu)?;
    Ok(Prepared {
        vmm,
        bench,
        image,
        default_cmdline,
        qemu,
        binary,
    })
}

/// The payload: our binaries, the image, QEMU with its loader, libraries and firmware.
fn payload(p: &Prepared) -> anyhow::Result<Payload> {
    let mut payload = Payload::new().context("creating the rig payload")?;
    payload
        .add_file(&p.vmm, "vmm", 0o755)
        .and_then(|x| x.add_file(&p.bench, "bench", 0o755))
        .and_then(|x| x.add_file(&p.image.kernel, "vmlinuz", 0o644))
        .and_then(|x| x.add_file(&p.image.initrd, "initrd", 0o644))
        .and_then(|x| x.add_file(&p.qemu.binary, "qemu-system-x86_64", 0o755))
        .and_then(|x| x.add_file(&p.qemu.loader, "lib/ld-linux-x86-64.so.2", 0o755))
        .context("assembling the rig payload")?;
    for lib in &p.qemu.libs {
        payload
            .add_file(&lib.path, &format!("lib/{}", lib.name), 0o755)
            .context("assembling the rig payload (QEMU's libraries)")?;
    }
    for (name, path) in &p.qemu.firmware {
        payload
            .add_file(path, &format!("fw/{name}"), 0o644)
            .context("assembling the rig payload (QEMU's firmware)")?;
    }
    Ok(payload)
}

/// How the driver run went.
struct DriverRun {
    /// How it was started (for the JSON).
    desc: serde_json::Value,
    /// How it ended.
    outcome: rig::RigOutcome,
    /// What it reported.
    got: Collected,
}

/// Runs the driver in the rig (or on a host with real KVM) and collects its messages.
fn drive(
    args: &BootArgs,
    backend: &KvmBackend,
    payload: &Payload,
    driver_cmd: &[String],
    expected: usize,
) -> anyhow::Result<DriverRun> {
    let mut got = Collected::default();
    let (desc, outcome) = match backend {
        KvmBackend::NestedRig { script } => {
            let opts = RigOptions {
                mem_mib: args.rig_mem,
                smp: args.rig_smp,
                timeout_s: args.rig_timeout,
            };
            let outer_qemu = std::env::var_os("KVM_RIG_QEMU")
                .filter(|q| !q.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
            let desc = json!({
                "script": script.display().to_string(),
                "command": format!("{} --mem {} --smp {} --timeout {} <payload> -- {}",
                    script.display(), opts.mem_mib, opts.smp, opts.timeout_s, driver_cmd.join(" ")),
                "outer_qemu": qemu::version_of(&outer_qemu),
                "requested_mem_mib": opts.mem_mib,
                "requested_smp": opts.smp,
            });
            let outcome = rig::run_in_rig(script, payload.path(), driver_cmd, opts, |l| {
                got.line(l, expected)
            })
            .context("running the driver in the rig")?;
            (desc, outcome)
        }
        KvmBackend::HostKvm => {
            let desc = json!({"script": null, "command": driver_cmd.join(" "),
                "note": "this host's /dev/kvm boots stock guests: ran without the rig"});
            let _lock = acquire_rig_lock("the boots on this host")?;
            let outcome = rig::run_local(
                Path::new(&driver_cmd[0]),
                &driver_cmd[1..],
                payload.path(),
                Duration::from_secs(args.rig_timeout),
                |l| got.line(l, expected),
            )
            .context("running the driver on the host")?;
            (desc, outcome)
        }
        KvmBackend::Unavailable { reason } => {
            bail!("no KVM that can boot a stock guest: {reason}")
        }
    };
    Ok(DriverRun { desc, outcome, got })
}

/// Everything that went wrong or did not run, one line each.
fn problems(args: &BootArgs, host: &HostSetup, run: &DriverRun, expected: usize) -> Vec<String> {
    let got = &run.got;
    let mut problems: Vec<String> = host
        .failures
        .iter()
        .map(|f| format!("host set-up: {f}"))
        .collect();
    if run.outcome.timed_out {
        problems.push(format!(
            "the rig run timed out after {} s; the figures cover what finished",
            args.rig_timeout
        ));
    }
    if got.done.is_none() {
        let tail: Vec<String> = got
            .tail
            .iter()
            .filter(|l| !l.contains("BENCH-"))
            .map(|l| l.chars().take(200).collect())
            .collect();
        problems.push(format!(
            "the driver did not finish (exit {}); last rig output (result lines left out): {}",
            run.outcome.exit_code,
            tail[tail.len().saturating_sub(10)..].join(" | ")
        ));
    }
    for d in &got.damaged {
        problems.push(format!("a damaged result line was dropped: {d}"));
    }
    for b in got.boots.iter().filter(|b| !b.ok) {
        let tail = &b.console_tail[b.console_tail.len().saturating_sub(8)..];
        problems.push(format!(
            "boot failed: {}{} {} round {}: {}; console tail: {}",
            if b.warmup { "warm-up/probe " } else { "" },
            b.group,
            b.kind.label(),
            b.round,
            b.failure.as_deref().unwrap_or("?"),
            tail.join(" | ")
        ));
    }
    for m in got.memory.iter().filter(|m| !m.ok) {
        problems.push(format!(
            "memory measurement failed: {} round {}: {}",
            m.kind.label(),
            m.round,
            m.failure.as_deref().unwrap_or("?")
        ));
    }
    if got.boots.len() < expected {
        problems.push(format!(
            "only {} of {expected} boots reported",
            got.boots.len()
        ));
    }
    // Both guests must have booted with the same command line (visible only without `quiet`).
    for g in &args.groups {
        let seen = |kind| {
            got.boots
                .iter()
                .filter(|b| b.group == g.name() && b.kind == kind)
                .find_map(|b| b.kernel_cmdline.clone())
        };
        if let (Some(a), Some(b)) = (seen(Kind::Ours), seen(Kind::Qemu)) {
            if a != b {
                problems.push(format!(
                    "{}: the guests saw different command lines: ours {a:?}, QEMU {b:?}",
                    g.name()
                ));
            }
        }
    }
    problems
}

/// The distinct warnings QEMU printed, prefixed with the guest's vCPU count.
fn qemu_warnings(boots: &[BootRecord]) -> Vec<String> {
    let mut w: Vec<String> = boots
        .iter()
        .filter(|b| b.kind == Kind::Qemu)
        .flat_map(|b| b.warnings.iter().map(|x| format!("{} vCPU: {x}", b.vcpus)))
        .collect();
    w.sort();
    w.dedup();
    w
}

/// Whether the README's `vmm run` example puts `quiet` on the kernel command line, in words.
fn readme_cmdline(root: &Path) -> String {
    match std::fs::read_to_string(root.join("README.md")) {
        Err(_) => "there is no README.md to compare with".into(),
        Ok(text) => {
            let examples: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("--cmdline '") || l.contains("--cmdline \""))
                .collect();
            match (
                examples.is_empty(),
                examples.iter().any(|l| l.contains("quiet")),
            ) {
                (true, _) => "the README shows no `--cmdline` example".into(),
                (false, true) => {
                    "the README's `vmm run` example appends `quiet`, so the `quiet` rows are \
                     what a README user gets"
                        .into()
                }
                (false, false) => {
                    "the README's `vmm run` example does not append `quiet`, so the `default` \
                     rows are what a README user gets"
                        .into()
                }
            }
        }
    }
}

/// The `- ` lines above the tables.
fn fact_lines(
    args: &BootArgs,
    p: &Prepared,
    run: &DriverRun,
    warnings: &[String],
    duration: Duration,
) -> Vec<String> {
    let rig_facts = run.got.facts.as_ref();
    let choice = run.got.choice.as_ref();
    let mut facts = vec![
        format!(
            "Guest: {} ({} bytes) + the project's initramfs ({} bytes), {BOOT_MEM_MIB} MiB; \
             both VMMs get the same files, memory, vCPUs and command line: the VMM's default \
             (`{}`, from `{}`) + `[quiet] {POWEROFF_RUN}`.",
            p.image.kernel_package.as_deref().unwrap_or("kernel"),
            p.image.kernel_bytes,
            p.image.initrd_bytes,
            p.default_cmdline,
            cmdline::CMDLINE_SOURCE
        ),
        format!(
            "QEMU: `{}` (host: {}; inside the rig: {}), run with the copied loader and {} copied \
             libraries (no QEMU modules needed for KVM); machine `-M {}` ({}; see the probe \
             table), firmware from `-L` ({}); `-no-reboot` added so a guest reset ends QEMU as \
             it ends our VMM.",
            args.qemu.display(),
            p.qemu.version,
            rig_facts
                .and_then(|f| f.qemu_version.as_deref())
                .unwrap_or("unknown"),
            p.qemu.libs.len(),
            choice.map(|c| c.machine.as_str()).unwrap_or("?"),
            choice
                .map(|c| c.reason.as_str())
                .unwrap_or("the driver made no choice"),
            p.qemu
                .firmware
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "Rig: `{}`; {} vCPU(s) inside (requested {}), {} MiB; rig kernel {}; outer QEMU: {}. \
             The rig run took {:.0} s of wall time; the whole benchmark {:.0} s.",
            run.desc["command"].as_str().unwrap_or(""),
            rig_facts.map(|f| f.cpus.to_string()).unwrap_or("?".into()),
            args.rig_smp,
            args.rig_mem,
            rig_facts.map(|f| f.kernel.as_str()).unwrap_or("?"),
            run.desc["outer_qemu"].as_str().unwrap_or("n/a"),
            run.outcome.duration.as_secs_f64(),
            duration.as_secs_f64()
        ),
        format!(
            "Boots: {} measured per VMM and configuration, alternating ours/QEMU (the first VMM \
             alternates between rounds), all in one rig run, after {} warm-up boot(s) of ours and \
             {} probe boot(s) per QEMU variant (those are in the JSON, not in the summaries). \
             With 1 rig vCPU, 2-vCPU guests are overcommitted (2 vCPUs on 1 CPU).",
            args.runs, args.warmup, args.probe_runs
        ),
    ];
    facts.extend(warnings.iter().map(|w| format!("QEMU printed: `{w}`")));
    facts
}

/// Runs `bench boot`.
pub fn run(args: BootArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let date = crate::clock::utc_now();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.groups.is_empty() {
        bail!("--groups is empty");
    }
    let root = workspace_root();
    let out_json = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    let out_md = out_json.with_extension("md");
    let command = std::iter::once("bench boot".to_string())
        .chain(std::env::args().skip(2))
        .collect::<Vec<_>>()
        .join(" ");
    let loadavg_start = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();

    let backend = rig::detect();
    let prep = prepare(&root, &args)?;

    say(&format!(
        "measuring set-up on this host's /dev/kvm ({} runs)",
        args.host_runs
    ));
    let host = {
        let _lock = acquire_rig_lock("the host set-up runs")?;
        host_setup(&prep.vmm, &prep.image, args.host_runs)?
    };
    say(&format!(
        "host set-up: {} ms median of {}",
        host.setup_ms
            .map(|s| format!("{:.2}", s.median))
            .unwrap_or("–".into()),
        host.samples_ms.len()
    ));

    let mut payload = payload(&prep)?;
    let layout = Layout {
        root: match &backend {
            KvmBackend::NestedRig { .. } => "/payload".into(),
            _ => payload.path().display().to_string(),
        },
    };
    let plan = make_plan(&args, &layout, &prep.default_cmdline);
    payload
        .add_bytes("plan.json", &serde_json::to_vec_pretty(&plan)?, 0o644)
        .context("writing the plan into the payload")?;
    let expected = plan.warmup as usize
        + plan.probe_runs as usize * plan.qemu_machines.len()
        + plan.runs as usize * plan.groups.iter().map(Vec::len).sum::<usize>();
    let driver_cmd: Vec<String> = vec![
        layout.p("bench"),
        "rig-boot".into(),
        "--plan".into(),
        layout.p("plan.json"),
    ];
    say(&format!(
        "running {expected} boots + {} memory measurements via {backend} (waits for {} while \
         another rig runs)",
        plan.memory.iter().map(|c| c.runs as usize).sum::<usize>(),
        rig::rig_lock_path().display()
    ));
    let run = drive(&args, &backend, &payload, &driver_cmd, expected)?;
    let got = &run.got;

    let problems = problems(&args, &host, &run, expected);
    let warnings = qemu_warnings(&got.boots);
    let groups: Vec<GroupStats> = args
        .groups
        .iter()
        .map(|g| GroupStats::of(&got.boots, &g.name(), g.vcpus, BOOT_MEM_MIB, g.quiet))
        .collect();
    let memory = vec![
        (Kind::Ours, MemStats::of(&got.memory, Kind::Ours)),
        (Kind::Qemu, MemStats::of(&got.memory, Kind::Qemu)),
    ];
    let headline_group = args
        .groups
        .iter()
        .find(|g| g.quiet && g.vcpus == 2)
        .or(args.groups.first())
        .map(|g| g.name())
        .unwrap_or_default();
    let headline = format!(
        "Headline configuration: **{headline_group}**: {}. The `default` rows use the VMM's \
         default command line unchanged, so the guest also prints its whole kernel log (about \
         22 KB) on the emulated UART, one VM exit per byte.",
        readme_cmdline(&root)
    );
    let facts = fact_lines(&args, &prep, &run, &warnings, started.elapsed());
    let md = report::markdown(&MarkdownInput {
        date: &date,
        command: &command,
        facts: &facts,
        groups: &groups,
        headline: &headline,
        host: Some(&host),
        memory: &memory,
        memory_guest: (128, 1),
        probe: got.choice.as_ref(),
        binary: Some(&prep.binary),
        problems: &problems,
    });
    let git = |a: &[&str]| {
        Command::new("git")
            .args(a)
            .current_dir(&root)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rig_facts = got.facts.as_ref();
    let report = json!({
        "benchmark": "boot",
        "date": date,
        "command": command,
        "duration_s": started.elapsed().as_secs_f64().round(),
        "git": {
            "commit": git(&["rev-parse", "HEAD"]),
            "uncommitted_in_measured_crates": git(&["status", "--porcelain", "--", "vmm", "guest-image", "rig", "bench"]),
        },
        "host": {
            "kernel": crate::driver::uname_release(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "dev_kvm": dev_kvm_kind(),
            "loadavg_at_start": loadavg_start,
            "kvm_backend": backend.to_string(),
        },
        "rig": {
            "run": run.desc,
            "facts_inside": rig_facts,
            "exit_code": run.outcome.exit_code,
            "timed_out": run.outcome.timed_out,
            "wall_s": run.outcome.duration.as_secs_f64().round(),
        },
        "guest": {
            "image": prep.image,
            "vmm_default_cmdline": prep.default_cmdline,
            "cmdline_source": cmdline::CMDLINE_SOURCE,
            "extra_cmdline": {"default": POWEROFF_RUN, "quiet": format!("quiet {POWEROFF_RUN}"), "memory": format!("quiet {IDLE_WORKLOAD}")},
        },
        "qemu": {
            "binary": args.qemu.display().to_string(),
            "version_host": prep.qemu.version,
            "version_in_rig": rig_facts.and_then(|f| f.qemu_version.clone()),
            "machines_probed": args.qemu_machines,
            "machine_choice": got.choice,
            "firmware": prep.qemu.firmware.iter().map(|(n, p)| json!({"name": n, "from": p.display().to_string()})).collect::<Vec<_>>(),
            "libraries": prep.qemu.libs.iter().map(|l| l.path.display().to_string()).collect::<Vec<_>>(),
            "loader": prep.qemu.loader.display().to_string(),
            "warnings": warnings,
        },
        "plan": plan,
        "goals": {
            "ready_ratio_max": report::GOAL_READY_RATIO,
            "setup_pct_of_ready_max": report::GOAL_SETUP_PCT,
            "host_setup_ms_max": report::GOAL_HOST_SETUP_MS,
            "overhead_mib_max": report::GOAL_OVERHEAD_MIB,
        },
        "headline_group": headline_group,
        "boot": groups,
        "host_setup": host,
        "memory": {
            "guest_mem_mib": 128,
            "vcpus": 1,
            "ours": memory[0].1,
            "qemu": memory[1].1,
            "ours_goal_met": memory[0].1.overhead_mib.map(|o| o.median <= report::GOAL_OVERHEAD_MIB),
        },
        "binary": prep.binary,
        "problems": problems,
        "records": {"boots": got.boots, "memory": got.memory},
    });
    if let Some(dir) = out_json.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out_json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", out_json.display()))?;
    std::fs::write(&out_md, &md).with_context(|| format!("writing {}", out_md.display()))?;
    println!("{md}");
    say(&format!(
        "wrote {} and {} in {:.0} s",
        out_json.display(),
        out_md.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(if got.done.is_some() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_quiet_detection() {
        let dir = tempfile::tempdir().unwrap();
        assert!(readme_cmdline(dir.path()).contains("no README.md"));
        let readme = dir.path().join("README.md");
        std::fs::write(&readme, "vmm run --cmdline 'quiet vmm_run=\"x\"'\n").unwrap();
        assert!(readme_cmdline(dir.path()).contains("appends `quiet`"));
        std::fs::write(&readme, "vmm run --cmdline 'vmm_run=\"x\"'\n").unwrap();
        assert!(readme_cmdline(dir.path()).contains("does not append"));
        std::fs::write(&readme, "no example\n").unwrap();
        assert!(readme_cmdline(dir.path()).contains("no `--cmdline` example"));
    }

    #[test]
    fn plan_gives_both_vmms_the_same_guest() {
        let args = BootArgs::try_parse_from_boot(&["--groups", "2:quiet,1:default"]);
        let plan = make_plan(
            &args,
            &Layout {
                root: "/payload".into(),
            },
            "console=ttyS0 x",
        );
        assert_eq!(plan.groups.len(), 2);
        assert_eq!(plan.probe_group, 0);
        let [ours, qemu] = &plan.groups[0][..] else {
            panic!("{:?}", plan.groups[0])
        };
        assert_eq!((ours.kind, qemu.kind), (Kind::Ours, Kind::Qemu));
        let after = |argv: &[String], flag: &str| {
            argv[argv.iter().position(|a| a == flag).unwrap() + 1].clone()
        };
        assert_eq!(
            after(&ours.argv, "--cmdline"),
            "quiet vmm_run=\"poweroff -f\""
        );
        assert_eq!(
            after(&qemu.argv, "-append"),
            "console=ttyS0 x quiet vmm_run=\"poweroff -f\""
        );
        assert_eq!(after(&qemu.argv, "-M"), protocol::MACHINE_PLACEHOLDER);
        assert_eq!(after(&ours.argv, "--mem-mib"), after(&qemu.argv, "-m"));
        assert_eq!(after(&ours.argv, "--vcpus"), after(&qemu.argv, "-smp"));
        assert_eq!(after(&ours.argv, "--initrd"), after(&qemu.argv, "-initrd"));
        assert_eq!(qemu.argv[0], "/payload/lib/ld-linux-x86-64.so.2");
        assert_eq!(after(&plan.groups[1][0].argv, "--cmdline"), POWEROFF_RUN);
        assert_eq!(
            plan.memory.iter().map(|m| m.runs).collect::<Vec<_>>(),
            [3, 1]
        );
    }

    impl BootArgs {
        fn try_parse_from_boot(extra: &[&str]) -> BootArgs {
            #[derive(clap::Parser)]
            struct W {
                #[command(flatten)]
                a: BootArgs,
            }
            let argv = std::iter::once("bench").chain(extra.iter().copied());
            <W as clap::Parser>::parse_from(argv).a
        }
    }
}
