//! The `vmm` command line: boots, controls and (later) snapshots microVMs.

use clap::{Parser, Subcommand};
use vmm::cli;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A snapshotting KVM virtual machine monitor for microVMs"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `vmm=debug`.
    #[arg(long, global = true, default_value = "info", env = "VMM_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM and run it until the guest powers off or the VMM is stopped.
    Run(cli::run::RunArgs),
    /// Build or locate the guest image (kernel + initramfs).
    #[command(subcommand)]
    Image(cli::image::ImageCommand),
    /// Pause a running microVM through its API socket.
    Pause(cli::control::SocketArgs),
    /// Resume a paused microVM through its API socket.
    Resume(cli::control::SocketArgs),
    /// Print a microVM's state, configuration and uptime.
    Status(cli::control::StatusArgs),
    /// Shut a microVM down through its API socket.
    Stop(cli::control::SocketArgs),
    /// Control a running microVM's balloon through its API socket.
    #[command(subcommand)]
    Balloon(cli::balloon::BalloonCommand),
    /// Talk to a guest's vsock listeners through the VM's vsock unix socket.
    #[command(subcommand)]
    Vsock(cli::vsock::VsockCommand),
    /// The main job end to end: build the image, boot it, report, power off.
    Demo(cli::demo::DemoArgs),
    /// Snapshot a running microVM into a directory through its API socket.
    Snapshot(cli::snapshot::SnapshotArgs),
    /// Recreate a microVM from a snapshot directory and run it.
    Restore(cli::restore::RestoreArgs),
    /// Serve the control API with no microVM until PUT /snapshot/load restores one.
    Serve(cli::serve::ServeArgs),
    /// Describe and verify a snapshot directory.
    Inspect(cli::inspect::InspectArgs),
    /// Talk to a running guest's guest-trimmer over vsock: trim by a policy, status, stats.
    #[command(subcommand)]
    Trimmer(cli::trimmer::TrimmerCommand),
    /// Merge a chain of diff layers into one ordinary snapshot.
    Flatten(cli::layers::FlattenArgs),
}

fn main() {
    vmm::metrics::mark_process_start();
    let cli = Cli::parse();
    cli::init_logging(&cli.log);
    let result = match cli.command {
        Command::Run(args) => cli::run::run(args),
        Command::Image(cmd) => cli::image::run(cmd),
        Command::Pause(args) => cli::control::pause(args),
        Command::Resume(args) => cli::control::resume(args),
        Command::Status(args) => cli::control::status(args),
        Command::Stop(args) => cli::control::stop(args),
        Command::Balloon(cmd) => cli::balloon::run(cmd),
        Command::Vsock(cmd) => cli::vsock::run(cmd),
        Command::Demo(args) => cli::demo::run(args),
        Command::Snapshot(args) => cli::snapshot::run(args),
        Command::Restore(args) => cli::restore::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Inspect(args) => cli::inspect::run(args),
        Command::Trimmer(cmd) => cli::trimmer::run(cmd),
        Command::Flatten(args) => cli::layers::run_flatten(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("vmm: error: {err:#}");
            std::process::exit(1);
        }
    }
}
