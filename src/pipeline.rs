//! From sockets to sinks: id assignment, routing, and one delivery loop per sink.
//!
//! ```text
//! token tasks ──events──▶ ingest (ids, routes) ──▶ per-sink queue ──▶ sink loop ──▶ sink
//! ```
//! Each sink has its own queue and loop, so a slow sink only slows what is routed to it (until
//! its queue fills). Shutdown drains: when the token tasks end, the ingest channel closes, the
//! ingest ends and closes the sink queues, and each sink loop delivers what it holds and exits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::backoff::Backoff;
use crate::event::Event;
use crate::id::IdAssigner;
use crate::redact::Redaction;
use crate::route::RouteTable;
use crate::sink::{Outcome, Sink};
use std::time::Duration;

/// Most events taken from a queue at once: one write to the file sink, one produce batch.
pub const MAX_BATCH: usize = 512;

/// Capacity of the channel from token tasks and of each sink's queue.
pub const QUEUE_CAPACITY: usize = 4096;

/// Counters of the pipeline, readable from outside.
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Events that matched no route, by event name (they went to the `unmatched` sink, if any).
    pub unmatched: Mutex<BTreeMap<String, u64>>,
    /// Events delivered, summed over sinks.
    pub delivered: AtomicU64,
    /// Events a sink refused for good (until dead letters exist, they are logged).
    pub failed: AtomicU64,
}

/// Backoff between delivery attempts of one sink.
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

/// Assigns ids and routes every event to the queues of its sinks. Ends when all token tasks
/// have dropped their senders; dropping `queues` then ends the sink loops.
pub async fn ingest(
    mut events: mpsc::Receiver<Event>,
    routes: RouteTable,
    queues: Vec<mpsc::Sender<Arc<Event>>>,
    stats: Arc<PipelineStats>,
) {
    let mut ids = IdAssigner::new();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while events.recv_many(&mut batch, MAX_BATCH).await > 0 {
        for mut event in batch.drain(..) {
            event.id = ids.assign(event.content_hash, &event.token, event.received_at);
            let targets = routes.route(&event);
            if !routes.matches_any(&event) {
                count_unmatched(&stats, &event.name);
                debug!(event = %event.name, token = %event.token, "event matched no route");
            }
            if targets.is_empty() {
                continue;
            }
            let event = Arc::new(event);
            for sink in targets {
                if queues[sink].send(event.clone()).await.is_err() {
                    error!(sink = %routes.sink_names()[sink], id = %event.id, "sink loop is gone; event not queued");
                }
            }
        }
    }
}

fn count_unmatched(stats: &PipelineStats, name: &str) {
    let mut unmatched = stats.unmatched.lock().expect("stats lock");
    match unmatched.get_mut(name) {
        Some(count) => *count += 1,
        None => {
            unmatched.insert(name.to_owned(), 1);
        }
    }
}

/// Delivers what arrives on `queue` to `sink`, retrying retryable failures with backoff until
/// they succeed or `give_up` is cancelled (shutdown deadline passed).
pub async fn sink_loop(
    name: String,
    mut sink: Sink,
    redaction: Redaction,
    mut queue: mpsc::Receiver<Arc<Event>>,
    retry: RetrySettings,
    stats: Arc<PipelineStats>,
    give_up: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    'batches: while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut pending: Vec<Arc<Event>> = std::mem::take(&mut batch);
        for event in &mut pending {
            redact(&redaction, event);
        }
        let mut backoff = Backoff::new(retry.initial, retry.max);
        loop {
            let outcomes = sink.deliver(&pending).await;
            let mut retry_these = Vec::new();
            let mut last_error = None;
            // The longest pause any destination asked for in this round.
            let mut asked_pause = Duration::ZERO;
            for (event, outcome) in pending.iter().zip(outcomes) {
                match outcome {
                    Outcome::Delivered => {
                        stats.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Permanent(e) => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        error!(sink = %name, id = %event.id, event = %event.name, error = %e,
                            "event refused for good");
                    }
                    Outcome::Retryable(e) => {
                        retry_these.push(event.clone());
                        asked_pause = asked_pause.max(e.retry_after.unwrap_or_default());
                        last_error = Some(e);
                    }
                }
            }
            if retry_these.is_empty() {
                break;
            }
            // A destination's `Retry-After` wins over a shorter backoff: retrying sooner would
            // only be refused again (and may get the bridge blocked).
            let delay = backoff.next_delay().max(asked_pause);
            warn!(sink = %name, events = retry_these.len(), retry_in = ?delay,
                error = %last_error.map(|e| e.message).unwrap_or_default(), "delivery failed; will retry");
            tokio::select! {
                _ = give_up.cancelled() => {
                    error!(sink = %name, events = retry_these.len() + queue.len(),
                        "shutdown deadline passed with events undelivered");
                    break 'batches;
                }
                _ = sleep(delay) => {}
            }
            pending = retry_these;
        }
        batch = pending;
        batch.clear();
    }
    sink.close().await;
}

/// Applies a sink's redaction; the event is copied only when something was removed.
fn redact(redaction: &Redaction, event: &mut Arc<Event>) {
    if let Some(data) = redaction.apply(event.data.get()) {
        let mut redacted = Event::clone(event);
        redacted.data = serde_json::value::RawValue::from_string(data)
            .expect("redaction keeps valid JSON valid");
        *event = Arc::new(redacted);
    }
}
