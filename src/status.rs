//! One place that holds the state of every token and every sink, so logs, health, metrics,
//! status pages and tests read the same thing.

mod latency;
mod process;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::event::Event;
use latency::LatencyHistogram;
pub use latency::{Latencies, LATENCY_BUCKETS};
pub(crate) use process::ConfigCell;
use process::LoopHealth;
pub use process::{ConfigStatus, LoopStatus};

/// Where a token's socket is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// Opening TCP, TLS and the WebSocket handshake.
    Connecting,
    /// `subscribe` sent, no `confirm_subscription` yet.
    Pending,
    /// Confirmed: events flow.
    Subscribed,
    /// No confirm within the timeout. Chatwoot's answer to a wrong or rotated token is silence.
    Unconfirmed,
    /// The server sent `reject_subscription`.
    Rejected,
    /// Waiting before the next connect after a failure.
    BackingOff,
    /// Removed or shut down.
    Stopped,
    /// Chatwoot refused the token's API access token (401 or 403 on the profile), or does not
    /// know the contact given by its identifiers (404 on the public contact API): no pubsub
    /// token to subscribe with until it is accepted.
    ApiTokenRefused,
}

impl TokenState {
    /// Every state, in the order metrics list them.
    pub const ALL: [TokenState; 8] = [
        TokenState::Connecting,
        TokenState::Pending,
        TokenState::Subscribed,
        TokenState::Unconfirmed,
        TokenState::Rejected,
        TokenState::BackingOff,
        TokenState::Stopped,
        TokenState::ApiTokenRefused,
    ];

    /// The state's name, as it is serialized: a metric label value without a lookup.
    pub const fn as_str(self) -> &'static str {
        match self {
            TokenState::Connecting => "connecting",
            TokenState::Pending => "pending",
            TokenState::Subscribed => "subscribed",
            TokenState::Unconfirmed => "unconfirmed",
            TokenState::Rejected => "rejected",
            TokenState::BackingOff => "backing_off",
            TokenState::Stopped => "stopped",
            TokenState::ApiTokenRefused => "api_token_refused",
        }
    }
}

impl fmt::Display for TokenState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a token's socket was opened again: its connection ended, or never opened, for this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconnectReason {
    /// TCP, TLS or the WebSocket handshake failed or timed out.
    ConnectFailed,
    /// An open connection failed or was closed (a Chatwoot deploy drops TCP).
    ConnectionLost,
    /// No frame for `stale_after`: the socket was given up as dead.
    Stale,
    /// The server sent `disconnect` with `reconnect: true`.
    ServerDisconnect,
    /// The server sent `disconnect` with `reconnect: false`: a long wait first.
    ServerDisconnectNoReconnect,
    /// The token's task panicked and was restarted.
    TaskPanicked,
    /// The WebSocket opened but no `welcome` came within `connect_timeout`: the server never
    /// set the connection up, so nothing could be subscribed on it.
    NoWelcome,
}

impl ReconnectReason {
    /// How many reasons there are: the length of a token's reconnect counters.
    pub const COUNT: usize = 7;

    /// Every reason, in the order metrics list them.
    pub const ALL: [ReconnectReason; ReconnectReason::COUNT] = [
        ReconnectReason::ConnectFailed,
        ReconnectReason::ConnectionLost,
        ReconnectReason::Stale,
        ReconnectReason::ServerDisconnect,
        ReconnectReason::ServerDisconnectNoReconnect,
        ReconnectReason::TaskPanicked,
        ReconnectReason::NoWelcome,
    ];

    /// The reason's name, as it is serialized: a metric label value without a lookup.
    pub const fn as_str(self) -> &'static str {
        match self {
            ReconnectReason::ConnectFailed => "connect_failed",
            ReconnectReason::ConnectionLost => "connection_lost",
            ReconnectReason::Stale => "stale",
            ReconnectReason::ServerDisconnect => "server_disconnect",
            ReconnectReason::ServerDisconnectNoReconnect => "server_disconnect_no_reconnect",
            ReconnectReason::TaskPanicked => "task_panicked",
            ReconnectReason::NoWelcome => "no_welcome",
        }
    }
}

/// A token's reconnects, one count per [`ReconnectReason`]; serialized as a map by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconnectCounts([u64; ReconnectReason::COUNT]);

impl ReconnectCounts {
    /// The reconnects for `reason`.
    pub fn get(&self, reason: ReconnectReason) -> u64 {
        self.0[reason as usize]
    }

    /// Every reconnect, whatever its reason.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl Serialize for ReconnectCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(
            ReconnectReason::ALL
                .iter()
                .map(|r| (r.as_str(), self.get(*r))),
        )
    }
}

/// A copy of one token's status at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct TokenStatus {
    /// Where the socket is.
    pub state: TokenState,
    /// When the token entered `state`.
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
    /// Why the last connection or subscription failed; never contains the token.
    pub last_error: Option<String>,
    /// Successful WebSocket handshakes.
    pub connects: u64,
    /// Events read from the socket.
    pub events: u64,
    /// Events read from the socket that the task still held when it was stopped, waiting for
    /// room in a full pipeline (or finding it closed): never spooled, so lost. Only a shutdown
    /// whose disk or ingest was stuck leaves any.
    pub dropped_at_stop: u64,
    /// Frames that could not be decoded and were skipped.
    pub malformed_frames: u64,
    /// Reconnects caused by silence (no ping within the stale timeout); also in `reconnects`.
    pub stale_reconnects: u64,
    /// Reconnects by why the connection before ended.
    pub reconnects: ReconnectCounts,
    /// Subscriptions given up because no confirm came within `confirm_timeout`.
    pub unconfirmed_subscriptions: u64,
    /// Subscriptions the server refused with `reject_subscription`.
    pub rejected_subscriptions: u64,
    /// Changes of the pubsub token the profile showed (a token given as an API access token):
    /// each one a rotation the socket followed.
    pub rotations: u64,
    /// Backfills run to their end: a reconnect's or a rotation's gap, a restart's downtime,
    /// a stalled span (tokens with `backfill`).
    pub backfills: u64,
    /// Events a backfill read over REST and handed over, marked `chatwootbackfill`.
    pub backfilled_events: u64,
    /// Gaps not backfilled: longer than `backfill.max_gap`, too many conversations or
    /// messages, the REST API failing, or the pipeline closed at shutdown.
    pub backfill_gaps_given_up: u64,
    /// Since when the subscribed socket has not delivered activity the REST API showed
    /// `stall_after` ago (a stall); `None` while it delivers.
    #[serde(serialize_with = "optional_rfc3339")]
    pub stalled_since: Option<SystemTime>,
    /// When the last rotation of the pubsub token was followed.
    #[serde(serialize_with = "optional_rfc3339")]
    pub last_rotation_at: Option<SystemTime>,
    /// The last backfill that ended: which span, how many events, whether it was given up.
    pub last_backfill: Option<BackfillRecord>,
    /// Stalls noticed.
    pub stalls: u64,
    /// WebSocket messages read (text, binary, ping and pong): proof the socket lives, even
    /// while no event comes.
    pub frames: u64,
    /// When the last event was read; when the token started if none was yet, so that its age
    /// grows from the start for a token that never gets one.
    #[serde(serialize_with = "rfc3339")]
    pub last_event_at: SystemTime,
    /// When the server's last ActionCable ping came; when the token started if none did yet.
    #[serde(serialize_with = "rfc3339")]
    pub last_ping_at: SystemTime,
}

/// One backfill that ended, as `/status` shows the last one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackfillRecord {
    /// The start of the span read (the last healthy moment, or a stall's earliest activity).
    #[serde(serialize_with = "rfc3339")]
    pub from: SystemTime,
    /// Its end (the resubscribe, or when the stall was noticed).
    #[serde(serialize_with = "rfc3339")]
    pub to: SystemTime,
    /// When it ended.
    #[serde(serialize_with = "rfc3339")]
    pub ended_at: SystemTime,
    /// Events it handed over.
    pub events: u64,
    /// Why it was given up; `None` when it ran to its end.
    pub given_up: Option<String>,
}

/// Serializes a time as RFC 3339 with milliseconds.
fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// Serializes a time that may be missing as RFC 3339 with milliseconds, or null.
fn optional_rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// `t` in milliseconds since the Unix epoch (0 for a time before it): a time an atomic holds.
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The time `ms` milliseconds after the Unix epoch.
fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// A state, since when, and the last failure: the part every token and sink has.
#[derive(Debug)]
struct Phase<S> {
    /// State, when it was entered, and the latest failure; one lock so they read consistently.
    inner: Mutex<(S, SystemTime, Option<String>)>,
}

impl<S: Copy + PartialEq> Phase<S> {
    fn new(state: S) -> Self {
        Phase {
            inner: Mutex::new((state, SystemTime::now(), None)),
        }
    }

    /// Enters `state` (keeping the time if it is the same) and records `error` if given.
    /// Returns whether anything changed.
    fn update(&self, state: S, error: Option<String>) -> bool {
        let mut guard = self.inner.lock().expect("status lock");
        if guard.0 == state && error.is_none() {
            return false;
        }
        if guard.0 != state {
            guard.0 = state;
            guard.1 = SystemTime::now();
        }
        if error.is_some() {
            guard.2 = error;
        }
        true
    }

    fn get(&self) -> (S, SystemTime, Option<String>) {
        self.inner.lock().expect("status lock").clone()
    }
}

/// Shared cell a token task writes and everyone else reads.
#[derive(Debug)]
struct TokenCell {
    /// State, since when, and the last failure.
    phase: Phase<TokenState>,
    /// See [`TokenStatus::connects`].
    connects: AtomicU64,
    /// See [`TokenStatus::events`].
    events: AtomicU64,
    /// See [`TokenStatus::dropped_at_stop`].
    dropped_at_stop: AtomicU64,
    /// See [`TokenStatus::malformed_frames`].
    malformed_frames: AtomicU64,
    /// See [`TokenStatus::reconnects`], one per [`ReconnectReason`].
    reconnects: [AtomicU64; ReconnectReason::COUNT],
    /// See [`TokenStatus::unconfirmed_subscriptions`].
    unconfirmed: AtomicU64,
    /// See [`TokenStatus::rejected_subscriptions`].
    rejected: AtomicU64,
    /// See [`TokenStatus::rotations`].
    rotations: AtomicU64,
    /// See [`TokenStatus::backfills`].
    backfills: AtomicU64,
    /// See [`TokenStatus::backfilled_events`].
    backfilled_events: AtomicU64,
    /// See [`TokenStatus::backfill_gaps_given_up`].
    backfill_gaps_given_up: AtomicU64,
    /// See [`TokenStatus::stalled_since`], in milliseconds since the Unix epoch; 0 when none.
    stalled_since_ms: AtomicU64,
    /// See [`TokenStatus::stalls`].
    stalls: AtomicU64,
    /// See [`TokenStatus::last_rotation_at`], in milliseconds since the Unix epoch; 0 when none.
    last_rotation_ms: AtomicU64,
    /// See [`TokenStatus::last_backfill`]; written once per backfill, so a lock costs nothing.
    last_backfill: Mutex<Option<BackfillRecord>>,
    /// See [`TokenStatus::frames`].
    frames: AtomicU64,
    /// See [`TokenStatus::last_event_at`], in milliseconds since the Unix epoch: a time that
    /// fits an atomic, stored once per event.
    last_event_ms: AtomicU64,
    /// See [`TokenStatus::last_ping_at`], in milliseconds since the Unix epoch.
    last_ping_ms: AtomicU64,
}

/// Where a sink's delivery loop is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkState {
    /// Caught up with the spool, waiting for events.
    Idle,
    /// Delivering a batch.
    Delivering,
    /// A batch failed and waits for its next attempt.
    Retrying,
    /// Shut down.
    Stopped,
}

impl SinkState {
    /// Every state, in the order metrics list them.
    pub const ALL: [SinkState; 4] = [
        SinkState::Idle,
        SinkState::Delivering,
        SinkState::Retrying,
        SinkState::Stopped,
    ];

    /// The state's name, as it is serialized: a metric label value without a lookup.
    pub const fn as_str(self) -> &'static str {
        match self {
            SinkState::Idle => "idle",
            SinkState::Delivering => "delivering",
            SinkState::Retrying => "retrying",
            SinkState::Stopped => "stopped",
        }
    }
}

/// A copy of one sink's status at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct SinkStatus {
    /// Where the delivery loop is.
    pub state: SinkState,
    /// When the sink entered `state`.
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
    /// The latest delivery error, in words; never contains secrets.
    pub last_error: Option<String>,
    /// Events delivered.
    pub delivered: u64,
    /// Events that exhausted their retries (or were refused for good) and went to the dead
    /// letters.
    pub dead_lettered: u64,
    /// Waits before a retry: how often deliveries failed and were tried again, so that an
    /// outage shows as it happens, not only once events reach the dead letters.
    pub retries: u64,
    /// Events set aside in the sink's retry set (conversations that failed for
    /// `retry.park_after`, with their later events), on disk, waiting to be retried.
    pub parked: u64,
    /// Events pushed out of the full spool into this sink's dead letters before it delivered
    /// them (`when_full: dead_letter`): the price of lagging, paid by this sink alone. Not
    /// included in `dead_lettered`.
    pub pushed_out: u64,
    /// Events handed to the sink and not confirmed yet (or a batch being retried).
    pub in_flight: u64,
    /// When the oldest event the loop has taken and not finished was received; `None` when the
    /// loop is caught up. Parked events are not counted: they are set aside, in `parked`.
    #[serde(serialize_with = "optional_rfc3339")]
    pub oldest_undelivered_at: Option<SystemTime>,
    /// Whether the delivery loop runs, and how often it was restarted.
    pub delivery_loop: LoopStatus,
}

/// Shared cell a sink loop writes and everyone else reads.
#[derive(Debug)]
struct SinkCell {
    /// State, since when, and the last failure.
    phase: Phase<SinkState>,
    /// See [`SinkStatus::delivered`].
    delivered: AtomicU64,
    /// See [`SinkStatus::dead_lettered`].
    dead_lettered: AtomicU64,
    /// See [`SinkStatus::retries`].
    retries: AtomicU64,
    /// See [`SinkStatus::parked`].
    parked: AtomicU64,
    /// See [`SinkStatus::pushed_out`].
    pushed_out: AtomicU64,
    /// See [`SinkStatus::in_flight`].
    in_flight: AtomicU64,
    /// See [`SinkStatus::oldest_undelivered_at`], in milliseconds since the Unix epoch; 0 for
    /// none.
    oldest_undelivered_ms: AtomicU64,
    /// Receive-to-confirmation times of the events delivered.
    latency: LatencyHistogram,
    /// Whether the delivery loop runs, and its restarts.
    health: Arc<LoopHealth>,
}

/// What a sink loop uses to report; counters are atomics so the hot path takes no lock.
#[derive(Clone, Debug)]
pub struct SinkReporter {
    /// This sink's cell on the board.
    cell: Arc<SinkCell>,
    /// The board's change counter, bumped so waiters wake up.
    changed: watch::Sender<u64>,
}

impl SinkReporter {
    /// Enters `state`, keeping the last error.
    pub(crate) fn set(&self, state: SinkState) {
        self.update(state, None);
    }

    /// A delivery failed and waits for its next attempt.
    pub(crate) fn retrying(&self, error: impl Into<String>) {
        self.cell.retries.fetch_add(1, Ordering::Relaxed);
        self.update(SinkState::Retrying, Some(error.into()));
    }

    fn update(&self, state: SinkState, error: Option<String>) {
        if self.cell.phase.update(state, error) {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Counts `events` as delivered now, each with its receive-to-confirmation time.
    pub(crate) fn delivered<'e>(&self, events: impl ExactSizeIterator<Item = &'e Event>) {
        self.cell
            .delivered
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.cell
            .latency
            .observe(SystemTime::now(), events.map(|e| e.received_at));
    }

    /// `n` events are handed to the sink and not confirmed yet.
    pub(crate) fn in_flight(&self, n: u64) {
        self.cell.in_flight.store(n, Ordering::Relaxed);
    }

    /// The oldest event the loop has taken and not finished was received at `received_at`;
    /// `None` once the loop is caught up.
    pub(crate) fn oldest_undelivered(&self, received_at: Option<SystemTime>) {
        // A time before the epoch would read as "none": it counts as the epoch's first ms.
        let ms = received_at.map_or(0, |t| unix_ms(t).max(1));
        self.cell.oldest_undelivered_ms.store(ms, Ordering::Relaxed);
    }

    /// The delivery loop panicked: counted as a restart, and not alive until it runs again.
    pub(crate) fn loop_panicked(&self, error: impl Into<String>) {
        self.cell.health.died();
        self.cell
            .phase
            .update(SinkState::Retrying, Some(error.into()));
        self.changed.send_modify(|v| *v += 1);
    }

    /// Whether the delivery loop runs now.
    pub(crate) fn set_alive(&self, alive: bool) {
        if self.cell.health.set_alive(alive) {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Counts `n` dead-lettered events.
    pub(crate) fn dead_lettered(&self, n: u64) {
        self.cell.dead_lettered.fetch_add(n, Ordering::Relaxed);
        self.changed.send_modify(|v| *v += 1);
    }

    /// `n` events are parked now.
    pub(crate) fn parked(&self, n: u64) {
        if self.cell.parked.swap(n, Ordering::Relaxed) != n {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Counts `n` events pushed out of the full spool into this sink's dead letters.
    pub(crate) fn pushed_out(&self, n: u64) {
        self.cell.pushed_out.fetch_add(n, Ordering::Relaxed);
        self.changed.send_modify(|v| *v += 1);
    }
}

/// The registry of token and sink states. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StatusBoard {
    /// Every running token's cell, by name.
    tokens: Arc<Mutex<BTreeMap<Arc<str>, Arc<TokenCell>>>>,
    /// Every sink's cell, by name.
    sinks: Arc<Mutex<BTreeMap<String, Arc<SinkCell>>>>,
    /// Bumped on every state change so waiters wake up without polling.
    changed: watch::Sender<u64>,
    /// Whether the ingest runs, and its restarts.
    ingest: Arc<LoopHealth>,
    /// The loaded config's hash and the reloads.
    config: Arc<ConfigCell>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard {
            tokens: Arc::default(),
            sinks: Arc::default(),
            changed: watch::channel(0).0,
            ingest: Arc::default(),
            config: Arc::default(),
        }
    }
}

/// What a token task uses to report; counters are atomics so the hot path takes no lock.
#[derive(Clone, Debug)]
pub(crate) struct TokenReporter {
    /// This token's cell on the board.
    cell: Arc<TokenCell>,
    /// The board's change counter, bumped so waiters wake up.
    changed: watch::Sender<u64>,
}

impl StatusBoard {
    /// An empty board.
    pub fn new() -> Self {
        Self::default()
    }

    /// The reporter for `name`, registering the token if it is new.
    pub(crate) fn register(&self, name: &Arc<str>) -> TokenReporter {
        let cell = self
            .tokens
            .lock()
            .expect("status lock")
            .entry(name.clone())
            .or_insert_with(|| Arc::new(TokenCell::new(SystemTime::now())))
            .clone();
        self.changed.send_modify(|v| *v += 1);
        TokenReporter {
            cell,
            changed: self.changed.clone(),
        }
    }

    /// The reporter for sink `name`, registering it if it is new.
    pub(crate) fn register_sink(&self, name: &str) -> SinkReporter {
        let cell = self
            .sinks
            .lock()
            .expect("status lock")
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(SinkCell {
                    phase: Phase::new(SinkState::Idle),
                    delivered: AtomicU64::new(0),
                    dead_lettered: AtomicU64::new(0),
                    retries: AtomicU64::new(0),
                    parked: AtomicU64::new(0),
                    pushed_out: AtomicU64::new(0),
                    in_flight: AtomicU64::new(0),
                    oldest_undelivered_ms: AtomicU64::new(0),
                    latency: LatencyHistogram::default(),
                    health: Arc::default(),
                })
            })
            .clone();
        SinkReporter {
            cell,
            changed: self.changed.clone(),
        }
    }

    /// Every sink's status, by name.
    pub fn sinks(&self) -> BTreeMap<String, SinkStatus> {
        self.sinks
            .lock()
            .expect("status lock")
            .iter()
            .map(|(name, cell)| (name.clone(), cell.snapshot()))
            .collect()
    }

    /// Every sink's delivery latency histogram, by name, read from its atomics.
    pub fn sink_latencies(&self) -> BTreeMap<String, Latencies> {
        self.sinks
            .lock()
            .expect("status lock")
            .iter()
            .map(|(name, cell)| (name.clone(), cell.latency.snapshot()))
            .collect()
    }

    /// The ingest panicked: counted as a restart, and not alive until it runs again.
    pub(crate) fn ingest_panicked(&self) {
        self.ingest.died();
        self.changed.send_modify(|v| *v += 1);
    }

    /// Whether the ingest runs now.
    pub(crate) fn set_ingest_alive(&self, alive: bool) {
        if self.ingest.set_alive(alive) {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Why the process is unhealthy: each loop that died and is not running again (none:
    /// healthy). What `/healthz` answers and what keeps the systemd watchdog fed.
    pub fn health_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let ingest = self.ingest();
        if !ingest.alive {
            problems.push(format!(
                "the ingest died (restarts so far: {})",
                ingest.restarts
            ));
        }
        for (name, sink) in self.sinks() {
            if !sink.delivery_loop.alive {
                problems.push(format!(
                    "sink {name}'s delivery loop died (restarts so far: {})",
                    sink.delivery_loop.restarts
                ));
            }
        }
        problems
    }

    /// Whether the ingest runs, and how often it was restarted.
    pub fn ingest(&self) -> LoopStatus {
        self.ingest.status()
    }

    /// The loaded config's hash, and how its reloads went.
    pub fn config(&self) -> ConfigStatus {
        self.config.status()
    }

    /// The config the process started with: its hash (`Config::hash`), loaded now. Not a
    /// reload.
    pub(crate) fn config_loaded(&self, hash: &str) {
        self.config.loaded(hash);
        self.changed.send_modify(|v| *v += 1);
    }

    /// A reload took effect: the config with `hash` runs from now on.
    pub(crate) fn config_reloaded(&self, hash: &str) {
        self.config.reloaded(hash);
        self.changed.send_modify(|v| *v += 1);
    }

    /// A reload was refused or failed, for `error` (every problem): the config before it keeps
    /// running.
    pub(crate) fn config_reload_failed(&self, error: &str) {
        self.config.reload_failed(error);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Forgets a sink that a reload removed, once its loop has ended.
    pub(crate) fn unregister_sink(&self, name: &str) {
        self.sinks.lock().expect("status lock").remove(name);
        self.changed.send_modify(|v| *v += 1);
    }

    /// One sink's status, if it exists.
    pub fn sink(&self, name: &str) -> Option<SinkStatus> {
        self.sinks().remove(name)
    }

    /// Forgets a token that was removed from the config.
    pub(crate) fn unregister(&self, name: &str) {
        self.tokens.lock().expect("status lock").remove(name);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Every token's status, by name.
    pub fn tokens(&self) -> BTreeMap<String, TokenStatus> {
        self.tokens
            .lock()
            .expect("status lock")
            .iter()
            .map(|(name, cell)| (name.to_string(), cell.snapshot()))
            .collect()
    }

    /// One token's status, if it runs.
    pub fn token(&self, name: &str) -> Option<TokenStatus> {
        self.tokens
            .lock()
            .expect("status lock")
            .get(name)
            .map(|cell| cell.snapshot())
    }

    /// Waits until `condition` holds for the board, or `timeout` passes. Returns whether it held.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&StatusBoard) -> bool,
    ) -> bool {
        let mut changes = self.changed.subscribe();
        let wait = async {
            loop {
                if condition(self) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && condition(self)
    }
}

impl TokenCell {
    /// The cell of a token that starts at `started`: nothing counted, its event and ping ages
    /// growing from then.
    fn new(started: SystemTime) -> TokenCell {
        let started = unix_ms(started);
        TokenCell {
            phase: Phase::new(TokenState::Connecting),
            connects: AtomicU64::new(0),
            events: AtomicU64::new(0),
            dropped_at_stop: AtomicU64::new(0),
            malformed_frames: AtomicU64::new(0),
            reconnects: Default::default(),
            unconfirmed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            backfills: AtomicU64::new(0),
            backfilled_events: AtomicU64::new(0),
            backfill_gaps_given_up: AtomicU64::new(0),
            stalled_since_ms: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            last_rotation_ms: AtomicU64::new(0),
            last_backfill: Mutex::new(None),
            frames: AtomicU64::new(0),
            last_event_ms: AtomicU64::new(started),
            last_ping_ms: AtomicU64::new(started),
        }
    }

    fn snapshot(&self) -> TokenStatus {
        let (state, since, last_error) = self.phase.get();
        let reconnects = ReconnectCounts(std::array::from_fn(|i| {
            self.reconnects[i].load(Ordering::Relaxed)
        }));
        TokenStatus {
            state,
            since,
            last_error,
            connects: self.connects.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            dropped_at_stop: self.dropped_at_stop.load(Ordering::Relaxed),
            malformed_frames: self.malformed_frames.load(Ordering::Relaxed),
            stale_reconnects: reconnects.get(ReconnectReason::Stale),
            reconnects,
            unconfirmed_subscriptions: self.unconfirmed.load(Ordering::Relaxed),
            rejected_subscriptions: self.rejected.load(Ordering::Relaxed),
            rotations: self.rotations.load(Ordering::Relaxed),
            backfills: self.backfills.load(Ordering::Relaxed),
            backfilled_events: self.backfilled_events.load(Ordering::Relaxed),
            backfill_gaps_given_up: self.backfill_gaps_given_up.load(Ordering::Relaxed),
            stalled_since: match self.stalled_since_ms.load(Ordering::Relaxed) {
                0 => None,
                ms => Some(from_unix_ms(ms)),
            },
            stalls: self.stalls.load(Ordering::Relaxed),
            last_rotation_at: match self.last_rotation_ms.load(Ordering::Relaxed) {
                0 => None,
                ms => Some(from_unix_ms(ms)),
            },
            last_backfill: self.last_backfill.lock().expect("backfill lock").clone(),
            frames: self.frames.load(Ordering::Relaxed),
            last_event_at: from_unix_ms(self.last_event_ms.load(Ordering::Relaxed)),
            last_ping_at: from_unix_ms(self.last_ping_ms.load(Ordering::Relaxed)),
        }
    }
}

impl SinkCell {
    fn snapshot(&self) -> SinkStatus {
        let (state, since, last_error) = self.phase.get();
        let oldest = self.oldest_undelivered_ms.load(Ordering::Relaxed);
        SinkStatus {
            state,
            since,
            last_error,
            delivered: self.delivered.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            parked: self.parked.load(Ordering::Relaxed),
            pushed_out: self.pushed_out.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            oldest_undelivered_at: (oldest != 0).then(|| from_unix_ms(oldest)),
            delivery_loop: self.health.status(),
        }
    }
}

impl TokenReporter {
    /// Enters `state`, keeping the last error.
    pub(crate) fn set(&self, state: TokenState) {
        self.update(state, None);
    }

    /// Enters `state` because of `error`. Entering `Unconfirmed` or `Rejected` counts a
    /// subscription given up or refused.
    pub(crate) fn fail(&self, state: TokenState, error: impl Into<String>) {
        match state {
            TokenState::Unconfirmed => self.cell.unconfirmed.fetch_add(1, Ordering::Relaxed),
            TokenState::Rejected => self.cell.rejected.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        self.update(state, Some(error.into()));
    }

    fn update(&self, state: TokenState, error: Option<String>) {
        if self.cell.phase.update(state, error) {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Records `error` as the last one, keeping the state: a failure beside a socket that
    /// still works (a profile read that failed).
    pub(crate) fn note(&self, error: impl Into<String>) {
        let (state, _, _) = self.cell.phase.get();
        self.update(state, Some(error.into()));
    }

    /// Counts a backfill that ran to its end, and shows it as the last one.
    pub(crate) fn backfilled(&self, record: BackfillRecord) {
        self.cell.backfills.fetch_add(1, Ordering::Relaxed);
        *self.cell.last_backfill.lock().expect("backfill lock") = Some(record);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Counts an event a backfill handed over.
    pub(crate) fn backfilled_event(&self) {
        self.cell.backfilled_events.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a gap given up (too long, or the REST API failed), and shows it as the last
    /// backfill.
    pub(crate) fn backfill_given_up(&self, record: BackfillRecord) {
        self.cell
            .backfill_gaps_given_up
            .fetch_add(1, Ordering::Relaxed);
        *self.cell.last_backfill.lock().expect("backfill lock") = Some(record);
        self.changed.send_modify(|v| *v += 1);
    }

    /// A stall was noticed at `since`: shown until [`TokenReporter::stall_over`], and counted.
    pub(crate) fn stalled(&self, since: SystemTime) {
        self.cell
            .stalled_since_ms
            .store(unix_ms(since).max(1), Ordering::Relaxed);
        self.cell.stalls.fetch_add(1, Ordering::Relaxed);
        self.changed.send_modify(|v| *v += 1);
    }

    /// The socket delivers again after a stall.
    pub(crate) fn stall_over(&self) {
        self.cell.stalled_since_ms.store(0, Ordering::Relaxed);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Counts a rotation of the pubsub token.
    pub(crate) fn rotated(&self) {
        self.cell.rotations.fetch_add(1, Ordering::Relaxed);
        self.cell
            .last_rotation_ms
            .store(unix_ms(SystemTime::now()).max(1), Ordering::Relaxed);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Counts a successful handshake.
    pub(crate) fn connected(&self) {
        self.cell.connects.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an event read from the socket at `received_at`.
    pub(crate) fn event(&self, received_at: SystemTime) {
        self.cell.events.fetch_add(1, Ordering::Relaxed);
        self.cell
            .last_event_ms
            .store(unix_ms(received_at), Ordering::Relaxed);
    }

    /// Counts a WebSocket message read, whatever it holds.
    pub(crate) fn frame(&self) {
        self.cell.frames.fetch_add(1, Ordering::Relaxed);
    }

    /// The server's ActionCable ping came at `at`.
    pub(crate) fn pinged(&self, at: SystemTime) {
        self.cell.last_ping_ms.store(unix_ms(at), Ordering::Relaxed);
    }

    /// Counts an event read from the socket that was never handed to the pipeline.
    pub(crate) fn dropped_at_stop(&self) {
        self.cell.dropped_at_stop.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a frame that was skipped.
    pub(crate) fn malformed_frame(&self) {
        self.cell.malformed_frames.fetch_add(1, Ordering::Relaxed);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Counts a reconnect, and why the connection before it ended.
    pub(crate) fn reconnecting(&self, reason: ReconnectReason) {
        self.cell.reconnects[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_are_the_serialized_names() {
        let serialized = |value: serde_json::Value| value.as_str().unwrap().to_owned();
        for state in TokenState::ALL {
            assert_eq!(
                state.as_str(),
                serialized(serde_json::to_value(state).unwrap())
            );
        }
        for state in SinkState::ALL {
            assert_eq!(
                state.as_str(),
                serialized(serde_json::to_value(state).unwrap())
            );
        }
        for reason in ReconnectReason::ALL {
            assert_eq!(
                reason.as_str(),
                serialized(serde_json::to_value(reason).unwrap())
            );
            assert_eq!(ReconnectReason::ALL[reason as usize], reason);
        }
    }

    #[test]
    fn reloads_count_and_keep_the_hash_of_the_config_that_runs() {
        let board = StatusBoard::new();
        board.config_loaded("aaaa");
        let started = board.config();
        assert_eq!(
            (started.hash.as_str(), started.reloads_succeeded),
            ("aaaa", 0)
        );
        board.config_reload_failed("tokens[0].pubsub_token: missing");
        assert_eq!(
            board.config().hash,
            "aaaa",
            "a refused reload changes nothing"
        );
        board.config_reloaded("bbbb");
        let now = board.config();
        assert_eq!(
            (now.hash.as_str(), now.reloads_succeeded, now.reloads_failed),
            ("bbbb", 1, 1)
        );
        assert!(now.last_success >= started.last_success);
        assert_eq!(
            now.last_error, None,
            "a reload that took effect clears the error"
        );
        board.ingest_panicked();
        assert_eq!(board.ingest().restarts, 1);
    }

    #[test]
    fn a_token_counts_its_frames_events_and_reconnects_and_ages_from_its_start() {
        let board = StatusBoard::new();
        let token = board.register(&Arc::from("a"));
        let fresh = board.token("a").unwrap();
        assert_eq!(
            fresh.last_event_at, fresh.last_ping_at,
            "both from the start"
        );
        let later = SystemTime::now() + Duration::from_secs(5);
        token.frame();
        token.event(later);
        token.pinged(later);
        token.reconnecting(ReconnectReason::Stale);
        token.fail(TokenState::Unconfirmed, "no confirm");
        token.fail(TokenState::Rejected, "rejected");
        let status = board.token("a").unwrap();
        assert_eq!((status.frames, status.events), (1, 1));
        assert_eq!(unix_ms(status.last_event_at), unix_ms(later));
        assert_eq!(unix_ms(status.last_ping_at), unix_ms(later));
        assert_eq!(status.stale_reconnects, 1);
        assert_eq!(status.reconnects.total(), 1);
        assert_eq!(
            (
                status.unconfirmed_subscriptions,
                status.rejected_subscriptions
            ),
            (1, 1)
        );
    }
}
