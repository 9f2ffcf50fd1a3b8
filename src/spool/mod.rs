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
//! # Durability ([`FsyncPolicy`])
//! A *process* crash loses nothing in any mode: an append returns after `write`, when the bytes
//! are in the kernel's page cache. A *machine* crash (power, kernel panic) may lose what was not
//! yet fsynced:
//! - `Always`: nothing that `append` acknowledged (each append ends with `fdatasync`);
//! - `Interval`: up to one interval; the caller calls [`Spool::sync`] every interval and at shutdown;
//! - `Never`: whatever the OS had not written back yet (usually up to ~30 s on Linux).
//!
//! Committed cursors are persisted lazily (on [`Spool::sync`], when the last handle is dropped, and
//! otherwise at most every [`PERSIST_EVERY_COMMITS`] commits or [`PERSIST_INTERVAL`]); a crash
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
//! one segment (one write), so a segment may exceed `segment_bytes` by up to one batch.
//!
//! Recovery at open scans only the last segment and cuts it at its first bad record (a torn
//! write leaves nothing valid after it). Older segments were complete before the next one was
//! created; if one is damaged anyway (bit rot, or a machine crash under `Never`), readers skip
//! from the bad record to the next segment and log it.
//!
//! # Memory
//! Independent of the backlog: per segment, its base seq and size; per sink, a few counters;
//! per reader, one buffered file handle and the seqs it has read but not committed yet.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Size of a record header: length, CRC, seq, mask.
pub const HEADER_BYTES: u64 = 24;

/// Most sinks a spool serves: one bit each in a `u64` mask.
pub const MAX_SINKS: usize = 64;

/// Cursors are persisted at least this often while commits happen...
pub const PERSIST_INTERVAL: Duration = Duration::from_millis(250);

/// ...and at least every this many commits, so a crash re-delivers a bounded window.
pub const PERSIST_EVERY_COMMITS: u32 = 1024;

/// Name of the registry and cursor file inside the spool directory.
const STATE_FILE: &str = "sinks.json";

/// Version of `sinks.json`, so a future layout can tell old files apart.
const STATE_VERSION: u32 = 1;

/// Largest spool segment by default; see [`SpoolConfig::segment_limit`] for smaller spools.
const MAX_SEGMENT_BYTES: u64 = 64 << 20;

/// Where, how big, and how careful the spool is; also the `spool:` section of the config file.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    /// Directory holding the segments and `sinks.json`; created if missing.
    pub dir: PathBuf,
    /// Cap on the total size of segment files; what happens past it is `when_full`.
    pub max_bytes: u64,
    /// A new segment is started once the active one would grow past this (or past an eighth of
    /// `max_bytes`, whichever is smaller). Smaller segments reclaim space sooner; larger ones
    /// mean fewer files.
    pub segment_bytes: u64,
    /// When appends are fsynced (see the module doc for what each mode can lose).
    pub fsync: FsyncMode,
    /// How often the bridge fsyncs under [`FsyncMode::Interval`].
    pub fsync_interval: Duration,
    /// What an append does when the spool is at `max_bytes`.
    pub when_full: WhenFull,
}

impl SpoolConfig {
    /// The defaults: 1 GiB cap, 64 MiB segments, fsync every 100 ms, drop the newest when full.
    pub fn new(dir: impl Into<PathBuf>) -> SpoolConfig {
        SpoolConfig {
            dir: dir.into(),
            max_bytes: 1 << 30,
            segment_bytes: MAX_SEGMENT_BYTES,
            fsync: FsyncMode::Interval,
            fsync_interval: Duration::from_millis(100),
            when_full: WhenFull::DropNewest,
        }
    }

    /// The size at which a segment is closed: at most an eighth of the spool (and at least
    /// 64 KiB), so `drop_oldest` frees a fraction of a small spool rather than all of it.
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
    /// Refuse the records that do not fit (the tail of the batch); keep the backlog.
    #[default]
    DropNewest,
    /// Delete the oldest whole segments until the batch fits, even if sinks still needed them.
    DropOldest,
}

/// A set of sinks, one bit each; bits are stable per sink name across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkMask(pub u64);

/// What became of an appended batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReport {
    /// Seq of the first record written; the others follow one by one. `None` if none was.
    /// With `DropNewest` (and [`Spool::append_within_room`]) the written records are the first
    /// `appended` of the batch; with `DropOldest` (only when the batch alone exceeds
    /// `max_bytes`) the last `appended`.
    pub first_seq: Option<u64>,
    /// Records written.
    pub appended: usize,
    /// Records of this batch refused because the spool was full (`DropNewest`, or no room left
    /// for [`Spool::append_within_room`], where they are not lost and not counted as dropped).
    pub dropped_newest: u64,
    /// Records lost to make room (`DropOldest`): spooled ones that some configured sink had not
    /// committed, plus records of this batch that could not fit at all.
    pub dropped_oldest: u64,
    /// Where the file continues after the last record written; lets a reader that took these
    /// records in memory ([`SpoolReader::take_appended`]) resume reading the file there.
    pub end: Option<SpoolPosition>,
}

/// A place in the spool's files: a segment (by its base seq) and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolPosition {
    pub segment: u64,
    pub offset: u64,
}

/// A snapshot of the spool's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolStats {
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStats {
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

/// Why a spool operation failed; I/O errors name the operation and the file.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed; `op` says which ("write spool segment", ...).
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `sinks.json` does not parse, or a record in the middle of the active segment is bad.
    #[error("corrupt spool file {}: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// A record that could never fit, whatever is deleted.
    #[error(
        "spool record of {size} bytes (header included) exceeds the spool's max_bytes of {max}"
    )]
    RecordTooLarge { size: u64, max: u64 },
    /// Masks are `u64`s.
    #[error("{count} sinks configured; a spool serves at most {MAX_SINKS}")]
    TooManySinks { count: usize },
    /// `reader` was asked for a sink that was not passed to `open`.
    #[error("sink {0:?} is not configured for this spool")]
    UnknownSink(String),
    /// Zero sizes.
    #[error("invalid spool configuration: {0}")]
    Config(String),
}

/// Builds the `map_err` closure for an I/O error on `path`.
fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> SpoolError + 'p {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

// The integrator shares the spool between the ingest thread and the sink loops, and moves
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

/// The mutable part of the spool.
struct State {
    /// Live segments, oldest first; never empty; the last one is the one appended to.
    segments: VecDeque<Segment>,
    /// Write handle of the last segment.
    active: File,
    /// Seq the next appended record gets.
    next_seq: u64,
    /// Sum of `segments[..].bytes`, compared with `max_bytes` on every append.
    total_bytes: u64,
    /// The registry: configured sinks and those remembered from earlier configurations.
    sinks: Vec<SinkState>,
    /// Records refused since open, for stats: the operator's sign that the cap is too small.
    dropped_newest: u64,
    /// Records deleted unread since open, for stats: data some sink never got.
    dropped_oldest: u64,
    /// Commits since cursors were last written, for lazy persistence.
    dirty_commits: u32,
    /// When cursors were last written.
    last_persist: Instant,
    /// Encoding buffer, kept to avoid an allocation per batch.
    buf: Vec<u8>,
    /// Set when a failed write left bytes we could not truncate: the next append starts a new
    /// segment rather than write after garbage.
    must_roll: bool,
}

/// One segment file's bookkeeping; its last seq is the next segment's base minus one.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Seq of its first record (also its file name).
    base: u64,
    /// Bytes of whole records in it; readers never read past this.
    bytes: u64,
}

/// One sink of the registry.
#[derive(Debug, Clone)]
struct SinkState {
    /// Configured name; the key of the registry.
    name: String,
    /// Its bit in masks, stable across restarts.
    bit: u8,
    /// Every record of this sink with seq <= committed is done.
    committed: u64,
    /// Records routed to it after `committed`, for stats.
    pending: u64,
    /// Records deleted by `DropOldest` before it committed them.
    lost: u64,
    /// Only configured sinks hold back reclaiming and count losses.
    configured: bool,
}

/// Layout of `sinks.json`.
#[derive(Serialize, Deserialize)]
struct StateFile {
    /// Layout version.
    version: u32,
    /// Seq the next record gets; keeps seqs monotonic when the log's tail was lost.
    next_seq: u64,
    /// The registry with each sink's cursor.
    sinks: Vec<SinkEntry>,
}

/// One sink in `sinks.json`.
#[derive(Serialize, Deserialize)]
struct SinkEntry {
    /// The key: bits follow names, not positions in the configuration.
    name: String,
    /// Which bit of a record's mask is this sink's.
    bit: u8,
    /// Where the sink resumes after a restart.
    committed: u64,
    /// Backlog at the time of writing; records appended afterwards are counted at open.
    pending: u64,
    /// Kept across restarts so that losses stay visible in stats.
    lost: u64,
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn record_crc(len: u32, seq: u64, mask: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(&seq.to_le_bytes());
    hasher.update(&mask.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn encode_record(buf: &mut Vec<u8>, seq: u64, mask: u64, payload: &[u8]) {
    // Callers have checked that the payload fits in a u32.
    let len = payload.len() as u32;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&record_crc(len, seq, mask, payload).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&mask.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// What the next bytes of a segment hold.
enum Next {
    /// A whole, intact record; its payload is in the caller's buffer.
    Record { seq: u64, mask: u64 },
    /// The record's seq is past the caller's stop point; nothing was consumed.
    Stop,
    /// Exactly at the limit.
    End,
    /// A partial or corrupt record starts here.
    Torn(String),
}

/// Sequential reading of one segment file, up to a byte limit the caller knows to be written.
struct SegmentCursor {
    /// For error messages, and to reopen.
    path: PathBuf,
    /// Base seq of the segment, to tell whether it still exists.
    base: u64,
    /// Buffered so that small records cost no syscall each.
    reader: BufReader<File>,
    /// Byte offset of the next record.
    offset: u64,
}

impl SegmentCursor {
    fn open(path: PathBuf, base: u64) -> Result<SegmentCursor, SpoolError> {
        let file = File::open(&path).map_err(io_err("open spool segment", &path))?;
        Ok(SegmentCursor {
            reader: BufReader::with_capacity(64 * 1024, file),
            path,
            base,
            offset: 0,
        })
    }

    /// Moves to `offset`, the start of a record.
    fn seek_to(&mut self, offset: u64) -> Result<(), SpoolError> {
        self.reader
            .seek(SeekFrom::Start(offset))
            .map_err(io_err("seek in spool segment", &self.path))?;
        self.offset = offset;
        Ok(())
    }

    /// Reads the record at `offset` into `payload`, unless its seq is past `stop_after`.
    fn next(
        &mut self,
        limit: u64,
        stop_after: u64,
        payload: &mut Vec<u8>,
    ) -> Result<Next, SpoolError> {
        if self.offset >= limit {
            return Ok(Next::End);
        }
        if limit - self.offset < HEADER_BYTES {
            return Ok(Next::Torn(format!(
                "partial header at offset {}",
                self.offset
            )));
        }
        let mut header = [0u8; HEADER_BYTES as usize];
        self.reader
            .read_exact(&mut header)
            .map_err(io_err("read spool segment", &self.path))?;
        let len = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let mask = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
        if seq > stop_after {
            self.reader
                .seek_relative(-(HEADER_BYTES as i64))
                .map_err(io_err("seek in spool segment", &self.path))?;
            return Ok(Next::Stop);
        }
        let total = HEADER_BYTES + u64::from(len);
        if limit - self.offset < total {
            // Reposition so that a retry reads the same header again.
            self.reader
                .seek(SeekFrom::Start(self.offset))
                .map_err(io_err("seek in spool segment", &self.path))?;
            return Ok(Next::Torn(format!(
                "record at offset {} claims {len} bytes, past the end",
                self.offset
            )));
        }
        payload.clear();
        payload.resize(len as usize, 0);
        self.reader
            .read_exact(payload)
            .map_err(io_err("read spool segment", &self.path))?;
        if record_crc(len, seq, mask, payload) != crc {
            self.reader
                .seek(SeekFrom::Start(self.offset))
                .map_err(io_err("seek in spool segment", &self.path))?;
            return Ok(Next::Torn(format!(
                "checksum mismatch at offset {}",
                self.offset
            )));
        }
        self.offset += total;
        Ok(Next::Record { seq, mask })
    }
}

/// Fsyncs a directory so that file creations, renames and deletions in it survive a machine crash.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync spool directory", dir))
}

impl State {
    /// Seq just past segment `i`'s last record.
    fn segment_end(&self, i: usize) -> u64 {
        match self.segments.get(i + 1) {
            Some(next) => next.base,
            None => self.next_seq,
        }
    }

    /// Index of the segment that holds (or would hold) `seq`; `seq` must not be before the oldest.
    fn locate(&self, seq: u64) -> usize {
        self.segments
            .partition_point(|s| s.base <= seq)
            .saturating_sub(1)
    }

    fn index_of(&self, base: u64) -> Option<usize> {
        self.segments.binary_search_by_key(&base, |s| s.base).ok()
    }

    fn oldest_base(&self) -> u64 {
        self.segments.front().map_or(self.next_seq, |s| s.base)
    }

    /// The lowest committed seq among configured sinks: everything up to it can go.
    fn reclaimable_upto(&self) -> u64 {
        self.sinks
            .iter()
            .filter(|s| s.configured)
            .map(|s| s.committed)
            .min()
            .unwrap_or(self.next_seq.saturating_sub(1))
    }

    fn persist(&mut self, dir: &Path) -> Result<(), SpoolError> {
        let json = self.snapshot(dir)?;
        write_state_file(dir, &json)
    }

    /// The cursor file's content now; counts as persisted (the caller writes it).
    fn snapshot(&mut self, dir: &Path) -> Result<Vec<u8>, SpoolError> {
        let file = StateFile {
            version: STATE_VERSION,
            next_seq: self.next_seq,
            sinks: self
                .sinks
                .iter()
                .map(|s| SinkEntry {
                    name: s.name.clone(),
                    bit: s.bit,
                    committed: s.committed,
                    pending: s.pending,
                    lost: s.lost,
                })
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| SpoolError::Corrupt {
            path: dir.join(STATE_FILE),
            detail: format!("cannot encode: {e}"),
        })?;
        self.dirty_commits = 0;
        self.last_persist = Instant::now();
        Ok(json)
    }
}

/// Writes the cursor file atomically.
fn write_state_file(dir: &Path, json: &[u8]) -> Result<(), SpoolError> {
    {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let path = dir.join(STATE_FILE);
        // Write, fsync, rename: a crash leaves either the old file or the new one, never a torn
        // one. Always fsynced, whatever the policy: it is small and written a few times a
        // second at most, and losing it would scramble which bit is which sink.
        {
            let mut f = File::create(&tmp).map_err(io_err("create spool cursor file", &tmp))?;
            io::Write::write_all(&mut f, json).map_err(io_err("write spool cursor file", &tmp))?;
            f.sync_all()
                .map_err(io_err("fsync spool cursor file", &tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err("replace spool cursor file", &path))?;
        Ok(())
    }
}

impl State {
    /// Starts a new, empty active segment at `next_seq`.
    fn roll(&mut self, config: &SpoolConfig) -> Result<(), SpoolError> {
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
    fn reclaim(&mut self, dir: &Path) -> Result<(), SpoolError> {
        let upto = self.reclaimable_upto();
        while self.segments.len() > 1 && self.segment_end(0) <= upto.saturating_add(1) {
            self.delete_oldest(dir)?;
        }
        Ok(())
    }

    fn delete_oldest(&mut self, dir: &Path) -> Result<(), SpoolError> {
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
    fn drop_oldest(&mut self, dir: &Path) -> Result<u64, SpoolError> {
        let seg = self.segments[0];
        let end = self.segment_end(0);
        let mut lost_records = 0;
        if self.reclaimable_upto().saturating_add(1) < end {
            let path = segment_path(dir, seg.base);
            let mut cursor = SegmentCursor::open(path, seg.base)?;
            let mut payload = Vec::new();
            while let Next::Record { seq, mask } = cursor.next(seg.bytes, u64::MAX, &mut payload)? {
                let mut lost_any = false;
                for sink in self.sinks.iter_mut().filter(|s| s.configured) {
                    if mask & (1 << sink.bit) != 0 && seq > sink.committed {
                        sink.lost += 1;
                        sink.pending = sink.pending.saturating_sub(1);
                        lost_any = true;
                    }
                }
                lost_records += u64::from(lost_any);
            }
        }
        self.delete_oldest(dir)?;
        Ok(lost_records)
    }

    /// Counts, per configured sink, records of the batch it will never see (`DropOldest` with a
    /// batch larger than `max_bytes`).
    fn count_refused_oldest(&mut self, records: &[(&[u8], SinkMask)]) -> u64 {
        for (_, mask) in records {
            for sink in self.sinks.iter_mut().filter(|s| s.configured) {
                if mask.0 & (1 << sink.bit) != 0 {
                    sink.lost += 1;
                }
            }
        }
        records.len() as u64
    }
}

impl Spool {
    /// Opens or creates the spool in `config.dir` for the sinks named in `sinks`.
    ///
    /// Recovers after a crash: a torn or corrupt tail in the last segment is truncated away,
    /// cursors are loaded. Sinks keep their mask bit across restarts; a new sink starts at the
    /// current end; a sink no longer configured stays in the registry (it resumes if it comes
    /// back) but no longer holds back reclaiming.
    pub fn open(config: SpoolConfig, sinks: &[String]) -> Result<Spool, SpoolError> {
        if config.segment_bytes == 0 || config.max_bytes == 0 {
            return Err(SpoolError::Config(
                "max_bytes and segment_bytes must be positive".into(),
            ));
        }
        let mut names: Vec<&String> = Vec::new();
        for name in sinks {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        if names.len() > MAX_SINKS {
            return Err(SpoolError::TooManySinks { count: names.len() });
        }
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err("create spool directory", &dir))?;

        let state_path = dir.join(STATE_FILE);
        let saved: Option<StateFile> = match fs::read(&state_path) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes).map_err(|e| SpoolError::Corrupt {
                    path: state_path.clone(),
                    detail: e.to_string(),
                })?,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read spool cursor file", &state_path)(e)),
        };

        // Segments, by base seq.
        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list spool directory", &dir))? {
            let entry = entry.map_err(io_err("list spool directory", &dir))?;
            if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let mut segments = VecDeque::with_capacity(bases.len() + 1);
        for &base in &bases {
            let path = segment_path(&dir, base);
            let bytes = fs::metadata(&path)
                .map_err(io_err("inspect spool segment", &path))?
                .len();
            segments.push_back(Segment { base, bytes });
        }

        // Only the last segment can have a torn tail after a process crash (sealed ones were
        // complete before the next was created); scan it and cut at the first bad record.
        let mut log_next = 1;
        if let Some(last) = segments.back_mut() {
            let path = segment_path(&dir, last.base);
            let (good_bytes, last_seq) = scan_tail(&path, last.base, last.bytes)?;
            if good_bytes < last.bytes {
                warn!(segment = %path.display(), kept = good_bytes, cut = last.bytes - good_bytes,
                    "truncating a torn or corrupt tail left by a crash");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open spool segment", &path))?;
                f.set_len(good_bytes)
                    .map_err(io_err("truncate spool segment", &path))?;
                f.sync_all().map_err(io_err("fsync spool segment", &path))?;
                last.bytes = good_bytes;
            }
            log_next = last_seq.map_or(last.base, |s| s + 1);
        }

        let saved_next = saved.as_ref().map_or(0, |s| s.next_seq);
        let max_committed = saved
            .as_ref()
            .and_then(|s| s.sinks.iter().map(|e| e.committed).max())
            .unwrap_or(0);
        let next_seq = log_next.max(saved_next).max(max_committed + 1).max(1);

        // The registry: saved sinks first (they keep their bits), then new ones.
        let mut registry: Vec<SinkState> = saved
            .as_ref()
            .map(|s| {
                s.sinks
                    .iter()
                    .map(|e| SinkState {
                        name: e.name.clone(),
                        bit: e.bit,
                        committed: e.committed,
                        pending: e.pending,
                        lost: e.lost,
                        configured: names.contains(&&e.name),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if registry.iter().any(|s| usize::from(s.bit) >= MAX_SINKS) {
            return Err(SpoolError::Corrupt {
                path: state_path,
                detail: "sink bit out of range".into(),
            });
        }

        // Records appended after the cursor file was last written are not in its backlog counts.
        if saved_next > 0 && !registry.is_empty() {
            count_backlog_since(&dir, &segments, log_next, saved_next, &mut registry)?;
        }

        for name in &names {
            if registry.iter().any(|s| &&s.name == name) {
                continue;
            }
            let used = |bit: u8, reg: &[SinkState]| reg.iter().any(|s| s.bit == bit);
            let bit = match (0..MAX_SINKS as u8).find(|&b| !used(b, &registry)) {
                Some(bit) => bit,
                None => {
                    // Every bit was handed out once: reuse one of a sink that is gone. Safe,
                    // because the new sink starts at the end and never reads the old records.
                    let Some(i) = registry.iter().position(|s| !s.configured) else {
                        return Err(SpoolError::TooManySinks { count: names.len() });
                    };
                    let gone = registry.remove(i);
                    info!(sink = %gone.name, bit = gone.bit, "forgetting unconfigured sink to reuse its bit");
                    gone.bit
                }
            };
            info!(sink = %name, bit, start = next_seq - 1, "new spool sink starts at the end");
            registry.push(SinkState {
                name: (*name).clone(),
                bit,
                committed: next_seq - 1,
                pending: 0,
                lost: 0,
                configured: true,
            });
        }
        for gone in registry.iter().filter(|s| !s.configured) {
            warn!(sink = %gone.name, records = gone.pending,
                "sink is no longer configured: its records are left behind and no longer hold back reclaiming");
        }

        // The active segment must be empty or end exactly at next_seq, so that every segment's
        // seqs stay below the next one's base.
        let active_path;
        let mut roll_needed = false;
        match segments.back() {
            None => {
                active_path = segment_path(&dir, next_seq);
                segments.push_back(Segment {
                    base: next_seq,
                    bytes: 0,
                });
            }
            Some(last) if last.bytes == 0 && last.base != next_seq => {
                let old = segment_path(&dir, last.base);
                fs::remove_file(&old).map_err(io_err("delete spool segment", &old))?;
                segments.pop_back();
                active_path = segment_path(&dir, next_seq);
                segments.push_back(Segment {
                    base: next_seq,
                    bytes: 0,
                });
            }
            Some(last) => {
                active_path = segment_path(&dir, last.base);
                roll_needed = log_next != next_seq;
            }
        }
        let active = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&active_path)
            .map_err(io_err("open spool segment", &active_path))?;

        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let mut state = State {
            segments,
            active,
            next_seq,
            total_bytes,
            sinks: registry,
            dropped_newest: 0,
            dropped_oldest: 0,
            dirty_commits: 0,
            last_persist: Instant::now(),
            buf: Vec::new(),
            must_roll: false,
        };
        if roll_needed {
            state.roll(&config)?;
        }
        sync_dir(&dir)?;
        state.reclaim(&dir)?;
        state.persist(&dir)?;
        info!(dir = %dir.display(), segments = state.segments.len(), bytes = state.total_bytes,
            next_seq, "spool open");

        let (appended, _) = watch::channel(next_seq);
        Ok(Spool {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                persisting: Mutex::new(()),
                appended,
            }),
        })
    }

    /// The cap on the spool's size (`spool.max_bytes`).
    pub fn max_bytes(&self) -> u64 {
        self.inner.config.max_bytes
    }

    /// The mask of the named sinks; names not configured are ignored.
    pub fn mask(&self, sinks: &[&str]) -> SinkMask {
        let state = self.inner.lock();
        let mut mask = 0;
        for name in sinks {
            if let Some(s) = state.sinks.iter().find(|s| s.configured && s.name == *name) {
                mask |= 1 << s.bit;
            }
        }
        SinkMask(mask)
    }

    /// Appends a batch with one `write`, fsynced when the policy is `Always`.
    ///
    /// When the spool would exceed `max_bytes`: `DropNewest` writes the records that fit and
    /// refuses the rest; `DropOldest` deletes the oldest whole segments until the batch fits.
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
        self.append_with(records, false, before_wake)
    }

    /// Appends only what fits in the room left, whatever `when_full` says: for records that
    /// are safe elsewhere until they are in (dead letters being replayed), which must neither
    /// push out records no sink has delivered nor count as refused.
    pub fn append_within_room(
        &self,
        records: &[(&[u8], SinkMask)],
    ) -> Result<AppendReport, SpoolError> {
        self.append_with(records, true, |_| {})
    }

    fn append_with(
        &self,
        records: &[(&[u8], SinkMask)],
        within_room: bool,
        before_wake: impl FnOnce(&AppendReport),
    ) -> Result<AppendReport, SpoolError> {
        let config = &self.inner.config;
        let when_full = if within_room {
            WhenFull::DropNewest
        } else {
            config.when_full
        };
        let mut batch_bytes = 0u64;
        for (payload, _) in records {
            let size = HEADER_BYTES + payload.len() as u64;
            if size > config.max_bytes || payload.len() > u32::MAX as usize {
                return Err(SpoolError::RecordTooLarge {
                    size,
                    max: config.max_bytes,
                });
            }
            batch_bytes += size;
        }
        let mut report = AppendReport {
            first_seq: None,
            appended: 0,
            dropped_newest: 0,
            dropped_oldest: 0,
            end: None,
        };
        if records.is_empty() {
            return Ok(report);
        }

        let mut state = self.inner.lock();
        let state = &mut *state;
        let mut accepted = records;
        if state.total_bytes + batch_bytes > config.max_bytes {
            match when_full {
                WhenFull::DropNewest => {
                    let room = config.max_bytes.saturating_sub(state.total_bytes);
                    let mut fit = 0;
                    let mut used = 0;
                    for (payload, _) in records {
                        let size = HEADER_BYTES + payload.len() as u64;
                        if used + size > room {
                            break;
                        }
                        used += size;
                        fit += 1;
                    }
                    accepted = &records[..fit];
                    batch_bytes = used;
                    report.dropped_newest = (records.len() - fit) as u64;
                    // Records kept elsewhere until they are in are not lost by waiting.
                    if !within_room {
                        state.dropped_newest += report.dropped_newest;
                        warn!(
                            refused = report.dropped_newest,
                            max_bytes = config.max_bytes,
                            "spool full: refusing the newest records"
                        );
                    }
                }
                WhenFull::DropOldest => {
                    // If the batch alone exceeds the cap, its oldest records go first.
                    let mut skip = 0;
                    while batch_bytes > config.max_bytes {
                        batch_bytes -= HEADER_BYTES + records[skip].0.len() as u64;
                        skip += 1;
                    }
                    if skip > 0 {
                        report.dropped_oldest += state.count_refused_oldest(&records[..skip]);
                        accepted = &records[skip..];
                    }
                    while state.total_bytes + batch_bytes > config.max_bytes {
                        if state.segments.len() == 1 {
                            // Only the active segment is left: seal it so it can go too.
                            state.roll(config)?;
                        }
                        report.dropped_oldest += state.drop_oldest(&config.dir)?;
                    }
                    state.dropped_oldest += report.dropped_oldest;
                    if report.dropped_oldest > 0 {
                        warn!(
                            lost = report.dropped_oldest,
                            max_bytes = config.max_bytes,
                            "spool full: deleted the oldest records"
                        );
                    }
                }
            }
        }
        if accepted.is_empty() {
            return Ok(report);
        }

        let active_bytes = state.segments.back().map_or(0, |s| s.bytes);
        if state.must_roll
            || (active_bytes > 0 && active_bytes + batch_bytes > config.segment_limit())
        {
            state.roll(config)?;
        }

        let first_seq = state.next_seq;
        let mut buf = std::mem::take(&mut state.buf);
        buf.clear();
        for (i, (payload, mask)) in accepted.iter().enumerate() {
            encode_record(&mut buf, first_seq + i as u64, mask.0, payload);
        }
        let seg = *state
            .segments
            .back()
            .expect("spool always has an active segment");
        let path = segment_path(&config.dir, seg.base);
        if let Err(e) = state.active.write_all_at(&buf, seg.bytes) {
            // Cut off whatever part was written; if even that fails, never write after it.
            if let Err(trunc) = state.active.set_len(seg.bytes) {
                error!(segment = %path.display(), error = %trunc,
                    "cannot cut a failed write; the next append starts a new segment");
                state.must_roll = true;
            }
            state.buf = buf;
            return Err(io_err("write spool segment", &path)(e));
        }
        if config.fsync == FsyncMode::Always {
            state
                .active
                .sync_data()
                .map_err(io_err("fsync spool segment", &path))?;
        }
        let written = buf.len() as u64;
        if buf.capacity() > 16 << 20 {
            // A one-off huge batch should not pin its buffer for the life of the process.
            buf = Vec::new();
        }
        state.buf = buf;
        if let Some(active) = state.segments.back_mut() {
            active.bytes += written;
            report.end = Some(SpoolPosition {
                segment: active.base,
                offset: active.bytes,
            });
        }
        state.total_bytes += written;
        state.next_seq += accepted.len() as u64;
        for (_, mask) in accepted {
            for sink in state.sinks.iter_mut().filter(|s| s.configured) {
                if mask.0 & (1 << sink.bit) != 0 {
                    sink.pending += 1;
                }
            }
        }
        report.first_seq = Some(first_seq);
        report.appended = accepted.len();
        before_wake(&report);
        self.inner.appended.send_replace(state.next_seq);
        Ok(report)
    }

    /// Fsyncs the active segment and persists the cursors.
    pub fn sync(&self) -> Result<(), SpoolError> {
        self.inner.sync()
    }

    /// A reader for `sink`, positioned just after its committed cursor. Use one reader per sink:
    /// readers of the same sink share the cursor but not their read positions.
    pub fn reader(&self, sink: &str) -> Result<SpoolReader, SpoolError> {
        let state = self.inner.lock();
        let Some(index) = state
            .sinks
            .iter()
            .position(|s| s.configured && s.name == sink)
        else {
            return Err(SpoolError::UnknownSink(sink.to_string()));
        };
        let committed = state.sinks[index].committed;
        let bit = 1 << state.sinks[index].bit;
        drop(state);
        Ok(SpoolReader {
            inner: self.inner.clone(),
            index,
            bit,
            name: sink.to_string(),
            pos: committed,
            cursor: None,
            in_flight: VecDeque::new(),
            seen_end: committed + 1,
            appended: self.inner.appended.subscribe(),
            scratch: Vec::new(),
            resume_at: None,
        })
    }

    /// Counters: sizes, last seq, every sink's cursor and backlog, drops.
    pub fn stats(&self) -> SpoolStats {
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

/// Scans a segment from the start; returns the length of its intact prefix and the last seq in it.
fn scan_tail(path: &Path, base: u64, len: u64) -> Result<(u64, Option<u64>), SpoolError> {
    let mut cursor = SegmentCursor::open(path.to_path_buf(), base)?;
    let mut payload = Vec::new();
    let mut last_seq: Option<u64> = None;
    loop {
        let offset = cursor.offset;
        match cursor.next(len, u64::MAX, &mut payload)? {
            Next::Record { seq, .. } => {
                // Seqs in a segment start at its base and only grow; anything else is garbage
                // that happened to pass the CRC.
                if seq < base || last_seq.is_some_and(|l| seq <= l) {
                    return Ok((offset, last_seq));
                }
                last_seq = Some(seq);
            }
            Next::End | Next::Stop => return Ok((offset, last_seq)),
            Next::Torn(_) => return Ok((offset, last_seq)),
        }
    }
}

/// Adds to each sink's backlog the records routed to it with seq in `from..to` (appended after
/// the cursor file was written).
fn count_backlog_since(
    dir: &Path,
    segments: &VecDeque<Segment>,
    to: u64,
    from: u64,
    registry: &mut [SinkState],
) -> Result<(), SpoolError> {
    if from >= to {
        return Ok(());
    }
    let first = segments
        .partition_point(|s| s.base <= from)
        .saturating_sub(1);
    let mut payload = Vec::new();
    for seg in segments.iter().skip(first) {
        let mut cursor = SegmentCursor::open(segment_path(dir, seg.base), seg.base)?;
        loop {
            match cursor.next(seg.bytes, u64::MAX, &mut payload)? {
                Next::Record { seq, mask } if seq >= from => {
                    for sink in registry.iter_mut() {
                        if mask & (1 << sink.bit) != 0 && seq > sink.committed {
                            sink.pending += 1;
                        }
                    }
                }
                Next::Record { .. } => {}
                _ => break,
            }
        }
    }
    Ok(())
}

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

impl SpoolReader {
    /// Up to `max` records of this sink after the read position, in order, as (seq, payload).
    /// Empty when caught up. If `DropOldest` deleted records ahead of the position, it skips to
    /// the oldest kept record (the loss is in [`SpoolReader::lost`] and the stats).
    pub fn read_batch(&mut self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        if self.caught_up() {
            // Nothing was appended past the position: no file to look at.
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(max.min(1024));
        let pos0 = self.pos;
        let flight0 = self.in_flight.len();
        match self.advance(max, u64::MAX, Some(&mut out)) {
            Ok(_) => {}
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
    /// the [`AppendReport::end`] of that append. Records up to the position are passed over
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
        let (committed, last, oldest) = {
            let state = self.inner.lock();
            (
                state.sinks[self.index].committed,
                state.next_seq - 1,
                state.oldest_base(),
            )
        };
        let upto = upto.min(last);
        let mut done = 0u64;
        while let Some(&seq) = self.in_flight.front() {
            if seq > upto {
                break;
            }
            self.in_flight.pop_front();
            // Records below the oldest segment were already taken off the backlog when deleted.
            done += u64::from(seq >= oldest);
        }
        if upto > self.pos {
            done += self.advance(usize::MAX, upto, None)?;
            self.pos = self.pos.max(upto);
            self.seen_end = self.pos + 1;
        }
        let new_committed = if self.in_flight.is_empty() {
            self.pos.max(upto)
        } else {
            upto
        };
        if new_committed <= committed && done == 0 {
            return Ok(());
        }
        let mut state = self.inner.lock();
        let sink = &mut state.sinks[self.index];
        sink.committed = sink.committed.max(new_committed);
        sink.pending = sink.pending.saturating_sub(done);
        self.after_commit(state)
    }

    /// Moves the read position back to just after the committed cursor, so uncommitted records
    /// are read again.
    pub fn rewind(&mut self) -> Result<(), SpoolError> {
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
    pub fn lost(&self) -> u64 {
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
        if state.dirty_commits >= PERSIST_EVERY_COMMITS
            || state.last_persist.elapsed() >= PERSIST_INTERVAL
        {
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
            warn!(sink = %self.name, from = self.pos + 1, to = oldest,
                "records were deleted before this sink read them (spool full, DropOldest); skipping");
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

    /// Reads forward from `pos`, stopping after `max` records of this sink, before any record
    /// past `stop_after`, or at the end. Collects this sink's records into `out` (and tracks
    /// them as in flight) when given; returns how many of this sink's records it passed.
    fn advance(
        &mut self,
        max: usize,
        stop_after: u64,
        mut out: Option<&mut Vec<(u64, Vec<u8>)>>,
    ) -> Result<u64, SpoolError> {
        let mut mine = 0u64;
        'segments: while (mine as usize) < max {
            let view = self.view();
            if self.cursor.is_none() {
                match SegmentCursor::open(view.path.clone(), view.base) {
                    Ok(c) => self.cursor = Some(c),
                    // Deleted between the look-up and the open: look again.
                    Err(SpoolError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound =>
                    {
                        continue 'segments;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some(cursor) = self.cursor.as_mut() else {
                continue;
            };
            if let Some(resume) = self.resume_at.take() {
                // Records up to `resume` were taken in memory: do not read them again.
                if resume.segment == cursor.base && resume.offset > cursor.offset {
                    cursor.seek_to(resume.offset)?;
                }
            }
            while (mine as usize) < max {
                match cursor.next(view.limit, stop_after, &mut self.scratch)? {
                    Next::Record { seq, mask } => {
                        if seq <= self.pos {
                            continue;
                        }
                        self.pos = seq;
                        if mask & self.bit != 0 {
                            mine += 1;
                            if let Some(out) = out.as_deref_mut() {
                                out.push((seq, std::mem::take(&mut self.scratch)));
                                self.in_flight.push_back(seq);
                            }
                        }
                    }
                    Next::Stop => return Ok(mine),
                    Next::End => break,
                    Next::Torn(detail) => {
                        if !view.sealed {
                            return Err(SpoolError::Corrupt {
                                path: view.path,
                                detail,
                            });
                        }
                        error!(segment = %view.path.display(), %detail, sink = %self.name,
                            "unreadable rest of a spool segment; skipping to the next segment");
                        break;
                    }
                }
            }
            if (mine as usize) >= max {
                break;
            }
            if view.sealed {
                // Nothing more will come from this segment, even if its tail was lost.
                self.pos = self.pos.max(view.end - 1);
                self.cursor = None;
                continue;
            }
            // The active segment: done unless it grew or was sealed meanwhile.
            let state = self.inner.lock();
            let grew = state
                .segments
                .back()
                .is_none_or(|s| s.base != view.base || s.bytes != view.limit);
            if !grew {
                break;
            }
        }
        Ok(mine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use std::time::Duration;

    fn config(dir: &Path) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_path_buf(),
            max_bytes: 1 << 30,
            segment_bytes: 4096,
            fsync: FsyncMode::Never,
            ..SpoolConfig::new(dir)
        }
    }

    fn names(sinks: &[&str]) -> Vec<String> {
        sinks.iter().map(|s| s.to_string()).collect()
    }

    /// Everything the reader has left, in batches.
    fn read_all(reader: &mut SpoolReader) -> Vec<(u64, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let batch = reader.read_batch(100).unwrap();
            if batch.is_empty() {
                return all;
            }
            all.extend(batch);
        }
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        files
    }

    fn backlog(spool: &Spool, sink: &str) -> u64 {
        spool
            .stats()
            .sinks
            .iter()
            .find(|s| s.name == sink)
            .unwrap()
            .backlog
    }

    // ---- model-based property test ----

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

    /// What one sink should see: every record routed to it, and how far it read and committed.
    #[derive(Default)]
    struct SinkModel {
        records: VecDeque<(u64, Vec<u8>)>,
        /// Records at the front that are committed (dropped from `records`).
        committed_seq: u64,
        /// Of `records`, how many were read.
        read: usize,
    }

    const SINKS: [&str; 3] = ["a", "b", "c"];

    fn open_all(dir: &Path, max_bytes: u64) -> (Spool, Vec<SpoolReader>) {
        let mut cfg = config(dir);
        cfg.segment_bytes = 700;
        cfg.max_bytes = max_bytes;
        cfg.fsync = FsyncMode::Interval;
        let spool = Spool::open(cfg, &names(&SINKS)).unwrap();
        let readers = SINKS.iter().map(|s| spool.reader(s).unwrap()).collect();
        (spool, readers)
    }

    /// `max_bytes` small enough to fill makes DropNewest refuse records; the model then holds
    /// only what the spool accepted.
    fn run_model(ops: Vec<Op>, max_bytes: u64) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, mut readers) = open_all(dir.path(), max_bytes);
        let mut model: Vec<SinkModel> = (0..3).map(|_| SinkModel::default()).collect();
        let mut next_seq = 1u64;
        for op in ops {
            match op {
                Op::Append(records, takers) => {
                    let masks: Vec<SinkMask> = records
                        .iter()
                        .map(|(_, bits)| {
                            let chosen: Vec<&str> = (0..3)
                                .filter(|i| bits & (1 << i) != 0)
                                .map(|i| SINKS[i])
                                .collect();
                            spool.mask(&chosen)
                        })
                        .collect();
                    let batch: Vec<(&[u8], SinkMask)> = records
                        .iter()
                        .zip(&masks)
                        .map(|((p, _), m)| (p.as_slice(), *m))
                        .collect();
                    let report = spool.append(&batch).unwrap();
                    prop_assert_eq!(
                        report.appended as u64 + report.dropped_newest,
                        batch.len() as u64
                    );
                    prop_assert_eq!(report.dropped_oldest, 0);
                    prop_assert_eq!(report.first_seq, (report.appended > 0).then_some(next_seq));
                    let bytes = spool.stats().bytes;
                    prop_assert!(bytes <= max_bytes);
                    if let Some((refused, _)) = records.get(report.appended) {
                        // Only what did not fit was refused.
                        prop_assert!(bytes + HEADER_BYTES + refused.len() as u64 > max_bytes);
                    }
                    for (i, (payload, bits)) in records[..report.appended].iter().enumerate() {
                        for (s, m) in model.iter_mut().enumerate() {
                            if bits & (1 << s) != 0 {
                                m.records.push_back((next_seq + i as u64, payload.clone()));
                            }
                        }
                    }
                    next_seq += report.appended as u64;
                    // The ingest offers only whole batches. (No `continue` here: the checks
                    // after the match must run for every op.)
                    let offered = match (report.first_seq, report.end) {
                        (Some(first), Some(end)) if report.appended == records.len() => {
                            Some((first, end))
                        }
                        _ => None,
                    };
                    for (s, m) in model.iter_mut().enumerate() {
                        let Some((first, end)) = offered.filter(|_| takers & (1 << s) != 0) else {
                            continue;
                        };
                        let Some(mine) = readers[s].take_appended(first, &masks, end) else {
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
                }
                Op::Read { sink, max } => {
                    let got = readers[sink].read_batch(max).unwrap();
                    let m = &mut model[sink];
                    let want: Vec<(u64, Vec<u8>)> =
                        m.records.iter().skip(m.read).take(max).cloned().collect();
                    prop_assert_eq!(&got, &want, "sink {} read", SINKS[sink]);
                    m.read += got.len();
                }
                Op::Commit { sink, prefix } => {
                    let m = &mut model[sink];
                    if m.read == 0 {
                        continue;
                    }
                    let n = prefix.index(m.read) + 1;
                    let upto = m.records[n - 1].0;
                    m.records.drain(..n);
                    m.read -= n;
                    m.committed_seq = upto;
                    readers[sink].commit(upto).unwrap();
                    let stats = spool.stats();
                    prop_assert!(stats.sinks[sink].committed >= upto);
                }
                Op::Rewind(sink) => {
                    readers[sink].rewind().unwrap();
                    model[sink].read = 0;
                }
                Op::Sync => spool.sync().unwrap(),
                Op::Reopen => {
                    drop(readers);
                    drop(spool);
                    (spool, readers) = open_all(dir.path(), max_bytes);
                    for m in &mut model {
                        m.read = 0;
                    }
                }
            }
            let stats = spool.stats();
            prop_assert_eq!(stats.last_seq, next_seq - 1);
            for (s, m) in model.iter().enumerate() {
                prop_assert_eq!(
                    stats.sinks[s].backlog,
                    m.records.len() as u64,
                    "backlog of {}",
                    SINKS[s]
                );
            }
        }

        // Reopen once more: every sink sees exactly its uncommitted records, then commits them all
        // and the space comes back.
        drop(readers);
        drop(spool);
        let (spool, mut readers) = open_all(dir.path(), max_bytes);
        for (s, m) in model.iter().enumerate() {
            let got = read_all(&mut readers[s]);
            let want: Vec<(u64, Vec<u8>)> = m.records.iter().cloned().collect();
            prop_assert_eq!(&got, &want, "sink {} after reopen", SINKS[s]);
            prop_assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
            if let Some((last, _)) = got.last() {
                readers[s].commit(*last).unwrap();
            }
        }
        // A sink that had nothing left may still sit before records of other sinks; a read moves it.
        for r in &mut readers {
            prop_assert!(r.read_batch(10).unwrap().is_empty());
        }
        let stats = spool.stats();
        prop_assert_eq!(
            stats.segments,
            1,
            "everything committed, only the active segment stays"
        );
        prop_assert!(stats.sinks.iter().all(|s| s.backlog == 0));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn spool_matches_model(ops in prop::collection::vec(op(), 1..80)) {
            run_model(ops, 1 << 30)?;
        }

        #[test]
        fn spool_matches_model_when_full(ops in prop::collection::vec(op(), 1..80)) {
            run_model(ops, 4000)?;
        }
    }

    // ---- crash recovery ----

    enum Damage {
        CutLastRecord,
        AppendGarbage,
        FlipPayloadByte,
    }

    fn recover_after(damage: Damage) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        if matches!(damage, Damage::CutLastRecord) {
            // The same recovery whatever the policy; this runs the fsync path once.
            cfg.fsync = FsyncMode::Always;
        }
        let spool = Spool::open(cfg, &names(&["a"])).unwrap();
        let mask = spool.mask(&["a"]);
        let payloads: Vec<Vec<u8>> = (0..10)
            .map(|i| format!("record {i}").into_bytes())
            .collect();
        let batch: Vec<(&[u8], SinkMask)> = payloads.iter().map(|p| (p.as_slice(), mask)).collect();
        spool.append(&batch).unwrap();
        drop(spool);

        let files = segment_files(dir.path());
        assert_eq!(files.len(), 1);
        let good_len = fs::metadata(&files[0]).unwrap().len();
        let last_len = HEADER_BYTES + payloads[9].len() as u64;
        let f = OpenOptions::new().write(true).open(&files[0]).unwrap();
        let expect_kept = match damage {
            Damage::CutLastRecord => {
                f.set_len(good_len - last_len / 2).unwrap();
                9
            }
            Damage::AppendGarbage => {
                f.write_all_at(b"\x07\x00\x00\x00garbage that is not a record", good_len)
                    .unwrap();
                10
            }
            Damage::FlipPayloadByte => {
                f.write_all_at(b"X", good_len - 1).unwrap();
                9
            }
        };
        drop(f);

        let spool = Spool::open(config(dir.path()), &names(&["a"])).unwrap();
        let mut reader = spool.reader("a").unwrap();
        let got = read_all(&mut reader);
        assert_eq!(got.len(), expect_kept);
        for (i, (seq, payload)) in got.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1);
            assert_eq!(payload, &payloads[i]);
        }
        let expected_len = if expect_kept == 10 {
            good_len
        } else {
            good_len - last_len
        };
        assert_eq!(fs::metadata(&files[0]).unwrap().len(), expected_len);

        // Appends go on, and never reuse the seq of the lost record.
        let report = spool.append(&[(b"after".as_slice(), mask)]).unwrap();
        assert_eq!(report.first_seq, Some(11));
        assert_eq!(
            reader.read_batch(10).unwrap(),
            vec![(11, b"after".to_vec())]
        );
    }

    #[test]
    fn torn_last_record_is_truncated() {
        recover_after(Damage::CutLastRecord);
    }

    #[test]
    fn garbage_after_the_last_record_is_truncated() {
        recover_after(Damage::AppendGarbage);
    }

    #[test]
    fn corrupt_last_record_is_truncated() {
        recover_after(Damage::FlipPayloadByte);
    }

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
        let seqs: Vec<u64> = read_all(&mut reader).iter().map(|r| r.0).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 7, 8, 9]);
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
    fn process_crash_redelivers_only_the_uncommitted_window() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path()), &names(&["a"])).unwrap();
        let mask = spool.mask(&["a"]);
        let payloads: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let batch: Vec<(&[u8], SinkMask)> = payloads.iter().map(|p| (p.as_slice(), mask)).collect();
        spool.append(&batch).unwrap();
        let mut reader = spool.reader("a").unwrap();
        assert_eq!(reader.read_batch(1000).unwrap().len(), 100);
        reader.commit(50).unwrap();
        spool.sync().unwrap();
        reader.commit(80).unwrap();
        // Appended after the cursors were last written: the backlog must count them at open.
        let more: Vec<Vec<u8>> = (100..110u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let batch: Vec<(&[u8], SinkMask)> = more.iter().map(|p| (p.as_slice(), mask)).collect();
        spool.append(&batch).unwrap();
        // A crash: no destructor runs, so nothing is persisted after the sync.
        std::mem::forget(reader);
        std::mem::forget(spool);

        let spool = Spool::open(config(dir.path()), &names(&["a"])).unwrap();
        let resumed_after = spool.stats().sinks[0].committed;
        assert!(
            resumed_after == 50 || resumed_after == 80,
            "cursor {resumed_after}"
        );
        assert_eq!(backlog(&spool, "a"), 110 - resumed_after);
        let mut reader = spool.reader("a").unwrap();
        let got = read_all(&mut reader);
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (resumed_after + 1..=110).collect::<Vec<_>>());
        for (seq, payload) in &got {
            assert_eq!(payload, &(*seq as u32 - 1).to_le_bytes());
        }
    }

    // ---- full policies ----

    /// 100-byte payloads: 124 bytes a record on disk.
    const REC: u64 = HEADER_BYTES + 100;

    fn append_n(spool: &Spool, n: usize, mask: SinkMask) -> AppendReport {
        let payload = [7u8; 100];
        let batch: Vec<(&[u8], SinkMask)> = (0..n).map(|_| (payload.as_slice(), mask)).collect();
        spool.append(&batch).unwrap()
    }

    /// One record per append, so that segments roll as they would under a steady trickle (a
    /// batch always goes into one segment: one write).
    fn append_one_by_one(spool: &Spool, n: usize, mask: SinkMask) {
        for _ in 0..n {
            assert_eq!(append_n(spool, 1, mask).appended, 1);
        }
    }

    /// A spool of ten records in segments of three, for `sinks`, with `when_full`.
    fn small_spool(dir: &Path, sinks: &[&str], when_full: WhenFull) -> Spool {
        let mut cfg = config(dir);
        cfg.max_bytes = 10 * REC;
        cfg.segment_bytes = 3 * REC;
        cfg.when_full = when_full;
        Spool::open(cfg, &names(sinks)).unwrap()
    }

    #[test]
    fn drop_newest_refuses_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = small_spool(dir.path(), &["a"], WhenFull::DropNewest);
        let mask = spool.mask(&["a"]);
        assert_eq!(append_n(&spool, 8, mask).appended, 8);
        let report = append_n(&spool, 4, mask);
        assert_eq!(
            (
                report.first_seq,
                report.appended,
                report.dropped_newest,
                report.dropped_oldest
            ),
            (Some(9), 2, 2, 0)
        );
        let report = append_n(&spool, 1, mask);
        assert_eq!(
            (report.first_seq, report.appended, report.dropped_newest),
            (None, 0, 1)
        );
        let stats = spool.stats();
        assert_eq!(
            (stats.dropped_newest, stats.last_seq, stats.bytes),
            (3, 10, 10 * REC)
        );

        // The backlog was kept whole; once consumed, there is room again.
        let mut reader = spool.reader("a").unwrap();
        let got = read_all(&mut reader);
        assert_eq!(
            got.iter().map(|r| r.0).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        reader.commit(10).unwrap();
        assert_eq!(append_n(&spool, 3, mask).appended, 3);
    }

    #[test]
    fn record_larger_than_max_bytes_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_bytes = 1000;
        let spool = Spool::open(cfg, &names(&["a"])).unwrap();
        let mask = spool.mask(&["a"]);
        let big = vec![0u8; 1000];
        let small = [1u8; 10];
        let err = spool
            .append(&[(small.as_slice(), mask), (big.as_slice(), mask)])
            .unwrap_err();
        assert!(
            matches!(
                err,
                SpoolError::RecordTooLarge {
                    size: 1024,
                    max: 1000
                }
            ),
            "{err}"
        );
        assert_eq!(
            spool.stats().last_seq,
            0,
            "nothing of the batch was written"
        );
    }

    #[test]
    fn appending_within_room_pushes_nothing_out_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = small_spool(dir.path(), &["slow"], WhenFull::DropOldest);
        let mask = spool.mask(&["slow"]);
        append_one_by_one(&spool, 8, mask);
        let payload = [7u8; 100];
        let batch: Vec<(&[u8], SinkMask)> = (0..5).map(|_| (payload.as_slice(), mask)).collect();
        let report = spool.append_within_room(&batch).unwrap();
        assert_eq!(report.appended, 2, "the room left, not more");
        assert_eq!(report.first_seq, Some(9));
        assert_eq!((report.dropped_oldest, report.dropped_newest), (0, 3));
        let stats = spool.stats();
        assert_eq!(
            (stats.dropped_oldest, stats.dropped_newest),
            (0, 0),
            "waiting records are not lost ones"
        );
        assert_eq!(stats.last_seq, 10);
    }

    #[test]
    fn drop_oldest_deletes_oldest_segment_and_lagging_reader_skips() {
        let dir = tempfile::tempdir().unwrap();
        let spool = small_spool(dir.path(), &["slow", "fast"], WhenFull::DropOldest);
        let both = spool.mask(&["slow", "fast"]);
        let mut slow = spool.reader("slow").unwrap();
        let mut fast = spool.reader("fast").unwrap();

        append_one_by_one(&spool, 10, both);
        // "slow" has read two records and committed none; "fast" is done with everything.
        assert_eq!(slow.read_batch(2).unwrap().len(), 2);
        assert_eq!(read_all(&mut fast).len(), 10);
        fast.commit(10).unwrap();
        assert_eq!(spool.stats().segments, 4);

        let report = append_n(&spool, 3, both);
        assert_eq!(report.appended, 3);
        assert_eq!(report.first_seq, Some(11));
        assert_eq!(
            report.dropped_oldest, 3,
            "segment 1..=3 went, slow had not committed it"
        );
        let stats = spool.stats();
        assert_eq!(stats.dropped_oldest, 3);
        assert!(stats.bytes <= 10 * REC);
        let slow_stats = stats.sinks.iter().find(|s| s.name == "slow").unwrap();
        assert_eq!((slow_stats.lost, slow_stats.backlog), (3, 10));
        assert_eq!(
            stats.sinks.iter().find(|s| s.name == "fast").unwrap().lost,
            0
        );

        let got = read_all(&mut slow);
        assert_eq!(
            got.iter().map(|r| r.0).collect::<Vec<_>>(),
            (4..=13).collect::<Vec<_>>()
        );
        assert_eq!(slow.lost(), 3);
        slow.commit(13).unwrap();
        assert_eq!(backlog(&spool, "slow"), 0);
    }

    #[test]
    fn drop_oldest_batch_larger_than_the_spool_keeps_its_newest_records() {
        let dir = tempfile::tempdir().unwrap();
        let spool = small_spool(dir.path(), &["a"], WhenFull::DropOldest);
        let mask = spool.mask(&["a"]);
        append_n(&spool, 4, mask);
        let report = append_n(&spool, 12, mask);
        assert_eq!(report.appended, 10);
        assert_eq!(report.first_seq, Some(5));
        assert_eq!(report.dropped_oldest, 2 + 4);
        let mut reader = spool.reader("a").unwrap();
        assert_eq!(read_all(&mut reader).len(), 10);
    }

    // ---- sink registry ----

    #[test]
    fn sink_added_later_starts_at_the_end_and_bits_are_stable() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path()), &names(&["a"])).unwrap();
        let a = spool.mask(&["a"]);
        append_n(&spool, 5, a);
        drop(spool);

        let spool = Spool::open(config(dir.path()), &names(&["b", "a"])).unwrap();
        assert_eq!(
            spool.mask(&["a"]),
            a,
            "a keeps its bit although b comes first now"
        );
        assert_ne!(spool.mask(&["b"]), a);
        let mut b = spool.reader("b").unwrap();
        assert!(b.read_batch(10).unwrap().is_empty());
        append_n(&spool, 1, spool.mask(&["a", "b"]));
        assert_eq!(
            b.read_batch(10)
                .unwrap()
                .iter()
                .map(|r| r.0)
                .collect::<Vec<_>>(),
            vec![6]
        );
        let mut a_reader = spool.reader("a").unwrap();
        assert_eq!(read_all(&mut a_reader).len(), 6);
        assert!(matches!(spool.reader("c"), Err(SpoolError::UnknownSink(_))));
    }

    #[test]
    fn removed_sink_does_not_block_reclaiming() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.segment_bytes = 3 * REC;
        let spool = Spool::open(cfg.clone(), &names(&["a", "gone"])).unwrap();
        append_one_by_one(&spool, 20, spool.mask(&["a", "gone"]));
        let mut a = spool.reader("a").unwrap();
        assert_eq!(read_all(&mut a).len(), 20);
        a.commit(20).unwrap();
        assert!(
            spool.stats().segments > 1,
            "gone's backlog holds the segments"
        );
        drop(a);
        drop(spool);

        let spool = Spool::open(cfg.clone(), &names(&["a"])).unwrap();
        let stats = spool.stats();
        assert_eq!(stats.segments, 1);
        let gone = stats.sinks.iter().find(|s| s.name == "gone").unwrap();
        assert!(!gone.configured);
        assert_eq!(gone.backlog, 20);
        // Records are no longer routed to it, and it no longer holds back the next segments.
        assert_eq!(spool.mask(&["gone"]), SinkMask(0));
        append_one_by_one(&spool, 10, spool.mask(&["a"]));
        let mut a = spool.reader("a").unwrap();
        assert_eq!(read_all(&mut a).len(), 10);
        a.commit(30).unwrap();
        assert_eq!(spool.stats().segments, 1);
    }

    #[test]
    fn too_many_sinks_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        assert!(matches!(
            Spool::open(config(dir.path()), &many),
            Err(SpoolError::TooManySinks { count: 65 })
        ));
        assert!(Spool::open(config(dir.path()), &many[..64]).is_ok());
    }

    #[test]
    fn io_errors_name_the_operation_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = Spool::open(config(&file.join("spool")), &names(&["a"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("cannot create spool directory "), "{msg}");
        assert!(msg.contains("not-a-dir/spool"), "{msg}");
    }

    // ---- large backlog ----

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

    // ---- waiting ----

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
