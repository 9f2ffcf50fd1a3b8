//! `type: kafka` as written, and what it validates into.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::route::template::Template;
use crate::secret_file;
use crate::sink::Envelope;
use crate::types::{OneOrMany, Problem, Problems, Scalar, Secret, SECRET_MUST_BE_TEXT};

/// `type: kafka` as written.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers: `host:port`, a comma-separated string or a list.
    brokers: OneOrMany<String>,
    /// Topic template, e.g. `chatwoot.{event}`.
    topic: String,
    /// Record key template; absent means `{account_id}:{conversation_id}` or the event id.
    key: Option<String>,
    /// Passed to librdkafka as is (SASL, SSL, compression, linger, ...); values may be secrets,
    /// and those (names with `password` or `secret`) must be strings.
    #[serde(default)]
    librdkafka: BTreeMap<String, Scalar>,
    /// librdkafka options whose values are read from files (an option to a path), such as
    /// `sasl.password`; an option may not be in `librdkafka` too.
    #[serde(default)]
    librdkafka_file: BTreeMap<String, PathBuf>,
    /// Binary (default) or structured CloudEvents.
    #[serde(default)]
    envelope: Envelope,
}

/// A validated Kafka sink.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSettings {
    /// Comma-separated bootstrap servers.
    pub(crate) brokers: String,
    /// Where each event goes.
    pub(crate) topic: Template,
    /// The record key; `None` is the conversation rule (see [`super::sink::default_key`]).
    pub(crate) key: Option<Template>,
    /// Operator overrides, applied after the sink's defaults.
    pub(crate) librdkafka: Vec<(String, Secret)>,
    /// Binary or structured CloudEvents.
    pub(crate) envelope: Envelope,
    /// Whether librdkafka's retries can reorder a partition's records, given the overrides.
    pub(crate) record_order: RecordOrder,
}

/// What librdkafka's settings do to the order of one partition's records across retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordOrder {
    /// The idempotent producer (the sink's default) keeps order with up to 5 requests in flight.
    Idempotent,
    /// Idempotence is off and at most one request per connection is in flight (the sink sets
    /// this when the operator did not set `max.in.flight`): a retry goes out before anything
    /// later, so it cannot land after it.
    OneInFlight,
    /// Idempotence is off and the operator allowed more than one request in flight: a retried
    /// request can land after a later one, so the sink does not claim order.
    Unordered,
}

impl RecordOrder {
    /// The order the operator's overrides leave: only `enable.idempotence` and `max.in.flight`
    /// (and its long name) matter. Values are read as librdkafka reads them.
    fn from_overrides(overrides: &BTreeMap<String, Secret>) -> RecordOrder {
        let idempotent = overrides.get("enable.idempotence").is_none_or(|v| {
            !matches!(
                v.expose().trim().to_ascii_lowercase().as_str(),
                "false" | "f" | "0"
            )
        });
        let in_flight = overrides
            .get("max.in.flight.requests.per.connection")
            .or_else(|| overrides.get("max.in.flight"));
        match (idempotent, in_flight) {
            (true, _) => RecordOrder::Idempotent,
            (false, None) => RecordOrder::OneInFlight,
            (false, Some(n)) if n.expose().trim() == "1" => RecordOrder::OneInFlight,
            (false, Some(_)) => RecordOrder::Unordered,
        }
    }
}

impl KafkaConfig {
    /// Checks the settings; `key` (`sinks.<name>`) prefixes every problem.
    pub(crate) fn validate(self, key: &str) -> Result<KafkaSettings, Vec<Problem>> {
        let mut problems = Problems::new(key);
        let brokers: Vec<String> = self
            .brokers
            .into_vec()
            .iter()
            .flat_map(|b| b.split(','))
            .map(|b| b.trim().to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        if brokers.is_empty() {
            problems.add("brokers", "names no broker");
        }
        let topic = problems.check("topic", Template::compile("topic", &self.topic));
        if let Some(topic) = &topic {
            for literal in topic.literals() {
                if kafka_topic_literal_is_bad(literal) {
                    problems.add(
                        "topic",
                        format!(
                            "`{}` has characters Kafka does not allow in topic names (only A-Z a-z 0-9 . _ -)",
                            topic.as_str()
                        ),
                    );
                    break;
                }
            }
        }
        let record_key = match &self.key {
            Some(text) => problems
                .check("key", Template::compile("key", text))
                .map(Some),
            None => Some(None),
        };
        for (name, value) in &self.librdkafka {
            if matches!(name.as_str(), "bootstrap.servers" | "metadata.broker.list") {
                problems.add(
                    &format!("librdkafka.{name}"),
                    "set the brokers with `brokers`, not here",
                );
            } else if !value.quoted && (name.contains("password") || name.contains("secret")) {
                problems.add(&format!("librdkafka.{name}"), SECRET_MUST_BE_TEXT);
            }
        }
        let written: BTreeMap<String, Secret> = self
            .librdkafka
            .into_iter()
            .map(|(name, value)| (name, value.text))
            .collect();
        for name in self.librdkafka_file.keys() {
            if matches!(name.as_str(), "bootstrap.servers" | "metadata.broker.list") {
                problems.add(
                    &format!("librdkafka_file.{name}"),
                    "set the brokers with `brokers`, not here",
                );
            }
        }
        let librdkafka =
            secret_file::map(&mut problems, "librdkafka", written, self.librdkafka_file);
        let record_order = RecordOrder::from_overrides(&librdkafka);
        let envelope = self.envelope;
        problems.finish(|| KafkaSettings {
            brokers: brokers.join(","),
            topic: topic.expect("no problems means the topic compiled"),
            key: record_key.expect("no problems means the key compiled"),
            librdkafka: librdkafka.into_iter().collect(),
            envelope,
            record_order,
        })
    }
}

/// Whether a literal part of a topic template has characters Kafka refuses in topic names.
fn kafka_topic_literal_is_bad(literal: &str) -> bool {
    !literal
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_problems_name_their_keys() {
        let config: KafkaConfig = serde_json::from_value(serde_json::json!({
            "brokers": "",
            "topic": "chatwoot {acount_id}",
            "key": "{event",
            "librdkafka": {"bootstrap.servers": "x", "sasl.password": "hunter2"}
        }))
        .unwrap();
        let problems = config.validate("sinks.k").unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let text = text.join("\n");
        assert!(text.contains("sinks.k.brokers: names no broker"), "{text}");
        assert!(
            text.contains("sinks.k.topic: unknown template field {acount_id}"),
            "{text}"
        );
        assert!(text.contains("sinks.k.key: unbalanced braces"), "{text}");
        assert!(
            text.contains("sinks.k.librdkafka.bootstrap.servers"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn librdkafka_values_stay_out_of_debug_output() {
        let config: KafkaConfig = serde_json::from_value(serde_json::json!({
            "brokers": ["a:9092", "b:9092"],
            "topic": "chatwoot.{event}",
            "librdkafka": {"sasl.password": "hunter2"}
        }))
        .unwrap();
        let settings = config.validate("sinks.k").unwrap();
        assert_eq!(settings.brokers, "a:9092,b:9092");
        let dump = format!("{settings:?}");
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(dump.contains("sasl.password"), "{dump}");
    }

    #[test]
    fn librdkafka_numbers_are_text_but_a_secret_must_be_written_as_text() {
        let config: KafkaConfig = serde_json::from_value(serde_json::json!({
            "brokers": "a:9092",
            "topic": "t",
            "librdkafka": {"linger.ms": 5, "enable.idempotence": false, "sasl.password": 4711}
        }))
        .unwrap();
        let problems = config.validate("sinks.k").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "sinks.k.librdkafka.sasl.password");
        assert!(problems[0].message.contains("put it in quotes"));
        assert!(!problems[0].message.contains("4711"));
        let config: KafkaConfig = serde_json::from_value(serde_json::json!({
            "brokers": "a:9092",
            "topic": "t",
            "librdkafka": {"linger.ms": 5, "enable.idempotence": false, "sasl.password": "0042"}
        }))
        .unwrap();
        let settings = config.validate("sinks.k").unwrap();
        let options: Vec<(&str, &str)> = settings
            .librdkafka
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        assert_eq!(
            options,
            [
                ("enable.idempotence", "false"),
                ("linger.ms", "5"),
                ("sasl.password", "0042")
            ]
        );
    }
}
