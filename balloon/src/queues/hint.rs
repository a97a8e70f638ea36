//! free_page_vq (virtio 1.2 §5.5.6.7, `VIRTIO_BALLOON_F_FREE_PAGE_HINT`): free page hinting.
//!
//! The handshake, as the spec and Linux's `virtio_balloon.c` implement it:
//!
//! 1. The host writes a new command id (>= [`FIRST_HINT_CMD_ID`]; 0 and 1 are reserved) to
//!    `free_page_hint_cmd_id` and signals a configuration change
//!    ([`BalloonHandle::start_hinting`]).
//! 2. The guest reads it, puts the id in a 4-byte **device-readable** buffer on free_page_vq,
//!    then allocates free blocks (Linux: 4 MiB each) and puts each in a **device-writable**
//!    buffer. It keeps the blocks allocated, so they stay free of data while the host looks.
//! 3. The guest ends the run when it runs out of free blocks or sees the command id change,
//!    with a device-readable buffer holding [`VIRTIO_BALLOON_CMD_ID_STOP`].
//! 4. The host may end a run early by setting the id to [`VIRTIO_BALLOON_CMD_ID_STOP`]
//!    ([`BalloonHandle::stop_hinting`]): the guest stops sending but keeps the blocks.
//! 5. The host sets the id to [`VIRTIO_BALLOON_CMD_ID_DONE`]
//!    ([`BalloonHandle::finish_hinting`]) when it no longer needs the blocks held: the guest
//!    frees all of them. With [`HintingOptions::acknowledge_on_stop`] the device does this as
//!    soon as the guest ends a run.
//!
//! [`BalloonHandle::start_hinting`]: crate::BalloonHandle::start_hinting
//! [`BalloonHandle::stop_hinting`]: crate::BalloonHandle::stop_hinting
//! [`BalloonHandle::finish_hinting`]: crate::BalloonHandle::finish_hinting
//!
//! Hinted pages are marked [`PageState::Hinted`] while the run accepts hints (the guest sent the
//! current id and no STOP yet) and never released: once the guest frees them again it may
//! write them at any time, and releasing a page the guest already reused would lose data. The
//! snapshot writer skips hinted pages that dirty tracking has not turned live since.
//! Buffers are returned with used length 0; hints outside a run are returned and ignored.

use serde::{Deserialize, Serialize};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::{
    apply_page_ranges, buffer_page_ranges, collect_buffers, read_buffers, BalloonQueue, ChainRules,
    Direction, QueueCtx,
};
use crate::device::lock;
use crate::page_state::PageState;

/// Command id meaning "stop hinting" (host to guest) and "run finished" (guest to host).
pub const VIRTIO_BALLOON_CMD_ID_STOP: u32 = 0;

/// Command id meaning "the host is done with the hints: free the hinted pages".
pub const VIRTIO_BALLOON_CMD_ID_DONE: u32 = 1;

/// Smallest command id of a hinting run.
pub const FIRST_HINT_CMD_ID: u32 = 2;

/// Most bytes accepted in a command id buffer (Linux sends 4).
const MAX_CMD_ID_BUFFER_BYTES: u64 = 64;

/// What free_page_vq accepts in a command id chain.
const CMD_ID_CHAIN_RULES: ChainRules = ChainRules {
    direction: Direction::DeviceReadable,
    unit_bytes: 1,
    max_total_bytes: MAX_CMD_ID_BUFFER_BYTES,
};

/// What free_page_vq accepts in a hint chain.
const HINT_CHAIN_RULES: ChainRules = ChainRules {
    direction: Direction::DeviceWritable,
    unit_bytes: 1,
    max_total_bytes: u64::MAX,
};

/// Where the current hinting run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HintPhase {
    /// No run was started, or the host finished it with DONE.
    Idle,
    /// The host published a command id; the guest has not echoed it yet.
    Requested,
    /// The guest echoed the command id and is sending hints.
    Running,
    /// The guest ended the run with STOP.
    GuestStopped,
    /// The host ended the run with STOP; the guest still holds the hinted pages.
    HostStopped,
}

/// Options of a hinting run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HintingOptions {
    /// When the guest ends the run, set the command id to DONE at once so the guest frees the
    /// hinted pages (they stay hinted in the page-state map until written). Without it, the
    /// guest holds them until [`BalloonHandle::finish_hinting`](crate::BalloonHandle::finish_hinting).
    #[serde(default = "default_true")]
    pub acknowledge_on_stop: bool,
}

fn default_true() -> bool {
    true
}

impl Default for HintingOptions {
    fn default() -> Self {
        HintingOptions {
            acknowledge_on_stop: true,
        }
    }
}

/// Free page hinting as seen from the host (the `GET` body of the hinting API resource).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintingStatus {
    /// The command id in the configuration space (0 = STOP, 1 = DONE, >= 2 = a run).
    pub cmd_id: u32,
    /// The last command id the guest sent, if any.
    pub guest_cmd_id: Option<u32>,
    /// Where the run is.
    pub phase: HintPhase,
    /// Whether the device accepts hints now (the guest acknowledged `cmd_id`, no STOP yet).
    pub running: bool,
    /// Pages hinted in the current (or last) run.
    pub pages_hinted: u64,
    /// Pages hinted since the device was created.
    pub total_pages_hinted: u64,
    /// See [`HintingOptions::acknowledge_on_stop`].
    pub acknowledge_on_stop: bool,
}

/// The device's hinting state; saved in snapshots as part of
/// [`BalloonState`](crate::persist::BalloonState).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HintState {
    /// The `free_page_hint_cmd_id` configuration field.
    pub cmd_id: u32,
    /// The id the next run gets.
    pub next_cmd_id: u32,
    /// Where the run is.
    pub phase: HintPhase,
    /// The last command id the guest sent.
    pub guest_cmd_id: Option<u32>,
    /// Pages hinted in the current (or last) run.
    pub run_pages_hinted: u64,
    /// See [`HintingOptions::acknowledge_on_stop`].
    pub acknowledge_on_stop: bool,
}

impl Default for HintState {
    fn default() -> Self {
        HintState {
            cmd_id: VIRTIO_BALLOON_CMD_ID_STOP,
            next_cmd_id: FIRST_HINT_CMD_ID,
            phase: HintPhase::Idle,
            guest_cmd_id: None,
            run_pages_hinted: 0,
            acknowledge_on_stop: true,
        }
    }
}

impl HintState {
    /// Starts a run: publishes a fresh command id and returns it. The caller signals the
    /// configuration change.
    pub(crate) fn start(&mut self, options: HintingOptions) -> u32 {
        let id = self.next_cmd_id.max(FIRST_HINT_CMD_ID);
        self.next_cmd_id = id.checked_add(1).unwrap_or(FIRST_HINT_CMD_ID);
        self.cmd_id = id;
        self.phase = HintPhase::Requested;
        self.run_pages_hinted = 0;
        self.acknowledge_on_stop = options.acknowledge_on_stop;
        id
    }

    /// Ends the run from the host side (command id STOP); the guest keeps the hinted pages.
    pub(crate) fn stop(&mut self) {
        self.cmd_id = VIRTIO_BALLOON_CMD_ID_STOP;
        if matches!(self.phase, HintPhase::Requested | HintPhase::Running) {
            self.phase = HintPhase::HostStopped;
        }
    }

    /// Tells the guest the host is done with the hints (command id DONE).
    pub(crate) fn finish(&mut self) {
        self.cmd_id = VIRTIO_BALLOON_CMD_ID_DONE;
        self.phase = HintPhase::Idle;
    }

    /// Whether hint buffers are accepted now.
    pub(crate) fn accepting_hints(&self) -> bool {
        self.phase == HintPhase::Running
    }

    /// Handles a command id sent by the guest. Returns whether the configuration changed (the
    /// caller then signals it).
    pub(crate) fn on_guest_cmd_id(&mut self, id: u32) -> bool {
        self.guest_cmd_id = Some(id);
        if id == VIRTIO_BALLOON_CMD_ID_STOP {
            if self.phase != HintPhase::Running {
                // The end of a run the host already stopped or replaced.
                return false;
            }
            self.phase = HintPhase::GuestStopped;
            tracing::info!(
                cmd_id = self.cmd_id,
                pages_hinted = self.run_pages_hinted,
                "balloon: guest finished free page hinting"
            );
            if self.acknowledge_on_stop {
                self.finish();
                return true;
            }
            return false;
        }
        if id == self.cmd_id && id >= FIRST_HINT_CMD_ID && self.phase == HintPhase::Requested {
            self.phase = HintPhase::Running;
        }
        // Otherwise: a stale id (the host moved on) or a repeat; hints stay refused or accepted
        // as before.
        false
    }

    /// Checks a state read from a snapshot. `hinting_negotiated` says whether the restored
    /// driver accepted `VIRTIO_BALLOON_F_FREE_PAGE_HINT`.
    pub(crate) fn validate(&self, hinting_negotiated: bool) -> Result<(), &'static str> {
        if self.next_cmd_id < FIRST_HINT_CMD_ID {
            return Err("next_cmd_id is a reserved command id");
        }
        let in_run = matches!(self.phase, HintPhase::Requested | HintPhase::Running);
        if in_run && self.cmd_id < FIRST_HINT_CMD_ID {
            return Err("a run is in progress but cmd_id is STOP or DONE");
        }
        if self.phase == HintPhase::Running && self.guest_cmd_id != Some(self.cmd_id) {
            return Err("running, but the guest has not acknowledged cmd_id");
        }
        if self.phase == HintPhase::HostStopped && self.cmd_id != VIRTIO_BALLOON_CMD_ID_STOP {
            return Err("stopped by the host, but cmd_id is not STOP");
        }
        if !hinting_negotiated && self.phase != HintPhase::Idle {
            return Err("hinting not negotiated, but a run is recorded");
        }
        Ok(())
    }

    /// The status for a device whose hint counter is `total_pages_hinted`.
    pub(crate) fn status(&self, total_pages_hinted: u64) -> HintingStatus {
        HintingStatus {
            cmd_id: self.cmd_id,
            guest_cmd_id: self.guest_cmd_id,
            phase: self.phase,
            running: self.accepting_hints(),
            pages_hinted: self.run_pages_hinted,
            total_pages_hinted,
            acknowledge_on_stop: self.acknowledge_on_stop,
        }
    }
}

/// Handles one free_page_vq chain: a command id (device-readable) or free page hints
/// (device-writable). Returns the used length: 0, the device writes nothing.
pub(crate) fn handle_chain(
    ctx: &mut QueueCtx<'_>,
    head: u16,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let first_is_writable = chain.clone().next().map(|d| d.is_write_only());
    match first_is_writable {
        Some(false) => handle_cmd_id(ctx, head, chain),
        Some(true) => handle_hints(ctx, head, chain),
        None => {
            ctx.skip_chain(BalloonQueue::FreePageHint, head, &super::ChainError::Empty);
        }
    }
    0
}

fn handle_cmd_id(ctx: &mut QueueCtx<'_>, head: u16, chain: DescriptorChain<&GuestMemoryMmap>) {
    let bytes = collect_buffers(chain, ctx.mem, &CMD_ID_CHAIN_RULES)
        .and_then(|buffers| read_buffers(ctx.mem, &buffers))
        .and_then(|bytes| {
            bytes
                .get(..4)
                .map(|b| [b[0], b[1], b[2], b[3]])
                .ok_or(super::ChainError::TooShort {
                    len_bytes: bytes.len() as u64,
                    min_bytes: 4,
                })
        });
    let id = match bytes {
        Ok(b) => u32::from_le_bytes(b),
        Err(err) => {
            ctx.skip_chain(BalloonQueue::FreePageHint, head, &err);
            return;
        }
    };
    let changed = lock(&ctx.shared.state).hint.on_guest_cmd_id(id);
    tracing::debug!(
        cmd_id = id,
        "balloon: guest sent a free page hint command id"
    );
    if changed {
        ctx.config_changed = true;
    }
}

fn handle_hints(ctx: &mut QueueCtx<'_>, head: u16, chain: DescriptorChain<&GuestMemoryMmap>) {
    let buffers = match collect_buffers(chain, ctx.mem, &HINT_CHAIN_RULES) {
        Ok(buffers) => buffers,
        Err(err) => {
            ctx.skip_chain(BalloonQueue::FreePageHint, head, &err);
            return;
        }
    };
    let run_cmd_id = {
        let state = lock(&ctx.shared.state);
        state.hint.accepting_hints().then_some(state.hint.cmd_id)
    };
    let Some(run_cmd_id) = run_cmd_id else {
        let counters = &ctx.shared.counters;
        counters.add(&counters.hints_ignored, buffers.len() as u64);
        return;
    };
    let ranges = buffer_page_ranges(&buffers);
    let applied = apply_page_ranges(
        ctx,
        &ranges,
        PageState::Hinted,
        false,
        BalloonQueue::FreePageHint,
    );
    let counters = &ctx.shared.counters;
    counters.add(&counters.pages_hinted, applied.pages);
    let mut state = lock(&ctx.shared.state);
    if state.hint.cmd_id == run_cmd_id {
        state.hint.run_pages_hinted += applied.pages;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_state_machine() {
        let mut h = HintState::default();
        assert_eq!(h.cmd_id, VIRTIO_BALLOON_CMD_ID_STOP);
        assert!(!h.accepting_hints());
        let id = h.start(HintingOptions {
            acknowledge_on_stop: false,
        });
        assert_eq!(id, FIRST_HINT_CMD_ID);
        assert_eq!(h.phase, HintPhase::Requested);
        // A stale id does not start the run.
        assert!(!h.on_guest_cmd_id(77));
        assert!(!h.accepting_hints());
        assert!(!h.on_guest_cmd_id(id));
        assert!(h.accepting_hints());
        // The guest's STOP ends the run; without acknowledge_on_stop the id stays.
        assert!(!h.on_guest_cmd_id(VIRTIO_BALLOON_CMD_ID_STOP));
        assert_eq!(h.phase, HintPhase::GuestStopped);
        assert_eq!(h.cmd_id, id);
        h.finish();
        assert_eq!(h.cmd_id, VIRTIO_BALLOON_CMD_ID_DONE);

        // A second run gets a new id; acknowledge_on_stop answers STOP with DONE.
        let id2 = h.start(HintingOptions::default());
        assert_eq!(id2, id + 1);
        h.on_guest_cmd_id(id2);
        assert!(h.on_guest_cmd_id(VIRTIO_BALLOON_CMD_ID_STOP));
        assert_eq!(h.cmd_id, VIRTIO_BALLOON_CMD_ID_DONE);
        assert_eq!(h.phase, HintPhase::Idle);

        // The host stops a run; the guest's late STOP changes nothing.
        let id3 = h.start(HintingOptions::default());
        h.on_guest_cmd_id(id3);
        h.stop();
        assert_eq!(h.phase, HintPhase::HostStopped);
        assert!(!h.accepting_hints());
        assert!(!h.on_guest_cmd_id(VIRTIO_BALLOON_CMD_ID_STOP));
        assert_eq!(h.cmd_id, VIRTIO_BALLOON_CMD_ID_STOP);
        h.validate(true).unwrap();
    }

    #[test]
    fn cmd_ids_skip_reserved_values_on_wrap() {
        let mut h = HintState {
            next_cmd_id: u32::MAX,
            ..HintState::default()
        };
        assert_eq!(h.start(HintingOptions::default()), u32::MAX);
        assert_eq!(h.start(HintingOptions::default()), FIRST_HINT_CMD_ID);
    }

    #[test]
    fn validation() {
        let ok = HintState::default();
        ok.validate(false).unwrap();
        let bad = [
            HintState {
                next_cmd_id: 1,
                ..ok.clone()
            },
            HintState {
                phase: HintPhase::Running,
                cmd_id: 5,
                guest_cmd_id: Some(4),
                ..ok.clone()
            },
            HintState {
                phase: HintPhase::Requested,
                cmd_id: VIRTIO_BALLOON_CMD_ID_DONE,
                ..ok.clone()
            },
            HintState {
                phase: HintPhase::HostStopped,
                cmd_id: 9,
                ..ok.clone()
            },
        ];
        for state in bad {
            assert!(state.validate(true).is_err(), "{state:?}");
        }
        let running = HintState {
            phase: HintPhase::Running,
            cmd_id: 5,
            guest_cmd_id: Some(5),
            ..ok
        };
        running.validate(true).unwrap();
        assert!(running.validate(false).is_err());
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;
    use crate::queues::BalloonQueue;
    use crate::test_utils::*;

    /// Writes a command id at `gpa`.
    fn write_cmd_id(env: &Env, gpa: u64, id: u32) {
        use vm_memory::{Bytes, GuestAddress};
        env.mem
            .write_slice(&id.to_le_bytes(), GuestAddress(gpa))
            .unwrap();
    }

    const CMD_GPA: u64 = DATA_GPA;
    const STOP_GPA: u64 = DATA_GPA + 64;
    const BLOCK_BYTES: u32 = 4 << 20;

    #[test]
    fn handshake_marks_hinted_pages_without_releasing() {
        let env = Env::new(full_config());
        let mut hintq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::FreePageHint, hintq.queue())]);
        let id = lock(&env.shared().state).hint.start(HintingOptions {
            acknowledge_on_stop: false,
        });
        write_cmd_id(&env, CMD_GPA, id);
        write_cmd_id(&env, STOP_GPA, VIRTIO_BALLOON_CMD_ID_STOP);

        // Hints before the guest echoes the id are not taken.
        hintq.add_chain(&[(8 << 20, BLOCK_BYTES, WRITE)]);
        env.process(&mut active, 0);
        assert_eq!(env.state_of(2048), PageState::Live);
        assert_eq!(env.shared().counters.snapshot().hints_ignored, 1);

        // The guest echoes the id, then hints two 4 MiB blocks.
        hintq.add_chain(&[(CMD_GPA, 4, 0)]);
        hintq.add_chain(&[(4 << 20, BLOCK_BYTES, WRITE)]);
        hintq.add_chain(&[(8 << 20, BLOCK_BYTES, WRITE)]);
        env.process(&mut active, 0);
        assert_eq!(hintq.used_idx(), 4);
        let status = lock(&env.shared().state).hint.status(0);
        assert_eq!(status.phase, HintPhase::Running);
        assert_eq!(status.guest_cmd_id, Some(id));
        assert_eq!(status.pages_hinted, 2048);
        for pfn in [1024, 2047, 2048, 3071] {
            assert_eq!(env.state_of(pfn), PageState::Hinted, "pfn {pfn}");
        }
        assert_eq!(env.state_of(1023), PageState::Live);
        assert!(
            env.releaser.calls().is_empty(),
            "hinted pages are not released"
        );

        // The guest ends the run; hints after that are not taken.
        hintq.add_chain(&[(STOP_GPA, 4, 0)]);
        hintq.add_chain(&[(12 << 20, BLOCK_BYTES, WRITE)]);
        env.process(&mut active, 0);
        let state = lock(&env.shared().state).hint.clone();
        assert_eq!(state.phase, HintPhase::GuestStopped);
        assert_eq!(state.cmd_id, id, "no DONE without acknowledge_on_stop");
        assert_eq!(env.interrupt.config_changes(), 0);
        assert_eq!(env.state_of(3072), PageState::Live);
        assert_eq!(env.shared().counters.snapshot().pages_hinted, 2048);
        assert_eq!(env.shared().counters.snapshot().hints_ignored, 2);

        // A hinted page written afterwards is live again; the rest stays hinted.
        let changed = lock(&env.map).mark_written(1500..1502).unwrap();
        assert_eq!(changed, 2);
        assert_eq!(env.state_of(1500), PageState::Live);
        assert_eq!(env.state_of(1502), PageState::Hinted);
        assert_eq!(lock(&env.map).count_by_state().hinted_pages, 2046);
    }

    #[test]
    fn guest_stop_is_acknowledged_with_done() {
        let env = Env::new(full_config());
        let mut hintq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::FreePageHint, hintq.queue())]);
        let id = lock(&env.shared().state)
            .hint
            .start(HintingOptions::default());
        write_cmd_id(&env, CMD_GPA, id);
        write_cmd_id(&env, STOP_GPA, VIRTIO_BALLOON_CMD_ID_STOP);
        hintq.add_chain(&[(CMD_GPA, 4, 0)]);
        hintq.add_chain(&[(4 << 20, BLOCK_BYTES, WRITE)]);
        hintq.add_chain(&[(STOP_GPA, 4, 0)]);
        env.process(&mut active, 0);
        let state = lock(&env.shared().state).hint.clone();
        assert_eq!(state.cmd_id, VIRTIO_BALLOON_CMD_ID_DONE);
        assert_eq!(state.phase, HintPhase::Idle);
        assert_eq!(state.run_pages_hinted, 1024);
        assert_eq!(env.interrupt.config_changes(), 1);
    }

    #[test]
    fn host_stop_ends_the_run() {
        let env = Env::new(full_config());
        let mut hintq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::FreePageHint, hintq.queue())]);
        let id = lock(&env.shared().state)
            .hint
            .start(HintingOptions::default());
        write_cmd_id(&env, CMD_GPA, id);
        hintq.add_chain(&[(CMD_GPA, 4, 0)]);
        env.process(&mut active, 0);
        lock(&env.shared().state).hint.stop();
        // Blocks the guest sent before it saw STOP are not taken; its STOP changes nothing.
        write_cmd_id(&env, STOP_GPA, VIRTIO_BALLOON_CMD_ID_STOP);
        hintq.add_chain(&[(4 << 20, BLOCK_BYTES, WRITE)]);
        hintq.add_chain(&[(STOP_GPA, 4, 0)]);
        env.process(&mut active, 0);
        let state = lock(&env.shared().state).hint.clone();
        assert_eq!(state.phase, HintPhase::HostStopped);
        assert_eq!(state.cmd_id, VIRTIO_BALLOON_CMD_ID_STOP);
        assert_eq!(env.state_of(1024), PageState::Live);
        assert_eq!(env.interrupt.config_changes(), 0);
    }

    #[test]
    fn malformed_hint_chains_are_skipped() {
        let env = Env::new(full_config());
        let mut hintq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::FreePageHint, hintq.queue())]);
        let id = lock(&env.shared().state)
            .hint
            .start(HintingOptions::default());
        write_cmd_id(&env, CMD_GPA, id);
        // Too short a command id, a mixed chain, one outside memory, one past the table.
        hintq.add_chain(&[(CMD_GPA, 2, 0)]);
        hintq.add_chain(&[(CMD_GPA, 4, 0), (4 << 20, 4096, WRITE)]);
        hintq.add_chain(&[(MEM_BYTES - 2, 4, 0)]);
        hintq.add_raw_head(1000);
        env.process(&mut active, 0);
        assert_eq!(hintq.used_idx(), 3);
        assert_eq!(env.shared().counters.snapshot().invalid_buffers, 4);
        let state = lock(&env.shared().state).hint.clone();
        assert_eq!(state.phase, HintPhase::Requested);
        assert_eq!(state.guest_cmd_id, None);
    }
}
