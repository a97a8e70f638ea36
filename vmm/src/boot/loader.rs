//! Loads a bzImage and an initrd with the 64-bit Linux boot protocol
//! (`Documentation/arch/x86/boot.rst`) and fills the zero page.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::acpi::AcpiTables;
use super::cmdline::{build_cmdline, CmdlineError};
use super::e820::build_e820;
use super::layout::{CMDLINE_ADDR, HIMEM_START, MMIO_GAP_START, PAGE_SIZE, ZERO_PAGE_ADDR};

/// Offset of the 64-bit entry point from the start of the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// `setup_header.boot_flag` magic.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags`: the kernel was loaded at 1 MiB.
const LOADED_HIGH: u8 = 0x01;

/// Where the vCPUs start, once the kernel is in memory.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// The kernel's 64-bit entry point (`startup_64`).
    pub entry: GuestAddress,
    /// The zero page, passed in `%rsi`.
    pub zero_page: GuestAddress,
}

/// What to load.
pub struct BootSource<'a> {
    /// The bzImage.
    pub kernel: &'a Path,
    /// The initramfs, if any.
    pub initrd: Option<&'a Path>,
    /// Parameters appended to the default command line.
    pub extra_cmdline: Option<&'a str>,
}

/// Errors loading the kernel.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel or initrd file cannot be opened or read.
    #[error("cannot read {what} {path}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is not a bzImage that can be loaded.
    #[error("kernel {path} is not a loadable bzImage")]
    NotBzImage {
        /// The file.
        path: PathBuf,
        /// What linux-loader said.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel is too old for the 64-bit boot protocol.
    #[error("kernel {path} has no 64-bit entry point (boot protocol {version:#x}, xloadflags {xloadflags:#x})")]
    No64BitEntry {
        /// The file.
        path: PathBuf,
        /// Boot protocol version from its header.
        version: u16,
        /// Its xloadflags.
        xloadflags: u16,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] CmdlineError),
    /// The initrd does not fit in guest memory next to the kernel.
    #[error("initrd {path} is {size_mib} MiB but only {available_mib} MiB of guest memory are free above the kernel; raise --mem-mib")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size_mib: u64,
        /// Room left.
        available_mib: u64,
    },
    /// Writing into guest memory failed.
    #[error("cannot write the {what} into guest memory")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// `boot_params` as plain bytes for guest memory writes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: `boot_params` is a `repr(C, packed)` struct of integers and arrays of integers with no
// padding-dependent invariants: every bit pattern is valid.
unsafe impl ByteValued for ZeroPage {}

fn page_align_down(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

fn page_align_up(addr: u64) -> u64 {
    (addr + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// Loads kernel, initrd and command line into `mem` (of `mem_bytes`), writes the ACPI tables
/// and the zero page, and returns where the boot vCPU starts.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    source: &BootSource,
    acpi: &AcpiTables,
) -> Result<BootEntry, LoadError> {
    let mut kernel = File::open(source.kernel).map_err(|e| LoadError::Read {
        what: "kernel",
        path: source.kernel.to_owned(),
        source: e,
    })?;
    let loaded =
        BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            LoadError::NotBzImage {
                path: source.kernel.to_owned(),
                source: e,
            }
        })?;
    let mut header: setup_header = loaded.setup_header.unwrap_or_default();
    if header.version < 0x020c || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoadError::No64BitEntry {
            path: source.kernel.to_owned(),
            version: header.version,
            xloadflags: header.xloadflags,
        });
    }

    let cmdline = build_cmdline(source.extra_cmdline, header.cmdline_size as usize + 1)
        .map_err(LoadError::Cmdline)?;
    let mut cmdline_bytes = cmdline.into_bytes();
    cmdline_bytes.push(0);
    mem.write_slice(&cmdline_bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| LoadError::GuestMemory {
            what: "command line",
            source: e,
        })?;

    for (addr, bytes) in &acpi.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| LoadError::GuestMemory {
                what: "ACPI tables",
                source: e,
            })?;
    }

    if let Some(initrd_path) = source.initrd {
        let (image, size) = load_initrd(mem, mem_bytes, initrd_path, &header, loaded.kernel_end)?;
        header.ramdisk_image = image as u32;
        header.ramdisk_size = size as u32;
    }

    header.type_of_loader = LOADER_TYPE_UNDEFINED;
    header.boot_flag = BOOT_FLAG_MAGIC;
    header.loadflags |= LOADED_HIGH;
    header.cmd_line_ptr = CMDLINE_ADDR as u32;
    header.cmdline_size = (cmdline_bytes.len() - 1) as u32;

    let mut params = boot_params {
        hdr: header,
        acpi_rsdp_addr: acpi.rsdp_addr,
        ..Default::default()
    };
    let e820 = build_e820(mem_bytes);
    for (slot, entry) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| LoadError::GuestMemory {
            what: "zero page",
            source: e,
        })?;

    Ok(BootEntry {
        entry: GuestAddress(loaded.kernel_load.0 + STARTUP_64_OFFSET),
        zero_page: GuestAddress(ZERO_PAGE_ADDR),
    })
}

/// Copies the initrd to the top of low memory (below the MMIO gap and the kernel's
/// `initrd_addr_max`), above the kernel. Returns its address and size.
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    path: &Path,
    header: &setup_header,
    kernel_end: u64,
) -> Result<(u64, u64), LoadError> {
    let read_err = |e| LoadError::Read {
        what: "initrd",
        path: path.to_owned(),
        source: e,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let lowmem_end = mem_bytes.min(MMIO_GAP_START);
    let limit = lowmem_end.min(u64::from(header.initrd_addr_max) + 1);
    // The kernel decompresses itself in place and grows to `init_size`: keep clear of that.
    let floor = page_align_up(kernel_end.max(HIMEM_START + u64::from(header.init_size)));
    let available = limit.saturating_sub(floor);
    if size > available || size > u64::from(u32::MAX) {
        return Err(LoadError::InitrdTooLarge {
            path: path.to_owned(),
            size_mib: size.div_ceil(1 << 20),
            available_mib: available >> 20,
        });
    }
    let addr = page_align_down(limit - size);
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| LoadError::GuestMemory {
            what: "initrd",
            source: e,
        })?;
    Ok((addr, size))
}
