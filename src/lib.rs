//! chatwoot-bridge: Chatwoot's real-time ActionCable stream, delivered to the buses people run.
//!
//! One supervised socket per configured pubsub token reads Chatwoot's broadcasts; each becomes a
//! CloudEvents-shaped [`Event`](event::Event) with a stable id, passes the route table, is
//! appended to the spool, and is delivered from there to every sink its routes chose.
//!
//! # Layout
//! One folder per stage, in the order data flows:
//!
//! ```text
//! source ──Event──▶ delivery::ingest ──(route)──▶ spool ──▶ delivery (one loop per sink) ──▶ sink
//! ```
//! - [`source`]: Chatwoot's cable: frames ([`source::protocol`]), one token's socket
//!   ([`source::cable`]), one task per token ([`source::supervisor`]), their settings.
//! - [`event`]: the envelope, its ids ([`event::id`]), the keys scanned out of `data`, the
//!   CloudEvents form and the spool record codec.
//! - [`route`]: the compiled route table, with [`route::template`] (topics, subjects, URLs),
//!   [`route::jsonpath`] (conditions on `data`) and [`route::redact`] (what a sink may not see).
//! - [`spool`]: the durable segment log every event is appended to; one cursor per sink.
//! - [`delivery`]: the ingest (ids, routes, append), one loop per sink (deliver in order, retry,
//!   commit), its retry settings and the dead letters.
//! - [`sink`]: the sink contract and the sinks: `file`/`stdout`, Kafka, NATS, HTTP webhooks, each
//!   with its config beside it.
//!
//! Beside the data path:
//! - [`config`]: the YAML file, `${VAR}` expansion, validation into each stage's settings.
//! - [`types`]: the config vocabulary every stage shares (secrets, durations, problems); a leaf.
//! - [`status`]: every token's and sink's state in one place, for logs, health, metrics and tests.
//! - [`backoff`]: exponential delays with full jitter, shared by reconnects and sink retries.
//! - [`mock`]: an ActionCable server that behaves like Chatwoot's, with its recorded
//!   [`mock::fixtures`], for tests, demos and benchmarks.
//! - [`bridge`]: the wiring: [`Bridge::start`], [`Bridge::shutdown`], [`run`].
//!
//! The binary (`src/main.rs`) is a thin CLI over [`Bridge`] and [`mock::MockServer`].

pub mod backoff;
pub mod bridge;
pub mod config;
pub mod delivery;
pub mod event;
pub mod mock;
pub mod route;
pub mod sink;
pub mod source;
pub mod spool;
pub mod status;
pub mod types;

pub use bridge::{run, Bridge, Drain, Persistence, ShutdownReport, StartError};
