//! The Kafka producer: one produce per event, confirmed by librdkafka's delivery report, and the
//! classification of its errors.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{KafkaSettings, RecordOrder};
use crate::event::Event;
use crate::route::template;
use crate::sink::{
    each_binary_attribute, payload, settled_all, Confirmations, Destination, Envelope, ErrorClass,
    Outcome, SinkError, SinkLimits, DATA_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE,
};

/// How long to wait before re-enqueueing when librdkafka's local queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(20);

/// librdkafka settings the sink sets unless the operator overrides them: no duplicates from
/// librdkafka's own retries, every in-sync replica confirms, keyed records keep their partition
/// (murmur2 like the Java client, random spread for unkeyed ones), and cheap compression.
const DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("partitioner", "murmur2_random"),
    ("compression.type", "lz4"),
    // librdkafka's own default (5 min) would hold a batch (and shutdown) that long when the
    // cluster is down; the bridge's retry loop retries the event afterwards anyway.
    ("message.timeout.ms", "30000"),
    ("client.id", "chatwoot-bridge"),
];

/// Errors that stop a Kafka sink from being created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KafkaBuildError {
    /// librdkafka refused a setting. Holds librdkafka's message with every configured value
    /// masked out, since librdkafka quotes the value it refuses.
    #[error("librdkafka refused the settings: {0}")]
    Config(String),
}

/// `text` with every configured librdkafka value masked: librdkafka quotes values in its errors.
fn redact_values(text: &str, settings: &KafkaSettings) -> String {
    let mut text = text.to_owned();
    for (_, value) in &settings.librdkafka {
        if !value.expose().is_empty() {
            text = text.replace(value.expose(), "<redacted>");
        }
    }
    text
}

/// A producer and what to send with it.
pub struct KafkaSink {
    /// Thread-safe, connects (and reconnects) in the background; creating it never waits for
    /// a broker, so a cluster that is down at startup only delays delivery.
    producer: FutureProducer,
    /// The validated settings.
    settings: Arc<KafkaSettings>,
}

impl Destination for KafkaSink {
    type Settings = Arc<KafkaSettings>;
    type BuildError = KafkaBuildError;

    async fn build(
        settings: &Arc<KafkaSettings>,
        _: SinkLimits,
    ) -> Result<KafkaSink, KafkaBuildError> {
        let producer = create_producer(settings)?;
        Ok(KafkaSink {
            producer,
            settings: settings.clone(),
        })
    }

    /// Enqueues the whole batch; the confirmations are its delivery reports. librdkafka batches
    /// the records on the wire, and an event counts only once the broker confirmed it.
    async fn send(&mut self, batch: &[Arc<Event>]) -> Confirmations {
        if let Err(outcome) = self.replace_failed_producer() {
            return settled_all(batch, &outcome);
        }
        let mut outcomes: Vec<Option<Outcome>> = batch.iter().map(|_| None).collect();
        let mut pending = Vec::with_capacity(batch.len());
        for (i, event) in batch.iter().enumerate() {
            match self.enqueue(event).await {
                Ok(delivery) => pending.push((i, delivery)),
                Err(outcome) => outcomes[i] = Some(outcome),
            }
        }
        Box::pin(async move {
            let indices: Vec<usize> = pending.iter().map(|(i, _)| *i).collect();
            let reports = join_all(pending.into_iter().map(|(_, d)| d)).await;
            for (i, report) in indices.into_iter().zip(reports) {
                outcomes[i] = Some(match report {
                    Ok(Ok(_delivery)) => Outcome::Delivered,
                    Ok(Err((error, _message))) => failure(&error),
                    // The producer went away before reporting: nothing says the broker has it.
                    Err(_canceled) => Outcome::Retryable(SinkError::new(
                        "kafka producer dropped the delivery report",
                    )),
                });
            }
            outcomes
                .into_iter()
                .map(|o| o.expect("every event got an outcome"))
                .collect()
        })
    }

    /// One conversation is one key, so one partition; librdkafka keeps a partition's order
    /// unless retries may reorder it ([`RecordOrder`]).
    fn preserves_key_order(&self) -> bool {
        self.settings.record_order != RecordOrder::Unordered
    }

    /// Asks the cluster for metadata; a constant topic must exist (topics are not assumed to
    /// be auto-created).
    async fn probe(&self, within: Duration) -> Result<(), String> {
        let producer = self.producer.clone();
        let topic =
            (!self.settings.topic.has_fields()).then(|| self.settings.topic.as_str().to_owned());
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(topic.as_deref(), within)
                .map(|m| {
                    m.topics()
                        .iter()
                        .map(|t| (t.name().to_owned(), t.error()))
                        .collect::<Vec<_>>()
                })
        })
        .await
        .map_err(|e| format!("metadata request failed: {e}"))?
        .map_err(|e| format!("cannot reach the brokers {}: {e}", self.settings.brokers))?;
        if !self.settings.topic.has_fields() {
            let wanted = self.settings.topic.as_str();
            match metadata.iter().find(|(name, _)| name == wanted) {
                Some((_, None)) => {}
                Some((_, Some(code))) => {
                    return Err(format!(
                        "topic {wanted}: {:?}",
                        RDKafkaErrorCode::from(*code)
                    ))
                }
                None => return Err(format!("topic {wanted} does not exist")),
            }
        }
        Ok(())
    }

    async fn close(&mut self) {
        // The delivery loop waits for every report before it ends, so records are in flight
        // only if a delivery was abandoned midway (shutdown deadline); without any, flushing
        // would just wait on an unreachable cluster.
        if self.producer.in_flight_count() == 0 {
            return;
        }
        let producer = self.producer.clone();
        // `flush` blocks its thread until librdkafka is done; keep it off the runtime.
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
    }
}

impl KafkaSink {
    /// An idempotent producer that hit a fatal error (e.g. its producer id was fenced) fails
    /// every message from then on: start a new one, as librdkafka's documentation says. The
    /// error is the outcome of every event of the batch when no new one can be made.
    fn replace_failed_producer(&mut self) -> Result<(), Outcome> {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return Ok(());
        };
        tracing::error!(?code, reason = %redact_values(&reason, &self.settings), "kafka producer hit a fatal error; creating a new one");
        match create_producer(&self.settings) {
            Ok(producer) => {
                self.producer = producer;
                Ok(())
            }
            Err(KafkaBuildError::Config(message)) => Err(Outcome::Retryable(SinkError::new(
                format!("kafka: cannot recreate the producer: {message}"),
            ))),
        }
    }

    /// Hands one event to librdkafka, waiting while its local queue is full; the delivery
    /// report to wait on, or the event's outcome when it cannot be produced at all.
    async fn enqueue(&self, event: &Event) -> Result<rdkafka::producer::DeliveryFuture, Outcome> {
        let topic = self
            .settings
            .topic
            .render(event, template::kafka_topic)
            .map_err(|e| Outcome::Permanent(SinkError::new(e.to_string())))?;
        let key = match &self.settings.key {
            Some(t) => t
                .render(event, template::verbatim)
                .map_err(|e| Outcome::Permanent(SinkError::new(e.to_string())))?,
            None => default_key(event),
        };
        let value = payload(event, self.settings.envelope);
        let headers = headers(event, self.settings.envelope);
        let mut record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&value[..])
            .headers(headers);
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                // librdkafka's buffer is full: wait for it to drain rather than fail events
                // that would have gone through a moment later.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((error, _)) => return Err(failure(&error)),
            }
        }
    }
}

/// A producer for `settings`; librdkafka's refusal is returned with the configured values masked.
fn create_producer(settings: &KafkaSettings) -> Result<FutureProducer, KafkaBuildError> {
    client_config(settings)
        .create()
        .map_err(|e: KafkaError| KafkaBuildError::Config(redact_values(&e.to_string(), settings)))
}

/// The librdkafka configuration: safe defaults, then the operator's overrides. With idempotence
/// turned off and nothing said about requests in flight, one at a time: otherwise a retried
/// request could land after a later one and break a conversation's order.
pub(crate) fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (name, value) in DEFAULTS {
        config.set(*name, *value);
    }
    if settings.record_order == RecordOrder::OneInFlight {
        config.set("max.in.flight.requests.per.connection", "1");
    }
    for (name, value) in &settings.librdkafka {
        config.set(name, value.expose());
    }
    config
}

/// `{account_id}:{conversation_id}` when both are known, so a conversation keeps one
/// partition and its order; otherwise the event id, which spreads unrelated events.
pub(crate) fn default_key(event: &Event) -> String {
    match (event.keys.account_id, event.keys.conversation_id) {
        (Some(account), Some(conversation)) => format!("{account}:{conversation}"),
        _ => event.id.to_string(),
    }
}

/// The record headers of the CloudEvents Kafka binding.
pub fn headers(event: &Event, envelope: Envelope) -> OwnedHeaders {
    match envelope {
        Envelope::Binary => {
            // librdkafka copies each header: values are lent from the stack. `insert` takes the
            // list by value, hence the Option. Sized for every header, so the list never grows.
            let mut list = Some(OwnedHeaders::new_with_capacity(10));
            each_binary_attribute(event, |attribute, value| {
                list = list.take().map(|list| {
                    list.insert(Header {
                        key: attribute.underscored(),
                        value: Some(value.as_bytes()),
                    })
                });
            });
            let headers = list.expect("the list is put back after each insert");
            headers.insert(Header {
                key: "content-type",
                value: Some(DATA_CONTENT_TYPE),
            })
        }
        Envelope::Structured => OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(STRUCTURED_CONTENT_TYPE),
        }),
    }
}

fn failure(error: &KafkaError) -> Outcome {
    let class = match error.rdkafka_error_code() {
        Some(code) => classify(code),
        // Errors without a code are client-side states (cancelled, shutting down): try again.
        None => ErrorClass::Retryable,
    };
    SinkError::new(describe(error)).outcome(class)
}

fn describe(error: &KafkaError) -> Cow<'static, str> {
    Cow::Owned(format!("kafka: {error}"))
}

/// Whether a produce error can succeed later. Permanent: the record itself is refused (too
/// large, invalid), the topic or partition does not exist (topics are not auto-created), or the
/// credentials are not allowed to write. Everything else (timeouts, leader changes, brokers
/// down, throttling) is retryable.
pub(crate) fn classify(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidMessage
        | C::BadMessage
        | C::InvalidTopic
        | C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::UnsupportedSASLMechanism
        | C::UnsupportedForMessageFormat
        | C::UnsupportedCompressionType
        | C::InvalidRequiredAcks
        | C::PolicyViolation
        | C::InvalidArgument
        | C::KeySerialization
        | C::ValueSerialization => ErrorClass::Permanent,
        _ => ErrorClass::Retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{Sink, SinkKind};
    use rdkafka::message::Headers;

    #[test]
    fn classification() {
        use RDKafkaErrorCode as C;
        for code in [
            C::MessageSizeTooLarge,
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::SaslAuthenticationFailed,
        ] {
            assert_eq!(classify(code), ErrorClass::Permanent, "{code:?}");
        }
        for code in [
            C::MessageTimedOut,
            C::QueueFull,
            C::AllBrokersDown,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::RequestTimedOut,
            C::NotEnoughReplicas,
            C::BrokerTransportFailure,
        ] {
            assert_eq!(classify(code), ErrorClass::Retryable, "{code:?}");
        }
    }

    #[test]
    fn default_key_groups_a_conversation() {
        let e = Event::for_test(
            "message.created",
            "agent",
            r#"{"account_id":3,"conversation_id":7}"#,
        );
        assert_eq!(default_key(&e), "3:7");
        let e = Event::for_test("contact.updated", "agent", r#"{"account_id":3,"id":7}"#);
        assert_eq!(default_key(&e), e.id.to_string());
    }

    #[test]
    fn binary_headers_follow_the_kafka_binding() {
        let e = Event::for_test(
            "message.created",
            "agent",
            r#"{"account_id":3,"conversation_id":7}"#,
        );
        let h = headers(&e, Envelope::Binary);
        let got: Vec<(String, String)> = h
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
                )
            })
            .collect();
        let get = |k: &str| got.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ce_specversion"), Some("1.0"));
        assert_eq!(get("ce_type"), Some("com.chatwoot.message.created"));
        assert_eq!(get("ce_subject"), Some("conversation/7"));
        assert_eq!(get("ce_chatwootaccount"), Some("3"));
        assert_eq!(get("content-type"), Some("application/json"));
        let h = headers(&e, Envelope::Structured);
        assert_eq!(h.count(), 1);
    }

    #[test]
    fn refused_settings_do_not_echo_values() {
        let config: super::super::KafkaConfig = serde_json::from_value(serde_json::json!({
            "brokers": "127.0.0.1:1",
            "topic": "t",
            "librdkafka": {"acks": "hunter2-not-a-number"}
        }))
        .unwrap();
        let settings = config.validate("sinks.k").unwrap();
        let Err(e) = create_producer(&settings) else {
            panic!("an invalid acks value must be refused")
        };
        let text = e.to_string();
        assert!(text.contains("acks"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    /// The settings of a sink with these librdkafka overrides.
    fn settings(librdkafka: serde_json::Value) -> KafkaSettings {
        let config: super::super::KafkaConfig = serde_json::from_value(serde_json::json!({
            "brokers": "127.0.0.1:1", "topic": "t", "librdkafka": librdkafka
        }))
        .unwrap();
        config.validate("sinks.k").unwrap()
    }

    /// What the sink claims about order, and the in-flight limit librdkafka is given.
    async fn claim(librdkafka: serde_json::Value) -> (bool, Option<String>) {
        let settings = settings(librdkafka);
        let config = client_config(&settings);
        let in_flight = config
            .get("max.in.flight.requests.per.connection")
            .or_else(|| config.get("max.in.flight"))
            .map(str::to_owned);
        let limits = SinkLimits {
            max_unconfirmed_events: 1,
        };
        let sink = Sink::build("k", &SinkKind::Kafka(Arc::new(settings)), limits)
            .await
            .unwrap();
        (sink.preserves_key_order(), in_flight)
    }

    #[tokio::test]
    async fn order_is_claimed_only_when_retries_cannot_reorder() {
        // The idempotent producer (the default) keeps order with up to 5 requests in flight.
        assert_eq!(claim(serde_json::json!({})).await, (true, None));
        // Without idempotence a retried request can land after a later one: one in flight.
        assert_eq!(
            claim(serde_json::json!({"enable.idempotence": "false"})).await,
            (true, Some("1".to_owned()))
        );
        assert_eq!(
            claim(serde_json::json!({"enable.idempotence": "F", "max.in.flight": "1"})).await,
            (true, Some("1".to_owned()))
        );
        // The operator allowed more in flight: their setting stands, and order is not claimed.
        assert_eq!(
            claim(serde_json::json!({
                "enable.idempotence": "0", "max.in.flight.requests.per.connection": "5"
            }))
            .await,
            (false, Some("5".to_owned()))
        );
        assert_eq!(
            claim(serde_json::json!({"enable.idempotence": "true", "max.in.flight": "5"})).await,
            (true, Some("5".to_owned()))
        );
    }
}
