//! The backing file: positioned I/O directly between the file and guest memory.
//!
//! Reads `pread` into the host mapping of guest memory and writes `pwrite` from it, one call
//! per guest-memory region the buffer spans, so data is never copied through a bounce buffer.
//! The guest may change its buffers while the kernel copies them; that only affects the
//! guest's own data (as with real DMA).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Errors of backing-file operations. Each names the operation and the file.
#[derive(Debug, thiserror::Error)]
pub enum DiskIoError {
    /// The file cannot be opened.
    #[error("open disk image {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file's size cannot be read.
    #[error("read the size of disk image {}", path.display())]
    Size {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A guest buffer is not in guest memory.
    #[error("{op} {len_bytes} bytes at guest address {gpa:#x}: not in guest memory")]
    GuestMemory {
        /// Read or write.
        op: &'static str,
        /// Buffer start.
        gpa: u64,
        /// Buffer length.
        len_bytes: u64,
    },
    /// The file ended before the requested range (it shrank after the device opened it).
    #[error("read {len_bytes} bytes at disk offset {offset}: the disk image ends before that")]
    UnexpectedEof {
        /// Offset in the file.
        offset: u64,
        /// Requested length.
        len_bytes: u64,
    },
    /// The system call failed.
    #[error("{op} at disk offset {offset}")]
    Syscall {
        /// pread, pwrite, fdatasync, fallocate.
        op: &'static str,
        /// Offset in the file.
        offset: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An open raw disk image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    size_bytes: u64,
    read_only: bool,
    punch_hole: bool,
}

impl DiskFile {
    /// Opens `path` read-only (`O_RDONLY`, so several VMs can share it) or read-write, and
    /// probes whether it can punch holes (for discard and write-zeroes).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskIoError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskIoError::Open {
                path: path.to_owned(),
                source,
            })?;
        // Seeking works for regular files and block devices alike.
        let size_bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskIoError::Size {
                path: path.to_owned(),
                source,
            })?;
        let mut disk = DiskFile {
            file,
            path: path.to_owned(),
            size_bytes,
            read_only,
            punch_hole: false,
        };
        // Punching a hole past the end changes nothing and tells whether the file system can.
        disk.punch_hole = !read_only && disk.punch(size_bytes, 4096).is_ok();
        Ok(disk)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size when opened, in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The file system supports `FALLOC_FL_PUNCH_HOLE` (and the file is writable).
    pub fn supports_punch_hole(&self) -> bool {
        self.punch_hole
    }

    /// Reads `len_bytes` at file `offset` into guest memory at `gpa`.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len_bytes: u64,
        offset: u64,
    ) -> Result<(), DiskIoError> {
        self.transfer(mem, gpa, len_bytes, offset, Direction::Read)
    }

    /// Writes `len_bytes` from guest memory at `gpa` to file `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len_bytes: u64,
        offset: u64,
    ) -> Result<(), DiskIoError> {
        self.transfer(mem, gpa, len_bytes, offset, Direction::Write)
    }

    /// Makes written data durable (`fdatasync`).
    pub fn flush(&self) -> Result<(), DiskIoError> {
        // SAFETY: fdatasync on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::fdatasync(self.file.as_raw_fd()) };
        if rc < 0 {
            return Err(DiskIoError::Syscall {
                op: "fdatasync",
                offset: 0,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Deallocates `len_bytes` at `offset`; reads then return zeroes.
    pub fn punch(&self, offset: u64, len_bytes: u64) -> Result<(), DiskIoError> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len_bytes,
        )
    }

    /// Zeroes `len_bytes` at `offset`, keeping them allocated where the file system can
    /// (`FALLOC_FL_ZERO_RANGE`), else by punching a hole (tmpfs has no zero-range).
    pub fn write_zeroes(&self, offset: u64, len_bytes: u64) -> Result<(), DiskIoError> {
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len_bytes,
        ) {
            Err(DiskIoError::Syscall { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                self.punch(offset, len_bytes)
            }
            other => other,
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len_bytes: u64) -> Result<(), DiskIoError> {
        let err = |source| DiskIoError::Syscall {
            op: "fallocate",
            offset,
            source,
        };
        let off = libc::off_t::try_from(offset).map_err(|_| err(einval()))?;
        let len = libc::off_t::try_from(len_bytes).map_err(|_| err(einval()))?;
        // SAFETY: fallocate on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if rc < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len_bytes: u64,
        offset: u64,
        dir: Direction,
    ) -> Result<(), DiskIoError> {
        let not_in_memory = || DiskIoError::GuestMemory {
            op: dir.name(),
            gpa,
            len_bytes,
        };
        let count = usize::try_from(len_bytes).map_err(|_| not_in_memory())?;
        let mut file_offset = offset;
        for slice in mem.get_slices(GuestAddress(gpa), count) {
            let slice = slice.map_err(|_| not_in_memory())?;
            let guard = slice.ptr_guard_mut();
            let base = guard.as_ptr();
            let mut done = 0usize;
            while done < slice.len() {
                let want = slice.len() - done;
                let at = libc::off_t::try_from(file_offset).map_err(|_| DiskIoError::Syscall {
                    op: dir.syscall(),
                    offset: file_offset,
                    source: einval(),
                })?;
                let fd = self.file.as_raw_fd();
                // SAFETY: `base..base + slice.len()` is mapped guest memory (the slice came
                // from the memory map and its guard keeps it valid); `done < slice.len()`, so
                // the `want` bytes at `base + done` stay inside it. The kernel copies between
                // the file and that range only.
                let n = unsafe {
                    let ptr = base.add(done).cast::<libc::c_void>();
                    match dir {
                        Direction::Read => libc::pread(fd, ptr, want, at),
                        Direction::Write => libc::pwrite(fd, ptr, want, at),
                    }
                };
                if n < 0 {
                    let source = std::io::Error::last_os_error();
                    if source.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(DiskIoError::Syscall {
                        op: dir.syscall(),
                        offset: file_offset,
                        source,
                    });
                }
                if n == 0 {
                    return Err(match dir {
                        Direction::Read => DiskIoError::UnexpectedEof { offset, len_bytes },
                        Direction::Write => DiskIoError::Syscall {
                            op: "pwrite",
                            offset: file_offset,
                            source: std::io::Error::from(std::io::ErrorKind::WriteZero),
                        },
                    });
                }
                done += n as usize;
                file_offset += n as u64;
            }
        }
        Ok(())
    }
}

fn einval() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EINVAL)
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Read => "read into",
            Direction::Write => "write from",
        }
    }

    fn syscall(self) -> &'static str {
        match self {
            Direction::Read => "pread",
            Direction::Write => "pwrite",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::Bytes;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        // Two regions with a gap, so a buffer can span a region boundary.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    fn image(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn reads_and_writes_span_regions() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let f = image(&data);
        let disk = DiskFile::open(f.path(), false).unwrap();
        assert_eq!(disk.size_bytes(), 8192);
        let mem = mem();
        disk.read_to_guest(&mem, 0x10000 - 100, 4096, 512).unwrap();
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x10000 - 100))
            .unwrap();
        assert_eq!(got, data[512..512 + 4096]);
        mem.write_slice(&[7u8; 1024], GuestAddress(0xff00)).unwrap();
        disk.write_from_guest(&mem, 0xff00, 1024, 0).unwrap();
        disk.flush().unwrap();
        let file = std::fs::read(f.path()).unwrap();
        assert_eq!(&file[..1024], &[7u8; 1024]);
        assert_eq!(&file[1024..], &data[1024..]);
    }

    #[test]
    fn failures_are_errors() {
        let f = image(&[1u8; 4096]);
        let disk = DiskFile::open(f.path(), true).unwrap();
        let mem = mem();
        // Outside guest memory.
        let err = disk.read_to_guest(&mem, 0x1f000, 0x2000, 0).unwrap_err();
        assert!(matches!(err, DiskIoError::GuestMemory { .. }), "{err}");
        // Past the end of the file.
        let err = disk.read_to_guest(&mem, 0, 512, 4096).unwrap_err();
        assert!(matches!(err, DiskIoError::UnexpectedEof { .. }), "{err}");
        // Writing a read-only file descriptor.
        let err = disk.write_from_guest(&mem, 0, 512, 0).unwrap_err();
        assert!(err.to_string().contains("pwrite"), "{err}");
        assert!(!disk.supports_punch_hole());
        let err = DiskFile::open(Path::new("/nonexistent/disk"), true).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk"), "{err}");
    }

    #[test]
    fn holes_read_as_zeroes() {
        let f = image(&[9u8; 16384]);
        let disk = DiskFile::open(f.path(), false).unwrap();
        // tmpfs, ext4, xfs and btrfs all punch holes.
        assert!(disk.supports_punch_hole());
        disk.punch(4096, 4096).unwrap();
        disk.write_zeroes(8192, 4096).unwrap();
        let file = std::fs::read(f.path()).unwrap();
        assert_eq!(file.len(), 16384);
        assert!(file[4096..12288].iter().all(|&b| b == 0));
        assert!(file[..4096].iter().chain(&file[12288..]).all(|&b| b == 9));
    }
}
