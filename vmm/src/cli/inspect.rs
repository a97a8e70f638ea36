//! `vmm inspect DIR [--json]`: what a snapshot holds (format version, VM configuration, memory
//! size, pages kept and skipped by reason, bytes on disk) and whether its checksums verify.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::CliResult;
use crate::snapshot::format::{id_hex, PAGE_BYTES};
use crate::snapshot::reader::load;

/// Arguments of `vmm inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Also draw guest memory by page class into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub map: Option<PathBuf>,
}

/// Bytes a file occupies on disk (`st_blocks`).
fn disk_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Loads, verifies and describes the snapshot. Exits 1 when it does not verify.
pub fn run(args: InspectArgs) -> CliResult {
    let loaded = load(&args.dir)?;
    let chunk_checksum = loaded
        .state
        .memory
        .chunks
        .first()
        .map(|c| c.sum.algorithm());
    let verified = loaded.verify_file();
    let state = &loaded.state;
    let pages = state.memory.pages;
    let machine = &state.config.machine_config;
    let disk = disk_bytes(&loaded.state_path) + disk_bytes(&loaded.memory_path);
    let holes = &loaded.memory_holes;
    let hole_bytes: u64 = holes.iter().map(|h| h.1).sum();
    let chain = super::layers::chain_report(&args.dir);
    let map = args
        .map
        .as_deref()
        .map(|out| crate::snapshot::map::write_map(&args.dir, state, out))
        .transpose()?;
    let report = json!({
        "map": map,
        "chain": match &chain {
            Ok(chain) => chain.clone(),
            Err(err) => json!({"ok": false, "error": crate::devices::virtio::error_chain(err)}),
        },
        "path": args.dir,
        "format_version": loaded.format_version,
        "snapshot_id": id_hex(&state.snapshot_id),
        "vmm_version": state.vmm_version,
        "created_unix_ms": state.created_unix_ms,
        "config": state.config,
        "vcpus": state.vcpus.len(),
        "mem_size_mib": machine.mem_size_mib,
        "devices": state.devices.len(),
        "memory": {
            "regions": state.memory.regions,
            "chunks": state.memory.chunks.len(),
            "pages": pages,
            "kept_bytes": pages.kept * PAGE_BYTES,
            "skipped_bytes": pages.skipped() * PAGE_BYTES,
            "classes_recorded": state.memory.classes.is_some(),
            "chunk_checksum": chunk_checksum,
        },
        "files": {
            "state_bytes": loaded.state_file_bytes,
            "memory_bytes": loaded.memory_file_bytes,
            "memory_holes": holes.len(),
            "memory_hole_bytes": hole_bytes,
            "disk_bytes": disk,
        },
        "checksums": match &verified {
            Ok(()) => json!({"ok": true}),
            Err(err) => json!({"ok": false, "error": crate::devices::virtio::error_chain(err)}),
        },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mib = |pages: u64| (pages * PAGE_BYTES) as f64 / (1 << 20) as f64;
        println!("snapshot {}", args.dir.display());
        println!(
            "  format version {}, id {}, written by vmm {}",
            loaded.format_version,
            id_hex(&state.snapshot_id),
            state.vmm_version
        );
        println!(
            "  VM: {} vCPUs, {} MiB, kernel {}",
            state.vcpus.len(),
            machine.mem_size_mib,
            state.config.boot_source.kernel_image_path.display()
        );
        println!("  pages kept: {} ({:.1} MiB)", pages.kept, mib(pages.kept));
        println!(
            "  holes between kept ranges: {} ({:.1} MiB, left-out pages stored as file holes)",
            holes.len(),
            mib(hole_bytes / PAGE_BYTES)
        );
        for (reason, count) in [
            ("balloon (inflated)", pages.skipped_inflated),
            ("reported free", pages.skipped_reported),
            ("hinted free", pages.skipped_hinted),
            ("never touched", pages.skipped_never_touched),
            ("zero", pages.skipped_zero),
        ] {
            println!("  skipped, {reason}: {count} ({:.1} MiB)", mib(count));
        }
        if state.memory.classes.is_none() {
            println!("  page classes: not recorded (written by an older VMM)");
        }
        if let (Some(out), Some(map)) = (&args.map, &map) {
            println!(
                "  map: {} ({} cells of {} pages)",
                out.display(),
                map.cells,
                map.pages_per_cell
            );
        }
        println!(
            "  files: state {} bytes, memory {} bytes, {} bytes on disk",
            loaded.state_file_bytes, loaded.memory_file_bytes, disk
        );
        match &chain {
            Ok(chain) => super::layers::print_chain(chain),
            Err(err) => println!(
                "  chain: FAILED: {}",
                crate::devices::virtio::error_chain(err)
            ),
        }
        match &verified {
            Ok(()) => println!(
                "  checksums: ok (state and {} memory chunks, {})",
                state.memory.chunks.len(),
                chunk_checksum.unwrap_or("none stored")
            ),
            Err(err) => println!(
                "  checksums: FAILED: {}",
                crate::devices::virtio::error_chain(err)
            ),
        }
    }
    verified?;
    chain?;
    Ok(0)
}
