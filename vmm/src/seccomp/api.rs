//! The API server's accept and connection threads: unix socket calls, and the one KVM ioctl
//! the balloon's hinting requests make.

use super::common::{allow_dirty_log_sync, allow_unix_sockets};
use super::rules::RuleSet;

/// Adds the API threads' calls.
pub(super) fn add(set: &mut RuleSet) {
    allow_unix_sockets(set);
    // Balloon hinting start/stop sync the dirty log on the API thread.
    allow_dirty_log_sync(set);
}
