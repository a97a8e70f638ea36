//! Device worker threads (balloon, block, vsock): queues, disk I/O, vsock unix sockets.

use libc::*;

use super::common::{allow_dirty_log_sync, allow_unix_sockets};
use super::rules::RuleSet;

/// Adds the device workers' calls.
pub(super) fn add(set: &mut RuleSet) {
    set.allow(&[
        // virtio-blk on a raw file: reads, writes, flushes, discards (punch hole).
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_fsync,
        SYS_fdatasync,
        SYS_fallocate,
        // Balloon: releasing and re-populating guest pages.
        SYS_mincore,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_timerfd_gettime,
    ]);
    // vsock: host connections over unix sockets (guest-initiated connects, accepted clients).
    allow_unix_sockets(set);
    allow_dirty_log_sync(set);
}
