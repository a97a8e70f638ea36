//! Test fixtures: guest memory, a recording interrupt, a device on a temporary socket path,
//! and the driver's side of a queue built on `virtio_queue::mock::MockSplitQueue`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_device::{ActivateContext, GuestWriteLog, Interrupt, VirtioDevice};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::VsockConfig;
use crate::device::{lock, Vsock, QUEUE_SIZE};
use crate::packet::{Header, HDR_BYTES, HOST_CID, TYPE_STREAM};

/// Guest RAM: 16 MiB at 0.
pub(crate) const MEM_BYTES: u64 = 16 << 20;
/// Where packet buffers start (rings live below).
pub(crate) const DATA_GPA: u64 = 1 << 20;
/// Device-writable descriptor flag.
pub(crate) const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// The guest CID of the fixtures.
pub(crate) const GUEST_CID: u64 = 3;

/// Records interrupts.
#[derive(Default)]
pub(crate) struct FakeInterrupt {
    pub(crate) used: Mutex<Vec<u16>>,
}

impl Interrupt for FakeInterrupt {
    fn signal_used_queue(&self, queue_index: u16) -> std::io::Result<()> {
        lock(&self.used).push(queue_index);
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records guest writes.
#[derive(Default)]
pub(crate) struct FakeWriteLog {
    pub(crate) bytes: AtomicU64,
}

impl GuestWriteLog for FakeWriteLog {
    fn record_write(&self, gpa: u64, len_bytes: u64) {
        assert!(gpa >= DATA_GPA && gpa + len_bytes <= MEM_BYTES);
        self.bytes.fetch_add(len_bytes, Ordering::Relaxed);
    }
}

/// Guest memory, a socket directory and a device.
pub(crate) struct Env {
    pub(crate) mem: GuestMemoryMmap,
    /// Holds the socket directory for the test's duration.
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) config: VsockConfig,
    pub(crate) vsock: Vsock,
    pub(crate) interrupt: Arc<FakeInterrupt>,
    pub(crate) write_log: Arc<FakeWriteLog>,
    next_data: AtomicU64,
}

impl Env {
    pub(crate) fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let config = VsockConfig {
            vsock_id: Some("vsock0".into()),
            guest_cid: GUEST_CID as u32,
            uds_path: dir.path().join("v.sock"),
        };
        let vsock = Vsock::new(config.clone()).unwrap();
        Env {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)]).unwrap(),
            _dir: dir,
            config,
            vsock,
            interrupt: Arc::new(FakeInterrupt::default()),
            write_log: Arc::new(FakeWriteLog::default()),
            next_data: AtomicU64::new(DATA_GPA),
        }
    }

    /// A fresh 64 KiB + header data buffer address.
    pub(crate) fn alloc(&self) -> u64 {
        let gpa = self.next_data.fetch_add(0x11000, Ordering::Relaxed);
        assert!(gpa + 0x11000 <= MEM_BYTES, "test ran out of buffer space");
        gpa
    }

    /// Activates the device with `queues`; returns notifiers for them.
    pub(crate) fn activate(&mut self, queues: Vec<Queue>) -> Vec<EventFd> {
        let events: Vec<EventFd> = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let notifiers = events.iter().map(|e| e.try_clone().unwrap()).collect();
        self.vsock
            .set_acked_features(virtio_device::VIRTIO_F_VERSION_1);
        self.vsock
            .activate(ActivateContext {
                mem: self.mem.clone(),
                queues,
                queue_events: events,
                interrupt: self.interrupt.clone(),
                write_log: Some(self.write_log.clone()),
            })
            .unwrap();
        notifiers
    }

    /// A header from the guest to the host.
    pub(crate) fn guest_hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        }
    }

    /// Puts a tx packet (header with `len` as given, then `payload`) in one descriptor.
    pub(crate) fn send_raw(
        &self,
        tx: &mut DriverQueue<'_>,
        hdr: &Header,
        payload: &[u8],
        notify: &EventFd,
    ) {
        let gpa = self.alloc();
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(gpa))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(gpa + HDR_BYTES as u64))
            .unwrap();
        tx.add_chain(&[(gpa, (HDR_BYTES + payload.len()) as u32, 0)]);
        notify.write(1).unwrap();
    }

    /// Sends a packet whose header `len` matches `payload`.
    pub(crate) fn send(
        &self,
        tx: &mut DriverQueue<'_>,
        hdr: Header,
        payload: &[u8],
        notify: &EventFd,
    ) {
        let hdr = Header {
            len: payload.len() as u32,
            ..hdr
        };
        self.send_raw(tx, &hdr, payload, notify);
    }

    /// Offers `n` rx buffers of 4 KiB + header; returns their addresses by head.
    pub(crate) fn add_rx(&self, rx: &mut DriverQueue<'_>, n: usize, notify: &EventFd) {
        for _ in 0..n {
            let gpa = self.alloc();
            rx.add_chain(&[(gpa, 4096 + HDR_BYTES as u32, WRITE)]);
        }
        notify.write(1).unwrap();
    }

    /// Waits for used entry `i` of `rx` and returns its header and payload.
    pub(crate) fn rx_packet(&self, rx: &DriverQueue<'_>, i: u16) -> (Header, Vec<u8>) {
        assert!(
            wait_until(|| rx.used_idx().wrapping_sub(i) as i16 > 0),
            "no rx packet {i} arrived (used idx {})",
            rx.used_idx()
        );
        let (head, len) = rx.used(i);
        let gpa = rx.addr_of(head as u16);
        let mut raw = [0u8; HDR_BYTES];
        self.mem.read_slice(&mut raw, GuestAddress(gpa)).unwrap();
        let hdr = Header::from_bytes(&raw);
        assert_eq!(
            len as usize,
            HDR_BYTES + hdr.len as usize,
            "used length matches the header"
        );
        let mut payload = vec![0u8; hdr.len as usize];
        self.mem
            .read_slice(&mut payload, GuestAddress(gpa + HDR_BYTES as u64))
            .unwrap();
        (hdr, payload)
    }
}

/// The driver's side of one split queue.
pub(crate) struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    addrs: Vec<u64>,
}

impl<'a> DriverQueue<'a> {
    /// A queue of [`QUEUE_SIZE`] entries with its rings at `base`.
    pub(crate) fn new(mem: &'a GuestMemoryMmap, base: u64) -> Self {
        DriverQueue {
            mock: MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE),
            next_desc: 0,
            addrs: vec![0; usize::from(QUEUE_SIZE)],
        }
    }

    /// The device-side queue, ready.
    pub(crate) fn queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    /// Makes a chain of `(gpa, len, flags)` descriptors available. Returns the head index.
    pub(crate) fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        if usize::from(self.next_desc) + descs.len() > usize::from(QUEUE_SIZE) {
            self.next_desc = 0;
        }
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
        self.addrs[usize::from(head)] = descs[0].0;
        self.next_desc = head + descs.len() as u16;
        head
    }

    /// Address of the first descriptor of chain `head`.
    pub(crate) fn addr_of(&self, head: u16) -> u64 {
        self.addrs[usize::from(head)]
    }

    /// Entries in the used ring so far.
    pub(crate) fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
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
}

/// Polls `cond` every 2 ms for up to 5 s.
pub(crate) fn wait_until(cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// Base address of the rings of queue `index`.
pub(crate) fn queue_base(index: usize) -> u64 {
    index as u64 * 0x8000
}
