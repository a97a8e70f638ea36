//! CPU time spent during a trim step, next to its wall time: the trimmer's own (with the hook
//! commands it waited for, and the kernel work it triggers in its own context: `compact_memory`
//! and `drop_caches` writes run in the writer), kdamond 0's (DAMON sampling and DAMOS pageout),
//! and all CPUs' busy time from `/proc/stat`.
//!
//! Why: in an emulated guest CPU work is 10-50x slower than on hardware while timer waits
//! (DAMON's intervals, the kernel's reporting delay) take the same wall time. Splitting a
//! step's wall time into CPU work and waiting lets a benchmark estimate the hardware time.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Where the CPU figures are read: procfs and the DAMON admin directory (for kdamond 0's pid).
#[derive(Debug, Clone)]
pub struct CpuProbe {
    proc_root: PathBuf,
    damon_root: PathBuf,
}

/// One reading of the counters, in ms of CPU time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuSample {
    /// This process: user + system, with waited-for children.
    pub trimmer_ms: Option<u64>,
    /// kdamond 0: user + system.
    pub kdamond_ms: Option<u64>,
    /// All CPUs: user + nice + system + irq + softirq (`/proc/stat`).
    pub guest_busy_ms: Option<u64>,
}

/// CPU time spent during a step (or a whole trim), ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StepCpu {
    /// The trimmer process and the hook commands it waited for.
    pub trimmer_ms: Option<u64>,
    /// kdamond 0 (DAMON monitoring and pageout).
    pub kdamond_ms: Option<u64>,
    /// Busy time of all guest CPUs (includes the guest's own workload).
    pub guest_busy_ms: Option<u64>,
    /// The processes hooks asked to release memory (a signalled pid, a unix socket's peer),
    /// while each hook waited for them; only in steps that ran such hooks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooked_ms: Option<u64>,
}

impl StepCpu {
    /// The trim's CPU work: trimmer + kdamond + hooked processes (what is known of them).
    pub fn work_ms(&self) -> u64 {
        self.trimmer_ms.unwrap_or(0) + self.kdamond_ms.unwrap_or(0) + self.hooked_ms.unwrap_or(0)
    }

    /// Field-wise sum (a missing figure stays missing, except the hooked processes', which
    /// only hook steps have).
    pub fn add(&self, other: &StepCpu) -> StepCpu {
        let sum = |a: Option<u64>, b: Option<u64>| Some(a? + b?);
        let hooked = match (self.hooked_ms, other.hooked_ms) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        StepCpu {
            trimmer_ms: sum(self.trimmer_ms, other.trimmer_ms),
            kdamond_ms: sum(self.kdamond_ms, other.kdamond_ms),
            guest_busy_ms: sum(self.guest_busy_ms, other.guest_busy_ms),
            hooked_ms: hooked,
        }
    }
}

impl CpuSample {
    /// What was spent from `self` to `later` (`None` where either reading is missing).
    pub fn until(&self, later: &CpuSample) -> StepCpu {
        let d = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        StepCpu {
            trimmer_ms: d(self.trimmer_ms, later.trimmer_ms),
            kdamond_ms: d(self.kdamond_ms, later.kdamond_ms),
            guest_busy_ms: d(self.guest_busy_ms, later.guest_busy_ms),
            hooked_ms: None,
        }
    }
}

/// CPU time (user + system) of process `pid` (a number or `self`), ms, from
/// `proc_root/PID/stat`; with `children` also the children it waited for.
pub fn process_cpu_ms(proc_root: &Path, pid: &str, children: bool) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join(pid).join("stat")).ok()?;
    Some(parse_pid_stat_ticks(&text, children)? * 1000 / ticks_per_s())
}

/// Clock ticks per second of `/proc` CPU times (`USER_HZ`).
pub fn ticks_per_s() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64
}

/// CPU time in ticks from the text of `/proc/PID/stat`: utime + stime, plus cutime + cstime
/// (children waited for) when `children`. `None` when the text does not have that shape.
pub fn parse_pid_stat_ticks(stat: &str, children: bool) -> Option<u64> {
    // Fields after the `(comm)` (which may hold spaces): state is field 3; utime, stime,
    // cutime, cstime are fields 14-17.
    let after_comm = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let own = tick(11)? + tick(12)?;
    Some(if children {
        own + tick(13)? + tick(14)?
    } else {
        own
    })
}

/// Busy ticks of all CPUs from the text of `/proc/stat`: the `cpu` line's user + nice + system
/// + irq + softirq (idle, iowait, steal and guest time are left out).
pub fn parse_proc_stat_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq ...
    Some(v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?)
}

/// Run plus run-queue wait time, ns, from the text of `/proc/PID/schedstat`
/// (`run_ns wait_ns timeslices`).
pub fn parse_schedstat_busy_ns(text: &str) -> Option<u64> {
    let mut fields = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some(fields.next()?? + fields.next()??)
}

impl CpuProbe {
    /// Reads below `proc_root`; kdamond 0's pid from `damon_root/kdamonds/0/pid`.
    pub fn new(proc_root: &Path, damon_root: &Path) -> Self {
        CpuProbe {
            proc_root: proc_root.to_path_buf(),
            damon_root: damon_root.to_path_buf(),
        }
    }

    fn pid_ms(&self, pid: &str, children: bool) -> Option<u64> {
        process_cpu_ms(&self.proc_root, pid, children)
    }

    /// kdamond 0's pid, when it runs.
    pub fn kdamond_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.damon_root.join("kdamonds/0/pid"))
            .ok()?
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|p| *p > 0)
            .map(|p| p as u32)
    }

    /// Share of the last `lifetime_ms` (kdamond 0's lifetime) it spent running or waiting on a
    /// run queue, from `/proc/PID/schedstat` (run and wait time, ns); `None` when unreadable.
    /// Tells whether kdamond 0 keeps its intervals: only sleep is on schedule.
    pub fn kdamond_busy_share(&self, lifetime_ms: u64) -> Option<f64> {
        let pid = self.kdamond_pid()?;
        let text =
            std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("schedstat")).ok()?;
        let ns = parse_schedstat_busy_ns(&text)?;
        (lifetime_ms > 0).then(|| (ns as f64 / 1e6 / lifetime_ms as f64).min(1.0))
    }

    /// Reads the counters now; what cannot be read is `None`.
    pub fn sample(&self) -> CpuSample {
        let busy = std::fs::read_to_string(self.proc_root.join("stat"))
            .ok()
            .and_then(|t| parse_proc_stat_busy_ticks(&t))
            .map(|t| t * 1000 / ticks_per_s());
        CpuSample {
            trimmer_ms: self.pid_ms("self", true),
            kdamond_ms: self
                .kdamond_pid()
                .and_then(|p| self.pid_ms(&p.to_string(), false)),
            guest_busy_ms: busy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_stat_with_spaces_in_comm() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime ...
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 10 0 0 0 7 3 20 5 20 0 1 0";
        assert_eq!(parse_pid_stat_ticks(stat, false), Some(10));
        assert_eq!(parse_pid_stat_ticks(stat, true), Some(35));
        assert_eq!(parse_pid_stat_ticks("garbage", false), None);
        assert_eq!(parse_pid_stat_ticks("1 (x) S 1 2", false), None);
    }

    #[test]
    fn schedstat_adds_run_and_wait() {
        assert_eq!(parse_schedstat_busy_ns("1500 500 7\n"), Some(2000));
        assert_eq!(parse_schedstat_busy_ns("1500"), None);
        assert_eq!(parse_schedstat_busy_ns("x 1 2"), None);
    }

    #[test]
    fn proc_stat_busy_leaves_out_idle_iowait_and_steal() {
        let stat = "cpu  100 5 50 9000 300 7 8 1000 0 0\ncpu0 50 2 25 4500 150 3 4 500 0 0\n";
        assert_eq!(parse_proc_stat_busy_ticks(stat), Some(100 + 5 + 50 + 7 + 8));
        assert_eq!(parse_proc_stat_busy_ticks("intr 1 2"), None);
        assert_eq!(parse_proc_stat_busy_ticks("cpu  1 2"), None);
    }

    #[test]
    fn step_cpu_deltas_and_sums() {
        let a = CpuSample {
            trimmer_ms: Some(100),
            kdamond_ms: Some(1000),
            guest_busy_ms: None,
        };
        let b = CpuSample {
            trimmer_ms: Some(130),
            kdamond_ms: Some(1500),
            guest_busy_ms: Some(9),
        };
        let d = a.until(&b);
        assert_eq!(
            d,
            StepCpu {
                trimmer_ms: Some(30),
                kdamond_ms: Some(500),
                guest_busy_ms: None,
                hooked_ms: None,
            }
        );
        assert_eq!(d.work_ms(), 530);
        assert_eq!(d.add(&d).kdamond_ms, Some(1000));
        // The hooked processes' CPU counts as work; steps without hooks do not lose it.
        let hooks = StepCpu {
            hooked_ms: Some(70),
            ..d
        };
        assert_eq!(hooks.work_ms(), 600);
        assert_eq!(hooks.add(&d).hooked_ms, Some(70));
        assert_eq!(d.add(&d).hooked_ms, None);
    }

    #[test]
    fn probe_reads_a_fake_tree() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        let damon = dir.path().join("damon");
        std::fs::create_dir_all(proc_root.join("77")).unwrap();
        std::fs::create_dir_all(damon.join("kdamonds/0")).unwrap();
        std::fs::write(damon.join("kdamonds/0/pid"), "77\n").unwrap();
        std::fs::write(
            proc_root.join("77/stat"),
            "77 (kdamond.0) S 2 0 0 0 -1 0 0 0 0 0 40 60 0 0 20 0",
        )
        .unwrap();
        std::fs::write(proc_root.join("stat"), "cpu  10 0 10 100 0 0 0 0 0 0\n").unwrap();
        let s = CpuProbe::new(&proc_root, &damon).sample();
        let hz = ticks_per_s();
        assert_eq!(s.kdamond_ms, Some(100 * 1000 / hz));
        assert_eq!(s.guest_busy_ms, Some(20 * 1000 / hz));
        // No `self` below the fake root.
        assert_eq!(s.trimmer_ms, None);
        let probe = CpuProbe::new(&proc_root, &damon);
        assert_eq!(probe.kdamond_busy_share(1000), None);
        std::fs::write(proc_root.join("77/schedstat"), "30000000 20000000 9\n").unwrap();
        assert_eq!(probe.kdamond_busy_share(1000), Some(0.05));
        assert_eq!(probe.kdamond_busy_share(10), Some(1.0));
    }
}
