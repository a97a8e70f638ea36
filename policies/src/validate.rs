//! Semantic validation of a parsed [`Policy`]: ranges, references between hooks and steps, and
//! rules serde cannot express. Every error names the field by its JSON path
//! (e.g. `steps[2].wait_reported.timeout_ms`) and says what was expected and what was found.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use crate::{Hook, HookAction, PageCacheDrop, Policy, Step};

/// Longest policy or hook name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Largest cold age, in ms (1 hour).
pub const MAX_COLD_AGE_MS: u64 = 3_600_000;
/// Most steps in a policy.
pub const MAX_STEPS: usize = 32;
/// Most hooks in a policy.
pub const MAX_HOOKS: usize = 16;
/// Longest hook timeout, in ms.
pub const MAX_HOOK_TIMEOUT_MS: u64 = 60_000;
/// Most arguments (program included) of a command hook.
pub const MAX_COMMAND_ARGS: usize = 64;
/// Longest unix socket path, in bytes (`sun_path` holds 108 bytes with the final NUL).
pub const MAX_UNIX_SOCKET_PATH_LEN: usize = 107;
/// Longest hook message or expected reply, in bytes.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Largest DAMON pageout quota, in MiB/s.
pub const MAX_QUOTA_MIB_PER_S: u32 = 1_048_576;
/// Longest DAMON pageout step, in ms.
pub const MAX_DAMON_PAGEOUT_DURATION_MS: u64 = 600_000;
/// Longest wait for reporting, in ms.
pub const MAX_WAIT_REPORTED_TIMEOUT_MS: u64 = 600_000;
/// Largest page reporting order (MAX_PAGE_ORDER on x86-64: 4 MiB blocks).
pub const MAX_PAGE_REPORTING_ORDER: u32 = 10;
/// Largest [`Policy::time_budget_ms`] (15 minutes): a snapshot must not wait longer.
pub const MAX_TIME_BUDGET_MS: u64 = 900_000;
/// Largest `keep_hot_mib` (1 TiB).
pub const MAX_KEEP_HOT_MIB: u64 = 1 << 20;
/// Shortest and longest `trim_aggregation_ms`.
pub const TRIM_AGGREGATION_MS_RANGE: (u64, u64) = (10, 10_000);
/// Shortest and longest `trim_sampling_us`.
pub const TRIM_SAMPLING_US_RANGE: (u64, u64) = (100, 1_000_000);
/// Most pid files of a `damon_pageout` step (DAMON vaddr targets).
pub const MAX_PID_FILES: usize = 16;

/// One broken rule: the JSON path of the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path, e.g. `hooks[0].timeout_ms`.
    pub field: String,
    /// What was expected and what was found.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All rules a policy breaks, in document order (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    /// The individual errors.
    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// Whether some error concerns exactly `field`.
    pub fn has_field(&self, field: &str) -> bool {
        self.0.iter().any(|e| e.field == field)
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Collects errors while walking a policy.
#[derive(Default)]
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn range(&mut self, field: impl Into<String>, value: u64, min: u64, max: u64) {
        if value < min || value > max {
            self.error(
                field,
                format!("must be between {min} and {max}, got {value}"),
            );
        }
    }

    fn name(&mut self, field: impl Into<String>, name: &str) {
        let field = field.into();
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            self.error(
                field,
                format!(
                    "must be 1 to {MAX_NAME_LEN} bytes long, got {} bytes",
                    name.len()
                ),
            );
        } else if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            self.error(
                field,
                format!("may hold only letters, digits, '.', '_' and '-', got {c:?} in {name:?}"),
            );
        }
    }

    fn no_nul(&mut self, field: impl Into<String>, text: &str) {
        if text.contains('\0') {
            self.error(field, "must not contain a NUL character");
        }
    }

    fn absolute_path(&mut self, field: impl Into<String>, path: &Path) {
        let field = field.into();
        let text = path.to_string_lossy();
        if text.contains('\0') {
            self.error(field, "must not contain a NUL character");
        } else if !path.is_absolute() {
            self.error(field, format!("must be an absolute path, got {text:?}"));
        }
    }
}

/// `trim_aggregation_ms` and `trim_sampling_us`: in range, sampling only with aggregation,
/// and sampling no longer than aggregation (DAMON's own rule).
fn check_trim_intervals(c: &mut Checker, policy: &Policy) {
    let (amin, amax) = TRIM_AGGREGATION_MS_RANGE;
    let (smin, smax) = TRIM_SAMPLING_US_RANGE;
    if let Some(a) = policy.trim_aggregation_ms {
        c.range("trim_aggregation_ms", a, amin, amax);
    }
    let Some(s) = policy.trim_sampling_us else {
        return;
    };
    c.range("trim_sampling_us", s, smin, smax);
    match policy.trim_aggregation_ms {
        None => c.error(
            "trim_sampling_us",
            "needs trim_aggregation_ms (the trim's intervals are set together)",
        ),
        Some(a) if s > a.saturating_mul(1000) => c.error(
            "trim_sampling_us",
            format!(
                "must be at most trim_aggregation_ms ({a} ms = {} us), got {s}",
                a * 1000
            ),
        ),
        Some(_) => {}
    }
}

/// Checks every rule and returns all broken ones.
///
/// Rules: `name` is an identifier; ranges of every number (see the `MAX_*` constants); hook
/// names are unique; commands, pid files, ack files and sockets use absolute paths; a hooks
/// step names only declared hooks and every declared hook is run by some hooks step; a
/// drop_caches step drops something; `quiet_ms` does not exceed `timeout_ms`; and the
/// policy's [`Policy::time_budget_ms`] stays within [`MAX_TIME_BUDGET_MS`].
pub fn validate(policy: &Policy) -> Result<(), ValidationErrors> {
    let mut c = Checker::default();

    c.name("name", &policy.name);
    if policy.description.len() > MAX_DESCRIPTION_LEN {
        c.error(
            "description",
            format!(
                "must be at most {MAX_DESCRIPTION_LEN} bytes long, got {}",
                policy.description.len()
            ),
        );
    }
    c.range("cold_age_ms", policy.cold_age_ms, 0, MAX_COLD_AGE_MS);
    if let Some(order) = policy.page_reporting_order {
        c.range(
            "page_reporting_order",
            u64::from(order),
            0,
            u64::from(MAX_PAGE_REPORTING_ORDER),
        );
    }

    if let Some(budget) = policy.budget_ms {
        c.range("budget_ms", budget, 1, MAX_TIME_BUDGET_MS);
    }
    if let Some(keep) = policy.keep_hot_mib {
        c.range("keep_hot_mib", keep, 0, MAX_KEEP_HOT_MIB);
    }
    check_trim_intervals(&mut c, policy);

    check_hooks(&mut c, policy);
    check_steps(&mut c, policy);

    let budget_ms = policy.time_budget_ms();
    if c.errors.is_empty() && budget_ms > MAX_TIME_BUDGET_MS {
        c.error(
            "steps",
            format!(
                "hook timeouts, pageout durations and wait timeouts must add up to at most \
                 {MAX_TIME_BUDGET_MS} ms, got {budget_ms}"
            ),
        );
    }

    if c.errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(c.errors))
    }
}

fn check_hooks(c: &mut Checker, policy: &Policy) {
    if policy.hooks.len() > MAX_HOOKS {
        c.error(
            "hooks",
            format!(
                "must have at most {MAX_HOOKS} entries, got {}",
                policy.hooks.len()
            ),
        );
    }
    let mut seen: Vec<&str> = Vec::new();
    for (i, hook) in policy.hooks.iter().enumerate() {
        let at = format!("hooks[{i}]");
        if let Some(first) = seen.iter().position(|n| *n == hook.name) {
            c.error(
                format!("{at}.name"),
                format!("{:?} is already the name of hooks[{first}]", hook.name),
            );
        }
        seen.push(&hook.name);
        check_hook(c, &at, hook);
    }
}

/// Checks one hook's fields (its name too), reporting errors under `at` (e.g. `hooks[0]`).
fn check_hook(c: &mut Checker, at: &str, hook: &Hook) {
    c.name(format!("{at}.name"), &hook.name);
    c.range(
        format!("{at}.timeout_ms"),
        hook.timeout_ms,
        1,
        MAX_HOOK_TIMEOUT_MS,
    );
    match &hook.action {
        HookAction::Command { argv } => {
            let field = format!("{at}.command");
            match argv.first() {
                None => c.error(field, "must name a program, got an empty list"),
                Some(program) => {
                    if argv.len() > MAX_COMMAND_ARGS {
                        c.error(
                            field.clone(),
                            format!(
                                "must have at most {MAX_COMMAND_ARGS} entries, got {}",
                                argv.len()
                            ),
                        );
                    }
                    c.absolute_path(format!("{field}[0]"), Path::new(program));
                    for (j, arg) in argv.iter().enumerate().skip(1) {
                        c.no_nul(format!("{field}[{j}]"), arg);
                    }
                }
            }
        }
        HookAction::Signal {
            pid_file, ack_file, ..
        } => {
            c.absolute_path(format!("{at}.pid_file"), pid_file);
            if let Some(ack) = ack_file {
                c.absolute_path(format!("{at}.ack_file"), ack);
            }
        }
        HookAction::UnixSocket {
            path,
            message,
            expect_reply,
        } => {
            let field = format!("{at}.unix_socket");
            c.absolute_path(field.clone(), path);
            let len = path.as_os_str().len();
            if len > MAX_UNIX_SOCKET_PATH_LEN {
                c.error(
                    field,
                    format!("must be at most {MAX_UNIX_SOCKET_PATH_LEN} bytes long, got {len}"),
                );
            }
            if message.is_empty() || message.len() > MAX_MESSAGE_LEN {
                c.error(
                    format!("{at}.message"),
                    format!(
                        "must be 1 to {MAX_MESSAGE_LEN} bytes long, got {}",
                        message.len()
                    ),
                );
            }
            if let Some(reply) = expect_reply {
                let field = format!("{at}.expect_reply");
                if reply.len() > MAX_MESSAGE_LEN {
                    c.error(
                        field,
                        format!(
                            "must be at most {MAX_MESSAGE_LEN} bytes long, got {}",
                            reply.len()
                        ),
                    );
                } else if reply.contains('\n') {
                    c.error(field, "must be a single line (no '\\n')");
                }
            }
        }
    }
}

fn check_steps(c: &mut Checker, policy: &Policy) {
    if policy.steps.is_empty() || policy.steps.len() > MAX_STEPS {
        c.error(
            "steps",
            format!(
                "must have 1 to {MAX_STEPS} entries, got {}",
                policy.steps.len()
            ),
        );
    }
    let declared: HashSet<&str> = policy.hooks.iter().map(|h| h.name.as_str()).collect();
    let mut run_hooks: HashSet<&str> = HashSet::new();
    for (i, step) in policy.steps.iter().enumerate() {
        let at = format!("steps[{i}].{}", step.kind());
        match step {
            Step::Hooks(s) => match &s.names {
                None => run_hooks.extend(declared.iter().copied()),
                Some(names) => {
                    if names.is_empty() {
                        c.error(
                            format!("{at}.names"),
                            "must name at least one hook, or be left out to run them all",
                        );
                    }
                    for (j, name) in names.iter().enumerate() {
                        let field = format!("{at}.names[{j}]");
                        if !declared.contains(name.as_str()) {
                            c.error(field, format!("{name:?} is not declared in \"hooks\""));
                        } else if names[..j].contains(name) {
                            c.error(field, format!("{name:?} is listed twice"));
                        } else {
                            run_hooks.insert(name);
                        }
                    }
                }
            },
            Step::DamonPageout(s) => {
                if let Some(age) = s.cold_age_ms {
                    c.range(format!("{at}.cold_age_ms"), age, 0, MAX_COLD_AGE_MS);
                }
                if let Some(quota) = s.quota_mib_per_s {
                    c.range(
                        format!("{at}.quota_mib_per_s"),
                        u64::from(quota),
                        1,
                        u64::from(MAX_QUOTA_MIB_PER_S),
                    );
                }
                c.range(
                    format!("{at}.max_duration_ms"),
                    s.max_duration_ms,
                    1,
                    MAX_DAMON_PAGEOUT_DURATION_MS,
                );
                if s.pid_files.len() > MAX_PID_FILES {
                    c.error(
                        format!("{at}.pid_files"),
                        format!(
                            "must have at most {MAX_PID_FILES} entries, got {}",
                            s.pid_files.len()
                        ),
                    );
                }
                for (j, f) in s.pid_files.iter().enumerate() {
                    c.absolute_path(format!("{at}.pid_files[{j}]"), f);
                }
            }
            Step::DropCaches(s) => {
                if s.page_cache == PageCacheDrop::None && !s.slab {
                    c.error(
                        at.clone(),
                        "drops nothing: set \"page_cache\" to \"cold\" or \"all\", or \"slab\" to true",
                    );
                }
                if let Some(age) = s.cold_age_ms {
                    let field = format!("{at}.cold_age_ms");
                    if s.page_cache != PageCacheDrop::Cold {
                        c.error(
                            field,
                            format!(
                                "only applies when \"page_cache\" is \"cold\", got \"page_cache\": \"{}\"",
                                s.page_cache
                            ),
                        );
                    } else {
                        c.range(field, age, 0, MAX_COLD_AGE_MS);
                    }
                }
            }
            Step::CompactMemory(_) => {}
            Step::WaitReported(s) => {
                c.range(
                    format!("{at}.timeout_ms"),
                    s.timeout_ms,
                    1,
                    MAX_WAIT_REPORTED_TIMEOUT_MS,
                );
                if s.quiet_ms == 0 || s.quiet_ms > s.timeout_ms.max(1) {
                    c.error(
                        format!("{at}.quiet_ms"),
                        format!(
                            "must be between 1 and timeout_ms ({}), got {}",
                            s.timeout_ms, s.quiet_ms
                        ),
                    );
                }
            }
        }
    }
    for (j, name) in policy.after_restore.iter().enumerate() {
        let field = format!("after_restore[{j}]");
        if !declared.contains(name.as_str()) {
            c.error(field, format!("{name:?} is not declared in \"hooks\""));
        } else if policy.after_restore[..j].contains(name) {
            c.error(field, format!("{name:?} is listed twice"));
        } else {
            run_hooks.insert(name);
        }
    }
    for (i, hook) in policy.hooks.iter().enumerate() {
        if !run_hooks.contains(hook.name.as_str()) {
            c.error(
                format!("hooks[{i}]"),
                format!(
                    "{:?} is not run by any \"hooks\" step nor by \"after_restore\"",
                    hook.name
                ),
            );
        }
    }
}

/// Checks a hook that stands alone (an application's registration, see
/// [`crate::registered`]): the same rules as a policy's hooks, errors under `at`.
pub fn validate_hook(at: &str, hook: &Hook) -> Result<(), ValidationErrors> {
    let mut c = Checker::default();
    check_hook(&mut c, at, hook);
    if c.errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(c.errors))
    }
}
