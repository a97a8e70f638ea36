//! The memory-file index check (vmm/src/snapshot/memory_file.rs `validate_index`), its holes
//! (`file_holes`) and the restore's mapping plan (`plan_mappings`): a JSON index from a state
//! file plus a file length. Invariants: an index that passes maps only whole, page-aligned
//! chunks that lie inside one guest RAM region and inside the file; its holes lie in the file's
//! data and outside every chunk; every mapping lies inside one region and inside the file, and
//! every byte it maps is a chunk's or a hole's. So mapping it can neither touch memory outside
//! the guest, fault past the end of the file, nor show the guest file bytes nothing vouches for.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::format::{MEMORY_HEADER_BYTES, PAGE_BYTES};
use vmm::snapshot::memory_file::{file_holes, plan_mappings, validate_index};
use vmm::snapshot::state::MemoryIndex;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let file_bytes = u64::from_le_bytes(data[..8].try_into().unwrap());
    let Ok(index) = serde_json::from_slice::<MemoryIndex>(&data[8..]) else {
        return;
    };
    if validate_index(&index, Path::new("fuzz/memory"), file_bytes).is_err() {
        return;
    }
    let in_region = |gpa: u64, len: u64| {
        let end = gpa.checked_add(len).expect("no wrap");
        index
            .regions
            .iter()
            .any(|&(start, rlen)| gpa >= start && start.checked_add(rlen).is_some_and(|e| end <= e))
    };
    for chunk in &index.chunks {
        assert!(chunk.len_bytes > 0);
        assert_eq!(
            (chunk.gpa | chunk.len_bytes | chunk.file_offset) % PAGE_BYTES,
            0
        );
        let file_end = chunk
            .file_offset
            .checked_add(chunk.len_bytes)
            .expect("no wrap");
        assert!(chunk.file_offset >= MEMORY_HEADER_BYTES && file_end <= file_bytes);
        assert!(
            in_region(chunk.gpa, chunk.len_bytes),
            "chunk {chunk:?} outside {:?}",
            index.regions
        );
    }

    let holes = file_holes(&index);
    let data_end = MEMORY_HEADER_BYTES + index.data_bytes;
    for (i, &(offset, len)) in holes.iter().enumerate() {
        assert!(len > 0 && offset >= MEMORY_HEADER_BYTES && offset + len <= data_end);
        assert!(
            i == 0 || holes[i - 1].0 + holes[i - 1].1 <= offset,
            "sorted, disjoint"
        );
        for c in &index.chunks {
            assert!(offset + len <= c.file_offset || c.file_offset + c.len_bytes <= offset);
        }
    }

    // Restore maps the chunks in guest address order (the writer's order).
    let mut runs = index.chunks.clone();
    runs.sort_by_key(|c| c.gpa);
    let Ok(spans) = plan_mappings(&runs, &holes, &index.regions) else {
        return;
    };
    // File ranges something vouches for: the chunks (checksums) and the holes (must read zero).
    let vouched: Vec<(u64, u64)> = index
        .chunks
        .iter()
        .map(|c| (c.file_offset, c.file_offset + c.len_bytes))
        .chain(holes.iter().map(|&(o, l)| (o, o + l)))
        .collect();
    for span in &spans {
        assert!(in_region(span.gpa, span.len_bytes), "{span:?} crosses RAM");
        let end = span.file_offset + span.len_bytes;
        assert!(end <= file_bytes, "{span:?} past the file");
        let mut offset = span.file_offset;
        while offset < end {
            let next = vouched
                .iter()
                .filter(|&&(start, stop)| start <= offset && offset < stop)
                .map(|&(_, stop)| stop)
                .max();
            offset = next.unwrap_or_else(|| panic!("{span:?} maps unvouched byte {offset:#x}"));
        }
    }
    for run in &runs {
        assert!(
            spans.iter().any(|s| run.gpa >= s.gpa
                && run.gpa + run.len_bytes <= s.gpa + s.len_bytes
                && run.file_offset.checked_sub(s.file_offset) == Some(run.gpa - s.gpa)),
            "{run:?} not mapped as it is"
        );
    }
});
