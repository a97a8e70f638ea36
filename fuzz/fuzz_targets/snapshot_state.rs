//! Snapshot file parsers (vmm/src/snapshot/{format,reader}.rs): the state file (header, length,
//! checksum, JSON body) and the memory file's header. The first byte picks what the rest is.
//! Invariants: decoded headers re-encode to bytes that decode to the same header; a state that
//! parses re-encodes (JSON + a fresh header) to a file that parses to the same JSON.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::crc32c::crc32c;
use vmm::snapshot::format::{MemoryHeader, StateHeader, STATE_HEADER_BYTES};
use vmm::snapshot::reader::parse_state;

/// A state file around `body` with a valid header.
fn state_file(body: &[u8]) -> Vec<u8> {
    let header = StateHeader {
        body_bytes: body.len() as u64,
        format_version: vmm::snapshot::format::FORMAT_VERSION,
        body_crc32c: crc32c(body),
    };
    let mut file = header.encode().to_vec();
    file.extend_from_slice(body);
    file
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new("fuzz/state");
    match mode % 4 {
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
                let json = serde_json::to_vec(&state).expect("state encodes");
                let again = parse_state(&state_file(&json), path).expect("re-encoded state parses");
                assert_eq!(serde_json::to_vec(&again).unwrap(), json);
            }
        }
        _ => {
            // A valid header around a fuzzed body: reaches the JSON decoder and the checks after.
            if let Ok(state) = parse_state(&state_file(rest), path) {
                let json = serde_json::to_vec(&state).expect("state encodes");
                let again = parse_state(&state_file(&json), path).expect("re-encoded state parses");
                assert_eq!(serde_json::to_vec(&again).unwrap(), json);
            }
        }
    }
});
