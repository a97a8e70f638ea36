//! Guest RAM: the host mappings behind guest physical memory and giving pages back to the host.

pub mod guest_ram;

pub use guest_ram::{GuestRam, ReleaseError};
