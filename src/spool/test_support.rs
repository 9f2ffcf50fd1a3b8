//! Helpers shared by the spool's tests.

use std::fs;
use std::path::{Path, PathBuf};

use super::{
    AppendReport, FsyncMode, SinkMask, Spool, SpoolConfig, SpoolReader, WhenFull, HEADER_BYTES,
};

pub(super) fn config(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        segment_bytes: 4096,
        fsync: FsyncMode::Never,
        ..SpoolConfig::new(dir)
    }
}

pub(super) fn names(sinks: &[&str]) -> Vec<String> {
    sinks.iter().map(|s| s.to_string()).collect()
}

/// Everything the reader has left, in batches.
pub(super) fn read_all(reader: &mut SpoolReader) -> Vec<(u64, Vec<u8>)> {
    let mut all = Vec::new();
    loop {
        let batch = reader.read_batch(100).unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

/// The seqs of everything the reader has left, in order.
pub(super) fn read_seqs(reader: &mut SpoolReader) -> Vec<u64> {
    read_all(reader).iter().map(|r| r.0).collect()
}

pub(super) fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

pub(super) fn backlog(spool: &Spool, sink: &str) -> u64 {
    spool
        .stats()
        .sinks
        .iter()
        .find(|s| s.name == sink)
        .unwrap()
        .backlog
}

/// 100-byte payloads: 124 bytes a record on disk.
pub(super) const REC: u64 = HEADER_BYTES + 100;

pub(super) fn append_n(spool: &Spool, n: usize, mask: SinkMask) -> AppendReport {
    let payload = [7u8; 100];
    let batch: Vec<(&[u8], SinkMask)> = (0..n).map(|_| (payload.as_slice(), mask)).collect();
    spool.append(&batch).unwrap()
}

/// One record per append, so that segments roll as they would under a steady trickle (a
/// batch always goes into one segment: one write).
pub(super) fn append_one_by_one(spool: &Spool, n: usize, mask: SinkMask) {
    for _ in 0..n {
        assert_eq!(append_n(spool, 1, mask).appended, 1);
    }
}

/// A spool of ten records in segments of three, for `sinks`, with `when_full`.
pub(super) fn small_spool(dir: &Path, sinks: &[&str], when_full: WhenFull) -> Spool {
    let mut cfg = config(dir);
    cfg.max_bytes = 10 * REC;
    cfg.segment_bytes = 3 * REC;
    cfg.when_full = when_full;
    Spool::open(cfg, &names(sinks)).unwrap()
}

/// A [`small_spool`] for the one sink `a`, holding eight of its ten records: a batch of more
/// than two does not fit. Returns the spool and the mask of `a`.
pub(super) fn spool_with_room_for_two(dir: &Path, when_full: WhenFull) -> (Spool, SinkMask) {
    let spool = small_spool(dir, &["a"], when_full);
    let mask = spool.mask(&["a"]);
    assert_eq!(append_n(&spool, 8, mask).appended, 8);
    (spool, mask)
}

/// A failing disk, for tests of what the bridge does when the spool cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiskFault {
    /// Every segment write, fsync and cursor write fails at once with this OS error (`ENOSPC`,
    /// `EIO`), as on a full or broken disk.
    Refuse(i32),
    /// Every segment write, fsync and cursor write blocks until the fault is cleared, as on a
    /// disk (or network mount) that stopped answering.
    Hang,
}

/// The faults in force, by spool directory: tests run in parallel, each on its own directory.
static FAULTS: std::sync::Mutex<Vec<(PathBuf, DiskFault)>> = std::sync::Mutex::new(Vec::new());

/// Clears its fault when dropped, so that a failing test does not leave threads hung.
#[must_use = "the fault is cleared when the guard is dropped"]
pub(crate) struct FaultGuard {
    /// The spool directory whose fault this clears.
    dir: PathBuf,
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        faults().retain(|(dir, _)| *dir != self.dir);
    }
}

fn faults() -> std::sync::MutexGuard<'static, Vec<(PathBuf, DiskFault)>> {
    FAULTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes the spool in `dir` suffer `fault` until the guard is dropped.
pub(crate) fn inject_fault(dir: &Path, fault: DiskFault) -> FaultGuard {
    let mut faults = faults();
    faults.retain(|(d, _)| d != dir);
    faults.push((dir.to_path_buf(), fault));
    FaultGuard {
        dir: dir.to_path_buf(),
    }
}

/// Called by the spool before it writes or fsyncs in `dir`: the injected fault's error, or a
/// wait while the disk hangs.
pub(super) fn injected_fault(dir: &Path) -> std::io::Result<()> {
    loop {
        let fault = faults().iter().find(|(d, _)| d == dir).map(|(_, f)| *f);
        match fault {
            None => return Ok(()),
            Some(DiskFault::Refuse(errno)) => return Err(std::io::Error::from_raw_os_error(errno)),
            Some(DiskFault::Hang) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Holds back the lazy cursor writes of `spool` until the next [`Spool::sync`]: commits then
/// stay in memory only, as they do for up to `PERSIST_INTERVAL` in a running bridge, so that a
/// test can crash the spool (forget it) at a chosen point of that window.
pub(super) fn hold_back_cursor_writes(spool: &Spool) {
    let mut state = spool.inner.lock();
    // `elapsed()` of an instant in the future is zero: the interval never runs out.
    state.last_persist = std::time::Instant::now() + std::time::Duration::from_secs(3600);
}

/// What `kill -9` does to a spool: no destructor runs, so nothing is persisted after the last
/// cursor write; what was written to the segments stays (it is in the page cache).
pub(super) fn crash(spool: Spool, readers: Vec<SpoolReader>) {
    std::mem::forget(readers);
    std::mem::forget(spool);
}
