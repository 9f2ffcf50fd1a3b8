//! The batches an order-keeping sink was handed and has not confirmed yet, oldest first.
//!
//! Batches are handed over while earlier ones await their acknowledgements, up to
//! [`MAX_UNCONFIRMED`] events and the sink's unconfirmed bytes (its share of `memory_limit`).
//! When a batch comes back with a failure, every later one is let
//! answer first and they are settled together ([`InFlight::answer_all`]): one merged retry after
//! an outage, not one backoff per batch.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

use super::GaveUp;
use crate::delivery::ingest::MAX_BATCH;
use crate::event::Event;
use crate::sink::{Outcome, Sink, SinkError, SinkLimits};

/// Bounds the events an order-keeping sink may have been handed and not confirmed yet (checked
/// before a batch is handed over, so up to `MAX_UNCONFIRMED + MAX_BATCH - 1` at once).
///
/// Keeps the broker busy while acknowledgements travel: waiting for a batch's last ack before
/// sending the next would leave the connection idle in between, and a NATS core flush answers
/// only after everything before it reached the server. Bounds what a crash sends again, and what
/// a client sized by [`SINK_LIMITS`] must accept; the bytes are bounded by the sink's share of
/// `memory_limit`, whichever bound comes first.
pub(crate) const MAX_UNCONFIRMED: usize = 16 * MAX_BATCH;

/// What every sink is built to hold unconfirmed at once: what the loop may hand it.
pub(crate) const SINK_LIMITS: SinkLimits = SinkLimits {
    max_unconfirmed_events: MAX_UNCONFIRMED + MAX_BATCH - 1,
};

/// A sink's answer for one batch; `Err` holds a panic raised while handing it over or waiting.
pub(super) type Answer = std::thread::Result<Vec<Outcome>>;

/// The answer a batch handed over will get.
type Confirmation = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// A batch handed to the sink whose outcomes are not known yet.
pub(super) struct Unconfirmed {
    /// Seq of its last record: committed once it and every batch before it are settled.
    pub(super) last_seq: u64,
    /// Its events, to settle them if the answer is not a clean delivery.
    pub(super) events: Vec<Arc<Event>>,
    /// Their bytes ([`Event::memory_bytes`] summed), counted while unconfirmed.
    bytes: usize,
    /// The sink's answer, once it comes.
    answer: Confirmation,
}

/// What a sink's answer means for its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Every event was delivered: the batch is finished.
    AllDelivered,
    /// Something failed, panicked or got no outcome: the batch must be settled.
    ToSettle,
}

impl Verdict {
    /// The verdict on a sink's `answer` for `count` events. A sink that answered for fewer
    /// events than it was given goes the careful way: the events without an outcome are retried.
    pub(super) fn of(answer: &Answer, count: usize) -> Verdict {
        let all_delivered = matches!(answer, Ok(outcomes) if outcomes.len() == count
            && outcomes.iter().all(|o| matches!(o, Outcome::Delivered)));
        if all_delivered {
            Verdict::AllDelivered
        } else {
            Verdict::ToSettle
        }
    }
}

/// Whether more batches may be handed over before the unconfirmed ones are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    /// Yes, while fewer than [`MAX_UNCONFIRMED`] events and `max_bytes` bytes are unconfirmed.
    Open,
    /// A batch failed as it was handed over (its answer was there at once: a NATS client not
    /// connected, a producer refusing): a later batch could get through before its retry and
    /// overtake it.
    HeldBack,
}

/// The unconfirmed batches, oldest first.
pub(super) struct InFlight {
    /// The batches, in spool order.
    batches: VecDeque<Unconfirmed>,
    /// Events in `batches`: under [`MAX_UNCONFIRMED`] before each hand-over, so at most one
    /// batch more.
    events: usize,
    /// Bytes of the events in `batches`: under `max_bytes` before each hand-over, so at most
    /// one batch (one read from the spool) more. A batch larger than `max_bytes` is handed over
    /// alone.
    bytes: usize,
    /// The sink's share of `memory_limit` for unconfirmed events.
    max_bytes: usize,
    /// Whether a batch that failed at once holds back the next hand-over.
    handover: Handover,
}

impl InFlight {
    /// Nothing in flight; at most `max_bytes` of events unconfirmed when a batch is handed over.
    pub(super) fn new(max_bytes: usize) -> InFlight {
        InFlight {
            batches: VecDeque::new(),
            events: 0,
            bytes: 0,
            max_bytes,
            handover: Handover::Open,
        }
    }

    /// Whether the next batch may be handed over now.
    pub(super) fn accepts_more(&self) -> bool {
        self.handover == Handover::Open
            && self.events < MAX_UNCONFIRMED
            && (self.bytes < self.max_bytes || self.batches.is_empty())
    }

    /// Whether every batch handed over is settled.
    pub(super) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Events handed over and not answered yet.
    pub(super) fn events(&self) -> usize {
        self.events
    }

    /// When the first event of the oldest batch not answered yet was received.
    pub(super) fn oldest_received(&self) -> Option<std::time::SystemTime> {
        let batch = self.batches.front()?;
        batch.events.first().map(|e| e.received_at)
    }

    /// Hands `events` to the sink and queues them until answered. A panic while handing them
    /// over, or while waiting for the answer, becomes the answer, so that it is settled in
    /// order with the other batches. An answer that is there at once and not a clean delivery
    /// holds back further hand-overs.
    pub(super) async fn hand_over(
        &mut self,
        sink: &mut Sink,
        events: Vec<Arc<Event>>,
        last_seq: u64,
    ) {
        let mut answer: Confirmation =
            match AssertUnwindSafe(sink.send(&events)).catch_unwind().await {
                Ok(confirmations) => Box::pin(AssertUnwindSafe(confirmations).catch_unwind()),
                Err(panic) => Box::pin(std::future::ready(Err(panic))),
            };
        if let Some(known) = (&mut answer).now_or_never() {
            if Verdict::of(&known, events.len()) == Verdict::ToSettle {
                self.handover = Handover::HeldBack;
            }
            answer = Box::pin(std::future::ready(known));
        }
        let bytes = events.iter().map(|e| e.memory_bytes()).sum();
        self.events += events.len();
        self.bytes += bytes;
        self.batches.push_back(Unconfirmed {
            last_seq,
            events,
            bytes,
            answer,
        });
    }

    /// The oldest batch's answer, when it comes; `None` when nothing is in flight. Cancel-safe.
    pub(super) async fn oldest_answer(&mut self) -> Option<(Unconfirmed, Answer)> {
        let answer = (&mut self.batches.front_mut()?.answer).await;
        let batch = self.batches.pop_front().expect("answered just now");
        self.events -= batch.events.len();
        self.bytes -= batch.bytes;
        Some((batch, answer))
    }

    /// After `first` (the oldest) came back with a failure: waits for every later batch's
    /// answer, so that retries go in spool order, and merges them into one batch to settle.
    /// Afterwards nothing is in flight and hand-overs are open again (the caller settles the
    /// merged batch before it hands over the next).
    pub(super) async fn answer_all(
        &mut self,
        first: (Unconfirmed, Answer),
        give_up: &CancellationToken,
        mut panicked: impl FnMut(usize) -> Vec<Outcome>,
    ) -> Result<Merged, GaveUp> {
        let mut answered = vec![first];
        while let Some(mut later) = self.batches.pop_front() {
            let answer = tokio::select! {
                answer = &mut later.answer => answer,
                _ = give_up.cancelled() => return Err(GaveUp),
            };
            answered.push((later, answer));
        }
        self.events = 0;
        self.bytes = 0;
        self.handover = Handover::Open;
        let mut merged = Merged {
            events: Vec::new(),
            first_pass: Vec::new(),
            last_seq: 0,
        };
        for (batch, answer) in answered {
            let count = batch.events.len();
            let mut outcomes = answer.unwrap_or_else(|_| panicked(count));
            // Lined up with its own events, whatever the sink answered.
            outcomes.resize_with(count, || {
                Outcome::Retryable(SinkError::new("the sink gave no outcome"))
            });
            merged.events.extend(batch.events);
            merged.first_pass.extend(outcomes);
            merged.last_seq = batch.last_seq;
        }
        Ok(merged)
    }
}

/// Batches answered together, to settle as one.
pub(super) struct Merged {
    /// Their events, in spool order.
    pub(super) events: Vec<Arc<Event>>,
    /// The sink's outcome for each event: the first pass over the merged batch.
    pub(super) first_pass: Vec<Outcome>,
    /// Seq of the last record of the last batch: finished once the merged batch is settled.
    pub(super) last_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SinkKind;

    /// `count` events of about `bytes` bytes each.
    fn events(count: usize, bytes: usize) -> Vec<Arc<Event>> {
        let data = format!(r#"{{"pad":"{}"}}"#, "x".repeat(bytes));
        let event = Arc::new(Event::for_test("message.created", "t", &data));
        vec![event; count]
    }

    #[tokio::test]
    async fn hand_overs_stop_at_the_unconfirmed_bytes_but_a_larger_batch_goes_alone() {
        let dir = tempfile::tempdir().unwrap();
        let kind = SinkKind::File {
            path: dir.path().join("out.jsonl"),
            mode: 0o600,
        };
        let mut sink = Sink::build("out", &kind, SINK_LIMITS).await.unwrap();
        let event_bytes = events(1, 1000)[0].memory_bytes();
        let mut in_flight = InFlight::new(3 * event_bytes);
        in_flight.hand_over(&mut sink, events(2, 1000), 2).await;
        assert!(in_flight.accepts_more(), "two events are under three");
        in_flight.hand_over(&mut sink, events(2, 1000), 4).await;
        assert!(!in_flight.accepts_more(), "four events are over three");
        let (first, answer) = in_flight.oldest_answer().await.unwrap();
        assert_eq!(first.last_seq, 2);
        assert_eq!(Verdict::of(&answer, 2), Verdict::AllDelivered);
        assert!(in_flight.accepts_more(), "two are unconfirmed again");
        let (second, answer) = in_flight.oldest_answer().await.unwrap();
        assert_eq!(
            Verdict::of(&answer, second.events.len()),
            Verdict::AllDelivered
        );
        // Nothing unconfirmed: a batch larger than the whole share is handed over alone.
        let mut in_flight = InFlight::new(0);
        assert!(in_flight.accepts_more());
        in_flight.hand_over(&mut sink, events(5, 1000), 9).await;
        assert!(!in_flight.accepts_more());
    }
}
