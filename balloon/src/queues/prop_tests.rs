//! Property-style test: random descriptor tables, available rings and buffer contents on every
//! queue, from a seeded PRNG. The device must not panic, must release only whole pages inside
//! guest RAM, and must keep the page-state map consistent.

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::device::lock;
use crate::queues::hint::HintingOptions;
use crate::queues::BalloonQueue;
use crate::test_utils::*;
use crate::{QUEUE_SIZE, VIRTIO_F_VERSION_1};

/// Guest RAM: 8 MiB at 0, a 4 MiB hole, 4 MiB at 12 MiB.
const REGIONS: [(u64, u64); 2] = [(0, 8 << 20), (12 << 20, 4 << 20)];

fn in_ram(gpa: u64, len: u64) -> bool {
    REGIONS
        .iter()
        .any(|&(start, size)| gpa >= start && gpa + len <= start + size)
}

/// An address a guest might put in a descriptor.
fn random_addr(rng: &mut Rng) -> u64 {
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
fn random_len(rng: &mut Rng) -> u32 {
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
fn write_descriptor(env: &Env, kind: BalloonQueue, table: u64, index: u64, rng: &mut Rng) {
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

#[test]
fn random_guest_input_never_escapes_guest_ram() {
    for seed in [1u64, 0xdead_beef, 42, 0x1234_5678_9abc_def0] {
        let mut rng = Rng(seed);
        let env = Env::with_regions(full_config(), &REGIONS);
        let drivers: Vec<DriverQueue> = (0..5)
            .map(|i| DriverQueue::new(&env.mem, queue_base(i)))
            .collect();
        let kinds = BalloonQueue::ALL;
        let mut active = env.active(
            kinds
                .iter()
                .zip(&drivers)
                .map(|(k, d)| (*k, d.queue()))
                .collect(),
        );
        // A hinting run the guest has acknowledged, so hints are taken.
        {
            let mut state = lock(&env.shared().state);
            state.acked_features = crate::avail_features(&full_config()) | VIRTIO_F_VERSION_1;
            let id = state.hint.start(HintingOptions::default());
            state.hint.on_guest_cmd_id(id);
        }
        let mut chunk = vec![0u8; 64 << 10];
        for round in 0..400 {
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
                write_descriptor(
                    &env,
                    kinds[pos],
                    base,
                    rng.below(u64::from(QUEUE_SIZE)),
                    &mut rng,
                );
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
            env.process(&mut active, pos);

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

            for (gpa, len) in env.releaser.calls() {
                assert!(
                    gpa % 4096 == 0 && len % 4096 == 0 && len > 0 && in_ram(gpa, len),
                    "seed {seed} round {round}: released {gpa:#x}+{len:#x}"
                );
            }
            let counts = lock(&env.map).count_by_state();
            assert_eq!(counts.total_pages(), (12 << 20) / 4096);
        }
        // The device did real work, not only rejections.
        let c = env.shared().counters.snapshot();
        assert!(c.invalid_buffers > 0, "seed {seed}: {c:?}");
        assert!(
            c.pages_inflated + c.pages_reported + c.pages_hinted > 0,
            "seed {seed}: {c:?}"
        );
    }
}
