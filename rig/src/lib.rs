//! Finds real KVM: the host's /dev/kvm or the nested QEMU rig, and runs payloads there.
//!
//! On the project's development and CI machines `/dev/kvm` is `kvm_pvm`, which cannot boot a stock
//! Linux guest. Real KVM lives inside the nested rig (`shared/kvm-rig/run.sh`: QEMU TCG with SVM).
//! This crate decides which of the two a process should use ([`detect`]), assembles a payload
//! directory ([`Payload`]), runs a command inside the rig while streaming its output line by line
//! ([`run_in_rig`]) or on the host ([`run_local`]), and builds the project's statically linked
//! binaries that such payloads need ([`build_static`]).

mod build;
mod detect;
mod elf;
mod error;
mod payload;
mod run;

pub use build::{build_static, STATIC_RUSTFLAGS, STATIC_TARGET};
pub use detect::{detect, detect_with, find_rig_script, DetectEnv, KvmBackend, RIG_ENV};
pub use elf::is_static_executable;
pub use error::RigError;
pub use payload::Payload;
pub use run::{rig_lock_path, run_in_rig, run_local, RigLock, RigOptions, RigOutcome};

/// Result type of this crate.
pub type Result<T, E = RigError> = std::result::Result<T, E>;
