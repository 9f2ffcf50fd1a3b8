//! Spool pressure (`when_full: dead_letter`): when an append does not fit, the spool's oldest
//! segment is pushed out, and each of its events that a sink has not delivered goes to THAT
//! sink's dead letters first. A sink that keeps up has committed past the oldest segment and
//! loses nothing; the sink that lags pays alone, and nothing is dropped.
//!
//! ```text
//! ingest ──append──▶ spool: no room ──▶ evict_oldest ──records per lagging sink──▶ dead letters
//!    ▲                                                     (fsynced) ──▶ finish: segment deleted
//!    └──────────────── append again ◀──────────────────────────────────────────────┘
//! ```
//! The copies go to the sink's local dead-letter file even when it has a `dead_letter:` sink:
//! putting them back into a spool that is out of room would take the room just made. Each copy
//! is the event as the sink would have been given it (its redaction applied), with
//! [`PUSHED_OUT`] as its error and 0 attempts (the ingest does not know how often the sink
//! tried). The copies are fsynced, and the folder too, before the segment is deleted: a crash
//! in between stores them again at the next eviction (duplicates in the dead letters), never
//! loses them. When they cannot be stored (disk full), the segment stays and the append fails
//! like any failed append: the ingest retries and holds the sockets back meanwhile.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, error};

use super::dead_letter::{DeadLetter, DeadLetterError, DeadLetters};
use super::stats::PipelineStats;
use crate::event::Event;
use crate::route::redact::Redaction;
use crate::spool::{Spool, SpoolError};
use crate::status::SinkReporter;

/// The error of a dead letter pushed out of a full spool: what `dlq list` shows, and how such a
/// letter is told apart ([`DeadLetter::pushed_out_by_spool_pressure`]).
pub const PUSHED_OUT: &str =
    "pushed out of the spool by spool pressure (spool.max_bytes) before this sink delivered it";

/// Bounds the pushed-out events held in memory before they are written (event data, summed over
/// sinks): a segment of up to 64 MiB is pushed out in pieces of about this size.
const BUFFER_BYTES: usize = 4 << 20;

impl DeadLetter {
    /// Whether this letter was pushed out of a full spool rather than given up by its sink.
    pub fn pushed_out_by_spool_pressure(&self) -> bool {
        self.error == PUSHED_OUT
    }
}

/// Why the oldest segment could not be pushed out (or a batch appended after it).
#[derive(Debug, thiserror::Error)]
pub(crate) enum PushOutError {
    /// The spool failed: appending, reading the segment, or deleting it.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The copies could not be stored: the segment stays, and nothing is appended until this
    /// works.
    #[error("cannot store the events pushed out of the full spool in their sinks' dead letters, so the oldest segment stays: {0}")]
    DeadLetters(#[from] DeadLetterError),
    /// Full, and nothing to push out: only a batch larger than the whole spool gets here.
    #[error(
        "the spool is full and holds nothing to push out (a batch larger than spool.max_bytes)"
    )]
    NothingToPushOut,
}

/// What the push-out needs of one configured sink.
#[derive(Debug, Clone)]
pub(crate) struct PressureSink {
    /// What the sink may not see: its dead letters hold the event as it would have got it.
    pub(crate) redaction: Redaction,
    /// Its cell on the status board, where its pushed-out events are counted.
    pub(crate) status: SinkReporter,
}

/// Makes room in a full spool by pushing its oldest segment out to the dead letters of the
/// sinks that had not delivered it.
#[derive(Debug)]
pub(crate) struct PushOut {
    /// Where the copies go: each sink's local dead-letter file.
    dead_letters: DeadLetters,
    /// Every configured sink, by name.
    sinks: BTreeMap<String, PressureSink>,
    /// The pipeline's counters: pushed-out copies, undecodable records.
    stats: Arc<PipelineStats>,
}

/// Copies waiting to be written, per sink.
#[derive(Default)]
struct Pending {
    /// The letters of each sink, in spool order.
    letters: BTreeMap<String, Vec<DeadLetter>>,
    /// Their event data, in bytes, for [`BUFFER_BYTES`].
    bytes: usize,
    /// Letters written so far, per sink: the eviction's log line and counters.
    stored: BTreeMap<String, u64>,
}

impl PushOut {
    /// A push-out into `dead_letters` for the configured `sinks`.
    pub(crate) fn new(
        dead_letters: DeadLetters,
        sinks: BTreeMap<String, PressureSink>,
        stats: Arc<PipelineStats>,
    ) -> PushOut {
        PushOut {
            dead_letters,
            sinks,
            stats,
        }
    }

    /// Pushes the spool's oldest segment out: every event in it that a sink has not committed
    /// goes to that sink's dead letters, durably, then the segment is deleted. Blocking.
    pub(crate) fn push_out_oldest(&self, spool: &Spool) -> Result<(), PushOutError> {
        let started = Instant::now();
        let Some(mut eviction) = spool.evict_oldest()? else {
            return Err(PushOutError::NothingToPushOut);
        };
        let now = SystemTime::now();
        let mut pending = Pending::default();
        while let Some(record) = eviction.next_record()? {
            let event = match Event::decode_record(record.payload) {
                Ok(event) => Arc::new(event),
                Err(e) => {
                    // Written by this program and CRC-checked: only a version mismatch gets
                    // here, and no sink could have delivered it either.
                    error!(seq = record.seq, error = %e, "skipped a spool record that cannot be decoded while pushing it out");
                    self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            for sink in &record.sinks {
                pending.add(sink, self.letter(sink, &event, now));
            }
            if pending.bytes >= BUFFER_BYTES {
                self.store(&mut pending)?;
            }
        }
        // Each append fsyncs its lines, and the folder when it created the file.
        self.store(&mut pending)?;
        let segment = eviction.segment();
        let freed_bytes = eviction.finish()?;
        report(segment, freed_bytes, &pending.stored, started.elapsed());
        Ok(())
    }

    /// The dead letter of `event` for `sink`, as the sink would have been given it.
    fn letter(&self, sink: &str, event: &Arc<Event>, now: SystemTime) -> DeadLetter {
        let event = match self.sinks.get(sink) {
            Some(settings) => settings.redaction.redacted(sink, event.clone()),
            None => event.clone(),
        };
        DeadLetter {
            first_attempt: event.received_at,
            event: Event::clone(&event),
            error: PUSHED_OUT.to_owned(),
            attempts: 0,
            last_attempt: now,
        }
    }

    /// Writes (and fsyncs) every pending letter and counts them per sink.
    fn store(&self, pending: &mut Pending) -> Result<(), DeadLetterError> {
        while let Some((sink, letters)) = pending.letters.pop_first() {
            if let Err(e) = self.dead_letters.append(&sink, &letters) {
                pending.letters.insert(sink, letters);
                return Err(e);
            }
            let count = letters.len() as u64;
            self.stats
                .spool_pushed_out
                .fetch_add(count, Ordering::Relaxed);
            if let Some(settings) = self.sinks.get(&sink) {
                settings.status.pushed_out(count);
            }
            *pending.stored.entry(sink).or_default() += count;
        }
        pending.bytes = 0;
        Ok(())
    }
}

impl Pending {
    /// Queues `letter` for `sink`.
    fn add(&mut self, sink: &str, letter: DeadLetter) {
        self.bytes += letter.event.data.get().len();
        match self.letters.get_mut(sink) {
            Some(letters) => letters.push(letter),
            None => {
                self.letters.insert(sink.to_owned(), vec![letter]);
            }
        }
    }
}

/// Says, once per eviction, what it cost each sink: loudly when a sink paid.
fn report(segment: u64, freed_bytes: u64, stored: &BTreeMap<String, u64>, took: Duration) {
    if stored.is_empty() {
        debug!(
            segment,
            freed_bytes,
            ?took,
            "spool full: deleted its oldest segment, which every sink had delivered"
        );
        return;
    }
    let per_sink = stored
        .iter()
        .map(|(sink, count)| format!("{sink}={count}"))
        .collect::<Vec<_>>()
        .join(", ");
    let events: u64 = stored.values().sum();
    error!(segment, freed_bytes, events, sinks = %per_sink, ?took,
        "spool full (spool.max_bytes): pushed its oldest segment out; the events in it that these sinks had not delivered went to their dead letters (when_full: dead_letter)");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::ingest::{append_making_room, RecordBatch};
    use crate::spool::{SpoolConfig, WhenFull};
    use crate::status::StatusBoard;

    /// A spool of about 40 events of 300 bytes in segments of about ten, for "fast" and "slow",
    /// and a push-out into its dead letters.
    fn setup(dir: &std::path::Path) -> (Spool, PushOut, StatusBoard, Arc<PipelineStats>) {
        let mut config = SpoolConfig::new(dir);
        config.max_bytes = 40 * 400;
        config.segment_bytes = 10 * 400;
        config.when_full = WhenFull::DeadLetter;
        let spool = Spool::open(config, &["fast".to_string(), "slow".to_string()]).unwrap();
        let board = StatusBoard::new();
        let stats = Arc::new(PipelineStats::default());
        let sinks = ["fast", "slow"]
            .map(|name| {
                let sink = PressureSink {
                    redaction: Redaction::default(),
                    status: board.register_sink(name),
                };
                (name.to_string(), sink)
            })
            .into_iter()
            .collect();
        let dead_letters = DeadLetters::open(dir).unwrap();
        let push_out = PushOut::new(dead_letters, sinks, stats.clone());
        (spool, push_out, board, stats)
    }

    /// Appends events numbered `from..to`, one append each (so segments roll as they fill).
    fn append(spool: &Spool, from: u32, to: u32) {
        let mask = spool.mask(&["fast", "slow"]);
        for n in from..to {
            let data = format!(
                r#"{{"n":{n},"contact":{{"pubsub_token":"secret"}},"pad":"{:200}"}}"#,
                ""
            );
            let mut record = Vec::new();
            Event::for_test("message.created", "agent", &data).encode_record(&mut record);
            let report = spool.append(&[(record.as_slice(), mask)]).unwrap();
            assert_eq!(report.appended, 1);
        }
    }

    /// The `n` in each letter's data.
    fn numbers(letters: &[DeadLetter]) -> Vec<u64> {
        letters
            .iter()
            .map(|l| {
                let data: serde_json::Value = serde_json::from_str(l.event.data.get()).unwrap();
                data["n"].as_u64().unwrap()
            })
            .collect()
    }

    #[test]
    fn the_lagging_sink_gets_its_oldest_events_as_dead_letters_and_the_other_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, push_out, board, stats) = setup(dir.path());
        append(&spool, 0, 30);
        let mut fast = spool.reader("fast").unwrap();
        let mut read = 0;
        while let Some(last) = fast.read_batch(100).unwrap().last() {
            read = last.0;
        }
        fast.commit(read).unwrap();

        push_out.push_out_oldest(&spool).unwrap();

        let dead_letters = DeadLetters::open(dir.path()).unwrap();
        let letters = dead_letters.list("slow").unwrap();
        let pushed = letters.len() as u64;
        assert!(pushed > 0);
        assert_eq!(
            numbers(&letters),
            (0..pushed).collect::<Vec<_>>(),
            "the oldest, in order"
        );
        assert!(letters.iter().all(|l| l.pushed_out_by_spool_pressure()));
        assert!(letters.iter().all(|l| l.error.contains("spool.max_bytes")));
        assert!(
            !letters[0].event.data.get().contains("secret"),
            "redacted as the sink would have got it"
        );
        assert!(dead_letters.list("fast").unwrap().is_empty());
        assert_eq!(stats.spool_pushed_out.load(Ordering::Relaxed), pushed);
        assert_eq!(board.sink("slow").unwrap().pushed_out, pushed);
        assert_eq!(board.sink("fast").unwrap().pushed_out, 0);

        // The slow sink goes on exactly after them.
        let mut slow = spool.reader("slow").unwrap();
        let first = slow.read_batch(1).unwrap();
        let event = Event::decode_record(&first[0].1).unwrap();
        assert!(event.data.get().starts_with(&format!(r#"{{"n":{pushed},"#)));
    }

    #[test]
    fn when_the_letters_cannot_be_written_the_segment_stays_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, push_out, board, _) = setup(dir.path());
        append(&spool, 0, 30);
        let blocked = dir.path().join("dead-letters/slow.jsonl");
        // A folder where the file goes: the append fails (as on a full disk), whoever we are.
        std::fs::create_dir(&blocked).unwrap();
        let err = push_out.push_out_oldest(&spool).unwrap_err();
        assert!(matches!(err, PushOutError::DeadLetters(_)), "{err}");
        assert!(
            err.to_string().contains("the oldest segment stays"),
            "{err}"
        );
        let mut slow = spool.reader("slow").unwrap();
        let first = slow.read_batch(1).unwrap();
        assert_eq!(first[0].0, 1, "nothing was deleted");
        drop(slow);

        std::fs::remove_dir(&blocked).unwrap();
        push_out.push_out_oldest(&spool).unwrap();
        let dead_letters = DeadLetters::open(dir.path()).unwrap();
        let slow_letters = numbers(&dead_letters.list("slow").unwrap());
        let fast_letters = numbers(&dead_letters.list("fast").unwrap());
        let segment: Vec<u64> = (0..slow_letters.len() as u64).collect();
        assert_eq!(slow_letters, segment, "neither had delivered them");
        // "fast" was stored before "slow" failed, and again with it: repeated, never lost.
        assert_eq!(fast_letters, [segment.clone(), segment].concat());
        assert_eq!(
            board.sink("fast").unwrap().pushed_out,
            fast_letters.len() as u64,
            "the count is what the file holds"
        );
    }

    #[test]
    fn a_full_spool_makes_room_for_an_append_by_pushing_out() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, push_out, _, stats) = setup(dir.path());
        append(&spool, 0, 30);
        let mut batch = RecordBatch::default();
        let mask = spool.mask(&["slow"]);
        for n in 0..25 {
            let data = format!(r#"{{"n":{n},"pad":"{:250}"}}"#, "");
            batch.push(&Event::for_test("message.created", "agent", &data), mask);
        }
        let as_is = batch.append_to(&spool).unwrap();
        assert_eq!((as_is.appended, as_is.awaiting_room), (0, 25));
        let mut woken = 0;
        let report = append_making_room(&batch, &spool, &push_out, |_| woken += 1).unwrap();
        assert_eq!((report.appended, report.awaiting_room, woken), (25, 0, 1));
        assert!(stats.spool_pushed_out.load(Ordering::Relaxed) > 0);
    }
}
