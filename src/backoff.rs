//! Reconnect delays: exponential ceilings from `backon`, with full jitter on top.
//!
//! Full jitter (a delay drawn uniformly from zero to the ceiling) spreads a fleet of sockets
//! that lost their server at the same instant, so they do not come back as one wave. backon's
//! own jitter only adds up to one more ceiling, which keeps the wave.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The delays of one token's reconnects and resubscribes.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// Kept to start the ceilings over on [`Backoff::reset`].
    builder: ExponentialBuilder,
    /// Exponentially growing ceilings, capped at the configured maximum.
    ceilings: ExponentialBackoff,
    /// Used once the ceilings are exhausted (they never are: no attempt limit is set).
    max: Duration,
}

impl Backoff {
    /// Ceilings start at `initial` and double up to `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Backoff {
            builder,
            ceilings: builder.build(),
            max,
        }
    }

    /// The next delay: uniformly random up to the current ceiling.
    pub(crate) fn next_delay(&mut self) -> Duration {
        full_jitter(self.next_ceiling())
    }

    /// The next ceiling, without jitter.
    pub(crate) fn next_ceiling(&mut self) -> Duration {
        self.ceilings.next().unwrap_or(self.max)
    }

    /// Starts over at the initial ceiling, after a connection proved healthy.
    pub(crate) fn reset(&mut self) {
        self.ceilings = self.builder.build();
    }
}

/// A duration drawn uniformly from `[0, ceiling]`.
pub(crate) fn full_jitter(ceiling: Duration) -> Duration {
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
    }

    #[test]
    fn ceilings_double_up_to_the_cap_and_never_end() {
        let mut b = backoff();
        let ceilings: Vec<u64> = (0..10).map(|_| b.next_ceiling().as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]);
        for _ in 0..1000 {
            assert_eq!(b.next_ceiling(), Duration::from_secs(30));
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = backoff();
        for _ in 0..5 {
            b.next_ceiling();
        }
        b.reset();
        assert_eq!(b.next_ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_range() {
        let ceiling = Duration::from_secs(30);
        let delays: Vec<Duration> = (0..2000).map(|_| full_jitter(ceiling)).collect();
        assert!(delays.iter().all(|d| *d <= ceiling));
        // each third of the range gets a fair share: no synchronized wave at the ceiling
        for third in 0..3u32 {
            let lo = ceiling / 3 * third;
            let hi = ceiling / 3 * (third + 1);
            let n = delays.iter().filter(|d| **d >= lo && **d < hi).count();
            assert!(n > 500, "third {third}: {n} of 2000");
        }
    }
}
