//! The KVM objects: the `/dev/kvm` handle, the VM (memory slots, in-kernel irqchip and PIT) and
//! the vCPUs with their boot state.

pub mod cpuid;
pub mod msrs;
pub mod regs;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;

use std::ffi::CString;
use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};

/// Environment variable naming the KVM device to open instead of `/dev/kvm`.
pub const KVM_DEVICE_ENV: &str = "VMM_KVM_DEVICE";
/// The KVM API version this VMM speaks.
const KVM_API_VERSION: i32 = 12;
/// Capabilities the VMM cannot run without.
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::ImmediateExit, "immediate exit"),
    (Cap::ExtCpuid, "CPUID"),
];

/// Errors opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node does not exist.
    #[error("KVM device {0} does not exist: load the kvm module (kvm_intel/kvm_amd) or enable nested virtualization")]
    Missing(PathBuf),
    /// No permission to open it.
    #[error(
        "permission denied opening KVM device {0}: run as root or add the user to the kvm group"
    )]
    PermissionDenied(PathBuf),
    /// Opening it failed otherwise.
    #[error("cannot open KVM device {path}")]
    Open {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The file is not a KVM device, or speaks another API version.
    #[error(
        "{path} is not a usable KVM device (KVM_GET_API_VERSION returned {version}, expected 12)"
    )]
    NotKvm {
        /// The device.
        path: PathBuf,
        /// What it answered.
        version: i32,
    },
    /// A capability the VMM needs is missing.
    #[error("KVM at {path} lacks a required capability: {capability}")]
    MissingCapability {
        /// The device.
        path: PathBuf,
        /// Which.
        capability: &'static str,
    },
}

/// The KVM device path: `$VMM_KVM_DEVICE` or `/dev/kvm`.
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os(KVM_DEVICE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

/// Opens KVM and checks its API version and the capabilities the VMM needs.
pub fn open_kvm(path: &Path) -> Result<Kvm, KvmError> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| KvmError::Missing(path.to_owned()))?;
    let kvm = Kvm::new_with_path(c_path).map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::Missing(path.to_owned()),
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied(path.to_owned()),
        _ => KvmError::Open {
            path: path.to_owned(),
            source: e,
        },
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(KvmError::NotKvm {
            path: path.to_owned(),
            version,
        });
    }
    for (cap, capability) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCapability {
                path: path.to_owned(),
                capability,
            });
        }
    }
    Ok(kvm)
}

/// Whether this host's KVM is `kvm_pvm` (pagetable-based virtualization), which cannot boot a
/// stock distribution kernel.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_named() {
        let err = open_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, KvmError::Missing(_)));
        assert!(err.to_string().contains("/nonexistent/kvm"));
    }

    #[test]
    fn a_file_that_is_not_kvm_is_rejected() {
        let err = open_kvm(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, KvmError::NotKvm { .. }), "{err}");
    }
}
