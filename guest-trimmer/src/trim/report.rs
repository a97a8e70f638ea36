//! The JSON report of a trim run: per step its status, time and what it freed, measured from
//! `/proc/meminfo` before and after.

use serde::Serialize;

use crate::meminfo::MemInfo;
use crate::trim::cpu::StepCpu;

/// The memory figures a report shows, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemFigures {
    /// `MemTotal`.
    pub total_kib: u64,
    /// `MemFree`.
    pub free_kib: u64,
    /// `MemTotal - MemFree`.
    pub used_kib: u64,
    /// Clean and dirty file page cache (`Buffers + Cached - Shmem`).
    pub file_cache_kib: u64,
    /// `AnonPages`.
    pub anon_kib: u64,
    /// `SReclaimable`.
    pub slab_reclaimable_kib: u64,
    /// Kernel memory no step can free (unreclaimable slab, stacks, page tables, per-CPU).
    pub kernel_unreclaimable_kib: u64,
}

impl From<&MemInfo> for MemFigures {
    fn from(m: &MemInfo) -> Self {
        MemFigures {
            total_kib: m.mem_total_kib,
            free_kib: m.mem_free_kib,
            used_kib: m.used_kib(),
            file_cache_kib: m.file_cache_kib(),
            anon_kib: m.anon_kib,
            slab_reclaimable_kib: m.slab_reclaimable_kib,
            kernel_unreclaimable_kib: m.kernel_unreclaimable_kib(),
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Done.
    Ok,
    /// Failed; `error` says why.
    Failed,
    /// Not run: the trim budget was used up, or an earlier step failed with `require_trim`.
    Skipped,
}

/// One step's report.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Position in the policy's `steps`.
    pub index: usize,
    /// The step's kind (`hooks`, `damon_pageout`, ...).
    pub kind: &'static str,
    /// Outcome.
    pub status: StepStatus,
    /// Wall-clock time.
    pub duration_ms: u64,
    /// CPU time spent meanwhile (the trimmer, kdamond 0, all CPUs).
    pub cpu: StepCpu,
    /// `MemFree` after minus before (negative when memory was taken).
    pub freed_kib: i64,
    /// File page cache before minus after.
    pub file_cache_dropped_kib: i64,
    /// Reclaimable slab before minus after.
    pub slab_dropped_kib: i64,
    /// Step-specific detail (hook outcomes, DAMOS counters, reporting wait).
    pub detail: serde_json::Value,
    /// Why it failed or was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The report of a whole run, the answer to a `trim` request.
#[derive(Debug, Clone, Serialize)]
pub struct TrimReport {
    /// The policy's name.
    pub policy: String,
    /// Every step ran without failure.
    pub ok: bool,
    /// The trim is over and the snapshot may proceed (false only when `require_trim` and a
    /// step failed).
    pub ready: bool,
    /// Wall-clock time of the run.
    pub total_ms: u64,
    /// Time of the steps that free memory (everything except `wait_reported`), plus switching
    /// DAMON's intervals for the trim and back.
    pub trim_ms: u64,
    /// CPU time spent during the steps, summed.
    pub cpu: StepCpu,
    /// DAMON's intervals during the trim, when the policy sets them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damon_intervals: Option<crate::trim::intervals::IntervalsReport>,
    /// `MemFree` after minus before, KiB.
    pub freed_kib: i64,
    /// The policy's budget, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_ms: Option<u64>,
    /// Memory before the run.
    pub before: MemFigures,
    /// Memory after the run.
    pub after: MemFigures,
    /// Each step, in order.
    pub steps: Vec<StepReport>,
    /// Problems outside steps (e.g. restoring `page_reporting_order`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Signed difference `a - b` of two KiB figures.
pub fn delta(a: u64, b: u64) -> i64 {
    (a as i128 - b as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64
}
