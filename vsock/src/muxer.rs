//! Routes packets between the guest's queues and host unix sockets.
//!
//! Host side, in Firecracker's convention: the listener on `uds_path` accepts host clients;
//! each writes `CONNECT <port>\n`, the device sends the guest a REQUEST for `port` and, once
//! the guest answers, writes `OK <local_port>\n` to the client. A guest REQUEST for host port
//! P connects to the unix socket `<uds_path>_P`. Every socket is non-blocking and registered
//! in the worker's epoll only while the connection can use it: a connection whose guest has no
//! credit or no rx buffers is not read, so neither side makes the VMM buffer without bound
//! (at most [`crate::connection::CONN_BUF_BYTES`] per connection, [`MAX_CONNECTIONS`]
//! connections).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_device::GuestWriteLog;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::VsockConfig;
use crate::connection::{ConnState, Connection};
use crate::device::Counters;
use crate::limiter::{guest_warn, GuestWarnings};
use crate::packet::{
    Header, PacketError, RxBuffer, HDR_BYTES, HOST_CID, MAX_PAYLOAD_BYTES, OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_F_BOTH,
    SHUTDOWN_F_SEND, TYPE_STREAM,
};

/// Epoll token of the host listener.
pub(crate) const LISTENER_TOKEN: u64 = 8;
/// First epoll token of a host stream.
const FIRST_STREAM_TOKEN: u64 = 16;
/// Most connections (and host clients that have not sent their `CONNECT` line yet).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients between accept and their `CONNECT` line.
pub const MAX_PENDING_CONNECTS: usize = 128;
/// Most RST packets waiting for rx buffers; more are dropped (the guest times out).
const MAX_QUEUED_RSTS: usize = 1024;
/// Longest `CONNECT <port>` line accepted.
const CONNECT_LINE_MAX_BYTES: usize = 32;
/// First host-side port of host-initiated connections (as Firecracker).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A host client that has not sent its `CONNECT` line yet.
struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What fills the next rx buffer.
enum RxSource {
    Rst,
    Conn(u64),
}

/// Connections, host sockets and packets owed to the guest.
pub(crate) struct Muxer {
    config: VsockConfig,
    guest_cid: u64,
    listener: Arc<UnixListener>,
    epoll: Arc<Epoll>,
    conns: HashMap<u64, Connection>,
    by_key: HashMap<(u32, u32), u64>,
    pending: HashMap<u64, PendingConnect>,
    ready: VecDeque<u64>,
    rsts: VecDeque<Header>,
    next_token: u64,
    next_local_port: u32,
    scratch: Vec<u8>,
    counters: Arc<Counters>,
    pub(crate) warnings: GuestWarnings,
}

impl Muxer {
    /// A muxer serving `listener` (non-blocking), registering sockets in `epoll`.
    pub(crate) fn new(
        config: VsockConfig,
        listener: Arc<UnixListener>,
        epoll: Arc<Epoll>,
        counters: Arc<Counters>,
    ) -> std::io::Result<Muxer> {
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            guest_cid: u64::from(config.guest_cid),
            config,
            listener,
            epoll,
            conns: HashMap::new(),
            by_key: HashMap::new(),
            pending: HashMap::new(),
            ready: VecDeque::new(),
            rsts: VecDeque::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            scratch: vec![0; MAX_PAYLOAD_BYTES],
            counters,
            warnings: GuestWarnings::default(),
        })
    }

    /// Open connections.
    pub(crate) fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn set_active_gauge(&self) {
        self.counters
            .active_connections
            .store(self.conns.len() as u64, Ordering::Relaxed);
    }

    // ------------------------------------------------------------------ host side

    /// Accepts every waiting host client.
    pub(crate) fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::warn!(%err, "vsock: cannot accept a host connection");
                    return;
                }
            };
            if self.pending.len() >= MAX_PENDING_CONNECTS
                || self.pending.len() + self.conns.len() >= MAX_CONNECTIONS
            {
                tracing::warn!(
                    connections = self.conns.len(),
                    pending = self.pending.len(),
                    "vsock: too many host connections; closing a new one"
                );
                continue;
            }
            if let Err(err) = stream.set_nonblocking(true) {
                tracing::warn!(%err, "vsock: cannot make a host connection non-blocking");
                continue;
            }
            let token = self.token();
            let event = EpollEvent::new(EventSet::IN, token);
            if let Err(err) = self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), event)
            {
                tracing::warn!(%err, "vsock: cannot watch a host connection");
                continue;
            }
            self.pending.insert(
                token,
                PendingConnect {
                    stream,
                    line: Vec::new(),
                },
            );
        }
    }

    /// A host stream has `events`.
    pub(crate) fn stream_event(&mut self, token: u64, events: EventSet) {
        if self.pending.contains_key(&token) {
            self.read_connect_line(token);
            return;
        }
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let hangup = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if events.contains(EventSet::IN) || (hangup && conn.wants_host_read()) {
            conn.host_readable = true;
        }
        if events.contains(EventSet::OUT) || (hangup && conn.wants_host_write()) {
            self.flush_to_host(token);
        }
        self.after_change(token);
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (so no data after it is consumed).
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let complete = loop {
            let mut byte = [0u8; 1];
            match p.stream.read(&mut byte) {
                Ok(0) => break false,
                Ok(_) if byte[0] == b'\n' => break true,
                Ok(_) if p.line.len() >= CONNECT_LINE_MAX_BYTES => break false,
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let port = complete.then(|| parse_connect_line(&p.line)).flatten();
        let Some(peer_port) = port else {
            tracing::warn!(
                line = %String::from_utf8_lossy(&p.line),
                "vsock: host client sent no valid `CONNECT <port>` line; closing it"
            );
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: too many connections; closing a host client");
            return;
        }
        let local_port = self.alloc_local_port(peer_port);
        let conn = Connection::host_initiated(p.stream, local_port, peer_port, self.guest_cid);
        self.by_key.insert((local_port, peer_port), token);
        self.conns.insert(token, conn);
        self.counters.host_connects.fetch_add(1, Ordering::Relaxed);
        self.set_active_gauge();
        self.after_change(token);
    }

    /// A host-side port not in use with `peer_port`.
    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_key.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    /// Writes what the connection holds for its host socket; resets it on a write error.
    fn flush_to_host(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let result = flush(conn);
        match result {
            Ok(n) => {
                self.counters
                    .bytes_to_host
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(err) => {
                tracing::debug!(%err, port = conn.local_port, "vsock: host socket write failed; resetting");
                self.kill(token, true);
            }
        }
    }

    /// Re-evaluates a connection after anything changed: shuts the host socket's write side
    /// when the guest stopped sending, closes finished connections, schedules rx and updates
    /// the epoll interest.
    fn after_change(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.broken {
            self.kill(token, true);
            return;
        }
        if conn.peer_shutdown & SHUTDOWN_F_SEND != 0
            && !conn.host_write_shut
            && !conn.wants_host_write()
        {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            conn.host_write_shut = true;
        }
        if conn.finished() {
            self.kill(token, true);
            return;
        }
        if conn.host_readable
            && conn.state == ConnState::Established
            && !conn.host_eof
            && conn.peer_credit() == 0
            && !conn.credit_requested
        {
            conn.pending.credit_request = true;
        }
        if conn.has_rx() && !conn.scheduled {
            conn.scheduled = true;
            self.ready.push_back(token);
        }
        let mut want = EventSet::empty();
        if conn.wants_host_read() {
            want |= EventSet::IN;
        }
        if conn.wants_host_write() {
            want |= EventSet::OUT;
        }
        let want = (!want.is_empty()).then_some(want.bits());
        if want == conn.interest {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let (op, bits) = match (conn.interest, want) {
            (None, Some(w)) => (ControlOperation::Add, w),
            (Some(_), Some(w)) => (ControlOperation::Modify, w),
            _ => (ControlOperation::Delete, 0),
        };
        let event = EpollEvent::new(EventSet::from_bits_truncate(bits), token);
        match self.epoll.ctl(op, fd, event) {
            Ok(()) => conn.interest = want,
            Err(err) => {
                tracing::warn!(%err, "vsock: cannot update the epoll interest of a host socket");
                self.kill(token, true);
            }
        }
    }

    /// Removes a connection (closing its host socket), optionally owing the guest an RST.
    fn kill(&mut self, token: u64, send_rst: bool) {
        let Some(conn) = self.conns.remove(&token) else {
            return;
        };
        self.by_key.remove(&(conn.local_port, conn.peer_port));
        if conn.interest.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        if send_rst {
            self.queue_rst(conn.header(OP_RST));
        }
        self.counters
            .closed_connections
            .fetch_add(1, Ordering::Relaxed);
        self.set_active_gauge();
    }

    fn queue_rst(&mut self, hdr: Header) {
        if self.rsts.len() < MAX_QUEUED_RSTS {
            self.rsts.push_back(hdr);
            self.counters.rsts_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes every connection and host client (snapshot, device reset). The guest is owed an
    /// RST for each connection, so a VM that keeps running after a snapshot sees them end.
    pub(crate) fn reset_all(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for token in tokens {
            self.kill(token, true);
        }
        for (_, p) in self.pending.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.ready.clear();
    }

    // ------------------------------------------------------------------ guest side

    /// Handles one well-formed tx packet.
    pub(crate) fn handle_guest_packet(&mut self, hdr: Header, payload: Vec<u8>) {
        self.counters
            .packets_from_guest
            .fetch_add(1, Ordering::Relaxed);
        if !self.addressed_to_us(&hdr) {
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            guest_warn!(
                self.warnings,
                type_ = hdr.type_,
                "vsock: guest packet of unknown socket type; answering RST"
            );
            if hdr.op != OP_RST {
                self.queue_rst(hdr.reply(OP_RST));
            }
            return;
        }
        let token = self.by_key.get(&(hdr.dst_port, hdr.src_port)).copied();
        match (hdr.op, token) {
            (OP_REQUEST, None) => self.guest_connect(&hdr),
            (OP_REQUEST, Some(t)) => {
                guest_warn!(
                    self.warnings,
                    port = hdr.dst_port,
                    "vsock: guest REQUEST on an open connection; resetting it"
                );
                self.kill(t, true);
            }
            (OP_RST, Some(t)) => self.kill(t, false),
            (OP_RST, None) => {}
            (_, None) => self.queue_rst(hdr.reply(OP_RST)),
            (_, Some(t)) => self.connection_packet(t, &hdr, payload),
        }
    }

    /// Drops (and counts) packets not from the guest's CID to the host's.
    fn addressed_to_us(&mut self, hdr: &Header) -> bool {
        if hdr.src_cid == self.guest_cid && hdr.dst_cid == HOST_CID {
            return true;
        }
        self.counters
            .packets_dropped
            .fetch_add(1, Ordering::Relaxed);
        guest_warn!(
            self.warnings,
            src_cid = hdr.src_cid,
            dst_cid = hdr.dst_cid,
            "vsock: guest packet with wrong CIDs dropped"
        );
        false
    }

    /// A malformed packet whose header could be read: reset its connection, or answer RST.
    pub(crate) fn reject(&mut self, hdr: &Header, err: &PacketError) {
        self.counters
            .packets_dropped
            .fetch_add(1, Ordering::Relaxed);
        guest_warn!(self.warnings, %err, "vsock: malformed guest packet dropped");
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID || hdr.op == OP_RST {
            return;
        }
        match self.by_key.get(&(hdr.dst_port, hdr.src_port)).copied() {
            Some(t) => self.kill(t, true),
            None => self.queue_rst(hdr.reply(OP_RST)),
        }
    }

    /// A guest REQUEST for host port `hdr.dst_port`: connects to `<uds_path>_<port>`.
    fn guest_connect(&mut self, hdr: &Header) {
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            guest_warn!(
                self.warnings,
                "vsock: too many connections; refusing a guest connect"
            );
            self.queue_rst(hdr.reply(OP_RST));
            return;
        }
        let path = self.config.host_port_path(hdr.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let token = self.token();
                self.by_key.insert((hdr.dst_port, hdr.src_port), token);
                self.conns
                    .insert(token, Connection::guest_initiated(stream, hdr));
                self.counters.guest_connects.fetch_add(1, Ordering::Relaxed);
                self.set_active_gauge();
                self.after_change(token);
            }
            Err(err) => {
                tracing::debug!(path = %path.display(), %err, "vsock: guest connect refused: no host listener");
                self.queue_rst(hdr.reply(OP_RST));
            }
        }
    }

    /// A packet on an open connection.
    fn connection_packet(&mut self, token: u64, hdr: &Header, payload: Vec<u8>) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.update_peer_credit(hdr);
        match hdr.op {
            OP_RESPONSE if conn.state == ConnState::Connecting => {
                conn.state = ConnState::Established;
                conn.preamble = format!("OK {}\n", conn.local_port).into_bytes();
                self.flush_to_host(token);
            }
            OP_RW
                if conn.state == ConnState::Established
                    && conn.peer_shutdown & SHUTDOWN_F_SEND == 0 =>
            {
                if payload.len() > conn.to_host_room() {
                    guest_warn!(
                        self.warnings,
                        len = payload.len(),
                        room = conn.to_host_room(),
                        "vsock: guest sent more than its credit; resetting the connection"
                    );
                    self.kill(token, true);
                    return;
                }
                conn.to_host.extend(payload);
                self.flush_to_host(token);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => conn.pending.credit_update = true,
            OP_SHUTDOWN => conn.peer_shutdown |= hdr.flags & SHUTDOWN_F_BOTH,
            op => {
                guest_warn!(
                    self.warnings,
                    op,
                    "vsock: unexpected or unknown operation; resetting the connection"
                );
                self.kill(token, true);
                return;
            }
        }
        self.after_change(token);
    }

    // ------------------------------------------------------------------ rx queue

    /// Fills rx buffers with what is owed to the guest: RSTs first, then connections in
    /// round-robin order. Returns the number of buffers used.
    pub(crate) fn fill_rx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        write_log: Option<&dyn GuestWriteLog>,
    ) -> Result<usize, virtio_queue::Error> {
        let mut used = 0;
        loop {
            let source = if !self.rsts.is_empty() {
                RxSource::Rst
            } else {
                match self.next_ready() {
                    Some(t) => RxSource::Conn(t),
                    None => break,
                }
            };
            let Some(chain) = queue.iter(mem)?.next() else {
                if let RxSource::Conn(t) = source {
                    self.reschedule_front(t);
                }
                break;
            };
            let head = chain.head_index();
            let mut buf = match RxBuffer::new(mem, chain, write_log.is_some()) {
                Ok(buf) if buf.capacity() >= HDR_BYTES => buf,
                result => {
                    let err = result.err().map(|e| e.to_string());
                    guest_warn!(
                        self.warnings,
                        head,
                        ?err,
                        "vsock: unusable rx buffer skipped"
                    );
                    complete(queue, mem, head, 0)?;
                    used += 1;
                    if let RxSource::Conn(t) = source {
                        self.reschedule_front(t);
                    }
                    continue;
                }
            };
            let written = match source {
                RxSource::Rst => match self.rsts.pop_front() {
                    Some(h) => buf.write_packet(&h, &[]).map(Some),
                    None => Ok(None),
                },
                RxSource::Conn(t) => self.conn_rx(t, &mut buf),
            };
            match written {
                Ok(Some(len)) => {
                    if let Some(log) = write_log {
                        buf.log_written(log);
                    }
                    complete(queue, mem, head, len)?;
                    used += 1;
                }
                Ok(None) => queue.go_to_previous_position(),
                Err(err) => {
                    guest_warn!(self.warnings, %err, "vsock: cannot fill an rx buffer");
                    complete(queue, mem, head, 0)?;
                    used += 1;
                    if let RxSource::Conn(t) = source {
                        if let Some(c) = self.conns.get_mut(&t) {
                            c.broken = true;
                        }
                    }
                }
            }
            if let RxSource::Conn(t) = source {
                self.after_change(t);
            }
        }
        Ok(used)
    }

    /// The next scheduled connection that still has something for the guest.
    fn next_ready(&mut self) -> Option<u64> {
        while let Some(t) = self.ready.pop_front() {
            if let Some(c) = self.conns.get_mut(&t) {
                c.scheduled = false;
                if c.has_rx() {
                    return Some(t);
                }
            }
        }
        None
    }

    fn reschedule_front(&mut self, token: u64) {
        if let Some(c) = self.conns.get_mut(&token) {
            if !c.scheduled {
                c.scheduled = true;
                self.ready.push_front(token);
            }
        }
    }

    /// Writes the connection's next packet into `buf`: a control packet, else data read from
    /// the host socket (as much as the buffer and the guest's credit allow). `None`: nothing
    /// after all.
    fn conn_rx(&mut self, token: u64, buf: &mut RxBuffer<'_>) -> Result<Option<u32>, PacketError> {
        let Muxer {
            conns,
            scratch,
            counters,
            ..
        } = self;
        let Some(conn) = conns.get_mut(&token) else {
            return Ok(None);
        };
        if let Some(h) = conn.take_control() {
            if h.op == OP_CREDIT_REQUEST {
                conn.credit_requested = true;
            }
            let len = buf.write_packet(&h, &[])?;
            conn.sent(0);
            return Ok(Some(len));
        }
        if !(conn.host_readable && conn.can_send_data()) {
            return Ok(None);
        }
        let max = buf
            .payload_capacity()
            .min(conn.peer_credit() as usize)
            .min(scratch.len());
        if max == 0 {
            return Ok(None);
        }
        loop {
            match conn.stream.read(&mut scratch[..max]) {
                Ok(0) => {
                    conn.host_eof = true;
                    conn.host_readable = false;
                    let h = Header {
                        flags: SHUTDOWN_F_SEND,
                        ..conn.header(OP_SHUTDOWN)
                    };
                    let len = buf.write_packet(&h, &[])?;
                    conn.sent(0);
                    return Ok(Some(len));
                }
                Ok(n) => {
                    let len = buf.write_packet(&conn.header(OP_RW), &scratch[..n])?;
                    conn.sent(n as u32);
                    counters
                        .bytes_to_guest
                        .fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(Some(len));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    conn.host_readable = false;
                    return Ok(None);
                }
                Err(err) => {
                    tracing::debug!(%err, "vsock: host socket read failed; resetting");
                    conn.host_readable = false;
                    conn.broken = true;
                    return Ok(None);
                }
            }
        }
    }
}

/// Writes the preamble, then queued guest bytes, until the socket would block. Returns the
/// data bytes written (the preamble not counted).
fn flush(conn: &mut Connection) -> std::io::Result<usize> {
    while !conn.preamble.is_empty() {
        match conn.stream.write(&conn.preamble) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.preamble.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut total = 0;
    while !conn.to_host.is_empty() {
        let (front, _) = conn.to_host.as_slices();
        match conn.stream.write(front) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.to_host.drain(..n);
                conn.forwarded(n);
                total += n;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Parses `CONNECT <port>` (a trailing `\r` tolerated).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    text.strip_prefix("CONNECT ")?.trim().parse().ok()
}

/// Connects to a unix socket without blocking (a full backlog fails instead of waiting).
fn connect_nonblocking(path: &Path) -> nix::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

/// Puts chain `head` in the used ring; a head past the descriptor table is dropped.
pub(crate) fn complete(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    if head < queue.size() {
        queue.add_used(mem, head, len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT x"), None);
        assert_eq!(parse_connect_line(b"connect 52"), None);
        assert_eq!(parse_connect_line(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect_line(&[0xff, 0xfe]), None);
    }

    /// A guest flooding connects to host ports nobody listens on and packets for connections
    /// that do not exist: the RSTs owed to it stay capped, no connection is kept.
    #[test]
    fn a_flooding_guest_cannot_grow_the_rst_queue() {
        let dir = std::env::temp_dir().join(format!("vsock-flood-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let listener = Arc::new(UnixListener::bind(&uds).unwrap());
        listener.set_nonblocking(true).unwrap();
        let config = VsockConfig {
            vsock_id: None,
            guest_cid: 3,
            uds_path: uds,
        };
        let epoll = Arc::new(Epoll::new().unwrap());
        let mut muxer = Muxer::new(config, listener, epoll, Arc::new(Counters::default())).unwrap();
        for i in 0..(4 * MAX_QUEUED_RSTS as u32) {
            let op = if i % 2 == 0 { OP_REQUEST } else { OP_RW };
            let hdr = Header {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port: i,
                dst_port: 7000 + i,
                type_: TYPE_STREAM,
                op,
                ..Header::default()
            };
            muxer.handle_guest_packet(hdr, Vec::new());
        }
        assert_eq!(muxer.rsts.len(), MAX_QUEUED_RSTS);
        assert_eq!(muxer.connection_count(), 0);
        assert!(muxer.pending.is_empty() && muxer.by_key.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
