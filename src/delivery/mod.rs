//! One sink's delivery loop: read its events from the spool, deliver them in order per
//! conversation, retry what failed, dead-letter what cannot succeed, and commit.
//!
//! The cursor moves past a batch only once it and every batch before it are finished (every event
//! delivered, dead-lettered or parked), so a crash re-delivers at most what was not confirmed yet.
//!
//! A sink that keeps up takes each appended batch in memory; one that is behind reads the spool,
//! the next batch on a blocking thread while the current one is sent (`reader`).
//!
//! A sink that keeps order itself (Kafka, NATS, file) is handed the next batches while earlier
//! ones await their acknowledgements, up to `MAX_UNCONFIRMED` events and the sink's unconfirmed
//! bytes (its share of `memory_limit`). When an event fails, the
//! later batches are let answer first and the failures are retried in spool order; an event of
//! the same conversation in a later batch may then have arrived before the retried one.
//!
//! A sink that sends concurrently (HTTP) settles one batch at a time and is given *waves*, at
//! most one event per conversation each: an event waits for the earlier one of its conversation
//! to be delivered, including across retries.
//!
//! A conversation whose event keeps failing for `retry.park_after` is set aside in the sink's
//! retry set (`parked`), on disk, with its later events: the batch settles without it, the
//! cursor moves on, and the set is retried on its own schedule, between batches.
//!
//! # Layout
//! - this file: `SinkLoop`'s loop, one step at a time: take and hand over, wait for the oldest
//!   answer, idle; and why it ended (`LoopEnd`).
//! - `intake`: where the next events come from (read ahead, in-memory tail, spool); `reader`:
//!   the spool cursor that reads ahead on a blocking thread.
//! - `progress`: what is finished, what is committed, when the next commit is due.
//! - `in_flight`: the batches handed over and not answered yet, up to `MAX_UNCONFIRMED` events
//!   and the sink's unconfirmed bytes.
//! - `settle`: delivering a batch to the end (retries, dead letters), in `waves`.
//! - `parked`: the retry set of conversations set aside, and its file.
//! - `stats`: the pipeline's counters ([`ingest::PipelineStats`]), shared by the ingest, the
//!   push-out and the sink loops.
//! - `tap`: the routed events offered live to the admin endpoint's taps, at no cost while
//!   nobody taps.
//! - [`ingest`]: from the sockets to the spool; [`pressure`]: making room in a full spool by
//!   pushing its oldest segment out to the dead letters of the sinks that lag;
//!   [`dead_letter`]: the dead letter files; [`retry`]: a sink's retry settings.

pub mod dead_letter;
mod in_flight;
pub mod ingest;
mod intake;
mod parked;
pub mod pressure;
mod progress;
mod reader;
pub mod retry;
mod settle;
mod stats;
pub(crate) mod tap;
mod waves;

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::delivery::dead_letter::DeadLetters;
pub(crate) use crate::delivery::in_flight::SINK_LIMITS;
use crate::delivery::in_flight::{Answer, InFlight, Unconfirmed, Verdict};
use crate::delivery::ingest::{PipelineStats, Tail};
use crate::delivery::intake::Intake;
pub(crate) use crate::delivery::parked::Parked;
use crate::delivery::progress::Progress;
pub(crate) use crate::delivery::reader::FileReader;
use crate::delivery::retry::RetrySettings;
use crate::route::redact::Redaction;
use crate::sink::Sink;
use crate::spool::{SinkMask, Spool};
use crate::status::{SinkReporter, SinkState};

/// Everything one sink's loop needs.
pub(crate) struct SinkLoop {
    /// The sink's configured name, for logs, cursors and dead letters.
    pub(crate) name: String,
    /// Where the events go.
    pub(crate) sink: Sink,
    /// What this sink removes from `data` before delivery.
    pub(crate) redaction: Redaction,
    /// How failed deliveries are retried, when a conversation is set aside, and when an event
    /// is given up.
    pub(crate) retry: RetrySettings,
    /// The conversations set aside after failing for `retry.park_after`, and their file.
    pub(crate) parked: Parked,
    /// Its cursor over the spool.
    pub(crate) reader: FileReader,
    /// Batches just appended, taken in memory while they continue where `reader` is.
    pub(crate) tail: Tail,
    /// The most bytes of events handed to the sink and not confirmed yet: its share of
    /// `memory_limit`, with the reads `reader` makes.
    pub(crate) unconfirmed_bytes: usize,
    /// Local dead letter files, used unless `dead_letter_sink` is set.
    pub(crate) dead_letters: DeadLetters,
    /// The spool and the mask of the sink that takes this sink's dead letters (`dead_letter:`).
    pub(crate) dead_letter_sink: Option<(Spool, SinkMask)>,
    /// The pipeline's counters: deliveries, dead letters, undecodable records.
    pub(crate) stats: Arc<PipelineStats>,
    /// This sink's cell on the status board.
    pub(crate) status: SinkReporter,
    /// Cancelled when no more events will be appended for this sink (shutdown: the ingest has
    /// ended and, for a dead-letter target, the loops that feed it): the loop ends once caught up.
    pub(crate) ingest_done: CancellationToken,
    /// Cancelled when the shutdown deadline passed: the loop stops without committing what it
    /// holds, which stays in the spool for the next start.
    pub(crate) give_up: CancellationToken,
}

/// The shutdown deadline (`give_up`) came before a piece of work was done: nothing of it is
/// committed, it stays in the spool for the next start.
#[derive(Debug)]
struct GaveUp;

/// Why a sink loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoopEnd {
    /// No more events will be appended for this sink, and every one was taken and settled.
    Drained,
    /// The shutdown deadline passed while nothing was unconfirmed: everything read is settled.
    DeadlineWhileIdle,
    /// The shutdown deadline interrupted a read, a hand-over, a wait for answers or a retry:
    /// what was not settled stays in the spool.
    Interrupted,
}

impl LoopEnd {
    /// Whether every batch read was settled, so that committing the reader's position is safe.
    fn everything_read_settled(self) -> bool {
        match self {
            LoopEnd::Drained | LoopEnd::DeadlineWhileIdle => true,
            LoopEnd::Interrupted => false,
        }
    }
}

/// Ends the loop ([`LoopEnd::Interrupted`]) when the shutdown deadline stopped a piece of work.
fn unless_gave_up<T>(done: Result<T, GaveUp>) -> ControlFlow<LoopEnd, T> {
    match done {
        Ok(value) => ControlFlow::Continue(value),
        Err(GaveUp) => ControlFlow::Break(LoopEnd::Interrupted),
    }
}

/// How batches handed to the sink are confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// The sink keeps order itself (Kafka, NATS, file): it gets the next batches while earlier
    /// ones await their acknowledgements.
    Pipelined,
    /// The sink sends concurrently (HTTP): each batch is settled, in waves of one event per
    /// conversation, before the next.
    OneBatchAtATime,
}

/// What the loop carries from one step to the next.
struct LoopState {
    /// How batches are handed over.
    pace: Pace,
    /// What is finished, what is committed, and when the next commit is due.
    progress: Progress,
    /// Batches handed over and not answered yet.
    in_flight: InFlight,
    /// Whether the last look for events found some.
    intake: Intake,
    /// Whether the last step was a pass over the retry set: the next step is another (taking
    /// new events, if any) even if the next pass is due at once, so that a long parked
    /// conversation draining does not hold up the sink's other conversations.
    retried_parked: bool,
}

/// What the loop woke up for while batches were unconfirmed.
enum Wake {
    /// The oldest unconfirmed batch was answered.
    Answered(Unconfirmed, Answer),
    /// Events were appended after the loop had caught up.
    Appended,
    /// The shutdown deadline passed.
    GiveUp,
}

impl SinkLoop {
    /// Delivers until no more events come for this sink or the shutdown deadline passes, then
    /// commits what is settled and closes the sink.
    pub(crate) async fn run(mut self) {
        let pace = if self.sink.preserves_key_order() {
            Pace::Pipelined
        } else {
            Pace::OneBatchAtATime
        };
        let mut state = LoopState {
            pace,
            progress: Progress::new(self.reader.back().await.position()),
            in_flight: InFlight::new(self.unconfirmed_bytes),
            intake: Intake::MayHaveMore,
            retried_parked: false,
        };
        if let ControlFlow::Break(end) = self.load_parked().await {
            return self.finish(state.progress, end).await;
        }
        let end = loop {
            let parked_due = self.parked.set.is_due() && !state.retried_parked;
            state.retried_parked = state.in_flight.is_empty() && parked_due;
            let step = if state.retried_parked {
                unless_gave_up(self.retry_parked().await)
            } else if state.intake == Intake::MayHaveMore
                && state.in_flight.accepts_more()
                && !self.parked.set.is_full()
                && !parked_due
            {
                self.take_and_hand_over(&mut state).await
            } else if state.in_flight.is_empty() {
                self.idle(&mut state).await
            } else {
                self.await_oldest(&mut state).await
            };
            if let ControlFlow::Break(end) = step {
                break end;
            }
        };
        self.finish(state.progress, end).await;
    }

    /// Takes the next events and hands them to the sink: queued unconfirmed when pipelined,
    /// else settled before the loop goes on. Caught up when there are none.
    async fn take_and_hand_over(&mut self, state: &mut LoopState) -> ControlFlow<LoopEnd> {
        let Some(taken) = self.next_events(&mut state.progress).await? else {
            state.intake = Intake::CaughtUp;
            return ControlFlow::Continue(());
        };
        #[cfg(test)]
        crate::test_panics::maybe_panic(&crate::test_panics::PanicSite::SinkLoop(
            self.name.clone(),
        ));
        let events = unless_gave_up(self.park_behind(taken.events).await)?;
        self.status.set(SinkState::Delivering);
        // The oldest event not finished is the first of this batch when nothing before it is.
        if let Some(first) = events.first().filter(|_| state.in_flight.is_empty()) {
            self.status.oldest_undelivered(Some(first.received_at));
        }
        match state.pace {
            Pace::Pipelined if events.is_empty() && state.in_flight.is_empty() => {
                // Every event was parked, and nothing before them awaits an answer.
                state.progress.finished(taken.last_seq);
            }
            Pace::Pipelined => {
                let handed_over = state
                    .in_flight
                    .hand_over(&mut self.sink, events, taken.last_seq);
                tokio::select! {
                    () = handed_over => {}
                    _ = self.give_up.cancelled() => return ControlFlow::Break(LoopEnd::Interrupted),
                }
                self.status.in_flight(state.in_flight.events() as u64);
            }
            Pace::OneBatchAtATime => {
                self.status.in_flight(events.len() as u64);
                unless_gave_up(self.settle(events, None).await)?;
                self.status.in_flight(0);
                state.progress.finished(taken.last_seq);
            }
        }
        ControlFlow::Continue(())
    }

    /// Nothing is unconfirmed: commits, then waits for an append or the retry set's next pass,
    /// or ends once no more will come or the shutdown deadline passed. A full retry set takes
    /// no appends: the loop waits for its passes to make room.
    async fn idle(&mut self, state: &mut LoopState) -> ControlFlow<LoopEnd> {
        // Everything up to the reader's position is settled, including other sinks' records it
        // passed over: committing that position lets the spool reclaim segments even for a sink
        // that is routed little or nothing. Not rate-limited: a small spool can fill between
        // two timed commits.
        let position = self.reader.back().await.position();
        if self.reader.has_read_ahead() {
            // Records read ahead are not settled: send them first (not expected here: a read
            // ahead is taken before the loop can run out of work).
            state.intake = Intake::MayHaveMore;
            return ControlFlow::Continue(());
        }
        if let Some(upto) = state.progress.commit_all_upto(position) {
            // A commit's failure is logged where it happens; the next one covers it.
            let _ = self.reader.io(Some(upto), false).await;
            state.progress.committed(upto);
        }
        self.status.set(SinkState::Idle);
        if self.reader.get().caught_up() {
            self.status.oldest_undelivered(None);
        }
        let ingest_done = self.ingest_done.is_cancelled();
        let takes_more = !self.parked.set.is_full();
        if ingest_done {
            // The last appends may have come while the loop was busy: end only when nothing is
            // left to take. Parked events stay parked, in their file, for the next start.
            if self.reader.get().caught_up() {
                return ControlFlow::Break(LoopEnd::Drained);
            }
            if takes_more {
                state.intake = Intake::MayHaveMore;
                return ControlFlow::Continue(());
            }
        }
        let parked_pass = self.parked.set.next_pass();
        tokio::select! {
            _ = self.reader.wait_for_data(), if takes_more => {}
            _ = self.ingest_done.cancelled(), if !ingest_done => {}
            _ = tokio::time::sleep_until(parked_pass.unwrap_or_else(tokio::time::Instant::now)), if parked_pass.is_some() => {}
            _ = self.give_up.cancelled() => return ControlFlow::Break(LoopEnd::DeadlineWhileIdle),
        }
        state.intake = Intake::MayHaveMore;
        ControlFlow::Continue(())
    }

    /// Waits for the oldest unconfirmed batch's answer (or, when caught up, for an append) and
    /// settles it.
    async fn await_oldest(&mut self, state: &mut LoopState) -> ControlFlow<LoopEnd> {
        let caught_up = state.intake == Intake::CaughtUp;
        let wake = tokio::select! {
            answered = state.in_flight.oldest_answer() => match answered {
                Some((batch, answer)) => Wake::Answered(batch, answer),
                // Not expected: this step runs with batches in flight. The loop looks again.
                None => return ControlFlow::Continue(()),
            },
            _ = self.reader.wait_for_data(), if caught_up => Wake::Appended,
            _ = self.give_up.cancelled() => Wake::GiveUp,
        };
        let (batch, answer) = match wake {
            Wake::Answered(batch, answer) => (batch, answer),
            Wake::Appended => {
                state.intake = Intake::MayHaveMore;
                return ControlFlow::Continue(());
            }
            Wake::GiveUp => return ControlFlow::Break(LoopEnd::Interrupted),
        };
        match Verdict::of(&answer, batch.events.len()) {
            Verdict::AllDelivered => {
                let count = batch.events.len() as u64;
                self.stats.delivered.fetch_add(count, Ordering::Relaxed);
                self.status.delivered(batch.events.iter().map(|e| &**e));
                self.status.in_flight(state.in_flight.events() as u64);
                if let Some(oldest) = state.in_flight.oldest_received() {
                    self.status.oldest_undelivered(Some(oldest));
                }
                state.progress.finished(batch.last_seq);
                ControlFlow::Continue(())
            }
            Verdict::ToSettle => self.settle_with_later(state, (batch, answer)).await,
        }
    }

    /// Something failed: lets every later batch answer first, so that retries go in spool
    /// order, then settles them together. One batch to settle, not one per batch sent: when a
    /// destination goes away, thousands of small batches can be unconfirmed, and each would wait
    /// out a backoff of its own after it came back.
    async fn settle_with_later(
        &mut self,
        state: &mut LoopState,
        failed: (Unconfirmed, Answer),
    ) -> ControlFlow<LoopEnd> {
        let merged = state
            .in_flight
            .answer_all(failed, &self.give_up, |count| self.panicked(count))
            .await;
        let merged = unless_gave_up(merged)?;
        unless_gave_up(self.settle(merged.events, Some(merged.first_pass)).await)?;
        self.status.in_flight(0);
        state.progress.finished(merged.last_seq);
        ControlFlow::Continue(())
    }

    /// The last commit, then the sink is closed.
    async fn finish(mut self, progress: Progress, end: LoopEnd) {
        // Everything read was settled: the position is safe to commit (as in the idle step),
        // unless records read ahead were never sent.
        let position = self.reader.back().await.position();
        let unsent =
            matches!(self.reader.take_read_ahead(), Some((_, Ok(records))) if !records.is_empty());
        let settled_upto = (end.everything_read_settled() && !unsent).then_some(position);
        if let Some(seq) = progress.last_commit(settled_upto) {
            let _ = self.reader.io(Some(seq), false).await;
        }
        if end != LoopEnd::Interrupted {
            // Lines of events that left the retry set would be sent again after a restart.
            self.compact_parked(true).await;
        }
        self.sink.close().await;
        self.status.set(SinkState::Stopped);
        debug!(sink = %self.name, ?end, "delivery loop ended");
    }
}
