//! The VM configuration: from `vmm run` flags or a JSON file in Firecracker's shape.
//!
//! ```json
//! {
//!   "boot-source": {"kernel_image_path": "vmlinuz", "initrd_path": "initrd.cpio", "boot_args": "quiet"},
//!   "machine-config": {"vcpu_count": 2, "mem_size_mib": 512},
//!   "serial": {"output": "stdout"},
//!   "balloon": {"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1,
//!               "free_page_reporting": true, "free_page_hinting": false},
//!   "drives": [{"drive_id": "data", "path_on_host": "data.ext4", "is_read_only": true}]
//!   "vsock": {"guest_cid": 3, "uds_path": "/tmp/vm.vsock"}
//! }
//! ```
//! Unknown fields are rejected so that a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use balloon::{BalloonConfig, BalloonConfigError};
use serde::{Deserialize, Serialize};
use vsock::{VsockConfig, VsockConfigError};

/// Smallest guest the VMM boots: below this the stock kernel and initramfs do not fit.
pub const MIN_MEM_MIB: u64 = 64;
/// Largest guest: bounded by what one host can sensibly back (1 TiB).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Most vCPUs: one xAPIC ID each, one MADT entry each.
pub const MAX_VCPUS: u8 = 254;
/// Default memory size.
pub const DEFAULT_MEM_MIB: u64 = 512;
/// Default vCPU count.
pub const DEFAULT_VCPUS: u8 = 2;

/// What the guest boots.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The bzImage.
    pub kernel_image_path: PathBuf,
    /// The initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// Parameters appended to the VMM's default kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// The virtual machine's shape.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Log dirty pages from boot or restore on, so diff layers (`vmm snapshot --parent`) can be
    /// written; off by default (dirty logging slows the guest's writes).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: DEFAULT_VCPUS,
            mem_size_mib: DEFAULT_MEM_MIB,
            track_dirty_pages: false,
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Appended to a file.
    File(PathBuf),
}

impl SerialOutput {
    /// `"stdout"` or a file path.
    pub fn parse(value: &str) -> Self {
        if value == "stdout" || value == "-" {
            SerialOutput::Stdout
        } else {
            SerialOutput::File(PathBuf::from(value))
        }
    }
}

impl Serialize for SerialOutput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SerialOutput::Stdout => s.serialize_str("stdout"),
            SerialOutput::File(path) => path.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for SerialOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(SerialOutput::parse(&String::deserialize(d)?))
    }
}

/// Serial console settings.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// `"stdout"` or a file path.
    #[serde(default)]
    pub output: SerialOutput,
}

/// A whole VM configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// What to boot.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Console.
    #[serde(default)]
    pub serial: SerialConfig,
    /// A virtio-balloon device, if any (Firecracker's balloon resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// virtio-blk drives (Firecracker's drives resource), in guest order: /dev/vda, vdb...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<block::DriveConfig>,
    /// A virtio-vsock device, if any (Firecracker's vsock resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Per-thread seccomp filters (default on); `false` is for debugging only.
    #[serde(default = "seccomp_default", skip_serializing_if = "Clone::clone")]
    pub seccomp: bool,
}

fn seccomp_default() -> bool {
    true
}

/// Errors reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON for this schema.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message, with line and column.
        message: String,
    },
    /// The balloon section is invalid for this VM.
    #[error("invalid balloon configuration")]
    Balloon(#[source] BalloonConfigError),
    /// A drive is invalid.
    #[error("invalid drive configuration")]
    Drive(#[source] block::DriveConfigError),
    /// The vsock section is invalid.
    #[error("invalid vsock configuration")]
    Vsock(#[source] VsockConfigError),
    /// A value is out of range.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as in the JSON file.
        field: &'static str,
        /// What was expected and what was given.
        message: String,
    },
}

impl VmConfig {
    /// Reads a JSON configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks ranges that the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let machine = &self.machine_config;
        if machine.vcpu_count == 0 || machine.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::Invalid {
                field: "machine-config.vcpu_count",
                message: format!(
                    "must be between 1 and {MAX_VCPUS}, got {}",
                    machine.vcpu_count
                ),
            });
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&machine.mem_size_mib) {
            return Err(ConfigError::Invalid {
                field: "machine-config.mem_size_mib",
                message: format!(
                    "must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, got {}",
                    machine.mem_size_mib
                ),
            });
        }
        if let Some(balloon) = &self.balloon {
            balloon
                .validate(machine.mem_size_mib)
                .map_err(ConfigError::Balloon)?;
        }
        block::DriveConfig::validate_all(&self.drives).map_err(ConfigError::Drive)?;
        if let Some(vsock) = &self.vsock {
            vsock.validate().map_err(ConfigError::Vsock)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, serde_json::Error> {
        serde_json::from_str(text)
    }

    #[test]
    fn firecracker_shaped_file_parses() {
        let config = parse(
            r#"{"boot-source": {"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "quiet"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
                "serial": {"output": "/tmp/console.log"}}"#,
        )
        .unwrap();
        assert_eq!(
            config.machine_config,
            MachineConfig {
                vcpu_count: 1,
                mem_size_mib: 128,
                track_dirty_pages: false,
            }
        );
        assert_eq!(
            config.serial.output,
            SerialOutput::File("/tmp/console.log".into())
        );
        config.validate().unwrap();
        let round_trip: VmConfig =
            serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert_eq!(round_trip, config);
    }

    #[test]
    fn defaults_apply() {
        let config = parse(r#"{"boot-source": {"kernel_image_path": "/k"}}"#).unwrap();
        assert_eq!(config.machine_config, MachineConfig::default());
        assert_eq!(config.serial.output, SerialOutput::Stdout);
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let err =
            parse(r#"{"boot-source": {"kernel_image_path": "/k", "kernel": "x"}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `kernel`"), "{err}");
        let err =
            parse(r#"{"boot-source": {"kernel_image_path": "/k"}, "network": {}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `network`"), "{err}");
    }

    #[test]
    fn ranges_are_checked_with_field_names() {
        let mut config = parse(r#"{"boot-source": {"kernel_image_path": "/k"}}"#).unwrap();
        config.machine_config.vcpu_count = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("vcpu_count") && err.contains("got 0"), "{err}");
        config.machine_config.vcpu_count = 1;
        config.machine_config.mem_size_mib = 16;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("mem_size_mib") && err.contains("got 16"),
            "{err}"
        );
    }

    #[test]
    fn vsock_section_parses_and_is_validated() {
        let mut config: VmConfig = serde_json::from_str(
            r#"{"boot-source": {"kernel_image_path": "k"},
                "vsock": {"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"}}"#,
        )
        .unwrap();
        config.validate().unwrap();
        config.vsock.as_mut().unwrap().guest_cid = 2;
        assert!(matches!(config.validate(), Err(ConfigError::Vsock(_))));
    }

    #[test]
    fn drives_parse_in_order_and_are_validated() {
        let mut config = parse(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "drives": [{"drive_id": "data", "path_on_host": "/d.ext4", "is_read_only": true},
                           {"drive_id": "scratch", "path_on_host": "/s.img"}]}"#,
        )
        .unwrap();
        config.validate().unwrap();
        let ids: Vec<_> = config.drives.iter().map(|d| d.drive_id.as_str()).collect();
        assert_eq!(ids, ["data", "scratch"]);
        assert!(config.drives[0].is_read_only && !config.drives[1].is_read_only);
        config.drives[1].drive_id = "data".into();
        assert!(matches!(config.validate(), Err(ConfigError::Drive(_))));
        let without = parse(r#"{"boot-source": {"kernel_image_path": "/k"}}"#).unwrap();
        assert!(!serde_json::to_string(&without).unwrap().contains("drives"));
    }

    #[test]
    fn balloon_section_parses_and_is_validated() {
        let mut config = parse(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
                "balloon": {"amount_mib": 16, "deflate_on_oom": true,
                            "stats_polling_interval_s": 1, "free_page_reporting": true}}"#,
        )
        .unwrap();
        let balloon = config.balloon.clone().unwrap();
        assert_eq!(balloon.amount_mib, 16);
        assert!(balloon.free_page_reporting && !balloon.free_page_hinting);
        config.validate().unwrap();
        let round_trip: VmConfig =
            serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert_eq!(round_trip, config);

        config.balloon.as_mut().unwrap().amount_mib = 129;
        let err = config.validate().unwrap_err();
        assert!(matches!(err, ConfigError::Balloon(_)));
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(
            source.contains("amount_mib") && source.contains("129"),
            "{source}"
        );

        let err = parse(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "balloon": {"amount_mib": 1, "deflate_on_oom": true, "size": 2}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `size`"), "{err}");
        let without = parse(r#"{"boot-source": {"kernel_image_path": "/k"}}"#).unwrap();
        assert_eq!(without.balloon, None);
        assert!(!serde_json::to_string(&without).unwrap().contains("balloon"));
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = VmConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("vm.json"), "{err}");
        let err = VmConfig::load(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}
