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

/// Parses `args` (the program name first). `vmm restore ...` in the plain forms scripts use is
/// parsed by [`parse_restore_plainly`]; anything else, or anything it does not take, goes to
/// clap, so help and error messages are always the full command line's.
fn parse_command_line(args: Vec<OsString>) -> Cli {
    if let Some(cli) = parse_restore_plainly(&args) {
        return cli;
    }
    Cli::parse_from(args)
}

/// The long options of `vmm restore` that take a value ([`parse_restore_plainly`] knows them).
const RESTORE_VALUE_OPTIONS: [&str; 9] = [
    "log",
    "snapshot",
    "api-sock",
    "lazy",
    "serial",
    "working-set",
    "record-working-set-ms",
    "metrics-file",
    "trimmer-port",
];
/// The flags of `vmm restore` ([`parse_restore_plainly`] knows them).
const RESTORE_FLAGS: [&str; 6] = [
    "track-dirty-pages",
    "skip-memory-verify",
    "reverify",
    "prefault",
    "no-after-restore",
    "no-seccomp",
];

/// `vmm restore` parsed without clap: `--name value`, `--name=value` and `--flag`, each at most
/// once, every value valid UTF-8; `None` for anything else (help, a mistake, a conflict, an
/// option it does not know), which clap then parses. A restore may spend 1 ms before its vCPUs
/// run: clap took 0.5 ms of a cold process on a host CPU for the whole tree of subcommands and
/// 0.2 ms for `restore` alone (220 and 63-91 ms in the nested rig, where every piece of code a
/// process runs for the first time is translated first). The test below keeps the two parsers
/// in agreement.
fn parse_restore_plainly(args: &[OsString]) -> Option<Cli> {
    use std::collections::BTreeMap;
    let mut words = args.get(1..)?.iter().map(|a| a.to_str());
    if words.next()? != Some("restore") {
        return None;
    }
    let mut values: BTreeMap<&str, &str> = BTreeMap::new();
    let mut flags: Vec<&str> = Vec::new();
    while let Some(word) = words.next() {
        let option = word?.strip_prefix("--")?;
        let (name, inline) = match option.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (option, None),
        };
        if RESTORE_FLAGS.contains(&name) && inline.is_none() && !flags.contains(&name) {
            flags.push(name);
        } else if RESTORE_VALUE_OPTIONS.contains(&name) {
            let value = match inline {
                Some(value) => value,
                None => words.next()??,
            };
            if value.is_empty() || value.starts_with('-') || values.insert(name, value).is_some() {
                return None;
            }
        } else {
            return None;
        }
    }
    let flag = |name| flags.contains(&name);
    if (flag("reverify") && flag("skip-memory-verify"))
        || (flag("prefault") && values.contains_key("record-working-set-ms"))
    {
        return None;
    }
    let log = match values.get("log") {
        Some(log) => log.to_string(),
        None => match std::env::var("VMM_LOG") {
            Ok(log) if !log.is_empty() => log,
            Err(std::env::VarError::NotPresent) => "info".to_string(),
            _ => return None,
        },
    };
    fn value_enum<T: clap::ValueEnum>(value: Option<&&str>, default: T) -> Option<T> {
        match value {
            Some(value) => T::from_str(value, false).ok(),
            None => Some(default),
        }
    }
    let args = cli::restore::RestoreArgs {
        snapshot: values.get("snapshot")?.into(),
        api_sock: values.get("api-sock").map(Into::into),
        lazy: value_enum(values.get("lazy"), cli::restore::DEFAULT_LAZY)?,
        track_dirty_pages: flag("track-dirty-pages"),
        vm: cli::restore::RestoredVmArgs {
            serial: values
                .get("serial")
                .unwrap_or(&cli::restore::DEFAULT_SERIAL)
                .to_string(),
            skip_memory_verify: flag("skip-memory-verify"),
            reverify: flag("reverify"),
            prefault: flag("prefault"),
            working_set: value_enum(values.get("working-set"), cli::restore::DEFAULT_WORKING_SET)?,
            record_working_set_ms: match values.get("record-working-set-ms") {
                Some(ms) => Some(ms.parse().ok()?),
                None => None,
            },
            metrics_file: values.get("metrics-file").map(Into::into),
            no_after_restore: flag("no-after-restore"),
            trimmer_port: match values.get("trimmer-port") {
                Some(port) => port.parse().ok()?,
                None => vmm::pipeline::DEFAULT_TRIMMER_PORT,
            },
            no_seccomp: flag("no-seccomp"),
        },
    };
    Some(Cli {
        global: GlobalArgs { log },
        command: Command::Restore(args),
    })
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
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_plain_restore_parser_knows_every_restore_option() {
        let command = Cli::command();
        let restore = command.find_subcommand("restore").unwrap();
        for arg in restore.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            let known = if arg.get_action().takes_values() {
                RESTORE_VALUE_OPTIONS.contains(&long)
            } else {
                RESTORE_FLAGS.contains(&long)
            };
            assert!(known, "--{long} is missing from parse_restore_plainly");
        }
    }

    #[test]
    fn the_plain_restore_parser_parses_what_clap_does() {
        // VMM_LOG is not set in the test environment (the default filter is checked below).
        for line in [
            "vmm restore --snapshot /s",
            "vmm restore --snapshot=/s --log debug --api-sock /a.sock --lazy uffd",
            "vmm restore --serial /tmp/c.log --skip-memory-verify --snapshot /s --track-dirty-pages",
            "vmm restore --snapshot /s --working-set background --prefault --no-after-restore",
            "vmm restore --snapshot /s --working-set=off --record-working-set-ms 1500 --reverify",
            "vmm restore --snapshot /s --metrics-file /m.json --trimmer-port 99 --no-seccomp",
            "vmm restore --lazy off --snapshot /s --log=vmm=debug,info",
        ] {
            let plain = parse_restore_plainly(&args(line))
                .unwrap_or_else(|| panic!("{line}: not taken by the plain parser"));
            let clap = restore_of(&Cli::try_parse_from(args(line)).unwrap());
            assert!(clap.is_some(), "{line}");
            assert_eq!(restore_of(&plain), clap, "{line}");
            assert_eq!(restore_of(&parse_command_line(args(line))), clap, "{line}");
        }
        let plain = parse_restore_plainly(&args("vmm restore --snapshot /s")).unwrap();
        assert_eq!(plain.global.log, "info");
    }

    #[test]
    fn anything_else_goes_to_clap() {
        // Not taken by the plain parser, but valid: clap parses them.
        for line in [
            "vmm --log debug restore --snapshot /s",
            "vmm restore --snapshot /s --serial -",
        ] {
            assert!(parse_restore_plainly(&args(line)).is_none(), "{line}");
            let parsed = restore_of(&parse_command_line(args(line)));
            assert!(parsed.is_some(), "{line}");
        }
        assert!(matches!(
            parse_command_line(args("vmm inspect /s")).command,
            Command::Inspect(_)
        ));
        // Mistakes, conflicts and help: the plain parser declines and clap refuses them with
        // its own messages.
        for line in [
            "vmm restore",
            "vmm restore --snapshot /s --bogus",
            "vmm restore --snapshot /s --snapshot /t",
            "vmm restore --snapshot /s --lazy sometimes",
            "vmm restore --snapshot /s --trimmer-port many",
            "vmm restore --snapshot /s --reverify --skip-memory-verify",
            "vmm restore --snapshot /s --prefault --record-working-set-ms 10",
            "vmm restore --snapshot /s --prefault=yes",
            "vmm restore --snapshot= ",
            "vmm restore --snapshot /s stray",
            "vmm restore --help",
        ] {
            assert!(parse_restore_plainly(&args(line)).is_none(), "{line}");
            assert!(Cli::try_parse_from(args(line)).is_err(), "{line}");
        }
    }
}
