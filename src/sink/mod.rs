//! Sinks: where events leave the bridge.
//!
//! A sink takes a batch and reports one [`Outcome`] per event: delivered (the destination
//! confirmed it), retryable, or permanent. Sinks hold no retry policy; the delivery loop in
//! [`crate::pipeline`] decides what to do with each outcome. Each sink keeps the classification
//! of its errors in a pure function beside its transport, so the decision can be tested alone.

pub mod file;

use std::sync::Arc;
use std::time::Duration;

use crate::config::SinkConfig;
use crate::event::Event;

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

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Retryable,
    Permanent,
}

/// A delivery error, worded for an operator. Never contains secrets.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub message: String,
    /// The destination asked to be left alone this long (HTTP `Retry-After`); the retry loop
    /// waits at least this long before the next attempt.
    pub retry_after: Option<Duration>,
}

impl SinkError {
    pub fn new(message: impl Into<String>) -> Self {
        SinkError {
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds the destination's requested pause.
    pub fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// The outcome for this error in the given class.
    pub fn outcome(self, class: ErrorClass) -> Outcome {
        match class {
            ErrorClass::Retryable => Outcome::Retryable(self),
            ErrorClass::Permanent => Outcome::Permanent(self),
        }
    }
}

/// A sink could not be set up from its config.
#[derive(Debug, thiserror::Error)]
#[error("sink `{sink}`: {message}")]
pub struct SinkBuildError {
    pub sink: String,
    pub message: String,
}

/// Every kind of sink, dispatched statically.
pub enum Sink {
    File(file::FileSink),
}

impl Sink {
    /// Opens the sink described by `config`.
    pub async fn build(name: &str, config: &SinkConfig) -> Result<Sink, SinkBuildError> {
        match config {
            SinkConfig::File { path } => {
                file::FileSink::open(path)
                    .await
                    .map(Sink::File)
                    .map_err(|e| SinkBuildError {
                        sink: name.into(),
                        message: format!("cannot open {} for appending: {e}", path.display()),
                    })
            }
            SinkConfig::Stdout {} => Ok(Sink::File(file::FileSink::stdout())),
        }
    }

    /// Delivers a batch; the result has one outcome per event, in order.
    pub async fn deliver(&mut self, batch: &[Arc<Event>]) -> Vec<Outcome> {
        match self {
            Sink::File(sink) => sink.deliver(batch).await,
        }
    }

    /// Flushes and releases the sink at shutdown.
    pub async fn close(&mut self) {
        match self {
            Sink::File(sink) => sink.close().await,
        }
    }
}
