//! The memory-file index check (vmm/src/snapshot/memory_file.rs `validate_index`): a JSON
//! index from a state file plus a file length. Invariant: an index that passes maps only whole,
//! page-aligned chunks that lie inside one guest RAM region and inside the file, so mapping it
//! can neither touch memory outside the guest nor fault past the end of the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::format::{MEMORY_HEADER_BYTES, PAGE_BYTES};
use vmm::snapshot::memory_file::validate_index;
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
        let gpa_end = chunk.gpa.checked_add(chunk.len_bytes).expect("no wrap");
        assert!(
            index.regions.iter().any(|&(start, len)| chunk.gpa >= start
                && start.checked_add(len).is_some_and(|end| gpa_end <= end)),
            "chunk {chunk:?} outside {:?}",
            index.regions
        );
    }
});
