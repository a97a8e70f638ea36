//! The API socket server: one thread accepts connections, and each connection is served on its
//! own thread (at most [`MAX_CONNECTIONS`] at once), so an idle keep-alive client cannot block
//! `vmm status`. Requests reach the [`ApiHandler`] one at a time.
//!
//! Shutdown is signalled through a socket pair: closing one end makes the other readable for
//! every thread polling it, so `ApiServerHandle::shutdown` wakes the acceptor and idle
//! connections at once, lets in-flight responses finish (up to [`DRAIN_TIMEOUT`]) and removes
//! the socket file.

use std::fs;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};
use tracing::{debug, info, warn};

use super::http::{self, Method, ParsedRequest, Response, Version};
use super::{routes, ApiHandler};

/// Most connections served at once; further ones get `503` and are closed.
pub const MAX_CONNECTIONS: usize = 16;
/// An idle keep-alive connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A request must arrive completely within this long of its first byte, else `408`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A response write that makes no progress for this long closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for in-flight requests to finish before leaving them behind.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes read from a connection at a time.
const READ_CHUNK: usize = 8192;

/// Errors binding or starting the API server. Each names the socket path or the operation.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Another live process accepts connections on the socket.
    #[error("API socket {0} is in use by another running process")]
    InUse(PathBuf),
    /// The path exists and is not a socket: refuse to delete it.
    #[error("refusing to replace {0}: it exists and is not a socket")]
    NotASocket(PathBuf),
    /// Inspecting the existing path failed.
    #[error("cannot inspect API socket path {path}")]
    Inspect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Probing the existing socket for a live listener failed in an unexpected way.
    #[error("cannot check whether API socket {path} is in use")]
    Probe {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Removing a stale socket file failed.
    #[error("cannot remove stale API socket {path}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `bind(2)` failed.
    #[error("cannot bind API socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Making the listener non-blocking failed.
    #[error("cannot configure API socket {path}")]
    Configure {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Creating the shutdown signal (a socket pair) failed.
    #[error("cannot create the API server's shutdown signal")]
    ShutdownSignal(#[source] io::Error),
    /// Spawning the acceptor thread failed.
    #[error("cannot spawn the API server thread")]
    Spawn(#[source] io::Error),
}

/// A bound, not yet serving, API socket. Dropping it removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    socket_file: SocketFile,
}

impl ApiServer {
    /// Binds the socket at `path`.
    ///
    /// Fails (naming the path) if another live process already listens there, which is
    /// detected by connecting to it first. A stale socket file with no listener is removed and
    /// re-bound; any other kind of file at `path` is left alone and is an error.
    pub fn bind(path: &Path) -> Result<ApiServer, ApiServerError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ApiServerError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(ApiServerError::InUse(path.to_path_buf())),
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                    match fs::remove_file(path) {
                        Ok(()) => info!("removed stale API socket {}", path.display()),
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                        Err(source) => {
                            return Err(ApiServerError::RemoveStale {
                                path: path.to_path_buf(),
                                source,
                            })
                        }
                    }
                }
                // Removed between the stat and the connect: nothing to clean up.
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ApiServerError::Probe {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            },
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ApiServerError::Inspect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| match source.kind() {
            // Someone bound it between our probe and our bind.
            io::ErrorKind::AddrInUse => ApiServerError::InUse(path.to_path_buf()),
            _ => ApiServerError::Bind {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let socket_file = SocketFile::new(path);
        info!("API socket bound at {}", path.display());
        Ok(ApiServer {
            listener,
            socket_file,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.socket_file.path
    }

    /// Serves requests with `handler` on a background thread until the returned handle's
    /// [`ApiServerHandle::shutdown`] or drop, which also removes the socket file.
    pub fn spawn(self, handler: Arc<dyn ApiHandler>) -> Result<ApiServerHandle, ApiServerError> {
        let ApiServer {
            listener,
            socket_file,
        } = self;
        listener
            .set_nonblocking(true)
            .map_err(|source| ApiServerError::Configure {
                path: socket_file.path.clone(),
                source,
            })?;
        let (shutdown_tx, shutdown_rx) =
            UnixStream::pair().map_err(ApiServerError::ShutdownSignal)?;
        let shared = Arc::new(Shared {
            handler,
            handler_lock: Mutex::new(()),
            shutdown_rx,
            active: Mutex::new(0),
            drained: Condvar::new(),
        });
        let thread = thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Api);
                accept_loop(&listener, &shared)
            })
            .map_err(ApiServerError::Spawn)?;
        Ok(ApiServerHandle {
            shutdown_tx,
            thread: Some(thread),
            socket_file,
        })
    }
}

/// A running API server. Dropping it is the same as [`ApiServerHandle::shutdown`].
#[derive(Debug)]
pub struct ApiServerHandle {
    shutdown_tx: UnixStream,
    thread: Option<JoinHandle<()>>,
    socket_file: SocketFile,
}

impl ApiServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.socket_file.path
    }

    /// Stops accepting connections, closes idle ones, waits up to [`DRAIN_TIMEOUT`] for
    /// in-flight requests, and removes the socket file.
    pub fn shutdown(self) {
        // Drop does the work.
    }

    fn stop(&mut self) {
        // Closing our end makes the other end readable (EOF) for every thread polling it.
        if let Err(err) = self.shutdown_tx.shutdown(Shutdown::Both) {
            warn!("cannot signal the API server to stop: {err}");
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the API server thread panicked");
            }
        }
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.stop();
        // `socket_file` is dropped after this, removing the socket.
    }
}

/// The socket file, removed on drop if it is still the one we bound (not replaced since).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: &Path) -> SocketFile {
        SocketFile {
            path: path.to_path_buf(),
            identity: identity(path),
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.identity.is_some() && identity(&self.path) == self.identity {
            match fs::remove_file(&self.path) {
                Ok(()) => debug!("removed API socket {}", self.path.display()),
                Err(err) => warn!("cannot remove API socket {}: {err}", self.path.display()),
            }
        }
    }
}

/// The (device, inode) of a path, to recognise our own socket file.
fn identity(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

/// State shared by the acceptor and the connection threads.
struct Shared {
    handler: Arc<dyn ApiHandler>,
    /// Serialises calls into the handler.
    handler_lock: Mutex<()>,
    /// Becomes readable (EOF) when the server is told to stop.
    shutdown_rx: UnixStream,
    /// Number of live connection threads.
    active: Mutex<usize>,
    /// Signalled when `active` drops.
    drained: Condvar,
}

impl Shared {
    fn handle(&self, request: super::ApiRequest) -> Result<super::ApiReply, super::ApiError> {
        let _serialised = self
            .handler_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.handler.handle(request)
    }
}

/// Decrements the live connection count when a connection thread ends (or fails to start).
struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut active = self.0.active.lock().unwrap_or_else(PoisonError::into_inner);
        *active = active.saturating_sub(1);
        self.0.drained.notify_all();
    }
}

/// Whether a poll result says the shutdown signal fired (any event counts, including HUP).
fn fired(fd: &PollFd<'_>) -> bool {
    fd.revents().is_none_or(|events| !events.is_empty())
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(shared.shutdown_rx.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(err) => {
                warn!("API server: poll failed: {err}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        if fired(&fds[1]) {
            break;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => start_connection(stream, shared),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    // E.g. EMFILE: back off instead of spinning on a listener that stays ready.
                    warn!("API server: accept failed: {err}");
                    thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
    let active = shared.active.lock().unwrap_or_else(PoisonError::into_inner);
    let (active, _) = shared
        .drained
        .wait_timeout_while(active, DRAIN_TIMEOUT, |n| *n > 0)
        .unwrap_or_else(PoisonError::into_inner);
    if *active > 0 {
        warn!(
            "API server stopped with {} request(s) still in flight",
            *active
        );
    }
    debug!("API server stopped");
}

fn start_connection(stream: UnixStream, shared: &Arc<Shared>) {
    {
        let mut active = shared.active.lock().unwrap_or_else(PoisonError::into_inner);
        if *active >= MAX_CONNECTIONS {
            drop(active);
            warn!("API server: too many connections, refusing one");
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let response = Response::fault(503, "too many API connections; retry later");
            let _ = send_all(&stream, &response.to_bytes(false, false));
            return;
        }
        *active += 1;
    }
    let slot = ConnectionSlot(Arc::clone(shared));
    let spawned = thread::Builder::new()
        .name("vmm-api-conn".into())
        .spawn(move || {
            crate::seccomp::label_thread(crate::seccomp::ThreadKind::Api);
            let shared = Arc::clone(&slot.0);
            serve_connection(&stream, &shared);
            drop(slot);
        });
    // On failure the closure, and with it the slot, has been dropped.
    if let Err(err) = spawned {
        warn!("API server: cannot spawn a connection thread: {err}");
    }
}

/// What to do after waiting for input on a connection.
enum Wait {
    Readable,
    Stop,
    TimedOut,
}

fn wait_for_input(stream: &UnixStream, shared: &Shared, timeout: Duration) -> Wait {
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
    loop {
        let mut fds = [
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(shared.shutdown_rx.as_fd(), PollFlags::POLLIN),
        ];
        return match poll(&mut fds, timeout) {
            Err(Errno::EINTR) => continue,
            Err(err) => {
                warn!("API connection: poll failed: {err}");
                Wait::Stop
            }
            Ok(0) => Wait::TimedOut,
            Ok(_) if fired(&fds[1]) => Wait::Stop,
            Ok(_) => Wait::Readable,
        };
    }
}

fn serve_connection(stream: &UnixStream, shared: &Shared) {
    if let Err(err) = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
    {
        warn!("API connection: cannot configure the socket: {err}");
        return;
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    // When the first byte of the pending (incomplete) request arrived.
    let mut request_started: Option<Instant> = None;
    loop {
        // Serve every complete request already buffered (pipelining).
        loop {
            match http::parse_request(&buf) {
                Ok(ParsedRequest::Complete { request, consumed }) => {
                    buf.drain(..consumed.min(buf.len()));
                    request_started = (!buf.is_empty()).then(Instant::now);
                    let response = routes::respond(&request, |r| shared.handle(r));
                    // A HEAD response must not carry a body; ours would, so close instead.
                    let keep_alive = request.keep_alive && request.method != Method::Head;
                    let http10 = request.version == Version::Http10;
                    log_request(&request, response.status);
                    let bytes = response.to_bytes(keep_alive, http10 && keep_alive);
                    if let Err(err) = send_all(stream, &bytes) {
                        debug!("API connection: cannot send the response: {err}");
                        return;
                    }
                    if !keep_alive {
                        return;
                    }
                }
                Ok(ParsedRequest::Incomplete) => break,
                Err(err) => {
                    debug!("API connection: bad request: {err}");
                    let response = Response::fault(err.status(), &err.to_string());
                    let _ = send_all(stream, &response.to_bytes(false, false));
                    return;
                }
            }
        }

        let timeout = match request_started {
            Some(started) => REQUEST_TIMEOUT.saturating_sub(started.elapsed()),
            None => IDLE_TIMEOUT,
        };
        match wait_for_input(stream, shared, timeout) {
            Wait::Readable => {}
            Wait::Stop => return,
            Wait::TimedOut if request_started.is_some() => {
                let response =
                    Response::fault(408, "timed out waiting for the rest of the request");
                let _ = send_all(stream, &response.to_bytes(false, false));
                return;
            }
            Wait::TimedOut => return,
        }
        match (&*stream).read(&mut chunk) {
            Ok(0) => {
                if !buf.is_empty() {
                    debug!("API connection closed in the middle of a request");
                }
                return;
            }
            Ok(n) => {
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                request_started.get_or_insert_with(Instant::now);
            }
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(err) => {
                debug!("API connection: read failed: {err}");
                return;
            }
        }
    }
}

fn log_request(request: &http::Request, status: u16) {
    if status >= 500 {
        warn!(method = %request.method, path = %request.path, status, "API request failed");
    } else {
        debug!(method = %request.method, path = %request.path, status, "API request");
    }
}

/// Writes all of `bytes` without raising SIGPIPE if the client has gone away.
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match send(stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(Errno::EINTR) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}
