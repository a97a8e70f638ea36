//! A snapshotting KVM virtual machine monitor for serverless microVMs.
//!
//! The crate is laid out by architecture: `boot/` puts a Linux kernel into guest memory
//! (bzImage, e820, ACPI, command line), `kvm/` owns the VM and vCPU objects, `devices/` holds
//! the emulated devices (virtio ones behind the virtio-mmio transport), `memory/` the guest
//! RAM and its release, `api/` the HTTP control API, and `vm.rs` ties them into a running
//! microVM.

pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod devices;
pub mod kvm;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod seccomp;
pub mod snapshot;
pub mod vm;
