//! User configuration of the virtio-balloon device (the `balloon` section of a VM config and
//! the body of the balloon API resource).

use serde::{Deserialize, Serialize};

/// Longest statistics polling interval accepted, in seconds.
pub const MAX_STATS_POLLING_INTERVAL_S: u16 = 3600;

/// How the balloon device behaves. Field names follow Firecracker's balloon API so existing
/// tooling reads naturally; unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target balloon size in MiB: how much guest memory the guest is asked to give back.
    pub amount_mib: u32,
    /// Let the guest deflate the balloon when it runs out of memory
    /// (VIRTIO_BALLOON_F_DEFLATE_ON_OOM) instead of invoking its OOM killer.
    pub deflate_on_oom: bool,
    /// Interval between guest memory statistics updates, in seconds; 0 disables the stats
    /// queue (VIRTIO_BALLOON_F_STATS_VQ not offered).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Offer free page reporting (VIRTIO_BALLOON_F_REPORTING): the guest reports free blocks,
    /// the host releases them and marks them reported in the page-state map.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Offer free page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT): on request the guest hints
    /// free pages; hinted pages not written afterwards are skipped by snapshots.
    #[serde(default)]
    pub free_page_hinting: bool,
}

/// Why a [`BalloonConfig`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum BalloonConfigError {
    /// The balloon would take more memory than the guest has.
    #[error("balloon.amount_mib: must be at most the guest memory size ({guest_mem_mib} MiB), got {amount_mib}")]
    AmountExceedsGuestMemory {
        /// Requested balloon size.
        amount_mib: u32,
        /// Guest memory size.
        guest_mem_mib: u64,
    },
    /// The stats polling interval is longer than [`MAX_STATS_POLLING_INTERVAL_S`].
    #[error("balloon.stats_polling_interval_s: must be between 0 and {max_s}, got {interval_s}")]
    StatsPollingIntervalTooLong {
        /// Requested interval.
        interval_s: u16,
        /// [`MAX_STATS_POLLING_INTERVAL_S`].
        max_s: u16,
    },
    /// The JSON text is not a valid balloon configuration.
    #[error("parse balloon config")]
    Parse(#[source] serde_json::Error),
}

impl BalloonConfig {
    /// Checks the configuration against a guest of `guest_mem_mib` MiB.
    pub fn validate(&self, guest_mem_mib: u64) -> Result<(), BalloonConfigError> {
        if u64::from(self.amount_mib) > guest_mem_mib {
            return Err(BalloonConfigError::AmountExceedsGuestMemory {
                amount_mib: self.amount_mib,
                guest_mem_mib,
            });
        }
        if self.stats_polling_interval_s > MAX_STATS_POLLING_INTERVAL_S {
            return Err(BalloonConfigError::StatsPollingIntervalTooLong {
                interval_s: self.stats_polling_interval_s,
                max_s: MAX_STATS_POLLING_INTERVAL_S,
            });
        }
        Ok(())
    }

    /// Parses a configuration from JSON and validates it for a guest of `guest_mem_mib` MiB.
    pub fn from_json_str(text: &str, guest_mem_mib: u64) -> Result<Self, BalloonConfigError> {
        let config: BalloonConfig =
            serde_json::from_str(text).map_err(BalloonConfigError::Parse)?;
        config.validate(guest_mem_mib)?;
        Ok(config)
    }

    /// Whether the statistics queue is offered.
    pub fn stats_enabled(&self) -> bool {
        self.stats_polling_interval_s > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_minimal() {
        let full = r#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1,
                       "free_page_reporting": true, "free_page_hinting": false}"#;
        let c = BalloonConfig::from_json_str(full, 512).unwrap();
        assert_eq!(c.amount_mib, 64);
        assert!(c.deflate_on_oom && c.free_page_reporting && !c.free_page_hinting);
        assert!(c.stats_enabled());

        let minimal = r#"{"amount_mib": 0, "deflate_on_oom": false}"#;
        let c = BalloonConfig::from_json_str(minimal, 512).unwrap();
        assert_eq!(c.stats_polling_interval_s, 0);
        assert!(!c.stats_enabled() && !c.free_page_reporting && !c.free_page_hinting);
    }

    #[test]
    fn round_trip() {
        let c = BalloonConfig {
            amount_mib: 128,
            deflate_on_oom: true,
            stats_polling_interval_s: 5,
            free_page_reporting: true,
            free_page_hinting: true,
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(BalloonConfig::from_json_str(&json, 512).unwrap(), c);
    }

    #[test]
    fn rejects_unknown_and_missing_fields() {
        let err = BalloonConfig::from_json_str(
            r#"{"amount_mib": 1, "deflate_on_oom": true, "amount_kib": 3}"#,
            512,
        )
        .unwrap_err();
        let BalloonConfigError::Parse(source) = &err else {
            panic!("{err:?}")
        };
        assert!(
            source.to_string().contains("unknown field `amount_kib`"),
            "{source}"
        );
        let err = BalloonConfig::from_json_str(r#"{"amount_mib": 1}"#, 512).unwrap_err();
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("deflate_on_oom"), "{source}");
    }

    #[test]
    fn rejects_out_of_range() {
        let mut c = BalloonConfig {
            amount_mib: 513,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_reporting: false,
            free_page_hinting: false,
        };
        let err = c.validate(512).unwrap_err();
        assert!(matches!(
            err,
            BalloonConfigError::AmountExceedsGuestMemory {
                amount_mib: 513,
                guest_mem_mib: 512
            }
        ));
        assert_eq!(
            err.to_string(),
            "balloon.amount_mib: must be at most the guest memory size (512 MiB), got 513"
        );
        c.amount_mib = 512;
        c.validate(512).unwrap();
        c.stats_polling_interval_s = 3601;
        assert_eq!(
            c.validate(512).unwrap_err().to_string(),
            "balloon.stats_polling_interval_s: must be between 0 and 3600, got 3601"
        );
        // Negative or oversized numbers fail to parse.
        assert!(
            BalloonConfig::from_json_str(r#"{"amount_mib": -1, "deflate_on_oom": true}"#, 512)
                .is_err()
        );
    }
}
