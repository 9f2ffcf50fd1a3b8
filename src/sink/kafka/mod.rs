//! Kafka sink: one produce per event, confirmed by librdkafka's delivery report.
//!
//! Events follow the CloudEvents Kafka binding: in binary mode the record value is Chatwoot's
//! data bytes and the attributes are `ce_*` headers; in structured mode the value is the whole
//! CloudEvent. The key defaults to `{account_id}:{conversation_id}`, so one conversation's events
//! land on one partition in order.
//!
//! `config.rs` turns `type: kafka` into [`KafkaSettings`]; `sink.rs` is the producer.

mod config;
mod sink;

pub(crate) use config::RecordOrder;
pub use config::{KafkaConfig, KafkaSettings};
pub(crate) use sink::KafkaBuildError;
pub use sink::{headers, KafkaSink};
