//! Recovery of the active segment at open: keep every intact record, cut a torn tail, and
//! resynchronise past damage in the middle instead of cutting everything after it.
//!
//! A process crash can only tear the last write, so the active segment's damage is normally a
//! torn tail, cut off. A machine crash (pages written back out of order, under `interval` or
//! `never` fsync) or bit rot can also leave damage with intact records after it; those records
//! were accepted events, so the scan looks for the next intact record past the damage (a header
//! whose seq can follow the last good one and whose CRC holds), and the segment is rewritten
//! without the damaged bytes. What was skipped is counted and logged at error level.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::{error, warn};

use super::error::{io_err, SpoolError};
use super::format::{encode_record, sync_dir, Next, SegmentCursor, HEADER_BYTES};

/// Most bytes of candidate records recovery checksums, per segment, while looking for intact
/// records past damage. Random or zeroed bytes almost never pass the seq check that comes
/// first; this bounds the time a segment full of record-like bytes (event payloads that quote
/// spool headers) can cost at open. Once spent, the rest of the segment is cut off and logged.
pub(crate) const MAX_RESYNC_CHECKED_BYTES: u64 = 256 << 20;

/// How much of the segment one read of the resynchronising scan looks at.
const RESYNC_WINDOW_BYTES: usize = 64 * 1024;

/// What recovery kept of a segment and what it skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Repaired {
    /// The segment's length now: its intact records, one after the other.
    pub(super) bytes: u64,
    /// The seq of its last intact record, `None` when none is left.
    pub(super) last_seq: Option<u64>,
    /// Records lost to damage in the middle (known exactly: seqs in a segment grow by one).
    pub(super) skipped_records: u64,
    /// Damaged bytes in the middle, dropped from the segment.
    pub(super) skipped_bytes: u64,
    /// Bytes of a torn or corrupt tail, cut off.
    pub(super) cut_bytes: u64,
}

/// Where the search for an intact record past damage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resync {
    /// An intact record that can follow the last good one.
    Found {
        /// Where it starts.
        offset: u64,
        /// Its seq.
        seq: u64,
    },
    /// None up to the end of the segment.
    NotFound,
    /// [`MAX_RESYNC_CHECKED_BYTES`] were checksummed without finding one.
    BudgetSpent,
}

/// The segment at `path` (base seq `base`, `len` bytes on disk) rewritten if needed so that it
/// holds only intact records in increasing seq order; returns what it holds now. Rewrites go to
/// a temporary file renamed over the segment, so a crash during the repair leaves the original.
pub(super) fn repair_segment(path: &Path, base: u64, len: u64) -> Result<Repaired, SpoolError> {
    let mut scan = Scan {
        cursor: SegmentCursor::open(path.to_path_buf(), base)?,
        payload: Vec::new(),
        budget: MAX_RESYNC_CHECKED_BYTES,
        rewrite: None,
        repaired: Repaired {
            bytes: 0,
            last_seq: None,
            skipped_records: 0,
            skipped_bytes: 0,
            cut_bytes: 0,
        },
    };
    loop {
        let offset = scan.cursor.offset;
        let damage = match scan.cursor.next(len, u64::MAX, &mut scan.payload)? {
            Next::Record { seq, mask } if scan.follows(base, seq) => {
                scan.keep(seq, mask)?;
                continue;
            }
            // Garbage that happened to pass the CRC: seqs in a segment only grow.
            Next::Record { seq, .. } => format!("seq {seq} out of order at offset {offset}"),
            Next::End | Next::Stop => break,
            Next::Torn(detail) => detail,
        };
        let after = scan.repaired.last_seq.unwrap_or(base.saturating_sub(1));
        match resync(path, offset, len, after, &mut scan.budget)? {
            Resync::Found { offset: next, seq } => {
                scan.skip(path, offset..next, after..seq, &damage)?
            }
            found @ (Resync::NotFound | Resync::BudgetSpent) => {
                scan.repaired.cut_bytes = len - offset;
                if found == Resync::BudgetSpent {
                    error!(segment = %path.display(), offset, checked = MAX_RESYNC_CHECKED_BYTES,
                        "gave up looking for intact spool records past damage; cutting the rest");
                } else {
                    warn!(segment = %path.display(), kept = scan.repaired.bytes,
                        cut = len - offset, %damage, "truncating a torn or corrupt tail left by a crash");
                }
                break;
            }
        }
    }
    scan.finish(path)
}

/// The state of one segment's repair.
struct Scan {
    /// Reads the damaged segment record by record.
    cursor: SegmentCursor,
    /// The current record's payload.
    payload: Vec<u8>,
    /// What the resynchronising scans may still checksum ([`MAX_RESYNC_CHECKED_BYTES`]).
    budget: u64,
    /// The repaired copy, started at the first damage that has intact records after it.
    rewrite: Option<Rewrite>,
    /// What was kept and skipped so far.
    repaired: Repaired,
}

/// The repaired copy of a segment being written.
struct Rewrite {
    /// The temporary file, renamed over the segment when done.
    path: PathBuf,
    /// Buffered: records are written one by one.
    out: BufWriter<File>,
    /// One record's encoding.
    record: Vec<u8>,
}

impl Scan {
    /// Whether an intact record with `seq` can come next in a segment based at `base`.
    fn follows(&self, base: u64, seq: u64) -> bool {
        seq >= base && self.repaired.last_seq.is_none_or(|last| seq > last)
    }

    /// Keeps the record just read.
    fn keep(&mut self, seq: u64, mask: u64) -> Result<(), SpoolError> {
        self.repaired.last_seq = Some(seq);
        self.repaired.bytes += HEADER_BYTES + self.payload.len() as u64;
        if let Some(rewrite) = &mut self.rewrite {
            rewrite.record.clear();
            encode_record(&mut rewrite.record, seq, mask, &self.payload);
            rewrite
                .out
                .write_all(&rewrite.record)
                .map_err(io_err("write repaired spool segment", &rewrite.path))?;
        }
        Ok(())
    }

    /// Skips the damaged `bytes` of the segment at `path`, between the records with the seqs
    /// `seqs.start` (the last kept) and `seqs.end` (the next intact one).
    fn skip(
        &mut self,
        path: &Path,
        bytes: Range<u64>,
        seqs: Range<u64>,
        damage: &str,
    ) -> Result<(), SpoolError> {
        if self.rewrite.is_none() {
            self.rewrite = Some(Rewrite::start(path, self.repaired.bytes)?);
        }
        self.cursor.seek_to(bytes.end)?;
        let records = seqs.end - seqs.start - 1;
        self.repaired.skipped_records += records;
        self.repaired.skipped_bytes += bytes.end - bytes.start;
        error!(segment = %path.display(), offset = bytes.start, bytes = bytes.end - bytes.start,
            records, first_lost = seqs.start + 1, %damage,
            "skipped damaged records in the active spool segment; the records after them are kept");
        Ok(())
    }

    /// Renames the repaired copy over the segment, if there is one; otherwise cuts the
    /// segment after its last intact record.
    fn finish(self, path: &Path) -> Result<Repaired, SpoolError> {
        let Some(Rewrite { path: tmp, out, .. }) = self.rewrite else {
            if self.repaired.cut_bytes > 0 {
                let file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_err("open spool segment", path))?;
                file.set_len(self.repaired.bytes)
                    .map_err(io_err("truncate spool segment", path))?;
                file.sync_all()
                    .map_err(io_err("fsync spool segment", path))?;
            }
            return Ok(self.repaired);
        };
        let file = out
            .into_inner()
            .map_err(|e| io_err("write repaired spool segment", &tmp)(e.into_error()))?;
        file.sync_all()
            .map_err(io_err("fsync repaired spool segment", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("replace spool segment", path))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        sync_dir(dir)?;
        Ok(self.repaired)
    }
}

impl Rewrite {
    /// A copy of the first `prefix` bytes of the segment at `path` (its intact records before
    /// the first damage), in a temporary file beside it that is not a segment name.
    fn start(path: &Path, prefix: u64) -> Result<Rewrite, SpoolError> {
        let tmp = path.with_extension("log.repair");
        let mut out = BufWriter::new(
            File::create(&tmp).map_err(io_err("create repaired spool segment", &tmp))?,
        );
        let mut original = File::open(path)
            .map_err(io_err("open spool segment", path))?
            .take(prefix);
        io::copy(&mut original, &mut out).map_err(io_err("write repaired spool segment", &tmp))?;
        Ok(Rewrite {
            path: tmp,
            out,
            record: Vec::new(),
        })
    }
}

/// Looks for the first intact record past the damage at `damaged` (up to `limit`) that can
/// follow seq `after`. A candidate must claim a seq above `after` by no more than the records
/// that fit in the damaged bytes before it (each takes at least a header) and fit in the
/// segment; only then is its CRC checked, charged to `budget`.
fn resync(
    path: &Path,
    damaged: u64,
    limit: u64,
    after: u64,
    budget: &mut u64,
) -> Result<Resync, SpoolError> {
    let file = File::open(path).map_err(io_err("open spool segment", path))?;
    let mut cursor = SegmentCursor::open(path.to_path_buf(), 0)?;
    let mut window = vec![0u8; RESYNC_WINDOW_BYTES];
    let mut payload = Vec::new();
    let mut start = damaged + 1;
    while start + HEADER_BYTES <= limit {
        let bytes = &mut window[..(limit - start).min(RESYNC_WINDOW_BYTES as u64) as usize];
        file.read_exact_at(bytes, start)
            .map_err(io_err("read spool segment", path))?;
        let candidates = bytes.len() - HEADER_BYTES as usize + 1;
        for (i, header) in bytes.windows(HEADER_BYTES as usize).enumerate() {
            let offset = start + i as u64;
            let len = u64::from(u32::from_le_bytes(
                header[0..4].try_into().unwrap_or_default(),
            ));
            let seq = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
            let most_lost = (offset - damaged) / HEADER_BYTES;
            if seq <= after || seq - after - 1 > most_lost || offset + HEADER_BYTES + len > limit {
                continue;
            }
            let cost = HEADER_BYTES + len;
            if *budget < cost {
                return Ok(Resync::BudgetSpent);
            }
            *budget -= cost;
            cursor.seek_to(offset)?;
            if let Next::Record { seq, .. } = cursor.next(limit, u64::MAX, &mut payload)? {
                return Ok(Resync::Found { offset, seq });
            }
        }
        start += candidates as u64;
    }
    Ok(Resync::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::format::segment_path;

    /// A segment based at 5 with records 5..=12 of `payload_len` bytes; their offsets.
    fn segment(dir: &Path, payload_len: usize) -> (PathBuf, Vec<u8>, Vec<u64>) {
        let path = segment_path(dir, 5);
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        for seq in 5..=12u64 {
            offsets.push(buf.len() as u64);
            encode_record(&mut buf, seq, 1, &vec![seq as u8; payload_len]);
        }
        fs::write(&path, &buf).unwrap();
        (path, buf, offsets)
    }

    /// The seqs of the first `len` bytes of the segment at `path`, all intact.
    fn seqs(path: &Path, len: u64) -> Vec<u64> {
        let mut cursor = SegmentCursor::open(path.to_path_buf(), 5).unwrap();
        let mut payload = Vec::new();
        let mut seqs = Vec::new();
        loop {
            match cursor.next(len, u64::MAX, &mut payload).unwrap() {
                Next::Record { seq, .. } => seqs.push(seq),
                Next::End => return seqs,
                Next::Stop | Next::Torn(_) => panic!("not intact after {seqs:?}"),
            }
        }
    }

    #[test]
    fn an_intact_segment_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (path, buf, _) = segment(dir.path(), 10);
        let repaired = repair_segment(&path, 5, buf.len() as u64).unwrap();
        assert_eq!(repaired.bytes, buf.len() as u64);
        assert_eq!(repaired.last_seq, Some(12));
        assert_eq!((repaired.skipped_records, repaired.cut_bytes), (0, 0));
        assert_eq!(fs::read(&path).unwrap(), buf);
    }

    #[test]
    fn damage_in_the_middle_is_skipped_counted_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (path, buf, offsets) = segment(dir.path(), 10);
        // Records 7 and 8 damaged (a byte of each payload), 10's length field too.
        let mut damaged = buf.clone();
        damaged[offsets[2] as usize + 30] ^= 1;
        damaged[offsets[3] as usize + 30] ^= 1;
        damaged[offsets[5] as usize] = 0xee;
        fs::write(&path, &damaged).unwrap();
        crate::spool::dir_fsyncs::take();
        let repaired = repair_segment(&path, 5, buf.len() as u64).unwrap();
        assert_eq!(crate::spool::dir_fsyncs::take(), [dir.path()], "the rename");
        assert_eq!(repaired.last_seq, Some(12));
        assert_eq!(repaired.skipped_records, 3);
        assert_eq!(repaired.skipped_bytes, 3 * (HEADER_BYTES + 10));
        assert_eq!(repaired.cut_bytes, 0);
        assert_eq!(repaired.bytes, 5 * (HEADER_BYTES + 10));
        assert_eq!(fs::metadata(&path).unwrap().len(), repaired.bytes);
        assert_eq!(seqs(&path, repaired.bytes), vec![5, 6, 9, 11, 12]);
        assert!(!path.with_extension("log.repair").exists());
    }

    #[test]
    fn a_damaged_tail_with_nothing_intact_after_it_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (path, buf, offsets) = segment(dir.path(), 10);
        let mut damaged = buf.clone();
        damaged[offsets[7] as usize + 30] ^= 1;
        damaged.extend_from_slice(b"\x07\0\0\0torn");
        fs::write(&path, &damaged).unwrap();
        let repaired = repair_segment(&path, 5, damaged.len() as u64).unwrap();
        assert_eq!(repaired.last_seq, Some(11));
        assert_eq!(repaired.bytes, offsets[7]);
        assert_eq!(repaired.cut_bytes, damaged.len() as u64 - offsets[7]);
        assert_eq!(repaired.skipped_records, 0);
        assert_eq!(fs::read(&path).unwrap(), &buf[..offsets[7] as usize]);
    }

    #[test]
    fn a_record_that_repeats_an_earlier_seq_is_damage_not_a_resync_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 5);
        let mut buf = Vec::new();
        encode_record(&mut buf, 5, 1, b"five");
        encode_record(&mut buf, 6, 1, b"six!");
        encode_record(&mut buf, 5, 1, b"five");
        encode_record(&mut buf, 7, 1, b"seven");
        fs::write(&path, &buf).unwrap();
        let repaired = repair_segment(&path, 5, buf.len() as u64).unwrap();
        assert_eq!(repaired.last_seq, Some(7));
        assert_eq!(repaired.skipped_bytes, HEADER_BYTES + 4);
        assert_eq!(repaired.skipped_records, 0);
        assert_eq!(seqs(&path, repaired.bytes), vec![5, 6, 7]);
    }

    #[test]
    fn the_search_past_damage_stops_when_its_budget_is_spent() {
        let dir = tempfile::tempdir().unwrap();
        let (path, buf, offsets) = segment(dir.path(), 10);
        let mut damaged = buf.clone();
        damaged[offsets[1] as usize + 30] ^= 1;
        fs::write(&path, &damaged).unwrap();
        // Enough budget for no candidate: the rest is given up, as when nothing is found.
        let mut budget = HEADER_BYTES + 9;
        let found = resync(&path, offsets[1], buf.len() as u64, 5, &mut budget).unwrap();
        assert_eq!(found, Resync::BudgetSpent);
        let mut budget = MAX_RESYNC_CHECKED_BYTES;
        let found = resync(&path, offsets[1], buf.len() as u64, 5, &mut budget).unwrap();
        assert_eq!(
            found,
            Resync::Found {
                offset: offsets[2],
                seq: 7
            }
        );
        assert_eq!(budget, MAX_RESYNC_CHECKED_BYTES - (HEADER_BYTES + 10));
    }
}
