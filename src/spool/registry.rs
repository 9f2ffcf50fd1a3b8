//! The sink registry and its cursors: which mask bit is whose, how far each sink committed, its
//! backlog; kept in `sinks.json` and persisted lazily.

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::error::{io_err, SpoolError};
use super::format::sync_dir;

/// Bounds how many sinks a spool serves: one bit each in a `u64` mask.
pub(crate) const MAX_SINKS: usize = 64;

/// Bounds how long committed cursors go unpersisted while commits happen...
pub(crate) const PERSIST_INTERVAL: Duration = Duration::from_millis(250);

/// ...and how many commits they may lag, so a crash re-delivers a bounded window.
pub(crate) const PERSIST_EVERY_COMMITS: u32 = 1024;

/// Name of the registry and cursor file inside the spool directory.
pub(super) const STATE_FILE: &str = "sinks.json";

/// Version of `sinks.json`, so a future layout can tell old files apart.
const STATE_VERSION: u32 = 1;

/// One sink of the registry.
#[derive(Debug, Clone)]
pub(super) struct SinkState {
    /// Configured name; the key of the registry.
    pub(super) name: String,
    /// Its bit in masks, stable across restarts.
    pub(super) bit: u8,
    /// Every record of this sink with seq <= committed is done.
    pub(super) committed: u64,
    /// Records routed to it after `committed`, for stats.
    pub(super) pending: u64,
    /// Records deleted by `DropOldest` before it committed them.
    pub(super) lost: u64,
    /// Only configured sinks hold back reclaiming and count losses.
    pub(super) configured: bool,
}

/// Layout of `sinks.json`.
#[derive(Serialize, Deserialize)]
pub(super) struct StateFile {
    /// Layout version.
    version: u32,
    /// Seq the next record gets; keeps seqs monotonic when the log's tail was lost.
    pub(super) next_seq: u64,
    /// The registry with each sink's cursor.
    pub(super) sinks: Vec<SinkEntry>,
}

/// One sink in `sinks.json`.
#[derive(Serialize, Deserialize)]
pub(super) struct SinkEntry {
    /// The key: bits follow names, not positions in the configuration.
    name: String,
    /// Which bit of a record's mask is this sink's.
    bit: u8,
    /// Where the sink resumes after a restart.
    pub(super) committed: u64,
    /// Backlog at the time of writing; records appended afterwards are counted at open.
    pending: u64,
    /// Kept across restarts so that losses stay visible in stats.
    lost: u64,
}

/// Reads `sinks.json`; `None` for a new spool.
pub(super) fn read_state_file(dir: &Path) -> Result<Option<StateFile>, SpoolError> {
    let state_path = dir.join(STATE_FILE);
    match fs::read(&state_path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
            SpoolError::Corrupt {
                path: state_path.clone(),
                detail: e.to_string(),
            }
        })?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read spool cursor file", &state_path)(e)),
    }
}

/// The saved registry, each sink marked configured or not by `names`. Saved sinks keep their
/// bits.
pub(super) fn restore(
    dir: &Path,
    saved: Option<&StateFile>,
    names: &[&String],
) -> Result<Vec<SinkState>, SpoolError> {
    let registry: Vec<SinkState> = saved
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
            path: dir.join(STATE_FILE),
            detail: "sink bit out of range".into(),
        });
    }
    Ok(registry)
}

/// Registers the configured sinks the registry does not know yet, each at the current end
/// (everything up to `next_seq - 1` counts as committed), with a free bit.
pub(super) fn add_new_sinks(
    registry: &mut Vec<SinkState>,
    names: &[&String],
    next_seq: u64,
) -> Result<(), SpoolError> {
    for name in names {
        if registry.iter().any(|s| &&s.name == name) {
            continue;
        }
        let bit = free_bit(registry, names.len())?;
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
    Ok(())
}

/// A mask bit no sink of the registry holds; when every bit was handed out once, the bit of a
/// sink that is no longer configured, which is then forgotten. `configured` is for the error.
fn free_bit(registry: &mut Vec<SinkState>, configured: usize) -> Result<u8, SpoolError> {
    let used = |bit: u8, reg: &[SinkState]| reg.iter().any(|s| s.bit == bit);
    if let Some(bit) = (0..MAX_SINKS as u8).find(|&b| !used(b, registry)) {
        return Ok(bit);
    }
    // Safe to reuse: the new sink starts at the end and never reads the old records.
    let Some(i) = registry.iter().position(|s| !s.configured) else {
        return Err(SpoolError::TooManySinks {
            count: configured,
            max: MAX_SINKS,
        });
    };
    let gone = registry.remove(i);
    info!(sink = %gone.name, bit = gone.bit, "forgetting unconfigured sink to reuse its bit");
    Ok(gone.bit)
}

/// Logs each sink that is in the registry but no longer configured.
pub(super) fn warn_unconfigured(registry: &[SinkState]) {
    for gone in registry.iter().filter(|s| !s.configured) {
        warn!(sink = %gone.name, records = gone.pending,
            "sink is no longer configured: its records are left behind and no longer hold back reclaiming");
    }
}

/// The cursor file's content for `sinks` with the log ending before `next_seq`.
pub(super) fn encode(
    dir: &Path,
    next_seq: u64,
    sinks: &[SinkState],
) -> Result<Vec<u8>, SpoolError> {
    let file = StateFile {
        version: STATE_VERSION,
        next_seq,
        sinks: sinks
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
    serde_json::to_vec_pretty(&file).map_err(|e| SpoolError::Corrupt {
        path: dir.join(STATE_FILE),
        detail: format!("cannot encode: {e}"),
    })
}

/// Writes the cursor file atomically.
pub(super) fn write_state_file(dir: &Path, json: &[u8]) -> Result<(), SpoolError> {
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let path = dir.join(STATE_FILE);
    // Write, fsync, rename, fsync the directory: a crash leaves either the old file or the new
    // one, never a torn one. Always fsynced, whatever the policy: it is small and written a
    // few times a second at most, and losing it would scramble which bit is which sink.
    #[cfg(test)]
    super::test_support::injected_fault(dir).map_err(io_err("write spool cursor file", &tmp))?;
    {
        let mut f = File::create(&tmp).map_err(io_err("create spool cursor file", &tmp))?;
        io::Write::write_all(&mut f, json).map_err(io_err("write spool cursor file", &tmp))?;
        f.sync_all()
            .map_err(io_err("fsync spool cursor file", &tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_err("replace spool cursor file", &path))?;
    // The rename itself is durable only once the directory is fsynced.
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::{write_state_file, STATE_FILE};
    use crate::spool::test_support::{append_n, append_one_by_one, config, names, read_all, REC};
    use crate::spool::{dir_fsyncs, FsyncMode, SinkMask, Spool, SpoolError};

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
    fn the_cursor_file_is_renamed_durably() {
        let dir = tempfile::tempdir().unwrap();
        dir_fsyncs::take();
        write_state_file(dir.path(), b"{}").unwrap();
        assert_eq!(dir_fsyncs::take(), [dir.path()]);
        assert_eq!(std::fs::read(dir.path().join(STATE_FILE)).unwrap(), b"{}");
    }

    #[test]
    fn a_new_spool_and_its_segments_are_fsynced_into_their_folders() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spool");
        let mut cfg = config(&dir);
        cfg.fsync = FsyncMode::Interval;
        cfg.segment_bytes = 3 * REC;
        dir_fsyncs::take();
        let spool = Spool::open(cfg, &names(&["a"])).unwrap();
        let at_open = dir_fsyncs::take();
        assert_eq!(at_open[0], root.path(), "the new spool folder");
        assert!(at_open[1..].iter().all(|d| *d == dir), "{at_open:?}");
        assert!(
            at_open.len() >= 3,
            "first segment, cursor file: {at_open:?}"
        );
        append_one_by_one(&spool, 4, spool.mask(&["a"]));
        assert_eq!(dir_fsyncs::take(), vec![dir.clone()], "the second segment");
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
}
