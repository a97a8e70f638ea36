//! End-to-end harness: boots real guests under real KVM.
//!
//! - [`harness`] (host side): finds real KVM ([`rig::detect`]), builds the static binaries and
//!   the guest image, runs every scenario in one rig boot through `e2e-runner` and keeps the
//!   results; each `#[test]` in `tests/tests/boot.rs` asserts on its own scenario.
//! - [`scenarios`] (where KVM is): the scenarios themselves, run by the `e2e-runner` binary.
//! - [`proc`]: a child process with live, tagged, timestamped output.
//! - [`protocol`]: the marker lines between the two sides.

pub mod harness;
pub mod proc;
pub mod protocol;
pub mod scenarios;
