//! How a sink retries: the backoff between attempts, when a failing conversation is set aside,
//! and when an event is given up.

use std::time::Duration;

/// Delivery retries of one sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    /// Ceiling of the first retry delay.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
    /// Set an event aside (park it, with every later event of its conversation) when it still
    /// fails this long after its first try: the sink's cursor moves on and its other
    /// conversations flow. At most `max_elapsed`; equal to it, nothing is parked (5 min by
    /// default, or `max_elapsed` if that is shorter).
    pub park_after: Duration,
    /// Give an event up (to the dead letters) when it still fails this long after its first try.
    pub max_elapsed: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            park_after: Duration::from_secs(5 * 60),
            max_elapsed: Duration::from_secs(24 * 3600),
        }
    }
}
