//! After a restore, tell the guest-trimmer (`after_restore`) so the policy's after-restore hooks
//! run in the clone (reseed user-space randomness, reconnect...). Runs on its own thread: the
//! guest's vsock driver first handles the transport reset, so the trimmer is retried until it
//! answers or a bound passes; the outcome is logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::TrimmerClient;
use crate::metrics::BootTimeline;

/// How long to keep trying to reach the trimmer after a restore.
pub const AFTER_RESTORE_WAIT: Duration = Duration::from_secs(30);
/// Bound on one `after_restore` exchange (the hooks run inside it).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between attempts while the trimmer is unreachable.
const RETRY: Duration = Duration::from_millis(100);

/// Starts the notification on a background thread; its milestones go on `timeline`.
pub fn notify_in_background(uds_path: PathBuf, port: u32, timeline: Arc<BootTimeline>) {
    let spawned = std::thread::Builder::new()
        .name("after-restore".into())
        .spawn(move || notify(&TrimmerClient::new(&uds_path, port), &timeline));
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start the after-restore notification thread");
    }
}

/// Sends `after_restore`, retrying while the trimmer cannot be reached or the connection
/// drops; logs the outcome.
fn notify(client: &TrimmerClient, timeline: &BootTimeline) {
    let started = Instant::now();
    timeline.mark_phase("after_restore_first_try_ms");
    loop {
        match client.after_restore(REPLY_TIMEOUT) {
            Ok(reply) => {
                timeline.mark_phase("after_restore_answered_ms");
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    report = %reply.get("report").cloned().unwrap_or_default(),
                    "guest-trimmer ran its after-restore hooks"
                );
                return;
            }
            // The guest's vsock driver handles the transport reset first: until then the
            // trimmer is unreachable or the connection drops. Only its own refusal is final.
            Err(err)
                if !matches!(err, super::TrimmerError::Refused { .. })
                    && started.elapsed() < AFTER_RESTORE_WAIT =>
            {
                tracing::debug!(
                    "after restore: {} (retrying)",
                    crate::devices::virtio::error_chain(&err)
                );
                std::thread::sleep(RETRY);
            }
            Err(err) => {
                timeline.mark_phase("after_restore_failed_ms");
                tracing::warn!(
                    "after restore: {} (after-restore hooks did not run)",
                    crate::devices::virtio::error_chain(&err)
                );
                return;
            }
        }
    }
}
