//! The bytes on disk: segment file names, record framing and its CRC, and reading a segment
//! record by record (see the module doc of [`crate::spool`] for the layout).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::error::{io_err, SpoolError};

/// Bounds the fixed part of every record: length, CRC, seq and mask take this many bytes before
/// the payload.
pub const HEADER_BYTES: u64 = 24;

/// Bounds the read buffer of one segment cursor (one per reader), so small records cost no
/// syscall each.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The file of the segment whose first record has seq `base`: 20 decimal digits, `.log`.
pub(super) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// The base seq in a segment file name, `None` for any other file.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The CRC32 a record's header carries: over length, seq, mask and payload.
fn record_crc(len: u32, seq: u64, mask: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(&seq.to_le_bytes());
    hasher.update(&mask.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one framed record to `buf`.
pub(super) fn encode_record(buf: &mut Vec<u8>, seq: u64, mask: u64, payload: &[u8]) {
    // Callers have checked that the payload fits in a u32.
    let len = payload.len() as u32;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&record_crc(len, seq, mask, payload).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&mask.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Fsyncs a directory so that file creations, renames and deletions in it survive a machine crash.
pub(super) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    super::durable::fsync_dir(dir).map_err(io_err("fsync spool directory", dir))
}

/// What the next bytes of a segment hold.
pub(super) enum Next {
    /// A whole, intact record; its payload is in the caller's buffer.
    Record {
        /// The record's sequence number.
        seq: u64,
        /// The sinks it was routed to.
        mask: u64,
    },
    /// The record's seq is past the caller's stop point; nothing was consumed.
    Stop,
    /// Exactly at the limit.
    End,
    /// A partial or corrupt record starts here.
    Torn(String),
}

/// Sequential reading of one segment file, up to a byte limit the caller knows to be written.
pub(super) struct SegmentCursor {
    /// For error messages, and to reopen.
    path: PathBuf,
    /// Base seq of the segment, to tell whether it still exists.
    pub(super) base: u64,
    /// Buffered so that small records cost no syscall each.
    reader: BufReader<File>,
    /// Byte offset of the next record.
    pub(super) offset: u64,
}

impl SegmentCursor {
    /// Opens the segment at `path` (whose base seq is `base`) at its first record.
    pub(super) fn open(path: PathBuf, base: u64) -> Result<SegmentCursor, SpoolError> {
        let file = File::open(&path).map_err(io_err("open spool segment", &path))?;
        Ok(SegmentCursor {
            reader: BufReader::with_capacity(READ_BUFFER_BYTES, file),
            path,
            base,
            offset: 0,
        })
    }

    /// Moves to `offset`, the start of a record.
    pub(super) fn seek_to(&mut self, offset: u64) -> Result<(), SpoolError> {
        self.reader
            .seek(SeekFrom::Start(offset))
            .map_err(io_err("seek in spool segment", &self.path))?;
        self.offset = offset;
        Ok(())
    }

    /// Reads the record at `offset` into `payload`, unless its seq is past `stop_after`.
    pub(super) fn next(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_other_files_are_not_segments() {
        let path = segment_path(Path::new("/spool"), 52113);
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "00000000000000052113.log");
        assert_eq!(parse_segment_name(name), Some(52113));
        for other in [
            "sinks.json",
            "52113.log",
            "0000000000000005211x.log",
            "x.log",
        ] {
            assert_eq!(parse_segment_name(other), None, "{other}");
        }
    }

    #[test]
    fn records_read_back_and_a_torn_tail_stops_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 5);
        let mut buf = Vec::new();
        encode_record(&mut buf, 5, 0b01, b"first");
        encode_record(&mut buf, 6, 0b10, b"second");
        let whole = buf.len() as u64;
        assert_eq!(whole, 2 * HEADER_BYTES + 11);
        buf.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&path, &buf).unwrap();

        let mut cursor = SegmentCursor::open(path.clone(), 5).unwrap();
        let mut payload = Vec::new();
        assert!(matches!(
            cursor.next(whole, u64::MAX, &mut payload).unwrap(),
            Next::Record { seq: 5, mask: 0b01 }
        ));
        assert_eq!(payload, b"first");
        assert!(matches!(
            cursor.next(whole, 5, &mut payload).unwrap(),
            Next::Stop
        ));
        assert!(matches!(
            cursor.next(whole, u64::MAX, &mut payload).unwrap(),
            Next::Record { seq: 6, mask: 0b10 }
        ));
        assert_eq!(payload, b"second");
        assert!(matches!(
            cursor.next(whole, u64::MAX, &mut payload).unwrap(),
            Next::End
        ));
        assert!(matches!(
            cursor
                .next(buf.len() as u64, u64::MAX, &mut payload)
                .unwrap(),
            Next::Torn(_)
        ));
    }
}
