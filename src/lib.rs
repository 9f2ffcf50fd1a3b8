//! chatwoot-bridge: Chatwoot's real-time ActionCable stream, delivered to the buses people run.
//!
//! One supervised socket per configured pubsub token reads Chatwoot's broadcasts; each becomes a
//! CloudEvents-shaped [`Event`](event::Event) with a stable id, passes the route table, and is
//! delivered to every sink its routes chose.
//!
//! # Layout
//! - [`config`]: the YAML schema, `${VAR}` expansion, validation into typed settings.
//! - [`protocol`]: ActionCable frames in, commands out; nothing else.
//! - [`cable`]: one token's socket: connect, subscribe, detect silence, reconnect.
//! - [`backoff`]: exponential delays with full jitter, shared by reconnects and sink retries.
//! - [`supervisor`]: one task per token, restarted on panic; the token set can change at runtime.
//! - [`status`]: every token's state in one place, for logs, health, metrics and tests.
//! - [`event`]: the envelope, the ids pulled out of `data`, the CloudEvents JSON form.
//! - [`id`]: event ids: one per broadcast, shared by copies on several tokens.
//! - [`route`]: the compiled route table (event globs, tokens, accounts, inboxes, conditions on data).
//! - [`jsonpath`]: one value at a dotted path of raw JSON, without building a tree.
//! - [`redact`]: removing `pubsub_token` keys and configured fields before a sink sees `data`.
//! - [`pipeline`]: ingest (ids, routing) and one delivery loop per sink.
//! - [`sink`]: the sink interface and the sinks: `file`/`stdout`, Kafka, NATS, HTTP webhooks.
//! - [`template`]: topic, subject, key and URL templates, compiled at config load.
//! - [`mock`]: an ActionCable server that behaves like Chatwoot's, for tests, demos, benchmarks.
//! - [`fixtures`]: frames recorded from Chatwoot, embedded.
//!
//! The binary (`src/main.rs`) is a thin CLI over [`Bridge`] and [`mock::MockServer`].

pub mod backoff;
pub mod cable;
pub mod config;
pub mod event;
pub mod fixtures;
pub mod id;
pub mod jsonpath;
pub mod mock;
pub mod pipeline;
pub mod protocol;
pub mod redact;
pub mod route;
pub mod sink;
pub mod status;
pub mod supervisor;
pub mod template;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::config::Config;
use crate::pipeline::{PipelineStats, RetrySettings, QUEUE_CAPACITY};
use crate::sink::{Sink, SinkBuildError};
use crate::status::StatusBoard;
use crate::supervisor::Supervisor;

/// A running bridge: token sockets, the pipeline and the sinks.
pub struct Bridge {
    /// Token states, readable while running.
    status: StatusBoard,
    /// Pipeline counters, readable while running.
    stats: Arc<PipelineStats>,
    /// Owns the token tasks; taken at shutdown.
    supervisor: Supervisor,
    /// The ingest task and the sink loops.
    pipeline: TaskTracker,
    /// Tells sink loops to stop retrying once the shutdown deadline has passed.
    give_up: CancellationToken,
    /// How long shutdown waits for in-flight events.
    shutdown_timeout: std::time::Duration,
}

/// What shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether everything read from the sockets was delivered (or refused for good) in time.
    pub drained: bool,
}

impl Bridge {
    /// Opens the sinks, then starts the pipeline and one socket per token.
    /// Fails before connecting anything if a sink cannot be opened.
    pub async fn start(config: Config) -> Result<Bridge, SinkBuildError> {
        let stats = Arc::new(PipelineStats::default());
        let pipeline = TaskTracker::new();
        let give_up = CancellationToken::new();

        let mut queues = Vec::new();
        let mut loops = Vec::new();
        for name in config.routes.sink_names() {
            let settings = &config.sinks[name];
            let sink = Sink::build(name, &settings.kind).await?;
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
            queues.push(tx);
            loops.push((name.clone(), sink, settings.redaction.clone(), rx));
        }
        for (name, sink, redaction, rx) in loops {
            pipeline.spawn(pipeline::sink_loop(
                name,
                sink,
                redaction,
                rx,
                RetrySettings::default(),
                stats.clone(),
                give_up.clone(),
            ));
        }
        let (events_tx, events_rx) = mpsc::channel(QUEUE_CAPACITY);
        pipeline.spawn(pipeline::ingest(
            events_rx,
            config.routes.clone(),
            queues,
            stats.clone(),
        ));
        pipeline.close();

        let status = StatusBoard::new();
        let mut supervisor = Supervisor::new(
            Arc::new(config.cable.clone()),
            events_tx,
            status.clone(),
            CancellationToken::new(),
        );
        let report = supervisor.apply(&config.tokens);
        info!(
            tokens = report.started.len(),
            sinks = config.routes.sink_names().len(),
            "bridge started"
        );
        Ok(Bridge {
            status,
            stats,
            supervisor,
            pipeline,
            give_up,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    pub fn status(&self) -> &StatusBoard {
        &self.status
    }

    pub fn stats(&self) -> &PipelineStats {
        &self.stats
    }

    /// Stops reading sockets, then delivers what was read, within the shutdown timeout.
    pub async fn shutdown(self) -> ShutdownReport {
        info!("shutting down: closing sockets, delivering what was read");
        self.supervisor.shutdown().await;
        let drained = tokio::time::timeout(self.shutdown_timeout, self.pipeline.wait())
            .await
            .is_ok();
        if !drained {
            self.give_up.cancel();
            self.pipeline.wait().await;
            error!(timeout = ?self.shutdown_timeout, "shutdown timed out before every event was delivered");
        }
        info!(
            delivered = self.stats.delivered.load(Ordering::Relaxed),
            "shutdown complete"
        );
        ShutdownReport { drained }
    }
}

/// Runs the bridge until `shutdown` completes, then shuts it down gracefully.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<ShutdownReport, SinkBuildError> {
    let bridge = Bridge::start(config).await?;
    shutdown.await;
    Ok(bridge.shutdown().await)
}
