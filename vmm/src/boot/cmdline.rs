//! The kernel command line: our defaults plus what the user appends.

use super::layout::CMDLINE_MAX_BYTES;

/// Parameters every guest gets: the serial console, ACPI reboot, no PCI bus (devices are
/// virtio-mmio, described in ACPI), no i8042 probing (there is no keyboard controller), and
/// `panic=-1` so a panicking guest resets (which ends the VMM) instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=a panic=-1 pci=off \
i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable";

/// Errors building the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// Longer than the space the boot protocol reserves.
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    TooLong {
        /// Length with the terminating NUL.
        len: usize,
        /// Maximum including the NUL.
        max: usize,
    },
    /// Contains a NUL byte or a non-printable character.
    #[error("kernel command line contains a control character at byte {0}")]
    BadCharacter(usize),
}

/// Joins the defaults and the user's extra parameters and checks the result fits.
/// `max_bytes` is the kernel's `cmdline_size` from its setup header (plus one for the NUL),
/// capped by the room we reserve.
pub fn build_cmdline(extra: Option<&str>, max_bytes: usize) -> Result<String, CmdlineError> {
    let mut line = DEFAULT_CMDLINE.to_string();
    if let Some(extra) = extra.map(str::trim).filter(|e| !e.is_empty()) {
        if let Some(pos) = extra.bytes().position(|b| b.is_ascii_control()) {
            return Err(CmdlineError::BadCharacter(pos));
        }
        line.push(' ');
        line.push_str(extra);
    }
    let max = max_bytes.min(CMDLINE_MAX_BYTES);
    if line.len() + 1 > max {
        return Err(CmdlineError::TooLong {
            len: line.len() + 1,
            max,
        });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_alone() {
        assert_eq!(build_cmdline(None, 2048).unwrap(), DEFAULT_CMDLINE);
        assert_eq!(build_cmdline(Some("  "), 2048).unwrap(), DEFAULT_CMDLINE);
    }

    #[test]
    fn extra_is_appended_after_defaults() {
        let line = build_cmdline(Some("vmm_run=\"echo hi\" quiet"), 2048).unwrap();
        assert!(line.starts_with(DEFAULT_CMDLINE));
        assert!(line.ends_with(" vmm_run=\"echo hi\" quiet"));
    }

    #[test]
    fn too_long_is_rejected_with_sizes() {
        let extra = "x".repeat(3000);
        let err = build_cmdline(Some(&extra), 2048).unwrap_err();
        assert!(matches!(err, CmdlineError::TooLong { max: 2048, .. }));
        assert!(build_cmdline(Some(&extra), 1 << 20).is_ok());
        let huge = "x".repeat(CMDLINE_MAX_BYTES);
        assert!(build_cmdline(Some(&huge), 1 << 20).is_err());
    }

    #[test]
    fn control_characters_are_rejected() {
        assert_eq!(
            build_cmdline(Some("a\nb"), 2048),
            Err(CmdlineError::BadCharacter(1))
        );
        assert_eq!(
            build_cmdline(Some("a\0b"), 2048),
            Err(CmdlineError::BadCharacter(1))
        );
    }
}
