//! `PUT /snapshot/load` in Firecracker's shape:
//! `{"snapshot_path": DIR, "mem_backend": {"backend_type": "File"|"Uffd"}, "resume_vm": bool,
//! "track_dirty_pages": bool}`.
//!
//! A snapshot here is a directory (its state and memory files), so `snapshot_path` names the
//! directory. `mem_backend.backend_type` picks how memory is restored: `File` maps the memory
//! file (private, copy-on-write), `Uffd` fills pages on first touch with the VMM's own
//! userfaultfd handler. Firecracker's `backend_path` is accepted only where it means the same
//! thing (the snapshot's own memory file, for `File`). Unknown fields are refused by name.
//! Only a VMM started with `vmm serve` (no VM yet) carries the load out; one running a VM
//! answers `409`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::http::Request;
use super::routes::parse_body;
use super::{ApiError, ApiRequest};
use crate::snapshot::format::MEMORY_FILE;
use crate::snapshot::lazy::LazyMode;

/// A request to restore a snapshot into this (empty) VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadRequest {
    /// The snapshot directory.
    pub path: PathBuf,
    /// How guest memory is restored.
    pub lazy: LazyMode,
    /// Run the vCPUs once restored (else the VM waits, paused, for `PATCH /vm`).
    pub resume: bool,
    /// Log dirty pages from the restore on (diff layers on this snapshot).
    pub track_dirty_pages: bool,
}

/// The request body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_backend: Option<MemBackend>,
    #[serde(default)]
    resume_vm: bool,
    #[serde(default)]
    track_dirty_pages: bool,
}

/// Firecracker's `mem_backend`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackend {
    backend_type: BackendType,
    #[serde(default)]
    backend_path: Option<PathBuf>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
enum BackendType {
    File,
    Uffd,
}

/// Parses `PUT /snapshot/load`.
pub fn parse(request: &Request) -> Result<ApiRequest, ApiError> {
    let body: LoadBody = parse_body(request)?;
    if body.snapshot_path.as_os_str().is_empty() {
        return Err(ApiError::BadRequest("snapshot_path is empty".into()));
    }
    let backend = body.mem_backend.as_ref();
    let lazy = match backend.map(|b| b.backend_type) {
        None | Some(BackendType::File) => LazyMode::Off,
        Some(BackendType::Uffd) => LazyMode::Uffd,
    };
    if let Some(path) = backend.and_then(|b| b.backend_path.as_deref()) {
        check_backend_path(&body.snapshot_path, path, lazy)?;
    }
    Ok(ApiRequest::LoadSnapshot(LoadRequest {
        path: body.snapshot_path,
        lazy,
        resume: body.resume_vm,
        track_dirty_pages: body.track_dirty_pages,
    }))
}

/// `backend_path` must be the snapshot's own memory file (`File`); the `Uffd` handler runs in
/// this VMM, so no socket path applies.
fn check_backend_path(dir: &Path, path: &Path, lazy: LazyMode) -> Result<(), ApiError> {
    if lazy == LazyMode::Uffd {
        return Err(ApiError::BadRequest(format!(
            "mem_backend.backend_path {} is not used with backend_type Uffd: this VMM serves page faults itself; leave backend_path out",
            path.display()
        )));
    }
    let expected = dir.join(MEMORY_FILE);
    let same = match (
        std::fs::canonicalize(&expected),
        std::fs::canonicalize(path),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => expected == path,
    };
    if same {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "mem_backend.backend_path {} is not the snapshot's memory file {}: a snapshot here is a directory and its memory file is always {MEMORY_FILE} in it; leave backend_path out",
            path.display(),
            expected.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::{parse_request, ParsedRequest};

    /// Routes `PUT /snapshot/load` with `body` through the HTTP parser and the routing table.
    fn load(body: &str) -> Result<LoadRequest, ApiError> {
        let raw = format!(
            "PUT /snapshot/load HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let Ok(ParsedRequest::Complete { request, .. }) = parse_request(raw.as_bytes()) else {
            panic!("unparsable request {raw:?}");
        };
        match crate::api::routes::route(&request)? {
            ApiRequest::LoadSnapshot(load) => Ok(load),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn firecracker_shaped_bodies_parse() {
        let plain = load(r#"{"snapshot_path": "/s"}"#).unwrap();
        assert_eq!(
            plain,
            LoadRequest {
                path: "/s".into(),
                lazy: LazyMode::Off,
                resume: false,
                track_dirty_pages: false
            }
        );
        let lazy = load(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd"}, "resume_vm": true, "track_dirty_pages": true}"#,
        )
        .unwrap();
        assert_eq!(lazy.lazy, LazyMode::Uffd);
        assert!(lazy.resume && lazy.track_dirty_pages);
        let file = load(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"}}"#,
        )
        .unwrap();
        assert_eq!(file.lazy, LazyMode::Off);
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let message = |body: &str| load(body).unwrap_err().to_string();
        assert!(
            message(r#"{"snapshot_path": "/s", "enable_diff_snapshots": true}"#)
                .contains("enable_diff_snapshots")
        );
        assert!(
            message(r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk"}}"#)
                .contains("Disk")
        );
        assert!(message(r#"{"resume_vm": true}"#).contains("snapshot_path"));
        assert!(message(r#"{"snapshot_path": ""}"#).contains("empty"));
        assert!(message(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/other/mem"}}"#
        )
        .contains("/other/mem"));
        assert!(message(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/uffd.sock"}}"#
        )
        .contains("Uffd"));
    }
}
