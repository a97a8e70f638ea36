//! virtio-balloon device and host-side guest page accounting.
//!
//! The first pieces are the [`page_state::PageStateMap`], which records for every 4 KiB guest
//! page whether a snapshot must keep its content (see ARCHITECTURE.md, "Page classes"), and the
//! device's user configuration, [`config::BalloonConfig`]. The device and its queues build on
//! them.

pub mod config;
pub mod page_state;

pub use config::{BalloonConfig, BalloonConfigError};
pub use page_state::{
    GuestRamRegion, PageRun, PageState, PageStateCounts, PageStateError, PageStateMap,
    PageStateMapState, PAGE_SIZE_BYTES,
};
