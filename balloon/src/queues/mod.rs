//! The balloon's virtqueues (virtio 1.2 §5.5.2) and what they share: which queue has which
//! index, validation of guest descriptor chains, and applying page ranges to the page-state map
//! and the host.
//!
//! Everything a guest puts in a queue is untrusted. A chain that breaks the rules of its queue
//! (wrong direction, zero or odd length, outside guest memory, too many descriptors or bytes) is
//! skipped as a whole, logged (rate-limited) and completed, so the driver gets its buffer back
//! and the device never touches memory outside the guest. Page frame numbers outside guest RAM
//! are ignored one by one; the rest of their buffer is applied.

pub mod deflate;
pub mod hint;
pub mod inflate;
pub mod report;
pub mod stats;

#[cfg(any(test, feature = "fuzzing"))]
pub mod guest_input;
#[cfg(test)]
mod prop_tests;

use std::ops::Range;

use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::device::{
    Shared, VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};
use crate::page_state::{GuestRamRegion, PageState, PAGE_SIZE_BYTES};
use crate::ratelimit::{guest_warn, LogLimiter};

/// Size offered for every queue. Linux needs at least 32 for the reporting queue (one chain of
/// up to 32 blocks) and puts one buffer at a time in the others.
pub const QUEUE_SIZE: u16 = 256;

/// Most descriptors accepted in one chain (direct or indirect).
pub(crate) const MAX_CHAIN_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// log2 of [`PAGE_SIZE_BYTES`].
const PAGE_SHIFT: u32 = 12;

/// One of the balloon's virtqueues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalloonQueue {
    /// `inflateq`: PFNs the guest gives to the balloon.
    Inflate,
    /// `deflateq`: PFNs the guest takes back.
    Deflate,
    /// `statsq`: the guest's memory statistics (`VIRTIO_BALLOON_F_STATS_VQ`).
    Stats,
    /// `free_page_vq`: free page hints (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`).
    FreePageHint,
    /// `reporting_vq`: free page reports (`VIRTIO_BALLOON_F_REPORTING`).
    Reporting,
}

impl BalloonQueue {
    /// All queues in spec order.
    pub const ALL: [BalloonQueue; 5] = [
        BalloonQueue::Inflate,
        BalloonQueue::Deflate,
        BalloonQueue::Stats,
        BalloonQueue::FreePageHint,
        BalloonQueue::Reporting,
    ];

    /// The feature bit that makes the queue exist, if it is optional.
    pub fn feature(self) -> Option<u64> {
        match self {
            BalloonQueue::Inflate | BalloonQueue::Deflate => None,
            BalloonQueue::Stats => Some(VIRTIO_BALLOON_F_STATS_VQ),
            BalloonQueue::FreePageHint => Some(VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            BalloonQueue::Reporting => Some(VIRTIO_BALLOON_F_REPORTING),
        }
    }

    /// The spec's name of the queue.
    pub fn name(self) -> &'static str {
        match self {
            BalloonQueue::Inflate => "inflateq",
            BalloonQueue::Deflate => "deflateq",
            BalloonQueue::Stats => "statsq",
            BalloonQueue::FreePageHint => "free_page_vq",
            BalloonQueue::Reporting => "reporting_vq",
        }
    }
}

/// The queues that exist when `features` are in effect, in queue-index order.
///
/// inflateq and deflateq always exist (indices 0 and 1); statsq, free_page_vq and reporting_vq
/// follow in that order, each only if its feature is set, and a queue that does not exist takes
/// no index: with `REPORTING` alone, reporting_vq is queue 2. This is how Linux numbers them
/// (`virtio_find_vqs` skips unnamed queues and gives the next existing queue the next index),
/// so pass the *negotiated* features to know where the guest put each queue; pass the offered
/// features to know how many queues to expose.
pub fn queue_layout(features: u64) -> Vec<BalloonQueue> {
    BalloonQueue::ALL
        .into_iter()
        .filter(|q| q.feature().is_none_or(|bit| features & bit != 0))
        .collect()
}

/// Index of `queue` when `features` are in effect, or `None` if it does not exist.
pub fn queue_index(features: u64, queue: BalloonQueue) -> Option<u16> {
    queue_layout(features)
        .iter()
        .position(|q| *q == queue)
        .map(|i| i as u16)
}

/// Which way the device uses a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// The device reads it (the driver's "out" buffer): PFN arrays, statistics, command ids.
    DeviceReadable,
    /// The driver marked it device-writable ("in" buffer): reported and hinted free pages.
    DeviceWritable,
}

/// What a queue accepts in one chain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChainRules {
    /// Direction every descriptor must have.
    pub(crate) direction: Direction,
    /// Every descriptor's length must be a non-zero multiple of this.
    pub(crate) unit_bytes: u32,
    /// Most bytes accepted in the whole chain.
    pub(crate) max_total_bytes: u64,
}

/// One guest buffer of a validated chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Buffer {
    /// Guest physical address of the first byte.
    pub(crate) gpa: u64,
    /// Length in bytes (non-zero).
    pub(crate) len_bytes: u32,
}

/// Why a chain was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChainError {
    /// The chain has no descriptor the device could read (e.g. a head index past the table).
    #[error("no readable descriptor")]
    Empty,
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    #[error("more than {max} descriptors")]
    TooManyDescriptors {
        /// [`MAX_CHAIN_DESCRIPTORS`].
        max: usize,
    },
    /// More bytes than the queue accepts.
    #[error("more than {max_bytes} bytes")]
    TooLong {
        /// The queue's limit.
        max_bytes: u64,
    },
    /// Fewer bytes than the message needs.
    #[error("{len_bytes} bytes, at least {min_bytes} needed")]
    TooShort {
        /// Bytes in the chain.
        len_bytes: u64,
        /// Bytes needed.
        min_bytes: u64,
    },
    /// A descriptor has the wrong direction.
    #[error("descriptor {index}: {found:?}, expected {expected:?}")]
    WrongDirection {
        /// Position in the chain.
        index: usize,
        /// Its direction.
        found: Direction,
        /// The queue's direction.
        expected: Direction,
    },
    /// A descriptor has length zero.
    #[error("descriptor {index}: zero length")]
    ZeroLength {
        /// Position in the chain.
        index: usize,
    },
    /// A descriptor's length is not a multiple of the queue's unit.
    #[error("descriptor {index}: length {len_bytes} is not a multiple of {unit_bytes}")]
    BadLength {
        /// Position in the chain.
        index: usize,
        /// Its length.
        len_bytes: u32,
        /// The queue's unit.
        unit_bytes: u32,
    },
    /// A descriptor points outside guest memory.
    #[error("descriptor {index}: {gpa:#x}+{len_bytes:#x} is outside guest memory")]
    OutsideMemory {
        /// Position in the chain.
        index: usize,
        /// Its address.
        gpa: u64,
        /// Its length.
        len_bytes: u32,
    },
    /// Reading a validated buffer failed.
    #[error("reading the buffer from guest memory failed")]
    Unreadable,
}

/// Walks `chain` and checks every descriptor against `rules`; returns the buffers, or why the
/// chain must be skipped. Never reads the buffers' contents.
pub(crate) fn collect_buffers(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    rules: &ChainRules,
) -> Result<Vec<Buffer>, ChainError> {
    let mut buffers = Vec::new();
    let mut total_bytes = 0u64;
    for (index, desc) in chain.enumerate() {
        if index >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors {
                max: MAX_CHAIN_DESCRIPTORS,
            });
        }
        let buffer = check_descriptor(index, &desc, mem, rules)?;
        total_bytes += u64::from(buffer.len_bytes);
        if total_bytes > rules.max_total_bytes {
            return Err(ChainError::TooLong {
                max_bytes: rules.max_total_bytes,
            });
        }
        buffers.push(buffer);
    }
    if buffers.is_empty() {
        return Err(ChainError::Empty);
    }
    Ok(buffers)
}

/// Checks one descriptor against `rules`.
fn check_descriptor(
    index: usize,
    desc: &Descriptor,
    mem: &GuestMemoryMmap,
    rules: &ChainRules,
) -> Result<Buffer, ChainError> {
    let found = if desc.is_write_only() {
        Direction::DeviceWritable
    } else {
        Direction::DeviceReadable
    };
    if found != rules.direction {
        return Err(ChainError::WrongDirection {
            index,
            found,
            expected: rules.direction,
        });
    }
    let len_bytes = desc.len();
    if len_bytes == 0 {
        return Err(ChainError::ZeroLength { index });
    }
    if len_bytes % rules.unit_bytes != 0 {
        return Err(ChainError::BadLength {
            index,
            len_bytes,
            unit_bytes: rules.unit_bytes,
        });
    }
    let gpa = desc.addr().0;
    if !GuestMemoryBackend::check_range(mem, GuestAddress(gpa), len_bytes as usize) {
        return Err(ChainError::OutsideMemory {
            index,
            gpa,
            len_bytes,
        });
    }
    Ok(Buffer { gpa, len_bytes })
}

/// Reads the contents of validated `buffers`, concatenated. Fails only if guest memory refuses
/// a read, which it should not after [`collect_buffers`] checked the ranges.
pub(crate) fn read_buffers(
    mem: &GuestMemoryMmap,
    buffers: &[Buffer],
) -> Result<Vec<u8>, ChainError> {
    let total: usize = buffers.iter().map(|b| b.len_bytes as usize).sum();
    let mut bytes = vec![0u8; total];
    let mut at = 0;
    for b in buffers {
        let end = at + b.len_bytes as usize;
        mem.read_slice(&mut bytes[at..end], GuestAddress(b.gpa))
            .map_err(|_| ChainError::Unreadable)?;
        at = end;
    }
    Ok(bytes)
}

/// Sorts and deduplicates `pfns` and merges consecutive frames into ranges of frame numbers.
pub(crate) fn coalesce_pfns(pfns: &mut [u32]) -> Vec<Range<u64>> {
    pfns.sort_unstable();
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for &pfn in pfns.iter() {
        let pfn = u64::from(pfn);
        match ranges.last_mut() {
            Some(last) if last.end == pfn => last.end += 1,
            Some(last) if last.end > pfn => {} // duplicate
            _ => ranges.push(pfn..pfn + 1),
        }
    }
    ranges
}

/// The whole pages inside a guest buffer, as a range of frame numbers (possibly empty).
pub(crate) fn whole_pages(gpa: u64, len_bytes: u64) -> Range<u64> {
    let start = gpa.div_ceil(PAGE_SIZE_BYTES);
    let end = gpa.saturating_add(len_bytes) / PAGE_SIZE_BYTES;
    start..end.max(start)
}

/// Splits `pfns` into its parts inside the RAM regions of `layout` (sorted by address).
/// Returns the parts and the number of pages outside RAM.
pub(crate) fn clip_to_ram(layout: &[GuestRamRegion], pfns: Range<u64>) -> (Vec<Range<u64>>, u64) {
    let mut parts = Vec::new();
    let mut inside = 0;
    for region in layout {
        let r = region.pfns();
        let start = pfns.start.max(r.start);
        let end = pfns.end.min(r.end);
        if start < end {
            inside += end - start;
            parts.push(start..end);
        }
    }
    let total = pfns.end.saturating_sub(pfns.start);
    (parts, total - inside)
}

/// The whole guest pages (frame numbers) that `buffers` cover; partial pages at either end
/// are left out (a free-page buffer says nothing about the rest of a page).
pub(crate) fn buffer_page_ranges(buffers: &[Buffer]) -> Vec<Range<u64>> {
    buffers
        .iter()
        .map(|b| whole_pages(b.gpa, u64::from(b.len_bytes)))
        .filter(|r| !r.is_empty())
        .collect()
}

/// What [`apply_page_ranges`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Pages set to the requested state.
    pub(crate) pages: u64,
    /// Pages skipped because they are not guest RAM.
    pub(crate) pages_outside_ram: u64,
}

/// Sets the pages in `ranges` (frame numbers) to `state` in the page-state map, and releases
/// them on the host if `release`. Pages outside guest RAM (the map's layout and the guest
/// memory) are skipped and counted (also in the `pages_outside_ram` counter). The map lock is not held while releasing.
pub(crate) fn apply_page_ranges(
    ctx: &mut QueueCtx<'_>,
    ranges: &[Range<u64>],
    state: PageState,
    release: bool,
    queue: BalloonQueue,
) -> Applied {
    let mut applied = Applied::default();
    let mut marked: Vec<Range<u64>> = Vec::new();
    let mut clipped: Vec<Range<u64>> = Vec::new();
    for range in ranges {
        let (parts, outside) = clip_to_ram(&ctx.shared.ram_layout, range.clone());
        applied.pages_outside_ram += outside;
        for part in parts {
            let gpa = part.start << PAGE_SHIFT;
            let len_bytes = (part.end - part.start) << PAGE_SHIFT;
            if GuestMemoryBackend::check_range(ctx.mem, GuestAddress(gpa), len_bytes as usize) {
                clipped.push(part);
            } else {
                applied.pages_outside_ram += part.end - part.start;
            }
        }
    }
    if applied.pages_outside_ram > 0 {
        guest_warn!(
            ctx.limiter,
            queue = queue.name(),
            pages = applied.pages_outside_ram,
            "balloon: guest sent pages outside guest RAM; ignored"
        );
    }
    let tracker = match state {
        PageState::Live => None,
        _ => crate::device::lock(&ctx.shared.write_tracker).clone(),
    };
    {
        let mut map = crate::device::lock(&ctx.shared.page_states);
        // Writes the guest made before handing these pages over must not count as writes
        // after the mark: apply them first, under the same lock hold.
        if let Some(tracker) = tracker {
            if let Err(err) = tracker.sync_into(&mut map) {
                tracing::warn!(%err, "balloon: syncing guest writes before marking pages failed");
            }
        }
        for part in clipped {
            let gpa = part.start << PAGE_SHIFT;
            let len_bytes = (part.end - part.start) << PAGE_SHIFT;
            match map.mark_range(gpa, len_bytes, state) {
                Ok(()) => {
                    applied.pages += part.end - part.start;
                    marked.push(part);
                }
                Err(err) => {
                    // The map's layout no longer matches the one the device was built with.
                    tracing::error!(queue = queue.name(), %err, "balloon: cannot mark pages");
                    applied.pages_outside_ram += part.end - part.start;
                }
            }
        }
    }
    if release {
        for part in marked {
            release_range(ctx, part, queue);
        }
    }
    let counters = &ctx.shared.counters;
    counters.add(&counters.pages_outside_ram, applied.pages_outside_ram);
    applied
}

/// Releases the pages `pfns` on the host and accounts for it.
fn release_range(ctx: &mut QueueCtx<'_>, pfns: Range<u64>, queue: BalloonQueue) {
    let gpa = pfns.start << PAGE_SHIFT;
    let len_bytes = (pfns.end - pfns.start) << PAGE_SHIFT;
    let counters = &ctx.shared.counters;
    match ctx.shared.releaser.release(gpa, len_bytes) {
        Ok(()) => counters.add(&counters.bytes_released, len_bytes),
        Err(err) => {
            counters.add(&counters.release_errors, 1);
            guest_warn!(
                ctx.limiter,
                queue = queue.name(),
                gpa,
                len_bytes,
                %err,
                "balloon: releasing guest RAM on the host failed"
            );
        }
    }
}

/// What the worker hands a queue handler.
pub(crate) struct QueueCtx<'a> {
    /// Guest memory the queues live in.
    pub(crate) mem: &'a GuestMemoryMmap,
    /// Device state shared with the device object and its handles.
    pub(crate) shared: &'a Shared,
    /// Limiter for guest-triggered warnings.
    pub(crate) limiter: &'a mut LogLimiter,
    /// Set by a handler that changed the configuration space; the worker then signals it.
    pub(crate) config_changed: bool,
}

impl QueueCtx<'_> {
    /// Logs a skipped chain (rate-limited) and counts it.
    pub(crate) fn skip_chain(&mut self, queue: BalloonQueue, head: u16, err: &ChainError) {
        let counters = &self.shared.counters;
        counters.add(&counters.invalid_buffers, 1);
        guest_warn!(
            self.limiter,
            queue = queue.name(),
            head,
            %err,
            "balloon: malformed descriptor chain skipped"
        );
    }
}

/// Takes the next available chain of `queue`, if any. Fails when the driver's available ring
/// index is impossible (more entries than the queue holds) or the queue is not ready.
pub(crate) fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

/// Puts chain `head` in the used ring with `len` bytes written. A head past the descriptor
/// table (the driver put garbage in the available ring) cannot be completed and is dropped;
/// returns whether the chain was completed.
pub(crate) fn complete_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<bool, virtio_queue::Error> {
    if head >= queue.size() {
        return Ok(false);
    }
    queue.add_used(mem, head, len)?;
    Ok(true)
}

/// Pops every available chain of `queue`, hands it to `handle` and puts it in the used ring
/// with the number of bytes `handle` says the device wrote. Returns how many chains were
/// completed, or the error that stopped the walk.
pub(crate) fn drain_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut handle: F,
) -> Result<usize, virtio_queue::Error>
where
    F: FnMut(u16, DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut used = 0;
    while let Some(chain) = pop_chain(queue, mem)? {
        let head = chain.head_index();
        let len = handle(head, chain);
        if complete_chain(queue, mem, head, len)? {
            used += 1;
        }
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_F_VERSION_1};

    #[test]
    fn queue_indices_follow_negotiated_features() {
        use BalloonQueue::*;
        let stats = VIRTIO_BALLOON_F_STATS_VQ;
        let hint = VIRTIO_BALLOON_F_FREE_PAGE_HINT;
        let report = VIRTIO_BALLOON_F_REPORTING;
        let base = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        assert_eq!(queue_layout(base), vec![Inflate, Deflate]);
        assert_eq!(
            queue_layout(base | stats | hint | report),
            vec![Inflate, Deflate, Stats, FreePageHint, Reporting]
        );
        // A missing queue takes no index.
        assert_eq!(queue_index(base | report, Reporting), Some(2));
        assert_eq!(queue_index(base | stats | report, Reporting), Some(3));
        assert_eq!(queue_index(base | hint | report, Reporting), Some(3));
        assert_eq!(queue_index(base | hint | report, FreePageHint), Some(2));
        assert_eq!(queue_index(base | stats | hint, FreePageHint), Some(3));
        assert_eq!(
            queue_index(base | stats | hint | report, Reporting),
            Some(4)
        );
        assert_eq!(queue_index(base, Stats), None);
        assert_eq!(queue_index(base | report, Stats), None);
        assert_eq!(queue_index(0, Inflate), Some(0));
        assert_eq!(queue_index(0, Deflate), Some(1));
        // All 8 combinations: indices are dense and in spec order.
        for bits in 0..8u64 {
            let features = (if bits & 1 != 0 { stats } else { 0 })
                | (if bits & 2 != 0 { hint } else { 0 })
                | (if bits & 4 != 0 { report } else { 0 });
            let layout = queue_layout(features);
            assert_eq!(layout.len(), 2 + bits.count_ones() as usize);
            for (i, q) in layout.iter().enumerate() {
                assert_eq!(queue_index(features, *q), Some(i as u16));
            }
        }
    }

    #[test]
    fn coalesces_and_dedups() {
        let mut pfns = vec![7, 3, 4, 5, 9, 4, 8, 100, u32::MAX];
        assert_eq!(
            coalesce_pfns(&mut pfns),
            vec![
                3..6,
                7..10,
                100..101,
                u64::from(u32::MAX)..u64::from(u32::MAX) + 1
            ]
        );
        assert!(coalesce_pfns(&mut []).is_empty());
    }

    #[test]
    fn whole_pages_of_buffers() {
        assert_eq!(whole_pages(0, 4096), 0..1);
        assert_eq!(whole_pages(4096, 3 * 4096), 1..4);
        assert_eq!(whole_pages(1, 8192), 1..2);
        assert!(whole_pages(1, 4096).is_empty());
        assert!(whole_pages(u64::MAX - 10, 4096).is_empty());
    }

    #[test]
    fn clips_to_ram() {
        let layout = [
            GuestRamRegion {
                start_gpa: 0,
                len_bytes: 10 * 4096,
            },
            GuestRamRegion {
                start_gpa: 20 * 4096,
                len_bytes: 10 * 4096,
            },
        ];
        assert_eq!(clip_to_ram(&layout, 5..25), (vec![5..10, 20..25], 10));
        assert_eq!(clip_to_ram(&layout, 40..50), (vec![], 10));
        let (parts, outside) = clip_to_ram(&layout, 0..10);
        assert_eq!((parts.len(), parts[0].clone(), outside), (1, 0..10, 0));
    }
}
