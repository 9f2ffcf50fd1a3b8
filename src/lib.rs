//! chatwoot-bridge: Chatwoot's real-time ActionCable stream, delivered to the buses people run.
//!
//! One supervised socket per configured pubsub token reads Chatwoot's broadcasts; each becomes a
//! CloudEvents-shaped [`Event`](event::Event) with a stable id, passes the route table, is
//! appended to the spool, and is delivered from there to every sink its routes chose.
//!
//! # Layout
//! One folder per stage, in the order data flows, each owning its settings. Folders import each
//! other in one direction only: the wiring and the config on top, the delivery loop above the
//! sinks it drives, sinks and the source above the routes and events they use, and the event,
//! the spool, the status board and the config vocabulary ([`types`]) at the bottom.
//!
//! ```text
//! source ──Event──▶ delivery::ingest ──route──▶ spool ──▶ delivery (a loop per sink) ──▶ sink
//! ```
//! - [`source`]: Chatwoot's cable: frames ([`source::protocol`]), one token's socket
//!   ([`source::cable`]), one task per token ([`source::supervisor`]), their settings, and the
//!   profile (or public contact API) a token given as an API access token (or as a contact's
//!   identifiers) reads its pubsub token from ([`source::profile`]); over Chatwoot's REST API
//!   ([`source::rest`]) a token's gaps are backfilled ([`source::backfill`]) and a stalled
//!   broadcast noticed ([`source::stall`]).
//! - [`event`]: the envelope ([`event::Event`]), its ids ([`event::id`]), the keys scanned out of
//!   `data`, its CloudEvents attributes, the spool record codec.
//! - [`route`]: the compiled route table (event globs, tokens, accounts, conditions on `data`),
//!   the templates of topics, subjects and URLs, and [`route::redact`] (what a sink may not see).
//! - [`spool`]: the durable segment log every event is appended to; one cursor per sink; sinks
//!   join and leave while it is open.
//! - [`delivery`]: [`delivery::ingest`] (ids, routes swapped between batches, append; restarted
//!   after a panic with what it held), then one loop per sink: read,
//!   hand over with acks outstanding, settle retries, dead-letter ([`delivery::dead_letter`]),
//!   commit.
//! - [`sink`]: the sink contract and the sinks: `file`/`stdout`, [`sink::kafka`], [`sink::nats`],
//!   [`sink::http`]; each folder holds its config, its validation and its transport.
//!
//! Around the data path:
//! - [`config`]: the YAML file, `${VAR}` expansion, validation into each stage's settings; it
//!   sits above the stages because it builds their settings.
//! - [`types`]: the config vocabulary every stage shares (secrets, durations, problems); a leaf.
//! - [`secret_file`]: the `*_file` twin of every secret key, read at load; a leaf over `types`.
//! - [`tls`]: the client TLS of the cable and the webhooks (`tls:`: system and bundled roots, a
//!   private CA, a client certificate), checked at load; a leaf over `types`.
//! - [`status`]: every token's and sink's state in one place, for logs, health, metrics and tests;
//!   each count an atomic on a cell its loop holds; the loops' health, and the config's hash
//!   and reloads.
//! - [`admin`]: the admin endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`, `/tap`,
//!   `POST /reload`) reading the board, the pipeline's counters and the spool; and its client,
//!   for the `tap`, `top` and `reload` commands. It sits beside the wiring, which starts it.
//! - `backoff`: exponential delays with full jitter, shared by reconnects and sink retries.
//! - `memory`: `memory_limit` divided among the stages that hold events, and the byte gate
//!   between the sockets and the spool.
//! - [`notify`]: systemd's service notifications (READY, RELOADING, STOPPING, STATUS) and the
//!   watchdog's keep-alive, sent only while a liveness check passes.
//! - [`probe`]: a plain HTTP GET of the admin endpoint (`healthcheck`), for images without curl.
//! - [`mock`]: a Chatwoot that behaves like the real one, for tests, demos and benchmarks: the
//!   ActionCable server with streams per identity as `RoomChannel` (`identity`), every event name
//!   routed as Chatwoot's listener routes it (`catalog`), the records it broadcasts from
//!   (`model`, `activity`) and the REST API that reads them (`rest`), with the recorded
//!   [`mock::fixtures`].
//! - [`cases`]: `chatwoot-bridge test`: sample events run through a config's routes, templates
//!   and redaction, each checked against the sinks it must reach; above the config it checks.
//! - [`bridge`]: the wiring: [`Bridge::start`] opens the spool, builds the sinks and their loops,
//!   starts the ingest and the sockets; [`Bridge::shutdown`] stops them in reverse; [`run`] is
//!   both around an injected shutdown future. Its `loops` keep one task per sink that restarts
//!   a panicked loop from its cursor; its `reload` is [`Bridge::reload`], which applies a new
//!   config in place, changing only what differs.
//! - `test_panics` (tests only): makes a loop panic once, as `spool::inject_fault` makes a disk
//!   fail.
//! - `fuzzing` (feature `fuzzing`, for `fuzz/` only): one entry point per reader of untrusted
//!   input, so the fuzz targets reach private readers without making them public.
//!
//! The binary (`src/main.rs`) is a thin CLI over [`Bridge`] and [`mock::MockServer`].

pub mod admin;
mod backoff;
pub mod bridge;
pub mod cases;
pub mod config;
pub mod delivery;
pub mod event;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod memory;
pub mod mock;
pub mod notify;
pub mod probe;
pub mod route;
pub mod secret_file;
pub mod sink;
pub mod source;
pub mod spool;
pub mod status;
#[cfg(test)]
mod test_panics;
pub mod tls;
pub mod types;

pub use bridge::{
    run, Bridge, Drain, Persistence, ReloadError, ReloadReport, ShutdownReport, StartError,
};
