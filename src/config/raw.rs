//! The config file as written: the `Raw*` serde types, their defaults, and so the JSON Schema.
//!
//! Unknown keys are refused. Every default is read from the settings type of the stage that
//! uses it ([`CableSettings`], [`ReconnectSettings`], [`RetrySettings`], [`SpoolConfig`]), so
//! each is written once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;

use super::Retirement;
use crate::delivery::retry::RetrySettings;
use crate::memory::DEFAULT_MEMORY_LIMIT;
use crate::route::redact::FieldsSpec;
use crate::route::RouteSpec;
use crate::sink::SinkConfig;
use crate::source::settings::{CableSettings, ReconnectSettings};
use crate::spool::{FsyncMode, SpoolConfig, WhenFull};
use crate::tls::TlsConfig;
use crate::types::{fraction, number, optional_number, HumanDuration, Secret};

/// chatwoot-bridge configuration: Chatwoot's cable, the tokens to listen with, the sinks, and
/// the routes between them.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "chatwoot-bridge config")]
pub(super) struct RawConfig {
    /// Where Chatwoot's cable is and how the sockets to it behave.
    pub(super) chatwoot: RawChatwoot,
    /// The pubsub tokens to listen with: one socket each.
    pub(super) tokens: Vec<RawToken>,
    /// Where events are delivered, by a name routes refer to.
    #[serde(default)]
    pub(super) sinks: BTreeMap<String, RawSink>,
    /// Which events go to which sinks, tried in order.
    #[serde(default)]
    pub(super) routes: Vec<RouteSpec>,
    /// `drop` (default) or the name of a sink for events no route matches.
    #[serde(default)]
    pub(super) unmatched: Option<String>,
    /// The durable local queue every event is written to before any sink sees it.
    #[serde(default)]
    pub(super) spool: RawSpool,
    /// How long shutdown may take, from the signal, to store and deliver what was read before it
    /// gives up; the process ends within this plus 5 s.
    #[serde(default = "default_shutdown_timeout")]
    pub(super) shutdown_timeout: HumanDuration,
    /// Bytes of events held in memory at once, shared by the sockets' way to the spool, the
    /// in-memory tail and the sinks; at least twice `chatwoot.max_frame_bytes`.
    #[serde(default = "default_memory_limit", deserialize_with = "number")]
    #[schemars(with = "u64")]
    pub(super) memory_limit: u64,
    /// Sinks a reload removes while they still hold events not delivered, by name, and what
    /// becomes of those events: `drain` (delivered first, then the sink is removed) or
    /// `{ drop: COUNT }` (given up; COUNT at least the events it holds). Read on reload only.
    #[serde(default)]
    pub(super) retired_sinks: BTreeMap<String, Retirement>,
    /// The admin endpoint: metrics, health, status, tap and reload over HTTP. Off unless set.
    #[serde(default)]
    pub(super) admin: Option<RawAdmin>,
}

/// The admin endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`, `/tap`, `POST /reload`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    /// `IP:port`, or a port alone for loopback (127.0.0.1:9464 when left out). It has no
    /// authentication: bind it to an address only trusted clients reach.
    #[serde(default, deserialize_with = "optional_text_or_number")]
    #[schemars(with = "Option<ListenSchema>")]
    pub(super) listen: Option<String>,
    /// Which tokens must be subscribed for `/readyz` to say ready: `all` (the default), `any`,
    /// or a list of token names (the spool must be writable too).
    #[serde(default)]
    pub(super) ready_requires: Option<RawReadyRequires>,
}

/// How `listen:` may be written, for the schema.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum ListenSchema {
    /// A port, on loopback.
    Port(u16),
    /// `IP:port`.
    Address(String),
}

/// `ready_requires:` as written: a keyword or a list of token names.
#[derive(Debug, JsonSchema)]
#[serde(untagged)]
pub(super) enum RawReadyRequires {
    /// `all` or `any`.
    Keyword(String),
    /// Token names.
    Tokens(Vec<String>),
}

impl<'de> Deserialize<'de> for RawReadyRequires {
    /// A string or a list of strings; anything else is refused with what is expected, not
    /// serde's "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde_json::Value;
        let expected = || serde::de::Error::custom("must be `all`, `any` or a list of token names");
        match Value::deserialize(d)? {
            Value::String(keyword) => Ok(RawReadyRequires::Keyword(keyword)),
            Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(name) => Ok(name),
                    _ => Err(expected()),
                })
                .collect::<Result<_, _>>()
                .map(RawReadyRequires::Tokens),
            _ => Err(expected()),
        }
    }
}

/// `backfill:` of a token as written: on or off, or on with settings.
#[derive(Debug, JsonSchema)]
#[serde(untagged)]
pub(super) enum RawBackfill {
    /// `true` or `false`.
    Switch(bool),
    /// On, with settings.
    Settings(RawBackfillSettings),
}

/// `backfill: { ... }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackfillSettings {
    /// The longest gap a backfill reads (default 1h); a longer one is given up, logged and
    /// counted.
    pub(super) max_gap: Option<HumanDuration>,
}

impl RawBackfill {
    /// The settings when backfill is on; `None` when off.
    pub(super) fn settings(&self) -> Option<&RawBackfillSettings> {
        const DEFAULT: RawBackfillSettings = RawBackfillSettings { max_gap: None };
        match self {
            RawBackfill::Switch(true) => Some(&DEFAULT),
            RawBackfill::Switch(false) => None,
            RawBackfill::Settings(settings) => Some(settings),
        }
    }
}

impl<'de> Deserialize<'de> for RawBackfill {
    /// `true`, `false` or a mapping of settings; anything else is refused with what is
    /// expected, not serde's "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde_json::Value;
        match Value::deserialize(d)? {
            Value::Bool(on) => Ok(RawBackfill::Switch(on)),
            Value::String(text) if text == "true" || text == "false" => {
                Ok(RawBackfill::Switch(text == "true"))
            }
            settings @ Value::Object(_) => serde_json::from_value(settings)
                .map(RawBackfill::Settings)
                .map_err(serde::de::Error::custom),
            _ => Err(serde::de::Error::custom(
                "must be true, false or settings such as { max_gap: 1h }",
            )),
        }
    }
}

/// A value written as text or as a number (`listen: 9464`), as text.
fn optional_text_or_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    use serde_json::Value;
    match Option::<Value>::deserialize(d)? {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(_) => Err(serde::de::Error::custom(
            "must be `IP:port` or a port, such as 127.0.0.1:9464",
        )),
    }
}

/// Chatwoot's ActionCable endpoint, and the timing and limits of every socket to it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChatwoot {
    /// The cable endpoint (`ws://` or `wss://`), such as `wss://chat.example.com/cable`.
    pub(super) url: String,
    /// The `Origin` header sent on connect; derived from `url` when left out.
    pub(super) origin: Option<String>,
    /// Extra handshake headers, for a proxy in front of Chatwoot; values are kept secret.
    #[serde(default)]
    pub(super) headers: BTreeMap<String, Secret>,
    /// Handshake headers whose values are read from files (a header name to a path), for
    /// credentials kept out of the config; a name may not be in `headers` too.
    #[serde(default)]
    pub(super) headers_file: BTreeMap<String, PathBuf>,
    /// TLS of `wss://`: a private CA, a client certificate, or (for a test bench only)
    /// `insecure_skip_verify`. The system's trust store and the bundled web roots are trusted
    /// without it.
    #[serde(default)]
    pub(super) tls: TlsConfig,
    /// Chatwoot's REST base URL (`https://chat.example.com`), for tokens given as
    /// `api_access_token`; derived from the cable URL when left out (`wss://host/cable` →
    /// `https://host`).
    pub(super) api_url: Option<String>,
    /// Bound on TCP connect plus the WebSocket handshake, then on the wait for `welcome`.
    #[serde(default = "default_connect_timeout")]
    pub(super) connect_timeout: HumanDuration,
    /// A subscription still unconfirmed after this long is reported unconfirmed (Chatwoot
    /// answers a bad token with silence).
    #[serde(default = "default_confirm_timeout")]
    pub(super) confirm_timeout: HumanDuration,
    /// Silence after which a socket is considered dead and reconnected.
    #[serde(default = "default_stale_after")]
    pub(super) stale_after: HumanDuration,
    /// How often tokens with `presence: true` send `update_presence`; under Chatwoot's presence
    /// lifetime (20 s for agents), or the agent looks offline between updates.
    #[serde(default = "default_presence_interval")]
    pub(super) presence_interval: HumanDuration,
    /// Largest frame accepted; a larger one ends the connection.
    #[serde(default = "default_max_frame_bytes", deserialize_with = "number")]
    #[schemars(with = "u64")]
    pub(super) max_frame_bytes: u64,
    /// Deepest nesting of objects and arrays accepted in an event's `data` (Chatwoot's nest
    /// under 10); a deeper event is counted as malformed and dropped. At most 1024.
    #[serde(default = "default_max_nesting", deserialize_with = "number")]
    #[schemars(with = "u64")]
    pub(super) max_nesting: u64,
    /// Backoff between reconnects.
    #[serde(default)]
    pub(super) reconnect: RawReconnect,
}

/// Exponential backoff with full jitter between reconnects.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReconnect {
    /// Ceiling of the first delay (full jitter below it).
    #[serde(default = "default_reconnect_initial")]
    pub(super) initial: HumanDuration,
    /// Largest ceiling the delays grow to.
    #[serde(default = "default_reconnect_max")]
    pub(super) max: HumanDuration,
    /// A connection subscribed this long starts the backoff over.
    #[serde(default = "default_reconnect_reset_after")]
    pub(super) reset_after: HumanDuration,
    /// Delay after Chatwoot disconnects with `reconnect: false`.
    #[serde(default = "default_no_reconnect_delay")]
    pub(super) after_disconnect_without_reconnect: HumanDuration,
}

impl Default for RawReconnect {
    fn default() -> Self {
        RawReconnect {
            initial: default_reconnect_initial(),
            max: default_reconnect_max(),
            reset_after: default_reconnect_reset_after(),
            after_disconnect_without_reconnect: default_no_reconnect_delay(),
        }
    }
}

/// One pubsub token to listen with: an agent's (with `account_id` and `user_id`) or a
/// contact's.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    /// The label of this token in routes, logs and metrics; never the secret.
    pub(super) name: String,
    /// The token's secret: an agent's or a contact's pubsub token. This or `pubsub_token_file`.
    pub(super) pubsub_token: Option<Secret>,
    /// A file holding the pubsub token (a systemd credential, a mounted Kubernetes secret),
    /// read at every load; instead of `pubsub_token`.
    pub(super) pubsub_token_file: Option<PathBuf>,
    /// Instead of `pubsub_token`: a user's API access token (Profile settings → Access Token).
    /// The pubsub token and the user id are read from `GET /api/v1/profile` and read again to
    /// follow rotations; needs `account_id`.
    pub(super) api_access_token: Option<Secret>,
    /// A file holding the API access token; instead of `api_access_token`.
    pub(super) api_access_token_file: Option<PathBuf>,
    /// Instead of `pubsub_token`, with `contact_identifier`: the public identifier of the inbox
    /// (the widget's website token) of a contact (widget visitor) whose pubsub token is read
    /// from Chatwoot's public contact API.
    pub(super) inbox_identifier: Option<String>,
    /// With `inbox_identifier`: the contact's identifier in that inbox (its `source_id`). It
    /// reads the contact's pubsub token, so it is kept out of logs like one.
    pub(super) contact_identifier: Option<Secret>,
    /// A file holding the contact identifier; instead of `contact_identifier`.
    pub(super) contact_identifier_file: Option<PathBuf>,
    /// How often the profile of an `api_access_token` (or the contact of an
    /// `inbox_identifier`) is read again to notice a rotated pubsub token (default 5m); it is
    /// also read whenever a subscription goes unconfirmed.
    pub(super) refresh_interval: Option<HumanDuration>,
    /// Fill the socket's gaps over the REST API after a resubscribe (see README "Filling
    /// gaps"): `true`, or `{ max_gap: 1h }`; only with `api_access_token`.
    #[serde(default)]
    pub(super) backfill: Option<RawBackfill>,
    /// How long activity the REST API shows may stay undelivered by the subscribed socket
    /// before it counts as a stall (default 2m), or `off`; only with `api_access_token`.
    pub(super) stall_after: Option<String>,
    /// With `user_id`: an agent token of this account.
    #[serde(default, deserialize_with = "optional_number")]
    #[schemars(with = "Option<u64>")]
    pub(super) account_id: Option<u64>,
    /// With `account_id`: the agent the token belongs to.
    #[serde(default, deserialize_with = "optional_number")]
    #[schemars(with = "Option<u64>")]
    pub(super) user_id: Option<u64>,
    /// A cable endpoint of this token's own, instead of `chatwoot.url`.
    pub(super) url: Option<String>,
    /// Send `update_presence`, which shows the agent online; agent tokens only.
    #[serde(default)]
    pub(super) presence: bool,
}

/// A sink entry: its kind plus what every kind shares.
#[derive(Debug, Deserialize, JsonSchema)]
pub(super) struct RawSink {
    /// The `type` and its own settings. Unknown keys are still refused: they reach the tagged
    /// enum, which denies them.
    #[serde(flatten)]
    pub(super) kind: SinkConfig,
    /// Keep `pubsub_token` keys in `data` (removed by default: they are contacts' credentials).
    #[serde(default)]
    pub(super) keep_pubsub_tokens: bool,
    /// Paths in `data` this sink must not see.
    #[serde(default)]
    pub(super) fields: FieldsSpec,
    /// Backoff between delivery attempts, and when to give up on an event.
    #[serde(default)]
    pub(super) retry: RawRetry,
    /// Send this sink's dead letters to another sink instead of keeping them on local disk.
    #[serde(default)]
    pub(super) dead_letter: Option<String>,
}

/// Exponential backoff with full jitter between delivery attempts of one event.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    /// Ceiling of the first retry delay (full jitter below it).
    #[serde(default = "default_retry_initial")]
    pub(super) initial: HumanDuration,
    /// Largest ceiling the delays grow to.
    #[serde(default = "default_retry_max")]
    pub(super) max: HumanDuration,
    /// An event still failing this long after its first attempt is set aside with the later
    /// events of its conversation, so that the sink's other conversations and its cursor move
    /// on; at most `max_elapsed` (equal to it: nothing is parked). Default 5m, or
    /// `max_elapsed` if that is shorter.
    #[serde(default)]
    pub(super) park_after: Option<HumanDuration>,
    /// An event still failing this long after its first attempt goes to the dead letters.
    #[serde(default = "default_retry_max_elapsed")]
    pub(super) max_elapsed: HumanDuration,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            initial: default_retry_initial(),
            max: default_retry_max(),
            park_after: None,
            max_elapsed: default_retry_max_elapsed(),
        }
    }
}

/// The spool on disk: where it is, how big it may grow, and how careful it is.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpool {
    /// Folder of the spool segments, cursors and dead letters.
    #[serde(default = "default_spool_dir")]
    pub(super) dir: PathBuf,
    /// Size cap of the spool on disk, in bytes.
    #[serde(default = "default_spool_max_bytes")]
    #[schemars(with = "u64")]
    #[serde(deserialize_with = "number")]
    pub(super) max_bytes: u64,
    /// `interval` (fsync every `fsync_interval` and at shutdown), `always` (before an event
    /// counts as accepted), or `never` (leave it to the OS).
    #[serde(default)]
    pub(super) fsync: FsyncMode,
    /// How often the spool is fsynced under `fsync: interval`.
    #[serde(default = "default_fsync_interval")]
    pub(super) fsync_interval: HumanDuration,
    /// What to do when the spool is full: `dead_letter` (the default: push the oldest segment
    /// out, its events a sink had not delivered into that sink's dead letters), `drop_newest` or
    /// `drop_oldest` (lost for every sink; counted, logged).
    #[serde(default)]
    pub(super) when_full: WhenFull,
    /// The fraction of `max_bytes` (above 0, at most 1) a `dlq replay` may fill: letters go
    /// back into the spool only while it stays within this share, so live events always have
    /// the rest.
    #[serde(default = "default_replay_share", deserialize_with = "fraction")]
    #[schemars(range(max = 1), extend("exclusiveMinimum" = 0))]
    pub(super) replay_share: f64,
}

impl Default for RawSpool {
    fn default() -> Self {
        RawSpool {
            dir: default_spool_dir(),
            max_bytes: default_spool_max_bytes(),
            fsync: FsyncMode::default(),
            fsync_interval: default_fsync_interval(),
            when_full: WhenFull::default(),
            replay_share: default_replay_share(),
        }
    }
}

/// Upper bound of a graceful shutdown when the config does not set one.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(DEFAULT_SHUTDOWN_TIMEOUT)
}
fn default_memory_limit() -> u64 {
    DEFAULT_MEMORY_LIMIT
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(CableSettings::default().connect_timeout)
}
fn default_confirm_timeout() -> HumanDuration {
    HumanDuration(CableSettings::default().confirm_timeout)
}
fn default_stale_after() -> HumanDuration {
    HumanDuration(CableSettings::default().stale_after)
}
fn default_presence_interval() -> HumanDuration {
    HumanDuration(CableSettings::default().presence_interval)
}
fn default_max_nesting() -> u64 {
    CableSettings::default().max_nesting as u64
}
fn default_max_frame_bytes() -> u64 {
    CableSettings::default().max_frame_bytes as u64
}
fn default_reconnect_initial() -> HumanDuration {
    HumanDuration(ReconnectSettings::default().initial)
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration(ReconnectSettings::default().max)
}
fn default_reconnect_reset_after() -> HumanDuration {
    HumanDuration(ReconnectSettings::default().reset_after)
}
fn default_no_reconnect_delay() -> HumanDuration {
    HumanDuration(ReconnectSettings::default().after_disconnect_without_reconnect)
}
fn default_retry_initial() -> HumanDuration {
    HumanDuration(RetrySettings::default().initial)
}
fn default_retry_max() -> HumanDuration {
    HumanDuration(RetrySettings::default().max)
}
fn default_retry_max_elapsed() -> HumanDuration {
    HumanDuration(RetrySettings::default().max_elapsed)
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from("spool")
}
fn default_spool_max_bytes() -> u64 {
    SpoolConfig::new(default_spool_dir()).max_bytes
}
fn default_replay_share() -> f64 {
    SpoolConfig::new(default_spool_dir()).replay_share
}
fn default_fsync_interval() -> HumanDuration {
    HumanDuration(SpoolConfig::new(default_spool_dir()).fsync_interval)
}
