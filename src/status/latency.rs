//! A sink's delivery latency, from an event's receipt on the socket to the sink's confirmation,
//! as a histogram of fixed buckets kept in atomics: recording takes no lock and allocates
//! nothing, and a scrape reads it as it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::Serialize;

/// Upper bounds of the buckets, in seconds: from a loopback broker's millisecond to an hour of
/// retries through an outage.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

/// [`LATENCY_BUCKETS`] in microseconds, the unit an event's latency is counted in.
const BUCKET_MICROS: [u64; LATENCY_BUCKETS.len()] = {
    let mut micros = [0; LATENCY_BUCKETS.len()];
    let mut i = 0;
    while i < micros.len() {
        micros[i] = (LATENCY_BUCKETS[i] * 1e6) as u64;
        i += 1;
    }
    micros
};

/// The buckets plus the one past the last bound (`+Inf`).
const SLOTS: usize = LATENCY_BUCKETS.len() + 1;

/// The histogram a sink loop records into.
#[derive(Debug, Default)]
pub(crate) struct LatencyHistogram {
    /// Events per bucket, not cumulative: slot `i` holds the latencies above bound `i - 1` and
    /// at most bound `i`; the last slot those above every bound.
    counts: [AtomicU64; SLOTS],
    /// Every latency recorded, summed, in microseconds (a u64 holds half a million years).
    sum_micros: AtomicU64,
}

/// A histogram read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latencies {
    /// Events at most each bound of [`LATENCY_BUCKETS`] took, cumulative as Prometheus wants
    /// them; the count of all events follows in `count`.
    pub cumulative: Vec<u64>,
    /// Every event recorded.
    pub count: u64,
    /// Their latencies summed, in seconds.
    pub sum_seconds: f64,
}

impl LatencyHistogram {
    /// Records the latencies of events received at `received` and confirmed at `now`: a few
    /// atomic adds per batch (one per bucket it touches, one for the sum), none per event. A
    /// receive time after `now` (a clock stepped back) counts as no latency.
    pub(crate) fn observe(&self, now: SystemTime, received: impl Iterator<Item = SystemTime>) {
        let mut counts = [0u64; SLOTS];
        let mut sum = 0u64;
        for at in received {
            let micros = now
                .duration_since(at)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            counts[BUCKET_MICROS.partition_point(|&bound| bound < micros)] += 1;
            sum = sum.saturating_add(micros);
        }
        for (slot, count) in self.counts.iter().zip(counts) {
            if count > 0 {
                slot.fetch_add(count, Ordering::Relaxed);
            }
        }
        if sum > 0 {
            self.sum_micros.fetch_add(sum, Ordering::Relaxed);
        }
    }

    /// The histogram now. Its count is the sum of its buckets, so the two always agree even
    /// when events are recorded while it is read.
    pub(crate) fn snapshot(&self) -> Latencies {
        let mut running = 0;
        let mut cumulative = Vec::with_capacity(SLOTS);
        for slot in &self.counts {
            running += slot.load(Ordering::Relaxed);
            cumulative.push(running);
        }
        let count = cumulative.pop().unwrap_or(0);
        Latencies {
            cumulative,
            count,
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn latencies_land_in_the_first_bucket_whose_bound_holds_them() {
        let histogram = LatencyHistogram::default();
        let now = SystemTime::now();
        let ago = |micros: u64| now - Duration::from_micros(micros);
        // At a bound is in that bucket (`le`); a microsecond more is in the next.
        let received = [ago(1_000), ago(1_001), ago(0), ago(7_200_000_000)];
        histogram.observe(now, received.into_iter());
        // A receive time in the future counts as no latency.
        histogram.observe(now, std::iter::once(now + Duration::from_secs(5)));
        let read = histogram.snapshot();
        assert_eq!(read.count, 5);
        assert_eq!(read.cumulative.len(), LATENCY_BUCKETS.len());
        assert_eq!(
            read.cumulative[0], 3,
            "0 µs twice and 1000 µs are at most 1 ms"
        );
        assert_eq!(read.cumulative[1], 4, "1001 µs is at most 2.5 ms");
        assert_eq!(
            *read.cumulative.last().unwrap(),
            4,
            "two hours is past every bound: only in the count"
        );
        let expected = (1_000u64 + 1_001 + 7_200_000_000) as f64 / 1e6;
        assert!((read.sum_seconds - expected).abs() < 1e-6, "{read:?}");
    }
}
