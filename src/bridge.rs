//! Wiring: the spool, the sinks, their delivery loops, the ingest and the token sockets, started
//! in that order and stopped in the reverse one.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::config::{Config, SinkSettings};
use crate::delivery::dead_letter::{DeadLetterError, DeadLetters};
use crate::delivery::ingest::{self, PipelineStats, Tail, INGEST_CAPACITY};
use crate::delivery::{SinkLoop, SINK_LIMITS};
use crate::event::Event;
use crate::sink::{Sink, SinkBuildError};
use crate::source::supervisor::Supervisor;
use crate::spool::{FsyncMode, Spool, SpoolError};
use crate::status::StatusBoard;

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
    /// The sink loops, the fsync timer and the replay poller.
    delivery: TaskTracker,
    /// Cancelled once the ingest has appended its last event: sink loops end when caught up.
    ingest_done: CancellationToken,
    /// Tells sink loops to stop without finishing once the shutdown deadline has passed.
    give_up: CancellationToken,
    /// Every event read is appended here before any sink sees it.
    spool: Spool,
    /// Held for the life of the bridge: two processes on one spool would deliver twice.
    _spool_lock: File,
    /// How long shutdown waits for in-flight events.
    shutdown_timeout: std::time::Duration,
}

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
}

/// What shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every sink caught up with the spool before the deadline.
    pub drain: Drain,
    /// Whether the spool was fsynced at the end.
    pub persistence: Persistence,
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
}

impl Bridge {
    /// Opens the spool and the sinks, then starts the pipeline and one socket per token.
    /// Fails before connecting anything if the spool or a sink cannot be opened.
    pub async fn start(config: Config) -> Result<Bridge, StartError> {
        let (spool_lock, spool, dead_letters) = open_storage(&config).await?;
        let wiring = Wiring {
            spool,
            stats: Arc::new(PipelineStats::default()),
            status: StatusBoard::new(),
            tail: tokio::sync::broadcast::channel(ingest::TAIL_BATCHES).0,
            ingest_done: CancellationToken::new(),
            give_up: CancellationToken::new(),
        };
        let delivery = wiring.start_delivery(&config, dead_letters).await?;
        let (ingest, events) = wiring.start_ingest(&config);
        let supervisor = start_supervisor(&config, events, &wiring.status);
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
            delivery,
            ingest_done,
            give_up,
            spool,
            _spool_lock: spool_lock,
            shutdown_timeout: config.shutdown_timeout,
        })
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
    /// within the shutdown timeout. What is not delivered by then stays in the spool.
    pub async fn shutdown(self) -> ShutdownReport {
        info!("shutting down: closing sockets, delivering what was read");
        self.supervisor.shutdown().await;
        self.ingest.wait().await;
        self.ingest_done.cancel();
        let drain = match tokio::time::timeout(self.shutdown_timeout, self.delivery.wait()).await {
            Ok(()) => Drain::CaughtUp,
            Err(_) => {
                self.give_up.cancel();
                self.delivery.wait().await;
                error!(timeout = ?self.shutdown_timeout,
                    "shutdown deadline passed before every sink caught up; the rest stays in the spool for the next start");
                Drain::DeadlinePassed
            }
        };
        let spool = self.spool.clone();
        let persistence = match tokio::task::spawn_blocking(move || spool.sync())
            .await
            .expect("spool sync does not panic")
        {
            Ok(()) => Persistence::Synced,
            Err(e) => {
                error!(error = %e, "cannot fsync the spool at shutdown");
                Persistence::SyncFailed
            }
        };
        info!(
            delivered = self.stats.delivered.load(Ordering::Relaxed),
            "shutdown complete"
        );
        ShutdownReport { drain, persistence }
    }
}

/// Takes the spool's lock, then opens the spool and the dead letters.
async fn open_storage(config: &Config) -> Result<(File, Spool, DeadLetters), StartError> {
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
    /// Builds every sink and its loop, then starts the loops, the fsync timer and the
    /// dead-letter replay poller. Fails before starting anything if a sink cannot be built.
    async fn start_delivery(
        &self,
        config: &Config,
        dead_letters: DeadLetters,
    ) -> Result<TaskTracker, StartError> {
        let delivery = TaskTracker::new();
        // A loop ends once nothing more can reach its sink: after the ingest for most; for a
        // dead-letter target, also after every loop that dead-letters into it has ended.
        let ended: BTreeMap<&str, CancellationToken> = config
            .sinks
            .keys()
            .map(|name| (name.as_str(), CancellationToken::new()))
            .collect();
        let mut loops = Vec::with_capacity(config.sinks.len());
        for (name, settings) in &config.sinks {
            let inputs_done = self.inputs_done(config, name, &ended, &delivery);
            loops.push(
                self.build_sink_loop(name, settings, &dead_letters, inputs_done)
                    .await?,
            );
        }
        for sink_loop in loops {
            // Dropped when the loop returns or unwinds: its dead-letter target may then end.
            let ended = ended[sink_loop.name.as_str()].clone().drop_guard();
            delivery.spawn(async move {
                sink_loop.run().await;
                drop(ended);
            });
        }
        self.start_spool_tasks(config, dead_letters, &delivery);
        delivery.close();
        Ok(delivery)
    }

    /// Cancelled once nothing more can reach sink `name`: when the ingest is done and, if other
    /// sinks dead-letter into it, when their loops have ended too.
    fn inputs_done(
        &self,
        config: &Config,
        name: &str,
        ended: &BTreeMap<&str, CancellationToken>,
        delivery: &TaskTracker,
    ) -> CancellationToken {
        let sources: Vec<CancellationToken> = config
            .sinks
            .iter()
            .filter(|(_, s)| s.dead_letter.as_deref() == Some(name))
            .map(|(source, _)| ended[source.as_str()].clone())
            .collect();
        if sources.is_empty() {
            return self.ingest_done.clone();
        }
        let (inputs_done, ingest_done) = (CancellationToken::new(), self.ingest_done.clone());
        let inputs = inputs_done.clone();
        delivery.spawn(async move {
            ingest_done.cancelled().await;
            for source in sources {
                source.cancelled().await;
            }
            inputs.cancel();
        });
        inputs_done
    }

    /// Builds sink `name` and the loop that delivers to it from the spool.
    async fn build_sink_loop(
        &self,
        name: &str,
        settings: &SinkSettings,
        dead_letters: &DeadLetters,
        inputs_done: CancellationToken,
    ) -> Result<SinkLoop, StartError> {
        let Wiring {
            spool,
            stats,
            status,
            tail,
            give_up,
            ..
        } = self;
        let sink = Sink::build(name, &settings.kind, SINK_LIMITS).await?;
        Ok(SinkLoop {
            name: name.to_owned(),
            sink,
            redaction: settings.redaction.clone(),
            retry: settings.retry,
            reader: spool.reader(name)?.into(),
            tail: tail.subscribe(),
            held: None,
            dead_letters: dead_letters.clone(),
            dead_letter_sink: settings
                .dead_letter
                .as_ref()
                .map(|target| (spool.clone(), spool.mask(&[target.as_str()]))),
            stats: stats.clone(),
            status: status.register_sink(name),
            ingest_done: inputs_done,
            give_up: give_up.clone(),
        })
    }

    /// Starts the fsync timer (in `interval` mode) and the dead-letter replay poller.
    fn start_spool_tasks(
        &self,
        config: &Config,
        dead_letters: DeadLetters,
        delivery: &TaskTracker,
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
            config.sinks.keys().cloned().collect(),
            self.ingest_done.clone(),
        ));
    }

    /// Starts the ingest: events in, routed and appended to the spool, then announced on the
    /// tail. Returns its task and the sender the token sockets hand events to.
    fn start_ingest(&self, config: &Config) -> (TaskTracker, mpsc::Sender<Event>) {
        let ingest = TaskTracker::new();
        let (events_tx, events_rx) = mpsc::channel(INGEST_CAPACITY);
        let (routes, spool, tail, stats, done) = (
            config.routes.clone(),
            self.spool.clone(),
            self.tail.clone(),
            self.stats.clone(),
            self.ingest_done.clone(),
        );
        ingest.spawn(async move {
            ingest::ingest(events_rx, routes, spool, tail, stats).await;
            done.cancel();
        });
        ingest.close();
        (ingest, events_tx)
    }
}

/// Starts one socket per configured token.
fn start_supervisor(
    config: &Config,
    events: mpsc::Sender<Event>,
    status: &StatusBoard,
) -> Supervisor {
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
fn lock_spool(dir: &std::path::Path) -> Result<File, StartError> {
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
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::SpoolInUse(dir.to_owned())),
        Err(std::fs::TryLockError::Error(source)) => Err(StartError::Lock { path, source }),
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
