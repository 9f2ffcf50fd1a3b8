//! The Kafka, NATS and webhook sinks against real servers: nats-server, a tansu broker and an
//! HTTP receiver, read back with clients that share no code with the sinks.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatwoot_bridge::event::{Event, EventId};
use chatwoot_bridge::mock::{Answer as MockAnswer, MockConfig, MockServer};
use chatwoot_bridge::sink::{Outcome, Sink};
use chatwoot_bridge::{Bridge, Drain};
use futures_util::StreamExt;
use hyper::StatusCode;
use rdkafka::message::{Headers, Message};
use support::{
    free_port, mock_token, scripted, shut_down, sink, sink_kind, start_mock, wait_until,
    wait_until_async, within, BridgeYaml, KafkaBroker, NatsServer, Received, Receiver,
    TestCertificates, POLL,
};

/// A webhook secret in Standard Webhooks form (24 random-looking bytes).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Hands `batch` to `sink` and waits for its outcomes.
async fn deliver(sink: &mut Sink, batch: &[Arc<Event>]) -> Vec<Outcome> {
    within("the sink's outcomes", sink.deliver(batch)).await
}

/// A mock Chatwoot that confirms the agent token of [`bridge_yaml`].
async fn agent_mock() -> MockServer {
    start_mock(MockConfig {
        tokens: vec![mock_token("tok-agent", MockAnswer::Confirm)],
        ..MockConfig::default()
    })
    .await
}

/// A config reading the agent token from `cable`, the spool in `spool`, a 20 s shutdown window;
/// no sinks or routes yet.
fn bridge_yaml(cable: &str, spool: &Path) -> BridgeYaml {
    BridgeYaml::new(cable)
        .agent("agent", "tok-agent", 1)
        .spool(spool)
        .setting("shutdown_timeout: 20s")
}

/// Starts a bridge on `config` and waits until its token streams from `mock`.
async fn start_subscribed(config: chatwoot_bridge::config::Config, mock: &MockServer) -> Bridge {
    let bridge = within("the bridge to start", Bridge::start(config))
        .await
        .unwrap();
    wait_until("the bridge to subscribe", || {
        mock.streaming_subscriptions() >= 1
    })
    .await;
    bridge
}

fn event(id: u128, name: &str, data: &str) -> Arc<Event> {
    let mut e = Event::for_test(name, "agent", data);
    e.id = EventId(id);
    Arc::new(e)
}

fn kind(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Retryable(_) => "retryable",
        Outcome::Permanent(_) => "permanent",
    }
}

fn nats_header(headers: &Option<async_nats::HeaderMap>, name: &str) -> Option<String> {
    headers.as_ref()?.get(name).map(|v| v.as_str().to_owned())
}

fn kafka_headers(message: &impl Message) -> BTreeMap<String, String> {
    message
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Verifies a request's Standard Webhooks signature with the `standardwebhooks` crate.
fn verify_signature(received: &Received) {
    let webhook = standardwebhooks::Webhook::new(SECRET).expect("secret parses");
    webhook
        .verify(&received.body, &received.headers)
        .unwrap_or_else(|e| panic!("signature of {} does not verify: {e:?}", received.path));
}

// ---------------------------------------------------------------------------------------------
// NATS

#[tokio::test]
async fn nats_core_publish_reaches_a_subscriber_with_cloudevents_headers() {
    let server = NatsServer::start().await;
    let mut sub = server.subscribed("chatwoot.>").await;
    let mut sink = sink(
        "nats-core",
        &format!(
            "{{ type: nats, url: '{}', subject: 'chatwoot.{{account_id}}.{{data.sender.name|nobody}}.{{event}}' }}",
            server.url()
        ),
    )
    .await;
    let message_data = r#"{"account_id":1,"conversation_id":87,"sender":{"name":"Ana B. *x>"},"content":"caf\u00e9"}"#;
    let batch = vec![
        event(1, "message.created", message_data),
        event(2, "contact.updated", r#"{"account_id":1,"id":4}"#),
        // No account id: the subject cannot be rendered, which is permanent for this event.
        event(3, "presence.update", r#"{"users":{"1":"online"}}"#),
    ];
    let outcomes = deliver(&mut sink, &batch).await;
    let kinds: Vec<&str> = outcomes.iter().map(kind).collect();
    assert_eq!(kinds, ["delivered", "delivered", "permanent"]);
    let Outcome::Permanent(e) = &outcomes[2] else {
        unreachable!()
    };
    assert_eq!(
        e.message,
        "subject template {account_id}: event presence.update has no account_id"
    );

    let first = within("the first message", sub.next()).await.unwrap();
    assert_eq!(
        first.subject.as_str(),
        "chatwoot.1.Ana_B___x_.message.created"
    );
    assert_eq!(&first.payload[..], message_data.as_bytes());
    let h = &first.headers;
    assert_eq!(nats_header(h, "ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(
        nats_header(h, "ce-id").as_deref(),
        Some("00000000000000000000000000000001")
    );
    assert_eq!(
        nats_header(h, "ce-type").as_deref(),
        Some("com.chatwoot.message.created")
    );
    assert_eq!(
        nats_header(h, "ce-source").as_deref(),
        Some("ws://127.0.0.1/cable#agent")
    );
    assert_eq!(
        nats_header(h, "ce-subject").as_deref(),
        Some("conversation/87")
    );
    assert_eq!(
        nats_header(h, "ce-time").as_deref(),
        Some("1970-01-01T00:00:00.000000Z")
    );
    assert_eq!(
        nats_header(h, "ce-datacontenttype").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        nats_header(h, "ce-chatwootevent").as_deref(),
        Some("message.created")
    );
    assert_eq!(nats_header(h, "ce-chatwootaccount").as_deref(), Some("1"));
    let second = within("the second message", sub.next()).await.unwrap();
    assert_eq!(second.subject.as_str(), "chatwoot.1.nobody.contact.updated");
    assert_eq!(nats_header(&second.headers, "ce-subject"), None);
    within("the sink to close", sink.close()).await;
}

#[tokio::test]
async fn nats_jetstream_acks_and_drops_duplicates_by_event_id() {
    let server = NatsServer::start().await;
    let mut sink = sink(
        "nats-js",
        &format!(
            "{{ type: nats, url: ['{}'], subject: 'chatwoot.{{account_id}}.{{event}}', envelope: structured, \
             jetstream: {{ stream: CHATWOOT, create: true, duplicate_window: 2h }} }}",
            server.url()
        ),
    )
    .await;
    let a = event(
        10,
        "message.created",
        r#"{"account_id":1,"conversation_id":5}"#,
    );
    let b = event(11, "conversation.updated", r#"{"account_id":2,"id":6}"#);
    let first = deliver(&mut sink, &[a.clone(), b.clone()]).await;
    assert!(
        first.iter().all(|o| matches!(o, Outcome::Delivered)),
        "{first:?}"
    );
    // The same event again, as after a lost ack or a second token's copy: acknowledged, and
    // the stream still holds it once.
    let again = deliver(&mut sink, &[a.clone(), a.clone()]).await;
    assert!(
        again.iter().all(|o| matches!(o, Outcome::Delivered)),
        "{again:?}"
    );

    let js = async_nats::jetstream::new(server.client().await);
    let mut stream = within("the stream", js.get_stream("CHATWOOT"))
        .await
        .unwrap();
    let info = within("the stream's info", stream.info())
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 2, "duplicates must be dropped");
    assert_eq!(info.config.subjects, vec!["chatwoot.*.>".to_owned()]);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(7200));
    let stored = within("stored message 1", stream.get_raw_message(1))
        .await
        .unwrap();
    assert_eq!(stored.subject.as_str(), "chatwoot.1.message.created");
    assert_eq!(
        stored.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("0000000000000000000000000000000a:chatwoot.1.message.created")
    );
    assert_eq!(
        stored.headers.get("content-type").map(|v| v.as_str()),
        Some("application/cloudevents+json")
    );
    let ce: serde_json::Value = serde_json::from_slice(&stored.payload).unwrap();
    assert_eq!(ce["id"], "0000000000000000000000000000000a");
    assert_eq!(ce["data"]["conversation_id"], 5);
    let stored = within("stored message 2", stream.get_raw_message(2))
        .await
        .unwrap();
    assert_eq!(stored.subject.as_str(), "chatwoot.2.conversation.updated");
    within("the sink to close", sink.close()).await;
}

/// A JetStream sink publishing to subject `subject` in the stream SHARED.
async fn shared_stream_sink(name: &str, server: &NatsServer, subject: &str) -> Sink {
    let yaml = format!(
        "{{ type: nats, url: ['{}'], subject: '{subject}', jetstream: {{ stream: SHARED, create: true }} }}",
        server.url()
    );
    sink(name, &yaml).await
}

#[tokio::test]
async fn jetstream_keeps_one_event_on_every_subject_it_was_sent_to() {
    // Deduplication is per stream, not per subject: with the event id alone as Nats-Msg-Id the
    // stream kept the first of these and acknowledged the others as duplicates.
    let server = NatsServer::start().await;
    let mut a = shared_stream_sink("a", &server, "a.{event}").await;
    let mut b = shared_stream_sink("b", &server, "b.{event}").await;
    let mut by_token = shared_stream_sink("t", &server, "t.{token}.{event}").await;
    let agent = event(
        10,
        "message.created",
        r#"{"account_id":1,"conversation_id":5}"#,
    );
    let mut copy = Event::for_test("message.created", "visitor", agent.data.get());
    copy.id = agent.id;
    let copy = Arc::new(copy);
    let both = vec![agent.clone(), copy];
    // The token sink gets both copies twice, as after a lost ack: still stored once per subject.
    for (sink, batch) in [
        (&mut a, &vec![agent.clone()]),
        (&mut b, &vec![agent.clone()]),
        (&mut by_token, &both),
    ] {
        let outcomes = deliver(sink, batch).await;
        assert!(
            outcomes.iter().all(|o| matches!(o, Outcome::Delivered)),
            "{outcomes:?}"
        );
    }
    let again = deliver(&mut by_token, &both).await;
    assert!(
        again.iter().all(|o| matches!(o, Outcome::Delivered)),
        "{again:?}"
    );
    let js = async_nats::jetstream::new(server.client().await);
    let mut stream = within("the stream", js.get_stream("SHARED")).await.unwrap();
    let info = within("the stream's info", stream.info())
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 4, "one per subject");
    let mut subjects = Vec::new();
    for seq in 1..=4 {
        let stored = within("a stored message", stream.get_raw_message(seq))
            .await
            .unwrap();
        subjects.push(stored.subject.to_string());
    }
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "a.message.created",
            "b.message.created",
            "t.agent.message.created",
            "t.visitor.message.created"
        ]
    );
    for mut sink in [a, b, by_token] {
        within("the sink to close", sink.close()).await;
    }
}

#[tokio::test]
async fn nats_sink_starts_without_a_server_and_delivers_once_one_is_up() {
    let port = free_port();
    let started = Instant::now();
    let mut sink = sink(
        "nats-late",
        &format!(
            "{{ type: nats, url: 'nats://127.0.0.1:{port}', subject: 'late.{{event}}', timeout: 500ms, \
             jetstream: {{ stream: LATE, create: true }} }}"
        ),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "building must not wait for the server"
    );
    let e = event(1, "message.created", r#"{"account_id":1}"#);
    let down = deliver(&mut sink, std::slice::from_ref(&e)).await;
    assert_eq!(kind(&down[0]), "retryable", "{down:?}");

    // Core mode, same missing server: the flush cannot be confirmed, so not delivered.
    let mut core = support::sink(
        "nats-core-late",
        &format!(
            "{{ type: nats, url: 'nats://127.0.0.1:{port}', subject: 'late.{{event}}', timeout: 500ms }}"
        ),
    )
    .await;
    let down = deliver(&mut core, std::slice::from_ref(&e)).await;
    assert_eq!(kind(&down[0]), "retryable", "{down:?}");

    let server = NatsServer::start_on(port).await;
    // Delivered by a later attempt, once the sink has connected.
    within("a delivery once the server is up", async {
        while !matches!(
            deliver(&mut sink, std::slice::from_ref(&e)).await[0],
            Outcome::Delivered
        ) {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    let js = async_nats::jetstream::new(server.client().await);
    let mut stream = within("the stream", js.get_stream("LATE")).await.unwrap();
    let info = within("the stream's info", stream.info()).await.unwrap();
    assert_eq!(info.state.messages, 1);
}

#[tokio::test]
async fn nats_core_counts_a_batch_only_once_the_server_has_read_it() {
    let server = NatsServer::start().await;
    let mut sub = server.subscribed("seen.>").await;
    let mut sink = sink(
        "nats-core",
        &format!(
            "{{ type: nats, url: '{}', subject: 'seen.{{event}}', timeout: 1s }}",
            server.url()
        ),
    )
    .await;
    let first = event(1, "message.created", r#"{"account_id":1}"#);
    let outcomes = deliver(&mut sink, std::slice::from_ref(&first)).await;
    assert_eq!(kind(&outcomes[0]), "delivered", "{outcomes:?}");

    // A frozen server: the kernel takes the batch and the flush completes, but the server has
    // not read it, and would lose it if it died now.
    server.pause();
    let second = event(2, "message.created", r#"{"account_id":1}"#);
    let frozen = deliver(&mut sink, std::slice::from_ref(&second)).await;
    server.resume();
    assert_eq!(kind(&frozen[0]), "retryable", "{frozen:?}");
    let Outcome::Retryable(e) = &frozen[0] else {
        unreachable!()
    };
    assert!(e.message.contains("not confirmed by the server"), "{e:?}");

    let retried = deliver(&mut sink, std::slice::from_ref(&second)).await;
    assert_eq!(kind(&retried[0]), "delivered", "{retried:?}");
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let message = within("the messages", sub.next()).await.unwrap();
        ids.push(nats_header(&message.headers, "ce-id").unwrap());
    }
    // The second event twice: the frozen attempt's copy, read once the server ran again, and
    // the retry's.
    assert_eq!(
        ids,
        [
            "00000000000000000000000000000001",
            "00000000000000000000000000000002",
            "00000000000000000000000000000002"
        ]
    );
    within("the sink to close", sink.close()).await;
}

#[tokio::test]
async fn jetstream_create_leaves_an_existing_streams_settings_alone() {
    let server = NatsServer::start().await;
    let js = async_nats::jetstream::new(server.client().await);
    let window = Duration::from_secs(600);
    within(
        "the stream to be created",
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "KEEP".to_owned(),
            subjects: vec!["keep.>".to_owned()],
            duplicate_window: window,
            max_messages: 1000,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    // The stream captures this sink's subjects already; the sink asks for another window.
    let mut inside = sink(
        "inside",
        &format!(
            "{{ type: nats, url: '{}', subject: 'keep.{{account_id}}.{{event}}', \
             jetstream: {{ stream: KEEP, create: true, duplicate_window: 2h }} }}",
            server.url()
        ),
    )
    .await;
    // The stream lacks this sink's subjects: they are added, and nothing else changes.
    let mut added = sink(
        "added",
        &format!(
            "{{ type: nats, url: '{}', subject: 'added.{{event}}', \
             jetstream: {{ stream: KEEP, create: true }} }}",
            server.url()
        ),
    )
    .await;
    let e = event(1, "message.created", r#"{"account_id":1}"#);
    for sink in [&mut inside, &mut added] {
        let outcomes = deliver(sink, std::slice::from_ref(&e)).await;
        assert_eq!(kind(&outcomes[0]), "delivered", "{outcomes:?}");
    }
    let mut stream = within("the stream", js.get_stream("KEEP")).await.unwrap();
    let info = within("the stream's info", stream.info())
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 2);
    assert_eq!(info.config.subjects, ["keep.>", "added.>"]);
    assert_eq!(info.config.duplicate_window, window);
    assert_eq!(info.config.max_messages, 1000);
    for mut sink in [inside, added] {
        within("the sink to close", sink.close()).await;
    }
}

#[tokio::test]
async fn nats_token_and_user_password_auth() {
    let (with_token, with_user) = tokio::join!(
        NatsServer::start_with(free_port(), &["--auth", "tok-s3cret"]),
        NatsServer::start_with(free_port(), &["--user", "bridge", "--pass", "pa55-s3cret"]),
    );
    let e = event(1, "message.created", r#"{"account_id":1}"#);
    for (server, auth, good) in [
        (&with_token, "token: tok-s3cret", true),
        (&with_token, "token: wrong-token", false),
        (&with_user, "user: bridge, password: pa55-s3cret", true),
        (&with_user, "user: bridge, password: wrong", false),
    ] {
        let mut sink = sink(
            "nats-auth",
            &format!(
                "{{ type: nats, url: '{}', subject: 'auth.{{event}}', timeout: 1s, {auth} }}",
                server.url()
            ),
        )
        .await;
        let outcome = deliver(&mut sink, std::slice::from_ref(&e)).await;
        let expected = if good { "delivered" } else { "retryable" };
        assert_eq!(kind(&outcome[0]), expected, "{auth}: {outcome:?}");
        if let Outcome::Retryable(err) = &outcome[0] {
            assert!(!err.message.contains("s3cret") && !err.message.contains("wrong"));
        }
    }
}

#[tokio::test]
async fn nats_tls_with_a_private_ca() {
    let certs = TestCertificates::make();
    let (cert, key) = (
        certs.cert.display().to_string(),
        certs.key.display().to_string(),
    );
    let server = NatsServer::start_with(
        free_port(),
        &["--tls", "--tlscert", &cert, "--tlskey", &key],
    )
    .await;
    let e = event(1, "message.created", r#"{"account_id":1}"#);
    // Trusting the private CA: delivered over TLS.
    let mut trusted = sink(
        "nats-tls",
        &format!(
            "{{ type: nats, url: '{}', subject: 'tls.{{event}}', tls_required: true, timeout: 2s, tls: {{ ca_file: '{}' }} }}",
            server.url(),
            certs.ca.display()
        ),
    )
    .await;
    let outcome = deliver(&mut trusted, std::slice::from_ref(&e)).await;
    assert_eq!(kind(&outcome[0]), "delivered", "{outcome:?}");
    // Without the CA the server's certificate is not trusted: nothing is sent.
    let mut untrusted = sink(
        "nats-tls",
        &format!(
            "{{ type: nats, url: '{}', subject: 'tls.{{event}}', tls_required: true, timeout: 1s }}",
            server.url()
        ),
    )
    .await;
    let outcome = deliver(&mut untrusted, std::slice::from_ref(&e)).await;
    assert_eq!(kind(&outcome[0]), "retryable", "{outcome:?}");
}

// ---------------------------------------------------------------------------------------------
// HTTP webhooks

#[tokio::test]
async fn webhook_status_classes_signatures_and_no_redirects() {
    let receiver = within(
        "the receiver to start",
        Receiver::start(Arc::new(|req: &Received, before: usize| {
            match (req.path.as_str(), before) {
                ("/hook/ok", _) => (StatusCode::NO_CONTENT, vec![]),
                ("/hook/busy", 0) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    vec![("retry-after", "3".to_owned())],
                ),
                ("/hook/busy", _) => (StatusCode::OK, vec![]),
                ("/hook/bad", _) => (StatusCode::BAD_REQUEST, vec![]),
                ("/hook/gone", _) => (StatusCode::GONE, vec![]),
                ("/hook/moved", _) => {
                    (StatusCode::FOUND, vec![("location", "/hook/ok".to_owned())])
                }
                _ => (StatusCode::NOT_FOUND, vec![]),
            }
        })),
    )
    .await;
    let mut sink = sink(
        "hook",
        &format!(
            "{{ type: http, url: '{}', secret: {SECRET}, headers: {{ X-Api-Key: k-123 }}, timeout: 5s }}",
            receiver.url("/hook/{data.mode}")
        ),
    )
    .await;
    let modes = ["ok", "busy", "bad", "gone", "moved"];
    let batch: Vec<Arc<Event>> = modes
        .iter()
        .enumerate()
        .map(|(i, mode)| {
            event(
                100 + i as u128,
                "message.created",
                &format!(r#"{{"account_id":1,"conversation_id":2,"mode":"{mode}"}}"#),
            )
        })
        .collect();
    let outcomes = deliver(&mut sink, &batch).await;
    let kinds: Vec<&str> = outcomes.iter().map(kind).collect();
    assert_eq!(
        kinds,
        [
            "delivered",
            "retryable",
            "permanent",
            "permanent",
            "permanent"
        ]
    );
    let Outcome::Retryable(busy) = &outcomes[1] else {
        unreachable!()
    };
    assert_eq!(busy.retry_after, Some(Duration::from_secs(3)));
    let Outcome::Permanent(moved) = &outcomes[4] else {
        unreachable!()
    };
    assert!(
        moved.message.contains("redirects are not followed"),
        "{moved}"
    );

    // The retry of the 503: delivered, with the same webhook-id.
    let retried = deliver(&mut sink, &batch[1..2]).await;
    assert_eq!(kind(&retried[0]), "delivered");

    let received = receiver.received();
    assert_eq!(received.len(), 6, "the 302 must not be followed");
    assert_eq!(
        received.iter().filter(|r| r.path == "/hook/ok").count(),
        1,
        "only the event for /hook/ok reaches it"
    );
    for r in &received {
        assert_eq!(r.method, "POST");
        verify_signature(r);
        assert_eq!(r.headers["x-api-key"], "k-123");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["ce-specversion"], "1.0");
        assert_eq!(r.headers["ce-type"], "com.chatwoot.message.created");
        assert_eq!(r.headers["ce-subject"], "conversation/2");
        assert_eq!(r.headers["ce-chatwootaccount"], "1");
        assert_eq!(r.headers["webhook-id"], r.headers["ce-id"]);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(format!("/hook/{}", body["mode"].as_str().unwrap()), r.path);
    }
    let busy: Vec<&Received> = received.iter().filter(|r| r.path == "/hook/busy").collect();
    assert_eq!(busy.len(), 2);
    assert_eq!(busy[0].headers["webhook-id"], busy[1].headers["webhook-id"]);
    assert_eq!(
        busy[0].headers["webhook-id"],
        "00000000000000000000000000000065"
    );
}

#[tokio::test]
async fn webhook_structured_envelope_and_unreachable_endpoint() {
    let receiver = within("the receiver to start", Receiver::start(scripted(vec![]))).await;
    let mut sink = sink(
        "hook",
        &format!(
            "{{ type: http, url: '{}', envelope: structured, method: PUT }}",
            receiver.url("/ce/{conversation_id}")
        ),
    )
    .await;
    let e = event(
        7,
        "message.created",
        r#"{"account_id":1,"conversation_id":42}"#,
    );
    let contact = event(8, "contact.updated", r#"{"account_id":1,"id":3}"#);
    let outcomes = deliver(&mut sink, &[e, contact]).await;
    assert_eq!(kind(&outcomes[0]), "delivered");
    assert_eq!(
        kind(&outcomes[1]),
        "permanent",
        "no conversation id for the URL"
    );
    let got = receiver.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, "PUT");
    assert_eq!(got[0].path, "/ce/42");
    assert_eq!(
        got[0].headers["content-type"],
        "application/cloudevents+json"
    );
    assert!(got[0].headers.get("webhook-signature").is_none());
    let ce: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["data"]["conversation_id"], 42);

    // Nobody listening: a connection error is retryable.
    let port = free_port();
    let mut down = sink_at(&format!("http://127.0.0.1:{port}/x")).await;
    let outcomes = deliver(&mut down, &[event(9, "x", "{}")]).await;
    assert_eq!(kind(&outcomes[0]), "retryable", "{outcomes:?}");
}

async fn sink_at(url: &str) -> chatwoot_bridge::sink::Sink {
    sink(
        "hook",
        &format!("{{ type: http, url: '{url}', timeout: 2s }}"),
    )
    .await
}

#[tokio::test]
async fn webhook_retry_after_holds_back_the_retry_loop() {
    let receiver = within(
        "the receiver to start",
        Receiver::start(scripted(vec![(
            StatusCode::TOO_MANY_REQUESTS,
            vec![("retry-after", "2".to_owned())],
        )])),
    )
    .await;
    let mock = agent_mock().await;
    let spool = tempfile::tempdir().unwrap();
    let hook = format!(
        "{{ type: http, url: '{}', secret: {SECRET} }}",
        receiver.url("/in")
    );
    let config = bridge_yaml(&mock.url(), spool.path())
        .sink("hook", &hook)
        .route_all(&["hook"])
        .config();
    let bridge = start_subscribed(config, &mock).await;
    mock.broadcast(
        "message.created",
        r#"{"id":1,"account_id":1,"conversation_id":3,"content":"hi"}"#,
    );
    let got = receiver.wait_for(2).await;
    assert_eq!(got.len(), 2, "one refusal, one retry");
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_secs(2),
        "retried after {gap:?}, before the 2 s the endpoint asked for"
    );
    for r in &got {
        verify_signature(r);
    }
    assert_eq!(got[0].headers["webhook-id"], got[1].headers["webhook-id"]);
    let report = shut_down(bridge).await;
    assert_eq!(report.drain, Drain::CaughtUp);
    within("the mock Chatwoot to stop", mock.stop()).await;
}

// ---------------------------------------------------------------------------------------------
// Kafka

#[tokio::test]
async fn kafka_keeps_a_conversation_on_one_partition_in_order() {
    let broker = KafkaBroker::start().await;
    broker.create_topics(&[("chatwoot.ordered", 3)]).await;
    let mut sink = sink(
        "kafka",
        &format!(
            "{{ type: kafka, brokers: '{}', topic: 'chatwoot.{{data.stream}}' }}",
            broker.bootstrap()
        ),
    )
    .await;
    // Four conversations interleaved, plus an event without a conversation (keyed by its id).
    let mut batch = Vec::new();
    for seq in 0..40u32 {
        let conversation = 100 + seq % 4;
        batch.push(event(
            1000 + seq as u128,
            "message.created",
            &format!(
                r#"{{"account_id":7,"conversation_id":{conversation},"seq":{seq},"stream":"ordered"}}"#
            ),
        ));
    }
    batch.push(event(
        2000,
        "contact.updated",
        r#"{"account_id":7,"id":1,"stream":"ordered"}"#,
    ));
    // No `stream` field: the topic cannot be rendered; permanent, and the rest still goes.
    batch.push(event(2001, "message.created", r#"{"account_id":7}"#));
    let outcomes = deliver(&mut sink, &batch).await;
    let kinds: Vec<&str> = outcomes.iter().map(kind).collect();
    assert!(
        kinds[..41].iter().all(|k| *k == "delivered"),
        "{outcomes:?}"
    );
    assert_eq!(kinds[41], "permanent");

    let consumer = broker.consumer("chatwoot.ordered", 3);
    let mut by_key: HashMap<String, Vec<(i32, u64)>> = HashMap::new();
    let mut read = 0;
    let mut stream = consumer.stream();
    while read < 41 {
        let what = format!("record {} of 41", read + 1);
        let message = within(&what, stream.next())
            .await
            .unwrap()
            .expect("consume");
        read += 1;
        let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
        let value: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        let headers = kafka_headers(&message);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["ce_specversion"], "1.0");
        assert_eq!(headers["ce_chatwootaccount"], "7");
        if key.contains(':') {
            let seq = value["seq"].as_u64().unwrap();
            assert_eq!(key, format!("7:{}", value["conversation_id"]));
            assert_eq!(
                headers["ce_subject"],
                format!("conversation/{}", value["conversation_id"])
            );
            assert_eq!(headers["ce_id"], format!("{:032x}", 1000 + seq));
            by_key
                .entry(key)
                .or_default()
                .push((message.partition(), seq));
        } else {
            assert_eq!(key, format!("{:032x}", 2000));
            assert_eq!(headers["ce_type"], "com.chatwoot.contact.updated");
            assert!(!headers.contains_key("ce_subject"));
        }
    }
    assert_eq!(by_key.len(), 4);
    let mut partitions = std::collections::BTreeSet::new();
    for (key, records) in &by_key {
        assert_eq!(records.len(), 10, "{key}");
        assert!(
            records.iter().all(|(p, _)| *p == records[0].0),
            "{key} spread over partitions: {records:?}"
        );
        partitions.insert(records[0].0);
        let seqs: Vec<u64> = records.iter().map(|(_, s)| *s).collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted, "{key} out of order");
    }
    assert!(
        partitions.len() > 1,
        "four conversations all landed on one partition; the key is not used"
    );
    within("the sink to close", sink.close()).await;
}

#[tokio::test]
async fn kafka_sink_builds_without_a_broker_and_reports_no_delivery() {
    let port = free_port();
    let started = Instant::now();
    let mut sink = sink(
        "kafka",
        &format!(
            "{{ type: kafka, brokers: '127.0.0.1:{port}', topic: t, librdkafka: {{ message.timeout.ms: '1500', sasl.password: hunter2 }} }}"
        ),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "building must not wait for a broker"
    );
    let outcomes = deliver(&mut sink, &[event(1, "x", r#"{"a":1}"#)]).await;
    // Not confirmed by a broker, so not delivered; a timeout is worth retrying.
    assert_eq!(kind(&outcomes[0]), "retryable", "{outcomes:?}");
    let Outcome::Retryable(e) = &outcomes[0] else {
        unreachable!()
    };
    assert!(!e.message.contains("hunter2"));
}

#[tokio::test]
async fn kafka_queue_full_slows_the_sink_down_instead_of_failing_events() {
    let broker = KafkaBroker::start().await;
    broker.create_topics(&[("cw-small-queue", 1)]).await;
    // librdkafka holds at most 4 records locally: a 60-event batch must wait for room.
    let mut sink = sink(
        "kafka",
        &format!(
            "{{ type: kafka, brokers: '{}', topic: cw-small-queue, librdkafka: {{ queue.buffering.max.messages: '4' }} }}",
            broker.bootstrap()
        ),
    )
    .await;
    let batch: Vec<Arc<Event>> = (0..60u32)
        .map(|n| {
            event(
                3000 + n as u128,
                "message.created",
                &format!(r#"{{"account_id":1,"conversation_id":9,"n":{n}}}"#),
            )
        })
        .collect();
    let outcomes = deliver(&mut sink, &batch).await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Delivered)),
        "{outcomes:?}"
    );
    let consumer = broker.consumer("cw-small-queue", 1);
    let mut stream = consumer.stream();
    for n in 0..60u64 {
        let m = within(&format!("record {n}"), stream.next())
            .await
            .unwrap()
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(value["n"].as_u64(), Some(n), "records out of order");
    }
}

#[tokio::test]
async fn kafka_unknown_topic_and_oversized_record_are_permanent() {
    let broker = KafkaBroker::start().await;
    broker.create_topics(&[("cw.exists", 1)]).await;
    // Short metadata propagation so the missing topic is reported within a second.
    let mut sink = sink(
        "kafka",
        &format!(
            "{{ type: kafka, brokers: '{}', topic: 'cw.{{data.t}}', librdkafka: {{ topic.metadata.propagation.max.ms: '1000' }} }}",
            broker.bootstrap()
        ),
    )
    .await;
    let batch = [
        event(1, "message.created", r#"{"t":"missing"}"#),
        event(
            2,
            "message.created",
            &format!(r#"{{"t":"exists","pad":"{}"}}"#, "a".repeat(2_000_000)),
        ),
        event(3, "message.created", r#"{"t":"exists"}"#),
    ];
    let outcomes = deliver(&mut sink, &batch).await;
    let kinds: Vec<&str> = outcomes.iter().map(kind).collect();
    assert_eq!(
        kinds,
        ["permanent", "permanent", "delivered"],
        "{outcomes:?}"
    );
    let Outcome::Permanent(missing) = &outcomes[0] else {
        unreachable!()
    };
    assert!(missing.message.contains("UnknownTopic"), "{missing}");
    let Outcome::Permanent(large) = &outcomes[1] else {
        unreachable!()
    };
    assert!(large.message.contains("MessageSizeTooLarge"), "{large}");
}

#[tokio::test]
async fn kafka_structured_envelope() {
    let broker = KafkaBroker::start().await;
    broker.create_topics(&[("cw-structured", 1)]).await;
    let mut sink = sink(
        "kafka",
        &format!(
            "{{ type: kafka, brokers: ['{}'], topic: cw-structured, key: '{{token}}-{{event}}', envelope: structured }}",
            broker.bootstrap()
        ),
    )
    .await;
    let e = event(
        5,
        "conversation.status_changed",
        r#"{"account_id":2,"id":9,"status":"resolved"}"#,
    );
    let outcomes = deliver(&mut sink, std::slice::from_ref(&e)).await;
    assert_eq!(kind(&outcomes[0]), "delivered", "{outcomes:?}");
    let consumer = broker.consumer("cw-structured", 1);
    let message = within("the record", consumer.recv()).await.unwrap();
    assert_eq!(
        message.key(),
        Some(&b"agent-conversation.status_changed"[..])
    );
    let headers = kafka_headers(&message);
    assert_eq!(headers.len(), 1, "{headers:?}");
    assert_eq!(headers["content-type"], "application/cloudevents+json");
    let ce: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
    assert_eq!(ce["type"], "com.chatwoot.conversation.status_changed");
    assert_eq!(ce["subject"], "conversation/9");
    assert_eq!(ce["data"]["status"], "resolved");
}

// ---------------------------------------------------------------------------------------------
// check --connect

#[tokio::test]
async fn probes_reach_real_servers_and_name_what_is_missing() {
    let (nats, broker) = tokio::join!(NatsServer::start(), KafkaBroker::start());
    broker.create_topics(&[("cw-probe", 1)]).await;
    let receiver = within("the receiver to start", Receiver::start(scripted(vec![]))).await;
    let dead = free_port();
    let probe = |yaml: String| async move {
        let kind = sink_kind("probe", &yaml);
        within("the probe", Sink::probe("probe", &kind)).await
    };
    let kafka = |topic: &str, brokers: &str| {
        format!("{{ type: kafka, brokers: '{brokers}', topic: {topic} }}")
    };
    let nats_sink =
        |url: &str, js: &str| format!("{{ type: nats, url: '{url}', subject: 'p.{{event}}'{js} }}");
    let (
        kafka_ok,
        kafka_missing_topic,
        kafka_templated,
        kafka_down,
        nats_ok,
        nats_missing_stream,
        nats_down,
        http_ok,
        http_down,
    ) = tokio::join!(
        probe(kafka("cw-probe", &broker.bootstrap())),
        probe(kafka("cw-nope", &broker.bootstrap())),
        probe(kafka("'cw.{event}'", &broker.bootstrap())),
        probe(kafka("cw-probe", &format!("127.0.0.1:{dead}"))),
        probe(nats_sink(
            &nats.url(),
            ", jetstream: { stream: AUTO, create: true }"
        )),
        probe(nats_sink(&nats.url(), ", jetstream: { stream: MISSING }")),
        probe(nats_sink(&format!("nats://127.0.0.1:{dead}"), "")),
        probe(format!(
            "{{ type: http, url: '{}' }}",
            receiver.url("/{event}")
        )),
        probe(format!(
            "{{ type: http, url: 'http://127.0.0.1:{dead}/x' }}"
        )),
    );
    assert_eq!(kafka_ok, Ok(()));
    assert!(
        kafka_missing_topic
            .as_ref()
            .unwrap_err()
            .contains("cw-nope"),
        "{kafka_missing_topic:?}"
    );
    assert_eq!(
        kafka_templated,
        Ok(()),
        "a templated topic is not looked up"
    );
    assert!(
        kafka_down.as_ref().unwrap_err().contains("cannot reach"),
        "{kafka_down:?}"
    );
    assert_eq!(nats_ok, Ok(()));
    assert!(
        nats_missing_stream
            .as_ref()
            .unwrap_err()
            .contains("MISSING"),
        "{nats_missing_stream:?}"
    );
    assert!(
        nats_down.as_ref().unwrap_err().contains("no answer"),
        "{nats_down:?}"
    );
    assert_eq!(http_ok, Ok(()));
    assert!(
        http_down.as_ref().unwrap_err().contains("cannot connect"),
        "{http_down:?}"
    );
    assert!(
        receiver.received().is_empty(),
        "a probe must not deliver anything"
    );
}

// ---------------------------------------------------------------------------------------------
// Config

#[test]
fn sink_config_problems_name_their_keys_and_hide_secrets() {
    let yaml = r#"
chatwoot: { url: "ws://127.0.0.1:1/cable" }
tokens: [{ name: agent, pubsub_token: t }]
sinks:
  kafka-main:
    type: kafka
    brokers: "127.0.0.1:9092"
    topic: "chatwoot.{acount_id}"
    librdkafka: { sasl.password: kafka-pw-123 }
  nats-main:
    type: nats
    url: "nats://127.0.0.1:4222"
    subject: "chatwoot.{event"
    password: nats-pw-123
  hook:
    type: http
    url: "https://hooks.example.com/{event}"
    secret: "not-a-whsec-secret-123"
    headers: { Authorization: "Bearer header-secret-123" }
routes:
  - { name: all, match: {}, to: [kafka-main, nats-main, hook] }
"#;
    let err = chatwoot_bridge::config::Config::from_yaml(yaml, &|_| None, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sinks.kafka-main.topic: unknown template field {acount_id}"),
        "{err}"
    );
    assert!(
        err.contains("sinks.nats-main.subject: unbalanced braces"),
        "{err}"
    );
    assert!(
        err.contains("sinks.nats-main.user: `password` needs `user`"),
        "{err}"
    );
    assert!(
        err.contains("sinks.hook.secret: must start with `whsec_`"),
        "{err}"
    );
    assert!(
        !err.contains("routes[0]"),
        "known sinks are not reported as unknown: {err}"
    );
    for secret in [
        "kafka-pw-123",
        "nats-pw-123",
        "not-a-whsec",
        "header-secret-123",
    ] {
        assert!(!err.contains(secret), "{secret} leaked: {err}");
    }

    // The same sinks, fixed: valid, and Debug output of the whole config hides every secret.
    let fixed = yaml
        .replace("{acount_id}", "{account_id}")
        .replace("{event\"", "{event}\"")
        .replace(
            "password: nats-pw-123",
            "user: bridge\n    password: nats-pw-123",
        )
        .replace(
            "\"not-a-whsec-secret-123\"",
            "[whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw]",
        );
    let config = chatwoot_bridge::config::Config::from_yaml(&fixed, &|_| None, false)
        .unwrap_or_else(|e| panic!("{e}\n{fixed}"));
    let dump = format!("{config:?}");
    for secret in [
        "kafka-pw-123",
        "nats-pw-123",
        "MfKQ9r8",
        "header-secret-123",
    ] {
        assert!(!dump.contains(secret), "{secret} leaked: {dump}");
    }
}

// ---------------------------------------------------------------------------------------------
// Everything at once, from the mock Chatwoot.

/// How many events [`broadcast_mixed`] sends.
const MIXED: u64 = 24;

/// Every event to a Kafka topic per event name, to JetStream (stream CHATWOOT) and to a webhook
/// signed with two secrets.
fn three_sinks(bridge: BridgeYaml, brokers: &str, nats: &str, hook: &str) -> BridgeYaml {
    bridge
        .sink(
            "kafka-main",
            &format!(
                "{{ type: kafka, brokers: '{brokers}', topic: 'chatwoot.{{event}}', librdkafka: {{ linger.ms: '5' }} }}"
            ),
        )
        .sink(
            "nats-js",
            &format!(
                "{{ type: nats, url: '{nats}', subject: 'chatwoot.{{account_id}}.{{event}}', jetstream: {{ stream: CHATWOOT, create: true, duplicate_window: 2h }} }}"
            ),
        )
        .sink(
            "hook",
            &format!(
                "{{ type: http, url: '{hook}', secret: [{SECRET}, whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24=], max_in_flight: 4 }}"
            ),
        )
        .route_all(&["kafka-main", "nats-js", "hook"])
}

/// Broadcasts [`MIXED`] events numbered `n`, every third a status change, in two
/// conversations; returns each one's name and data, indexed by `n`.
fn broadcast_mixed(mock: &MockServer) -> Vec<(&'static str, String)> {
    let mut sent = Vec::new();
    for i in 0..MIXED {
        let (name, data) = if i % 3 == 2 {
            (
                "conversation.status_changed",
                format!(
                    r#"{{"id":{},"account_id":1,"inbox_id":2,"status":"open","n":{i}}}"#,
                    50 + i % 2
                ),
            )
        } else {
            (
                "message.created",
                format!(
                    r#"{{"id":{i},"account_id":1,"inbox_id":2,"conversation_id":{},"content":"m {i}","n":{i}}}"#,
                    50 + i % 2
                ),
            )
        };
        mock.broadcast(name, &data);
        sent.push((name, data));
    }
    sent
}

/// Webhook: every event, signed, at the event's path, data byte for byte. Returns the id of
/// each event by its `n`.
async fn check_webhook(
    receiver: &Receiver,
    sent: &[(&str, String)],
    cable_url: &str,
) -> HashMap<u64, String> {
    let hooks = receiver.wait_for(MIXED as usize).await;
    assert_eq!(hooks.len(), MIXED as usize);
    let mut ids_by_n: HashMap<u64, String> = HashMap::new();
    for r in &hooks {
        verify_signature(r);
        assert_eq!(
            r.headers["webhook-signature"]
                .to_str()
                .unwrap()
                .split(' ')
                .count(),
            2,
            "one signature per secret"
        );
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let n = body["n"].as_u64().unwrap();
        let (name, data) = &sent[n as usize];
        assert_eq!(r.path, format!("/chatwoot/{name}"));
        assert_eq!(&r.body[..], data.as_bytes());
        assert_eq!(r.headers["ce-type"], format!("com.chatwoot.{name}"));
        assert_eq!(
            r.headers["ce-subject"],
            format!("conversation/{}", 50 + n % 2)
        );
        let source = r.headers["ce-source"].to_str().unwrap();
        assert_eq!(source, format!("{cable_url}#agent"));
        ids_by_n.insert(n, r.headers["webhook-id"].to_str().unwrap().to_owned());
    }
    assert_eq!(ids_by_n.len(), MIXED as usize);
    ids_by_n
}

/// JetStream: every event once, on its subject, with the same id as at the webhook.
async fn check_jetstream(
    nats: &NatsServer,
    sent: &[(&str, String)],
    ids_by_n: &HashMap<u64, String>,
) {
    let js = async_nats::jetstream::new(nats.client().await);
    let stream = within("the stream", js.get_stream("CHATWOOT"))
        .await
        .unwrap();
    wait_until_async(&format!("{MIXED} messages in the stream"), || {
        let mut stream = stream.clone();
        async move {
            stream
                .info()
                .await
                .map(|i| i.state.messages == MIXED)
                .unwrap_or(false)
        }
    })
    .await;
    for seq in 1..=MIXED {
        let m = within(
            &format!("stored message {seq}"),
            stream.get_raw_message(seq),
        )
        .await
        .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let n = body["n"].as_u64().unwrap();
        let (name, data) = &sent[n as usize];
        assert_eq!(m.subject.as_str(), format!("chatwoot.1.{name}"));
        assert_eq!(&m.payload[..], data.as_bytes());
        let id = m.headers.get("ce-id").unwrap().as_str();
        assert_eq!(id, ids_by_n[&n]);
        assert_eq!(
            m.headers.get("Nats-Msg-Id").unwrap().as_str(),
            format!("{id}:{}", m.subject)
        );
    }
}

/// Kafka: every event on its event's topic, keyed by account and conversation, with the same id
/// as at the webhook.
async fn check_kafka(
    broker: &KafkaBroker,
    sent: &[(&str, String)],
    ids_by_n: &HashMap<u64, String>,
    cable_url: &str,
) {
    for (topic, expected) in [
        ("chatwoot.message.created", MIXED - MIXED / 3),
        ("chatwoot.conversation.status_changed", MIXED / 3),
    ] {
        let consumer = broker.consumer(topic, 2);
        let mut stream = consumer.stream();
        for i in 0..expected {
            let m = within(&format!("record {} of {topic}", i + 1), stream.next())
                .await
                .unwrap()
                .unwrap();
            let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let n = value["n"].as_u64().unwrap();
            let (name, data) = &sent[n as usize];
            assert_eq!(topic, format!("chatwoot.{name}"));
            assert_eq!(m.payload().unwrap(), data.as_bytes());
            assert_eq!(m.key().unwrap(), format!("1:{}", 50 + n % 2).as_bytes());
            let headers = kafka_headers(&m);
            assert_eq!(headers["ce_id"], ids_by_n[&n]);
            assert_eq!(headers["ce_chatwootevent"], *name);
            assert_eq!(headers["ce_chatwoottoken"], "agent");
            assert_eq!(headers["ce_source"], format!("{cable_url}#agent"));
        }
    }
}

#[tokio::test]
async fn one_stream_to_kafka_jetstream_and_a_signed_webhook() {
    let (nats, broker) = tokio::join!(NatsServer::start(), KafkaBroker::start());
    broker
        .create_topics(&[
            ("chatwoot.message.created", 2),
            ("chatwoot.conversation.status_changed", 2),
        ])
        .await;
    let receiver = within("the receiver to start", Receiver::start(scripted(vec![]))).await;
    let mock = agent_mock().await;
    let spool = tempfile::tempdir().unwrap();
    let config = three_sinks(
        bridge_yaml(&mock.url(), spool.path()),
        &broker.bootstrap(),
        &nats.url(),
        &receiver.url("/chatwoot/{event}"),
    )
    .config();
    let bridge = start_subscribed(config, &mock).await;

    let sent = broadcast_mixed(&mock);
    let ids_by_n = check_webhook(&receiver, &sent, &mock.url()).await;
    check_jetstream(&nats, &sent, &ids_by_n).await;
    check_kafka(&broker, &sent, &ids_by_n, &mock.url()).await;

    let report = shut_down(bridge).await;
    assert_eq!(report.drain, Drain::CaughtUp);
    within("the mock Chatwoot to stop", mock.stop()).await;
}
