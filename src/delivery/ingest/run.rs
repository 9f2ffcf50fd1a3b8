//! The ingest's loop: one batch from the channel at a time, ids, routes, appended; the route
//! table swapped between batches; a panic caught, counted, and the loop started again with its
//! channel and every event it held.
//!
//! What the ingest holds outlives a panic: the events are taken off the channel into `hand`
//! and leave it only once the spool took them (or the shutdown deadline gave up on them), so a
//! panic anywhere in routing, encoding or appending loses none of them. A panic after an append
//! wrote a batch and before the ingest knew appends it again: duplicates, never a loss (the
//! sinks are at-least-once anyway).

use std::collections::VecDeque;
use std::future::Future;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::time::sleep;
use tracing::{error, info};

use super::{Appender, RecordBatch, Router, MAX_BATCH};
use crate::delivery::pressure::PushOut;
use crate::delivery::tap::TappedEvent;
use crate::event::Event;
use crate::memory::ByteGate;
use crate::route::RouteTable;
use crate::status::StatusBoard;

/// Pause before the ingest goes on after a panic, so that a panic that repeats cannot spin a
/// core (as for token tasks).
const RESTART_AFTER_PANIC: Duration = Duration::from_secs(1);

/// What the ingest routes by: built at start and by every reload, swapped whole, and taken by
/// the ingest between two batches (one atomic load per batch says whether there is a new one).
#[derive(Debug)]
pub(crate) struct IngestTable {
    /// Which load made it: 0 at start, one more per reload. The ingest says which it routes by
    /// ([`RouteSwitch::applied`]).
    pub(crate) generation: u64,
    /// The compiled routes.
    pub(crate) routes: RouteTable,
    /// How a full spool pushes its oldest segment out, with the configured sinks' redactions.
    pub(crate) push_out: Arc<PushOut>,
    /// The configured sinks, for the dead-letter replays.
    pub(crate) sinks: Vec<String>,
}

/// The sending side of the table: the bridge swaps it, and learns when the ingest took it.
#[derive(Debug)]
pub(crate) struct RouteSwitch {
    /// The table in force.
    table: watch::Sender<Arc<IngestTable>>,
    /// The generation the ingest routes by now.
    applied: watch::Receiver<u64>,
}

/// The ingest's side of the table.
#[derive(Debug)]
pub(crate) struct RouteFeed {
    /// The table in force; `has_changed` is the per-batch look.
    table: watch::Receiver<Arc<IngestTable>>,
    /// Where the ingest says which generation it routes by.
    applied: watch::Sender<u64>,
}

/// A switch and its feed, starting with `table`.
pub(crate) fn route_switch(table: IngestTable) -> (RouteSwitch, RouteFeed) {
    let generation = table.generation;
    let (table_tx, table_rx) = watch::channel(Arc::new(table));
    let (applied_tx, applied_rx) = watch::channel(generation);
    (
        RouteSwitch {
            table: table_tx,
            applied: applied_rx,
        },
        RouteFeed {
            table: table_rx,
            applied: applied_tx,
        },
    )
}

impl RouteSwitch {
    /// Puts `table` in force: the ingest takes it before its next batch.
    pub(crate) fn swap(&self, table: IngestTable) {
        self.table.send_replace(Arc::new(table));
    }

    /// The table in force.
    pub(crate) fn current(&self) -> Arc<IngestTable> {
        self.table.borrow().clone()
    }

    /// A view of the table for another reader (the dead-letter replays).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<IngestTable>> {
        self.table.subscribe()
    }

    /// Completes once the ingest routes by `generation` or a later one, or has ended: nothing
    /// is appended by an older table after that.
    pub(crate) fn applied(&self, generation: u64) -> impl Future<Output = ()> + Send + 'static {
        let mut applied = self.applied.clone();
        async move {
            // An error: the ingest has ended, and appends nothing more.
            let _ = applied.wait_for(|g| *g >= generation).await;
        }
    }
}

/// The ingest: what it reads, what it holds, what it routes by, where it appends.
pub(crate) struct Ingest {
    /// Events from the token tasks.
    events: mpsc::Receiver<Event>,
    /// The bytes the token tasks took for each event; given back once it is appended.
    gate: ByteGate,
    /// The route table and its swaps.
    feed: RouteFeed,
    /// Gives ids and sink masks.
    router: Router,
    /// Appends to the spool and offers to the sink loops.
    appender: Appender,
    /// Taken off the channel, ids not given yet.
    received: Vec<Event>,
    /// Ids given, not in the spool yet, oldest first: they leave only once stored.
    hand: VecDeque<Arc<Event>>,
    /// Gate bytes of the events held; given back when `hand` is empty.
    charged: usize,
    /// The encoding buffer of one append, reused.
    batch: RecordBatch,
    /// Whether the channel still takes events (closed at the shutdown deadline).
    channel_open: bool,
    /// Whether the bridge still holds the switch (tests drop it).
    feed_open: bool,
    /// Where restarts are counted and whether the ingest runs is shown.
    status: StatusBoard,
}

impl Ingest {
    /// An ingest reading `events`, routing by what `feed` holds, appending with `appender`.
    pub(crate) fn new(
        events: mpsc::Receiver<Event>,
        gate: ByteGate,
        feed: RouteFeed,
        appender: Appender,
        status: StatusBoard,
    ) -> Ingest {
        let router = Router::new(feed.table.borrow().routes.clone(), &appender.spool);
        Ingest {
            events,
            gate,
            feed,
            router,
            appender,
            received: Vec::with_capacity(MAX_BATCH),
            hand: VecDeque::with_capacity(MAX_BATCH),
            charged: 0,
            batch: RecordBatch::default(),
            channel_open: true,
            feed_open: true,
            status,
        }
    }
}

/// Assigns ids, routes, and appends every event to the spool. Ends when all token tasks have
/// dropped their senders and everything received is appended. The bytes the token tasks took
/// from the gate for each event go back once it is appended (or routed nowhere).
///
/// Once the appender's deadline is cancelled (the shutdown deadline passed) it stops waiting
/// for the disk: it closes the channel (a token task still waiting to hand an event over, or
/// waiting for the gate, gets an error and counts it), and what it has not appended by then, in
/// hand or queued, is counted as not spooled.
///
/// A panic in a step is caught and counted on the status board; after [`RESTART_AFTER_PANIC`]
/// the ingest goes on with what it held.
pub(crate) async fn ingest(mut ingest: Ingest) {
    loop {
        match AssertUnwindSafe(ingest.step()).catch_unwind().await {
            Ok(ControlFlow::Continue(())) => {}
            Ok(ControlFlow::Break(())) => break,
            Err(_) => ingest.restart_after_panic().await,
        }
    }
    ingest.appender.finish();
}

impl Ingest {
    /// One step: takes the next events (or a new table) if it holds none, then stores what it
    /// holds. Breaks once the channel is closed and empty and nothing is held.
    async fn step(&mut self) -> ControlFlow<()> {
        if self.hand.is_empty() && self.received.is_empty() {
            let received = tokio::select! {
                n = self.events.recv_many(&mut self.received, MAX_BATCH) => n,
                changed = self.feed.table.changed(), if self.feed_open => {
                    match changed {
                        Ok(()) => self.take_table(),
                        Err(_) => self.feed_open = false,
                    }
                    return ControlFlow::Continue(());
                }
                () = self.appender.deadline.cancelled(), if self.channel_open => {
                    self.events.close();
                    self.channel_open = false;
                    return ControlFlow::Continue(());
                }
            };
            if received == 0 {
                return ControlFlow::Break(());
            }
            self.charged += self
                .received
                .iter()
                .map(|e| self.gate.charge(e.memory_bytes()) as usize)
                .sum::<usize>();
        }
        if !self.received.is_empty() {
            self.give_ids();
        }
        // The batch boundary: a new table applies from here on.
        if self.feed_open && self.feed.table.has_changed().unwrap_or(false) {
            self.take_table();
        }
        self.store_hand().await;
        // Everything received is in the spool (or went nowhere, or was given up at the
        // deadline): the sockets may read more.
        self.gate.release(std::mem::take(&mut self.charged));
        ControlFlow::Continue(())
    }

    /// Gives each event received its id, then holds it. The events stay in `received` until
    /// every one has its id, so a panic loses none.
    fn give_ids(&mut self) {
        for event in &mut self.received {
            self.router.give_id(event);
        }
        self.hand.extend(self.received.drain(..).map(Arc::new));
    }

    /// Routes by the table in force from now on, and says so.
    fn take_table(&mut self) {
        let table = self.feed.table.borrow_and_update().clone();
        self.router
            .set_routes(table.routes.clone(), &self.appender.spool);
        self.appender.push_out = table.push_out.clone();
        self.feed.applied.send_replace(table.generation);
        info!(generation = table.generation, "routes swapped");
    }

    /// Appends what it holds, each event leaving `hand` once stored.
    ///
    /// An append never takes more than a segment (at most an eighth of the spool): under
    /// DropOldest one larger than the spool would lose its own oldest events before they were
    /// ever spooled; under DeadLetter, the room it needs comes from the oldest end of the spool,
    /// which a sink that keeps up has delivered, never from the newest seven eighths.
    async fn store_hand(&mut self) {
        let max_batch_bytes = self.appender.spool.segment_limit();
        while !self.hand.is_empty() {
            self.batch.clear();
            let mut offer = (Vec::with_capacity(MAX_BATCH), Vec::with_capacity(MAX_BATCH));
            let mut taken = 0;
            // One atomic load per batch while nobody taps.
            let mut tapped = self.appender.tap.is_tapped().then(Vec::new);
            for event in &self.hand {
                let Some((mask, routed)) = self.router.route(event, &self.appender.stats) else {
                    taken += 1;
                    continue;
                };
                self.batch.push(event, mask);
                if self.batch.len() > 1 && self.batch.spool_bytes() > max_batch_bytes {
                    self.batch.pop();
                    break;
                }
                if let Some(tapped) = &mut tapped {
                    tapped.push(TappedEvent {
                        event: event.clone(),
                        routed,
                    });
                }
                offer.0.push(event.clone());
                offer.1.push(mask);
                taken += 1;
            }
            #[cfg(test)]
            crate::test_panics::maybe_panic(&crate::test_panics::ingest(self.appender.spool.dir()));
            if !self.batch.is_empty() {
                let batch = std::mem::take(&mut self.batch);
                self.batch = self.appender.append_until_stored(batch, offer).await;
            }
            if let Some(tapped) = tapped {
                self.appender.tap.offer(&self.router.routes, tapped);
            }
            self.hand.drain(..taken);
        }
    }

    /// After a panic: counted, a pause (cut short by the shutdown deadline), then the loop
    /// goes on with what it held.
    async fn restart_after_panic(&mut self) {
        self.status.ingest_panicked();
        error!(held = self.hand.len() + self.received.len(), pause = ?RESTART_AFTER_PANIC,
            "the ingest panicked; restarting it with the events it held");
        // Its buffer may hold part of a batch: the next append encodes it again.
        self.batch = RecordBatch::default();
        tokio::select! {
            () = sleep(RESTART_AFTER_PANIC) => {}
            () = self.appender.deadline.cancelled() => {}
        }
        self.status.set_ingest_alive(true);
    }
}
