//! The main (VM) thread once the VM runs: event loop, control requests, snapshot writing, dirty
//! log sync, metrics file, API socket removal, and the lazy-restore (userfaultfd) paths.

use libc::*;

use super::common::allow_ioctl_type;
use super::rules::RuleSet;

/// userfaultfd's ioctl type (UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE, UFFDIO_REGISTER...).
const UFFDIO: u8 = 0xAA;

/// Adds the main thread's calls.
pub(super) fn add(set: &mut RuleSet) {
    set.allow(&[
        // Snapshot files and directories (crash-safe writer: temp dir, fsync, rename).
        SYS_open,
        SYS_openat,
        SYS_creat,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_fsync,
        SYS_fdatasync,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        SYS_mkdir,
        SYS_mkdirat,
        SYS_rmdir,
        SYS_unlink,
        SYS_unlinkat,
        SYS_getdents64,
        SYS_lstat,
        SYS_stat,
        SYS_fstatfs,
        SYS_statfs,
        SYS_readlink,
        SYS_readlinkat,
        SYS_fchmod,
        SYS_getcwd,
        SYS_copy_file_range,
        SYS_sendfile,
        SYS_mincore,
        SYS_msync,
        // Lazy restore: the fault handler.
        SYS_userfaultfd,
        // Signals to vCPU threads, sigaction for the kick handler on restore paths.
        SYS_rt_sigaction,
        SYS_rt_sigtimedwait,
        SYS_kill,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_getuid,
        SYS_geteuid,
        SYS_uname,
    ]);
    allow_ioctl_type(set, UFFDIO);
    // Terminal state of the console on exit.
    set.allow_arg_eq(SYS_ioctl, 1, TCGETS);
    set.allow_arg_eq(SYS_ioctl, 1, TCSETS);
    set.allow_arg_eq(SYS_ioctl, 1, TIOCGWINSZ);
}
