//! A drive's configuration, in Firecracker's shape:
//! `{"drive_id": "data", "path_on_host": "/x.ext4", "is_read_only": true, "is_root_device": false}`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest drive id: the virtio-blk serial (GET_ID) is 20 bytes.
pub const MAX_DRIVE_ID_BYTES: usize = 20;

/// One virtio-blk drive.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Name of the drive in the API and its serial in the guest (`/sys/block/vdX/serial`).
    pub drive_id: String,
    /// The raw image file.
    pub path_on_host: PathBuf,
    /// Open the file read-only and offer `VIRTIO_BLK_F_RO`.
    #[serde(default)]
    pub is_read_only: bool,
    /// Accepted for Firecracker compatibility; the root file system stays the initramfs, so
    /// it must be `false`.
    #[serde(default)]
    pub is_root_device: bool,
}

/// A drive configuration that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriveConfigError {
    /// The id is empty, too long or has characters other than `[A-Za-z0-9_.-]`.
    #[error("drive id {0:?} must be 1 to 20 characters of [A-Za-z0-9_.-]")]
    InvalidId(String),
    /// `is_root_device` was set.
    #[error("drive {0}: is_root_device is not supported (the root file system is the initramfs)")]
    RootDevice(String),
    /// Two drives share an id.
    #[error("drive id {0} is used twice")]
    DuplicateId(String),
}

impl DriveConfig {
    /// Checks what the types cannot express.
    pub fn validate(&self) -> Result<(), DriveConfigError> {
        let id = &self.drive_id;
        let id_ok = !id.is_empty()
            && id.len() <= MAX_DRIVE_ID_BYTES
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !id_ok {
            return Err(DriveConfigError::InvalidId(id.clone()));
        }
        if self.is_root_device {
            return Err(DriveConfigError::RootDevice(id.clone()));
        }
        Ok(())
    }

    /// Checks every drive and that ids are unique.
    pub fn validate_all(drives: &[DriveConfig]) -> Result<(), DriveConfigError> {
        for (i, drive) in drives.iter().enumerate() {
            drive.validate()?;
            if drives[..i].iter().any(|d| d.drive_id == drive.drive_id) {
                return Err(DriveConfigError::DuplicateId(drive.drive_id.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            path_on_host: "/x".into(),
            is_read_only: false,
            is_root_device: false,
        }
    }

    #[test]
    fn firecracker_shape_parses_and_ids_are_checked() {
        let d: DriveConfig = serde_json::from_str(
            r#"{"drive_id": "data", "path_on_host": "/d.ext4", "is_read_only": true}"#,
        )
        .unwrap();
        assert!(d.is_read_only && !d.is_root_device);
        d.validate().unwrap();
        assert!(serde_json::from_str::<DriveConfig>(r#"{"drive_id": "a", "path": "/x"}"#).is_err());
        for bad in ["", "a b", "x".repeat(21).as_str(), "ü"] {
            assert_eq!(
                drive(bad).validate(),
                Err(DriveConfigError::InvalidId(bad.into()))
            );
        }
        drive(&"x".repeat(20)).validate().unwrap();
        let mut root = drive("r");
        root.is_root_device = true;
        assert!(matches!(
            root.validate(),
            Err(DriveConfigError::RootDevice(_))
        ));
        assert_eq!(
            DriveConfig::validate_all(&[drive("a"), drive("b"), drive("a")]),
            Err(DriveConfigError::DuplicateId("a".into()))
        );
    }
}
