//! The daemon's control protocol, independent of the transport (vsock port 52 or a unix
//! socket): one JSON request per line, one JSON reply per line.
//!
//! Requests: `{"op":"ping"}`, `{"op":"status"}`, `{"op":"stats"}`,
//! `{"op":"trim","policy":{...}}` (or `"policy_name":"default"` for a built-in policy), and
//! `{"op":"after_restore"}` (the last trim's policy, or one given the same way). Every reply
//! has `"ok"` (the request was carried out) and `"op"`; a malformed request gets
//! `{"ok":false,"error":"..."}`. A trim's reply carries `"ready"` and the full report.
//!
//! [`Controller::start`] begins DAMON monitoring of physical memory at daemon start, so that
//! region ages are known when a trim comes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use policies::Policy;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::damon::{DamonSysfs, KdamondState, MonitoringAttrs, TriedRegion};
use crate::error_chain;
use crate::trim::{self, TrimEnv, TrimReport};

/// The monitoring attributes the daemon runs DAMON with (see the README for why): 20 ms
/// sampling, 400 ms aggregation, 1 s target updates, 100 to 400 regions.
///
/// `pageout` takes only pages DAMON found idle since it last checked them (Linux 6.11+ adds a
/// `young` filter; the trimmer sets it too), and a region whose scheme ran restarts at age zero,
/// so a pass pages out what sampling has already marked: one page per region per sampling
/// interval. At 20 ms and ≤ 400 regions, ~95% of a 512 MiB guest's cold pages have been
/// sampled within 30 s (at 50 ms, ~70%; at 5 ms, all, for 4x the CPU). Hot pages inside a
/// mostly idle region survive because they were accessed since their last check. Cold ages are
/// converted with the aggregation interval kdamond really achieves (it lags on a loaded guest).
pub const DAEMON_ATTRS: MonitoringAttrs = MonitoringAttrs {
    sample_us: 20_000,
    aggr_us: 400_000,
    update_us: 1_000_000,
    min_nr_regions: 100,
    max_nr_regions: 400,
};

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// procfs root.
    pub proc_root: PathBuf,
    /// sysfs root.
    pub sys_root: PathBuf,
    /// DAMON monitoring attributes.
    pub attrs: MonitoringAttrs,
    /// Start DAMON monitoring now (false: use what runs, e.g. for a one-off local trim).
    pub start_monitoring: bool,
    /// Leave the multi-generational LRU on when monitoring starts (by default the daemon
    /// switches it off: DAMON cannot see reads of cached files under it; see
    /// [`KernelKnobs::disable_lru_gen`](crate::trim::KernelKnobs::disable_lru_gen)).
    pub keep_lru_gen: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            proc_root: crate::meminfo::DEFAULT_PROC_ROOT.into(),
            sys_root: crate::sysinfo::DEFAULT_SYS_ROOT.into(),
            attrs: DAEMON_ATTRS,
            start_monitoring: true,
            keep_lru_gen: false,
        }
    }
}

/// What the controller remembers between requests.
#[derive(Default)]
struct History {
    policy: Option<Policy>,
    report: Option<TrimReport>,
    trims: u64,
}

/// Serves control requests. Shared between connections (`Arc`); one trim runs at a time.
pub struct Controller {
    env: TrimEnv,
    started: Instant,
    /// When monitoring started, or why it could not.
    monitoring: Result<Instant, String>,
    /// What the daemon did about the multi-generational LRU (for `status`).
    lru_gen: Value,
    trim_lock: Mutex<()>,
    history: Mutex<History>,
}

/// A request line.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Ping,
    Status,
    Stats,
    Trim {
        #[serde(default)]
        policy: Option<Value>,
        #[serde(default)]
        policy_name: Option<String>,
    },
    AfterRestore {
        #[serde(default)]
        policy: Option<Value>,
        #[serde(default)]
        policy_name: Option<String>,
    },
}

/// Starts DAMON paddr monitoring: kdamond 0 over all System RAM with a `stat` scheme (so its
/// regions can be read), plus a stopped spare kdamond for vaddr passes.
pub fn start_monitoring(env: &TrimEnv) -> Result<(), crate::damon::DamonError> {
    let damon: &DamonSysfs = &env.damon;
    damon.ensure_present("start DAMON monitoring")?;
    if damon.state().ok() == Some(KdamondState::On) {
        // A previous daemon's monitor: rebuild it with our configuration.
        damon.stop()?;
    }
    let a = &env.attrs;
    damon.setup_paddr_monitor(
        a.sample_us,
        a.aggr_us,
        a.update_us,
        a.min_nr_regions,
        a.max_nr_regions,
    )?;
    damon.set_schemes(0, &env.base_schemes)?;
    damon.start()
}

/// Switches the multi-generational LRU off unless `keep` (see
/// [`KernelKnobs::disable_lru_gen`](crate::trim::KernelKnobs::disable_lru_gen)); returns what
/// was found and done, for `status`. A failure is logged, never fatal: trims still run, with
/// DAMON blind to reads of cached files.
fn switch_off_lru_gen(knobs: &crate::trim::KernelKnobs, keep: bool) -> Value {
    let caps = match knobs.lru_gen_caps() {
        Ok(None) => return json!({"present": false}),
        Ok(Some(caps)) => caps,
        Err(e) => return json!({"present": true, "error": error_chain(&e)}),
    };
    let before = format!("{caps:#06x}");
    if caps == 0 || keep {
        return json!({"present": true, "caps_before": before, "disabled_by_daemon": false});
    }
    match knobs.disable_lru_gen() {
        Ok(()) => {
            tracing::info!(
                caps_before = %before,
                "multi-generational LRU switched off so that DAMON sees reads of cached files"
            );
            json!({"present": true, "caps_before": before, "disabled_by_daemon": true})
        }
        Err(e) => {
            let e = error_chain(&e);
            tracing::warn!("could not switch the multi-generational LRU off (DAMON will not see reads of cached files): {e}");
            json!({"present": true, "caps_before": before, "disabled_by_daemon": false, "error": e})
        }
    }
}

impl Controller {
    /// Creates the controller and, if configured, starts DAMON monitoring. A guest without
    /// DAMON still gets a controller: `status` shows why monitoring is off, and DAMON steps fail
    /// with that reason.
    pub fn start(config: ControllerConfig) -> Controller {
        let mut env = TrimEnv::new(&config.proc_root, &config.sys_root, config.attrs);
        let lru_gen = if config.start_monitoring {
            switch_off_lru_gen(&env.knobs, config.keep_lru_gen)
        } else {
            Value::Null
        };
        let monitoring = if config.start_monitoring {
            match start_monitoring(&env) {
                Ok(()) => {
                    tracing::info!(?config.attrs, "DAMON paddr monitoring started");
                    Ok(Instant::now())
                }
                Err(e) => {
                    let e = error_chain(&e);
                    tracing::error!("DAMON monitoring: {e}");
                    Err(e)
                }
            }
        } else {
            Err("not started by this process (local run)".to_string())
        };
        env.monitoring_started = monitoring.as_ref().ok().copied();
        Controller {
            env,
            started: Instant::now(),
            monitoring,
            lru_gen,
            trim_lock: Mutex::new(()),
            history: Mutex::new(History::default()),
        }
    }

    /// The trim environment (for local runs and tests).
    pub fn env(&self) -> &TrimEnv {
        &self.env
    }

    /// This controller as a line handler, the shape transports take.
    pub fn handler(self: Arc<Self>) -> Arc<dyn Fn(&str) -> String + Send + Sync> {
        Arc::new(move |line: &str| self.handle_line(line))
    }

    /// Handles one request line and returns one reply line (without the newline).
    pub fn handle_line(&self, line: &str) -> String {
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => self.handle(req),
            Err(e) => json!({"ok": false, "error": format!("malformed request: {e}")}),
        };
        serde_json::to_string(&reply)
            .unwrap_or_else(|e| format!(r#"{{"ok":false,"error":"serialize reply: {e}"}}"#))
    }

    fn handle(&self, req: Request) -> Value {
        match req {
            Request::Ping => json!({"ok": true, "op": "ping", "pong": true}),
            Request::Status => self.status(),
            Request::Stats => self.stats(),
            Request::Trim {
                policy,
                policy_name,
            } => match resolve_policy(policy, policy_name) {
                Ok(Some(p)) => self.trim(p),
                Ok(None) => error("trim", "give \"policy\" (an object) or \"policy_name\""),
                Err(e) => error("trim", &e),
            },
            Request::AfterRestore {
                policy,
                policy_name,
            } => {
                let policy = match resolve_policy(policy, policy_name) {
                    Ok(Some(p)) => p,
                    Ok(None) => match self.lock_history().policy.clone() {
                        Some(p) => p,
                        None => {
                            return error("after_restore", "no policy: give one, or trim first")
                        }
                    },
                    Err(e) => return error("after_restore", &e),
                };
                let report = trim::after_restore(&self.env, &policy);
                json!({"ok": true, "op": "after_restore", "report": report})
            }
        }
    }

    fn lock_history(&self) -> std::sync::MutexGuard<'_, History> {
        // A panic while holding it cannot leave History inconsistent: take it anyway.
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a trim (one at a time) and records it.
    pub fn trim(&self, policy: Policy) -> Value {
        let Ok(_guard) = self.trim_lock.try_lock() else {
            return error("trim", "a trim is already running");
        };
        tracing::info!(policy = %policy.name, "trim");
        let report = trim::run(&self.env, &policy);
        let reply = json!({"ok": true, "op": "trim", "ready": report.ready, "report": report});
        let mut h = self.lock_history();
        h.trims += 1;
        h.policy = Some(policy);
        h.report = Some(report);
        reply
    }

    fn status(&self) -> Value {
        let busy = self.trim_lock.try_lock().is_err();
        let h = self.lock_history();
        let last = h.report.as_ref().map(|r| {
            json!({"policy": r.policy, "ok": r.ok, "ready": r.ready, "total_ms": r.total_ms,
                   "trim_ms": r.trim_ms, "freed_kib": r.freed_kib})
        });
        let kdamond = self
            .env
            .damon
            .state()
            .map(|s| s.to_string())
            .map_err(|e| error_chain(&e));
        json!({
            "ok": true,
            "op": "status",
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "monitoring": {
                "started": self.monitoring.is_ok(),
                "monitoring_ms": self.monitoring.as_ref().ok().map(|t| t.elapsed().as_millis() as u64),
                "error": self.monitoring.as_ref().err(),
                "kdamond0": kdamond.as_ref().ok(),
                "kdamond0_error": kdamond.as_ref().err(),
                "attrs": self.env.attrs,
                "lru_gen": self.lru_gen,
            },
            "busy": busy,
            "trims": h.trims,
            "last_trim": last,
        })
    }

    fn stats(&self) -> Value {
        let mem = self.env.procfs.snapshot().map_err(|e| error_chain(&e));
        let regions = self
            .env
            .damon
            .tried_regions(0, 0)
            .map_err(|e| error_chain(&e));
        let damon = match &regions {
            Ok(r) => region_summary(r, self.env.attrs.aggr_us),
            Err(e) => json!({"error": e}),
        };
        let proc_root = self.env.procfs.root();
        let kdamond_pid = std::fs::read_to_string(self.env.damon.root().join("kdamonds/0/pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|p| *p > 0);
        json!({
            "ok": true,
            "op": "stats",
            "mem": mem.as_ref().ok(),
            "mem_error": mem.as_ref().err(),
            "damon": damon,
            "daemon": proc_usage(proc_root, "self"),
            "kdamond": kdamond_pid.map(|p| proc_usage(proc_root, &p.to_string())),
        })
    }
}

fn error(op: &str, msg: &str) -> Value {
    json!({"ok": false, "op": op, "error": msg})
}

/// The policy of a request: an inline object (parsed and validated; errors give the field,
/// line and column in the request's policy text) or a built-in name.
fn resolve_policy(policy: Option<Value>, name: Option<String>) -> Result<Option<Policy>, String> {
    match (policy, name) {
        (Some(_), Some(_)) => Err("give either \"policy\" or \"policy_name\", not both".into()),
        (Some(v), None) => {
            let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
            Policy::from_json_str(&text)
                .map(Some)
                .map_err(|e| policies::error_chain(&e))
        }
        (None, Some(n)) => Policy::builtin(&n)
            .map(Some)
            .map_err(|e| policies::error_chain(&e)),
        (None, None) => Ok(None),
    }
}

/// DAMON's view of memory: bytes in regions accessed in the last aggregation interval (hot),
/// and idle bytes by how long they have been idle.
pub fn region_summary(regions: &[TriedRegion], aggr_us: u64) -> Value {
    let (mut hot, mut idle_lt_1s, mut idle_1_10s, mut idle_10_30s, mut idle_ge_30s) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for r in regions {
        let kib = r.size_bytes() >> 10;
        if r.nr_accesses > 0 {
            hot += kib;
            continue;
        }
        let idle_ms = r.age_aggr.saturating_mul(aggr_us) / 1000;
        match idle_ms {
            0..1_000 => idle_lt_1s += kib,
            1_000..10_000 => idle_1_10s += kib,
            10_000..30_000 => idle_10_30s += kib,
            _ => idle_ge_30s += kib,
        }
    }
    json!({
        "regions": regions.len(),
        "accessed_kib": hot,
        "idle_lt_1s_kib": idle_lt_1s,
        "idle_1_10s_kib": idle_1_10s,
        "idle_10_30s_kib": idle_10_30s,
        "idle_ge_30s_kib": idle_ge_30s,
    })
}

/// CPU time (utime + stime) and resident memory of `/proc/<pid>`.
pub fn proc_usage(proc_root: &std::path::Path, pid: &str) -> Value {
    let dir = proc_root.join(pid);
    let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
    let cpu_ms =
        trim::cpu::parse_pid_stat_ticks(&stat, false).map(|t| t * 1000 / trim::cpu::ticks_per_s());
    let rss_kib = std::fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        });
    json!({"pid": pid, "cpu_ms": cpu_ms, "rss_kib": rss_kib})
}

#[cfg(test)]
mod tests;
