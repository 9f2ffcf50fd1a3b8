//! Entry points for the fuzz targets in `fuzz/` (`scripts/fuzz.sh`): each takes arbitrary bytes
//! and drives one reader of untrusted input the way the daemon does. They live in the crate
//! so that the readers stay private; nothing else calls them.
//!
//! Each returns normally for any input: a panic, an abort or a stack overflow is a finding.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::event::{nesting_exceeds, DataKeys, Event, JsonText};
use crate::route::jsonpath::JsonPath;
use crate::route::redact::Redaction;
use crate::route::template::Template;
use crate::source::protocol::{self, ServerFrame};
use crate::spool::{Spool, SpoolConfig};

/// Nesting the daemon accepts by default (`chatwoot.max_nesting`).
const DEFAULT_MAX_NESTING: usize = 128;

/// Splits fuzz input at its first NUL byte: a small "program" (path, template) and the data it
/// runs on. Both halves must be UTF-8, as text from YAML and frames always is.
fn split(input: &[u8]) -> Option<(&str, &str)> {
    let at = input.iter().position(|&b| b == 0).unwrap_or(input.len());
    let head = std::str::from_utf8(&input[..at]).ok()?;
    let tail = std::str::from_utf8(input.get(at + 1..).unwrap_or_default()).ok()?;
    Some((head, tail))
}

/// A cable frame as a token task reads it: decode, the nesting check, then the event's keys,
/// id, redaction and spool record, as the ingest and a sink would.
pub fn frame(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(ServerFrame::Message { event, data, .. }) = protocol::decode(text) else {
        return;
    };
    if nesting_exceeds(data.0.get(), DEFAULT_MAX_NESTING) {
        return;
    }
    let event = Event::new(
        &event,
        JsonText::from_raw(data.0),
        "fuzz".into(),
        "fuzz".into(),
        std::time::UNIX_EPOCH,
    );
    let _ = DataKeys::extract(&event.name, event.data.get());
    let _ = Redaction::default().apply(event.data.get());
    let mut record = Vec::new();
    event.encode_record(&mut record);
    let decoded = Event::decode_record(&record).expect("a record the bridge wrote decodes");
    assert_eq!(
        decoded.data.get(),
        event.data.get(),
        "records keep data as is"
    );
}

/// The redaction a sink applies: the token stripper and `fields.drop`, on any text (records
/// spooled by another build reach it without the socket's checks). Input: the dropped path,
/// NUL, the data.
pub fn redaction(input: &[u8]) {
    let Some((path, data)) = split(input) else {
        return;
    };
    let mut redaction = Redaction::default();
    if let Ok(path) = JsonPath::parse(path) {
        redaction.drop.push(path);
    }
    if let Some(out) = redaction.apply(data) {
        // What it sends must be JSON whenever what it read was.
        if serde_json::from_str::<serde::de::IgnoredAny>(data).is_ok() {
            assert!(
                serde_json::from_str::<serde::de::IgnoredAny>(&out).is_ok(),
                "redaction turned valid JSON into invalid JSON"
            );
        }
    }
}

/// The key scanner and the path reader routes use. Input: the event name or path, NUL, data.
pub fn keys_and_paths(input: &[u8]) {
    let Some((head, data)) = split(input) else {
        return;
    };
    let _ = DataKeys::extract(head, data);
    if let Ok(path) = JsonPath::parse(head) {
        if let Some(found) = path.lookup(data) {
            let _ = found.equals(&serde_json::Value::Bool(true));
        }
    }
}

/// Template rendering (topics, subjects, URLs). Input: the template, NUL, the event's data.
pub fn template(input: &[u8]) {
    let Some((text, data)) = split(input) else {
        return;
    };
    let Ok(template) = Template::compile("fuzz", text) else {
        return;
    };
    // The daemon renders only events whose data is JSON within the nesting limit.
    let Ok(data) = JsonText::from_string(data.to_owned()) else {
        return;
    };
    if nesting_exceeds(data.get(), DEFAULT_MAX_NESTING) {
        return;
    }
    let event = Event::new(
        "message.created",
        data,
        "fuzz".into(),
        "fuzz".into(),
        std::time::UNIX_EPOCH,
    );
    let _ = template.render(&event, crate::route::template::url_segment);
    let _ = template.render_with(
        &event,
        &crate::route::template::nats_event,
        &crate::route::template::nats_token,
    );
    let _ = template.nats_filter();
    let _ = template.render_sample("x");
}

/// Config loading: YAML parsing, `${VAR}` expansion and validation.
pub fn config(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let env = |name: &str| (name == "FUZZ").then(|| "value".to_owned());
    let _ = crate::config::Config::from_yaml(text, &env, false);
}

/// A query string of the admin endpoint's `/tap`: percent-decoded within its bound and checked
/// against a config's names, as a request to the endpoint is.
pub fn admin_query(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let _ = crate::admin::parse_tap_query(text);
}

/// What the REST side of a token reads: a conversation list (before the first NUL) as the stall
/// check and a backfill take it, a live event's data (after it) as the socket reports it, the
/// activity of both through a stall tracker and the span a stall backfills; and the whole input
/// as a backfill resume file.
pub fn rest_answers(input: &[u8]) {
    use crate::source::activity::{listed_activity, ActivityTracker};
    use crate::source::gaps::LiveActivity;
    use crate::source::rest::ConversationList;
    use std::time::{Duration, Instant, SystemTime};

    let _ = crate::source::resume::parse(input, 1);
    let Some((list, data)) = split(input) else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut tracker = ActivityTracker::default();
    tracker.resubscribed(now);
    let status = crate::status::StatusBoard::new().register(&std::sync::Arc::from("fuzz"));
    if let Ok(data) = JsonText::from_string(data.to_owned()) {
        for name in ["message.created", "conversation.updated"] {
            let event = Event::new(name, data.clone(), "fuzz".into(), "fuzz".into(), now);
            if let Some(seen) = LiveActivity::of(&event, 1) {
                if let Some(activity) = seen.activity {
                    tracker.delivered(seen.conversation, activity, now, &status);
                }
            }
        }
    }
    let Ok(list) = serde_json::from_slice::<ConversationList>(list.as_bytes()) else {
        return;
    };
    let listed: Vec<_> = list
        .into_conversations()
        .iter()
        .filter_map(listed_activity)
        .collect();
    let start = Instant::now();
    tracker.observe(listed.clone(), (now, start), Duration::ZERO);
    if let Some(overdue) = tracker.observe(listed, (now, start), Duration::ZERO) {
        let _ = overdue.span(now);
    }
    let _ = tracker.earliest_pending();
}

/// One spool record's payload, as a sink decodes it.
pub fn spool_record(input: &[u8]) {
    let _ = Event::decode_record(input);
}

/// Spool recovery from arbitrary bytes on disk: the bytes become the only segment, the spool
/// opens (recovering what it can) and a sink reads everything back.
pub fn spool_recovery(input: &[u8]) {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("cwb-fuzz-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the temp dir is writable");
    recover_from(&dir, input);
    let _ = std::fs::remove_dir_all(&dir);
}

/// [`spool_recovery`] in `dir`.
fn recover_from(dir: &Path, segment: &[u8]) {
    let sinks = vec!["out".to_string()];
    std::fs::write(dir.join(format!("{:020}.log", 1)), segment).expect("temp dir is writable");
    let mut config = SpoolConfig::new(dir);
    config.max_bytes = 1 << 20;
    let Ok(spool) = Spool::open(config, &sinks) else {
        return;
    };
    let Ok(mut reader) = spool.reader("out") else {
        return;
    };
    let mut seen = BTreeSet::new();
    // Bounded: the segment is the fuzz input, so it holds at most input-length records.
    for _ in 0..=segment.len() {
        match reader.read_batch(64) {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => {
                for (seq, payload) in batch {
                    assert!(seen.insert(seq), "seq {seq} read twice");
                    let _ = Event::decode_record(&payload);
                }
            }
            Err(_) => break,
        }
    }
    let _ = spool.append(&[(b"after recovery".as_slice(), spool.mask(&["out"]))]);
}

/// Writes a seed corpus for every target under `out/<target>/`, from the recorded fixtures and
/// `example_config` (the text of `bridge.example.yaml`).
pub fn write_seeds(out: &Path, example_config: &str) -> std::io::Result<()> {
    let mut seeds = Seeds { out };
    seeds.put("config", "example", example_config.as_bytes())?;
    seeds.put(
        "admin_query",
        "filters",
        b"route=all%20of+it&sink=out&token=agent",
    )?;
    let mut records = Vec::new();
    for (name, frame) in crate::mock::fixtures::ALL {
        seeds.put("frame", name, frame.as_bytes())?;
        let Some(event) = crate::mock::fixtures::sample_event(name) else {
            continue;
        };
        let data = event.data.get();
        let with = |head: &str| [head.as_bytes(), b"\0", data.as_bytes()].concat();
        seeds.put(
            "redaction",
            name,
            &with("conversation.contact_inbox.pubsub_token"),
        )?;
        seeds.put("keys_and_paths", name, &with(name))?;
        seeds.put("rest_answers", name, &with(REST_CONVERSATIONS))?;
        seeds.put(
            "keys_and_paths",
            &format!("{name}.path"),
            &with("sender.id"),
        )?;
        seeds.put(
            "template",
            name,
            &with("chatwoot.{event}.{data.sender.id}.{token}"),
        )?;
        let mut record = Vec::new();
        event.encode_record(&mut record);
        seeds.put("spool_record", name, &record)?;
        records.push(record);
    }
    seeds.put(
        "rest_answers",
        "resume_file",
        br#"{"account_id":1,"last_healthy_ms":1781964126000,"last_messages":[[87,5120]]}"#,
    )?;
    seeds.put("spool_recovery", "fixtures", &spool_segment_of(&records))
}

/// A conversation list as Chatwoot's REST API answers it (shortened), seeding `rest_answers`.
const REST_CONVERSATIONS: &str = r#"{"data":{"meta":{"all_count":1},"payload":[{"id":87,"account_id":1,"status":"open","last_activity_at":1781964126,"timestamp":1781964126,"updated_at":1781964242.1,"messages":[{"id":5120,"content":"hi"}]}]}}"#;

/// Where seeds go.
struct Seeds<'a> {
    /// The corpus root: one folder per target.
    out: &'a Path,
}

impl Seeds<'_> {
    /// Writes one seed file.
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let dir = self.out.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)
    }
}

/// A whole spool segment holding `records`, as the spool writes it: appended to a spool of its
/// own and read back off the disk.
fn spool_segment_of(records: &[Vec<u8>]) -> Vec<u8> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("cwb-seed-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sinks = vec!["out".to_string()];
    let spool = Spool::open(SpoolConfig::new(&dir), &sinks).expect("a spool in the temp dir");
    let mask = spool.mask(&["out"]);
    let batch: Vec<_> = records.iter().map(|r| (r.as_slice(), mask)).collect();
    spool.append(&batch).expect("append to a new spool");
    drop(spool);
    let segment = std::fs::read(dir.join(format!("{:020}.log", 1))).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    segment
}
