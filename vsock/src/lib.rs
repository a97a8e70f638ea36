//! virtio-vsock device (virtio 1.2 §5.10) with Firecracker's host-side convention.
//!
//! - [`Vsock`] is the device behind the [`virtio_device::VirtioDevice`] contract: rx, tx and
//!   event queues, stream sockets with credit-based flow control.
//! - The host side is a unix socket (`uds_path`): a host process connects, writes
//!   `CONNECT <port>\n`, reads `OK <host_port>\n` and then talks to the guest listener on
//!   `port`. A guest connection to host port P goes to the unix socket `<uds_path>_P`.
//! - [`packet`] parses and writes packets in untrusted guest memory, [`connection`] is the
//!   per-connection state machine, `muxer` routes packets between the queues and host
//!   sockets, `worker` is the epoll thread.
//! - [`persist::VsockState`] is the snapshot state: connections are reset on save, and the
//!   guest gets `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` after restore.

pub mod client;
pub mod config;
pub mod connection;
pub mod device;
mod limiter;
mod muxer;
pub mod packet;
pub mod persist;
mod worker;

#[cfg(test)]
mod test_utils;

pub use client::{connect_to_guest, ClientError};
pub use config::{VsockConfig, VsockConfigError, DEFAULT_GUEST_CID};
pub use device::{
    Vsock, VsockCounters, VsockError, VsockHandle, VsockStatus, CONFIG_SPACE_BYTES, QUEUE_SIZE,
    VSOCK_DEVICE_TYPE,
};
pub use persist::{PersistError, VsockState, VSOCK_STATE_VERSION};
pub use virtio_device::SavedQueue;

#[cfg(test)]
mod tests;
