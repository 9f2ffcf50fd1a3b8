//! Routes and redaction end to end: mock Chatwoot → bridge → two file sinks.

mod support;

use std::path::Path;
use std::time::Duration;

use chatwoot_bridge::mock::fixtures;
use chatwoot_bridge::mock::{Answer, MockConfig};
use chatwoot_bridge::status::TokenState;
use chatwoot_bridge::Bridge;
use support::{mock_token, quoted, shut_down, start_mock, wait_until, BridgeYaml, WAIT};

/// Chatwoot's `data` of a fixture, as the exact bytes it sent.
fn fixture_data(name: &str) -> String {
    let (_, frame) = fixtures::ALL.iter().find(|(n, _)| *n == name).unwrap();
    let frame = frame.trim_end();
    let start = frame.find(r#""data":"#).unwrap() + r#""data":"#.len();
    // The frame ends with `}}}`: data's own brace, message's, the frame's.
    frame[start..frame.len() - 2].to_owned()
}

/// Two file sinks: `analytics` drops the sender's contact details, `raw` keeps the contact
/// tokens; conversations of inbox 2 go to both, incoming invoice messages to analytics only.
fn routed_config(cable_url: &str, dir: &Path) -> BridgeYaml {
    let analytics = quoted(dir.join("analytics.jsonl"));
    let raw = quoted(dir.join("raw.jsonl"));
    BridgeYaml::new(cable_url)
        .agent("agent", "agent-secret", 3)
        .sink(
            "analytics",
            &format!(
                "{{ type: file, path: {analytics}, fields: {{ drop: [meta.sender.email, meta.sender.phone_number] }} }}"
            ),
        )
        .sink("raw", &format!("{{ type: file, path: {raw}, keep_pubsub_tokens: true }}"))
        .route(r#"{ name: conversations, match: { event: "conversation.*", inbox_id: [2] }, to: [analytics, raw] }"#)
        .route(r#"{ name: incoming-messages, match: { event: message.created, where: [{ path: message_type, in: [0] }, { path: content, matches: "(?i)invoice" }] }, to: [analytics] }"#)
        .spool(&dir.join("spool"))
}

#[tokio::test]
async fn routes_redact_and_count_what_matched_nothing() {
    let server = start_mock(MockConfig {
        tokens: vec![mock_token("agent-secret", Answer::Confirm)],
        ping_interval: Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let analytics = dir.path().join("analytics.jsonl");
    let raw = dir.path().join("raw.jsonl");
    let config = routed_config(&server.url(), dir.path()).config();
    let bridge = Bridge::start(config).await.unwrap();
    let subscribed = bridge
        .status()
        .wait_for(WAIT, |b| {
            b.token("agent")
                .is_some_and(|t| t.state == TokenState::Subscribed)
        })
        .await;
    assert!(subscribed);

    let conversation = fixture_data("conversation.created");
    assert!(conversation.contains(r#""pubsub_token":"bf2RWA4TaHac2fPThmKYp6Nn""#));
    server.broadcast("conversation.created", &conversation);
    server.broadcast("message.created", &fixture_data("message.created"));
    server.broadcast("presence.update", &fixture_data("presence.update"));
    server.broadcast("presence.update", &fixture_data("presence.update"));

    wait_until("events to arrive", || {
        support::events_in(&analytics).len() >= 2 && !support::events_in(&raw).is_empty()
    })
    .await;
    let stats = bridge.stats();
    support::wait_until_explained(
        "both presence updates counted as unmatched",
        || stats.unmatched.lock().unwrap().get("presence.update") == Some(&2),
        || format!("{:?}", stats.unmatched.lock().unwrap()),
    )
    .await;
    shut_down(bridge).await;
    server.stop().await;

    let analytics = support::events_in(&analytics);
    let names: Vec<&str> = analytics
        .iter()
        .map(|e| e["chatwootevent"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["conversation.created", "message.created"]);
    let text = serde_json::to_string(&analytics).unwrap();
    assert!(!text.contains("pubsub_token"), "stripped by default");
    assert!(
        analytics[0]["data"]["contact_inbox"]["source_id"].is_string(),
        "the rest stays"
    );
    assert!(analytics[0]["data"]["meta"]["sender"]
        .get("email")
        .is_none());
    assert!(analytics[0]["data"]["meta"]["sender"]["name"].is_string());

    let raw = support::events_in(&raw);
    assert_eq!(raw.len(), 1);
    assert_eq!(
        raw[0]["data"]["contact_inbox"]["pubsub_token"],
        "bf2RWA4TaHac2fPThmKYp6Nn"
    );
    // The id is the same in both sinks: computed from the bytes as received.
    assert_eq!(raw[0]["id"], analytics[0]["id"]);
}
