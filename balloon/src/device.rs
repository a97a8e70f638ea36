//! The virtio-balloon device (virtio 1.2 §5.5), independent of the transport.
//!
//! [`Balloon`] implements [`VirtioDevice`]: the transport negotiates features, reads and writes
//! the configuration space and hands over the queues at `DRIVER_OK` ([`VirtioDevice::activate`]),
//! which starts one worker thread (see `worker.rs`). The host controls the device through a
//! [`BalloonHandle`] (target size, statistics, free page hinting, status), which stays valid
//! across resets and can be cloned into the API server.
//!
//! Configuration space (all fields little-endian, 16 bytes):
//!
//! | offset | field                   | written by |
//! |--------|-------------------------|------------|
//! | 0      | `num_pages`             | host: balloon target in 4 KiB pages |
//! | 4      | `actual`                | guest: pages currently in the balloon |
//! | 8      | `free_page_hint_cmd_id` | host: see [`crate::queues::hint`] |
//! | 12     | `poison_val`            | guest (only meaningful with `PAGE_POISON`, not offered) |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_device::{ActivateContext, ActivateError, Interrupt, QueueT, VirtioDevice};
use virtio_queue::QueueState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use virtio_device::VIRTIO_F_VERSION_1;

use crate::config::{BalloonConfig, BalloonConfigError, MAX_STATS_POLLING_INTERVAL_S};
use crate::page_state::{GuestRamRegion, PageStateCounts, PageStateMap, PAGE_SIZE_BYTES};
use crate::queues::hint::{HintState, HintingOptions, HintingStatus};
use crate::queues::stats::{BalloonStats, StatsSnapshot};
use crate::queues::{queue_layout, QUEUE_SIZE};
use crate::release::RamReleaser;
use crate::worker::{self, ActiveQueue, ActiveQueues, WorkerHandle};

/// The host must be told before pages are deflated (not offered).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u64 = 1 << 0;
/// The statistics queue exists.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// The guest deflates the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Free page hinting: free_page_vq and `free_page_hint_cmd_id` exist.
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u64 = 1 << 3;
/// The guest fills free pages with `poison_val` (not offered).
pub const VIRTIO_BALLOON_F_PAGE_POISON: u64 = 1 << 4;
/// Free page reporting: reporting_vq exists.
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;

/// The virtio device ID of the balloon.
pub const BALLOON_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;

/// Size of the configuration space in bytes.
pub const CONFIG_SPACE_BYTES: usize = 16;

/// 4 KiB pages per MiB.
const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE_BYTES;

/// Locks `mutex`, recovering the data if a thread panicked while holding it (the state stays
/// usable; a panic is a bug that was already reported).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The features offered for `config`.
pub fn avail_features(config: &BalloonConfig) -> u64 {
    let mut features = VIRTIO_F_VERSION_1;
    if config.stats_enabled() {
        features |= VIRTIO_BALLOON_F_STATS_VQ;
    }
    if config.deflate_on_oom {
        features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
    }
    if config.free_page_hinting {
        features |= VIRTIO_BALLOON_F_FREE_PAGE_HINT;
    }
    if config.free_page_reporting {
        features |= VIRTIO_BALLOON_F_REPORTING;
    }
    features
}

/// Errors of the host-side balloon operations. Each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The configuration does not fit the guest.
    #[error("create balloon device: invalid configuration")]
    InvalidConfig(#[source] BalloonConfigError),
    /// The device's control event could not be created.
    #[error("create balloon device: cannot create the control eventfd")]
    EventFd(#[source] std::io::Error),
    /// The requested target is larger than guest RAM.
    #[error("set balloon target to {target_mib} MiB: larger than guest RAM ({guest_ram_mib} MiB)")]
    TargetTooLarge {
        /// Requested target.
        target_mib: u32,
        /// Guest RAM size.
        guest_ram_mib: u64,
    },
    /// The statistics queue was not configured, so statistics cannot be enabled later.
    #[error("{operation}: statistics are disabled in the balloon configuration")]
    StatsNotEnabled {
        /// What was asked.
        operation: &'static str,
    },
    /// A polling interval outside 1..=[`MAX_STATS_POLLING_INTERVAL_S`].
    #[error("{operation}: interval must be between 1 and {max_s} s, got {interval_s}")]
    InvalidStatsPollingInterval {
        /// What was asked.
        operation: &'static str,
        /// Requested interval.
        interval_s: u16,
        /// [`MAX_STATS_POLLING_INTERVAL_S`].
        max_s: u16,
    },
    /// Free page hinting is disabled in the configuration.
    #[error("{operation}: free page hinting is disabled in the balloon configuration")]
    HintingNotEnabled {
        /// What was asked.
        operation: &'static str,
    },
    /// The guest driver has not activated the device yet.
    #[error("{operation}: the guest's balloon driver is not running")]
    NotActivated {
        /// What was asked.
        operation: &'static str,
    },
    /// The guest driver did not accept free page hinting.
    #[error("{operation}: the guest driver did not accept free page hinting")]
    HintingNotNegotiated {
        /// What was asked.
        operation: &'static str,
    },
    /// Interrupting the guest failed (the change is recorded; the guest sees it at its next
    /// configuration read).
    #[error("{operation}: cannot signal the configuration change to the guest")]
    Interrupt {
        /// What was asked.
        operation: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Waking the worker failed.
    #[error("{operation}: cannot wake the balloon worker")]
    WakeWorker {
        /// What was asked.
        operation: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Cumulative device counters (since creation, kept across snapshots).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonCounters {
    /// Pages the guest inflated (counted again when inflated again).
    pub pages_inflated: u64,
    /// Pages the guest deflated.
    pub pages_deflated: u64,
    /// Pages the guest reported free.
    pub pages_reported: u64,
    /// Pages the guest hinted free during runs.
    pub pages_hinted: u64,
    /// Bytes released on the host (inflated and reported pages).
    pub bytes_released: u64,
    /// Failed release calls.
    pub release_errors: u64,
    /// Pages in guest buffers that are not guest RAM, ignored.
    pub pages_outside_ram: u64,
    /// Malformed descriptor chains skipped.
    pub invalid_buffers: u64,
    /// Hint buffers ignored because no run accepted them.
    pub hints_ignored: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// Live counters; see [`BalloonCounters`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) pages_inflated: AtomicU64,
    pub(crate) pages_deflated: AtomicU64,
    pub(crate) pages_reported: AtomicU64,
    pub(crate) pages_hinted: AtomicU64,
    pub(crate) bytes_released: AtomicU64,
    pub(crate) release_errors: AtomicU64,
    pub(crate) pages_outside_ram: AtomicU64,
    pub(crate) invalid_buffers: AtomicU64,
    pub(crate) hints_ignored: AtomicU64,
    pub(crate) stats_updates: AtomicU64,
}

impl Counters {
    /// Adds `n` to `counter`.
    pub(crate) fn add(&self, counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The current values.
    pub(crate) fn snapshot(&self) -> BalloonCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BalloonCounters {
            pages_inflated: get(&self.pages_inflated),
            pages_deflated: get(&self.pages_deflated),
            pages_reported: get(&self.pages_reported),
            pages_hinted: get(&self.pages_hinted),
            bytes_released: get(&self.bytes_released),
            release_errors: get(&self.release_errors),
            pages_outside_ram: get(&self.pages_outside_ram),
            invalid_buffers: get(&self.invalid_buffers),
            hints_ignored: get(&self.hints_ignored),
            stats_updates: get(&self.stats_updates),
        }
    }

    /// Counters starting from saved values.
    pub(crate) fn from_snapshot(c: &BalloonCounters) -> Self {
        Counters {
            pages_inflated: AtomicU64::new(c.pages_inflated),
            pages_deflated: AtomicU64::new(c.pages_deflated),
            pages_reported: AtomicU64::new(c.pages_reported),
            pages_hinted: AtomicU64::new(c.pages_hinted),
            bytes_released: AtomicU64::new(c.bytes_released),
            release_errors: AtomicU64::new(c.release_errors),
            pages_outside_ram: AtomicU64::new(c.pages_outside_ram),
            invalid_buffers: AtomicU64::new(c.invalid_buffers),
            hints_ignored: AtomicU64::new(c.hints_ignored),
            stats_updates: AtomicU64::new(c.stats_updates),
        }
    }
}

/// The device's mutable state, under one lock.
#[derive(Debug)]
pub(crate) struct DeviceState {
    /// Features the driver accepted.
    pub(crate) acked_features: u64,
    /// Whether the worker runs (between `activate` and `reset`).
    pub(crate) activated: bool,
    /// `num_pages`: the balloon target.
    pub(crate) num_pages: u32,
    /// `actual`: what the guest says the balloon holds.
    pub(crate) actual_pages: u32,
    /// `poison_val`.
    pub(crate) poison_val: u32,
    /// Current statistics polling interval (0: no statistics queue).
    pub(crate) stats_polling_interval_s: u16,
    /// Latest statistics.
    pub(crate) stats: Option<StatsSnapshot>,
    /// Free page hinting.
    pub(crate) hint: HintState,
}

impl DeviceState {
    /// The configuration space.
    fn config_bytes(&self) -> [u8; CONFIG_SPACE_BYTES] {
        let mut bytes = [0u8; CONFIG_SPACE_BYTES];
        bytes[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.hint.cmd_id.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.poison_val.to_le_bytes());
        bytes
    }
}

/// What the device, its handles and its worker share.
pub(crate) struct Shared {
    /// The configuration the device was created with.
    pub(crate) config: BalloonConfig,
    /// Guest RAM layout (of the page-state map), sorted by address.
    pub(crate) ram_layout: Vec<GuestRamRegion>,
    /// Guest RAM size in pages.
    pub(crate) guest_ram_pages: u64,
    /// The page-state map shared with the VMM.
    pub(crate) page_states: Arc<Mutex<PageStateMap>>,
    /// Releases guest RAM on the host.
    pub(crate) releaser: Arc<dyn RamReleaser>,
    /// Applies guest writes to the map before pages are marked free, once the VMM sets it.
    pub(crate) write_tracker: Mutex<Option<Arc<dyn crate::WriteTracker>>>,
    /// Mutable state.
    pub(crate) state: Mutex<DeviceState>,
    /// Counters.
    pub(crate) counters: Counters,
    /// The guest's interrupt, while activated.
    pub(crate) interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    /// Wakes the worker (stop, new polling interval).
    pub(crate) control_evt: EventFd,
}

impl Shared {
    /// Signals a configuration change if the device is active.
    fn signal_config_change(&self, operation: &'static str) -> Result<(), BalloonError> {
        let interrupt = lock(&self.interrupt).clone();
        match interrupt {
            Some(interrupt) => interrupt
                .signal_config_change()
                .map_err(|source| BalloonError::Interrupt { operation, source }),
            None => Ok(()),
        }
    }
}

/// Host view of the balloon (the `GET /balloon` body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatus {
    /// Balloon target (`num_pages`), in MiB (rounded down).
    pub target_mib: u32,
    /// Balloon target in 4 KiB pages.
    pub target_pages: u32,
    /// What the guest says the balloon holds (`actual`), in MiB (rounded down).
    pub actual_mib: u32,
    /// What the guest says the balloon holds, in 4 KiB pages.
    pub actual_pages: u32,
    /// Guest RAM size in MiB.
    pub guest_ram_mib: u64,
    /// Whether the guest driver runs the device.
    pub activated: bool,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the guest deflates on OOM (negotiated).
    pub deflate_on_oom: bool,
    /// Statistics polling interval in seconds (0: no statistics).
    pub stats_polling_interval_s: u16,
    /// Whether free page reporting is negotiated.
    pub free_page_reporting: bool,
    /// Whether free page hinting is negotiated.
    pub free_page_hinting: bool,
    /// Cumulative counters.
    pub counters: BalloonCounters,
    /// Pages per state in the page-state map now.
    pub page_states: PageStateCounts,
}

/// Host-side control of a balloon device; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandle").finish_non_exhaustive()
    }
}

impl BalloonHandle {
    /// Makes the device apply `tracker`'s record of guest writes to the page-state map right
    /// before it marks pages free (see [`crate::WriteTracker`]).
    pub fn set_write_tracker(&self, tracker: Arc<dyn crate::WriteTracker>) {
        *lock(&self.shared.write_tracker) = Some(tracker);
    }

    /// Sets the balloon target to `target_mib` MiB (the size the guest is asked to give up)
    /// and tells the guest. Fails if the target is larger than guest RAM. Before the driver
    /// runs, the target is just recorded; the driver reads it when it starts.
    pub fn set_target_mib(&self, target_mib: u32) -> Result<(), BalloonError> {
        let pages = u64::from(target_mib) * PAGES_PER_MIB;
        if pages > self.shared.guest_ram_pages {
            return Err(BalloonError::TargetTooLarge {
                target_mib,
                guest_ram_mib: self.shared.guest_ram_pages / PAGES_PER_MIB,
            });
        }
        // `pages` <= guest RAM pages <= 2^28 (MAX_GUEST_RAM_BYTES), so it fits.
        lock(&self.shared.state).num_pages = pages as u32;
        self.shared.signal_config_change("set balloon target")
    }

    /// The balloon's target, actual size, negotiated features and counters. Takes the
    /// page-state map's lock (to count pages per state): do not call it while holding it.
    pub fn status(&self) -> BalloonStatus {
        let page_states = lock(&self.shared.page_states).count_by_state();
        let state = lock(&self.shared.state);
        let acked = state.acked_features;
        BalloonStatus {
            target_mib: (u64::from(state.num_pages) / PAGES_PER_MIB) as u32,
            target_pages: state.num_pages,
            actual_mib: (u64::from(state.actual_pages) / PAGES_PER_MIB) as u32,
            actual_pages: state.actual_pages,
            guest_ram_mib: self.shared.guest_ram_pages / PAGES_PER_MIB,
            activated: state.activated,
            acked_features: acked,
            deflate_on_oom: acked & VIRTIO_BALLOON_F_DEFLATE_ON_OOM != 0,
            stats_polling_interval_s: state.stats_polling_interval_s,
            free_page_reporting: acked & VIRTIO_BALLOON_F_REPORTING != 0,
            free_page_hinting: acked & VIRTIO_BALLOON_F_FREE_PAGE_HINT != 0,
            counters: self.shared.counters.snapshot(),
            page_states,
        }
    }

    /// The guest's latest memory statistics, or `None` before the first statistics buffer
    /// (or when statistics are disabled).
    pub fn statistics(&self) -> Option<BalloonStats> {
        lock(&self.shared.state)
            .stats
            .as_ref()
            .map(StatsSnapshot::to_stats)
    }

    /// Changes the statistics polling interval. Statistics must have been enabled in the
    /// configuration (the queue cannot appear later) and the interval cannot be 0.
    pub fn set_stats_polling_interval_s(&self, interval_s: u16) -> Result<(), BalloonError> {
        const OPERATION: &str = "set statistics polling interval";
        if !self.shared.config.stats_enabled() {
            return Err(BalloonError::StatsNotEnabled {
                operation: OPERATION,
            });
        }
        if interval_s == 0 || interval_s > MAX_STATS_POLLING_INTERVAL_S {
            return Err(BalloonError::InvalidStatsPollingInterval {
                operation: OPERATION,
                interval_s,
                max_s: MAX_STATS_POLLING_INTERVAL_S,
            });
        }
        lock(&self.shared.state).stats_polling_interval_s = interval_s;
        self.shared
            .control_evt
            .write(1)
            .map_err(|source| BalloonError::WakeWorker {
                operation: OPERATION,
                source,
            })
    }

    /// Starts a free page hinting run with default options (the device answers the guest's
    /// STOP with DONE); returns its command id.
    pub fn start_hinting(&self) -> Result<u32, BalloonError> {
        self.start_hinting_with(HintingOptions::default())
    }

    /// Starts a free page hinting run; returns its command id (>= 2). A run in progress is
    /// replaced (the guest ends it and starts the new one).
    pub fn start_hinting_with(&self, options: HintingOptions) -> Result<u32, BalloonError> {
        const OPERATION: &str = "start free page hinting";
        let id = {
            let mut state = lock(&self.shared.state);
            self.check_hinting(&state, OPERATION)?;
            state.hint.start(options)
        };
        tracing::info!(cmd_id = id, "balloon: free page hinting requested");
        self.shared.signal_config_change(OPERATION)?;
        Ok(id)
    }

    /// Ends the current hinting run (command id STOP). The guest stops hinting but keeps the
    /// hinted pages allocated until [`BalloonHandle::finish_hinting`].
    pub fn stop_hinting(&self) -> Result<(), BalloonError> {
        const OPERATION: &str = "stop free page hinting";
        {
            let mut state = lock(&self.shared.state);
            self.check_hinting(&state, OPERATION)?;
            state.hint.stop();
        }
        self.shared.signal_config_change(OPERATION)
    }

    /// Tells the guest the host is done with the hints (command id DONE): the guest frees
    /// the hinted pages, which stay hinted in the page-state map until written.
    pub fn finish_hinting(&self) -> Result<(), BalloonError> {
        const OPERATION: &str = "finish free page hinting";
        {
            let mut state = lock(&self.shared.state);
            self.check_hinting(&state, OPERATION)?;
            state.hint.finish();
        }
        self.shared.signal_config_change(OPERATION)
    }

    /// Where free page hinting is.
    pub fn hinting_status(&self) -> HintingStatus {
        let total = self.shared.counters.snapshot().pages_hinted;
        lock(&self.shared.state).hint.status(total)
    }

    /// The page-state map this device updates (the one given at creation).
    pub fn page_states(&self) -> Arc<Mutex<PageStateMap>> {
        self.shared.page_states.clone()
    }

    fn check_hinting(
        &self,
        state: &DeviceState,
        operation: &'static str,
    ) -> Result<(), BalloonError> {
        if !self.shared.config.free_page_hinting {
            return Err(BalloonError::HintingNotEnabled { operation });
        }
        if !state.activated {
            return Err(BalloonError::NotActivated { operation });
        }
        if state.acked_features & VIRTIO_BALLOON_F_FREE_PAGE_HINT == 0 {
            return Err(BalloonError::HintingNotNegotiated { operation });
        }
        Ok(())
    }
}

/// Queue positions saved in a snapshot, applied at the next activation.
#[derive(Debug, Clone)]
pub(crate) struct RestoredQueues {
    /// One per queue of the negotiated layout.
    pub(crate) queues: Vec<QueueState>,
    /// The statistics buffer the device held.
    pub(crate) stats_desc: Option<u16>,
}

/// The virtio-balloon device.
pub struct Balloon {
    pub(crate) shared: Arc<Shared>,
    pub(crate) avail_features: u64,
    queue_sizes: Vec<u16>,
    worker: Option<WorkerHandle>,
    pub(crate) active: Option<Arc<Mutex<ActiveQueues>>>,
    pub(crate) restored: Option<RestoredQueues>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("avail_features", &self.avail_features)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl Balloon {
    /// Creates a balloon for the guest whose RAM `page_states` describes. The device records
    /// what the guest gives up in that map and releases inflated and reported pages through
    /// `releaser`. Fails if `config` does not fit the guest.
    pub fn new(
        config: BalloonConfig,
        page_states: Arc<Mutex<PageStateMap>>,
        releaser: Arc<dyn RamReleaser>,
    ) -> Result<Self, BalloonError> {
        let num_pages = u64::from(config.amount_mib) * PAGES_PER_MIB;
        let stats_polling_interval_s = config.stats_polling_interval_s;
        let state = DeviceState {
            acked_features: 0,
            activated: false,
            num_pages: u32::try_from(num_pages).unwrap_or(u32::MAX),
            actual_pages: 0,
            poison_val: 0,
            stats_polling_interval_s,
            stats: None,
            hint: HintState::default(),
        };
        Self::build(config, page_states, releaser, state, Counters::default())
    }

    /// Creates the device around `state` after checking `config` against the guest.
    pub(crate) fn build(
        config: BalloonConfig,
        page_states: Arc<Mutex<PageStateMap>>,
        releaser: Arc<dyn RamReleaser>,
        state: DeviceState,
        counters: Counters,
    ) -> Result<Self, BalloonError> {
        let (ram_layout, guest_ram_pages) = {
            let map = lock(&page_states);
            (map.layout(), map.nr_pages())
        };
        config
            .validate(guest_ram_pages / PAGES_PER_MIB)
            .map_err(BalloonError::InvalidConfig)?;
        let control_evt = EventFd::new(EFD_NONBLOCK).map_err(BalloonError::EventFd)?;
        let avail_features = avail_features(&config);
        let queue_sizes = vec![QUEUE_SIZE; queue_layout(avail_features).len()];
        let shared = Arc::new(Shared {
            config,
            ram_layout,
            guest_ram_pages,
            page_states,
            releaser,
            state: Mutex::new(state),
            counters,
            interrupt: Mutex::new(None),
            write_tracker: Mutex::new(None),
            control_evt,
        });
        Ok(Balloon {
            shared,
            avail_features,
            queue_sizes,
            worker: None,
            active: None,
            restored: None,
        })
    }

    /// A handle for host-side control.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &BalloonConfig {
        &self.shared.config
    }

    /// Whether the worker runs.
    pub fn is_activated(&self) -> bool {
        self.worker.is_some()
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        lock(&self.shared.state).acked_features
    }

    /// Stops the worker, if any, and forgets the queues.
    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        self.active = None;
        *lock(&self.shared.interrupt) = None;
    }

    /// Builds the active queues from the activation context.
    fn take_queues(&mut self, ctx: ActivateContext) -> Result<ActivateParts, ActivateError> {
        let acked = lock(&self.shared.state).acked_features;
        let layout = queue_layout(acked);
        if ctx.queues.len() < layout.len() || ctx.queue_events.len() < layout.len() {
            return Err(ActivateError::BadQueues(format!(
                "{} queues and {} queue events given, the negotiated features need {}",
                ctx.queues.len(),
                ctx.queue_events.len(),
                layout.len()
            )));
        }
        if let Some(restored) = &self.restored {
            if restored.queues.len() != layout.len() {
                return Err(ActivateError::BadQueues(format!(
                    "{} queues saved in the snapshot, the negotiated features need {}",
                    restored.queues.len(),
                    layout.len()
                )));
            }
        }
        let mut queues = Vec::with_capacity(layout.len());
        for (i, (kind, mut queue)) in layout.iter().zip(ctx.queues).enumerate() {
            let name = kind.name();
            if !queue.ready() {
                return Err(ActivateError::BadQueues(format!(
                    "queue {i} ({name}) is not ready"
                )));
            }
            if !queue.is_valid(&ctx.mem) {
                return Err(ActivateError::BadQueues(format!(
                    "queue {i} ({name}) does not fit in guest memory"
                )));
            }
            if let Some(restored) = &self.restored {
                let saved = &restored.queues[i];
                let current = queue.state();
                let same_rings = saved.size == current.size
                    && saved.desc_table == current.desc_table
                    && saved.avail_ring == current.avail_ring
                    && saved.used_ring == current.used_ring;
                if !same_rings {
                    return Err(ActivateError::BadQueues(format!(
                        "queue {i} ({name}) differs from the one saved in the snapshot"
                    )));
                }
                queue.set_next_avail(saved.next_avail);
                queue.set_next_used(saved.next_used);
            }
            queues.push(ActiveQueue {
                kind: *kind,
                index: i as u16,
                queue,
            });
        }
        let stats_desc = self.restored.as_ref().and_then(|r| r.stats_desc);
        let queue_events = ctx.queue_events.into_iter().take(layout.len()).collect();
        Ok(ActivateParts {
            active: ActiveQueues {
                mem: ctx.mem,
                queues,
                stats_desc,
            },
            queue_events,
            interrupt: ctx.interrupt,
        })
    }
}

/// What `activate` hands the worker.
struct ActivateParts {
    active: ActiveQueues,
    queue_events: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        BALLOON_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        if self.worker.is_some() {
            tracing::warn!(features, "balloon: feature change after activation ignored");
            return;
        }
        let unknown = features & !self.avail_features;
        if unknown != 0 {
            tracing::warn!(
                unknown,
                "balloon: driver accepted features not offered; ignored"
            );
        }
        lock(&self.shared.state).acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = lock(&self.shared.state).config_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| bytes.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut state = lock(&self.shared.state);
        let mut bytes = state.config_bytes();
        let mut ignored = false;
        for (i, value) in data.iter().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok());
            match at {
                // `actual` and `poison_val` are the driver's fields.
                Some(at @ (4..=7 | 12..=15)) => bytes[at] = *value,
                _ => ignored = true,
            }
        }
        if ignored {
            tracing::debug!(
                offset,
                len = data.len(),
                "balloon: write to read-only configuration bytes ignored"
            );
        }
        state.actual_pages = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        state.poison_val = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::BadQueues(
                "the device is already active".into(),
            ));
        }
        let parts = self.take_queues(ctx)?;
        let active = Arc::new(Mutex::new(parts.active));
        let worker = worker::spawn(
            self.shared.clone(),
            active.clone(),
            parts.queue_events,
            parts.interrupt.clone(),
        )
        .map_err(ActivateError::Worker)?;
        *lock(&self.shared.interrupt) = Some(parts.interrupt);
        lock(&self.shared.state).activated = true;
        self.worker = Some(worker);
        self.active = Some(active);
        self.restored = None;
        Ok(())
    }

    fn worker(&self) -> Option<&virtio_device::WorkerHandle> {
        self.worker.as_ref()
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.restored = None;
        let mut state = lock(&self.shared.state);
        state.activated = false;
        state.acked_features = 0;
        state.actual_pages = 0;
        state.poison_val = 0;
        state.hint = HintState {
            next_cmd_id: state.hint.next_cmd_id,
            ..HintState::default()
        };
        true
    }
}

impl Drop for Balloon {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;
    use crate::PageState;
    use virtio_queue::Queue;

    const ALL_FEATURES: u64 = VIRTIO_F_VERSION_1
        | VIRTIO_BALLOON_F_STATS_VQ
        | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        | VIRTIO_BALLOON_F_FREE_PAGE_HINT
        | VIRTIO_BALLOON_F_REPORTING;

    fn minimal_config() -> BalloonConfig {
        BalloonConfig {
            amount_mib: 0,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_reporting: false,
            free_page_hinting: false,
        }
    }

    fn read(balloon: &Balloon, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xaa; len];
        balloon.read_config(offset, &mut data);
        data
    }

    #[test]
    fn offered_features_and_queues_follow_the_config() {
        let env = Env::new(full_config());
        assert_eq!(env.balloon.device_type(), 5);
        assert_eq!(env.balloon.avail_features(), ALL_FEATURES);
        assert_eq!(env.balloon.queue_max_sizes(), &[256; 5]);

        let env = Env::new(minimal_config());
        assert_eq!(env.balloon.avail_features(), VIRTIO_F_VERSION_1);
        assert_eq!(env.balloon.queue_max_sizes(), &[256; 2]);

        let env = Env::new(BalloonConfig {
            free_page_reporting: true,
            deflate_on_oom: true,
            ..minimal_config()
        });
        assert_eq!(
            env.balloon.avail_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_DEFLATE_ON_OOM | VIRTIO_BALLOON_F_REPORTING
        );
        assert_eq!(env.balloon.queue_max_sizes().len(), 3);
    }

    #[test]
    fn acked_features_are_masked_to_the_offer() {
        let mut env = Env::new(BalloonConfig {
            free_page_reporting: true,
            ..minimal_config()
        });
        env.ack(u64::MAX);
        assert_eq!(
            env.balloon.acked_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING
        );
    }

    #[test]
    fn config_space_at_any_offset_and_width() {
        let mut env = Env::new(BalloonConfig {
            amount_mib: 2,
            ..full_config()
        });
        // num_pages = 512 = 0x200.
        assert_eq!(read(&env.balloon, 0, 4), [0x00, 0x02, 0, 0]);
        assert_eq!(read(&env.balloon, 1, 1), [0x02]);
        assert_eq!(read(&env.balloon, 0, 16), {
            let mut b = vec![0; 16];
            b[1] = 2;
            b
        });
        // Partly and wholly out of range reads are zero-filled.
        assert_eq!(read(&env.balloon, 14, 4), [0, 0, 0, 0]);
        assert_eq!(read(&env.balloon, 16, 8), [0; 8]);
        assert_eq!(read(&env.balloon, u64::MAX, 8), [0; 8]);
        assert_eq!(read(&env.balloon, u64::MAX - 2, 300).len(), 300);
        assert!(read(&env.balloon, 0, 0).is_empty());

        // `actual` written byte by byte at odd offsets.
        env.balloon.write_config(5, &[0x01]);
        env.balloon.write_config(4, &[0x10]);
        assert_eq!(env.balloon.handle().status().actual_pages, 0x110);
        // A write across num_pages and actual only changes actual.
        env.balloon.write_config(2, &[0xff, 0xff, 0x34, 0x12]);
        assert_eq!(
            read(&env.balloon, 0, 8),
            [0x00, 0x02, 0, 0, 0x34, 0x12, 0, 0]
        );
        // The command id is read-only; poison_val is writable; past the end is ignored.
        env.balloon.write_config(8, &[9, 9, 9, 9, 1, 2, 3, 4, 5, 6]);
        assert_eq!(read(&env.balloon, 8, 8), [0, 0, 0, 0, 1, 2, 3, 4]);
        env.balloon.write_config(u64::MAX, &[1, 2, 3]);
        env.balloon.write_config(15, &[0xee, 0xff]);
        assert_eq!(read(&env.balloon, 12, 4), [1, 2, 3, 0xee]);
        let status = env.balloon.handle().status();
        assert_eq!(status.actual_pages, 0x1234);
        assert_eq!(status.target_pages, 512);
        assert_eq!(status.target_mib, 2);
    }

    #[test]
    fn target_is_bounded_by_guest_ram() {
        let env = Env::new(full_config());
        let handle = env.balloon.handle();
        handle.set_target_mib(16).unwrap();
        assert_eq!(read(&env.balloon, 0, 4), 4096u32.to_le_bytes());
        let err = handle.set_target_mib(17).unwrap_err();
        assert!(matches!(
            err,
            BalloonError::TargetTooLarge {
                target_mib: 17,
                guest_ram_mib: 16
            }
        ));
        assert_eq!(
            err.to_string(),
            "set balloon target to 17 MiB: larger than guest RAM (16 MiB)"
        );
        assert!(handle.set_target_mib(u32::MAX).is_err());
        assert_eq!(handle.status().target_mib, 16);
        // Not active: no interrupt.
        assert_eq!(env.interrupt.config_changes(), 0);

        // The configured amount is checked at creation too.
        let map = Arc::new(Mutex::new(PageStateMap::with_ram_size(MEM_BYTES).unwrap()));
        let config = BalloonConfig {
            amount_mib: 17,
            ..full_config()
        };
        let err = Balloon::new(config, map, Arc::new(FakeReleaser::default())).unwrap_err();
        assert!(matches!(err, BalloonError::InvalidConfig(_)), "{err}");
    }

    #[test]
    fn hinting_api_checks_config_activation_and_negotiation() {
        let env = Env::new(minimal_config());
        let err = env.balloon.handle().start_hinting().unwrap_err();
        assert!(
            matches!(err, BalloonError::HintingNotEnabled { .. }),
            "{err}"
        );

        let mut env = Env::new(full_config());
        let handle = env.balloon.handle();
        assert!(matches!(
            handle.start_hinting(),
            Err(BalloonError::NotActivated { .. })
        ));
        assert!(matches!(
            handle.stop_hinting(),
            Err(BalloonError::NotActivated { .. })
        ));
        // Active, but the driver did not take FREE_PAGE_HINT.
        env.ack(VIRTIO_F_VERSION_1);
        let queues = vec![
            DriverQueue::new(&env.mem, queue_base(0)).queue(),
            DriverQueue::new(&env.mem, queue_base(1)).queue(),
        ];
        let (ctx, _notifiers) = activate_ctx(&env, queues);
        env.balloon.activate(ctx).unwrap();
        let err = handle.start_hinting().unwrap_err();
        assert!(matches!(err, BalloonError::HintingNotNegotiated { .. }));
        assert_eq!(
            err.to_string(),
            "start free page hinting: the guest driver did not accept free page hinting"
        );
        assert!(env.balloon.reset());
    }

    #[test]
    fn stats_interval_changes() {
        let env = Env::new(minimal_config());
        assert!(matches!(
            env.balloon.handle().set_stats_polling_interval_s(5),
            Err(BalloonError::StatsNotEnabled { .. })
        ));
        let env = Env::new(full_config());
        let handle = env.balloon.handle();
        assert!(matches!(
            handle.set_stats_polling_interval_s(0),
            Err(BalloonError::InvalidStatsPollingInterval { .. })
        ));
        assert!(handle.set_stats_polling_interval_s(3601).is_err());
        handle.set_stats_polling_interval_s(7).unwrap();
        assert_eq!(handle.status().stats_polling_interval_s, 7);
    }

    #[test]
    fn worker_serves_queues_and_stops_on_reset() {
        let mut env = Env::new(full_config());
        env.ack(ALL_FEATURES);
        let handle = env.balloon.handle();
        let mut drivers: Vec<DriverQueue> = (0..5)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)))
            .collect();
        let queues = drivers.iter().map(|d| d.queue()).collect();
        let (ctx, notifiers) = activate_ctx(&env, queues);
        env.balloon.activate(ctx).unwrap();
        assert!(env.balloon.is_activated());
        assert!(handle.status().activated);

        // Inflate through the worker.
        let len = env.write_pfns(DATA_GPA, &[40, 41]);
        drivers[0].add_chain(&[(DATA_GPA, len, 0)]);
        notifiers[0].write(1).unwrap();
        assert!(wait_until(|| drivers[0].used_idx() == 1));
        assert_eq!(env.releaser.calls(), vec![(40 * 4096, 2 * 4096)]);
        assert!(wait_until(|| env.interrupt.used() == vec![0]));

        // Host control reaches the guest as configuration changes.
        handle.set_target_mib(4).unwrap();
        let id = handle.start_hinting().unwrap();
        assert_eq!(id, crate::FIRST_HINT_CMD_ID);
        assert_eq!(env.interrupt.config_changes(), 2);
        assert_eq!(read(&env.balloon, 8, 4), id.to_le_bytes());
        let status = handle.hinting_status();
        assert_eq!(status.cmd_id, id);
        assert!(!status.running);
        handle.stop_hinting().unwrap();
        assert_eq!(read(&env.balloon, 8, 4), [0; 4]);
        handle.finish_hinting().unwrap();
        assert_eq!(read(&env.balloon, 8, 4), 1u32.to_le_bytes());

        // Reset stops the worker: notifications are no longer served.
        assert!(env.balloon.reset());
        assert!(!env.balloon.is_activated());
        assert!(!handle.status().activated);
        assert_eq!(env.balloon.acked_features(), 0);
        assert_eq!(read(&env.balloon, 8, 4), [0; 4]);
        drivers[0].add_chain(&[(DATA_GPA, len, 0)]);
        notifiers[0].write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(drivers[0].used_idx(), 1);

        // The driver starts again on fresh rings.
        env.ack(ALL_FEATURES);
        let mut drivers: Vec<DriverQueue> = (0..5)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i) + 0x20_0000))
            .collect();
        let queues = drivers.iter().map(|d| d.queue()).collect();
        let (ctx, notifiers) = activate_ctx(&env, queues);
        env.balloon.activate(ctx).unwrap();
        let len = env.write_pfns(DATA_GPA, &[50]);
        drivers[1].add_chain(&[(DATA_GPA, len, 0)]);
        notifiers[1].write(1).unwrap();
        assert!(wait_until(|| drivers[1].used_idx() == 1));
        // Drop stops the worker too.
        drop(env);
    }

    #[test]
    fn queue_indices_follow_the_negotiated_features() {
        // Everything offered, but the driver takes REPORTING only: reporting_vq is queue 2.
        let mut env = Env::new(full_config());
        env.ack(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING);
        let mut drivers: Vec<DriverQueue> = (0..3)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)))
            .collect();
        // The transport hands over all 5 queues it exposes; the last two were not set up.
        let mut queues: Vec<Queue> = drivers.iter().map(|d| d.queue()).collect();
        queues.push(Queue::new(256).unwrap());
        queues.push(Queue::new(256).unwrap());
        let (ctx, notifiers) = activate_ctx(&env, queues);
        env.balloon.activate(ctx).unwrap();
        drivers[2].add_chain(&[(4 << 20, 2 << 20, WRITE)]);
        notifiers[2].write(1).unwrap();
        assert!(wait_until(|| drivers[2].used_idx() == 1));
        assert_eq!(env.state_of(1024), PageState::Reported);
        assert!(wait_until(|| env.interrupt.used() == vec![2]));
        assert_eq!(env.releaser.calls(), vec![(4 << 20, 2 << 20)]);
    }

    #[test]
    fn activation_rejects_bad_queue_setups() {
        let mut env = Env::new(full_config());
        env.ack(ALL_FEATURES);
        // Too few queues for the negotiated features.
        let queues = (0..4)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)).queue())
            .collect();
        let (ctx, _n) = activate_ctx(&env, queues);
        assert!(matches!(
            env.balloon.activate(ctx),
            Err(ActivateError::BadQueues(_))
        ));
        // A negotiated queue that is not ready.
        let mut queues: Vec<Queue> = (0..5)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)).queue())
            .collect();
        queues[3] = Queue::new(256).unwrap();
        let (ctx, _n) = activate_ctx(&env, queues);
        let err = env.balloon.activate(ctx).unwrap_err();
        assert!(err.to_string().contains("queue 3 (free_page_vq)"), "{err}");
        // Rings outside guest memory.
        let mut queues: Vec<Queue> = (0..5)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)).queue())
            .collect();
        queues[0].set_desc_table_address(Some(0xfff0_0000), Some(0));
        let (ctx, _n) = activate_ctx(&env, queues);
        assert!(env.balloon.activate(ctx).is_err());
        assert!(!env.balloon.is_activated());
        // A good set-up still works, and a second activation is refused.
        let queues = (0..5)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)).queue())
            .collect();
        let (ctx, _n) = activate_ctx(&env, queues);
        env.balloon.activate(ctx).unwrap();
        let queues = (0..5)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)).queue())
            .collect();
        let (ctx, _n) = activate_ctx(&env, queues);
        assert!(env.balloon.activate(ctx).is_err());
    }

    #[test]
    fn stats_buffer_is_returned_at_the_polling_interval() {
        let mut env = Env::new(full_config()); // 1 s interval
        env.ack(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ);
        let handle = env.balloon.handle();
        let mut drivers: Vec<DriverQueue> = (0..3)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)))
            .collect();
        let queues = drivers.iter().map(|d| d.queue()).collect();
        let (ctx, notifiers) = activate_ctx(&env, queues);
        // The driver makes its first buffer available before DRIVER_OK is handled.
        let mut entry = crate::queues::stats::VIRTIO_BALLOON_S_MEMFREE
            .to_le_bytes()
            .to_vec();
        entry.extend_from_slice(&12345u64.to_le_bytes());
        vm_memory::Bytes::write_slice(&env.mem, &entry, vm_memory::GuestAddress(DATA_GPA)).unwrap();
        drivers[2].add_chain(&[(DATA_GPA, 10, 0)]);
        env.balloon.activate(ctx).unwrap();
        assert!(wait_until(|| handle.statistics().is_some()));
        assert_eq!(handle.statistics().unwrap().free_memory_bytes, Some(12345));
        assert_eq!(drivers[2].used_idx(), 0);
        // Within about a second the buffer comes back.
        assert!(wait_until(|| drivers[2].used_idx() == 1));
        assert!(env.interrupt.used().contains(&2));
        drop(notifiers);
    }
}
