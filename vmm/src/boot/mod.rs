//! Putting a Linux kernel into guest memory: the bzImage, the initrd, the command line, the
//! zero page with its e820 map, and the ACPI tables.

pub mod acpi;
pub mod cmdline;
pub mod e820;
pub mod layout;
pub mod loader;
