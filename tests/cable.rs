//! The cable source end to end: the mock Chatwoot server, the bridge, the file sink.
//! Every wait is bounded; every test asserts what reached the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chatwoot_bridge::config::Config;
use chatwoot_bridge::mock::{Answer, MockConfig, MockServer, MockToken};
use chatwoot_bridge::status::TokenState;
use chatwoot_bridge::Bridge;
use serde_json::Value;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn token(pubsub_token: &str, answer: Answer) -> MockToken {
    MockToken {
        pubsub_token: pubsub_token.into(),
        answer,
    }
}

async fn mock(tokens: Vec<MockToken>) -> MockServer {
    MockServer::start(MockConfig {
        tokens,
        ping_interval: Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await
    .expect("mock server starts")
}

/// Config with fast timings; `tokens` is the YAML list body.
fn config(url: &str, tokens: &str, out: &Path, extra: &str) -> Config {
    let yaml = format!(
        r#"
chatwoot:
  url: {url}
  confirm_timeout: 500ms
  stale_after: 1s
  reconnect: {{ initial: 50ms, max: 200ms }}
{extra}
tokens:
{tokens}
sinks:
  archive: {{ type: file, path: {out} }}
routes:
  - {{ name: everything, match: {{}}, to: [archive] }}
spool: {{ dir: {spool} }}
"#,
        out = serde_json::to_string(out).unwrap(),
        spool = serde_json::to_string(&out.with_extension("spool")).unwrap()
    );
    Config::from_yaml(&yaml, &|_| None, false).expect("test config is valid")
}

const AGENT_ONLY: &str =
    "  - { name: agent, pubsub_token: agent-secret, account_id: 1, user_id: 3 }";

const AGENT_AND_VISITOR: &str = r#"
  - { name: agent, pubsub_token: agent-secret, account_id: 1, user_id: 3 }
  - { name: visitor, pubsub_token: visitor-secret }
"#;

/// Shuts the bridge down (bounded) and stops the mock server.
async fn stop(bridge: Bridge, server: MockServer) {
    timeout(WAIT, bridge.shutdown()).await.unwrap();
    server.stop().await;
}

fn read_events(path: &Path) -> Vec<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

async fn wait_for_lines(path: &Path, n: usize) -> Vec<Value> {
    let waited = timeout(WAIT, async {
        loop {
            let events = read_events(path);
            if events.len() >= n {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    waited.unwrap_or_else(|_| {
        panic!(
            "expected {n} events in {}, found {}",
            path.display(),
            read_events(path).len()
        )
    })
}

async fn wait_state(bridge: &Bridge, name: &str, state: TokenState) {
    let ok = bridge
        .status()
        .wait_for(WAIT, |b| b.token(name).is_some_and(|t| t.state == state))
        .await;
    assert!(
        ok,
        "token {name} never reached {state}: {:?}",
        bridge.status().token(name)
    );
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let ok = timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok();
    assert!(ok, "timed out waiting for {what}");
}

fn seqs_of(events: &[Value], token: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["chatwoottoken"] == token)
        .map(|e| {
            e["data"]["mock_seq"]
                .as_u64()
                .expect("generated events carry mock_seq")
        })
        .collect()
}

fn out_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    (dir, path)
}

#[tokio::test]
async fn every_event_of_two_tokens_reaches_the_file_with_the_envelope() {
    let server = mock(vec![
        token("agent-secret", Answer::Confirm),
        token("visitor-secret", Answer::Confirm),
    ])
    .await;
    let (_dir, out) = out_file();
    let bridge = Bridge::start(config(&server.url(), AGENT_AND_VISITOR, &out, ""))
        .await
        .unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    wait_state(&bridge, "visitor", TokenState::Subscribed).await;

    for _ in 0..30 {
        server.broadcast_generated();
    }
    let events = wait_for_lines(&out, 60).await;
    let report = timeout(WAIT, bridge.shutdown()).await.unwrap();
    assert_eq!(report.drain, chatwoot_bridge::bridge::Drain::CaughtUp);
    let origin = server.last_origin();
    let addr = server.addr();
    server.stop().await;
    assert_eq!(origin, Some(format!("http://{addr}")));

    assert_eq!(events.len(), 60, "no duplicates, nothing missing");
    let expected: Vec<u64> = (0..30).collect();
    assert_eq!(
        seqs_of(&events, "agent"),
        expected,
        "in order on each token"
    );
    assert_eq!(seqs_of(&events, "visitor"), expected);

    // One broadcast seen on two tokens has one id; different broadcasts differ.
    let mut ids_by_seq: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for e in &events {
        ids_by_seq
            .entry(e["data"]["mock_seq"].as_u64().unwrap())
            .or_default()
            .insert(e["id"].as_str().unwrap().to_owned());
    }
    assert!(ids_by_seq.values().all(|ids| ids.len() == 1));
    let distinct: BTreeSet<_> = ids_by_seq.values().flatten().collect();
    assert_eq!(distinct.len(), 30);

    for e in &events {
        assert_eq!(e["specversion"], "1.0");
        let id = e["id"].as_str().unwrap();
        assert_eq!(id.len(), 32);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let token = e["chatwoottoken"].as_str().unwrap();
        assert_eq!(e["source"], format!("{}#{token}", server_url_of(e)));
        let name = e["chatwootevent"].as_str().unwrap();
        assert_eq!(e["type"], format!("com.chatwoot.{name}"));
        assert_eq!(e["datacontenttype"], "application/json");
        assert_eq!(e["chatwootaccount"], 1);
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        if name.starts_with("message.")
            || name.starts_with("conversation.")
            || name == "assignee.changed"
        {
            assert_eq!(e["subject"], "conversation/87", "{name}");
        }
        let text = e.to_string();
        assert!(!text.contains("agent-secret") && !text.contains("visitor-secret"));
    }
}

fn server_url_of(event: &Value) -> String {
    let source = event["source"].as_str().unwrap();
    source.split('#').next().unwrap().to_owned()
}

#[tokio::test]
async fn data_is_written_byte_for_byte() {
    let server = mock(vec![token("agent-secret", Answer::Confirm)]).await;
    let (_dir, out) = out_file();
    let tokens = AGENT_ONLY;
    let bridge = Bridge::start(config(&server.url(), tokens, &out, ""))
        .await
        .unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    // Odd spacing, key order and escapes that a re-serialization would change.
    let data = r#"{ "z":1,"a" : "caf\u00e9","n":1.50,"account_id":1 }"#;
    server.broadcast("some.future_event", data);
    wait_for_lines(&out, 1).await;
    stop(bridge, server).await;
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains(&format!(r#""data":{data}}}"#)), "{text}");
    assert!(text.contains(r#""type":"com.chatwoot.some.future_event""#));
}

#[tokio::test]
async fn a_silent_token_is_unconfirmed_and_does_not_affect_the_other() {
    let server = mock(vec![
        token("agent-secret", Answer::Confirm),
        token("visitor-secret", Answer::Silent),
    ])
    .await;
    let (_dir, out) = out_file();
    let bridge = Bridge::start(config(&server.url(), AGENT_AND_VISITOR, &out, ""))
        .await
        .unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    wait_state(&bridge, "visitor", TokenState::Unconfirmed).await;
    let visitor = bridge.status().token("visitor").unwrap();
    assert!(visitor
        .last_error
        .unwrap()
        .contains("no confirm_subscription"));

    // It unsubscribes, then subscribes again on the same socket.
    wait_until("unsubscribe and a second subscribe", || {
        server.unsubscribe_commands() >= 1 && server.subscribe_commands() >= 3
    })
    .await;
    assert_eq!(
        server.connections_accepted(),
        2,
        "no reconnect for a silent token"
    );

    // The token was fixed on the server (e.g. a restored password): it recovers.
    server.set_answer("visitor-secret", Answer::Confirm);
    wait_state(&bridge, "visitor", TokenState::Subscribed).await;

    for _ in 0..5 {
        server.broadcast_generated();
    }
    let events = wait_for_lines(&out, 10).await;
    assert_eq!(seqs_of(&events, "agent"), vec![0, 1, 2, 3, 4]);
    assert_eq!(seqs_of(&events, "visitor"), vec![0, 1, 2, 3, 4]);
    stop(bridge, server).await;
}

#[tokio::test]
async fn a_rejected_token_is_reported_and_retried() {
    let server = mock(vec![
        token("agent-secret", Answer::Confirm),
        token("visitor-secret", Answer::Reject),
    ])
    .await;
    let (_dir, out) = out_file();
    let bridge = Bridge::start(config(&server.url(), AGENT_AND_VISITOR, &out, ""))
        .await
        .unwrap();
    wait_state(&bridge, "visitor", TokenState::Rejected).await;
    wait_until("a retried subscribe", || server.subscribe_commands() >= 3).await;
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    server.broadcast_generated();
    let events = wait_for_lines(&out, 1).await;
    assert_eq!(seqs_of(&events, "agent"), vec![0]);
    stop(bridge, server).await;
}

#[tokio::test]
async fn a_confirm_after_the_timeout_is_not_believed() {
    // The confirm comes 800 ms after the subscribe; the bridge gave up at 500 ms and sent
    // `unsubscribe`, so the server has dropped that subscription: it is not subscribed.
    let server = mock(vec![token(
        "agent-secret",
        Answer::ConfirmAfter(Duration::from_millis(800)),
    )])
    .await;
    let (_dir, out) = out_file();
    let tokens = AGENT_ONLY;
    let mut cfg = config(&server.url(), tokens, &out, "");
    cfg.cable.reconnect.initial = Duration::from_secs(2);
    cfg.cable.reconnect.max = Duration::from_secs(2);
    let bridge = Bridge::start(cfg).await.unwrap();
    wait_state(&bridge, "agent", TokenState::Unconfirmed).await;
    wait_until("the late confirm and the unsubscribe", || {
        server.unsubscribe_commands() >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let status = bridge.status().token("agent").unwrap();
    assert_ne!(status.state, TokenState::Subscribed, "{status:?}");

    // A prompt confirm is believed.
    server.set_answer("agent-secret", Answer::Confirm);
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    server.broadcast_generated();
    wait_for_lines(&out, 1).await;
    stop(bridge, server).await;
}

#[tokio::test]
async fn events_before_the_confirm_are_kept() {
    // Old installs stream events on a subscription they never confirm.
    let server = mock(vec![token("agent-secret", Answer::StreamUnconfirmed)]).await;
    let (_dir, out) = out_file();
    let tokens = AGENT_ONLY;
    let bridge = Bridge::start(config(&server.url(), tokens, &out, ""))
        .await
        .unwrap();
    wait_until("a streaming subscription", || {
        server.streaming_subscriptions() == 1
    })
    .await;
    server.broadcast_generated();
    let events = wait_for_lines(&out, 1).await;
    assert_eq!(seqs_of(&events, "agent"), vec![0]);
    stop(bridge, server).await;
}

#[tokio::test]
async fn survives_the_server_dropping_every_connection_and_restarting() {
    let server = mock(vec![
        token("agent-secret", Answer::Confirm),
        token("visitor-secret", Answer::Confirm),
    ])
    .await;
    let addr = server.addr();
    let (_dir, out) = out_file();
    let bridge = Bridge::start(config(&server.url(), AGENT_AND_VISITOR, &out, ""))
        .await
        .unwrap();
    wait_until("two subscriptions", || {
        server.streaming_subscriptions() == 2
    })
    .await;
    server.broadcast(
        "message.created",
        r#"{"account_id":1,"step":"before drop"}"#,
    );
    wait_for_lines(&out, 2).await;

    // A deploy: TCP dropped without a close frame.
    server.drop_connections();
    wait_until("resubscribed after the drop", || {
        server.connections_accepted() >= 4 && server.streaming_subscriptions() == 2
    })
    .await;
    server.broadcast("message.created", r#"{"account_id":1,"step":"after drop"}"#);
    wait_for_lines(&out, 4).await;

    // A restart: the whole server goes away and comes back on the same port.
    server.stop().await;
    wait_state(&bridge, "agent", TokenState::BackingOff).await;
    let server = MockServer::start(MockConfig {
        listen: addr,
        tokens: vec![
            token("agent-secret", Answer::Confirm),
            token("visitor-secret", Answer::Confirm),
        ],
        ping_interval: Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await
    .expect("the same port can be bound again");
    wait_until("resubscribed after the restart", || {
        server.streaming_subscriptions() == 2
    })
    .await;
    server.broadcast(
        "message.created",
        r#"{"account_id":1,"step":"after restart"}"#,
    );
    let events = wait_for_lines(&out, 6).await;
    stop(bridge, server).await;

    let steps: Vec<&str> = events
        .iter()
        .map(|e| e["data"]["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "before drop",
            "before drop",
            "after drop",
            "after drop",
            "after restart",
            "after restart"
        ]
    );
}

#[tokio::test]
async fn a_silent_server_is_detected_as_stale_and_reconnected() {
    let server = mock(vec![token("agent-secret", Answer::Confirm)]).await;
    let (_dir, out) = out_file();
    let tokens = AGENT_ONLY;
    let mut cfg = config(&server.url(), tokens, &out, "");
    // Pings every 300 ms: a healthy socket is never stale, even on a loaded test machine.
    cfg.cable.stale_after = Duration::from_secs(2);
    let bridge = Bridge::start(cfg).await.unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(bridge.status().token("agent").unwrap().stale_reconnects, 0);
    assert_eq!(server.connections_accepted(), 1);

    server.set_pings(false);
    let stale = bridge
        .status()
        .wait_for(WAIT, |b| b.token("agent").unwrap().stale_reconnects >= 1)
        .await;
    assert!(stale, "silence was not noticed");
    let status = bridge.status().token("agent").unwrap();
    assert!(status.last_error.unwrap().contains("stale"));
    server.set_pings(true);
    wait_until("a new connection", || server.connections_accepted() >= 2).await;
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    server.broadcast_generated();
    wait_for_lines(&out, 1).await;
    stop(bridge, server).await;
}

#[tokio::test]
async fn disconnect_frames_reconnect_now_or_back_off_long() {
    let server = mock(vec![token("agent-secret", Answer::Confirm)]).await;
    let (_dir, out) = out_file();
    let tokens = AGENT_ONLY;
    let mut cfg_long = config(&server.url(), tokens, &out, "");
    cfg_long.cable.stale_after = Duration::from_secs(5);
    cfg_long.cable.reconnect.after_disconnect_without_reconnect = Duration::from_secs(60);
    let bridge = Bridge::start(cfg_long).await.unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;

    server.disconnect_all(true);
    wait_until("a prompt reconnect", || {
        server.connections_accepted() == 2 && server.streaming_subscriptions() == 1
    })
    .await;

    server.disconnect_all(false);
    wait_state(&bridge, "agent", TokenState::BackingOff).await;
    let status = bridge.status().token("agent").unwrap();
    assert!(status
        .last_error
        .unwrap()
        .contains("server sent disconnect"));
    // Told not to come back soon (60 s, at least 30 of them fixed): it stays away.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.connections_accepted(), 2);
    assert_eq!(
        bridge.status().token("agent").unwrap().state,
        TokenState::BackingOff
    );
    stop(bridge, server).await;
}

#[tokio::test]
async fn malformed_and_oversized_frames_are_skipped_and_counted() {
    let server = mock(vec![token("agent-secret", Answer::Confirm)]).await;
    let (_dir, out) = out_file();
    let tokens = AGENT_ONLY;
    let bridge = Bridge::start(config(
        &server.url(),
        tokens,
        &out,
        "  max_frame_bytes: 4096\n",
    ))
    .await
    .unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    let identifier = serde_json::to_string(
        r#"{"channel":"RoomChannel","pubsub_token":"agent-secret","account_id":1,"user_id":3}"#,
    )
    .unwrap();
    server.send_raw("this is not json");
    server.send_raw(&format!(
        r#"{{"identifier":{identifier},"message":{{"event":"message.created","data":[1,2]}}}}"#
    ));
    server.send_raw(&format!(
        r#"{{"identifier":{identifier},"message":"just a string"}}"#
    ));
    server.broadcast("message.created", r#"{"account_id":1,"n":"after garbage"}"#);
    let events = wait_for_lines(&out, 1).await;
    assert_eq!(events[0]["data"]["n"], "after garbage");
    assert_eq!(bridge.status().token("agent").unwrap().malformed_frames, 3);
    assert_eq!(
        server.connections_accepted(),
        1,
        "malformed frames do not cost the socket"
    );

    // A frame over the cap ends that connection (its bytes are never buffered); the socket
    // comes back and later events flow.
    let big = format!(r#"{{"account_id":1,"blob":"{}"}}"#, "x".repeat(10_000));
    server.broadcast("message.created", &big);
    wait_until("a reconnect after the oversized frame", || {
        server.connections_accepted() >= 2 && server.streaming_subscriptions() == 1
    })
    .await;
    let status = bridge.status().token("agent").unwrap();
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("max_frame_bytes"),
        "{status:?}"
    );
    server.broadcast("message.created", r#"{"account_id":1,"n":"after big"}"#);
    let events = wait_for_lines(&out, 2).await;
    assert_eq!(events[1]["data"]["n"], "after big");
    stop(bridge, server).await;
}

#[tokio::test]
async fn presence_is_sent_only_when_the_token_asks() {
    let server = mock(vec![
        token("agent-secret", Answer::Confirm),
        token("present-secret", Answer::Confirm),
    ])
    .await;
    let (_dir, out) = out_file();
    let tokens = r#"
  - { name: agent, pubsub_token: agent-secret, account_id: 1, user_id: 3 }
"#;
    let bridge = Bridge::start(config(
        &server.url(),
        tokens,
        &out,
        "  presence_interval: 100ms\n",
    ))
    .await
    .unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.presence_updates(), 0, "presence is off by default");
    timeout(WAIT, bridge.shutdown()).await.unwrap();

    let tokens = r#"
  - { name: present, pubsub_token: present-secret, account_id: 1, user_id: 4, presence: true }
"#;
    let bridge = Bridge::start(config(
        &server.url(),
        tokens,
        &out,
        "  presence_interval: 100ms\n",
    ))
    .await
    .unwrap();
    wait_state(&bridge, "present", TokenState::Subscribed).await;
    wait_until("presence updates", || server.presence_updates() >= 3).await;
    stop(bridge, server).await;
}

#[tokio::test]
async fn shutdown_delivers_everything_that_was_read() {
    let server = MockServer::start(MockConfig {
        tokens: vec![token("agent-secret", Answer::Confirm)],
        rate: 5_000.0,
        count: Some(3_000),
        wait_for_subscriptions: 1,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let (_dir, out) = out_file();
    let tokens = AGENT_ONLY;
    let bridge = Bridge::start(config(&server.url(), tokens, &out, ""))
        .await
        .unwrap();
    // Stop in the middle of the stream.
    wait_until("some events read", || {
        bridge
            .status()
            .token("agent")
            .is_some_and(|t| t.events >= 500)
    })
    .await;
    let status = bridge.status().clone();
    let report = timeout(WAIT, bridge.shutdown()).await.unwrap();
    assert_eq!(report.drain, chatwoot_bridge::bridge::Drain::CaughtUp);
    let read = status.token("agent").unwrap().events as usize;
    let events = read_events(&out);
    assert_eq!(
        events.len(),
        read,
        "every event read from the socket is in the file"
    );
    let seqs = seqs_of(&events, "agent");
    assert_eq!(seqs, (0..read as u64).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn the_supervisor_adds_and_removes_tokens_without_touching_others() {
    use chatwoot_bridge::source::supervisor::Supervisor;
    use chatwoot_bridge::status::StatusBoard;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let server = mock(vec![
        token("agent-secret", Answer::Confirm),
        token("visitor-secret", Answer::Confirm),
    ])
    .await;
    let (_dir, out) = out_file();
    let cfg = config(&server.url(), AGENT_AND_VISITOR, &out, "");
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let status = StatusBoard::new();
    let mut supervisor = Supervisor::new(
        Arc::new(cfg.cable.clone()),
        tx,
        status.clone(),
        CancellationToken::new(),
    );
    let report = supervisor.apply(&cfg.tokens[..1]);
    assert_eq!(report.started, ["agent"]);
    assert!(
        status
            .wait_for(WAIT, |b| b
                .token("agent")
                .is_some_and(|t| t.state == TokenState::Subscribed))
            .await
    );

    let report = supervisor.apply(&cfg.tokens);
    assert_eq!(report.started, ["visitor"]);
    assert!(report.restarted.is_empty() && report.stopped.is_empty());
    assert!(
        status
            .wait_for(WAIT, |b| b
                .token("visitor")
                .is_some_and(|t| t.state == TokenState::Subscribed))
            .await
    );
    assert_eq!(
        status.token("agent").unwrap().connects,
        1,
        "agent untouched"
    );

    let mut changed = cfg.tokens.clone();
    changed[1].presence = true;
    let report = supervisor.apply(&changed);
    assert_eq!(report.restarted, ["visitor"]);
    let report = supervisor.apply(&changed[..1]);
    assert_eq!(report.stopped, ["visitor"]);
    assert!(status.token("visitor").is_none());
    wait_until("one subscription left", || {
        server.streaming_subscriptions() == 1
    })
    .await;
    assert_eq!(
        status.token("agent").unwrap().connects,
        1,
        "agent untouched"
    );

    server.broadcast("message.created", r#"{"account_id":1}"#);
    let event = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&*event.token, "agent");
    timeout(WAIT, supervisor.shutdown()).await.unwrap();
    server.stop().await;
}
