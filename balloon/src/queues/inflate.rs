//! inflateq (virtio 1.2 §5.5.6.1): the guest gives pages to the balloon.
//!
//! Each buffer is a device-readable array of little-endian 32-bit page frame numbers (4 KiB
//! pages, `VIRTIO_BALLOON_PFN_SHIFT` = 12). The device marks the pages
//! [`PageState::Inflated`] in the page-state map and releases them on the host through the
//! [`RamReleaser`](crate::RamReleaser), one call per run of consecutive frames. The guest waits
//! for the used buffer before it considers the pages gone, so they are released before the
//! buffer is returned.

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::{
    apply_page_ranges, coalesce_pfns, collect_buffers, read_buffers, Applied, BalloonQueue,
    ChainError, ChainRules, Direction, QueueCtx,
};
use crate::page_state::PageState;

/// Most bytes accepted in one PFN buffer: 256 Ki frames (1 GiB of guest pages). Linux sends at
/// most 256 frames (1 KiB) per buffer.
pub const MAX_PFN_BUFFER_BYTES: u64 = 1 << 20;

/// What inflateq and deflateq accept in a chain.
pub(crate) const PFN_CHAIN_RULES: ChainRules = ChainRules {
    direction: Direction::DeviceReadable,
    unit_bytes: 4,
    max_total_bytes: MAX_PFN_BUFFER_BYTES,
};

/// Validates a PFN chain and reads its frame numbers.
pub(crate) fn read_pfns(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<u32>, ChainError> {
    let buffers = collect_buffers(chain, mem, &PFN_CHAIN_RULES)?;
    let bytes = read_buffers(mem, &buffers)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Reads a PFN chain of `queue` and moves its pages to `state` (releasing them on the host when
/// `release`), `None` when the chain was malformed (skipped
/// and logged).
pub(crate) fn apply_pfn_chain(
    ctx: &mut QueueCtx<'_>,
    head: u16,
    chain: DescriptorChain<&GuestMemoryMmap>,
    queue: BalloonQueue,
    state: PageState,
    release: bool,
) -> Option<Applied> {
    let mut pfns = match read_pfns(ctx.mem, chain) {
        Ok(pfns) => pfns,
        Err(err) => {
            ctx.skip_chain(queue, head, &err);
            return None;
        }
    };
    let ranges = coalesce_pfns(&mut pfns);
    Some(apply_page_ranges(ctx, &ranges, state, release, queue))
}

/// Handles one inflateq chain: marks its pages inflated and releases them.
/// Returns the used length: 0, the device writes nothing.
pub(crate) fn handle_chain(
    ctx: &mut QueueCtx<'_>,
    head: u16,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let inflate = BalloonQueue::Inflate;
    if let Some(applied) = apply_pfn_chain(ctx, head, chain, inflate, PageState::Inflated, true) {
        let counters = &ctx.shared.counters;
        counters.add(&counters.pages_inflated, applied.pages);
    }
    0
}

#[cfg(test)]
mod tests {
    use crate::device::lock;
    use crate::queues::BalloonQueue;
    use crate::test_utils::*;
    use crate::PageState;

    #[test]
    fn inflate_deflate_round_trip() {
        let env = Env::new(full_config());
        let mut inflateq = DriverQueue::new(&env.mem, 0);
        let mut deflateq = DriverQueue::new(&env.mem, 0x4000);
        let mut active = env.active(vec![
            (BalloonQueue::Inflate, inflateq.queue()),
            (BalloonQueue::Deflate, deflateq.queue()),
        ]);

        // Unsorted, with a duplicate: pages 10..14 and 20.
        let pfns = [12, 10, 20, 11, 13, 11];
        let len = env.write_pfns(DATA_GPA, &pfns);
        let head = inflateq.add_chain(&[(DATA_GPA, len, 0)]);
        env.process(&mut active, 0);

        assert_eq!(inflateq.used_idx(), 1);
        assert_eq!(inflateq.used(0), (u32::from(head), 0));
        assert_eq!(env.interrupt.used(), vec![0]);
        assert_eq!(
            env.releaser.calls(),
            vec![(10 * 4096, 4 * 4096), (20 * 4096, 4096)]
        );
        for pfn in [10, 11, 12, 13, 20] {
            assert_eq!(env.state_of(pfn), PageState::Inflated, "pfn {pfn}");
        }
        assert_eq!(env.state_of(14), PageState::Live);
        assert_eq!(lock(&env.map).count_by_state().inflated_pages, 5);
        let c = env.shared().counters.snapshot();
        assert_eq!(c.pages_inflated, 5);
        assert_eq!(c.bytes_released, 5 * 4096);

        // Deflate part of it.
        let len = env.write_pfns(DATA_GPA + 4096, &[11, 20]);
        deflateq.add_chain(&[(DATA_GPA + 4096, len, 0)]);
        env.process(&mut active, 1);
        assert_eq!(deflateq.used_idx(), 1);
        assert_eq!(env.interrupt.used(), vec![0, 1]);
        assert_eq!(env.state_of(11), PageState::Live);
        assert_eq!(env.state_of(20), PageState::Live);
        assert_eq!(env.state_of(10), PageState::Inflated);
        // Deflating releases nothing.
        assert_eq!(env.releaser.calls().len(), 2);
        let c = env.shared().counters.snapshot();
        assert_eq!(c.pages_deflated, 2);
        assert_eq!(lock(&env.map).count_by_state().inflated_pages, 3);
    }

    #[test]
    fn several_chains_and_descriptors() {
        let env = Env::new(full_config());
        let mut inflateq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::Inflate, inflateq.queue())]);
        let a = env.write_pfns(DATA_GPA, &[1, 2]);
        let b = env.write_pfns(DATA_GPA + 4096, &[3]);
        let c = env.write_pfns(DATA_GPA + 8192, &[100]);
        // One chain of two descriptors, then a second chain.
        inflateq.add_chain(&[(DATA_GPA, a, 0), (DATA_GPA + 4096, b, 0)]);
        inflateq.add_chain(&[(DATA_GPA + 8192, c, 0)]);
        env.process(&mut active, 0);
        assert_eq!(inflateq.used_idx(), 2);
        assert_eq!(
            env.releaser.calls(),
            vec![(4096, 3 * 4096), (100 * 4096, 4096)]
        );
        // One interrupt per pass.
        assert_eq!(env.interrupt.used(), vec![0]);
    }

    #[test]
    fn pfns_outside_ram_are_ignored() {
        // Two regions with a hole: pages 0..256 and 512..1024.
        let env = Env::with_regions(full_config(), &[(0, 1 << 20), (2 << 20, 2 << 20)]);
        let mut inflateq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::Inflate, inflateq.queue())]);
        // 255 (last of region 0), 256..258 (hole), 511 (hole), 512 (region 1), 1024 (past the
        // end), u32::MAX.
        let pfns = [255, 256, 257, 511, 512, 1024, u32::MAX];
        let gpa = 0x10_0000 - 0x1000; // inside region 0
        let len = env.write_pfns(gpa, &pfns);
        inflateq.add_chain(&[(gpa, len, 0)]);
        env.process(&mut active, 0);
        assert_eq!(inflateq.used_idx(), 1);
        assert_eq!(
            env.releaser.calls(),
            vec![(255 * 4096, 4096), (512 * 4096, 4096)]
        );
        assert_eq!(env.state_of(255), PageState::Inflated);
        assert_eq!(env.state_of(512), PageState::Inflated);
        let c = env.shared().counters.snapshot();
        assert_eq!(c.pages_inflated, 2);
        assert_eq!(c.pages_outside_ram, 5);
        assert_eq!(c.invalid_buffers, 0);
    }

    #[test]
    fn malformed_chains_are_completed_and_skipped() {
        let env = Env::new(full_config());
        let mut inflateq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::Inflate, inflateq.queue())]);
        let good = env.write_pfns(DATA_GPA, &[7, 8]);
        let chains: Vec<Vec<(u64, u32, u16)>> = vec![
            // Zero length.
            vec![(DATA_GPA, 0, 0)],
            // Device-writable where the device must read.
            vec![(DATA_GPA, good, WRITE)],
            // Outside guest memory, and straddling its end.
            vec![(MEM_BYTES + 4096, 8, 0)],
            vec![(MEM_BYTES - 4, 8, 0)],
            vec![(u64::MAX - 3, 8, 0)],
            // Length not a multiple of 4.
            vec![(DATA_GPA, 6, 0)],
            // Too long: 2 MiB of PFNs.
            vec![(DATA_GPA, 2 << 20, 0)],
            // A good descriptor followed by a bad one: the whole chain is skipped.
            vec![(DATA_GPA, good, 0), (DATA_GPA, 3, 0)],
        ];
        for chain in &chains {
            inflateq.add_chain(chain);
        }
        // A head index past the descriptor table: nothing to read, cannot be completed.
        inflateq.add_raw_head(300);
        // A good chain after all that is still processed.
        inflateq.add_chain(&[(DATA_GPA, good, 0)]);
        env.process(&mut active, 0);

        assert_eq!(inflateq.used_idx() as usize, chains.len() + 1);
        for i in 0..chains.len() as u16 {
            assert_eq!(inflateq.used(i).1, 0);
        }
        assert_eq!(env.releaser.calls(), vec![(7 * 4096, 2 * 4096)]);
        let c = env.shared().counters.snapshot();
        assert_eq!(c.invalid_buffers, chains.len() as u64 + 1);
        assert_eq!(c.pages_inflated, 2);
        assert_eq!(lock(&env.map).count_by_state().inflated_pages, 2);
    }

    #[test]
    fn release_failure_is_counted_and_pages_stay_marked() {
        let env = Env::new(full_config());
        env.releaser
            .fail
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut inflateq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::Inflate, inflateq.queue())]);
        let len = env.write_pfns(DATA_GPA, &[5]);
        inflateq.add_chain(&[(DATA_GPA, len, 0)]);
        env.process(&mut active, 0);
        assert_eq!(inflateq.used_idx(), 1);
        let c = env.shared().counters.snapshot();
        assert_eq!(c.release_errors, 1);
        assert_eq!(c.bytes_released, 0);
        assert_eq!(env.state_of(5), PageState::Inflated);
    }
}
