//! AF_VSOCK from inside the guest: a blocking listener serving JSON lines ([`serve`]), plain
//! stream sockets for test tools, and the data pattern and checksum that host and guest both
//! compute when they move bulk data.
//!
//! [`serve`] is the trimmer's control endpoint: each request line goes to the handler, whose
//! reply (one JSON object) is written back followed by `\n`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// `VMADDR_CID_ANY`: listen on every CID the guest has.
pub const VMADDR_CID_ANY: u32 = u32::MAX;
/// `VMADDR_CID_HOST`: the host.
pub const VMADDR_CID_HOST: u32 = 2;
/// Most clients [`serve`] handles at once; more are closed on accept.
pub const MAX_CLIENTS: usize = 128;
/// Longest request line [`serve`] reads; a longer one ends the connection.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// Backlog of the listening socket.
const BACKLOG: i32 = 128;

/// A request handler: one request line in, one JSON object (no newline) out.
pub type Handler = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// Why a vsock socket operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockServeError {
    /// A socket call failed.
    #[error("cannot {operation} (vsock port {port})")]
    Socket {
        /// What was attempted.
        operation: &'static str,
        /// The port.
        port: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A connected vsock stream socket.
#[derive(Debug)]
pub struct VsockStream(OwnedFd);

impl VsockStream {
    /// A second handle on the same socket (for a reader and a writer thread).
    pub fn try_clone(&self) -> std::io::Result<VsockStream> {
        Ok(VsockStream(self.0.try_clone()?))
    }

    /// Shuts down the write side: the peer reads end of file.
    pub fn shutdown_write(&self) -> std::io::Result<()> {
        // SAFETY: shutdown(2) on a socket fd we own; no memory is passed.
        let rc = unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: read(2) into `buf`, whose length bounds the write.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: send(2) from `buf`, whose length bounds the read; MSG_NOSIGNAL turns a
        // closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket(port: u32) -> Result<OwnedFd, VsockServeError> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(VsockServeError::Socket {
            operation: "create an AF_VSOCK socket (is the vsock driver loaded?)",
            port,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl VsockListener {
    /// Listens on `port` for every CID (`VMADDR_CID_ANY`).
    pub fn bind(port: u32) -> Result<VsockListener, VsockServeError> {
        let fd = vsock_socket(port)?;
        let addr = sockaddr(VMADDR_CID_ANY, port);
        let err = |operation| VsockServeError::Socket {
            operation,
            port,
            source: std::io::Error::last_os_error(),
        };
        // SAFETY: bind(2) with a pointer to a live sockaddr_vm and its exact size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(err("bind"));
        }
        // SAFETY: listen(2) on our socket.
        if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } < 0 {
            return Err(err("listen"));
        }
        Ok(VsockListener { fd, port })
    }

    /// Waits for a connection.
    pub fn accept(&self) -> Result<VsockStream, VsockServeError> {
        loop {
            // SAFETY: accept4(2) without an address buffer; the result is checked.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: a new descriptor nobody else owns.
                return Ok(VsockStream(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let source = std::io::Error::last_os_error();
            if source.kind() != std::io::ErrorKind::Interrupted {
                return Err(VsockServeError::Socket {
                    operation: "accept",
                    port: self.port,
                    source,
                });
            }
        }
    }
}

/// Connects to `cid`:`port` (the host is [`VMADDR_CID_HOST`]).
pub fn connect(cid: u32, port: u32) -> Result<VsockStream, VsockServeError> {
    let fd = vsock_socket(port)?;
    let addr = sockaddr(cid, port);
    // SAFETY: connect(2) with a pointer to a live sockaddr_vm and its exact size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(VsockServeError::Socket {
            operation: "connect",
            port,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(VsockStream(fd))
}

/// Serves JSON lines on vsock `port` until accepting fails: a thread per connection (at most
/// [`MAX_CLIENTS`]), each request line handed to `handler`, its reply written back with `\n`.
pub fn serve(
    port: u32,
    handler: Arc<dyn Fn(&str) -> String + Send + Sync>,
) -> Result<(), VsockServeError> {
    let listener = VsockListener::bind(port)?;
    tracing::info!(port, "serving JSON lines on vsock");
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = listener.accept()?;
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(port, "too many vsock clients; closing a new one");
            continue;
        }
        let (handler, active) = (handler.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("vsock-client".into())
            .spawn(move || {
                if let Err(err) = serve_client(stream, &*handler) {
                    tracing::debug!(%err, "vsock client ended");
                }
                active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, "cannot start a vsock client thread");
        }
    }
}

/// Answers request lines on one connection until end of file.
fn serve_client(
    stream: VsockStream,
    handler: &(dyn Fn(&str) -> String + Send + Sync),
) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader).take(MAX_REQUEST_BYTES).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_REQUEST_BYTES {
            writer.write_all(b"{\"ok\":false,\"error\":\"request line too long\"}\n")?;
            return Ok(());
        }
        let mut reply = handler(line.trim_end()).into_bytes();
        reply.push(b'\n');
        writer.write_all(&reply)?;
    }
}

/// FNV-1a over a byte stream: the checksum both ends of a bulk transfer compute.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    /// The checksum so far, as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// The deterministic bytes a bulk sender writes: a xorshift64* stream, 8 bytes per step.
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
    spare: Vec<u8>,
}

impl Pattern {
    /// The stream for `seed` (0 is replaced by a fixed non-zero seed).
    pub fn new(seed: u64) -> Self {
        Pattern {
            state: if seed == 0 {
                0x9e37_79b9_7f4a_7c15
            } else {
                seed
            },
            spare: Vec::new(),
        }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && !self.spare.is_empty() {
            buf[i] = self.spare.remove(0);
            i += 1;
        }
        while i < buf.len() {
            let mut x = self.state;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.state = x;
            let word = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            let n = (buf.len() - i).min(8);
            buf[i..i + n].copy_from_slice(&word[..n]);
            self.spare.extend_from_slice(&word[n..]);
            i += n;
        }
    }

    /// The checksum of the first `len_bytes` bytes of the stream for `seed`.
    pub fn checksum(seed: u64, len_bytes: u64) -> String {
        let mut pattern = Pattern::new(seed);
        let mut sum = Fnv1a64::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len_bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            sum.update(&buf[..n]);
            left -= n as u64;
        }
        sum.hex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_the_same_whatever_the_chunking() {
        let mut whole = vec![0u8; 1000];
        Pattern::new(7).fill(&mut whole);
        let mut parts = vec![0u8; 1000];
        let mut p = Pattern::new(7);
        for chunk in parts.chunks_mut(13) {
            p.fill(chunk);
        }
        assert_eq!(whole, parts);
        let mut sum = Fnv1a64::default();
        sum.update(&whole);
        assert_eq!(sum.hex(), Pattern::checksum(7, 1000));
        assert_ne!(Pattern::checksum(7, 1000), Pattern::checksum(8, 1000));
    }

    #[test]
    fn fnv1a_known_values() {
        assert_eq!(Fnv1a64::default().hex(), "cbf29ce484222325");
        let mut s = Fnv1a64::default();
        s.update(b"a");
        assert_eq!(s.hex(), "af63dc4c8601ec8c");
    }
}
