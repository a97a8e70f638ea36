//! vsock packets in guest memory (virtio 1.2 §5.10.6): the 44-byte little-endian header,
//! parsing of tx chains and filling of rx chains. Every chain comes from the untrusted guest:
//! descriptors are resolved through `vm-memory` (a buffer outside guest memory is an error,
//! never an access) and every length is checked against what the chain holds.

use std::io::{Read, Write};

use virtio_device::GuestWriteLog;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_BYTES: usize = 44;
/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Largest payload the device accepts or sends in one packet (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_OP_REQUEST`: connect.
pub const OP_REQUEST: u16 = 1;
/// `VIRTIO_VSOCK_OP_RESPONSE`: connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// `VIRTIO_VSOCK_OP_RST`: connection refused or reset.
pub const OP_RST: u16 = 3;
/// `VIRTIO_VSOCK_OP_SHUTDOWN`: the sender stops receiving and/or sending.
pub const OP_SHUTDOWN: u16 = 4;
/// `VIRTIO_VSOCK_OP_RW`: data.
pub const OP_RW: u16 = 5;
/// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: the sender's buffer space.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: asks for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`: the sender will receive no more data.
pub const SHUTDOWN_F_RECEIVE: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`: the sender will send no more data.
pub const SHUTDOWN_F_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_F_BOTH: u32 = SHUTDOWN_F_RECEIVE | SHUTDOWN_F_SEND;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: every connection is gone (after a restore).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event`.
pub const EVENT_BYTES: usize = 4;

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's CID.
    pub src_cid: u64,
    /// Receiver's CID.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload bytes that follow.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (shutdown flags).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the little-endian wire format.
    pub fn from_bytes(b: &[u8; HDR_BYTES]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the little-endian wire format.
    pub fn to_bytes(&self) -> [u8; HDR_BYTES] {
        let mut b = [0u8; HDR_BYTES];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A reply header: ports and CIDs swapped, no payload, operation `op`.
    pub fn reply(&self, op: u16) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }
}

/// Why a guest packet or buffer was refused.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// A descriptor is outside guest memory or the chain is malformed.
    #[error("descriptor chain is unusable")]
    Chain(#[source] virtio_queue::Error),
    /// Fewer bytes than a header.
    #[error("chain holds {len_bytes} bytes, less than a {HDR_BYTES}-byte header")]
    TooShort {
        /// Bytes the chain holds.
        len_bytes: usize,
    },
    /// The header claims more payload than the device accepts.
    #[error("header claims {len_bytes} payload bytes, more than the {MAX_PAYLOAD_BYTES} accepted")]
    TooLong {
        /// The header's `len`.
        len_bytes: u32,
        /// The header, for an RST reply.
        header: Header,
    },
    /// The header claims more payload than the chain holds.
    #[error("header claims {len_bytes} payload bytes, the chain holds {available_bytes}")]
    LengthMismatch {
        /// The header's `len`.
        len_bytes: u32,
        /// Payload bytes in the chain.
        available_bytes: usize,
        /// The header, for an RST reply.
        header: Header,
    },
    /// Copying from or to guest memory failed.
    #[error("cannot copy packet bytes {direction} guest memory")]
    Copy {
        /// "from" or "to".
        direction: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl PacketError {
    /// The parsed header, when the packet got that far (so the device can answer with RST).
    pub fn header(&self) -> Option<&Header> {
        match self {
            PacketError::TooLong { header, .. } | PacketError::LengthMismatch { header, .. } => {
                Some(header)
            }
            _ => None,
        }
    }
}

/// Reads a tx packet: the header from the chain's device-readable bytes, then exactly
/// `header.len` payload bytes (bytes past them are ignored, as the header says).
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<(Header, Vec<u8>), PacketError> {
    let mut reader = chain.reader(mem).map_err(PacketError::Chain)?;
    let total = reader.available_bytes();
    if total < HDR_BYTES {
        return Err(PacketError::TooShort { len_bytes: total });
    }
    let mut raw = [0u8; HDR_BYTES];
    reader
        .read_exact(&mut raw)
        .map_err(|source| PacketError::Copy {
            direction: "from",
            source,
        })?;
    let header = Header::from_bytes(&raw);
    let len = header.len as usize;
    if len > MAX_PAYLOAD_BYTES {
        return Err(PacketError::TooLong {
            len_bytes: header.len,
            header,
        });
    }
    let available_bytes = reader.available_bytes();
    if len > available_bytes {
        return Err(PacketError::LengthMismatch {
            len_bytes: header.len,
            available_bytes,
            header,
        });
    }
    let mut payload = vec![0u8; len];
    reader
        .read_exact(&mut payload)
        .map_err(|source| PacketError::Copy {
            direction: "from",
            source,
        })?;
    Ok((header, payload))
}

/// A device-writable chain being filled with one packet (rx queue) or event (event queue).
pub struct RxBuffer<'m> {
    writer: virtio_queue::Writer<'m>,
    /// `(gpa, len)` of the writable descriptors, kept only when writes are logged.
    regions: Vec<(u64, u32)>,
    capacity: usize,
}

impl<'m> RxBuffer<'m> {
    /// Wraps `chain`'s device-writable descriptors. `log_writes` keeps their addresses so
    /// [`RxBuffer::log_written`] can report them.
    pub fn new(
        mem: &'m GuestMemoryMmap,
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        log_writes: bool,
    ) -> Result<Self, PacketError> {
        let regions = if log_writes {
            chain
                .clone()
                .writable()
                .map(|d| (d.addr().0, d.len()))
                .collect()
        } else {
            Vec::new()
        };
        let writer = chain.writer(mem).map_err(PacketError::Chain)?;
        let capacity = writer.available_bytes();
        Ok(RxBuffer {
            writer,
            regions,
            capacity,
        })
    }

    /// Total writable bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Payload bytes that fit after a header.
    pub fn payload_capacity(&self) -> usize {
        self.capacity
            .saturating_sub(HDR_BYTES)
            .min(MAX_PAYLOAD_BYTES)
    }

    /// Writes `bytes` at the current position.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), PacketError> {
        self.writer
            .write_all(bytes)
            .map_err(|source| PacketError::Copy {
                direction: "to",
                source,
            })
    }

    /// Writes a packet: `header` (its `len` set to the payload's) and `payload`. Returns the
    /// bytes written.
    pub fn write_packet(&mut self, header: &Header, payload: &[u8]) -> Result<u32, PacketError> {
        let header = Header {
            len: payload.len() as u32,
            ..*header
        };
        self.write(&header.to_bytes())?;
        self.write(payload)?;
        Ok(self.writer.bytes_written() as u32)
    }

    /// Reports the bytes written so far to `log`.
    pub fn log_written(&self, log: &dyn GuestWriteLog) {
        let mut left = self.writer.bytes_written() as u64;
        for &(gpa, len) in &self.regions {
            if left == 0 {
                break;
            }
            let n = left.min(u64::from(len));
            log.record_write(gpa, n);
            left -= n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_wire_order() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 3,
            buf_alloc: 262_144,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
        let r = h.reply(OP_RST);
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (2, 3, 52, 0x1234)
        );
        assert_eq!((r.op, r.len, r.type_), (OP_RST, 0, TYPE_STREAM));
    }
}
