//! HTTP webhook sink: one request per event, signed the Standard Webhooks way.
//!
//! Events follow the CloudEvents HTTP binding: in binary mode the body is Chatwoot's data bytes
//! and the attributes are `ce-*` headers; in structured mode the body is the whole CloudEvent.
//! Redirects are not followed: a webhook URL that moved is a configuration to fix, and following
//! one would send the signed body (and custom headers) somewhere nobody configured.
//!
//! `config.rs` turns `type: http` into [`HttpSettings`]; `sink.rs` is the client.

mod config;
mod sink;

pub use config::{HttpConfig, HttpSettings};
pub(crate) use sink::HttpBuildError;
pub use sink::{request_headers, HttpSink};
