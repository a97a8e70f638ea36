//! The trim-then-snapshot pipeline (`vmm snapshot --policy FILE`, or `"pipeline"` in
//! `PUT /snapshot/create`): ask the guest-trimmer over vsock to trim by a policy, run a free
//! page hinting pass, then pause and write the compact snapshot; each step timed.
//!
//! A missing or silent trimmer does not stop the snapshot (it is taken with a warning) unless
//! the policy has `"require_trim": true`: then the pipeline fails before pausing, and the VM
//! goes on running untouched.
//!
//! - [`trimmer`]: the guest-trimmer's control protocol from the host side;
//! - [`hinting`]: one bounded free page hinting pass.

pub mod after_restore;
pub mod hinting;
pub mod trimmer;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::snapshot::{SnapshotRequest, SnapshotSummary};
use crate::vm::VmHandle;
pub use trimmer::{TrimmerClient, TrimmerError, DEFAULT_TRIMMER_PORT};

/// Slack on top of the policy's own time budget before the host gives up on the trimmer's
/// answer (the trimmer enforces the budget; this covers vsock and a slow guest).
const TRIM_REPLY_SLACK_MS: u64 = 10_000;
/// Default bound on the hinting pass.
pub const DEFAULT_HINT_TIMEOUT_MS: u64 = 30_000;

/// What the pipeline runs before the snapshot (the `"pipeline"` object of the API request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineRequest {
    /// The trim policy (a policy object as in `policies/*.json`); `null`: no trim, for
    /// comparison (`vmm snapshot --no-trim`).
    #[serde(default)]
    pub policy: Option<Value>,
    /// The guest-trimmer's vsock port.
    #[serde(default = "default_port")]
    pub trimmer_port: u32,
    /// Bound on the trimmer's answer; default: twice the policy's budget + 10 s.
    #[serde(default)]
    pub trim_timeout_ms: Option<u64>,
    /// Run a free page hinting pass when the balloon has hinting enabled.
    #[serde(default = "default_true")]
    pub hint: bool,
    /// Bound on the hinting pass.
    #[serde(default = "default_hint_timeout_ms")]
    pub hint_timeout_ms: u64,
}

fn default_port() -> u32 {
    DEFAULT_TRIMMER_PORT
}
fn default_true() -> bool {
    true
}
fn default_hint_timeout_ms() -> u64 {
    DEFAULT_HINT_TIMEOUT_MS
}

impl PipelineRequest {
    /// A pipeline trimming by `policy` (or not at all), with the default bounds.
    pub fn new(policy: Option<Value>) -> Self {
        PipelineRequest {
            policy,
            trimmer_port: DEFAULT_TRIMMER_PORT,
            trim_timeout_ms: None,
            hint: true,
            hint_timeout_ms: DEFAULT_HINT_TIMEOUT_MS,
        }
    }

    /// How long the host waits for the trimmer's answer: twice the policy's bound (its
    /// `budget_ms`, or the sum of its steps' bounds; compaction has none and a busy guest runs
    /// late) plus 10 s, unless the request sets it.
    pub fn trim_timeout(&self, policy: &policies::Policy) -> Duration {
        let bound_ms = policy.time_budget_ms().max(policy.budget_ms.unwrap_or(0));
        Duration::from_millis(self.trim_timeout_ms.unwrap_or_else(|| {
            bound_ms
                .saturating_mul(2)
                .saturating_add(TRIM_REPLY_SLACK_MS)
        }))
    }

    /// The longest the steps before the snapshot may take (trim and hinting bounds).
    pub fn max_duration(&self) -> Duration {
        let trim = self
            .policy
            .as_ref()
            .and_then(|v| parse_policy(v).ok())
            .map_or(Duration::ZERO, |p| self.trim_timeout(&p));
        trim + Duration::from_millis(self.hint_timeout_ms)
    }
}

/// Errors that stop the pipeline before the snapshot; the VM keeps running.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The policy in the request is not a valid policy.
    #[error("invalid trim policy: {0}")]
    Policy(String),
    /// The policy requires a trim and the trim did not happen or did not finish.
    #[error("policy {policy:?} requires a trim (\"require_trim\": true) and it failed: {reason}; no snapshot was taken, the VM is running")]
    TrimRequired {
        /// The policy's name.
        policy: String,
        /// What went wrong.
        reason: String,
    },
    /// The snapshot itself failed.
    #[error("snapshot failed: {0}")]
    Snapshot(String),
}

/// One step's outcome in the summary.
#[derive(Debug, Clone, Serialize)]
pub struct StepSummary {
    /// `trim`, `hint` or `snapshot`.
    pub step: &'static str,
    /// `ok`, `skipped` or `failed`.
    pub status: &'static str,
    /// Wall time of the step.
    pub duration_ms: f64,
    /// Step-specific figures (the trimmer's report, pages hinted...).
    pub detail: Value,
}

/// What the pipeline did (the JSON body of the reply and of `vmm snapshot --json`).
#[derive(Debug, Clone, Serialize)]
pub struct PipelineSummary {
    /// The steps in order.
    pub steps: Vec<StepSummary>,
    /// Things that did not go as asked but did not stop the snapshot.
    pub warnings: Vec<String>,
    /// Whole pipeline, request to snapshot written.
    pub total_ms: f64,
    /// The snapshot's summary.
    pub snapshot: SnapshotSummary,
}

impl StepSummary {
    /// A step that did not run, and why.
    fn skipped(step: &'static str, why: &str) -> Self {
        StepSummary {
            step,
            status: "skipped",
            duration_ms: 0.0,
            detail: json!({ "reason": why }),
        }
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Runs the pipeline on the VM behind `vm` and takes the snapshot `snapshot`.
pub fn run(
    vm: &VmHandle,
    pipeline: &PipelineRequest,
    snapshot: SnapshotRequest,
) -> Result<PipelineSummary, PipelineError> {
    let started = Instant::now();
    let mut steps = Vec::new();
    let mut warnings = Vec::new();
    steps.push(trim_step(vm, pipeline, &mut warnings)?);
    steps.push(hinting::hint_step(vm, pipeline, &mut warnings));
    let t = Instant::now();
    let summary = vm.snapshot(snapshot).map_err(PipelineError::Snapshot)?;
    steps.push(StepSummary {
        step: "snapshot",
        status: "ok",
        duration_ms: ms_since(t),
        detail: json!({
            "memory_file_bytes": summary.memory_file_bytes,
            "kept_pages": summary.pages.kept,
            "skipped_pages": summary.pages.skipped(),
        }),
    });
    for w in &warnings {
        tracing::warn!("snapshot pipeline: {w}");
    }
    Ok(PipelineSummary {
        steps,
        warnings,
        total_ms: ms_since(started),
        snapshot: summary,
    })
}

/// The trim step: validates the policy, asks the trimmer, applies the fallback rules.
fn trim_step(
    vm: &VmHandle,
    pipeline: &PipelineRequest,
    warnings: &mut Vec<String>,
) -> Result<StepSummary, PipelineError> {
    let t = Instant::now();
    let Some(policy_value) = &pipeline.policy else {
        return Ok(StepSummary::skipped("trim", "no policy (--no-trim)"));
    };
    let policy = parse_policy(policy_value)?;
    let failed = |reason: String, warnings: &mut Vec<String>| {
        if policy.require_trim {
            return Err(PipelineError::TrimRequired {
                policy: policy.name.clone(),
                reason,
            });
        }
        warnings.push(format!(
            "trim by policy {:?} failed, snapshot taken untrimmed: {reason}",
            policy.name
        ));
        Ok(StepSummary {
            step: "trim",
            status: "failed",
            duration_ms: ms_since(t),
            detail: json!({ "policy": policy.name, "error": reason }),
        })
    };
    let Some(vsock) = vm.vsock() else {
        return failed(
            "this microVM has no vsock device, so the guest-trimmer cannot be reached (vmm run --vsock-uds PATH)".into(),
            warnings,
        );
    };
    let uds = vsock.status().uds_path;
    let client = TrimmerClient::new(&uds, pipeline.trimmer_port);
    match client.trim(policy_value, pipeline.trim_timeout(&policy)) {
        Ok(reply) => {
            let report = reply.get("report").cloned().unwrap_or(Value::Null);
            let ready = reply.get("ready").and_then(Value::as_bool) == Some(true);
            if !ready {
                let errors: Vec<&str> = report
                    .get("steps")
                    .and_then(Value::as_array)
                    .map(|s| {
                        s.iter()
                            .filter_map(|s| s.get("error").and_then(Value::as_str))
                            .collect()
                    })
                    .unwrap_or_default();
                let reason = format!("the trimmer answered not ready: {}", errors.join("; "));
                if policy.require_trim {
                    return failed(reason, warnings);
                }
                warnings.push(reason);
            }
            Ok(StepSummary {
                step: "trim",
                status: if ready { "ok" } else { "failed" },
                duration_ms: ms_since(t),
                detail: json!({
                    "policy": policy.name,
                    "ready": ready,
                    "freed_kib": report.get("freed_kib"),
                    "trim_ms": report.get("trim_ms"),
                    "report": report,
                }),
            })
        }
        Err(err) => failed(crate::devices::virtio::error_chain(&err), warnings),
    }
}

/// Parses and validates a policy object, with the field at fault in the message.
pub fn parse_policy(value: &Value) -> Result<policies::Policy, PipelineError> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| PipelineError::Policy(e.to_string()))?;
    policies::Policy::from_json_str(&text)
        .map_err(|e| PipelineError::Policy(policies::error_chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_defaults_and_unknown_fields() {
        let r: PipelineRequest = serde_json::from_str(r#"{"policy": null}"#).unwrap();
        assert_eq!(r, PipelineRequest::new(None));
        let err = serde_json::from_str::<PipelineRequest>(r#"{"polcy": {}}"#).unwrap_err();
        assert!(err.to_string().contains("polcy"), "{err}");
    }

    #[test]
    fn policies_are_validated_on_the_host() {
        let default: Value =
            serde_json::from_str(include_str!("../../../policies/default.json")).unwrap();
        assert_eq!(parse_policy(&default).unwrap().name, "default");
        let err = parse_policy(&json!({"name": "x", "cold_age_ms": 1, "steps": [], "bogus": 1}))
            .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
