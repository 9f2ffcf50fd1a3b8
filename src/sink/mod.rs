//! Sinks: where events leave the bridge.
//!
//! # The sink contract
//! Every sink implements `Destination`, with the same verbs:
//! - **build**: from its validated settings (its `config.rs` turned the YAML into them before
//!   anything connects) and the caller's [`SinkLimits`]. Fails only for settings that can never
//!   work, with a typed error; a destination that is down now is reached later.
//! - **send**: hands a batch over and returns its `Confirmations`.
//! - **confirm**: awaiting the `Confirmations` gives one [`Outcome`] per event, in batch order:
//!   delivered (the destination confirmed it), retryable, or permanent. The future owns what it
//!   waits on (acks, delivery reports, a flush), so the next batch can be sent meanwhile.
//! - **probe**: tries the destination once, for `check --connect`, without delivering anything.
//! - **close**: flushes and releases the sink at shutdown.
//!
//! Each sink declares its ordering (`Destination::preserves_key_order`) and keeps the classification of its
//! errors (retryable or permanent) in a pure function beside its transport, so the decision can
//! be tested alone. Sinks hold no retry policy: the delivery loop decides what to do with each
//! outcome.
//!
//! # Layout
//! One folder per sink (`kafka/`, `nats/`, `http/`): `config.rs` (the serde config, its
//! `validate`, the typed settings), `sink.rs` (the sink, its build error and its classifier),
//! `mod.rs` (re-exports). A new sink copies a folder, implements `Destination`, and adds a
//! variant to [`SinkConfig`], [`SinkKind`], [`Sink`] and the build error's cause. The CloudEvents
//! bindings they share are in `cloudevents.rs`; `file.rs` is the file and stdout sink.

mod cloudevents;
pub mod file;
pub mod http;
pub mod kafka;
pub mod nats;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::event::Event;
use crate::route::template;
use crate::types::{Problem, Problems};

pub use cloudevents::{binary_attributes, Envelope};
pub(crate) use cloudevents::{
    each_binary_attribute, payload, percent_encode_header, DATA_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
};

/// A destination the bridge delivers to: the contract every sink implements (see the module
/// documentation). Dispatched statically through [`Sink`].
pub(crate) trait Destination: Sized {
    /// The validated settings the sink is built from.
    type Settings;
    /// Why the settings can never work; never an unreachable destination.
    type BuildError: Into<BuildCause>;
    /// Whether events handed over in one batch arrive in batch order for each conversation
    /// (sequential writes, a partitioned log). A sink that sends concurrently, or whose client
    /// may reorder retries, does not, and is then given at most one event per conversation at a
    /// time.
    fn preserves_key_order(&self) -> bool;

    /// Creates the sink; connecting happens in the background or on first use.
    async fn build(settings: &Self::Settings, limits: SinkLimits)
        -> Result<Self, Self::BuildError>;

    /// Hands a batch to the destination and returns what to wait on for its outcomes.
    async fn send(&mut self, batch: &[Arc<Event>]) -> Confirmations;

    /// Tries the destination once, within `within`; the error says what failed, in words.
    async fn probe(&self, within: Duration) -> Result<(), String>;

    /// Flushes and releases the sink at shutdown.
    async fn close(&mut self);
}

/// Bounds kept by whoever drives a sink, which a sink may need to size its client by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkLimits {
    /// The most events handed over and not yet confirmed at once. A client that refuses
    /// publishes beyond its own bound (NATS JetStream's outstanding acks) is set above this.
    pub max_unconfirmed_events: usize,
}

/// What happened to one event of a batch.
#[derive(Debug)]
pub enum Outcome {
    /// The destination confirmed it.
    Delivered,
    /// Not delivered this time; the same event may succeed later.
    Retryable(SinkError),
    /// Will never succeed as it is (a bad template value, a rejected payload).
    Permanent(SinkError),
}

impl Outcome {
    /// A copy of a batch-wide outcome, for one more event of the batch.
    pub(crate) fn same(&self) -> Outcome {
        match self {
            Outcome::Delivered => Outcome::Delivered,
            Outcome::Retryable(e) => Outcome::Retryable(e.clone()),
            Outcome::Permanent(e) => Outcome::Permanent(e.clone()),
        }
    }
}

/// The outcomes of one batch handed to a sink, one per event in batch order, once the
/// destination confirmed or refused each. Owns what it waits on (acks, delivery reports, a
/// flush), so it does not hold the sink: the next batch can be handed over meanwhile.
pub(crate) type Confirmations = Pin<Box<dyn Future<Output = Vec<Outcome>> + Send>>;

/// Confirmations that are already known (a sink that finishes its work while handing over).
pub(crate) fn settled(outcomes: Vec<Outcome>) -> Confirmations {
    Box::pin(std::future::ready(outcomes))
}

/// The same outcome for every event of `batch`, already known.
pub(crate) fn settled_all(batch: &[Arc<Event>], outcome: &Outcome) -> Confirmations {
    settled(batch.iter().map(|_| outcome.same()).collect())
}

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    Retryable,
    Permanent,
}

/// A delivery error, worded for an operator. Never contains secrets.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// What went wrong, for logs, status and dead letters.
    pub message: String,
    /// The destination asked to be left alone this long (HTTP `Retry-After`); the retry loop
    /// waits at least this long before the next attempt.
    pub retry_after: Option<Duration>,
}

impl SinkError {
    /// An error without a requested pause.
    pub(crate) fn new(message: impl Into<String>) -> Self {
        SinkError {
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds the destination's requested pause.
    pub(crate) fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// The outcome for this error in the given class.
    pub(crate) fn outcome(self, class: ErrorClass) -> Outcome {
        match class {
            ErrorClass::Retryable => Outcome::Retryable(self),
            ErrorClass::Permanent => Outcome::Permanent(self),
        }
    }
}

/// A sink could not be set up from its config.
#[derive(Debug, thiserror::Error)]
#[error("sink `{sink}`: {cause}")]
pub struct SinkBuildError {
    /// The sink's name in the config.
    pub(crate) sink: String,
    /// What was wrong, by kind of sink.
    pub(crate) cause: BuildCause,
}

/// Why a sink could not be built, by kind. Each message says what was wrong, never a secret.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BuildCause {
    #[error(transparent)]
    File(#[from] file::FileBuildError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaBuildError),
    #[error(transparent)]
    Nats(#[from] nats::NatsBuildError),
    #[error(transparent)]
    Http(#[from] http::HttpBuildError),
}

/// How long `check --connect` waits for each destination.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The limits of a sink built only to be probed: a probe hands nothing over.
const PROBE_LIMITS: SinkLimits = SinkLimits {
    max_unconfirmed_events: 1,
};

/// Every kind of sink, dispatched statically.
pub enum Sink {
    /// `type: file` and `type: stdout`.
    File(file::FileSink),
    /// `type: kafka`.
    Kafka(Box<kafka::KafkaSink>),
    /// `type: nats`.
    Nats(Box<nats::NatsSink>),
    /// `type: http`.
    Http(Box<http::HttpSink>),
}

/// Builds one kind of sink, naming the sink in the error.
async fn build<D: Destination>(
    name: &str,
    settings: &D::Settings,
    limits: SinkLimits,
) -> Result<D, SinkBuildError> {
    D::build(settings, limits)
        .await
        .map_err(|e| SinkBuildError {
            sink: name.into(),
            cause: e.into(),
        })
}

impl Sink {
    /// Opens the sink described by `config`. Fails only for settings that can never work: a
    /// broker that is down now is reached later, while events wait in the sink's queue.
    pub async fn build(
        name: &str,
        config: &SinkKind,
        limits: SinkLimits,
    ) -> Result<Sink, SinkBuildError> {
        Ok(match config {
            SinkKind::Kafka(settings) => {
                Sink::Kafka(Box::new(build(name, settings, limits).await?))
            }
            SinkKind::Nats(settings) => Sink::Nats(Box::new(build(name, settings, limits).await?)),
            SinkKind::Http(settings) => Sink::Http(Box::new(build(name, settings, limits).await?)),
            SinkKind::File { path, mode } => {
                let target = file::FileTarget::Append {
                    path: path.clone(),
                    mode: *mode,
                };
                Sink::File(build(name, &target, limits).await?)
            }
            SinkKind::Stdout => Sink::File(build(name, &file::FileTarget::Stdout, limits).await?),
        })
    }

    /// Tries the destination once, for `check --connect`; the error says what failed, in words.
    pub async fn probe(name: &str, config: &SinkKind) -> Result<(), String> {
        let mut sink = Sink::build(name, config, PROBE_LIMITS)
            .await
            .map_err(|e| e.cause.to_string())?;
        // Building never waits for a broker, so reaching one is a separate step.
        let reached = match &sink {
            Sink::File(s) => s.probe(PROBE_TIMEOUT).await,
            Sink::Kafka(s) => s.probe(PROBE_TIMEOUT).await,
            Sink::Nats(s) => s.probe(PROBE_TIMEOUT).await,
            Sink::Http(s) => s.probe(PROBE_TIMEOUT).await,
        };
        sink.close().await;
        reached
    }

    /// Hands a batch to the destination and returns what to wait on for its outcomes. Brokers
    /// (Kafka, NATS) return as soon as the batch is queued on their connection; the file and
    /// HTTP sinks finish the work first.
    pub(crate) async fn send(&mut self, batch: &[Arc<Event>]) -> Confirmations {
        match self {
            Sink::File(sink) => sink.send(batch).await,
            Sink::Kafka(sink) => sink.send(batch).await,
            Sink::Nats(sink) => sink.send(batch).await,
            Sink::Http(sink) => sink.send(batch).await,
        }
    }

    /// Delivers a batch; the result has one outcome per event, in order.
    pub async fn deliver(&mut self, batch: &[Arc<Event>]) -> Vec<Outcome> {
        self.send(batch).await.await
    }

    /// Whether events handed over in one batch arrive in batch order for each conversation, as
    /// the sink declares ([`Destination::preserves_key_order`]).
    pub(crate) fn preserves_key_order(&self) -> bool {
        match self {
            Sink::File(sink) => sink.preserves_key_order(),
            Sink::Kafka(sink) => sink.preserves_key_order(),
            Sink::Nats(sink) => sink.preserves_key_order(),
            Sink::Http(sink) => sink.preserves_key_order(),
        }
    }

    /// Flushes and releases the sink at shutdown.
    pub async fn close(&mut self) {
        match self {
            Sink::File(sink) => sink.close().await,
            Sink::Kafka(sink) => sink.close().await,
            Sink::Nats(sink) => sink.close().await,
            Sink::Http(sink) => sink.close().await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Which sink, as written and as validated.

/// A sink's kind as written in the file; [`SinkKind`] is what it validates into.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// Append CloudEvents JSON lines to a file.
    File {
        /// The file, created when missing.
        path: PathBuf,
        /// Permissions of a file the sink creates, octal in quotes (default "0600": the owner
        /// alone); an existing file keeps its own.
        mode: Option<file::FileMode>,
    },
    /// Write CloudEvents JSON lines to standard output.
    Stdout {},
    /// Produce to Kafka topics.
    Kafka(kafka::KafkaConfig),
    /// Publish to NATS subjects, optionally into a JetStream stream.
    Nats(nats::NatsConfig),
    /// Send HTTP webhooks.
    Http(http::HttpConfig),
}

/// A validated sink kind: templates compiled, URLs and secrets checked.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    /// Append to this file.
    File {
        /// The file, created when missing.
        path: PathBuf,
        /// Permission bits of the file when the sink creates it.
        mode: u32,
    },
    /// Write to standard output.
    Stdout,
    /// Produce to Kafka.
    Kafka(Arc<kafka::KafkaSettings>),
    /// Publish to NATS.
    Nats(Arc<nats::NatsSettings>),
    /// Send webhooks.
    Http(Arc<http::HttpSettings>),
}

impl SinkKind {
    /// The Kafka topic or NATS subject this sink gives `event` (for `check`), or why it cannot;
    /// `None` for sinks without one (file, stdout, webhooks, whose URL may hold credentials).
    pub fn topic_or_subject(&self, event: &Event) -> Option<Result<String, String>> {
        match self {
            SinkKind::Http(_) => None,
            _ => self.target(event),
        }
    }

    /// Where this sink sends `event` (its Kafka topic, NATS subject or webhook URL, rendered as
    /// the sink renders it), or why it cannot (the event would go to the dead letters); `None`
    /// for file and stdout.
    pub(crate) fn target(&self, event: &Event) -> Option<Result<String, String>> {
        let rendered = match self {
            SinkKind::Kafka(settings) => settings.topic.render(event, template::kafka_topic),
            SinkKind::Nats(settings) => {
                settings
                    .subject
                    .render_with(event, &template::nats_event, &template::nats_token)
            }
            SinkKind::Http(settings) => settings.url.render(event, template::url_segment),
            SinkKind::File { .. } | SinkKind::Stdout => return None,
        };
        Some(rendered.map_err(|e| e.to_string()))
    }

    /// What [`SinkKind::target`] is for this kind of sink, in words (`topic`, `subject`, `URL`).
    pub(crate) fn target_kind(&self) -> Option<&'static str> {
        match self {
            SinkKind::Kafka(_) => Some("topic"),
            SinkKind::Nats(_) => Some("subject"),
            SinkKind::Http(_) => Some("URL"),
            SinkKind::File { .. } | SinkKind::Stdout => None,
        }
    }
}

impl SinkConfig {
    /// Checks one sink; `key` is its path (`sinks.<name>`), the prefix of every problem.
    pub(crate) fn validate(self, key: &str) -> Result<SinkKind, Vec<Problem>> {
        Ok(match self {
            SinkConfig::File { path, mode } => {
                let mut problems = Problems::new(key);
                let mode = problems.check("mode", file::parse_mode(mode.as_ref()));
                problems.finish(|| SinkKind::File {
                    path,
                    mode: mode.expect("no problems means the mode parsed"),
                })?
            }
            SinkConfig::Stdout {} => SinkKind::Stdout,
            SinkConfig::Kafka(c) => SinkKind::Kafka(Arc::new(c.validate(key)?)),
            SinkConfig::Nats(c) => SinkKind::Nats(Arc::new(c.validate(key)?)),
            SinkConfig::Http(c) => SinkKind::Http(Arc::new(c.validate(key)?)),
        })
    }
}
