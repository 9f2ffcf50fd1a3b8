//! NATS sink: core publish (confirmed by a receipt: a marker the server sends back once it has
//! read the batch) or JetStream (confirmed by the stream's publish ack, deduplicated by
//! `Nats-Msg-Id`).
//!
//! Events follow the CloudEvents NATS binding: in binary mode the payload is Chatwoot's data
//! bytes and the attributes are `ce-*` headers, percent-encoded like the HTTP binding.
//!
//! `config.rs` turns `type: nats` into [`NatsSettings`]; `sink.rs` is the client; `receipt.rs`
//! the round trip that confirms a core batch.

mod config;
mod receipt;
mod sink;

pub use config::{NatsConfig, NatsSettings};
pub(crate) use sink::NatsBuildError;
pub use sink::{headers, NatsSink};
