//! Pushing the oldest segment out to make room (`when_full: dead_letter`): the caller is handed
//! every record of it that a configured sink has not committed, with the names of those sinks,
//! stores them elsewhere (the delivery layer writes them to those sinks' dead letters), and only
//! then has the segment deleted. A sink that had committed past the segment is handed nothing.
//!
//! Two steps rather than a callback under the lock: reading a whole segment and writing and
//! fsyncing the copies takes milliseconds to seconds, and appends, reads and commits go on
//! meanwhile. Nothing needs the lock in between: the segment is sealed before it is read (it
//! never grows again), and the only other thing that deletes the oldest segment is reclaiming,
//! which does so once every sink has committed it.
//!
//! A crash (or a failed store) between the two steps leaves the segment in place: the next
//! eviction hands the same records out again, so copies can repeat but never go missing. A sink
//! that commits some of the records between the two steps was handed them anyway: it gets them
//! twice (delivered, and as a copy), which at-least-once allows.

use std::io;
use std::sync::Arc;

use tracing::error;

use super::error::SpoolError;
use super::format::{segment_path, Next, SegmentCursor};
use super::{Inner, Spool};

/// The oldest segment on its way out of the spool ([`Spool::evict_oldest`]). Nothing is deleted
/// until [`Eviction::finish`]; dropped unfinished, it leaves the segment in place.
pub struct Eviction {
    /// The spool it belongs to.
    inner: Arc<Inner>,
    /// The segment's base seq (also its file name).
    segment: u64,
    /// Its size: it was sealed before the eviction began, so it does not grow.
    bytes: u64,
    /// Reads the segment record by record; `None` once reading ended (or nobody is behind).
    cursor: Option<SegmentCursor>,
    /// The configured sinks that had not committed the whole segment when the eviction began.
    behind: Vec<Behind>,
    /// The last record's payload, reused.
    payload: Vec<u8>,
}

/// A configured sink that had not committed the whole segment when the eviction began.
struct Behind {
    /// Its entry in the registry.
    index: usize,
    /// Its name, handed out with each of its records.
    name: String,
    /// Its mask bit, as a mask.
    bit: u64,
    /// Its cursor when the eviction began: its records after it are handed out.
    committed: u64,
    /// Seqs handed out for it, ascending: those it has still not committed when the segment is
    /// deleted come off its backlog then. Eight bytes a record, bounded by the segment's size.
    handed_out: Vec<u64>,
}

/// One record of the segment being pushed out that some sinks have not committed.
#[derive(Debug)]
pub struct UndeliveredRecord<'e> {
    /// Its seq.
    pub seq: u64,
    /// The record as appended.
    pub payload: &'e [u8],
    /// The configured sinks it was routed to that had not committed it.
    pub sinks: Vec<&'e str>,
}

impl Spool {
    /// Begins pushing the oldest segment out; `None` when the spool holds no record. When the
    /// active segment is the only one it is sealed first, and appends go to a new one. Read the
    /// records some sink still needs with [`Eviction::next_record`], store them, then call
    /// [`Eviction::finish`]. One eviction at a time: the ingest is the only caller.
    pub fn evict_oldest(&self) -> Result<Option<Eviction>, SpoolError> {
        loop {
            let (segment, bytes, behind) = {
                let mut state = self.inner.lock();
                if state.segments.len() == 1 {
                    if state.segments[0].bytes == 0 {
                        return Ok(None);
                    }
                    state.roll(&self.inner.config)?;
                }
                let oldest = state.segments[0];
                let last = state.segment_end(0).saturating_sub(1);
                let behind: Vec<Behind> = state
                    .sinks
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.configured && s.committed < last)
                    .map(|(index, s)| Behind {
                        index,
                        name: s.name.clone(),
                        bit: 1 << s.bit,
                        committed: s.committed,
                        handed_out: Vec::new(),
                    })
                    .collect();
                (oldest.base, oldest.bytes, behind)
            };
            let cursor = if behind.is_empty() {
                None
            } else {
                let path = segment_path(&self.inner.config.dir, segment);
                match SegmentCursor::open(path, segment) {
                    Ok(cursor) => Some(cursor),
                    // Reclaimed meanwhile, every sink having committed it: look again.
                    Err(SpoolError::Io { error: source, .. })
                        if source.kind() == io::ErrorKind::NotFound =>
                    {
                        continue
                    }
                    Err(e) => return Err(e),
                }
            };
            return Ok(Some(Eviction {
                inner: self.inner.clone(),
                segment,
                bytes,
                cursor,
                behind,
                payload: Vec::new(),
            }));
        }
    }
}

impl Eviction {
    /// Base seq of the segment being pushed out (for logs).
    pub fn segment(&self) -> u64 {
        self.segment
    }

    /// The next record of the segment that some sink had not committed, with those sinks;
    /// `None` at the end. A damaged record ends the segment, as it does for readers: what follows
    /// it cannot be read by anyone.
    pub fn next_record(&mut self) -> Result<Option<UndeliveredRecord<'_>>, SpoolError> {
        loop {
            let Some(cursor) = self.cursor.as_mut() else {
                return Ok(None);
            };
            let (seq, mask) = match cursor.next(self.bytes, u64::MAX, &mut self.payload)? {
                Next::Record { seq, mask } => (seq, mask),
                Next::End | Next::Stop => {
                    self.cursor = None;
                    return Ok(None);
                }
                Next::Torn(detail) => {
                    error!(segment = %segment_path(&self.inner.config.dir, self.segment).display(),
                        %detail, "damaged record in the spool segment being pushed out: the records after it cannot be read");
                    self.cursor = None;
                    return Ok(None);
                }
            };
            let mut takers = Vec::new();
            for (i, sink) in self.behind.iter_mut().enumerate() {
                if mask & sink.bit != 0 && seq > sink.committed {
                    sink.handed_out.push(seq);
                    takers.push(i);
                }
            }
            if takers.is_empty() {
                continue;
            }
            return Ok(Some(UndeliveredRecord {
                seq,
                payload: &self.payload,
                sinks: takers
                    .into_iter()
                    .map(|i| self.behind[i].name.as_str())
                    .collect(),
            }));
        }
    }

    /// Deletes the segment: call only once every record handed out is stored elsewhere. Takes
    /// the records their sinks have still not committed off those sinks' backlogs. Returns the
    /// bytes freed: 0 when reclaiming deleted the segment meanwhile.
    pub fn finish(self) -> Result<u64, SpoolError> {
        let mut state = self.inner.lock();
        if state.segments.front().map(|s| s.base) != Some(self.segment) {
            // Only the oldest segment is ever deleted: this one went, every sink having
            // committed it, and its records came off the backlogs as they were committed.
            return Ok(0);
        }
        debug_assert!(
            state.segments.len() > 1,
            "the segment was sealed when it began"
        );
        for behind in &self.behind {
            let sink = &mut state.sinks[behind.index];
            let committed_since = behind
                .handed_out
                .partition_point(|&seq| seq <= sink.committed);
            let still_pending = (behind.handed_out.len() - committed_since) as u64;
            sink.pending = sink.pending.saturating_sub(still_pending);
        }
        state.delete_oldest(&self.inner.config.dir)?;
        Ok(self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use crate::spool::test_support::{
        append_n, append_one_by_one, backlog, config, names, read_all, read_seqs, small_spool,
        spool_with_room_for_two, REC,
    };
    use crate::spool::{Spool, WhenFull};

    /// Every record the eviction hands out, as (seq, payload, sinks), without finishing it.
    fn handed_out(eviction: &mut crate::spool::Eviction) -> Vec<(u64, Vec<u8>, Vec<String>)> {
        let mut all = Vec::new();
        while let Some(record) = eviction.next_record().unwrap() {
            let sinks = record.sinks.iter().map(|s| s.to_string()).collect();
            all.push((record.seq, record.payload.to_vec(), sinks));
        }
        all
    }

    #[test]
    fn a_batch_that_does_not_fit_waits_for_room_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, mask) = spool_with_room_for_two(dir.path(), WhenFull::DeadLetter);
        let report = append_n(&spool, 4, mask);
        assert_eq!(
            (
                report.first_seq,
                report.appended,
                report.awaiting_room,
                report.dropped_newest,
                report.dropped_oldest
            ),
            (None, 0, 4, 0, 0),
            "all or nothing, and nothing counted as dropped"
        );
        let stats = spool.stats();
        assert_eq!(
            (stats.last_seq, stats.dropped_newest, stats.dropped_oldest),
            (8, 0, 0)
        );
    }

    #[test]
    fn only_sinks_that_had_not_committed_a_record_are_handed_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = small_spool(dir.path(), &["slow", "fast"], WhenFull::DeadLetter);
        let both = spool.mask(&["slow", "fast"]);
        let mut slow = spool.reader("slow").unwrap();
        let mut fast = spool.reader("fast").unwrap();
        append_one_by_one(&spool, 10, both);
        assert_eq!(
            slow.read_batch(2).unwrap().len(),
            2,
            "in flight, not committed"
        );
        assert_eq!(read_all(&mut fast).len(), 10);
        fast.commit(10).unwrap();

        let mut eviction = spool.evict_oldest().unwrap().unwrap();
        let records = handed_out(&mut eviction);
        assert_eq!(
            records
                .iter()
                .map(|(seq, _, sinks)| (*seq, sinks.clone()))
                .collect::<Vec<_>>(),
            (1..=3)
                .map(|seq| (seq, vec!["slow".to_string()]))
                .collect::<Vec<_>>(),
            "the fast sink committed them: it loses nothing"
        );
        assert_eq!(records[0].1, vec![7u8; 100]);
        assert_eq!(spool.stats().segments, 4, "nothing deleted before finish");
        assert_eq!(eviction.finish().unwrap(), 3 * REC);

        let stats = spool.stats();
        assert_eq!((stats.segments, stats.bytes), (3, 7 * REC));
        assert_eq!((backlog(&spool, "slow"), backlog(&spool, "fast")), (7, 0));
        assert_eq!(stats.dropped_oldest + stats.dropped_newest, 0);
        assert_eq!(append_n(&spool, 3, both).appended, 3, "room for three");

        // The slow sink's reader was inside the segment: it goes on after it, exactly.
        assert_eq!(read_seqs(&mut slow), (4..=13).collect::<Vec<_>>());
        slow.commit(13).unwrap();
        assert_eq!(backlog(&spool, "slow"), 0);
        assert_eq!(slow.lost(), 0, "pushed out is not lost");
    }

    #[test]
    fn a_crash_between_storing_and_deleting_hands_the_same_records_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_bytes = 10 * REC;
        cfg.segment_bytes = 3 * REC;
        cfg.when_full = WhenFull::DeadLetter;
        let spool = Spool::open(cfg.clone(), &names(&["slow"])).unwrap();
        let mask = spool.mask(&["slow"]);
        for n in 0..6u8 {
            spool.append(&[([n; 100].as_slice(), mask)]).unwrap();
        }
        let mut eviction = spool.evict_oldest().unwrap().unwrap();
        let stored = handed_out(&mut eviction);
        assert_eq!(stored.len(), 3);
        // The process dies after the copies are stored, before the segment is deleted.
        drop(eviction);
        drop(spool);

        let spool = Spool::open(cfg.clone(), &names(&["slow"])).unwrap();
        let mut eviction = spool.evict_oldest().unwrap().unwrap();
        let again = handed_out(&mut eviction);
        assert_eq!(again, stored, "the same records, none missing");
        eviction.finish().unwrap();
        drop(spool);

        let spool = Spool::open(cfg, &names(&["slow"])).unwrap();
        let mut reader = spool.reader("slow").unwrap();
        let rest = read_all(&mut reader);
        assert_eq!(
            rest.iter().map(|r| (r.0, r.1[0])).collect::<Vec<_>>(),
            vec![(4, 3), (5, 4), (6, 5)],
            "after the deletion, only the records that were not pushed out"
        );
    }

    #[test]
    fn a_commit_during_an_eviction_is_not_taken_off_the_backlog_twice() {
        let dir = tempfile::tempdir().unwrap();
        let spool = small_spool(dir.path(), &["a", "b"], WhenFull::DeadLetter);
        let both = spool.mask(&["a", "b"]);
        append_one_by_one(&spool, 9, both);
        let mut a = spool.reader("a").unwrap();
        assert_eq!(a.read_batch(2).unwrap().len(), 2);

        let mut eviction = spool.evict_oldest().unwrap().unwrap();
        assert_eq!(handed_out(&mut eviction).len(), 3, "seq 1 to 3, for both");
        // "a" delivers two of them meanwhile (and will get them twice).
        a.commit(2).unwrap();
        assert_eq!(eviction.finish().unwrap(), 3 * REC);
        assert_eq!((backlog(&spool, "a"), backlog(&spool, "b")), (6, 6));

        // "b" commits the segment whole meanwhile: reclaiming deletes it before finish.
        let mut eviction = spool.evict_oldest().unwrap().unwrap();
        assert_eq!(eviction.segment(), 4);
        assert_eq!(handed_out(&mut eviction).len(), 3);
        let mut b = spool.reader("b").unwrap();
        assert_eq!(b.read_batch(3).unwrap().len(), 3);
        b.commit(6).unwrap();
        a.read_batch(10).unwrap();
        a.commit(6).unwrap();
        assert_eq!(spool.stats().segments, 1, "reclaimed by the commits");
        assert_eq!(eviction.finish().unwrap(), 0, "gone already");
        assert_eq!((backlog(&spool, "a"), backlog(&spool, "b")), (3, 3));
    }

    #[test]
    fn the_only_segment_is_sealed_first_and_an_empty_spool_has_nothing_to_push_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.when_full = WhenFull::DeadLetter;
        let spool = Spool::open(cfg, &names(&["a"])).unwrap();
        assert!(spool.evict_oldest().unwrap().is_none());
        let mask = spool.mask(&["a"]);
        append_n(&spool, 5, mask);
        assert_eq!(spool.stats().segments, 1);

        let mut eviction = spool.evict_oldest().unwrap().unwrap();
        assert_eq!(handed_out(&mut eviction).len(), 5);
        assert_eq!(eviction.finish().unwrap(), 5 * REC);
        let stats = spool.stats();
        assert_eq!(
            (stats.segments, stats.bytes, backlog(&spool, "a")),
            (1, 0, 0)
        );
        assert!(spool.evict_oldest().unwrap().is_none());

        let report = append_n(&spool, 2, mask);
        assert_eq!(report.first_seq, Some(6), "seqs go on");
        let mut reader = spool.reader("a").unwrap();
        assert_eq!(read_seqs(&mut reader), vec![6, 7]);
    }
}
