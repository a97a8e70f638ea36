//! Loading a snapshot: the state file checked (header, version, checksum, decoding, index
//! consistency) and the memory file matched to it (magic, version, snapshot ID, length).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::crc32c::crc32c;
use super::format::{
    decode_state_body, id_hex, MemoryHeader, StateHeader, MEMORY_FILE, STATE_FILE,
    STATE_HEADER_BYTES,
};
use super::memory_file::{file_holes, validate_index, verify_holes};
use super::state::SnapshotState;
use super::write_pipe::ms_since;
use super::SnapshotError;

/// A snapshot whose state is loaded and whose memory file is open and matched to it.
pub struct LoadedSnapshot {
    /// The decoded state.
    pub state: SnapshotState,
    /// The state file's path.
    pub state_path: PathBuf,
    /// The memory file, open read-only.
    pub memory: File,
    /// Its path.
    pub memory_path: PathBuf,
    /// Its length in bytes.
    pub memory_file_bytes: u64,
    /// The holes between its chunks, `(file_offset, len_bytes)` in file order (must read zero).
    pub memory_holes: Vec<(u64, u64)>,
    /// The state file's length in bytes.
    pub state_file_bytes: u64,
    /// The state file's format version.
    pub format_version: u32,
    /// Where loading spent its time.
    pub timings: LoadTimings,
}

/// Where loading a snapshot spent its time, in ms (logged by restore: in the nested rig loading
/// took 80-100 ms of emulated time, even for a 62 KB state file).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadTimings {
    /// Reading the state file.
    pub read_state_ms: f64,
    /// Checking its header and checksum and decoding its JSON.
    pub decode_state_ms: f64,
    /// Opening the memory file, matching its header, checking the index, finding the holes.
    pub memory_file_ms: f64,
}

/// A state file read and checked.
pub struct StateFile {
    /// The decoded state.
    pub state: SnapshotState,
    /// Its path.
    pub path: PathBuf,
    /// Its length in bytes.
    pub bytes: u64,
    /// The format version in its header.
    pub format_version: u32,
    /// Reading it, ms.
    pub read_ms: f64,
    /// Checking and decoding it, ms.
    pub decode_ms: f64,
}

/// Reads and checks the state file of `dir`.
pub fn read_state(dir: &Path) -> Result<StateFile, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let started = std::time::Instant::now();
    let mut file = File::open(&path).map_err(SnapshotError::io("open", &path))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(SnapshotError::io("read", &path))?;
    let read_ms = ms_since(started);
    let decode_started = std::time::Instant::now();
    let (state, header) = parse_state_and_header(&bytes, &path)?;
    let format_version = header.format_version;
    Ok(StateFile {
        state,
        path,
        bytes: bytes.len() as u64,
        format_version,
        read_ms,
        decode_ms: ms_since(decode_started),
    })
}

/// Checks and decodes the bytes of a state file (`path` names it in errors): header, length,
/// checksum, body (MessagePack or, before format 5, JSON), vCPU count.
pub fn parse_state(bytes: &[u8], path: &Path) -> Result<SnapshotState, SnapshotError> {
    parse_state_and_header(bytes, path).map(|(state, _)| state)
}

/// [`parse_state`], also returning the checked header.
fn parse_state_and_header(
    bytes: &[u8],
    path: &Path,
) -> Result<(SnapshotState, StateHeader), SnapshotError> {
    let path = path.to_owned();
    let header = StateHeader::decode(bytes).map_err(|source| SnapshotError::Header {
        path: path.clone(),
        source,
    })?;
    let needed = STATE_HEADER_BYTES as u64 + header.body_bytes;
    if (bytes.len() as u64) < needed {
        return Err(SnapshotError::Truncated {
            path,
            needed,
            actual: bytes.len() as u64,
        });
    }
    if (bytes.len() as u64) > needed {
        return Err(SnapshotError::Invalid {
            path,
            reason: format!(
                "{} bytes after the state body (expected {needed} bytes in all)",
                bytes.len() as u64 - needed
            ),
        });
    }
    let body = &bytes[STATE_HEADER_BYTES..];
    let found = crc32c(body);
    if found != header.body_crc32c {
        return Err(SnapshotError::StateChecksum {
            path,
            expected: header.body_crc32c,
            found,
        });
    }
    let state = decode_state_body(header.format_version, body).map_err(|source| {
        SnapshotError::StateDecode {
            path: path.clone(),
            source,
        }
    })?;
    if state.vcpus.is_empty()
        || state.vcpus.len() != usize::from(state.config.machine_config.vcpu_count)
        || state
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| usize::from(v.id) != i)
    {
        return Err(SnapshotError::Invalid {
            path,
            reason: "the vCPU states do not match the configured vCPU count".into(),
        });
    }
    Ok((state, header))
}

/// Loads `dir`: the state file, then the memory file, checked against each other.
pub fn load(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    let StateFile {
        state,
        path: state_path,
        bytes: state_file_bytes,
        format_version,
        read_ms,
        decode_ms,
    } = read_state(dir)?;
    let memory_started = std::time::Instant::now();
    let memory_path = dir.join(MEMORY_FILE);
    let memory = File::open(&memory_path).map_err(SnapshotError::io("open", &memory_path))?;
    let memory_file_bytes = memory
        .metadata()
        .map_err(SnapshotError::io("stat", &memory_path))?
        .len();
    let mut header = [0u8; 64];
    let read = memory
        .read_at(&mut header, 0)
        .map_err(SnapshotError::io("read", &memory_path))?;
    let header = MemoryHeader::decode(&header[..read.min(header.len())]).map_err(|source| {
        SnapshotError::Header {
            path: memory_path.clone(),
            source,
        }
    })?;
    if header.snapshot_id != state.snapshot_id {
        return Err(SnapshotError::ForeignMemoryFile {
            path: memory_path,
            expected: id_hex(&state.snapshot_id),
            found: id_hex(&header.snapshot_id),
        });
    }
    if header.data_bytes != state.memory.data_bytes {
        return Err(SnapshotError::Invalid {
            path: memory_path,
            reason: format!(
                "the header says {} data bytes, the state's index {}",
                header.data_bytes, state.memory.data_bytes
            ),
        });
    }
    validate_index(&state.memory, &memory_path, memory_file_bytes)?;
    let memory_holes = file_holes(&state.memory);
    let timings = LoadTimings {
        read_state_ms: read_ms,
        decode_state_ms: decode_ms,
        memory_file_ms: ms_since(memory_started),
    };
    Ok(LoadedSnapshot {
        timings,
        state,
        state_path,
        memory,
        memory_path,
        memory_file_bytes,
        memory_holes,
        state_file_bytes,
        format_version,
    })
}

impl LoadedSnapshot {
    /// Verifies every chunk by reading the memory file, on as many threads as there are CPUs,
    /// and that its holes read zero (for `inspect` and layered restores; a single snapshot's
    /// restore verifies the chunks through the mapping instead).
    pub fn verify_file(&self) -> Result<(), SnapshotError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        super::memory_file::verify_file(
            &self.memory,
            &self.state.memory.chunks,
            &self.memory_path,
            threads,
        )?;
        self.verify_holes()
    }

    /// Checks that the memory file's holes read zero.
    pub fn verify_holes(&self) -> Result<(), SnapshotError> {
        verify_holes(&self.memory, &self.memory_holes, &self.memory_path)
    }
}
