//! Commit bookkeeping of one sink loop: how far its events are finished, how far that is
//! committed, and when the next commit is due.
//!
//! Cursor writes and segment deletions are file I/O: the loop commits with its next read from the
//! spool, every [`COMMIT_EVERY`] (or [`COMMIT_EVERY_RECORDS`]) while events come from memory, and
//! whenever nothing is unconfirmed; a commit's file I/O happens on a blocking thread.

use std::time::Duration;

use tokio::time::Instant;

use crate::delivery::reader::{Records, SpoolRead};
use crate::spool::SpoolError;

/// Bounds the time between commits while events come from memory (reads from the spool commit
/// with every read): lets the spool reclaim segments and bounds what a crash sends again.
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// Bounds the records finished between commits while events come from memory, whichever of this
/// and [`COMMIT_EVERY`] comes first: at 100k events/s, 200 ms of records is more than the
/// smallest spool allowed (16 MiB), which would fill while the sink keeps up.
const COMMIT_EVERY_RECORDS: u64 = 2048;

/// How far a sink loop's events are finished and committed.
#[derive(Debug)]
pub(super) struct Progress {
    /// The last seq of the finished prefix (every event up to it delivered or dead-lettered),
    /// not committed yet.
    finished: Option<u64>,
    /// When the last commit went out: a commit is due [`COMMIT_EVERY`] after it.
    last_commit: Instant,
    /// The position last committed: a commit is due [`COMMIT_EVERY_RECORDS`] past it, and the
    /// idle loop commits the reader's position only past it.
    committed_to: u64,
}

impl Progress {
    /// Progress of a loop whose cursor is committed up to `committed_to`.
    pub(super) fn new(committed_to: u64) -> Progress {
        Progress {
            finished: None,
            last_commit: Instant::now(),
            committed_to,
        }
    }

    /// Every event up to `upto` is delivered or dead-lettered.
    pub(super) fn finished(&mut self, upto: u64) {
        self.finished = Some(upto);
    }

    /// Whether something finished waits to be committed.
    pub(super) fn has_uncommitted(&self) -> bool {
        self.finished.is_some()
    }

    /// Whether a commit is due while events come from memory (no spool read carries it).
    pub(super) fn commit_due_from_memory(&self) -> bool {
        self.finished.is_some_and(|upto| {
            self.last_commit.elapsed() >= COMMIT_EVERY
                || upto >= self.committed_to + COMMIT_EVERY_RECORDS
        })
    }

    /// What to commit now, if anything: it is no longer pending (see [`Progress::read_back`]).
    pub(super) fn take_commit(&mut self) -> Option<u64> {
        self.finished.take()
    }

    /// Counts a spool call that carried the commit `upto`, and hands its records on. A failed
    /// read puts the commit back: it goes out with the next call.
    pub(super) fn read_back(&mut self, (upto, read): SpoolRead) -> Result<Records, SpoolError> {
        match read {
            Ok(records) => {
                if let Some(upto) = upto {
                    self.committed(upto);
                }
                Ok(records)
            }
            Err(e) => {
                self.finished = self.finished.or(upto);
                Err(e)
            }
        }
    }

    /// A commit up to `upto` went out.
    pub(super) fn committed(&mut self, upto: u64) {
        self.committed_to = self.committed_to.max(upto);
        self.last_commit = Instant::now();
    }

    /// With nothing unconfirmed, everything up to the reader's `position` is finished: what to
    /// commit, if the position moved or something finished is pending. Taken: count it with
    /// [`Progress::committed`].
    pub(super) fn commit_all_upto(&mut self, position: u64) -> Option<u64> {
        let pending = self.finished.take().is_some();
        (pending || position > self.committed_to).then_some(position)
    }

    /// The last commit as the loop ends: the reader's position when everything read is
    /// finished (`Some(position)`) and it moved, else what finished and is pending.
    pub(super) fn last_commit(self, everything_read_finished: Option<u64>) -> Option<u64> {
        everything_read_finished
            .filter(|&position| position > self.committed_to)
            .or(self.finished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_memory_a_commit_is_due_after_enough_records_or_time() {
        let mut progress = Progress::new(10);
        assert!(!progress.commit_due_from_memory(), "nothing finished");
        progress.finished(10 + COMMIT_EVERY_RECORDS - 1);
        assert!(!progress.commit_due_from_memory());
        progress.finished(10 + COMMIT_EVERY_RECORDS);
        assert!(progress.commit_due_from_memory());
        let upto = progress.take_commit();
        assert_eq!(upto, Some(10 + COMMIT_EVERY_RECORDS));
        // A failed read puts the commit it carried back.
        let failed = Err(SpoolError::Config("test".into()));
        assert!(progress.read_back((upto, failed)).is_err());
        assert!(progress.has_uncommitted());
        let upto = progress.take_commit();
        assert!(progress.read_back((upto, Ok(Vec::new()))).is_ok());
        assert!(!progress.has_uncommitted());
        assert_eq!(progress.commit_all_upto(10 + COMMIT_EVERY_RECORDS), None);
        assert_eq!(progress.commit_all_upto(5000), Some(5000));
    }

    #[test]
    fn the_last_commit_is_the_position_only_when_everything_read_is_finished() {
        let mut progress = Progress::new(10);
        progress.finished(12);
        assert_eq!(Progress::new(10).last_commit(Some(20)), Some(20));
        assert_eq!(Progress::new(10).last_commit(Some(10)), None);
        progress.committed(12);
        progress.finished(15);
        assert_eq!(progress.last_commit(None), Some(15));
    }
}
