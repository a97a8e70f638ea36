//! `vmm image ...` (owned by the image helper; placeholder until it lands).
use super::CliResult;

#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Build the guest image.
    Build,
}

pub fn run(_cmd: ImageCommand) -> CliResult {
    anyhow::bail!("image build is not wired yet")
}
