//! vCPU threads: KVM ioctls (KVM_RUN, register and state save/restore), device emulation.

use libc::*;

use super::common::allow_ioctl_type;
use super::rules::RuleSet;

/// KVM's ioctl type (`KVMIO`).
pub(super) const KVMIO: u8 = 0xAE;

/// Adds the vCPU thread's calls.
pub(super) fn add(set: &mut RuleSet) {
    allow_ioctl_type(set, KVMIO);
    // Serial console output may go to a file; guest writes to an eventfd-backed irqfd.
    set.allow(&[SYS_pwrite64, SYS_fsync, SYS_rt_sigtimedwait]);
}
