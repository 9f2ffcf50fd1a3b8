//! The bound on what the daemon holds in memory, in bytes: `memory_limit` divided among the
//! stages that hold events, and the byte gate that events pass from the sockets to the spool.
//!
//! Events are held in memory on their way from the sockets to the spool, in the in-memory tail
//! of batches just appended, in dead-letter replays, and in each sink loop (read from the spool,
//! handed over and not confirmed yet). Each gets a fixed share of the limit, and the shares add
//! up to it. Every share admits one event larger than itself alone, so no event is too large to
//! pass: an oversized event takes the whole share, or goes the way that needs no memory (a sink
//! loop reads it from the spool instead of the tail).

use std::sync::Arc;

use tokio::sync::{Semaphore, SemaphorePermit};

/// The `memory_limit` of a config that sets none: 64 MiB, a quarter of the Kubernetes
/// manifest's limit, which leaves room for the fixed costs (the executable, the runtime, each
/// socket's buffers).
pub(crate) const DEFAULT_MEMORY_LIMIT: u64 = 64 << 20;

/// `memory_limit` divided among the stages that hold events in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryBudget {
    /// Bytes of events read from the sockets and not in the spool yet (an eighth of the limit):
    /// the sockets wait while it is taken. The ingest's encoded copy of a batch, written in one
    /// append, takes as much again.
    pub(crate) ingest_events: usize,
    /// Bytes of one batch of dead letters put back into the spool by a replay, encoded (a
    /// sixteenth).
    pub(crate) replay_batch: usize,
    /// Bytes of appended batches kept in memory for the sink loops (three sixteenths).
    pub(crate) tail: usize,
    /// Each sink loop's share: half the limit, divided equally among the sinks, so that a sink
    /// that is down holds no memory another sink needs.
    pub(crate) sink: SinkMemory,
}

/// One sink loop's share of `memory_limit`: what it may read from the spool at once and keep
/// unconfirmed. At most a quarter of the share is unconfirmed when a batch is handed over, and
/// that batch is one read (an eighth); the sink's client may hold its own copy of those events
/// until confirmed; one read may be under way ahead while another is decoded: two quarters and
/// four eighths, the whole share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SinkMemory {
    /// Bytes of events handed to the sink and not confirmed yet at which no more are handed
    /// over.
    pub(crate) unconfirmed_bytes: usize,
    /// Bytes of records at which a read from the spool stops, and the largest in-memory batch
    /// the loop takes instead of reading it.
    pub(crate) read_bytes: usize,
}

impl MemoryBudget {
    /// `limit` bytes divided among the ingest, the tail, replays and `sinks` sink loops.
    pub(crate) fn divide(limit: u64, sinks: usize) -> MemoryBudget {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let sink = limit / 2 / sinks.max(1);
        MemoryBudget {
            ingest_events: limit / 8,
            replay_batch: limit / 16,
            tail: limit / 16 * 3,
            sink: SinkMemory {
                unconfirmed_bytes: sink / 4,
                read_bytes: sink / 8,
            },
        }
    }
}

/// Bounds the bytes of events on their way from the sockets to the spool. A token task takes
/// an event's bytes before it hands the event over, waiting while they are taken (its socket is
/// held back meanwhile: TCP's window does the rest); the ingest gives them back once the event
/// is appended. An event larger than the whole gate takes all of it, and so passes alone.
#[derive(Debug, Clone)]
pub(crate) struct ByteGate {
    /// One permit per byte not taken.
    permits: Arc<Semaphore>,
    /// Permits in all: the most one event takes.
    capacity: u32,
}

impl ByteGate {
    /// A gate of `bytes` (at most 4 GiB: the most one acquisition can take).
    pub(crate) fn new(bytes: usize) -> ByteGate {
        let capacity = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
        ByteGate {
            permits: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
        }
    }

    /// The permits an event of `bytes` takes: its bytes, at least one, at most all of them.
    pub(crate) fn charge(&self, bytes: usize) -> u32 {
        u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity)
    }

    /// Takes the permits of an event of `bytes`, waiting until they are free. They go back when
    /// the permit is dropped, unless it is forgotten: then [`ByteGate::release`] gives them back.
    pub(crate) async fn enter(&self, bytes: usize) -> SemaphorePermit<'_> {
        self.permits
            .acquire_many(self.charge(bytes))
            .await
            .expect("the gate's semaphore is never closed")
    }

    /// Gives back `permits` taken by events now in the spool (the sum of their charges).
    pub(crate) fn release(&self, permits: usize) {
        if permits > 0 {
            self.permits.add_permits(permits);
        }
    }

    /// Permits free now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[test]
    fn the_shares_add_up_to_the_limit() {
        let limit = 64u64 << 20;
        for sinks in [1, 3, 8] {
            let budget = MemoryBudget::divide(limit, sinks);
            let sink = budget.sink;
            // Per sink: unconfirmed plus one read, the client's copy of that, a read ahead and a
            // read being decoded.
            let per_sink = 2 * (sink.unconfirmed_bytes + sink.read_bytes) + 2 * sink.read_bytes;
            // The ingest's events and its encoded copy of them; a replay batch; the tail.
            let total =
                2 * budget.ingest_events + budget.replay_batch + budget.tail + sinks * per_sink;
            assert!(total as u64 <= limit, "{sinks} sinks: {total}");
            assert!(total as u64 > limit - limit / 64, "{sinks} sinks: {total}");
        }
    }

    #[tokio::test]
    async fn an_event_larger_than_the_gate_takes_all_of_it_and_passes_alone() {
        let gate = ByteGate::new(1000);
        let small = gate.enter(400).await;
        small.forget();
        assert_eq!(gate.available(), 600);
        // Larger than the whole gate: it waits for every permit, then takes them all.
        let large = gate.enter(5000);
        tokio::pin!(large);
        assert!(
            large.as_mut().now_or_never().is_none(),
            "it waits for the small one"
        );
        gate.release(gate.charge(400) as usize);
        let large = large.await;
        assert_eq!(gate.available(), 0);
        drop(large);
        assert_eq!(gate.available(), 1000);
        assert_eq!(gate.charge(0), 1, "an empty event still takes a permit");
    }
}
