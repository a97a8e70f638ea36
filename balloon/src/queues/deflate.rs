//! deflateq (virtio 1.2 §5.5.6.1): the guest takes pages back from the balloon.
//!
//! Same format as inflateq. The pages become [`PageState::Live`] again: the guest will use them
//! (they read zeros until written, since inflating released them). Nothing is released.
//! `VIRTIO_BALLOON_F_MUST_TELL_HOST` is not offered, so the guest may reuse pages before this
//! buffer arrives; marking them live is correct whatever the order.

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::inflate::apply_pfn_chain;
use super::{BalloonQueue, QueueCtx};
use crate::page_state::PageState;

/// Handles one deflateq chain: marks its pages live.
/// Returns the used length: 0, the device writes nothing.
pub(crate) fn handle_chain(
    ctx: &mut QueueCtx<'_>,
    head: u16,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let deflate = BalloonQueue::Deflate;
    if let Some(applied) = apply_pfn_chain(ctx, head, chain, deflate, PageState::Live, false) {
        let counters = &ctx.shared.counters;
        counters.add(&counters.pages_deflated, applied.pages);
    }
    0
}
