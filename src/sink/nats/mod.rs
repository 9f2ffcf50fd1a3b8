//! NATS sink: core publish (confirmed only as far as a flush goes) or JetStream (confirmed by the
//! stream's publish ack, deduplicated by `Nats-Msg-Id`).
//!
//! Events follow the CloudEvents NATS binding: in binary mode the payload is Chatwoot's data
//! bytes and the attributes are `ce-*` headers, percent-encoded like the HTTP binding.
//!
//! `config.rs` turns `type: nats` into [`NatsSettings`]; `sink.rs` is the client.

mod config;
mod sink;

pub use config::{NatsConfig, NatsSettings};
pub(crate) use sink::NatsBuildError;
pub use sink::{headers, NatsSink};
