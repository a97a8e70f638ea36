//! Trim policy schema, validation and the policy files users start from.
//!
//! A trim policy tells `guest-trimmer` how to free guest memory before a snapshot. It is an
//! ordered list of [`Step`]s drawn from one pipeline:
//!
//! 1. [`Step::Hooks`]: before-snapshot [`Hook`]s let applications release memory (run a
//!    command, send a signal, write to a unix socket), each bounded by a timeout;
//! 2. [`Step::DamonPageout`]: DAMON-guided pageout of memory cold for at least `cold_age_ms`,
//!    rate-limited by a quota and narrowed by filters;
//! 3. [`Step::DropCaches`]: drop clean page cache (all of it, or only the cold part) and slab;
//! 4. [`Step::CompactMemory`]: compact free memory so that free page reporting sees large
//!    blocks (with [`Policy::page_reporting_order`] lowering the reported block size);
//! 5. [`Step::WaitReported`]: wait, with a bound, until freed memory has been reported to the
//!    host.
//!
//! Policies are JSON files (`policies/*.json`, documented in `policies/README.md`). Unknown
//! fields are rejected everywhere so that a typo never silently falls back to a default.
//! [`Policy::from_json_str`] and [`Policy::load`] parse *and* validate (see [`validate`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod registered;
pub mod validate;

pub use validate::{FieldError, ValidationErrors};

/// Text of the shipped `default.json` policy: keeps hot data.
pub const DEFAULT_POLICY_JSON: &str = include_str!("../default.json");

/// Text of the shipped `aggressive.json` policy: frees everything that is clean.
pub const AGGRESSIVE_POLICY_JSON: &str = include_str!("../aggressive.json");

/// Text of the shipped `runtime-hooks.json` policy: hooks for a JVM and a Python process.
pub const RUNTIME_HOOKS_POLICY_JSON: &str = include_str!("../runtime-hooks.json");
/// `s512.json`: the standard benchmark scenario's policy (`vmm demo`, the benchmarks).
pub const S512_POLICY_JSON: &str = include_str!("../s512.json");
/// `fast.json`: hooks and DAMON pageout only, no compaction and no reporting wait.
pub const FAST_POLICY_JSON: &str = include_str!("../fast.json");

/// Names of the policies built into this crate, for [`Policy::builtin`].
pub const BUILTIN_POLICY_NAMES: [&str; 5] =
    ["default", "aggressive", "runtime-hooks", "s512", "fast"];

/// A trim policy: what `guest-trimmer` does, in order, before a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Short identifier (letters, digits, `.`, `_`, `-`), reported in logs and to the VMM.
    pub name: String,
    /// Free text for people: what the policy is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Memory not accessed for at least this long counts as cold. Steps that act on cold
    /// memory use it unless they set their own `cold_age_ms`. DAMON must have been monitoring
    /// for at least this long for anything to qualify.
    pub cold_age_ms: u64,
    /// Before-snapshot hooks, run by [`Step::Hooks`] steps in declaration order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
    /// The pipeline, run in order.
    pub steps: Vec<Step>,
    /// If true, a failed step fails the trim and the snapshot is refused; if false, failures
    /// are logged and the remaining steps and the snapshot go ahead.
    #[serde(default)]
    pub require_trim: bool,
    /// If set, free page reporting's minimum block order (4 KiB << order) is lowered to this
    /// for the trim run, so smaller free blocks are reported too; the previous value is restored
    /// when the run ends. `None` leaves the kernel's setting (pageblock order, 9 = 2 MiB).
    #[serde(default)]
    pub page_reporting_order: Option<u32>,
    /// Wall-clock budget of the whole trim run. Steps that would start after it are skipped
    /// (and reported as such); bounded steps (hooks, pageout, wait) get at most what is left.
    /// `None`: only the per-step bounds apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_ms: Option<u64>,
    /// DAMON-guided page cache passes (`damon_pageout`, `drop_caches` with `"cold"`) page out
    /// at most the file page cache above this many MiB, coldest first, so at least this much
    /// of the hottest page cache stays. `None`: no floor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hot_mib: Option<u64>,
    /// Hooks (declared in [`Policy::hooks`]) run, in this order, when the guest was restored
    /// from a snapshot (`after_restore` request): reseed randomness, reconnect...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_restore: Vec<String>,
    /// DAMON's aggregation interval while the trim runs (kdamond 0's monitoring attributes are
    /// updated online when the trim starts and put back when it ends). Shorter intervals make
    /// DAMOS apply the pageout scheme and answer requests sooner; Linux rescales the regions'
    /// ages to the new interval, so coldness measured since boot is kept. `None`: the
    /// daemon's idle intervals throughout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim_aggregation_ms: Option<u64>,
    /// DAMON's sampling interval while the trim runs, with `trim_aggregation_ms`; `None`:
    /// a twentieth of the trim's aggregation interval (the daemon's idle ratio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim_sampling_us: Option<u64>,
}

/// One step of the pipeline. In JSON, an object with exactly one key naming the step, e.g.
/// `{"compact_memory": {}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Run before-snapshot hooks.
    Hooks(HooksStep),
    /// Page out cold memory with a DAMON scheme.
    DamonPageout(DamonPageoutStep),
    /// Drop clean page cache and/or slab caches.
    DropCaches(DropCachesStep),
    /// Compact memory so free memory forms large reportable blocks.
    CompactMemory(CompactMemoryStep),
    /// Wait, with a bound, for freed memory to be reported to the host.
    WaitReported(WaitReportedStep),
}

impl Step {
    /// The step's JSON key, used in logs and error paths.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Hooks(_) => "hooks",
            Step::DamonPageout(_) => "damon_pageout",
            Step::DropCaches(_) => "drop_caches",
            Step::CompactMemory(_) => "compact_memory",
            Step::WaitReported(_) => "wait_reported",
        }
    }
}

/// Runs hooks from [`Policy::hooks`] and the ones applications registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksStep {
    /// Names of the hooks to run, in this order; absent means every declared hook, in
    /// declaration order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    /// Also run the `before_snapshot` hooks applications registered in
    /// [`registered::HOOKS_DIR`] (after the policy's own; one whose name the policy's hooks
    /// already use is skipped). Default true.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub registered: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Default for HooksStep {
    fn default() -> Self {
        HooksStep {
            names: None,
            registered: true,
        }
    }
}

/// Default for [`DamonPageoutStep::max_duration_ms`].
pub const DEFAULT_DAMON_PAGEOUT_MAX_DURATION_MS: u64 = 5_000;

/// Pages out memory that DAMON saw idle for at least `cold_age_ms` (a DAMOS `pageout` scheme
/// over physical memory). Paging out clean page cache frees it; anonymous memory can only be
/// paged out to swap or zram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DamonPageoutStep {
    /// Overrides [`Policy::cold_age_ms`] for this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_age_ms: Option<u64>,
    /// Size quota: page out at most this many MiB per second (DAMOS quota of `bytes` per
    /// 1000 ms reset interval), coldest first. Absent means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_mib_per_s: Option<u32>,
    /// Exclude anonymous pages (DAMOS `anon` filter): without swap they cannot be paged out,
    /// and trying wastes the quota.
    #[serde(default = "default_true")]
    pub spare_anon: bool,
    /// Page out only page cache that no process maps (DAMOS `unmapped` filter); mapped files
    /// such as running binaries and libraries are kept. On a kernel without that filter type
    /// the step fails.
    #[serde(default)]
    pub unmapped_page_cache_only: bool,
    /// Stop the step after this long even if cold memory remains.
    #[serde(default = "default_damon_pageout_max_duration_ms")]
    pub max_duration_ms: u64,
    /// If set, the step pages out the virtual address spaces of these processes (DAMON
    /// `vaddr` operations, one target per pid file: absolute paths of files holding a pid)
    /// instead of physical memory. Their monitoring starts with the step, so only a small
    /// `cold_age_ms` finds anything there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pid_files: Vec<PathBuf>,
}

/// Which page cache [`DropCachesStep`] drops. In JSON a string (`"none"`, `"cold"`, `"all"`);
/// `true` and `false` are accepted as `"all"` and `"none"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageCacheDrop {
    /// Keep the page cache.
    None,
    /// Drop clean page cache not accessed for at least the step's cold age (a DAMOS pageout
    /// pass limited to file-backed pages, without quota): hot files stay cached.
    Cold,
    /// Drop all clean page cache (`echo 1 > /proc/sys/vm/drop_caches`).
    All,
}

impl PageCacheDrop {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PageCacheDrop::None => "none",
            PageCacheDrop::Cold => "cold",
            PageCacheDrop::All => "all",
        }
    }
}

impl fmt::Display for PageCacheDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for PageCacheDrop {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PageCacheDrop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PageCacheDrop;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""none", "cold", "all", true or false"#)
            }

            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<PageCacheDrop, E> {
                Ok(if v {
                    PageCacheDrop::All
                } else {
                    PageCacheDrop::None
                })
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PageCacheDrop, E> {
                match v {
                    "none" => Ok(PageCacheDrop::None),
                    "cold" => Ok(PageCacheDrop::Cold),
                    "all" => Ok(PageCacheDrop::All),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Drops caches the kernel can rebuild from disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropCachesStep {
    /// Which clean page cache to drop.
    pub page_cache: PageCacheDrop,
    /// Drop reclaimable slab (dentries, inodes; `echo 2 > /proc/sys/vm/drop_caches`). Evicting
    /// an inode also drops its page cache, hot or not.
    pub slab: bool,
    /// Overrides [`Policy::cold_age_ms`] when `page_cache` is `"cold"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_age_ms: Option<u64>,
}

/// Compacts memory (`echo 1 > /proc/sys/vm/compact_memory`): free page reporting only reports
/// free blocks of at least `page_reporting_order`, and fragmented free memory is not reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactMemoryStep {}

/// Default for [`WaitReportedStep::quiet_ms`].
pub const DEFAULT_WAIT_REPORTED_QUIET_MS: u64 = 500;

/// Waits until freed memory has been reported to the host. The kernel reports about 2 s after
/// memory is freed, in batches; the VMM tells the trimmer when reports have stopped arriving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitReportedStep {
    /// Upper bound on the wait. Without word from the VMM, the step waits this long.
    pub timeout_ms: u64,
    /// Reporting counts as finished once no report arrived for this long.
    #[serde(default = "default_wait_reported_quiet_ms")]
    pub quiet_ms: u64,
}

/// A before-snapshot hook: asks an application to release memory it can rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "HookRepr", into = "HookRepr")]
pub struct Hook {
    /// Unique name, used by [`HooksStep::names`] and in logs.
    pub name: String,
    /// Bound on the whole hook (start, delivery, and the acknowledgement if one is expected).
    pub timeout_ms: u64,
    /// What the hook does.
    pub action: HookAction,
}

/// What a [`Hook`] does. In JSON the action's fields sit next to `name` and `timeout_ms`, and
/// the key `command`, `signal` or `unix_socket` selects the action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    /// Run a program (no shell) and wait for it to exit with status 0.
    Command {
        /// Program (absolute path) and arguments.
        argv: Vec<String>,
    },
    /// Send a signal to the process whose pid is in `pid_file`.
    Signal {
        /// Signal to send.
        signal: HookSignal,
        /// File holding the target's pid (decimal, optional trailing newline).
        pid_file: PathBuf,
        /// If set, the trimmer removes this file before signalling and waits for the process
        /// to create it as its acknowledgement; if not, the hook is done once the signal is
        /// delivered.
        ack_file: Option<PathBuf>,
    },
    /// Connect to a unix stream socket and write a message.
    UnixSocket {
        /// Socket path.
        path: PathBuf,
        /// Bytes to write (UTF-8 text, sent as is).
        message: String,
        /// If set, the trimmer reads one line back and requires it to equal this (without the
        /// newline); if not, the hook is done once the message is written.
        expect_reply: Option<String>,
    },
}

impl HookAction {
    /// The JSON key that selects the action.
    pub fn kind(&self) -> &'static str {
        match self {
            HookAction::Command { .. } => "command",
            HookAction::Signal { .. } => "signal",
            HookAction::UnixSocket { .. } => "unix_socket",
        }
    }
}

/// Signals a [`HookAction::Signal`] may send: the ones applications conventionally handle.
/// SIGKILL and SIGSTOP are left out on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HookSignal {
    /// Hangup, often "reload".
    #[serde(rename = "SIGHUP")]
    Hup,
    /// Interrupt.
    #[serde(rename = "SIGINT")]
    Int,
    /// User-defined signal 1.
    #[serde(rename = "SIGUSR1")]
    Usr1,
    /// User-defined signal 2.
    #[serde(rename = "SIGUSR2")]
    Usr2,
    /// Termination request.
    #[serde(rename = "SIGTERM")]
    Term,
    /// Continue.
    #[serde(rename = "SIGCONT")]
    Cont,
    /// Window size change, sometimes used as a custom notification.
    #[serde(rename = "SIGWINCH")]
    Winch,
}

impl HookSignal {
    /// The signal's name as written in policies, e.g. `"SIGUSR1"`.
    pub fn name(self) -> &'static str {
        match self {
            HookSignal::Hup => "SIGHUP",
            HookSignal::Int => "SIGINT",
            HookSignal::Usr1 => "SIGUSR1",
            HookSignal::Usr2 => "SIGUSR2",
            HookSignal::Term => "SIGTERM",
            HookSignal::Cont => "SIGCONT",
            HookSignal::Winch => "SIGWINCH",
        }
    }

    /// The Linux x86-64 signal number.
    pub fn number(self) -> i32 {
        match self {
            HookSignal::Hup => 1,
            HookSignal::Int => 2,
            HookSignal::Usr1 => 10,
            HookSignal::Usr2 => 12,
            HookSignal::Term => 15,
            HookSignal::Cont => 18,
            HookSignal::Winch => 28,
        }
    }
}

/// The flat JSON form of a [`Hook`]; converted with checks that exactly one action is given
/// and that each field belongs to that action.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HookRepr {
    name: String,
    timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signal: Option<HookSignal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ack_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unix_socket: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect_reply: Option<String>,
}

impl TryFrom<HookRepr> for Hook {
    type Error = String;

    fn try_from(r: HookRepr) -> Result<Self, String> {
        let name = r.name;
        let mut kinds = Vec::new();
        if r.command.is_some() {
            kinds.push("\"command\"");
        }
        if r.signal.is_some() {
            kinds.push("\"signal\"");
        }
        if r.unix_socket.is_some() {
            kinds.push("\"unix_socket\"");
        }
        if kinds.len() != 1 {
            let found = if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds.join(" and ")
            };
            return Err(format!(
                "hook \"{name}\": set exactly one of \"command\", \"signal\" or \"unix_socket\", found {found}"
            ));
        }
        let misplaced = |field: &str, kind: &str| {
            format!("hook \"{name}\": \"{field}\" only goes with \"{kind}\"")
        };
        let action = if let Some(argv) = r.command {
            for (field, set) in [
                ("pid_file", r.pid_file.is_some()),
                ("ack_file", r.ack_file.is_some()),
            ] {
                if set {
                    return Err(misplaced(field, "signal"));
                }
            }
            for (field, set) in [
                ("message", r.message.is_some()),
                ("expect_reply", r.expect_reply.is_some()),
            ] {
                if set {
                    return Err(misplaced(field, "unix_socket"));
                }
            }
            HookAction::Command { argv }
        } else if let Some(signal) = r.signal {
            for (field, set) in [
                ("message", r.message.is_some()),
                ("expect_reply", r.expect_reply.is_some()),
            ] {
                if set {
                    return Err(misplaced(field, "unix_socket"));
                }
            }
            let pid_file = r.pid_file.ok_or_else(|| {
                format!(
                    "hook \"{name}\": \"signal\" needs \"pid_file\" naming the target's pid file"
                )
            })?;
            HookAction::Signal {
                signal,
                pid_file,
                ack_file: r.ack_file,
            }
        } else {
            // kinds.len() == 1, so unix_socket is set.
            let path = r.unix_socket.unwrap_or_default();
            for (field, set) in [
                ("pid_file", r.pid_file.is_some()),
                ("ack_file", r.ack_file.is_some()),
            ] {
                if set {
                    return Err(misplaced(field, "signal"));
                }
            }
            let message = r.message.ok_or_else(|| {
                format!("hook \"{name}\": \"unix_socket\" needs \"message\", the text to send")
            })?;
            HookAction::UnixSocket {
                path,
                message,
                expect_reply: r.expect_reply,
            }
        };
        Ok(Hook {
            name,
            timeout_ms: r.timeout_ms,
            action,
        })
    }
}

impl From<Hook> for HookRepr {
    fn from(h: Hook) -> Self {
        let mut r = HookRepr {
            name: h.name,
            timeout_ms: h.timeout_ms,
            command: None,
            signal: None,
            pid_file: None,
            ack_file: None,
            unix_socket: None,
            message: None,
            expect_reply: None,
        };
        match h.action {
            HookAction::Command { argv } => r.command = Some(argv),
            HookAction::Signal {
                signal,
                pid_file,
                ack_file,
            } => {
                r.signal = Some(signal);
                r.pid_file = Some(pid_file);
                r.ack_file = ack_file;
            }
            HookAction::UnixSocket {
                path,
                message,
                expect_reply,
            } => {
                r.unix_socket = Some(path);
                r.message = Some(message);
                r.expect_reply = expect_reply;
            }
        }
        r
    }
}

fn default_true() -> bool {
    true
}

fn default_damon_pageout_max_duration_ms() -> u64 {
    DEFAULT_DAMON_PAGEOUT_MAX_DURATION_MS
}

fn default_wait_reported_quiet_ms() -> u64 {
    DEFAULT_WAIT_REPORTED_QUIET_MS
}

/// Why a policy could not be loaded. The message names the file (or inline text) and, for
/// syntax and schema errors, the line and column.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy file could not be read.
    #[error("read policy file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid JSON or does not match the schema (unknown field, wrong type...).
    #[error("parse policy {origin} at line {line}, column {column}")]
    Parse {
        /// `file <path>` or `text` for [`Policy::from_json_str`].
        origin: String,
        /// Line of the error (1-based).
        line: usize,
        /// Column of the error (1-based).
        column: usize,
        /// The parser's message.
        #[source]
        source: serde_json::Error,
    },
    /// The policy parses but breaks a rule of [`validate`].
    #[error("validate policy {origin}")]
    Invalid {
        /// `file <path>` or `text`.
        origin: String,
        /// Every broken rule.
        #[source]
        source: ValidationErrors,
    },
    /// [`Policy::builtin`] was asked for a name that is not built in.
    #[error("builtin policy {name:?}: unknown, expected one of {BUILTIN_POLICY_NAMES:?}")]
    UnknownBuiltin {
        /// The name asked for.
        name: String,
    },
}

impl Policy {
    /// Parses and validates a policy from JSON text.
    pub fn from_json_str(text: &str) -> Result<Policy, PolicyError> {
        Self::parse(text, "text".to_string())
    }

    /// Reads, parses and validates the policy file at `path`.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, format!("file {}", path.display()))
    }

    /// One of the policies shipped with this crate, by name (see [`BUILTIN_POLICY_NAMES`]).
    pub fn builtin(name: &str) -> Result<Policy, PolicyError> {
        let text = match name {
            "default" => DEFAULT_POLICY_JSON,
            "aggressive" => AGGRESSIVE_POLICY_JSON,
            "runtime-hooks" => RUNTIME_HOOKS_POLICY_JSON,
            "s512" => S512_POLICY_JSON,
            "fast" => FAST_POLICY_JSON,
            _ => {
                return Err(PolicyError::UnknownBuiltin {
                    name: name.to_string(),
                })
            }
        };
        Self::parse(text, format!("builtin {name}"))
    }

    /// The policy as pretty-printed JSON (it parses back to an equal policy).
    pub fn to_json_pretty(&self) -> String {
        // Serializing these types cannot fail: all map keys are strings.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the policy's semantic rules; see [`validate::validate`].
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        validate::validate(self)
    }

    /// DAMON's (sampling, aggregation) intervals in µs for the trim's duration, if the policy
    /// asks for trim intervals.
    pub fn trim_intervals_us(&self) -> Option<(u64, u64)> {
        let aggr_us = self.trim_aggregation_ms?.saturating_mul(1000);
        let sample_us = self.trim_sampling_us.unwrap_or(aggr_us / 20).max(1);
        Some((sample_us, aggr_us))
    }

    /// Cold age in force for a step that may override [`Policy::cold_age_ms`].
    pub fn effective_cold_age_ms(&self, step_override: Option<u64>) -> u64 {
        step_override.unwrap_or(self.cold_age_ms)
    }

    /// Upper bound of the time the steps with a bound may take, in ms: hook timeouts (once per
    /// run in a hooks step), pageout durations and wait timeouts. Drop and compact steps are
    /// kernel operations without a bound and count as zero.
    pub fn time_budget_ms(&self) -> u64 {
        let hook_timeout = |name: &str| {
            self.hooks
                .iter()
                .find(|h| h.name == name)
                .map_or(0, |h| h.timeout_ms)
        };
        self.steps
            .iter()
            .map(|step| match step {
                Step::Hooks(s) => match &s.names {
                    Some(names) => names
                        .iter()
                        .map(|n| hook_timeout(n))
                        .fold(0u64, u64::saturating_add),
                    None => self
                        .hooks
                        .iter()
                        .map(|h| h.timeout_ms)
                        .fold(0u64, u64::saturating_add),
                },
                Step::DamonPageout(s) => s.max_duration_ms,
                Step::WaitReported(s) => s.timeout_ms,
                Step::DropCaches(_) | Step::CompactMemory(_) => 0,
            })
            .fold(0u64, u64::saturating_add)
    }

    fn parse(text: &str, origin: String) -> Result<Policy, PolicyError> {
        let policy: Policy = serde_json::from_str(text).map_err(|source| PolicyError::Parse {
            line: source.line(),
            column: source.column(),
            origin: origin.clone(),
            source,
        })?;
        policy
            .validate()
            .map_err(|source| PolicyError::Invalid { origin, source })?;
        Ok(policy)
    }
}

pub use error_text::error_chain;

#[cfg(test)]
mod tests;
