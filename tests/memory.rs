//! Memory is bounded in bytes: the daemon, draining a backlog of large events while more arrive
//! on its socket and another sink is down, stays within `memory_limit` plus a fixed overhead.

mod support;

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use chatwoot_bridge::event::{Event, EventId};
use chatwoot_bridge::mock::{Answer, MockConfig};
use chatwoot_bridge::spool::{Spool, SpoolConfig};
use support::{mock_token, quoted, start_mock, wait_until, within, BridgeYaml};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_chatwoot-bridge");

/// Bytes of padding in each event's `data`: large events, of the size that took the daemon to
/// gigabytes when its memory was bounded in events.
const EVENT_BYTES: usize = 4 << 20;

/// Events waiting in the spool when the daemon starts: 96 MiB, one and a half times the limit.
const BACKLOG: u64 = 24;

/// Events the mock Chatwoot sends while the backlog drains: 32 MiB more, through the socket,
/// the ingest and the in-memory tail.
const LIVE: u64 = 8;

/// The `memory_limit` the daemon runs with (the default).
const MEMORY_LIMIT: u64 = 64 << 20;

/// What the process may hold beyond `memory_limit`: the executable, its libraries and the
/// runtime (27 MiB resident at start, in the debug build the tests run), the frame the socket is
/// reading (a 4 MiB event is read into a buffer that can grow to twice that before it becomes an
/// event), the HTTP client's buffers, and the allocator's pages freed but not yet returned to
/// the system. The daemon peaked at 92 MiB in this test; without the byte bound, at 473 MiB.
const OVERHEAD: u64 = 64 << 20;

/// The `data` of event `n`: account and conversation ids, a contact's pubsub token (which every
/// sink removes, so each event is copied once more on its way out), and the padding.
fn large_data(n: u64) -> String {
    format!(
        r#"{{"account_id":1,"conversation_id":{},"n":{n},"contact_inbox":{{"pubsub_token":"contact-secret"}},"pad":"{}"}}"#,
        n % 4 + 1,
        "x".repeat(EVENT_BYTES)
    )
}

/// Puts events 0..BACKLOG into the spool at `dir`, for the sinks `out` and `down`, as the daemon
/// would have.
fn fill_spool(dir: &Path) {
    let sinks = ["down".to_string(), "out".to_string()];
    let spool = Spool::open(SpoolConfig::new(dir), &sinks).expect("spool opens");
    let mask = spool.mask(&["out", "down"]);
    let mut record = Vec::new();
    for n in 0..BACKLOG {
        let mut event = Event::for_test("message.created", "a", &large_data(n));
        event.id = EventId(u128::from(n) + 1);
        record.clear();
        event.encode_record(&mut record);
        let report = spool.append(&[(&record, mask)]).expect("append");
        assert_eq!(report.appended, 1);
    }
    spool.sync().expect("spool syncs");
}

/// Counts the lines of a growing file, reading only what was added since the last look.
struct LineCounter {
    /// How far the file was read.
    offset: u64,
    /// Newlines seen up to `offset`.
    lines: u64,
}

impl LineCounter {
    /// The lines in `path` now.
    fn count(&mut self, path: &Path) -> u64 {
        let Ok(mut file) = std::fs::File::open(path) else {
            return 0;
        };
        file.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut chunk = vec![0; 1 << 20];
        loop {
            let read = file.read(&mut chunk).unwrap();
            if read == 0 {
                return self.lines;
            }
            self.offset += read as u64;
            self.lines += chunk[..read].iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
}

/// The process's peak resident set (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/PID/status");
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// Checks that the file holds every event exactly once, whole and without the contact token.
fn check_delivered(out: &Path) {
    let mut seen = vec![0u32; (BACKLOG + LIVE) as usize];
    let reader = BufReader::new(std::fs::File::open(out).unwrap());
    for line in reader.lines() {
        let line = line.unwrap();
        // The padding comes last: what precedes it is small enough to parse with it cut out.
        let pad = line.find(r#","pad":""#).expect("the padding is there");
        assert!(line.len() > pad + EVENT_BYTES, "the padding is whole");
        assert!(line.ends_with(r#""}}"#), "the line is whole");
        let head = format!("{}}}}}", &line[..pad]);
        let event: serde_json::Value = serde_json::from_str(&head).expect("a CloudEvent");
        assert!(
            event["data"].get("contact_inbox") == Some(&serde_json::json!({})),
            "the contact's pubsub token is removed: {head}"
        );
        let n = event["data"]["n"].as_u64().expect("the event's number");
        seen[n as usize] += 1;
    }
    let missing: Vec<usize> = (0..seen.len()).filter(|&n| seen[n] == 0).collect();
    assert!(
        missing.is_empty(),
        "events missing from the file: {missing:?}"
    );
}

#[tokio::test]
async fn a_backlog_of_large_events_drains_within_the_memory_limit() {
    let server = start_mock(MockConfig {
        tokens: vec![mock_token("t", Answer::Confirm)],
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    fill_spool(&spool_dir);
    let out = dir.path().join("out.jsonl");
    // A webhook nobody listens on: its sink holds what it took and retries, all along.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let config = BridgeYaml::new(&server.url())
        .token("{ name: a, pubsub_token: t }")
        .sink("out", &format!("{{ type: file, path: {} }}", quoted(&out)))
        .sink("down", &format!("{{ type: http, url: '{down}' }}"))
        .route_all(&["out", "down"])
        .spool(&spool_dir)
        .setting(&format!("memory_limit: {MEMORY_LIMIT}"))
        // The sink that is down keeps its events in the spool for the next start.
        .setting("shutdown_timeout: 1s")
        .write(&dir.path().join("c.yaml"));
    let mut child = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        // The sink that is down retries all along, with a warning each time.
        .env("RUST_LOG", "error")
        // As the Dockerfile and the systemd unit run it.
        .env("MIMALLOC_ALLOW_THP", "0")
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let pid = child.id().expect("the daemon runs");
    wait_until("the token to subscribe", || {
        server.streaming_subscriptions() == 1
    })
    .await;
    for n in BACKLOG..BACKLOG + LIVE {
        server.broadcast("message.created", &large_data(n));
    }
    let mut counter = LineCounter {
        offset: 0,
        lines: 0,
    };
    wait_until("every event to reach the file", || {
        counter.count(&out) >= BACKLOG + LIVE
    })
    .await;
    let peak = peak_rss(pid);
    eprintln!("peak resident set of the daemon: {} MiB", peak >> 20);
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = within("the daemon to exit", child.wait()).await.unwrap();
    server.stop().await;
    assert!(status.success(), "exit status {status:?}");
    check_delivered(&out);
    assert!(
        peak <= MEMORY_LIMIT + OVERHEAD,
        "peak resident set {} MiB, over memory_limit {} MiB plus {} MiB",
        peak >> 20,
        MEMORY_LIMIT >> 20,
        OVERHEAD >> 20
    );
}
