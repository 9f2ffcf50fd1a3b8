//! Opening a spool directory: find the segments, cut a torn tail, load the registry, reconcile
//! it with the configured sinks, and settle which segment appends go to.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::path::Path;

use tracing::info;

use super::durable::create_dir_durably;
use super::error::{io_err, SpoolError};
use super::format::{parse_segment_name, segment_path, sync_dir, Next, SegmentCursor};
use super::registry::{self, SinkState, StateFile, MAX_SINKS};
use super::repair::repair_segment;
use super::state::{Segment, State};
use super::SpoolConfig;

/// The configured sink names without repeats, in order; checks the sizes and the sink count.
pub(super) fn validate<'n>(
    config: &SpoolConfig,
    sinks: &'n [String],
) -> Result<Vec<&'n String>, SpoolError> {
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
        return Err(SpoolError::TooManySinks {
            count: names.len(),
            max: MAX_SINKS,
        });
    }
    Ok(names)
}

/// Whether the active segment found at open can be appended to as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActiveSegment {
    /// It ends exactly where the next record goes (or is empty and starts there).
    Continues,
    /// Its last record is below the next seq (the tail was lost, `sinks.json` remembers
    /// more): appends go to a new segment so each segment's seqs stay below the next base.
    MustRoll,
}

impl State {
    /// Creates `config.dir` if needed and recovers the spool in it after whatever happened
    /// (clean close, process crash, machine crash), for the sinks in `names`.
    pub(super) fn recover(config: &SpoolConfig, names: &[&String]) -> Result<State, SpoolError> {
        let dir = &config.dir;
        create_dir_durably(dir).map_err(io_err("create spool directory", dir))?;
        let saved = registry::read_state_file(dir)?;
        let mut segments = list_segments(dir)?;
        let log_next = repair_active_segment(dir, &mut segments)?;
        let next_seq = resume_seq(log_next, saved.as_ref());

        let mut sinks = registry::restore(dir, saved.as_ref(), names)?;
        let saved_next = saved.as_ref().map_or(0, |s| s.next_seq);
        let oldest = segments.front().map_or(log_next, |s| s.base);
        let count_from = resume_behind_deleted_segments(&mut sinks, oldest, saved_next);
        count_backlog(dir, &segments, log_next, &count_from, &mut sinks)?;
        registry::add_new_sinks(&mut sinks, names, next_seq)?;
        registry::warn_unconfigured(&sinks);

        let (active, how) = open_active_segment(dir, &mut segments, log_next, next_seq)?;
        let mut state = State::new(segments, active, next_seq, sinks);
        if how == ActiveSegment::MustRoll {
            state.roll(config)?;
        }
        sync_dir(dir)?;
        state.reclaim(dir)?;
        state.persist(dir)?;
        info!(dir = %dir.display(), segments = state.segments.len(), bytes = state.total_bytes,
            next_seq, "spool open");
        Ok(state)
    }
}

/// Sets each configured sink whose saved cursor lies before the oldest record on disk to resume
/// just before it, and returns, per registry entry, the seq from which its records count into
/// its backlog at open: `saved_next` for a sink whose saved backlog holds, `oldest` for a sink
/// moved here, whose backlog is counted again from zero.
///
/// Segments are deleted as soon as the cursors in memory are past them (or when pushed out or
/// dropped for room), while the cursor file is written lazily: after a crash in between, the
/// file's cursor and backlog still count records of files that are gone. Those records were
/// delivered, pushed out to the dead letters or dropped (each counted when it happened); no
/// reader can take them off the backlog any more, so the backlog is counted from what is left.
fn resume_behind_deleted_segments(
    sinks: &mut [SinkState],
    oldest: u64,
    saved_next: u64,
) -> Vec<u64> {
    sinks
        .iter_mut()
        .map(|sink| {
            if !sink.configured || sink.committed.saturating_add(1) >= oldest {
                return saved_next;
            }
            info!(sink = %sink.name, saved_cursor = sink.committed, resumes_after = oldest - 1,
                "the cursor file was behind the oldest spool segment: the records before it were \
                 finished before the last stop; the sink resumes after them");
            sink.committed = oldest - 1;
            sink.pending = 0;
            oldest
        })
        .collect()
}

/// Adds to each sink's backlog its records on disk from `count_from[i]` (for registry entry
/// `i`) up to `to` that are past its cursor: those appended after the cursor file was written,
/// or all of them for a sink whose backlog is counted again.
fn count_backlog(
    dir: &Path,
    segments: &VecDeque<Segment>,
    to: u64,
    count_from: &[u64],
    registry: &mut [SinkState],
) -> Result<(), SpoolError> {
    let Some(from) = count_from.iter().copied().min().filter(|&from| from < to) else {
        return Ok(());
    };
    let first = segments
        .partition_point(|s| s.base <= from)
        .saturating_sub(1);
    let mut payload = Vec::new();
    for seg in segments.iter().skip(first) {
        let mut cursor = SegmentCursor::open(segment_path(dir, seg.base), seg.base)?;
        loop {
            match cursor.next(seg.bytes, u64::MAX, &mut payload)? {
                Next::Record { seq, mask } if seq >= from => {
                    for (sink, &sink_from) in registry.iter_mut().zip(count_from) {
                        if mask & (1 << sink.bit) != 0 && seq >= sink_from && seq > sink.committed {
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

/// The segment files in `dir`, oldest first, with their sizes.
fn list_segments(dir: &Path) -> Result<VecDeque<Segment>, SpoolError> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list spool directory", dir))? {
        let entry = entry.map_err(io_err("list spool directory", dir))?;
        if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    let mut segments = VecDeque::with_capacity(bases.len() + 1);
    for &base in &bases {
        let path = segment_path(dir, base);
        let bytes = fs::metadata(&path)
            .map_err(io_err("inspect spool segment", &path))?
            .len();
        segments.push_back(Segment { base, bytes });
    }
    Ok(segments)
}

/// Repairs the last segment (see [`super::repair`]); returns the seq after its last intact
/// record (its base when none is left, 1 when there is no segment).
///
/// Only the last segment can have a torn tail after a process crash (sealed ones were
/// complete before the next was created).
fn repair_active_segment(dir: &Path, segments: &mut VecDeque<Segment>) -> Result<u64, SpoolError> {
    let Some(last) = segments.back_mut() else {
        return Ok(1);
    };
    let path = segment_path(dir, last.base);
    let repaired = repair_segment(&path, last.base, last.bytes)?;
    last.bytes = repaired.bytes;
    Ok(repaired.last_seq.map_or(last.base, |s| s + 1))
}

/// The seq the next record gets: past the log's last record, and never below what
/// `sinks.json` saw handed out or committed (the log's tail may have been lost).
fn resume_seq(log_next: u64, saved: Option<&StateFile>) -> u64 {
    let saved_next = saved.map_or(0, |s| s.next_seq);
    let max_committed = saved
        .and_then(|s| s.sinks.iter().map(|e| e.committed).max())
        .unwrap_or(0);
    log_next.max(saved_next).max(max_committed + 1).max(1)
}

/// Opens the segment appends go to. It must be empty or end exactly at `next_seq`, so that
/// every segment's seqs stay below the next one's base: an empty last segment at another base
/// is replaced by one at `next_seq`; a non-empty one that ends below it must be rolled.
fn open_active_segment(
    dir: &Path,
    segments: &mut VecDeque<Segment>,
    log_next: u64,
    next_seq: u64,
) -> Result<(File, ActiveSegment), SpoolError> {
    let mut how = ActiveSegment::Continues;
    let active_path = match segments.back() {
        None => {
            segments.push_back(Segment {
                base: next_seq,
                bytes: 0,
            });
            segment_path(dir, next_seq)
        }
        Some(last) if last.bytes == 0 && last.base != next_seq => {
            let old = segment_path(dir, last.base);
            fs::remove_file(&old).map_err(io_err("delete spool segment", &old))?;
            segments.pop_back();
            segments.push_back(Segment {
                base: next_seq,
                bytes: 0,
            });
            segment_path(dir, next_seq)
        }
        Some(last) => {
            if log_next != next_seq {
                how = ActiveSegment::MustRoll;
            }
            segment_path(dir, last.base)
        }
    };
    let active = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&active_path)
        .map_err(io_err("open spool segment", &active_path))?;
    Ok((active, how))
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;

    use crate::spool::test_support::{backlog, config, names, read_all, read_seqs, segment_files};
    use crate::spool::{FsyncMode, SinkMask, Spool, SpoolConfig, SpoolError, HEADER_BYTES};

    /// Appends ten records `record 0`..`record 9` (seqs 1..=10), for the one sink `a`, to a new
    /// spool of `cfg` and closes it. Returns their payloads and the one segment file that holds
    /// them.
    fn ten_records_in_one_segment(cfg: SpoolConfig) -> (Vec<Vec<u8>>, PathBuf) {
        let dir = cfg.dir.clone();
        let spool = Spool::open(cfg, &names(&["a"])).unwrap();
        let mask = spool.mask(&["a"]);
        let payloads: Vec<Vec<u8>> = (0..10)
            .map(|i| format!("record {i}").into_bytes())
            .collect();
        let batch: Vec<(&[u8], SinkMask)> = payloads.iter().map(|p| (p.as_slice(), mask)).collect();
        spool.append(&batch).unwrap();
        drop(spool);
        let mut files = segment_files(&dir);
        assert_eq!(files.len(), 1);
        (payloads, files.remove(0))
    }

    /// Appends one record to `spool`, reopened after damage to the ten of
    /// [`ten_records_in_one_segment`], and checks that it gets seq 11: appends go on after the
    /// last record kept, and never reuse the seq of one lost.
    fn append_after_reopen(spool: &Spool) {
        let report = spool
            .append(&[(b"after".as_slice(), spool.mask(&["a"]))])
            .unwrap();
        assert_eq!(report.first_seq, Some(11));
    }

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
        let (payloads, segment) = ten_records_in_one_segment(cfg);
        let good_len = fs::metadata(&segment).unwrap().len();
        let last_len = HEADER_BYTES + payloads[9].len() as u64;
        let f = OpenOptions::new().write(true).open(&segment).unwrap();
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
        assert_eq!(fs::metadata(&segment).unwrap().len(), expected_len);

        append_after_reopen(&spool);
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

    /// Ten records `record 0`..`record 9` (seqs 1..=10) in one active segment, damaged by
    /// `damage` (given the file and each record's offset), then reopened: the seqs read back.
    fn reopen_after_damage_in_the_middle(damage: impl FnOnce(&fs::File, &[u64])) -> Vec<u64> {
        let dir = tempfile::tempdir().unwrap();
        let (payloads, segment) = ten_records_in_one_segment(config(dir.path()));
        let offsets: Vec<u64> = payloads
            .iter()
            .scan(0, |at, p| {
                let start = *at;
                *at += HEADER_BYTES + p.len() as u64;
                Some(start)
            })
            .collect();
        let f = OpenOptions::new().write(true).open(&segment).unwrap();
        damage(&f, &offsets);
        drop(f);

        let spool = Spool::open(config(dir.path()), &names(&["a"])).unwrap();
        let mut reader = spool.reader("a").unwrap();
        let got = read_all(&mut reader);
        for (seq, payload) in &got {
            assert_eq!(payload, &payloads[*seq as usize - 1]);
        }
        append_after_reopen(&spool);
        // A restart finds the same records, and the one appended after them.
        drop(reader);
        drop(spool);
        let spool = Spool::open(config(dir.path()), &names(&["a"])).unwrap();
        let again = read_seqs(&mut spool.reader("a").unwrap());
        let mut expected: Vec<u64> = got.iter().map(|r| r.0).collect();
        expected.push(11);
        assert_eq!(again, expected);
        got.iter().map(|r| r.0).collect()
    }

    #[test]
    fn a_corrupt_record_in_the_middle_of_the_active_segment_costs_only_itself() {
        let seqs = reopen_after_damage_in_the_middle(|f, offsets| {
            f.write_all_at(b"X", offsets[4] + HEADER_BYTES + 2).unwrap();
        });
        assert_eq!(seqs, vec![1, 2, 3, 4, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn a_zeroed_stretch_in_the_active_segment_costs_only_the_records_in_it() {
        // What a machine crash can leave: pages written back out of order, a hole of zeros.
        let seqs = reopen_after_damage_in_the_middle(|f, offsets| {
            let hole = vec![0u8; (offsets[6] - offsets[3] - 3) as usize];
            f.write_all_at(&hole, offsets[3] + 1).unwrap();
        });
        assert_eq!(seqs, vec![1, 2, 3, 7, 8, 9, 10]);
    }

    #[test]
    fn a_corrupt_first_record_costs_only_itself() {
        let seqs = reopen_after_damage_in_the_middle(|f, _| {
            f.write_all_at(b"\xff\xff", 0).unwrap();
        });
        assert_eq!(seqs, (2..=10).collect::<Vec<_>>());
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

    #[test]
    fn too_many_sinks_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        assert!(matches!(
            Spool::open(config(dir.path()), &many),
            Err(SpoolError::TooManySinks { count: 65, .. })
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
}
