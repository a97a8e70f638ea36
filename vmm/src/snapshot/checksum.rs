//! The checksum of each memory chunk: XXH64 from format 4 on, CRC-32C in formats 1 to 3 (still
//! read and verified).
//!
//! Why XXH64: a save checksums every kept page and the first restore of a file on a host checks
//! them all again, so the checksum is on both hot paths. XXH64 is plain 64-bit integer
//! arithmetic. CRC-32C's fast path is SSE4.2's `crc32` instruction, which some CPUs and all
//! emulators run slowly. Measured (`cargo run --release -p bench -- checksums --rig`,
//! 2026-11-27): on this host XXH64 6.4 GiB/s, CRC-32C 6.2 GiB/s; in the nested rig (TCG) XXH64
//! 1.98 GiB/s, CRC-32C 0.11 GiB/s, XXH3 (SSE2) 0.50 GiB/s. The state file and the headers keep
//! CRC-32C: they are a few KiB.

use super::crc32c::crc32c;

/// A chunk's checksum, with the algorithm its format used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkSum {
    /// CRC-32C (Castagnoli), formats 1 to 3.
    Crc32c(u32),
    /// XXH64 with seed 0, format 4 on.
    Xxh64(u64),
}

impl ChunkSum {
    /// A placeholder for a chunk whose bytes are not checksummed yet (or are never verified,
    /// as in the merged chunk lists a layered restore maps).
    pub const PENDING: ChunkSum = ChunkSum::Xxh64(0);

    /// The checksum this VMM writes for `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::Xxh64(xxh64(bytes))
    }

    /// Whether `bytes` have this checksum (computed with the same algorithm).
    pub fn matches(self, bytes: &[u8]) -> bool {
        match self {
            Self::Crc32c(sum) => crc32c(bytes) == sum,
            Self::Xxh64(sum) => xxh64(bytes) == sum,
        }
    }

    /// The same checksum with its lowest bit flipped (tests damage an index with it).
    #[cfg(test)]
    pub(crate) fn flipped(self) -> Self {
        match self {
            Self::Crc32c(sum) => Self::Crc32c(sum ^ 1),
            Self::Xxh64(sum) => Self::Xxh64(sum ^ 1),
        }
    }

    /// The algorithm's name, for messages and `inspect`.
    pub fn algorithm(self) -> &'static str {
        match self {
            Self::Crc32c(_) => "crc32c",
            Self::Xxh64(_) => "xxh64",
        }
    }
}

/// XXH64 of `bytes` with seed 0.
fn xxh64(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(bytes, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_algorithms_verify_and_catch_a_flipped_bit() {
        // Reference values: XXH64("", 0) from the xxHash specification, CRC-32C("123456789").
        assert_eq!(ChunkSum::of(b""), ChunkSum::Xxh64(0xef46_db37_51d8_e999));
        assert!(ChunkSum::Crc32c(0xe306_9283).matches(b"123456789"));
        let mut data: Vec<u8> = (0..20_000u32).map(|i| (i * 31 + 7) as u8).collect();
        for sum in [ChunkSum::of(&data), ChunkSum::Crc32c(crc32c(&data))] {
            assert!(sum.matches(&data), "{}", sum.algorithm());
            data[12_345] ^= 0x10;
            assert!(!sum.matches(&data), "{}", sum.algorithm());
            data[12_345] ^= 0x10;
        }
    }
}
