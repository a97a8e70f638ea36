//! A hook device worker threads call when they start, so the VMM can confine them (seccomp)
//! without the device crates depending on the VMM.

use std::sync::OnceLock;

static WORKER_THREAD_HOOK: OnceLock<fn()> = OnceLock::new();

/// Sets the function every device worker thread runs first (the first call wins).
pub fn set_worker_thread_hook(hook: fn()) {
    let _ = WORKER_THREAD_HOOK.set(hook);
}

/// Called by a device worker thread as its first action; runs the hook if one is set.
pub fn worker_thread_started() {
    if let Some(hook) = WORKER_THREAD_HOOK.get() {
        hook();
    }
}
