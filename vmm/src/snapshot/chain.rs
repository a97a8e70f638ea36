//! A chain of snapshots (a full base and diff layers on it) resolved into one flat, sorted list
//! of guest memory segments, each read from one layer's memory file or zero.
//!
//! [`resolve`] is the single place that decides where each guest page comes from: layers are
//! applied base first; a layer's freed ranges turn pages to zero, its chunks point them at its
//! file; pages a layer does not mention keep what the layers below gave them. Restore maps the
//! `File` segments (`MAP_PRIVATE | MAP_FIXED` over anonymous memory), `flatten` copies them, a
//! lazy (userfaultfd) restore can serve faults from the same list.

use std::path::{Path, PathBuf};

use super::checksum::ChunkSum;
use super::format::PAGE_BYTES;
use super::layer::{resolve_parent_path, LayerError, LayerInfo, MAX_CHAIN_DEPTH};
use super::reader::{load, LoadedSnapshot};
use super::state::MemoryChunk;
use super::SnapshotError;

/// Where a segment's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The memory file of layer `layer_index` (0 = the base) at byte `offset`.
    File {
        /// Index into the chain, base first.
        layer_index: usize,
        /// Byte offset in that layer's memory file.
        offset: u64,
    },
    /// All zero (never stored, or freed).
    Zero,
}

/// A run of guest memory with one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes (page multiple).
    pub len: u64,
    /// Where the bytes are.
    pub source: Source,
}

/// What [`resolve`] needs of one layer.
#[derive(Clone, Copy, Debug)]
pub struct LayerPages<'a> {
    /// Stored chunks (file offsets into this layer's memory file).
    pub chunks: &'a [MemoryChunk],
    /// Ranges freed since the parent (empty for the base).
    pub freed: &'a [(u64, u64)],
}

/// Resolves `layers` (base first) over guest RAM `regions` into segments covering all of RAM,
/// sorted by address, adjacent runs of the same kind coalesced (file runs only when their file
/// offsets continue). Inputs must be validated (page aligned, inside RAM).
pub fn resolve(regions: &[(u64, u64)], layers: &[LayerPages]) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut regions = regions.to_vec();
    regions.sort_unstable();
    for &(start, len) in &regions {
        let pages = (len / PAGE_BYTES) as usize;
        let mut src = vec![Source::Zero; pages];
        let page_of = |gpa: u64| ((gpa - start) / PAGE_BYTES) as usize;
        let inside = |gpa: u64, l: u64| gpa >= start && gpa + l <= start + len;
        for (layer_index, layer) in layers.iter().enumerate() {
            for &(gpa, l) in layer.freed.iter().filter(|&&(g, l)| inside(g, l)) {
                src[page_of(gpa)..page_of(gpa + l)].fill(Source::Zero);
            }
            for c in layer.chunks.iter().filter(|c| inside(c.gpa, c.len_bytes)) {
                for p in 0..(c.len_bytes / PAGE_BYTES) {
                    src[page_of(c.gpa) + p as usize] = Source::File {
                        layer_index,
                        offset: c.file_offset + p * PAGE_BYTES,
                    };
                }
            }
        }
        for (i, s) in src.into_iter().enumerate() {
            let gpa = start + i as u64 * PAGE_BYTES;
            if let Some(last) = out
                .last_mut()
                .filter(|l: &&mut Segment| continues(l, gpa, s))
            {
                last.len += PAGE_BYTES;
            } else {
                out.push(Segment {
                    gpa,
                    len: PAGE_BYTES,
                    source: s,
                });
            }
        }
    }
    out
}

/// Whether page `gpa` with source `s` extends `seg`.
fn continues(seg: &Segment, gpa: u64, s: Source) -> bool {
    if seg.gpa + seg.len != gpa {
        return false;
    }
    match (seg.source, s) {
        (Source::Zero, Source::Zero) => true,
        (
            Source::File {
                layer_index: a,
                offset,
            },
            Source::File {
                layer_index: b,
                offset: next,
            },
        ) => a == b && offset + seg.len == next,
        _ => false,
    }
}

/// One link of a chain as the walk sees it.
#[derive(Clone, Debug)]
pub struct Link<T> {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// What was loaded from it.
    pub loaded: T,
}

/// How the walk reads a layer: its layer info (None for a full snapshot), RAM regions, and a
/// hash function.
pub trait ChainNode {
    /// The layer info, if this is a diff layer.
    fn layer(&self) -> Option<&LayerInfo>;
    /// Guest RAM regions.
    fn regions(&self) -> &[(u64, u64)];
}

impl ChainNode for LoadedSnapshot {
    fn layer(&self) -> Option<&LayerInfo> {
        self.state.layer.as_ref()
    }
    fn regions(&self) -> &[(u64, u64)] {
        &self.state.memory.regions
    }
}

/// Walks from the snapshot at `top` to its full base, loading each with `open` and checking
/// each parent's hash with `hash`; returns the links base first.
pub fn walk<T: ChainNode>(
    top: &Path,
    mut open: impl FnMut(&Path) -> Result<T, SnapshotError>,
    mut hash: impl FnMut(&Path) -> Result<String, SnapshotError>,
) -> Result<Vec<Link<T>>, SnapshotError> {
    let mut links = vec![Link {
        dir: top.to_owned(),
        loaded: open(top)?,
    }];
    loop {
        let child = links.last().expect("at least the top");
        let Some(info) = child.loaded.layer() else {
            break;
        };
        check_freed(&child.dir, info, child.loaded.regions())?;
        let parent_dir = resolve_parent_path(&child.dir, &info.parent.path);
        if links.len() >= MAX_CHAIN_DEPTH {
            return Err(LayerError::ChainTooDeep {
                top: top.to_owned(),
                at: child.dir.clone(),
            }
            .into());
        }
        let unavailable = |source| LayerError::ParentUnavailable {
            layer: child.dir.clone(),
            parent: parent_dir.clone(),
            hash: info.parent.hash.clone(),
            source: Box::new(source),
        };
        let found = hash(&parent_dir).map_err(unavailable)?;
        if found != info.parent.hash {
            return Err(LayerError::ParentChanged {
                layer: child.dir.clone(),
                parent: parent_dir,
                found,
                expected: info.parent.hash.clone(),
            }
            .into());
        }
        let parent = open(&parent_dir).map_err(unavailable)?;
        if parent.regions() != child.loaded.regions() {
            return Err(LayerError::RegionsDiffer {
                layer: child.dir.clone(),
                parent: parent_dir,
            }
            .into());
        }
        links.push(Link {
            dir: parent_dir,
            loaded: parent,
        });
    }
    links.reverse();
    Ok(links)
}

/// Checks a layer's freed ranges: page aligned, inside RAM.
fn check_freed(dir: &Path, info: &LayerInfo, regions: &[(u64, u64)]) -> Result<(), LayerError> {
    for &(gpa, len_bytes) in &info.freed {
        let ok = (gpa | len_bytes) % PAGE_BYTES == 0
            && len_bytes > 0
            && regions
                .iter()
                .any(|&(s, l)| gpa >= s && gpa.checked_add(len_bytes).is_some_and(|e| e <= s + l));
        if !ok {
            return Err(LayerError::BadFreedRange {
                layer: dir.to_owned(),
                gpa,
                len_bytes,
            });
        }
    }
    Ok(())
}

/// A loaded, hash-checked chain, base first (a full snapshot is a chain of one).
pub struct Chain {
    /// The layers, base first; the last is the snapshot asked for.
    pub links: Vec<Link<LoadedSnapshot>>,
}

impl Chain {
    /// Loads the snapshot at `top` and every parent, checking each parent's hash.
    pub fn load(top: &Path) -> Result<Self, SnapshotError> {
        Ok(Self {
            links: walk(top, load, super::layer::state_hash)?,
        })
    }

    /// The snapshot asked for (its state is the VM's).
    pub fn top(&self) -> &LoadedSnapshot {
        &self.links.last().expect("a chain has a top").loaded
    }

    /// The resolved segments (see [`resolve`]).
    pub fn segments(&self) -> Vec<Segment> {
        let layers: Vec<_> = self
            .links
            .iter()
            .map(|l| LayerPages {
                chunks: &l.loaded.state.memory.chunks,
                freed: l
                    .loaded
                    .state
                    .layer
                    .as_ref()
                    .map_or(&[][..], |i| &i.freed[..]),
            })
            .collect();
        resolve(&self.top().state.memory.regions, &layers)
    }

    /// Each layer's `File` segments as mappable chunks (checksum unused), per layer.
    pub fn file_runs(&self, segments: &[Segment]) -> Vec<Vec<MemoryChunk>> {
        let mut runs = vec![Vec::new(); self.links.len()];
        for s in segments {
            if let Source::File {
                layer_index,
                offset,
            } = s.source
            {
                runs[layer_index].push(MemoryChunk {
                    gpa: s.gpa,
                    len_bytes: s.len,
                    file_offset: offset,
                    sum: ChunkSum::PENDING,
                });
            }
        }
        runs
    }

    /// Verifies every layer's chunk checksums by reading its memory file, except files this
    /// host wrote or verified before, as they are now (all of them with `reverify`).
    pub fn verify_files(&self, reverify: bool) -> Result<(), SnapshotError> {
        self.links.iter().try_for_each(|l| {
            super::verified::check_once(&l.loaded.memory_path, reverify, || l.loaded.verify_file())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::layer::ParentRef;
    use super::*;
    use std::collections::HashMap;

    const P: u64 = PAGE_BYTES;

    fn chunk(gpa: u64, len: u64, off: u64) -> MemoryChunk {
        MemoryChunk {
            gpa,
            len_bytes: len,
            file_offset: off,
            sum: ChunkSum::PENDING,
        }
    }

    #[test]
    fn upper_layers_win_and_freed_ranges_zero_parent_data() {
        let regions = [(0, 16 * P), (64 * P, 4 * P)];
        // Base: pages 0-7 at file 4096.., page 64-65.
        let base = [chunk(0, 8 * P, P), chunk(64 * P, 2 * P, 9 * P)];
        // L1: rewrites page 2-3, frees 5-6.
        let l1 = [chunk(2 * P, 2 * P, P)];
        let l1_freed = [(5 * P, 2 * P)];
        // L2: rewrites page 6 (freed in L1), frees 64.
        let l2 = [chunk(6 * P, P, P)];
        let l2_freed = [(64 * P, P)];
        let segs = resolve(
            &regions,
            &[
                LayerPages {
                    chunks: &base,
                    freed: &[],
                },
                LayerPages {
                    chunks: &l1,
                    freed: &l1_freed,
                },
                LayerPages {
                    chunks: &l2,
                    freed: &l2_freed,
                },
            ],
        );
        let f = |layer_index, offset| Source::File {
            layer_index,
            offset,
        };
        let want = vec![
            (0, 2 * P, f(0, P)),
            (2 * P, 2 * P, f(1, P)),
            (4 * P, P, f(0, 5 * P)),
            (5 * P, P, Source::Zero),
            (6 * P, P, f(2, P)),
            (7 * P, P, f(0, 8 * P)),
            (8 * P, 8 * P, Source::Zero),
            (64 * P, P, Source::Zero),
            (65 * P, P, f(0, 10 * P)),
            (66 * P, 2 * P, Source::Zero),
        ];
        let got: Vec<_> = segs.iter().map(|s| (s.gpa, s.len, s.source)).collect();
        assert_eq!(got, want);
        // Every page of RAM is covered exactly once, in order.
        let total: u64 = segs.iter().map(|s| s.len).sum();
        assert_eq!(total, 20 * P);
        assert!(segs.windows(2).all(|w| w[0].gpa + w[0].len <= w[1].gpa));
    }

    #[derive(Clone, Debug)]
    struct Fake {
        layer: Option<LayerInfo>,
        regions: Vec<(u64, u64)>,
    }

    impl ChainNode for Fake {
        fn layer(&self) -> Option<&LayerInfo> {
            self.layer.as_ref()
        }
        fn regions(&self) -> &[(u64, u64)] {
            &self.regions
        }
    }

    fn layer_on(parent: &str, hash: &str, freed: Vec<(u64, u64)>) -> Fake {
        Fake {
            layer: Some(LayerInfo {
                parent: ParentRef {
                    path: parent.into(),
                    snapshot_id: "00".into(),
                    hash: hash.into(),
                },
                freed,
                inherited_pages: 0,
            }),
            regions: vec![(0, 16 * P)],
        }
    }

    fn walk_fake(
        nodes: &HashMap<PathBuf, Fake>,
        hashes: &HashMap<PathBuf, String>,
        top: &str,
    ) -> Result<Vec<Link<Fake>>, SnapshotError> {
        walk(
            Path::new(top),
            |p| {
                nodes.get(p).cloned().ok_or_else(|| SnapshotError::Io {
                    operation: "open",
                    path: p.to_owned(),
                    source: std::io::ErrorKind::NotFound.into(),
                })
            },
            |p| {
                hashes.get(p).cloned().ok_or_else(|| SnapshotError::Io {
                    operation: "read",
                    path: p.to_owned(),
                    source: std::io::ErrorKind::NotFound.into(),
                })
            },
        )
    }

    #[test]
    fn walk_checks_hashes_depth_cycles_and_freed_ranges() {
        let mut nodes = HashMap::new();
        let mut hashes = HashMap::new();
        let base = Fake {
            layer: None,
            regions: vec![(0, 16 * P)],
        };
        nodes.insert(PathBuf::from("/s/base"), base);
        hashes.insert(PathBuf::from("/s/base"), "hb".to_string());
        nodes.insert(PathBuf::from("/s/l1"), layer_on("base", "hb", vec![]));
        hashes.insert(PathBuf::from("/s/l1"), "h1".to_string());
        nodes.insert(
            PathBuf::from("/s/l2"),
            layer_on("/s/l1", "h1", vec![(0, P)]),
        );
        let links = walk_fake(&nodes, &hashes, "/s/l2").unwrap();
        let dirs: Vec<_> = links.iter().map(|l| l.dir.clone()).collect();
        assert_eq!(
            dirs,
            [PathBuf::from("/s/base"), "/s/l1".into(), "/s/l2".into()]
        );

        // The base changed after L1 was written.
        hashes.insert(PathBuf::from("/s/base"), "other".to_string());
        let err = walk_fake(&nodes, &hashes, "/s/l2").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/s/l1") && msg.contains("/s/base") && msg.contains("hb"),
            "{msg}"
        );
        hashes.insert(PathBuf::from("/s/base"), "hb".to_string());

        // A missing parent names the layer and the parent.
        nodes.insert(PathBuf::from("/s/l3"), layer_on("gone", "hx", vec![]));
        let msg = walk_fake(&nodes, &hashes, "/s/l3").unwrap_err().to_string();
        assert!(msg.contains("/s/l3") && msg.contains("/s/gone"), "{msg}");

        // A cycle: a and b name each other.
        nodes.insert(PathBuf::from("/s/a"), layer_on("b", "hB", vec![]));
        nodes.insert(PathBuf::from("/s/b"), layer_on("a", "hA", vec![]));
        hashes.insert(PathBuf::from("/s/a"), "hA".to_string());
        hashes.insert(PathBuf::from("/s/b"), "hB".to_string());
        let err = walk_fake(&nodes, &hashes, "/s/a").unwrap_err();
        assert!(
            matches!(err, SnapshotError::Layer(LayerError::ChainTooDeep { .. })),
            "{err}"
        );

        // A freed range outside RAM is refused.
        nodes.insert(
            PathBuf::from("/s/bad"),
            layer_on("base", "hb", vec![(32 * P, P)]),
        );
        let err = walk_fake(&nodes, &hashes, "/s/bad").unwrap_err();
        assert!(
            matches!(err, SnapshotError::Layer(LayerError::BadFreedRange { .. })),
            "{err}"
        );
    }
}
