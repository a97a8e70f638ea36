//! `vmm pause|resume|status|stop` (owned by the API helper; placeholder until it lands).
use super::CliResult;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct SocketArgs {
    /// The microVM's API socket.
    #[arg(long)]
    pub api_sock: PathBuf,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn pause(_a: SocketArgs) -> CliResult { anyhow::bail!("todo") }
pub fn resume(_a: SocketArgs) -> CliResult { anyhow::bail!("todo") }
pub fn status(_a: StatusArgs) -> CliResult { anyhow::bail!("todo") }
pub fn stop(_a: SocketArgs) -> CliResult { anyhow::bail!("todo") }
