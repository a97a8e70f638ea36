//! User configuration of the vsock device: the `vsock` section of a VM config, in
//! Firecracker's shape (`{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"}`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The guest's context ID when none is given (Firecracker's examples use 3 too).
pub const DEFAULT_GUEST_CID: u32 = 3;

/// Longest suffix the device appends to `uds_path` (`_4294967295`).
const PORT_SUFFIX_MAX_BYTES: usize = 11;

/// Room in `sockaddr_un.sun_path`, without its terminating NUL.
const SUN_PATH_MAX_BYTES: usize = 107;

/// How the vsock device is set up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Firecracker's device name; accepted and reported, otherwise unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context ID (CID); 0-2 and `u32::MAX` are reserved.
    #[serde(default = "default_guest_cid")]
    pub guest_cid: u32,
    /// The host-side unix socket: host processes connect here to reach guest ports, and
    /// guest connections to host port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

fn default_guest_cid() -> u32 {
    DEFAULT_GUEST_CID
}

/// Why a [`VsockConfig`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum VsockConfigError {
    /// A reserved CID.
    #[error("vsock.guest_cid: must be between 3 and 4294967294, got {0}")]
    ReservedCid(u32),
    /// The path is empty or too long for a unix socket address with a port suffix.
    #[error("vsock.uds_path: {path:?} must be 1 to {max} bytes long (unix socket addresses hold {SUN_PATH_MAX_BYTES} bytes and `_<port>` is appended for guest connections)")]
    BadPath {
        /// The path given.
        path: PathBuf,
        /// Longest path accepted.
        max: usize,
    },
}

impl VsockConfig {
    /// Checks the CID and the socket path.
    pub fn validate(&self) -> Result<(), VsockConfigError> {
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(VsockConfigError::ReservedCid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().len();
        let max = SUN_PATH_MAX_BYTES - PORT_SUFFIX_MAX_BYTES;
        if len == 0 || len > max {
            return Err(VsockConfigError::BadPath {
                path: self.uds_path.clone(),
                max,
            });
        }
        Ok(())
    }

    /// The unix socket a guest connection to host port `port` goes to.
    pub fn host_port_path(&self, port: u32) -> PathBuf {
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_shape_parses_with_defaults() {
        let c: VsockConfig = serde_json::from_str(
            r#"{"vsock_id": "vsock0", "guest_cid": 7, "uds_path": "/tmp/v.sock"}"#,
        )
        .unwrap();
        assert_eq!(c.guest_cid, 7);
        assert_eq!(c.vsock_id.as_deref(), Some("vsock0"));
        let c: VsockConfig = serde_json::from_str(r#"{"uds_path": "/tmp/v.sock"}"#).unwrap();
        assert_eq!(c.guest_cid, DEFAULT_GUEST_CID);
        c.validate().unwrap();
        assert_eq!(c.host_port_path(52), PathBuf::from("/tmp/v.sock_52"));
        assert!(serde_json::from_str::<VsockConfig>(r#"{"uds_path": "/x", "cid": 3}"#).is_err());
    }

    #[test]
    fn reserved_cids_and_bad_paths_are_refused() {
        let mut c = VsockConfig {
            vsock_id: None,
            guest_cid: 2,
            uds_path: "/tmp/v.sock".into(),
        };
        assert!(matches!(
            c.validate(),
            Err(VsockConfigError::ReservedCid(2))
        ));
        c.guest_cid = u32::MAX;
        assert!(c.validate().is_err());
        c.guest_cid = 3;
        c.uds_path = PathBuf::from("/".repeat(97));
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("1 to 96 bytes"), "{err}");
        c.uds_path = PathBuf::new();
        assert!(c.validate().is_err());
    }
}
