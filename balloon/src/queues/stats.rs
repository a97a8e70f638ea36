//! statsq (virtio 1.2 §5.5.6.3, `VIRTIO_BALLOON_F_STATS_VQ`): guest memory statistics.
//!
//! The protocol inverts the usual roles: right after initialisation the driver puts one
//! device-readable buffer of `struct virtio_balloon_stat { le16 tag; le64 val; }` entries (10
//! bytes each, packed) in the queue. The device keeps ("holds") it; to ask for fresh numbers it
//! returns the buffer (used ring + interrupt), and the driver refills it and makes it available
//! again. The device returns it once per polling interval.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    collect_buffers, complete_chain, pop_chain, read_buffers, BalloonQueue, ChainError, ChainRules,
    Direction, QueueCtx,
};
use crate::device::lock;

/// Amount of memory swapped in, in bytes.
pub const VIRTIO_BALLOON_S_SWAP_IN: u16 = 0;
/// Amount of memory swapped out, in bytes.
pub const VIRTIO_BALLOON_S_SWAP_OUT: u16 = 1;
/// Number of major page faults.
pub const VIRTIO_BALLOON_S_MAJFLT: u16 = 2;
/// Number of minor page faults.
pub const VIRTIO_BALLOON_S_MINFLT: u16 = 3;
/// Free memory, in bytes.
pub const VIRTIO_BALLOON_S_MEMFREE: u16 = 4;
/// Total memory, in bytes.
pub const VIRTIO_BALLOON_S_MEMTOT: u16 = 5;
/// Available memory (Linux `MemAvailable`), in bytes.
pub const VIRTIO_BALLOON_S_AVAIL: u16 = 6;
/// Disk caches, in bytes.
pub const VIRTIO_BALLOON_S_CACHES: u16 = 7;
/// Successful hugetlb page allocations.
pub const VIRTIO_BALLOON_S_HTLB_PGALLOC: u16 = 8;
/// Failed hugetlb page allocations.
pub const VIRTIO_BALLOON_S_HTLB_PGFAIL: u16 = 9;
/// OOM killer invocations (Linux 6.12+).
pub const VIRTIO_BALLOON_S_OOM_KILL: u16 = 10;
/// Memory allocation stalls (Linux 6.12+).
pub const VIRTIO_BALLOON_S_ALLOC_STALL: u16 = 11;
/// Memory scanned asynchronously (kswapd), in bytes (Linux 6.12+).
pub const VIRTIO_BALLOON_S_ASYNC_SCAN: u16 = 12;
/// Memory scanned directly, in bytes (Linux 6.12+).
pub const VIRTIO_BALLOON_S_DIRECT_SCAN: u16 = 13;
/// Memory reclaimed asynchronously (kswapd), in bytes (Linux 6.12+).
pub const VIRTIO_BALLOON_S_ASYNC_RECLAIM: u16 = 14;
/// Memory reclaimed directly, in bytes (Linux 6.12+).
pub const VIRTIO_BALLOON_S_DIRECT_RECLAIM: u16 = 15;

/// Size of one statistics entry in bytes.
pub const STAT_ENTRY_BYTES: usize = 10;

/// Most bytes accepted in a statistics buffer (Linux 6.12 sends 16 entries, 160 bytes).
pub const MAX_STATS_BUFFER_BYTES: u64 = 4096;

/// What statsq accepts in a chain.
const STATS_CHAIN_RULES: ChainRules = ChainRules {
    direction: Direction::DeviceReadable,
    unit_bytes: STAT_ENTRY_BYTES as u32,
    max_total_bytes: MAX_STATS_BUFFER_BYTES,
};

/// The guest's latest memory statistics (the `GET /balloon/statistics` body). A field is
/// `None` (omitted in JSON) when the guest did not report it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStats {
    /// Memory swapped in since boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in_bytes: Option<u64>,
    /// Memory swapped out since boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out_bytes: Option<u64>,
    /// Major page faults since boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults since boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Memory the guest does not use at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory_bytes: Option<u64>,
    /// Memory the guest's kernel manages (excludes the balloon on Linux).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory_bytes: Option<u64>,
    /// Memory available for new work without swapping (Linux `MemAvailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory_bytes: Option<u64>,
    /// Memory used by disk caches, reclaimable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches_bytes: Option<u64>,
    /// Successful hugetlb page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
    /// Allocation stalls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stalls: Option<u64>,
    /// Memory scanned by kswapd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan_bytes: Option<u64>,
    /// Memory scanned by direct reclaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan_bytes: Option<u64>,
    /// Memory reclaimed by kswapd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim_bytes: Option<u64>,
    /// Memory reclaimed by direct reclaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim_bytes: Option<u64>,
    /// Entries with tags this device does not know, by tag (last value wins).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown_tags: BTreeMap<u16, u64>,
    /// Time since the guest sent these numbers, in milliseconds.
    pub updated_ms_ago: u64,
}

impl BalloonStats {
    /// Parses a statistics buffer: whole 10-byte entries; a trailing partial entry is ignored.
    /// Repeated tags keep the last value; unknown tags go to `unknown_tags`.
    pub fn parse(bytes: &[u8]) -> BalloonStats {
        let mut stats = BalloonStats::default();
        for entry in bytes.chunks_exact(STAT_ENTRY_BYTES) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut val = [0u8; 8];
            val.copy_from_slice(&entry[2..10]);
            stats.set(tag, u64::from_le_bytes(val));
        }
        stats
    }

    /// Records one entry.
    fn set(&mut self, tag: u16, val: u64) {
        let field = match tag {
            VIRTIO_BALLOON_S_SWAP_IN => &mut self.swap_in_bytes,
            VIRTIO_BALLOON_S_SWAP_OUT => &mut self.swap_out_bytes,
            VIRTIO_BALLOON_S_MAJFLT => &mut self.major_faults,
            VIRTIO_BALLOON_S_MINFLT => &mut self.minor_faults,
            VIRTIO_BALLOON_S_MEMFREE => &mut self.free_memory_bytes,
            VIRTIO_BALLOON_S_MEMTOT => &mut self.total_memory_bytes,
            VIRTIO_BALLOON_S_AVAIL => &mut self.available_memory_bytes,
            VIRTIO_BALLOON_S_CACHES => &mut self.disk_caches_bytes,
            VIRTIO_BALLOON_S_HTLB_PGALLOC => &mut self.hugetlb_allocations,
            VIRTIO_BALLOON_S_HTLB_PGFAIL => &mut self.hugetlb_failures,
            VIRTIO_BALLOON_S_OOM_KILL => &mut self.oom_kills,
            VIRTIO_BALLOON_S_ALLOC_STALL => &mut self.alloc_stalls,
            VIRTIO_BALLOON_S_ASYNC_SCAN => &mut self.async_scan_bytes,
            VIRTIO_BALLOON_S_DIRECT_SCAN => &mut self.direct_scan_bytes,
            VIRTIO_BALLOON_S_ASYNC_RECLAIM => &mut self.async_reclaim_bytes,
            VIRTIO_BALLOON_S_DIRECT_RECLAIM => &mut self.direct_reclaim_bytes,
            _ => {
                self.unknown_tags.insert(tag, val);
                return;
            }
        };
        *field = Some(val);
    }
}

/// The latest statistics and when they arrived.
#[derive(Debug, Clone)]
pub(crate) struct StatsSnapshot {
    /// The numbers (`updated_ms_ago` unused here).
    pub(crate) stats: BalloonStats,
    /// When the buffer was processed.
    pub(crate) received_at: Instant,
}

impl StatsSnapshot {
    /// The statistics with their age filled in.
    pub(crate) fn to_stats(&self) -> BalloonStats {
        let age_ms = self.received_at.elapsed().as_millis();
        BalloonStats {
            updated_ms_ago: u64::try_from(age_ms).unwrap_or(u64::MAX),
            ..self.stats.clone()
        }
    }
}

/// Validates a statistics chain and parses it.
fn read_stats(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<BalloonStats, ChainError> {
    let buffers = collect_buffers(chain, mem, &STATS_CHAIN_RULES)?;
    let bytes = read_buffers(mem, &buffers)?;
    Ok(BalloonStats::parse(&bytes))
}

/// Takes every available statistics buffer: records its numbers and holds it in `held`
/// (returning a previously held one, which the driver should not have made available twice).
/// Malformed buffers are returned at once. Returns how many buffers went to the used ring.
pub(crate) fn process_queue(
    ctx: &mut QueueCtx<'_>,
    queue: &mut Queue,
    held: &mut Option<u16>,
) -> Result<usize, virtio_queue::Error> {
    let mut used = 0;
    while let Some(chain) = pop_chain(queue, ctx.mem)? {
        let head = chain.head_index();
        match read_stats(ctx.mem, chain) {
            Ok(stats) => {
                lock(&ctx.shared.state).stats = Some(StatsSnapshot {
                    stats,
                    received_at: Instant::now(),
                });
                let counters = &ctx.shared.counters;
                counters.add(&counters.stats_updates, 1);
                if head >= queue.size() {
                    // Cannot be completed later either; nothing to hold.
                    continue;
                }
                if let Some(previous) = held.replace(head) {
                    crate::ratelimit::guest_warn!(
                        ctx.limiter,
                        previous,
                        head,
                        "balloon: guest made a second statistics buffer available; returning the first"
                    );
                    queue.add_used(ctx.mem, previous, 0)?;
                    used += 1;
                }
            }
            Err(err) => {
                ctx.skip_chain(BalloonQueue::Stats, head, &err);
                if complete_chain(queue, ctx.mem, head, 0)? {
                    used += 1;
                }
            }
        }
    }
    Ok(used)
}

/// Returns the held statistics buffer, asking the guest for fresh numbers. Returns whether a
/// buffer was returned.
pub(crate) fn request_update(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    held: &mut Option<u16>,
) -> Result<bool, virtio_queue::Error> {
    match held.take() {
        Some(head) => complete_chain(queue, mem, head, 0),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, val: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&val.to_le_bytes());
        e
    }

    #[test]
    fn parses_every_known_tag_and_unknown_ones() {
        let mut bytes = Vec::new();
        for tag in 0..16u16 {
            bytes.extend(entry(tag, 1000 + u64::from(tag)));
        }
        bytes.extend(entry(16, 7));
        bytes.extend(entry(0xffff, u64::MAX));
        bytes.extend(entry(VIRTIO_BALLOON_S_MEMFREE, 42)); // repeated: last wins
        bytes.extend([1, 2, 3]); // trailing partial entry
        let s = BalloonStats::parse(&bytes);
        assert_eq!(s.swap_in_bytes, Some(1000));
        assert_eq!(s.swap_out_bytes, Some(1001));
        assert_eq!(s.major_faults, Some(1002));
        assert_eq!(s.minor_faults, Some(1003));
        assert_eq!(s.free_memory_bytes, Some(42));
        assert_eq!(s.total_memory_bytes, Some(1005));
        assert_eq!(s.available_memory_bytes, Some(1006));
        assert_eq!(s.disk_caches_bytes, Some(1007));
        assert_eq!(s.hugetlb_allocations, Some(1008));
        assert_eq!(s.hugetlb_failures, Some(1009));
        assert_eq!(s.oom_kills, Some(1010));
        assert_eq!(s.alloc_stalls, Some(1011));
        assert_eq!(s.async_scan_bytes, Some(1012));
        assert_eq!(s.direct_scan_bytes, Some(1013));
        assert_eq!(s.async_reclaim_bytes, Some(1014));
        assert_eq!(s.direct_reclaim_bytes, Some(1015));
        assert_eq!(
            s.unknown_tags,
            BTreeMap::from([(16, 7), (0xffff, u64::MAX)])
        );
    }

    #[test]
    fn missing_tags_are_omitted_from_json() {
        let s = BalloonStats::parse(&entry(VIRTIO_BALLOON_S_AVAIL, 4096));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"available_memory_bytes": 4096, "updated_ms_ago": 0})
        );
        assert_eq!(BalloonStats::parse(&[]), BalloonStats::default());
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;
    use crate::queues::BalloonQueue;
    use crate::test_utils::*;
    use vm_memory::{Bytes, GuestAddress};

    fn write_stats(env: &Env, gpa: u64, entries: &[(u16, u64)]) -> u32 {
        let bytes: Vec<u8> = entries
            .iter()
            .flat_map(|&(tag, val)| {
                let mut e = tag.to_le_bytes().to_vec();
                e.extend_from_slice(&val.to_le_bytes());
                e
            })
            .collect();
        env.mem.write_slice(&bytes, GuestAddress(gpa)).unwrap();
        bytes.len() as u32
    }

    #[test]
    fn buffer_is_held_and_returned_on_request() {
        let env = Env::new(full_config());
        let handle = env.balloon.handle();
        let mut statsq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::Stats, statsq.queue())]);
        assert!(handle.statistics().is_none());

        let len = write_stats(
            &env,
            DATA_GPA,
            &[
                (VIRTIO_BALLOON_S_MEMFREE, 100 << 20),
                (VIRTIO_BALLOON_S_MEMTOT, 500 << 20),
                (99, 5),
            ],
        );
        let head = statsq.add_chain(&[(DATA_GPA, len, 0)]);
        env.process(&mut active, 0);
        // Held: nothing in the used ring, no interrupt.
        assert_eq!(statsq.used_idx(), 0);
        assert!(env.interrupt.used().is_empty());
        assert_eq!(active.stats_desc, Some(head));
        let stats = handle.statistics().unwrap();
        assert_eq!(stats.free_memory_bytes, Some(100 << 20));
        assert_eq!(stats.total_memory_bytes, Some(500 << 20));
        assert_eq!(stats.unknown_tags, BTreeMap::from([(99, 5)]));
        assert!(stats.updated_ms_ago < 60_000);

        // The timer fires: the buffer goes back to the guest.
        let mut limiter = crate::ratelimit::LogLimiter::new();
        active.request_stats(&*env.interrupt, &mut limiter);
        assert_eq!(statsq.used_idx(), 1);
        assert_eq!(statsq.used(0), (u32::from(head), 0));
        assert_eq!(env.interrupt.used(), vec![0]);
        assert_eq!(active.stats_desc, None);
        // Nothing held: a second tick does nothing.
        active.request_stats(&*env.interrupt, &mut limiter);
        assert_eq!(statsq.used_idx(), 1);

        // The guest refills it; the new numbers replace the old.
        write_stats(
            &env,
            DATA_GPA,
            &[(VIRTIO_BALLOON_S_MEMFREE, 1), (0, 2), (1, 3)],
        );
        statsq.add_chain(&[(DATA_GPA, 30, 0)]);
        env.process(&mut active, 0);
        let stats = handle.statistics().unwrap();
        assert_eq!(stats.free_memory_bytes, Some(1));
        assert_eq!(stats.swap_in_bytes, Some(2));
        assert_eq!(stats.total_memory_bytes, None);
        assert_eq!(env.shared().counters.snapshot().stats_updates, 2);
    }

    #[test]
    fn second_buffer_returns_the_first_and_malformed_ones_go_back() {
        let env = Env::new(full_config());
        let mut statsq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::Stats, statsq.queue())]);
        let len = write_stats(&env, DATA_GPA, &[(VIRTIO_BALLOON_S_AVAIL, 7)]);
        let first = statsq.add_chain(&[(DATA_GPA, len, 0)]);
        let second = statsq.add_chain(&[(DATA_GPA, len, 0)]);
        let bad_len = statsq.add_chain(&[(DATA_GPA, 7, 0)]);
        let bad_dir = statsq.add_chain(&[(DATA_GPA, len, WRITE)]);
        env.process(&mut active, 0);
        assert_eq!(statsq.used_idx(), 3);
        assert_eq!(statsq.used(0).0, u32::from(first));
        assert_eq!(statsq.used(1).0, u32::from(bad_len));
        assert_eq!(statsq.used(2).0, u32::from(bad_dir));
        assert_eq!(active.stats_desc, Some(second));
        assert_eq!(env.shared().counters.snapshot().invalid_buffers, 2);
    }
}
