//! `guest-trimmer`: the in-guest daemon that frees memory before a snapshot.
//!
//! The binary (`main.rs`) is a thin command line over these modules, which are kept here so
//! they are unit-testable with fake `/proc` and `/sys` trees:
//!
//! - [`meminfo`]: `/proc/meminfo` and `/proc/vmstat` as typed structs;
//! - [`sysinfo`]: online CPUs, memory size, kernel release and uptime, printed at boot;
//! - [`damon`]: the DAMON sysfs driver;
//! - [`vsock`]: AF_VSOCK sockets and the JSON-lines control endpoint.
//! - [`damon`]: the DAMON sysfs driver (monitoring, schemes, regions);
//! - [`trim`]: the trim pipeline (hooks, pageout, drop caches, compaction, reporting wait);
//! - [`control`]: the JSON-lines control protocol the daemon serves;
//! - [`unix_server`]: that protocol on a unix socket;
//! - [`calibrate`]: fixed CPU loops to compare a guest's CPU speed with a host's;
//! - [`workload`]: test loads (cold/hot file reads, live anonymous data, a runtime cache).

pub mod calibrate;
pub mod control;
pub mod damon;
pub mod meminfo;
pub mod sysinfo;
pub mod trim;
pub mod unix_server;
pub mod vsock;
pub mod workload;

#[cfg(test)]
pub(crate) mod test_utils;

pub use error_text::error_chain;
