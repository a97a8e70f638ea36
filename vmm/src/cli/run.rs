//! `vmm run`: boot a microVM.
use super::CliResult;

#[derive(clap::Args)]
pub struct RunArgs {}

pub fn run(_a: RunArgs) -> CliResult { anyhow::bail!("todo") }
