//! Pictures of what a snapshot holds: every guest page's class ([`classes`]: kept, freed by
//! the balloon, reported, hinted, never touched, zero, and for a diff layer unchanged from the
//! parent), recorded run-length encoded in the state file when the snapshot is written, and
//! drawn as a grid over guest physical memory ([`draw`], `vmm inspect DIR --map FILE.svg`).

pub mod classes;
pub mod draw;

pub use classes::{PageClass, PageClassRuns};
pub use draw::{render_map, MapSummary};

use std::path::Path;

use super::format::id_hex;
use super::state::SnapshotState;

/// Errors drawing a snapshot's map.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The state's class record is damaged.
    #[error("cannot draw the map of {dir}")]
    Classes {
        /// The snapshot directory.
        dir: std::path::PathBuf,
        /// What is wrong.
        #[source]
        source: classes::ClassRecordError,
    },
    /// Writing the SVG failed.
    #[error("cannot write the map {path}")]
    Write {
        /// The SVG file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Draws the map of the snapshot in `dir` (its decoded `state`) into the SVG file `out`. A diff
/// layer's map shows the layer itself: pages unchanged since the parent are marked so.
pub fn write_map(dir: &Path, state: &SnapshotState, out: &Path) -> Result<MapSummary, MapError> {
    let machine = &state.config.machine_config;
    let title = format!(
        "guest memory of snapshot {} ({} MiB, {} vCPUs)",
        dir.display(),
        machine.mem_size_mib,
        state.vcpus.len()
    );
    let mut notes = vec![format!(
        "snapshot id {}, written by vmm {}",
        id_hex(&state.snapshot_id),
        state.vmm_version
    )];
    if let Some(layer) = &state.layer {
        notes.push(format!(
            "diff layer over {}: this map shows the layer itself; unchanged pages are stored in the parent",
            layer.parent.path.display()
        ));
    }
    let (svg, summary) =
        render_map(&state.memory, &title, &notes).map_err(|source| MapError::Classes {
            dir: dir.to_owned(),
            source,
        })?;
    std::fs::write(out, svg).map_err(|source| MapError::Write {
        path: out.to_owned(),
        source,
    })?;
    Ok(summary)
}
