//! `bench`: the project's benchmarks.
//!
//! `bench boot` (host side, `cargo run --release -p bench -- boot`) measures, and writes to
//! `bench-results/boot.json` and `boot.md`:
//! 1. boot time of our static `vmm run` against QEMU's microvm machine under the same real KVM
//!    (inside the nested rig on a PVM host), alternating boots in one rig run;
//! 2. VMM set-up (process start → first `KVM_RUN`) on this host's own /dev/kvm;
//! 3. the VMM's memory overhead (Rss minus the guest RAM mapping's Rss) inside the rig;
//! 4. the static `vmm` binary's size.
//!
//! `bench trim` measures the guest-trimmer (idle cost, trim time and memory freed per step) in
//! the rig and writes `bench-results/trim.{json,md}`.
//!
//! `bench chart bench-results/X.json [--out X.svg]` draws a results file's figures as bar charts.
//! `bench suite` runs the benchmark suite against QEMU on the standard scenario in the rig and
//! writes `bench-results/suite.{json,md}` (see `suite.rs`).
//!
//! `bench rig-boot --plan FILE` is the in-rig driver the host side starts (statically linked).

mod block;
mod chart;
mod checksums;
mod clock;
mod cmdline;
mod console;
mod crash;
mod driver;
mod host;
mod host_io;
mod host_restore;
mod layers;
mod protocol;
mod qemu;
mod report;
mod rig_script;
mod smaps;
mod snapshot;
mod soak;
mod stats;
mod suite;
mod trim;
mod vsock;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bench", about = "Benchmarks of the VMM")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot time vs QEMU (in the rig), host set-up time, memory overhead, binary size.
    Boot(host::BootArgs),
    /// virtio-blk sequential and random read speed in the guest vs QEMU (in the rig).
    Block(block::BlockArgs),
    /// The in-rig driver: run a plan's boots and print one result line per boot.
    RigBoot(driver::RigBootArgs),
    /// Snapshot size and time, restore time by phase: compact vs raw full dump (in the rig).
    Snapshot(snapshot::SnapshotArgs),
    /// Write bench-results/snapshot.* from a saved log of `bench/rig/snapshot.sh`.
    SnapshotFromLog {
        /// The log holding `SNAPSHOT-BENCH` lines.
        log: std::path::PathBuf,
    },
    /// virtio-vsock throughput each way and round-trip latency (in the rig).
    Vsock(vsock::VsockArgs),
    /// The in-rig vsock driver.
    RigVsock(vsock::RigVsockArgs),
    /// Trimmer: idle cost, trim time and memory freed per step (in the rig).
    Trim(trim::TrimArgs),
    /// Crash safety: SIGKILL while writing a snapshot, ENOSPC, write-back errors (in the rig).
    Crash(crash::CrashArgs),
    /// `crash` and `soak` in one rig boot (one wait for the shared rig).
    Hardening(crash::HardeningArgs),
    /// Soak: restore/work/snapshot-or-kill cycles and many clones at once (in the rig).
    Soak(soak::SoakArgs),
    /// Layered snapshots: storage and write time against full snapshots, chain restore (in the rig).
    Layers(layers::LayersArgs),
    /// The snapshot writer and the restore's memory mapping on this host's CPU and disk (no VM).
    HostIo(host_io::HostIoArgs),
    /// Restore → first KVM_RUN, phase by phase, on this host's own /dev/kvm (real time).
    HostRestore(host_restore::HostRestoreArgs),
    /// Memory chunk checksums on this host's CPU and (with `--rig`) the rig's emulated one.
    Checksums(checksums::ChecksumsArgs),
    /// Draw a results file's figures as bar charts (SVG).
    Chart(chart::ChartArgs),
    /// The suite: ours (raw, compact, trimmed) and QEMU (plain, mapped-ram) on S512 (in the rig).
    Suite(suite::SuiteArgs),
    /// The in-rig QMP helper of `bench suite` (save / load / cont / quit).
    RigQmp(suite::RigQmpArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Boot(args) => host::run(args),
        Cmd::Block(args) => block::run(args),
        Cmd::RigBoot(args) => driver::run(args).map(|()| 0),
        Cmd::Snapshot(args) => snapshot::run(args),
        Cmd::SnapshotFromLog { log } => snapshot::from_log(&log),
        Cmd::Vsock(args) => vsock::run(args),
        Cmd::RigVsock(args) => vsock::rig_run(args).map(|()| 0),
        Cmd::Trim(args) => trim::run(args),
        Cmd::Crash(args) => crash::run(args),
        Cmd::Hardening(args) => crash::run_hardening(args),
        Cmd::Soak(args) => soak::run(args),
        Cmd::Layers(args) => layers::run(args),
        Cmd::HostIo(args) => host_io::run(args),
        Cmd::HostRestore(args) => host_restore::run(args),
        Cmd::Checksums(args) => checksums::run(args),
        Cmd::Chart(args) => chart::run(args),
        Cmd::Suite(args) => suite::run(args),
        Cmd::RigQmp(args) => suite::rig_qmp(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            std::process::exit(1);
        }
    }
}
