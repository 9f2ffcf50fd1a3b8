//! The in-memory index of a sink's retry set: for each parked conversation, where its events
//! are in the parked file, in order, and the tries of its first one. The events themselves stay
//! on disk: the index costs about 200 bytes per parked conversation and 16 per event, and a retry
//! reads only the heads it sends.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::file::{LoadedLine, Span};
use crate::backoff::Backoff;
use crate::delivery::retry::RetrySettings;
use crate::delivery::waves::Tries;

/// Bounds the bytes of a sink's parked events. Past it, the sink parks no new conversation and
/// takes no new events from the spool until retries make room: it then lags like a sink whose
/// destination is down, and the spool's own bound applies. Parking may go past it by the batch
/// being settled.
pub(crate) const MAX_PARKED_BYTES: u64 = 64 << 20;

/// Bounds the events in a sink's retry set, as [`MAX_PARKED_BYTES`] does their bytes: bounds
/// the index in memory, about 200 bytes per parked conversation and 16 per event (4 MB when
/// every event is a conversation of its own). With events of a typical 1.3 KB this bound is
/// reached before the byte bound.
pub(crate) const MAX_PARKED_EVENTS: usize = 20_000;

/// Which queue of the retry set an event waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum ParkKey {
    /// The events of one conversation, `(account, conversation)`, in order.
    Conversation(u64, u64),
    /// An event without a conversation, alone (numbered in this run).
    Alone(u64),
}

/// The events of one parked conversation, oldest first.
#[derive(Debug, Default)]
struct Queue {
    /// Where each is in the parked file.
    spans: VecDeque<Span>,
    /// The first one's tries in this run; `None`: as its line says.
    head: Option<Tries>,
}

/// What a retry wave sends: the first event of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    /// Its queue.
    pub(super) key: ParkKey,
    /// Where it is in the parked file.
    pub(super) span: Span,
}

/// A sink's retry set.
#[derive(Debug)]
pub(crate) struct ParkedSet {
    /// The parked conversations.
    queues: BTreeMap<ParkKey, Queue>,
    /// The number of the next [`ParkKey::Alone`].
    next_alone: u64,
    /// The parked file's length: where the next line goes.
    file_bytes: u64,
    /// Bytes of the events still parked; the rest of the file is lines already finished.
    live_bytes: u64,
    /// Events still parked.
    live_events: usize,
    /// The delays between retry passes: the sink's own backoff.
    backoff: Backoff,
    /// When the next retry pass is due; `None` while nothing is parked.
    next_pass: Option<Instant>,
}

impl ParkedSet {
    /// An empty set, retried with `retry`'s backoff.
    pub(crate) fn new(retry: &RetrySettings) -> ParkedSet {
        ParkedSet {
            queues: BTreeMap::new(),
            next_alone: 0,
            file_bytes: 0,
            live_bytes: 0,
            live_events: 0,
            backoff: Backoff::new(retry.initial, retry.max),
            next_pass: None,
        }
    }

    /// The set as the parked file holds it (`lines`, `file_bytes` long), retried at once.
    pub(super) fn adopt(&mut self, lines: Vec<LoadedLine>, file_bytes: u64) {
        for line in lines {
            let key = line
                .keys
                .conversation_id
                .map(|c| (line.keys.account_id.unwrap_or(0), c));
            self.push(key, line.span);
        }
        self.file_bytes = file_bytes;
        if !self.is_empty() {
            self.next_pass = Some(Instant::now());
        }
    }

    /// Events parked.
    pub(crate) fn len(&self) -> usize {
        self.live_events
    }

    /// Whether nothing is parked.
    pub(crate) fn is_empty(&self) -> bool {
        self.live_events == 0
    }

    /// Whether the set is at its bounds: no new conversation is parked, no new event taken.
    pub(crate) fn is_full(&self) -> bool {
        self.live_bytes >= MAX_PARKED_BYTES || self.live_events >= MAX_PARKED_EVENTS
    }

    /// Whether conversation `key` is parked: its new events must wait behind it.
    pub(super) fn holds(&self, key: (u64, u64)) -> bool {
        self.queues
            .contains_key(&ParkKey::Conversation(key.0, key.1))
    }

    /// Where the next line goes.
    pub(super) fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// An event of conversation `key` (`None`: of none) was appended to the file as a line of
    /// `len` bytes: it waits behind the ones parked before it. Schedules a retry pass if none
    /// is.
    pub(super) fn parked(&mut self, key: Option<(u64, u64)>, len: u64) -> ParkKey {
        let span = Span {
            offset: self.file_bytes,
            len,
        };
        self.file_bytes += len;
        let key = self.push(key, span);
        if self.next_pass.is_none() {
            self.next_pass = Some(Instant::now() + self.backoff.next_delay());
        }
        key
    }

    fn push(&mut self, key: Option<(u64, u64)>, span: Span) -> ParkKey {
        let key = match key {
            Some((account, conversation)) => ParkKey::Conversation(account, conversation),
            None => {
                self.next_alone += 1;
                ParkKey::Alone(self.next_alone)
            }
        };
        self.queues.entry(key).or_default().spans.push_back(span);
        self.live_bytes += span.len;
        self.live_events += 1;
        key
    }

    /// The next wave of a retry pass: the first event of each conversation not in `failed`,
    /// up to `max_events` and, past the first, `max_bytes` of lines.
    pub(super) fn wave(
        &self,
        failed: &HashSet<ParkKey>,
        max_events: usize,
        max_bytes: u64,
    ) -> Vec<Head> {
        let mut wave = Vec::new();
        let mut bytes = 0;
        for (key, queue) in &self.queues {
            let Some(&span) = queue.spans.front() else {
                continue;
            };
            if failed.contains(key) {
                continue;
            }
            if wave.len() == max_events || (!wave.is_empty() && bytes + span.len > max_bytes) {
                break;
            }
            bytes += span.len;
            wave.push(Head { key: *key, span });
        }
        wave
    }

    /// The tries of `key`'s first event in this run, if it was tried.
    pub(super) fn head_tries(&self, key: ParkKey) -> Option<Tries> {
        self.queues.get(&key).and_then(|q| q.head.clone())
    }

    /// `key`'s first event was tried and failed again.
    pub(super) fn tried(&mut self, key: ParkKey, tries: Tries) {
        if let Some(queue) = self.queues.get_mut(&key) {
            queue.head = Some(tries);
        }
    }

    /// `key`'s first event is finished (delivered, dead-lettered or unreadable): the next one
    /// goes. Returns whether that was its last: the conversation is no longer parked.
    pub(super) fn finish_head(&mut self, key: ParkKey) -> bool {
        let Some(queue) = self.queues.get_mut(&key) else {
            return false;
        };
        if let Some(span) = queue.spans.pop_front() {
            self.live_bytes -= span.len;
            self.live_events -= 1;
        }
        queue.head = None;
        let emptied = queue.spans.is_empty();
        if emptied {
            self.queues.remove(&key);
        }
        if self.is_empty() {
            self.next_pass = None;
            self.backoff.reset();
        }
        emptied
    }

    /// Whether the file should be rewritten without its finished lines: when nothing is
    /// parked any more (the file goes), or when they take as much as the parked ones (so each
    /// byte is rewritten a bounded number of times), or, if `any`, whenever it has some.
    pub(super) fn wants_compaction(&self, any: bool) -> bool {
        let finished = self.file_bytes - self.live_bytes;
        finished > 0 && (any || self.is_empty() || finished >= self.live_bytes)
    }

    /// Where every parked event is in the file, in file order: what a rewrite keeps.
    pub(super) fn live_spans(&self) -> Vec<Span> {
        let mut spans: Vec<Span> = self
            .queues
            .values()
            .flat_map(|q| q.spans.iter().copied())
            .collect();
        spans.sort_by_key(|s| s.offset);
        spans
    }

    /// The file was rewritten with only the lines at `before` (from [`ParkedSet::live_spans`]),
    /// which are now at `after`.
    pub(super) fn compacted(&mut self, before: &[Span], after: &[Span]) {
        let moved: BTreeMap<u64, Span> = before
            .iter()
            .map(|s| s.offset)
            .zip(after.iter().copied())
            .collect();
        for queue in self.queues.values_mut() {
            for span in &mut queue.spans {
                if let Some(&after) = moved.get(&span.offset) {
                    *span = after;
                }
            }
        }
        self.file_bytes = self.live_bytes;
    }

    /// A retry pass ended: the next is due at once if it stopped with work left (`more`),
    /// else after the backoff (which starts over after a pass that got something through) or
    /// the wait a destination asked for, whichever is longer.
    pub(super) fn pass_ended(&mut self, more: bool, progressed: bool, retry_after: Duration) {
        if self.is_empty() {
            self.next_pass = None;
            return;
        }
        if more {
            self.next_pass = Some(Instant::now());
            return;
        }
        if progressed {
            self.backoff.reset();
        }
        let delay = self.backoff.next_delay().max(retry_after);
        self.next_pass = Some(Instant::now() + delay);
    }

    /// When the next retry pass is due; `None` while nothing is parked.
    pub(crate) fn next_pass(&self) -> Option<Instant> {
        self.next_pass
    }

    /// Whether a retry pass is due now.
    pub(crate) fn is_due(&self) -> bool {
        self.next_pass.is_some_and(|at| at <= Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RetrySettings {
        RetrySettings {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(20),
            ..RetrySettings::default()
        }
    }

    #[test]
    fn conversations_wait_in_order_and_leave_when_empty() {
        let mut set = ParkedSet::new(&settings());
        assert!(set.next_pass().is_none());
        let a = set.parked(Some((1, 7)), 100);
        let alone = set.parked(None, 50);
        set.parked(Some((1, 7)), 30);
        let b = set.parked(Some((1, 8)), 40);
        assert_eq!((set.len(), set.file_bytes()), (4, 220));
        assert!(set.next_pass().is_some(), "a pass is scheduled");
        assert!(set.holds((1, 7)) && set.holds((1, 8)) && !set.holds((1, 9)));

        let heads = |set: &ParkedSet, failed: &HashSet<ParkKey>| -> Vec<u64> {
            set.wave(failed, 10, 1 << 20)
                .iter()
                .map(|h| h.span.offset)
                .collect()
        };
        // One event per conversation, the first; the lone event on its own.
        assert_eq!(heads(&set, &HashSet::new()), [0, 180, 100]);
        assert_eq!(heads(&set, &HashSet::from([a])), [180, 100]);
        // The byte bound stops a wave, but never before its first event.
        assert_eq!(set.wave(&HashSet::new(), 10, 10).len(), 1);
        assert_eq!(set.wave(&HashSet::new(), 2, 1 << 20).len(), 2);

        assert!(!set.finish_head(a), "its second event is next");
        assert_eq!(heads(&set, &HashSet::new()), [150, 180, 100]);
        assert!(
            !set.wants_compaction(false),
            "100 bytes finished, 120 parked: not yet"
        );
        assert!(set.wants_compaction(true), "as the loop stops");
        assert!(set.finish_head(a), "unparked");
        assert!(!set.holds((1, 7)));
        assert!(set.finish_head(alone));
        set.parked(Some((1, 8)), 10);
        assert!(set.wants_compaction(false), "180 bytes finished, 50 parked");

        let before = set.live_spans();
        assert_eq!(
            before.iter().map(|s| s.offset).collect::<Vec<_>>(),
            [180, 220]
        );
        let after = [
            Span { offset: 0, len: 40 },
            Span {
                offset: 40,
                len: 10,
            },
        ];
        set.compacted(&before, &after);
        assert_eq!(set.file_bytes(), 50);
        assert_eq!(heads(&set, &HashSet::new()), [0]);
        assert!(!set.finish_head(b));
        assert!(set.finish_head(b));
        assert!(set.is_empty() && set.next_pass().is_none());
        assert!(set.wants_compaction(false), "the file goes");
    }

    #[test]
    fn the_set_is_full_at_its_byte_bound() {
        let mut set = ParkedSet::new(&settings());
        set.parked(Some((1, 1)), MAX_PARKED_BYTES - 1);
        assert!(!set.is_full());
        set.parked(Some((1, 2)), 1);
        assert!(set.is_full());
    }

    #[test]
    fn passes_are_scheduled_by_the_backoff() {
        let mut set = ParkedSet::new(&settings());
        set.parked(Some((1, 1)), 10);
        set.pass_ended(true, false, Duration::ZERO);
        assert!(set.is_due(), "work left: at once");
        set.pass_ended(false, false, Duration::from_secs(60));
        let wait = set.next_pass().unwrap() - Instant::now();
        assert!(
            wait > Duration::from_secs(59),
            "the destination's Retry-After: {wait:?}"
        );
        set.pass_ended(false, true, Duration::ZERO);
        let wait = set.next_pass().unwrap() - Instant::now();
        assert!(
            wait <= Duration::from_millis(10),
            "the backoff started over: {wait:?}"
        );
    }
}
