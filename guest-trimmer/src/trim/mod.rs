//! The trim pipeline: runs a policy's steps in order, each timed and measured, within the
//! policy's time budget, and returns a [`TrimReport`].
//!
//! Steps (see the `policies` crate): hooks; DAMON-guided pageout of cold memory; drop clean
//! page cache and slab; compact memory; wait for free page reporting. `after_restore` runs the
//! policy's after-restore hooks.
//!
//! Waiting for reporting, honestly: the guest cannot see what the host received. The
//! `wait_reported` step waits the kernel's reporting delay (2 s after memory is freed, see
//! `mm/page_reporting.c`), then until the free memory in blocks of at least the reporting
//! order (`/proc/buddyinfo`) has been stable for `quiet_ms`, bounded by its timeout. It reports
//! how long it waited and how much free memory was reportable; the host confirms with
//! `vmm balloon` statistics.

pub mod cpu;
pub mod hooks;
pub mod intervals;
pub mod kernel;
pub mod pageout;
pub mod report;

use std::path::Path;
use std::time::{Duration, Instant};

use policies::{
    DropCachesStep, Hook, PageCacheDrop, Policy, Step, WaitReportedStep,
    DEFAULT_DAMON_PAGEOUT_MAX_DURATION_MS,
};
use serde::Serialize;
use serde_json::json;

use crate::damon::{DamonSysfs, MonitoringAttrs, Scheme};
use crate::meminfo::{MemInfo, ProcFs};
use hooks::{run_hook, HookReport, HookStatus};
use intervals::TrimIntervals;
pub use kernel::KernelKnobs;
use kernel::DEFAULT_PAGE_REPORTING_ORDER;
use pageout::{pageout_pass, InForce, PageoutParams, PassIntervals};
pub use report::{MemFigures, StepReport, StepStatus, TrimReport};

/// Linux's free page reporting delay after memory is freed (`PAGE_REPORTING_DELAY`, 2 s).
pub const REPORTING_DELAY: Duration = Duration::from_secs(2);
/// How often `wait_reported` reads `/proc/buddyinfo`.
const REPORTING_POLL: Duration = Duration::from_millis(100);
/// Reportable free memory counts as stable while it moves by at most this much.
const REPORTING_STABLE_KIB: u64 = 1024;

/// Where the pipeline acts: procfs, sysfs knobs and DAMON, all below injectable roots.
#[derive(Debug)]
pub struct TrimEnv {
    /// `/proc/meminfo` and friends.
    pub procfs: ProcFs,
    /// `drop_caches`, `compact_memory`, reporting order, buddyinfo.
    pub knobs: KernelKnobs,
    /// The DAMON sysfs admin directory.
    pub damon: DamonSysfs,
    /// The monitoring attributes kdamond 0 runs with (ages are counted in its aggregation
    /// intervals).
    pub attrs: MonitoringAttrs,
    /// The schemes kdamond 0 runs outside trims (restored after each pageout pass).
    pub base_schemes: Vec<Scheme>,
    /// The kernel's reporting delay `wait_reported` waits at least (tests use zero).
    pub reporting_delay: Duration,
    /// When the daemon started kdamond 0's monitoring (`None`: not started by this process),
    /// for converting cold ages with the aggregation rate it really achieved.
    pub monitoring_started: Option<std::time::Instant>,
    /// Where applications register their hooks ([`policies::registered::HOOKS_DIR`]).
    pub hooks_dir: std::path::PathBuf,
    /// CPU time counters, read around every step.
    pub cpu: cpu::CpuProbe,
}

impl TrimEnv {
    /// The real guest's environment below `proc_root` and `sys_root`.
    pub fn new(proc_root: &Path, sys_root: &Path, attrs: MonitoringAttrs) -> Self {
        let damon_root = sys_root.join("kernel/mm/damon/admin");
        TrimEnv {
            cpu: cpu::CpuProbe::new(proc_root, &damon_root),
            procfs: ProcFs::new(proc_root),
            knobs: KernelKnobs::new(proc_root, sys_root),
            damon: DamonSysfs::new(damon_root)
                .with_iomem_path(proc_root.join("iomem"))
                .with_spare_kdamonds(1),
            attrs,
            base_schemes: vec![Scheme::stat_all()],
            reporting_delay: REPORTING_DELAY,
            monitoring_started: None,
            hooks_dir: policies::registered::HOOKS_DIR.into(),
        }
    }

    fn mem(&self) -> Option<MemInfo> {
        match self.procfs.meminfo() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("{}", crate::error_chain(&e));
                None
            }
        }
    }
}

/// The after-restore run's report.
#[derive(Debug, Clone, Serialize)]
pub struct AfterRestoreReport {
    /// The policy's name.
    pub policy: String,
    /// Every hook succeeded.
    pub ok: bool,
    /// Wall-clock time.
    pub total_ms: u64,
    /// Each hook, in order.
    pub hooks: Vec<HookReport>,
}

/// Runs the policy's after-restore hooks, in order, then the ones applications registered in
/// `env.hooks_dir`.
pub fn after_restore(env: &TrimEnv, policy: &Policy) -> AfterRestoreReport {
    let t0 = Instant::now();
    let own: Vec<&Hook> = policy
        .after_restore
        .iter()
        .filter_map(|n| policy.hooks.iter().find(|h| &h.name == n))
        .collect();
    let mut hooks: Vec<HookReport> = own
        .iter()
        .map(|h| run_hook(h, Duration::from_millis(h.timeout_ms)))
        .collect();
    hooks.extend(run_registered(
        env,
        &own,
        |r| r.after_restore.as_ref(),
        None,
    ));
    AfterRestoreReport {
        policy: policy.name.clone(),
        ok: hooks.iter().all(|h| h.status == HookStatus::Ok),
        total_ms: ms(t0.elapsed()),
        hooks,
    }
}

/// The CPU time the processes a hooks step asked spent answering (the sum of its hook
/// reports' `target_cpu_ms`), or `None` when no hook measured one.
fn hooked_cpu_ms(result: &StepResult) -> Option<u64> {
    let detail = match result {
        Ok(detail) | Err((_, detail)) => detail,
    };
    detail["hooks"]
        .as_array()?
        .iter()
        .filter_map(|h| h["target_cpu_ms"].as_u64())
        .reduce(|a, b| a + b)
}

/// Runs the hooks applications registered in `env.hooks_dir` (the one `pick` selects from
/// each registration), skipping names in `already`, each within its own timeout and before
/// `deadline`. A registration that cannot be read or parsed is reported as a failed hook
/// named after its file.
fn run_registered(
    env: &TrimEnv,
    already: &[&Hook],
    pick: impl Fn(&policies::registered::HookRegistration) -> Option<&Hook>,
    deadline: Option<Instant>,
) -> Vec<HookReport> {
    let mut reports = Vec::new();
    for (file, reg) in policies::registered::load_dir(&env.hooks_dir) {
        let reg = match reg {
            Ok(reg) => reg,
            Err(e) => {
                reports.push(HookReport {
                    name: file.display().to_string(),
                    kind: "registration",
                    status: HookStatus::Failed,
                    duration_ms: 0,
                    timeout_ms: 0,
                    error: Some(crate::error_chain(&e)),
                    target_cpu_ms: None,
                });
                continue;
            }
        };
        let Some(hook) = pick(&reg) else { continue };
        if already.iter().any(|h| h.name == hook.name) {
            continue;
        }
        let left = deadline.map_or(Duration::from_millis(hook.timeout_ms), |d| {
            d.saturating_duration_since(Instant::now())
        });
        reports.push(run_hook(hook, left));
    }
    reports
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// What a step returns: its detail, or an error with the detail gathered so far.
type StepResult = Result<serde_json::Value, (String, serde_json::Value)>;

/// Runs `policy` and reports. Never panics on kernel errors: a failing step is reported and,
/// unless the policy sets `require_trim`, the remaining steps still run.
pub fn run(env: &TrimEnv, policy: &Policy) -> TrimReport {
    let t0 = Instant::now();
    let deadline = policy.budget_ms.map(|b| t0 + Duration::from_millis(b));
    let before = env.mem();
    let mut warnings = Vec::new();

    let restore_order = match policy.page_reporting_order {
        Some(order) => match env.knobs.page_reporting_order() {
            Ok(Some(old)) => match env.knobs.set_page_reporting_order(order) {
                Ok(()) => Some(old),
                Err(e) => {
                    warnings.push(format!(
                        "lower page_reporting_order: {}",
                        crate::error_chain(&e)
                    ));
                    None
                }
            },
            Ok(None) => {
                warnings.push("page_reporting_order: no free page reporting device is registered (or the kernel lacks the parameter); left as is".into());
                None
            }
            Err(e) => {
                warnings.push(format!(
                    "read page_reporting_order: {}",
                    crate::error_chain(&e)
                ));
                None
            }
        },
        None => None,
    };

    // Short DAMON intervals for the trim, if the policy asks and a step uses DAMON.
    let uses_damon = policy.steps.iter().any(|s| match s {
        Step::DamonPageout(_) => true,
        Step::DropCaches(d) => d.page_cache == PageCacheDrop::Cold,
        _ => false,
    });
    let intervals = policy
        .trim_intervals_us()
        .filter(|_| uses_damon)
        .map(|(sample_us, aggr_us)| TrimIntervals::new(&env.damon, env.attrs, sample_us, aggr_us));
    // Without trim intervals kdamond 0 keeps the idle ones throughout.
    let idle_in_force: InForce = std::cell::Cell::new(Some(env.attrs));
    let last_paddr_step = policy.steps.iter().rposition(|s| match s {
        Step::DamonPageout(d) => d.pid_files.is_empty(),
        Step::DropCaches(d) => d.page_cache == PageCacheDrop::Cold,
        _ => false,
    });

    let mut steps = Vec::with_capacity(policy.steps.len());
    let mut failed_required = false;
    let mut trim_time = Duration::ZERO;
    let mut cpu_total = cpu::StepCpu {
        trimmer_ms: Some(0),
        kdamond_ms: Some(0),
        guest_busy_ms: Some(0),
        hooked_ms: None,
    };
    for (index, step) in policy.steps.iter().enumerate() {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let skip = if failed_required {
            Some("an earlier step failed and the policy sets require_trim")
        } else if remaining.is_some_and(|r| r.is_zero()) {
            Some("the trim budget (budget_ms) was used up")
        } else {
            None
        };
        if let Some(why) = skip {
            tracing::warn!(index, kind = step.kind(), "step skipped: {why}");
            steps.push(StepReport {
                index,
                kind: step.kind(),
                status: StepStatus::Skipped,
                duration_ms: 0,
                cpu: cpu::StepCpu::default(),
                freed_kib: 0,
                file_cache_dropped_kib: 0,
                slab_dropped_kib: 0,
                detail: serde_json::Value::Null,
                error: Some(why.to_string()),
            });
            continue;
        }
        let remaining = remaining.unwrap_or(Duration::MAX);
        let m0 = env.mem();
        let c0 = env.cpu.sample();
        let s0 = Instant::now();
        let damon = StepDamon {
            pass: intervals
                .as_ref()
                .map_or(PassIntervals::unchanged(env.attrs), |i| {
                    i.for_pass(Some(index) == last_paddr_step)
                }),
            in_force: intervals.as_ref().map_or(&idle_in_force, |i| &i.in_force),
        };
        let result = run_step(env, &damon, policy, step, remaining, m0.as_ref());
        let elapsed = s0.elapsed();
        let mut step_cpu = c0.until(&env.cpu.sample());
        if matches!(step, Step::Hooks(_)) {
            step_cpu.hooked_ms = hooked_cpu_ms(&result);
        }
        cpu_total = cpu_total.add(&step_cpu);
        if !matches!(step, Step::WaitReported(_)) {
            trim_time += elapsed;
        }
        let m1 = env.mem();
        let (freed, files, slab) = match (&m0, &m1) {
            (Some(a), Some(b)) => (
                report::delta(b.mem_free_kib, a.mem_free_kib),
                report::delta(a.file_cache_kib(), b.file_cache_kib()),
                report::delta(a.slab_reclaimable_kib, b.slab_reclaimable_kib),
            ),
            _ => (0, 0, 0),
        };
        let (status, detail, error) = match result {
            Ok(detail) => (StepStatus::Ok, detail, None),
            Err((e, detail)) => {
                failed_required = policy.require_trim;
                (StepStatus::Failed, detail, Some(e))
            }
        };
        tracing::info!(
            index,
            kind = step.kind(),
            ?status,
            duration_ms = ms(elapsed),
            cpu_ms = step_cpu.work_ms(),
            freed_kib = freed,
            "step done"
        );
        steps.push(StepReport {
            index,
            kind: step.kind(),
            status,
            duration_ms: ms(elapsed),
            cpu: step_cpu,
            freed_kib: freed,
            file_cache_dropped_kib: files,
            slab_dropped_kib: slab,
            detail,
            error,
        });
    }

    let damon_intervals = intervals.map(TrimIntervals::restore);
    if let Some(i) = &damon_intervals {
        trim_time += Duration::from_millis(i.restore_ms);
    }
    if let Some(old) = restore_order {
        if let Err(e) = env.knobs.set_page_reporting_order(old) {
            warnings.push(format!(
                "restore page_reporting_order {old}: {}",
                crate::error_chain(&e)
            ));
        }
    }
    let after = env.mem();
    let ok = steps.iter().all(|s| s.status == StepStatus::Ok);
    TrimReport {
        policy: policy.name.clone(),
        ok,
        ready: !failed_required,
        total_ms: ms(t0.elapsed()),
        trim_ms: ms(trim_time),
        cpu: cpu_total,
        damon_intervals,
        freed_kib: match (&before, &after) {
            (Some(a), Some(b)) => report::delta(b.mem_free_kib, a.mem_free_kib),
            _ => 0,
        },
        budget_ms: policy.budget_ms,
        before: before.as_ref().map(MemFigures::from).unwrap_or_default(),
        after: after.as_ref().map(MemFigures::from).unwrap_or_default(),
        steps,
        warnings,
    }
}

/// kdamond 0's intervals as a step sees them.
struct StepDamon<'a> {
    /// What a physical memory pass commits with its scheme and with the scheme's removal.
    pass: PassIntervals,
    /// What is in force now (region ages count in its aggregation intervals).
    in_force: &'a InForce,
}

fn run_step(
    env: &TrimEnv,
    damon: &StepDamon,
    policy: &Policy,
    step: &Step,
    remaining: Duration,
    mem: Option<&MemInfo>,
) -> StepResult {
    match step {
        Step::Hooks(s) => {
            let hooks: Vec<&Hook> = match &s.names {
                Some(names) => names
                    .iter()
                    .filter_map(|n| policy.hooks.iter().find(|h| &h.name == n))
                    .collect(),
                None => policy.hooks.iter().collect(),
            };
            let t0 = Instant::now();
            let mut reports: Vec<HookReport> = hooks
                .iter()
                .map(|h| run_hook(h, remaining.saturating_sub(t0.elapsed())))
                .collect();
            if s.registered {
                reports.extend(run_registered(
                    env,
                    &hooks,
                    |r| r.before_snapshot.as_ref(),
                    t0.checked_add(remaining),
                ));
            }
            let failed: Vec<String> = reports
                .iter()
                .filter(|r| r.status != HookStatus::Ok)
                .map(|r| {
                    format!(
                        "hook {}: {}",
                        r.name,
                        r.error.as_deref().unwrap_or("failed")
                    )
                })
                .collect();
            let detail = json!({ "hooks": reports });
            if failed.is_empty() {
                Ok(detail)
            } else {
                Err((failed.join("; "), detail))
            }
        }
        Step::DamonPageout(s) => {
            let mut pids = Vec::new();
            for f in &s.pid_files {
                pids.push(read_pid(f).map_err(|e| (e, serde_json::Value::Null))?);
            }
            let max = Duration::from_millis(s.max_duration_ms).min(remaining);
            let quota_bytes = s.quota_mib_per_s.map(|q| u64::from(q) << 20);
            let params = PageoutParams {
                cold_age_ms: policy.effective_cold_age_ms(s.cold_age_ms),
                // A quota per second; no interval without a quota.
                reset_interval_ms: if quota_bytes.is_some() { 1000 } else { 0 },
                quota_bytes,
                spare_anon: s.spare_anon,
                only_unmapped: s.unmapped_page_cache_only,
                max_duration: max,
                pids,
                achieved_aggr_us: None,
            };
            damon_pass(env, damon, policy, mem, params)
        }
        Step::DropCaches(s) => drop_caches(env, damon, policy, mem, s, remaining),
        Step::CompactMemory(_) => env
            .knobs
            .compact_memory()
            .map(|()| serde_json::Value::Null)
            .map_err(|e| (crate::error_chain(&e), serde_json::Value::Null)),
        Step::WaitReported(s) => wait_reported(env, s, remaining),
    }
}

/// One DAMON-guided pageout pass with `params` (`achieved_aggr_us` is found here; the quota is
/// narrowed to the policy's `keep_hot_mib`).
fn damon_pass(
    env: &TrimEnv,
    damon: &StepDamon,
    policy: &Policy,
    mem: Option<&MemInfo>,
    mut params: PageoutParams,
) -> StepResult {
    // keep_hot_mib: page out at most the page cache above it over the whole pass.
    if let (Some(keep), Some(m)) = (policy.keep_hot_mib, mem) {
        let excess_bytes = m.file_cache_kib().saturating_sub(keep << 10) << 10;
        if excess_bytes == 0 {
            return Ok(json!({ "kept": "file page cache is at or below keep_hot_mib" }));
        }
        let window_ms = ms(params.max_duration).max(1);
        let over_pass = params.quota_bytes.map_or(u64::MAX, |b| {
            b.saturating_mul(window_ms)
                .div_ceil(params.reset_interval_ms.max(1))
        });
        params.quota_bytes = Some(excess_bytes.min(over_pass));
        params.reset_interval_ms = window_ms;
    }
    let t_ages = Instant::now();
    let ages = if params.pids.is_empty() {
        achieved_paddr_aggr(env, damon)
    } else {
        AchievedAggr::default()
    };
    let ages_ms = ms(t_ages.elapsed());
    params.achieved_aggr_us = ages.during_aggr_us;
    let mut detail = match pageout_pass(
        &env.damon,
        &damon.pass,
        damon.in_force,
        &env.base_schemes,
        &params,
    ) {
        Ok(o) => serde_json::to_value(o).unwrap_or_default(),
        Err(e) => return Err((crate::error_chain(&e), serde_json::Value::Null)),
    };
    if let Some(d) = detail.as_object_mut() {
        d.insert("kdamond_busy_share".into(), json!(ages.busy_share));
        d.insert("ages_read".into(), json!(ages.read));
        d.insert(
            "ages_read_ms".into(),
            json!(if ages.read { ages_ms } else { 0 }),
        );
    }
    Ok(detail)
}

/// How kdamond 0's real aggregation pace was found for a pass.
#[derive(Debug, Default)]
struct AchievedAggr {
    /// The aggregation interval to convert cold ages with, in the pass's intervals; `None`:
    /// the configured one.
    during_aggr_us: Option<u64>,
    /// Share of its lifetime kdamond 0 spent running or waiting to run.
    busy_share: Option<f64>,
    /// Whether the region ages were read (two requests) to find it.
    read: bool,
}

/// A kdamond busy for less than this share of its time keeps its intervals closely enough
/// (ages within 11%) that reading the region ages (two requests, 200 ms or more) is not
/// worth it: the pace is estimated from the share.
const KDAMOND_BUSY_SHARE_ON_TIME: f64 = 0.1;

/// kdamond 0's achieved aggregation interval, expressed for the pass's intervals. A kdamond
/// that mostly sleeps keeps pace: sleeping `s` and working `w` per sample, it samples every
/// `s + w`, `1 / (1 - busy share)` times the configured interval. A busy one (an emulated or
/// overloaded guest) is measured from the base `stat` scheme's region ages
/// (see [`pageout::achieved_aggr_us`]).
fn achieved_paddr_aggr(env: &TrimEnv, damon: &StepDamon) -> AchievedAggr {
    let during = damon.pass.during;
    let Some(started) = env.monitoring_started else {
        return AchievedAggr::default();
    };
    let lifetime_ms = ms(started.elapsed());
    let busy_share = env.cpu.kdamond_busy_share(lifetime_ms);
    // Ages count in the aggregation intervals in force; the pass commits its own, and the
    // kernel rescales the ages to them.
    let in_force = damon.in_force.get().unwrap_or(during);
    let to_during = |achieved_us: u64| {
        let lag = achieved_us as f64 / in_force.aggr_us.max(1) as f64;
        ((during.aggr_us as f64 * lag) as u64).max(during.aggr_us)
    };
    if let Some(share) = busy_share.filter(|s| *s < KDAMOND_BUSY_SHARE_ON_TIME) {
        let achieved_us = (in_force.aggr_us as f64 / (1.0 - share)) as u64;
        return AchievedAggr {
            during_aggr_us: Some(to_during(achieved_us)),
            busy_share,
            read: false,
        };
    }
    AchievedAggr {
        during_aggr_us: achieved_paddr_aggr_us(env, &in_force, started).map(to_during),
        busy_share,
        read: true,
    }
}

/// kdamond 0's achieved aggregation interval for the intervals in force, `attrs` (see
/// [`pageout::achieved_aggr_us`]), from the base `stat` scheme's regions; `None` (configured
/// interval) when unknown. After a change of intervals the kernel has rescaled the ages to
/// the new ones, so the same formula holds.
fn achieved_paddr_aggr_us(env: &TrimEnv, attrs: &MonitoringAttrs, started: Instant) -> Option<u64> {
    // The kernel refills the region list at the kdamond's next aggregation; right after another
    // request (or with a kdamond lagging behind its intervals) it can come back empty: ask
    // again a few times. Without ages the configured interval is used, and on a loaded guest
    // nothing then looks old enough (seen in the rig): worth a few more round trips.
    for _ in 0..6 {
        match env.damon.tried_regions(pageout::PADDR_KDAMOND, 0) {
            Ok(regions) if !regions.is_empty() => {
                return pageout::achieved_aggr_us(
                    regions.iter().map(|r| r.age_aggr),
                    ms(started.elapsed()),
                    attrs.aggr_us,
                );
            }
            Ok(_) => std::thread::sleep(Duration::from_micros(attrs.aggr_us.max(200_000))),
            Err(e) => {
                tracing::warn!(
                    "cannot read DAMON's region ages, converting cold ages with the configured interval: {}",
                    crate::error_chain(&e)
                );
                return None;
            }
        }
    }
    tracing::warn!("DAMON listed no regions; converting cold ages with the configured interval");
    None
}

fn drop_caches(
    env: &TrimEnv,
    damon: &StepDamon,
    policy: &Policy,
    mem: Option<&MemInfo>,
    s: &DropCachesStep,
    remaining: Duration,
) -> StepResult {
    let mut detail = serde_json::Map::new();
    if s.page_cache == PageCacheDrop::Cold {
        let max = Duration::from_millis(DEFAULT_DAMON_PAGEOUT_MAX_DURATION_MS).min(remaining);
        let params = PageoutParams {
            cold_age_ms: policy.effective_cold_age_ms(s.cold_age_ms),
            quota_bytes: None,
            reset_interval_ms: 0,
            spare_anon: true,
            only_unmapped: false,
            max_duration: max,
            pids: Vec::new(),
            achieved_aggr_us: None,
        };
        let cold = damon_pass(env, damon, policy, mem, params)?;
        detail.insert("cold_pageout".into(), cold);
    }
    // drop_caches: 1 page cache, 2 slab, 3 both.
    let value = u8::from(s.page_cache == PageCacheDrop::All) | (u8::from(s.slab) << 1);
    let value = (value != 0).then_some(value);
    if let Some(v) = value {
        env.knobs.drop_caches(v).map_err(|e| {
            (
                crate::error_chain(&e),
                serde_json::Value::Object(detail.clone()),
            )
        })?;
        detail.insert("drop_caches".into(), json!(v));
    }
    Ok(serde_json::Value::Object(detail))
}

fn wait_reported(env: &TrimEnv, s: &WaitReportedStep, remaining: Duration) -> StepResult {
    let t0 = Instant::now();
    let bound = Duration::from_millis(s.timeout_ms).min(remaining);
    let quiet = Duration::from_millis(s.quiet_ms);
    let order = env
        .knobs
        .page_reporting_order()
        .ok()
        .flatten()
        .unwrap_or(DEFAULT_PAGE_REPORTING_ORDER);
    let read = || env.knobs.free_kib_at_order(order);
    let err = |e: kernel::KernelError| (crate::error_chain(&e), serde_json::Value::Null);
    let first = read().map_err(err)?;
    let (mut last, mut stable_since) = (first, Instant::now());
    loop {
        let waited = t0.elapsed();
        let stable = stable_since.elapsed() >= quiet && waited >= env.reporting_delay.min(bound);
        if stable || waited >= bound {
            return Ok(json!({
                "order": order,
                "reportable_free_kib": last,
                "reportable_free_kib_at_start": first,
                "waited_ms": ms(waited),
                "stable": stable,
            }));
        }
        std::thread::sleep(REPORTING_POLL.min(bound.saturating_sub(waited)));
        let now = read().map_err(err)?;
        if now.abs_diff(last) > REPORTING_STABLE_KIB {
            stable_since = Instant::now();
        }
        last = now;
    }
}

fn read_pid(path: &Path) -> Result<u32, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("read pid file {}: {e}", path.display()))?;
    text.trim().parse().map_err(|_| {
        format!(
            "pid file {} holds {:?}, not a pid",
            path.display(),
            text.trim()
        )
    })
}

#[cfg(test)]
mod tests;
