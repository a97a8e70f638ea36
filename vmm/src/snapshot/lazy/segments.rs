//! Guest RAM as a flat, sorted list of segments, each saying where its bytes come from: a
//! range of a memory file or zeros. Lazy restore looks up the segment of each fault with a
//! binary search. A layered snapshot resolves its chain to the same list (one file per layer,
//! hence the file index in [`Source::File`]).

use crate::snapshot::checksum::ChunkSum;
use crate::snapshot::state::MemoryIndex;

/// Where a segment's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `len_bytes` bytes at `offset` of memory file number `file`.
    File {
        /// Index into the handler's list of memory files.
        file: usize,
        /// Byte offset in that file (page aligned).
        offset: u64,
        /// The checksummed chunk these bytes are (index in the file's chunk list), verified
        /// once, the first time one of its pages is served.
        chunk: usize,
        /// Checksum of the whole segment.
        sum: ChunkSum,
    },
    /// Zero pages (skipped when the snapshot was written).
    Zero,
}

/// One piece of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical start (page aligned).
    pub gpa: u64,
    /// Length in bytes (page multiple, non-zero).
    pub len_bytes: u64,
    /// Where the bytes come from.
    pub source: Source,
}

impl Segment {
    /// One past the last guest address.
    pub fn end(&self) -> u64 {
        self.gpa + self.len_bytes
    }
}

/// Segments covering guest RAM without overlap, sorted by guest address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentMap {
    segments: Vec<Segment>,
}

/// Why an index cannot be turned into segments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("memory chunk {chunk} (guest address {gpa:#x}, {len_bytes} bytes) overlaps another or lies outside guest RAM")]
pub struct SegmentError {
    /// Chunk number.
    pub chunk: usize,
    /// Its guest address.
    pub gpa: u64,
    /// Its length.
    pub len_bytes: u64,
}

impl SegmentMap {
    /// The segments of one memory file (`file` is its number): its chunks, and zero segments
    /// for the rest of each RAM region. Chunks must be in address order (the writer's order).
    pub fn from_index(index: &MemoryIndex, file: usize) -> Result<Self, SegmentError> {
        let mut regions = index.regions.clone();
        regions.sort_unstable();
        let mut segments = Vec::with_capacity(index.chunks.len() * 2 + regions.len());
        let mut chunks = index.chunks.iter().enumerate().peekable();
        for &(start, len) in &regions {
            let end = start + len;
            let mut at = start;
            while let Some(&(i, chunk)) = chunks.peek() {
                if chunk.gpa >= end {
                    break;
                }
                let bad = SegmentError {
                    chunk: i,
                    gpa: chunk.gpa,
                    len_bytes: chunk.len_bytes,
                };
                let chunk_end = chunk.gpa.checked_add(chunk.len_bytes).ok_or(bad.clone())?;
                if chunk.gpa < at || chunk_end > end || chunk.len_bytes == 0 {
                    return Err(bad);
                }
                if chunk.gpa > at {
                    segments.push(Segment {
                        gpa: at,
                        len_bytes: chunk.gpa - at,
                        source: Source::Zero,
                    });
                }
                segments.push(Segment {
                    gpa: chunk.gpa,
                    len_bytes: chunk.len_bytes,
                    source: Source::File {
                        file,
                        offset: chunk.file_offset,
                        chunk: i,
                        sum: chunk.sum,
                    },
                });
                at = chunk_end;
                chunks.next();
            }
            if at < end {
                segments.push(Segment {
                    gpa: at,
                    len_bytes: end - at,
                    source: Source::Zero,
                });
            }
        }
        if let Some((i, chunk)) = chunks.next() {
            return Err(SegmentError {
                chunk: i,
                gpa: chunk.gpa,
                len_bytes: chunk.len_bytes,
            });
        }
        Ok(Self { segments })
    }

    /// The segment holding guest address `gpa`, if any (binary search).
    pub fn find(&self, gpa: u64) -> Option<&Segment> {
        let i = self.segments.partition_point(|s| s.end() <= gpa);
        self.segments.get(i).filter(|s| s.gpa <= gpa)
    }

    /// All segments, in address order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::state::MemoryChunk;

    const MIB: u64 = 1 << 20;

    fn chunk(gpa: u64, len_bytes: u64, file_offset: u64) -> MemoryChunk {
        MemoryChunk {
            gpa,
            len_bytes,
            file_offset,
            sum: ChunkSum::Xxh64(gpa),
        }
    }

    #[test]
    fn chunks_and_zero_gaps_cover_ram_and_lookups_find_them() {
        let index = MemoryIndex {
            regions: vec![(4 * MIB, MIB), (0, 2 * MIB)],
            chunks: vec![
                chunk(0, 8192, 4096),
                chunk(16384, 4096, 12288),
                chunk(2 * MIB - 4096, 4096, 16384),
                chunk(4 * MIB + 4096, 4096, 20480),
            ],
            ..MemoryIndex::default()
        };
        let map = SegmentMap::from_index(&index, 2).unwrap();
        let spans: Vec<_> = map
            .segments()
            .iter()
            .map(|s| (s.gpa, s.len_bytes, matches!(s.source, Source::Zero)))
            .collect();
        assert_eq!(
            spans,
            [
                (0, 8192, false),
                (8192, 8192, true),
                (16384, 4096, false),
                (20480, 2 * MIB - 4096 - 20480, true),
                (2 * MIB - 4096, 4096, false),
                (4 * MIB, 4096, true),
                (4 * MIB + 4096, 4096, false),
                (4 * MIB + 8192, MIB - 8192, true),
            ]
        );
        assert_eq!(
            map.find(4097).unwrap().source,
            Source::File {
                file: 2,
                offset: 4096,
                chunk: 0,
                sum: ChunkSum::Xxh64(0)
            }
        );
        assert_eq!(map.find(8192).unwrap().source, Source::Zero);
        assert_eq!(map.find(16384 + 4095).unwrap().gpa, 16384);
        assert_eq!(map.find(2 * MIB - 1).unwrap().gpa, 2 * MIB - 4096);
        assert_eq!(map.find(2 * MIB), None, "the hole between regions");
        assert_eq!(map.find(4 * MIB).unwrap().source, Source::Zero);
        assert_eq!(map.find(5 * MIB - 1).unwrap().gpa, 4 * MIB + 8192);
        assert_eq!(map.find(5 * MIB), None, "past the end of RAM");
        // Every address of RAM belongs to exactly one segment.
        let total: u64 = map.segments().iter().map(|s| s.len_bytes).sum();
        assert_eq!(total, 3 * MIB);
    }

    #[test]
    fn overlapping_or_outside_chunks_are_refused() {
        for chunks in [
            vec![chunk(0, 8192, 4096), chunk(4096, 4096, 12288)], // overlap
            vec![chunk(MIB - 4096, 8192, 4096)],                  // crosses the region's end
            vec![chunk(3 * MIB, 4096, 4096)],                     // outside RAM
            vec![chunk(8192, 4096, 4096), chunk(0, 4096, 8192)],  // out of order
            vec![chunk(4096, 0, 4096)],                           // empty
        ] {
            let index = MemoryIndex {
                regions: vec![(0, MIB)],
                chunks,
                ..MemoryIndex::default()
            };
            assert!(SegmentMap::from_index(&index, 0).is_err(), "{index:?}");
        }
    }
}
