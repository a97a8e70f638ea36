//! `/drives`: the virtio-blk drives, in Firecracker's shape, as far as this VMM can honour it.
//!
//! - `GET /drives`: every drive's configuration, state and counters (a JSON array).
//! - `GET /drives/{id}`: one drive; `404` for an unknown id.
//! - `PUT /drives/{id}`: Firecracker adds a drive before boot. This VMM boots at `vmm run`
//!   (no pre-boot phase) and virtio-mmio has no hotplug, so drives come from
//!   `vmm run --disk PATH[,ro][,id=NAME]` or the config file's `drives`; the answer is `409`.
//! - `PATCH /drives/{id}`: Firecracker swaps the backing file; not supported here (`409`).

use serde_json::Value;

use super::{ApiError, ApiReply, DriveRequest};

/// The `409` answer to `PUT /drives/{id}`.
pub const NO_HOTPLUG_MESSAGE: &str =
    "drives are configured at start (vmm run --disk PATH[,ro][,id=NAME] or the config file's \"drives\"); this VMM has no pre-boot phase and no disk hotplug";

/// The `409` answer to `PATCH /drives/{id}`.
pub const NO_SWAP_MESSAGE: &str =
    "swapping a drive's backing file is not supported; start the VM with the file wanted";

/// Answers a drive request from the VM's drives.
pub fn handle(drives: &[block::BlockHandle], request: DriveRequest) -> Result<ApiReply, ApiError> {
    let find = |id: &str| {
        drives
            .iter()
            .find(|d| d.drive_id() == id)
            .ok_or_else(|| ApiError::NotFound(format!("no drive with id {id:?}")))
    };
    match request {
        DriveRequest::List => {
            let all = drives
                .iter()
                .map(block::BlockHandle::status)
                .collect::<Vec<_>>();
            Ok(ApiReply::Json(to_json(&all)?))
        }
        DriveRequest::Get(id) => Ok(ApiReply::Json(to_json(&find(&id)?.status())?)),
        DriveRequest::Configure(_) => Err(ApiError::Conflict(NO_HOTPLUG_MESSAGE.into())),
        DriveRequest::Update(id) => {
            find(&id)?;
            Err(ApiError::Conflict(NO_SWAP_MESSAGE.into()))
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::Internal(format!("encoding drives: {e}")))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn drives_are_listed_and_found_and_changes_refused() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[0u8; 4096]).unwrap();
        let device = block::Block::new(block::DriveConfig {
            drive_id: "data".into(),
            path_on_host: file.path().to_owned(),
            is_read_only: true,
            is_root_device: false,
        })
        .unwrap();
        let drives = vec![device.handle()];
        let ApiReply::Json(list) = handle(&drives, DriveRequest::List).unwrap() else {
            panic!("not JSON");
        };
        assert_eq!(list[0]["drive_id"], "data");
        assert_eq!(list[0]["capacity_sectors"], 8);
        assert_eq!(list[0]["is_read_only"], true);
        let ApiReply::Json(one) = handle(&drives, DriveRequest::Get("data".into())).unwrap() else {
            panic!("not JSON");
        };
        assert_eq!(one["size_bytes"], 4096);
        assert!(matches!(
            handle(&drives, DriveRequest::Get("nope".into())),
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(
            handle(&drives, DriveRequest::Configure("new".into())),
            Err(ApiError::Conflict(_))
        ));
        assert!(matches!(
            handle(&drives, DriveRequest::Update("data".into())),
            Err(ApiError::Conflict(_))
        ));
    }
}
