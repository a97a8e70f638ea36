//! Saving and restoring the balloon device in a snapshot.
//!
//! [`BalloonState`] is the plain state a snapshot stores: the configuration, the negotiated
//! features, the configuration space, the hinting state, the queues' ring positions and the
//! statistics buffer the device holds. A state file is untrusted input: [`Balloon::restore`]
//! checks every field against the configuration, the guest RAM and the guest memory before
//! building the device.
//!
//! The page-state map is not part of this state: the VMM owns it and saves it
//! ([`PageStateMap::save_state`](crate::PageStateMap::save_state)) next to this.
//!
//! Restoring an active device: [`Balloon::restore`] returns a device that is not yet active and
//! remembers the saved queues. The transport restores its registers and calls
//! [`VirtioDevice::activate`](virtio_device::VirtioDevice::activate) with the queues it set up
//! from them (or from [`Balloon::restored_queues`]); the device checks that their rings match
//! the saved ones and continues from the saved ring positions.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_device::SavedQueue;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::config::{BalloonConfig, MAX_STATS_POLLING_INTERVAL_S};
use crate::device::{
    avail_features, lock, Balloon, BalloonCounters, BalloonError, Counters, DeviceState,
    RestoredQueues, VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_F_VERSION_1,
};
use crate::page_state::PageStateMap;
use crate::queues::hint::HintState;
use crate::queues::{queue_layout, BalloonQueue, QUEUE_SIZE};
use crate::release::RamReleaser;

/// Version of [`BalloonState`] this code writes and accepts.
pub const BALLOON_STATE_VERSION: u32 = 1;

/// The balloon device's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    /// [`BALLOON_STATE_VERSION`].
    pub version: u32,
    /// The configuration the device was created with.
    pub config: BalloonConfig,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the driver had activated the device.
    pub activated: bool,
    /// `num_pages`: the balloon target in 4 KiB pages.
    pub num_pages: u32,
    /// `actual`: what the guest said the balloon holds, in 4 KiB pages.
    pub actual_pages: u32,
    /// `poison_val`.
    pub poison_val: u32,
    /// Statistics polling interval in seconds (0 without statistics).
    pub stats_polling_interval_s: u16,
    /// Free page hinting state (includes `free_page_hint_cmd_id`).
    pub hint: HintState,
    /// The queues in queue-index order (empty if not activated).
    pub queues: Vec<SavedQueue>,
    /// Head of the statistics buffer the device held.
    pub stats_desc_index: Option<u16>,
    /// Cumulative counters.
    pub counters: BalloonCounters,
}

/// Why a [`BalloonState`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The state has a version this code does not know.
    #[error("restore balloon: state version {found}, expected {expected}")]
    UnsupportedVersion {
        /// Version in the state.
        found: u32,
        /// [`BALLOON_STATE_VERSION`].
        expected: u32,
    },
    /// The saved configuration does not fit the guest, or the device cannot be created.
    #[error("restore balloon: cannot create the device")]
    Device(#[source] BalloonError),
    /// The acked features are not a subset of the offered ones.
    #[error(
        "restore balloon: acked features {acked:#x} are not a subset of the offered {offered:#x}"
    )]
    UnknownFeatures {
        /// Saved acked features.
        acked: u64,
        /// Features the saved configuration offers.
        offered: u64,
    },
    /// An active device without `VIRTIO_F_VERSION_1`.
    #[error("restore balloon: active device without VIRTIO_F_VERSION_1")]
    MissingVersion1,
    /// `num_pages` exceeds guest RAM.
    #[error("restore balloon: num_pages {num_pages} exceeds guest RAM ({guest_ram_pages} pages)")]
    TargetTooLarge {
        /// Saved target.
        num_pages: u32,
        /// Guest RAM in pages.
        guest_ram_pages: u64,
    },
    /// The statistics polling interval does not match the configuration.
    #[error("restore balloon: statistics polling interval {interval_s} s: {reason}")]
    InvalidStatsInterval {
        /// Saved interval.
        interval_s: u16,
        /// What is wrong.
        reason: &'static str,
    },
    /// The hinting state is inconsistent.
    #[error("restore balloon: free page hinting: {reason}")]
    InvalidHinting {
        /// What is wrong.
        reason: &'static str,
    },
    /// Wrong number of queues for the negotiated features.
    #[error("restore balloon: {found} queues saved, the negotiated features need {expected}")]
    QueueCount {
        /// Saved queues.
        found: usize,
        /// Queues of the negotiated layout.
        expected: usize,
    },
    /// A queue is unusable.
    #[error("restore balloon: queue {index} ({name}): {reason}")]
    InvalidQueue {
        /// Queue index.
        index: usize,
        /// Queue name.
        name: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A queue's state was refused by `virtio-queue`.
    #[error("restore balloon: queue {index} ({name})")]
    QueueState {
        /// Queue index.
        index: usize,
        /// Queue name.
        name: &'static str,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// The held statistics buffer is impossible.
    #[error("restore balloon: held statistics buffer {head}: {reason}")]
    InvalidStatsDescriptor {
        /// Saved descriptor head.
        head: u16,
        /// What is wrong.
        reason: &'static str,
    },
}

impl Balloon {
    /// The device's state for a snapshot. Take it with the guest paused so the queues and the
    /// page-state map (saved by the VMM) describe the same moment.
    ///
    /// Waits for the worker to finish its current pass, which may need the page-state map:
    /// do not call it while holding the page-state map's lock.
    pub fn save_state(&self) -> BalloonState {
        let (queues, stats_desc_index) = match (&self.active, &self.restored) {
            (Some(active), _) => {
                let active = lock(active);
                let queues = active
                    .queues
                    .iter()
                    .map(|q| SavedQueue::from(q.queue.state()))
                    .collect();
                (queues, active.stats_desc)
            }
            (None, Some(restored)) => (
                restored
                    .queues
                    .iter()
                    .map(|q| SavedQueue::from(*q))
                    .collect(),
                restored.stats_desc,
            ),
            (None, None) => (Vec::new(), None),
        };
        let activated = self.active.is_some() || self.restored.is_some();
        let state = lock(&self.shared.state);
        BalloonState {
            version: BALLOON_STATE_VERSION,
            config: self.shared.config.clone(),
            acked_features: state.acked_features,
            activated,
            num_pages: state.num_pages,
            actual_pages: state.actual_pages,
            poison_val: state.poison_val,
            stats_polling_interval_s: state.stats_polling_interval_s,
            hint: state.hint.clone(),
            queues,
            stats_desc_index,
            counters: self.shared.counters.snapshot(),
        }
    }

    /// Rebuilds a device from `state` (untrusted) for the guest whose RAM `page_states`
    /// describes and whose memory is `mem`. The device is not active; see the module
    /// documentation for how the transport re-activates it.
    pub fn restore(
        state: &BalloonState,
        page_states: Arc<Mutex<PageStateMap>>,
        releaser: Arc<dyn RamReleaser>,
        mem: &GuestMemoryMmap,
    ) -> Result<Balloon, PersistError> {
        if state.version != BALLOON_STATE_VERSION {
            return Err(PersistError::UnsupportedVersion {
                found: state.version,
                expected: BALLOON_STATE_VERSION,
            });
        }
        let guest_ram_pages = lock(&page_states).nr_pages();
        check_fields(state, guest_ram_pages)?;
        let restored = if state.activated {
            Some(check_queues(state, mem)?)
        } else {
            if !state.queues.is_empty() {
                return Err(PersistError::QueueCount {
                    found: state.queues.len(),
                    expected: 0,
                });
            }
            if let Some(head) = state.stats_desc_index {
                return Err(PersistError::InvalidStatsDescriptor {
                    head,
                    reason: "the device was not active",
                });
            }
            None
        };
        let device_state = DeviceState {
            acked_features: state.acked_features,
            activated: false,
            num_pages: state.num_pages,
            actual_pages: state.actual_pages,
            poison_val: state.poison_val,
            stats_polling_interval_s: state.stats_polling_interval_s,
            stats: None,
            hint: state.hint.clone(),
        };
        let mut balloon = Balloon::build(
            state.config.clone(),
            page_states,
            releaser,
            device_state,
            Counters::from_snapshot(&state.counters),
        )
        .map_err(PersistError::Device)?;
        balloon.restored = restored;
        Ok(balloon)
    }

    /// The queues saved in the snapshot this device was restored from, until it is activated
    /// again: what the transport should hand back to `activate`.
    pub fn restored_queues(&self) -> Option<Vec<Queue>> {
        let restored = self.restored.as_ref()?;
        restored
            .queues
            .iter()
            .map(|q| Queue::try_from(*q).ok())
            .collect()
    }
}

/// Checks everything but the queues.
fn check_fields(state: &BalloonState, guest_ram_pages: u64) -> Result<(), PersistError> {
    let offered = avail_features(&state.config);
    if state.acked_features & !offered != 0 {
        return Err(PersistError::UnknownFeatures {
            acked: state.acked_features,
            offered,
        });
    }
    if state.activated && state.acked_features & VIRTIO_F_VERSION_1 == 0 {
        return Err(PersistError::MissingVersion1);
    }
    if u64::from(state.num_pages) > guest_ram_pages {
        return Err(PersistError::TargetTooLarge {
            num_pages: state.num_pages,
            guest_ram_pages,
        });
    }
    let interval_s = state.stats_polling_interval_s;
    if state.config.stats_enabled() {
        if interval_s == 0 || interval_s > MAX_STATS_POLLING_INTERVAL_S {
            return Err(PersistError::InvalidStatsInterval {
                interval_s,
                reason: "must be between 1 and 3600 when statistics are enabled",
            });
        }
    } else if interval_s != 0 {
        return Err(PersistError::InvalidStatsInterval {
            interval_s,
            reason: "statistics are disabled in the configuration",
        });
    }
    let hinting = state.acked_features & VIRTIO_BALLOON_F_FREE_PAGE_HINT != 0;
    state
        .hint
        .validate(hinting && state.activated)
        .map_err(|reason| PersistError::InvalidHinting { reason })
}

/// Checks the queues of an active device against the negotiated layout and guest memory.
fn check_queues(
    state: &BalloonState,
    mem: &GuestMemoryMmap,
) -> Result<RestoredQueues, PersistError> {
    let layout = queue_layout(state.acked_features);
    if state.queues.len() != layout.len() {
        return Err(PersistError::QueueCount {
            found: state.queues.len(),
            expected: layout.len(),
        });
    }
    let mut queues = Vec::with_capacity(layout.len());
    let mut stats_queue_size = None;
    for (index, (saved, kind)) in state.queues.iter().zip(&layout).enumerate() {
        let name = kind.name();
        let invalid = |reason| PersistError::InvalidQueue {
            index,
            name,
            reason,
        };
        if saved.max_size != QUEUE_SIZE {
            return Err(invalid("max_size differs from the device's queue size"));
        }
        if !saved.ready {
            return Err(invalid("not ready"));
        }
        if saved.event_idx_enabled {
            return Err(invalid("VIRTIO_RING_F_EVENT_IDX is not offered"));
        }
        let queue = Queue::try_from(QueueState::from(*saved)).map_err(|source| {
            PersistError::QueueState {
                index,
                name,
                source,
            }
        })?;
        if !queue.is_valid(mem) {
            return Err(invalid("rings outside guest memory"));
        }
        // The driver cannot have more buffers in flight than the queue holds.
        let in_flight = saved.next_avail.wrapping_sub(saved.next_used);
        if in_flight > saved.size {
            return Err(invalid(
                "next_avail and next_used are more than a queue apart",
            ));
        }
        if *kind == BalloonQueue::Stats {
            stats_queue_size = Some(saved.size);
        }
        queues.push(QueueState::from(*saved));
    }
    if let Some(head) = state.stats_desc_index {
        match stats_queue_size {
            None => {
                return Err(PersistError::InvalidStatsDescriptor {
                    head,
                    reason: "no statistics queue was negotiated",
                })
            }
            Some(size) if head >= size => {
                return Err(PersistError::InvalidStatsDescriptor {
                    head,
                    reason: "past the end of the descriptor table",
                })
            }
            Some(_) => {}
        }
    }
    Ok(RestoredQueues {
        queues,
        stats_desc: state.stats_desc_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{
        VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
    };
    use crate::queues::hint::HintPhase;
    use crate::test_utils::*;
    use crate::PageState;
    use virtio_device::VirtioDevice;

    const ALL_FEATURES: u64 = VIRTIO_F_VERSION_1
        | VIRTIO_BALLOON_F_STATS_VQ
        | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        | VIRTIO_BALLOON_F_FREE_PAGE_HINT
        | VIRTIO_BALLOON_F_REPORTING;

    fn new_map() -> Arc<Mutex<PageStateMap>> {
        Arc::new(Mutex::new(PageStateMap::with_ram_size(MEM_BYTES).unwrap()))
    }

    fn restore(state: &BalloonState, env: &Env) -> Result<Balloon, PersistError> {
        Balloon::restore(
            state,
            new_map(),
            Arc::new(FakeReleaser::default()),
            &env.mem,
        )
    }

    #[test]
    fn round_trip_of_an_active_device() {
        let mut env = Env::new(full_config());
        env.ack(ALL_FEATURES);
        let handle = env.balloon.handle();
        let mut drivers: Vec<DriverQueue> = (0..5)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)))
            .collect();
        let queues = drivers.iter().map(|d| d.queue()).collect();
        let (ctx, notifiers) = activate_ctx(&env, queues);
        env.balloon.activate(ctx).unwrap();
        // Some inflation, a held statistics buffer, a hinting run, a target and `actual`.
        let len = env.write_pfns(DATA_GPA, &[30, 31, 32]);
        drivers[0].add_chain(&[(DATA_GPA, len, 0)]);
        notifiers[0].write(1).unwrap();
        let stats_head = drivers[2].add_chain(&[(DATA_GPA, 10, 0)]);
        notifiers[2].write(1).unwrap();
        assert!(wait_until(|| drivers[0].used_idx() == 1));
        assert!(wait_until(|| handle.statistics().is_some()));
        handle.set_target_mib(3).unwrap();
        env.balloon.write_config(4, &700u32.to_le_bytes());
        let cmd_id = handle.start_hinting().unwrap();

        let state = env.balloon.save_state();
        assert!(state.activated);
        assert_eq!(state.acked_features, ALL_FEATURES);
        assert_eq!(state.num_pages, 768);
        assert_eq!(state.actual_pages, 700);
        assert_eq!(state.hint.cmd_id, cmd_id);
        assert_eq!(state.hint.phase, HintPhase::Requested);
        assert_eq!(state.queues.len(), 5);
        assert_eq!(
            (state.queues[0].next_avail, state.queues[0].next_used),
            (1, 1)
        );
        assert_eq!(
            (state.queues[2].next_avail, state.queues[2].next_used),
            (1, 0)
        );
        assert_eq!(state.stats_desc_index, Some(stats_head));
        assert_eq!(state.counters.pages_inflated, 3);

        // Through JSON and back.
        let json = serde_json::to_string(&state).unwrap();
        let parsed: BalloonState = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, state);

        // The restored device saves the same state before and after re-activation.
        let map = new_map();
        lock(&map)
            .mark_range(30 * 4096, 3 * 4096, PageState::Inflated)
            .unwrap();
        let releaser = Arc::new(FakeReleaser::default());
        let mut restored =
            Balloon::restore(&parsed, map.clone(), releaser.clone(), &env.mem).unwrap();
        assert!(!restored.is_activated());
        assert_eq!(restored.save_state(), state);
        let status = restored.handle().status();
        assert_eq!((status.target_mib, status.actual_pages), (3, 700));
        assert_eq!(restored.handle().hinting_status().cmd_id, cmd_id);
        let mut data = [0u8; 4];
        restored.read_config(8, &mut data);
        assert_eq!(u32::from_le_bytes(data), cmd_id);

        // Stop the original (as a VMM would after snapshotting) and activate the restored one
        // with the queues the transport rebuilt.
        assert!(env.balloon.reset());
        let queues = restored.restored_queues().unwrap();
        assert_eq!(queues.len(), 5);
        let events: Vec<_> = (0..5).map(|_| event()).collect();
        let notify: Vec<_> = events.iter().map(|e| e.try_clone().unwrap()).collect();
        let interrupt = Arc::new(FakeInterrupt::default());
        restored
            .activate(virtio_device::ActivateContext {
                mem: env.mem.clone(),
                queues,
                queue_events: events,
                interrupt: interrupt.clone(),
                write_log: None,
            })
            .unwrap();
        assert_eq!(restored.save_state(), state);
        // The rings continue where they were: the next inflate chain is the second.
        let len = env.write_pfns(DATA_GPA + 4096, &[33]);
        drivers[0].add_chain(&[(DATA_GPA + 4096, len, 0)]);
        notify[0].write(1).unwrap();
        assert!(wait_until(|| drivers[0].used_idx() == 2));
        assert_eq!(releaser.calls(), vec![(33 * 4096, 4096)]);
        assert_eq!(lock(&map).count_by_state().inflated_pages, 4);
        assert_eq!(restored.handle().status().counters.pages_inflated, 4);
        // The held statistics buffer is still held by the restored device.
        assert_eq!(drivers[2].used_idx(), 0);
    }

    #[test]
    fn round_trip_of_an_inactive_device() {
        let env = Env::new(full_config());
        env.balloon.handle().set_target_mib(5).unwrap();
        let state = env.balloon.save_state();
        assert!(!state.activated);
        assert!(state.queues.is_empty());
        let restored = restore(&state, &env).unwrap();
        assert_eq!(restored.save_state(), state);
        assert!(restored.restored_queues().is_none());
    }

    /// A valid state of an active device whose queues live in `env`'s memory.
    fn active_state(env: &Env) -> BalloonState {
        let queues = (0..5)
            .map(|i| SavedQueue::from(DriverQueue::new(&env.mem, queue_base(i)).queue().state()))
            .collect();
        BalloonState {
            version: BALLOON_STATE_VERSION,
            config: full_config(),
            acked_features: ALL_FEATURES,
            activated: true,
            num_pages: 0,
            actual_pages: 0,
            poison_val: 0,
            stats_polling_interval_s: 1,
            hint: HintState::default(),
            queues,
            stats_desc_index: Some(3),
            counters: BalloonCounters::default(),
        }
    }

    #[test]
    fn corrupted_states_are_rejected() {
        let env = Env::new(full_config());
        let good = active_state(&env);
        restore(&good, &env).unwrap();

        type Mutation = fn(&mut BalloonState);
        let cases: Vec<(&str, Mutation)> = vec![
            ("version", |s| s.version = 2),
            ("unknown feature", |s| s.acked_features |= 1 << 40),
            ("PAGE_POISON not offered", |s| {
                s.acked_features |= crate::device::VIRTIO_BALLOON_F_PAGE_POISON
            }),
            ("no VERSION_1", |s| s.acked_features &= !VIRTIO_F_VERSION_1),
            ("config beyond RAM", |s| s.config.amount_mib = 1000),
            ("target beyond RAM", |s| s.num_pages = 5000),
            ("stats interval 0", |s| s.stats_polling_interval_s = 0),
            ("stats interval too long", |s| {
                s.stats_polling_interval_s = 4000
            }),
            ("interval without stats", |s| {
                s.config.stats_polling_interval_s = 0;
                s.acked_features &= !VIRTIO_BALLOON_F_STATS_VQ;
                s.queues.remove(2);
                s.stats_desc_index = None;
            }),
            ("hint next id reserved", |s| s.hint.next_cmd_id = 0),
            ("running without ack", |s| {
                s.hint.phase = HintPhase::Running;
                s.hint.cmd_id = 7;
            }),
            ("missing queue", |s| {
                s.queues.pop();
            }),
            ("extra queue", |s| {
                let q = s.queues[0];
                s.queues.push(q);
            }),
            ("queue not ready", |s| s.queues[1].ready = false),
            ("queue size not a power of two", |s| s.queues[1].size = 100),
            ("queue larger than offered", |s| {
                s.queues[1].size = 512;
                s.queues[1].max_size = 512;
            }),
            ("queue rings outside memory", |s| {
                s.queues[4].used_ring = MEM_BYTES - 8
            }),
            ("misaligned ring", |s| s.queues[0].desc_table += 1),
            ("event idx", |s| s.queues[0].event_idx_enabled = true),
            ("positions apart", |s| {
                s.queues[0].next_avail = 300;
                s.queues[0].next_used = 0;
            }),
            ("stats desc past the table", |s| {
                s.stats_desc_index = Some(256)
            }),
            ("stats desc without stats queue", |s| {
                s.acked_features &= !VIRTIO_BALLOON_F_STATS_VQ;
                s.queues.remove(2);
            }),
            ("inactive with queues", |s| s.activated = false),
            ("inactive with stats desc", |s| {
                s.activated = false;
                s.queues.clear();
            }),
        ];
        for (name, mutate) in cases {
            let mut state = good.clone();
            mutate(&mut state);
            match restore(&state, &env) {
                Ok(_) => panic!("{name}: accepted"),
                Err(err) => {
                    let msg = err.to_string();
                    assert!(msg.starts_with("restore balloon"), "{name}: {msg}");
                }
            }
        }

        // Damaged JSON: unknown fields, wrong types, truncation.
        let json = serde_json::to_string(&good).unwrap();
        let extra = json.replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<BalloonState>(&extra).is_err());
        let wrong = json.replace("\"activated\":true", "\"activated\":\"yes\"");
        assert!(serde_json::from_str::<BalloonState>(&wrong).is_err());
        assert!(serde_json::from_str::<BalloonState>(&json[..json.len() / 2]).is_err());
        let negative = json.replace("\"num_pages\":0", "\"num_pages\":-1");
        assert!(serde_json::from_str::<BalloonState>(&negative).is_err());
    }

    #[test]
    fn activation_of_a_restored_device_checks_the_rings() {
        let env = Env::new(full_config());
        let state = active_state(&env);
        let mut restored = restore(&state, &env).unwrap();
        restored.set_acked_features(ALL_FEATURES);
        // The transport rebuilt different rings: refused.
        let queues = (0..5)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i) + 0x10_0000).queue())
            .collect();
        let (ctx, _n) = activate_ctx(&env, queues);
        let err = restored.activate(ctx).unwrap_err();
        assert!(
            err.to_string().contains("differs from the one saved"),
            "{err}"
        );
        assert!(!restored.is_activated());
    }
}
