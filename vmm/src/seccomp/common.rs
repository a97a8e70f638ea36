//! Calls every VMM thread makes: memory, futexes, time, signals, logging, exit.

use libc::*;

use super::rules::RuleSet;

/// Adds the calls of the Rust runtime, the allocator and `tracing` that every thread makes.
pub(super) fn add(set: &mut RuleSet) {
    set.allow(&[
        // Memory (allocator, guest memory already mapped, balloon releases).
        SYS_brk,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        // Locks, channels, condition variables.
        SYS_futex,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        // Time (vDSO fallbacks) and sleeping.
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_gettimeofday,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        // Logs to stderr, reads and writes on descriptors the thread owns.
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_close,
        SYS_fcntl,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_lseek,
        // Event loops.
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_poll,
        SYS_ppoll,
        SYS_eventfd2,
        // Signals (vCPU kicks, aborts) and identity.
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        SYS_tgkill,
        SYS_gettid,
        SYS_getpid,
        SYS_getrandom,
        // Thread and process end.
        SYS_exit,
        SYS_exit_group,
        SYS_madvise,
        SYS_restart_syscall,
    ]);
}

/// Adds what starting a thread takes (glibc's pthread_create and std's thread setup).
pub(super) fn add_thread_spawn(set: &mut RuleSet) {
    set.allow(&[
        SYS_clone,
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_prctl,
        SYS_sched_getaffinity,
        // The child installs its own filter on top of the inherited one.
        SYS_seccomp,
    ]);
}

/// `ioctl` request numbers carry their type in bits 8-15 (`_IOC_TYPE`).
pub(super) const IOC_TYPE_MASK: u64 = 0xff00;

/// Allows `ioctl` requests of type `ioc_type` (e.g. 0xAE for KVM).
pub(super) fn allow_ioctl_type(set: &mut RuleSet, ioc_type: u8) {
    set.allow_arg_masked(SYS_ioctl, 1, IOC_TYPE_MASK, u64::from(ioc_type) << 8);
}

/// `KVM_GET_DIRTY_LOG` (`_IOW(KVMIO, 0x42, struct kvm_dirty_log)`): the balloon's write tracker
/// syncs the dirty log from the worker (free page reporting) and the API thread (hinting).
pub(crate) const KVM_GET_DIRTY_LOG: u64 = 0x4010_AE42;

/// Allows `ioctl(fd, KVM_GET_DIRTY_LOG)` only, of all KVM ioctls.
pub(super) fn allow_dirty_log_sync(set: &mut RuleSet) {
    set.allow_arg_eq(SYS_ioctl, 1, KVM_GET_DIRTY_LOG);
}

/// Allows `ioctl(fd, FIONBIO)` (std's `set_nonblocking` on sockets) and `FIOCLEX`.
pub(super) fn allow_socket_ioctls(set: &mut RuleSet) {
    set.allow_arg_eq(SYS_ioctl, 1, FIONBIO);
    set.allow_arg_eq(SYS_ioctl, 1, FIOCLEX);
}

/// Allows `socket(AF_UNIX, ...)` only, and the calls made on unix stream sockets.
pub(super) fn allow_unix_sockets(set: &mut RuleSet) {
    set.allow_arg_eq(SYS_socket, 0, AF_UNIX as u64);
    set.allow(&[
        SYS_connect,
        SYS_accept4,
        SYS_accept,
        SYS_recvfrom,
        SYS_sendto,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_shutdown,
        SYS_getsockopt,
        SYS_setsockopt,
        SYS_getsockname,
        SYS_getpeername,
    ]);
    allow_socket_ioctls(set);
}
