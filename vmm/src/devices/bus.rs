//! Dispatch of port I/O and MMIO exits to the device that owns the address.

use std::sync::{Arc, Mutex};

/// What a device asks of the VMM after a guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reset,
}

/// A device on the port-I/O or MMIO bus. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// Serves a guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Serves a guest write; may ask the VMM to act.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest>;
}

/// A shared device handle as the bus stores it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors registering a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// An address space (ports or MMIO) mapping ranges to devices.
#[derive(Default)]
pub struct Bus {
    /// Sorted by base, non-overlapping.
    ranges: Vec<(u64, u64, SharedDevice)>,
}

impl Bus {
    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if self.ranges.iter().any(|(b, l, _)| base < b + l && *b < end) {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|(b, _, _)| *b < base);
        self.ranges.insert(at, (base, len, device));
        Ok(())
    }

    /// The device covering `addr` and the offset within it.
    fn find(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let at = self.ranges.partition_point(|(b, _, _)| *b <= addr);
        let (base, len, device) = self.ranges.get(at.checked_sub(1)?)?;
        (addr - base < *len).then_some((device, addr - base))
    }

    /// Reads from the device at `addr`; unclaimed addresses read as all ones, like an empty
    /// bus. Returns whether a device claimed the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; unclaimed writes are dropped. Returns the device's
    /// request, and whether a device claimed the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> (Option<GuestRequest>, bool) {
        match self.find(addr) {
            Some((device, offset)) => (lock(device).write(offset, data), true),
            None => (None, false),
        }
    }
}

/// Locks a device even if another thread panicked while holding it: device state stays
/// usable for the guest, and the panic is reported where it happened.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> Option<GuestRequest> {
            self.0 = data[0];
            (data[0] == 0xee).then_some(GuestRequest::PowerOff)
        }
    }

    fn dev(v: u8) -> SharedDevice {
        Arc::new(Mutex::new(Echo(v)))
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, dev(0x10)).unwrap();
        bus.insert(0x600, 4, dev(0x20)).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 0x12);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(
            bus.write(0x600, &[0xee]),
            (Some(GuestRequest::PowerOff), true)
        );
        assert_eq!(bus.write(0x604, &[0xee]), (None, false));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, dev(0)).unwrap();
        assert!(matches!(
            bus.insert(0x10f, 1, dev(0)),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xf8, 9, dev(0)),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(0x110, 1, dev(0)).is_ok());
        assert!(matches!(
            bus.insert(0x200, 0, dev(0)),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev(0)),
            Err(BusError::BadRange { .. })
        ));
    }
}
