//! A conversation whose events a destination keeps refusing is set aside (parked) after the
//! sink's `retry.park_after`: the sink's other conversations flow and its cursor moves on, the
//! parked conversation's later events wait behind it in order, on disk, across restarts.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chatwoot_bridge::mock::{Answer as MockAnswer, MockConfig, MockServer};
use chatwoot_bridge::{Bridge, Drain};
use hyper::StatusCode;
use support::{
    mock_token, quoted, shut_down, start_mock, wait_until, wait_until_async, wait_until_explained,
    within, BridgeYaml, NatsServer, Received, Receiver, Responder,
};

/// The conversation the receiver refuses while told to.
const REFUSED: u64 = 7;

/// `(conversation, n)` of every request the receiver saw or accepted, in arrival order.
type Seen = Arc<Mutex<Vec<(u64, u64)>>>;

/// A webhook receiver answering 500 to conversation [`REFUSED`] while `refusing` holds, 200 to
/// everything else. Returns it with every request seen and every request accepted.
async fn picky_receiver(refusing: Arc<AtomicBool>) -> (Receiver, Seen, Seen) {
    let (seen, accepted): (Seen, Seen) = (Arc::default(), Arc::default());
    let (record_seen, record_accepted) = (seen.clone(), accepted.clone());
    let responder: Responder = Arc::new(move |r: &Received, _| {
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let numbers = (
            body["conversation_id"].as_u64().unwrap(),
            body["n"].as_u64().unwrap(),
        );
        record_seen.lock().unwrap().push(numbers);
        if numbers.0 == REFUSED && refusing.load(Ordering::Relaxed) {
            return (StatusCode::INTERNAL_SERVER_ERROR, vec![]);
        }
        record_accepted.lock().unwrap().push(numbers);
        (StatusCode::OK, vec![])
    });
    (Receiver::start(responder).await, seen, accepted)
}

/// A mock Chatwoot confirming the agent token of [`config`].
async fn agent_mock() -> MockServer {
    start_mock(MockConfig {
        tokens: vec![mock_token("tok-agent", MockAnswer::Confirm)],
        ..MockConfig::default()
    })
    .await
}

/// One webhook sink `hook` with fast retries and a short `park_after`, every event routed to it.
fn config(mock: &MockServer, receiver: &Receiver, spool: &std::path::Path) -> BridgeYaml {
    let hook = format!(
        "{{ type: http, url: {}, max_in_flight: 4, retry: {{ initial: 50ms, max: 100ms, park_after: 300ms }} }}",
        quoted(receiver.url("/in"))
    );
    BridgeYaml::new(&mock.url())
        .cable("reconnect: { initial: 50ms, max: 200ms }")
        .agent("agent", "tok-agent", 1)
        .spool(spool)
        .setting("shutdown_timeout: 5s")
        .sink("hook", &hook)
        .route_all(&["hook"])
}

/// Broadcasts message `n` of `conversation`.
fn broadcast(mock: &MockServer, conversation: u64, n: u64) {
    mock.broadcast(
        "message.created",
        &format!(r#"{{"account_id":1,"conversation_id":{conversation},"n":{n}}}"#),
    );
}

/// The `n` of the requests of `conversation` in `seen`, in arrival order, each once.
fn numbers_of(seen: &Seen, conversation: u64) -> Vec<u64> {
    let mut numbers = Vec::new();
    for &(c, n) in seen.lock().unwrap().iter() {
        if c == conversation && !numbers.contains(&n) {
            numbers.push(n);
        }
    }
    numbers
}

/// The events `sink` has set aside, as its status says.
fn parked_in(bridge: &Bridge, sink: &str) -> u64 {
    bridge.status().sink(sink).unwrap().parked
}

/// The seq `sink`'s cursor is committed up to.
fn committed_in(bridge: &Bridge, sink: &str) -> u64 {
    bridge.spool().reader(sink).unwrap().position()
}

/// The events `hook` has set aside.
fn parked(bridge: &Bridge) -> u64 {
    parked_in(bridge, "hook")
}

/// The seq `hook`'s cursor is committed up to.
fn committed(bridge: &Bridge) -> u64 {
    committed_in(bridge, "hook")
}

#[tokio::test]
async fn a_refused_conversation_is_parked_while_the_others_flow_and_the_cursor_moves_on() {
    let refusing = Arc::new(AtomicBool::new(true));
    let (receiver, seen, accepted) = picky_receiver(refusing.clone()).await;
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = Bridge::start(config(&mock, &receiver, dir.path()).config())
        .await
        .unwrap();
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    // The refused conversation's first event, then its later ones among other conversations'.
    broadcast(&mock, REFUSED, 0);
    wait_until("the first refusal", || !seen.lock().unwrap().is_empty()).await;
    let mut others = BTreeSet::new();
    let mut refused_later = vec![0];
    for n in 1..=60 {
        if n % 10 == 0 {
            broadcast(&mock, REFUSED, n);
            refused_later.push(n);
        } else {
            broadcast(&mock, 100 + n, n);
            others.insert(n);
        }
    }
    let total = 61;
    wait_until_explained(
        "every other conversation's events delivered",
        || {
            let delivered: BTreeSet<u64> = accepted.lock().unwrap().iter().map(|x| x.1).collect();
            others.is_subset(&delivered)
        },
        || format!("accepted: {:?}", accepted.lock().unwrap()),
    )
    .await;
    wait_until_explained(
        "the cursor past every event",
        || committed(&bridge) >= total,
        || format!("committed up to {}", committed(&bridge)),
    )
    .await;
    wait_until("the status shows the parked events", || {
        parked(&bridge) == refused_later.len() as u64
    })
    .await;
    assert_eq!(
        numbers_of(&seen, REFUSED),
        [0],
        "nothing of the refused conversation overtook its first event"
    );

    refusing.store(false, Ordering::Relaxed);
    wait_until_explained(
        "the parked conversation delivered",
        || numbers_of(&accepted, REFUSED).len() == refused_later.len(),
        || format!("accepted: {:?}", numbers_of(&accepted, REFUSED)),
    )
    .await;
    assert_eq!(numbers_of(&accepted, REFUSED), refused_later, "in order");
    wait_until("nothing parked", || parked(&bridge) == 0).await;
    // Unparked: the conversation's new events go straight through again.
    broadcast(&mock, REFUSED, 61);
    wait_until("a new event of it delivered", || {
        numbers_of(&accepted, REFUSED).contains(&61)
    })
    .await;
    let report = shut_down(bridge).await;
    assert_eq!(report.drain, Drain::CaughtUp);
    mock.stop().await;
    assert!(
        !dir.path().join("parked/hook.jsonl").exists(),
        "an empty retry set leaves no file"
    );
}

#[tokio::test]
async fn parked_events_survive_a_restart_and_go_out_in_order() {
    let refusing = Arc::new(AtomicBool::new(true));
    let (receiver, seen, accepted) = picky_receiver(refusing.clone()).await;
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = config(&mock, &receiver, dir.path());
    let bridge = Bridge::start(yaml.config()).await.unwrap();
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    broadcast(&mock, REFUSED, 0);
    wait_until("the first refusal", || !seen.lock().unwrap().is_empty()).await;
    broadcast(&mock, REFUSED, 1);
    broadcast(&mock, 8, 2);
    broadcast(&mock, REFUSED, 3);
    wait_until("the other conversation delivered", || {
        numbers_of(&accepted, 8) == [2]
    })
    .await;
    wait_until("three events parked", || parked(&bridge) == 3).await;
    wait_until("the cursor past them", || committed(&bridge) >= 4).await;
    shut_down(bridge).await;
    let file = std::fs::read_to_string(dir.path().join("parked/hook.jsonl")).unwrap();
    assert_eq!(file.lines().count(), 3, "{file}");

    // The next start takes them from the parked file: the spool's cursor is past them.
    refusing.store(false, Ordering::Relaxed);
    let bridge = Bridge::start(yaml.config()).await.unwrap();
    wait_until_explained(
        "the parked events delivered after the restart",
        || numbers_of(&accepted, REFUSED).len() == 3,
        || format!("accepted: {:?}", accepted.lock().unwrap()),
    )
    .await;
    assert_eq!(numbers_of(&accepted, REFUSED), [0, 1, 3], "in order");
    wait_until("nothing parked", || parked(&bridge) == 0).await;
    shut_down(bridge).await;
    mock.stop().await;
    let conversation_8 = accepted.lock().unwrap().iter().filter(|x| x.0 == 8).count();
    assert_eq!(conversation_8, 1, "nothing else was sent again");
}

/// Every message of JetStream `stream`, in stored order: its subject and the `n` of its data.
async fn stored(nats: &NatsServer, stream: &str) -> Vec<(String, u64)> {
    nats.stored_messages(stream)
        .await
        .into_iter()
        .map(|(subject, data)| (subject, data["n"].as_u64().unwrap()))
        .collect()
}

/// The same on a sink that keeps order itself and is handed batches ahead of their acks: a
/// JetStream stream that does not take one conversation's subject (`no responders`, retryable).
#[tokio::test]
async fn a_pipelined_sink_parks_a_refused_conversation_and_keeps_its_order() {
    let nats = NatsServer::start().await;
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = async_nats::jetstream::stream::Config {
        name: "PARK".into(),
        subjects: vec!["ev.8".into(), "ev.9".into()],
        ..Default::default()
    };
    within("the stream created", js.create_stream(stream.clone()))
        .await
        .unwrap();
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "{{ type: nats, url: '{}', subject: 'ev.{{conversation_id}}', timeout: 500ms, retry: {{ initial: 50ms, max: 100ms, park_after: 300ms }}, jetstream: {{ stream: PARK }} }}",
        nats.url()
    );
    let config = BridgeYaml::new(&mock.url())
        .cable("reconnect: { initial: 50ms, max: 200ms }")
        .agent("agent", "tok-agent", 1)
        .spool(dir.path())
        .setting("shutdown_timeout: 5s")
        .sink("js", &sink)
        .route_all(&["js"])
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    broadcast(&mock, REFUSED, 0);
    wait_until("the first refusal", || {
        bridge.status().sink("js").unwrap().retries > 0
    })
    .await;
    let mut refused = vec![0];
    for n in 1..=40 {
        match n % 10 {
            0 => {
                broadcast(&mock, REFUSED, n);
                refused.push(n);
            }
            odd if odd % 2 == 1 => broadcast(&mock, 8, n),
            _ => broadcast(&mock, 9, n),
        }
    }
    wait_until_async("the other conversations stored", || async {
        stored(&nats, "PARK").await.len() == 36
    })
    .await;
    wait_until("the refused conversation parked", || {
        parked_in(&bridge, "js") == refused.len() as u64
    })
    .await;
    wait_until("the cursor past every event", || {
        committed_in(&bridge, "js") >= 41
    })
    .await;

    stream.subjects.push(format!("ev.{REFUSED}"));
    within("the stream updated", js.update_stream(stream))
        .await
        .unwrap();
    wait_until_async("every event stored", || async {
        stored(&nats, "PARK").await.len() == 41
    })
    .await;
    let messages = stored(&nats, "PARK").await;
    let of = |subject: &str| -> Vec<u64> {
        messages
            .iter()
            .filter(|(s, _)| s == subject)
            .map(|(_, n)| *n)
            .collect()
    };
    assert_eq!(of(&format!("ev.{REFUSED}")), refused, "in order, once each");
    let others: Vec<u64> = [of("ev.8"), of("ev.9")].concat();
    assert_eq!(others.len(), 36, "each once");
    wait_until("nothing parked", || parked_in(&bridge, "js") == 0).await;
    shut_down(bridge).await;
    mock.stop().await;
}
