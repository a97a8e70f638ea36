//! Parsing and validating the descriptor chains the guest submits (virtio 1.2 §5.2.6).
//!
//! A request is a chain of device-readable descriptors followed by device-writable ones. No
//! framing is assumed: the 16-byte header (`type`, `reserved`, `sector`) is the first 16 bytes
//! of the readable part, the status byte is the last byte of the writable part, and data is
//! what lies between (readable for writes, discard and write-zeroes; writable for reads and
//! GET_ID). Every buffer is checked to lie in guest memory and every sector range against the
//! capacity, with overflow-checked arithmetic: nothing the guest writes can make the device
//! touch memory outside guest RAM or bytes outside the disk.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Read sectors into the guest.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write sectors from the guest.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Make previous writes durable.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Return the device's serial (20 bytes).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Deallocate sector ranges.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Zero sector ranges.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: the request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes of the request header.
pub const HEADER_BYTES: u64 = 16;
/// Bytes of one discard / write-zeroes range (`sector`, `num_sectors`, `flags`).
pub const RANGE_BYTES: u64 = 16;
/// Bytes of the GET_ID answer.
pub const GET_ID_BYTES: usize = 20;
/// `flags` bit of a write-zeroes range: the device may deallocate.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_BYTES: u64 = 512;
/// Most ranges in one discard or write-zeroes request (the `max_*_seg` config fields).
pub const MAX_RANGES: u32 = 32;
/// Largest data transfer of one request: bounds the work one chain can cause.
pub const MAX_DATA_BYTES: u64 = 64 << 20;

/// A guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len_bytes: u64,
}

/// One discard or write-zeroes range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Write-zeroes only: the device may deallocate.
    pub unmap: bool,
}

/// What a request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes from `sector` into the data buffers.
    In,
    /// Write the data buffers at `sector`.
    Out,
    /// Flush.
    Flush,
    /// Write the serial into the data buffers.
    GetId,
    /// Deallocate these ranges.
    Discard(Vec<SectorRange>),
    /// Zero these ranges.
    WriteZeroes(Vec<SectorRange>),
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// First sector (reads and writes).
    pub sector: u64,
    /// Data buffers, in order.
    pub data: Vec<Segment>,
    /// Total data length in bytes.
    pub data_len_bytes: u64,
}

impl Request {
    /// Whether the request changes the disk (refused on a read-only disk).
    pub fn is_write(&self) -> bool {
        matches!(
            self.kind,
            RequestKind::Out | RequestKind::Discard(_) | RequestKind::WriteZeroes(_)
        )
    }
}

/// A chain the device cannot answer at all: there is no status byte to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// No device-writable descriptor (or only empty ones).
    #[error("the chain has no device-writable status byte")]
    NoStatus,
    /// The last writable descriptor is not in guest memory.
    #[error("the status byte at {gpa:#x} is not in guest memory")]
    StatusOutsideMemory {
        /// Its address.
        gpa: u64,
    },
}

/// A request the device answers with an error status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A buffer is not in guest memory.
    #[error("buffer of {len_bytes} bytes at {gpa:#x} is not in guest memory")]
    OutsideMemory {
        /// Buffer start.
        gpa: u64,
        /// Buffer length.
        len_bytes: u64,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// The readable part is shorter than the header.
    #[error("the request header needs {HEADER_BYTES} readable bytes, the chain has {0}")]
    ShortHeader(u64),
    /// Data in the wrong direction (e.g. writable buffers in a write request).
    #[error("{kind} request with {len_bytes} bytes of {direction} data")]
    WrongDirection {
        /// Request type name.
        kind: &'static str,
        /// Unexpected direction.
        direction: &'static str,
        /// Its size.
        len_bytes: u64,
    },
    /// Read or write length not a multiple of 512 or too large.
    #[error("data length {0} is not a multiple of 512 bytes or exceeds {MAX_DATA_BYTES}")]
    BadLength(u64),
    /// Sectors past the end of the disk (or arithmetic overflow).
    #[error("sectors {sector}..+{num_sectors} are past the end of the disk ({capacity_sectors} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Count.
        num_sectors: u64,
        /// Capacity.
        capacity_sectors: u64,
    },
    /// A discard / write-zeroes payload that is not whole ranges, or too many of them.
    #[error("{0} bytes of ranges: not a multiple of 16 or more than {MAX_RANGES} ranges")]
    BadRanges(u64),
    /// Flags other than UNMAP (write-zeroes only) in a range.
    #[error("unsupported range flags {0:#x}")]
    BadRangeFlags(u32),
    /// The GET_ID buffer is smaller than 20 bytes.
    #[error("GET_ID buffer of {0} bytes, 20 needed")]
    ShortId(u64),
    /// A request type the device does not know or did not offer.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The status byte the guest gets.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::BadRangeFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// What the device supports, for validation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Discard is offered and negotiated.
    pub discard: bool,
    /// Write-zeroes is offered and negotiated.
    pub write_zeroes: bool,
}

/// A parsed chain: where its status goes and the request or why it is refused.
#[derive(Debug)]
pub struct Parsed {
    /// Guest address of the status byte.
    pub status_gpa: u64,
    /// The validated request.
    pub request: Result<Request, RequestError>,
}

/// Parses `chain`. `Err` when there is no usable status byte (the chain is completed with
/// nothing written); otherwise the status address and the request or its error.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> Result<Parsed, ChainError>
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut order_error = false;
    for desc in chain {
        let seg = Segment {
            gpa: desc.addr().0,
            len_bytes: u64::from(desc.len()),
        };
        if desc.is_write_only() {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            order_error = true;
        }
    }
    // The status byte: the last byte of the writable part.
    writable.retain(|s| s.len_bytes > 0);
    let last = writable.last_mut().ok_or(ChainError::NoStatus)?;
    let status_gpa = last
        .gpa
        .checked_add(last.len_bytes - 1)
        .ok_or(ChainError::StatusOutsideMemory { gpa: last.gpa })?;
    if !in_memory(mem, status_gpa, 1) {
        return Err(ChainError::StatusOutsideMemory { gpa: status_gpa });
    }
    last.len_bytes -= 1;
    writable.retain(|s| s.len_bytes > 0);
    readable.retain(|s| s.len_bytes > 0);
    let request = if order_error {
        Err(RequestError::ReadableAfterWritable)
    } else {
        validate(mem, limits, readable, writable)
    };
    Ok(Parsed {
        status_gpa,
        request,
    })
}

fn validate(
    mem: &GuestMemoryMmap,
    limits: &Limits,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
) -> Result<Request, RequestError> {
    for seg in readable.iter().chain(&writable) {
        if !in_memory(mem, seg.gpa, seg.len_bytes) {
            return Err(RequestError::OutsideMemory {
                gpa: seg.gpa,
                len_bytes: seg.len_bytes,
            });
        }
    }
    let readable_bytes = total(&readable);
    if readable_bytes < HEADER_BYTES {
        return Err(RequestError::ShortHeader(readable_bytes));
    }
    let (header_segs, readable_data) = split_at(&readable, HEADER_BYTES);
    let mut header = [0u8; HEADER_BYTES as usize];
    gather(mem, &header_segs, &mut header)?;
    let kind_raw = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let readable_data_bytes = total(&readable_data);
    let writable_bytes = total(&writable);
    let only = |kind: &'static str, direction: &'static str, len_bytes: u64| {
        if len_bytes == 0 {
            Ok(())
        } else {
            Err(RequestError::WrongDirection {
                kind,
                direction,
                len_bytes,
            })
        }
    };
    let (kind, data) = match kind_raw {
        VIRTIO_BLK_T_IN => {
            only("read", "device-readable", readable_data_bytes)?;
            check_rw(limits, sector, writable_bytes)?;
            (RequestKind::In, writable)
        }
        VIRTIO_BLK_T_OUT => {
            only("write", "device-writable", writable_bytes)?;
            check_rw(limits, sector, readable_data_bytes)?;
            (RequestKind::Out, readable_data)
        }
        VIRTIO_BLK_T_FLUSH => (RequestKind::Flush, Vec::new()),
        VIRTIO_BLK_T_GET_ID => {
            if writable_bytes < GET_ID_BYTES as u64 {
                return Err(RequestError::ShortId(writable_bytes));
            }
            (
                RequestKind::GetId,
                split_at(&writable, GET_ID_BYTES as u64).0,
            )
        }
        VIRTIO_BLK_T_DISCARD if limits.discard => {
            let ranges = ranges(mem, limits, &readable_data, false)?;
            (RequestKind::Discard(ranges), Vec::new())
        }
        VIRTIO_BLK_T_WRITE_ZEROES if limits.write_zeroes => {
            let ranges = ranges(mem, limits, &readable_data, true)?;
            (RequestKind::WriteZeroes(ranges), Vec::new())
        }
        other => return Err(RequestError::Unsupported(other)),
    };
    let data_len_bytes = total(&data);
    Ok(Request {
        kind,
        sector,
        data,
        data_len_bytes,
    })
}

/// Checks a read or write of `len_bytes` at `sector`.
fn check_rw(limits: &Limits, sector: u64, len_bytes: u64) -> Result<(), RequestError> {
    if len_bytes % SECTOR_BYTES != 0 || len_bytes > MAX_DATA_BYTES {
        return Err(RequestError::BadLength(len_bytes));
    }
    check_sectors(limits, sector, len_bytes / SECTOR_BYTES)
}

/// Checks that `sector..sector + num_sectors` is on the disk.
pub fn check_sectors(limits: &Limits, sector: u64, num_sectors: u64) -> Result<(), RequestError> {
    match sector.checked_add(num_sectors) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            num_sectors,
            capacity_sectors: limits.capacity_sectors,
        }),
    }
}

/// Reads and checks the ranges of a discard or write-zeroes request.
fn ranges(
    mem: &GuestMemoryMmap,
    limits: &Limits,
    segs: &[Segment],
    write_zeroes: bool,
) -> Result<Vec<SectorRange>, RequestError> {
    let len = total(segs);
    if len == 0 || len % RANGE_BYTES != 0 || len / RANGE_BYTES > u64::from(MAX_RANGES) {
        return Err(RequestError::BadRanges(len));
    }
    let mut bytes = vec![0u8; len as usize];
    gather(mem, segs, &mut bytes)?;
    let mut out = Vec::with_capacity(bytes.len() / RANGE_BYTES as usize);
    for raw in bytes.chunks_exact(RANGE_BYTES as usize) {
        let sector = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let num_sectors = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
        let allowed = if write_zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(RequestError::BadRangeFlags(flags));
        }
        check_sectors(limits, sector, u64::from(num_sectors))?;
        out.push(SectorRange {
            sector,
            num_sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(out)
}

fn in_memory(mem: &GuestMemoryMmap, gpa: u64, len_bytes: u64) -> bool {
    match usize::try_from(len_bytes) {
        Ok(len) => gpa.checked_add(len_bytes).is_some() && mem.check_range(GuestAddress(gpa), len),
        Err(_) => false,
    }
}

fn total(segs: &[Segment]) -> u64 {
    // Chains are shorter than 2^32 bytes (virtio-queue stops longer ones), so no overflow.
    segs.iter().map(|s| s.len_bytes).sum()
}

/// Splits `segs` after `at` bytes.
fn split_at(segs: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut left = at;
    for seg in segs {
        if left == 0 {
            tail.push(*seg);
        } else if seg.len_bytes <= left {
            head.push(*seg);
            left -= seg.len_bytes;
        } else {
            head.push(Segment {
                gpa: seg.gpa,
                len_bytes: left,
            });
            tail.push(Segment {
                gpa: seg.gpa + left,
                len_bytes: seg.len_bytes - left,
            });
            left = 0;
        }
    }
    (head, tail)
}

/// Copies the bytes of `segs` into `out` (`out.len()` = their total).
fn gather(mem: &GuestMemoryMmap, segs: &[Segment], out: &mut [u8]) -> Result<(), RequestError> {
    let mut at = 0usize;
    for seg in segs {
        let len = seg.len_bytes as usize;
        mem.read_slice(&mut out[at..at + len], GuestAddress(seg.gpa))
            .map_err(|_| RequestError::OutsideMemory {
                gpa: seg.gpa,
                len_bytes: seg.len_bytes,
            })?;
        at += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cuts_inside_and_between_segments() {
        let segs = [
            Segment {
                gpa: 0,
                len_bytes: 10,
            },
            Segment {
                gpa: 100,
                len_bytes: 10,
            },
        ];
        let (a, b) = split_at(&segs, 16);
        assert_eq!(
            a,
            [
                segs[0],
                Segment {
                    gpa: 100,
                    len_bytes: 6
                }
            ]
        );
        assert_eq!(
            b,
            [Segment {
                gpa: 106,
                len_bytes: 4
            }]
        );
        let (a, b) = split_at(&segs, 10);
        assert_eq!((a, b), (vec![segs[0]], vec![segs[1]]));
    }

    #[test]
    fn sector_checks_do_not_overflow() {
        let limits = Limits {
            capacity_sectors: 100,
            discard: false,
            write_zeroes: false,
        };
        check_sectors(&limits, 99, 1).unwrap();
        check_sectors(&limits, 100, 0).unwrap();
        assert!(check_sectors(&limits, 100, 1).is_err());
        assert!(check_sectors(&limits, u64::MAX, 2).is_err());
        assert!(check_rw(&limits, 0, 513).is_err());
        assert!(check_rw(&limits, 0, MAX_DATA_BYTES + 512).is_err());
    }
}
