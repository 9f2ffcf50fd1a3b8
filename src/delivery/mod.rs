//! One sink's delivery loop: read its events from the spool, deliver them in order per
//! conversation, retry what failed, dead-letter what cannot succeed, and commit.
//!
//! The cursor moves past a batch only once it and every batch before it are finished (every event
//! delivered or dead-lettered), so a crash re-delivers at most what was not confirmed yet.
//!
//! A sink that keeps up takes each appended batch in memory; one that is behind reads the spool,
//! the next batch on a blocking thread while the current one is sent ([`FileReader`]).
//!
//! A sink that keeps order itself (Kafka, NATS, file) is handed the next batches while earlier
//! ones await their acknowledgements, up to `MAX_UNCONFIRMED` events. When an event fails, the
//! later batches are let answer first and the failures are retried in spool order; an event of
//! the same conversation in a later batch may then have arrived before the retried one.
//!
//! A sink that sends concurrently (HTTP) settles one batch at a time and is given *waves*, at
//! most one event per conversation each: an event waits for the earlier one of its conversation
//! to be delivered, including across retries.

pub mod dead_letter;
pub mod ingest;
pub mod retry;

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;

use futures_util::FutureExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::delivery::dead_letter::{DeadLetter, DeadLetters};
use crate::delivery::ingest::{Appended, PipelineStats, RecordBatch, MAX_BATCH};
use crate::delivery::retry::RetrySettings;
use crate::event::{Event, JsonText};
use crate::route::redact::Redaction;
use crate::sink::{Outcome, Sink, SinkError};
use crate::spool::{SinkMask, Spool, SpoolError, SpoolReader};
use crate::status::{SinkReporter, SinkState};

/// The dead-letter error of an event whose delivery panicked.
const PANICKED: &str = "the bridge panicked while delivering this batch";

/// Everything one sink's loop needs.
pub struct SinkLoop {
    /// The sink's configured name, for logs, cursors and dead letters.
    pub name: String,
    pub sink: Sink,
    /// What this sink removes from `data` before delivery.
    pub redaction: Redaction,
    pub retry: RetrySettings,
    /// Its cursor over the spool.
    pub reader: FileReader,
    /// Batches just appended, taken in memory while they continue where `reader` is.
    pub tail: broadcast::Receiver<Arc<Appended>>,
    /// A batch from `tail` that starts past the reader: records in between (dead-letter
    /// replays, a lag) are read from the spool first.
    pub held: Option<Arc<Appended>>,
    /// Local dead letter files, used unless `dead_letter_sink` is set.
    pub dead_letters: DeadLetters,
    /// The spool and the mask of the sink that takes this sink's dead letters (`dead_letter:`).
    pub dead_letter_sink: Option<(Spool, SinkMask)>,
    pub stats: Arc<PipelineStats>,
    /// This sink's cell on the status board.
    pub status: SinkReporter,
    /// Cancelled when no more events will be appended for this sink (shutdown: the ingest has
    /// ended and, for a dead-letter target, the loops that feed it): the loop ends once caught up.
    pub ingest_done: CancellationToken,
    /// Cancelled when the shutdown deadline passed: the loop stops without committing what it
    /// holds, which stays in the spool for the next start.
    pub give_up: CancellationToken,
}

/// Where one event of a batch stands.
struct Attempt {
    event: Arc<Event>,
    /// Conversation key for ordering; `None` orders with nothing.
    order_key: Option<(u64, u64)>,
    attempts: u32,
    first_attempt: Option<SystemTime>,
    last_error: Option<String>,
    /// Delivered or dead-lettered.
    done: bool,
    /// Sent in the current pass and not delivered: waits for the next pass (after the backoff),
    /// and holds back later events of its conversation.
    tried: bool,
}

/// Events an order-keeping sink may have been handed and not confirmed yet (checked before a
/// batch is handed over, so up to `MAX_UNCONFIRMED + MAX_BATCH - 1` at once). Keeps the broker
/// busy while acknowledgements travel (waiting for a batch's last ack before sending the next
/// left the connection idle in between); bounds what the loop holds in memory and what a crash
/// sends again. Measured with JetStream and Kafka on 2 cores: 1 batch 0.55-0.59 of the bare pipe,
/// 4 batches 0.56-0.64, 8 batches 0.57; Kafka gained little past 8. A NATS core backlog drains
/// faster with more: 133k-144k events/s at 8 batches, 152k-164k at 16, 158k-167k at 32 (each
/// flush answers only after everything before it reached the server; at 8 the loop waited for
/// them with the connection idle). Those runs predate the read ahead and flushes sent at
/// hand-over; with both, 16 batches drained 183k-199k. 16 batches of message.created hold about
/// 12 MB.
pub const MAX_UNCONFIRMED: usize = 16 * MAX_BATCH;

/// How often progress is committed while events come from memory (reads from the spool commit
/// with every read): lets the spool reclaim segments and bounds what a crash sends again.
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// Or after this many records, whichever comes first: at 100k events/s, 200 ms of records is
/// more than the smallest spool allowed (16 MiB), which would fill while the sink keeps up.
const COMMIT_EVERY_RECORDS: u64 = 2048;

/// A sink's answer for one batch; `Err` holds a panic raised while handing it over or waiting.
type Answer = std::thread::Result<Vec<Outcome>>;

/// A batch handed to the sink whose outcomes are not known yet.
struct Unconfirmed {
    /// Seq of its last record: committed once it and every batch before it are settled.
    last_seq: u64,
    events: Vec<Arc<Event>>,
    answer: Pin<Box<dyn Future<Output = Answer> + Send>>,
}

/// What the loop woke up for while batches were unconfirmed.
enum Wake {
    Answered(Answer),
    Appended,
    GiveUp,
}

impl SinkLoop {
    pub async fn run(mut self) {
        // Sinks that keep order themselves get the next batches while earlier ones await their
        // acks; the HTTP sink sends in waves (one event per conversation) and settles each batch
        // before the next.
        let pipelined = self.sink.preserves_key_order();
        // The last seq of the settled prefix, not committed yet. Committed with the next read
        // from the spool, every COMMIT_EVERY while events come from memory, and when nothing
        // is unconfirmed: cursor writes and segment deletions are file I/O, kept off the async
        // threads.
        let mut finished: Option<u64> = None;
        let mut last_commit = Instant::now();
        // The position last committed (every commit goes through `FileReader::io` or a read ahead).
        let mut committed_to = self.reader.back().await.position();
        let mut unconfirmed: VecDeque<Unconfirmed> = VecDeque::new();
        let mut unconfirmed_events = 0usize;
        // The last read found nothing new: read again only after an append.
        let mut caught_up = false;
        // A batch failed as it was handed over (its answer was there at once: a NATS client not
        // connected, a producer refusing): nothing more is handed over until it is settled, or
        // a later batch could get through before its retry and overtake it.
        let mut held_back = false;
        // Whether the loop ended with every batch it read settled (a commit of the position is
        // then safe), rather than interrupted by the shutdown deadline or a failed delivery.
        let all_settled = 'run: loop {
            if !caught_up && !held_back && unconfirmed_events < MAX_UNCONFIRMED {
                // Records read ahead go first: the tail continues after them.
                self.reader.back().await;
                let ahead = self.reader.take_read_ahead();
                let taken = match ahead {
                    Some(_) => None,
                    None => self.take_from_tail(),
                };
                let read_file =
                    ahead.is_none() && taken.is_none() && !self.reader.get().caught_up();
                let commit_due = finished.is_some_and(|upto| {
                    taken.is_none()
                        || last_commit.elapsed() >= COMMIT_EVERY
                        || upto >= committed_to + COMMIT_EVERY_RECORDS
                });
                let io = match ahead {
                    Some(read_ahead) => Some(read_ahead),
                    None if read_file || commit_due => {
                        let upto = if commit_due { finished.take() } else { None };
                        Some((upto, self.reader.io(upto, read_file).await))
                    }
                    None => None,
                };
                let mut records = Vec::new();
                if let Some((upto, result)) = io {
                    match result {
                        Ok(read) => records = read,
                        Err(e) => {
                            finished = finished.or(upto);
                            error!(sink = %self.name, error = %e, "cannot read the spool; retrying in 1 s");
                            tokio::select! {
                                _ = self.give_up.cancelled() => break 'run false,
                                _ = sleep(Duration::from_secs(1)) => continue,
                            }
                        }
                    }
                    if let Some(upto) = upto {
                        committed_to = committed_to.max(upto);
                        last_commit = Instant::now();
                    }
                }
                // A full batch from the file: the next records are most likely there too. They
                // are read while these are decoded and sent (on 2 cores a read's round trip
                // through the blocking pool was a fifth of a backlog drain's loop), carrying the
                // commit that is due by then.
                // The commit is counted (`committed_to`) when the read comes back, above.
                if records.len() == MAX_BATCH && !self.reader.get().caught_up() {
                    self.reader.read_ahead(finished.take());
                }
                let next = taken.or_else(|| {
                    let last_seq = records.last()?.0;
                    Some((self.decode(records), last_seq))
                });
                match next {
                    None => caught_up = true,
                    Some((events, last_seq)) => {
                        self.status.set(SinkState::Delivering);
                        if pipelined {
                            let give_up = self.give_up.clone();
                            let mut answer = tokio::select! {
                                answer = self.send(&events) => answer,
                                _ = give_up.cancelled() => break 'run false,
                            };
                            if let Some(known) = (&mut answer).now_or_never() {
                                held_back = !all_delivered(&known, events.len());
                                answer = Box::pin(std::future::ready(known));
                            }
                            unconfirmed_events += events.len();
                            unconfirmed.push_back(Unconfirmed {
                                last_seq,
                                events,
                                answer,
                            });
                        } else {
                            if !self.settle(events, None).await {
                                break 'run false;
                            }
                            finished = Some(last_seq);
                        }
                        continue;
                    }
                }
            }
            let Some(oldest) = unconfirmed.front_mut() else {
                // Nothing is unconfirmed, so everything up to the reader's position is settled,
                // including other sinks' records it passed over: committing that position lets
                // the spool reclaim segments even for a sink that is routed little or nothing.
                // Not rate-limited: a small spool can fill between two timed commits.
                let position = self.reader.back().await.position();
                if self.reader.has_read_ahead() {
                    // Records read ahead are not settled: send them first (not expected here:
                    // a read ahead is taken before the loop can run out of work).
                    caught_up = false;
                    continue;
                }
                if finished.take().is_some() || position > committed_to {
                    // A commit's failure is logged where it happens; the next one covers it.
                    let _ = self.reader.io(Some(position), false).await;
                    committed_to = position;
                    last_commit = Instant::now();
                }
                self.status.set(SinkState::Idle);
                if self.ingest_done.is_cancelled() {
                    // The last appends may have come while the loop was busy: end only when
                    // nothing is left to take.
                    if self.reader.get().caught_up() && self.held.is_none() {
                        break 'run true;
                    }
                    caught_up = false;
                    continue;
                }
                tokio::select! {
                    _ = self.reader.wait_for_data() => {}
                    _ = self.ingest_done.cancelled() => {}
                    _ = self.give_up.cancelled() => break 'run true,
                }
                caught_up = false;
                continue;
            };
            let wake = tokio::select! {
                answer = &mut oldest.answer => Wake::Answered(answer),
                _ = self.reader.wait_for_data(), if caught_up => Wake::Appended,
                _ = self.give_up.cancelled() => Wake::GiveUp,
            };
            let answer = match wake {
                Wake::Answered(answer) => answer,
                Wake::Appended => {
                    caught_up = false;
                    continue;
                }
                Wake::GiveUp => break 'run false,
            };
            let batch = unconfirmed.pop_front().expect("answered batch");
            unconfirmed_events -= batch.events.len();
            if all_delivered(&answer, batch.events.len()) {
                let count = batch.events.len() as u64;
                self.stats.delivered.fetch_add(count, Ordering::Relaxed);
                self.status.delivered(count);
                finished = Some(batch.last_seq);
                continue;
            }
            // Something failed: let every later batch answer first, so that retries go in
            // spool order, then settle them together. One batch to settle, not one per batch
            // sent: when a destination goes away, thousands of small batches can be unconfirmed,
            // and each would wait out a backoff of its own after it came back.
            let mut answered = vec![(batch, answer)];
            while let Some(mut later) = unconfirmed.pop_front() {
                let answer = tokio::select! {
                    answer = &mut later.answer => answer,
                    _ = self.give_up.cancelled() => break 'run false,
                };
                answered.push((later, answer));
            }
            unconfirmed_events = 0;
            let mut events = Vec::new();
            let mut first_pass = Vec::new();
            let mut last_seq = None;
            for (batch, answer) in answered {
                let count = batch.events.len();
                let mut outcomes = answer.unwrap_or_else(|_| self.panicked(count));
                // Lined up with its own events, whatever the sink answered.
                outcomes.resize_with(count, || {
                    Outcome::Retryable(SinkError::new("the sink gave no outcome"))
                });
                events.extend(batch.events);
                first_pass.extend(outcomes);
                last_seq = Some(batch.last_seq);
            }
            if !self.settle(events, Some(first_pass)).await {
                break 'run false;
            }
            finished = last_seq;
            held_back = false;
        };
        // Everything read was settled: the position is safe to commit (as in the idle branch),
        // unless records read ahead were never sent.
        let position = self.reader.back().await.position();
        let unsent =
            matches!(self.reader.take_read_ahead(), Some((_, Ok(records))) if !records.is_empty());
        if all_settled && !unsent && position > committed_to {
            finished = Some(position);
        }
        if let Some(seq) = finished {
            let _ = self.reader.io(Some(seq), false).await;
        }
        self.sink.close().await;
        self.status.set(SinkState::Stopped);
        debug!(sink = %self.name, "delivery loop ended");
    }

    /// Spool records back to events, with this sink's redaction applied.
    fn decode(&self, records: Vec<(u64, Vec<u8>)>) -> Vec<Arc<Event>> {
        let mut events = Vec::with_capacity(records.len());
        for (seq, bytes) in records {
            match Event::decode_record(&bytes) {
                Ok(event) => events.push(self.redacted(Arc::new(event))),
                Err(e) => {
                    // Written by this program and CRC-checked: only a version mismatch gets here.
                    error!(sink = %self.name, seq, error = %e, "skipped a spool record that cannot be decoded");
                    self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        events
    }

    /// The next events from the in-memory tail, with the seq of the last record they pass, if
    /// the tail continues exactly where the reader is.
    fn take_from_tail(&mut self) -> Option<(Vec<Arc<Event>>, u64)> {
        loop {
            let batch = match self.held.take() {
                Some(batch) => batch,
                None => match self.tail.try_recv() {
                    Ok(batch) => batch,
                    // What was missed is read from the spool.
                    Err(TryRecvError::Lagged(_)) => continue,
                    Err(TryRecvError::Empty | TryRecvError::Closed) => return None,
                },
            };
            let Some(mine) =
                self.reader
                    .get()
                    .take_appended(batch.first_seq, &batch.masks, batch.end)
            else {
                self.held = Some(batch);
                return None;
            };
            if mine.is_empty() {
                // Read from the spool already, or nothing of this sink's.
                continue;
            }
            let last_seq = batch.first_seq + batch.masks.len() as u64 - 1;
            let events = mine
                .into_iter()
                .map(|i| self.redacted(batch.events[i].clone()))
                .collect();
            return Some((events, last_seq));
        }
    }

    /// Hands a batch to the sink. A panic while doing so, or while waiting for the answer,
    /// becomes the answer, so that it is settled in order with the other batches.
    async fn send(
        &mut self,
        events: &[Arc<Event>],
    ) -> Pin<Box<dyn Future<Output = Answer> + Send>> {
        match AssertUnwindSafe(self.sink.send(events))
            .catch_unwind()
            .await
        {
            Ok(confirmations) => Box::pin(AssertUnwindSafe(confirmations).catch_unwind()),
            Err(panic) => Box::pin(std::future::ready(Err(panic))),
        }
    }

    /// Finishes a batch: delivers (or retries, after `first_pass` if the sink was already
    /// given it) until every event is delivered or dead-lettered. Returns false when the
    /// shutdown deadline interrupted it (nothing of it is then committed).
    async fn settle(&mut self, events: Vec<Arc<Event>>, first_pass: Option<Vec<Outcome>>) -> bool {
        // A panic while delivering (a bug, never expected) must neither kill this sink for
        // the life of the process nor come back on every restart: the batch goes to the
        // dead letters, loudly, and the loop goes on.
        match AssertUnwindSafe(self.deliver_all(events.clone(), first_pass))
            .catch_unwind()
            .await
        {
            Ok(finished) => finished,
            Err(_) => self.bury_panicked(events).await,
        }
    }

    /// The outcomes of `count` events whose delivery panicked in the sink: permanent, so that
    /// they go to the dead letters, loudly, and the rest goes on.
    fn panicked(&self, count: usize) -> Vec<Outcome> {
        error!(sink = %self.name, events = count, "delivery panicked; these events go to the dead letters");
        (0..count)
            .map(|_| Outcome::Permanent(SinkError::new(PANICKED)))
            .collect()
    }

    /// Dead-letters a batch whose delivery panicked. Returns false when the shutdown deadline
    /// came first.
    async fn bury_panicked(&self, events: Vec<Arc<Event>>) -> bool {
        error!(sink = %self.name, events = events.len(), "delivery panicked; the batch goes to the dead letters");
        let now = SystemTime::now();
        let letters = events
            .iter()
            .map(|event| DeadLetter {
                event: Event::clone(event),
                error: PANICKED.into(),
                attempts: 1,
                first_attempt: now,
                last_attempt: now,
            })
            .collect();
        self.bury(letters).await
    }

    /// Applies this sink's redaction; copies the event only when something was removed.
    fn redacted(&self, event: Arc<Event>) -> Arc<Event> {
        let Some(data) = self.redaction.apply(event.data.get()) else {
            return event;
        };
        let mut event = Event::clone(&event);
        event.data = JsonText::from_string(data).unwrap_or_else(|_| {
            // The property test says this cannot happen; if it does, send nothing of it.
            error!(sink = %self.name, id = %event.id, "redaction produced invalid JSON; data withheld");
            JsonText::from_string(r#"{"redaction_failed":true}"#.into())
                .expect("a constant is JSON")
        });
        Arc::new(event)
    }

    /// Delivers a batch until every event is delivered or dead-lettered. `first_pass` holds the
    /// outcomes of a pass the (order-keeping) sink already made over the whole batch. Returns
    /// false when the shutdown deadline interrupted it (nothing of it is then committed).
    async fn deliver_all(
        &mut self,
        events: Vec<Arc<Event>>,
        mut first_pass: Option<Vec<Outcome>>,
    ) -> bool {
        let mut attempts: Vec<Attempt> = events
            .into_iter()
            .map(|event| Attempt {
                order_key: event
                    .keys
                    .conversation_id
                    .map(|c| (event.keys.account_id.unwrap_or(0), c)),
                event,
                attempts: 0,
                first_attempt: None,
                last_error: None,
                done: false,
                tried: false,
            })
            .collect();
        let mut backoff = Backoff::new(self.retry.initial, self.retry.max);
        // An order-keeping sink gets the first pass all at once. After a failure, a retry pass
        // goes one event per conversation per wave whatever the sink (the first pass cannot be
        // undone, but nothing gets further out of order), until a wave is delivered whole
        // (`next_wave_mode`): one event per round trip would hold a busy conversation's backlog
        // to a few hundred events a second.
        let preserves_order = self.sink.preserves_key_order();
        let mut all_at_once = preserves_order;
        loop {
            let mut retry_after = Duration::ZERO;
            let mut dead = Vec::new();
            for a in &mut attempts {
                a.tried = false;
            }
            // Waves within one pass.
            loop {
                let wave = next_wave(&attempts, all_at_once);
                if wave.is_empty() {
                    break;
                }
                let batch: Vec<Arc<Event>> =
                    wave.iter().map(|&i| attempts[i].event.clone()).collect();
                let now = SystemTime::now();
                let outcomes = match first_pass.take() {
                    // Only an order-keeping sink is pipelined, and its first wave is the whole
                    // batch; an event the sink gave no outcome for stays untried and is retried.
                    Some(outcomes) => outcomes,
                    // A panic in the sink costs this wave, not the whole (merged) batch.
                    None => tokio::select! {
                        outcomes = AssertUnwindSafe(self.sink.deliver(&batch)).catch_unwind() => {
                            outcomes.unwrap_or_else(|_| self.panicked(batch.len()))
                        }
                        _ = self.give_up.cancelled() => return false,
                    },
                };
                let mut progressed = false;
                let mut whole = outcomes.len() == wave.len();
                for (&i, outcome) in wave.iter().zip(outcomes) {
                    let a = &mut attempts[i];
                    a.attempts += 1;
                    a.tried = true;
                    a.first_attempt.get_or_insert(now);
                    match outcome {
                        Outcome::Delivered => {
                            a.done = true;
                            progressed = true;
                            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                            self.status.delivered(1);
                        }
                        Outcome::Permanent(e) => {
                            whole = false;
                            a.done = true;
                            progressed = true;
                            dead.push(dead_letter(a, e.message, now));
                        }
                        Outcome::Retryable(e) => {
                            whole = false;
                            retry_after = retry_after.max(e.retry_after.unwrap_or_default());
                            let expired = now
                                .duration_since(a.first_attempt.expect("set above"))
                                .is_ok_and(|age| age >= self.retry.max_elapsed);
                            if expired {
                                a.done = true;
                                progressed = true;
                                let message = format!(
                                    "gave up after {} attempts over {:?}: {}",
                                    a.attempts, self.retry.max_elapsed, e.message
                                );
                                dead.push(dead_letter(a, message, now));
                            } else {
                                a.last_error = Some(e.message);
                            }
                        }
                    }
                }
                match next_wave_mode(all_at_once, progressed, whole, preserves_order) {
                    Some(next) => all_at_once = next,
                    None => break,
                }
            }
            if !dead.is_empty() && !self.bury(dead).await {
                return false;
            }
            let waiting = attempts.iter().filter(|a| !a.done).count();
            if waiting == 0 {
                return true;
            }
            all_at_once = false;
            let delay = backoff.next_delay().max(retry_after);
            let error = attempts
                .iter()
                .filter(|a| !a.done)
                .find_map(|a| a.last_error.clone())
                .unwrap_or_default();
            warn!(sink = %self.name, events = waiting, retry_in = ?delay, %error, "delivery failed; will retry");
            self.status.retrying(error);
            tokio::select! {
                _ = self.give_up.cancelled() => return false,
                _ = sleep(delay) => {}
            }
        }
    }

    /// Stores dead letters durably; until that succeeds the batch is not committed. Returns
    /// false when the shutdown deadline came first (the batch then stays in the spool).
    async fn bury(&self, letters: Vec<DeadLetter>) -> bool {
        for letter in &letters {
            error!(sink = %self.name, id = %letter.event.id, event = %letter.event.name,
                attempts = letter.attempts, error = %letter.error, "event dead-lettered");
        }
        let count = letters.len() as u64;
        let store = self.dead_letters.clone();
        let name = self.name.clone();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let letters = Arc::new(letters);
        let target = self.dead_letter_sink.clone();
        loop {
            let (store2, name2, letters2, target2) =
                (store.clone(), name.clone(), letters.clone(), target.clone());
            let stored = tokio::task::spawn_blocking(move || match target2 {
                // Into the spool for the dead letter sink: durable now, delivered by its loop.
                Some((spool, mask)) => {
                    let mut batch = RecordBatch::default();
                    for letter in letters2.iter() {
                        batch.push(&letter.event, mask);
                    }
                    let report = batch.append_to(&spool).map_err(|e| e.to_string())?;
                    if report.appended < batch.len() {
                        // A full spool refused them: never drop a dead letter, keep it on disk.
                        return store2.append(&name2, &letters2).map_err(|e| e.to_string());
                    }
                    Ok(())
                }
                None => store2.append(&name2, &letters2).map_err(|e| e.to_string()),
            })
            .await
            .expect("dead letter writes do not panic");
            match stored {
                Ok(()) => break,
                Err(e) => {
                    error!(sink = %self.name, error = %e, "cannot store dead letters; retrying");
                    tokio::select! {
                        _ = self.give_up.cancelled() => return false,
                        _ = sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        self.stats.dead_lettered.fetch_add(count, Ordering::Relaxed);
        self.status.dead_lettered(count);
        match &self.dead_letter_sink {
            Some(_) => {
                info!(sink = %self.name, count, "dead letters handed to the dead letter sink")
            }
            None => info!(sink = %self.name, count,
                "dead letters stored; `chatwoot-bridge dlq list --sink {}` shows them", self.name),
        }
        true
    }
}

/// Whether a sink's answer delivers every one of `count` events. A sink that answered for fewer
/// events than it was given goes the careful way: the events without an outcome are retried.
fn all_delivered(answer: &Answer, count: usize) -> bool {
    matches!(answer, Ok(outcomes) if outcomes.len() == count
        && outcomes.iter().all(|o| matches!(o, Outcome::Delivered)))
}

/// Records read from the spool, as (seq, payload).
type Records = Vec<(u64, Vec<u8>)>;

/// A sink loop's spool reader, which may be away on a blocking thread reading the next records
/// ahead (at most one read at a time).
pub struct FileReader {
    /// `None` while `ahead` holds it.
    reader: Option<SpoolReader>,
    /// The read ahead under way, and the commit it carries.
    ahead: Option<(Option<u64>, JoinHandle<SpoolIo>)>,
    /// A read ahead that came back, and the commit it carried: its records are sent next.
    read: Option<(Option<u64>, Result<Records, SpoolError>)>,
}

/// What a blocking spool call hands back: the reader, and what it read.
type SpoolIo = (SpoolReader, Result<Records, SpoolError>);

impl From<SpoolReader> for FileReader {
    fn from(reader: SpoolReader) -> FileReader {
        FileReader {
            reader: Some(reader),
            ahead: None,
            read: None,
        }
    }
}

impl FileReader {
    /// The reader, once a read ahead is back (its outcome waits in `take_read_ahead`).
    /// Cancel-safe: the read stays under way until awaited to the end.
    async fn back(&mut self) -> &mut SpoolReader {
        if let Some((_, reading)) = &mut self.ahead {
            let (reader, result) = reading.await.expect("spool reads do not panic");
            let (upto, _) = self.ahead.take().expect("awaited just now");
            self.reader = Some(reader);
            self.read = Some((upto, result));
        }
        self.get()
    }

    /// The reader, which [`FileReader::back`] brought back.
    fn get(&mut self) -> &mut SpoolReader {
        assert!(self.ahead.is_none(), "the reader is used only once back");
        self.reader.as_mut().expect("a reader not away is here")
    }

    /// The outcome of the read ahead that came back, with the commit it carried.
    fn take_read_ahead(&mut self) -> Option<(Option<u64>, Result<Records, SpoolError>)> {
        self.read.take()
    }

    fn has_read_ahead(&self) -> bool {
        self.read.is_some()
    }

    /// Starts reading the next records on a blocking thread, after committing up to `upto`.
    fn read_ahead(&mut self, upto: Option<u64>) {
        let reader = self.get_owned();
        self.ahead = Some((upto, spawn_spool_io(reader, upto, true)));
    }

    /// Commits up to `upto` and, if `read`, reads the next records, now. Reading with records
    /// read ahead not taken would skip them: callers take them first.
    async fn io(&mut self, upto: Option<u64>, read: bool) -> Result<Records, SpoolError> {
        self.back().await;
        debug_assert!(
            !(read && self.read.is_some()),
            "records read ahead not taken"
        );
        let reader = self.get_owned();
        let (reader, result) = spawn_spool_io(reader, upto, read)
            .await
            .expect("spool reads do not panic");
        self.reader = Some(reader);
        result
    }

    /// [`SpoolReader::wait_for_data`], once the reader is back. Cancel-safe.
    async fn wait_for_data(&mut self) {
        self.back().await.wait_for_data().await
    }

    fn get_owned(&mut self) -> SpoolReader {
        self.get();
        self.reader.take().expect("checked by get")
    }
}

/// Commits progress up to `upto` and, if `read`, reads the next records: file I/O, on a blocking
/// thread, which needs the reader for the time being.
fn spawn_spool_io(mut reader: SpoolReader, upto: Option<u64>, read: bool) -> JoinHandle<SpoolIo> {
    tokio::task::spawn_blocking(move || {
        let mut result = Ok(Vec::new());
        if let Some(seq) = upto {
            if let Err(e) = reader.commit(seq) {
                // Not fatal: a later commit covers it, and a crash meanwhile re-delivers.
                error!(sink = %reader.sink(), error = %e, "cannot commit spool progress; the batch may be delivered again after a restart");
            }
        }
        if read {
            result = reader.read_batch(MAX_BATCH);
        }
        (reader, result)
    })
}

fn dead_letter(a: &Attempt, error: String, now: SystemTime) -> DeadLetter {
    DeadLetter {
        event: Event::clone(&a.event),
        error,
        attempts: a.attempts,
        first_attempt: a.first_attempt.unwrap_or(now),
        last_attempt: now,
    }
}

/// What follows a wave within a pass: `None` ends the pass; `Some(all_at_once)` sends the next
/// wave, everything untried at once or one event per conversation. A wave of everything untried
/// ends the pass. Otherwise the next wave comes only while this one made progress (failures hold
/// their conversation), and all the rest at once when this one was delivered whole to a sink that
/// keeps order itself: the destination is back.
fn next_wave_mode(
    was_all_at_once: bool,
    progressed: bool,
    whole: bool,
    preserves_order: bool,
) -> Option<bool> {
    if was_all_at_once || !progressed {
        return None;
    }
    Some(preserves_order && whole)
}

/// The events to send next in this pass: every untried event without a conversation, and of
/// each conversation whose unfinished events were not tried yet in this pass, all of them
/// (`all_at_once`) or the first. A conversation with an event tried and not finished in this
/// pass is held: its later events wait until that one gets through, in the next pass.
fn next_wave(attempts: &[Attempt], all_at_once: bool) -> Vec<usize> {
    let mut wave = Vec::new();
    let mut held: HashSet<(u64, u64)> = HashSet::new();
    let mut claimed: HashSet<(u64, u64)> = HashSet::new();
    for (i, a) in attempts.iter().enumerate() {
        if a.done {
            continue;
        }
        match a.order_key {
            None if !a.tried => wave.push(i),
            None => {}
            Some(key) if held.contains(&key) => {}
            Some(key) if a.tried => {
                held.insert(key);
            }
            Some(key) if all_at_once || claimed.insert(key) => wave.push(i),
            Some(_) => {}
        }
    }
    wave
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(conversation: Option<u64>, done: bool) -> Attempt {
        let data = match conversation {
            Some(c) => format!(r#"{{"account_id":1,"conversation_id":{c}}}"#),
            None => r#"{"account_id":1}"#.into(),
        };
        let event = Arc::new(Event::for_test("message.created", "t", &data));
        Attempt {
            order_key: event.keys.conversation_id.map(|c| (1, c)),
            event,
            attempts: 0,
            first_attempt: None,
            last_error: None,
            done,
            tried: false,
        }
    }

    #[test]
    fn a_retry_pass_goes_all_at_once_once_a_wave_is_delivered_whole() {
        // Everything untried was sent: the pass is over, whatever came back.
        assert_eq!(next_wave_mode(true, true, true, true), None);
        // Nothing moved: the destination is still failing; wait for the next pass.
        assert_eq!(next_wave_mode(false, false, false, true), None);
        // An order-keeping sink took a whole wave: the rest at once.
        assert_eq!(next_wave_mode(false, true, true, true), Some(true));
        // Some of the wave failed, or the sink sends concurrently: one per conversation.
        assert_eq!(next_wave_mode(false, true, false, true), Some(false));
        assert_eq!(next_wave_mode(false, true, true, false), Some(false));
    }

    #[test]
    fn waves_keep_one_event_per_conversation() {
        let batch = vec![
            attempt(Some(1), false),
            attempt(Some(1), false),
            attempt(Some(2), false),
            attempt(None, false),
            attempt(Some(2), false),
            attempt(None, false),
        ];
        assert_eq!(next_wave(&batch, false), vec![0, 2, 3, 5]);
        assert_eq!(next_wave(&batch, true), vec![0, 1, 2, 3, 4, 5]);
        let mut batch = batch;
        batch[0].done = true;
        batch[2].done = true;
        assert_eq!(next_wave(&batch, false), vec![1, 3, 4, 5]);
        // A failed event waits for the next pass and holds its conversation back.
        batch[1].tried = true;
        batch[3].tried = true;
        assert_eq!(next_wave(&batch, false), vec![4, 5]);
        assert_eq!(next_wave(&batch, true), vec![4, 5]);
    }

    #[test]
    fn all_at_once_still_holds_a_conversation_behind_its_failed_event() {
        // X1 failed in this pass; Y1 and Y2 went through one at a time, so the rest goes at
        // once: but X2 must not overtake X1.
        let mut batch = vec![
            attempt(Some(1), false),
            attempt(Some(2), true),
            attempt(Some(2), true),
            attempt(Some(1), false),
            attempt(Some(3), false),
            attempt(Some(3), false),
        ];
        batch[0].tried = true;
        assert_eq!(next_wave(&batch, true), vec![4, 5]);
        assert_eq!(next_wave(&batch, false), vec![4]);
    }
}
