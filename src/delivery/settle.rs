//! Settling a batch: delivering it, retrying what failed after a backoff, dead-lettering what
//! cannot succeed, and parking the conversations that fail for `retry.park_after` (`parked`),
//! until every event is delivered, dead-lettered or parked.
//!
//! An order-keeping sink gets the first pass all at once. After a failure, a retry pass goes one
//! event per conversation per wave whatever the sink (the first pass cannot be undone, but
//! nothing gets further out of order), until a wave is delivered whole
//! ([`next_wave_mode`]): one event per round trip would hold a busy conversation's backlog to
//! a few hundred events a second.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use tokio::time::{sleep, sleep_until, Instant};
use tracing::{error, info, warn};

use super::{GaveUp, SinkLoop};
use crate::backoff::Backoff;
use crate::delivery::dead_letter::{DeadLetter, DeadLetters};
use crate::delivery::ingest::RecordBatch;
use crate::delivery::waves::{next_wave, next_wave_mode, Attempt, WaveMode, WaveResult};
use crate::event::Event;
use crate::sink::{Outcome, SinkError};
use crate::spool::{SinkMask, Spool};

/// The dead-letter error of an event whose delivery panicked.
const PANICKED: &str = "the bridge panicked while delivering this batch";

/// What one pass over a batch (or a wave of the retry set) leaves to do.
#[derive(Default)]
pub(super) struct Pass {
    /// Events given up in this pass, to store before the batch counts as settled.
    pub(super) dead: Vec<DeadLetter>,
    /// The longest wait a destination asked for (`Retry-After`): the next pass waits as long.
    pub(super) retry_after: Duration,
}

impl SinkLoop {
    /// Finishes a batch: delivers (or retries, after `first_pass` if the sink was already
    /// given it) until every event is delivered or dead-lettered. `Err` when the shutdown
    /// deadline interrupted it (nothing of it is then committed).
    pub(super) async fn settle(
        &mut self,
        events: Vec<Arc<Event>>,
        first_pass: Option<Vec<Outcome>>,
    ) -> Result<(), GaveUp> {
        // A panic while delivering (a bug, never expected) must neither kill this sink for
        // the life of the process nor come back on every restart: the batch goes to the
        // dead letters, loudly, and the loop goes on.
        match AssertUnwindSafe(self.deliver_all(events.clone(), first_pass))
            .catch_unwind()
            .await
        {
            Ok(settled) => settled,
            Err(_) => self.bury_panicked(events).await,
        }
    }

    /// Delivers a batch until every event is delivered or dead-lettered. `first_pass` holds the
    /// outcomes of a pass the (order-keeping) sink already made over the whole batch. `Err`
    /// when the shutdown deadline interrupted it (nothing of it is then committed).
    async fn deliver_all(
        &mut self,
        events: Vec<Arc<Event>>,
        mut first_pass: Option<Vec<Outcome>>,
    ) -> Result<(), GaveUp> {
        let mut attempts: Vec<Attempt> = events.into_iter().map(Attempt::new).collect();
        let mut backoff = Backoff::new(self.retry.initial, self.retry.max);
        let mut mode = if self.sink.preserves_key_order() {
            WaveMode::AllAtOnce
        } else {
            WaveMode::OnePerConversation
        };
        loop {
            let pass = self.pass(&mut attempts, mode, &mut first_pass).await?;
            if !pass.dead.is_empty() {
                self.bury(pass.dead).await?;
            }
            // A conversation failing for `park_after` is set aside: the batch settles without it.
            self.park_overdue(&mut attempts).await?;
            let waiting = attempts.iter().filter(|a| !a.is_done()).count();
            if waiting == 0 {
                return Ok(());
            }
            mode = WaveMode::OnePerConversation;
            let delay = backoff.next_delay().max(pass.retry_after);
            self.wait_to_retry(&attempts, waiting, delay).await?;
        }
    }

    /// One pass: waves until every event was tried once or the destination stops taking them.
    async fn pass(
        &mut self,
        attempts: &mut [Attempt],
        mut mode: WaveMode,
        first_pass: &mut Option<Vec<Outcome>>,
    ) -> Result<Pass, GaveUp> {
        let preserves_order = self.sink.preserves_key_order();
        let mut pass = Pass::default();
        for a in attempts.iter_mut() {
            a.start_pass();
        }
        loop {
            let wave = next_wave(attempts, mode);
            if wave.is_empty() {
                break;
            }
            let now = SystemTime::now();
            let outcomes = match first_pass.take() {
                // Only an order-keeping sink is pipelined, and its first wave is the whole
                // batch; an event the sink gave no outcome for stays untried and is retried.
                Some(outcomes) => outcomes,
                None => self.send_wave(attempts, &wave).await?,
            };
            let result = self.record_wave(attempts, &wave, outcomes, now, &mut pass);
            match next_wave_mode(mode, result, preserves_order) {
                Some(next) => mode = next,
                None => break,
            }
        }
        Ok(pass)
    }

    /// Sends the events of `wave` and waits for their outcomes. A panic in the sink costs this
    /// wave, not the whole (merged) batch.
    pub(super) async fn send_wave(
        &mut self,
        attempts: &[Attempt],
        wave: &[usize],
    ) -> Result<Vec<Outcome>, GaveUp> {
        let batch: Vec<Arc<Event>> = wave.iter().map(|&i| attempts[i].event.clone()).collect();
        tokio::select! {
            outcomes = AssertUnwindSafe(self.sink.deliver(&batch)).catch_unwind() => {
                Ok(outcomes.unwrap_or_else(|_| self.panicked(batch.len())))
            }
            _ = self.give_up.cancelled() => Err(GaveUp),
        }
    }

    /// Records the outcomes of a wave sent at `now`: counts deliveries, gives up what failed
    /// for good or for too long (into `pass`), and keeps the rest for the next pass.
    pub(super) fn record_wave(
        &self,
        attempts: &mut [Attempt],
        wave: &[usize],
        outcomes: Vec<Outcome>,
        now: SystemTime,
        pass: &mut Pass,
    ) -> WaveResult {
        let mut progressed = false;
        let mut whole = outcomes.len() == wave.len();
        let mut delivered = Vec::new();
        for (&i, outcome) in wave.iter().zip(outcomes) {
            let a = &mut attempts[i];
            a.tried(now);
            match outcome {
                Outcome::Delivered => {
                    a.finish();
                    progressed = true;
                    delivered.push(i);
                }
                Outcome::Permanent(e) => {
                    whole = false;
                    a.finish();
                    progressed = true;
                    pass.dead.push(a.dead_letter(e.message, now));
                }
                Outcome::Retryable(e) => {
                    whole = false;
                    pass.retry_after = pass.retry_after.max(e.retry_after.unwrap_or_default());
                    if a.expired(now, self.retry.max_elapsed) {
                        a.finish();
                        progressed = true;
                        let message = format!(
                            "gave up after {} attempts over {:?}: {}",
                            a.attempts(),
                            self.retry.max_elapsed,
                            e.message
                        );
                        pass.dead.push(a.dead_letter(message, now));
                    } else {
                        a.last_error = Some(e.message);
                    }
                }
            }
        }
        if !delivered.is_empty() {
            self.stats
                .delivered
                .fetch_add(delivered.len() as u64, Ordering::Relaxed);
            self.status
                .delivered(delivered.iter().map(|&i| &*attempts[i].event));
        }
        match (whole, progressed) {
            (true, _) => WaveResult::DeliveredWhole,
            (false, true) => WaveResult::Progressed,
            (false, false) => WaveResult::Stuck,
        }
    }

    /// Reports the `waiting` events that failed and waits `delay` before the next pass,
    /// retrying the parked conversations meanwhile when their pass is due (none of them has an
    /// event in this batch: they were parked at intake or with it).
    async fn wait_to_retry(
        &mut self,
        attempts: &[Attempt],
        waiting: usize,
        delay: Duration,
    ) -> Result<(), GaveUp> {
        let error = attempts
            .iter()
            .filter(|a| !a.is_done())
            .find_map(|a| a.last_error.clone())
            .unwrap_or_default();
        warn!(sink = %self.name, events = waiting, retry_in = ?delay, %error, "delivery failed; will retry");
        self.status.retrying(error);
        let until = Instant::now() + delay;
        loop {
            let parked_pass = self.parked.set.next_pass().filter(|&at| at < until);
            tokio::select! {
                _ = self.give_up.cancelled() => return Err(GaveUp),
                _ = sleep_until(parked_pass.unwrap_or(until)) => {}
            }
            if parked_pass.is_none() {
                return Ok(());
            }
            self.retry_parked().await?;
        }
    }

    /// The outcomes of `count` events whose delivery panicked in the sink: permanent, so that
    /// they go to the dead letters, loudly, and the rest goes on.
    pub(super) fn panicked(&self, count: usize) -> Vec<Outcome> {
        error!(sink = %self.name, events = count, "delivery panicked; these events go to the dead letters");
        (0..count)
            .map(|_| Outcome::Permanent(SinkError::new(PANICKED)))
            .collect()
    }

    /// Dead-letters a batch whose delivery panicked. `Err` when the shutdown deadline came
    /// first.
    async fn bury_panicked(&self, events: Vec<Arc<Event>>) -> Result<(), GaveUp> {
        error!(sink = %self.name, events = events.len(), "delivery panicked; the batch goes to the dead letters");
        let letters = DeadLetter::each_given_up_now(&events, PANICKED, 1);
        self.bury(letters).await
    }

    /// Stores dead letters durably; until that succeeds the batch is not committed. `Err`
    /// when the shutdown deadline came first (the batch then stays in the spool).
    pub(super) async fn bury(&self, letters: Vec<DeadLetter>) -> Result<(), GaveUp> {
        for letter in &letters {
            error!(sink = %self.name, id = %letter.event.id, event = %letter.event.name,
                attempts = letter.attempts, error = %letter.error, "event dead-lettered");
        }
        let count = letters.len() as u64;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let letters = Arc::new(letters);
        loop {
            let (store, name, letters, target) = (
                self.dead_letters.clone(),
                self.name.clone(),
                letters.clone(),
                self.dead_letter_sink.clone(),
            );
            let stored = tokio::task::spawn_blocking(move || {
                store_dead_letters(&store, &name, &letters, target)
            })
            .await
            .expect("dead letter writes do not panic");
            match stored {
                Ok(()) => break,
                Err(e) => {
                    error!(sink = %self.name, error = %e, "cannot store dead letters; retrying");
                    tokio::select! {
                        _ = self.give_up.cancelled() => return Err(GaveUp),
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
        Ok(())
    }
}

/// Stores `letters` of sink `name`: into the spool for the dead letter sink (`target`), durable
/// now and delivered by its loop, or else in the local dead letter files. Blocking.
fn store_dead_letters(
    store: &DeadLetters,
    name: &str,
    letters: &[DeadLetter],
    target: Option<(Spool, SinkMask)>,
) -> Result<(), String> {
    let Some((spool, mask)) = target else {
        return store.append(name, letters).map_err(|e| e.to_string());
    };
    let mut batch = RecordBatch::default();
    for letter in letters {
        batch.push(&letter.event, mask);
    }
    let report = batch.append_to(&spool).map_err(|e| e.to_string())?;
    if report.appended < batch.len() {
        // A full spool refused them: never drop a dead letter, keep it on disk.
        return store.append(name, letters).map_err(|e| e.to_string());
    }
    Ok(())
}
