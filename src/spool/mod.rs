//! The durable spool: every event read from Chatwoot is appended here, with the set of sinks its
//! routes chose, before any sink sees it; each sink reads from its own cursor and commits when
//! delivery is confirmed.
//!
//! ActionCable has no replay: an event that was read but not spooled is gone for good if the
//! process dies. The spool turns "read from the socket" into "on disk", so sinks can be slow,
//! down, or restarted without losing anything (at-least-once: a restart re-delivers the window a
//! sink had read but not yet committed).
//!
//! # Why a segment log, not an embedded database
//! The access pattern is a queue with several independent consumers: appends at the tail,
//! sequential reads, and deletion from the head once everyone has moved past. A segment log does
//! exactly that and nothing else:
//! - appends are sequential, and a whole batch is encoded into one buffer and written with one
//!   `write` syscall (group writes);
//! - once `write` returns, the data is in the page cache, which survives a *process* crash; only
//!   a *machine* crash needs `fsync`, and that can run on a timer ([`FsyncMode::Interval`])
//!   instead of once per commit;
//! - a sink's cursor is one `u64`, persisted lazily in a tiny file; committing costs no I/O;
//! - space comes back by deleting whole segment files, never by compaction.
//!
//! redb (or any B-tree store with transactions) makes every durable commit an `fsync`, which at
//! thousands of events per second costs more than the rest of the bridge; its non-durable commits
//! are rolled back after a process crash, which is precisely the failure the spool exists for.
//! sled, yaque and queue-file are unmaintained.
//!
//! # Durability ([`FsyncMode`])
//! A *process* crash loses nothing in any mode: an append returns after `write`, when the bytes
//! are in the kernel's page cache. A *machine* crash (power, kernel panic) may lose what was not
//! yet fsynced:
//! - `Always`: nothing that `append` acknowledged (each append ends with `fdatasync`);
//! - `Interval`: up to one interval; the caller calls [`Spool::sync`] every interval and at shutdown;
//! - `Never`: whatever the OS had not written back yet (usually up to ~30 s on Linux).
//!
//! Committed cursors are persisted lazily (on [`Spool::sync`], when the last handle is dropped, and
//! otherwise at most every `PERSIST_EVERY_COMMITS` commits or `PERSIST_INTERVAL`); a crash
//! therefore re-delivers what was committed since the last persist, never less.
//!
//! # On disk
//! ```text
//! <dir>/00000000000000000001.log   segment whose first record has seq 1 (20 decimal digits)
//! <dir>/00000000000000052113.log   the next one; the last segment is the active one
//! <dir>/sinks.json                 sink name → mask bit, committed seq, backlog; next seq
//! ```
//! A record is a 24-byte header then the payload, all integers little-endian:
//! ```text
//! u32 payload length | u32 CRC32 of (length, seq, mask, payload) | u64 seq | u64 sink mask | payload
//! ```
//! Sequence numbers start at 1, grow by one per record and never go back, across restarts
//! (`sinks.json` remembers the next one in case the tail was lost). A segment's records are the
//! seqs from its base (in the file name) up to the next segment's base. A batch always goes into
//! one segment (one write), so a segment may exceed [`SpoolConfig::segment_limit`] by up to one
//! batch.
//!
//! Recovery at open scans only the last segment: a torn tail (what a process crash leaves) is
//! cut off; damage with intact records after it (a machine crash that wrote pages back out of
//! order, bit rot) is skipped, counted and logged, and the records after it are kept (see
//! `repair`). Older segments were complete before the next one was
//! created; if one is damaged anyway (bit rot, or a machine crash under `Never`), readers skip
//! from the bad record to the next segment and log it.
//!
//! # Memory
//! Independent of the backlog: per segment, its base seq and size; per sink, a few counters;
//! per reader, one buffered file handle and the seqs it has read but not committed yet.
//!
//! # Code
//! - this file: the [`Spool`] handle and its API, the configuration, the reports;
//! - `format`: segment file names, record framing and CRC, reading a segment record by record;
//! - `state`: what the lock guards, and the segment lifecycle (roll, reclaim, drop the oldest);
//! - `registry`: the sinks, their mask bits and cursors, `sinks.json` and its lazy persistence;
//! - `membership`: sinks joining and leaving while the spool is open (a config reload);
//! - `open`: recovery at open, step by step;
//! - `repair`: the active segment's repair at open (cut a torn tail, resynchronise past damage);
//! - `append`: the append path, `when_full` included;
//! - `evict`: [`Eviction`], pushing the oldest segment out for `when_full: dead_letter`;
//! - `reader`: [`SpoolReader`], one sink's reading and commits;
//! - `durable`: directory fsyncs, so that created and renamed files survive a machine crash;
//! - `usage`: [`SpoolUsage`], the size and each sink's backlog, for metrics;
//! - `error`: [`SpoolError`].

mod append;
#[cfg(test)]
mod crash_tests;
mod durable;
mod error;
mod evict;
mod format;
mod membership;
#[cfg(test)]
mod model_tests;
mod open;
mod reader;
mod registry;
mod repair;
mod state;
#[cfg(test)]
mod test_support;
mod usage;
#[cfg(test)]
pub(crate) use test_support::{inject_fault, DiskFault, FaultGuard};

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tracing::error;

use append::WhenNoRoom;
#[cfg(test)]
pub(crate) use durable::record as dir_fsyncs;
pub(crate) use durable::{create_dir_durably, fsync_dir};
use error::io_err;
pub use error::SpoolError;
pub use evict::{Eviction, UndeliveredRecord};
use format::segment_path;
pub use format::HEADER_BYTES;
pub use reader::SpoolReader;
use registry::write_state_file;
pub(crate) use registry::MAX_SINKS;
use state::State;
pub use usage::{SinkBacklog, SpoolUsage};

/// Largest spool segment by default; see [`SpoolConfig::segment_limit`] for smaller spools.
const MAX_SEGMENT_BYTES: u64 = 64 << 20;

/// Where, how big, and how careful the spool is; also the `spool:` section of the config file.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    /// Directory holding the segments and `sinks.json`; created if missing.
    pub dir: PathBuf,
    /// Cap on the total size of segment files; what happens past it is `when_full`.
    pub max_bytes: u64,
    /// A new segment is started once the active one would grow past this, or past
    /// [`SpoolConfig::segment_limit`] for a small spool. Smaller segments reclaim space sooner;
    /// larger ones mean fewer files.
    pub segment_bytes: u64,
    /// When appends are fsynced (see the module doc for what each mode can lose).
    pub fsync: FsyncMode,
    /// How often the bridge fsyncs under [`FsyncMode::Interval`].
    pub fsync_interval: Duration,
    /// What an append does when the spool is at `max_bytes`.
    pub when_full: WhenFull,
    /// The fraction of `max_bytes` (above 0, at most 1) a dead-letter replay may fill: it puts
    /// letters back only while the spool's used bytes stay within it, so live events always
    /// have the rest ([`Spool::append_replayed`]).
    pub replay_share: f64,
}

impl SpoolConfig {
    /// The defaults: 1 GiB cap, 64 MiB segments, fsync on the bridge's 100 ms timer, push the
    /// oldest segment out to the dead letters of the sinks that lag when full, replays fill at
    /// most half.
    pub fn new(dir: impl Into<PathBuf>) -> SpoolConfig {
        SpoolConfig {
            dir: dir.into(),
            max_bytes: 1 << 30,
            segment_bytes: MAX_SEGMENT_BYTES,
            fsync: FsyncMode::Interval,
            fsync_interval: Duration::from_millis(100),
            when_full: WhenFull::DeadLetter,
            replay_share: 0.5,
        }
    }

    /// The bytes a replay may fill the spool up to: `replay_share` of `max_bytes`.
    pub fn replay_bytes(&self) -> u64 {
        // An f64 holds every size below 2^53 bytes exactly; the share is at most 1.
        ((self.max_bytes as f64) * self.replay_share.clamp(0.0, 1.0)) as u64
    }

    /// The size at which a segment is closed: at most an eighth of the spool (and at least
    /// 64 KiB), so `drop_oldest` and `dead_letter` free a fraction of a small spool rather than
    /// all of it.
    pub fn segment_limit(&self) -> u64 {
        self.segment_bytes
            .min((self.max_bytes / 8).clamp(1 << 16, MAX_SEGMENT_BYTES))
    }
}

/// When data reaches the disk itself rather than the page cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FsyncMode {
    /// fsync every `fsync_interval` and at shutdown: a machine crash loses at most one interval.
    #[default]
    Interval,
    /// Every append ends with an fsync: slowest, loses nothing acknowledged on a machine crash.
    Always,
    /// Leave it to the OS.
    Never,
}

/// What an append does when the spool is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Push the oldest segment out: its records that a sink has not delivered go to that sink's
    /// dead letters first, so only the sinks that lag pay, and nothing is lost.
    #[default]
    DeadLetter,
    /// Refuse the records that do not fit (the tail of the batch), for every sink; keep the
    /// backlog.
    DropNewest,
    /// Delete the oldest whole segments until the batch fits, even if sinks still needed them.
    DropOldest,
}

/// A set of sinks, one bit each; bits are stable per sink name across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkMask(
    /// Bit `n` set: the record goes to the sink whose registry bit is `n`.
    pub u64,
);

/// What became of an appended batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReport {
    /// Seq of the first record written; the others follow one by one. `None` if none was.
    /// With `DropNewest` (and [`Spool::append_replayed`]) the written records are the first
    /// `appended` of the batch; with `DropOldest` (only when the batch alone exceeds
    /// `max_bytes`) the last `appended`.
    pub first_seq: Option<u64>,
    /// Records written.
    pub appended: usize,
    /// Records of this batch refused because the spool was full (`DropNewest`, or the replay's
    /// share used up for [`Spool::append_replayed`], where they are not lost and not counted
    /// as dropped).
    pub dropped_newest: u64,
    /// Records lost to make room (`DropOldest`): spooled ones that some configured sink had not
    /// committed, plus records of this batch that could not fit at all.
    pub dropped_oldest: u64,
    /// Records of this batch not written because the whole batch did not fit (`DeadLetter`):
    /// nothing of it was written, nothing is lost or counted as dropped; the caller makes room
    /// with [`Spool::evict_oldest`] and appends it again.
    pub awaiting_room: u64,
    /// Where the file continues after the last record written; lets a reader that took these
    /// records in memory ([`SpoolReader::take_appended`]) resume reading the file there.
    pub end: Option<SpoolPosition>,
}

/// A place in the spool's files: a segment (by its base seq) and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolPosition {
    /// Base seq of the segment (also its file name).
    pub segment: u64,
    /// Byte offset in that segment's file.
    pub offset: u64,
}

/// A snapshot of the spool's counters (read by tests; nothing outside the spool needs them yet).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpoolStats {
    /// Total size of the segment files.
    pub bytes: u64,
    /// Number of segment files, the active one included.
    pub segments: usize,
    /// Seq of the last record appended, 0 if there never was one.
    pub last_seq: u64,
    /// Every sink in the registry, configured or not.
    pub sinks: Vec<SinkStats>,
    /// Records refused by `DropNewest` since open.
    pub dropped_newest: u64,
    /// Records lost to `DropOldest` since open.
    pub dropped_oldest: u64,
}

/// One sink's progress.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SinkStats {
    /// The sink's configured name, as given to [`Spool::open`].
    pub name: String,
    /// Every record of this sink up to this seq is done.
    pub committed: u64,
    /// Records routed to this sink and not committed yet.
    pub backlog: u64,
    /// Records of this sink deleted by `DropOldest` before it committed them (persisted).
    pub lost: u64,
    /// False for a sink that is in the registry but not in the current configuration.
    pub configured: bool,
}

// The bridge shares the spool between the ingest thread and the sink loops, and moves
// readers into `spawn_blocking`: keep both Send + Sync.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Spool>();
    send_sync::<SpoolReader>();
};

/// The spool: cheap to clone, shareable between threads.
#[derive(Clone)]
pub struct Spool {
    /// Shared with every clone and every reader.
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.config.dir)
            .finish_non_exhaustive()
    }
}

/// What all handles share.
struct Inner {
    /// Immutable after open.
    config: SpoolConfig,
    /// Everything mutable; held briefly (readers do their file I/O outside it).
    state: Mutex<State>,
    /// Carries the next seq to be assigned, so readers can wait for appends without polling.
    appended: watch::Sender<u64>,
    /// Serializes writes of the cursor file, which happen outside `state`: an fsync must not
    /// hold up appends and reads. Taken before `state` (or with `try_lock` while holding it).
    persisting: Mutex<()>,
}

impl Spool {
    /// Opens or creates the spool in `config.dir` for the sinks named in `sinks`.
    ///
    /// Recovers after a crash: a torn or corrupt tail in the last segment is truncated away
    /// (damage with intact records after it is skipped and they are kept),
    /// cursors are loaded. Sinks keep their mask bit across restarts; a new sink starts at the
    /// current end; a sink no longer configured stays in the registry (it resumes if it comes
    /// back) but no longer holds back reclaiming.
    pub fn open(config: SpoolConfig, sinks: &[String]) -> Result<Spool, SpoolError> {
        let names = open::validate(&config, sinks)?;
        let state = State::recover(&config, &names)?;
        let (appended, _) = watch::channel(state.next_seq);
        Ok(Spool {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                persisting: Mutex::new(()),
                appended,
            }),
        })
    }

    /// The spool's directory, which keys the faults and panics tests inject.
    #[cfg(test)]
    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.inner.config.dir
    }

    /// The cap on the spool's size (`spool.max_bytes`).
    pub fn max_bytes(&self) -> u64 {
        self.inner.config.max_bytes
    }

    /// The size at which a segment is closed ([`SpoolConfig::segment_limit`]): a batch no larger
    /// than this never makes a segment larger, so pushing the oldest segment out takes at most
    /// this much of the backlog at once.
    pub fn segment_limit(&self) -> u64 {
        self.inner.config.segment_limit()
    }

    /// The mask of the named sinks; names not configured are ignored.
    pub fn mask(&self, sinks: &[&str]) -> SinkMask {
        let state = self.inner.lock();
        let mut mask = 0;
        for name in sinks {
            if let Some(i) = state.configured_sink(name) {
                mask |= 1 << state.sinks[i].bit;
            }
        }
        SinkMask(mask)
    }

    /// Appends a batch with one `write`, fsynced when the policy is `Always`.
    ///
    /// When the spool would exceed `max_bytes`: `DropNewest` writes the records that fit and
    /// refuses the rest; `DropOldest` deletes the oldest whole segments until the batch fits;
    /// `DeadLetter` writes nothing and reports the batch as awaiting room (the caller pushes the
    /// oldest segment out with [`Spool::evict_oldest`], then appends again).
    /// A record larger than `max_bytes` fails the whole batch before anything is written.
    pub fn append(&self, records: &[(&[u8], SinkMask)]) -> Result<AppendReport, SpoolError> {
        self.append_then(records, |_| {})
    }

    /// [`Spool::append`], calling `before_wake` with the report of a successful write before
    /// readers waiting in [`SpoolReader::wait_for_data`] are woken: whatever it hands the
    /// readers in memory is there when they look.
    pub fn append_then(
        &self,
        records: &[(&[u8], SinkMask)],
        before_wake: impl FnOnce(&AppendReport),
    ) -> Result<AppendReport, SpoolError> {
        let when_no_room = WhenNoRoom::Policy(self.inner.config.when_full);
        self.append_with(records, when_no_room, before_wake)
    }

    /// Appends replayed dead letters, which are safe in their file until they are in: only the
    /// head of the batch that keeps the spool's used bytes within
    /// [`SpoolConfig::replay_bytes`], whatever `when_full` says. So a replay never pushes out
    /// records no sink has delivered, what it leaves out is not counted as refused, and live
    /// events always have the rest of `max_bytes`: were the replay to fill the spool, they would
    /// be the ones dropped. A first record larger than that share on its own goes in alone
    /// while the used bytes are below the share (and it fits in `max_bytes`): the replay then
    /// holds at most one letter more than its share, and waits until it is back below.
    pub fn append_replayed(
        &self,
        records: &[(&[u8], SinkMask)],
    ) -> Result<AppendReport, SpoolError> {
        self.append_with(records, WhenNoRoom::ReplayShare, |_| {})
    }

    /// Fsyncs the active segment and persists the cursors.
    pub fn sync(&self) -> Result<(), SpoolError> {
        self.inner.sync()
    }

    /// A reader for `sink`, positioned just after its committed cursor. Use one reader per sink:
    /// readers of the same sink share the cursor but not their read positions.
    pub fn reader(&self, sink: &str) -> Result<SpoolReader, SpoolError> {
        let state = self.inner.lock();
        let Some(index) = state.configured_sink(sink) else {
            return Err(SpoolError::UnknownSink(sink.to_string()));
        };
        let committed = state.sinks[index].committed;
        let bit = state.sinks[index].bit;
        drop(state);
        Ok(SpoolReader::new(
            self.inner.clone(),
            index,
            bit,
            sink,
            committed,
        ))
    }

    /// Counters: sizes, last seq, every sink's cursor and backlog, drops.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> SpoolStats {
        let state = self.inner.lock();
        SpoolStats {
            bytes: state.total_bytes,
            segments: state.segments.len(),
            last_seq: state.next_seq - 1,
            sinks: state
                .sinks
                .iter()
                .map(|s| SinkStats {
                    name: s.name.clone(),
                    committed: s.committed,
                    backlog: s.pending,
                    lost: s.lost,
                    configured: s.configured,
                })
                .collect(),
            dropped_newest: state.dropped_newest,
            dropped_oldest: state.dropped_oldest,
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than stopping the spool would, so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fsyncs what was appended so far and writes the cursors, without holding the state lock
    /// during either fsync: appends and reads go on meanwhile. A segment rolled over in between
    /// was fsynced by the roll.
    fn sync(&self) -> Result<(), SpoolError> {
        let _persisting = self.persisting.lock().unwrap_or_else(|e| e.into_inner());
        let (active, base) = {
            let state = self.lock();
            let base = state.segments.back().map_or(0, |s| s.base);
            let active = state.active.try_clone().map_err(io_err(
                "fsync spool segment",
                &segment_path(&self.config.dir, base),
            ))?;
            (active, base)
        };
        #[cfg(test)]
        test_support::injected_fault(&self.config.dir).map_err(io_err(
            "fsync spool segment",
            &segment_path(&self.config.dir, base),
        ))?;
        active.sync_data().map_err(io_err(
            "fsync spool segment",
            &segment_path(&self.config.dir, base),
        ))?;
        let json = self.lock().snapshot(&self.config.dir)?;
        write_state_file(&self.config.dir, &json)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: a graceful close. Make the cursors exact so a restart
        // re-delivers nothing that was committed.
        let dir = self.config.dir.clone();
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if self.config.fsync != FsyncMode::Never {
            if let Err(e) = state.active.sync_data() {
                error!(dir = %dir.display(), error = %e, "cannot fsync spool at close");
            }
        }
        if let Err(e) = state.persist(&dir) {
            error!(error = %e, "cannot persist spool cursors at close");
        }
    }
}
