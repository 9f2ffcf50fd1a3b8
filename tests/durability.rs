//! At-least-once through a crash: `kill -9` the daemon mid-stream, start it again on the same
//! spool, and check that nothing it had received is missing downstream: in a file, and counted
//! by distinct ids at a real JetStream.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chatwoot_bridge::mock::{Answer, MockConfig, MockServer, MockToken};
use tokio::process::{Child, Command};
use tokio::time::timeout;

const BIN: &str = env!("CARGO_BIN_EXE_chatwoot-bridge");

fn spawn(config: &Path) -> Child {
    Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts")
}

/// The `mock_seq` of every record the file sink had not committed, read from the spool as the
/// killed process left it (the next process recovers the same way).
fn pending_in_spool(dir: &Path) -> Vec<u64> {
    use chatwoot_bridge::spool::{Spool, SpoolConfig};
    let spool = Spool::open(
        SpoolConfig::new(dir),
        &["archive".to_string(), "stream".to_string()],
    )
    .expect("the spool opens after a kill");
    let mut reader = spool.reader("archive").unwrap();
    let mut seqs = Vec::new();
    loop {
        let batch = reader.read_batch(512).unwrap();
        if batch.is_empty() {
            return seqs;
        }
        for (_, bytes) in batch {
            let event = chatwoot_bridge::event::Event::decode_record(&bytes).unwrap();
            let data: serde_json::Value = serde_json::from_str(event.data.get()).unwrap();
            seqs.push(data["mock_seq"].as_u64().unwrap());
        }
    }
}

/// `mock_seq` → how many times it was written.
fn delivered(path: &Path) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        // The last line may be cut by the kill; every complete line is an event.
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        *seen
            .entry(event["data"]["mock_seq"].as_u64().unwrap())
            .or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn kill_9_and_restart_lose_nothing_that_was_received() {
    const TOTAL: u64 = 8_000;
    let server = MockServer::start(MockConfig {
        tokens: vec![MockToken {
            pubsub_token: "agent-secret".into(),
            answer: Answer::Confirm,
        }],
        rate: 2_000.0,
        count: Some(TOTAL),
        wait_for_subscriptions: 1,
        ping_interval: Duration::from_millis(500),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let nats = support::NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let config = dir.path().join("bridge.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
chatwoot:
  url: "{url}"
  reconnect: {{ initial: 50ms, max: 100ms }}
tokens:
  - {{ name: agent, pubsub_token: agent-secret, account_id: 1, user_id: 3 }}
sinks:
  archive: {{ type: file, path: {out} }}
  stream: {{ type: nats, url: "{nats}", subject: "crash.{{event}}", jetstream: {{ stream: CRASH, create: true, duplicate_window: 10m }} }}
routes:
  - {{ name: all, to: [archive, stream] }}
spool: {{ dir: {spool}, fsync: never }}
"#,
            url = server.url(),
            nats = nats.url(),
            out = serde_json::to_string(&out).unwrap(),
            spool = serde_json::to_string(&dir.path().join("spool")).unwrap(),
        ),
    )
    .unwrap();

    let mut first = spawn(&config);
    support::until("the first 1,500 events", Duration::from_secs(20), || {
        delivered(&out).len() >= 1_500
    })
    .await;
    first.start_kill().unwrap(); // SIGKILL: no shutdown, no flush, no cursor save
    timeout(Duration::from_secs(10), first.wait())
        .await
        .unwrap()
        .unwrap();
    let at_kill = delivered(&out);
    let last_before_kill = *at_kill.keys().last().unwrap();
    // What the killed process had in its spool and not yet committed for the file sink: the
    // restart must deliver every one of these.
    let pending = pending_in_spool(&dir.path().join("spool"));

    let mut second = spawn(&config);
    support::until("the rest of the stream", Duration::from_secs(30), || {
        delivered(&out).contains_key(&(TOTAL - 1))
    })
    .await;
    let pid = second.id().unwrap();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = timeout(Duration::from_secs(20), second.wait())
        .await
        .unwrap()
        .unwrap();
    server.stop().await;
    assert!(status.success(), "graceful exit after SIGTERM: {status:?}");

    let seen = delivered(&out);
    // Contiguous runs of delivered sequence numbers. The only gap allowed is the stretch the
    // mock broadcast while no socket was open (between the kill and the resubscribe).
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &seq in seen.keys() {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == seq => *end = seq,
            _ => runs.push((seq, seq)),
        }
    }
    assert_eq!(runs.first().unwrap().0, 0, "runs: {runs:?}");
    assert_eq!(runs.last().unwrap().1, TOTAL - 1, "runs: {runs:?}");
    assert!(runs.len() <= 2, "more than one gap: {runs:?}");
    let before_gap = runs[0].1;
    assert!(before_gap >= last_before_kill, "runs: {runs:?}");
    // Duplicates come only from the window the first process had delivered but not yet
    // committed: a few hundred milliseconds of events at most.
    let duplicates: Vec<u64> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    assert!(duplicates.len() <= 2_000, "{} duplicates", duplicates.len());
    assert!(
        duplicates.iter().all(|&s| s <= last_before_kill),
        "duplicates outside the crash window: {duplicates:?}"
    );
    for seq in &pending {
        assert!(
            seen.contains_key(seq),
            "event {seq} was in the spool at the kill and is missing"
        );
    }
    // JetStream drops a re-delivered event by its Nats-Msg-Id (the event id): the stream holds
    // exactly one message per distinct event.
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = timeout(Duration::from_secs(10), js.get_stream("CRASH"))
        .await
        .unwrap()
        .unwrap();
    let info = timeout(Duration::from_secs(10), stream.info())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        info.state.messages,
        seen.len() as u64,
        "distinct ids at the broker"
    );
    eprintln!(
        "delivered {} distinct of {TOTAL}; runs {runs:?}; {} delivered before the kill, {} more \
         recovered from the spool after it ({} uncommitted records in the spool at the kill); \
         {} duplicates",
        seen.len(),
        last_before_kill + 1,
        before_gap - last_before_kill,
        pending.len(),
        duplicates.len()
    );
}
