//! What the spool's lock guards: the live segments, the active file, the next seq, the sink
//! registry and the counters; and the segment lifecycle on it (start a new segment, delete the
//! ones nobody needs, or, when full, the oldest one anyway; `evict` pushes it out instead).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::time::Instant;

use super::error::{io_err, SpoolError};
use super::format::{segment_path, sync_dir, Next, SegmentCursor};
use super::registry::{self, write_state_file, SinkState, PERSIST_EVERY_COMMITS, PERSIST_INTERVAL};
use super::{FsyncMode, SpoolConfig};

/// The mutable part of the spool.
pub(super) struct State {
    /// Live segments, oldest first; never empty; the last one is the one appended to.
    pub(super) segments: VecDeque<Segment>,
    /// Write handle of the last segment.
    pub(super) active: File,
    /// Seq the next appended record gets.
    pub(super) next_seq: u64,
    /// Sum of `segments[..].bytes`, compared with `max_bytes` on every append.
    pub(super) total_bytes: u64,
    /// The registry: configured sinks and those remembered from earlier configurations.
    pub(super) sinks: Vec<SinkState>,
    /// Records refused since open, for stats: the operator's sign that the cap is too small.
    pub(super) dropped_newest: u64,
    /// Records deleted unread since open, for stats: data some sink never got.
    pub(super) dropped_oldest: u64,
    /// Commits since cursors were last written, for lazy persistence.
    pub(super) dirty_commits: u32,
    /// When cursors were last written.
    pub(super) last_persist: Instant,
    /// Encoding buffer, kept to avoid an allocation per batch.
    pub(super) buf: Vec<u8>,
    /// Set when a failed write left bytes we could not truncate: the next append starts a new
    /// segment rather than write after garbage.
    pub(super) must_roll: bool,
}

/// One segment file's bookkeeping; its last seq is the next segment's base minus one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Segment {
    /// Seq of its first record (also its file name).
    pub(super) base: u64,
    /// Bytes of whole records in it; readers never read past this.
    pub(super) bytes: u64,
}

impl State {
    /// A freshly opened spool's state: nothing dropped or committed since open.
    pub(super) fn new(
        segments: VecDeque<Segment>,
        active: File,
        next_seq: u64,
        sinks: Vec<SinkState>,
    ) -> State {
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        State {
            segments,
            active,
            next_seq,
            total_bytes,
            sinks,
            dropped_newest: 0,
            dropped_oldest: 0,
            dirty_commits: 0,
            last_persist: Instant::now(),
            buf: Vec::new(),
            must_roll: false,
        }
    }

    /// Seq just past segment `i`'s last record.
    pub(super) fn segment_end(&self, i: usize) -> u64 {
        match self.segments.get(i + 1) {
            Some(next) => next.base,
            None => self.next_seq,
        }
    }

    /// Index of the segment that holds (or would hold) `seq`; `seq` must not be before the oldest.
    pub(super) fn locate(&self, seq: u64) -> usize {
        self.segments
            .partition_point(|s| s.base <= seq)
            .saturating_sub(1)
    }

    /// Index of the live segment whose base is `base`, `None` once it was deleted.
    pub(super) fn index_of(&self, base: u64) -> Option<usize> {
        self.segments.binary_search_by_key(&base, |s| s.base).ok()
    }

    /// Seq of the oldest record still on disk (or the next seq when there is none).
    pub(super) fn oldest_base(&self) -> u64 {
        self.segments.front().map_or(self.next_seq, |s| s.base)
    }

    /// The lowest committed seq among configured sinks: everything up to it can go.
    pub(super) fn reclaimable_upto(&self) -> u64 {
        self.sinks
            .iter()
            .filter(|s| s.configured)
            .map(|s| s.committed)
            .min()
            .unwrap_or(self.next_seq.saturating_sub(1))
    }

    /// Starts a new, empty active segment at `next_seq`.
    pub(super) fn roll(&mut self, config: &SpoolConfig) -> Result<(), SpoolError> {
        if config.fsync != FsyncMode::Never {
            let old = segment_path(&config.dir, self.segments.back().map_or(0, |s| s.base));
            self.active
                .sync_data()
                .map_err(io_err("fsync spool segment", &old))?;
        }
        let base = self.next_seq;
        let path = segment_path(&config.dir, base);
        self.active = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err("create spool segment", &path))?;
        if config.fsync != FsyncMode::Never {
            sync_dir(&config.dir)?;
        }
        self.segments.push_back(Segment { base, bytes: 0 });
        self.must_roll = false;
        Ok(())
    }

    /// Deletes sealed segments every configured sink has committed past.
    pub(super) fn reclaim(&mut self, dir: &Path) -> Result<(), SpoolError> {
        let upto = self.reclaimable_upto();
        while self.segments.len() > 1 && self.segment_end(0) <= upto.saturating_add(1) {
            self.delete_oldest(dir)?;
        }
        Ok(())
    }

    /// Seals and deletes the active segment when every configured sink has committed all of
    /// it. Reclaiming never deletes the active segment, so without this a spool whose sinks
    /// are all done could still count that segment as used until the next append rolls it:
    /// up to a whole batch (a replay's batch can be half the spool), refused room that nobody
    /// needs.
    pub(super) fn reclaim_delivered_active(
        &mut self,
        config: &SpoolConfig,
    ) -> Result<(), SpoolError> {
        let active_bytes = self.segments.back().map_or(0, |s| s.bytes);
        if active_bytes > 0 && self.reclaimable_upto().saturating_add(1) >= self.next_seq {
            self.roll(config)?;
            self.reclaim(&config.dir)?;
        }
        Ok(())
    }

    /// Deletes the oldest segment's file (gone already is fine) and forgets it.
    pub(super) fn delete_oldest(&mut self, dir: &Path) -> Result<(), SpoolError> {
        let seg = self.segments[0];
        let path = segment_path(dir, seg.base);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("delete spool segment", &path)(e)),
        }
        self.segments.pop_front();
        self.total_bytes -= seg.bytes;
        Ok(())
    }

    /// Deletes the oldest segment although sinks may still need it (`DropOldest`), counting for
    /// each configured sink the records it had not committed. Returns how many records were
    /// lost to at least one sink. The count reads the segment under the lock (tens of ms for a
    /// 64 MiB segment), which only happens when the spool is full and already losing data.
    pub(super) fn drop_oldest(&mut self, dir: &Path) -> Result<u64, SpoolError> {
        let seg = self.segments[0];
        let end = self.segment_end(0);
        let mut lost_records = 0;
        if self.reclaimable_upto().saturating_add(1) < end {
            let path = segment_path(dir, seg.base);
            let mut cursor = SegmentCursor::open(path, seg.base)?;
            let mut payload = Vec::new();
            while let Next::Record { seq, mask } = cursor.next(seg.bytes, u64::MAX, &mut payload)? {
                lost_records += u64::from(self.count_lost(seq, mask));
            }
        }
        self.delete_oldest(dir)?;
        Ok(lost_records)
    }

    /// Counts a deleted record as lost (and off the backlog) for every configured sink it was
    /// routed to and that had not committed it; whether there was one.
    fn count_lost(&mut self, seq: u64, mask: u64) -> bool {
        let mut lost_any = false;
        for sink in self.sinks.iter_mut().filter(|s| s.configured) {
            if mask & (1 << sink.bit) != 0 && seq > sink.committed {
                sink.lost += 1;
                sink.pending = sink.pending.saturating_sub(1);
                lost_any = true;
            }
        }
        lost_any
    }
}

impl State {
    /// The registry entry of the configured sink `name`.
    pub(super) fn configured_sink(&self, name: &str) -> Option<usize> {
        self.sinks
            .iter()
            .position(|s| s.configured && s.name == name)
    }

    /// Whether enough commits or time went by since the cursors were last written.
    pub(super) fn persist_due(&self) -> bool {
        self.dirty_commits >= PERSIST_EVERY_COMMITS
            || self.last_persist.elapsed() >= PERSIST_INTERVAL
    }

    /// Writes the cursor file now, under the lock (at open and at close).
    pub(super) fn persist(&mut self, dir: &Path) -> Result<(), SpoolError> {
        let json = self.snapshot(dir)?;
        write_state_file(dir, &json)
    }

    /// The cursor file's content now; counts as persisted (the caller writes it).
    pub(super) fn snapshot(&mut self, dir: &Path) -> Result<Vec<u8>, SpoolError> {
        let json = registry::encode(dir, self.next_seq, &self.sinks)?;
        self.dirty_commits = 0;
        self.last_persist = Instant::now();
        Ok(json)
    }
}
