//! From sockets to the spool: ids, routes, and the durable append.
//!
//! ```text
//! token tasks ──events──▶ ingest (ids, routes) ──append──▶ spool ──▶ one SinkLoop per sink
//!                                                   ▲
//!                  dead-letter replays ─────────────┘
//! ```
//! Every event is in the spool, with the sinks its routes chose, before any sink sees it. Each
//! sink reads the spool from its own cursor ([`crate::delivery`]), so a dead webhook never stalls
//! Kafka, and a sink that comes back catches up from where it was. Once appended, a batch is
//! also offered to the sink loops in memory (`Appended`): a sink that keeps up takes it from
//! there instead of reading back and decoding what was just written.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::delivery::dead_letter::{DeadLetters, LetterCount};
use crate::delivery::pressure::{PushOut, PushOutError};
use crate::delivery::tap::TapHub;
use crate::event::id::IdAssigner;
use crate::event::Event;
use crate::route::{RouteTable, Routed};
use crate::spool::{AppendReport, SinkMask, Spool, SpoolError, SpoolPosition};

/// Most events appended (and read by a sink) at once: one write syscall, one produce batch.
pub const MAX_BATCH: usize = 512;

/// Bounds the events read from the sockets and not on disk yet: the capacity of the channel from
/// the token tasks to the ingest. Small on purpose: the sockets are held back instead. Their
/// bytes are bounded too, by the byte gate the token tasks pass (`memory_limit`).
pub(crate) const INGEST_CAPACITY: usize = 1024;

/// Bounds the appended batches kept in memory for the sink loops, besides their bytes (the
/// tail's share of `memory_limit`). A loop that falls further behind reads the spool instead.
pub(crate) const TAIL_BATCHES: usize = 16;

/// A batch as it was appended to the spool, for the sink loops to take in memory.
#[derive(Debug)]
pub(crate) struct Appended {
    /// Seq of the first record; the others follow one by one.
    pub(crate) first_seq: u64,
    /// Each record's event, in seq order.
    pub(crate) events: Vec<Arc<Event>>,
    /// Each record's sinks, in seq order.
    pub(crate) masks: Vec<SinkMask>,
    /// Where the spool's file continues after this batch.
    pub(crate) end: SpoolPosition,
}

impl Appended {
    /// Seq of the last record.
    pub(crate) fn last_seq(&self) -> u64 {
        self.first_seq + self.masks.len() as u64 - 1
    }
}

/// The batches just appended, newest last, for the sink loops to take in memory instead of
/// reading them back: at most [`TAIL_BATCHES`] of them and `max_bytes` of events. The newest
/// push the oldest out, whoever has taken them, so that a sink that is down holds nothing here;
/// a batch larger than `max_bytes` is not kept. Shared by the ingest and every sink loop.
#[derive(Debug, Clone)]
pub(crate) struct Tail {
    /// The batches, behind a lock taken once per batch, never per event.
    ring: Arc<Mutex<TailRing>>,
}

/// The batches of a [`Tail`].
#[derive(Debug)]
struct TailRing {
    /// The batches with their bytes ([`Event::memory_bytes`] summed), oldest first.
    batches: VecDeque<(Arc<Appended>, usize)>,
    /// The bytes of `batches`, at most `max_bytes`.
    bytes: usize,
    /// What `batches` may hold: the tail's share of `memory_limit`.
    max_bytes: usize,
}

impl Tail {
    /// An empty tail holding at most `max_bytes` of events.
    pub(crate) fn new(max_bytes: usize) -> Tail {
        Tail {
            ring: Arc::new(Mutex::new(TailRing {
                batches: VecDeque::with_capacity(TAIL_BATCHES),
                bytes: 0,
                max_bytes,
            })),
        }
    }

    /// Keeps a batch just appended, pushing the oldest out to make room; false when it is
    /// larger than the whole tail and not kept (its sinks read it from the spool, a read's worth
    /// at a time). Called before the sink loops are woken, so that a loop that wakes finds it.
    pub(crate) fn send(&self, batch: Arc<Appended>) -> bool {
        let bytes: usize = batch.events.iter().map(|e| e.memory_bytes()).sum();
        let mut ring = self.ring.lock().expect("tail lock");
        if bytes > ring.max_bytes {
            return false;
        }
        while ring.batches.len() >= TAIL_BATCHES || ring.bytes + bytes > ring.max_bytes {
            let Some((_, oldest)) = ring.batches.pop_front() else {
                break;
            };
            ring.bytes -= oldest;
        }
        ring.bytes += bytes;
        ring.batches.push_back((batch, bytes));
        true
    }

    /// The oldest batch kept with records after `seq`, and its bytes; `None` when no batch kept
    /// goes past it. It may start after `seq + 1`: the records in between are in the spool only.
    pub(crate) fn after(&self, seq: u64) -> Option<(Arc<Appended>, usize)> {
        let ring = self.ring.lock().expect("tail lock");
        ring.batches
            .iter()
            .find(|(batch, _)| batch.last_seq() > seq)
            .map(|(batch, bytes)| (batch.clone(), *bytes))
    }
}

/// Bounds how long a queued dead-letter replay waits before the daemon looks for it.
const REPLAY_POLL: Duration = Duration::from_secs(1);

/// Bounds the letters a replay reads into one batch, in spool bytes (a larger letter goes
/// alone), besides the replays' share of `memory_limit`: what a pass reads again when it finds
/// the spool's replay share used up, whatever the memory limit.
const REPLAY_BATCH_BYTES: usize = 4 << 20;

pub use crate::delivery::stats::PipelineStats;

/// Events encoded as spool records, each with its sinks, ready for one append (one write).
#[derive(Debug, Default)]
pub(crate) struct RecordBatch {
    /// The encoded records, back to back; reused across batches.
    buffer: Vec<u8>,
    /// Where each record is in `buffer`, and its sinks.
    records: Vec<(usize, usize, SinkMask)>,
}

impl RecordBatch {
    /// Encodes `event` as the next record, for `sinks`.
    pub(crate) fn push(&mut self, event: &Event, sinks: SinkMask) {
        let start = self.buffer.len();
        event.encode_record(&mut self.buffer);
        self.records.push((start, self.buffer.len(), sinks));
    }

    /// How many records it holds.
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether it holds no record.
    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// What the records take in the spool, headers included (as `max_bytes` counts them).
    fn spool_bytes(&self) -> u64 {
        self.buffer.len() as u64 + crate::spool::HEADER_BYTES * self.records.len() as u64
    }

    /// Takes the last record out again: it goes into the next batch when it would take this one
    /// past what the spool can hold.
    fn pop(&mut self) {
        if let Some((start, _, _)) = self.records.pop() {
            self.buffer.truncate(start);
        }
    }

    /// Empties it, keeping its buffers for the next batch.
    pub(crate) fn clear(&mut self) {
        self.buffer.clear();
        self.records.clear();
    }

    /// Appends every record in one write. Blocking I/O: call from a blocking thread.
    pub(crate) fn append_to(&self, spool: &Spool) -> Result<AppendReport, SpoolError> {
        self.append_then(spool, |_| {})
    }

    /// Appends what fits in a replay's share of the spool ([`Spool::append_replayed`]).
    fn append_replayed(&self, spool: &Spool) -> Result<AppendReport, SpoolError> {
        spool.append_replayed(&self.as_records())
    }

    /// Each record's bytes, with its sinks.
    fn as_records(&self) -> Vec<(&[u8], SinkMask)> {
        self.records
            .iter()
            .map(|&(start, end, mask)| (&self.buffer[start..end], mask))
            .collect()
    }

    /// [`RecordBatch::append_to`], with [`Spool::append_then`]'s `before_wake`.
    pub(crate) fn append_then(
        &self,
        spool: &Spool,
        before_wake: impl FnOnce(&AppendReport),
    ) -> Result<AppendReport, SpoolError> {
        spool.append_then(&self.as_records(), before_wake)
    }
}

/// Where the ingest appends, how it makes room, and how long it keeps trying.
pub(crate) struct Appender {
    /// Every routed event is appended here.
    spool: Spool,
    /// Appended batches are offered to the sink loops here.
    tail: Tail,
    /// Counts what was stored, dropped by a full spool, or given up on.
    stats: Arc<PipelineStats>,
    /// Cancelled when the shutdown deadline passes: from then on nothing more is tried, and
    /// what is not appended is counted as not spooled.
    deadline: CancellationToken,
    /// Makes room when the spool is full under `when_full: dead_letter`, by pushing its oldest
    /// segment out to the dead letters of the sinks that lag.
    push_out: Arc<PushOut>,
    /// Events given up on at the deadline, for the ingest's last word.
    given_up: u64,
    /// Where appended events are offered to whoever taps them live.
    tap: TapHub,
}

mod run;
pub(crate) use run::{ingest, route_switch, Ingest, IngestTable, RouteFeed, RouteSwitch};

/// Gives each event its id and the spool mask of the sinks its routes chose.
struct Router {
    /// The compiled routes; shared with the taps, which read route and sink names from them.
    routes: Arc<RouteTable>,
    /// The spool's bit of each sink a route can name, by route sink index.
    sink_masks: Vec<SinkMask>,
    /// Assigns stable event ids.
    ids: IdAssigner,
}

impl Router {
    /// Routes to the sinks of `spool`.
    fn new(routes: RouteTable, spool: &Spool) -> Router {
        let sink_masks = routes
            .sink_names()
            .iter()
            .map(|name| spool.mask(&[name.as_str()]))
            .collect();
        Router {
            routes: Arc::new(routes),
            sink_masks,
            ids: IdAssigner::new(),
        }
    }

    /// Routes by `routes` from now on, to the sinks of `spool`; the ids go on as they were.
    fn set_routes(&mut self, routes: RouteTable, spool: &Spool) {
        let ids = std::mem::take(&mut self.ids);
        *self = Router {
            ids,
            ..Router::new(routes, spool)
        };
    }

    /// Gives `event` its id.
    fn give_id(&mut self, event: &mut Event) {
        event.id = self.ids.assign(
            event.content_hash,
            &event.token,
            event.received_at,
            event.received_mono,
        );
    }

    /// The sinks `event` goes to, as a spool mask and as the routes chose them (for the taps);
    /// `None` when it goes to none. An event that matched no route is counted in `stats`.
    fn route(&self, event: &Event, stats: &PipelineStats) -> Option<(SinkMask, Routed)> {
        let routed = self.routes.route(event);
        if !routed.matched {
            count_unmatched(stats, &event.name);
            debug!(event = %event.name, token = %event.token, "event matched no route");
        }
        if routed.sinks.is_empty() {
            return None;
        }
        let mask = routed.sinks.iter().fold(0, |m, t| m | self.sink_masks[t].0);
        Some((SinkMask(mask), routed))
    }
}

impl Appender {
    /// Appends to `spool` and offers on `tail` until `deadline` is cancelled; `push_out` makes
    /// room in a full spool.
    pub(crate) fn new(
        spool: Spool,
        tail: Tail,
        stats: Arc<PipelineStats>,
        deadline: CancellationToken,
        push_out: Arc<PushOut>,
    ) -> Appender {
        Appender {
            spool,
            tail,
            stats,
            deadline,
            push_out,
            given_up: 0,
            tap: TapHub::default(),
        }
    }

    /// Offers what it appends on `tap` too, while someone taps.
    pub(crate) fn with_tap(mut self, tap: TapHub) -> Appender {
        self.tap = tap;
        self
    }

    /// Appends one batch, retrying (and holding the sockets back) while the disk refuses it:
    /// an event that was read is never dropped for an I/O error, until the shutdown deadline.
    /// Once stored, the batch's events are offered to the sink loops on `tail`, before they are
    /// woken. Past the deadline the batch is counted as not spooled instead: a write still
    /// running on its thread then (a disk that hangs) is not waited for, and counts as not
    /// spooled whatever becomes of it.
    async fn append_until_stored(&mut self, batch: RecordBatch, events: Offer) -> RecordBatch {
        debug_assert_eq!(events.0.len(), batch.len(), "one event per record");
        debug_assert_eq!(events.1.len(), batch.len(), "one mask per record");
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut batch = batch;
        let mut offer = Some(events);
        loop {
            let records = batch.len();
            if self.deadline.is_cancelled() {
                self.give_up(records);
                return batch;
            }
            let attempt = self.attempt(batch, offer);
            let (returned, kept, result) = tokio::select! {
                biased;
                done = attempt => done.expect("spool appends do not panic"),
                () = self.deadline.cancelled() => {
                    self.give_up(records);
                    return RecordBatch::default();
                }
            };
            batch = returned;
            offer = kept;
            self.stats
                .append_failing
                .store(result.is_err(), Ordering::Relaxed);
            match result {
                Ok(report) => {
                    count_appended(&report, &self.stats);
                    return batch;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    error!(error = %e, events = batch.len(), retry_in = ?delay,
                        "cannot append to the spool; holding the sockets until it works");
                    tokio::select! {
                        () = sleep(delay) => {}
                        () = self.deadline.cancelled() => {}
                    }
                }
            }
        }
    }

    /// One append of `batch` on a blocking thread, making room first if the spool is full
    /// ([`append_making_room`]); the whole batch is offered on the tail once written. Gives the
    /// batch back, with the offer if it was not taken.
    fn attempt(
        &self,
        batch: RecordBatch,
        offer: Option<Offer>,
    ) -> tokio::task::JoinHandle<(
        RecordBatch,
        Option<Offer>,
        Result<AppendReport, PushOutError>,
    )> {
        let (spool, tail, push_out) =
            (self.spool.clone(), self.tail.clone(), self.push_out.clone());
        tokio::task::spawn_blocking(move || {
            let mut offer = offer;
            let result = append_making_room(&batch, &spool, &push_out, |report| {
                offer_whole(report, batch.len(), &mut offer, &tail);
            });
            (batch, offer, result)
        })
    }

    /// Counts `records` events as not spooled: the shutdown deadline passed before the spool
    /// took them.
    fn give_up(&mut self, records: usize) {
        if self.given_up == 0 {
            error!(
                "the shutdown deadline passed before the spool took every event read: giving up \
                 on the disk; what the ingest still holds is lost"
            );
        }
        self.given_up += records as u64;
        self.stats
            .not_spooled
            .fetch_add(records as u64, Ordering::Relaxed);
    }

    /// The ingest's last word: whether everything it received went where its routes said.
    fn finish(self) {
        if self.given_up == 0 {
            info!("ingest finished: every event read is in the spool");
        } else {
            error!(
                not_spooled = self.given_up,
                "ingest stopped at the shutdown deadline: {} events read were NOT appended to \
                 the spool and are lost",
                self.given_up
            );
        }
    }
}

/// A batch's events and sinks, offered to the sink loops once the batch is appended.
type Offer = (Vec<Arc<Event>>, Vec<SinkMask>);

/// Appends `batch`; while the spool has no room for it (`when_full: dead_letter`), pushes the
/// oldest segment out and tries again. Blocking.
pub(super) fn append_making_room(
    batch: &RecordBatch,
    spool: &Spool,
    push_out: &PushOut,
    mut before_wake: impl FnMut(&AppendReport),
) -> Result<AppendReport, PushOutError> {
    loop {
        let report = batch.append_then(spool, &mut before_wake)?;
        if report.awaiting_room == 0 {
            return Ok(report);
        }
        push_out.push_out_oldest(spool)?;
    }
}

/// Offers the events of an append to the sink loops, if the whole batch was written: what a
/// full spool refused is not delivered. Not kept when larger than the tail's share: the spool
/// has them.
fn offer_whole(report: &AppendReport, records: usize, offer: &mut Option<Offer>, tail: &Tail) {
    if let (Some(first_seq), Some(end)) = (report.first_seq, report.end) {
        if report.appended == records {
            if let Some((events, masks)) = offer.take() {
                let _ = tail.send(Arc::new(Appended {
                    first_seq,
                    events,
                    masks,
                    end,
                }));
            }
        }
    }
}

/// Counts what an append stored and what a full spool dropped, loudly.
fn count_appended(report: &AppendReport, stats: &PipelineStats) {
    stats
        .spooled
        .fetch_add(report.appended as u64, Ordering::Relaxed);
    if report.dropped_newest > 0 {
        stats
            .spool_dropped_newest
            .fetch_add(report.dropped_newest, Ordering::Relaxed);
        error!(dropped = report.dropped_newest,
            "spool is full (spool.max_bytes): the newest events were DROPPED (when_full: drop_newest)");
    }
    if report.dropped_oldest > 0 {
        stats
            .spool_dropped_oldest
            .fetch_add(report.dropped_oldest, Ordering::Relaxed);
        error!(dropped = report.dropped_oldest,
            "spool is full (spool.max_bytes): the oldest undelivered events were DROPPED (when_full: drop_oldest)");
    }
}

/// Bounds the distinct event names counted one by one (the rest count as `(other)`): the server
/// chooses the names.
const MAX_COUNTED_NAMES: usize = 1000;

/// Counts an event of `name` that matched no route.
fn count_unmatched(stats: &PipelineStats, name: &str) {
    let mut unmatched = stats.unmatched.lock().expect("stats lock");
    if let Some(count) = unmatched.get_mut(name) {
        *count += 1;
        return;
    }
    let key = if unmatched.len() < MAX_COUNTED_NAMES {
        name
    } else {
        "(other)"
    };
    *unmatched.entry(key.to_owned()).or_default() += 1;
}

/// Forces the spool to disk every `interval` until `stop`, then once more.
pub(crate) async fn sync_periodically(spool: Spool, interval: Duration, stop: CancellationToken) {
    let mut failures = SyncFailures::default();
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = sleep(interval) => false,
        };
        let spool2 = spool.clone();
        let synced = tokio::task::spawn_blocking(move || spool2.sync())
            .await
            .expect("spool sync does not panic");
        failures.note(synced, Instant::now());
        if stopping {
            return;
        }
    }
}

/// How often a failing periodic fsync is logged again while it keeps failing.
const SYNC_FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// A run of failed periodic fsyncs: logged when it starts, then every
/// [`SYNC_FAILURE_LOG_EVERY`] with the count, and when it ends. A full disk fails every one
/// (ten a second by default), and a line each would bury the error that matters.
#[derive(Debug, Default)]
struct SyncFailures {
    /// Failures since the last one logged, and when that was; `None` while fsyncs succeed.
    run: Option<(u64, Instant)>,
    /// Failures in the whole run, for the line that says it ended.
    total: u64,
}

impl SyncFailures {
    /// Takes one fsync's result at `now`, logging as the type says.
    fn note(&mut self, synced: Result<(), SpoolError>, now: Instant) {
        match (synced, self.run) {
            (Ok(()), None) => {}
            (Ok(()), Some(_)) => {
                info!(failures = self.total, "the spool fsyncs again");
                *self = SyncFailures::default();
            }
            (Err(e), None) => {
                error!(error = %e, "cannot fsync the spool; retrying on every interval");
                self.run = Some((0, now));
                self.total = 1;
            }
            (Err(e), Some((unlogged, logged_at))) => {
                self.total += 1;
                if now.duration_since(logged_at) >= SYNC_FAILURE_LOG_EVERY {
                    error!(error = %e, failures = unlogged + 1, "cannot fsync the spool, still");
                    self.run = Some((0, now));
                } else {
                    self.run = Some((unlogged + 1, logged_at));
                }
            }
        }
    }

    /// Whether the last fsync failed.
    #[cfg(test)]
    fn failing(&self) -> bool {
        self.run.is_some()
    }
}

/// Puts dead letters that `dlq replay` queued back into the spool, for their sink only, in
/// batches of at most `max_batch_bytes` (the replays' share of `memory_limit`) or
/// [`REPLAY_BATCH_BYTES`], whichever is smaller.
/// The configured sinks are read from `table` at every pass: a reload may add one.
pub(crate) async fn replay_dead_letters(
    dead_letters: DeadLetters,
    spool: Spool,
    table: tokio::sync::watch::Receiver<Arc<IngestTable>>,
    max_batch_bytes: usize,
    stop: CancellationToken,
) {
    let max_batch_bytes = max_batch_bytes.min(REPLAY_BATCH_BYTES);
    loop {
        let sinks = table.borrow().sinks.clone();
        replay_pending(&dead_letters, &spool, &sinks, max_batch_bytes).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sleep(REPLAY_POLL) => {}
        }
    }
}

/// One look for replay files, each put back into the spool in turn until one waits for room.
async fn replay_pending(
    dead_letters: &DeadLetters,
    spool: &Spool,
    sinks: &[String],
    max_batch_bytes: usize,
) {
    let store = dead_letters.clone();
    let pending = match tokio::task::spawn_blocking(move || store.pending_replays())
        .await
        .expect("listing replays does not panic")
    {
        Ok(pending) => pending,
        Err(e) => {
            warn!(error = %e, "cannot look for dead-letter replays");
            Vec::new()
        }
    };
    for (sink, path) in pending {
        if !sinks.contains(&sink) {
            warn!(sink = %sink, file = %path.display(), "replay file for a sink that is not configured; left in place");
            continue;
        }
        let (store, spool, path2) = (dead_letters.clone(), spool.clone(), path.clone());
        let replayed = tokio::task::spawn_blocking(move || {
            replay_file(&store, &spool, &sink, &path2, max_batch_bytes)
        })
        .await
        .expect("replays do not panic");
        match replayed {
            Ok(Replayed::All(pass)) => {
                info!(count = pass.letters, skipped = pass.skipped, file = %path.display(),
                    "dead letters put back into the spool")
            }
            Ok(Replayed::UntilShareUsed(pass)) => {
                // Every second while the share stays used up: loud only when it moved.
                if pass.letters > 0 || pass.skipped > 0 {
                    info!(count = pass.letters, skipped = pass.skipped, file = %path.display(),
                        "dead letters put back until the replay's share of the spool (spool.replay_share) was used; the rest follow as the sink makes room");
                } else {
                    debug!(file = %path.display(), "the replay's share of the spool is used; the replay waits for room");
                }
                // A later file (perhaps the same sink's newer letters) must not get in first.
                return;
            }
            Err(e) => error!(error = %e, file = %path.display(), "cannot replay dead letters"),
        }
    }
}

/// How far one pass over a replay file got.
enum Replayed {
    /// Every letter left in the file is back in the spool; the file is gone.
    All(LetterCount),
    /// These went back before the spool's used bytes reached the replay's share
    /// (`spool.replay_share`); the file waits for the next pass.
    UntilShareUsed(LetterCount),
}

/// Puts the letters of one replay file back into the spool for `sink`, from where an earlier
/// pass stopped: a batch at a time (up to [`MAX_BATCH`] letters, stopping once they take
/// `max_batch_bytes`), only while the spool stays within the replay's share (replayed letters
/// wait in their file; they must not take the room live events need, nor push out records no
/// sink has delivered), each batch fsynced before the file records it as done, so that a crash
/// can repeat letters but never skip one. Lines that are not dead letters are skipped and kept
/// aside. Blocking.
fn replay_file(
    store: &DeadLetters,
    spool: &Spool,
    sink: &str,
    path: &Path,
    max_batch_bytes: usize,
) -> Result<Replayed, String> {
    let mut letters = store.resume_replay(path).map_err(|e| e.to_string())?;
    let mask = spool.mask(&[sink]);
    let mut batch = RecordBatch::default();
    let mut replayed = 0;
    loop {
        batch.clear();
        // Where the file continues after each letter of the batch, for a batch taken in part.
        let mut after = Vec::with_capacity(MAX_BATCH);
        while after.len() < MAX_BATCH && batch.spool_bytes() < max_batch_bytes as u64 {
            let Some(letter) = letters.next_letter().map_err(|e| e.to_string())? else {
                break;
            };
            batch.push(&letter.event, mask);
            after.push(letters.position());
        }
        if after.is_empty() {
            spool.sync().map_err(|e| e.to_string())?;
            let skipped = letters.skipped();
            store.finish_replay(letters).map_err(|e| e.to_string())?;
            return Ok(Replayed::All(LetterCount {
                letters: replayed,
                skipped,
            }));
        }
        // The first `appended` are in: the replay's share took no more.
        let appended = batch
            .append_replayed(spool)
            .map_err(|e| e.to_string())?
            .appended;
        if appended > 0 {
            spool.sync().map_err(|e| e.to_string())?;
            store
                .replay_done_upto(&mut letters, after[appended - 1])
                .map_err(|e| e.to_string())?;
            replayed += appended;
        }
        if appended < after.len() {
            return Ok(Replayed::UntilShareUsed(LetterCount {
                letters: replayed,
                skipped: letters.kept_aside(),
            }));
        }
    }
}

#[cfg(test)]
mod sync_failure_tests {
    use super::*;

    fn refused() -> Result<(), SpoolError> {
        Err(SpoolError::Io {
            op: "write spool cursor file",
            path: "/spool/sinks.json.tmp".into(),
            error: std::io::Error::from_raw_os_error(28),
        })
    }

    #[test]
    fn a_disk_that_keeps_refusing_is_logged_once_per_period_and_its_end_once() {
        let start = Instant::now();
        let mut failures = SyncFailures::default();
        failures.note(refused(), start);
        for tick in 1..=99 {
            failures.note(refused(), start + Duration::from_millis(100 * tick));
        }
        // 100 failures in 10 s: the first logged, 99 counted since.
        assert_eq!(failures.run.map(|(unlogged, _)| unlogged), Some(99));
        failures.note(refused(), start + Duration::from_secs(10));
        assert_eq!(failures.run, Some((0, start + Duration::from_secs(10))));
        assert_eq!(failures.total, 101);
        failures.note(Ok(()), start + Duration::from_secs(11));
        assert!(!failures.failing());
        assert_eq!(failures.total, 0);
    }

    #[test]
    fn an_io_error_says_what_the_os_said_once() {
        let error = refused().unwrap_err();
        let text = error.to_string();
        assert_eq!(text.matches("os error 28").count(), 1, "{text}");
        assert!(
            std::error::Error::source(&error).is_none(),
            "a chain printed whole would say it twice"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use std::collections::BTreeMap;

    use super::*;
    use crate::memory::ByteGate;
    use crate::route::RouteSpec;
    use crate::spool::{SpoolConfig, WhenFull};
    use crate::status::StatusBoard;
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn a_burst_larger_than_the_spool_gets_every_event_a_place_in_it() {
        // 512 events of about 4 KB waiting at once (one `recv_many`): 2 MB for a 1 MiB spool
        // that drops the oldest. As one batch, its own oldest events were dropped before they
        // had a place in the spool, and `spooled` never reached the number received.
        const EVENTS: u64 = 512;
        let dir = tempfile::tempdir().unwrap();
        let mut config = SpoolConfig::new(dir.path());
        config.max_bytes = 1 << 20;
        config.when_full = WhenFull::DropOldest;
        let spool = Spool::open(config, &["out".to_string()]).unwrap();
        let route = RouteSpec {
            name: "all".into(),
            matches: Default::default(),
            to: vec!["out".into()],
            continue_matching: false,
        };
        let routes = RouteTable::compile(vec![route], &BTreeSet::new(), None).unwrap();
        let (events, received) = mpsc::channel(EVENTS as usize);
        let pad = "x".repeat(4_000);
        for n in 0..EVENTS {
            let data = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
            events
                .try_send(Event::for_test("message.created", "t", &data))
                .unwrap();
        }
        drop(events);
        let stats = Arc::new(PipelineStats::default());
        let (gate, tail) = (ByteGate::new(64 << 20), Tail::new(16 << 20));
        let push_out = Arc::new(PushOut::new(
            DeadLetters::open(dir.path()).unwrap(),
            BTreeMap::new(),
            stats.clone(),
        ));
        let appender = Appender::new(
            spool.clone(),
            tail,
            stats.clone(),
            CancellationToken::new(),
            push_out.clone(),
        );
        let (_switch, feed) = route_switch(IngestTable {
            generation: 0,
            routes,
            push_out,
            sinks: vec!["out".into()],
        });
        let ingest_loop = Ingest::new(received, gate, feed, appender, StatusBoard::new());
        tokio::time::timeout(Duration::from_secs(30), ingest(ingest_loop))
            .await
            .expect("ingest ends once the senders are gone");
        assert_eq!(stats.spooled.load(Ordering::Relaxed), EVENTS);
        assert!(stats.spool_dropped_oldest.load(Ordering::Relaxed) > 0);
    }

    /// A batch of `events` events of about `bytes` bytes each, starting at `first_seq`.
    fn appended(first_seq: u64, events: usize, bytes: usize) -> Arc<Appended> {
        let data = format!(r#"{{"pad":"{}"}}"#, "x".repeat(bytes));
        let event = Arc::new(Event::for_test("message.created", "t", &data));
        Arc::new(Appended {
            first_seq,
            events: vec![event; events],
            masks: vec![SinkMask(1); events],
            end: SpoolPosition {
                segment: 1,
                offset: 0,
            },
        })
    }

    #[test]
    fn the_tail_keeps_the_newest_batches_within_its_bytes() {
        let event_bytes = appended(1, 1, 1000).events[0].memory_bytes();
        // Room for five events of this size.
        let tail = Tail::new(5 * event_bytes);
        assert!(tail.send(appended(1, 2, 1000)));
        assert!(tail.send(appended(3, 2, 1000)));
        assert_eq!(tail.after(0).unwrap().0.first_seq, 1);
        assert_eq!(tail.after(2).unwrap().0.first_seq, 3);
        assert_eq!(tail.after(2).unwrap().1, 2 * event_bytes);
        // Two more events: the oldest batch makes room, whoever took it.
        assert!(tail.send(appended(5, 2, 1000)));
        assert_eq!(tail.after(0).unwrap().0.first_seq, 3, "seqs 1-2 are gone");
        assert!(tail.after(6).is_none(), "nothing kept past seq 6");
        // Larger than the whole tail: not kept, and nothing pushed out for it.
        assert!(!tail.send(appended(7, 6, 1000)));
        assert!(tail.after(6).is_none());
        assert_eq!(tail.after(0).unwrap().0.first_seq, 3);
        // The count bound holds for small batches.
        let tail = Tail::new(usize::MAX);
        for n in 0..2 * TAIL_BATCHES as u64 {
            tail.send(appended(n + 1, 1, 10));
        }
        assert_eq!(tail.after(0).unwrap().0.first_seq, TAIL_BATCHES as u64 + 1);
    }
}
