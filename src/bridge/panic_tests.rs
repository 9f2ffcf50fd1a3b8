//! A sink loop or the ingest that panics is started again, counted on the status board, and
//! loses nothing: real sockets to the mock Chatwoot, a real spool and a real file sink, with a
//! panic injected once where the loop holds events it has not finished with.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Bridge;
use crate::config::Config;
use crate::mock::{Answer, MockConfig, MockServer, MockToken};
use crate::test_panics::{self, PanicSite};

/// Events the mock broadcasts.
const EVENTS: u64 = 300;

/// Bounds every wait: a passing test takes a second or two (the pause before a restart).
const WAIT: Duration = Duration::from_secs(30);

/// A mock Chatwoot broadcasting [`EVENTS`] events to the token `t` once it is subscribed.
async fn mock() -> MockServer {
    MockServer::start(MockConfig {
        tokens: vec![MockToken {
            pubsub_token: "t".into(),
            answer: Answer::Confirm,
        }],
        rate: 1000.0,
        count: Some(EVENTS),
        wait_for_subscriptions: 1,
        ..MockConfig::default()
    })
    .await
    .unwrap()
}

/// One token, every event to the file sink `sink` at `dir/out.jsonl`, the spool in `dir/spool`.
fn config(url: &str, dir: &Path, sink: &str) -> Config {
    let yaml = format!(
        "chatwoot: {{ url: \"{url}\" }}\ntokens: [{{ name: a, pubsub_token: t }}]\n\
         sinks: {{ {sink}: {{ type: file, path: {out} }} }}\n\
         routes: [{{ name: all, match: {{}}, to: [{sink}] }}]\nspool: {{ dir: {spool} }}\n",
        out = serde_json::to_string(&dir.join("out.jsonl")).unwrap(),
        spool = serde_json::to_string(&dir.join("spool")).unwrap(),
    );
    Config::from_yaml(&yaml, &|_| None, false).unwrap()
}

/// The distinct broadcasts in the file sink's file, in its whole lines: the sink may be
/// writing the last one while the test reads.
fn broadcasts_in(dir: &Path) -> BTreeSet<u64> {
    let text = std::fs::read_to_string(dir.join("out.jsonl")).unwrap_or_default();
    let whole = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
    whole
        .lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            event["data"]["mock_seq"].as_u64().unwrap()
        })
        .collect()
}

/// Waits until every broadcast is in the file; fails the test with what is there if not.
async fn every_broadcast_delivered(dir: &Path) {
    let delivered = tokio::time::timeout(WAIT, async {
        while (broadcasts_in(dir).len() as u64) < EVENTS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        delivered.is_ok(),
        "{} of {EVENTS} broadcasts delivered",
        broadcasts_in(dir).len()
    );
}

#[tokio::test]
async fn a_sink_loop_that_panics_is_restarted_from_its_cursor_and_counted_losing_nothing() {
    // The panic site is keyed by the sink's name: no other test uses this one.
    let sink = "panics-once";
    let site = PanicSite::SinkLoop(sink.into());
    test_panics::panic_once(site.clone());
    let server = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = Bridge::start(config(&server.url(), dir.path(), sink))
        .await
        .unwrap();
    every_broadcast_delivered(dir.path()).await;
    assert!(!test_panics::is_armed(&site), "the loop passed the panic");
    let status = bridge.status().sink(sink).unwrap();
    assert_eq!(status.delivery_loop.restarts, 1);
    assert!(status.delivery_loop.alive);
    let report = bridge.shutdown().await;
    server.stop().await;
    assert!(report.everything_read_is_spooled(), "{report:?}");
    assert_eq!(report.spooled, EVENTS);
}

#[tokio::test]
async fn an_ingest_that_panics_is_restarted_with_the_events_it_held_and_counted() {
    let server = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let site = test_panics::ingest(&dir.path().join("spool"));
    test_panics::panic_once(site.clone());
    let bridge = Bridge::start(config(&server.url(), dir.path(), "out"))
        .await
        .unwrap();
    every_broadcast_delivered(dir.path()).await;
    assert!(!test_panics::is_armed(&site), "the ingest passed the panic");
    let ingest = bridge.status().ingest();
    assert_eq!(ingest.restarts, 1);
    assert!(ingest.alive);
    // It panicked with a batch routed and not appended: appended once, after the restart.
    assert_eq!(bridge.stats().spooled.load(Ordering::Relaxed), EVENTS);
    let report = bridge.shutdown().await;
    server.stop().await;
    assert!(report.everything_read_is_spooled(), "{report:?}");
    assert_eq!((report.read, report.spooled), (EVENTS, EVENTS));
}
