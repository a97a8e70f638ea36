//! Emulated devices. Each lives on a [`bus::Bus`] and owns its registers.

pub mod acpi_pm;
pub mod bus;
pub mod serial;
pub mod virtio;
pub mod vmgenid;
