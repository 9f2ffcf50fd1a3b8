//! Role `check`: compares, per sink, what reached the spool (the tap's ledger) with what the
//! destination holds and what went to the sink's dead letters; counts duplicates by cause;
//! prints one summary line on stdout (details of anything lost on stderr) and fails unless
//! nothing was lost and the comparison was sound.
//!
//! ```text
//! check --run DIR --spool DIR --nats URL --kafka HOST:PORT
//! ```
//! The run directory holds the ledger (`ledger.jsonl`), the webhook receiver's record
//! (`webhook.jsonl`), the timeline (`timeline.log`) and the bridge's JSON log (`bridge.log`).
//!
//! A copy delivered twice is a duplicate, by cause: **spooled twice** when the ledger has the
//! event at two seqs, **after a restart** when the bridge was started between the two copies
//! (what a killed bridge had delivered but not yet committed), **retried** otherwise (a batch
//! sent again after a failure the destination had partly taken).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::args::Args;
use crate::ledger::{Key, SpoolContents};
use crate::readback::{self, Deliveries};
use crate::timeline::Timeline;

/// The sinks of the chaos config, as named there, and the stream and topic they write.
pub(crate) const SINKS: [&str; 3] = ["jetstream", "kafka", "webhook"];
/// The JetStream stream the `jetstream` sink publishes into.
pub(crate) const STREAM: &str = "CHAOS";
/// The Kafka topic of the `kafka` sink.
pub(crate) const TOPIC: &str = "chaos";

/// Lost events listed on stderr per sink; the rest are counted.
const LOST_LISTED: usize = 20;

/// One sink's result.
#[derive(Default)]
struct SinkResult {
    /// Events routed to it that reached the spool.
    expected: u64,
    /// Of those, delivered at least once.
    delivered: u64,
    /// Of those, not delivered but in its dead letters.
    dead: u64,
    /// Of those, neither: lost.
    lost: Vec<Key>,
    /// Extra copies by cause.
    duplicates: BTreeMap<&'static str, u64>,
    /// Copies of events the tap never saw in the spool: the ledger is incomplete.
    unledgered: u64,
    /// Messages without the headers to match them.
    unmatched: u64,
}

pub(crate) async fn run(args: &Args) -> Result<bool> {
    let run = args.path("run")?;
    let spool = args.path("spool")?;
    let contents = SpoolContents::replay(&run.join("ledger.jsonl"))?;
    let timeline = Timeline::read(&run.join("timeline.log"))?;
    let bits = sink_bits(&spool)?;
    let mut results = Vec::new();
    for sink in SINKS {
        let bit = *bits
            .get(sink)
            .with_context(|| format!("sinks.json has no sink {sink}"))?;
        let started = std::time::Instant::now();
        let result = match read_back(sink, args, &run, &spool).await {
            Ok((deliveries, dead)) => {
                eprintln!(
                    "chaos check: {sink}: {} events read back in {:.1} s",
                    deliveries.copies.len(),
                    started.elapsed().as_secs_f64()
                );
                let result = compare(&contents, &deliveries, &dead, bit, &timeline);
                explain_lost(sink, &result, &contents, &timeline, &run)?;
                Ok(result)
            }
            Err(e) => {
                eprintln!("chaos check: {sink}: {e:#}");
                Err(format!("{e:#}"))
            }
        };
        results.push((sink, result));
    }
    let drops = spool_drops(&run.join("bridge.log"))?;
    let (line, sound_and_whole) = summary(&contents, &timeline, &results, drops);
    println!("{line}");
    std::fs::write(run.join("summary.txt"), format!("{line}\n"))?;
    Ok(sound_and_whole)
}

/// What the destination of `sink` holds, and the sink's dead letters.
async fn read_back(
    sink: &str,
    args: &Args,
    run: &Path,
    spool: &Path,
) -> Result<(Deliveries, Deliveries)> {
    let deliveries = match sink {
        "jetstream" => readback::jetstream(args.required("nats")?, STREAM).await?,
        "kafka" => {
            let bootstrap = args.required("kafka")?.to_owned();
            tokio::task::spawn_blocking(move || readback::kafka(&bootstrap, TOPIC)).await??
        }
        _ => readback::webhook(&run.join("webhook.jsonl"))?,
    };
    Ok((deliveries, readback::dead_letters(spool, sink)?))
}

/// Each sink's bit in the records' masks, from the spool's `sinks.json`.
fn sink_bits(spool: &Path) -> Result<HashMap<String, u8>> {
    /// The part of `sinks.json` that names the bits.
    #[derive(Deserialize)]
    struct State {
        /// The spool's sinks.
        sinks: Vec<Sink>,
    }
    /// One sink of `sinks.json`.
    #[derive(Deserialize)]
    struct Sink {
        /// As in the config.
        name: String,
        /// Its bit in every record's mask.
        bit: u8,
    }
    let path = spool.join("sinks.json");
    let text = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let state: State = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not the spool's state file", path.display()))?;
    Ok(state.sinks.into_iter().map(|s| (s.name, s.bit)).collect())
}

/// One sink: what reached the spool for it against its copies and dead letters.
fn compare(
    contents: &SpoolContents,
    deliveries: &Deliveries,
    dead: &Deliveries,
    bit: u8,
    timeline: &Timeline,
) -> SinkResult {
    let starts = timeline.bridge_starts();
    let mut result = SinkResult {
        unmatched: deliveries.unmatched,
        ..SinkResult::default()
    };
    for (key, records) in &contents.records {
        if !records.iter().any(|r| r.mask & (1 << bit) != 0) {
            continue;
        }
        result.expected += 1;
        if deliveries.copies.contains_key(key) {
            result.delivered += 1;
        } else if dead.copies.contains_key(key) {
            result.dead += 1;
        } else {
            result.lost.push(key.clone());
        }
    }
    for (key, times) in &deliveries.copies {
        let Some(records) = contents.records.get(key) else {
            result.unledgered += times.len() as u64;
            continue;
        };
        for pair in times.windows(2) {
            let cause = if records.len() > 1 {
                "spooled twice"
            } else if starts.iter().any(|&s| pair[0] < s && s <= pair[1]) {
                "after a restart"
            } else {
                "retried"
            };
            *result.duplicates.entry(cause).or_default() += 1;
        }
    }
    result
        .lost
        .sort_by_key(|key| contents.records[key].first().map_or(0, |r| r.seq));
    result
}

/// Lists a sink's lost events on stderr (the first few) and in `lost-<sink>.txt` (all), each
/// with what the timeline says around the moment the tap saw it spooled.
fn explain_lost(
    sink: &str,
    result: &SinkResult,
    contents: &SpoolContents,
    timeline: &Timeline,
    run: &Path,
) -> Result<()> {
    if result.lost.is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for key in &result.lost {
        let record = &contents.records[key][0];
        let around: Vec<String> = timeline
            .around(record.at_ms, 5_000)
            .iter()
            .map(|e| {
                let offset = e.at_ms as i64 - record.at_ms as i64;
                format!(
                    "{}{offset}ms {} {}",
                    if offset >= 0 { "+" } else { "" },
                    e.action,
                    e.component
                )
            })
            .collect();
        writeln!(
            text,
            "LOST {sink}: spool seq {} (segment {}, offset {}), event {} {} mock_seq {:?} token {}, spooled at {} ms; around it: {}",
            record.seq,
            record.segment,
            record.offset,
            record.id,
            record.event,
            record.mock_seq,
            record.token,
            record.at_ms,
            around.join(", ")
        )?;
    }
    for line in text.lines().take(LOST_LISTED) {
        eprintln!("{line}");
    }
    let path: PathBuf = run.join(format!("lost-{sink}.txt"));
    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "{} events lost by {sink}: all in {}",
        result.lost.len(),
        path.display()
    );
    Ok(())
}

/// Events the bridge itself counted as dropped by a full spool (`when_full`), from its log:
/// they never reached the spool, and the summary says how many.
fn spool_drops(log: &Path) -> Result<u64> {
    let text = match std::fs::read_to_string(log) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", log.display())),
    };
    Ok(text
        .lines()
        .filter(|l| l.contains("DROPPED"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("dropped").and_then(serde_json::Value::as_u64))
        .sum())
}

/// The broadcasts the mock made, as far as anything shows: per mock run, up to the highest
/// number the spool saw.
fn broadcasts(contents: &SpoolContents, timeline: &Timeline) -> u64 {
    let firsts = timeline.mock_first_seqs();
    let mut highest: HashMap<u64, u64> = HashMap::new();
    for record in contents.records.values().flatten() {
        let Some(seq) = record.mock_seq else { continue };
        let Some(&first) = firsts.iter().rev().find(|&&f| f <= seq) else {
            continue;
        };
        let top = highest.entry(first).or_insert(seq);
        *top = (*top).max(seq);
    }
    highest.iter().map(|(first, top)| top - first + 1).sum()
}

/// The one summary line, and whether nothing was lost and the comparison was sound.
fn summary(
    contents: &SpoolContents,
    timeline: &Timeline,
    results: &[(&str, Result<SinkResult, String>)],
    drops: u64,
) -> (String, bool) {
    let kills: Vec<String> = timeline
        .kills()
        .iter()
        .map(|(c, n)| format!("{c}={n}"))
        .collect();
    let exits: Vec<String> = timeline
        .exits()
        .iter()
        .map(|(c, n)| format!("{c}={n}"))
        .collect();
    let tokens: HashSet<&str> = contents.records.keys().map(|(_, t)| t.as_str()).collect();
    let mut line = format!(
        "chaos {} s: kills {}; exits {}; disk full {} s; {} broadcasts to {} tokens, {} reached the spool ({} cut back, {} bytes skipped, {} dropped by a full spool)",
        (timeline.chaos_ms() + 500) / 1000,
        if kills.is_empty() { "none".into() } else { kills.join(" ") },
        if exits.is_empty() { "none".into() } else { exits.join(" ") },
        (timeline.disk_full_ms() + 500) / 1000,
        broadcasts(contents, timeline),
        tokens.len(),
        contents.records.len(),
        contents.cut,
        contents.skipped_bytes,
        drops,
    );
    let mut lost = 0;
    let mut unsound = Vec::new();
    for (sink, r) in results {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                let _ = write!(line, " | {sink}: cannot read back");
                unsound.push(format!("{sink} could not be read back: {e}"));
                continue;
            }
        };
        let dups: u64 = r.duplicates.values().sum();
        let causes: Vec<String> = r
            .duplicates
            .iter()
            .map(|(c, n)| format!("{n} {c}"))
            .collect();
        let _ = write!(
            line,
            " | {sink}: {}/{} delivered, {} lost, {} dead letters, {dups} duplicates{}",
            r.delivered,
            r.expected,
            r.lost.len(),
            r.dead,
            if causes.is_empty() {
                String::new()
            } else {
                format!(" ({})", causes.join(", "))
            }
        );
        lost += r.lost.len();
        if r.unledgered > 0 || r.unmatched > 0 {
            unsound.push(format!(
                "{sink} holds {} copies the tap never saw spooled and {} without ids",
                r.unledgered, r.unmatched
            ));
        }
    }
    let unseen: u64 = contents.unseen_seqs.iter().map(|(a, b)| b - a + 1).sum();
    if unseen > 0 {
        unsound.push(format!(
            "the tap never saw {unseen} spool seqs {:?}",
            contents.unseen_seqs
        ));
    }
    if contents.undecodable > 0 {
        unsound.push(format!(
            "{} spool records are no event",
            contents.undecodable
        ));
    }
    let whole = lost == 0 && unsound.is_empty();
    let verdict = match (lost, unsound.is_empty()) {
        (0, true) => "nothing lost".to_owned(),
        (n, true) => format!("LOST {n}"),
        (n, false) => format!("LOST {n}; UNSOUND: {}", unsound.join("; ")),
    };
    let _ = write!(line, " | {verdict}");
    (line, whole)
}
