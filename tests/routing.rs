//! Routes and redaction end to end: mock Chatwoot → bridge → two file sinks.

use std::path::Path;
use std::time::Duration;

use chatwoot_bridge::config::Config;
use chatwoot_bridge::mock::fixtures;
use chatwoot_bridge::mock::{Answer, MockConfig, MockServer, MockToken};
use chatwoot_bridge::status::TokenState;
use chatwoot_bridge::Bridge;
use serde_json::Value;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Chatwoot's `data` of a fixture, as the exact bytes it sent.
fn fixture_data(name: &str) -> String {
    let (_, frame) = fixtures::ALL.iter().find(|(n, _)| *n == name).unwrap();
    let frame = frame.trim_end();
    let start = frame.find(r#""data":"#).unwrap() + r#""data":"#.len();
    // The frame ends with `}}}`: data's own brace, message's, the frame's.
    frame[start..frame.len() - 2].to_owned()
}

#[tokio::test]
async fn routes_redact_and_count_what_matched_nothing() {
    let server = MockServer::start(MockConfig {
        tokens: vec![MockToken {
            pubsub_token: "agent-secret".into(),
            answer: Answer::Confirm,
        }],
        ping_interval: Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let analytics = dir.path().join("analytics.jsonl");
    let raw = dir.path().join("raw.jsonl");
    let yaml = format!(
        r#"
chatwoot: {{ url: "{url}" }}
tokens:
  - {{ name: agent, pubsub_token: agent-secret, account_id: 1, user_id: 3 }}
sinks:
  analytics:
    type: file
    path: {analytics}
    fields: {{ drop: [meta.sender.email, meta.sender.phone_number] }}
  raw: {{ type: file, path: {raw}, keep_pubsub_tokens: true }}
routes:
  - name: conversations
    match: {{ event: "conversation.*", inbox_id: [2] }}
    to: [analytics, raw]
  - name: incoming-messages
    match:
      event: message.created
      where: [{{ path: message_type, in: [0] }}, {{ path: content, matches: "(?i)invoice" }}]
    to: [analytics]
spool: {{ dir: {spool} }}
"#,
        spool = serde_json::to_string(&dir.path().join("spool")).unwrap(),
        url = server.url(),
        analytics = serde_json::to_string(&analytics).unwrap(),
        raw = serde_json::to_string(&raw).unwrap(),
    );
    let config = Config::from_yaml(&yaml, &|_| None, false).unwrap();
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

    let done = timeout(WAIT, async {
        while lines(&analytics).len() < 2 || lines(&raw).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(done.is_ok(), "events did not arrive");
    let stats = bridge.stats();
    let unmatched_presence = timeout(WAIT, async {
        loop {
            if stats.unmatched.lock().unwrap().get("presence.update") == Some(&2) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        unmatched_presence.is_ok(),
        "{:?}",
        stats.unmatched.lock().unwrap()
    );
    timeout(WAIT, bridge.shutdown()).await.unwrap();
    server.stop().await;

    let analytics = lines(&analytics);
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

    let raw = lines(&raw);
    assert_eq!(raw.len(), 1);
    assert_eq!(
        raw[0]["data"]["contact_inbox"]["pubsub_token"],
        "bf2RWA4TaHac2fPThmKYp6Nn"
    );
    // The id is the same in both sinks: computed from the bytes as received.
    assert_eq!(raw[0]["id"], analytics[0]["id"]);
}
