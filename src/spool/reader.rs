//! One sink's reading: its own file handle and read position, what it holds in flight, and its
//! commits (which move the shared cursor, reclaim segments and persist cursors when due).

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, MutexGuard};

use tokio::sync::watch;
use tracing::{error, warn};

use super::error::SpoolError;
use super::format::{segment_path, Next, SegmentCursor};
use super::registry::write_state_file;
use super::state::State;
use super::{Inner, SinkMask, SpoolPosition, WhenFull};

/// One sink's view of the spool: its own file handle and read position.
pub struct SpoolReader {
    /// The spool it reads.
    inner: Arc<Inner>,
    /// Its entry in the registry (indices are fixed while the spool is open).
    index: usize,
    /// Its mask bit.
    bit: u64,
    /// For logs.
    name: String,
    /// Last seq examined (whichever sinks it was for): reading resumes after it.
    pos: u64,
    /// The segment being read; `None` to look it up again from `pos`.
    cursor: Option<SegmentCursor>,
    /// Seqs returned by `read_batch` or taken by `take_appended` and not committed yet, oldest
    /// first, so that a commit knows how many records it finishes (for the backlog) and whether
    /// the cursor may jump to `pos`.
    /// Bounded by what the caller holds in flight, not by the backlog.
    in_flight: VecDeque<u64>,
    /// `pos + 1` at the last read: `wait_for_data` waits until the spool's end passes it.
    seen_end: u64,
    /// Tells of appends.
    appended: watch::Receiver<u64>,
    /// Payload buffer for records of other sinks, reused.
    scratch: Vec<u8>,
    /// Where the file continues after records taken in memory (`take_appended`): the segment
    /// cursor jumps there instead of reading them again.
    resume_at: Option<SpoolPosition>,
}

/// Where to read next, as decided under the lock.
struct View {
    /// Path of the segment to read.
    path: PathBuf,
    /// Its base seq.
    base: u64,
    /// Bytes written to it so far.
    limit: u64,
    /// Whether a newer segment exists (then this one is complete).
    sealed: bool,
    /// Seq just past its last record.
    end: u64,
}

/// Bounds the buffer kept for reading other sinks' records between reads: a larger one (a
/// large record was read into it) is let go, not kept for the life of the reader.
const SCRATCH_KEPT_BYTES: usize = 64 * 1024;

/// One pass of [`SpoolReader::advance`]: how far it may go, and what it passed so far.
struct Pass<'a> {
    /// Most of this sink's records to pass.
    max_records: u64,
    /// Bytes of payload collected at which the pass stops (the record that reaches it is the
    /// last one).
    max_bytes: usize,
    /// Records past this seq are left for later.
    stop_after: u64,
    /// This sink's records passed so far.
    mine: u64,
    /// Bytes of payload collected into `out` so far.
    bytes: usize,
    /// Where this sink's records are collected, when they are (a commit only passes them).
    out: Option<&'a mut Vec<(u64, Vec<u8>)>>,
}

impl Pass<'_> {
    /// Whether it passed as many records, or collected as many bytes, as it may.
    fn full(&self) -> bool {
        self.mine >= self.max_records || self.bytes >= self.max_bytes
    }
}

/// How reading one segment ended.
enum SegmentRead {
    /// At a record past the caller's stop point.
    Stopped,
    /// With as many of this sink's records as the caller asked for.
    Filled,
    /// At the end of what was written to it, or at an unreadable rest of a sealed segment.
    Exhausted,
}

impl SpoolReader {
    /// A reader for the sink at `index` in the registry, positioned after `committed`.
    pub(super) fn new(
        inner: Arc<Inner>,
        index: usize,
        bit: u8,
        name: &str,
        committed: u64,
    ) -> SpoolReader {
        let appended = inner.appended.subscribe();
        SpoolReader {
            inner,
            index,
            bit: 1 << bit,
            name: name.to_string(),
            pos: committed,
            cursor: None,
            in_flight: VecDeque::new(),
            seen_end: committed + 1,
            appended,
            scratch: Vec::new(),
            resume_at: None,
        }
    }

    /// Up to `max` records of this sink after the read position, in order, as (seq, payload).
    /// Empty when caught up. If `DropOldest` deleted records ahead of the position, it skips to
    /// the oldest kept record (the loss is counted in the sink's registry entry, persisted); so
    /// it does past records pushed out to the dead letters ([`super::Eviction`]).
    pub fn read_batch(&mut self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        self.read_batch_within(max, usize::MAX)
    }

    /// [`SpoolReader::read_batch`], stopping also once the payloads read hold `max_bytes`: the
    /// record that reaches it is the last one, so a read holds less than `max_bytes` plus one
    /// record, and a record larger than `max_bytes` is read alone.
    pub fn read_batch_within(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        if self.caught_up() {
            // Nothing was appended past the position: no file to look at.
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(max.min(1024));
        let pos0 = self.pos;
        let flight0 = self.in_flight.len();
        let mut pass = Pass {
            max_records: max as u64,
            max_bytes,
            stop_after: u64::MAX,
            mine: 0,
            bytes: 0,
            out: Some(&mut out),
        };
        let advanced = self.advance(&mut pass);
        if self.scratch.capacity() > SCRATCH_KEPT_BYTES {
            // A large record of another sink: its buffer is not kept for the life of the reader.
            self.scratch = Vec::new();
        }
        match advanced {
            Ok(()) => {}
            Err(e) => {
                // Nothing of this call counts as read, so nothing is skipped on the next one.
                self.pos = pos0;
                self.in_flight.truncate(flight0);
                self.cursor = None;
                self.resume_at = None;
                return Err(e);
            }
        }
        self.seen_end = self.pos + 1;
        if self.in_flight.is_empty() {
            // Everything of ours up to pos is done, so the cursor can move past records that were
            // for other sinks: a sink that is routed little must not hold back reclaiming.
            let mut state = self.inner.lock();
            if state.sinks[self.index].committed < self.pos {
                state.sinks[self.index].committed = self.pos;
                self.after_commit(state)?;
            }
        }
        Ok(out)
    }

    /// The last seq this reader has passed (returned, taken in memory, or skipped as another
    /// sink's).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Whether every record appended so far has been passed.
    pub fn caught_up(&self) -> bool {
        *self.appended.borrow() <= self.pos + 1
    }

    /// Takes records that the caller received in memory from the appender instead of reading
    /// them: `masks` are the sink masks of the records appended from `first_seq` on, and `end`
    /// the [`AppendReport::end`](super::AppendReport::end) of that append. Records up to the position are passed over
    /// (already read); the rest are tracked exactly as `read_batch` would have returned them.
    /// Returns the indices into `masks` of this sink's records, or `None` (nothing taken) when
    /// the records do not continue from the position: the ones in between must be read first.
    pub fn take_appended(
        &mut self,
        first_seq: u64,
        masks: &[SinkMask],
        end: SpoolPosition,
    ) -> Option<Vec<usize>> {
        let next = self.pos + 1;
        if first_seq > next {
            return None;
        }
        let skip = (next - first_seq) as usize;
        if skip >= masks.len() {
            return Some(Vec::new());
        }
        let mine: Vec<usize> = (skip..masks.len())
            .filter(|&i| masks[i].0 & self.bit != 0)
            .collect();
        self.in_flight
            .extend(mine.iter().map(|&i| first_seq + i as u64));
        self.pos = first_seq + masks.len() as u64 - 1;
        self.seen_end = self.pos + 1;
        if self.cursor.as_ref().is_some_and(|c| c.base != end.segment) {
            // The file continues in another segment: open that one (and jump) when next read,
            // instead of reading the rest of this one again.
            self.cursor = None;
        }
        self.resume_at = Some(end);
        Some(mine)
    }

    /// Resolves when records were appended after the last read (possibly for other sinks; the
    /// next `read_batch` may then be empty). Cancel-safe.
    pub async fn wait_for_data(&mut self) {
        loop {
            if *self.appended.borrow_and_update() > self.seen_end {
                return;
            }
            if self.appended.changed().await.is_err() {
                // The spool is gone; nothing will ever be appended.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Every record of this sink with seq <= `upto` is done (delivered or dead-lettered).
    /// Persisted lazily; lets fully consumed segments be deleted. `upto` may be past what was
    /// read: the records in between are then skipped.
    pub fn commit(&mut self, upto: u64) -> Result<(), SpoolError> {
        let last = self.inner.lock().next_seq - 1;
        let upto = upto.min(last);
        let mut done = 0u64;
        if upto > self.pos {
            let mut pass = Pass {
                max_records: u64::MAX,
                max_bytes: usize::MAX,
                stop_after: upto,
                mine: 0,
                bytes: 0,
                out: None,
            };
            self.advance(&mut pass)?;
            done += pass.mine;
            self.pos = self.pos.max(upto);
            self.seen_end = self.pos + 1;
        }
        // Counted under the lock that takes them off the backlog: records below the oldest
        // segment came off it when their segment was pushed out or dropped, which may have
        // happened a moment ago.
        let mut state = self.inner.lock();
        let oldest = state.oldest_base();
        while let Some(&seq) = self.in_flight.front() {
            if seq > upto {
                break;
            }
            self.in_flight.pop_front();
            done += u64::from(seq >= oldest);
        }
        let new_committed = if self.in_flight.is_empty() {
            self.pos.max(upto)
        } else {
            upto
        };
        let sink = &mut state.sinks[self.index];
        if new_committed <= sink.committed && done == 0 {
            return Ok(());
        }
        sink.committed = sink.committed.max(new_committed);
        sink.pending = sink.pending.saturating_sub(done);
        self.after_commit(state)
    }

    /// Moves the read position back to just after the committed cursor, so uncommitted records
    /// are read again.
    #[cfg(test)]
    pub(crate) fn rewind(&mut self) -> Result<(), SpoolError> {
        let state = self.inner.lock();
        self.pos = state.sinks[self.index].committed;
        drop(state);
        self.in_flight.clear();
        self.cursor = None;
        // Records taken in memory past the new position must be read from the file now.
        self.resume_at = None;
        self.seen_end = self.pos + 1;
        Ok(())
    }

    /// Records of this sink deleted by `DropOldest` before it committed them, in total.
    #[cfg(test)]
    pub(crate) fn lost(&self) -> u64 {
        self.inner.lock().sinks[self.index].lost
    }

    /// The sink this reader reads for.
    pub fn sink(&self) -> &str {
        &self.name
    }

    /// Persists cursors when due, and deletes segments nobody needs any more. The cursor file is
    /// written after the state lock is released: its fsync must not hold up appends and reads.
    /// If another thread is writing it right now, this one skips (it stays due).
    fn after_commit(&self, mut state: MutexGuard<'_, State>) -> Result<(), SpoolError> {
        state.dirty_commits += 1;
        state.reclaim(&self.inner.config.dir)?;
        if state.persist_due() {
            if let Ok(_persisting) = self.inner.persisting.try_lock() {
                let json = state.snapshot(&self.inner.config.dir)?;
                drop(state);
                write_state_file(&self.inner.config.dir, &json)?;
            }
        }
        Ok(())
    }

    /// Where to read next; `None` when caught up. Handles segments deleted under the reader.
    fn view(&mut self) -> View {
        let state = self.inner.lock();
        let oldest = state.oldest_base();
        if self.pos + 1 < oldest {
            if self.inner.config.when_full == WhenFull::DeadLetter {
                warn!(sink = %self.name, from = self.pos + 1, to = oldest,
                    "records were pushed out of the full spool into this sink's dead letters before it delivered them; going on after them");
            } else {
                warn!(sink = %self.name, from = self.pos + 1, to = oldest,
                    "records were deleted before this sink read them (spool full, DropOldest); skipping");
            }
            self.pos = oldest - 1;
            self.cursor = None;
        }
        let index = match &self.cursor {
            Some(c) => match state.index_of(c.base) {
                Some(i) => i,
                None => {
                    self.cursor = None;
                    state.locate(self.pos + 1)
                }
            },
            None => state.locate(self.pos + 1),
        };
        let seg = state.segments[index];
        View {
            path: segment_path(&self.inner.config.dir, seg.base),
            base: seg.base,
            limit: seg.bytes,
            sealed: index + 1 < state.segments.len(),
            end: state.segment_end(index),
        }
    }

    /// Reads forward from `pos` as far as `pass` allows: until it is full, before any record
    /// past its `stop_after`, or at the end. Collects this sink's records into its `out` (and
    /// tracks them as in flight) when given, and counts this sink's records it passed.
    fn advance(&mut self, pass: &mut Pass<'_>) -> Result<(), SpoolError> {
        while !pass.full() {
            let view = self.view();
            if !self.open_cursor(&view)? {
                // Deleted between the look-up and the open: look again.
                continue;
            }
            match self.read_segment(&view, pass)? {
                SegmentRead::Stopped => return Ok(()),
                SegmentRead::Filled => break,
                SegmentRead::Exhausted => {}
            }
            if view.sealed {
                // Nothing more will come from this segment, even if its tail was lost.
                self.pos = self.pos.max(view.end - 1);
                self.cursor = None;
                continue;
            }
            // The active segment: done unless it grew or was sealed meanwhile.
            if !self.active_changed(&view) {
                break;
            }
        }
        Ok(())
    }

    /// Opens the viewed segment unless a cursor is open already, and jumps past records taken
    /// in memory. False if the segment was deleted meanwhile.
    fn open_cursor(&mut self, view: &View) -> Result<bool, SpoolError> {
        if self.cursor.is_none() {
            match SegmentCursor::open(view.path.clone(), view.base) {
                Ok(c) => self.cursor = Some(c),
                Err(SpoolError::Io { error: source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        let Some(cursor) = self.cursor.as_mut() else {
            return Ok(false);
        };
        if let Some(resume) = self.resume_at.take() {
            // Records up to `resume` were taken in memory: do not read them again.
            if resume.segment == cursor.base && resume.offset > cursor.offset {
                cursor.seek_to(resume.offset)?;
            }
        }
        Ok(true)
    }

    /// Reads the open segment forward, as [`SpoolReader::advance`] does.
    fn read_segment(
        &mut self,
        view: &View,
        pass: &mut Pass<'_>,
    ) -> Result<SegmentRead, SpoolError> {
        while !pass.full() {
            let Some(cursor) = self.cursor.as_mut() else {
                return Ok(SegmentRead::Exhausted);
            };
            match cursor.next(view.limit, pass.stop_after, &mut self.scratch)? {
                Next::Record { seq, mask } => {
                    if seq <= self.pos {
                        continue;
                    }
                    self.pos = seq;
                    if mask & self.bit != 0 {
                        pass.mine += 1;
                        if let Some(out) = pass.out.as_deref_mut() {
                            pass.bytes += self.scratch.len();
                            out.push((seq, std::mem::take(&mut self.scratch)));
                            self.in_flight.push_back(seq);
                        }
                    }
                }
                Next::Stop => return Ok(SegmentRead::Stopped),
                Next::End => return Ok(SegmentRead::Exhausted),
                Next::Torn(detail) => {
                    if !view.sealed {
                        return Err(SpoolError::Corrupt {
                            path: view.path.clone(),
                            detail,
                        });
                    }
                    error!(segment = %view.path.display(), %detail, sink = %self.name,
                        "unreadable rest of a spool segment; skipping to the next segment");
                    return Ok(SegmentRead::Exhausted);
                }
            }
        }
        Ok(SegmentRead::Filled)
    }

    /// Whether the viewed active segment grew or was sealed since the view was taken.
    fn active_changed(&self, view: &View) -> bool {
        let state = self.inner.lock();
        state
            .segments
            .back()
            .is_none_or(|s| s.base != view.base || s.bytes != view.limit)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    use crate::spool::test_support::{
        append_one_by_one, backlog, config, names, read_all, read_seqs, segment_files, REC,
    };
    use crate::spool::{SinkMask, Spool, HEADER_BYTES};

    #[test]
    fn unreadable_rest_of_a_sealed_segment_is_skipped() {
        // Only possible after a machine crash with FsyncMode::Never, or bit rot: the reader
        // must not stall on it, and must not return what it cannot verify.
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.segment_bytes = 3 * REC;
        let spool = Spool::open(cfg.clone(), &names(&["a"])).unwrap();
        append_one_by_one(&spool, 9, spool.mask(&["a"]));
        drop(spool);
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 3);
        let f = OpenOptions::new().write(true).open(&files[1]).unwrap();
        f.write_all_at(b"rot", REC + HEADER_BYTES + 5).unwrap();
        drop(f);

        let spool = Spool::open(cfg, &names(&["a"])).unwrap();
        let mut reader = spool.reader("a").unwrap();
        assert_eq!(read_seqs(&mut reader), vec![1, 2, 3, 4, 7, 8, 9]);
    }

    #[test]
    fn records_taken_in_memory_are_not_read_again_and_commit_like_read_ones() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path()), &names(&["a", "b"])).unwrap();
        let (a, b) = (spool.mask(&["a"]), spool.mask(&["b"]));
        let append = |from: u32, masks: &[SinkMask]| {
            let payloads: Vec<Vec<u8>> = (from..from + masks.len() as u32)
                .map(|i| i.to_le_bytes().to_vec())
                .collect();
            let batch: Vec<(&[u8], SinkMask)> = payloads
                .iter()
                .zip(masks)
                .map(|(p, m)| (p.as_slice(), *m))
                .collect();
            spool.append(&batch).unwrap()
        };
        // Segments of 4096 bytes: enough batches to roll several times.
        let mut reader = spool.reader("a").unwrap();
        let mut taken = Vec::new();
        let mut seq = 1u32;
        for round in 0..40 {
            let masks = [a, b, a, a, b];
            let report = append(seq, &masks);
            let first = report.first_seq.unwrap();
            if round % 3 == 2 {
                // Not taken in memory this time (say the sink lagged): read from the file.
                let read = reader.read_batch(100).unwrap();
                taken.extend(read.iter().map(|(s, _)| *s));
            } else {
                // A batch that does not continue from the position is refused.
                assert_eq!(
                    reader.take_appended(first + 1, &masks, report.end.unwrap()),
                    None
                );
                let mine = reader
                    .take_appended(first, &masks, report.end.unwrap())
                    .unwrap();
                assert_eq!(mine, vec![0, 2, 3]);
                taken.extend(mine.iter().map(|&i| first + i as u64));
            }
            seq += masks.len() as u32;
        }
        assert!(
            reader.read_batch(100).unwrap().is_empty(),
            "nothing left to read"
        );
        let expected: Vec<u64> = (0..40u64)
            .flat_map(|r| [1, 3, 4].map(|i| r * 5 + i))
            .collect();
        assert_eq!(
            taken, expected,
            "each of a's records exactly once, in order"
        );
        // Part taken in memory, then the rest read from the file.
        let report = append(seq, &[a, a, a, a]);
        let first = report.first_seq.unwrap();
        assert_eq!(reader.read_batch(2).unwrap().len(), 2);
        let mine = reader
            .take_appended(first, &[a, a, a, a], report.end.unwrap())
            .unwrap();
        assert_eq!(mine, vec![2, 3], "the two already read are passed over");
        assert_eq!(backlog(&spool, "a"), 124);
        reader.commit(first + 3).unwrap();
        assert_eq!(
            backlog(&spool, "a"),
            0,
            "taken records commit like read ones"
        );
        assert_eq!(backlog(&spool, "b"), 80);
    }

    #[test]
    fn large_backlog_is_read_in_bounded_batches() {
        const N: u64 = 200_000;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.segment_bytes = 64 * 1024;
        let spool = Spool::open(cfg, &names(&["a", "b"])).unwrap();
        let a = spool.mask(&["a"]);
        let b = spool.mask(&["b"]);
        let mut seq = 0u64;
        while seq < N {
            let payloads: Vec<[u8; 16]> = (seq..seq + 1000)
                .map(|s| {
                    let mut p = [0u8; 16];
                    p[..8].copy_from_slice(&(s + 1).to_le_bytes());
                    p
                })
                .collect();
            let batch: Vec<(&[u8], SinkMask)> = payloads
                .iter()
                .enumerate()
                .map(|(i, p)| (p.as_slice(), if i % 10 == 0 { b } else { a }))
                .collect();
            spool.append(&batch).unwrap();
            seq += 1000;
        }
        let stats = spool.stats();
        assert!(stats.segments > 100, "{} segments", stats.segments);
        assert_eq!(backlog(&spool, "a"), N * 9 / 10);

        let mut reader = spool.reader("a").unwrap();
        let mut expected = 1u64;
        let mut total = 0u64;
        loop {
            let batch = reader.read_batch(777).unwrap();
            assert!(batch.len() <= 777);
            if batch.is_empty() {
                break;
            }
            for (seq, payload) in &batch {
                if (expected - 1).is_multiple_of(10) {
                    expected += 1; // b's record
                }
                assert_eq!(*seq, expected);
                assert_eq!(payload[..8], seq.to_le_bytes());
                expected += 1;
            }
            total += batch.len() as u64;
            reader.commit(batch.last().unwrap().0).unwrap();
            // What the reader holds does not grow with the backlog.
            assert!(reader.in_flight.is_empty());
        }
        assert_eq!(total, N * 9 / 10);
        assert_eq!(backlog(&spool, "a"), 0);
        // b has not read: every segment holds one of its records.
        assert_eq!(spool.stats().segments, stats.segments);
        let mut reader_b = spool.reader("b").unwrap();
        let got = read_all(&mut reader_b);
        assert_eq!(got.len() as u64, N / 10);
        reader_b.commit(got.last().unwrap().0).unwrap();
        assert_eq!(spool.stats().segments, 1);
    }

    #[test]
    fn a_read_stops_at_its_bytes_and_a_larger_record_is_read_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.segment_bytes = 1 << 20;
        let spool = Spool::open(cfg, &names(&["a", "b"])).unwrap();
        let (a, b) = (spool.mask(&["a"]), spool.mask(&["b"]));
        let small = [1u8; 100];
        let large = [2u8; 5000];
        let other = vec![3u8; 100_000];
        let records: Vec<(&[u8], SinkMask)> = vec![
            (&small, a),
            (&small, a),
            (&small, a),
            (&large, a),
            (&small, a),
            (&other, b),
        ];
        spool.append(&records).unwrap();
        let mut reader = spool.reader("a").unwrap();
        let sizes = |batch: Vec<(u64, Vec<u8>)>| -> Vec<(u64, usize)> {
            batch.into_iter().map(|(seq, p)| (seq, p.len())).collect()
        };
        // Stops once 250 bytes are read: the record that reaches them is the last one.
        let first = reader.read_batch_within(100, 250).unwrap();
        assert_eq!(sizes(first), [(1, 100), (2, 100), (3, 100)]);
        // Larger than a whole read: read alone.
        let second = reader.read_batch_within(100, 250).unwrap();
        assert_eq!(sizes(second), [(4, 5000)]);
        let third = reader.read_batch_within(100, 250).unwrap();
        assert_eq!(sizes(third), [(5, 100)]);
        // The other sink's large record, passed over at the end of that read, went through the
        // buffer for other sinks' records, which is not kept that large.
        assert_eq!(reader.position(), 6);
        assert!(reader.scratch.capacity() <= super::SCRATCH_KEPT_BYTES);
    }

    #[tokio::test]
    async fn wait_for_data_wakes_on_append() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path()), &names(&["a"])).unwrap();
        let mut reader = spool.reader("a").unwrap();
        let short = Duration::from_millis(50);
        assert!(
            tokio::time::timeout(short, reader.wait_for_data())
                .await
                .is_err(),
            "nothing appended yet"
        );

        let writer = spool.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            writer
                .append(&[(b"hello".as_slice(), writer.mask(&["a"]))])
                .unwrap();
        });
        tokio::time::timeout(Duration::from_secs(5), reader.wait_for_data())
            .await
            .expect("woken by the append");
        thread.join().unwrap();
        assert_eq!(reader.read_batch(10).unwrap(), vec![(1, b"hello".to_vec())]);
        assert!(
            tokio::time::timeout(short, reader.wait_for_data())
                .await
                .is_err(),
            "caught up"
        );

        // Unread data makes it resolve at once, e.g. after a rewind.
        reader.rewind().unwrap();
        tokio::time::timeout(Duration::from_secs(5), reader.wait_for_data())
            .await
            .expect("uncommitted record to re-read");
    }
}
