//! The cable source end to end: the mock Chatwoot server, the bridge, the file sink.
//! Every wait is bounded; every test asserts what reached the file.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chatwoot_bridge::config::Config;
use chatwoot_bridge::mock::{Answer, MockConfig, MockServer, MockToken};
use chatwoot_bridge::status::{ReconnectReason, StatusBoard, TokenState};
use chatwoot_bridge::{Bridge, Drain};
use serde_json::Value;
use support::{
    mock_token, quoted, shut_down, start_mock, wait_until, wait_until_explained, within,
    BridgeYaml, WAIT,
};

/// A mock Chatwoot with `tokens` that pings every 300 ms.
async fn mock(tokens: Vec<MockToken>) -> MockServer {
    start_mock(MockConfig {
        tokens,
        ping_interval: Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await
}

/// A config with fast timings, no tokens yet, writing every event to the file `out`.
fn config(url: &str, out: &Path) -> BridgeYaml {
    BridgeYaml::new(url)
        .cable("confirm_timeout: 500ms")
        .cable("stale_after: 3s")
        .cable("reconnect: { initial: 50ms, max: 200ms }")
        .sink(
            "archive",
            &format!("{{ type: file, path: {} }}", quoted(out)),
        )
        .route("{ name: everything, match: {}, to: [archive] }")
        .spool(&out.with_extension("spool"))
}

/// [`config`] with the agent token only.
fn agent_only(url: &str, out: &Path) -> BridgeYaml {
    config(url, out).agent("agent", "agent-secret", 3)
}

/// [`config`] with the agent token and a contact's (visitor) token.
fn agent_and_visitor(url: &str, out: &Path) -> Config {
    agent_only(url, out)
        .token("{ name: visitor, pubsub_token: visitor-secret }")
        .config()
}

/// Shuts the bridge down (bounded) and stops the mock server.
async fn stop(bridge: Bridge, server: MockServer) {
    shut_down(bridge).await;
    server.stop().await;
}

/// Waits until the file holds at least `n` events; returns those it then held.
async fn wait_for_lines(path: &Path, n: usize) -> Vec<Value> {
    let mut events = Vec::new();
    wait_until_explained(
        &format!("{n} events in {}", path.display()),
        || {
            events = support::events_in(path);
            events.len() >= n
        },
        || format!("found {}", support::events_in(path).len()),
    )
    .await;
    events
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
        mock_token("agent-secret", Answer::Confirm),
        mock_token("visitor-secret", Answer::Confirm),
    ])
    .await;
    let (_dir, out) = out_file();
    let bridge = Bridge::start(agent_and_visitor(&server.url(), &out))
        .await
        .unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    wait_state(&bridge, "visitor", TokenState::Subscribed).await;

    for _ in 0..30 {
        server.broadcast_generated();
    }
    let events = wait_for_lines(&out, 60).await;
    let report = shut_down(bridge).await;
    assert_eq!(report.drain, Drain::CaughtUp);
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
    let server = mock(vec![mock_token("agent-secret", Answer::Confirm)]).await;
    let (_dir, out) = out_file();
    let bridge = Bridge::start(agent_only(&server.url(), &out).config())
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
        mock_token("agent-secret", Answer::Confirm),
        mock_token("visitor-secret", Answer::Silent),
    ])
    .await;
    let (_dir, out) = out_file();
    let bridge = Bridge::start(agent_and_visitor(&server.url(), &out))
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
        mock_token("agent-secret", Answer::Confirm),
        mock_token("visitor-secret", Answer::Reject),
    ])
    .await;
    let (_dir, out) = out_file();
    let bridge = Bridge::start(agent_and_visitor(&server.url(), &out))
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
    // The server is behind: it still owes the confirm when the bridge gives up at 500 ms and
    // sends `unsubscribe`, and answers in order, so the confirm reaches the bridge after it gave
    // up. The server then drops that subscription: the bridge must not believe the confirm.
    let server = mock(vec![mock_token(
        "agent-secret",
        Answer::ConfirmAfter(Duration::from_millis(800)),
    )])
    .await;
    let (_dir, out) = out_file();
    let mut cfg = agent_only(&server.url(), &out).config();
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
    let server = mock(vec![mock_token("agent-secret", Answer::StreamUnconfirmed)]).await;
    let (_dir, out) = out_file();
    let bridge = Bridge::start(agent_only(&server.url(), &out).config())
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
        mock_token("agent-secret", Answer::Confirm),
        mock_token("visitor-secret", Answer::Confirm),
    ])
    .await;
    let addr = server.addr();
    let (_dir, out) = out_file();
    let bridge = Bridge::start(agent_and_visitor(&server.url(), &out))
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
    let restarted = MockServer::start(MockConfig {
        listen: addr,
        tokens: vec![
            mock_token("agent-secret", Answer::Confirm),
            mock_token("visitor-secret", Answer::Confirm),
        ],
        ping_interval: Duration::from_millis(300),
        ..MockConfig::default()
    });
    let server = within("the mock Chatwoot to restart", restarted)
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
    let server = mock(vec![mock_token("agent-secret", Answer::Confirm)]).await;
    let (_dir, out) = out_file();
    let mut cfg = agent_only(&server.url(), &out).config();
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
async fn a_socket_that_pings_but_never_says_welcome_is_reconnected_after_connect_timeout() {
    let server = start_mock(MockConfig {
        tokens: vec![mock_token("agent-secret", Answer::Confirm)],
        ping_interval: Duration::from_millis(100),
        send_welcome: false,
        ..MockConfig::default()
    })
    .await;
    let (_dir, out) = out_file();
    // Pings every 100 ms keep the socket from going stale: only the welcome timer ends it.
    let cfg = agent_only(&server.url(), &out)
        .cable("connect_timeout: 600ms")
        .setting("admin: { listen: 0 }")
        .config();
    let bridge = Bridge::start(cfg).await.unwrap();
    let no_welcome = |b: &StatusBoard| {
        b.token("agent")
            .is_some_and(|t| t.reconnects.get(ReconnectReason::NoWelcome) >= 2)
    };
    assert!(
        bridge.status().wait_for(WAIT, no_welcome).await,
        "a socket without welcome was never given up: {:?}",
        bridge.status().token("agent")
    );
    let token = bridge.status().token("agent").unwrap();
    assert!(token.frames >= 2, "the server's pings arrived: {token:?}");
    assert_eq!(
        token.reconnects.total(),
        token.reconnects.get(ReconnectReason::NoWelcome),
        "every reconnect was for want of a welcome: {token:?}"
    );
    assert_ne!(token.state, TokenState::Subscribed);
    let error = token.last_error.unwrap_or_default();
    assert!(
        error.contains("no welcome within 600ms (chatwoot.connect_timeout)"),
        "{error}"
    );
    // Nothing was subscribed on those sockets, so the token could never have been subscribed.
    assert_eq!(server.subscribe_commands(), 0);
    assert!(server.connections_accepted() >= 2, "one socket per attempt");

    let admin = bridge.admin_addr().unwrap();
    let metrics = within("GET /metrics", async {
        reqwest::get(format!("http://{admin}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
    .await;
    let series = r#"chatwoot_bridge_token_reconnects_total{token="agent",reason="no_welcome"} "#;
    let count = metrics
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{metrics}"));
    assert!(count.parse::<u64>().unwrap() >= 2, "{series}{count}");
    stop(bridge, server).await;
}

#[tokio::test]
async fn disconnect_frames_reconnect_now_or_back_off_long() {
    let server = mock(vec![mock_token("agent-secret", Answer::Confirm)]).await;
    let (_dir, out) = out_file();
    let mut cfg_long = agent_only(&server.url(), &out).config();
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
    let server = mock(vec![mock_token("agent-secret", Answer::Confirm)]).await;
    let (_dir, out) = out_file();
    let cfg = agent_only(&server.url(), &out).cable("max_frame_bytes: 4096");
    let bridge = Bridge::start(cfg.config()).await.unwrap();
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
async fn data_nested_deeper_than_the_limit_is_counted_and_never_spooled() {
    // 100,000 levels with a token at the bottom: walking it recursively would exhaust a stack
    // (the redaction that strips `pubsub_token` did), and once spooled it would do so at every
    // start. It is refused at the socket; the socket and the events after it go on.
    let server = mock(vec![mock_token("agent-secret", Answer::Confirm)]).await;
    let (_dir, out) = out_file();
    let cfg = agent_only(&server.url(), &out);
    let bridge = Bridge::start(cfg.config()).await.unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    let depth = 100_000;
    let deep = format!(
        r#"{{"account_id":1,"n":"deep","x":{}{{"pubsub_token":"contact-secret"}}{}}}"#,
        r#"{"a":"#.repeat(depth),
        "}".repeat(depth)
    );
    server.broadcast("message.created", &deep);
    // Just under the default limit of 128 passes, token stripped.
    let fine = format!(
        r#"{{"account_id":1,"n":"fine","x":{}{{"pubsub_token":"contact-secret"}}{}}}"#,
        "[".repeat(120),
        "]".repeat(120)
    );
    server.broadcast("message.created", &fine);
    server.broadcast("message.created", r#"{"account_id":1,"n":"after"}"#);
    let events = wait_for_lines(&out, 2).await;
    assert_eq!(events[0]["data"]["n"], "fine");
    assert_eq!(events[1]["data"]["n"], "after");
    assert_eq!(bridge.status().token("agent").unwrap().malformed_frames, 1);
    assert_eq!(server.connections_accepted(), 1, "the socket stays up");
    stop(bridge, server).await;
    let spooled: Vec<u8> = std::fs::read_dir(out.with_extension("spool"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .flat_map(|e| std::fs::read(e.path()).unwrap_or_default())
        .collect();
    let text = String::from_utf8_lossy(&spooled);
    assert!(
        text.contains(r#""n":"fine""#),
        "the spool was not where expected"
    );
    assert!(
        !text.contains(r#""n":"deep""#),
        "the deep event reached the spool"
    );
}

#[tokio::test]
async fn presence_is_sent_only_when_the_token_asks() {
    let server = mock(vec![
        mock_token("agent-secret", Answer::Confirm),
        mock_token("present-secret", Answer::Confirm),
    ])
    .await;
    let (_dir, out) = out_file();
    let cfg = config(&server.url(), &out).cable("presence_interval: 100ms");
    let bridge = Bridge::start(cfg.clone().agent("agent", "agent-secret", 3).config())
        .await
        .unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.presence_updates(), 0, "presence is off by default");
    shut_down(bridge).await;

    let present = "{ name: present, pubsub_token: present-secret, account_id: 1, user_id: 4, presence: true }";
    let bridge = Bridge::start(cfg.token(present).config()).await.unwrap();
    wait_state(&bridge, "present", TokenState::Subscribed).await;
    wait_until("presence updates", || server.presence_updates() >= 3).await;
    stop(bridge, server).await;
}

#[tokio::test]
async fn shutdown_delivers_everything_that_was_read() {
    let server = start_mock(MockConfig {
        tokens: vec![mock_token("agent-secret", Answer::Confirm)],
        rate: 5_000.0,
        count: Some(3_000),
        wait_for_subscriptions: 1,
        ..MockConfig::default()
    })
    .await;
    let (_dir, out) = out_file();
    let bridge = Bridge::start(agent_only(&server.url(), &out).config())
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
    let report = shut_down(bridge).await;
    assert_eq!(report.drain, Drain::CaughtUp);
    let read = status.token("agent").unwrap().events as usize;
    let events = support::events_in(&out);
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
        mock_token("agent-secret", Answer::Confirm),
        mock_token("visitor-secret", Answer::Confirm),
    ])
    .await;
    let (_dir, out) = out_file();
    let cfg = agent_and_visitor(&server.url(), &out);
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
    let event = within("an event from the supervisor", rx.recv())
        .await
        .unwrap();
    assert_eq!(&*event.token, "agent");
    within("the supervisor to shut down", supervisor.shutdown()).await;
    server.stop().await;
}
