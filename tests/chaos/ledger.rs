//! The tap's ledger: one JSON line per thing seen in the spool's segment files, in the order the
//! tap saw them. Replayed in order ([`SpoolContents::replay`]), it says which records the spool
//! held: a record counts unless a later line cut it off again.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One line of the ledger.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Line {
    /// A whole record with a valid CRC, read from a segment.
    Record(SpooledRecord),
    /// The segment's file shrank: its records at or after `offset` are gone (a failed write cut
    /// back, or recovery cutting a torn tail at the next start).
    Cut {
        /// The segment's base seq (its file name).
        segment: u64,
        /// The file's new length.
        offset: u64,
        /// When the tap saw it, in ms since the epoch.
        at_ms: u64,
    },
    /// Bytes of a segment that held no valid record and were skipped to find the next one.
    Skipped {
        /// The segment's base seq.
        segment: u64,
        /// First byte skipped.
        from: u64,
        /// First byte after the skipped ones.
        to: u64,
        /// When the tap skipped them, in ms since the epoch.
        at_ms: u64,
    },
    /// A record with a valid CRC whose payload is not an event (never expected).
    Undecodable {
        /// The segment's base seq.
        segment: u64,
        /// Where the record starts.
        offset: u64,
        /// The record's seq.
        seq: u64,
        /// The decoder's complaint.
        error: String,
    },
}

/// One spool record as the tap read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SpooledRecord {
    /// The segment's base seq (its file name).
    pub(crate) segment: u64,
    /// Where the record starts in the segment file.
    pub(crate) offset: u64,
    /// The record's spool seq.
    pub(crate) seq: u64,
    /// The sinks it was routed to, one bit each (`sinks.json` says whose).
    pub(crate) mask: u64,
    /// The event id (32 hex digits): with the token, what a sink's copy is matched by.
    pub(crate) id: String,
    /// The token whose socket read it.
    pub(crate) token: String,
    /// Chatwoot's event name.
    pub(crate) event: String,
    /// The mock's number of the broadcast, for the report.
    pub(crate) mock_seq: Option<u64>,
    /// When the tap read it, in ms since the epoch.
    pub(crate) at_ms: u64,
}

/// What a sink's copy of an event is matched by: the event id and the token that read it (a
/// broadcast read by three tokens is three records with one id).
pub(crate) type Key = (String, String);

/// What the spool held, from the ledger.
pub(crate) struct SpoolContents {
    /// Every record that stayed, by key; a key spooled twice (two seqs) has two entries.
    pub(crate) records: HashMap<Key, Vec<SpooledRecord>>,
    /// Records read and later cut off with their segment's tail.
    pub(crate) cut: u64,
    /// Bytes skipped as holding no valid record.
    pub(crate) skipped_bytes: u64,
    /// Records whose payload was not an event.
    pub(crate) undecodable: u64,
    /// Seqs up to the highest record kept that the tap never saw, as ranges: a segment created
    /// and deleted between two looks would leave one.
    pub(crate) unseen_seqs: Vec<(u64, u64)>,
}

impl SpoolContents {
    /// Reads the ledger at `path` and replays it.
    pub(crate) fn replay(path: &Path) -> Result<SpoolContents> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open the ledger {}", path.display()))?;
        // By (segment, offset): a cut removes a segment's tail; a record read again at the same
        // place after a cut replaces the one before.
        let mut placed: BTreeMap<(u64, u64), SpooledRecord> = BTreeMap::new();
        let mut contents = SpoolContents {
            records: HashMap::new(),
            cut: 0,
            skipped_bytes: 0,
            undecodable: 0,
            unseen_seqs: Vec::new(),
        };
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            let line: Line = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a ledger line", path.display(), n + 1))?;
            match line {
                Line::Record(record) => {
                    placed.insert((record.segment, record.offset), record);
                }
                Line::Cut {
                    segment, offset, ..
                } => {
                    let gone: Vec<_> = placed
                        .range((segment, offset)..(segment, u64::MAX))
                        .map(|(k, _)| *k)
                        .collect();
                    contents.cut += gone.len() as u64;
                    for key in gone {
                        placed.remove(&key);
                    }
                }
                Line::Skipped { from, to, .. } => contents.skipped_bytes += to - from,
                Line::Undecodable { .. } => contents.undecodable += 1,
            }
        }
        // Seq 0 is no record: the spool's seqs start at 1, and the tap watched from the start.
        let mut seqs: Vec<u64> = std::iter::once(0)
            .chain(placed.values().map(|r| r.seq))
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        contents.unseen_seqs = seqs
            .windows(2)
            .filter(|w| w[1] > w[0] + 1)
            .map(|w| (w[0] + 1, w[1] - 1))
            .collect();
        for record in placed.into_values() {
            contents
                .records
                .entry((record.id.clone(), record.token.clone()))
                .or_default()
                .push(record);
        }
        Ok(contents)
    }
}
