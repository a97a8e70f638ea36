//! `bench block`: virtio-blk read performance in the guest, ours against QEMU's virtio-blk.
//!
//! Both VMMs boot the same kernel and initramfs with the same memory and vCPUs and the data
//! disk (`vmm image build`'s data.ext4, read-only, buffered on the rig side) as /dev/vda; the
//! guest runs `guest-trimmer disk-bench` (O_DIRECT: every read reaches the device): sequential
//! 1 MiB reads of 256 MiB, then 4 KiB random reads for 5 s. Rounds alternate which VMM goes
//! first; all boots share one rig run, so only the ratios mean anything (the rig is TCG).
//! Results: `bench-results/block.json` and `block.md`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use rig::{KvmBackend, Payload, RigOptions};
use serde::Serialize;
use serde_json::json;

use crate::host::{build, output_of, say, workspace_root};
use crate::stats::Summary;

/// The guest tool's result marker.
const RESULT_MARKER: &str = "DISK-BENCH ";
/// The rig script's per-run markers.
const BEGIN_MARKER: &str = "BLOCK-BENCH-BEGIN ";
const END_MARKER: &str = "BLOCK-BENCH-END ";
/// Guest shape (the standard scenario's).
const MEM_MIB: u32 = 512;
const VCPUS: u32 = 2;

/// Arguments of `bench block`.
#[derive(clap::Args, Debug)]
pub struct BlockArgs {
    /// Measured runs of each VMM (alternating which goes first).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// The QEMU to compare against (copied into the rig with its libraries and firmware).
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// QEMU machine.
    #[arg(long, default_value = "microvm,acpi=on")]
    pub qemu_machine: String,
    /// Seconds one VM run may take in the rig.
    #[arg(long, default_value_t = 240)]
    pub run_timeout: u64,
    /// Rig memory, MiB.
    #[arg(long, default_value_t = 3072)]
    pub rig_mem: u32,
    /// Seconds the whole rig run may take.
    #[arg(long, default_value_t = 1800)]
    pub rig_timeout: u64,
    /// The JSON result file; the Markdown goes next to it with the extension `.md`.
    #[arg(long, default_value = "bench-results/block.json")]
    pub out: PathBuf,
}

/// One guest's disk-bench result.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Sample {
    seq_read_mib_s: f64,
    rand_read_iops: f64,
    seq_bytes: u64,
    rand_ops: u64,
}

/// Results of one VMM.
#[derive(Debug, Default, Serialize)]
struct VmmResults {
    samples: Vec<Sample>,
    failed_runs: Vec<String>,
    seq_read_mib_s: Option<Summary>,
    rand_read_iops: Option<Summary>,
}

impl VmmResults {
    fn summarise(&mut self) {
        let seq: Vec<f64> = self.samples.iter().map(|s| s.seq_read_mib_s).collect();
        let rand: Vec<f64> = self.samples.iter().map(|s| s.rand_read_iops).collect();
        self.seq_read_mib_s = Summary::of(&seq);
        self.rand_read_iops = Summary::of(&rand);
    }
}

/// Shell-quotes `s` for the rig's busybox sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The rig script: `rounds` runs of each VMM, alternating the order.
fn script(args: &BlockArgs, default_cmdline: &str) -> String {
    let guest = "quiet vmm_run=\"guest-trimmer disk-bench --device /dev/vda\"";
    let ours = [
        "./vmm",
        "run",
        "--kernel",
        "./vmlinuz",
        "--initrd",
        "./initrd",
        "--mem-mib",
        &MEM_MIB.to_string(),
        "--vcpus",
        &VCPUS.to_string(),
        "--cmdline",
        guest,
        "--disk",
        "./data.ext4,ro,id=data",
    ]
    .iter()
    .map(|a| quote(a))
    .collect::<Vec<_>>()
    .join(" ");
    let append = format!("{default_cmdline} {guest}");
    let qemu = [
        "./lib/ld-linux-x86-64.so.2",
        "--library-path",
        "./lib",
        "./qemu-system-x86_64",
        "-L",
        "./fw",
        "-enable-kvm",
        "-M",
        &args.qemu_machine,
        "-cpu",
        "host",
        "-m",
        &MEM_MIB.to_string(),
        "-smp",
        &VCPUS.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        "./vmlinuz",
        "-initrd",
        "./initrd",
        "-append",
        &append,
        "-drive",
        "id=data,file=./data.ext4,format=raw,if=none,readonly=on",
        "-device",
        "virtio-blk-device,drive=data",
    ]
    .iter()
    .map(|a| quote(a))
    .collect::<Vec<_>>()
    .join(" ");
    let mut s = String::from("#!/bin/sh\n");
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [("ours", &ours), ("qemu", &qemu)]
        } else {
            [("qemu", &qemu), ("ours", &ours)]
        };
        for (kind, cmd) in order {
            s.push_str(&format!(
                "echo {BEGIN_MARKER}{kind} {round}\ntimeout {} {cmd} </dev/null\necho {END_MARKER}{kind} {round} $?\n",
                args.run_timeout
            ));
        }
    }
    s
}

/// Collects results from the rig's output lines.
#[derive(Default)]
struct Collector {
    current: Option<String>,
    got_result: bool,
    ours: VmmResults,
    qemu: VmmResults,
}

impl Collector {
    fn results(&mut self, kind: &str) -> Option<&mut VmmResults> {
        match kind {
            "ours" => Some(&mut self.ours),
            "qemu" => Some(&mut self.qemu),
            _ => None,
        }
    }

    fn line(&mut self, line: &str) {
        if let Some(rest) = line
            .find(BEGIN_MARKER)
            .map(|i| &line[i + BEGIN_MARKER.len()..])
        {
            self.current = rest.split_whitespace().next().map(String::from);
            self.got_result = false;
        } else if let Some(at) = line.find(RESULT_MARKER) {
            let parsed = serde_json::from_str::<Sample>(line[at + RESULT_MARKER.len()..].trim());
            let kind = self.current.clone().unwrap_or_default();
            let ok = parsed.is_ok();
            if let Some(r) = self.results(&kind) {
                match parsed {
                    Ok(sample) => r.samples.push(sample),
                    Err(e) => r
                        .failed_runs
                        .push(format!("unparsable result {line:?}: {e}")),
                }
            }
            self.got_result |= ok;
        } else if let Some(rest) = line.find(END_MARKER).map(|i| &line[i + END_MARKER.len()..]) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let got = self.got_result;
            if let (Some(kind), Some(status)) = (words.first(), words.get(2)) {
                if !got {
                    let kind = kind.to_string();
                    let msg = format!(
                        "round {}: no result (exit status {status})",
                        words.get(1).unwrap_or(&"?")
                    );
                    if let Some(r) = self.results(&kind) {
                        r.failed_runs.push(msg);
                    }
                }
            }
            self.current = None;
        }
    }
}

fn ratio(ours: Option<Summary>, qemu: Option<Summary>) -> Option<f64> {
    Some(ours?.median / qemu?.median)
}

/// Runs the benchmark.
pub fn run(args: BlockArgs) -> anyhow::Result<i32> {
    let root = workspace_root();
    let (vmm, _bench) = build(&root)?;
    say("building the guest image and the data disk (vmm image build --json)");
    let text = output_of(&vmm, &["image", "build", "--json"], &root)?;
    let image: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("parsing `vmm image build --json` output {text:?}"))?;
    let path = |k: &str| {
        image
            .get(k)
            .and_then(|p| p.as_str())
            .map(PathBuf::from)
            .with_context(|| format!("`vmm image build --json` printed no {k:?}: {image}"))
    };
    let (kernel, initrd, data_disk) = (path("kernel")?, path("initrd")?, path("data_disk")?);
    let source = root.join(crate::cmdline::CMDLINE_SOURCE);
    let default_cmdline = crate::cmdline::extract_default_cmdline(
        &std::fs::read_to_string(&source)
            .with_context(|| format!("reading {}", source.display()))?,
    )?;
    let qemu = crate::qemu::bundle(&args.qemu)
        .with_context(|| format!("bundling {} for the rig", args.qemu.display()))?;

    let mut payload = Payload::new().context("creating the rig payload")?;
    let script_text = script(&args, &default_cmdline);
    payload
        .add_file(&vmm, "vmm", 0o755)
        .and_then(|x| x.add_file(&kernel, "vmlinuz", 0o644))
        .and_then(|x| x.add_file(&initrd, "initrd", 0o644))
        .and_then(|x| x.add_file(&data_disk, "data.ext4", 0o444))
        .and_then(|x| x.add_file(&qemu.binary, "qemu-system-x86_64", 0o755))
        .and_then(|x| x.add_file(&qemu.loader, "lib/ld-linux-x86-64.so.2", 0o755))
        .and_then(|x| x.add_bytes("block-bench.sh", script_text.as_bytes(), 0o755))
        .context("assembling the rig payload")?;
    for lib in &qemu.libs {
        payload
            .add_file(&lib.path, &format!("lib/{}", lib.name), 0o755)
            .context("assembling the rig payload (QEMU's libraries)")?;
    }
    for (name, path) in &qemu.firmware {
        payload
            .add_file(path, &format!("fw/{name}"), 0o644)
            .context("assembling the rig payload (QEMU's firmware)")?;
    }

    let mut got = Collector::default();
    let cmd = ["sh".to_string(), "./block-bench.sh".to_string()];
    let backend = rig::detect();
    say(&format!("KVM backend: {backend}; {} rounds", args.rounds));
    let outcome = match &backend {
        KvmBackend::NestedRig { script } => {
            let opts = RigOptions {
                mem_mib: args.rig_mem,
                smp: 1,
                timeout_s: args.rig_timeout,
            };
            rig::run_in_rig(script, payload.path(), &cmd, opts, |l| {
                eprintln!("rig: {l}");
                got.line(l)
            })?
        }
        KvmBackend::HostKvm => rig::run_local(
            Path::new("/bin/sh"),
            &cmd[1..],
            payload.path(),
            Duration::from_secs(args.rig_timeout),
            |l| got.line(l),
        )?,
        KvmBackend::Unavailable { reason } => bail!("no KVM that can boot a stock guest: {reason}"),
    };
    got.ours.summarise();
    got.qemu.summarise();
    let seq_ratio = ratio(got.ours.seq_read_mib_s, got.qemu.seq_read_mib_s);
    let iops_ratio = ratio(got.ours.rand_read_iops, got.qemu.rand_read_iops);
    let result = json!({
        "benchmark": "block",
        "what": "guest O_DIRECT reads of /dev/vda (data.ext4, read-only): sequential 1 MiB reads of 256 MiB, 4 KiB random reads for 5 s; ours vs QEMU virtio-blk in one rig run",
        "command": "cargo run --release -p bench -- block",
        "guest": {"mem_mib": MEM_MIB, "vcpus": VCPUS, "kernel": kernel, "data_disk_bytes": std::fs::metadata(&data_disk).map(|m| m.len()).ok()},
        "qemu": {"version": qemu.version, "machine": args.qemu_machine},
        "rounds": args.rounds,
        "ours": got.ours,
        "qemu_results": got.qemu,
        "ratio_ours_to_qemu": {"seq_read_mib_s": seq_ratio, "rand_read_iops": iops_ratio},
        "rig": {"exit_code": outcome.exit_code, "timed_out": outcome.timed_out, "duration_s": outcome.duration.as_secs_f64(), "backend": backend.to_string()},
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    let md_path = args.out.with_extension("md");
    let md = markdown(&got, seq_ratio, iops_ratio, &qemu.version, &args);
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    println!("{md}");
    say(&format!(
        "wrote {} and {}",
        args.out.display(),
        md_path.display()
    ));
    let complete = got.ours.samples.len() == args.rounds as usize
        && got.qemu.samples.len() == args.rounds as usize;
    Ok(if complete && outcome.exit_code == 0 {
        0
    } else {
        1
    })
}

fn markdown(
    got: &Collector,
    seq: Option<f64>,
    iops: Option<f64>,
    qemu: &str,
    args: &BlockArgs,
) -> String {
    let med = |s: Option<Summary>| {
        s.map_or("-".to_string(), |s| {
            format!("{:.1} ({:.1}-{:.1})", s.median, s.min, s.max)
        })
    };
    let r = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
    let mut md = format!(
        "# virtio-blk read performance (`cargo run --release -p bench -- block`)\n\n\
         Guest: {MEM_MIB} MiB, {VCPUS} vCPUs; O_DIRECT reads of /dev/vda (the data disk, read-only). \
         {} rounds per VMM in one rig run (TCG: compare ratios only). QEMU: {qemu}, `-M {}`, \
         `virtio-blk-device` (default cache=writeback, aio=threads).\n\n\
         | | ours | QEMU | ours / QEMU |\n|---|---|---|---|\n\
         | sequential read, MiB/s (median, min-max) | {} | {} | {} |\n\
         | 4 KiB random read, IOPS (median, min-max) | {} | {} | {} |\n",
        args.rounds,
        args.qemu_machine,
        med(got.ours.seq_read_mib_s),
        med(got.qemu.seq_read_mib_s),
        r(seq),
        med(got.ours.rand_read_iops),
        med(got.qemu.rand_read_iops),
        r(iops),
    );
    for (name, res) in [("ours", &got.ours), ("QEMU", &got.qemu)] {
        for f in &res.failed_runs {
            md.push_str(&format!("\n- {name}: {f}"));
        }
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_attributes_results_and_failures() {
        let mut c = Collector::default();
        for l in [
            "BLOCK-BENCH-BEGIN ours 0",
            "[    1.0] something",
            r#"DISK-BENCH {"device":"/dev/vda","size_bytes":1,"seq_bytes":268435456,"seq_ms":1000.0,"seq_read_mib_s":256.0,"rand_ops":5000,"rand_ms":5000.0,"rand_read_iops":1000.0}"#,
            "BLOCK-BENCH-END ours 0 0",
            "BLOCK-BENCH-BEGIN qemu 0",
            "BLOCK-BENCH-END qemu 0 124",
        ] {
            c.line(l);
        }
        assert_eq!(c.ours.samples.len(), 1);
        assert_eq!(c.ours.samples[0].rand_read_iops, 1000.0);
        assert!(c.ours.failed_runs.is_empty());
        assert_eq!(c.qemu.failed_runs, ["round 0: no result (exit status 124)"]);
    }

    #[test]
    fn script_alternates_and_quotes() {
        let args = BlockArgs {
            rounds: 2,
            qemu: "/q".into(),
            qemu_machine: "microvm".into(),
            run_timeout: 9,
            rig_mem: 1,
            rig_timeout: 1,
            out: "x".into(),
        };
        let s = script(&args, "console=ttyS0");
        let begins: Vec<&str> = s.lines().filter(|l| l.contains("BEGIN")).collect();
        assert_eq!(begins.len(), 4);
        assert!(begins[0].ends_with("ours 0") && begins[2].ends_with("qemu 1"));
        assert!(s.contains(
            "'console=ttyS0 quiet vmm_run=\"guest-trimmer disk-bench --device /dev/vda\"'"
        ));
        assert_eq!(quote("a'b"), r"'a'\''b'");
    }
}
