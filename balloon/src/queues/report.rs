//! reporting_vq (virtio 1.2 §5.5.6.8, `VIRTIO_BALLOON_F_REPORTING`): free page reporting.
//!
//! The guest isolates free blocks (Linux: order >= `page_reporting_order`, 2 MiB by default),
//! puts them in one chain of device-writable buffers (up to 32) and waits for the chain to come
//! back before it hands the blocks back to its allocator. The device marks the whole pages of
//! each buffer [`PageState::Reported`], releases them on the host, then returns the chain (used
//! length 0: the device writes nothing).

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::{
    apply_page_ranges, buffer_page_ranges, collect_buffers, BalloonQueue, ChainRules, Direction,
    QueueCtx,
};
use crate::page_state::PageState;

/// What reporting_vq accepts in a chain: device-writable buffers of any length; the chain
/// iterator already bounds a chain to 4 GiB.
pub(crate) const REPORT_CHAIN_RULES: ChainRules = ChainRules {
    direction: Direction::DeviceWritable,
    unit_bytes: 1,
    max_total_bytes: u64::MAX,
};

/// Handles one reporting_vq chain: marks its pages reported and releases them.
/// Returns the used length: 0, the device writes nothing.
pub(crate) fn handle_chain(
    ctx: &mut QueueCtx<'_>,
    head: u16,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let buffers = match collect_buffers(chain, ctx.mem, &REPORT_CHAIN_RULES) {
        Ok(buffers) => buffers,
        Err(err) => {
            ctx.skip_chain(BalloonQueue::Reporting, head, &err);
            return 0;
        }
    };
    let ranges = buffer_page_ranges(&buffers);
    let applied = apply_page_ranges(
        ctx,
        &ranges,
        PageState::Reported,
        true,
        BalloonQueue::Reporting,
    );
    let counters = &ctx.shared.counters;
    counters.add(&counters.pages_reported, applied.pages);
    0
}

#[cfg(test)]
mod tests {
    use crate::queues::BalloonQueue;
    use crate::test_utils::*;
    use crate::PageState;

    #[test]
    fn reported_pages_are_marked_and_released() {
        let env = Env::new(full_config());
        let mut reportq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::Reporting, reportq.queue())]);
        // A 2 MiB block at 4 MiB and an unaligned buffer covering pages 0x201..0x203 whole.
        let head = reportq.add_chain(&[
            (4 << 20, 2 << 20, WRITE),
            (0x20_0000 + 100, 3 * 4096, WRITE),
        ]);
        env.process(&mut active, 0);
        assert_eq!(reportq.used_idx(), 1);
        assert_eq!(reportq.used(0), (u32::from(head), 0));
        assert_eq!(env.interrupt.used(), vec![0]);
        assert_eq!(
            env.releaser.calls(),
            vec![(4 << 20, 2 << 20), (0x20_1000, 2 * 4096)]
        );
        assert_eq!(env.state_of(1024), PageState::Reported);
        assert_eq!(env.state_of(1535), PageState::Reported);
        assert_eq!(env.state_of(1536), PageState::Live);
        assert_eq!(env.state_of(0x200), PageState::Live);
        assert_eq!(env.state_of(0x201), PageState::Reported);
        let c = env.shared().counters.snapshot();
        assert_eq!(c.pages_reported, 512 + 2);
        assert_eq!(c.bytes_released, (512 + 2) * 4096);

        // A reported page the guest writes again is live (dirty tracking's job).
        let changed = crate::device::lock(&env.map)
            .mark_written(1024..1025)
            .unwrap();
        assert_eq!(changed, 1);
        assert_eq!(env.state_of(1024), PageState::Live);
    }

    /// A dirty log that says pages 1024..1536 were written (the guest zeroed them) before the
    /// report, and nothing after.
    struct ZeroedBeforeReport(std::sync::Mutex<bool>);

    impl crate::WriteTracker for ZeroedBeforeReport {
        fn sync_into(
            &self,
            map: &mut crate::PageStateMap,
        ) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
            let mut pending = self.0.lock().unwrap();
            if !std::mem::take(&mut *pending) {
                return Ok(0);
            }
            Ok(map.mark_written(1024..1536)?)
        }
    }

    #[test]
    fn writes_before_the_report_are_applied_before_marking() {
        let env = Env::new(full_config());
        let tracker = std::sync::Arc::new(ZeroedBeforeReport(std::sync::Mutex::new(true)));
        *crate::device::lock(&env.shared().write_tracker) = Some(tracker.clone());
        let mut reportq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::Reporting, reportq.queue())]);
        reportq.add_chain(&[(4 << 20, 2 << 20, WRITE)]);
        env.process(&mut active, 0);
        // The earlier writes were consumed before the mark: the pages stay Reported.
        assert_eq!(env.state_of(1024), PageState::Reported);
        assert_eq!(env.state_of(1535), PageState::Reported);
        // The next periodic sync finds nothing new: the pages stay Reported. (Without the sync
        // before marking, it would apply the zeroing now and turn them Live.)
        let changed =
            crate::WriteTracker::sync_into(&*tracker, &mut crate::device::lock(&env.map)).unwrap();
        assert_eq!(changed, 0);
        assert_eq!(env.state_of(1024), PageState::Reported);
    }

    #[test]
    fn device_readable_or_outside_memory_reports_are_skipped() {
        let env = Env::new(full_config());
        let mut reportq = DriverQueue::new(&env.mem, 0);
        let mut active = env.active(vec![(BalloonQueue::Reporting, reportq.queue())]);
        reportq.add_chain(&[(4 << 20, 2 << 20, 0)]);
        reportq.add_chain(&[(4 << 20, 4096, WRITE), (MEM_BYTES, 4096, WRITE)]);
        reportq.add_chain(&[(4 << 20, 0, WRITE)]);
        env.process(&mut active, 0);
        assert_eq!(reportq.used_idx(), 3);
        assert!(env.releaser.calls().is_empty());
        assert_eq!(env.shared().counters.snapshot().invalid_buffers, 3);
        assert_eq!(env.state_of(1024), PageState::Live);
    }
}
