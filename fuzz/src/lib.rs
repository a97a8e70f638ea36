//! Shared pieces of the fuzz targets: guest memory with a hole and a descriptor chain built from
//! fuzzer bytes, and checks that an address range lies in guest RAM.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: 1 MiB at 0, a 1 MiB hole (unmapped guard), 1 MiB at 2 MiB.
pub const REGIONS: [(u64, usize); 2] = [(0, 1 << 20), (2 << 20, 1 << 20)];

/// Where the rings live; data buffers are anywhere the fuzzer says.
const RING_GPA: u64 = 0x1000;

/// Guest memory over [`REGIONS`].
pub fn guest_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

/// Whether `[gpa, gpa + len)` is inside one RAM region (never in the hole or past the end).
pub fn in_ram(gpa: u64, len: u64) -> bool {
    REGIONS.iter().any(|&(start, size)| {
        gpa >= start
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= start + size as u64)
    })
}

/// Little-endian reads from the fuzzer's bytes; zeros when they run out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    /// The next `N` bytes, zero-padded.
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let take = self.0.len().min(N);
        out[..take].copy_from_slice(&self.0[..take]);
        self.0 = &self.0[take..];
        out
    }
    /// The next u8.
    pub fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    /// The next u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    /// The next u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    /// The next u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A guest address the fuzzer picks: mostly inside RAM, sometimes at edges, in the hole or
/// anywhere.
pub fn pick_addr(input: &mut Input) -> u64 {
    let raw = input.u32() as u64;
    match input.u8() % 6 {
        0 => input.u64(),
        1 => (1 << 20) - (raw % 64),
        2 => (1 << 20) + (raw % (1 << 20)),
        3 => (3 << 20) - (raw % 64),
        4 => (2 << 20) + (raw % (1 << 20)),
        _ => 0x10_000 + (raw % 0xe0_000),
    }
}

/// Writes a descriptor table of up to 8 descriptors (addresses, lengths, flags and `next` from
/// the fuzzer, so chains may loop, point out of range or be indirect), makes head 0 available
/// and returns the device's queue and the popped chain's memory.
pub fn queue_with_chain(mem: &GuestMemoryMmap, input: &mut Input) -> Queue {
    let mock = MockSplitQueue::create(mem, GuestAddress(RING_GPA), 16);
    let count = 1 + usize::from(input.u8() % 8);
    let descs: Vec<RawDescriptor> = (0..count)
        .map(|_| {
            let addr = pick_addr(input);
            let len = match input.u8() % 4 {
                0 => input.u32(),
                _ => u32::from(input.u16()),
            };
            let flags = input.u16() & 0x7;
            let next = input.u8() % 20;
            RawDescriptor::from(Descriptor::new(addr, len, flags, u16::from(next)))
        })
        .collect();
    mock.add_desc_chains(&descs, 0).expect("descriptor table");
    // The fuzzer's remaining bytes fill the first data page, where buffers often point.
    let fill = &input.0[..input.0.len().min(0x1000)];
    mem.write_slice(fill, GuestAddress(0x10_000))
        .expect("data page");
    mock.create_queue().expect("queue")
}

/// Pops the first available chain of `queue`.
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>> {
    let _ = queue.is_valid(mem);
    queue.iter(mem).ok()?.next()
}
