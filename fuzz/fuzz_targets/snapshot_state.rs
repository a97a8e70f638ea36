//! Snapshot file parsers (vmm/src/snapshot/{format,reader}.rs): the state file (header, length,
//! checksum, body: MessagePack from format 5 on, JSON before) and the memory file's header. The
//! first byte picks what the rest is. Invariants: decoded headers re-encode to bytes that decode
//! to the same header; a state that parses re-encodes (this VMM's body encoding + a fresh
//! header) to a file that parses to a state that encodes to the same bytes.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::format::{
    encode_state_body, state_file_bytes, MemoryHeader, StateHeader, FORMAT_VERSION,
    STATE_HEADER_BYTES,
};
use vmm::snapshot::reader::parse_state;
use vmm::snapshot::state::SnapshotState;

/// Re-encodes a parsed state as this VMM writes it and checks that it parses back the same.
fn check_re_encoding(state: &SnapshotState, path: &Path) {
    let body = encode_state_body(state).expect("state encodes");
    let again = parse_state(&state_file_bytes(FORMAT_VERSION, &body), path)
        .expect("re-encoded state parses");
    assert_eq!(encode_state_body(&again).unwrap(), body);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new("fuzz/state");
    match mode % 5 {
        0 => {
            if let Ok(header) = StateHeader::decode(rest) {
                assert_eq!(StateHeader::decode(&header.encode()).unwrap(), header);
                assert!(rest.len() >= STATE_HEADER_BYTES);
            }
        }
        1 => {
            if let Ok(header) = MemoryHeader::decode(rest) {
                assert_eq!(MemoryHeader::decode(&header.encode()).unwrap(), header);
            }
        }
        2 => {
            // Raw state files (header and all from the fuzzer).
            if let Ok(state) = parse_state(rest, path) {
                check_re_encoding(&state, path);
            }
        }
        3 => {
            // A valid format 4 header around a fuzzed body: reaches the JSON decoder and the
            // checks after.
            if let Ok(state) = parse_state(&state_file_bytes(4, rest), path) {
                check_re_encoding(&state, path);
            }
        }
        _ => {
            // A valid header of this VMM's format around a fuzzed body: the MessagePack decoder.
            if let Ok(state) = parse_state(&state_file_bytes(FORMAT_VERSION, rest), path) {
                check_re_encoding(&state, path);
            }
        }
    }
});
