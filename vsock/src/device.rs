//! The virtio-vsock device (virtio 1.2 §5.10): device type 19, `VIRTIO_F_VERSION_1` only,
//! configuration space = `guest_cid` (le64), three queues (rx, tx, event).
//!
//! The host listener is bound when the device is created (so a path in use fails the VM's
//! start with a clear error, and host clients can connect before the guest driver is up);
//! connections are served from activation on, by the worker thread. The socket file is
//! removed when the device is dropped.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use virtio_device::{ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{VsockConfig, VsockConfigError};
use crate::worker::{self, Active, WorkerHandle};

/// `VIRTIO_ID_VSOCK`.
pub const VSOCK_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// Size of each queue offered.
pub const QUEUE_SIZE: u16 = 256;
/// Configuration space: `le64 guest_cid`.
pub const CONFIG_SPACE_BYTES: usize = 8;
/// Queue indices.
pub(crate) const RX_QUEUE: usize = 0;
pub(crate) const TX_QUEUE: usize = 1;
pub(crate) const EVENT_QUEUE: usize = 2;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// Locks `mutex`, recovering the data of a poisoned one (a panicked worker must not take the
/// VMM's API down with it).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The configuration is invalid.
    #[error("invalid vsock configuration")]
    Config(#[source] VsockConfigError),
    /// Another process listens on the socket path.
    #[error("vsock socket {path} is in use: another process accepts connections on it")]
    PathInUse {
        /// The path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the path.
    #[error("vsock socket path {path} exists and is not a unix socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A socket operation failed.
    #[error("cannot {operation} vsock socket {path}")]
    Socket {
        /// What was attempted.
        operation: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control eventfd cannot be created.
    #[error("cannot create the vsock control eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Cumulative counters, shared by the worker and the handle.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) host_connects: AtomicU64,
    pub(crate) guest_connects: AtomicU64,
    pub(crate) closed_connections: AtomicU64,
    pub(crate) active_connections: AtomicU64,
    pub(crate) rsts_sent: AtomicU64,
    pub(crate) packets_from_guest: AtomicU64,
    pub(crate) packets_dropped: AtomicU64,
    pub(crate) bytes_to_guest: AtomicU64,
    pub(crate) bytes_to_host: AtomicU64,
    pub(crate) transport_resets_sent: AtomicU64,
}

/// The device's counters, as `GET /vsock` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VsockCounters {
    /// Host clients that sent `CONNECT <port>`.
    pub host_connects: u64,
    /// Guest connections to host ports that found a listener.
    pub guest_connects: u64,
    /// Connections closed or reset.
    pub closed_connections: u64,
    /// Connections open now.
    pub active_connections: u64,
    /// RST packets sent to the guest.
    pub rsts_sent: u64,
    /// Well-formed packets received from the guest.
    pub packets_from_guest: u64,
    /// Malformed or misaddressed guest packets dropped.
    pub packets_dropped: u64,
    /// Payload bytes sent to the guest.
    pub bytes_to_guest: u64,
    /// Payload bytes written to host sockets.
    pub bytes_to_host: u64,
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` events delivered.
    pub transport_resets_sent: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> VsockCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VsockCounters {
            host_connects: g(&self.host_connects),
            guest_connects: g(&self.guest_connects),
            closed_connections: g(&self.closed_connections),
            active_connections: g(&self.active_connections),
            rsts_sent: g(&self.rsts_sent),
            packets_from_guest: g(&self.packets_from_guest),
            packets_dropped: g(&self.packets_dropped),
            bytes_to_guest: g(&self.bytes_to_guest),
            bytes_to_host: g(&self.bytes_to_host),
            transport_resets_sent: g(&self.transport_resets_sent),
        }
    }
}

/// State shared by the device, its worker and its handles.
pub(crate) struct Shared {
    pub(crate) config: VsockConfig,
    pub(crate) counters: Arc<Counters>,
    pub(crate) control_evt: EventFd,
    pub(crate) activated: AtomicBool,
}

/// What `GET /vsock` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockStatus {
    /// Firecracker's device name, if one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's CID.
    pub guest_cid: u32,
    /// The host-side unix socket.
    pub uds_path: PathBuf,
    /// The guest driver has activated the device.
    pub activated: bool,
    /// Counters.
    pub counters: VsockCounters,
}

/// The host's view of the device (for the API).
#[derive(Clone)]
pub struct VsockHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VsockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockHandle")
            .field("uds_path", &self.shared.config.uds_path)
            .finish()
    }
}

impl VsockHandle {
    /// Configuration and counters.
    pub fn status(&self) -> VsockStatus {
        let config = &self.shared.config;
        VsockStatus {
            vsock_id: config.vsock_id.clone(),
            guest_cid: config.guest_cid,
            uds_path: config.uds_path.clone(),
            activated: self.shared.activated.load(Ordering::Relaxed),
            counters: self.shared.counters.snapshot(),
        }
    }
}

/// Removes the socket file when the device goes.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.0) {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), %err, "vsock: cannot remove the socket file");
            }
        }
    }
}

/// Binds the host listener at `path`, replacing a stale socket file nobody listens on.
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    let socket_err = |operation, source| VsockError::Socket {
        operation,
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(VsockError::NotASocket {
                path: path.to_owned(),
            })
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::PathInUse {
                    path: path.to_owned(),
                });
            }
            tracing::info!(path = %path.display(), "vsock: removing a stale socket file");
            std::fs::remove_file(path).map_err(|e| socket_err("remove the stale", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err("inspect", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| socket_err("bind", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| socket_err("make non-blocking", e))?;
    Ok(listener)
}

/// The queues saved in a snapshot, until the restored device is activated.
pub(crate) struct Restored {
    pub(crate) queues: Vec<QueueState>,
}

/// The virtio-vsock device.
pub struct Vsock {
    pub(crate) shared: Arc<Shared>,
    listener: Arc<UnixListener>,
    _socket_file: SocketFile,
    pub(crate) acked_features: u64,
    pub(crate) active: Option<Arc<Mutex<Active>>>,
    worker: Option<WorkerHandle>,
    pub(crate) restored: Option<Restored>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("config", &self.shared.config)
            .field("activated", &self.active.is_some())
            .finish()
    }
}

impl Vsock {
    /// A device for `config`, its listener bound.
    pub fn new(config: VsockConfig) -> Result<Vsock, VsockError> {
        config.validate().map_err(VsockError::Config)?;
        let listener = bind_listener(&config.uds_path)?;
        let control_evt = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        Ok(Vsock {
            _socket_file: SocketFile(config.uds_path.clone()),
            shared: Arc::new(Shared {
                config,
                counters: Arc::new(Counters::default()),
                control_evt,
                activated: AtomicBool::new(false),
            }),
            listener: Arc::new(listener),
            acked_features: 0,
            active: None,
            worker: None,
            restored: None,
        })
    }

    /// A handle for the API.
    pub fn handle(&self) -> VsockHandle {
        VsockHandle {
            shared: self.shared.clone(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VsockConfig {
        &self.shared.config
    }

    /// Whether the worker runs.
    pub fn is_activated(&self) -> bool {
        self.worker.is_some()
    }

    /// Open connections (0 when inactive).
    pub fn connection_count(&self) -> usize {
        self.active
            .as_ref()
            .map_or(0, |a| lock(a).muxer.connection_count())
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        self.active = None;
        self.shared.activated.store(false, Ordering::Relaxed);
    }

    /// Wakes the worker so it delivers what was queued from another thread.
    pub(crate) fn kick_worker(&self) {
        if let Err(err) = self.shared.control_evt.write(1) {
            tracing::error!(%err, "vsock: cannot wake the worker");
        }
    }

    /// Checks the queues the driver set up; a restored device gets its saved positions back.
    fn take_queues(&self, ctx: &mut ActivateContext) -> Result<Vec<Queue>, ActivateError> {
        if ctx.queues.len() < QUEUE_SIZES.len() || ctx.queue_events.len() < QUEUE_SIZES.len() {
            return Err(ActivateError::BadQueues(format!(
                "{} queues and {} queue events given, vsock needs 3",
                ctx.queues.len(),
                ctx.queue_events.len()
            )));
        }
        let mut queues = Vec::with_capacity(3);
        for (i, mut queue) in ctx.queues.drain(..3).enumerate() {
            if !queue.ready() {
                return Err(ActivateError::BadQueues(format!("queue {i} is not ready")));
            }
            if !queue.is_valid(&ctx.mem) {
                return Err(ActivateError::BadQueues(format!(
                    "queue {i} does not fit in guest memory"
                )));
            }
            if let Some(saved) = self.restored.as_ref().and_then(|r| r.queues.get(i)) {
                let current = queue.state();
                if (
                    saved.size,
                    saved.desc_table,
                    saved.avail_ring,
                    saved.used_ring,
                ) != (
                    current.size,
                    current.desc_table,
                    current.avail_ring,
                    current.used_ring,
                ) {
                    return Err(ActivateError::BadQueues(format!(
                        "queue {i} differs from the one saved in the snapshot"
                    )));
                }
                queue.set_next_avail(saved.next_avail);
                queue.set_next_used(saved.next_used);
            }
            queues.push(queue);
        }
        Ok(queues)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = u64::from(self.shared.config.guest_cid).to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| config.get(usize::try_from(at).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "vsock: ignoring a write to read-only config space"
        );
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::BadQueues(
                "the device is already active".into(),
            ));
        }
        let queues = self.take_queues(&mut ctx)?;
        let queue_events: Vec<EventFd> = ctx.queue_events.drain(..3).collect();
        let (active, worker) = worker::spawn(
            &self.shared,
            self.listener.clone(),
            ctx.mem,
            queues,
            queue_events,
            ctx.interrupt,
            ctx.write_log,
            self.restored.is_some(),
        )
        .map_err(ActivateError::Worker)?;
        self.active = Some(active);
        self.worker = Some(worker);
        self.restored = None;
        self.shared.activated.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn worker(&self) -> Option<&virtio_device::WorkerHandle> {
        self.worker.as_ref()
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.restored = None;
        self.acked_features = 0;
        true
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
