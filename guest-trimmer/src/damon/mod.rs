//! The DAMON driver: monitoring physical memory access and, later, the pageout schemes the trim
//! pipeline applies to cold regions.

pub mod intervals;
pub mod scheme;
pub mod sysfs;

pub use scheme::{
    AccessPattern, DamosAction, Filter, Quota, Scheme, SchemeFeatures, SchemeStats, TriedRegion,
};
pub use sysfs::{DamonError, DamonStatus, DamonSysfs, KdamondState, MonitoringAttrs};
