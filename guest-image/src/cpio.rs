//! A small writer (and reader, for checks) of the "newc" cpio format that the Linux kernel
//! unpacks as an initramfs (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Every entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded to a multiple of 4 bytes (counting the header), then the data padded
//! to a multiple of 4. The archive ends with an entry named `TRAILER!!!`. The writer is
//! deterministic: modification times are 0 and inode numbers count up from 1.

use std::io::{self, Write};

/// The newc magic number (no CRC).
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Length of a newc header in bytes.
pub const HEADER_LEN_BYTES: usize = 110;
/// Name of the last entry of every archive.
pub const TRAILER_NAME: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170_000;
/// Regular file type bits.
pub const S_IFREG: u32 = 0o100_000;
/// Directory type bits.
pub const S_IFDIR: u32 = 0o040_000;
/// Symbolic link type bits.
pub const S_IFLNK: u32 = 0o120_000;
/// Character device type bits.
pub const S_IFCHR: u32 = 0o020_000;

/// Errors of writing or parsing a cpio archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// Writing to the underlying writer failed.
    #[error("writing cpio entry {name:?}")]
    Write {
        /// Entry being written.
        name: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The entry name cannot be stored (empty, absolute, contains NUL or `..`).
    #[error("invalid cpio entry name {0:?}")]
    InvalidName(String),
    /// Entry data or name does not fit the 32-bit size fields.
    #[error("cpio entry {0:?} is too large for the newc format")]
    TooLarge(String),
    /// The archive being parsed is malformed.
    #[error("malformed cpio archive at byte {offset_bytes}: {what}")]
    Malformed {
        /// Offset of the problem in the archive.
        offset_bytes: usize,
        /// What is wrong.
        what: String,
    },
}

/// Streams newc entries into a writer.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written_bytes: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written_bytes: 0,
        }
    }

    /// Bytes written so far.
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes
    }

    /// Adds a directory with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file with permission bits `perm` and contents `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link `name` pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node with permission bits `perm` and device numbers.
    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.raw_entry(TRAILER_NAME, 0, 0, 1, (0, 0), &[])?;
        self.out.flush().map_err(|source| CpioError::Write {
            name: TRAILER_NAME.to_string(),
            source,
        })?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        validate_name(name)?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.raw_entry(name, ino, mode, nlink, rdev, data)
    }

    fn raw_entry(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        (rdev_major, rdev_minor): (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let too_large = || CpioError::TooLarge(name.to_string());
        let name_size = u32::try_from(name.len() + 1).map_err(|_| too_large())?;
        let file_size = u32::try_from(data.len()).map_err(|_| too_large())?;
        let fields: [u32; 13] = [
            ino, mode, 0, // uid
            0, // gid
            nlink, 0, // mtime
            file_size, 0, // devmajor
            0, // devminor
            rdev_major, rdev_minor, name_size, 0, // check
        ];
        let mut header = Vec::with_capacity(HEADER_LEN_BYTES + name.len() + 4);
        header.extend_from_slice(NEWC_MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        header.resize(align4(header.len()), 0);
        let data_pad = align4(data.len()) - data.len();
        let map = |source| CpioError::Write {
            name: name.to_string(),
            source,
        };
        self.out.write_all(&header).map_err(map)?;
        self.out.write_all(data).map_err(map)?;
        self.out.write_all(&[0u8; 3][..data_pad]).map_err(map)?;
        self.written_bytes += (header.len() + data.len() + data_pad) as u64;
        Ok(())
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn validate_name(name: &str) -> Result<(), CpioError> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\0')
        || name == TRAILER_NAME
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(CpioError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// One entry read back from an archive by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// Path inside the archive (no leading `/`).
    pub name: String,
    /// Inode number.
    pub ino: u32,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Modification time (seconds since the epoch).
    pub mtime: u32,
    /// Device major number of a device node.
    pub rdev_major: u32,
    /// Device minor number of a device node.
    pub rdev_minor: u32,
    /// File contents or symlink target.
    pub data: Vec<u8>,
}

impl CpioEntry {
    /// The file type bits of `mode`.
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
}

/// Parses a whole newc archive, checking magic, alignment and the trailer. Returns the entries
/// before the trailer.
pub fn parse(archive: &[u8]) -> Result<Vec<CpioEntry>, CpioError> {
    let mut entries = Vec::new();
    let mut offset = 0usize;
    loop {
        let entry_offset = offset;
        let malformed = |what: String| CpioError::Malformed {
            offset_bytes: entry_offset,
            what,
        };
        if offset & 3 != 0 {
            return Err(malformed("entry not 4-byte aligned".into()));
        }
        let header = archive
            .get(offset..offset + HEADER_LEN_BYTES)
            .ok_or_else(|| malformed("truncated header (no trailer?)".into()))?;
        if &header[..6] != NEWC_MAGIC {
            return Err(malformed(format!("bad magic {:?}", &header[..6])));
        }
        let mut fields = [0u32; 13];
        for (i, field) in fields.iter_mut().enumerate() {
            let hex = &header[6 + 8 * i..14 + 8 * i];
            let text = std::str::from_utf8(hex)
                .map_err(|_| malformed(format!("header field {i} not ASCII")))?;
            *field = u32::from_str_radix(text, 16)
                .map_err(|_| malformed(format!("header field {i} not hex: {text:?}")))?;
        }
        let [ino, mode, uid, gid, nlink, mtime, file_size, _, _, rdev_major, rdev_minor, name_size, _] =
            fields;
        let name_start = offset + HEADER_LEN_BYTES;
        let name_end = name_start + name_size as usize;
        let name_bytes = archive
            .get(name_start..name_end)
            .ok_or_else(|| malformed("truncated name".into()))?;
        let (last, name_bytes) = name_bytes
            .split_last()
            .ok_or_else(|| malformed("empty name".into()))?;
        if *last != 0 {
            return Err(malformed("name not NUL-terminated".into()));
        }
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| malformed("name not UTF-8".into()))?;
        let data_start = align4(name_end);
        if archive
            .get(name_end..data_start)
            .is_none_or(|pad| pad.iter().any(|&b| b != 0))
        {
            return Err(malformed(format!("bad padding after name {name:?}")));
        }
        let data_end = data_start + file_size as usize;
        let data = archive
            .get(data_start..data_end)
            .ok_or_else(|| malformed(format!("truncated data of {name:?}")))?
            .to_vec();
        let next = align4(data_end);
        if archive
            .get(data_end..next)
            .is_none_or(|pad| pad.iter().any(|&b| b != 0))
        {
            return Err(malformed(format!("bad padding after data of {name:?}")));
        }
        if name == TRAILER_NAME {
            if archive[next..].iter().any(|&b| b != 0) {
                return Err(malformed("data after trailer".into()));
            }
            return Ok(entries);
        }
        offset = next;
        entries.push(CpioEntry {
            name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev_major,
            rdev_minor,
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/a", 0o755, b"hello").unwrap();
        w.file("bin/empty", 0o644, b"").unwrap();
        w.file("bin/four", 0o644, b"1234").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.dir("dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let written = w.written_bytes();
        let out = w.finish().unwrap();
        assert!(out.len() as u64 > written);
        out
    }

    #[test]
    fn round_trips_entries_and_fields() {
        let archive = sample();
        assert_eq!(archive.len() % 4, 0);
        let entries = parse(&archive).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/a",
                "bin/empty",
                "bin/four",
                "bin/sh",
                "dev",
                "dev/console"
            ]
        );
        let a = &entries[1];
        assert_eq!(a.mode, S_IFREG | 0o755);
        assert_eq!(a.data, b"hello");
        assert_eq!((a.uid, a.gid, a.nlink, a.mtime), (0, 0, 1, 0));
        assert_eq!(entries[0].file_type(), S_IFDIR);
        assert_eq!(entries[0].nlink, 2);
        assert_eq!(entries[4].file_type(), S_IFLNK);
        assert_eq!(entries[4].data, b"busybox");
        let console = &entries[6];
        assert_eq!(console.mode, S_IFCHR | 0o600);
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        assert!(console.data.is_empty());
        // Inode numbers are unique and count from 1.
        let inos: Vec<u32> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos, (1..=7).collect::<Vec<_>>());
    }

    #[test]
    fn header_layout_and_padding_are_exact() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("abc", 0o644, b"xyzzy").unwrap();
        let archive = w.finish().unwrap();
        let header = std::str::from_utf8(&archive[..HEADER_LEN_BYTES]).unwrap();
        assert_eq!(
            header,
            concat!(
                "070701", "00000001", // ino
                "000081A4", // mode 0100644
                "00000000", // uid
                "00000000", // gid
                "00000001", // nlink
                "00000000", // mtime
                "00000005", // filesize
                "00000000", "00000000", "00000000", "00000000",
                "00000004", // namesize "abc\0"
                "00000000"
            )
        );
        // 110 + 4 = 114 -> padded to 116; data 5 -> padded to 8.
        assert_eq!(&archive[110..116], b"abc\0\0\0");
        assert_eq!(&archive[116..124], b"xyzzy\0\0\0");
        // Trailer follows directly.
        assert_eq!(&archive[124..130], NEWC_MAGIC);
        let trailer_name = &archive[124 + 110..124 + 110 + 11];
        assert_eq!(trailer_name, b"TRAILER!!!\0");
        assert_eq!(archive.len(), 124 + 124);
    }

    #[test]
    fn rejects_bad_names() {
        let mut w = CpioWriter::new(Vec::new());
        for name in ["", "/abs", "a/../b", "a//b", "a/", "TRAILER!!!", "nul\0"] {
            assert!(
                matches!(w.file(name, 0o644, b""), Err(CpioError::InvalidName(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn parse_detects_corruption() {
        let archive = sample();
        assert!(parse(&archive[..archive.len() - 4]).is_err(), "truncated");
        let mut bad = archive.clone();
        bad[0] = b'1';
        assert!(matches!(
            parse(&bad),
            Err(CpioError::Malformed {
                offset_bytes: 0,
                ..
            })
        ));
        let mut no_trailer = CpioWriter::new(Vec::new());
        no_trailer.file("x", 0o644, b"1").unwrap();
        assert!(parse(&no_trailer.out).is_err());
    }

    #[test]
    fn matches_system_cpio_listing() {
        // Cross-check with GNU cpio when it is installed (it is on the dev machines).
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            return;
        };
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "bin\nbin/a\nbin/empty\nbin/four\nbin/sh\ndev\ndev/console\n"
        );
    }
}
