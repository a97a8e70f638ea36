//! virtio-balloon device and host-side guest page accounting.
//!
//! - [`page_state::PageStateMap`] records for every 4 KiB guest page whether a snapshot must
//!   keep its content (see ARCHITECTURE.md, "Page classes"); the VMM shares it with the device
//!   as `Arc<Mutex<PageStateMap>>`.
//! - [`Balloon`] is the virtio-balloon device (virtio 1.2 §5.5) behind the
//!   [`virtio_device::VirtioDevice`] contract: inflate/deflate, statistics, free page hinting
//!   and free page reporting, one file per queue under [`queues`]. It marks what the guest
//!   gives up in the page-state map and releases inflated and reported pages through the VMM's
//!   [`RamReleaser`].
//! - [`BalloonHandle`] is the host's control: target size, status, statistics, hinting runs.
//! - [`persist::BalloonState`] is the device's snapshot state, validated on restore.
//! - [`config::BalloonConfig`] is the user configuration.

pub mod config;
pub mod device;
pub mod page_state;
pub mod persist;
pub mod queues;
mod ratelimit;
pub mod release;
mod worker;

#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code))]
mod test_utils;

pub use config::{BalloonConfig, BalloonConfigError};
pub use device::{
    avail_features, Balloon, BalloonCounters, BalloonError, BalloonHandle, BalloonStatus,
    BALLOON_DEVICE_TYPE, CONFIG_SPACE_BYTES, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_F_VERSION_1,
};
pub use page_state::{
    GuestRamRegion, PageRun, PageState, PageStateCounts, PageStateError, PageStateMap,
    PageStateMapState, PAGE_SIZE_BYTES,
};
pub use persist::{BalloonState, PersistError, BALLOON_STATE_VERSION};
pub use queues::hint::{
    HintPhase, HintingOptions, HintingStatus, FIRST_HINT_CMD_ID, VIRTIO_BALLOON_CMD_ID_DONE,
    VIRTIO_BALLOON_CMD_ID_STOP,
};
pub use queues::stats::BalloonStats;
pub use queues::{queue_index, queue_layout, BalloonQueue, QUEUE_SIZE};
pub use release::{RamReleaser, WriteTracker};
pub use virtio_device::SavedQueue;
