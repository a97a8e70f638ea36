//! Bounds the warnings a guest can trigger: the first few are logged, then one in
//! [`EVERY_NTH`] with the running count, so a flood of malformed packets cannot flood the log.

/// Warnings logged before thinning starts.
const FIRST: u64 = 16;
/// After [`FIRST`], one warning in this many is logged.
const EVERY_NTH: u64 = 1000;

/// Counts guest-triggered warnings and decides which to log.
#[derive(Debug, Default)]
pub(crate) struct GuestWarnings {
    seen: u64,
}

impl GuestWarnings {
    /// Counts a warning; returns the count when it should be logged.
    pub(crate) fn admit(&mut self) -> Option<u64> {
        self.seen += 1;
        (self.seen <= FIRST || self.seen % EVERY_NTH == 0).then_some(self.seen)
    }
}

/// `tracing::warn!` through a [`GuestWarnings`], with the running count as `nth`.
macro_rules! guest_warn {
    ($warnings:expr, $($arg:tt)+) => {
        if let Some(nth) = $warnings.admit() {
            tracing::warn!(nth, $($arg)+);
        }
    };
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thins_out_after_the_first_few() {
        let mut w = GuestWarnings::default();
        let logged = (0..5000).filter(|_| w.admit().is_some()).count();
        assert_eq!(logged, FIRST as usize + 5);
    }
}
