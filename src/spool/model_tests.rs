//! The spool against a model of what each sink should see, over random operations.

use std::collections::VecDeque;
use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;

use super::test_support::{config, names, read_all};
use super::{FsyncMode, SinkMask, Spool, SpoolPosition, SpoolReader, WhenFull, HEADER_BYTES};

#[derive(Debug, Clone)]
enum Op {
    /// Records as (payload, which of the three sinks, as bits).
    /// Then the sinks in the second field (bits) try to take the batch in memory, as sink
    /// loops do with what the ingest just appended.
    Append(Vec<(Vec<u8>, u8)>, u8),
    Read {
        sink: usize,
        max: usize,
    },
    /// Commits a random non-empty prefix of what the sink read and has not committed.
    Commit {
        sink: usize,
        prefix: Index,
    },
    Rewind(usize),
    Sync,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((prop::collection::vec(any::<u8>(), 0..300), 0u8..8), 1..6)
            .prop_flat_map(|records| (Just(records), 0u8..8))
            .prop_map(|(records, takers)| Op::Append(records, takers)),
        4 => (0..3usize, 1..8usize).prop_map(|(sink, max)| Op::Read { sink, max }),
        3 => (0..3usize, any::<Index>()).prop_map(|(sink, prefix)| Op::Commit { sink, prefix }),
        1 => (0..3usize).prop_map(Op::Rewind),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
    ]
}

/// What one sink should see: every record routed to it and not committed, and how far it read.
#[derive(Default)]
struct SinkModel {
    /// Records routed to the sink and not committed yet, oldest first, as (seq, payload).
    records: VecDeque<(u64, Vec<u8>)>,
    /// Of `records`, how many were read (or taken in memory).
    read: usize,
}

const SINKS: [&str; 3] = ["a", "b", "c"];

fn open_all(dir: &Path, max_bytes: u64, when_full: WhenFull) -> (Spool, Vec<SpoolReader>) {
    let mut cfg = config(dir);
    cfg.segment_bytes = 700;
    cfg.max_bytes = max_bytes;
    cfg.when_full = when_full;
    cfg.fsync = FsyncMode::Interval;
    let spool = Spool::open(cfg, &names(&SINKS)).unwrap();
    let readers = SINKS.iter().map(|s| spool.reader(s).unwrap()).collect();
    (spool, readers)
}

/// The spool under test, one reader per sink, and the model they are checked against.
struct Run {
    /// Holds the spool's directory for the whole run.
    dir: tempfile::TempDir,
    /// `max_bytes` small enough to fill makes DropNewest refuse records; the model then holds
    /// only what the spool accepted.
    max_bytes: u64,
    /// DropNewest, or DeadLetter: then the run pushes the oldest segments out until a batch
    /// fits, and the model hands each sink's pushed-out records over.
    when_full: WhenFull,
    /// The spool under test.
    spool: Spool,
    /// One reader per sink of `SINKS`, in that order.
    readers: Vec<SpoolReader>,
    /// One model per sink of `SINKS`, in that order.
    model: Vec<SinkModel>,
    /// The seq the model expects the next appended record to get.
    next_seq: u64,
}

impl Run {
    fn new(max_bytes: u64, when_full: WhenFull) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let (spool, readers) = open_all(dir.path(), max_bytes, when_full);
        Run {
            dir,
            max_bytes,
            when_full,
            spool,
            readers,
            model: (0..3).map(|_| SinkModel::default()).collect(),
            next_seq: 1,
        }
    }

    /// Runs one operation and checks the counters after it.
    fn apply(mut self, op: Op) -> Result<Run, TestCaseError> {
        match op {
            Op::Append(records, takers) => self.append(&records, takers)?,
            Op::Read { sink, max } => self.read(sink, max)?,
            Op::Commit { sink, prefix } => self.commit(sink, prefix)?,
            Op::Rewind(sink) => {
                self.readers[sink].rewind().unwrap();
                self.model[sink].read = 0;
            }
            Op::Sync => self.spool.sync().unwrap(),
            Op::Reopen => self = self.reopen(),
        }
        self.check_counters()?;
        Ok(self)
    }

    /// Appends the records, checks the report, and lets the sinks in `takers` take the batch
    /// in memory.
    fn append(&mut self, records: &[(Vec<u8>, u8)], takers: u8) -> Result<(), TestCaseError> {
        let masks: Vec<SinkMask> = records
            .iter()
            .map(|(_, bits)| {
                let chosen: Vec<&str> = (0..3)
                    .filter(|i| bits & (1 << i) != 0)
                    .map(|i| SINKS[i])
                    .collect();
                self.spool.mask(&chosen)
            })
            .collect();
        let batch: Vec<(&[u8], SinkMask)> = records
            .iter()
            .zip(&masks)
            .map(|((p, _), m)| (p.as_slice(), *m))
            .collect();
        let mut report = self.spool.append(&batch).unwrap();
        while report.awaiting_room > 0 {
            prop_assert_eq!(self.when_full, WhenFull::DeadLetter);
            prop_assert_eq!(
                (report.appended, report.awaiting_room),
                (0, batch.len() as u64)
            );
            self.push_out_oldest()?;
            report = self.spool.append(&batch).unwrap();
        }
        prop_assert_eq!(
            report.appended as u64 + report.dropped_newest,
            batch.len() as u64
        );
        prop_assert_eq!(report.dropped_oldest, 0);
        prop_assert_eq!(
            report.first_seq,
            (report.appended > 0).then_some(self.next_seq)
        );
        let bytes = self.spool.stats().bytes;
        prop_assert!(bytes <= self.max_bytes);
        if let Some((refused, _)) = records.get(report.appended) {
            // Only what did not fit was refused.
            prop_assert!(bytes + HEADER_BYTES + refused.len() as u64 > self.max_bytes);
        }
        for (i, (payload, bits)) in records[..report.appended].iter().enumerate() {
            for (s, m) in self.model.iter_mut().enumerate() {
                if bits & (1 << s) != 0 {
                    m.records
                        .push_back((self.next_seq + i as u64, payload.clone()));
                }
            }
        }
        self.next_seq += report.appended as u64;
        // The ingest offers only whole batches.
        match (report.first_seq, report.end) {
            (Some(first), Some(end)) if report.appended == records.len() => {
                self.take_in_memory(records, &masks, takers, (first, end))
            }
            _ => Ok(()),
        }
    }

    /// The sinks in `takers` take the batch just appended (from `first` to `end`) in memory,
    /// as sink loops do with what the ingest just appended.
    fn take_in_memory(
        &mut self,
        records: &[(Vec<u8>, u8)],
        masks: &[SinkMask],
        takers: u8,
        (first, end): (u64, SpoolPosition),
    ) -> Result<(), TestCaseError> {
        for (s, m) in self.model.iter_mut().enumerate() {
            if takers & (1 << s) == 0 {
                continue;
            }
            let Some(mine) = self.readers[s].take_appended(first, masks, end) else {
                // Refused: records before the batch are unread; reads get them all.
                continue;
            };
            let taken: Vec<(u64, Vec<u8>)> = mine
                .iter()
                .map(|&i| (first + i as u64, records[i].0.clone()))
                .collect();
            let want: Vec<(u64, Vec<u8>)> = m
                .records
                .iter()
                .skip(m.read)
                .take(taken.len())
                .cloned()
                .collect();
            prop_assert_eq!(&taken, &want, "sink {} took", SINKS[s]);
            prop_assert_eq!(m.read + taken.len(), m.records.len(), "took the rest");
            m.read += taken.len();
        }
        Ok(())
    }

    /// Pushes the oldest segment out: what each sink is handed must be the oldest records the
    /// model says it has not committed, and it no longer reads them.
    fn push_out_oldest(&mut self) -> Result<(), TestCaseError> {
        let Some(mut eviction) = self.spool.evict_oldest().unwrap() else {
            return Err(TestCaseError::fail(
                "a full spool has a segment to push out",
            ));
        };
        let mut handed: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); SINKS.len()];
        while let Some(record) = eviction.next_record().unwrap() {
            for name in &record.sinks {
                let s = SINKS.iter().position(|n| n == name).unwrap();
                handed[s].push((record.seq, record.payload.to_vec()));
            }
        }
        eviction.finish().unwrap();
        for (s, m) in self.model.iter_mut().enumerate() {
            let oldest: Vec<(u64, Vec<u8>)> =
                m.records.iter().take(handed[s].len()).cloned().collect();
            prop_assert_eq!(&handed[s], &oldest, "pushed out of {}", SINKS[s]);
            m.records.drain(..handed[s].len());
            m.read = m.read.saturating_sub(handed[s].len());
        }
        Ok(())
    }

    fn read(&mut self, sink: usize, max: usize) -> Result<(), TestCaseError> {
        let got = self.readers[sink].read_batch(max).unwrap();
        let m = &mut self.model[sink];
        let want: Vec<(u64, Vec<u8>)> = m.records.iter().skip(m.read).take(max).cloned().collect();
        prop_assert_eq!(&got, &want, "sink {} read", SINKS[sink]);
        m.read += got.len();
        Ok(())
    }

    /// Commits a random non-empty prefix of what the sink read and has not committed.
    fn commit(&mut self, sink: usize, prefix: Index) -> Result<(), TestCaseError> {
        let m = &mut self.model[sink];
        if m.read == 0 {
            return Ok(());
        }
        let n = prefix.index(m.read) + 1;
        let upto = m.records[n - 1].0;
        m.records.drain(..n);
        m.read -= n;
        self.readers[sink].commit(upto).unwrap();
        let stats = self.spool.stats();
        prop_assert!(stats.sinks[sink].committed >= upto);
        Ok(())
    }

    /// Closes the spool (every handle, so its cursors are persisted) and opens it again:
    /// readers start over from their committed cursors.
    fn reopen(self) -> Run {
        let Run {
            dir,
            max_bytes,
            when_full,
            spool,
            readers,
            mut model,
            next_seq,
        } = self;
        drop(readers);
        drop(spool);
        let (spool, readers) = open_all(dir.path(), max_bytes, when_full);
        for m in &mut model {
            m.read = 0;
        }
        Run {
            dir,
            max_bytes,
            when_full,
            spool,
            readers,
            model,
            next_seq,
        }
    }

    /// The last seq and every sink's backlog agree with the model.
    fn check_counters(&self) -> Result<(), TestCaseError> {
        let stats = self.spool.stats();
        prop_assert_eq!(stats.last_seq, self.next_seq - 1);
        for (s, m) in self.model.iter().enumerate() {
            prop_assert_eq!(
                stats.sinks[s].backlog,
                m.records.len() as u64,
                "backlog of {}",
                SINKS[s]
            );
        }
        Ok(())
    }

    /// Reopens once more: every sink sees exactly its uncommitted records, then commits them
    /// all and the space comes back.
    fn finish(self) -> Result<(), TestCaseError> {
        let mut run = self.reopen();
        for (s, m) in run.model.iter().enumerate() {
            let got = read_all(&mut run.readers[s]);
            let want: Vec<(u64, Vec<u8>)> = m.records.iter().cloned().collect();
            prop_assert_eq!(&got, &want, "sink {} after reopen", SINKS[s]);
            prop_assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
            if let Some((last, _)) = got.last() {
                run.readers[s].commit(*last).unwrap();
            }
        }
        // A sink that had nothing left may still sit before records of other sinks; a read
        // moves it.
        for r in &mut run.readers {
            prop_assert!(r.read_batch(10).unwrap().is_empty());
        }
        let stats = run.spool.stats();
        prop_assert_eq!(
            stats.segments,
            1,
            "everything committed, only the active segment stays"
        );
        prop_assert!(stats.sinks.iter().all(|s| s.backlog == 0));
        Ok(())
    }
}

fn run_model(ops: Vec<Op>, max_bytes: u64, when_full: WhenFull) -> Result<(), TestCaseError> {
    let mut run = Run::new(max_bytes, when_full);
    for op in ops {
        run = run.apply(op)?;
    }
    run.finish()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn spool_matches_model(ops in prop::collection::vec(op(), 1..80)) {
        run_model(ops, 1 << 30, WhenFull::DropNewest)?;
    }

    #[test]
    fn spool_matches_model_when_full(ops in prop::collection::vec(op(), 1..80)) {
        run_model(ops, 4000, WhenFull::DropNewest)?;
    }

    #[test]
    fn spool_matches_model_when_full_pushing_out(ops in prop::collection::vec(op(), 1..80)) {
        run_model(ops, 4000, WhenFull::DeadLetter)?;
    }
}
