//! At-least-once through a crash: `kill -9` the daemon mid-stream, start it again on the same
//! spool, and check that nothing it had received is missing downstream: in a file, and counted
//! by distinct ids at a real JetStream.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chatwoot_bridge::mock::{Answer, MockConfig};
use support::{
    mock_token, quoted, start_mock, wait_until, wait_until_async, within, BridgeYaml, NatsServer,
};
use tokio::process::{Child, Command};

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

/// The daemon's config: the mock's agent token, every event to the file `out` and to the
/// JetStream stream CRASH (deduplicating by event id over 10 minutes), the spool in `dir`.
fn crash_config(cable_url: &str, nats_url: &str, out: &Path, dir: &Path) -> PathBuf {
    BridgeYaml::new(cable_url)
        .cable("reconnect: { initial: 50ms, max: 100ms }")
        .agent("agent", "agent-secret", 3)
        .sink("archive", &format!("{{ type: file, path: {} }}", quoted(out)))
        .sink(
            "stream",
            &format!(
                "{{ type: nats, url: {}, subject: 'crash.{{event}}', jetstream: {{ stream: CRASH, create: true, duplicate_window: 10m }} }}",
                quoted(nats_url)
            ),
        )
        .route_all(&["archive", "stream"])
        .spool(&dir.join("spool"))
        .spool_setting("fsync: never")
        .write(&dir.join("bridge.yaml"))
}

/// Contiguous runs of delivered sequence numbers, first and last of each.
fn runs_of(seen: &BTreeMap<u64, usize>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &seq in seen.keys() {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == seq => *end = seq,
            _ => runs.push((seq, seq)),
        }
    }
    runs
}

/// Sends SIGTERM (as systemd and docker stop do) and waits for a clean exit.
async fn terminate(mut daemon: Child) {
    let pid = daemon.id().unwrap();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = within("the daemon to exit after SIGTERM", daemon.wait())
        .await
        .unwrap();
    assert!(status.success(), "graceful exit after SIGTERM: {status:?}");
}

#[tokio::test]
async fn kill_9_and_restart_lose_nothing_that_was_received() {
    const TOTAL: u64 = 8_000;
    let server = start_mock(MockConfig {
        tokens: vec![mock_token("agent-secret", Answer::Confirm)],
        rate: 2_000.0,
        count: Some(TOTAL),
        wait_for_subscriptions: 1,
        ping_interval: Duration::from_millis(500),
        ..MockConfig::default()
    })
    .await;
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let config = crash_config(&server.url(), &nats.url(), &out, dir.path());

    let mut first = spawn(&config);
    wait_until("the first 1,500 events", || delivered(&out).len() >= 1_500).await;
    first.start_kill().unwrap(); // SIGKILL: no shutdown, no flush, no cursor save
    within("the killed daemon to exit", first.wait())
        .await
        .unwrap();
    let at_kill = delivered(&out);
    let last_before_kill = *at_kill.keys().last().unwrap();
    // What the killed process had in its spool and not yet committed for the file sink: the
    // restart must deliver every one of these.
    let pending = pending_in_spool(&dir.path().join("spool"));

    let second = spawn(&config);
    wait_until("the rest of the stream", || {
        delivered(&out).contains_key(&(TOTAL - 1))
    })
    .await;
    // The stream sink may still be behind the file: stop once it has every distinct event, so
    // the count below is of what was delivered, not of how far the shutdown deadline let it go.
    let js = async_nats::jetstream::new(nats.client().await);
    let distinct = delivered(&out).len() as u64;
    wait_until_async("the stream to hold every event the file has", || {
        let js = js.clone();
        async move {
            let Ok(mut stream) = js.get_stream("CRASH").await else {
                return false;
            };
            stream
                .info()
                .await
                .is_ok_and(|info| info.state.messages >= distinct)
        }
    })
    .await;
    terminate(second).await;
    server.stop().await;

    let seen = delivered(&out);
    // The only gap allowed is the stretch the mock broadcast while no socket was open (between
    // the kill and the resubscribe).
    let runs = runs_of(&seen);
    assert_eq!(runs.first().unwrap().0, 0, "runs: {runs:?}");
    assert_eq!(runs.last().unwrap().1, TOTAL - 1, "runs: {runs:?}");
    assert!(runs.len() <= 2, "more than one gap: {runs:?}");
    let before_gap = runs[0].1;
    assert!(before_gap >= last_before_kill, "runs: {runs:?}");
    // Duplicates come only from the window the first process had delivered but not yet
    // committed: each one was still uncommitted in the spool at the kill.
    let duplicates: Vec<u64> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    let uncommitted: std::collections::BTreeSet<u64> = pending.iter().copied().collect();
    assert!(
        duplicates.iter().all(|s| uncommitted.contains(s)),
        "a duplicate that was committed before the kill: {:?}",
        duplicates
            .iter()
            .filter(|s| !uncommitted.contains(s))
            .take(10)
            .collect::<Vec<_>>()
    );
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
    let mut stream = within("the stream CRASH", js.get_stream("CRASH"))
        .await
        .unwrap();
    let info = within("the stream's info", stream.info()).await.unwrap();
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
