//! One stream connection between a guest port and a host unix socket: its state, its credit
//! accounting (virtio 1.2 §5.10.6.3) and the bytes waiting for the host socket. Pure state:
//! the muxer does the socket and queue I/O.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;

use crate::packet::{
    Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_SHUTDOWN,
    SHUTDOWN_F_BOTH, SHUTDOWN_F_SEND, TYPE_STREAM,
};

/// Receive buffer the device advertises per connection (`buf_alloc`): the most guest bytes
/// held for a slow host socket. Bounds the VMM's memory per connection.
pub const CONN_BUF_BYTES: u32 = 256 * 1024;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST not yet answered by the guest.
    Connecting,
    /// Data flows.
    Established,
}

/// A connection's state.
#[derive(Debug)]
pub struct Connection {
    /// The host unix socket (non-blocking).
    pub stream: UnixStream,
    /// Host-side vsock port.
    pub local_port: u32,
    /// Guest-side vsock port.
    pub peer_port: u32,
    /// The guest's CID.
    pub guest_cid: u64,
    /// Where it stands.
    pub state: ConnState,
    /// Control packets owed to the guest.
    pub pending: Pending,
    /// Shutdown flags the guest sent.
    pub peer_shutdown: u32,
    /// The host socket reached end of file.
    pub host_eof: bool,
    /// The host socket's write side is shut (the guest sent SHUTDOWN with SEND).
    pub host_write_shut: bool,
    /// The host socket may have bytes to read (readable per epoll, not yet drained).
    pub host_readable: bool,
    /// Bytes for the host socket before any data (`OK <port>\n`).
    pub preamble: Vec<u8>,
    /// Guest bytes not yet written to the host socket; at most [`CONN_BUF_BYTES`].
    pub to_host: VecDeque<u8>,
    /// Guest's `buf_alloc`.
    pub peer_buf_alloc: u32,
    /// Guest's `fwd_cnt`.
    pub peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest (wrapping).
    pub rx_cnt: u32,
    /// Guest bytes written to the host socket (wrapping): our `fwd_cnt`.
    pub fwd_cnt: u32,
    /// `fwd_cnt` last told to the guest.
    pub fwd_cnt_sent: u32,
    /// Epoll interest registered for the stream (`None`: not registered).
    pub interest: Option<u32>,
    /// In the muxer's ready list.
    pub scheduled: bool,
    /// A CREDIT_REQUEST was sent and no credit arrived since.
    pub credit_requested: bool,
    /// The host socket or the rx path failed: the connection is reset at the next check.
    pub broken: bool,
}

/// Control packets a connection owes the guest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// REQUEST (host-initiated connect).
    pub request: bool,
    /// RESPONSE (guest-initiated connect accepted).
    pub response: bool,
    /// SHUTDOWN with these flags (0: none).
    pub shutdown: u32,
    /// CREDIT_UPDATE.
    pub credit_update: bool,
    /// CREDIT_REQUEST.
    pub credit_request: bool,
}

impl Pending {
    /// Any control packet owed.
    pub fn any(&self) -> bool {
        self.request
            || self.response
            || self.shutdown != 0
            || self.credit_update
            || self.credit_request
    }
}

impl Connection {
    /// A connection the host asked for (`CONNECT <peer_port>`): a REQUEST is owed.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
    ) -> Self {
        let mut c = Connection::new(
            stream,
            local_port,
            peer_port,
            guest_cid,
            ConnState::Connecting,
        );
        c.pending.request = true;
        c
    }

    /// A connection the guest asked for (REQUEST from `hdr`), connected on the host: a
    /// RESPONSE is owed.
    pub fn guest_initiated(stream: UnixStream, hdr: &Header) -> Self {
        let mut c = Connection::new(
            stream,
            hdr.dst_port,
            hdr.src_port,
            hdr.src_cid,
            ConnState::Established,
        );
        c.pending.response = true;
        c.update_peer_credit(hdr);
        c
    }

    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        state: ConnState,
    ) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state,
            pending: Pending::default(),
            peer_shutdown: 0,
            host_eof: false,
            host_write_shut: false,
            host_readable: false,
            preamble: Vec::new(),
            to_host: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            interest: None,
            scheduled: false,
            credit_requested: false,
            broken: false,
        }
    }

    /// Records the credit fields every guest packet carries.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_credit() > 0 {
            self.pending.credit_request = false;
            self.credit_requested = false;
        }
    }

    /// Bytes the guest can take now. A guest claiming to have consumed more than was sent
    /// gets nothing (its counters are inconsistent; only its own connection stalls).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Room left for guest bytes; a guest that sends more violates our credit.
    pub fn to_host_room(&self) -> usize {
        (CONN_BUF_BYTES as usize).saturating_sub(self.to_host.len())
    }

    /// Host data can go to the guest now (established, guest still receiving, credit left).
    pub fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.peer_shutdown & crate::packet::SHUTDOWN_F_RECEIVE == 0
            && self.peer_credit() > 0
    }

    /// The connection has a packet for the guest now.
    pub fn has_rx(&self) -> bool {
        self.pending.any() || (self.host_readable && self.can_send_data())
    }

    /// Wants to read its host socket: established, not at end of file, not already known
    /// readable, and the guest can take data.
    pub fn wants_host_read(&self) -> bool {
        !self.host_readable && self.can_send_data()
    }

    /// Has bytes for its host socket.
    pub fn wants_host_write(&self) -> bool {
        !self.preamble.is_empty() || !self.to_host.is_empty()
    }

    /// Notes `n` guest bytes written to the host; owes a credit update once a quarter of the
    /// buffer was freed, or the buffer drained, since the guest last heard.
    pub fn forwarded(&mut self, n: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        let unsent = self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent);
        if unsent >= CONN_BUF_BYTES / 4 || (unsent > 0 && self.to_host.is_empty()) {
            self.pending.credit_update = true;
        }
    }

    /// All data in both directions is done: the guest sent SHUTDOWN with both flags (or
    /// stopped sending after the host did) and every guest byte reached the host.
    pub fn finished(&self) -> bool {
        let guest_done = self.peer_shutdown == SHUTDOWN_F_BOTH
            || (self.host_eof && self.peer_shutdown & SHUTDOWN_F_SEND != 0);
        guest_done && !self.wants_host_write() && self.pending.shutdown == 0
    }

    /// A header from the host side of this connection, with current credit.
    pub fn header(&self, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_BYTES,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Takes the next owed control packet, if any, clearing it.
    pub fn take_control(&mut self) -> Option<Header> {
        let p = &mut self.pending;
        let (op, flags) = if std::mem::take(&mut p.request) {
            (OP_REQUEST, 0)
        } else if std::mem::take(&mut p.response) {
            (OP_RESPONSE, 0)
        } else if p.shutdown != 0 {
            (OP_SHUTDOWN, std::mem::take(&mut p.shutdown))
        } else if std::mem::take(&mut p.credit_update) {
            (OP_CREDIT_UPDATE, 0)
        } else if std::mem::take(&mut p.credit_request) {
            (OP_CREDIT_REQUEST, 0)
        } else {
            return None;
        };
        Some(Header {
            flags,
            ..self.header(op)
        })
    }

    /// Records a packet sent to the guest with `payload_bytes` of data.
    pub fn sent(&mut self, payload_bytes: u32) {
        self.rx_cnt = self.rx_cnt.wrapping_add(payload_bytes);
        self.fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{OP_RW, SHUTDOWN_F_RECEIVE};

    fn conn() -> Connection {
        let (a, _b) = UnixStream::pair().unwrap();
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 52,
            op: OP_REQUEST,
            type_: TYPE_STREAM,
            buf_alloc: 1000,
            ..Header::default()
        };
        Connection::guest_initiated(a, &hdr)
    }

    #[test]
    fn credit_follows_sent_and_forwarded_counts() {
        let mut c = conn();
        assert_eq!(c.take_control().unwrap().op, OP_RESPONSE);
        assert_eq!(c.peer_credit(), 1000);
        c.sent(600);
        assert_eq!(c.peer_credit(), 400);
        c.sent(400);
        assert!(!c.can_send_data());
        // The guest consumed 500 bytes.
        c.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 500,
            op: OP_CREDIT_UPDATE,
            ..Header::default()
        });
        assert_eq!(c.peer_credit(), 500);
        // A guest claiming more consumed than sent gets nothing.
        c.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 5000,
            ..Header::default()
        });
        assert_eq!(c.peer_credit(), 0);
        // Wrapping counters.
        c.rx_cnt = u32::MAX - 10;
        c.peer_fwd_cnt = u32::MAX - 20;
        assert_eq!(c.peer_credit(), 990);
    }

    #[test]
    fn credit_update_owed_after_a_quarter_or_a_drain() {
        let mut c = conn();
        c.take_control();
        c.to_host.extend(std::iter::repeat_n(0u8, 100_000));
        c.forwarded(10);
        assert!(!c.pending.credit_update);
        c.forwarded(CONN_BUF_BYTES as usize / 4);
        assert!(c.pending.credit_update);
        let h = c.take_control().unwrap();
        assert_eq!((h.op, h.fwd_cnt), (OP_CREDIT_UPDATE, c.fwd_cnt));
        c.sent(0);
        c.to_host.clear();
        c.forwarded(1);
        assert!(c.pending.credit_update);
        assert_eq!(c.header(OP_RW).buf_alloc, CONN_BUF_BYTES);
    }

    #[test]
    fn finished_after_both_sides_are_done_and_flushed() {
        let mut c = conn();
        c.take_control();
        c.peer_shutdown = SHUTDOWN_F_SEND;
        assert!(!c.finished());
        c.host_eof = true;
        c.to_host.push_back(1);
        assert!(!c.finished());
        c.to_host.clear();
        assert!(c.finished());
        let mut c = conn();
        c.take_control();
        c.peer_shutdown = SHUTDOWN_F_RECEIVE;
        assert!(!c.can_send_data() && !c.finished());
        c.peer_shutdown = SHUTDOWN_F_BOTH;
        assert!(c.finished());
    }
}
