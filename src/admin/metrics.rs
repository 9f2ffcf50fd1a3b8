//! `/metrics`: the [`Snapshot`] in Prometheus's text exposition format (version 0.0.4).
//!
//! Written by hand rather than through a metrics library: every value already lives in an
//! atomic on the status board, so a registry would only copy them, and its histogram takes a
//! lock per observation. The format's rules that matter here are few and kept in one place:
//! `# HELP` and `# TYPE` once per family, a family's samples together, label values escaped
//! (`\`, `"`, newline), `+Inf` as the last bucket. `promtool check metrics` reads the output in
//! the tests.

use std::fmt::{self, Write};

use super::report::Snapshot;
use crate::status::{
    ReconnectReason, SinkState, SinkStatus, TokenState, TokenStatus, LATENCY_BUCKETS,
};

/// Every metric's name starts with this.
const PREFIX: &str = "chatwoot_bridge_";

/// `Content-Type` of the exposition.
pub(super) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Clone, Copy)]
enum Kind {
    /// Only goes up (resets at a restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, a sum and a count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value.
#[derive(Clone, Copy)]
enum Value {
    /// A count.
    Int(u64),
    /// Seconds, or another fraction.
    Float(f64),
}

impl From<u64> for Value {
    fn from(n: u64) -> Value {
        Value::Int(n)
    }
}

impl From<f64> for Value {
    fn from(x: f64) -> Value {
        Value::Float(x)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Int(u64::from(b))
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) if x.is_infinite() => {
                f.write_str(if x > 0.0 { "+Inf" } else { "-Inf" })
            }
            Value::Float(x) => write!(f, "{x}"),
        }
    }
}

/// The text being written.
struct Exposition {
    /// What is written so far.
    out: String,
}

impl Exposition {
    /// Starts the family `name` (without the prefix).
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {PREFIX}{name} {help}");
        let _ = writeln!(self.out, "# TYPE {PREFIX}{name} {}", kind.as_str());
    }

    /// One sample of the family just started: `name` is the family's, or with `_bucket`,
    /// `_sum` or `_count` for a histogram.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        let _ = write!(self.out, "{PREFIX}{name}");
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, text)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"");
                escape_label_value(&mut self.out, text);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value.into());
    }
}

/// Appends `text` as a label value: backslash, double quote and line feed escaped.
fn escape_label_value(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The exposition of `snapshot`.
pub(super) fn encode(snapshot: &Snapshot) -> String {
    let mut text = Exposition {
        out: String::with_capacity(4096 + 2048 * (snapshot.tokens.len() + snapshot.sinks.len())),
    };
    if !snapshot.tokens.is_empty() {
        token_families(&mut text, snapshot);
    }
    if !snapshot.sinks.is_empty() {
        sink_families(&mut text, snapshot);
        latency_family(&mut text, snapshot);
    }
    process_families(&mut text, snapshot);
    text.out
}

/// A family with one sample per token: its name, type, help, and how to read a token's value.
type TokenFamily = (&'static str, Kind, &'static str, fn(&TokenStatus) -> Value);

/// A family with one sample per sink: its name, type, help, and how to read a sink's value.
type SinkFamily = (&'static str, Kind, &'static str, fn(&SinkStatus) -> u64);

/// A family with one sample per token, read by `value`.
fn per_token(
    text: &mut Exposition,
    snapshot: &Snapshot,
    (name, kind, help): (&str, Kind, &str),
    value: impl Fn(&TokenStatus) -> Value,
) {
    text.family(name, kind, help);
    for (token, status) in &snapshot.tokens {
        text.sample(name, &[("token", token)], value(status));
    }
}

/// A state family (`name`, `help`): for each token or sink (`label`) of `rows`, one sample per
/// state of `all`, 1 for the state it is in and 0 for the others, so that a query can select a
/// state whether or not anything is in it.
fn one_hot<'a, S: Copy + PartialEq + 'a>(
    text: &mut Exposition,
    (name, help): (&str, &str),
    (label, all, as_str): (&str, &[S], fn(S) -> &'static str),
    rows: impl Iterator<Item = (&'a String, S)>,
) {
    text.family(name, Kind::Gauge, help);
    for (thing, current) in rows {
        for &state in all {
            text.sample(
                name,
                &[(label, thing), ("state", as_str(state))],
                current == state,
            );
        }
    }
}

/// The families labelled `token`.
fn token_families(text: &mut Exposition, snapshot: &Snapshot) {
    use Kind::{Counter, Gauge};
    one_hot(
        text,
        (
            "token_state",
            "The state of the token's socket: 1 for the state it is in, 0 for the others.",
        ),
        ("token", &TokenState::ALL, TokenState::as_str),
        snapshot
            .tokens
            .iter()
            .map(|(token, status)| (token, status.state)),
    );
    let families: [TokenFamily; 13] = [
        ("token_subscribed", Gauge, "1 while Chatwoot has confirmed the token's subscription, else 0.", |t| (t.state == TokenState::Subscribed).into()),
        ("token_connects_total", Counter, "WebSocket handshakes that succeeded.", |t| t.connects.into()),
        ("token_subscriptions_unconfirmed_total", Counter, "Subscriptions given up because no confirm came within confirm_timeout (Chatwoot's answer to a wrong or rotated token).", |t| t.unconfirmed_subscriptions.into()),
        ("token_subscriptions_rejected_total", Counter, "Subscriptions the server refused with reject_subscription.", |t| t.rejected_subscriptions.into()),
        ("token_rotations_total", Counter, "Rotations of the pubsub token the profile showed (tokens given as API access tokens); the socket resubscribed with the new one.", |t| t.rotations.into()),
        ("token_backfills_total", Counter, "Gap backfills run over the REST API after a resubscribe (tokens with backfill).", |t| t.backfills.into()),
        ("token_backfilled_events_total", Counter, "Events a backfill read over REST and handed over, marked chatwootbackfill.", |t| t.backfilled_events.into()),
        ("token_backfill_gaps_given_up_total", Counter, "Gaps not backfilled: longer than backfill.max_gap, or the REST API kept failing.", |t| t.backfill_gaps_given_up.into()),
        ("token_stalled", Gauge, "1 while the subscribed socket has not delivered activity the REST API showed stall_after ago (Chatwoot's broadcasts stalled), else 0.", |t| t.stalled_since.is_some().into()),
        ("token_stalls_total", Counter, "Stalls noticed: activity the REST API showed that the subscribed socket did not deliver within stall_after.", |t| t.stalls.into()),
        ("token_frames_received_total", Counter, "WebSocket messages read from the socket, pings included.", |t| t.frames.into()),
        ("token_events_received_total", Counter, "Events read from the socket.", |t| t.events.into()),
        ("token_malformed_frames_total", Counter, "Frames skipped because they could not be decoded (or nested too deep).", |t| t.malformed_frames.into()),
    ];
    for (name, kind, help, value) in families {
        per_token(text, snapshot, (name, kind, help), value);
    }
    text.family(
        "token_reconnects_total",
        Counter,
        "Reconnects, by why the connection before ended.",
    );
    for (token, status) in &snapshot.tokens {
        for reason in ReconnectReason::ALL {
            text.sample(
                "token_reconnects_total",
                &[("token", token), ("reason", reason.as_str())],
                status.reconnects.get(reason),
            );
        }
    }
    per_token(
        text,
        snapshot,
        (
            "token_last_event_age_seconds",
            Gauge,
            "Seconds since the token's last event (since it started, if none came yet).",
        ),
        |t| snapshot.age(t.last_event_at).into(),
    );
    per_token(text, snapshot, ("token_last_ping_age_seconds", Gauge, "Seconds since the server's last ActionCable ping on the token's socket (since it started, if none came yet)."), |t| snapshot.age(t.last_ping_at).into());
}

/// The families labelled `sink`, but the latency histogram.
fn sink_families(text: &mut Exposition, snapshot: &Snapshot) {
    use Kind::{Counter, Gauge};
    one_hot(
        text,
        (
            "sink_state",
            "The state of the sink's delivery loop: 1 for the state it is in, 0 for the others.",
        ),
        ("sink", &SinkState::ALL, SinkState::as_str),
        snapshot
            .sinks
            .iter()
            .map(|(sink, status)| (sink, status.state)),
    );
    let families: [SinkFamily; 7] = [
        ("sink_events_delivered_total", Counter, "Events the sink confirmed.", |s| s.delivered),
        ("sink_retries_total", Counter, "Waits before a retry: how often deliveries failed and were tried again.", |s| s.retries),
        ("sink_events_dead_lettered_total", Counter, "Events that exhausted their retries or were refused for good, and went to the dead letters.", |s| s.dead_lettered),
        ("sink_events_pushed_out_total", Counter, "Events pushed out of a full spool into this sink's dead letters before it delivered them.", |s| s.pushed_out),
        ("sink_events_parked", Gauge, "Events set aside in the sink's retry set now (conversations that failed for retry.park_after).", |s| s.parked),
        ("sink_events_in_flight", Gauge, "Events handed to the sink and not confirmed yet.", |s| s.in_flight),
        ("sink_loop_restarts_total", Counter, "Restarts of the sink's delivery loop after it died.", |s| s.delivery_loop.restarts),
    ];
    for (name, kind, help, value) in families {
        text.family(name, kind, help);
        for (sink, status) in &snapshot.sinks {
            text.sample(name, &[("sink", sink)], value(status));
        }
    }
    let backlogs = [
        ("sink_backlog_events", "Events routed to the sink and not committed yet.", false),
        ("sink_backlog_bytes", "Bytes of the spool after the sink's committed cursor (the segment holding the cursor counted in proportion).", true),
    ];
    for (name, help, bytes) in backlogs {
        text.family(name, Gauge, help);
        for backlog in &snapshot.spool.sinks {
            let value = if bytes { backlog.bytes } else { backlog.events };
            text.sample(name, &[("sink", &backlog.name)], value);
        }
    }
    text.family("sink_oldest_undelivered_age_seconds", Gauge, "Seconds since the oldest event the sink has taken and not finished was received; 0 when it is caught up (parked events not counted).");
    for (sink, status) in &snapshot.sinks {
        let age = status
            .oldest_undelivered_at
            .map_or(0.0, |t| snapshot.age(t));
        text.sample(
            "sink_oldest_undelivered_age_seconds",
            &[("sink", sink)],
            age,
        );
    }
}

/// `sink_delivery_latency_seconds`: receive to confirmation, per sink.
fn latency_family(text: &mut Exposition, snapshot: &Snapshot) {
    let name = "sink_delivery_latency_seconds";
    text.family(
        name,
        Kind::Histogram,
        "Seconds from an event's receipt on the socket to the sink's confirmation.",
    );
    let bucket = format!("{name}_bucket");
    for (sink, latencies) in &snapshot.latencies {
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&latencies.cumulative) {
            let le = bound.to_string();
            text.sample(&bucket, &[("sink", sink), ("le", &le)], *count);
        }
        text.sample(&bucket, &[("sink", sink), ("le", "+Inf")], latencies.count);
        text.sample(
            &format!("{name}_sum"),
            &[("sink", sink)],
            latencies.sum_seconds,
        );
        text.sample(&format!("{name}_count"), &[("sink", sink)], latencies.count);
    }
}

/// The families of the whole process.
fn process_families(text: &mut Exposition, snapshot: &Snapshot) {
    use Kind::{Counter, Gauge};
    text.family("spool_bytes", Gauge, "Size of the spool's segment files.");
    text.sample("spool_bytes", &[], snapshot.spool.bytes);
    text.family(
        "spool_max_bytes",
        Gauge,
        "The spool's cap (spool.max_bytes).",
    );
    text.sample("spool_max_bytes", &[], snapshot.spool.max_bytes);
    text.family(
        "events_spooled_total",
        Counter,
        "Events appended to the spool.",
    );
    text.sample("events_spooled_total", &[], snapshot.spooled);
    text.family("events_dropped_total", Counter, "Events lost, by reason: refused or deleted by a full spool (when_full: drop_newest, drop_oldest), not stored by the shutdown deadline, or an undecodable spool record.");
    for (reason, count) in snapshot.dropped {
        text.sample("events_dropped_total", &[("reason", reason)], count);
    }
    // The family is announced even before an event goes unmatched, so that a query on it finds
    // the name (its samples appear with the first event of each name).
    text.family(
        "events_unmatched_total",
        Counter,
        "Events no route matched, by event name (they went to the unmatched sink, if one is set).",
    );
    for (event, count) in &snapshot.unmatched {
        text.sample("events_unmatched_total", &[("event", event)], *count);
    }
    text.family(
        "ingest_restarts_total",
        Counter,
        "Restarts of the ingest after it died.",
    );
    text.sample("ingest_restarts_total", &[], snapshot.ingest.restarts);
    text.family(
        "build_info",
        Gauge,
        "Always 1; the version of the running bridge is its label.",
    );
    text.sample(
        "build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1u64,
    );
    text.family(
        "config_reloads_total",
        Counter,
        "Config reloads, by whether they took effect.",
    );
    text.sample(
        "config_reloads_total",
        &[("result", "success")],
        snapshot.config.reloads_succeeded,
    );
    text.sample(
        "config_reloads_total",
        &[("result", "failure")],
        snapshot.config.reloads_failed,
    );
    text.family(
        "config_info",
        Gauge,
        "Always 1; the hash of the config that runs (secrets left out) is its label.",
    );
    text.sample("config_info", &[("hash", &snapshot.config.hash)], 1u64);
    text.family("config_last_reload_success_timestamp_seconds", Gauge, "When the config that runs was loaded, at start or by the last successful reload, in seconds since the Unix epoch.");
    let loaded = snapshot
        .config
        .last_success
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    text.sample("config_last_reload_success_timestamp_seconds", &[], loaded);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut text = Exposition { out: String::new() };
        text.family("x_total", Kind::Counter, "a \\ b\nc");
        text.sample("x_total", &[("event", "a\"b\\c\nd")], 3u64);
        text.sample("x_total", &[("event", "ok")], f64::INFINITY);
        assert_eq!(
            text.out,
            "# HELP chatwoot_bridge_x_total a \\\\ b\\nc\n\
             # TYPE chatwoot_bridge_x_total counter\n\
             chatwoot_bridge_x_total{event=\"a\\\"b\\\\c\\nd\"} 3\n\
             chatwoot_bridge_x_total{event=\"ok\"} +Inf\n"
        );
    }
}
