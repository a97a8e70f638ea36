//! The on-disk format: file names, magic numbers, the format version and the framing of the
//! state file and the memory file's header.
//!
//! A snapshot is a directory with two files:
//! - `state` — a 32-byte header (magic `VMMSNAPS`, format version, body length, CRC-32C of the
//!   body) followed by the encoded [`super::state::SnapshotState`]: MessagePack with field names
//!   from format 5 on, JSON before (see [`encode_state_body`]);
//! - `memory` — a 4 KiB header (magic `VMMSNAPM`, format version, the snapshot ID the state
//!   file names, data length, CRC-32C of the header) followed by the kept guest pages, each
//!   kept range at a page-aligned offset so it can be mapped straight into guest memory. The
//!   state file's index says where each range goes and holds a checksum per chunk (XXH64 from
//!   format 4 on, CRC-32C before).

use super::crc32c::crc32c;

/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// First bytes of a state file.
pub const STATE_MAGIC: [u8; 8] = *b"VMMSNAPS";
/// First bytes of a memory file.
pub const MEMORY_MAGIC: [u8; 8] = *b"VMMSNAPM";
/// The format this VMM writes (2: the state may describe a diff layer; 3: the memory index
/// records every page's class, `memory.classes`; 4: memory chunks carry XXH64 instead of
/// CRC-32C, see [`super::checksum`]; 5: the state body is MessagePack instead of JSON, see
/// [`encode_state_body`]).
pub const FORMAT_VERSION: u32 = 5;
/// The first format whose state body is MessagePack.
pub const MESSAGEPACK_STATE_SINCE: u32 = 5;
/// The oldest format this VMM reads (1: full snapshots only; each format's layout is a subset
/// of the next one's, so older snapshots load).
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Bytes of the state file's header.
pub const STATE_HEADER_BYTES: usize = 32;
/// Bytes of the memory file's header (one page, so data stays page aligned).
pub const MEMORY_HEADER_BYTES: u64 = 4096;
/// Largest state body accepted (a corrupt length must not make the reader allocate GiBs).
pub const MAX_STATE_BODY_BYTES: u64 = 64 << 20;
/// Page size of guest memory and of the memory file's layout.
pub const PAGE_BYTES: u64 = 4096;

/// What is wrong with a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Shorter than a header.
    #[error("truncated: {0} bytes, shorter than the header")]
    Truncated(u64),
    /// Wrong magic number.
    #[error("not a snapshot {0} file (bad magic number)")]
    BadMagic(&'static str),
    /// Another format version.
    #[error(
        "format version {found}, this VMM reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION}"
    )]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// The header's own checksum does not match.
    #[error("header checksum mismatch")]
    Checksum,
    /// The body length is implausible.
    #[error("body length {0} bytes is larger than the limit")]
    TooLong(u64),
}

/// The state file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateHeader {
    /// The file's format version ([`FORMAT_VERSION`] when this VMM writes it).
    pub format_version: u32,
    /// Bytes of JSON after the header.
    pub body_bytes: u64,
    /// CRC-32C of those bytes.
    pub body_crc32c: u32,
}

impl StateHeader {
    /// The 32 header bytes.
    pub fn encode(&self) -> [u8; STATE_HEADER_BYTES] {
        let mut out = [0u8; STATE_HEADER_BYTES];
        out[..8].copy_from_slice(&STATE_MAGIC);
        out[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        out[16..24].copy_from_slice(&self.body_bytes.to_le_bytes());
        out[24..28].copy_from_slice(&self.body_crc32c.to_le_bytes());
        let crc = crc32c(&out[..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and checks a header (magic, version, its checksum, the length limit).
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let Some(bytes) = bytes.get(..STATE_HEADER_BYTES) else {
            return Err(HeaderError::Truncated(bytes.len() as u64));
        };
        if bytes[..8] != STATE_MAGIC {
            return Err(HeaderError::BadMagic("state"));
        }
        let found = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&found) {
            return Err(HeaderError::Version { found });
        }
        let crc = u32::from_le_bytes(bytes[28..32].try_into().expect("4 bytes"));
        if crc32c(&bytes[..28]) != crc {
            return Err(HeaderError::Checksum);
        }
        let body_bytes = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if body_bytes > MAX_STATE_BODY_BYTES {
            return Err(HeaderError::TooLong(body_bytes));
        }
        Ok(Self {
            format_version: found,
            body_bytes,
            body_crc32c: u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes")),
        })
    }
}

/// The memory file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryHeader {
    /// The snapshot this file belongs to (the state file holds the same ID).
    pub snapshot_id: [u8; 16],
    /// Bytes after the header: page data and the holes between (see `MemoryIndex::data_bytes`).
    pub data_bytes: u64,
}

impl MemoryHeader {
    /// The first 40 meaningful bytes (the rest of the header page is zero).
    pub fn encode(&self) -> [u8; 44] {
        let mut out = [0u8; 44];
        out[..8].copy_from_slice(&MEMORY_MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[16..32].copy_from_slice(&self.snapshot_id);
        out[32..40].copy_from_slice(&self.data_bytes.to_le_bytes());
        let crc = crc32c(&out[..40]);
        out[40..44].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and checks a header.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let Some(bytes) = bytes.get(..44) else {
            return Err(HeaderError::Truncated(bytes.len() as u64));
        };
        if bytes[..8] != MEMORY_MAGIC {
            return Err(HeaderError::BadMagic("memory"));
        }
        let found = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&found) {
            return Err(HeaderError::Version { found });
        }
        let crc = u32::from_le_bytes(bytes[40..44].try_into().expect("4 bytes"));
        if crc32c(&bytes[..40]) != crc {
            return Err(HeaderError::Checksum);
        }
        Ok(Self {
            snapshot_id: bytes[16..32].try_into().expect("16 bytes"),
            data_bytes: u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes")),
        })
    }
}

/// Why a state body does not decode.
#[derive(Debug, thiserror::Error)]
pub enum StateBodyError {
    /// Formats 1 to 4: JSON.
    #[error("its JSON body (format {format_version}) is not a valid state")]
    Json {
        /// The header's format version.
        format_version: u32,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Format 5 on: MessagePack.
    #[error("its MessagePack body (format {format_version}) is not a valid state")]
    MessagePack {
        /// The header's format version.
        format_version: u32,
        /// Why.
        #[source]
        source: rmp_serde::decode::Error,
    },
}

/// Encodes a state body as this VMM writes it: MessagePack, each struct a map keyed by field
/// names (the state's serde attributes, tagged enums and optional fields, work as in JSON).
/// Register blobs (XSAVE, LAPIC, CPUID, MSRs) become byte strings instead of JSON arrays of
/// numbers: decoding the state took 55-62 ms of a restore in the nested rig and about 0.3 ms on
/// a host CPU as JSON, the largest part of the VMM's own work before the vCPUs run.
pub fn encode_state_body(
    state: &super::state::SnapshotState,
) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(state)
}

/// A whole state file: the header for `body` (its length and CRC-32C) under `format_version`,
/// then `body`. The writer, the fuzz targets and the benchmarks all frame state files with it.
pub fn state_file_bytes(format_version: u32, body: &[u8]) -> Vec<u8> {
    let header = StateHeader {
        format_version,
        body_bytes: body.len() as u64,
        body_crc32c: crc32c(body),
    };
    let mut file = Vec::with_capacity(STATE_HEADER_BYTES + body.len());
    file.extend_from_slice(&header.encode());
    file.extend_from_slice(body);
    file
}

/// Decodes a state body of `format_version` (MessagePack from format 5 on, JSON before).
pub fn decode_state_body(
    format_version: u32,
    body: &[u8],
) -> Result<super::state::SnapshotState, StateBodyError> {
    if format_version >= MESSAGEPACK_STATE_SINCE {
        rmp_serde::from_slice(body).map_err(|source| StateBodyError::MessagePack {
            format_version,
            source,
        })
    } else {
        serde_json::from_slice(body).map_err(|source| StateBodyError::Json {
            format_version,
            source,
        })
    }
}

/// A snapshot ID as hex, for messages and `inspect`.
pub fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_damage() {
        let state = StateHeader {
            format_version: FORMAT_VERSION,
            body_bytes: 1234,
            body_crc32c: 0xdead_beef,
        };
        let bytes = state.encode();
        assert_eq!(StateHeader::decode(&bytes), Ok(state));
        assert_eq!(
            StateHeader::decode(&bytes[..10]),
            Err(HeaderError::Truncated(10))
        );
        let mut other_version = bytes;
        other_version[8] = 9;
        assert_eq!(
            StateHeader::decode(&other_version),
            Err(HeaderError::Version { found: 9 })
        );
        let mut flipped = bytes;
        flipped[17] ^= 1;
        assert_eq!(StateHeader::decode(&flipped), Err(HeaderError::Checksum));
        let memory = MemoryHeader {
            snapshot_id: [7; 16],
            data_bytes: 8192,
        };
        let bytes = memory.encode();
        assert_eq!(MemoryHeader::decode(&bytes), Ok(memory));
        assert_eq!(
            MemoryHeader::decode(&[&state.encode()[..], &[0u8; 32]].concat()),
            Err(HeaderError::BadMagic("memory"))
        );
        assert_eq!(id_hex(&[0xab; 16]).len(), 32);
    }

    /// A state like a restored VM's with a memory index of 500 chunks and their page classes.
    fn sample_state() -> super::super::state::SnapshotState {
        use super::super::checksum::ChunkSum;
        use super::super::map::{PageClass, PageClassRuns};
        use super::super::state::{MemoryChunk, MemoryIndex, SnapshotState};
        let mut classes = PageClassRuns::default();
        let chunks = (0..500u64)
            .map(|i| {
                classes.push(PageClass::Kept, 3);
                classes.push(PageClass::Reported, 5);
                MemoryChunk {
                    gpa: i * 8 * PAGE_BYTES,
                    len_bytes: 3 * PAGE_BYTES,
                    file_offset: MEMORY_HEADER_BYTES + i * 3 * PAGE_BYTES,
                    sum: ChunkSum::Xxh64(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                }
            })
            .collect();
        SnapshotState::example(MemoryIndex {
            regions: vec![(0, 500 * 8 * PAGE_BYTES)],
            chunks,
            data_bytes: 500 * 3 * PAGE_BYTES,
            pages: Default::default(),
            classes: Some(classes),
        })
    }

    #[test]
    fn state_bodies_round_trip_as_messagepack_and_old_json_bodies_still_decode() {
        let state = sample_state();
        let body = encode_state_body(&state).unwrap();
        let decoded = decode_state_body(FORMAT_VERSION, &body).unwrap();
        assert_eq!(format!("{decoded:?}"), format!("{state:?}"));
        assert_eq!(encode_state_body(&decoded).unwrap(), body);
        // Formats 1 to 4 are JSON, and this VMM still reads them.
        let json = serde_json::to_vec(&state).unwrap();
        let decoded = decode_state_body(4, &json).unwrap();
        assert_eq!(format!("{decoded:?}"), format!("{state:?}"));
        // Register blobs are byte strings, not arrays of numbers: the body is far smaller.
        assert!(
            body.len() * 5 < json.len() * 3,
            "MessagePack {} bytes, JSON {}",
            body.len(),
            json.len()
        );
    }

    #[test]
    fn a_body_in_the_other_encoding_or_cut_short_is_refused_with_its_format() {
        let state = sample_state();
        let json = serde_json::to_vec(&state).unwrap();
        let body = encode_state_body(&state).unwrap();
        let err = decode_state_body(FORMAT_VERSION, &json).unwrap_err();
        assert!(
            err.to_string().contains("MessagePack body (format 5)"),
            "{err}"
        );
        let err = decode_state_body(4, &body).unwrap_err();
        assert!(err.to_string().contains("JSON body (format 4)"), "{err}");
        for cut in [0, 1, body.len() / 3, body.len() - 1] {
            assert!(
                decode_state_body(FORMAT_VERSION, &body[..cut]).is_err(),
                "{cut}"
            );
        }
    }
}
