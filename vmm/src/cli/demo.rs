//! `vmm demo` (placeholder until the harness helper lands).
use super::CliResult;

#[derive(clap::Args)]
pub struct DemoArgs {}

pub fn run(_a: DemoArgs) -> CliResult { anyhow::bail!("todo") }
