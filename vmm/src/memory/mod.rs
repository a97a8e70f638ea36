//! Guest RAM: the host mappings behind guest physical memory, giving pages back to the host,
//! and tracking which pages the guest wrote (KVM's dirty log).

pub mod changed;
pub mod dirty;
pub mod guest_ram;
pub mod pagemap;

pub use changed::{ChangedPages, ChangedSet};
pub use dirty::{DirtyLogError, DirtyTracker, DirtyTrackerStats, MemorySlot};
pub use guest_ram::{allocate_guest_memory, GuestRam, MemoryBacking, ReleaseError, Residency};
