//! Helper threads: the termination-signal thread (sigwait) and stdin → serial console.

use libc::*;

use super::rules::RuleSet;

/// Adds the helper threads' calls.
pub(super) fn add(set: &mut RuleSet) {
    set.allow(&[SYS_rt_sigtimedwait]);
}
