//! Where a sink loop's next events come from.
//!
//! Records read ahead from the spool go first, then batches just appended, taken in memory when
//! they continue exactly where the reader is, then the spool itself. Each call to the spool
//! carries the commit that is due ([`Progress`]).

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::sleep;
use tracing::error;

use super::{LoopEnd, SinkLoop};
use crate::delivery::ingest::MAX_BATCH;
use crate::delivery::progress::Progress;
use crate::delivery::reader::Records;
use crate::event::Event;
use crate::spool::SpoolError;

/// Whether the last look for events found some.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Intake {
    /// Look again: events may be waiting.
    MayHaveMore,
    /// Nothing new was found: look again only after an append.
    CaughtUp,
}

/// Events taken for delivery.
pub(super) struct Taken {
    /// The events, this sink's redaction applied.
    pub(super) events: Vec<Arc<Event>>,
    /// Seq of the last record they pass: finished once they are settled.
    pub(super) last_seq: u64,
}

impl SinkLoop {
    /// The next events to deliver, `None` when caught up. A read from the spool that fails is
    /// tried again every second, until the shutdown deadline.
    pub(super) async fn next_events(
        &mut self,
        progress: &mut Progress,
    ) -> ControlFlow<LoopEnd, Option<Taken>> {
        loop {
            match self.try_next_events(progress).await {
                Ok(next) => return ControlFlow::Continue(next),
                Err(e) => {
                    error!(sink = %self.name, error = %e, "cannot read the spool; retrying in 1 s");
                    tokio::select! {
                        _ = self.give_up.cancelled() => return ControlFlow::Break(LoopEnd::Interrupted),
                        _ = sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// [`SinkLoop::next_events`], once: records read ahead, else the in-memory tail, else the
    /// spool, with the commit that is due.
    async fn try_next_events(
        &mut self,
        progress: &mut Progress,
    ) -> Result<Option<Taken>, SpoolError> {
        // Records read ahead go first: the tail continues after them.
        self.reader.back().await;
        if let Some(read) = self.reader.take_read_ahead() {
            let records = progress.read_back(read)?;
            return Ok(self.take_records(records, progress));
        }
        if let Some(taken) = self.take_from_tail() {
            if progress.commit_due_from_memory() {
                let upto = progress.take_commit();
                let committed = self.reader.io(upto, false).await;
                // Nothing is read, so nothing fails: a commit's failure is logged where it
                // happens, and the next one covers it.
                let _ = progress.read_back((upto, committed));
            }
            return Ok(Some(taken));
        }
        let read_file = !self.reader.get().caught_up();
        if !read_file && !progress.has_uncommitted() {
            return Ok(None);
        }
        let upto = progress.take_commit();
        let read = self.reader.io(upto, read_file).await;
        let records = progress.read_back((upto, read))?;
        Ok(self.take_records(records, progress))
    }

    /// Records read from the spool, as events. A full read from the file (as many records or
    /// bytes as a read takes): the next records are most likely there too. They are read while
    /// these are decoded and sent (a read's round trip through the blocking pool is a large part
    /// of a backlog drain's loop), carrying the commit that is due by then; it is counted when
    /// the read comes back.
    fn take_records(&mut self, records: Records, progress: &mut Progress) -> Option<Taken> {
        let full = records.len() == MAX_BATCH
            || records.iter().map(|(_, r)| r.len()).sum::<usize>() >= self.reader.read_bytes();
        if full && !self.reader.get().caught_up() {
            self.reader.read_ahead(progress.take_commit());
        }
        let last_seq = records.last()?.0;
        Some(Taken {
            events: self.decode(records),
            last_seq,
        })
    }

    /// Spool records back to events, with this sink's redaction applied.
    fn decode(&self, records: Records) -> Vec<Arc<Event>> {
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

    /// The next events from the in-memory tail, if the tail continues exactly where the reader
    /// is. A batch larger than one read of this sink is read from the spool instead, a read at
    /// a time: the sink's share of `memory_limit` bounds what it takes at once.
    fn take_from_tail(&mut self) -> Option<Taken> {
        loop {
            let (batch, bytes) = self.tail.after(self.reader.get().position())?;
            if bytes > self.reader.read_bytes() {
                return None;
            }
            // `None`: the records in between (dead-letter replays, batches pushed out of the
            // tail) are read from the spool first.
            let mine = self
                .reader
                .get()
                .take_appended(batch.first_seq, &batch.masks, batch.end)?;
            if mine.is_empty() {
                // Nothing of this sink's.
                continue;
            }
            let last_seq = batch.last_seq();
            let events = mine
                .into_iter()
                .map(|i| self.redacted(batch.events[i].clone()))
                .collect();
            return Some(Taken { events, last_seq });
        }
    }

    /// Applies this sink's redaction; copies the event only when something was removed.
    fn redacted(&self, event: Arc<Event>) -> Arc<Event> {
        self.redaction.redacted(&self.name, event)
    }
}
