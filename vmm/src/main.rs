//! The `vmm` command line: boots, controls and (later) snapshots microVMs.

use std::ffi::OsString;

use clap::{Parser, Subcommand};
use vmm::cli;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A snapshotting KVM virtual machine monitor for microVMs"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes.
#[derive(clap::Args, Debug)]
struct GlobalArgs {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `vmm=debug`.
    #[arg(long, global = true, default_value = "info", env = "VMM_LOG")]
    log: String,
}

/// The command line of `vmm restore` alone. Parsing the whole tree of subcommands took 0.5 ms
/// of a cold process on a host CPU (0.1 ms warm), half of the 1 ms a restore may spend before
/// its vCPUs run, and 100 ms in the nested rig; parsing only `restore` takes a fifth of that.
#[derive(Parser, Debug)]
#[command(name = "vmm", version)]
struct RestoreCli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: RestoreOnly,
}

/// The one subcommand of [`RestoreCli`].
#[derive(Subcommand, Debug)]
enum RestoreOnly {
    Restore(cli::restore::RestoreArgs),
}

impl From<RestoreCli> for Cli {
    fn from(fast: RestoreCli) -> Self {
        let RestoreOnly::Restore(args) = fast.command;
        Cli {
            global: fast.global,
            command: Command::Restore(args),
        }
    }
}

/// Parses `args` (the program name first). `vmm restore ...` is parsed by [`RestoreCli`]; when
/// that fails (`--help`, a mistake, a global option before the subcommand) the full parser runs
/// again, so help and error messages are always the full command line's.
fn parse_command_line(args: Vec<OsString>) -> Cli {
    if args.get(1).is_some_and(|a| a == "restore") {
        if let Ok(fast) = RestoreCli::try_parse_from(&args) {
            return fast.into();
        }
    }
    Cli::parse_from(args)
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
    let cli = parse_command_line(std::env::args_os().collect());
    cli::init_logging(&cli.global.log);
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn args(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    /// The log filter and restore arguments `cli` holds (None for another subcommand).
    fn restore_of(cli: &Cli) -> Option<String> {
        match &cli.command {
            Command::Restore(args) => Some(format!("{:?} {args:?}", cli.global)),
            _ => None,
        }
    }

    #[test]
    fn both_command_lines_are_well_formed() {
        Cli::command().debug_assert();
        RestoreCli::command().debug_assert();
    }

    #[test]
    fn the_restore_fast_path_parses_what_the_full_parser_does() {
        for line in [
            "vmm restore --snapshot /s",
            "vmm restore --snapshot /s --log debug --api-sock /a.sock --lazy uffd",
            "vmm restore --serial /tmp/c.log --skip-memory-verify --snapshot /s --track-dirty-pages",
            "vmm restore --snapshot /s --working-set background --prefault --no-after-restore",
        ] {
            let fast = RestoreCli::try_parse_from(args(line))
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            let full = restore_of(&Cli::try_parse_from(args(line)).unwrap());
            assert!(full.is_some(), "{line}");
            assert_eq!(restore_of(&fast.into()), full, "{line}");
            assert_eq!(restore_of(&parse_command_line(args(line))), full, "{line}");
        }
    }

    #[test]
    fn anything_else_goes_to_the_full_parser() {
        // A global option before the subcommand.
        let line = "vmm --log debug restore --snapshot /s";
        let parsed = restore_of(&parse_command_line(args(line)));
        assert!(parsed.as_deref().unwrap().contains("debug"), "{parsed:?}");
        assert!(matches!(
            parse_command_line(args("vmm inspect /s")).command,
            Command::Inspect(_)
        ));
        // The fast parser refuses what the full one refuses too, so the full one answers it
        // (with its own help and messages).
        for line in [
            "vmm restore",
            "vmm restore --snapshot /s --bogus",
            "vmm restore --help",
        ] {
            assert!(RestoreCli::try_parse_from(args(line)).is_err(), "{line}");
            assert!(Cli::try_parse_from(args(line)).is_err(), "{line}");
        }
    }
}
