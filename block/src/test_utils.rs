//! Test fixtures: guest memory, a disk image in a temporary file, and the driver's side of the
//! request queue built on `virtio_queue::mock::MockSplitQueue`.

use std::io::Write;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::DriveConfig;
use crate::device::{lock, Block, QUEUE_SIZE};
use crate::worker::ActiveQueue;

/// Guest RAM: 4 MiB at 0.
pub(crate) const MEM_BYTES: u64 = 4 << 20;
/// Where request headers, data and status bytes go (the queue lives below).
pub(crate) const HDR_GPA: u64 = 0x10_0000;
pub(crate) const DATA_GPA: u64 = 0x20_0000;
pub(crate) const STATUS_GPA: u64 = 0x30_0000;
/// Device-writable descriptor flag.
pub(crate) const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// A device over a temporary image, with guest memory and a driver-side queue.
pub(crate) struct Env {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) file: tempfile::NamedTempFile,
    pub(crate) block: Block,
}

/// Image bytes: byte `i` is `i % 251`.
pub(crate) fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

impl Env {
    /// A device over an image of `len_bytes` ([`pattern`] content).
    pub(crate) fn new(len_bytes: usize, read_only: bool) -> Env {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&pattern(len_bytes)).unwrap();
        let block = Block::new(drive(file.path(), read_only)).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)]).unwrap();
        Env { mem, file, block }
    }

    /// Puts a request header (type, sector) at [`HDR_GPA`].
    pub(crate) fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR_GPA)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS_GPA))
            .unwrap();
    }

    /// Runs the queue once with the device's current features, as the worker does.
    pub(crate) fn process(&self, queue: Queue, acked: u64) -> Queue {
        let mut active = ActiveQueue {
            mem: self.mem.clone(),
            queue,
            write_log: None,
            limits: self.block.limits(acked),
        };
        active.process(&self.block.shared);
        active.queue
    }

    /// The status byte.
    pub(crate) fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS_GPA)).unwrap()
    }

    /// Counters so far.
    pub(crate) fn counters(&self) -> crate::BlockCounters {
        self.block.shared.counters.snapshot()
    }
}

/// A drive config for `path`.
pub(crate) fn drive(path: &std::path::Path, read_only: bool) -> DriveConfig {
    DriveConfig {
        drive_id: "disk0".into(),
        path_on_host: path.to_owned(),
        is_read_only: read_only,
        is_root_device: false,
    }
}

/// The driver's side of the request queue.
pub(crate) struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
}

impl<'a> DriverQueue<'a> {
    /// A queue of [`QUEUE_SIZE`] entries with its rings at 0.
    pub(crate) fn new(mem: &'a GuestMemoryMmap) -> Self {
        DriverQueue {
            mock: MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE),
            next_desc: 0,
        }
    }

    /// The device-side queue, ready.
    pub(crate) fn queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    /// Makes a chain of `(gpa, len, flags)` descriptors available. Returns the head index.
    pub(crate) fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(gpa, len, flags))| {
                let idx = head + i as u16;
                let flags = if i + 1 == descs.len() {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(SplitDescriptor::new(gpa, len, flags, idx + 1))
            })
            .collect();
        self.mock.add_desc_chains(&raw, head).unwrap();
        self.next_desc = (head + descs.len() as u16) % QUEUE_SIZE;
        head
    }

    /// Used ring entry `i`: (descriptor head, length written).
    pub(crate) fn used(&self, i: u16) -> (u32, u32) {
        let elem = self
            .mock
            .used()
            .ring()
            .ref_at(usize::from(i % QUEUE_SIZE))
            .unwrap()
            .load();
        (elem.id(), elem.len())
    }

    /// Entries in the used ring so far.
    pub(crate) fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }
}

/// Records interrupts and VMM writes to guest memory.
#[derive(Default)]
pub(crate) struct FakeInterrupt {
    used: std::sync::Mutex<u32>,
    writes: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl FakeInterrupt {
    pub(crate) fn interrupts(&self) -> u32 {
        *lock(&self.used)
    }

    pub(crate) fn writes(&self) -> Vec<(u64, u64)> {
        lock(&self.writes).clone()
    }
}

impl virtio_device::Interrupt for FakeInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        *lock(&self.used) += 1;
        Ok(())
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

impl virtio_device::GuestWriteLog for FakeInterrupt {
    fn record_write(&self, gpa: u64, len_bytes: u64) {
        lock(&self.writes).push((gpa, len_bytes));
    }
}

/// Polls `cond` every 2 ms for up to 5 s.
pub(crate) fn wait_until(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    cond()
}
