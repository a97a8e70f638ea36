//! The running VM as the API's [`ApiHandler`]: VM requests become [`ControlRequest`]s for the
//! VM's event loop; balloon requests go to the balloon's handle directly (it is thread-safe,
//! and the event loop stays free for pause/resume/shutdown).

use balloon::{BalloonConfig, BalloonError, BalloonHandle};
use serde_json::{json, Value};

use super::{ApiError, ApiHandler, ApiReply, ApiRequest, BalloonRequest, VmStateRequest};
use crate::vm::{ControlError, ControlRequest, VmHandle};

/// The `409` answer to balloon requests on a VM without a balloon.
pub const NO_BALLOON_MESSAGE: &str =
    "this microVM has no balloon device; the balloon must be configured at start: vmm run --balloon amount_mib=N,deflate_on_oom=true,...";

impl ApiHandler for VmHandle {
    fn handle(&self, request: ApiRequest) -> Result<ApiReply, ApiError> {
        let control = match request {
            ApiRequest::GetVmInfo => ControlRequest::Info,
            ApiRequest::SetVmState(VmStateRequest::Paused) => ControlRequest::Pause,
            ApiRequest::SetVmState(VmStateRequest::Resumed) => ControlRequest::Resume,
            ApiRequest::Shutdown => ControlRequest::Shutdown,
            ApiRequest::Balloon(request) => return self.handle_balloon(request),
            ApiRequest::CreateSnapshot(request) => {
                return match self.snapshot(request) {
                    Ok(summary) => Ok(ApiReply::Json(
                        serde_json::to_value(summary).unwrap_or_default(),
                    )),
                    Err(message) => Err(ApiError::Internal(message)),
                }
            }
            ApiRequest::SnapshotPipeline(pipeline, snapshot) => {
                return match crate::pipeline::run(self, &pipeline, snapshot) {
                    Ok(summary) => Ok(ApiReply::Json(
                        serde_json::to_value(summary).unwrap_or_default(),
                    )),
                    Err(err @ crate::pipeline::PipelineError::Policy(_)) => {
                        Err(ApiError::BadRequest(err.to_string()))
                    }
                    Err(err @ crate::pipeline::PipelineError::TrimRequired { .. }) => {
                        Err(ApiError::Conflict(err.to_string()))
                    }
                    Err(err) => Err(ApiError::Internal(err.to_string())),
                }
            }
            ApiRequest::Drive(request) => return super::drives::handle(self.drives(), request),
            ApiRequest::Vsock(request) => return self.handle_vsock(request),
            ApiRequest::LoadSnapshot(_) => return Err(ApiError::Conflict(LOADED_MESSAGE.into())),
        };
        match self.request(control) {
            Ok(Some(body)) => Ok(ApiReply::Json(body)),
            Ok(None) => Ok(ApiReply::Empty),
            Err(ControlError::Conflict(message)) => Err(ApiError::Conflict(message)),
            Err(err @ (ControlError::Timeout | ControlError::Stopped)) => {
                Err(ApiError::Internal(err.to_string()))
            }
        }
    }
}

/// The `409` answer to `PUT /snapshot/load` on a VMM that runs a VM.
pub const LOADED_MESSAGE: &str =
    "this VMM already runs a microVM; load a snapshot into a VMM started without one (vmm serve --api-sock SOCK), or restore it in a new process (vmm restore --snapshot DIR)";

/// The `409` answer to vsock requests on a VM without a vsock device.
pub const NO_VSOCK_MESSAGE: &str =
    "this microVM has no vsock device; it must be configured at start: vmm run --vsock-uds PATH [--vsock-cid N]";

impl VmHandle {
    fn handle_vsock(&self, request: super::VsockRequest) -> Result<ApiReply, ApiError> {
        let Some(handle) = self.vsock() else {
            return Err(ApiError::Conflict(NO_VSOCK_MESSAGE.into()));
        };
        match request {
            super::VsockRequest::Configure(_) => Err(ApiError::Conflict(
                "the vsock device is configured at start (vmm run --vsock-uds); GET /vsock shows it".into(),
            )),
            super::VsockRequest::Get => Ok(ApiReply::Json(
                serde_json::to_value(handle.status())
                    .map_err(|e| ApiError::Internal(format!("cannot encode the vsock status: {e}")))?,
            )),
        }
    }

    fn handle_balloon(&self, request: BalloonRequest) -> Result<ApiReply, ApiError> {
        let Some((handle, config)) = self.balloon() else {
            return Err(ApiError::Conflict(NO_BALLOON_MESSAGE.into()));
        };
        balloon_request(handle, config, request)
    }
}

/// Carries out `request` on the balloon `handle` (created from `config`).
pub fn balloon_request(
    handle: &BalloonHandle,
    config: &BalloonConfig,
    request: BalloonRequest,
) -> Result<ApiReply, ApiError> {
    match request {
        BalloonRequest::Configure(_) => Err(ApiError::Conflict(
            "the balloon is already configured (at start); change its target with PATCH /balloon {\"amount_mib\": N}"
                .into(),
        )),
        BalloonRequest::SetTarget { amount_mib } => {
            handle.set_target_mib(amount_mib).map_err(balloon_error)?;
            Ok(ApiReply::Empty)
        }
        BalloonRequest::Get => {
            let status = handle.status();
            Ok(ApiReply::Json(json!({
                "amount_mib": status.target_mib,
                "deflate_on_oom": config.deflate_on_oom,
                "stats_polling_interval_s": status.stats_polling_interval_s,
                "free_page_reporting": config.free_page_reporting,
                "free_page_hinting": config.free_page_hinting,
                "status": status,
            })))
        }
        BalloonRequest::GetStatistics => {
            if !config.stats_enabled() {
                return Err(ApiError::Conflict(
                    "balloon statistics are disabled: start the VM with --balloon stats_polling_interval_s=N (N > 0)"
                        .into(),
                ));
            }
            let status = handle.status();
            let mut body = json!({
                "target_pages": status.target_pages,
                "actual_pages": status.actual_pages,
                "target_mib": status.target_mib,
                "actual_mib": status.actual_mib,
            });
            match handle.statistics() {
                Some(stats) => {
                    if let (Some(body), Ok(Value::Object(stats))) =
                        (body.as_object_mut(), serde_json::to_value(stats))
                    {
                        body.extend(stats);
                    }
                }
                None => {
                    return Err(ApiError::Conflict(
                        "the guest has not sent balloon statistics yet".into(),
                    ))
                }
            }
            Ok(ApiReply::Json(body))
        }
        BalloonRequest::SetStatisticsInterval {
            stats_polling_interval_s,
        } => {
            handle
                .set_stats_polling_interval_s(stats_polling_interval_s)
                .map_err(balloon_error)?;
            Ok(ApiReply::Empty)
        }
        BalloonRequest::StartHinting(options) => {
            handle.start_hinting_with(options).map_err(balloon_error)?;
            Ok(ApiReply::Empty)
        }
        BalloonRequest::GetHintingStatus => {
            if !config.free_page_hinting {
                return Err(ApiError::Conflict(
                    "free page hinting is disabled: start the VM with --balloon free_page_hinting=true"
                        .into(),
                ));
            }
            Ok(ApiReply::Json(json!(handle.hinting_status())))
        }
        BalloonRequest::StopHinting => {
            handle.stop_hinting().map_err(balloon_error)?;
            if handle.hinting_status().acknowledge_on_stop {
                // Let the guest free the hinted pages now (they stay `Hinted` in the page-state
                // map until written).
                handle.finish_hinting().map_err(balloon_error)?;
            }
            Ok(ApiReply::Empty)
        }
    }
}

/// Maps a balloon error to its HTTP answer, with the whole cause chain as the message.
fn balloon_error(err: BalloonError) -> ApiError {
    let message = crate::devices::virtio::error_chain(&err);
    match err {
        BalloonError::TargetTooLarge { .. } | BalloonError::InvalidStatsPollingInterval { .. } => {
            ApiError::BadRequest(message)
        }
        BalloonError::StatsNotEnabled { .. }
        | BalloonError::HintingNotEnabled { .. }
        | BalloonError::NotActivated { .. }
        | BalloonError::HintingNotNegotiated { .. } => ApiError::Conflict(message),
        _ => ApiError::Internal(message),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use balloon::{Balloon, HintingOptions, PageStateMap, RamReleaser};

    use super::*;

    struct NoRelease;

    impl RamReleaser for NoRelease {
        fn release(&self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn balloon(config: &BalloonConfig) -> Balloon {
        let map = PageStateMap::with_ram_size(128 << 20).unwrap();
        Balloon::new(
            config.clone(),
            Arc::new(Mutex::new(map)),
            Arc::new(NoRelease),
        )
        .unwrap()
    }

    fn config(stats_s: u16, hinting: bool) -> BalloonConfig {
        BalloonConfig {
            amount_mib: 4,
            deflate_on_oom: true,
            stats_polling_interval_s: stats_s,
            free_page_reporting: true,
            free_page_hinting: hinting,
        }
    }

    fn status_of(result: Result<ApiReply, ApiError>) -> u16 {
        match result {
            Ok(ApiReply::Empty) => 204,
            Ok(ApiReply::Json(_)) => 200,
            Err(err) => err.status(),
        }
    }

    #[test]
    fn balloon_requests_map_to_the_handle_and_errors_to_statuses() {
        let config = config(0, false);
        let device = balloon(&config);
        let handle = device.handle();
        let call = |request| balloon_request(&handle, &config, request);

        assert_eq!(
            status_of(call(BalloonRequest::SetTarget { amount_mib: 64 })),
            204
        );
        let Ok(ApiReply::Json(body)) = call(BalloonRequest::Get) else {
            panic!("GET /balloon failed")
        };
        assert_eq!(body["amount_mib"], 64);
        assert_eq!(body["deflate_on_oom"], true);
        assert_eq!(body["free_page_reporting"], true);
        assert_eq!(body["status"]["target_pages"], 64 * 256);

        // Bad values are 400, features not configured or not running are 409.
        let too_big = call(BalloonRequest::SetTarget { amount_mib: 129 });
        assert_eq!(status_of(too_big.clone()), 400);
        assert!(
            too_big
                .unwrap_err()
                .to_string()
                .contains("larger than guest RAM"),
            "message names the problem"
        );
        for request in [
            BalloonRequest::Configure(config.clone()),
            BalloonRequest::GetStatistics,
            BalloonRequest::SetStatisticsInterval {
                stats_polling_interval_s: 2,
            },
            BalloonRequest::StartHinting(HintingOptions::default()),
            BalloonRequest::GetHintingStatus,
            BalloonRequest::StopHinting,
        ] {
            let result = call(request.clone());
            assert_eq!(status_of(result.clone()), 409, "{request:?}: {result:?}");
        }
    }

    #[test]
    fn statistics_and_hinting_before_the_driver_runs() {
        let config = config(1, true);
        let device = balloon(&config);
        let handle = device.handle();
        let call = |request| balloon_request(&handle, &config, request);
        // Statistics enabled but none sent yet.
        let result = call(BalloonRequest::GetStatistics);
        assert!(
            matches!(&result, Err(ApiError::Conflict(m)) if m.contains("not sent")),
            "{result:?}"
        );
        assert_eq!(
            status_of(call(BalloonRequest::SetStatisticsInterval {
                stats_polling_interval_s: 0
            })),
            400
        );
        assert_eq!(
            status_of(call(BalloonRequest::SetStatisticsInterval {
                stats_polling_interval_s: 5
            })),
            204
        );
        // Hinting is configured, but the guest driver is not running.
        let result = call(BalloonRequest::StartHinting(HintingOptions::default()));
        assert!(
            matches!(&result, Err(ApiError::Conflict(m)) if m.contains("not running")),
            "{result:?}"
        );
        assert_eq!(status_of(call(BalloonRequest::GetHintingStatus)), 200);
    }
}
