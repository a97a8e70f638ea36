//! The running VM as the API's [`ApiHandler`]: each request becomes a [`ControlRequest`] for
//! the VM's event loop.

use super::{ApiError, ApiHandler, ApiReply, ApiRequest, VmStateRequest};
use crate::vm::{ControlError, ControlRequest, VmHandle};

impl ApiHandler for VmHandle {
    fn handle(&self, request: ApiRequest) -> Result<ApiReply, ApiError> {
        let control = match request {
            ApiRequest::GetVmInfo => ControlRequest::Info,
            ApiRequest::SetVmState(VmStateRequest::Paused) => ControlRequest::Pause,
            ApiRequest::SetVmState(VmStateRequest::Resumed) => ControlRequest::Resume,
            ApiRequest::Shutdown => ControlRequest::Shutdown,
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
