//! Spool pressure: a sink that lags fills a small spool, and it alone pays (its oldest events go
//! to its dead letters, marked and counted); a sink that keeps up gets every event, and nothing
//! is dropped, dead-letter replays included.

mod support;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;

use chatwoot_bridge::config::Config;
use chatwoot_bridge::delivery::dead_letter::{DeadLetter, DeadLetters};
use chatwoot_bridge::mock::{Answer as MockAnswer, MockConfig, MockServer};
use chatwoot_bridge::status::SinkState;
use chatwoot_bridge::Bridge;
use support::{
    free_port, mock_token, padded_letters, quoted, replay_progress_written, scripted, shut_down,
    start_mock, wait_until, wait_until_explained, BridgeYaml, Receiver,
};

/// Events streamed: about 1.3 KB each, over twice what the 1 MiB spool holds.
const TOTAL: u64 = 2_000;

/// Events per wave: the fast sink delivers each wave before the next comes.
const PER_WAVE: u64 = 200;

/// A mock Chatwoot with one confirmed agent token.
async fn agent_mock() -> MockServer {
    start_mock(MockConfig {
        tokens: vec![mock_token("tok-agent", MockAnswer::Confirm)],
        ..MockConfig::default()
    })
    .await
}

/// A bridge with a 1 MiB spool (`when_full` left at its default) and two sinks for every event:
/// `fast`, a file, and `slow`, a webhook on `port` where nothing listens yet.
fn two_sinks(cable: &str, dir: &Path, port: u16) -> Config {
    let fast = format!("{{ type: file, path: {} }}", quoted(dir.join("fast.jsonl")));
    let slow = format!(
        "{{ type: http, url: 'http://127.0.0.1:{port}/in', max_in_flight: 32, retry: {{ initial: 50ms, max: 200ms }} }}"
    );
    let mut config = BridgeYaml::new(cable)
        .cable("reconnect: { initial: 50ms, max: 200ms }")
        .agent("agent", "tok-agent", 1)
        .spool(&dir.join("spool"))
        .setting("shutdown_timeout: 5s")
        .sink("fast", &fast)
        .sink("slow", &slow)
        .route_all(&["fast", "slow"])
        .config();
    // Below what validation allows with 8 MiB frames; these events are small.
    config.spool.max_bytes = 1 << 20;
    config
}

/// Streams [`TOTAL`] generated events in waves; after each, waits until `fast` has delivered
/// and committed all so far (delivered, then idle: its loop commits before it idles).
async fn stream_in_waves(bridge: &Bridge, mock: &MockServer) {
    wait_until("subscribed", || mock.streaming_subscriptions() == 1).await;
    let stats = bridge.stats();
    for wave in 1..=TOTAL / PER_WAVE {
        for _ in 0..PER_WAVE {
            mock.broadcast_generated();
        }
        let status = bridge.status();
        wait_until_explained(
            &format!("wave {wave}: fast delivered {} and idle", wave * PER_WAVE),
            || {
                status
                    .sink("fast")
                    .is_some_and(|s| s.delivered >= wave * PER_WAVE && s.state == SinkState::Idle)
            },
            || {
                format!(
                    "fast: {:?}; spooled {}, dropped {} newest, {} oldest",
                    status.sink("fast"),
                    stats.spooled.load(Ordering::Relaxed),
                    stats.spool_dropped_newest.load(Ordering::Relaxed),
                    stats.spool_dropped_oldest.load(Ordering::Relaxed)
                )
            },
        )
        .await;
    }
}

/// The `mock_seq` of each line the file sink wrote, in order.
fn written_seqs(path: &Path) -> Vec<u64> {
    assert!(path.exists(), "no file at {}", path.display());
    support::events_in(path)
        .into_iter()
        .map(|event| event["data"]["mock_seq"].as_u64().unwrap())
        .collect()
}

/// The distinct live events (`mock_seq`) and replayed letters (`letter`) a sink got, delivered or
/// as dead letters; takes each request of the receiver once, so that a wait stays cheap.
#[derive(Default)]
struct Covered {
    /// Live events seen.
    seqs: BTreeSet<u64>,
    /// Replayed letters seen.
    letters: BTreeSet<u64>,
    /// Distinct live events.
    live: u64,
    /// Distinct replayed letters.
    replayed: u64,
    /// Requests of the receiver already taken.
    taken: usize,
}

impl Covered {
    /// Takes the data of one event.
    fn note(&mut self, data: &str) {
        if let Some(seq) = number(data, "mock_seq") {
            self.seqs.insert(seq);
        } else if let Some(letter) = number(data, "letter") {
            self.letters.insert(letter);
        }
        self.live = self.seqs.len() as u64;
        self.replayed = self.letters.len() as u64;
    }

    /// Takes what the receiver got since the last look.
    fn with(&mut self, receiver: &Receiver) -> &Covered {
        let received = receiver.requests.lock().unwrap();
        for request in &received[self.taken..] {
            self.note(std::str::from_utf8(&request.body).unwrap());
        }
        self.taken = received.len();
        drop(received);
        self
    }
}

/// The value of `key` in an event's data (`mock_seq` of a live event, `letter` of a replayed
/// one), if it has one.
fn number(data: &str, key: &str) -> Option<u64> {
    let data: serde_json::Value = serde_json::from_str(data).unwrap();
    data[key].as_u64()
}

#[tokio::test]
async fn a_full_spool_makes_the_lagging_sink_alone_pay_and_drops_nothing() {
    let port = free_port();
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = Bridge::start(two_sinks(&mock.url(), dir.path(), port))
        .await
        .unwrap();
    stream_in_waves(&bridge, &mock).await;
    let stats = bridge.stats();
    wait_until("every event in the spool", || {
        stats.spooled.load(Ordering::Relaxed) >= TOTAL
    })
    .await;
    assert_eq!(
        (
            stats.spool_dropped_newest.load(Ordering::Relaxed),
            stats.spool_dropped_oldest.load(Ordering::Relaxed)
        ),
        (0, 0),
        "nothing dropped"
    );

    // The sink that kept up got every event, once, in order, and paid nothing.
    assert_eq!(
        written_seqs(&dir.path().join("fast.jsonl")),
        (0..TOTAL).collect::<Vec<_>>()
    );
    let dead_letters = DeadLetters::open(&dir.path().join("spool")).unwrap();
    assert!(dead_letters.list("fast").unwrap().is_empty());
    assert_eq!(bridge.status().sink("fast").unwrap().pushed_out, 0);

    // The sink that is down paid with its oldest events, marked and counted.
    let letters = dead_letters.list("slow").unwrap();
    let pushed_out = letters.len() as u64;
    assert!(
        pushed_out > TOTAL / 2,
        "the spool holds about a quarter: {pushed_out}"
    );
    assert!(letters.iter().all(DeadLetter::pushed_out_by_spool_pressure));
    let letter_seqs: Vec<u64> = letters
        .iter()
        .map(|l| number(l.event.data.get(), "mock_seq").unwrap())
        .collect();
    assert_eq!(
        letter_seqs,
        (0..pushed_out).collect::<Vec<_>>(),
        "its oldest events, each once, in order"
    );
    assert_eq!(bridge.status().sink("slow").unwrap().pushed_out, pushed_out);
    assert_eq!(stats.spool_pushed_out.load(Ordering::Relaxed), pushed_out);
    assert_eq!(
        stats.dead_lettered.load(Ordering::Relaxed),
        0,
        "counted apart"
    );

    // Back up, it delivers the rest: with its dead letters, every event.
    let receiver = Receiver::start_on(port, scripted(vec![])).await;
    let covered = RefCell::new(Covered::default());
    for letter in &letters {
        covered.borrow_mut().note(letter.event.data.get());
    }
    wait_until_explained(
        "slow's dead letters and deliveries to cover every event",
        || covered.borrow_mut().with(&receiver).live == TOTAL,
        || format!("{} of {TOTAL}", covered.borrow().live),
    )
    .await;
    shut_down(bridge).await;
    mock.stop().await;
}

/// Dead letters of `slow` (about 2 KB each), queued for replay.
fn queue_replay(spool_dir: &Path, letters: u64) {
    let store = DeadLetters::open(spool_dir).unwrap();
    let letters = padded_letters(letters, "letter", 2_000);
    let count = letters.len();
    store.append("slow", &letters).unwrap();
    assert_eq!(store.queue_replay("slow").unwrap().letters, count);
}

#[tokio::test]
async fn a_replay_for_a_lagging_sink_never_costs_a_live_event() {
    const LETTERS: u64 = 600;
    let port = free_port();
    let mock = agent_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    queue_replay(&spool_dir, LETTERS);
    let bridge = Bridge::start(two_sinks(&mock.url(), dir.path(), port))
        .await
        .unwrap();
    // The replay fills its share of the spool (`replay_share`, half) for `slow`, which is down;
    // then live events come and fill the rest.
    wait_until("the replay took its share of the spool", || {
        replay_progress_written(&spool_dir.join("dead-letters"))
    })
    .await;
    stream_in_waves(&bridge, &mock).await;
    let stats = bridge.stats();
    assert_eq!(
        stats.spool_dropped_newest.load(Ordering::Relaxed),
        0,
        "no live event refused"
    );
    assert_eq!(
        written_seqs(&dir.path().join("fast.jsonl")),
        (0..TOTAL).collect::<Vec<_>>(),
        "the sink that keeps up got every live event"
    );
    let dead_letters = DeadLetters::open(&spool_dir).unwrap();
    assert!(dead_letters.list("fast").unwrap().is_empty());

    // `slow` comes back: its deliveries and its dead letters hold every live event and every
    // replayed letter. Only appends of live events push out, and they are over: its dead
    // letters are complete.
    let covered = RefCell::new(Covered::default());
    for letter in dead_letters.list("slow").unwrap() {
        assert!(letter.pushed_out_by_spool_pressure());
        covered.borrow_mut().note(letter.event.data.get());
    }
    assert!(
        covered.borrow().replayed > 0,
        "the replayed letters, oldest in the spool, were pushed back to slow's dead letters"
    );
    let receiver = Receiver::start_on(port, scripted(vec![])).await;
    wait_until_explained(
        "slow to have every live event and every letter, delivered or dead-lettered",
        || {
            let mut covered = covered.borrow_mut();
            let covered = covered.with(&receiver);
            (covered.live, covered.replayed) == (TOTAL, LETTERS)
        },
        || {
            let covered = covered.borrow();
            format!("{} live, {} letters", covered.live, covered.replayed)
        },
    )
    .await;
    assert!(stats.spool_pushed_out.load(Ordering::Relaxed) > 0);
    shut_down(bridge).await;
    mock.stop().await;
}
