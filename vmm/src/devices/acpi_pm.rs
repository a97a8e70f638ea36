//! The hardware-reduced ACPI power-management registers the FADT points at: sleep control
//! (a write of SLP_EN with the `\_S5_` sleep type powers off), sleep status, and reset.

use super::bus::{BusDevice, GuestRequest};
use crate::boot::layout::{ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE};

/// Offset of the sleep control register (FADT SLEEP_CONTROL_REG).
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register (FADT SLEEP_STATUS_REG).
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register (FADT RESET_REG).
pub const RESET_OFFSET: u64 = 2;
/// Number of ports the device occupies.
pub const PORT_COUNT: u64 = 3;
/// Sleep control: SLP_EN.
const SLEEP_ENABLE: u8 = 1 << 5;
/// Sleep control: SLP_TYP field position and mask.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;

/// The ACPI power-management device.
#[derive(Default)]
pub struct AcpiPmDevice;

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Never asleep, never woken: status reads as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        let value = *data.first()?;
        match offset {
            SLEEP_CONTROL_OFFSET if value & SLEEP_ENABLE != 0 => {
                let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
                if sleep_type == ACPI_S5_SLEEP_TYPE {
                    Some(GuestRequest::PowerOff)
                } else {
                    tracing::warn!(
                        sleep_type,
                        "guest asked for an unsupported sleep state; ignored"
                    );
                    None
                }
            }
            RESET_OFFSET if value == ACPI_RESET_VALUE => Some(GuestRequest::Reset),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let mut pm = AcpiPmDevice;
        let s5 = (ACPI_S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE;
        assert_eq!(
            pm.write(SLEEP_CONTROL_OFFSET, &[s5]),
            Some(GuestRequest::PowerOff)
        );
        assert_eq!(
            pm.write(
                SLEEP_CONTROL_OFFSET,
                &[ACPI_S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT]
            ),
            None
        );
        assert_eq!(
            pm.write(
                SLEEP_CONTROL_OFFSET,
                &[(3 << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE]
            ),
            None
        );
        assert_eq!(
            pm.write(RESET_OFFSET, &[ACPI_RESET_VALUE]),
            Some(GuestRequest::Reset)
        );
        assert_eq!(pm.write(RESET_OFFSET, &[0]), None);
        assert_eq!(pm.write(SLEEP_STATUS_OFFSET, &[0xff]), None);
        assert_eq!(pm.write(SLEEP_CONTROL_OFFSET, &[]), None);
        let mut b = [0xffu8; 1];
        pm.read(SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b[0], 0);
    }
}
