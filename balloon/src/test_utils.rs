//! Test fixtures: guest memory, a page-state map, fakes for the releaser and the interrupt,
//! and a driver-side view of a queue built on `virtio_queue::mock::MockSplitQueue`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_device::Interrupt;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::BalloonConfig;
use crate::device::{lock, Balloon, Shared};
use crate::page_state::{GuestRamRegion, PageStateMap};
use crate::queues::BalloonQueue;
use crate::ratelimit::LogLimiter;
use crate::release::RamReleaser;
use crate::worker::{ActiveQueue, ActiveQueues};

/// Guest RAM of the default fixture: 16 MiB at address 0 (4096 pages).
pub(crate) const MEM_BYTES: u64 = 16 << 20;

/// Where test data buffers start (queues live below).
pub(crate) const DATA_GPA: u64 = 1 << 20;

/// Device-writable descriptor flag.
pub(crate) const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// Records release calls; can be told to fail.
#[derive(Default)]
pub(crate) struct FakeReleaser {
    pub(crate) calls: Mutex<Vec<(u64, u64)>>,
    pub(crate) fail: AtomicBool,
}

impl FakeReleaser {
    pub(crate) fn calls(&self) -> Vec<(u64, u64)> {
        lock(&self.calls).clone()
    }
}

impl RamReleaser for FakeReleaser {
    fn release(&self, gpa: u64, len_bytes: u64) -> std::io::Result<()> {
        lock(&self.calls).push((gpa, len_bytes));
        if self.fail.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("injected failure"));
        }
        Ok(())
    }
}

/// Records interrupts.
#[derive(Default)]
pub(crate) struct FakeInterrupt {
    pub(crate) used: Mutex<Vec<u16>>,
    pub(crate) config_changes: AtomicU64,
}

impl FakeInterrupt {
    pub(crate) fn used(&self) -> Vec<u16> {
        lock(&self.used).clone()
    }

    pub(crate) fn config_changes(&self) -> u64 {
        self.config_changes.load(Ordering::Relaxed)
    }
}

impl Interrupt for FakeInterrupt {
    fn signal_used_queue(&self, queue_index: u16) -> std::io::Result<()> {
        lock(&self.used).push(queue_index);
        Ok(())
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        self.config_changes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A configuration with every feature on.
pub(crate) fn full_config() -> BalloonConfig {
    BalloonConfig {
        amount_mib: 0,
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_reporting: true,
        free_page_hinting: true,
    }
}

/// A balloon on fresh guest memory, with fakes.
pub(crate) struct Env {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) map: Arc<Mutex<PageStateMap>>,
    pub(crate) releaser: Arc<FakeReleaser>,
    pub(crate) interrupt: Arc<FakeInterrupt>,
    pub(crate) balloon: Balloon,
    pub(crate) limiter: Mutex<LogLimiter>,
}

impl Env {
    /// 16 MiB of guest RAM at 0.
    pub(crate) fn new(config: BalloonConfig) -> Env {
        Env::with_regions(config, &[(0, MEM_BYTES)])
    }

    /// Guest RAM made of `(start_gpa, len_bytes)` regions.
    pub(crate) fn with_regions(config: BalloonConfig, regions: &[(u64, u64)]) -> Env {
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        let layout: Vec<GuestRamRegion> = regions
            .iter()
            .map(|&(start_gpa, len_bytes)| GuestRamRegion {
                start_gpa,
                len_bytes,
            })
            .collect();
        let map = Arc::new(Mutex::new(PageStateMap::new(&layout).unwrap()));
        let releaser = Arc::new(FakeReleaser::default());
        let balloon = Balloon::new(config, map.clone(), releaser.clone()).unwrap();
        Env {
            mem,
            map,
            releaser,
            interrupt: Arc::new(FakeInterrupt::default()),
            balloon,
            limiter: Mutex::new(LogLimiter::new()),
        }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.balloon.shared
    }

    /// Queues to process synchronously (no worker thread), in index order.
    pub(crate) fn active(&self, queues: Vec<(BalloonQueue, Queue)>) -> ActiveQueues {
        ActiveQueues {
            mem: self.mem.clone(),
            queues: queues
                .into_iter()
                .enumerate()
                .map(|(i, (kind, queue))| ActiveQueue {
                    kind,
                    index: i as u16,
                    queue,
                })
                .collect(),
            stats_desc: None,
        }
    }

    /// Processes queue `pos` of `active` as the worker would.
    pub(crate) fn process(&self, active: &mut ActiveQueues, pos: usize) {
        let mut limiter = lock(&self.limiter);
        active.process(pos, &self.balloon.shared, &*self.interrupt, &mut limiter);
    }

    /// Writes little-endian PFNs at `gpa`; returns the buffer length.
    pub(crate) fn write_pfns(&self, gpa: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(gpa)).unwrap();
        bytes.len() as u32
    }

    /// Sets the acked features as a driver would.
    pub(crate) fn ack(&mut self, features: u64) {
        use virtio_device::VirtioDevice;
        self.balloon.set_acked_features(features);
    }

    /// Pages per state, from the map.
    pub(crate) fn state_of(&self, pfn: u64) -> crate::PageState {
        lock(&self.map).state(pfn).unwrap()
    }
}

/// The driver's side of one split queue.
pub(crate) struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
}

impl<'a> DriverQueue<'a> {
    /// A queue of 256 entries with its rings at `base`.
    pub(crate) fn new(mem: &'a GuestMemoryMmap, base: u64) -> Self {
        DriverQueue {
            mock: MockSplitQueue::create(mem, GuestAddress(base), crate::QUEUE_SIZE),
            next_desc: 0,
        }
    }

    /// The device-side queue, ready.
    pub(crate) fn queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    /// Makes a chain of `(gpa, len, flags)` descriptors available; `flags` may hold
    /// [`WRITE`]; `NEXT` is set as needed. Returns the head index.
    pub(crate) fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(gpa, len, flags))| {
                let idx = head + i as u16;
                let last = i + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(SplitDescriptor::new(gpa, len, flags, idx + 1))
            })
            .collect();
        self.mock.add_desc_chains(&raw, head).unwrap();
        self.next_desc = (head + descs.len() as u16) % crate::QUEUE_SIZE;
        head
    }

    /// Makes an arbitrary head index available (no descriptor written).
    pub(crate) fn add_raw_head(&mut self, head: u16) {
        let avail = self.mock.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % crate::QUEUE_SIZE))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
    }

    /// Entries in the used ring so far.
    pub(crate) fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// Used ring entry `i`: (descriptor head, length written).
    pub(crate) fn used(&self, i: u16) -> (u32, u32) {
        let elem = self
            .mock
            .used()
            .ring()
            .ref_at(usize::from(i % crate::QUEUE_SIZE))
            .unwrap()
            .load();
        (elem.id(), elem.len())
    }
}

/// A small deterministic PRNG (splitmix64) for property tests (`below`/`fill` come from
/// [`crate::queues::guest_input::Source`]).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Polls `cond` every 2 ms for up to 5 s.
pub(crate) fn wait_until(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    cond()
}

/// A non-blocking eventfd, as the transport's ioeventfds.
pub(crate) fn event() -> vmm_sys_util::eventfd::EventFd {
    vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap()
}

/// Base address of the rings of queue `index` in tests.
pub(crate) fn queue_base(index: usize) -> u64 {
    index as u64 * 0x4000
}

/// An activation context for `queues`, with fresh queue events (cloned copies returned for
/// notifying).
pub(crate) fn activate_ctx(
    env: &Env,
    queues: Vec<Queue>,
) -> (
    virtio_device::ActivateContext,
    Vec<vmm_sys_util::eventfd::EventFd>,
) {
    let events: Vec<_> = queues.iter().map(|_| event()).collect();
    let notifiers = events.iter().map(|e| e.try_clone().unwrap()).collect();
    let ctx = virtio_device::ActivateContext {
        mem: env.mem.clone(),
        queues,
        queue_events: events,
        interrupt: env.interrupt.clone(),
        write_log: None,
    };
    (ctx, notifiers)
}
