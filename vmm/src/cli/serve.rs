//! `vmm serve --api-sock SOCK`: a VMM with the control API and no VM. `PUT /snapshot/load`
//! restores a snapshot into this process (on the main thread, the one that then runs the VM,
//! before its seccomp filter is installed, exactly as `vmm restore` does); from then on the API
//! serves the restored VM as usual (pause, resume, snapshot, balloon, stop...). A load that
//! fails answers `400`/`500` with the reason and the VMM keeps waiting for a good one; a second
//! load once a VM runs answers `409`.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use super::CliResult;
use crate::api::load::LoadRequest;
use crate::api::{ApiError, ApiHandler, ApiReply, ApiRequest, ApiServer};
use crate::metrics::BootTimeline;
use crate::vm::{BootError, Vm, VmHandle};

/// How long a load request waits for the restore (checking every chunk of a large memory file
/// under emulation takes a while).
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// The `409` answer to VM requests before a snapshot is loaded.
pub const NOTHING_LOADED_MESSAGE: &str =
    "no microVM is loaded yet: PUT /snapshot/load {\"snapshot_path\": DIR, \"resume_vm\": true} first";

/// Arguments of `vmm serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Serve the control API on this unix socket.
    #[arg(long)]
    pub api_sock: PathBuf,
    /// The loaded VM's options (the same as `vmm restore`'s).
    #[command(flatten)]
    pub vm: super::restore::RestoredVmArgs,
}

/// What the API and signal threads ask of the main thread before a VM exists.
enum MainRequest {
    /// Restore this snapshot and answer on the sender.
    Load(LoadRequest, Sender<Result<(), ApiError>>),
    /// End the VMM (a signal or `PUT /actions Shutdown`).
    Stop(&'static str),
}

/// The API's view: the loaded VM once there is one, the main thread until then.
struct ServeHandler {
    vm: OnceLock<VmHandle>,
    main: Mutex<Sender<MainRequest>>,
}

impl ServeHandler {
    fn to_main(&self, request: MainRequest) -> Result<(), ApiError> {
        self.main
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(request)
            .map_err(|_| ApiError::Internal("the VMM is stopping".into()))
    }
}

impl ApiHandler for ServeHandler {
    fn handle(&self, request: ApiRequest) -> Result<ApiReply, ApiError> {
        if let Some(vm) = self.vm.get() {
            return vm.handle(request);
        }
        match request {
            ApiRequest::LoadSnapshot(load) => {
                let (reply_tx, reply_rx) = mpsc::channel();
                self.to_main(MainRequest::Load(load, reply_tx))?;
                match reply_rx.recv_timeout(LOAD_TIMEOUT) {
                    Ok(result) => result.map(|()| ApiReply::Empty),
                    Err(RecvTimeoutError::Timeout) => Err(ApiError::Internal(format!(
                        "the restore did not finish within {} s",
                        LOAD_TIMEOUT.as_secs()
                    ))),
                    Err(RecvTimeoutError::Disconnected) => {
                        Err(ApiError::Internal("the VMM is stopping".into()))
                    }
                }
            }
            ApiRequest::GetVmInfo => Ok(ApiReply::Json(json!({
                "state": "NotStarted",
                "uptime_ms": 0,
                "vcpu_count": 0,
                "mem_size_mib": 0,
                "hint": NOTHING_LOADED_MESSAGE,
            }))),
            ApiRequest::Shutdown => self
                .to_main(MainRequest::Stop("shutdown request"))
                .map(|()| ApiReply::Empty),
            _ => Err(ApiError::Conflict(NOTHING_LOADED_MESSAGE.into())),
        }
    }
}

/// Serves the API with no VM until a load succeeds, then runs the loaded VM; returns the exit
/// code.
pub fn run(args: ServeArgs) -> CliResult {
    crate::metrics::mark_process_start();
    let signals = super::run::termination_signals();
    signals
        .thread_block()
        .context("cannot block termination signals")?;
    let api_server = ApiServer::bind(&args.api_sock)?;
    crate::seccomp::set_enabled(!args.vm.no_seccomp)?;
    let (main_tx, main_rx) = mpsc::channel();
    let handler = Arc::new(ServeHandler {
        vm: OnceLock::new(),
        main: Mutex::new(main_tx.clone()),
    });
    let api = api_server.spawn(handler.clone())?;
    let signal_handler = handler.clone();
    std::thread::Builder::new()
        .name("signals-serve".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Helper);
            while let Ok(signal) = signals.wait() {
                match signal_handler.vm.get() {
                    Some(vm) => vm.signal(signal as i32),
                    None => {
                        let _ = main_tx.send(MainRequest::Stop("a termination signal"));
                    }
                }
            }
        })
        .context("cannot start the signal thread")?;
    tracing::info!(api_sock = %args.api_sock.display(), "serving, no microVM yet: waiting for PUT /snapshot/load");
    let Some(vm) = wait_for_load(&args, &main_rx, &handler) else {
        drop(api);
        return Ok(0);
    };
    // The API keeps serving the VM through `handler`; the signal thread above forwards
    // signals to it too.
    let result = super::run::serve(vm, None, signals, args.vm.metrics_file.as_deref());
    drop(api);
    result
}

/// Answers load requests until one succeeds (the VM) or the VMM is told to stop (`None`).
fn wait_for_load(
    args: &ServeArgs,
    requests: &Receiver<MainRequest>,
    handler: &ServeHandler,
) -> Option<Vm> {
    while let Ok(request) = requests.recv() {
        let (load, reply) = match request {
            MainRequest::Stop(why) => {
                tracing::info!("stopping on {why}, no microVM was loaded");
                return None;
            }
            MainRequest::Load(load, reply) => (load, reply),
        };
        let options = args
            .vm
            .restore_options(load.lazy, load.track_dirty_pages, !load.resume);
        let timeline = Arc::new(BootTimeline::new(std::time::Instant::now()));
        match Vm::restore(&load.path, &options, timeline) {
            Ok(vm) => {
                let _ = handler.vm.set(vm.handle());
                args.vm.notify_trimmer(&vm);
                tracing::info!(snapshot = %load.path.display(), resumed = load.resume, "snapshot loaded");
                let _ = reply.send(Ok(()));
                return Some(vm);
            }
            Err(err) => {
                let message = format!(
                    "cannot load the snapshot {}: {}",
                    load.path.display(),
                    crate::devices::virtio::error_chain(&err)
                );
                tracing::warn!("{message}; still waiting for a snapshot to load");
                let _ = reply.send(Err(match err {
                    BootError::Snapshot(_) | BootError::Config(_) => ApiError::BadRequest(message),
                    _ => ApiError::Internal(message),
                }));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler() -> (ServeHandler, Receiver<MainRequest>) {
        let (tx, rx) = mpsc::channel();
        let handler = ServeHandler {
            vm: OnceLock::new(),
            main: Mutex::new(tx),
        };
        (handler, rx)
    }

    #[test]
    fn before_a_load_vm_requests_conflict_and_loads_go_to_the_main_thread() {
        let (handler, rx) = handler();
        let Ok(ApiReply::Json(info)) = handler.handle(ApiRequest::GetVmInfo) else {
            panic!("GET / before a load");
        };
        assert_eq!(info["state"], "NotStarted");
        let paused = handler.handle(ApiRequest::SetVmState(crate::api::VmStateRequest::Paused));
        assert_eq!(
            paused,
            Err(ApiError::Conflict(NOTHING_LOADED_MESSAGE.into()))
        );

        // The main thread answers a failed load with the restore's error.
        let main = std::thread::spawn(move || {
            let Ok(MainRequest::Load(load, reply)) = rx.recv() else {
                panic!("no load request");
            };
            assert_eq!(load.path, PathBuf::from("/nope"));
            reply
                .send(Err(ApiError::BadRequest("cannot load /nope".into())))
                .unwrap();
            let Ok(MainRequest::Stop(_)) = rx.recv() else {
                panic!("no stop request");
            };
        });
        let load = LoadRequest {
            path: "/nope".into(),
            lazy: crate::snapshot::lazy::LazyMode::Off,
            resume: true,
            track_dirty_pages: false,
        };
        assert_eq!(
            handler.handle(ApiRequest::LoadSnapshot(load)),
            Err(ApiError::BadRequest("cannot load /nope".into()))
        );
        assert_eq!(handler.handle(ApiRequest::Shutdown), Ok(ApiReply::Empty));
        main.join().unwrap();
        // The main thread is gone: requests fail cleanly, no panic.
        assert!(matches!(
            handler.handle(ApiRequest::Shutdown),
            Err(ApiError::Internal(_))
        ));
    }
}
