//! `vmm run --disk PATH[,ro][,id=NAME]`: one virtio-blk drive per flag, in guest order
//! (/dev/vda, /dev/vdb...).

use std::path::PathBuf;

use block::DriveConfig;

/// Parses a `--disk` value. Without `id=`, drives are named `disk0`, `disk1`... by
/// [`name_drives`] once all flags are known.
pub fn parse_disk_spec(spec: &str) -> Result<DriveConfig, String> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("--disk {spec:?}: expected PATH[,ro][,id=NAME]"))?;
    let mut drive = DriveConfig {
        drive_id: String::new(),
        path_on_host: PathBuf::from(path),
        is_read_only: false,
        is_root_device: false,
    };
    for part in parts {
        match part.split_once('=') {
            None if part == "ro" => drive.is_read_only = true,
            None if part == "rw" => drive.is_read_only = false,
            Some(("id", id)) => drive.drive_id = id.to_string(),
            _ => {
                return Err(format!(
                    "--disk {spec:?}: unknown option {part:?} (expected ro, rw or id=NAME)"
                ))
            }
        }
    }
    if !drive.drive_id.is_empty() {
        drive
            .validate()
            .map_err(|e| format!("--disk {spec:?}: {e}"))?;
    }
    Ok(drive)
}

/// Gives every drive without an id the name `disk<N>` (N: its position).
pub fn name_drives(drives: &mut [DriveConfig]) {
    for (i, drive) in drives.iter_mut().enumerate() {
        if drive.drive_id.is_empty() {
            drive.drive_id = format!("disk{i}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_parse() {
        let d = parse_disk_spec("/a/data.ext4,ro,id=data").unwrap();
        assert_eq!(d.path_on_host, PathBuf::from("/a/data.ext4"));
        assert!(d.is_read_only);
        assert_eq!(d.drive_id, "data");
        let mut drives = vec![
            parse_disk_spec("/x").unwrap(),
            parse_disk_spec("/y,rw").unwrap(),
        ];
        name_drives(&mut drives);
        assert_eq!(drives[1].drive_id, "disk1");
        assert!(!drives[1].is_read_only);
        assert!(parse_disk_spec("").is_err());
        assert!(parse_disk_spec("/x,readonly")
            .unwrap_err()
            .contains("readonly"));
        assert!(parse_disk_spec("/x,id=a b").is_err());
    }
}
