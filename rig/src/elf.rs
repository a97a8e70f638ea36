//! Just enough ELF parsing to tell a statically linked executable from a dynamic one.

use crate::{Result, RigError};
use std::io::Read;
use std::path::Path;

/// ELF program header type of the interpreter (the dynamic loader) entry.
const PT_INTERP: u32 = 3;

/// Whether `path` is a 64-bit little-endian ELF file without an interpreter (`PT_INTERP`), i.e.
/// one that runs without a dynamic loader (static or static-pie). Non-ELF files give `false`.
pub fn is_static_executable(path: &Path) -> Result<bool> {
    let err = |source| RigError::ElfRead {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    // Program headers of Rust binaries sit right after the 64-byte ELF header; 64 KiB is plenty.
    let mut buf = Vec::with_capacity(64 * 1024);
    f.by_ref()
        .take(64 * 1024)
        .read_to_end(&mut buf)
        .map_err(err)?;
    Ok(static_from_bytes(&buf))
}

fn static_from_bytes(b: &[u8]) -> bool {
    // e_ident: magic, ELFCLASS64 (2), ELFDATA2LSB (1).
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap_or_default()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    if phentsize < 4 {
        return false;
    }
    (0..phnum).all(|i| {
        let o = phoff.saturating_add(i * phentsize);
        match b.get(o..o + 4) {
            Some(t) => u32::from_le_bytes(t.try_into().unwrap_or_default()) != PT_INTERP,
            None => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_is_dynamic_and_text_is_not_elf() {
        // /bin/sh on the build hosts is a dynamically linked ELF.
        assert!(!is_static_executable(Path::new("/bin/sh")).unwrap());
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), b"#!/bin/sh\necho hi\n").unwrap();
        assert!(!is_static_executable(t.path()).unwrap());
    }

    #[test]
    fn synthetic_headers() {
        let mut b = vec![0u8; 64 + 2 * 56];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        b[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        b[120..124].copy_from_slice(&2u32.to_le_bytes()); // PT_DYNAMIC (static-pie has it)
        assert!(static_from_bytes(&b));
        b[120..124].copy_from_slice(&PT_INTERP.to_le_bytes());
        assert!(!static_from_bytes(&b));
    }

    #[test]
    fn missing_file_is_an_error() {
        assert!(is_static_executable(Path::new("/nonexistent")).is_err());
    }
}
