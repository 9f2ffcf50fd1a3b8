//! Where events enter: Chatwoot's ActionCable socket, one per pubsub token.
//!
//! ```text
//! Supervisor ──one per token──▶ TokenTask (cable) ──frames──▶ protocol ──Event──▶ ingest
//! ```
//! [`protocol`] turns frames into events and commands into frames and knows nothing of sockets;
//! [`cable`] owns one socket's life (connect, subscribe, notice silence, reconnect);
//! [`supervisor`] keeps one such task running per configured token and restarts it on panic.
//! Beside the socket, a token given as an API access token reads Chatwoot's REST API
//! ([`rest`]): to fill a reconnect's gap ([`backfill`]) and to notice a subscribed socket that
//! Chatwoot stopped broadcasting to ([`stall`]); the socket reports to both through [`gaps`],
//! and both share what a token knows of its conversations' activity ([`activity`]).

pub mod activity;
pub mod backfill;
pub mod cable;
pub mod gaps;
pub mod profile;
pub mod protocol;
pub mod rest;
pub mod resume;
pub mod sender;
pub mod settings;
pub mod stall;
mod subscriber;
pub mod supervisor;
