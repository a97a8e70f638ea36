//! `guest-trimmer hostile`: a misbehaving virtio driver, to show the VMM survives one.
//!
//! It unbinds the kernel's virtio-mmio driver from a device (found by its virtio device ID),
//! drives the device itself through `/dev/mem` (the register window is not RAM, and once no
//! driver holds it a kernel with STRICT_DEVMEM and IO_STRICT_DEVMEM lets root map it), points every queue at one page of its own locked memory, then for
//! `--seconds` fills the descriptor tables with garbage (see [`scribble`]: addresses anywhere
//! or in its own page, any lengths, random chains, loops and indirect flags, heads out of
//! range, available indices that sometimes jump far past the queue size) and notifies every queue in a tight loop, resetting and re-initialising the device now
//! and then. It prints `HOSTILE-DONE <notifies> <resets>` when it ends. Test tool only.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;

/// Printed with the counts when the flood ends.
pub const DONE_MARKER: &str = "HOSTILE-DONE";

/// Register offsets of virtio-mmio version 2 (virtio 1.2, §4.2.2).
mod reg {
    pub const MAGIC: usize = 0x000;
    pub const DEVICE_ID: usize = 0x008;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const INTERRUPT_ACK: usize = 0x064;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
}

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// Where the VMM places virtio-mmio windows, and how many it may have.
const MMIO_START: u64 = 0xd000_0000;
const MMIO_STRIDE: u64 = 0x1000;
const MAX_DEVICES: u64 = 32;
/// Queue size we ask for: the descriptor table (16 B each), available ring and used ring of
/// one queue fit in one 4 KiB page.
const QUEUE_NUM: u32 = 64;
const PAGE: usize = 4096;
const MAX_QUEUES: u32 = 8;

/// Arguments of `guest-trimmer hostile`.
#[derive(Debug, Clone, Args)]
pub struct HostileArgs {
    /// Virtio device ID of the device to attack (5 = balloon, 19 = vsock).
    #[arg(long)]
    pub device_id: u32,
    /// How long to flood.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Reset and re-initialise the device after this many notify rounds.
    #[arg(long, default_value_t = 5000)]
    pub reset_every: u64,
}

/// A step of the tool failed.
#[derive(Debug, thiserror::Error)]
pub enum HostileError {
    /// /dev/mem could not be opened or mapped.
    #[error("mapping {what} through /dev/mem")]
    Map {
        /// What was mapped.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No virtio-mmio window holds a device with that ID.
    #[error("no virtio-mmio device with ID {0}")]
    NoDevice(u32),
    /// Our own queue memory could not be allocated, locked or translated.
    #[error("preparing the queue page: {0}")]
    QueuePage(String),
}

/// A mapped 4 KiB register window.
struct Window {
    base: *mut u8,
}

impl Window {
    fn map(mem: &std::fs::File, phys: u64) -> Result<Self, HostileError> {
        // SAFETY: a fresh shared mapping of one page of /dev/mem; the kernel checks the range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                phys as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(HostileError::Map {
                what: format!("{phys:#x}"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Window { base: p.cast() })
    }

    fn read(&self, off: usize) -> u32 {
        // SAFETY: `off` is a register offset inside the mapped page, 4-byte aligned.
        unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u32>()) }
    }

    fn write(&self, off: usize, v: u32) {
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u32>(), v) }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page `map` mapped.
        unsafe { libc::munmap(self.base.cast(), PAGE) };
    }
}

/// xorshift64: the garbage only needs to vary.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Unbinds the kernel's virtio-mmio platform driver from the device with `device_id`, which
/// also releases its register window (with IO_STRICT_DEVMEM a window a driver holds cannot be
/// mapped through /dev/mem).
fn unbind_kernel_driver(device_id: u32) {
    let Ok(devices) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return;
    };
    for dev in devices.flatten() {
        let id = std::fs::read_to_string(dev.path().join("device")).unwrap_or_default();
        let id = u32::from_str_radix(id.trim().trim_start_matches("0x"), 16).ok();
        if id != Some(device_id) {
            continue;
        }
        // /sys/devices/platform/LNRO0005:00/virtio0: the parent is the platform device.
        let Some(platform) = std::fs::canonicalize(dev.path())
            .ok()
            .and_then(|p| Some(p.parent()?.file_name()?.to_owned()))
        else {
            continue;
        };
        let unbind = Path::new("/sys/bus/platform/drivers/virtio-mmio/unbind");
        if let Ok(mut f) = OpenOptions::new().write(true).open(unbind) {
            let _ = f.write_all(platform.to_string_lossy().as_bytes());
        }
    }
}

/// The physical address of the page at `virt` (resident and locked), from /proc/self/pagemap.
fn physical(virt: usize) -> Result<u64, HostileError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(Path::new("/proc/self/pagemap"))
        .map_err(|e| HostileError::QueuePage(format!("opening pagemap: {e}")))?;
    let mut entry = [0u8; 8];
    f.read_exact_at(&mut entry, (virt / PAGE * 8) as u64)
        .map_err(|e| HostileError::QueuePage(format!("reading pagemap: {e}")))?;
    let e = u64::from_le_bytes(entry);
    let pfn = e & ((1 << 55) - 1);
    if e >> 63 == 0 || pfn == 0 {
        return Err(HostileError::QueuePage(format!(
            "page {virt:#x} not present or PFN hidden (entry {e:#x})"
        )));
    }
    Ok(pfn * PAGE as u64)
}

/// One locked page per queue, with its physical address.
fn queue_pages(n: usize) -> Result<Vec<(*mut u8, u64)>, HostileError> {
    (0..n)
        .map(|_| {
            // SAFETY: a fresh private anonymous page, locked so its physical address holds.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_LOCKED,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(HostileError::QueuePage(
                    std::io::Error::last_os_error().to_string(),
                ));
            }
            // SAFETY: the page was just mapped writable; touching it makes it resident.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, PAGE) };
            Ok((p.cast::<u8>(), physical(p as usize)?))
        })
        .collect()
}

/// Resets the device and sets up its queues on our pages, then DRIVER_OK (each status bit in
/// its own write, as the spec orders them).
fn initialise(w: &Window, pages: &[(*mut u8, u64)]) {
    w.write(reg::STATUS, 0);
    w.write(reg::STATUS, 1);
    w.write(reg::STATUS, 1 | 2);
    w.write(reg::DRIVER_FEATURES_SEL, 1);
    w.write(reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    w.write(reg::DRIVER_FEATURES_SEL, 0);
    w.write(reg::DRIVER_FEATURES, 0);
    w.write(reg::STATUS, 1 | 2 | 8);
    for (q, (_, phys)) in pages.iter().enumerate() {
        w.write(reg::QUEUE_SEL, q as u32);
        w.write(reg::QUEUE_NUM, QUEUE_NUM);
        let set = |low, high, addr: u64| {
            w.write(low, addr as u32);
            w.write(high, (addr >> 32) as u32);
        };
        set(reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, *phys);
        set(
            reg::QUEUE_DRIVER_LOW,
            reg::QUEUE_DRIVER_HIGH,
            phys + AVAIL_OFFSET as u64,
        );
        set(reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, phys + 2048);
        w.write(reg::QUEUE_READY, 1);
    }
    w.write(reg::STATUS, 1 | 2 | 8 | 4);
}

/// Where the available ring starts in a queue page.
const AVAIL_OFFSET: usize = 1024;
/// Where the buffers in our own page start (the device may write there).
const DATA_OFFSET: usize = 3072;

/// Fills a queue page's descriptor table with garbage and publishes a few more (random) heads.
/// Half the descriptors point into the page's own data area with a length that stays inside
/// the page (so a device writing them cannot touch other guest memory), the rest anywhere with
/// any length; flags and `next` are random (chains, loops, indirect tables, out-of-range
/// indices). The available index mostly moves on by 0..=64, now and then jumps anywhere.
fn scribble(page: *mut u8, phys: u64, avail_idx: &mut u16, rng: &mut Rng) {
    for i in 0..QUEUE_NUM as usize {
        let (addr, len) = if rng.next() % 2 == 0 {
            let off = DATA_OFFSET + (rng.next() % (PAGE - DATA_OFFSET) as u64) as usize;
            (phys + off as u64, (rng.next() % (PAGE - off) as u64) as u32)
        } else {
            (rng.next(), rng.next() as u32)
        };
        let flags = (rng.next() % 8) as u16;
        let next = (rng.next() % (QUEUE_NUM as u64 + 16)) as u16;
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        desc[14..].copy_from_slice(&next.to_le_bytes());
        // SAFETY: descriptor i of 64 lies in the first 1024 bytes of our own page.
        unsafe { std::ptr::copy_nonoverlapping(desc.as_ptr(), page.add(i * 16), 16) };
    }
    let step = if rng.next() % 8 == 0 {
        rng.next() as u16
    } else {
        (rng.next() % (QUEUE_NUM as u64 + 1)) as u16
    };
    *avail_idx = avail_idx.wrapping_add(step);
    let ring = AVAIL_OFFSET + 4;
    for j in 0..QUEUE_NUM as usize {
        let head = (rng.next() % (QUEUE_NUM as u64 + 8)) as u16;
        // SAFETY: ring entry j lies between bytes 1028 and 1156 of our own page.
        unsafe { std::ptr::write_volatile(page.add(ring + 2 * j).cast::<u16>(), head) };
    }
    // SAFETY: flags and idx of the available ring, inside our own page.
    unsafe {
        std::ptr::write_volatile(page.add(AVAIL_OFFSET).cast::<u16>(), 0);
        std::ptr::write_volatile(page.add(AVAIL_OFFSET + 2).cast::<u16>(), *avail_idx);
    }
}

/// Runs the flood; see the module documentation.
pub fn run(args: &HostileArgs) -> Result<(), HostileError> {
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")
        .map_err(|e| HostileError::Map {
            what: "/dev/mem".into(),
            source: e,
        })?;
    unbind_kernel_driver(args.device_id);
    let window = (0..MAX_DEVICES)
        .map(|i| MMIO_START + i * MMIO_STRIDE)
        .find_map(|phys| {
            let w = Window::map(&mem, phys).ok()?;
            (w.read(reg::MAGIC) == MAGIC && w.read(reg::DEVICE_ID) == args.device_id).then_some(w)
        })
        .ok_or(HostileError::NoDevice(args.device_id))?;
    let queues = (0..MAX_QUEUES)
        .take_while(|q| {
            window.write(reg::QUEUE_SEL, *q);
            window.read(reg::QUEUE_NUM_MAX) >= QUEUE_NUM
        })
        .count();
    let pages = queue_pages(queues)?;
    initialise(&window, &pages);
    println!("HOSTILE-START device {} queues {queues}", args.device_id);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let (mut notifies, mut resets, mut rounds) = (0u64, 0u64, 0u64);
    let mut avail = vec![0u16; pages.len()];
    while Instant::now() < deadline {
        for (q, (page, phys)) in pages.iter().enumerate() {
            scribble(*page, *phys, &mut avail[q], &mut rng);
            window.write(reg::QUEUE_NOTIFY, q as u32);
            window.write(reg::INTERRUPT_ACK, 3);
            notifies += 1;
        }
        rounds += 1;
        if rounds % args.reset_every.max(1) == 0 {
            initialise(&window, &pages);
            avail.iter_mut().for_each(|a| *a = 0);
            resets += 1;
        }
    }
    // Reset the device before our queue pages go back to the kernel: a device still running
    // on them would write its used rings into memory the guest reuses.
    window.write(reg::STATUS, 0);
    println!("{DONE_MARKER} {notifies} {resets}");
    Ok(())
}
