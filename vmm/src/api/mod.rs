//! HTTP/1.1 + JSON control API over a unix socket, in Firecracker's shape.
//!
//! - [`http`] parses requests and writes responses (hand-written, bounded, panic-free).
//! - [`routes`] maps `(method, path)` to a typed [`ApiRequest`], one small parser per resource.
//! - [`server`] owns the socket and serves connections on background threads.
//! - [`client`] is the small client `vmm pause|resume|status|stop|balloon` use.
//!
//! The VMM plugs in by implementing [`ApiHandler`]; the API knows nothing else about it.
//! Errors are returned as `{"fault_message": "..."}` with a 4xx/5xx status; successful actions
//! answer `204 No Content` and queries `200 OK` with a JSON body.

pub mod client;
pub mod drives;
pub mod http;
pub mod load;
pub mod routes;
pub mod server;
pub mod vm_handler;

pub use server::{ApiServer, ApiServerError, ApiServerHandle};

use serde::{Deserialize, Serialize};

/// A typed request for the VMM, produced by routing an HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`: the VM's state, configuration and uptime.
    GetVmInfo,
    /// `PATCH /vm`: pause or resume the vCPUs.
    SetVmState(VmStateRequest),
    /// `PUT /actions {"action_type": "Shutdown"}`: stop the VM and the VMM.
    Shutdown,
    /// `/balloon...`: the virtio-balloon resource.
    Balloon(BalloonRequest),
    /// `PUT /snapshot/create`: pause, write a snapshot, then resume, stay paused or stop.
    CreateSnapshot(crate::snapshot::SnapshotRequest),
    /// `PUT /snapshot/create` with `"pipeline"`: trim the guest by a policy, run a hinting
    /// pass, then snapshot (see [`crate::pipeline`]).
    SnapshotPipeline(
        crate::pipeline::PipelineRequest,
        crate::snapshot::SnapshotRequest,
    ),
    /// `/drives...`: the virtio-blk drives.
    Drive(DriveRequest),
    /// `/vsock`: the virtio-vsock resource.
    Vsock(VsockRequest),
    /// `PUT /snapshot/load`: restore a snapshot into a VMM started without a VM (`vmm serve`).
    LoadSnapshot(load::LoadRequest),
}

/// A request on the drives resource (Firecracker's shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriveRequest {
    /// `GET /drives`: every drive's configuration and state.
    List,
    /// `GET /drives/{id}`: one drive.
    Get(String),
    /// `PUT /drives/{id}`: add or replace a drive. Firecracker takes it before boot; this VMM
    /// boots at `vmm run`, so drives come from `vmm run --disk` and this answers `409`.
    Configure(String),
    /// `PATCH /drives/{id}`: Firecracker swaps the backing file; not supported (`409`).
    Update(String),
}

/// A request on the vsock resource (Firecracker's shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockRequest {
    /// `PUT /vsock`: Firecracker adds the device before boot; here it comes from
    /// `vmm run --vsock-uds` (or the config file), so this answers `409`.
    Configure(vsock::VsockConfig),
    /// `GET /vsock`: configuration and counters.
    Get,
}

/// A request on the balloon resource (Firecracker's shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BalloonRequest {
    /// `PUT /balloon`: add a balloon device. Firecracker takes it before boot; this VMM boots
    /// at `vmm run`, so the balloon comes from `vmm run --balloon` and this answers `409`.
    Configure(balloon::BalloonConfig),
    /// `PATCH /balloon {"amount_mib": N}`: a new balloon target.
    SetTarget {
        /// Target size in MiB.
        amount_mib: u32,
    },
    /// `GET /balloon`: the balloon's configuration and state.
    Get,
    /// `GET /balloon/statistics`: the guest's latest memory statistics.
    GetStatistics,
    /// `PATCH /balloon/statistics {"stats_polling_interval_s": N}`.
    SetStatisticsInterval {
        /// New polling interval in seconds.
        stats_polling_interval_s: u16,
    },
    /// `PUT /balloon/hinting/start [{"acknowledge_on_stop": bool}]`: start a free page hinting
    /// run (no body: the defaults).
    StartHinting(balloon::HintingOptions),
    /// `GET /balloon/hinting/status`: the current or last hinting run.
    GetHintingStatus,
    /// `PUT /balloon/hinting/stop`: end the hinting run.
    StopHinting,
}

/// The target state of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateRequest {
    /// Stop running the vCPUs (idempotent: pausing a paused VM succeeds).
    Paused,
    /// Run the vCPUs again (idempotent: resuming a running VM succeeds).
    Resumed,
}

/// A successful result of [`ApiHandler::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum ApiReply {
    /// The action was done: `204 No Content`.
    Empty,
    /// A query's result: `200 OK` with this JSON body.
    Json(serde_json::Value),
}

/// A failed request. The message becomes the response's `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// `400`: the request is malformed (bad JSON, unknown field, invalid value).
    #[error("{0}")]
    BadRequest(String),
    /// `404`: no such resource.
    #[error("{0}")]
    NotFound(String),
    /// `405`: the resource exists but does not support the method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// `409`: the request conflicts with the VM's state (e.g. resume before boot).
    #[error("{0}")]
    Conflict(String),
    /// `500`: the VMM failed to carry out a valid request.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status code for this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::Conflict(_) => 409,
            ApiError::Internal(_) => 500,
        }
    }
}

/// The VMM side of the API.
///
/// The server calls `handle` from its connection threads, one request at a time (calls are
/// serialised), so implementations need no extra locking against each other. `handle` should
/// not block for long, and must not wait for the [`ApiServerHandle`] to be dropped (e.g. a
/// `Shutdown` should signal the VMM's main loop and return).
pub trait ApiHandler: Send + Sync {
    /// Carries out one request.
    fn handle(&self, request: ApiRequest) -> Result<ApiReply, ApiError>;
}

/// The suggested body of `GET /`. `vmm status` summarises these fields (it also finds them in
/// nested objects, and tolerates their absence); a handler may return more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's state, e.g. `"NotStarted"`, `"Running"`, `"Paused"`.
    pub state: String,
    /// Milliseconds since the VM was started.
    pub uptime_ms: u64,
    /// Number of vCPUs.
    pub vcpu_count: u64,
    /// Guest memory size in MiB.
    pub mem_size_mib: u64,
}
