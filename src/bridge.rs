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

use crate::config::Config;
use crate::delivery::dead_letter::{DeadLetterError, DeadLetters};
use crate::delivery::ingest::{self, PipelineStats, INGEST_CAPACITY};
use crate::delivery::SinkLoop;
use crate::sink::{Sink, SinkBuildError, SinkLimits};
use crate::source::supervisor::Supervisor;
use crate::spool::{FsyncMode, Spool, SpoolError};
use crate::status::StatusBoard;

/// Why the bridge could not start. Nothing has connected when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Sink(#[from] SinkBuildError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    DeadLetters(#[from] DeadLetterError),
    #[error("spool {0} is in use by another chatwoot-bridge process (one spool, one process)")]
    SpoolInUse(PathBuf),
    #[error("cannot lock spool {path}: {source}")]
    Lock {
        path: PathBuf,
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
    spool: Spool,
    /// Held for the life of the bridge: two processes on one spool would deliver twice.
    _spool_lock: File,
    /// How long shutdown waits for in-flight events.
    shutdown_timeout: std::time::Duration,
}

/// What shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every sink caught up with the spool before the deadline. When false, what is left
    /// stays in the spool and is delivered after the next start.
    pub drained: bool,
    /// Whether the spool was fsynced at the end: then nothing that was read is lost, drained or
    /// not.
    pub persisted: bool,
}

impl Bridge {
    /// Opens the spool and the sinks, then starts the pipeline and one socket per token.
    /// Fails before connecting anything if the spool or a sink cannot be opened.
    pub async fn start(config: Config) -> Result<Bridge, StartError> {
        let spool_lock = lock_spool(&config.spool.dir)?;
        let sink_names: Vec<String> = config.sinks.keys().cloned().collect();
        let spool_config = config.spool.clone();
        let spool = {
            let names = sink_names.clone();
            tokio::task::spawn_blocking(move || Spool::open(spool_config, &names))
                .await
                .expect("opening the spool does not panic")?
        };
        let dead_letters = DeadLetters::open(&config.spool.dir)?;
        let stats = Arc::new(PipelineStats::default());
        let ingest_done = CancellationToken::new();
        let give_up = CancellationToken::new();
        let delivery = TaskTracker::new();

        let status = StatusBoard::new();
        let (tail, _) = tokio::sync::broadcast::channel(ingest::TAIL_BATCHES);
        // A loop ends once nothing more can reach its sink: after the ingest for most; for a
        // dead-letter target, also after every loop that dead-letters into it has ended.
        let ended: BTreeMap<&str, CancellationToken> = config
            .sinks
            .keys()
            .map(|name| (name.as_str(), CancellationToken::new()))
            .collect();
        let mut loops = Vec::with_capacity(config.sinks.len());
        for (name, settings) in &config.sinks {
            let sources: Vec<CancellationToken> = config
                .sinks
                .iter()
                .filter(|(_, s)| s.dead_letter.as_deref() == Some(name.as_str()))
                .map(|(source, _)| ended[source.as_str()].clone())
                .collect();
            let inputs_done = if sources.is_empty() {
                ingest_done.clone()
            } else {
                let (inputs_done, ingest_done) = (CancellationToken::new(), ingest_done.clone());
                let inputs = inputs_done.clone();
                delivery.spawn(async move {
                    ingest_done.cancelled().await;
                    for source in sources {
                        source.cancelled().await;
                    }
                    inputs.cancel();
                });
                inputs_done
            };
            // A sink loop keeps up to MAX_UNCONFIRMED + MAX_BATCH - 1 events unconfirmed.
            let limits = SinkLimits {
                max_unconfirmed_events: crate::delivery::MAX_UNCONFIRMED + ingest::MAX_BATCH - 1,
            };
            let sink = Sink::build(name, &settings.kind, limits).await?;
            loops.push(SinkLoop {
                name: name.clone(),
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
            });
        }
        for sink_loop in loops {
            // Dropped when the loop returns or unwinds: its dead-letter target may then end.
            let ended = ended[sink_loop.name.as_str()].clone().drop_guard();
            delivery.spawn(async move {
                sink_loop.run().await;
                drop(ended);
            });
        }
        if config.spool.fsync == FsyncMode::Interval {
            delivery.spawn(ingest::sync_periodically(
                spool.clone(),
                config.spool.fsync_interval,
                ingest_done.clone(),
            ));
        }
        delivery.spawn(ingest::replay_dead_letters(
            dead_letters,
            spool.clone(),
            sink_names,
            ingest_done.clone(),
        ));
        delivery.close();

        let ingest = TaskTracker::new();
        let (events_tx, events_rx) = mpsc::channel(INGEST_CAPACITY);
        {
            let (routes, spool, stats, done) = (
                config.routes.clone(),
                spool.clone(),
                stats.clone(),
                ingest_done.clone(),
            );
            ingest.spawn(async move {
                ingest::ingest(events_rx, routes, spool, tail, stats).await;
                done.cancel();
            });
        }
        ingest.close();

        let mut supervisor = Supervisor::new(
            Arc::new(config.cable.clone()),
            events_tx,
            status.clone(),
            CancellationToken::new(),
        );
        let report = supervisor.apply(&config.tokens);
        info!(tokens = report.started.len(), sinks = config.sinks.len(), spool = %config.spool.dir.display(), "bridge started");
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

    pub fn status(&self) -> &StatusBoard {
        &self.status
    }

    pub fn stats(&self) -> &PipelineStats {
        &self.stats
    }

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
        let drained = tokio::time::timeout(self.shutdown_timeout, self.delivery.wait())
            .await
            .is_ok();
        if !drained {
            self.give_up.cancel();
            self.delivery.wait().await;
            error!(timeout = ?self.shutdown_timeout,
                "shutdown deadline passed before every sink caught up; the rest stays in the spool for the next start");
        }
        let spool = self.spool.clone();
        let synced = tokio::task::spawn_blocking(move || spool.sync())
            .await
            .expect("spool sync does not panic");
        if let Err(e) = &synced {
            error!(error = %e, "cannot fsync the spool at shutdown");
        }
        info!(
            delivered = self.stats.delivered.load(Ordering::Relaxed),
            "shutdown complete"
        );
        ShutdownReport {
            drained,
            persisted: synced.is_ok(),
        }
    }
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
