//! One module per `vmm` subcommand. Each exposes its clap arguments and a `run`-style
//! function returning the process exit code.

pub mod balloon;
pub mod control;
pub mod demo;
pub mod drive;
pub mod image;
pub mod inspect;
pub mod layers;
pub mod restore;
pub mod run;
pub mod serve;
pub mod snapshot;
pub mod trimmer;
pub mod vsock;

/// Result of a subcommand: the process exit code, or an error printed with its causes.
pub type CliResult = anyhow::Result<i32>;

/// Sets up `tracing` output on stderr with the given filter.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
