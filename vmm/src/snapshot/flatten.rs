//! Flattening a chain of diff layers into one ordinary snapshot: the chain's segments copied
//! into anonymous memory, then written with the crash-safe writer like any full snapshot.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::{Chain, Segment, Source};
use super::format::PAGE_BYTES;
use super::writer::{new_snapshot_id, write_snapshot, SnapshotParts, SnapshotSummary};
use super::SnapshotError;

/// Bytes copied per read.
const COPY_BYTES: u64 = 4 << 20;

/// Fresh anonymous guest memory with `regions` (`(gpa, len_bytes)`).
pub fn guest_memory(regions: &[(u64, u64)], path: &Path) -> Result<GuestMemoryMmap, SnapshotError> {
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| SnapshotError::Invalid {
        path: path.to_owned(),
        reason: format!("cannot allocate guest memory for its regions: {e}"),
    })
}

/// Copies every `File` segment from its layer's memory file (`files[layer_index]`) into `mem`;
/// `Zero` segments are left as they are (fresh memory is zero).
pub fn read_segments_into(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    files: &[(&File, &Path)],
) -> Result<(), SnapshotError> {
    let mut buf = Vec::new();
    for seg in segments {
        let Source::File {
            layer_index,
            offset,
        } = seg.source
        else {
            continue;
        };
        let (file, path) = files[layer_index];
        let mut done = 0;
        while done < seg.len {
            let n = (seg.len - done).min(COPY_BYTES);
            buf.resize(n as usize, 0);
            file.read_exact_at(&mut buf, offset + done)
                .map_err(SnapshotError::io("read", path))?;
            mem.write_slice(&buf, GuestAddress(seg.gpa + done))
                .map_err(|e| SnapshotError::Invalid {
                    path: path.to_owned(),
                    reason: format!("segment at {:#x} outside guest RAM: {e}", seg.gpa),
                })?;
            done += n;
        }
    }
    Ok(())
}

/// Guest memory as the chain ending at `top` restores it (copied, not mapped), with its
/// regions; for comparing chains and flattened snapshots offline.
pub fn chain_memory(top: &Path) -> Result<(Vec<(u64, u64)>, GuestMemoryMmap), SnapshotError> {
    let chain = Chain::load(top)?;
    let regions = chain.top().state.memory.regions.clone();
    let mem = guest_memory(&regions, top)?;
    let files: Vec<_> = chain
        .links
        .iter()
        .map(|l| (&l.loaded.memory, l.loaded.memory_path.as_path()))
        .collect();
    read_segments_into(&mem, &chain.segments(), &files)?;
    Ok((regions, mem))
}

/// The first guest page (address) where `a` and `b` differ over `regions`, if any.
pub fn first_difference(
    a: &GuestMemoryMmap,
    b: &GuestMemoryMmap,
    regions: &[(u64, u64)],
) -> Option<u64> {
    let (mut pa, mut pb) = (
        vec![0u8; COPY_BYTES as usize],
        vec![0u8; COPY_BYTES as usize],
    );
    for &(start, len) in regions {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(COPY_BYTES) as usize;
            let gpa = GuestAddress(start + off);
            if a.read_slice(&mut pa[..n], gpa).is_err() || b.read_slice(&mut pb[..n], gpa).is_err()
            {
                return Some(start + off);
            }
            if let Some(i) = pa[..n]
                .chunks(PAGE_BYTES as usize)
                .zip(pb[..n].chunks(PAGE_BYTES as usize))
                .position(|(x, y)| x != y)
            {
                return Some(start + off + i as u64 * PAGE_BYTES);
            }
            off += n as u64;
        }
    }
    None
}

/// Merges the chain ending at `top` into one full snapshot at `out` (a new snapshot ID; the
/// top layer's VM state). Every layer's checksums are verified first.
pub fn flatten(top: &Path, out: &Path) -> Result<SnapshotSummary, SnapshotError> {
    let started = Instant::now();
    let mut chain = Chain::load(top)?;
    chain.verify_files(false)?;
    let segments = chain.segments();
    let mem = guest_memory(&chain.top().state.memory.regions, top)?;
    let files: Vec<_> = chain
        .links
        .iter()
        .map(|l| (&l.loaded.memory, l.loaded.memory_path.as_path()))
        .collect();
    read_segments_into(&mem, &segments, &files)?;
    drop(files);
    let mut state = chain.links.pop().expect("a chain has a top").loaded.state;
    state.layer = None;
    state.snapshot_id = new_snapshot_id();
    state.memory = Default::default();
    write_snapshot(
        out,
        SnapshotParts {
            state,
            mem: &mem,
            page_states: None,
            keep_all: false,
            // The chain was copied into anonymous memory: what was never written is zero.
            residency: crate::memory::Residency::PageTables { file_data: &[] },
            started,
            changed: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::super::chain::{resolve, LayerPages};
    use super::super::checksum::ChunkSum;
    use super::super::format::MEMORY_HEADER_BYTES;
    use super::super::memory_file::{
        file_holes, map_into_guest, write_memory_file, write_memory_file_since,
    };
    use super::super::state::MemoryChunk;
    use super::*;
    use crate::memory::{ChangedSet, MemorySlot};

    const MIB: u64 = 1 << 20;
    const REGIONS: [(u64, u64); 2] = [(0, 2 * MIB), (4 * MIB, MIB)];

    fn contents(mem: &GuestMemoryMmap) -> Vec<u8> {
        let mut all = Vec::new();
        for (start, len) in REGIONS {
            let mut buf = vec![0u8; len as usize];
            mem.read_slice(&mut buf, GuestAddress(start)).unwrap();
            all.extend(buf);
        }
        all
    }

    fn slots() -> Vec<MemorySlot> {
        REGIONS
            .iter()
            .enumerate()
            .map(|(i, &(s, l))| MemorySlot {
                slot: i as u32,
                guest_phys_addr: s,
                memory_size: l,
                userspace_addr: 0,
            })
            .collect()
    }

    /// Writes `mem` as a layer (or a full snapshot without `changed`) into `dir/name`.
    fn write(
        dir: &Path,
        name: &str,
        mem: &GuestMemoryMmap,
        changed: Option<&ChangedSet>,
    ) -> (
        File,
        std::path::PathBuf,
        super::super::state::MemoryIndex,
        Vec<(u64, u64)>,
    ) {
        let path = dir.join(name);
        let mut file = File::create_new(&path).unwrap();
        let (index, sets, _) = write_memory_file_since(
            &mut file,
            &path,
            mem,
            None,
            crate::snapshot::memory_file::KeepRules {
                keep_all: false,
                residency: crate::memory::Residency::PageTables { file_data: &[] },
                changed,
            },
            [1; 16],
        )
        .unwrap();
        (File::open(&path).unwrap(), path, index, sets.freed)
    }

    #[test]
    fn layers_restore_page_for_page_and_flatten_equals_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mem = guest_memory(&REGIONS, dir.path()).unwrap();
        // Base: A in pages 0-9, 12 (after a two-page hole) and 4 MiB + 0-3.
        mem.write_slice(&[0xaa; 10 * 4096], GuestAddress(0))
            .unwrap();
        mem.write_slice(&[0xa2; 4096], GuestAddress(12 * 4096))
            .unwrap();
        mem.write_slice(&[0xa1; 4 * 4096], GuestAddress(4 * MIB))
            .unwrap();
        let (f0, p0, i0, _) = write(dir.path(), "base", &mem, None);

        // L1: B over pages 2-3, page 5 zeroed (freed), a new page 20.
        let mut changed = ChangedSet::new(&slots());
        mem.write_slice(&[0xbb; 2 * 4096], GuestAddress(2 * 4096))
            .unwrap();
        mem.write_slice(&[0; 4096], GuestAddress(5 * 4096)).unwrap();
        mem.write_slice(&[0xb2; 4096], GuestAddress(20 * 4096))
            .unwrap();
        changed.insert_range(2 * 4096, 2 * 4096);
        changed.insert_range(5 * 4096, 4096);
        changed.insert_range(20 * 4096, 4096);
        let (f1, p1, i1, freed1) = write(dir.path(), "l1", &mem, Some(&changed));
        assert_eq!(freed1, vec![(5 * 4096, 4096)]);
        // The layer's map: changed pages kept or zero, everything else left to the parent.
        let classes = i1.classes.clone().expect("classes recorded");
        assert_eq!(String::from(classes), "i2 k2 i1 z1 i14 k1 i747");
        assert_eq!(i1.pages.kept, 3);

        // L2: C over page 5 again, pages 4 MiB + 1-2 zeroed, page 3 rewritten unchanged data.
        let mut changed = ChangedSet::new(&slots());
        mem.write_slice(&[0xcc; 4096], GuestAddress(5 * 4096))
            .unwrap();
        mem.write_slice(&[0; 2 * 4096], GuestAddress(4 * MIB + 4096))
            .unwrap();
        changed.insert_range(5 * 4096, 4096);
        changed.insert_range(4 * MIB + 4096, 2 * 4096);
        let (f2, p2, i2, freed2) = write(dir.path(), "l2", &mem, Some(&changed));
        assert_eq!(freed2, vec![(4 * MIB + 4096, 2 * 4096)]);
        let expected = contents(&mem);

        let layers = [
            LayerPages {
                chunks: &i0.chunks,
                freed: &[],
            },
            LayerPages {
                chunks: &i1.chunks,
                freed: &freed1,
            },
            LayerPages {
                chunks: &i2.chunks,
                freed: &freed2,
            },
        ];
        let segments = resolve(&REGIONS, &layers);
        let restored = guest_memory(&REGIONS, dir.path()).unwrap();
        let files = [
            (&f0, p0.as_path()),
            (&f1, p1.as_path()),
            (&f2, p2.as_path()),
        ];
        read_segments_into(&restored, &segments, &files).unwrap();
        assert_eq!(contents(&restored), expected, "chain != the VM's memory");
        // Restore's way: each layer's runs mapped, base first, bridging that layer's holes only.
        assert_eq!(
            file_holes(&i0),
            [(MEMORY_HEADER_BYTES + 10 * 4096, 2 * 4096)]
        );
        let mapped = guest_memory(&REGIONS, dir.path()).unwrap();
        for (layer, (index, (file, path))) in [&i0, &i1, &i2].into_iter().zip(files).enumerate() {
            let runs: Vec<MemoryChunk> = segments
                .iter()
                .filter_map(|s| match s.source {
                    Source::File {
                        layer_index,
                        offset,
                    } if layer_index == layer => Some(MemoryChunk {
                        gpa: s.gpa,
                        len_bytes: s.len,
                        file_offset: offset,
                        sum: ChunkSum::PENDING,
                    }),
                    _ => None,
                })
                .collect();
            map_into_guest(&mapped, file, path, &runs, &file_holes(index)).unwrap();
        }
        assert_eq!(
            contents(&mapped),
            expected,
            "mapped chain != the VM's memory"
        );
        // Freed pages read as zero, not as the base's A.
        let mut page = [1u8; 4096];
        restored
            .read_slice(&mut page, GuestAddress(4 * MIB + 4096))
            .unwrap();
        assert!(page.iter().all(|b| *b == 0));

        // Flatten: one full memory file of the chain's contents resolves to the same pages.
        let flat_path = dir.path().join("flat");
        let mut flat = File::create_new(&flat_path).unwrap();
        let fi = write_memory_file(
            &mut flat,
            &flat_path,
            &restored,
            None,
            false,
            crate::memory::Residency::PageTables { file_data: &[] },
            [2; 16],
        )
        .unwrap();
        let flat = File::open(&flat_path).unwrap();
        let again = guest_memory(&REGIONS, dir.path()).unwrap();
        let segs = resolve(
            &REGIONS,
            &[LayerPages {
                chunks: &fi.chunks,
                freed: &[],
            }],
        );
        read_segments_into(&again, &segs, &[(&flat, flat_path.as_path())]).unwrap();
        assert_eq!(contents(&again), expected, "flattened != chain");
        assert_eq!(first_difference(&again, &restored, &REGIONS), None);
        assert_eq!(first_difference(&again, &mem, &REGIONS), None);
        restored
            .write_slice(&[9], GuestAddress(4 * MIB + 5))
            .unwrap();
        assert_eq!(first_difference(&again, &restored, &REGIONS), Some(4 * MIB));
        // The data is the kept pages and the holes between them, nothing else.
        let holes: u64 = file_holes(&fi).iter().map(|h| h.1).sum();
        assert_eq!(fi.pages.kept * PAGE_BYTES + holes, fi.data_bytes);
    }
}
