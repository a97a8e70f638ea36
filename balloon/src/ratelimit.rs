//! Rate limiting for log messages the guest can trigger.
//!
//! A misbehaving guest can post malformed buffers as fast as it likes; every one of them is
//! worth a warning, but not a flood of them. [`LogLimiter`] lets a burst of messages through
//! per time window and counts the rest, reporting the count when the next window opens.

use std::time::{Duration, Instant};

/// Messages let through per window.
const BURST: u32 = 10;

/// Length of a window.
const WINDOW: Duration = Duration::from_secs(5);

/// Decides whether a guest-triggered message may be logged now.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    window_start: Option<Instant>,
    emitted: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter with a fresh window.
    pub(crate) fn new() -> Self {
        LogLimiter {
            window_start: None,
            emitted: 0,
            suppressed: 0,
        }
    }

    /// Whether the next message may be logged; counts it as suppressed otherwise.
    pub(crate) fn check(&mut self) -> bool {
        let now = Instant::now();
        let expired = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if expired {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "balloon: suppressed {} guest-triggered warnings in the last {} s",
                    self.suppressed,
                    WINDOW.as_secs()
                );
            }
            self.window_start = Some(now);
            self.emitted = 0;
            self.suppressed = 0;
        }
        if self.emitted < BURST {
            self.emitted += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// `tracing::warn!` through a [`LogLimiter`].
macro_rules! guest_warn {
    ($limiter:expr, $($arg:tt)+) => {
        if $limiter.check() {
            tracing::warn!($($arg)+);
        }
    };
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_burst_through() {
        let mut limiter = LogLimiter::new();
        let allowed = (0..100).filter(|_| limiter.check()).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(limiter.suppressed, 100 - u64::from(BURST));
    }
}
