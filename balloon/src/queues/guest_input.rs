//! Hostile guest input for the balloon's queues: descriptor tables, available rings and buffer
//! contents drawn from a [`Source`] (a seeded PRNG in the property test, the fuzzer's bytes in
//! `fuzz/`). The device must not panic, must release only whole pages inside guest RAM, and must
//! keep the page-state map consistent ([`Harness::check`]).

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::device::lock;
use crate::queues::hint::HintingOptions;
use crate::queues::BalloonQueue;
use crate::test_utils::*;
use crate::{QUEUE_SIZE, VIRTIO_F_VERSION_1};

/// Where guest input comes from.
pub trait Source {
    /// The next 64 random bits.
    fn next(&mut self) -> u64;

    /// A number below `n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Fills `buf`.
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

impl Source for Rng {
    fn next(&mut self) -> u64 {
        Rng::next(self)
    }
}

/// The fuzzer's bytes, 8 at a time; zeros once they run out (see [`FuzzBytes::exhausted`]).
pub struct FuzzBytes<'a> {
    data: &'a [u8],
    /// Reads past the end.
    overrun: u32,
}

impl<'a> FuzzBytes<'a> {
    /// Wraps `data`.
    pub fn new(data: &'a [u8]) -> Self {
        FuzzBytes { data, overrun: 0 }
    }

    /// Whether the input is used up.
    pub fn exhausted(&self) -> bool {
        self.data.is_empty()
    }
}

impl Source for FuzzBytes<'_> {
    fn next(&mut self) -> u64 {
        let take = self.data.len().min(8);
        if take == 0 {
            self.overrun += 1;
        }
        let mut bytes = [0u8; 8];
        bytes[..take].copy_from_slice(&self.data[..take]);
        self.data = &self.data[take..];
        u64::from_le_bytes(bytes)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        // The first bytes of the buffer come verbatim from the fuzzer (at most 256, so input is
        // left for the rounds' choices); the rest from a PRNG the fuzzer seeds.
        let take = self.data.len().min(buf.len()).min(256);
        buf[..take].copy_from_slice(&self.data[..take]);
        self.data = &self.data[take..];
        let mut rng = Rng(self.next());
        for chunk in buf[take..].chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Guest RAM: 8 MiB at 0, a 4 MiB hole, 4 MiB at 12 MiB.
pub(crate) const REGIONS: [(u64, u64); 2] = [(0, 8 << 20), (12 << 20, 4 << 20)];

pub(crate) fn in_ram(gpa: u64, len: u64) -> bool {
    REGIONS
        .iter()
        .any(|&(start, size)| gpa >= start && gpa + len <= start + size)
}

/// An address a guest might put in a descriptor.
pub(crate) fn random_addr(rng: &mut impl Source) -> u64 {
    match rng.below(8) {
        0 => rng.next(),                     // anything
        1 => (8 << 20) - rng.below(64),      // end of region 0
        2 => (8 << 20) + rng.below(4 << 20), // the hole
        3 => (16 << 20) - rng.below(64),     // end of RAM
        4 => u64::MAX - rng.below(4096),     // wraps
        _ => (1 << 20) + rng.below(7 << 20), // data in region 0
    }
}

/// A length a guest might put in a descriptor.
pub(crate) fn random_len(rng: &mut impl Source) -> u32 {
    match rng.below(7) {
        0 => 0,
        1 => rng.below(16) as u32,
        2 => 4 * rng.below(300) as u32,
        3 => 10 * rng.below(20) as u32,
        4 => rng.next() as u32,
        5 => u32::MAX,
        _ => (rng.below(4 << 20) as u32) & !0xfff,
    }
}

/// A descriptor: half the time fully random, half the time what `kind` expects (with random
/// contents), so both rejection and acceptance paths run.
pub(crate) fn write_descriptor(
    env: &Env,
    kind: BalloonQueue,
    table: u64,
    index: u64,
    rng: &mut impl Source,
) {
    let (addr, len, flags, next) = if rng.below(2) == 0 {
        // NEXT, WRITE, INDIRECT in any combination.
        (
            random_addr(rng),
            random_len(rng),
            rng.below(8) as u16,
            rng.below(300) as u16,
        )
    } else {
        let addr = (1 << 20) + rng.below(6 << 20);
        match kind {
            BalloonQueue::Inflate | BalloonQueue::Deflate => {
                (addr & !3, 4 * (1 + rng.below(64)) as u32, 0, 0)
            }
            BalloonQueue::Stats => (addr, 10 * (1 + rng.below(16)) as u32, 0, 0),
            BalloonQueue::FreePageHint | BalloonQueue::Reporting => {
                (addr & !0xfff, 4096 * (1 + rng.below(512)) as u32, WRITE, 0)
            }
        }
    };
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    env.mem
        .write_slice(&raw, GuestAddress(table + 16 * index))
        .unwrap();
}

/// A balloon with every feature on, its five queues and a guest-acknowledged hinting run.
pub struct Harness {
    env: Env,
    active: crate::worker::ActiveQueues,
    rounds: u64,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// A fresh balloon over [`REGIONS`].
    pub fn new() -> Harness {
        let env = Env::with_regions(full_config(), &REGIONS);
        let drivers: Vec<DriverQueue> = (0..5)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)))
            .collect();
        let queues = BalloonQueue::ALL
            .iter()
            .zip(&drivers)
            .map(|(k, d)| (*k, d.queue()))
            .collect();
        drop(drivers);
        let active = env.active(queues);
        {
            let mut state = lock(&env.shared().state);
            state.acked_features = crate::avail_features(&full_config()) | VIRTIO_F_VERSION_1;
            let id = state.hint.start(HintingOptions::default());
            state.hint.on_guest_cmd_id(id);
        }
        Harness {
            env,
            active,
            rounds: 0,
        }
    }

    /// One round: guest buffers, descriptors and available entries on a random queue, the
    /// device processes the queue, sometimes a stats request, a new hinting run or a config read.
    pub fn round(&mut self, rng: &mut impl Source) {
        let (env, active) = (&self.env, &mut self.active);
        let kinds = BalloonQueue::ALL;
        self.rounds += 1;
        let mut chunk = vec![0u8; 64 << 10];
        // Random buffer contents: PFN arrays, statistics, command ids.
        rng.fill(&mut chunk);
        let at = (1 << 20) + rng.below((7 << 20) - chunk.len() as u64);
        env.mem.write_slice(&chunk, GuestAddress(at)).unwrap();
        // Sometimes put small PFNs and valid command ids where descriptors often point.
        if rng.below(2) == 0 {
            let pfns: Vec<u32> = (0..4096).map(|_| rng.below(6000) as u32).collect();
            env.write_pfns(((1 << 20) + rng.below(6 << 20)) & !3, &pfns);
        }

        let pos = rng.below(5) as usize;
        let base = queue_base(pos);
        let avail = base + 16 * u64::from(QUEUE_SIZE);
        for _ in 0..1 + rng.below(8) {
            write_descriptor(env, kinds[pos], base, rng.below(u64::from(QUEUE_SIZE)), rng);
        }
        let next_avail = active.queues[pos].queue.next_avail();
        let entries = rng.below(6) as u16;
        for k in 0..entries {
            let slot = u64::from(next_avail.wrapping_add(k) % QUEUE_SIZE);
            let head = if rng.below(10) == 0 {
                rng.next() as u16
            } else {
                rng.below(u64::from(QUEUE_SIZE)) as u16
            };
            env.mem
                .write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * slot))
                .unwrap();
        }
        let idx = if rng.below(40) == 0 {
            rng.next() as u16 // impossible index: the queue refuses it
        } else {
            next_avail.wrapping_add(entries)
        };
        env.mem
            .write_obj(idx.to_le(), GuestAddress(avail + 2))
            .unwrap();
        env.process(active, pos);

        match rng.below(10) {
            0 => {
                let mut limiter = crate::ratelimit::LogLimiter::new();
                active.request_stats(&*env.interrupt, &mut limiter);
            }
            1 => {
                let mut state = lock(&env.shared().state);
                let id = state.hint.start(HintingOptions::default());
                state.hint.on_guest_cmd_id(id);
            }
            2 => {
                use virtio_device::VirtioDevice;
                let mut buf = vec![0u8; rng.below(40) as usize];
                let offset = if rng.below(2) == 0 {
                    rng.below(32)
                } else {
                    rng.next()
                };
                env.balloon.read_config(offset, &mut buf);
            }
            _ => {}
        }
    }

    /// Checks the invariants: every release is whole pages inside guest RAM; the page-state map
    /// covers exactly guest RAM and its counts agree with the state of every page.
    pub fn check(&self) -> Result<(), String> {
        for (gpa, len) in self.env.releaser.calls() {
            if !(gpa % 4096 == 0 && len % 4096 == 0 && len > 0 && in_ram(gpa, len)) {
                return Err(format!("round {}: released {gpa:#x}+{len:#x}", self.rounds));
            }
        }
        let map = lock(&self.env.map);
        let counts = map.count_by_state();
        let ram_pages: u64 = REGIONS.iter().map(|r| r.1 / 4096).sum();
        if counts.total_pages() != ram_pages {
            return Err(format!("{counts:?} does not cover {ram_pages} pages"));
        }
        let mut by_pfn = crate::page_state::PageStateCounts::default();
        for &(start, len) in &REGIONS {
            for pfn in start / 4096..(start + len) / 4096 {
                match map.state(pfn) {
                    Ok(crate::PageState::Live) => by_pfn.live_pages += 1,
                    Ok(crate::PageState::Inflated) => by_pfn.inflated_pages += 1,
                    Ok(crate::PageState::Reported) => by_pfn.reported_pages += 1,
                    Ok(crate::PageState::Hinted) => by_pfn.hinted_pages += 1,
                    Err(e) => return Err(format!("pfn {pfn} in RAM has no state: {e}")),
                }
            }
        }
        if by_pfn != counts {
            return Err(format!("counts {counts:?} but pages say {by_pfn:?}"));
        }
        Ok(())
    }

    /// The device's counters.
    pub fn counters(&self) -> crate::BalloonCounters {
        self.env.shared().counters.snapshot()
    }
}

/// Runs fuzzer input through the balloon's queues; panics when an invariant breaks.
pub fn fuzz_queues(data: &[u8]) {
    let mut harness = Harness::new();
    let mut input = FuzzBytes::new(data);
    while !input.exhausted() {
        harness.round(&mut input);
        if let Err(broken) = harness.check() {
            panic!("balloon invariant broken: {broken}");
        }
    }
}
