//! Diff layers: what a layer's state records about its parent, the parent's content hash, and
//! the lineage a running VM keeps so it only layers onto the snapshot its memory descends from.
//!
//! A layer stores only the pages changed since its parent (KVM's dirty log, the VMM's own
//! writes, the used rings) and lists the pages freed since the parent explicitly
//! ([`LayerInfo::freed`]): a page missing from a layer means "as in the parent", a freed page
//! means "zero now", so a freed page never brings back the parent's stale data.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::format::{id_hex, STATE_FILE};
use super::SnapshotError;

/// Longest chain restore follows (base included): deeper chains are refused, which also
/// bounds a cycle.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// The parent a layer was written against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    /// The parent directory: relative to the layer's own directory's parent when both sit in
    /// the same folder (`../base` style is avoided: siblings store just the name), else absolute.
    pub path: PathBuf,
    /// The parent's snapshot ID (hex).
    pub snapshot_id: String,
    /// SHA-256 of the parent's state file (hex): its configuration, device state and memory
    /// index with every chunk's CRC, so any change to the parent's contents shows.
    pub hash: String,
}

/// What makes a snapshot a diff layer (`None` in a full snapshot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerInfo {
    /// The parent.
    pub parent: ParentRef,
    /// Guest ranges `(gpa, len_bytes)` freed since the parent: they read as zero, whatever the
    /// parent holds. Page aligned, sorted, disjoint.
    pub freed: Vec<(u64, u64)>,
    /// Pages unchanged since the parent (taken from it at restore).
    pub inherited_pages: u64,
}

/// Errors specific to layers and chains; each names the layer and the parent.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The VM was started without dirty page tracking.
    #[error("cannot write a diff layer: this VM does not track dirty pages (start it with --track-dirty-pages or machine-config track_dirty_pages)")]
    NotTracking,
    /// The VM has no parent to layer on (tracking started at boot).
    #[error("cannot layer on {parent}: this VM was booted, not restored, and no snapshot was taken of it yet")]
    NoLineage {
        /// The requested parent.
        parent: PathBuf,
    },
    /// The requested parent is not the snapshot the VM descends from.
    #[error("cannot layer on {parent} (hash {found}): this VM's memory descends from {expected_path} (hash {expected}), the snapshot it was restored from or last written to")]
    WrongParent {
        /// The requested parent.
        parent: PathBuf,
        /// Its hash.
        found: String,
        /// The VM's lineage.
        expected_path: PathBuf,
        /// Its hash.
        expected: String,
    },
    /// The layer would replace its own parent.
    #[error(
        "cannot write a layer on {0} into the same directory: it would replace its own parent"
    )]
    ParentIsOutput(PathBuf),
    /// A parent of a layer changed since the layer was written.
    #[error("layer {layer}: its parent {parent} has changed (hash {found}, the layer was written against {expected})")]
    ParentChanged {
        /// The layer's directory.
        layer: PathBuf,
        /// The parent's directory.
        parent: PathBuf,
        /// The parent's hash now.
        found: String,
        /// The hash the layer recorded.
        expected: String,
    },
    /// A parent cannot be loaded.
    #[error("layer {layer}: cannot load its parent {parent} (hash {hash})")]
    ParentUnavailable {
        /// The layer's directory.
        layer: PathBuf,
        /// The parent's directory.
        parent: PathBuf,
        /// The hash the layer recorded.
        hash: String,
        /// Why.
        #[source]
        source: Box<SnapshotError>,
    },
    /// The chain is longer than [`MAX_CHAIN_DEPTH`] or loops.
    #[error(
        "snapshot chain from {top} is a cycle or deeper than {MAX_CHAIN_DEPTH} layers (at {at})"
    )]
    ChainTooDeep {
        /// Where the walk started.
        top: PathBuf,
        /// The layer where it stopped.
        at: PathBuf,
    },
    /// Layers of one chain describe different guest RAM.
    #[error("layer {layer}: guest RAM regions differ from its parent's {parent}")]
    RegionsDiffer {
        /// The layer.
        layer: PathBuf,
        /// The parent.
        parent: PathBuf,
    },
    /// A freed range is not page aligned or lies outside guest RAM.
    #[error("layer {layer}: freed range {gpa:#x}+{len_bytes:#x} is not page aligned or outside guest RAM")]
    BadFreedRange {
        /// The layer.
        layer: PathBuf,
        /// Start.
        gpa: u64,
        /// Length.
        len_bytes: u64,
    },
}

/// SHA-256 (hex) of the state file of the snapshot in `dir`.
pub fn state_hash(dir: &Path) -> Result<String, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(SnapshotError::io("read", &path))?;
    Ok(hash_hex(&bytes))
}

/// SHA-256 of `bytes` as hex.
pub fn hash_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How a layer at `layer_dir` refers to `parent_dir`: just the name when both are in the same
/// folder (the pair can then be moved together), else the absolute path.
pub fn parent_path_for(layer_dir: &Path, parent_dir: &Path) -> PathBuf {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let (layer, parent) = (abs(layer_dir), abs(parent_dir));
    match (layer.parent(), parent.parent(), parent.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => PathBuf::from(name),
        _ => parent,
    }
}

/// Where the parent recorded as `path` in the layer at `layer_dir` is.
pub fn resolve_parent_path(layer_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_owned();
    }
    match layer_dir.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder.join(path),
        _ => path.to_owned(),
    }
}

/// The snapshot a running VM's memory descends from: the one it was restored from, or the last
/// one taken of it. Diff layers may only name this one as their parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lineage {
    /// Its directory (absolute).
    pub path: PathBuf,
    /// Its snapshot ID.
    pub snapshot_id: [u8; 16],
    /// Its state hash.
    pub hash: String,
}

impl Lineage {
    /// The lineage entry for the snapshot at `dir` with ID `snapshot_id`.
    pub fn of(dir: &Path, snapshot_id: [u8; 16]) -> Result<Self, SnapshotError> {
        Ok(Self {
            path: std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned()),
            snapshot_id,
            hash: state_hash(dir)?,
        })
    }

    /// Checks that `parent` (a snapshot directory) is this lineage's snapshot, unchanged, and
    /// returns the reference a layer stores.
    pub fn check_parent(&self, parent: &Path, layer_dir: &Path) -> Result<ParentRef, LayerError> {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
        if abs(parent) == abs(layer_dir) {
            return Err(LayerError::ParentIsOutput(parent.to_owned()));
        }
        let found = state_hash(parent).map_err(|source| LayerError::ParentUnavailable {
            layer: layer_dir.to_owned(),
            parent: parent.to_owned(),
            hash: self.hash.clone(),
            source: Box::new(source),
        })?;
        if found != self.hash {
            return Err(LayerError::WrongParent {
                parent: parent.to_owned(),
                found,
                expected_path: self.path.clone(),
                expected: self.hash.clone(),
            });
        }
        Ok(ParentRef {
            path: parent_path_for(layer_dir, parent),
            snapshot_id: id_hex(&self.snapshot_id),
            hash: found,
        })
    }
}

/// A VM's diff-layer bookkeeping (present when it tracks dirty pages): the pages changed since
/// its lineage snapshot, and that snapshot.
#[derive(Debug)]
pub struct Layering {
    /// Pages changed since the lineage point.
    pub changed: std::sync::Arc<crate::memory::ChangedPages>,
    /// The snapshot the VM's memory descends from (`None` after a boot, until a snapshot).
    pub lineage: std::sync::Mutex<Option<Lineage>>,
}

impl Layering {
    /// The lineage now.
    pub fn lineage(&self) -> Option<Lineage> {
        self.lineage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `lineage` the reference point.
    pub fn set_lineage(&self, lineage: Lineage) {
        *self.lineage.lock().unwrap_or_else(|p| p.into_inner()) = Some(lineage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_paths_are_relative_between_siblings() {
        assert_eq!(
            parent_path_for(Path::new("/s/l1"), Path::new("/s/base")),
            PathBuf::from("base")
        );
        assert_eq!(
            parent_path_for(Path::new("/s/l1"), Path::new("/t/base")),
            PathBuf::from("/t/base")
        );
        assert_eq!(
            resolve_parent_path(Path::new("/s/l1"), Path::new("base")),
            PathBuf::from("/s/base")
        );
    }

    #[test]
    fn lineage_refuses_another_parent() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for (d, body) in [(&a, "one"), (&b, "two")] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join(STATE_FILE), body).unwrap();
        }
        let lineage = Lineage::of(&a, [1; 16]).unwrap();
        let layer = dir.path().join("l1");
        let parent = lineage.check_parent(&a, &layer).unwrap();
        assert_eq!(parent.path, PathBuf::from("a"));
        let err = lineage.check_parent(&b, &layer).unwrap_err();
        assert!(matches!(err, LayerError::WrongParent { .. }), "{err}");
        assert!(err.to_string().contains(&lineage.hash), "{err}");
        let err = lineage.check_parent(&a, &a).unwrap_err();
        assert!(matches!(err, LayerError::ParentIsOutput(_)), "{err}");
    }
}
