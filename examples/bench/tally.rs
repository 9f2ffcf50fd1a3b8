//! What the consumer counts: distinct events by `mock_seq`, and their latencies from
//! `mock_sent_at_us`.

use std::time::Instant;

use crate::now_us;

/// How far into a payload the two numbers are looked for. Binary mode: data starts the payload;
/// structured mode: it follows ~450 bytes of CloudEvents attributes.
const HEAD_BYTES: usize = 1024;

/// `mock_seq` and `mock_sent_at_us` from the start of an event's data (space-padded numbers).
pub(crate) fn seq_and_sent_at(payload: &[u8]) -> Option<(u64, u64)> {
    Some((
        number_after(payload, b"\"mock_seq\":")?,
        number_after(payload, b"\"mock_sent_at_us\":")?,
    ))
}

/// The decimal number after `key` within the first [`HEAD_BYTES`], leading spaces skipped.
fn number_after(payload: &[u8], key: &[u8]) -> Option<u64> {
    let head = &payload[..payload.len().min(HEAD_BYTES)];
    let at = head.windows(key.len()).position(|w| w == key)? + key.len();
    let mut value = 0u64;
    let mut digits = 0;
    for &b in &head[at..] {
        match b {
            b' ' if digits == 0 => {}
            b'0'..=b'9' => {
                value = value.saturating_mul(10).saturating_add(u64::from(b - b'0'));
                digits += 1;
            }
            _ => break,
        }
    }
    (digits > 0).then_some(value)
}

/// Distinct events and their latencies.
pub(crate) struct Tally {
    /// How many distinct events make the run complete.
    expect: u64,
    /// Events below this sequence number are warm-up: counted, not in the latency figures.
    warmup: u64,
    /// One flag per sequence number: a redelivered event is counted once.
    seen: Vec<bool>,
    /// Events seen at least once.
    distinct: u64,
    /// Every message received, duplicates included.
    received: u64,
    /// Send-to-receipt times of the distinct events after the warm-up.
    latencies_us: Vec<u32>,
    /// First receipt: with `last`, how fast a backlog drains.
    pub(crate) first: Option<Instant>,
    /// Latest receipt.
    last: Instant,
    /// Earliest `mock_sent_at_us` and latest receipt (µs since the epoch): the rate is counted
    /// from the first send to the last receipt, so a sink that delivers in bursts (Kafka
    /// fetches) is not credited with its burst rate.
    first_sent_us: u64,
    /// Latest receipt, on the clock of `first_sent_us`.
    last_received_us: u64,
}

impl Tally {
    pub(crate) fn new(expect: u64, warmup: u64) -> Tally {
        Tally {
            expect,
            warmup,
            seen: vec![false; expect as usize],
            distinct: 0,
            received: 0,
            latencies_us: Vec::with_capacity(expect as usize),
            first: None,
            last: Instant::now(),
            first_sent_us: u64::MAX,
            last_received_us: 0,
        }
    }

    pub(crate) fn record(&mut self, payload: &[u8]) {
        let now = now_us();
        let at = Instant::now();
        self.received += 1;
        self.first.get_or_insert(at);
        self.last = at;
        let Some((seq, sent_at)) = seq_and_sent_at(payload) else {
            return;
        };
        self.first_sent_us = self.first_sent_us.min(sent_at);
        self.last_received_us = now;
        if let Some(seen) = self.seen.get_mut(seq as usize) {
            if !*seen {
                *seen = true;
                self.distinct += 1;
                if seq >= self.warmup {
                    self.latencies_us
                        .push(now.saturating_sub(sent_at).min(u64::from(u32::MAX)) as u32);
                }
            }
        }
    }

    pub(crate) fn done(&self) -> bool {
        self.distinct >= self.expect
    }

    /// The latency at quantile `p` (0 to 1) in ms, from the sorted samples; NaN without any.
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let n = self.latencies_us.len();
        let i = ((n as f64 * p).ceil() as usize).clamp(1, n) - 1;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    /// Seconds from the first receipt to the last.
    fn receipt_span_s(&self) -> f64 {
        self.first
            .map(|f| self.last.duration_since(f).as_secs_f64())
            .unwrap_or(0.0)
    }

    /// Seconds from the first send to the last receipt (the receipt span if the clocks disagree).
    fn send_span_s(&self) -> f64 {
        if self.last_received_us > self.first_sent_us {
            (self.last_received_us - self.first_sent_us) as f64 / 1e6
        } else {
            self.receipt_span_s()
        }
    }

    /// The `RESULT` line the orchestrator parses.
    pub(crate) fn report(&mut self) -> String {
        self.latencies_us.sort_unstable();
        let per_second = |span: f64| {
            if span > 0.0 {
                self.distinct as f64 / span
            } else {
                0.0
            }
        };
        let span = self.send_span_s();
        let recv_span = self.receipt_span_s();
        format!(
            "RESULT recv_span_s={recv_span:.3} recv_rate={:.0} distinct={} received={} expect={} span_s={span:.3} rate={:.0} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3}",
            per_second(recv_span),
            self.distinct,
            self.received,
            self.expect,
            per_second(span),
            self.percentile_ms(0.5),
            self.percentile_ms(0.99),
            self.percentile_ms(0.999),
            self.percentile_ms(1.0)
        )
    }
}
