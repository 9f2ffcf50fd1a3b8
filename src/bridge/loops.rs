//! The sink loops as the bridge keeps them: one task per sink that runs its delivery loop and,
//! after a panic, builds it again and resumes from the committed cursor (redelivering what was
//! not confirmed: at-least-once). Loops are started at start and by reloads, stopped one at a
//! time by reloads, and told at shutdown when nothing more will come for them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::config::SinkSettings;
use crate::delivery::dead_letter::DeadLetters;
use crate::delivery::ingest::{PipelineStats, Tail};
use crate::delivery::{FileReader, Parked, SinkLoop, SINK_LIMITS};
use crate::memory::SinkMemory;
use crate::sink::{Sink, SinkBuildError};
use crate::spool::{Spool, SpoolError};
use crate::status::{SinkReporter, StatusBoard};

/// Pause before a sink loop that panicked is started again, so that a panic that repeats
/// cannot spin a core (as for token tasks).
const RESTART_AFTER_PANIC: Duration = Duration::from_secs(1);

/// Bounds the wait for a loop told to stop (a reload changed its sink): past it the new loop
/// starts anyway, and what the old one still commits only moves the cursor past events it
/// delivered.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// What every sink loop is built from besides its own settings.
#[derive(Clone)]
pub(super) struct LoopKit {
    /// Where each loop reads its events and commits.
    pub(super) spool: Spool,
    /// The pipeline's counters.
    pub(super) stats: Arc<PipelineStats>,
    /// Where each sink's cell is.
    pub(super) status: StatusBoard,
    /// Batches just appended, taken in memory.
    pub(super) tail: Tail,
    /// Local dead letter files.
    pub(super) dead_letters: DeadLetters,
    /// Where each sink's retry set (parked file) is kept.
    pub(super) spool_dir: PathBuf,
    /// Bounds the lines of a parked file.
    pub(super) max_frame_bytes: u64,
    /// Cancelled when the shutdown deadline passes; each loop's `stop` is a child of it.
    pub(super) give_up: CancellationToken,
}

/// One sink's loop as the bridge tracks it.
pub(super) struct LoopHandle {
    /// The settings it runs with, to tell whether a reload changed them.
    pub(super) settings: SinkSettings,
    /// Stops this loop alone, committing only what is settled (a child of `give_up`).
    pub(super) stop: CancellationToken,
    /// Cancelled when nothing more will be appended for it: it ends once caught up.
    pub(super) inputs_done: CancellationToken,
    /// Cancelled once its task has ended, restarts included.
    pub(super) ended: CancellationToken,
}

/// What a loop runs with for its whole life, across restarts.
struct LoopSpec {
    /// The sink's name.
    name: String,
    /// Its settings.
    settings: SinkSettings,
    /// Its share of `memory_limit`.
    memory: SinkMemory,
    /// See [`LoopHandle::stop`].
    stop: CancellationToken,
    /// See [`LoopHandle::inputs_done`].
    inputs_done: CancellationToken,
    /// Its cell on the status board.
    status: SinkReporter,
}

/// Every sink loop of the bridge.
pub(super) struct SinkLoops {
    /// What each loop is built from.
    pub(super) kit: LoopKit,
    /// Tracks the loops, the spool's timers and the retirements, so shutdown waits for them.
    pub(super) tracker: TaskTracker,
    /// The loops of the configured sinks, by name.
    pub(super) running: BTreeMap<String, LoopHandle>,
    /// Sinks a reload removed, until they have left the spool and the status board.
    pub(super) retiring: BTreeMap<String, Retiring>,
}

/// A sink a reload removed: its loop delivers what it owes (`drain`) or stops (`drop`), then
/// the sink leaves the spool's registry and the status board.
pub(super) struct Retiring {
    /// Its loop.
    pub(super) handle: LoopHandle,
    /// Cancelled when what it owes is given up (`drop`, given by this reload or a later one).
    pub(super) dropping: CancellationToken,
    /// Cancelled once it has left the spool's registry and the status board (or, its drain
    /// cut short by the shutdown deadline, never will in this process).
    pub(super) gone: CancellationToken,
}

/// Builds sink `name` from its settings; contacts no broker.
pub(super) async fn build_sink(
    name: &str,
    settings: &SinkSettings,
) -> Result<Sink, SinkBuildError> {
    Sink::build(name, &settings.kind, SINK_LIMITS).await
}

impl SinkLoops {
    /// No loop yet.
    pub(super) fn new(kit: LoopKit) -> SinkLoops {
        SinkLoops {
            kit,
            tracker: TaskTracker::new(),
            running: BTreeMap::new(),
            retiring: BTreeMap::new(),
        }
    }

    /// Starts the loop of sink `name`, registered in the spool, delivering to `sink`.
    pub(super) fn launch(
        &mut self,
        name: &str,
        settings: &SinkSettings,
        sink: Sink,
        memory: SinkMemory,
    ) -> Result<(), SpoolError> {
        let spec = LoopSpec {
            name: name.to_owned(),
            settings: settings.clone(),
            memory,
            stop: self.kit.give_up.child_token(),
            inputs_done: CancellationToken::new(),
            status: self.kit.status.register_sink(name),
        };
        let first = self.kit.assemble(&spec, sink)?;
        let ended = CancellationToken::new();
        self.running.insert(
            name.to_owned(),
            LoopHandle {
                settings: settings.clone(),
                stop: spec.stop.clone(),
                inputs_done: spec.inputs_done.clone(),
                ended: ended.clone(),
            },
        );
        let kit = self.kit.clone();
        self.tracker.spawn(async move {
            // Cancelled when the task ends or unwinds: loops waiting on it may then end.
            let _ended = ended.drop_guard();
            supervise(kit, spec, first).await;
        });
        Ok(())
    }

    /// Stops the loop of `name` now (what it settled is committed, the rest is read again by
    /// the next loop) and waits up to [`STOP_WAIT`] for it to end. Returns its handle.
    pub(super) async fn stop(&mut self, name: &str) -> Option<LoopHandle> {
        let handle = self.running.remove(name)?;
        handle.stop.cancel();
        if timeout(STOP_WAIT, handle.ended.cancelled()).await.is_err() {
            warn!(sink = name, wait = ?STOP_WAIT,
                "the old delivery loop did not stop in time (its sink does not answer); starting the new one anyway");
        }
        Some(handle)
    }

    /// Shutdown, once the ingest has ended: tells each loop that nothing more will come, a
    /// dead-letter target only once the loops that feed it have ended.
    pub(super) fn end_inputs(&self) {
        for (name, handle) in &self.running {
            let feeders = self.feeders(name);
            let inputs_done = handle.inputs_done.clone();
            if feeders.is_empty() {
                inputs_done.cancel();
                continue;
            }
            self.tracker.spawn(async move {
                for feeder in feeders {
                    feeder.cancelled().await;
                }
                inputs_done.cancel();
            });
        }
    }

    /// The `ended` of every loop that dead-letters into `name` (retiring ones included).
    fn feeders(&self, name: &str) -> Vec<CancellationToken> {
        let retiring = self.retiring.values().map(|r| &r.handle);
        self.running
            .values()
            .chain(retiring)
            .filter(|h| h.settings.dead_letter.as_deref() == Some(name))
            .map(|h| h.ended.clone())
            .collect()
    }

    /// Retires sink `name`, whose loop `handle` was taken out of `running` (with `extra_feeders`,
    /// the `ended` of loops just stopped that fed it): once `routed_around` completes (the
    /// ingest routes nothing more to it) and its feeders have ended, it is told that nothing
    /// more comes, so it delivers the rest and ends; with `drop`, it is stopped at once
    /// instead. Then it leaves the spool's registry (what it did not commit is given up) and
    /// the status board.
    pub(super) fn retire(
        &mut self,
        name: &str,
        handle: LoopHandle,
        drop: bool,
        extra_feeders: Vec<CancellationToken>,
        routed_around: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let dropping = CancellationToken::new();
        if drop {
            dropping.cancel();
            handle.stop.cancel();
        }
        let mut feeders = self.feeders(name);
        feeders.extend(extra_feeders);
        let retiring = Retiring {
            handle,
            dropping,
            gone: CancellationToken::new(),
        };
        let task = RetireTask {
            name: name.to_owned(),
            spool: self.kit.spool.clone(),
            status: self.kit.status.clone(),
            inputs_done: retiring.handle.inputs_done.clone(),
            ended: retiring.handle.ended.clone(),
            dropping: retiring.dropping.clone(),
            gone: retiring.gone.clone(),
        };
        self.tracker.spawn(task.run(feeders, routed_around));
        self.retiring.insert(name.to_owned(), retiring);
    }
}

/// What the task that retires one sink holds.
struct RetireTask {
    /// The sink.
    name: String,
    /// Whose registry it leaves.
    spool: Spool,
    /// Whose board it leaves.
    status: StatusBoard,
    /// Its loop's: cancelled when nothing more comes.
    inputs_done: CancellationToken,
    /// Its loop's: cancelled when the loop has ended.
    ended: CancellationToken,
    /// See [`Retiring::dropping`].
    dropping: CancellationToken,
    /// See [`Retiring::gone`].
    gone: CancellationToken,
}

impl RetireTask {
    /// Waits for the ingest and the feeders, lets the loop end, then takes the sink out.
    async fn run(
        self,
        feeders: Vec<CancellationToken>,
        routed_around: impl std::future::Future<Output = ()>,
    ) {
        routed_around.await;
        for feeder in feeders {
            feeder.cancelled().await;
        }
        self.inputs_done.cancel();
        self.ended.cancelled().await;
        let name = self.name.as_str();
        let left = self.spool.backlog(name).unwrap_or(0);
        let parked = self.status.sink(name).map_or(0, |s| s.parked);
        if left > 0 && !self.dropping.is_cancelled() {
            error!(
                sink = name,
                left,
                "the drain of a removed sink was cut short by the shutdown deadline: its \
                 events not delivered stay in the spool until the bridge restarts without it"
            );
            self.gone.cancel();
            return;
        }
        let spool = self.spool.clone();
        let retired = tokio::task::spawn_blocking({
            let name = self.name.clone();
            move || spool.retire_sink(&name)
        })
        .await
        .expect("retiring a spool sink does not panic");
        match retired {
            Ok(0) if parked == 0 => {
                tracing::info!(sink = name, "removed sink retired: it delivered everything")
            }
            Ok(given_up) => warn!(
                sink = name,
                given_up,
                parked,
                "removed sink retired: the events it had not delivered are given up; those of \
                 its retry set (parked) stay in its parked file, delivered if it comes back"
            ),
            Err(e) => error!(sink = name, error = %e,
                "cannot take the removed sink out of the spool's registry; it leaves at the next start"),
        }
        self.status.unregister_sink(name);
        self.gone.cancel();
    }
}

impl LoopKit {
    /// The loop of `spec`'s sink, reading from its committed cursor.
    fn assemble(&self, spec: &LoopSpec, sink: Sink) -> Result<SinkLoop, SpoolError> {
        let LoopSpec {
            name,
            settings,
            memory,
            ..
        } = spec;
        Ok(SinkLoop {
            name: name.clone(),
            sink,
            redaction: settings.redaction.clone(),
            retry: settings.retry,
            parked: Parked::new(&self.spool_dir, name, self.max_frame_bytes, &settings.retry),
            reader: FileReader::new(self.spool.reader(name)?, memory.read_bytes),
            tail: self.tail.clone(),
            unconfirmed_bytes: memory.unconfirmed_bytes,
            dead_letters: self.dead_letters.clone(),
            dead_letter_sink: settings
                .dead_letter
                .as_ref()
                .map(|target| (self.spool.clone(), self.spool.mask(&[target.as_str()]))),
            stats: self.stats.clone(),
            status: spec.status.clone(),
            ingest_done: spec.inputs_done.clone(),
            give_up: spec.stop.clone(),
        })
    }
}

/// Runs `first`; after a panic, counts it, waits [`RESTART_AFTER_PANIC`], builds the sink and
/// its loop again and runs that, until a loop ends by itself (nothing more comes, or it was
/// stopped) or the loop is stopped while it waits.
async fn supervise(kit: LoopKit, spec: LoopSpec, first: SinkLoop) {
    let mut next = Some(first);
    loop {
        let sink_loop = match next.take() {
            Some(sink_loop) => Ok(sink_loop),
            None => rebuild(&kit, &spec).await,
        };
        match sink_loop {
            Ok(sink_loop) => {
                spec.status.set_alive(true);
                match tokio::spawn(sink_loop.run()).await {
                    Ok(()) => return,
                    Err(e) if e.is_panic() => {
                        error!(sink = %spec.name, pause = ?RESTART_AFTER_PANIC,
                            "delivery loop panicked; restarting it from its committed cursor");
                        spec.status
                            .loop_panicked("delivery loop panicked; restarting it");
                    }
                    // Cancelled: the runtime is shutting down.
                    Err(_) => return,
                }
            }
            Err(e) => {
                spec.status.set_alive(false);
                error!(sink = %spec.name, error = %e, retry_in = ?RESTART_AFTER_PANIC,
                    "cannot build the delivery loop again after a panic");
            }
        }
        tokio::select! {
            () = spec.stop.cancelled() => return,
            () = sleep(RESTART_AFTER_PANIC) => {}
        }
    }
}

/// The sink and its loop built again, after a panic.
async fn rebuild(kit: &LoopKit, spec: &LoopSpec) -> Result<SinkLoop, String> {
    let sink = build_sink(&spec.name, &spec.settings)
        .await
        .map_err(|e| e.to_string())?;
    kit.assemble(spec, sink).map_err(|e| e.to_string())
}
