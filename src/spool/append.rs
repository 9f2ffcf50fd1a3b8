//! The append path: size the batch, make room by the `when_full` policy, encode the batch and
//! write it with one `write`, then account for it.

use std::os::unix::fs::FileExt;

use tracing::{error, warn};

use super::error::{io_err, SpoolError};
use super::format::{encode_record, segment_path, HEADER_BYTES};
use super::state::State;
use super::{AppendReport, FsyncMode, SinkMask, Spool, SpoolConfig, SpoolPosition, WhenFull};

/// Bounds the encoding buffer kept between appends: a buffer grown past this by a one-off huge
/// batch is freed rather than pinned for the life of the process.
const MAX_KEPT_BUFFER_BYTES: usize = 16 << 20;

/// One record to append: its payload and the sinks it goes to.
pub(super) type Record<'p> = (&'p [u8], SinkMask);

/// What an append does with records that do not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WhenNoRoom {
    /// The configured policy, counted in the stats and logged.
    Policy(WhenFull),
    /// Take only what keeps the spool within the replay's share, refusing the rest without
    /// counting it as dropped: the records are safe elsewhere and are offered again later
    /// ([`Spool::append_replayed`]).
    ReplayShare,
}

/// Records of a batch and their size on disk.
#[derive(Clone, Copy)]
struct Batch<'b, 'p> {
    /// The records, in order.
    records: &'b [Record<'p>],
    /// Their size on disk, headers included.
    bytes: u64,
}

impl AppendReport {
    /// The report of an append that wrote nothing (yet).
    fn nothing() -> AppendReport {
        AppendReport {
            first_seq: None,
            appended: 0,
            dropped_newest: 0,
            dropped_oldest: 0,
            awaiting_room: 0,
            end: None,
        }
    }
}

impl Spool {
    /// Appends `records`, making room by `when_no_room`; calls `before_wake` with the report of
    /// a successful write before waiting readers are woken.
    pub(super) fn append_with(
        &self,
        records: &[Record<'_>],
        when_no_room: WhenNoRoom,
        before_wake: impl FnOnce(&AppendReport),
    ) -> Result<AppendReport, SpoolError> {
        let config = &self.inner.config;
        let batch = Batch {
            records,
            bytes: batch_bytes(records, config.max_bytes)?,
        };
        let mut report = AppendReport::nothing();
        if records.is_empty() {
            return Ok(report);
        }
        let limit = match when_no_room {
            WhenNoRoom::Policy(_) => config.max_bytes,
            WhenNoRoom::ReplayShare => config.replay_bytes(),
        };
        let mut state = self.inner.lock();
        let state = &mut *state;
        if state.total_bytes + batch.bytes > limit {
            // Before anything is refused or dropped for room: room that nobody needs.
            state.reclaim_delivered_active(config)?;
        }
        let accepted = if state.total_bytes + batch.bytes > limit {
            state.fit_batch(config, batch, when_no_room, &mut report)?
        } else {
            batch
        };
        if accepted.records.is_empty() {
            return Ok(report);
        }
        state.write_batch(config, accepted, &mut report)?;
        before_wake(&report);
        self.inner.appended.send_replace(state.next_seq);
        Ok(report)
    }
}

/// The batch's size on disk; fails if any record could never fit in the spool.
fn batch_bytes(records: &[Record<'_>], max_bytes: u64) -> Result<u64, SpoolError> {
    let mut bytes = 0u64;
    for (payload, _) in records {
        let size = HEADER_BYTES + payload.len() as u64;
        if size > max_bytes || payload.len() > u32::MAX as usize {
            return Err(SpoolError::RecordTooLarge {
                size,
                max: max_bytes,
            });
        }
        bytes += size;
    }
    Ok(bytes)
}

impl State {
    /// The spool would exceed `max_bytes` (or a replay its share): applies `when_no_room`
    /// (refuse the newest records, delete the oldest segments, leave room-making to the caller,
    /// or take only a replay's share) and returns what of the batch is to be written.
    fn fit_batch<'b, 'p>(
        &mut self,
        config: &SpoolConfig,
        batch: Batch<'b, 'p>,
        when_no_room: WhenNoRoom,
        report: &mut AppendReport,
    ) -> Result<Batch<'b, 'p>, SpoolError> {
        match when_no_room {
            WhenNoRoom::ReplayShare => Ok(self.fit_replayed(config, batch, report)),
            WhenNoRoom::Policy(WhenFull::DropNewest) => {
                let accepted = self.refuse_newest(config.max_bytes, batch, report);
                self.dropped_newest += report.dropped_newest;
                warn!(
                    refused = report.dropped_newest,
                    max_bytes = config.max_bytes,
                    "spool full: refusing the newest records"
                );
                Ok(accepted)
            }
            WhenNoRoom::Policy(WhenFull::DropOldest) => self.drop_oldest_for(config, batch, report),
            WhenNoRoom::Policy(WhenFull::DeadLetter) => {
                // All or nothing: the caller makes room and offers the same batch again, whole.
                report.awaiting_room = batch.records.len() as u64;
                Ok(Batch {
                    records: &[],
                    bytes: 0,
                })
            }
        }
    }

    /// The records at the head of the batch that fit in the room left; the rest are reported
    /// as refused.
    fn refuse_newest<'b, 'p>(
        &self,
        max_bytes: u64,
        batch: Batch<'b, 'p>,
        report: &mut AppendReport,
    ) -> Batch<'b, 'p> {
        let room = max_bytes.saturating_sub(self.total_bytes);
        let mut fit = 0;
        let mut used = 0;
        for (payload, _) in batch.records {
            let size = HEADER_BYTES + payload.len() as u64;
            if used + size > room {
                break;
            }
            used += size;
            fit += 1;
        }
        report.dropped_newest = (batch.records.len() - fit) as u64;
        Batch {
            records: &batch.records[..fit],
            bytes: used,
        }
    }

    /// The head of a replayed batch that keeps the used bytes within the replay's share; a
    /// first record larger than the whole share goes in alone while the used bytes are below
    /// it and it fits in `max_bytes` (else it could never go in). The rest is reported as
    /// refused.
    fn fit_replayed<'b, 'p>(
        &self,
        config: &SpoolConfig,
        batch: Batch<'b, 'p>,
        report: &mut AppendReport,
    ) -> Batch<'b, 'p> {
        let share = config.replay_bytes();
        let fitted = self.refuse_newest(share, batch, report);
        let Some((first, _)) = batch.records.first() else {
            return fitted;
        };
        let size = HEADER_BYTES + first.len() as u64;
        let oversized_alone = fitted.records.is_empty()
            && size > share
            && self.total_bytes < share
            && self.total_bytes + size <= config.max_bytes;
        if !oversized_alone {
            return fitted;
        }
        report.dropped_newest = (batch.records.len() - 1) as u64;
        Batch {
            records: &batch.records[..1],
            bytes: size,
        }
    }

    /// Deletes the oldest segments until the batch fits; if the batch alone exceeds the cap,
    /// its oldest records go first. Counts every loss.
    fn drop_oldest_for<'b, 'p>(
        &mut self,
        config: &SpoolConfig,
        batch: Batch<'b, 'p>,
        report: &mut AppendReport,
    ) -> Result<Batch<'b, 'p>, SpoolError> {
        let mut accepted = batch;
        let mut skip = 0;
        while accepted.bytes > config.max_bytes {
            accepted.bytes -= HEADER_BYTES + batch.records[skip].0.len() as u64;
            skip += 1;
        }
        if skip > 0 {
            report.dropped_oldest += self.count_refused_oldest(&batch.records[..skip]);
            accepted.records = &batch.records[skip..];
        }
        while self.total_bytes + accepted.bytes > config.max_bytes {
            if self.segments.len() == 1 {
                // Only the active segment is left: seal it so it can go too.
                self.roll(config)?;
            }
            report.dropped_oldest += self.drop_oldest(&config.dir)?;
        }
        self.dropped_oldest += report.dropped_oldest;
        if report.dropped_oldest > 0 {
            warn!(
                lost = report.dropped_oldest,
                max_bytes = config.max_bytes,
                "spool full: deleted the oldest records"
            );
        }
        Ok(accepted)
    }

    /// Counts, per configured sink, records of the batch it will never see (`DropOldest` with a
    /// batch larger than `max_bytes`).
    fn count_refused_oldest(&mut self, records: &[Record<'_>]) -> u64 {
        for (_, mask) in records {
            for sink in self.sinks.iter_mut().filter(|s| s.configured) {
                if mask.0 & (1 << sink.bit) != 0 {
                    sink.lost += 1;
                }
            }
        }
        records.len() as u64
    }

    /// Writes the batch at the end of the active segment (a new one if it would grow past the
    /// segment limit) with one `write`, fsynced under `Always`, and accounts for it.
    fn write_batch(
        &mut self,
        config: &SpoolConfig,
        batch: Batch<'_, '_>,
        report: &mut AppendReport,
    ) -> Result<(), SpoolError> {
        let active_bytes = self.segments.back().map_or(0, |s| s.bytes);
        if self.must_roll
            || (active_bytes > 0 && active_bytes + batch.bytes > config.segment_limit())
        {
            self.roll(config)?;
        }

        let first_seq = self.next_seq;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        for (i, (payload, mask)) in batch.records.iter().enumerate() {
            encode_record(&mut buf, first_seq + i as u64, mask.0, payload);
        }
        let seg = *self
            .segments
            .back()
            .expect("spool always has an active segment");
        let path = segment_path(&config.dir, seg.base);
        #[cfg(test)]
        let write = super::test_support::injected_fault(&config.dir)
            .and_then(|()| self.active.write_all_at(&buf, seg.bytes));
        #[cfg(not(test))]
        let write = self.active.write_all_at(&buf, seg.bytes);
        if let Err(e) = write {
            // Cut off whatever part was written; if even that fails, never write after it.
            if let Err(trunc) = self.active.set_len(seg.bytes) {
                error!(segment = %path.display(), error = %trunc,
                    "cannot cut a failed write; the next append starts a new segment");
                self.must_roll = true;
            }
            self.buf = buf;
            return Err(io_err("write spool segment", &path)(e));
        }
        if config.fsync == FsyncMode::Always {
            self.active
                .sync_data()
                .map_err(io_err("fsync spool segment", &path))?;
        }
        let written = buf.len() as u64;
        if buf.capacity() > MAX_KEPT_BUFFER_BYTES {
            buf = Vec::new();
        }
        self.buf = buf;
        self.account_written(batch.records, written, report);
        report.first_seq = Some(first_seq);
        report.appended = batch.records.len();
        Ok(())
    }

    /// Books `written` bytes of `records` just written: segment and spool sizes, the next seq,
    /// each sink's backlog, and where the file continues.
    fn account_written(&mut self, records: &[Record<'_>], written: u64, report: &mut AppendReport) {
        if let Some(active) = self.segments.back_mut() {
            active.bytes += written;
            report.end = Some(SpoolPosition {
                segment: active.base,
                offset: active.bytes,
            });
        }
        self.total_bytes += written;
        self.next_seq += records.len() as u64;
        for (_, mask) in records {
            for sink in self.sinks.iter_mut().filter(|s| s.configured) {
                if mask.0 & (1 << sink.bit) != 0 {
                    sink.pending += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::spool::test_support::{
        append_n, append_one_by_one, backlog, config, names, read_all, read_seqs, small_spool,
        spool_with_room_for_two, REC,
    };
    use crate::spool::{SinkMask, Spool, SpoolError, WhenFull};

    #[test]
    fn drop_newest_refuses_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, mask) = spool_with_room_for_two(dir.path(), WhenFull::DropNewest);
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
        assert_eq!(read_seqs(&mut reader), (1..=10).collect::<Vec<_>>());
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
    fn appending_replayed_pushes_nothing_out_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_bytes = 10 * REC;
        cfg.when_full = WhenFull::DropOldest;
        cfg.segment_bytes = 3 * REC;
        cfg.replay_share = 1.0;
        let spool = Spool::open(cfg, &names(&["slow"])).unwrap();
        let mask = spool.mask(&["slow"]);
        append_one_by_one(&spool, 8, mask);
        let payload = [7u8; 100];
        let batch: Vec<(&[u8], SinkMask)> = (0..5).map(|_| (payload.as_slice(), mask)).collect();
        let report = spool.append_replayed(&batch).unwrap();
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

    /// A spool of ten records (`REC` bytes each) whose replays may fill `share` of it.
    fn spool_with_replay_share(dir: &std::path::Path, share: f64) -> Spool {
        let mut cfg = config(dir);
        cfg.max_bytes = 10 * REC;
        cfg.replay_share = share;
        Spool::open(cfg, &names(&["a"])).unwrap()
    }

    #[test]
    fn a_replay_fills_only_its_share_and_leaves_live_records_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        // 4.5 records' worth: four replayed records at most.
        let spool = spool_with_replay_share(dir.path(), 0.45);
        let mask = spool.mask(&["a"]);
        append_n(&spool, 1, mask);
        let payload = [7u8; 100];
        let replayed = |n: usize| -> Vec<(&[u8], SinkMask)> {
            (0..n).map(|_| (payload.as_slice(), mask)).collect()
        };
        let report = spool.append_replayed(&replayed(5)).unwrap();
        assert_eq!((report.appended, report.dropped_newest), (3, 2));
        // Pass after pass, nothing more: the share does not creep towards a full spool.
        for _ in 0..3 {
            assert_eq!(spool.append_replayed(&replayed(1)).unwrap().appended, 0);
        }
        // Live records have the other six places to themselves.
        assert_eq!(append_n(&spool, 6, mask).appended, 6);
        let stats = spool.stats();
        assert_eq!((stats.bytes, stats.dropped_newest), (10 * REC, 0));
    }

    #[test]
    fn a_delivered_active_segment_makes_room_for_the_next_replay() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 4 KiB: every record here stays in the active segment.
        let spool = spool_with_replay_share(dir.path(), 0.5);
        let mask = spool.mask(&["a"]);
        let payload = [7u8; 100];
        let batch: Vec<(&[u8], SinkMask)> = (0..5).map(|_| (payload.as_slice(), mask)).collect();
        assert_eq!(spool.append_replayed(&batch).unwrap().appended, 5);
        let mut reader = spool.reader("a").unwrap();
        assert_eq!(read_all(&mut reader).len(), 5);
        reader.commit(5).unwrap();
        // Reclaiming leaves the active segment; delivered, it must not hold the share.
        let report = spool.append_replayed(&batch).unwrap();
        assert_eq!(
            report.appended, 5,
            "the replay stalled on delivered records"
        );
        let stats = spool.stats();
        assert_eq!((stats.bytes, stats.segments), (5 * REC, 1));
        assert_eq!(read_seqs(&mut reader), (6..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_replayed_record_larger_than_the_share_goes_in_alone_while_below_it() {
        let dir = tempfile::tempdir().unwrap();
        // 3.7 records' worth; the big record takes about four.
        let spool = spool_with_replay_share(dir.path(), 0.37);
        let mask = spool.mask(&["a"]);
        let (big, small) = ([1u8; 400], [2u8; 100]);
        let batch = [(big.as_slice(), mask), (small.as_slice(), mask)];
        let report = spool.append_replayed(&batch).unwrap();
        assert_eq!((report.appended, report.dropped_newest), (1, 1));
        // Past its share now: nothing more until the spool is back below it.
        let report = spool.append_replayed(&[(small.as_slice(), mask)]).unwrap();
        assert_eq!(report.appended, 0);
        let report = spool.append_replayed(&[(big.as_slice(), mask)]).unwrap();
        assert_eq!(report.appended, 0);
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

        assert_eq!(read_seqs(&mut slow), (4..=13).collect::<Vec<_>>());
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
}
