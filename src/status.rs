//! One place that holds the state of every token and every sink, so logs, health, metrics,
//! status pages and tests read the same thing.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

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
}

impl fmt::Display for TokenState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_value(self).expect("a unit variant serializes");
        f.write_str(text.as_str().expect("unit variants serialize as strings"))
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
    /// Reconnects caused by silence (no ping within the stale timeout).
    pub stale_reconnects: u64,
}

/// Serializes a time as RFC 3339 with milliseconds.
fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
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
    /// See [`TokenStatus::stale_reconnects`].
    stale_reconnects: AtomicU64,
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
    /// Times the sink's delivery loop panicked and was started again from its committed
    /// cursor.
    pub loop_restarts: u64,
    /// Whether the delivery loop runs: false between a panic and its restart, and while it
    /// cannot be built again after one (health checks fail on it).
    pub alive: bool,
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
    /// See [`SinkStatus::loop_restarts`].
    loop_restarts: AtomicU64,
    /// See [`SinkStatus::alive`].
    alive: AtomicBool,
}

/// What a sink loop uses to report.
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

    /// Counts `n` delivered events.
    pub(crate) fn delivered(&self, n: u64) {
        self.cell.delivered.fetch_add(n, Ordering::Relaxed);
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

    /// The delivery loop panicked: counted, and not alive until it runs again.
    pub(crate) fn loop_panicked(&self, error: impl Into<String>) {
        self.cell.loop_restarts.fetch_add(1, Ordering::Relaxed);
        self.cell.alive.store(false, Ordering::Relaxed);
        self.cell
            .phase
            .update(SinkState::Retrying, Some(error.into()));
        self.changed.send_modify(|v| *v += 1);
    }

    /// Whether the delivery loop runs now.
    pub(crate) fn set_alive(&self, alive: bool) {
        if self.cell.alive.swap(alive, Ordering::Relaxed) != alive {
            self.changed.send_modify(|v| *v += 1);
        }
    }
}

/// The registry of token and sink states. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StatusBoard {
    /// Every running token's cell, by name.
    tokens: Arc<Mutex<BTreeMap<Arc<str>, Arc<TokenCell>>>>,
    /// Every sink's cell, by name.
    sinks: Arc<Mutex<BTreeMap<String, Arc<SinkCell>>>>,
    /// The ingest's restarts and whether it runs.
    ingest: Arc<IngestCell>,
    /// The config running now and how its reloads went; written at start and per reload only.
    config: Arc<Mutex<ConfigStatus>>,
    /// Bumped on every state change so waiters wake up without polling.
    changed: watch::Sender<u64>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard {
            tokens: Arc::default(),
            sinks: Arc::default(),
            ingest: Arc::new(IngestCell {
                restarts: AtomicU64::new(0),
                alive: AtomicBool::new(true),
            }),
            config: Arc::default(),
            changed: watch::channel(0).0,
        }
    }
}

/// The ingest's cell: written by its task, read by health checks and metrics.
#[derive(Debug)]
struct IngestCell {
    /// See [`IngestStatus::restarts`].
    restarts: AtomicU64,
    /// See [`IngestStatus::alive`].
    alive: AtomicBool,
}

/// A copy of the ingest's status at one moment.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct IngestStatus {
    /// Times the ingest panicked and was started again, keeping its channel and the events it
    /// held.
    pub restarts: u64,
    /// Whether the ingest runs: false between a panic and its restart (health checks fail on
    /// it).
    pub alive: bool,
}

/// The config the bridge runs on, and how reloading it went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConfigStatus {
    /// The running config's hash ([`crate::config::Config::hash`]); `None` before the first
    /// load.
    pub hash: Option<String>,
    /// Reloads applied since start (the load at start is not one).
    pub reloads_succeeded: u64,
    /// Reloads refused since start; the config running before each kept running.
    pub reloads_failed: u64,
    /// When the running config was loaded: at start or by the last reload that was applied.
    #[serde(serialize_with = "rfc3339_optional")]
    pub last_success: Option<SystemTime>,
    /// Why the last reload was refused, every problem; `None` once a reload is applied.
    pub last_error: Option<String>,
}

/// Serializes an optional time as RFC 3339 with milliseconds, or null.
fn rfc3339_optional<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
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
            .or_insert_with(|| {
                Arc::new(TokenCell {
                    phase: Phase::new(TokenState::Connecting),
                    connects: AtomicU64::new(0),
                    events: AtomicU64::new(0),
                    dropped_at_stop: AtomicU64::new(0),
                    malformed_frames: AtomicU64::new(0),
                    stale_reconnects: AtomicU64::new(0),
                })
            })
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
                    loop_restarts: AtomicU64::new(0),
                    alive: AtomicBool::new(true),
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
            .map(|(name, cell)| {
                let (state, since, last_error) = cell.phase.get();
                let status = SinkStatus {
                    state,
                    since,
                    last_error,
                    delivered: cell.delivered.load(Ordering::Relaxed),
                    dead_lettered: cell.dead_lettered.load(Ordering::Relaxed),
                    retries: cell.retries.load(Ordering::Relaxed),
                    parked: cell.parked.load(Ordering::Relaxed),
                    pushed_out: cell.pushed_out.load(Ordering::Relaxed),
                    loop_restarts: cell.loop_restarts.load(Ordering::Relaxed),
                    alive: cell.alive.load(Ordering::Relaxed),
                };
                (name.clone(), status)
            })
            .collect()
    }

    /// One sink's status, if it exists.
    pub fn sink(&self, name: &str) -> Option<SinkStatus> {
        self.sinks().remove(name)
    }

    /// Records the config running now, with its hash: at start, then after each reload that
    /// was applied (every load after the first counts as a reload).
    pub fn config_loaded(&self, hash: &str) {
        let mut config = self.config.lock().expect("status lock");
        if config.hash.is_some() {
            config.reloads_succeeded += 1;
        }
        config.hash = Some(hash.to_owned());
        config.last_success = Some(SystemTime::now());
        config.last_error = None;
        drop(config);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Records a reload that was refused, and why; the running config stays as it was.
    pub fn config_reload_failed(&self, error: &str) {
        let mut config = self.config.lock().expect("status lock");
        config.reloads_failed += 1;
        config.last_error = Some(error.to_owned());
        drop(config);
        self.changed.send_modify(|v| *v += 1);
    }

    /// The running config's hash and how its reloads went.
    pub fn config(&self) -> ConfigStatus {
        self.config.lock().expect("status lock").clone()
    }

    /// The ingest's restarts and whether it runs.
    pub fn ingest(&self) -> IngestStatus {
        IngestStatus {
            restarts: self.ingest.restarts.load(Ordering::Relaxed),
            alive: self.ingest.alive.load(Ordering::Relaxed),
        }
    }

    /// The ingest panicked: counted, and not alive until it runs again.
    pub(crate) fn ingest_panicked(&self) {
        self.ingest.restarts.fetch_add(1, Ordering::Relaxed);
        self.ingest.alive.store(false, Ordering::Relaxed);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Whether the ingest runs now.
    pub(crate) fn set_ingest_alive(&self, alive: bool) {
        if self.ingest.alive.swap(alive, Ordering::Relaxed) != alive {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Forgets a sink that a reload removed, once its loop has ended.
    pub(crate) fn unregister_sink(&self, name: &str) {
        self.sinks.lock().expect("status lock").remove(name);
        self.changed.send_modify(|v| *v += 1);
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
    fn snapshot(&self) -> TokenStatus {
        let (state, since, last_error) = self.phase.get();
        TokenStatus {
            state,
            since,
            last_error,
            connects: self.connects.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            dropped_at_stop: self.dropped_at_stop.load(Ordering::Relaxed),
            malformed_frames: self.malformed_frames.load(Ordering::Relaxed),
            stale_reconnects: self.stale_reconnects.load(Ordering::Relaxed),
        }
    }
}

impl TokenReporter {
    /// Enters `state`, keeping the last error.
    pub(crate) fn set(&self, state: TokenState) {
        self.update(state, None);
    }

    /// Enters `state` because of `error`.
    pub(crate) fn fail(&self, state: TokenState, error: impl Into<String>) {
        self.update(state, Some(error.into()));
    }

    fn update(&self, state: TokenState, error: Option<String>) {
        if self.cell.phase.update(state, error) {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Counts a successful handshake.
    pub(crate) fn connected(&self) {
        self.cell.connects.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an event read from the socket.
    pub(crate) fn event(&self) {
        self.cell.events.fetch_add(1, Ordering::Relaxed);
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

    /// Counts a reconnect caused by silence.
    pub(crate) fn stale(&self) {
        self.cell.stale_reconnects.fetch_add(1, Ordering::Relaxed);
    }
}
