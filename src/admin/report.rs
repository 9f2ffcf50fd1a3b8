//! What `/status`, `/healthz` and `/readyz` say, and the snapshot they (and `/metrics`) are read
//! from: the status board, the pipeline's counters and the spool, each read once per request.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{ConfigView, ReadyRequires, Sources};
use crate::spool::SpoolUsage;
use crate::status::{ConfigStatus, Latencies, LoopStatus, SinkStatus, TokenState, TokenStatus};

/// The bridge's state read at one moment, for one request.
#[derive(Debug)]
pub(super) struct Snapshot {
    /// When it was read: ages are measured from here.
    pub(super) at: SystemTime,
    /// Every token's status, by name.
    pub(super) tokens: BTreeMap<String, TokenStatus>,
    /// Every sink's status, by name.
    pub(super) sinks: BTreeMap<String, SinkStatus>,
    /// Every sink's delivery latency histogram, by name.
    pub(super) latencies: BTreeMap<String, Latencies>,
    /// The spool's size and each sink's backlog.
    pub(super) spool: SpoolUsage,
    /// Whether the ingest's last append worked.
    pub(super) spool_writable: bool,
    /// Whether the ingest runs, and its restarts.
    pub(super) ingest: LoopStatus,
    /// The config's hash and its reloads.
    pub(super) config: ConfigStatus,
    /// Events appended to the spool since start.
    pub(super) spooled: u64,
    /// Events lost since start, by reason (the `reason` label of `events_dropped_total`).
    pub(super) dropped: [(&'static str, u64); 4],
    /// Events no route matched, by event name.
    pub(super) unmatched: BTreeMap<String, u64>,
}

impl Snapshot {
    /// Reads everything now.
    pub(super) fn take(sources: &Sources) -> Snapshot {
        let stats = &sources.stats;
        let tokens = sources.status.tokens();
        let at_stop: u64 = tokens.values().map(|t| t.dropped_at_stop).sum();
        let count = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        Snapshot {
            at: SystemTime::now(),
            sinks: sources.status.sinks(),
            latencies: sources.status.sink_latencies(),
            spool: sources.spool.usage(),
            spool_writable: !stats.append_failing.load(Ordering::Relaxed),
            ingest: sources.status.ingest(),
            config: sources.status.config(),
            spooled: count(&stats.spooled),
            dropped: [
                ("spool_full_drop_newest", count(&stats.spool_dropped_newest)),
                ("spool_full_drop_oldest", count(&stats.spool_dropped_oldest)),
                ("shutdown_deadline", count(&stats.not_spooled) + at_stop),
                ("undecodable_record", count(&stats.undecodable)),
            ],
            unmatched: stats.unmatched.lock().expect("stats lock").clone(),
            tokens,
        }
    }

    /// Seconds from `then` to when the snapshot was taken (0 for a time after it).
    pub(super) fn age(&self, then: SystemTime) -> f64 {
        self.at
            .duration_since(then)
            .map_or(0.0, |d| d.as_secs_f64())
    }
}

/// Why the process is not ready: each required token not subscribed, and a spool that refuses
/// appends (none: ready).
pub(super) fn readiness_problems(
    view: &ConfigView,
    tokens: &BTreeMap<String, TokenStatus>,
    spool_writable: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let not_subscribed = |name: &String| match tokens.get(name) {
        Some(status) if status.state == TokenState::Subscribed => None,
        Some(status) => Some(format!(
            "token {name} is {}{}",
            status.state,
            status
                .last_error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        )),
        None => Some(format!("token {name} is not running")),
    };
    match &view.ready_requires {
        ReadyRequires::All => problems.extend(view.tokens.iter().filter_map(not_subscribed)),
        ReadyRequires::Tokens(names) => problems.extend(names.iter().filter_map(not_subscribed)),
        ReadyRequires::Any => {
            let waiting: Vec<String> = view.tokens.iter().filter_map(not_subscribed).collect();
            if waiting.len() == view.tokens.len() {
                problems.push(format!(
                    "no token is subscribed (ready_requires: any): {}",
                    waiting.join("; ")
                ));
            }
        }
    }
    if !spool_writable {
        problems.push("the spool refuses appends (see the log); the sockets are held back".into());
    }
    problems
}

/// `/status`: the whole state in JSON, for people, scripts and `chatwoot-bridge top`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The bridge's version.
    pub version: String,
    /// Whether `/healthz` says ok.
    pub healthy: bool,
    /// Why not, one line per loop that died.
    pub unhealthy_because: Vec<String>,
    /// Whether `/readyz` says ready.
    pub ready: bool,
    /// Why not, one line per reason.
    pub not_ready_because: Vec<String>,
    /// The config that runs.
    pub config: ConfigReport,
    /// Every token, by name.
    pub tokens: BTreeMap<String, TokenReport>,
    /// Every sink, by name.
    pub sinks: BTreeMap<String, SinkReport>,
    /// The spool.
    pub spool: SpoolReport,
    /// The pipeline's event counts.
    pub events: EventsReport,
}

/// The config that runs, in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigReport {
    /// Its hash, as in `config_info`.
    pub hash: String,
    /// Reloads that took effect.
    pub reloads_succeeded: u64,
    /// Reloads refused or failed.
    pub reloads_failed: u64,
    /// When it was loaded, RFC 3339.
    pub loaded_at: String,
}

/// One token in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenReport {
    /// Where its socket is (`subscribed`, `unconfirmed`, ...).
    pub state: String,
    /// Since when, RFC 3339.
    pub since: String,
    /// Why the last connection or subscription failed; never the token.
    pub last_error: Option<String>,
    /// Events read.
    pub events: u64,
    /// WebSocket messages read.
    pub frames: u64,
    /// Handshakes that succeeded.
    pub connects: u64,
    /// Reconnects, by reason.
    pub reconnects: BTreeMap<String, u64>,
    /// Subscriptions given up for want of a confirm.
    pub unconfirmed_subscriptions: u64,
    /// Subscriptions the server refused.
    pub rejected_subscriptions: u64,
    /// Frames skipped as malformed.
    pub malformed_frames: u64,
    /// Rotations of the pubsub token followed (tokens given as API access tokens).
    pub rotations: u64,
    /// Gaps (and stalled spans) backfilled over the REST API.
    pub backfills: u64,
    /// Events backfills handed over.
    pub backfilled_events: u64,
    /// Gaps not backfilled; events may be lost.
    pub backfill_gaps_given_up: u64,
    /// Since when the subscribed socket has not delivered activity the REST API showed
    /// (a stall), RFC 3339; `null` while it delivers.
    pub stalled_since: Option<String>,
    /// Stalls noticed.
    pub stalls: u64,
    /// When the last rotation of the pubsub token was followed, RFC 3339.
    pub last_rotation_at: Option<String>,
    /// The last backfill that ended.
    pub last_backfill: Option<BackfillReport>,
    /// Seconds since the last event (since the token started, if none yet).
    pub last_event_age_seconds: f64,
    /// Seconds since the server's last ping (since the token started, if none yet).
    pub last_ping_age_seconds: f64,
}

/// The last backfill of a token in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackfillReport {
    /// The start of the span read, RFC 3339.
    pub from: String,
    /// Its end, RFC 3339.
    pub to: String,
    /// When it ended, RFC 3339.
    pub ended_at: String,
    /// Events it handed over.
    pub events: u64,
    /// Why it was given up; `null` when it ran to its end.
    pub given_up: Option<String>,
}

/// One sink in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkReport {
    /// Where its delivery loop is (`idle`, `delivering`, `retrying`, `stopped`).
    pub state: String,
    /// Since when, RFC 3339.
    pub since: String,
    /// The latest delivery error; never a secret.
    pub last_error: Option<String>,
    /// Events delivered.
    pub delivered: u64,
    /// Waits before a retry.
    pub retries: u64,
    /// Events that went to the dead letters.
    pub dead_lettered: u64,
    /// Events pushed out of a full spool into its dead letters.
    pub pushed_out: u64,
    /// Events parked in its retry set now.
    pub parked: u64,
    /// Events handed over and not confirmed now.
    pub in_flight: u64,
    /// Events routed to it and not committed.
    pub backlog_events: u64,
    /// The spool's bytes after its cursor.
    pub backlog_bytes: u64,
    /// Seconds since the oldest event it has not finished was received; 0 when caught up.
    pub oldest_undelivered_age_seconds: f64,
    /// Whether its delivery loop runs.
    pub loop_alive: bool,
    /// How often its delivery loop was restarted.
    pub loop_restarts: u64,
}

/// The spool in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpoolReport {
    /// Its size.
    pub bytes: u64,
    /// Its cap.
    pub max_bytes: u64,
    /// Whether the last append worked.
    pub writable: bool,
}

/// The pipeline's counts in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsReport {
    /// Appended to the spool.
    pub spooled: u64,
    /// Lost, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Matched no route, by event name.
    pub unmatched: BTreeMap<String, u64>,
    /// Whether the ingest runs.
    pub ingest_alive: bool,
    /// How often the ingest was restarted.
    pub ingest_restarts: u64,
}

/// An RFC 3339 time with milliseconds.
fn rfc3339(t: SystemTime) -> String {
    // humantime refuses years past 9999 with a formatting error, which to_string would turn
    // into a panic; no time the bridge keeps should be there, but a report must not panic.
    use std::fmt::Write;
    // It also panics on a time before 1970.
    if t < SystemTime::UNIX_EPOCH {
        return "invalid time".to_owned();
    }
    let mut text = String::new();
    match write!(text, "{}", humantime::format_rfc3339_millis(t)) {
        Ok(()) => text,
        Err(_) => "invalid time".to_owned(),
    }
}

impl StatusReport {
    /// The report of `snapshot`, with the verdicts of `/healthz` and `/readyz`.
    pub(super) fn new(
        snapshot: &Snapshot,
        unhealthy_because: Vec<String>,
        not_ready_because: Vec<String>,
    ) -> StatusReport {
        let tokens = snapshot
            .tokens
            .iter()
            .map(|(name, t)| (name.clone(), token_report(snapshot, t)))
            .collect();
        let backlogs: BTreeMap<&str, (u64, u64)> = snapshot
            .spool
            .sinks
            .iter()
            .map(|s| (s.name.as_str(), (s.events, s.bytes)))
            .collect();
        let sinks = snapshot
            .sinks
            .iter()
            .map(|(name, s)| {
                let backlog = backlogs.get(name.as_str()).copied().unwrap_or_default();
                (name.clone(), sink_report(snapshot, s, backlog))
            })
            .collect();
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            healthy: unhealthy_because.is_empty(),
            unhealthy_because,
            ready: not_ready_because.is_empty(),
            not_ready_because,
            config: ConfigReport {
                hash: snapshot.config.hash.clone(),
                reloads_succeeded: snapshot.config.reloads_succeeded,
                reloads_failed: snapshot.config.reloads_failed,
                loaded_at: rfc3339(snapshot.config.last_success),
            },
            tokens,
            sinks,
            spool: SpoolReport {
                bytes: snapshot.spool.bytes,
                max_bytes: snapshot.spool.max_bytes,
                writable: snapshot.spool_writable,
            },
            events: EventsReport {
                spooled: snapshot.spooled,
                dropped: snapshot
                    .dropped
                    .iter()
                    .map(|(reason, n)| (reason.to_string(), *n))
                    .collect(),
                unmatched: snapshot.unmatched.clone(),
                ingest_alive: snapshot.ingest.alive,
                ingest_restarts: snapshot.ingest.restarts,
            },
        }
    }
}

/// One token's part of the report.
fn token_report(snapshot: &Snapshot, t: &TokenStatus) -> TokenReport {
    let reconnects = crate::status::ReconnectReason::ALL
        .iter()
        .map(|r| (r.as_str().to_owned(), t.reconnects.get(*r)))
        .collect();
    TokenReport {
        state: t.state.as_str().into(),
        since: rfc3339(t.since),
        last_error: t.last_error.clone(),
        events: t.events,
        frames: t.frames,
        connects: t.connects,
        reconnects,
        unconfirmed_subscriptions: t.unconfirmed_subscriptions,
        rejected_subscriptions: t.rejected_subscriptions,
        malformed_frames: t.malformed_frames,
        rotations: t.rotations,
        backfills: t.backfills,
        backfilled_events: t.backfilled_events,
        backfill_gaps_given_up: t.backfill_gaps_given_up,
        stalled_since: t.stalled_since.map(rfc3339),
        stalls: t.stalls,
        last_rotation_at: t.last_rotation_at.map(rfc3339),
        last_backfill: t.last_backfill.as_ref().map(|b| BackfillReport {
            from: rfc3339(b.from),
            to: rfc3339(b.to),
            ended_at: rfc3339(b.ended_at),
            events: b.events,
            given_up: b.given_up.clone(),
        }),
        last_event_age_seconds: snapshot.age(t.last_event_at),
        last_ping_age_seconds: snapshot.age(t.last_ping_at),
    }
}

/// One sink's part of the report; `backlog` is its events and bytes in the spool.
fn sink_report(snapshot: &Snapshot, s: &SinkStatus, backlog: (u64, u64)) -> SinkReport {
    SinkReport {
        state: s.state.as_str().into(),
        since: rfc3339(s.since),
        last_error: s.last_error.clone(),
        delivered: s.delivered,
        retries: s.retries,
        dead_lettered: s.dead_lettered,
        pushed_out: s.pushed_out,
        parked: s.parked,
        in_flight: s.in_flight,
        backlog_events: backlog.0,
        backlog_bytes: backlog.1,
        oldest_undelivered_age_seconds: s.oldest_undelivered_at.map_or(0.0, |t| snapshot.age(t)),
        loop_alive: s.delivery_loop.alive,
        loop_restarts: s.delivery_loop.restarts,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::status::StatusBoard;

    #[test]
    fn a_time_out_of_rfc3339s_range_is_shown_not_panicked_on() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(rfc3339(epoch), "1970-01-01T00:00:00.000Z");
        let far = epoch + std::time::Duration::from_secs(400_000_000_000);
        assert_eq!(rfc3339(far), "invalid time");
        let before = epoch - std::time::Duration::from_secs(1);
        assert_eq!(rfc3339(before), "invalid time");
    }

    fn view(ready_requires: ReadyRequires) -> ConfigView {
        ConfigView {
            ready_requires,
            tokens: ["a".into(), "b".into()].into(),
            ..ConfigView::default()
        }
    }

    #[test]
    fn readiness_counts_the_tokens_ready_requires_names_and_the_spool() {
        let board = StatusBoard::new();
        let a = board.register(&Arc::from("a"));
        let b = board.register(&Arc::from("b"));
        a.set(TokenState::Subscribed);
        b.fail(TokenState::Rejected, "server rejected the subscription");
        let tokens = board.tokens();
        let problems = readiness_problems(&view(ReadyRequires::All), &tokens, true);
        assert_eq!(
            problems,
            ["token b is rejected (server rejected the subscription)"]
        );
        assert!(readiness_problems(&view(ReadyRequires::Any), &tokens, true).is_empty());
        let only_a = ReadyRequires::Tokens(vec!["a".into()]);
        assert!(readiness_problems(&view(only_a.clone()), &tokens, true).is_empty());
        let problems = readiness_problems(&view(only_a), &tokens, false);
        assert!(
            problems[0].starts_with("the spool refuses appends"),
            "{problems:?}"
        );
        a.set(TokenState::BackingOff);
        let problems = readiness_problems(&view(ReadyRequires::Any), &board.tokens(), true);
        assert!(
            problems[0].starts_with("no token is subscribed"),
            "{problems:?}"
        );
        let none = ReadyRequires::Tokens(vec![]);
        assert!(readiness_problems(&view(none), &board.tokens(), true).is_empty());
        board.unregister("b");
        let problems = readiness_problems(
            &view(ReadyRequires::Tokens(vec!["b".into()])),
            &board.tokens(),
            true,
        );
        assert_eq!(problems, ["token b is not running"]);
    }

    #[test]
    fn a_loop_that_panics_makes_the_process_unhealthy_until_it_is_restarted() {
        let board = StatusBoard::new();
        let sink = board.register_sink("out");
        assert!(board.health_problems().is_empty());
        sink.loop_panicked("a bug in the loop");
        assert_eq!(
            board.health_problems(),
            ["sink out's delivery loop died (restarts so far: 1)"]
        );
        sink.set_alive(true);
        assert!(board.health_problems().is_empty());
        board.ingest_panicked();
        assert_eq!(
            board.health_problems(),
            ["the ingest died (restarts so far: 1)"]
        );
        board.set_ingest_alive(true);
        assert!(board.health_problems().is_empty());
    }
}
