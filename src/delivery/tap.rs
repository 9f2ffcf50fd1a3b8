//! The routed events as they are spooled, for whoever taps them live (`chatwoot-bridge tap`,
//! through the admin endpoint's `/tap`).
//!
//! The ingest pays one atomic load per batch while nobody taps. While someone does, it hands
//! each appended batch over as it is (its events are shared, not copied, with how each was
//! routed) on a broadcast channel, and never waits: a tap that falls behind misses batches and
//! is told how many events it missed; what the taps hold is bounded in bytes, past which batches
//! are not offered at all. Filtering, redaction and encoding happen on the tap's side.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::event::Event;
use crate::route::{RouteTable, Routed};

/// Bounds the batches a tap may be behind before it misses some (a batch is up to `MAX_BATCH`
/// events).
pub(crate) const TAP_QUEUE_BATCHES: usize = 64;

/// Bounds the bytes of events ([`Event::memory_bytes`]) that batches offered to the taps keep
/// alive beyond their delivery: past it, batches are not offered, and the taps are told they
/// missed them.
pub(crate) const TAP_MAX_HELD_BYTES: usize = 16 << 20;

/// Where the ingest offers routed events to the taps. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct TapHub {
    /// Shared by every clone and every tap.
    hub: Arc<Hub>,
}

/// What the ingest and the taps share.
#[derive(Debug)]
struct Hub {
    /// The batches, to every tap connected.
    batches: broadcast::Sender<Arc<TapBatch>>,
    /// Taps connected: the ingest offers nothing while it is zero.
    taps: AtomicUsize,
    /// Events offered so far, skipped ones included: a tap tells from a gap what it missed.
    offered: AtomicU64,
    /// Bytes of the events in batches offered and not dropped by every tap yet.
    held_bytes: Arc<AtomicUsize>,
}

/// One event as the ingest routed it.
#[derive(Debug)]
pub(crate) struct TappedEvent {
    /// The event, shared with the spool's in-memory tail; its pubsub token was never in it,
    /// but `data` is as received (a tap redacts before showing it).
    pub(crate) event: Arc<Event>,
    /// The sinks it goes to (indices into the route table's sinks) and whether a route matched.
    pub(crate) routed: Routed,
}

/// One appended batch, as the taps get it.
#[derive(Debug)]
pub(crate) struct TapBatch {
    /// How many events were offered before its first.
    pub(crate) first: u64,
    /// The routes the batch was routed with: route names and sink names come from it.
    pub(crate) routes: Arc<RouteTable>,
    /// Its events, in spool order.
    pub(crate) events: Vec<TappedEvent>,
    /// The bytes of its events, counted in `held` while it lives.
    bytes: usize,
    /// The hub's count of bytes held, given back when the last tap drops the batch.
    held: Arc<AtomicUsize>,
}

impl Drop for TapBatch {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Default for TapHub {
    fn default() -> Self {
        TapHub {
            hub: Arc::new(Hub {
                batches: broadcast::channel(TAP_QUEUE_BATCHES).0,
                taps: AtomicUsize::new(0),
                offered: AtomicU64::new(0),
                held_bytes: Arc::default(),
            }),
        }
    }
}

impl TapHub {
    /// Whether a tap is connected: the one load the ingest makes per batch.
    pub(crate) fn is_tapped(&self) -> bool {
        self.hub.taps.load(Ordering::Relaxed) > 0
    }

    /// Offers the events of one appended batch, routed by `routes`. Never waits: past
    /// [`TAP_MAX_HELD_BYTES`] the batch is skipped, which the taps see as missed events.
    pub(crate) fn offer(&self, routes: &Arc<RouteTable>, events: Vec<TappedEvent>) {
        if events.is_empty() {
            return;
        }
        let first = self
            .hub
            .offered
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let bytes: usize = events.iter().map(|e| e.event.memory_bytes()).sum();
        let held = &self.hub.held_bytes;
        if held.load(Ordering::Relaxed).saturating_add(bytes) > TAP_MAX_HELD_BYTES {
            return;
        }
        held.fetch_add(bytes, Ordering::Relaxed);
        let batch = TapBatch {
            first,
            routes: routes.clone(),
            events,
            bytes,
            held: held.clone(),
        };
        // No tap left since the check: the batch is dropped here, and its bytes given back.
        let _ = self.hub.batches.send(Arc::new(batch));
    }

    /// A new tap: from now on the ingest offers it every batch.
    pub(crate) fn subscribe(&self) -> TapReceiver {
        self.hub.taps.fetch_add(1, Ordering::Relaxed);
        let batches = self.hub.batches.subscribe();
        TapReceiver {
            batches,
            next: self.hub.offered.load(Ordering::Relaxed),
            hub: self.hub.clone(),
        }
    }
}

/// One tap's end of the hub; the ingest stops offering once the last one is dropped.
#[derive(Debug)]
pub(crate) struct TapReceiver {
    /// The batches offered since it subscribed.
    batches: broadcast::Receiver<Arc<TapBatch>>,
    /// The index of the next event it expects: a batch starting later means it missed some.
    next: u64,
    /// The hub, to count this tap out when it is dropped.
    hub: Arc<Hub>,
}

impl TapReceiver {
    /// The next batch, with how many events were missed before it (the tap fell behind, or
    /// the taps held too much). Cancel-safe.
    pub(crate) async fn next(&mut self) -> (Arc<TapBatch>, u64) {
        loop {
            match self.batches.recv().await {
                Ok(batch) => {
                    let missed = batch.first.saturating_sub(self.next);
                    self.next = self.next.max(batch.first + batch.events.len() as u64);
                    return (batch, missed);
                }
                // The batches it missed show as a gap before the next one.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                // The hub holds the sender as long as this receiver lives.
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }
}

impl Drop for TapReceiver {
    fn drop(&mut self) {
        self.hub.taps.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn events(count: usize, pad: usize) -> Vec<TappedEvent> {
        let data = format!(r#"{{"pad":"{}"}}"#, "x".repeat(pad));
        (0..count)
            .map(|_| TappedEvent {
                event: Arc::new(Event::for_test("message.created", "t", &data)),
                routed: Routed::default(),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_tap_that_falls_behind_is_told_how_many_events_it_missed() {
        let hub = TapHub::default();
        let routes = Arc::new(RouteTable::compile(vec![], &BTreeSet::new(), None).unwrap());
        assert!(!hub.is_tapped());
        hub.offer(&routes, events(3, 10));
        let mut tap = hub.subscribe();
        assert!(hub.is_tapped());
        hub.offer(&routes, events(2, 10));
        let (batch, missed) = tap.next().await;
        assert_eq!(
            (batch.events.len(), missed),
            (2, 0),
            "what came before it is not missed"
        );
        for _ in 0..TAP_QUEUE_BATCHES + 5 {
            hub.offer(&routes, events(1, 10));
        }
        let (_, missed) = tap.next().await;
        assert_eq!(missed, 5, "the oldest batches the queue could not hold");
        drop(tap);
        assert!(!hub.is_tapped());
    }

    #[tokio::test]
    async fn the_bytes_taps_hold_are_bounded_and_given_back() {
        let hub = TapHub::default();
        let routes = Arc::new(RouteTable::compile(vec![], &BTreeSet::new(), None).unwrap());
        let mut tap = hub.subscribe();
        let per_batch = events(1, 1 << 20)[0].event.memory_bytes();
        let fits = TAP_MAX_HELD_BYTES / per_batch;
        for _ in 0..fits + 3 {
            hub.offer(&routes, events(1, 1 << 20));
        }
        assert!(hub.hub.held_bytes.load(Ordering::Relaxed) <= TAP_MAX_HELD_BYTES);
        for _ in 0..fits {
            let (batch, missed) = tap.next().await;
            assert_eq!((batch.events.len(), missed), (1, 0));
        }
        hub.offer(&routes, events(1, 10));
        let (batch, missed) = tap.next().await;
        assert_eq!(missed, 3, "the batches past the bound were not offered");
        drop(batch);
        drop(tap);
        assert_eq!(hub.hub.held_bytes.load(Ordering::Relaxed), 0);
    }
}
