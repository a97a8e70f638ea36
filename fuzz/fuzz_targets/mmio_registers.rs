//! The virtio-mmio transport (vmm/src/devices/virtio/mmio.rs): any sequence of register and
//! configuration reads and writes a guest driver can make, in any order and size. Invariants:
//! MagicValue/Version/DeviceID always read back; the device only sees acked features it offered;
//! it is activated only after DRIVER_OK with queues that are valid in guest memory (so the
//! device never gets ring addresses outside guest RAM); a reset clears the activation.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use virtio_device::{ActivateContext, ActivateError, VirtioDevice};
use virtio_queue::QueueT;
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::interrupt::MmioInterrupt;
use vmm::devices::virtio::mmio::MmioTransport;
use vmm_fuzz::{guest_memory, Input};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const OFFERED: u64 = (1 << 32) | (1 << 29) | 0b1011;
const QUEUE_MAX_SIZES: [u16; 2] = [256, 8];
const DRIVER_OK: u32 = 4;

#[derive(Default)]
struct Seen {
    acked: u64,
    active: bool,
    activations: u64,
    config: [u8; 16],
}

struct FuzzDevice(Arc<Mutex<Seen>>);

impl VirtioDevice for FuzzDevice {
    fn device_type(&self) -> u32 {
        5
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }
    fn avail_features(&self) -> u64 {
        OFFERED
    }
    fn set_acked_features(&mut self, features: u64) {
        self.0.lock().unwrap().acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        virtio_device::read_config_bytes(&self.0.lock().unwrap().config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut seen = self.0.lock().unwrap();
        for (i, byte) in data.iter().enumerate() {
            if let Some(slot) = (offset as usize)
                .checked_add(i)
                .and_then(|at| seen.config.get_mut(at))
            {
                *slot = *byte;
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        for queue in ctx.queues.iter().filter(|q| q.ready()) {
            assert!(queue.is_valid(&ctx.mem), "activated with an invalid queue");
        }
        assert_eq!(ctx.queues.len(), QUEUE_MAX_SIZES.len());
        let mut seen = self.0.lock().unwrap();
        assert!(!seen.active, "activated twice without a reset");
        seen.active = true;
        seen.activations += 1;
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.0.lock().unwrap().active = false;
        true
    }
}

fn read_u32(transport: &mut MmioTransport, offset: u64) -> u32 {
    let mut bytes = [0u8; 4];
    transport.read(offset, &mut bytes);
    u32::from_le_bytes(bytes)
}

fuzz_target!(|data: &[u8]| {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let interrupt = Arc::new(MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let events = (0..QUEUE_MAX_SIZES.len())
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let mut transport = MmioTransport::new(
        "fuzz".into(),
        Box::new(FuzzDevice(seen.clone())),
        guest_memory(),
        interrupt,
        events,
    )
    .expect("transport");
    let mut input = Input(data);
    while !input.is_empty() {
        let op = input.u8();
        // Registers are 0x000..0x100 (mostly), the configuration space from 0x100.
        let offset = match op >> 6 {
            0 => u64::from(input.u8() & 0xfc),
            1 => u64::from(input.u16() & 0x1ff),
            2 => 0x100 + u64::from(input.u8() & 0x1f),
            _ => input.u64(),
        };
        let size = [1usize, 2, 4, 8][usize::from((op >> 1) & 3)];
        if op & 1 == 0 {
            let mut buf = [0u8; 8];
            transport.read(offset, &mut buf[..size]);
        } else {
            let value = input.u64().to_le_bytes();
            transport.write(offset, &value[..size]);
        }
        assert_eq!(read_u32(&mut transport, 0x000), 0x7472_6976, "MagicValue");
        assert_eq!(read_u32(&mut transport, 0x004), 2, "Version");
        assert_eq!(read_u32(&mut transport, 0x008), 5, "DeviceID");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.acked & !OFFERED, 0, "acked features never offered");
        let info = transport.info();
        assert_eq!(info.activated, seen.active);
        if seen.active {
            assert_ne!(
                read_u32(&mut transport, 0x070) & DRIVER_OK,
                0,
                "active without DRIVER_OK"
            );
        }
    }
});
