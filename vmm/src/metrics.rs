//! Boot timeline: when the VMM reached each milestone, relative to process start.
//!
//! Benchmarks and `GET /` read it; `--metrics-file` writes it at exit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// The console line the guest image prints when its userland is up.
pub const READY_MARKER: &str = "VMM-GUEST-READY";

static PROCESS_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Records the process start; `main` calls this first so set-up time includes argument parsing.
pub fn mark_process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}

/// Milestones of one VM's boot, recorded once each from any thread.
#[derive(Debug)]
pub struct BootTimeline {
    start: Instant,
    /// Microseconds since start + 1 (0 = not yet).
    first_kvm_run_us: AtomicU64,
    first_console_us: AtomicU64,
    ready_us: AtomicU64,
    /// Named milestones (restore phases, console input, trimmer notification): ms since start,
    /// the first time each was reached.
    phases: Mutex<BTreeMap<&'static str, f64>>,
}

/// The timeline in milliseconds, for JSON output.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct BootTimings {
    /// Process start → first `KVM_RUN` (VMM set-up).
    pub setup_ms: Option<f64>,
    /// Process start → first byte on the serial console.
    pub first_console_ms: Option<f64>,
    /// Process start → the readiness marker on the console.
    pub ready_ms: Option<f64>,
    /// Named milestones, ms since process start (see [`BootTimeline::mark_phase`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub phases: BTreeMap<&'static str, f64>,
}

impl BootTimeline {
    /// Starts the clock at `start` (process start, as close as the VMM can get).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            first_kvm_run_us: AtomicU64::new(0),
            first_console_us: AtomicU64::new(0),
            ready_us: AtomicU64::new(0),
            phases: Mutex::new(BTreeMap::new()),
        }
    }

    /// The instant the clock started at.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Records that milestone `name` was reached now (later calls for the same name are
    /// ignored) and logs it at debug level: the restore's timeline, phase by phase.
    pub fn mark_phase(&self, name: &'static str) {
        self.mark_phase_at(name, self.start.elapsed().as_secs_f64() * 1e3);
    }

    /// Records milestone `name` at `ms` since the start (first value wins).
    pub fn mark_phase_at(&self, name: &'static str, ms: f64) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        if !phases.contains_key(name) {
            phases.insert(name, ms);
            tracing::debug!(milestone = name, since_start_ms = ms, "timeline milestone");
        }
    }

    fn mark(&self, slot: &AtomicU64) {
        let now = self.start.elapsed().as_micros() as u64 + 1;
        let _ = slot.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Records the first `KVM_RUN` (later calls are ignored).
    pub fn mark_first_kvm_run(&self) {
        self.mark(&self.first_kvm_run_us);
    }

    /// Records the first console byte.
    pub fn mark_first_console(&self) {
        self.mark(&self.first_console_us);
    }

    /// Records the readiness marker.
    pub fn mark_ready(&self) {
        self.mark(&self.ready_us);
    }

    /// Whether the readiness marker was seen.
    pub fn is_ready(&self) -> bool {
        self.ready_us.load(Ordering::Acquire) != 0
    }

    /// Time since the clock started.
    pub fn uptime_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }

    /// The milestones reached so far.
    pub fn timings(&self) -> BootTimings {
        let ms = |slot: &AtomicU64| match slot.load(Ordering::Acquire) {
            0 => None,
            us => Some((us - 1) as f64 / 1000.0),
        };
        BootTimings {
            setup_ms: ms(&self.first_kvm_run_us),
            first_console_ms: ms(&self.first_console_us),
            ready_ms: ms(&self.ready_us),
            phases: self
                .phases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_are_recorded_once() {
        let timeline = BootTimeline::new(Instant::now());
        assert_eq!(timeline.timings(), BootTimings::default());
        timeline.mark_first_kvm_run();
        let first = timeline.timings().setup_ms.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        timeline.mark_first_kvm_run();
        assert_eq!(timeline.timings().setup_ms.unwrap(), first);
        assert!(!timeline.is_ready());
        timeline.mark_ready();
        assert!(timeline.is_ready());
        assert!(timeline.timings().ready_ms.unwrap() >= first);
    }

    #[test]
    fn phases_keep_their_first_time() {
        let timeline = BootTimeline::new(Instant::now());
        timeline.mark_phase_at("input", 5.0);
        timeline.mark_phase_at("input", 9.0);
        timeline.mark_phase("answered");
        let phases = timeline.timings().phases;
        assert_eq!(phases["input"], 5.0);
        assert!(phases["answered"] >= 0.0);
        let json = serde_json::to_value(timeline.timings()).unwrap();
        assert_eq!(json["phases"]["input"], 5.0);
    }
}
