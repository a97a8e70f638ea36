//! Diff layers on the command line: the chain `vmm inspect` shows, and `vmm flatten`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::CliResult;
use crate::snapshot::chain::Chain;
use crate::snapshot::flatten::flatten;
use crate::snapshot::format::{id_hex, MEMORY_FILE, PAGE_BYTES, STATE_FILE};
use crate::snapshot::layer::state_hash;

/// Bytes the snapshot directory's files occupy on disk (`st_blocks`).
pub fn dir_disk_bytes(dir: &Path) -> u64 {
    [STATE_FILE, MEMORY_FILE]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map_or(0, |m| m.blocks() * 512))
        .sum()
}

/// The chain ending at `dir`, base first: each layer's directory, ID, hash, bytes on disk,
/// pages kept and freed; and the bytes of the layers below the top (shared with every other
/// layer on the same parents).
pub fn chain_report(dir: &Path) -> Result<Value, crate::snapshot::SnapshotError> {
    let chain = Chain::load(dir)?;
    let mut layers = Vec::new();
    for link in &chain.links {
        let state = &link.loaded.state;
        let freed_pages = state
            .layer
            .as_ref()
            .map_or(0, |l| l.freed.iter().map(|r| r.1).sum::<u64>() / PAGE_BYTES);
        layers.push(json!({
            "path": link.dir,
            "snapshot_id": id_hex(&state.snapshot_id),
            "hash": state_hash(&link.dir)?,
            "parent_hash": state.layer.as_ref().map(|l| l.parent.hash.clone()),
            "disk_bytes": dir_disk_bytes(&link.dir),
            "pages_kept": state.memory.pages.kept,
            "pages_freed": freed_pages,
            "pages_inherited": state.layer.as_ref().map_or(0, |l| l.inherited_pages),
        }));
    }
    let shared: u64 = chain.links[..chain.links.len() - 1]
        .iter()
        .map(|l| dir_disk_bytes(&l.dir))
        .sum();
    Ok(json!({
        "depth": chain.links.len(),
        "layers": layers,
        "shared_bytes": shared,
        "top_bytes": dir_disk_bytes(dir),
    }))
}

/// Prints the chain for `vmm inspect` (text form).
pub fn print_chain(report: &Value) {
    let Some(layers) = report["layers"].as_array() else {
        return;
    };
    println!("  chain ({} layers, base first):", layers.len());
    for l in layers {
        println!(
            "    {} id {} hash {:.16} {} bytes on disk, {} pages kept, {} freed",
            l["path"].as_str().unwrap_or("?"),
            l["snapshot_id"].as_str().unwrap_or("?"),
            l["hash"].as_str().unwrap_or("?"),
            l["disk_bytes"],
            l["pages_kept"],
            l["pages_freed"],
        );
    }
    println!(
        "  bytes shared with the parents: {}",
        report["shared_bytes"]
    );
}

/// Arguments of `vmm flatten`.
#[derive(clap::Args, Debug)]
pub struct FlattenArgs {
    /// The top layer of the chain.
    #[arg(long)]
    pub snapshot: PathBuf,
    /// The full snapshot to write (replaced atomically if it holds a snapshot).
    #[arg(long)]
    pub out: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Merges a chain into one ordinary snapshot.
pub fn run_flatten(args: FlattenArgs) -> CliResult {
    let summary = flatten(&args.snapshot, &args.out)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "flattened {} into {}: snapshot {}, memory file {} bytes ({} pages kept)",
            args.snapshot.display(),
            args.out.display(),
            summary.snapshot_id,
            summary.memory_file_bytes,
            summary.pages.kept
        );
    }
    Ok(0)
}
