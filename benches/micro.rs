//! Microbenchmarks of the per-event work: `cargo bench --bench micro`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use chatwoot_bridge::config::Config;
use chatwoot_bridge::event::id::IdAssigner;
use chatwoot_bridge::event::{content_hash, nesting_exceeds, DataKeys, Event, JsonText};
use chatwoot_bridge::mock::fixtures;
use chatwoot_bridge::sink::{self, Envelope};
use chatwoot_bridge::source::gaps::LiveActivity;
use chatwoot_bridge::source::protocol;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio_tungstenite::tungstenite::Utf8Bytes;

fn frame(name: &str) -> &'static str {
    fixtures::ALL
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("fixture exists")
}

fn event(name: &str) -> Event {
    match protocol::decode(frame(name)).expect("fixture decodes") {
        protocol::ServerFrame::Message { event, data, .. } => Event::new(
            &event,
            JsonText::from_raw(data.0),
            Arc::from("support-agent"),
            Arc::from("wss://chat.example.com/cable#support-agent"),
            SystemTime::now(),
        ),
        _ => unreachable!("fixture is a message"),
    }
}

/// A realistic table: a few event globs, tokens, inbox filters and data conditions.
const CONFIG: &str = r#"
chatwoot: { url: "ws://127.0.0.1:1/cable" }
tokens:
  - { name: support-agent, pubsub_token: a, account_id: 1, user_id: 3 }
  - { name: sales-agent, pubsub_token: b, account_id: 1, user_id: 4 }
  - { name: widget, pubsub_token: c }
sinks:
  kafka: { type: file, path: /dev/null }
  crm: { type: file, path: /dev/null, fields: { drop: [sender.email, sender.phone_number, conversation.contact_inbox.source_id] } }
  archive: { type: file, path: /dev/null }
routes:
  - name: typing-to-archive-only
    match: { event: ["conversation.typing_*", "presence.update"] }
    to: [archive]
  - name: refunds
    match:
      event: ["message.created", "message.updated"]
      token: [support-agent, sales-agent]
      inbox_id: [2, 3, 7]
      where:
        - { path: message_type, in: [0, "incoming"] }
        - { path: private, equals: false }
        - { path: content, matches: "(?i)refund" }
    to: [crm]
    continue: true
  - name: resolved
    match: { event: conversation.status_changed, where: [{ path: status, equals: resolved }] }
    to: [crm]
    continue: true
  - name: messages
    match: { event: ["message.*"], account_id: [1] }
    to: [kafka]
    continue: true
  - name: everything
    match: {}
    to: [archive]
"#;

/// What the socket's task reads out of a live event for the REST side of a token given as an
/// API access token (backfill's remembered ids, the stall check's activity): one more parse of
/// a conversation or message event's data, on top of the per-event work above.
fn live_activity(c: &mut Criterion) {
    let mut g = c.benchmark_group("event");
    for name in ["message.created", "conversation.updated"] {
        let ev = event(name);
        g.throughput(Throughput::Bytes(ev.data.get().len() as u64));
        g.bench_function(format!("LiveActivity::of/{name}"), |b| {
            b.iter(|| LiveActivity::of(black_box(&ev), black_box(1)).unwrap())
        });
    }
    g.finish();
}

/// Frame decoding, by frame size.
fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for name in [
        "message.created",
        "conversation.updated",
        "notification.created",
    ] {
        let f = frame(name);
        g.throughput(Throughput::Bytes(f.len() as u64));
        g.bench_function(name, |b| b.iter(|| protocol::decode(black_box(f)).unwrap()));
    }
    g.finish();
}

/// The ids read out of every event's data on the socket's task; a typing event finds them in
/// its nested `conversation`, a conversation event at the top.
fn data_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("event");
    for name in [
        "message.created",
        "conversation.typing_on",
        "conversation.updated",
    ] {
        let ev = event(name);
        g.throughput(Throughput::Bytes(ev.data.get().len() as u64));
        g.bench_function(format!("DataKeys::extract/{name}"), |b| {
            b.iter(|| DataKeys::extract(black_box(&ev.name), black_box(ev.data.get())))
        });
        g.bench_function(format!("nesting_exceeds/{name}"), |b| {
            b.iter(|| nesting_exceeds(black_box(ev.data.get()), black_box(128)))
        });
    }
    g.finish();
}

/// What the socket task does per broadcast: decode the frame, build the event.
fn socket(c: &mut Criterion) {
    let message = frame("message.created");
    let mut g = c.benchmark_group("socket");
    g.bench_function("decode+Event::new/message.created", |b| {
        let token: Arc<str> = Arc::from("support-agent");
        let source: Arc<str> = Arc::from("wss://chat.example.com/cable#support-agent");
        // As the socket hands it over: shared bytes known to be UTF-8.
        let text = Utf8Bytes::from(message);
        b.iter(
            || match protocol::decode(black_box(text.as_str())).unwrap() {
                protocol::ServerFrame::Message { event, data, .. } => Event::new(
                    &event,
                    JsonText::in_frame(&Bytes::from(text.clone()), data.0),
                    token.clone(),
                    source.clone(),
                    SystemTime::UNIX_EPOCH,
                ),
                _ => unreachable!(),
            },
        )
    });
    g.finish();
}

/// The content hash and the id assignment, for distinct events and for one broadcast seen by
/// five tokens.
fn ids(c: &mut Criterion) {
    let e = event("message.created");
    let mut g = c.benchmark_group("ids");
    g.bench_function("content_hash/message.created", |b| {
        b.iter(|| content_hash(black_box(&e.name), black_box(e.data.get())))
    });
    let token: Arc<str> = Arc::from("support-agent");
    g.bench_function("IdAssigner::assign/distinct", |b| {
        let mut ids = IdAssigner::new();
        let mut n = 0u128;
        let now = SystemTime::now();
        let mono = std::time::Instant::now();
        b.iter(|| {
            n += 1;
            ids.assign(black_box(n), &token, now, mono)
        })
    });
    g.bench_function("IdAssigner::assign/fanout-5-tokens", |b| {
        let mut ids = IdAssigner::new();
        let tokens: Vec<Arc<str>> = (0..5).map(|i| Arc::from(format!("t{i}"))).collect();
        let mut n = 0u128;
        let now = SystemTime::now();
        let mono = std::time::Instant::now();
        b.iter(|| {
            n += 1;
            for t in &tokens {
                black_box(ids.assign(n, t, now, mono));
            }
        })
    });
    g.finish();
}

fn bench_config() -> Config {
    Config::from_yaml(CONFIG, &|_| None, false).expect("bench config is valid")
}

/// The route table of [`CONFIG`]: a regex condition, a data condition, the first route.
fn route(c: &mut Criterion) {
    let config = bench_config();
    let mut g = c.benchmark_group("route");
    for name in [
        "message.created",
        "conversation.status_changed",
        "conversation.typing_on",
    ] {
        let ev = event(name);
        g.bench_function(name, |b| b.iter(|| config.routes.route(black_box(&ev))));
    }
    g.finish();
}

/// The envelopes and headers each sink builds, and the spool record.
fn envelope(c: &mut Criterion) {
    let mut e = event("message.created");
    e.id = chatwoot_bridge::event::EventId(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
    let mut g = c.benchmark_group("envelope");
    g.bench_function("structured", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            out.clear();
            black_box(&e).write_structured(&mut out);
            out.len()
        })
    });
    g.bench_function("binary_attributes", |b| {
        b.iter(|| sink::binary_attributes(black_box(&e)))
    });
    g.bench_function("nats_headers", |b| {
        b.iter(|| sink::nats::headers(black_box(&e), Envelope::Binary))
    });
    g.bench_function("kafka_headers", |b| {
        b.iter(|| sink::kafka::headers(black_box(&e), Envelope::Binary))
    });
    g.bench_function("http_headers", |b| {
        b.iter(|| sink::http::request_headers(black_box(&e), Envelope::Binary))
    });
    g.bench_function("spool_record_encode", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            out.clear();
            black_box(&e).encode_record(&mut out);
            out.len()
        })
    });
    g.bench_function("spool_record_decode", |b| {
        let mut record = Vec::new();
        e.encode_record(&mut record);
        b.iter(|| Event::decode_record(black_box(&record)).unwrap())
    });
    g.finish();
}

/// Redaction: the default with and without a token to redact, and a sink's dropped paths.
fn redact(c: &mut Criterion) {
    let config = bench_config();
    let e = event("message.created");
    let mut g = c.benchmark_group("redact");
    let default = chatwoot_bridge::route::redact::Redaction::default();
    let crm = config.sinks["crm"].redaction.clone();
    let conv = event("conversation.updated");
    g.bench_function("default/no-token(message.created)", |b| {
        b.iter(|| default.apply(black_box(e.data.get())))
    });
    g.bench_function("default/token(conversation.updated)", |b| {
        b.iter(|| default.apply(black_box(conv.data.get())))
    });
    g.bench_function("drop-3-paths(message.created)", |b| {
        b.iter(|| crm.apply(black_box(e.data.get())))
    });
    g.finish();
}

/// criterion's macro writes a public, undocumented function; it lives here out of the lints' way.
#[allow(missing_docs, unreachable_pub)]
mod group {
    use super::*;
    criterion_group!(
        benches,
        decode,
        data_keys,
        live_activity,
        socket,
        ids,
        route,
        envelope,
        redact
    );
}
criterion_main!(group::benches);
