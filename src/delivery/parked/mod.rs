//! A sink's retry set: the conversations it set aside so that one refused event holds back only
//! its own conversation, not the sink's other conversations, nor its cursor.
//!
//! When a batch being settled has an event that has failed for the sink's `retry.park_after`,
//! that event and every later unfinished one of its conversation in the batch are *parked*:
//! written to the sink's parked file and fsynced ([`file`]) before the batch counts as settled,
//! so the cursor moves on and the spool can reclaim. Events of a parked conversation taken later
//! are parked behind it instead of sent, so the conversation keeps its order. The set is retried
//! on the sink's backoff, the first event of each conversation at a time ([`set`]): when it is
//! delivered the next goes; when it passes `max_elapsed`, or is refused for good, it goes to the
//! dead letters and the next goes; a conversation whose last parked event is finished is no
//! longer parked and its new events flow directly again. The parked file is read back at start,
//! so a restart loses nothing; finished lines leave it when it is rewritten.
//!
//! Memory holds an index, not the events: each parked event's place in the file, and the
//! events a retry wave sends. The set is bounded ([`set::MAX_PARKED_BYTES`],
//! [`set::MAX_PARKED_EVENTS`]):
//! at the bound the sink parks no new conversation and takes no new events until retries make
//! room, lagging like a sink whose destination is down.

mod file;
mod set;

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::sleep;
use tracing::{error, warn};

use super::settle::Pass;
use super::{GaveUp, LoopEnd, SinkLoop};
use crate::backoff::Backoff;
use crate::delivery::dead_letter::DeadLetter;
use crate::delivery::ingest::MAX_BATCH;
use crate::delivery::retry::RetrySettings;
use crate::delivery::waves::{order_key, overdue, Attempt, Tries};
use crate::event::Event;
use file::{ParkedFile, ParkedFileError, Span};
pub(crate) use set::ParkedSet;
use set::MAX_PARKED_EVENTS;
use set::{Head, ParkKey};

/// Bounds the bytes of the parked events one retry wave reads and sends (one event goes
/// whatever its size).
const WAVE_BYTES: u64 = 4 << 20;

/// Bounds the events one retry pass tries before the loop takes new events again (the next
/// pass is then due at once): a long parked conversation drains one event per round trip, and
/// the sink's other conversations must not wait for all of it.
const PASS_EVENTS: usize = 4 * MAX_BATCH;

/// What a line holds beyond its event's `data`: bounds a parked file's lines, with
/// `max_frame_bytes` (no event's `data` is larger than the frame it came in).
const LINE_OVERHEAD: u64 = 1 << 20;

/// The error of an event parked behind an earlier one of its conversation, not tried itself.
const BEHIND: &str = "waiting behind an earlier event of its conversation";

/// A sink's retry set and the file that keeps it.
pub(crate) struct Parked {
    /// The parked file, shared with the blocking threads that read and write it.
    file: Arc<ParkedFile>,
    /// Its index, and when the next retry pass is due.
    pub(crate) set: ParkedSet,
}

impl Parked {
    /// The retry set of `sink`, kept under `spool_dir`; read from disk when the loop starts.
    /// Lines are bounded by `max_frame_bytes`, which bounds every event's `data`.
    pub(crate) fn new(
        spool_dir: &Path,
        sink: &str,
        max_frame_bytes: u64,
        retry: &RetrySettings,
    ) -> Parked {
        Parked {
            file: Arc::new(ParkedFile::new(
                spool_dir,
                sink,
                max_frame_bytes + LINE_OVERHEAD,
            )),
            set: ParkedSet::new(retry),
        }
    }
}

/// Runs `f` with the parked file on the blocking pool.
async fn on_file<T: Send + 'static>(
    file: &Arc<ParkedFile>,
    f: impl FnOnce(&ParkedFile) -> T + Send + 'static,
) -> T {
    let file = file.clone();
    tokio::task::spawn_blocking(move || f(&file))
        .await
        .expect("parked file I/O does not panic")
}

/// How a retry pass over the set is going.
#[derive(Default)]
struct RetryPass {
    /// Conversations whose first event failed in this pass: they wait for the next.
    failed: HashSet<ParkKey>,
    /// Events tried, bounded by [`PASS_EVENTS`].
    tried: usize,
    /// Whether something was finished.
    progressed: bool,
    /// The longest wait a destination asked for.
    retry_after: Duration,
    /// The last error, for the status and the log.
    last_error: Option<String>,
}

impl SinkLoop {
    /// Reads the parked file back into the retry set as the loop starts. A file that cannot
    /// be read is tried again every second: parking, or delivering an event of a conversation
    /// parked in it, before it is read would break that conversation's order.
    pub(super) async fn load_parked(&mut self) -> ControlFlow<LoopEnd> {
        loop {
            let loaded = on_file(&self.parked.file, |file| {
                let lines = file.load(2 * MAX_PARKED_EVENTS)?;
                let bytes = lines.last().map_or(0, |l| l.span.offset + l.span.len);
                Ok::<_, ParkedFileError>((lines, bytes))
            })
            .await;
            match loaded {
                Ok((lines, bytes)) => {
                    self.parked.set.adopt(lines, bytes);
                    if !self.parked.set.is_empty() {
                        warn!(sink = %self.name, events = self.parked.set.len(),
                            "parked events read back; they are retried before their conversations go on");
                    }
                    self.status.parked(self.parked.set.len() as u64);
                    return ControlFlow::Continue(());
                }
                Err(e) => {
                    error!(sink = %self.name, error = %e, "cannot read the parked events; retrying in 1 s");
                    tokio::select! {
                        _ = self.give_up.cancelled() => return ControlFlow::Break(LoopEnd::Interrupted),
                        _ = sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// The events of a taken batch to send: those of parked conversations are parked behind
    /// them instead (durably, before the batch can count as settled).
    pub(super) async fn park_behind(
        &mut self,
        events: Vec<Arc<Event>>,
    ) -> Result<Vec<Arc<Event>>, GaveUp> {
        if self.parked.set.is_empty() {
            return Ok(events);
        }
        let (behind, to_send): (Vec<_>, Vec<_>) = events
            .into_iter()
            .partition(|e| order_key(e).is_some_and(|key| self.parked.set.holds(key)));
        if !behind.is_empty() {
            let letters = DeadLetter::each_given_up_now(&behind, BEHIND, 0);
            self.park(letters).await?;
        }
        Ok(to_send)
    }

    /// After a pass over a batch being settled: parks the conversations whose first
    /// unfinished event has failed for `park_after` (see [`overdue`]), unless the set is full.
    /// A `park_after` of `max_elapsed` parks nothing: such an event is given up instead (it
    /// may not have been, yet, if its last try came just before `max_elapsed`).
    pub(super) async fn park_overdue(&mut self, attempts: &mut [Attempt]) -> Result<(), GaveUp> {
        if self.parked.set.is_full() || self.retry.park_after >= self.retry.max_elapsed {
            return Ok(());
        }
        let now = SystemTime::now();
        let overdue = overdue(attempts, now, self.retry.park_after);
        if overdue.is_empty() {
            return Ok(());
        }
        let letters = overdue
            .iter()
            .map(|&i| {
                let a = &attempts[i];
                let error = a.last_error.clone().unwrap_or_else(|| BEHIND.into());
                a.dead_letter(error, now)
            })
            .collect();
        self.park(letters).await?;
        for i in overdue {
            attempts[i].finish();
        }
        Ok(())
    }

    /// Appends `letters` to the parked file, fsynced, then to the set. A write that fails is
    /// tried again until the shutdown deadline (`Err`: nothing of it counts as parked, the
    /// batch stays in the spool).
    async fn park(&mut self, letters: Vec<DeadLetter>) -> Result<(), GaveUp> {
        let mut lines = Vec::new();
        let lens: Vec<u64> = letters
            .iter()
            .map(|letter| self.parked.file.encode(letter, &mut lines))
            .collect();
        let (at, lines) = (self.parked.set.file_bytes(), Arc::new(lines));
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let lines = lines.clone();
            match on_file(&self.parked.file, move |file| file.append(at, &lines)).await {
                Ok(()) => break,
                Err(e) => {
                    error!(sink = %self.name, error = %e, "cannot park events; retrying");
                    tokio::select! {
                        _ = self.give_up.cancelled() => return Err(GaveUp),
                        _ = sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        for (letter, len) in letters.iter().zip(lens) {
            self.parked.set.parked(order_key(&letter.event), len);
            let event = &letter.event;
            if letter.attempts == 0 {
                warn!(sink = %self.name, id = %event.id, event = %event.name,
                    "event parked behind an earlier event of its conversation");
            } else {
                warn!(sink = %self.name, id = %event.id, event = %event.name, attempts = letter.attempts,
                    error = %letter.error, park_after = ?self.retry.park_after,
                    "event parked: it failed for park_after; its conversation waits behind it, the sink goes on");
            }
        }
        self.status.parked(self.parked.set.len() as u64);
        Ok(())
    }

    /// One retry pass over the set: waves of the first event of each parked conversation,
    /// until each failed once, the set is empty, or [`PASS_EVENTS`] were tried. `Err` when the
    /// shutdown deadline came (what is parked stays in the file).
    pub(super) async fn retry_parked(&mut self) -> Result<(), GaveUp> {
        let mut pass = RetryPass::default();
        while pass.tried < PASS_EVENTS {
            let wave = self.parked.set.wave(&pass.failed, MAX_BATCH, WAVE_BYTES);
            if wave.is_empty() {
                break;
            }
            let Some((wave, mut heads)) = self.read_heads(&wave, &mut pass).await else {
                break;
            };
            if heads.is_empty() {
                // Every one was unreadable and left the set: the next wave takes the next ones.
                continue;
            }
            pass.tried += heads.len();
            let indices: Vec<usize> = (0..heads.len()).collect();
            let outcomes = self.send_wave(&heads, &indices).await?;
            let mut recorded = Pass::default();
            self.record_wave(
                &mut heads,
                &indices,
                outcomes,
                SystemTime::now(),
                &mut recorded,
            );
            if !recorded.dead.is_empty() {
                self.bury(recorded.dead).await?;
            }
            pass.retry_after = pass.retry_after.max(recorded.retry_after);
            for (head, attempt) in wave.iter().zip(heads) {
                self.settle_head(*head, attempt, &mut pass);
            }
        }
        self.compact_parked(false).await;
        let more = pass.tried >= PASS_EVENTS;
        self.parked
            .set
            .pass_ended(more, pass.progressed, pass.retry_after);
        self.status.parked(self.parked.set.len() as u64);
        if let Some(error) = pass.last_error.filter(|_| !self.parked.set.is_empty()) {
            warn!(sink = %self.name, parked = self.parked.set.len(), %error, "parked events failed again; will retry");
            self.status.retrying(error);
        }
        Ok(())
    }

    /// The events at `wave`, read from the parked file, as attempts resumed where they were,
    /// with the heads they are. A line that cannot be read back is moved aside and leaves the
    /// set. `None` when the file cannot be read: the pass ends, and the next tries again.
    async fn read_heads(
        &mut self,
        wave: &[Head],
        pass: &mut RetryPass,
    ) -> Option<(Vec<Head>, Vec<Attempt>)> {
        let spans: Vec<Span> = wave.iter().map(|h| h.span).collect();
        let read = on_file(&self.parked.file, move |file| file.read(&spans)).await;
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                error!(sink = %self.name, error = %e, "cannot read parked events; will retry");
                pass.last_error = Some(e.to_string());
                return None;
            }
        };
        let (mut read_heads, mut heads) = (Vec::new(), Vec::with_capacity(wave.len()));
        for (head, letter) in wave.iter().zip(read) {
            match letter {
                Ok(letter) => {
                    let tries = self
                        .parked
                        .set
                        .head_tries(head.key)
                        .unwrap_or_else(|| Tries {
                            attempts: letter.attempts,
                            first_attempt: (letter.attempts > 0).then_some(letter.first_attempt),
                            last_error: (letter.attempts > 0).then_some(letter.error),
                        });
                    read_heads.push(*head);
                    heads.push(Attempt::resume(Arc::new(letter.event), tries));
                }
                Err(reason) => {
                    let span = head.span;
                    let aside = on_file(&self.parked.file, move |f| f.set_aside(&[span])).await;
                    error!(sink = %self.name, file = %self.parked.file.path().display(), %reason,
                        set_aside = aside.is_ok(), "a parked event cannot be read back; it leaves the retry set");
                    self.parked.set.finish_head(head.key);
                    pass.progressed = true;
                }
            }
        }
        Some((read_heads, heads))
    }

    /// Books the outcome of a retried first event of a conversation.
    fn settle_head(&mut self, head: Head, attempt: Attempt, pass: &mut RetryPass) {
        if attempt.is_done() {
            pass.progressed = true;
            let event = &attempt.event;
            warn!(sink = %self.name, id = %event.id, event = %event.name,
                "parked event finished (delivered or dead-lettered): it leaves the retry set");
            if self.parked.set.finish_head(head.key) {
                warn!(sink = %self.name, id = %event.id, event = %event.name,
                    "its conversation is no longer parked: its new events go out directly");
            }
        } else {
            pass.last_error = attempt.last_error.clone().or(pass.last_error.take());
            self.parked.set.tried(head.key, attempt.tries());
            pass.failed.insert(head.key);
        }
    }

    /// Rewrites the parked file without its finished lines when the set says so, or, if
    /// `any` (as the loop stops), whenever it has some. A failure is logged and harmless: the
    /// file keeps lines already finished, which a restart would send again; the next pass
    /// tries again.
    pub(super) async fn compact_parked(&mut self, any: bool) {
        if !self.parked.set.wants_compaction(any) {
            return;
        }
        let before = self.parked.set.live_spans();
        let keep = before.clone();
        match on_file(&self.parked.file, move |file| file.rewrite(&keep)).await {
            Ok(after) => self.parked.set.compacted(&before, &after),
            Err(e) => {
                error!(sink = %self.name, error = %e, "cannot rewrite the parked file; will retry")
            }
        }
    }
}
