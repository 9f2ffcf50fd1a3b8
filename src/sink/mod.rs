//! Sinks: where events leave the bridge.
//!
//! A sink takes a batch and reports one [`Outcome`] per event: delivered (the destination
//! confirmed it), retryable, or permanent. Handing a batch over ([`Sink::send`]) and learning its
//! outcomes ([`Confirmations`]) are two steps, so the delivery loop can keep the next batches
//! moving while a broker's acknowledgements travel. Sinks hold no retry policy; the delivery loop
//! in [`crate::delivery`] decides what to do with each outcome. Each sink keeps the classification
//! of its errors in a pure function beside its transport, so the decision can be tested alone.

pub mod file;
pub mod http;
pub mod kafka;
pub mod nats;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use crate::event::{AsciiBuf, Event};
use crate::types::Problem;
use schemars::JsonSchema;
use std::path::PathBuf;

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

/// The outcomes of one batch handed to a sink, one per event in batch order, once the
/// destination confirmed or refused each. Owns what it waits on (acks, delivery reports, a
/// flush), so it does not hold the sink: the next batch can be handed over meanwhile.
pub type Confirmations = Pin<Box<dyn Future<Output = Vec<Outcome>> + Send>>;

/// Confirmations that are already known (a sink that finishes its work while handing over).
pub fn settled(outcomes: Vec<Outcome>) -> Confirmations {
    Box::pin(std::future::ready(outcomes))
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

/// How an event is laid out on the wire (CloudEvents "content modes").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Envelope {
    /// Chatwoot's data bytes as the payload, the CloudEvents attributes as headers: consumers
    /// that do not know CloudEvents still read plain Chatwoot JSON.
    #[default]
    Binary,
    /// The whole CloudEvent as one JSON object, for transports or consumers without headers.
    Structured,
}

/// `content-type` of a structured-mode payload.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// `content-type` of a binary-mode payload: Chatwoot's data is JSON.
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// A CloudEvents attribute carried as a header in binary mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute {
    SpecVersion,
    Id,
    Source,
    Type,
    Time,
    Subject,
    ChatwootEvent,
    ChatwootToken,
    ChatwootAccount,
}

impl Attribute {
    /// The attribute's name, without a transport prefix.
    pub const fn name(self) -> &'static str {
        match self {
            Attribute::SpecVersion => "specversion",
            Attribute::Id => "id",
            Attribute::Source => "source",
            Attribute::Type => "type",
            Attribute::Time => "time",
            Attribute::Subject => "subject",
            Attribute::ChatwootEvent => "chatwootevent",
            Attribute::ChatwootToken => "chatwoottoken",
            Attribute::ChatwootAccount => "chatwootaccount",
        }
    }

    /// The header name in the NATS and HTTP bindings (`ce-` prefix), as a constant: formatting
    /// it for every header of every event showed in profiles.
    pub const fn dashed(self) -> &'static str {
        match self {
            Attribute::SpecVersion => "ce-specversion",
            Attribute::Id => "ce-id",
            Attribute::Source => "ce-source",
            Attribute::Type => "ce-type",
            Attribute::Time => "ce-time",
            Attribute::Subject => "ce-subject",
            Attribute::ChatwootEvent => "ce-chatwootevent",
            Attribute::ChatwootToken => "ce-chatwoottoken",
            Attribute::ChatwootAccount => "ce-chatwootaccount",
        }
    }

    /// The header name in the Kafka binding (`ce_` prefix).
    pub const fn underscored(self) -> &'static str {
        match self {
            Attribute::SpecVersion => "ce_specversion",
            Attribute::Id => "ce_id",
            Attribute::Source => "ce_source",
            Attribute::Type => "ce_type",
            Attribute::Time => "ce_time",
            Attribute::Subject => "ce_subject",
            Attribute::ChatwootEvent => "ce_chatwootevent",
            Attribute::ChatwootToken => "ce_chatwoottoken",
            Attribute::ChatwootAccount => "ce_chatwootaccount",
        }
    }
}

/// Calls `f` with each CloudEvents attribute carried as a header in binary mode, in a fixed
/// order, values unencoded. Values are lent, not allocated: ids, times and numbers are formatted
/// on the stack, and each transport copies them into its own header type once. `datacontenttype`
/// is left to each binding: Kafka and HTTP use their own `content-type` header.
pub fn each_binary_attribute(event: &Event, mut f: impl FnMut(Attribute, &str)) {
    f(Attribute::SpecVersion, "1.0");
    f(Attribute::Id, event.id.hex().as_str());
    f(Attribute::Source, &event.source);
    let mut text = String::with_capacity(TYPE_PREFIX.len() + event.name.len());
    text.push_str(TYPE_PREFIX);
    text.push_str(&event.name);
    f(Attribute::Type, &text);
    f(Attribute::Time, event.time_text().as_str());
    if let Some(conversation) = event.keys.conversation_id {
        text.clear();
        text.push_str(SUBJECT_PREFIX);
        text.push_str(AsciiBuf::decimal(conversation).as_str());
        f(Attribute::Subject, &text);
    }
    f(Attribute::ChatwootEvent, &event.name);
    f(Attribute::ChatwootToken, &event.token);
    if let Some(account) = event.keys.account_id {
        f(
            Attribute::ChatwootAccount,
            AsciiBuf::decimal(account).as_str(),
        );
    }
}

/// Before the event name in CloudEvents `type` (as [`Event::ce_type`] writes it).
const TYPE_PREFIX: &str = "com.chatwoot.";

/// Before the conversation id in CloudEvents `subject` (as [`Event::subject`] writes it).
const SUBJECT_PREFIX: &str = "conversation/";

/// The CloudEvents attributes carried as headers in binary mode, in a fixed order, without the
/// transport prefix (`ce_` for Kafka, `ce-` for NATS and HTTP). `datacontenttype` is left to
/// each binding: Kafka and HTTP use their own `content-type` header.
pub fn binary_attributes(event: &Event) -> Vec<(&'static str, String)> {
    let mut attributes = Vec::with_capacity(9);
    each_binary_attribute(event, |attribute, value| {
        attributes.push((attribute.name(), value.to_owned()))
    });
    attributes
}

/// The payload for `envelope`: data bytes as received (shared with the event, not copied), or
/// the structured CloudEvent.
pub fn payload(event: &Event, envelope: Envelope) -> Bytes {
    match envelope {
        Envelope::Binary => event.data.bytes(),
        Envelope::Structured => {
            let mut out = Vec::with_capacity(event.data.get().len() + 512);
            event.write_structured(&mut out);
            Bytes::from(out)
        }
    }
}

/// Header values in the CloudEvents HTTP (and NATS) binding: space, `"`, `%` and anything
/// outside printable ASCII are percent-encoded, byte by byte of the UTF-8.
pub fn percent_encode_header(value: &str) -> std::borrow::Cow<'_, str> {
    let keep = |b: u8| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%';
    if value.bytes().all(keep) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for b in value.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// How long `check --connect` waits for each destination.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Every kind of sink, dispatched statically.
pub enum Sink {
    File(file::FileSink),
    Kafka(Box<kafka::KafkaSink>),
    Nats(Box<nats::NatsSink>),
    Http(Box<http::HttpSink>),
}

impl Sink {
    /// Opens the sink described by `config`. Fails only for settings that can never work: a
    /// broker that is down now is reached later, while events wait in the sink's queue.
    pub async fn build(name: &str, config: &SinkKind) -> Result<Sink, SinkBuildError> {
        let failed = |message: String| SinkBuildError {
            sink: name.into(),
            message,
        };
        match config {
            SinkKind::Kafka(settings) => kafka::KafkaSink::build(settings)
                .map(|s| Sink::Kafka(Box::new(s)))
                .map_err(|e| failed(e.to_string())),
            SinkKind::Nats(settings) => nats::NatsSink::build(settings)
                .await
                .map(|s| Sink::Nats(Box::new(s)))
                .map_err(|e| failed(e.to_string())),
            SinkKind::Http(settings) => http::HttpSink::build(settings)
                .map(|s| Sink::Http(Box::new(s)))
                .map_err(|e| failed(e.to_string())),
            SinkKind::File { path } => {
                file::FileSink::open(path)
                    .await
                    .map(Sink::File)
                    .map_err(|e| SinkBuildError {
                        sink: name.into(),
                        message: format!("cannot open {} for appending: {e}", path.display()),
                    })
            }
            SinkKind::Stdout => Ok(Sink::File(file::FileSink::stdout())),
        }
    }

    /// Tries the destination once, for `check --connect`; the error says what failed, in words.
    pub async fn probe(name: &str, config: &SinkKind) -> Result<(), String> {
        let mut sink = Sink::build(name, config).await.map_err(|e| e.message)?;
        // Building never waits for a broker, so reaching one is a separate step.
        let reached = match &mut sink {
            Sink::File(_) => Ok(()),
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
    pub async fn send(&mut self, batch: &[Arc<Event>]) -> Confirmations {
        match self {
            Sink::File(sink) => settled(sink.deliver(batch).await),
            Sink::Kafka(sink) => sink.send(batch).await,
            Sink::Nats(sink) => sink.send(batch).await,
            Sink::Http(sink) => settled(sink.deliver(batch).await),
        }
    }

    /// Delivers a batch; the result has one outcome per event, in order.
    pub async fn deliver(&mut self, batch: &[Arc<Event>]) -> Vec<Outcome> {
        self.send(batch).await.await
    }

    /// Whether events handed over in one batch arrive in batch order for each conversation
    /// (sequential writes, a partitioned log). A sink that sends concurrently (HTTP) does not,
    /// and is then given at most one event per conversation at a time.
    pub fn preserves_key_order(&self) -> bool {
        match self {
            // One writer, one sequential stream.
            Sink::File(_) => true,
            // The idempotent producer keeps per-partition order, and one conversation is one key.
            Sink::Kafka(_) => true,
            // One connection; the server stores publishes in the order they arrive.
            Sink::Nats(_) => true,
            // Requests run concurrently (max_in_flight).
            Sink::Http(_) => false,
        }
    }

    /// Flushes and releases the sink at shutdown.
    pub async fn close(&mut self) {
        match self {
            Sink::File(sink) => sink.close().await,
            Sink::Kafka(sink) => sink.close().await,
            Sink::Nats(sink) => sink.close().await,
            Sink::Http(_) => {}
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
    File { path: PathBuf },
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
#[derive(Debug, Clone)]
pub enum SinkKind {
    File { path: PathBuf },
    Stdout,
    Kafka(Arc<kafka::KafkaSettings>),
    Nats(Arc<nats::NatsSettings>),
    Http(Arc<http::HttpSettings>),
}

impl SinkConfig {
    /// Checks one sink; `key` is its path (`sinks.<name>`), the prefix of every problem.
    pub(crate) fn validate(self, key: &str) -> Result<SinkKind, Vec<Problem>> {
        Ok(match self {
            SinkConfig::File { path } => SinkKind::File { path },
            SinkConfig::Stdout {} => SinkKind::Stdout,
            SinkConfig::Kafka(c) => SinkKind::Kafka(Arc::new(c.validate(key)?)),
            SinkConfig::Nats(c) => SinkKind::Nats(Arc::new(c.validate(key)?)),
            SinkConfig::Http(c) => SinkKind::Http(Arc::new(c.validate(key)?)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_percent_encoded_as_the_http_binding_says() {
        assert_eq!(percent_encode_header("plain-ASCII/1.0"), "plain-ASCII/1.0");
        assert_eq!(percent_encode_header("a b\"c%d"), "a%20b%22c%25d");
        assert_eq!(percent_encode_header("café\n"), "caf%C3%A9%0A");
    }

    #[test]
    fn binary_attributes_are_the_events_own_texts() {
        let mut e = Event::for_test(
            "message.created",
            "agent",
            r#"{"account_id":3,"conversation_id":7}"#,
        );
        e.id = crate::event::EventId(0xabc);
        e.received_at += Duration::new(1_781_964_126, 318_123_456);
        let expected = [
            ("specversion", "1.0".to_owned()),
            ("id", format!("{:032x}", 0xabc)),
            ("source", e.source.to_string()),
            ("type", e.ce_type()),
            (
                "time",
                humantime::format_rfc3339_micros(e.received_at).to_string(),
            ),
            ("subject", e.subject().unwrap()),
            ("chatwootevent", e.name.to_string()),
            ("chatwoottoken", e.token.to_string()),
            ("chatwootaccount", "3".to_owned()),
        ];
        assert_eq!(binary_attributes(&e), expected);
        each_binary_attribute(&e, |attribute, _| {
            assert_eq!(attribute.dashed(), format!("ce-{}", attribute.name()));
            assert_eq!(attribute.underscored(), format!("ce_{}", attribute.name()));
        });
    }

    #[test]
    fn binary_attributes_include_subject_and_account_only_when_known() {
        let e = Event::for_test(
            "message.created",
            "agent",
            r#"{"account_id":3,"conversation_id":7}"#,
        );
        let names: Vec<&str> = binary_attributes(&e).iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "specversion",
                "id",
                "source",
                "type",
                "time",
                "subject",
                "chatwootevent",
                "chatwoottoken",
                "chatwootaccount"
            ]
        );
        let e = Event::for_test("presence.update", "agent", r#"{"users":{}}"#);
        let names: Vec<&str> = binary_attributes(&e).iter().map(|(n, _)| *n).collect();
        assert!(!names.contains(&"subject") && !names.contains(&"chatwootaccount"));
    }
}
