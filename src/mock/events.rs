//! The events the mock broadcasts: fixture-shaped, numbered, stamped with their send time.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{fixtures, Closed, Push, Shared};

/// `{"event":...,"data":...}` with `data` inserted verbatim.
pub(super) fn encode_message(event: &str, data: &str) -> String {
    let event = serde_json::to_string(event).expect("a string serializes");
    format!(r#"{{"event":{event},"data":{data}}}"#)
}

/// Templates of generated events: `(event name, data after its opening brace)`.
pub(super) fn templates() -> &'static [(String, String)] {
    static TEMPLATES: OnceLock<Vec<(String, String)>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        fixtures::ALL
            .iter()
            .map(|(name, frame)| {
                // Keep the fixture's bytes (key order, spacing) as Chatwoot sent them.
                #[derive(serde::Deserialize)]
                struct Frame<'a> {
                    #[serde(borrow)]
                    message: Message<'a>,
                }
                #[derive(serde::Deserialize)]
                struct Message<'a> {
                    #[serde(borrow)]
                    data: &'a serde_json::value::RawValue,
                }
                let frame: Frame = serde_json::from_str(frame).expect("fixture is JSON");
                let data = frame.message.data.get();
                (name.to_string(), data[1..].to_string())
            })
            .collect()
    })
}

/// Microseconds since the Unix epoch (zero for a clock before it).
pub(super) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A heartbeat frame as Chatwoot sends it, with the time in seconds.
pub(super) fn ping_frame() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(r#"{{"type":"ping","message":{now}}}"#)
}

/// The next generated event: a fixture's data with `mock_seq` and `mock_sent_at_us` in front.
pub(super) fn next_generated(shared: &Shared) -> (u64, String) {
    let seq = shared.sequence.fetch_add(1, Ordering::Relaxed);
    let templates = templates();
    let (name, rest) = &templates[seq as usize % templates.len()];
    let sent_at_us = now_us();
    let data = format!(r#"{{"mock_seq":{seq},"mock_sent_at_us":{sent_at_us},{rest}"#);
    (seq, encode_message(name, &data))
}

/// Waits until `wanted` subscriptions stream, so no event is broadcast to nobody; fails when
/// the server stops first.
pub(super) async fn streaming_at_least(
    shared: &Shared,
    wanted: usize,
    cancel: &CancellationToken,
) -> Result<(), Closed> {
    while shared.streaming.load(Ordering::Relaxed) < wanted {
        tokio::select! {
            _ = cancel.cancelled() => return Err(Closed),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    Ok(())
}

/// Broadcasts generated events at `rate` per second, `count` of them (or forever). When the
/// mock knows users, each step is a message created in the records instead (see
/// `Shared::traffic`), which reaches the streams Chatwoot would send it to and the REST API.
pub(super) async fn generate(
    shared: Arc<Shared>,
    rate: f64,
    count: Option<u64>,
    wait_for_subscriptions: usize,
    cancel: CancellationToken,
) {
    if streaming_at_least(&shared, wait_for_subscriptions, &cancel)
        .await
        .is_err()
    {
        return;
    }
    let traffic = !shared
        .directory
        .lock()
        .expect("directory lock")
        .users
        .is_empty();
    let mut tick = interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut sent = 0u64;
    while count.is_none_or(|c| sent < c) {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if traffic {
            shared.traffic(sent);
        } else {
            let (_, message) = next_generated(&shared);
            let _ = shared.pushes.send(Push::Event {
                only: None,
                message: message.into(),
            });
        }
        sent += 1;
    }
}
