//! The DAMON driver: monitoring physical memory access and, later, the pageout schemes the trim
//! pipeline applies to cold regions.

pub mod sysfs;

pub use sysfs::{DamonError, DamonStatus, DamonSysfs, KdamondState, MonitoringAttrs};
