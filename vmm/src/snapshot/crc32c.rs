//! CRC-32C (Castagnoli), the checksum of every state file and memory chunk: the SSE4.2 `crc32`
//! instruction where the CPU has it (several GiB/s), a table otherwise.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82f6_3b78;

const fn table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static TABLE: [u32; 256] = table();

fn update_table(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[target_feature(enable = "sse4.2")]
fn update_sse42(mut crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut words = data.chunks_exact(8);
    let mut crc64 = u64::from(crc);
    for word in &mut words {
        let value = u64::from_le_bytes(word.try_into().expect("8-byte chunk"));
        crc64 = _mm_crc32_u64(crc64, value);
    }
    crc = crc64 as u32;
    for &byte in words.remainder() {
        crc = _mm_crc32_u8(crc, byte);
    }
    crc
}

/// Continues a CRC-32C over `data`; start with `0`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    let crc = !crc;
    let crc = if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE4.2 (checked just above).
        unsafe { update_sse42(crc, data) }
    } else {
        update_table(crc, data)
    };
    !crc
}

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors_and_both_paths_agree() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(!update_table(!0, &data), crc32c(&data));
        let (a, b) = data.split_at(4321);
        assert_eq!(crc32c_append(crc32c(a), b), crc32c(&data));
    }
}
