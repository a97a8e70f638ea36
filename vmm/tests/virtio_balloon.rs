//! The real balloon device behind the virtio-mmio transport, without KVM: devices are built
//! from a VM configuration and attached to an MMIO bus as `Vm::boot` does, then a "driver"
//! (this test, doing what Linux's virtio_mmio + virtio_balloon do) brings the device up through
//! the bus, inflates pages and deflates them. Checks that the transport hands working queues to
//! the device, that notifications and interrupts flow, and that inflated pages are released on
//! the host (they read zero) and marked in the page-state map.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use balloon::{BalloonConfig, PageState};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::config::{BootSource, MachineConfig, SerialConfig, VmConfig};
use vmm::devices::bus::Bus;
use vmm::devices::virtio::{attach_virtio_devices, build_virtio_devices, IrqEventRegistry};
use vmm::memory::GuestRam;
use vmm_sys_util::eventfd::EventFd;

const MEM_MIB: u64 = 64;
const BASE: u64 = 0xd000_0000;
const QUEUE_SIZE: u16 = 256;
/// Where the test puts the PFN buffer in guest memory.
const PFN_BUFFER: u64 = 0x10_0000;
/// The pages the driver inflates: 16 pages at 8 MiB.
const FIRST_PFN: u32 = 0x800;
const PAGES: u32 = 16;

/// Records the ioeventfd/irqfd registrations and keeps the irqfd to observe interrupts.
#[derive(Default)]
struct Registry {
    notifies: RefCell<Vec<(u64, u32)>>,
    irq: RefCell<Option<EventFd>>,
}

impl IrqEventRegistry for Registry {
    fn register_queue_notify(
        &self,
        _: &EventFd,
        addr: u64,
        queue: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        self.notifies.borrow_mut().push((addr, queue));
        Ok(())
    }
    fn register_irq(&self, event: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        assert_eq!(gsi, 5);
        *self.irq.borrow_mut() = Some(event.try_clone().unwrap());
        Ok(())
    }
}

struct Driver<'a> {
    bus: &'a Bus,
}

impl Driver<'_> {
    fn read(&self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        assert!(self.bus.read(BASE + offset, &mut data));
        u32::from_le_bytes(data)
    }
    fn write(&self, offset: u64, value: u32) {
        assert_eq!(
            self.bus.write(BASE + offset, &value.to_le_bytes()),
            (None, true)
        );
    }
    fn add_status(&self, bit: u32) {
        let status = self.read(0x70);
        self.write(0x70, status | bit);
    }
    fn setup_queue(&self, index: u32, queue: &MockSplitQueue<GuestMemoryMmap>) {
        self.write(0x30, index);
        assert_eq!(self.read(0x44), 0, "queue {index} not ready yet");
        assert_eq!(self.read(0x34), u32::from(QUEUE_SIZE));
        self.write(0x38, u32::from(QUEUE_SIZE));
        for (low, addr) in [
            (0x80, queue.desc_table_addr()),
            (0x90, queue.avail_addr()),
            (0xa0, queue.used_addr()),
        ] {
            self.write(low, addr.0 as u32);
            self.write(low + 4, (addr.0 >> 32) as u32);
        }
        self.write(0x44, 1);
    }
}

fn config() -> VmConfig {
    VmConfig {
        drives: Vec::new(),
        boot_source: BootSource {
            kernel_image_path: "/nonexistent".into(),
            initrd_path: None,
            boot_args: None,
        },
        machine_config: MachineConfig {
            vcpu_count: 1,
            mem_size_mib: MEM_MIB,
            track_dirty_pages: false,
        },
        serial: SerialConfig::default(),
        balloon: Some(BalloonConfig {
            amount_mib: 0,
            deflate_on_oom: true,
            stats_polling_interval_s: 0,
            free_page_reporting: false,
            free_page_hinting: false,
        }),
        vsock: None,
        seccomp: true,
    }
}

/// Puts one PFN buffer on `queue`, notifies it through the bus, and waits until the device
/// has returned it (used index `expect_used`).
fn send_pfns(
    driver: &Driver,
    mem: &GuestMemoryMmap,
    queue: &MockSplitQueue<GuestMemoryMmap>,
    index: u32,
    chain_slot: u16,
    expect_used: u16,
) {
    let pfns: Vec<u8> = (FIRST_PFN..FIRST_PFN + PAGES)
        .flat_map(u32::to_le_bytes)
        .collect();
    mem.write_slice(&pfns, GuestAddress(PFN_BUFFER)).unwrap();
    let desc = Descriptor::new(PFN_BUFFER, pfns.len() as u32, 0, 0);
    queue
        .add_desc_chains(&[RawDescriptor::from(desc)], chain_slot)
        .unwrap();
    driver.write(0x50, index);
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.used().idx().load() != expect_used {
        assert!(
            Instant::now() < deadline,
            "the device did not return the buffer of queue {index}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn balloon_inflates_and_deflates_through_the_mmio_transport() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (MEM_MIB << 20) as usize)]).unwrap();
    let ram = Arc::new(GuestRam::new(mem.clone()));
    let devices = build_virtio_devices(&config(), &ram).unwrap();
    let handle = devices.balloon.clone().expect("a balloon handle");
    let registry = Registry::default();
    let mut bus = Bus::default();
    let attached = attach_virtio_devices(&registry, &mem, &mut bus, devices.specs).unwrap();
    assert_eq!(attached.len(), 1);
    assert_eq!(attached[0].name, "balloon");
    assert_eq!(
        *registry.notifies.borrow(),
        [(BASE + 0x50, 0), (BASE + 0x50, 1)]
    );
    let irq = registry.irq.borrow_mut().take().unwrap();
    let driver = Driver { bus: &bus };

    // Probe, as virtio_mmio does.
    assert_eq!(driver.read(0x0), 0x7472_6976);
    assert_eq!(driver.read(0x4), 2);
    assert_eq!(driver.read(0x8), 5, "virtio-balloon");
    driver.write(0x70, 0);
    driver.add_status(1);
    driver.add_status(2);
    driver.write(0x14, 1);
    let features_high = driver.read(0x10);
    driver.write(0x14, 0);
    let features_low = driver.read(0x10);
    let features = (u64::from(features_high) << 32) | u64::from(features_low);
    assert_eq!(
        features,
        balloon::VIRTIO_F_VERSION_1 | balloon::VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    );
    driver.write(0x24, 1);
    driver.write(0x20, features_high);
    driver.write(0x24, 0);
    driver.write(0x20, features_low);
    driver.add_status(8);
    assert_eq!(driver.read(0x70), 0xb, "FEATURES_OK accepted");

    let inflate = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), QUEUE_SIZE);
    let deflate = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), QUEUE_SIZE);
    driver.setup_queue(0, &inflate);
    driver.setup_queue(1, &deflate);
    driver.add_status(4);
    assert_eq!(driver.read(0x70), 0xf, "DRIVER_OK, no DEVICE_NEEDS_RESET");
    assert!(attached[0].info().transport.activated);
    assert!(handle.status().activated);

    // The host asks for 1 MiB: the configuration changes and the guest is interrupted.
    handle.set_target_mib(1).unwrap();
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(
        driver.read(0x60),
        2,
        "InterruptStatus: configuration change"
    );
    driver.write(0x64, 2);
    let mut num_pages = [0u8; 4];
    assert!(bus.read(BASE + 0x100, &mut num_pages));
    assert_eq!(u32::from_le_bytes(num_pages), 256);

    // The guest touches pages, then inflates them: they read zero and are marked inflated.
    let page_addr = GuestAddress(u64::from(FIRST_PFN) << 12);
    mem.write_slice(&[0xab; 4096 * PAGES as usize], page_addr)
        .unwrap();
    send_pfns(&driver, &mem, &inflate, 0, 0, 1);
    assert_eq!(driver.read(0x60) & 1, 1, "InterruptStatus: used buffer");
    let mut page = vec![0xffu8; 4096 * PAGES as usize];
    mem.read_slice(&mut page, page_addr).unwrap();
    assert!(page.iter().all(|b| *b == 0), "inflated pages were released");
    assert_eq!(ram.released_bytes(), 4096 * u64::from(PAGES));
    let states = handle.page_states();
    for pfn in FIRST_PFN..FIRST_PFN + PAGES {
        assert_eq!(
            states.lock().unwrap().state(pfn.into()).unwrap(),
            PageState::Inflated
        );
    }
    assert_eq!(handle.status().page_states.inflated_pages, u64::from(PAGES));

    // The guest reports how many pages the balloon holds (config space `actual`).
    assert_eq!(bus.write(BASE + 0x104, &PAGES.to_le_bytes()), (None, true));
    assert_eq!(handle.status().actual_pages, PAGES);

    // Deflate: the pages are the guest's again.
    send_pfns(&driver, &mem, &deflate, 1, 0, 1);
    assert_eq!(
        states.lock().unwrap().state(u64::from(FIRST_PFN)).unwrap(),
        PageState::Live
    );

    // A reset stops the device; a new bring-up would start from scratch.
    driver.write(0x70, 0);
    assert_eq!(driver.read(0x70), 0);
    assert!(!handle.status().activated);
    assert!(!attached[0].info().transport.activated);
}

#[test]
fn no_balloon_configured_means_no_devices() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let ram = Arc::new(GuestRam::new(mem));
    let mut config = config();
    config.balloon = None;
    let devices = build_virtio_devices(&config, &ram).unwrap();
    assert!(devices.specs.is_empty() && devices.balloon.is_none());
}
