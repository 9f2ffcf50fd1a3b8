//! Wiring: the spool, the sinks, their delivery loops, the ingest and the token sockets, started
//! in that order and stopped in the reverse one.

use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::admin::{AdminError, AdminServer, ConfigView, ReloadRequest, Sources};
use crate::config::Config;
use crate::delivery::dead_letter::{DeadLetterError, DeadLetters};
use crate::delivery::ingest::{
    self, route_switch, Appender, Ingest, IngestTable, PipelineStats, RouteFeed, RouteSwitch, Tail,
    INGEST_CAPACITY,
};
use crate::delivery::pressure::{PressureSink, PushOut};
use crate::delivery::tap::TapHub;
use crate::memory::{ByteGate, MemoryBudget};
use crate::sink::SinkBuildError;
use crate::source::sender::EventSender;
use crate::source::supervisor::Supervisor;
use crate::spool::{FsyncMode, Spool, SpoolError};
use crate::status::StatusBoard;
use loops::{build_sink, LoopKit, SinkLoops};

mod loops;
#[cfg(test)]
mod panic_tests;
mod reload;

pub use reload::{ReloadError, ReloadReport};

/// Why the bridge could not start. Nothing has connected when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A sink's settings can never work (an unreadable credentials file, a bad TLS file, ...);
    /// building a sink contacts no broker.
    #[error(transparent)]
    Sink(#[from] SinkBuildError),
    /// The spool could not be opened or read.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The dead-letter store could not be opened.
    #[error(transparent)]
    DeadLetters(#[from] DeadLetterError),
    /// The admin endpoint could not listen on its address.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// Another process holds the spool's lock.
    #[error("spool {0} is in use by another chatwoot-bridge process (one spool, one process)")]
    SpoolInUse(PathBuf),
    /// The spool directory or its lock file could not be created or locked.
    #[error("cannot lock spool {path}: {source}")]
    Lock {
        /// The directory or file that failed.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A running bridge: token sockets, the spool, and one delivery loop per sink.
pub struct Bridge {
    /// Token states, readable while running.
    status: StatusBoard,
    /// Pipeline counters, readable while running.
    stats: Arc<PipelineStats>,
    /// Owns the token tasks; taken at shutdown.
    supervisor: Supervisor,
    /// The ingest task.
    ingest: TaskTracker,
    /// The sink loops; their tracker also holds the fsync timer and the replay poller.
    loops: SinkLoops,
    /// The ingest's route table, swapped by reloads.
    routes: RouteSwitch,
    /// The config running now, which a reload is compared with.
    config: Config,
    /// Cancelled once the ingest has appended its last event: sink loops end when caught up.
    ingest_done: CancellationToken,
    /// Cancelled when the shutdown deadline passes: sink loops stop without finishing, and the
    /// ingest stops waiting for the disk.
    give_up: CancellationToken,
    /// Every event read is appended here before any sink sees it.
    spool: Spool,
    /// Held for the life of the bridge: two processes on one spool would deliver twice.
    _spool_lock: SpoolLock,
    /// How long shutdown may take to store what was read and deliver it, from the signal.
    shutdown_timeout: Duration,
    /// The admin endpoint, when the config turns it on; stopped after the sinks at shutdown.
    admin: Option<AdminServer>,
}

/// How long the stages told to stop at the shutdown deadline (sockets, ingest, sink loops) get
/// to end before the shutdown goes on without them: a sink or a disk that does not answer
/// cannot hold the process.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Bounds the wait for the spool's final fsync and cursor write: a disk that stopped answering
/// cannot hold the process either. With [`STOP_GRACE`], a shutdown takes at most
/// `shutdown_timeout` plus 4 seconds.
const FINAL_SYNC_LIMIT: Duration = Duration::from_secs(2);

/// Whether the sinks caught up with the spool before the shutdown deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every sink delivered everything that was read.
    CaughtUp,
    /// The deadline passed first: what is left stays in the spool and is delivered after the
    /// next start.
    DeadlinePassed,
}

/// Whether the spool reached the disk at the end of shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// The spool was fsynced: nothing that was read is lost, drained or not.
    Synced,
    /// The final fsync failed (the error is logged): the latest appends may be lost.
    SyncFailed,
    /// The final fsync did not finish within two seconds (a disk that stopped answering) and
    /// was not waited for: whether the latest appends reached the disk is unknown.
    SyncTimedOut,
}

/// What shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every sink caught up with the spool before the deadline.
    pub drain: Drain,
    /// Whether the spool was fsynced at the end.
    pub persistence: Persistence,
    /// Events read from the token sockets since start.
    pub read: u64,
    /// Events appended to the spool since start. With `not_spooled`, events routed to no sink
    /// and events a full spool refused (both counted and logged as they happen), it adds up to
    /// `read`.
    pub spooled: u64,
    /// Events read that never reached the spool because the shutdown deadline came first: the
    /// disk refused them (or did not answer) until then, or they were still on their way to it.
    /// They are lost. Zero unless the spool's disk failed.
    pub not_spooled: u64,
}

impl ShutdownReport {
    /// Whether nothing read is lost: every event read reached the spool, and the spool was
    /// fsynced.
    pub fn everything_read_is_spooled(&self) -> bool {
        self.not_spooled == 0 && self.persistence == Persistence::Synced
    }

    /// The shutdown's last log line: whether everything read reached the spool, or how much did
    /// not; with the deliveries since start.
    fn log(&self, delivered: u64) {
        let ShutdownReport {
            read,
            spooled,
            not_spooled,
            persistence,
            drain,
        } = *self;
        if not_spooled > 0 {
            error!(
                read,
                spooled,
                not_spooled,
                delivered,
                ?persistence,
                ?drain,
                "shutdown complete: {not_spooled} events read were not stored: the spool's disk \
                 refused them until the shutdown deadline; they are lost"
            );
        } else if persistence != Persistence::Synced {
            error!(
                read,
                spooled,
                delivered,
                ?persistence,
                ?drain,
                "shutdown complete: every event read was appended to the spool, but its final \
                 fsync did not complete: a machine crash before the disk catches up can lose the \
                 latest ones"
            );
        } else {
            info!(
                read,
                spooled,
                delivered,
                ?drain,
                "shutdown complete: every event read is in the spool"
            );
        }
    }
}

/// What the stages started by [`Bridge::start`] share.
struct Wiring {
    /// The spool every event is appended to and every sink loop reads.
    spool: Spool,
    /// Pipeline counters.
    stats: Arc<PipelineStats>,
    /// Token and sink states.
    status: StatusBoard,
    /// Batches just appended, handed from the ingest to the sink loops without a disk read.
    tail: Tail,
    /// Cancelled once the ingest has appended its last event.
    ingest_done: CancellationToken,
    /// Tells sink loops to stop without finishing once the shutdown deadline has passed.
    give_up: CancellationToken,
    /// `memory_limit` divided among the ingest, the tail, replays and the sink loops.
    memory: MemoryBudget,
    /// Where the ingest offers what it appends to the admin endpoint's taps.
    tap: TapHub,
}

impl Bridge {
    /// Opens the spool and the sinks, then starts the pipeline, one socket per token, and the
    /// admin endpoint when the config has one. Fails before connecting anything if the admin
    /// endpoint cannot listen, or the spool or a sink cannot be opened.
    pub async fn start(config: Config) -> Result<Bridge, StartError> {
        let admin_listener = match &config.admin {
            Some(admin) => Some(AdminServer::bind(admin.listen).await?),
            None => None,
        };
        let (spool_lock, spool, dead_letters) = open_storage(&config).await?;
        let memory = MemoryBudget::divide(config.memory_limit, config.sinks.len());
        let wiring = Wiring {
            spool,
            stats: Arc::new(PipelineStats::default()),
            status: StatusBoard::new(),
            tail: Tail::new(memory.tail),
            ingest_done: CancellationToken::new(),
            give_up: CancellationToken::new(),
            memory,
            tap: TapHub::default(),
        };
        let mut loops = SinkLoops::new(wiring.loop_kit(&config, dead_letters.clone()));
        wiring.start_delivery(&config, &mut loops).await?;
        let push_out = wiring.push_out(&config, dead_letters.clone());
        let (routes, feed) = route_switch(IngestTable {
            generation: 0,
            routes: config.routes.clone(),
            push_out: push_out.clone(),
            sinks: config.sinks.keys().cloned().collect(),
        });
        wiring.start_spool_tasks(&config, dead_letters, &loops.tracker, &routes);
        loops.tracker.close();
        let (ingest, events) = wiring.start_ingest(feed, push_out);
        let supervisor = start_supervisor(&config, events, &wiring.status);
        wiring.status.config_loaded(&config.hash);
        let admin = admin_listener.map(|listener| wiring.serve_admin(listener, &config));
        let Wiring {
            spool,
            stats,
            status,
            ingest_done,
            give_up,
            ..
        } = wiring;
        Ok(Bridge {
            status,
            stats,
            supervisor,
            ingest,
            loops,
            routes,
            ingest_done,
            give_up,
            spool,
            _spool_lock: spool_lock,
            shutdown_timeout: config.shutdown_timeout,
            config,
            admin,
        })
    }

    /// Where the admin endpoint listens, when the config turns it on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    /// The requests `POST /reload` makes, for the task that reloads the config; `None` when
    /// the admin endpoint is off or they were taken already. Until they are taken, `/reload`
    /// answers that reloading is not wired.
    pub fn reload_requests(&self) -> Option<mpsc::Receiver<ReloadRequest>> {
        self.admin.as_ref()?.take_reload_requests()
    }

    /// Shows the admin endpoint the config that runs now (after a reload): which tokens
    /// `/readyz` requires, and the names and redactions taps use.
    pub(crate) fn refresh_admin(&self, config: &Config) {
        if let Some(admin) = &self.admin {
            admin.apply(admin_view(config));
        }
    }

    /// Every token's and sink's state, live.
    pub fn status(&self) -> &StatusBoard {
        &self.status
    }

    /// The pipeline's counters, live.
    pub fn stats(&self) -> &PipelineStats {
        &self.stats
    }

    /// The spool, for inspecting what it holds.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Stops reading sockets, appends what was read to the spool, then lets the sinks deliver
    /// until `shutdown_timeout` after the call. What is not delivered by then stays in the spool.
    ///
    /// Ends within `shutdown_timeout` plus `STOP_GRACE` (2 s) and `FINAL_SYNC_LIMIT` (2 s) whatever the
    /// disk and the sinks do: past the deadline the ingest stops waiting for a disk that refuses
    /// writes (what it holds is counted as not spooled), the sink loops are told to stop, and
    /// what still does not end is left behind.
    pub async fn shutdown(self) -> ShutdownReport {
        info!(timeout = ?self.shutdown_timeout,
            "shutting down: closing sockets, storing what was read, delivering it until the \
             timeout");
        let deadline = Instant::now() + self.shutdown_timeout;
        let stop_by = deadline + STOP_GRACE;
        let give_up = self.give_up.clone();
        let deadline_timer = tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            give_up.cancel();
        });
        if timeout_at(stop_by, self.supervisor.shutdown())
            .await
            .is_err()
        {
            error!(
                "token sockets did not close by the shutdown deadline and its grace; leaving them"
            );
        }
        if timeout_at(stop_by, self.ingest.wait()).await.is_err() {
            error!(
                "the ingest did not stop by the shutdown deadline and its grace; events it still \
                 holds are missing from the count of events not stored"
            );
        }
        self.ingest_done.cancel();
        self.loops.end_inputs();
        let drain = drain(
            &self.loops.tracker,
            &self.give_up,
            deadline,
            self.shutdown_timeout,
        )
        .await;
        deadline_timer.abort();
        if let Some(admin) = self.admin {
            admin.stop().await;
        }
        let persistence = final_sync(self.spool).await;
        let tokens = self.status.tokens();
        let report = ShutdownReport {
            drain,
            persistence,
            read: tokens.values().map(|t| t.events).sum(),
            spooled: self.stats.spooled.load(Ordering::Relaxed),
            not_spooled: self.stats.not_spooled.load(Ordering::Relaxed)
                + tokens.values().map(|t| t.dropped_at_stop).sum::<u64>(),
        };
        report.log(self.stats.delivered.load(Ordering::Relaxed));
        report
    }
}

/// Lets the sink loops deliver until `deadline`; past it, tells them to stop (`give_up`) and
/// waits [`STOP_GRACE`] more for them to end.
async fn drain(
    delivery: &TaskTracker,
    give_up: &CancellationToken,
    deadline: Instant,
    timeout: Duration,
) -> Drain {
    if timeout_at(deadline, delivery.wait()).await.is_ok() {
        return Drain::CaughtUp;
    }
    give_up.cancel();
    if timeout_at(deadline + STOP_GRACE, delivery.wait())
        .await
        .is_err()
    {
        error!(grace = ?STOP_GRACE,
            "sink loops did not stop after the shutdown deadline (a sink or the disk does not \
             answer); leaving them: what they did not commit stays in the spool");
    }
    error!(?timeout,
        "shutdown deadline passed before every sink caught up; the rest stays in the spool for the next start");
    Drain::DeadlinePassed
}

/// The spool's last fsync and cursor write, on a blocking thread, waited for at most
/// [`FINAL_SYNC_LIMIT`].
async fn final_sync(spool: Spool) -> Persistence {
    let sync = tokio::task::spawn_blocking(move || spool.sync());
    match tokio::time::timeout(FINAL_SYNC_LIMIT, sync).await {
        Ok(synced) => match synced.expect("spool sync does not panic") {
            Ok(()) => Persistence::Synced,
            Err(e) => {
                error!(error = %e, "cannot fsync the spool at shutdown");
                Persistence::SyncFailed
            }
        },
        Err(_) => {
            error!(limit = ?FINAL_SYNC_LIMIT,
                "the spool's final fsync did not finish in time (its disk does not answer); \
                 not waiting for it");
            Persistence::SyncTimedOut
        }
    }
}

/// Takes the spool's lock, then opens the spool and the dead letters.
async fn open_storage(config: &Config) -> Result<(SpoolLock, Spool, DeadLetters), StartError> {
    let spool_lock = lock_spool(&config.spool.dir)?;
    let sink_names: Vec<String> = config.sinks.keys().cloned().collect();
    let spool_config = config.spool.clone();
    let spool = tokio::task::spawn_blocking(move || Spool::open(spool_config, &sink_names))
        .await
        .expect("opening the spool does not panic")?;
    let dead_letters =
        DeadLetters::open(&config.spool.dir)?.with_max_frame_bytes(config.cable.max_frame_bytes);
    Ok((spool_lock, spool, dead_letters))
}

impl Wiring {
    /// What every sink loop is built from.
    fn loop_kit(&self, config: &Config, dead_letters: DeadLetters) -> LoopKit {
        LoopKit {
            spool: self.spool.clone(),
            stats: self.stats.clone(),
            status: self.status.clone(),
            tail: self.tail.clone(),
            dead_letters,
            spool_dir: config.spool.dir.clone(),
            max_frame_bytes: config.cable.max_frame_bytes as u64,
            give_up: self.give_up.clone(),
        }
    }

    /// Builds every sink, then starts their loops. Fails before starting anything if a sink
    /// cannot be built.
    async fn start_delivery(
        &self,
        config: &Config,
        loops: &mut SinkLoops,
    ) -> Result<(), StartError> {
        let mut built = Vec::with_capacity(config.sinks.len());
        for (name, settings) in &config.sinks {
            built.push((name, settings, build_sink(name, settings).await?));
        }
        for (name, settings, sink) in built {
            if let Err(e) = loops.launch(name, settings, sink, self.memory.sink) {
                // The loops started so far stop: the bridge does not start.
                self.give_up.cancel();
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Starts the fsync timer (in `interval` mode) and the dead-letter replay poller.
    fn start_spool_tasks(
        &self,
        config: &Config,
        dead_letters: DeadLetters,
        delivery: &TaskTracker,
        routes: &RouteSwitch,
    ) {
        if config.spool.fsync == FsyncMode::Interval {
            delivery.spawn(ingest::sync_periodically(
                self.spool.clone(),
                config.spool.fsync_interval,
                self.ingest_done.clone(),
            ));
        }
        delivery.spawn(ingest::replay_dead_letters(
            dead_letters,
            self.spool.clone(),
            routes.subscribe(),
            self.memory.replay_batch,
            self.ingest_done.clone(),
        ));
    }

    /// Starts the ingest: events in, routed (by what `feed` holds) and appended to the spool,
    /// then announced on the tail; a full spool pushes its oldest segment out with `push_out`.
    /// Returns its task and the sender the token sockets hand events to, behind the byte gate
    /// of the ingest's share of `memory_limit`.
    fn start_ingest(&self, feed: RouteFeed, push_out: Arc<PushOut>) -> (TaskTracker, EventSender) {
        let ingest = TaskTracker::new();
        let (events_tx, events_rx) = mpsc::channel(INGEST_CAPACITY);
        let gate = ByteGate::new(self.memory.ingest_events);
        let events_tx = EventSender::gated(events_tx, gate.clone());
        let appender = Appender::new(
            self.spool.clone(),
            self.tail.clone(),
            self.stats.clone(),
            self.give_up.clone(),
            push_out,
        )
        .with_tap(self.tap.clone());
        let ingest_loop = Ingest::new(events_rx, gate, feed, appender, self.status.clone());
        let done = self.ingest_done.clone();
        ingest.spawn(async move {
            ingest::ingest(ingest_loop).await;
            done.cancel();
        });
        ingest.close();
        (ingest, events_tx)
    }

    /// What makes room in a full spool (`when_full: dead_letter`): every configured sink, with
    /// its redaction and its cell on the status board, and the dead letters its events go to.
    fn push_out(&self, config: &Config, dead_letters: DeadLetters) -> Arc<PushOut> {
        push_out(config, dead_letters, &self.status, &self.stats)
    }
}

/// What makes room in a full spool for the sinks of `config` (see [`Wiring::push_out`]).
fn push_out(
    config: &Config,
    dead_letters: DeadLetters,
    status: &StatusBoard,
    stats: &Arc<PipelineStats>,
) -> Arc<PushOut> {
    let sinks = config
        .sinks
        .iter()
        .map(|(name, settings)| {
            let sink = PressureSink {
                redaction: settings.redaction.clone(),
                status: status.register_sink(name),
            };
            (name.clone(), sink)
        })
        .collect();
    Arc::new(PushOut::new(dead_letters, sinks, stats.clone()))
}

impl Wiring {
    /// Serves the admin endpoint on `listener`, reading the bridge's state.
    fn serve_admin(&self, listener: tokio::net::TcpListener, config: &Config) -> AdminServer {
        let sources = Sources {
            status: self.status.clone(),
            stats: self.stats.clone(),
            spool: self.spool.clone(),
            tap: self.tap.clone(),
        };
        AdminServer::serve(listener, sources, admin_view(config))
    }
}

/// What the admin endpoint needs of `config`.
fn admin_view(config: &Config) -> ConfigView {
    ConfigView {
        ready_requires: config
            .admin
            .as_ref()
            .map(|admin| admin.ready_requires.clone())
            .unwrap_or_default(),
        tokens: config.tokens.iter().map(|t| t.name.to_string()).collect(),
        routes: config.routes.route_names().map(str::to_owned).collect(),
        redactions: config
            .sinks
            .iter()
            .map(|(name, sink)| (name.clone(), sink.redaction.clone()))
            .collect(),
    }
}

/// Starts one socket per configured token.
fn start_supervisor(config: &Config, events: EventSender, status: &StatusBoard) -> Supervisor {
    let mut supervisor = Supervisor::new(
        Arc::new(config.cable.clone()),
        events,
        status.clone(),
        CancellationToken::new(),
    );
    let report = supervisor.apply(&config.tokens);
    info!(tokens = report.started.len(), sinks = config.sinks.len(), spool = %config.spool.dir.display(), "bridge started");
    supervisor
}

/// Takes the spool's lock file, so a second process on the same spool fails at start.
fn lock_spool(dir: &std::path::Path) -> Result<SpoolLock, StartError> {
    std::fs::create_dir_all(dir).map_err(|source| StartError::Lock {
        path: dir.to_owned(),
        source,
    })?;
    // The spool holds Chatwoot payloads, contact tokens included: owner only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| StartError::Lock {
                path: dir.to_owned(),
                source,
            },
        )?;
    }
    let path = dir.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StartError::Lock {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(SpoolLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::SpoolInUse(dir.to_owned())),
        Err(std::fs::TryLockError::Error(source)) => Err(StartError::Lock { path, source }),
    }
}

/// The spool's lock file, locked while the bridge runs. Unlocked explicitly when dropped:
/// closing the file alone releases the lock only once every copy of its descriptor is closed,
/// and a process that another thread of the host is spawning holds one from its fork to its
/// exec, which would make a start right after a shutdown find the spool in use.
struct SpoolLock(File);

impl Drop for SpoolLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Runs the bridge until `shutdown` completes, then shuts it down gracefully.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<ShutdownReport, StartError> {
    let bridge = Bridge::start(config).await?;
    shutdown.await;
    Ok(bridge.shutdown().await)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::mock::{Answer, Blast, MockConfig, MockServer, MockToken};
    use crate::spool::{inject_fault, DiskFault, FaultGuard, SpoolConfig};

    /// Linux's "No space left on device".
    const ENOSPC: i32 = 28;

    /// A mock Chatwoot that writes events to its one token as fast as the socket takes them.
    async fn blasting_mock() -> MockServer {
        MockServer::start(MockConfig {
            tokens: vec![MockToken {
                pubsub_token: "t".into(),
                answer: Answer::Confirm,
            }],
            blast: Some(Blast {
                count: 20_000,
                rate: None,
                conversations: 10,
            }),
            ..MockConfig::default()
        })
        .await
        .unwrap()
    }

    /// One token, one file sink, every event routed to it, a shutdown deadline of `timeout`.
    fn config(url: &str, dir: &Path, timeout: &str) -> Config {
        let yaml = format!(
            r#"
chatwoot: {{ url: "{url}" }}
tokens: [{{ name: a, pubsub_token: t }}]
sinks:
  out: {{ type: file, path: {out} }}
routes: [{{ name: all, match: {{}}, to: [out] }}]
spool: {{ dir: {spool} }}
shutdown_timeout: {timeout}
"#,
            out = serde_json::to_string(&dir.join("out.jsonl")).unwrap(),
            spool = serde_json::to_string(&dir.join("spool")).unwrap(),
        );
        Config::from_yaml(&yaml, &|_| None, false).unwrap()
    }

    /// Events read from the token's socket and not appended yet.
    fn in_flight(bridge: &Bridge) -> u64 {
        let read = bridge.status().token("a").map_or(0, |t| t.events);
        read - bridge.stats().spooled.load(Ordering::Relaxed)
    }

    /// Waits until the spool's disk has failed with more events read than the ingest channel
    /// holds: the channel is full and the token's task waits to hand over the next one.
    async fn pile_up_behind_the_disk(bridge: &Bridge) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while in_flight(bridge) <= INGEST_CAPACITY as u64 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("events pile up in memory behind the failing disk");
    }

    /// A bridge whose spool's disk failed while a blast came in, with events piled up in memory
    /// behind it.
    struct BehindAFailingDisk {
        /// The blasting mock Chatwoot; the test stops it.
        mock: MockServer,
        /// Holds the config, the spool and the file sink's output.
        dir: tempfile::TempDir,
        /// The bridge, still running.
        bridge: Bridge,
        /// Keeps the disk failing until dropped.
        fault: FaultGuard,
    }

    /// Starts a bridge on [`blasting_mock`] with a shutdown deadline of `timeout`, makes its
    /// spool's disk suffer `fault`, and waits until events pile up behind it.
    async fn behind_a_failing_disk(timeout: &str, fault: DiskFault) -> BehindAFailingDisk {
        let mock = blasting_mock().await;
        let dir = tempfile::tempdir().unwrap();
        let bridge = Bridge::start(config(&mock.url(), dir.path(), timeout))
            .await
            .unwrap();
        let fault = inject_fault(&dir.path().join("spool"), fault);
        pile_up_behind_the_disk(&bridge).await;
        BehindAFailingDisk {
            mock,
            dir,
            bridge,
            fault,
        }
    }

    #[tokio::test]
    async fn a_second_bridge_on_a_spool_in_use_is_refused_naming_it_and_the_lock_ends_with_the_shutdown(
    ) {
        let mock = MockServer::start(MockConfig {
            tokens: vec![MockToken {
                pubsub_token: "t".into(),
                answer: Answer::Confirm,
            }],
            ..MockConfig::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let first = Bridge::start(config(&mock.url(), dir.path(), "1s"))
            .await
            .unwrap();
        let refused = Bridge::start(config(&mock.url(), dir.path(), "1s")).await;
        let Err(StartError::SpoolInUse(spool)) = refused else {
            panic!("a spool in use must be refused as such");
        };
        assert_eq!(spool, dir.path().join("spool"));
        // A copy of the lock's descriptor, as a process being spawned holds one until its exec.
        let copy = first._spool_lock.0.try_clone().unwrap();
        first.shutdown().await;
        let second = Bridge::start(config(&mock.url(), dir.path(), "1s"))
            .await
            .expect("the spool is free once its bridge shut down, whoever holds a descriptor");
        drop(copy);
        second.shutdown().await;
        mock.stop().await;
    }

    /// The most a shutdown may take: its one-second deadline, the grace periods, and slack for
    /// a loaded test machine.
    const SHUTDOWN_BOUND: Duration = Duration::from_secs(1 + 10)
        .saturating_add(STOP_GRACE)
        .saturating_add(FINAL_SYNC_LIMIT);

    #[tokio::test]
    async fn a_shutdown_on_a_disk_that_refuses_writes_ends_by_its_deadline_and_counts_the_loss() {
        let disk = behind_a_failing_disk("1s", DiskFault::Refuse(ENOSPC)).await;
        let report = tokio::time::timeout(SHUTDOWN_BOUND, disk.bridge.shutdown())
            .await
            .expect("the shutdown ends by its deadline plus a few seconds");
        disk.mock.stop().await;
        drop(disk.fault);
        assert!(
            report.not_spooled > INGEST_CAPACITY as u64,
            "what the ingest, its channel and the token held is counted: {report:?}"
        );
        assert_eq!(
            report.read,
            report.spooled + report.not_spooled,
            "every event read is either spooled or counted as lost (all are routed)"
        );
        assert_eq!(report.persistence, Persistence::SyncFailed);
        assert!(!report.everything_read_is_spooled());
        let spool_dir = disk.dir.path().join("spool");
        let spool = Spool::open(SpoolConfig::new(&spool_dir), &["out".into()]).unwrap();
        assert_eq!(
            spool.stats().last_seq,
            report.spooled,
            "the spool holds exactly what the report calls spooled"
        );
    }

    #[tokio::test]
    async fn a_disk_that_hangs_cannot_hold_the_shutdown_past_its_deadline() {
        // The fault is cleared at the end (or when the test fails), so the stuck threads can
        // finish.
        let disk = behind_a_failing_disk("1s", DiskFault::Hang).await;
        let read_before = in_flight(&disk.bridge);
        let report = tokio::time::timeout(SHUTDOWN_BOUND, disk.bridge.shutdown())
            .await
            .expect("the shutdown ends by its deadline plus a few seconds");
        disk.mock.stop().await;
        assert!(
            report.not_spooled >= read_before,
            "nothing read after the disk hung was stored: {report:?}"
        );
        assert_eq!(report.read, report.spooled + report.not_spooled);
        assert_eq!(report.persistence, Persistence::SyncTimedOut);
    }

    #[tokio::test]
    async fn a_disk_that_comes_back_before_the_deadline_loses_nothing() {
        // The token's task waits to hand an event over to a full pipeline when the shutdown
        // starts: it keeps waiting, and the events behind the stuck disk are stored when it
        // answers again.
        let disk = behind_a_failing_disk("10s", DiskFault::Hang).await;
        // The blast fills whatever room is left at once; then the task waits on the pipeline.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let shutdown = tokio::spawn(disk.bridge.shutdown());
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(disk.fault);
        let report = shutdown.await.unwrap();
        disk.mock.stop().await;
        assert_eq!(report.not_spooled, 0, "{report:?}");
        assert_eq!(report.read, report.spooled);
        assert!(report.everything_read_is_spooled());
    }
}
