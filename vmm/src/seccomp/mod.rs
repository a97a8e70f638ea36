//! seccomp: per-thread system call filters (built with `seccompiler`).
//!
//! Every VMM thread kind installs its own allow-list at its start ([`install`]); a call outside
//! the list raises SIGSYS, whose handler names the thread and the call on stderr and exits with
//! [`DENIED_EXIT_CODE`]. Filters are inherited: a thread that starts other threads keeps its own
//! filter and adds the child's, so a parent's list covers what its children need (vCPU threads
//! activate virtio devices and so start the device workers). `--no-seccomp` (or `"seccomp":
//! false` in the config) turns the filters off with a warning, for debugging.

mod api;
mod common;
mod helper;
mod main_thread;
mod rules;
mod sigsys;
mod vcpu;
mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

pub use sigsys::DENIED_EXIT_CODE;

/// The kinds of VMM threads, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: KVM_RUN, device emulation, device activation (starts workers).
    Vcpu,
    /// A virtio device worker (balloon, block, vsock): queues, disk I/O, vsock sockets.
    Worker,
    /// The API server's accept and connection threads.
    Api,
    /// The main thread once the VM runs: event loop, snapshots, dirty log, lazy restore.
    Main,
    /// Small helper threads: termination signals, stdin to the console.
    Helper,
}

impl ThreadKind {
    /// Every kind, for tests and listings.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::Worker,
        ThreadKind::Api,
        ThreadKind::Main,
        ThreadKind::Helper,
    ];

    /// The kind's name in logs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Worker => "device worker",
            ThreadKind::Api => "api",
            ThreadKind::Main => "main",
            ThreadKind::Helper => "helper",
        }
    }

    /// The kind's rules: the calls every thread makes plus the kind's own.
    fn rules(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        let mut set = rules::RuleSet::default();
        common::add(&mut set);
        match self {
            ThreadKind::Vcpu => {
                vcpu::add(&mut set);
                // vCPU threads start the device workers, which inherit this filter.
                common::add_thread_spawn(&mut set);
                worker::add(&mut set);
            }
            ThreadKind::Worker => worker::add(&mut set),
            ThreadKind::Api => {
                api::add(&mut set);
                // The accept thread starts one thread per connection.
                common::add_thread_spawn(&mut set);
            }
            ThreadKind::Main => {
                main_thread::add(&mut set);
                common::add_thread_spawn(&mut set);
                vcpu::add(&mut set);
                worker::add(&mut set);
                api::add(&mut set);
            }
            ThreadKind::Helper => helper::add(&mut set),
        }
        set.into_map()
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules do not form a valid filter.
    #[error("cannot build the seccomp filter for {kind} threads")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The filter does not compile to BPF.
    #[error("cannot compile the seccomp filter for {kind} threads")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter for {kind} threads")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler cannot be installed.
    #[error("cannot install the SIGSYS handler that reports refused system calls")]
    Handler(#[source] std::io::Error),
}

/// glibc reads `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's heap and
/// caches the answer; that can happen on any thread, device workers included, whose filters
/// rightly refuse `openat`. Shrinking one thread heap before any filter makes glibc read it
/// first. The warm-up thread runs while the VMM loads its snapshot; the first thread to install
/// a filter waits for it (joining it took 17-31 ms of a restore in the nested rig).
fn start_thread_heap_shrink_warm_up() {
    let warm_up = std::thread::Builder::new()
        .name("seccomp-warm-up".into())
        .spawn(|| {
            // Blocks under glibc's mmap threshold (128 KiB) come from this thread's own arena;
            // freeing them leaves a top chunk past the trim threshold, which glibc shrinks.
            // The blocks are never written: only malloc's headers touch memory, so the warm-up
            // costs a few page faults, not 1,600 (which showed in restore times under TCG).
            let blocks: Vec<Vec<u8>> = (0..8).map(|_| Vec::with_capacity(100 * 1024)).collect();
            drop(std::hint::black_box(blocks));
        });
    match warm_up {
        Ok(handle) => *lock_warm_up() = Some(handle),
        Err(_) => tracing::warn!("cannot run the heap warm-up thread: a filtered thread may later be refused openat(/proc/sys/vm/overcommit_memory)"),
    }
}

/// The warm-up thread until the first filter's installer has waited for it.
static WARM_UP: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);

fn lock_warm_up() -> std::sync::MutexGuard<'static, Option<std::thread::JoinHandle<()>>> {
    WARM_UP.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits for the warm-up thread if it is still owed a wait. The lock is held while waiting, so
/// every installer returns only once the warm-up is over.
fn finish_thread_heap_shrink_warm_up() {
    let mut warm_up = lock_warm_up();
    if let Some(handle) = warm_up.take() {
        if handle.join().is_err() {
            tracing::warn!("the heap warm-up thread panicked: a filtered thread may later be refused openat(/proc/sys/vm/overcommit_memory)");
        }
    }
}

/// glibc sizes its limit on malloc arenas lazily, when a thread's first allocation needs a new
/// arena and eight exist, by reading `/sys/devices/system/cpu/online` (Debian's 2.36 carries
/// the upstream change to `__get_nprocs` there): from whichever thread that is, whose filter
/// rightly refuses `openat` (seen in the benchmark suite on a snapshot's helper thread). Setting
/// the limit now, to glibc's own default of 8 per CPU, means glibc never reads that file.
fn fix_malloc_arena_limit() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit = i32::try_from(8 * cpus).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets a malloc parameter; M_ARENA_MAX takes any positive count.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, limit) } != 1 {
        tracing::warn!(limit, "mallopt(M_ARENA_MAX) failed: a filtered thread may be refused openat when glibc sizes its arena limit");
    }
}

/// Whether threads install filters; set once by `vmm run` / `vmm restore`.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns filtering on (`true`) or off for the threads started from now on. Off logs a warning.
pub fn set_enabled(enabled: bool) -> Result<(), SeccompError> {
    if enabled {
        sigsys::install_handler().map_err(SeccompError::Handler)?;
        fix_malloc_arena_limit();
        start_thread_heap_shrink_warm_up();
        // Device crates cannot depend on the VMM: they call this hook when a worker starts.
        virtio_device::set_worker_thread_hook(install_worker_filter);
    } else {
        tracing::warn!("seccomp is OFF (--no-seccomp): every VMM thread may make any system call; use this for debugging only");
    }
    ENABLED.store(enabled, Ordering::SeqCst);
    Ok(())
}

/// Whether filtering is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Compiles the filter of `kind` to BPF (denied calls trap into the SIGSYS handler).
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        kind.rules(),
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build {
        kind: kind.name(),
        source,
    })?;
    filter.try_into().map_err(|source| SeccompError::Compile {
        kind: kind.name(),
        source,
    })
}

/// Each kind's filter, compiled by the first thread of that kind (20-75 us each on a host CPU;
/// a restore starts two vCPUs, three device workers and several helpers).
static COMPILED: [OnceLock<BpfProgram>; ThreadKind::ALL.len()] =
    [const { OnceLock::new() }; ThreadKind::ALL.len()];

/// The filter of `kind`, compiled once per process.
fn compiled(kind: ThreadKind) -> Result<&'static BpfProgram, SeccompError> {
    let slot = &COMPILED[kind as usize];
    if let Some(program) = slot.get() {
        return Ok(program);
    }
    let program = compile(kind)?;
    Ok(slot.get_or_init(|| program))
}

/// Installs the filter of `kind` on the calling thread, if filtering is on.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    finish_thread_heap_shrink_warm_up();
    apply(kind, compiled(kind)?)?;
    tracing::debug!(kind = kind.name(), "seccomp filter installed");
    Ok(())
}

/// Installs a compiled filter on the calling thread (no allocation: usable after fork).
pub fn apply(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    sigsys::set_thread_kind(kind);
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })
}

/// Installs `kind`'s filter where a failure cannot be returned: logs it and exits, since a
/// thread running without its filter would defeat the point.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(err) = install(kind) {
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        tracing::error!(error = %message, "seccomp");
        std::process::exit(DENIED_EXIT_CODE);
    }
}

/// Names the calling thread's kind in refusal messages, for threads that inherit their
/// creator's filter instead of installing one (API connection threads).
pub fn label_thread(kind: ThreadKind) {
    sigsys::set_thread_kind(kind);
}

fn install_worker_filter() {
    install_or_exit(ThreadKind::Worker);
}

#[cfg(test)]
mod tests;
