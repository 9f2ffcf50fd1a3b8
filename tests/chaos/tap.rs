//! Role `tap`: follows the spool's segment files from outside the bridge and writes every
//! record it sees to the ledger ([`crate::ledger`]), so the check knows what reached the spool
//! even after the bridge reclaimed the segments.
//!
//! It reads each segment as it grows, record by record (24-byte header, CRC over length, seq,
//! mask and payload, as `src/spool` writes them), and only whole records with a valid CRC. A
//! file that shrinks (a failed write cut back, a torn tail cut at the next start) becomes a
//! `cut` line; bytes that stay invalid for [`STUCK_FOR`] while a newer segment exists (a torn
//! record the bridge wrote past) are skipped to the next valid record and logged. An open file
//! stays readable after the bridge deletes it, so a reclaimed segment is still read to its end.
//!
//! ```text
//! tap --spool DIR --ledger FILE --stop-file FILE
//! ```
//! It ends once the stop file exists and a last look found nothing new.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chatwoot_bridge::event::Event;

use crate::args::Args;
use crate::ledger::{Line, SpooledRecord};
use crate::now_ms;

/// The spool's record header: length, CRC, seq and mask.
const HEADER_BYTES: usize = 24;

/// Bounds a record's payload as the tap believes it: longer is garbage, not a record (the
/// bridge's frames are at most 8 MiB).
const MAX_PAYLOAD_BYTES: usize = 16 << 20;

/// How long invalid bytes at the end of a segment may stay before the tap skips them: a write
/// in progress completes in microseconds, a torn record never.
const STUCK_FOR: Duration = Duration::from_secs(2);

/// How long the tap sleeps when a look found nothing new: short next to a segment's life (a
/// segment holds megabytes, seconds of events), so none is created and deleted unseen.
const IDLE: Duration = Duration::from_millis(5);

pub(crate) fn run(args: &Args) -> Result<()> {
    let dir = args.path("spool")?;
    let ledger = args.path("ledger")?;
    let stop = args.path("stop-file")?;
    let out = File::options()
        .create(true)
        .append(true)
        .open(&ledger)
        .with_context(|| format!("cannot open the ledger {}", ledger.display()))?;
    let mut tap = Tap {
        dir,
        ledger: BufWriter::new(out),
        following: None,
        last_base: None,
    };
    loop {
        // Looked at before the pass, so the last pass sees everything written before the stop.
        let stopping = stop.exists();
        let progressed = tap.look()?;
        tap.ledger.flush()?;
        if stopping && !progressed {
            return Ok(());
        }
        if !progressed {
            std::thread::sleep(IDLE);
        }
    }
}

/// The tap's state between looks.
struct Tap {
    /// The spool directory.
    dir: PathBuf,
    /// Where the lines go.
    ledger: BufWriter<File>,
    /// The segment being read.
    following: Option<Segment>,
    /// The base of the last segment read to its end: the next one is the first above it.
    last_base: Option<u64>,
}

impl Tap {
    /// One look: reads what is new in the segment followed, or moves to the next segment.
    /// Whether anything changed.
    fn look(&mut self) -> Result<bool> {
        let bases = segment_bases(&self.dir)?;
        if self.following.is_none() {
            let Some(&base) = bases
                .iter()
                .find(|&&b| self.last_base.is_none_or(|l| b > l))
            else {
                return Ok(false);
            };
            match File::open(segment_path(&self.dir, base)) {
                Ok(file) => {
                    self.following = Some(Segment {
                        base,
                        file,
                        offset: 0,
                        stuck: None,
                    })
                }
                // Reclaimed between the listing and the open: its seqs show as unseen.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.last_base = Some(base);
                }
                Err(e) => return Err(e).context("cannot open a spool segment"),
            }
            return Ok(true);
        }
        let segment = self.following.as_mut().expect("checked above");
        let newer = bases.iter().any(|&b| b > segment.base);
        let progressed = segment.read_new(&mut self.ledger, newer)?;
        if !progressed && newer && segment.finished()? {
            self.last_base = Some(segment.base);
            self.following = None;
            return Ok(true);
        }
        Ok(progressed)
    }
}

/// One segment file being followed.
struct Segment {
    /// Its base seq, from the file name.
    base: u64,
    /// Open for the whole read: it stays readable after the bridge deletes it.
    file: File,
    /// Where the next record starts.
    offset: u64,
    /// Since when the bytes at `offset` have been invalid or incomplete, and where that was.
    stuck: Option<(u64, Instant)>,
}

impl Segment {
    /// Reads the whole records written since the last look; handles a shrunk file and, when
    /// `newer` segments exist, invalid bytes that stayed. Whether anything changed.
    fn read_new(&mut self, ledger: &mut impl Write, newer: bool) -> Result<bool> {
        let len = self.file.metadata()?.len();
        let mut progressed = false;
        if len < self.offset {
            write_line(
                ledger,
                &Line::Cut {
                    segment: self.base,
                    offset: len,
                    at_ms: now_ms(),
                },
            )?;
            self.offset = len;
            self.stuck = None;
            progressed = true;
        }
        if len == self.offset {
            return Ok(progressed);
        }
        let mut bytes = vec![0; (len - self.offset) as usize];
        self.file.read_exact_at(&mut bytes, self.offset)?;
        let mut at = 0;
        while at < bytes.len() {
            match parse_record(&bytes[at..]) {
                Some((seq, mask, payload)) => {
                    let offset = self.offset + at as u64;
                    write_line(ledger, &record_line(self.base, offset, seq, mask, payload))?;
                    at += HEADER_BYTES + payload.len();
                    self.stuck = None;
                    progressed = true;
                }
                None => {
                    let here = self.offset + at as u64;
                    let stuck_long = matches!(self.stuck, Some((o, since)) if o == here && since.elapsed() > STUCK_FOR);
                    if !stuck_long {
                        if self.stuck.is_none_or(|(o, _)| o != here) {
                            self.stuck = Some((here, Instant::now()));
                        }
                        break;
                    }
                    // Invalid for long: skip to the next valid record, or to the end once a
                    // newer segment shows nothing more will come here.
                    let next = next_valid(&bytes, at + 1);
                    if next.is_none() && !newer {
                        break;
                    }
                    let to = next.unwrap_or(bytes.len());
                    write_line(
                        ledger,
                        &Line::Skipped {
                            segment: self.base,
                            from: here,
                            to: self.offset + to as u64,
                            at_ms: now_ms(),
                        },
                    )?;
                    at = to;
                    self.stuck = None;
                    progressed = true;
                }
            }
        }
        self.offset += at as u64;
        Ok(progressed)
    }

    /// Whether everything in the file was read (the bridge never appends to a segment once a
    /// newer one exists).
    fn finished(&self) -> Result<bool> {
        Ok(self.file.metadata()?.len() == self.offset)
    }
}

/// The ledger line of a whole record: the event's id, token and number, or why it is no event.
fn record_line(segment: u64, offset: u64, seq: u64, mask: u64, payload: &[u8]) -> Line {
    match Event::decode_record(payload) {
        Ok(event) => Line::Record(SpooledRecord {
            segment,
            offset,
            seq,
            mask,
            id: event.id.hex().as_str().to_owned(),
            token: event.token.to_string(),
            event: event.name.to_string(),
            mock_seq: crate::mock_seq(event.data.get()),
            at_ms: now_ms(),
        }),
        Err(e) => Line::Undecodable {
            segment,
            offset,
            seq,
            error: e.to_string(),
        },
    }
}

/// The seq, mask and payload of the whole, valid record at the start of `bytes`; `None` when
/// it is incomplete or invalid.
fn parse_record(bytes: &[u8]) -> Option<(u64, u64, &[u8])> {
    let header = bytes.get(..HEADER_BYTES)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?);
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let mask = u64::from_le_bytes(header[16..24].try_into().ok()?);
    if len as usize > MAX_PAYLOAD_BYTES {
        return None;
    }
    let payload = bytes.get(HEADER_BYTES..HEADER_BYTES + len as usize)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(&seq.to_le_bytes());
    hasher.update(&mask.to_le_bytes());
    hasher.update(payload);
    (hasher.finalize() == crc).then_some((seq, mask, payload))
}

/// Where the next valid record after `from` starts.
fn next_valid(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len()).find(|&at| parse_record(&bytes[at..]).is_some())
}

fn write_line(ledger: &mut impl Write, line: &Line) -> Result<()> {
    serde_json::to_writer(&mut *ledger, line)?;
    ledger.write_all(b"\n")?;
    Ok(())
}

/// The bases of the segment files in `dir`, ascending: 20 digits and `.log`, as the spool
/// names them.
fn segment_bases(dir: &Path) -> Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // Not created yet: the bridge has not started.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut bases = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some(digits) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        if digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) {
            bases.push(digits.parse()?);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}
