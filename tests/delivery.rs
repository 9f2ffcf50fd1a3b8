//! At-least-once delivery against real receivers (HTTP, nats-server): outages, permanent
//! failures and dead letters, a full spool.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatwoot_bridge::delivery::dead_letter::DeadLetters;
use chatwoot_bridge::mock::{Answer as MockAnswer, MockConfig, MockServer, MockToken};
use chatwoot_bridge::{Bridge, Drain, Persistence};
use futures_util::StreamExt;
use hyper::StatusCode;
use support::{
    free_port, mock_token, padded_letters, quoted, replay_progress_written, scripted, shut_down,
    start_mock, wait_until, wait_until_explained, within, BridgeYaml, NatsServer, Received,
    Receiver, Responder,
};

/// An event the receiver answered 200: its sequence number and conversation subject.
type Accepted = (u64, Option<String>);

/// The mock Chatwoot's side of the agent token of [`bridge_yaml`], confirmed.
fn agent() -> Vec<MockToken> {
    vec![mock_token("tok-agent", MockAnswer::Confirm)]
}

/// A mock Chatwoot that confirms the agent token.
async fn agent_mock() -> MockServer {
    start_mock(MockConfig {
        tokens: agent(),
        ..MockConfig::default()
    })
    .await
}

/// Once subscribed, broadcasts `total` message events numbered `n` (each its own conversation)
/// and waits until all are in the spool.
async fn spool_numbered(bridge: &Bridge, mock: &MockServer, total: usize) {
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    for n in 0..total {
        mock.broadcast(
            "message.created",
            &format!(r#"{{"account_id":1,"conversation_id":{n},"n":{n}}}"#),
        );
    }
    wait_until("all spooled", || {
        bridge.stats().spooled.load(Ordering::Relaxed) == total as u64
    })
    .await;
}

/// A config reading the agent token from `cable`, fast reconnects, the spool in `spool`, a 5 s
/// shutdown window; no sinks or routes yet.
fn bridge_yaml(cable: &str, spool: &std::path::Path) -> BridgeYaml {
    BridgeYaml::new(cable)
        .cable("reconnect: { initial: 50ms, max: 200ms }")
        .agent("agent", "tok-agent", 1)
        .spool(spool)
        .setting("shutdown_timeout: 5s")
}

/// [`bridge_yaml`] with the one sink `name` (the YAML of its `sinks:` entry) and a route of
/// every event to it.
fn one_sink(cable: &str, spool: &std::path::Path, name: &str, sink: &str) -> BridgeYaml {
    bridge_yaml(cable, spool)
        .sink(name, sink)
        .route_all(&[name])
}

/// The `n` of the next `count` messages of `subscription`, in arrival order.
async fn next_numbered(subscription: &mut async_nats::Subscriber, count: usize) -> Vec<u64> {
    let mut numbers = Vec::with_capacity(count);
    while numbers.len() < count {
        let what = format!("message {} of {count}", numbers.len() + 1);
        let message = within(&what, subscription.next()).await.unwrap();
        let data: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        numbers.push(data["n"].as_u64().unwrap());
    }
    numbers
}

/// The number under `key` in each message's data, in the order `stream` stored them.
async fn stored_numbers(nats: &NatsServer, stream: &str, key: &str) -> Vec<u64> {
    nats.stored_messages(stream)
        .await
        .into_iter()
        .map(|(_, data)| {
            data[key]
                .as_u64()
                .unwrap_or_else(|| panic!("no {key} in {data}"))
        })
        .collect()
}

/// Broadcasts generated events, `step` every 5 ms, until `done()` or `limit` events; returns
/// how many. Paced here rather than by the mock's own timer, which on a starved machine
/// catches up in bursts: a test that must act mid-stream acts in `done`, between two steps.
async fn stream_generated(
    mock: &MockServer,
    step: u64,
    limit: u64,
    mut done: impl FnMut() -> bool,
) -> u64 {
    let mut sent = 0;
    while sent < limit && !done() {
        let now = step.min(limit - sent);
        for _ in 0..now {
            mock.broadcast_generated();
        }
        sent += now;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sent
}

fn seq_of(r: &Received) -> u64 {
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    body["mock_seq"]
        .as_u64()
        .expect("generated events carry mock_seq")
}

#[tokio::test]
async fn a_webhook_outage_loses_nothing_and_keeps_conversation_order() {
    const TOTAL: u64 = 400;
    let down = Arc::new(AtomicBool::new(true));
    let is_down = down.clone();
    // (seq, conversation subject) of every request answered 200, in answer order.
    let accepted: Arc<Mutex<Vec<Accepted>>> = Arc::default();
    let record = accepted.clone();
    let responder: Responder = Arc::new(move |r: &Received, _| {
        if is_down.load(Ordering::Relaxed) {
            return (StatusCode::SERVICE_UNAVAILABLE, vec![]);
        }
        let subject = r
            .headers
            .get("ce-subject")
            .map(|s| s.to_str().unwrap().to_owned());
        record.lock().unwrap().push((seq_of(r), subject));
        (StatusCode::OK, vec![])
    });
    let receiver = Receiver::start(responder).await;
    let mock = start_mock(MockConfig {
        tokens: agent(),
        rate: 200.0,
        count: Some(TOTAL),
        wait_for_subscriptions: 1,
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let hook = format!(
        "{{ type: http, url: {}, max_in_flight: 8, retry: {{ initial: 100ms, max: 400ms }} }}",
        quoted(receiver.url("/events"))
    );
    let config = one_sink(&mock.url(), dir.path(), "hook", &hook).config();
    let bridge = Bridge::start(config).await.unwrap();
    // The endpoint answers 503 while the whole stream arrives, then recovers.
    wait_until("the whole stream in the spool", || {
        bridge.stats().spooled.load(Ordering::Relaxed) >= TOTAL
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = receiver.received().len();
    assert!(refused > 0, "the sink kept trying during the outage");
    let hook = bridge.status().sink("hook").unwrap();
    assert_eq!(hook.state, chatwoot_bridge::status::SinkState::Retrying);
    assert!(
        hook.last_error.unwrap().contains("503"),
        "the status says why"
    );
    down.store(false, Ordering::Relaxed);
    wait_until("every event accepted", || {
        bridge.stats().delivered.load(Ordering::Relaxed) >= TOTAL
    })
    .await;
    let report = shut_down(bridge).await;
    assert_eq!(report.drain, Drain::CaughtUp);
    mock.stop().await;

    let accepted = accepted.lock().unwrap().clone();
    let distinct: BTreeSet<u64> = accepted.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        distinct,
        (0..TOTAL).collect::<BTreeSet<_>>(),
        "nothing lost"
    );
    // Each conversation's events arrive in the order they were received. The generated events
    // cycle through the fixtures; those of conversation 87 must come in increasing order.
    let conversation_87: Vec<u64> = accepted
        .iter()
        .filter(|(_, subject)| subject.as_deref() == Some("conversation/87"))
        .map(|(seq, _)| *seq)
        .collect();
    assert!(conversation_87.len() > TOTAL as usize / 2);
    let mut first_seen = Vec::new();
    for seq in &conversation_87 {
        if !first_seen.contains(seq) {
            first_seen.push(*seq);
        }
    }
    assert!(
        first_seen.windows(2).all(|w| w[0] < w[1]),
        "conversation order broken: {first_seen:?}"
    );
}

#[tokio::test]
async fn a_refused_event_goes_to_dead_letters_and_replay_delivers_it() {
    let accept_poison = Arc::new(AtomicBool::new(false));
    let accept = accept_poison.clone();
    let responder: Responder = Arc::new(move |r: &Received, _| {
        let poison = String::from_utf8_lossy(&r.body).contains("poison");
        if poison && !accept.load(Ordering::Relaxed) {
            (StatusCode::BAD_REQUEST, vec![])
        } else {
            (StatusCode::OK, vec![])
        }
    });
    let receiver = Receiver::start(responder).await;
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let hook = format!("{{ type: http, url: {} }}", quoted(receiver.url("/events")));
    let config = one_sink(&mock.url(), dir.path(), "hook", &hook);
    let bridge = Bridge::start(config.config()).await.unwrap();
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    mock.broadcast(
        "message.created",
        r#"{"account_id":1,"conversation_id":5,"n":1}"#,
    );
    mock.broadcast(
        "message.created",
        r#"{"account_id":1,"conversation_id":5,"n":2,"x":"poison"}"#,
    );
    mock.broadcast(
        "message.created",
        r#"{"account_id":1,"conversation_id":5,"n":3}"#,
    );
    wait_until("two delivered, one dead letter", || {
        bridge.stats().delivered.load(Ordering::Relaxed) == 2
            && bridge.stats().dead_lettered.load(Ordering::Relaxed) == 1
    })
    .await;

    let store = DeadLetters::open(dir.path()).unwrap();
    let letters = store.list("hook").unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].error.contains("400"), "{}", letters[0].error);
    assert_eq!(letters[0].attempts, 1, "a permanent error is not retried");
    assert!(letters[0].event.data.get().contains("poison"));
    let poison_id = letters[0].event.id.to_string();

    // The endpoint is fixed; the operator replays while the daemon runs.
    accept_poison.store(true, Ordering::Relaxed);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatwoot-bridge"))
        .args(["dlq", "replay", "--sink", "hook", "--config"])
        .arg(config.write(&dir.path().join("bridge.yaml")))
        .output();
    let out = within("chatwoot-bridge dlq replay to finish", out)
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 dead letters queued"));
    wait_until("the replayed event delivered", || {
        bridge.stats().delivered.load(Ordering::Relaxed) == 3
    })
    .await;
    shut_down(bridge).await;
    mock.stop().await;
    assert!(store.list("hook").unwrap().is_empty());

    let delivered: Vec<Received> = receiver
        .received()
        .into_iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("poison"))
        .collect();
    assert_eq!(
        delivered.len(),
        2,
        "refused once, then delivered by the replay"
    );
    assert_eq!(
        delivered[1].headers["ce-id"],
        poison_id.as_str(),
        "same id after replay"
    );
}

/// A replay larger than the spool: it stops when its share of the spool is used and goes on
/// from there as the sink makes room, so each dead letter is delivered once and none is put
/// back twice.
#[tokio::test]
async fn a_replay_larger_than_the_spool_goes_on_where_it_stopped() {
    // About 1,100 bytes a record: three times what the 1 MiB spool holds.
    const LETTERS: u64 = 3_000;
    let port = free_port();
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = DeadLetters::open(dir.path()).unwrap();
    let letters = padded_letters(LETTERS, "n", 1_000);
    store.append("hook", &letters).unwrap();
    drop(letters);
    assert_eq!(
        store.queue_replay("hook").unwrap().letters,
        LETTERS as usize
    );
    let hook = format!(
        "{{ type: http, url: 'http://127.0.0.1:{port}/in', retry: {{ initial: 50ms, max: 200ms }} }}"
    );
    let mut config = one_sink(&mock.url(), dir.path(), "hook", &hook).config();
    config.spool.max_bytes = 1 << 20;
    config.spool.when_full = chatwoot_bridge::spool::WhenFull::DropNewest;
    let bridge = Bridge::start(config).await.unwrap();
    // The sink is down: the replay fills its share of the spool and records how far it got.
    let dead_letters = dir.path().join("dead-letters");
    wait_until("the replay recorded its progress", || {
        replay_progress_written(&dead_letters)
    })
    .await;
    // Several polls against the used share. Once the sink makes room, a replay that recorded
    // nothing would start again from its first letter: duplicates, and it would never end.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let receiver = Receiver::start_on(port, scripted(vec![])).await;
    receiver.wait_for(LETTERS as usize).await;
    wait_until("the replay finished", || {
        store.pending_replays().unwrap().is_empty()
    })
    .await;
    // Anything put back twice would arrive by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shut_down(bridge).await;
    mock.stop().await;

    let (received, distinct) = receiver.requests_and_distinct_ids();
    assert_eq!(distinct as u64, LETTERS, "every dead letter delivered");
    assert_eq!(
        received as u64, LETTERS,
        "each once: the replay put letters back twice"
    );
    assert!(
        std::fs::read_dir(&dead_letters)
            .unwrap()
            .flatten()
            .all(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                !name.contains(".replay-")
            }),
        "the replay file and its progress are gone"
    );
}

/// The `live` number of each event in a file sink's output, in file order.
fn live_numbers(path: &std::path::Path) -> Vec<u64> {
    support::events_in(path)
        .into_iter()
        .map(|event| {
            event["data"]["live"]
                .as_u64()
                .expect("live events carry `live`")
        })
        .collect()
}

/// Events that reached `bridge`'s spool or were refused by it (`drop_newest`).
fn spooled_or_refused(bridge: &Bridge) -> u64 {
    let stats = bridge.stats();
    stats.spooled.load(Ordering::Relaxed) + stats.spool_dropped_newest.load(Ordering::Relaxed)
}

/// Broadcasts the live events numbered `from..to` (about 1,100 bytes each) and waits until each
/// reached the spool or was refused by it.
async fn broadcast_live(bridge: &Bridge, mock: &MockServer, from: u64, to: u64) {
    let padding = "y".repeat(1_000);
    for n in from..to {
        mock.broadcast(
            "message.created",
            &format!(
                r#"{{"account_id":2,"conversation_id":{},"live":{n},"pad":"{padding}"}}"#,
                1_000_000 + n
            ),
        );
    }
    wait_until_explained(
        &format!("live events up to {to} to reach the spool"),
        || spooled_or_refused(bridge) >= to,
        || format!("only {}", spooled_or_refused(bridge)),
    )
    .await;
}

/// A replay for a sink that is down takes only its share of the spool (`replay_share`, half by
/// default), so the live events of another sink keep flowing meanwhile and none is dropped;
/// once the sink is back, the replay goes on and delivers every letter once.
#[tokio::test]
async fn a_replay_larger_than_the_spool_leaves_live_events_room() {
    // About 2.2 MB of letters for a 1 MiB spool; 250 live events of about 1.2 KB while the
    // replayed sink is down, which fit in the half the replay leaves free.
    const LETTERS: u64 = 2_000;
    const LIVE: u64 = 250;
    let port = free_port();
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = DeadLetters::open(dir.path()).unwrap();
    store
        .append("hook", &padded_letters(LETTERS, "n", 1_000))
        .unwrap();
    store.queue_replay("hook").unwrap();
    let live_out = dir.path().join("live.jsonl");
    let mut config = bridge_yaml(&mock.url(), dir.path())
        .sink(
            "hook",
            &format!(
                "{{ type: http, url: 'http://127.0.0.1:{port}/in', retry: {{ initial: 50ms, max: 200ms }} }}"
            ),
        )
        .sink("live", &format!("{{ type: file, path: {} }}", quoted(&live_out)))
        .route_all(&["live"])
        .config();
    config.spool.max_bytes = 1 << 20;
    config.spool.when_full = chatwoot_bridge::spool::WhenFull::DropNewest;
    let bridge = Bridge::start(config).await.unwrap();
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    let dead_letters = dir.path().join("dead-letters");
    wait_until("the replay recorded its progress", || {
        replay_progress_written(&dead_letters)
    })
    .await;
    // A few more replay passes against a sink that is still down.
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    broadcast_live(&bridge, &mock, 0, LIVE).await;
    let stats = bridge.stats();
    assert_eq!(
        stats.spool_dropped_newest.load(Ordering::Relaxed),
        0,
        "live events were dropped: the replay took the room they needed"
    );
    wait_until_explained(
        "every live event in the live sink",
        || live_numbers(&live_out).len() as u64 == LIVE,
        || format!("{} of {LIVE}", live_numbers(&live_out).len()),
    )
    .await;

    // The sink is back. What it had not delivered held everything after it in the spool (the
    // spool reclaims behind the slowest sink); once it is past that, the replay goes on in its
    // share while more live events arrive.
    let receiver = Receiver::start_on(port, scripted(vec![])).await;
    receiver.wait_for(LETTERS as usize / 2).await;
    broadcast_live(&bridge, &mock, LIVE, 2 * LIVE).await;
    receiver.wait_for(LETTERS as usize).await;
    wait_until("the replay finished", || {
        store.pending_replays().unwrap().is_empty()
    })
    .await;
    wait_until("every live event in the live sink", || {
        live_numbers(&live_out).len() as u64 == 2 * LIVE
    })
    .await;
    let dropped = stats.spool_dropped_newest.load(Ordering::Relaxed);
    shut_down(bridge).await;
    mock.stop().await;
    assert_eq!(dropped, 0);
    assert_eq!(live_numbers(&live_out), (0..2 * LIVE).collect::<Vec<_>>());
    let (received, distinct) = receiver.requests_and_distinct_ids();
    assert_eq!(
        (distinct as u64, received as u64),
        (LETTERS, LETTERS),
        "every dead letter delivered once"
    );
}

/// Fills a 1 MiB spool while the webhook is unreachable, then brings it up.
async fn fill_the_spool(policy: &str) -> (Vec<u64>, u64, u64) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("chatwoot_bridge=debug")
        .with_test_writer()
        .try_init();
    const TOTAL: u64 = 3_000;
    let port = free_port();
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let hook = format!(
        "{{ type: http, url: 'http://127.0.0.1:{port}/in', max_in_flight: 1, retry: {{ initial: 200ms, max: 400ms }} }}"
    );
    let mut config = one_sink(&mock.url(), dir.path(), "hook", &hook).config();
    config.spool.max_bytes = 1 << 20;
    config.spool.when_full = match policy {
        "drop_newest" => chatwoot_bridge::spool::WhenFull::DropNewest,
        _ => chatwoot_bridge::spool::WhenFull::DropOldest,
    };
    let bridge = Bridge::start(config).await.unwrap();
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    for _ in 0..TOTAL {
        mock.broadcast_generated();
    }
    wait_until_explained(
        &format!("all {TOTAL} events to reach the spool"),
        || spooled_or_refused(&bridge) >= TOTAL,
        || {
            format!(
                "only {}: {:?}",
                spooled_or_refused(&bridge),
                bridge.status().tokens()
            )
        },
    )
    .await;
    let stats = bridge.stats();
    let dropped_newest = stats.spool_dropped_newest.load(Ordering::Relaxed);
    let dropped_oldest = stats.spool_dropped_oldest.load(Ordering::Relaxed);

    let receiver = Receiver::start_on(port, scripted(vec![])).await;
    let expected = TOTAL - dropped_newest - dropped_oldest;
    wait_until("the kept events delivered", || {
        receiver.received().len() as u64 >= expected
    })
    .await;
    shut_down(bridge).await;
    mock.stop().await;
    let mut seqs: Vec<u64> = receiver.received().iter().map(seq_of).collect();
    seqs.sort_unstable();
    seqs.dedup();
    (seqs, dropped_newest, dropped_oldest)
}

#[tokio::test]
async fn a_full_spool_drops_the_newest_and_counts_them() {
    let (seqs, dropped_newest, dropped_oldest) = fill_the_spool("drop_newest").await;
    assert!(dropped_newest > 1_000, "{dropped_newest}");
    assert_eq!(dropped_oldest, 0);
    // The oldest events were kept: 0, 1, 2, ... until the spool was full. (A later, smaller
    // event may still have fitted where a larger one did not.)
    assert_eq!(seqs[..100], (0..100).collect::<Vec<_>>());
    assert_eq!(seqs.len() as u64 + dropped_newest, 3_000);
}

#[tokio::test]
async fn a_full_spool_drops_the_oldest_and_counts_them() {
    let (seqs, dropped_newest, dropped_oldest) = fill_the_spool("drop_oldest").await;
    assert_eq!(dropped_newest, 0);
    assert!(dropped_oldest > 1_000, "{dropped_oldest}");
    // The newest events were kept, up to the last one.
    assert_eq!(*seqs.last().unwrap(), 2_999);
    // A batch already in the sink's hands when its segment was dropped is still delivered, so
    // the kept set is the newest events plus at most that first batch.
    let newest_run = seqs
        .iter()
        .rev()
        .zip((0..3_000u64).rev())
        .take_while(|(a, b)| **a == *b)
        .count();
    assert!(
        newest_run as u64 + dropped_oldest >= 3_000 - 512,
        "{newest_run} {dropped_oldest}"
    );
}

#[tokio::test]
async fn dead_letters_can_go_to_another_sink() {
    let responder: Responder = Arc::new(|r: &Received, _| {
        if String::from_utf8_lossy(&r.body).contains("poison") {
            (StatusCode::GONE, vec![])
        } else {
            (StatusCode::OK, vec![])
        }
    });
    let receiver = Receiver::start(responder).await;
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let parking = dir.path().join("parking.jsonl");
    let config = bridge_yaml(&mock.url(), dir.path())
        .sink(
            "hook",
            &format!(
                "{{ type: http, url: {}, dead_letter: parking }}",
                quoted(receiver.url("/events"))
            ),
        )
        .sink(
            "parking",
            &format!("{{ type: file, path: {} }}", quoted(&parking)),
        )
        .route_all(&["hook"])
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    mock.broadcast(
        "message.created",
        r#"{"account_id":1,"conversation_id":5,"x":"poison"}"#,
    );
    mock.broadcast(
        "message.created",
        r#"{"account_id":1,"conversation_id":5,"x":"fine"}"#,
    );
    wait_until("the poison parked, the other delivered", || {
        support::events_in(&parking).len() == 1
            && bridge.stats().delivered.load(Ordering::Relaxed) >= 2
    })
    .await;
    shut_down(bridge).await;
    mock.stop().await;
    let parked: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&parking).unwrap().trim()).unwrap();
    assert_eq!(parked["data"]["x"], "poison");
    assert!(
        DeadLetters::open(dir.path())
            .unwrap()
            .list("hook")
            .unwrap()
            .is_empty(),
        "nothing on local disk when a dead letter sink is set"
    );
}

/// NATS core keeps order itself, so its batches are pipelined (the next one is published while
/// earlier ones await their flush). One event too large for the server fails in the middle of
/// that stream: it alone is dead-lettered, and every other event arrives once, in order.
#[tokio::test]
async fn a_pipelined_sink_dead_letters_a_refused_event_and_delivers_the_rest_in_order() {
    const TOTAL: u64 = 3000;
    const POISON: u64 = 1700;
    let dir = tempfile::tempdir().unwrap();
    let server_config = dir.path().join("nats.conf");
    std::fs::write(&server_config, "max_payload: 4096\n").unwrap();
    let nats = NatsServer::start_with(free_port(), &["-c", server_config.to_str().unwrap()]).await;
    let reader = nats.client().await;
    let mut subscription = within("a subscription", reader.subscribe("cw.>"))
        .await
        .unwrap();
    within("the subscription flushed", reader.flush())
        .await
        .unwrap();
    let mock = agent_mock().await;
    let bus = format!(
        "{{ type: nats, url: '{}', subject: 'cw.{{event}}' }}",
        nats.url()
    );
    let config = one_sink(&mock.url(), dir.path(), "bus", &bus).config();
    let bridge = Bridge::start(config).await.unwrap();
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    for n in 1..=TOTAL {
        let padding = if n == POISON {
            "p".repeat(8000)
        } else {
            String::new()
        };
        mock.broadcast(
            "message.created",
            &format!(
                r#"{{"account_id":1,"conversation_id":{},"n":{n},"pad":"{padding}"}}"#,
                n % 7
            ),
        );
    }
    let mut arrived = Vec::new();
    while arrived.len() < (TOTAL - 1) as usize {
        let what = format!("event {} of {}", arrived.len() + 1, TOTAL - 1);
        let message = within(&what, subscription.next()).await.unwrap();
        let data: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        arrived.push(data["n"].as_u64().unwrap());
    }
    let expected: Vec<u64> = (1..=TOTAL).filter(|&n| n != POISON).collect();
    assert_eq!(
        arrived, expected,
        "every event but the refused one, once, in order"
    );
    wait_until("the refused event dead-lettered", || {
        bridge.stats().dead_lettered.load(Ordering::Relaxed) == 1
            && bridge.stats().delivered.load(Ordering::Relaxed) == TOTAL - 1
    })
    .await;
    shut_down(bridge).await;
    mock.stop().await;
    let letters = DeadLetters::open(dir.path()).unwrap().list("bus").unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0]
        .event
        .data
        .get()
        .contains(&format!(r#""n":{POISON},"#)));
    assert!(
        letters[0].error.contains("payload"),
        "names the cause: {}",
        letters[0].error
    );
    assert_eq!(letters[0].attempts, 1, "a permanent error is not retried");
}

/// A sink that is routed nothing (here a dead-letter target while nothing fails) still moves its
/// cursor past the other sinks' records, so the spool is reclaimed and a small one never fills.
#[tokio::test]
async fn a_sink_routed_nothing_does_not_pin_the_spool() {
    const WAVES: u64 = 60;
    const PER_WAVE: u64 = 50;
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| quoted(dir.path().join(name));
    let mut config = bridge_yaml(&mock.url(), &dir.path().join("spool"))
        .sink(
            "main",
            &format!(
                "{{ type: file, path: {}, dead_letter: parking }}",
                out("main.jsonl")
            ),
        )
        .sink(
            "parking",
            &format!("{{ type: file, path: {} }}", out("parking.jsonl")),
        )
        .route_all(&["main"])
        .config();
    // ~1.3 KB per event: the 3,000 events are about four times this.
    config.spool.max_bytes = 1 << 20;
    let bridge = Bridge::start(config).await.unwrap();
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    let stats = bridge.stats();
    for wave in 1..=WAVES {
        for _ in 0..PER_WAVE {
            mock.broadcast_generated();
        }
        wait_until_explained(
            &format!("wave {wave}: {} delivered", wave * PER_WAVE),
            || stats.delivered.load(Ordering::Relaxed) >= wave * PER_WAVE,
            || {
                format!(
                    "{} delivered; spool dropped {} newest, {} oldest",
                    stats.delivered.load(Ordering::Relaxed),
                    stats.spool_dropped_newest.load(Ordering::Relaxed),
                    stats.spool_dropped_oldest.load(Ordering::Relaxed)
                )
            },
        )
        .await;
    }
    assert_eq!(
        (
            stats.spool_dropped_newest.load(Ordering::Relaxed),
            stats.spool_dropped_oldest.load(Ordering::Relaxed),
            stats.spool_pushed_out.load(Ordering::Relaxed)
        ),
        (0, 0, 0),
        "the spool filled up: the idle sink's cursor held its segments"
    );
    shut_down(bridge).await;
    mock.stop().await;
}

/// JetStream goes away in the middle of a pipelined stream (batches unconfirmed) and comes back:
/// the failed batches and everything sent after them are retried in spool order, nothing is
/// lost, and the stream stores each event once (`Nats-Msg-Id` is the event id).
#[tokio::test]
async fn a_jetstream_outage_mid_stream_loses_nothing_and_stores_each_event_once() {
    const TOTAL: u64 = 3_000;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("jetstream");
    let store_arg = store.to_str().unwrap().to_owned();
    // The later `-sd` wins: the restarted server finds the stream where the first left it.
    let nats = NatsServer::start_with(port, &["-sd", &store_arg]).await;
    let mock = agent_mock().await;
    let js = format!(
        "{{ type: nats, url: '{}', subject: 'out.{{event}}', timeout: 500ms, retry: {{ initial: 50ms, max: 300ms }}, jetstream: {{ stream: OUTAGE, create: true }} }}",
        nats.url()
    );
    let config = one_sink(&mock.url(), &dir.path().join("spool"), "js", &js).config();
    let bridge = Bridge::start(config).await.unwrap();
    let stats = bridge.stats();
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    // A steady stream (2,000 a second); the server is killed once a sixth is delivered, while
    // it flows, and the rest is sent during the outage, whatever this machine's speed.
    let mut running = Some(nats);
    let sent = stream_generated(&mock, 10, TOTAL, || {
        if stats.delivered.load(Ordering::Relaxed) < TOTAL / 6 {
            return false;
        }
        drop(running.take());
        true
    })
    .await;
    assert!(running.is_none(), "a sixth was never delivered");
    for _ in sent..TOTAL {
        mock.broadcast_generated();
    }
    // Down for longer than the sink's timeout: deliveries fail and are retried.
    wait_until("a delivery failed", || {
        bridge.status().sinks()["js"].retries > 0
    })
    .await;
    let nats = NatsServer::start_with(port, &["-sd", &store_arg]).await;
    wait_until("every event delivered", || {
        stats.delivered.load(Ordering::Relaxed) >= TOTAL
    })
    .await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    shut_down(bridge).await;
    mock.stop().await;

    let stored = stored_numbers(&nats, "OUTAGE", "mock_seq").await;
    let seqs: BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(
        seqs.len() as u64,
        TOTAL,
        "every generated event is in the stream"
    );
    assert_eq!(
        stored.len() as u64,
        TOTAL,
        "and each once: retries were deduplicated"
    );
}

/// Kafka's broker goes away mid-stream for longer than librdkafka's message timeout, while
/// events trickle in one small batch at a time: the records in flight fail in their delivery
/// reports, the bridge retries them once the broker is back, and every event reaches the topic;
/// none is dead-lettered. The failed batches are retried together, after one wait rather than
/// one each (hundreds of them: the recovery took seconds per second of outage before). rdkafka's
/// mock cluster (in this process) stands in for the broker because it can be taken down and
/// brought back with its topics, which tansu, keeping them in memory, cannot.
#[tokio::test]
async fn a_kafka_outage_longer_than_the_message_timeout_loses_nothing() {
    use rdkafka::mocking::MockCluster;
    // Events one at a time, every 5 ms: each is appended, and handed to the sink, on its own.
    const TOTAL: u64 = 600;
    const BROKER: i32 = 1;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outage", 2, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let mock = agent_mock().await;
    let k = format!(
        "{{ type: kafka, brokers: '{bootstrap}', topic: outage, retry: {{ initial: 50ms, max: 300ms }}, librdkafka: {{ message.timeout.ms: '1000', reconnect.backoff.max.ms: '200' }} }}"
    );
    let config = one_sink(&mock.url(), &dir.path().join("spool"), "k", &k).config();
    let bridge = Bridge::start(config).await.unwrap();
    let stats = bridge.stats();
    let retries = || bridge.status().sinks()["k"].retries;
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    let sent = stream_generated(&mock, 1, TOTAL / 2, || {
        stats.delivered.load(Ordering::Relaxed) >= 50
    })
    .await;
    // A retry before the outage (a slow start) must not pass for one caused by it.
    let retries_before = retries();
    cluster.broker_down(BROKER).unwrap();
    stream_generated(&mock, 1, TOTAL - sent, || false).await;
    // Past the message timeout: the records waiting for the broker fail in their reports.
    wait_until("a delivery failed", || retries() > retries_before).await;
    // Waits while the broker was away depend on how long that took on this machine; those after
    // it is back do not: one each for hundreds of failed batches before, now a few passes until
    // librdkafka has reconnected (more on a slow machine, never one per batch).
    let retries_at_return = retries();
    cluster.broker_up(BROKER).unwrap();
    wait_until("every event delivered", || {
        stats.delivered.load(Ordering::Relaxed) >= TOTAL
    })
    .await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    let status = bridge.status().sinks()["k"].clone();
    shut_down(bridge).await;
    mock.stop().await;
    let last_error = status.last_error.unwrap_or_default();
    assert!(
        last_error.contains("timed out"),
        "the outage did not fail a delivery the way it should: {last_error}"
    );
    let waits = status.retries - retries_at_return;
    assert!(
        waits <= 20,
        "{waits} waits before a retry after the broker came back: each failed batch waited on its own"
    );

    let consumer = support::kafka_consumer(&bootstrap, "outage", 2);
    let mut stream = consumer.stream();
    let mut seqs = BTreeSet::new();
    while (seqs.len() as u64) < TOTAL {
        let what = format!("event {} of {TOTAL} in the topic", seqs.len() + 1);
        let message = within(&what, stream.next())
            .await
            .unwrap()
            .expect("consume");
        let data: serde_json::Value =
            serde_json::from_slice(rdkafka::Message::payload(&message).unwrap()).unwrap();
        seqs.insert(data["mock_seq"].as_u64().unwrap());
    }
}

/// The shutdown deadline passes while a sink cannot deliver (one that settles batch by batch,
/// and one that keeps batches unconfirmed): nothing of what was read is committed past, and the
/// next start delivers all of it.
#[tokio::test]
async fn the_shutdown_deadline_leaves_undelivered_events_for_the_next_start() {
    const TOTAL: usize = 20;
    let down_port = free_port();
    let nats_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mock = agent_mock().await;
    let yaml = bridge_yaml(&mock.url(), &dir.path().join("spool"))
        .sink(
            "hook",
            &format!(
                "{{ type: http, url: 'http://127.0.0.1:{down_port}/in', retry: {{ initial: 50ms, max: 100ms }} }}"
            ),
        )
        .sink(
            "bus",
            &format!(
                "{{ type: nats, url: 'nats://127.0.0.1:{nats_port}', subject: 'late.{{event}}', timeout: 300ms, retry: {{ initial: 50ms, max: 100ms }} }}"
            ),
        )
        .route_all(&["hook", "bus"]);
    let mut config = yaml.config();
    config.shutdown_timeout = Duration::from_secs(1);
    let bridge = Bridge::start(config).await.unwrap();
    spool_numbered(&bridge, &mock, TOTAL).await;
    assert_eq!(bridge.stats().delivered.load(Ordering::Relaxed), 0);
    let report = shut_down(bridge).await;
    assert_eq!(
        report.drain,
        Drain::DeadlinePassed,
        "nothing could be delivered"
    );
    assert_eq!(report.persistence, Persistence::Synced);

    // Both destinations come up; the next start delivers everything that was read.
    let receiver = Receiver::start_on(down_port, scripted(vec![])).await;
    let nats = NatsServer::start_on(nats_port).await;
    let mut subscription = nats.subscribed("late.>").await;
    let bridge = Bridge::start(yaml.config()).await.unwrap();
    let posted = receiver.wait_for(TOTAL).await;
    let mut published = next_numbered(&mut subscription, TOTAL).await;
    shut_down(bridge).await;
    mock.stop().await;
    let mut posted: Vec<u64> = posted
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    posted.sort_unstable();
    posted.dedup();
    assert_eq!(posted, (0..TOTAL as u64).collect::<Vec<_>>(), "webhook");
    published.sort_unstable();
    published.dedup();
    assert_eq!(published, (0..TOTAL as u64).collect::<Vec<_>>(), "nats");
}

/// A backlog of several full batches is read from the spool while the batch before is sent (the
/// read ahead): it arrives complete and in spool order, and a clean shutdown commits all of it, so
/// the next start sends nothing again.
#[tokio::test]
async fn a_backlog_of_many_batches_drains_in_order_and_is_committed() {
    const TOTAL: usize = 3 * chatwoot_bridge::delivery::ingest::MAX_BATCH + 100;
    let nats_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let bus = format!(
        "{{ type: nats, url: 'nats://127.0.0.1:{nats_port}', subject: 'drain.{{event}}', timeout: 300ms, retry: {{ initial: 50ms, max: 100ms }} }}"
    );
    let mock = agent_mock().await;
    let yaml = one_sink(&mock.url(), &spool, "bus", &bus);
    // The server is down: everything stays in the spool, to be read from the file next time.
    let mut config = yaml.config();
    config.shutdown_timeout = Duration::from_secs(1);
    let bridge = Bridge::start(config).await.unwrap();
    spool_numbered(&bridge, &mock, TOTAL).await;
    let report = shut_down(bridge).await;
    assert_eq!(
        report.drain,
        Drain::DeadlinePassed,
        "nothing could be delivered"
    );

    let nats = NatsServer::start_on(nats_port).await;
    let mut subscription = nats.subscribed("drain.>").await;
    let bridge = Bridge::start(yaml.config()).await.unwrap();
    let published = next_numbered(&mut subscription, TOTAL).await;
    assert_eq!(
        published,
        (0..TOTAL as u64).collect::<Vec<_>>(),
        "each event once, in spool order"
    );
    let report = shut_down(bridge).await;
    assert_eq!(report.drain, Drain::CaughtUp);

    // Everything was committed: a third start finds nothing to send.
    let bridge = Bridge::start(yaml.config()).await.unwrap();
    wait_until("subscribed again", || mock.streaming_subscriptions() == 1).await;
    let again = tokio::time::timeout(Duration::from_secs(2), subscription.next()).await;
    assert!(
        again.is_err(),
        "a message after the last: a duplicate of the second run, or sent again after a clean shutdown: {again:?}"
    );
    shut_down(bridge).await;
    mock.stop().await;
}

/// While the server is down every batch fails as it is handed over (the client is not
/// connected): the loop hands nothing more over until that batch is retried, so when the server
/// comes back the events still land in spool order, not a later batch before an earlier one.
#[tokio::test]
async fn events_spooled_during_a_nats_outage_land_in_spool_order() {
    const TOTAL: usize = 3 * chatwoot_bridge::delivery::ingest::MAX_BATCH + 100;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mock = agent_mock().await;
    let js = format!(
        "{{ type: nats, url: 'nats://127.0.0.1:{port}', subject: 'order.{{event}}', timeout: 500ms, retry: {{ initial: 50ms, max: 200ms }}, jetstream: {{ stream: ORDER, create: true }} }}"
    );
    let config = one_sink(&mock.url(), &dir.path().join("spool"), "js", &js).config();
    let bridge = Bridge::start(config).await.unwrap();
    spool_numbered(&bridge, &mock, TOTAL).await;
    // The server comes back while the loop would still be handing batches over (each waits
    // up to the 500 ms timeout for a connection): without holding back, the batch handed over
    // then is stored before the retries of the ones that failed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(bridge.stats().delivered.load(Ordering::Relaxed), 0);
    let nats = NatsServer::start_on(port).await;
    let stats = bridge.stats();
    wait_until("every event delivered", || {
        stats.delivered.load(Ordering::Relaxed) >= TOTAL as u64
    })
    .await;
    shut_down(bridge).await;
    mock.stop().await;

    assert_eq!(
        stored_numbers(&nats, "ORDER", "n").await,
        (0..TOTAL as u64).collect::<Vec<_>>(),
        "stored once each, in spool order"
    );
}

/// At shutdown a dead-letter target keeps running until the sinks that feed it have ended: the
/// events a sink gives up on during the shutdown window still reach it.
#[tokio::test]
async fn a_dead_letter_sink_outlives_the_sinks_that_feed_it_at_shutdown() {
    const TOTAL: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let parking = dir.path().join("parking.jsonl");
    let mock = agent_mock().await;
    let config = bridge_yaml(&mock.url(), &dir.path().join("spool"))
        .sink(
            "hook",
            &format!(
                "{{ type: http, url: 'http://127.0.0.1:{}/in', retry: {{ initial: 50ms, max: 100ms, max_elapsed: 500ms }}, dead_letter: parking }}",
                free_port()
            ),
        )
        .sink("parking", &format!("{{ type: file, path: {} }}", quoted(&parking)))
        .route_all(&["hook"])
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    spool_numbered(&bridge, &mock, TOTAL).await;
    // The webhook gives up on every event 0.5 s into the 5 s shutdown window.
    let report = shut_down(bridge).await;
    mock.stop().await;
    assert_eq!(
        report.drain,
        Drain::CaughtUp,
        "every sink caught up before the deadline"
    );
    let parked = std::fs::read_to_string(&parking).unwrap_or_default();
    assert_eq!(
        parked.lines().count(),
        TOTAL,
        "every dead letter reached the dead-letter sink:\n{parked}"
    );
}
