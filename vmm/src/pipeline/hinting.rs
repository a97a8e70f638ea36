//! The pipeline's free page hinting pass: ask the guest to hint its free pages, wait (bounded)
//! until it has sent them all, and let it have them back; the page-state map then marks them
//! `Hinted`, so the snapshot skips them unless the guest writes them again.

use std::time::{Duration, Instant};

use balloon::{HintPhase, HintingOptions};
use serde_json::json;

use super::{ms_since, PipelineRequest, StepSummary};
use crate::vm::VmHandle;

/// How often the pass looks at the hinting status.
const POLL: Duration = Duration::from_millis(50);

/// Runs one hinting pass if asked and possible; never fails the pipeline (a pass that does not
/// finish in time is stopped and reported as a warning: the snapshot then keeps more pages).
pub fn hint_step(
    vm: &VmHandle,
    pipeline: &PipelineRequest,
    warnings: &mut Vec<String>,
) -> StepSummary {
    let t = Instant::now();
    let skipped = |why: &str| StepSummary::skipped("hint", why);
    if !pipeline.hint {
        return skipped("not asked");
    }
    let Some((handle, config)) = vm.balloon() else {
        return skipped("no balloon device");
    };
    if !config.free_page_hinting {
        return skipped("the balloon has free page hinting off (--balloon free_page_hinting=true)");
    }
    let failed = |reason: String, warnings: &mut Vec<String>| {
        warnings.push(format!("free page hinting pass: {reason}"));
        StepSummary {
            step: "hint",
            status: "failed",
            duration_ms: ms_since(t),
            detail: json!({ "error": reason }),
        }
    };
    let options = HintingOptions {
        acknowledge_on_stop: true,
    };
    if let Err(err) = handle.start_hinting_with(options) {
        return failed(crate::devices::virtio::error_chain(&err), warnings);
    }
    let deadline = t + Duration::from_millis(pipeline.hint_timeout_ms);
    loop {
        let status = handle.hinting_status();
        if matches!(status.phase, HintPhase::GuestStopped | HintPhase::Idle) {
            return StepSummary {
                step: "hint",
                status: "ok",
                duration_ms: ms_since(t),
                detail: json!({ "pages_hinted": status.pages_hinted }),
            };
        }
        if Instant::now() >= deadline {
            let pages = status.pages_hinted;
            // Stop the run and give the guest its pages back; what was hinted still counts.
            let stopped = handle.stop_hinting().and_then(|()| handle.finish_hinting());
            let mut step = failed(
                format!(
                    "not finished after {} ms ({pages} pages hinted so far); stopped",
                    pipeline.hint_timeout_ms
                ),
                warnings,
            );
            if let Err(err) = stopped {
                warnings.push(format!(
                    "cannot stop the hinting run: {}",
                    crate::devices::virtio::error_chain(&err)
                ));
            }
            step.detail["pages_hinted"] = json!(pages);
            return step;
        }
        std::thread::sleep(POLL);
    }
}
