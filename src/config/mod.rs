//! The YAML an operator writes, checked into typed settings before anything connects.
//!
//! Loading goes in three steps, each with errors that name the key path:
//! 1. the `config` crate reads the YAML file and `CHATWOOT_BRIDGE__A__B` overrides into a tree;
//! 2. `${VAR}` / `${VAR:-default}` are expanded in every string of that tree;
//! 3. the tree is deserialized into the `Raw*` schema (unknown keys rejected) and validated into
//!    [`Config`], whose values are the ones the daemon uses as they are.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::http::Uri;

pub use crate::delivery::retry::RetrySettings;
use crate::route::jsonpath::JsonPath;
use crate::route::redact::{FieldsSpec, Redaction};
use crate::route::{RouteSpec, RouteTable};
pub use crate::sink::{SinkConfig, SinkKind};
pub use crate::source::settings::{CableSettings, Identity, ReconnectSettings, TokenSpec};
use crate::spool::{FsyncMode, SpoolConfig, WhenFull};
use crate::types::{number, optional_number};
pub use crate::types::{HumanDuration, OneOrMany, Problem, Secret};

/// Longest timeout or interval accepted: timers far in the future overflow `Instant`.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Prefix of environment variables that override config keys (`CHATWOOT_BRIDGE__CHATWOOT__URL`).
pub const ENV_PREFIX: &str = "CHATWOOT_BRIDGE";

/// The JSON Schema of the config file, for editors (yaml-language-server) and `bridge.schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(RawConfig);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    text.push('\n');
    text
}

/// Everything that can be wrong with a config file; each names where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config is not valid YAML: {0}")]
    Syntax(String),
    #[error("{key}: environment variable `{var}` is not set and has no default (write ${{{var}:-default}} to give one)")]
    MissingEnv { key: String, var: String },
    #[error("{key}: {message}")]
    Schema { key: String, message: String },
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

// ---------------------------------------------------------------------------------------------
// The schema as written (Raw*). Unknown keys are errors.

/// chatwoot-bridge configuration: Chatwoot's cable, the tokens to listen with, the sinks, and
/// the routes between them.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "chatwoot-bridge config")]
struct RawConfig {
    chatwoot: RawChatwoot,
    tokens: Vec<RawToken>,
    #[serde(default)]
    sinks: BTreeMap<String, RawSink>,
    #[serde(default)]
    routes: Vec<RouteSpec>,
    /// `drop` (default) or the name of a sink for events no route matches.
    #[serde(default)]
    unmatched: Option<String>,
    /// The durable local queue every event is written to before any sink sees it.
    #[serde(default)]
    spool: RawSpool,
    #[serde(default = "default_shutdown_timeout")]
    shutdown_timeout: HumanDuration,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawChatwoot {
    url: String,
    origin: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, Secret>,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: HumanDuration,
    #[serde(default = "default_confirm_timeout")]
    confirm_timeout: HumanDuration,
    #[serde(default = "default_stale_after")]
    stale_after: HumanDuration,
    #[serde(default = "default_presence_interval")]
    presence_interval: HumanDuration,
    #[serde(default = "default_max_frame_bytes", deserialize_with = "number")]
    #[schemars(with = "u64")]
    max_frame_bytes: u64,
    #[serde(default)]
    reconnect: RawReconnect,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawReconnect {
    #[serde(default = "default_reconnect_initial")]
    initial: HumanDuration,
    #[serde(default = "default_reconnect_max")]
    max: HumanDuration,
    #[serde(default = "default_reconnect_reset_after")]
    reset_after: HumanDuration,
    #[serde(default = "default_no_reconnect_delay")]
    after_disconnect_without_reconnect: HumanDuration,
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

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    pubsub_token: Secret,
    #[serde(default, deserialize_with = "optional_number")]
    #[schemars(with = "Option<u64>")]
    account_id: Option<u64>,
    #[serde(default, deserialize_with = "optional_number")]
    #[schemars(with = "Option<u64>")]
    user_id: Option<u64>,
    url: Option<String>,
    #[serde(default)]
    presence: bool,
}

/// A sink entry: its kind plus what every kind shares.
#[derive(Debug, Deserialize, JsonSchema)]
struct RawSink {
    // Unknown keys are still refused: they reach the tagged enum, which denies them.
    #[serde(flatten)]
    kind: SinkConfig,
    /// Keep `pubsub_token` keys in `data` (removed by default: they are contacts' credentials).
    #[serde(default)]
    keep_pubsub_tokens: bool,
    #[serde(default)]
    fields: FieldsSpec,
    /// Backoff between delivery attempts, and when to give up on an event.
    #[serde(default)]
    retry: RawRetry,
    /// Send this sink's dead letters to another sink instead of keeping them on local disk.
    #[serde(default)]
    dead_letter: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    /// Ceiling of the first retry delay (full jitter below it).
    #[serde(default = "default_retry_initial")]
    initial: HumanDuration,
    /// Largest ceiling the delays grow to.
    #[serde(default = "default_retry_max")]
    max: HumanDuration,
    /// An event still failing this long after its first attempt goes to the dead letters.
    #[serde(default = "default_retry_max_elapsed")]
    max_elapsed: HumanDuration,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            initial: default_retry_initial(),
            max: default_retry_max(),
            max_elapsed: default_retry_max_elapsed(),
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    /// Folder of the spool segments, cursors and dead letters.
    #[serde(default = "default_spool_dir")]
    dir: PathBuf,
    /// Size cap of the spool on disk, in bytes.
    #[serde(default = "default_spool_max_bytes")]
    #[schemars(with = "u64")]
    #[serde(deserialize_with = "number")]
    max_bytes: u64,
    /// `interval` (fsync every `fsync_interval` and at shutdown), `always` (before an event
    /// counts as accepted), or `never` (leave it to the OS).
    #[serde(default)]
    fsync: FsyncMode,
    #[serde(default = "default_fsync_interval")]
    fsync_interval: HumanDuration,
    /// What to do when the spool is full: `drop_newest` or `drop_oldest` (counted, logged).
    #[serde(default)]
    when_full: WhenFull,
}

impl Default for RawSpool {
    fn default() -> Self {
        RawSpool {
            dir: default_spool_dir(),
            max_bytes: default_spool_max_bytes(),
            fsync: FsyncMode::default(),
            fsync_interval: default_fsync_interval(),
            when_full: WhenFull::default(),
        }
    }
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
fn default_fsync_interval() -> HumanDuration {
    HumanDuration(SpoolConfig::new(default_spool_dir()).fsync_interval)
}
fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
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

// ---------------------------------------------------------------------------------------------
// The validated config the daemon runs on.

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Timing and size limits shared by every socket.
    pub cable: CableSettings,
    /// One entry per socket to keep open, in file order.
    pub tokens: Vec<TokenSpec>,
    /// Sinks by their unique name, validated.
    pub sinks: BTreeMap<String, SinkSettings>,
    /// Compiled routes, in file order.
    pub routes: RouteTable,
    /// The durable queue in front of the sinks.
    pub spool: SpoolConfig,
    /// How long shutdown may take to deliver what is in flight before it gives up.
    pub shutdown_timeout: Duration,
}

/// One sink: where it delivers and what it removes from `data` first.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    /// The validated destination.
    pub kind: SinkKind,
    pub redaction: Redaction,
    pub retry: RetrySettings,
    /// Where dead letters go: another sink's name, or `None` for local disk.
    pub dead_letter: Option<String>,
}

impl Config {
    /// Reads, expands and validates a config file. Environment overrides apply.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_yaml(&text, &|name| std::env::var(name).ok(), true)
    }

    /// Parses config text. `env` resolves `${VAR}`; `env_overrides` also applies
    /// `CHATWOOT_BRIDGE__...` variables from the process environment.
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        env_overrides: bool,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Yaml));
        if env_overrides {
            builder = builder.add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            );
        }
        let tree: serde_json::Value = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let tree = expand_tree(tree, "", env)?;
        let raw: RawConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Schema {
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: e.into_inner().to_string(),
            }
        })?;
        raw.validate()
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });

        let chatwoot = self.chatwoot;
        if let Err(message) = check_cable_url(&chatwoot.url) {
            problem("chatwoot.url".into(), message);
        }
        if let Some(origin) = &chatwoot.origin {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                problem(
                    "chatwoot.origin".into(),
                    format!("`{origin}` must start with http:// or https://"),
                );
            }
        }
        let max_frame_bytes = chatwoot.max_frame_bytes;
        if max_frame_bytes < 1024 {
            problem(
                "chatwoot.max_frame_bytes".into(),
                format!("{max_frame_bytes} is too small; Chatwoot frames are often several KB"),
            );
        }
        for (key, value) in [
            ("chatwoot.connect_timeout", chatwoot.connect_timeout.0),
            ("chatwoot.confirm_timeout", chatwoot.confirm_timeout.0),
            ("chatwoot.stale_after", chatwoot.stale_after.0),
            ("chatwoot.presence_interval", chatwoot.presence_interval.0),
            ("chatwoot.reconnect.initial", chatwoot.reconnect.initial.0),
            ("chatwoot.reconnect.max", chatwoot.reconnect.max.0),
        ] {
            if value.is_zero() {
                problem(key.into(), "must be greater than zero".into());
            } else if value > MAX_DURATION {
                problem(key.into(), "must be at most 30 days".into());
            }
        }
        if chatwoot.reconnect.max.0 < chatwoot.reconnect.initial.0 {
            problem(
                "chatwoot.reconnect.max".into(),
                "must not be smaller than chatwoot.reconnect.initial".into(),
            );
        }
        for (name, value) in &chatwoot.headers {
            if tokio_tungstenite::tungstenite::http::HeaderName::try_from(name.as_str()).is_err() {
                problem(
                    format!("chatwoot.headers.{name}"),
                    "is not a valid HTTP header name".into(),
                );
            }
            if tokio_tungstenite::tungstenite::http::HeaderValue::from_str(value.expose()).is_err()
            {
                // The value may be a credential: say what is wrong, not what it is.
                problem(
                    format!("chatwoot.headers.{name}"),
                    "value contains characters not allowed in an HTTP header".into(),
                );
            }
        }
        let headers: Vec<(String, Secret)> = chatwoot.headers.into_iter().collect();

        if self.tokens.is_empty() {
            problem("tokens".into(), "at least one token is needed".into());
        }
        let mut token_names = BTreeSet::new();
        let mut tokens = Vec::with_capacity(self.tokens.len());
        for (i, raw) in self.tokens.into_iter().enumerate() {
            let key = format!("tokens[{i}]");
            if let Err(message) = check_name(&raw.name) {
                problem(format!("{key}.name"), message);
            } else if !token_names.insert(raw.name.clone()) {
                problem(
                    format!("{key}.name"),
                    format!("`{}` is used by another token already", raw.name),
                );
            }
            if raw.pubsub_token.expose().trim().is_empty() {
                problem(format!("{key}.pubsub_token"), "is empty".into());
            }
            let identity = match (raw.account_id, raw.user_id) {
                (Some(account_id), Some(user_id)) => Identity::Agent {
                    account_id,
                    user_id,
                },
                (None, None) => Identity::Contact,
                (Some(_), None) => {
                    problem(
                        format!("{key}.user_id"),
                        "an agent token needs user_id with account_id (Chatwoot ignores the subscription otherwise)".into(),
                    );
                    Identity::Contact
                }
                (None, Some(_)) => {
                    problem(
                        format!("{key}.account_id"),
                        "an agent token needs account_id with user_id".into(),
                    );
                    Identity::Contact
                }
            };
            let url = raw.url.clone().unwrap_or_else(|| chatwoot.url.clone());
            if raw.url.is_some() {
                if let Err(message) = check_cable_url(&url) {
                    problem(format!("{key}.url"), message);
                }
            }
            let origin = match (&raw.url, &chatwoot.origin) {
                (None, Some(origin)) => origin.clone(),
                _ => derive_origin(&url).unwrap_or_default(),
            };
            tokens.push(TokenSpec {
                name: Arc::from(raw.name.as_str()),
                url,
                origin,
                headers: headers.clone(),
                pubsub_token: raw.pubsub_token,
                identity,
                presence: raw.presence,
            });
        }

        let mut sinks = BTreeMap::new();
        for (name, raw) in self.sinks {
            let key = format!("sinks.{name}");
            if let Err(message) = check_name(&name) {
                problem(key.clone(), message);
            }
            let mut drop = Vec::with_capacity(raw.fields.drop.len());
            for (j, path) in raw.fields.drop.iter().enumerate() {
                match JsonPath::parse(path) {
                    Ok(path) => drop.push(path),
                    Err(message) => problem(format!("{key}.fields.drop[{j}]"), message),
                }
            }
            let redaction = Redaction {
                strip_pubsub_tokens: !raw.keep_pubsub_tokens,
                drop,
            };
            let kind = match raw.kind.validate(&key) {
                Ok(kind) => kind,
                Err(found) => {
                    for p in found {
                        problem(p.key, p.message);
                    }
                    // Keep the name known so routes naming it are not reported as well.
                    SinkKind::Stdout
                }
            };
            let retry = RetrySettings {
                initial: raw.retry.initial.0,
                max: raw.retry.max.0,
                max_elapsed: raw.retry.max_elapsed.0,
            };
            if retry.initial.is_zero() || retry.max < retry.initial {
                problem(
                    format!("{key}.retry"),
                    "initial must be above zero and max at least initial".into(),
                );
            }
            sinks.insert(
                name,
                SinkSettings {
                    kind,
                    redaction,
                    retry,
                    dead_letter: raw.dead_letter,
                },
            );
        }
        let sink_names: BTreeSet<&str> = sinks.keys().map(String::as_str).collect();
        let known_sinks = || sink_names.iter().copied().collect::<Vec<_>>().join(", ");
        for (name, settings) in &sinks {
            let Some(target) = &settings.dead_letter else {
                continue;
            };
            let key = format!("sinks.{name}.dead_letter");
            match sinks.get(target) {
                None => problem(key, format!("no sink is named `{target}` (sinks: {})", known_sinks())),
                Some(_) if target == name => problem(key, "a sink cannot be its own dead letter sink".into()),
                // No chains: a dead letter that fails again goes to local disk, never in a loop.
                Some(t) if t.dead_letter.is_some() => problem(
                    key,
                    format!("`{target}` has a dead_letter sink of its own; a dead letter sink must keep its failures on disk"),
                ),
                Some(_) => {}
            }
        }
        let mut route_names = BTreeSet::new();
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, raw) in self.routes.into_iter().enumerate() {
            let key = format!("routes[{i}]");
            if !route_names.insert(raw.name.clone()) {
                problem(
                    format!("{key}.name"),
                    format!("`{}` is used by another route already", raw.name),
                );
            }
            if raw.to.is_empty() {
                problem(format!("{key}.to"), "names no sink".into());
            }
            for (j, sink) in raw.to.iter().enumerate() {
                if !sink_names.contains(sink.as_str()) {
                    problem(
                        format!("{key}.to[{j}]"),
                        format!("no sink is named `{sink}` (sinks: {})", known_sinks()),
                    );
                }
            }
            routes.push(raw);
        }
        let unmatched = match self.unmatched.as_deref() {
            None | Some("drop") => None,
            Some(sink) if sink_names.contains(sink) => Some(sink.to_owned()),
            Some(sink) => {
                problem(
                    "unmatched".into(),
                    format!(
                        "must be `drop` or a sink name; no sink is named `{sink}` (sinks: {})",
                        known_sinks()
                    ),
                );
                None
            }
        };
        let spool = SpoolConfig {
            max_bytes: self.spool.max_bytes,
            fsync: self.spool.fsync,
            fsync_interval: self.spool.fsync_interval.0,
            when_full: self.spool.when_full,
            ..SpoolConfig::new(self.spool.dir)
        };
        if spool.max_bytes < 1 << 20 {
            problem(
                "spool.max_bytes".into(),
                format!(
                    "{} is too small; give the spool at least 1 MiB (1048576)",
                    spool.max_bytes
                ),
            );
        } else if spool.max_bytes < 2 * max_frame_bytes {
            // One event can be as large as a frame; the spool must hold it with room to spare.
            problem(
                "spool.max_bytes".into(),
                format!(
                    "{} is smaller than twice chatwoot.max_frame_bytes ({max_frame_bytes})",
                    spool.max_bytes
                ),
            );
        }
        if spool.fsync_interval.is_zero() {
            problem(
                "spool.fsync_interval".into(),
                "must be greater than zero".into(),
            );
        }

        let routes = match RouteTable::compile(routes, &token_names, unmatched) {
            Ok(table) => Some(table),
            Err(route_problems) => {
                problems.extend(route_problems);
                None
            }
        };

        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Config {
            cable: CableSettings {
                connect_timeout: chatwoot.connect_timeout.0,
                confirm_timeout: chatwoot.confirm_timeout.0,
                stale_after: chatwoot.stale_after.0,
                presence_interval: chatwoot.presence_interval.0,
                max_frame_bytes: max_frame_bytes as usize,
                reconnect: ReconnectSettings {
                    initial: chatwoot.reconnect.initial.0,
                    max: chatwoot.reconnect.max.0,
                    reset_after: chatwoot.reconnect.reset_after.0,
                    after_disconnect_without_reconnect: chatwoot
                        .reconnect
                        .after_disconnect_without_reconnect
                        .0,
                },
            },
            tokens,
            sinks,
            spool,
            routes: routes.expect("no problems means the routes compiled"),
            shutdown_timeout: self.shutdown_timeout.0,
        })
    }
}

/// Names appear in metrics labels, log fields and templates, so they stay plain.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "`{name}` may contain only letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

fn check_cable_url(url: &str) -> Result<(), String> {
    // Checked before anything echoes the URL: the URL ends up in every event's `source` and in
    // logs, so it must not carry credentials.
    let uri: Uri = url.parse().map_err(|e| format!("is not a URL ({e})"))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("must not contain credentials (user:password@); use chatwoot.headers".into());
    }
    if uri.query().is_some() {
        return Err(
            "must not have a query string: it would appear in every event's source and in logs"
                .into(),
        );
    }
    match uri.scheme_str() {
        Some("ws") | Some("wss") => {}
        _ => return Err(format!("`{url}` must start with ws:// or wss://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    Ok(())
}

/// `wss://host:port/cable` -> `https://host:port`.
pub fn derive_origin(url: &str) -> Option<String> {
    let uri: Uri = url.parse().ok()?;
    let scheme = match uri.scheme_str()? {
        "wss" => "https",
        _ => "http",
    };
    Some(format!("{scheme}://{}", uri.authority()?))
}

// ---------------------------------------------------------------------------------------------
// ${VAR} expansion.

fn expand_tree(
    value: serde_json::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<serde_json::Value, ConfigError> {
    use serde_json::Value;
    Ok(match value {
        Value::String(s) => Value::String(expand_string(&s, key, env)?),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| expand_tree(v, &format!("{key}[{i}]"), env))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let child = if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    };
                    expand_tree(v, &child, env).map(|v| (k, v))
                })
                .collect::<Result<_, _>>()?,
        ),
        other => other,
    })
}

/// Expands `${VAR}` and `${VAR:-default}`; `$${` stands for a literal `${`.
pub fn expand_string(
    input: &str,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(body) = tail.strip_prefix("${") {
            let Some(end) = body.find('}') else {
                return Err(ConfigError::Schema {
                    key: key.into(),
                    message: "`${` is not closed by `}`".into(),
                });
            };
            let expr = &body[..end];
            let (var, default) = match expr.split_once(":-") {
                Some((var, default)) => (var, Some(default)),
                None => (expr, None),
            };
            if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConfigError::Schema {
                    key: key.into(),
                    message: format!("`${{{expr}}}` does not name an environment variable"),
                });
            }
            match (env(var), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(ConfigError::MissingEnv {
                        key: key.into(),
                        var: var.into(),
                    })
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "AGENT" => Some("agent-secret-123".into()),
            "ACCOUNT" => Some("7".into()),
            _ => None,
        }
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, &env, false)
    }

    const MINIMAL: &str = r#"
chatwoot:
  url: wss://chat.example.com/cable
tokens:
  - name: support-agent
    pubsub_token: ${AGENT}
    account_id: ${ACCOUNT}
    user_id: 3
  - name: widget-visitor
    pubsub_token: contact-token
    url: ws://127.0.0.1:3000/cable
sinks:
  archive: { type: file, path: ./events.jsonl }
routes:
  - { name: everything, match: {}, to: [archive] }
"#;

    #[test]
    fn minimal_config_loads_with_defaults_and_expansion() {
        let cfg = load(MINIMAL).unwrap();
        assert_eq!(cfg.tokens.len(), 2);
        let agent = &cfg.tokens[0];
        assert_eq!(agent.pubsub_token.expose(), "agent-secret-123");
        assert_eq!(
            agent.identity,
            Identity::Agent {
                account_id: 7,
                user_id: 3
            }
        );
        assert_eq!(agent.origin, "https://chat.example.com");
        let visitor = &cfg.tokens[1];
        assert_eq!(visitor.identity, Identity::Contact);
        assert_eq!(visitor.url, "ws://127.0.0.1:3000/cable");
        assert_eq!(visitor.origin, "http://127.0.0.1:3000");
        assert_eq!(cfg.cable.confirm_timeout, Duration::from_secs(10));
        assert_eq!(cfg.cable.stale_after, Duration::from_secs(6));
        assert_eq!(cfg.cable.max_frame_bytes, 8 * 1024 * 1024);
        assert!(matches!(
            &cfg.sinks["archive"].kind,
            SinkKind::File { path } if path == Path::new("./events.jsonl")
        ));
        assert!(cfg.sinks["archive"].redaction.strip_pubsub_tokens);
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let cfg = load(MINIMAL).unwrap();
        let dump = format!("{cfg:?}");
        assert!(!dump.contains("agent-secret-123"), "{dump}");
        assert!(!dump.contains("contact-token"), "{dump}");
    }

    #[test]
    fn missing_env_var_names_variable_and_key() {
        let text = MINIMAL.replace("${AGENT}", "${NOPE_NOT_SET}");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("tokens[0].pubsub_token"), "{err}");
        assert!(err.contains("NOPE_NOT_SET"), "{err}");
    }

    #[test]
    fn env_default_is_used_when_unset() {
        let text = MINIMAL.replace("${AGENT}", "${NOPE_NOT_SET:-fallback}");
        let cfg = load(&text).unwrap();
        assert_eq!(cfg.tokens[0].pubsub_token.expose(), "fallback");
    }

    #[test]
    fn expansion_inside_longer_strings_and_escapes() {
        let got = expand_string("a-${ACCOUNT}-$${LITERAL}-$5", "k", &env).unwrap();
        assert_eq!(got, "a-7-${LITERAL}-$5");
        let err = expand_string("${ACCOUNT", "k.x", &env)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("k.x:"), "{err}");
    }

    #[test]
    fn unknown_key_names_its_path() {
        let text = MINIMAL.replace("    user_id: 3", "    user_id: 3\n    presense: true");
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("tokens[0].presense: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn unknown_sink_type_names_its_path() {
        let text = MINIMAL.replace("type: file", "type: fiel");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("sinks.archive"), "{err}");
        assert!(err.contains("fiel"), "{err}");
    }

    #[test]
    fn unknown_key_inside_a_sink_names_its_path() {
        let text = MINIMAL.replace("type: file, path:", "type: file, pth:");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.starts_with("sinks.archive"), "{err}");
        assert!(err.contains("pth"), "{err}");
    }

    #[test]
    fn sink_redaction_options() {
        let text = MINIMAL.replace(
            "type: file, path: ./events.jsonl",
            "type: file, path: ./events.jsonl, keep_pubsub_tokens: true, fields: { drop: [meta.sender.email, \"a..b\"] }",
        );
        let err = load(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            "sinks.archive.fields.drop[1]: `a..b` has an empty segment"
        );
        let text = text.replace(", \"a..b\"", "");
        let cfg = load(&text).unwrap();
        let redaction = &cfg.sinks["archive"].redaction;
        assert!(!redaction.strip_pubsub_tokens);
        assert_eq!(redaction.drop[0].to_string(), "meta.sender.email");
    }

    #[test]
    fn dead_letter_sinks_must_exist_and_not_chain() {
        let sinks = |a: &str, b: &str| {
            MINIMAL.replace(
                "  archive: { type: file, path: ./events.jsonl }",
                &format!("  archive: {{ type: file, path: ./events.jsonl{a} }}\n  parking: {{ type: file, path: ./dead.jsonl{b} }}"),
            )
        };
        let cfg = load(&sinks(", dead_letter: parking", "")).unwrap();
        assert_eq!(cfg.sinks["archive"].dead_letter.as_deref(), Some("parking"));
        let err = load(&sinks(", dead_letter: nowhere", ""))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("sinks.archive.dead_letter: no sink is named `nowhere`"),
            "{err}"
        );
        let err = load(&sinks(", dead_letter: archive", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be its own"), "{err}");
        let err = load(&sinks(", dead_letter: parking", ", dead_letter: archive"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sinks.archive.dead_letter: `parking` has a dead_letter sink of its own"),
            "{err}"
        );
    }

    #[test]
    fn unmatched_must_be_drop_or_a_sink() {
        let cfg = load(&format!("{MINIMAL}unmatched: archive\n")).unwrap();
        assert_eq!(cfg.routes.sink_names(), ["archive"]);
        let err = load(&format!("{MINIMAL}unmatched: archiv\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("unmatched: must be `drop` or a sink name"),
            "{err}"
        );
        load(&format!("{MINIMAL}unmatched: drop\n")).unwrap();
    }

    #[test]
    fn agent_token_needs_both_ids() {
        let text = MINIMAL.replace("    user_id: 3\n", "");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("tokens[0].user_id"), "{err}");
    }

    #[test]
    fn bad_url_duplicate_names_and_unknown_sinks_are_all_reported() {
        let text = MINIMAL
            .replace(
                "wss://chat.example.com/cable",
                "https://chat.example.com/cable",
            )
            .replace("name: widget-visitor", "name: support-agent")
            .replace("to: [archive]", "to: [archiv]");
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains(
                "chatwoot.url: `https://chat.example.com/cable` must start with ws:// or wss://"
            ),
            "{err}"
        );
        assert!(
            err.contains("tokens[1].name: `support-agent` is used"),
            "{err}"
        );
        assert!(
            err.contains("routes[0].to[0]: no sink is named `archiv`"),
            "{err}"
        );
    }

    #[test]
    fn bad_duration_names_its_path() {
        let text = MINIMAL.replace(
            "  url: wss://chat.example.com/cable",
            "  url: wss://chat.example.com/cable\n  stale_after: soon",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.starts_with("chatwoot.stale_after:"), "{err}");
    }

    #[test]
    fn bad_header_is_reported_without_its_value() {
        let text = MINIMAL.replace(
            "  url: wss://chat.example.com/cable",
            "  url: wss://chat.example.com/cable\n  headers: { X-Proxy-Auth: \"secret\\nvalue\" }",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("chatwoot.headers."), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn committed_schema_matches_the_types() {
        let committed = include_str!("../../bridge.schema.json");
        assert!(
            committed == json_schema(),
            "bridge.schema.json is out of date: run `cargo run -- schema > bridge.schema.json`"
        );
    }

    #[test]
    fn example_config_is_accepted() {
        let example = include_str!("../../bridge.example.yaml");
        let cfg = Config::from_yaml(example, &|_| None, false).unwrap();
        assert!(cfg.tokens.len() >= 2);
    }

    #[test]
    fn secrets_may_be_numbers_and_bad_shapes_are_not_echoed() {
        let cfg =
            load(&MINIMAL.replace("pubsub_token: contact-token", "pubsub_token: 123456")).unwrap();
        assert_eq!(cfg.tokens[1].pubsub_token.expose(), "123456");
        let err = load(&MINIMAL.replace("pubsub_token: contact-token", "pubsub_token: [987654]"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("tokens[1].pubsub_token"), "{err}");
        assert!(!err.contains("987654"), "{err}");
    }

    #[test]
    fn cable_urls_with_credentials_are_refused_without_echoing_them() {
        let text = MINIMAL.replace(
            "wss://chat.example.com/cable",
            "wss://admin:hunter2@chat.example.com/cable",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains("chatwoot.url: must not contain credentials"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let text = MINIMAL.replace(
            "wss://chat.example.com/cable",
            "wss://chat.example.com/cable?token=hunter2",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains("chatwoot.url: must not have a query string"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn durations_and_sizes_have_bounds() {
        let text = MINIMAL.replace(
            "  url: wss://chat.example.com/cable",
            "  url: wss://chat.example.com/cable\n  stale_after: 100000000years",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains("chatwoot.stale_after: must be at most 30 days"),
            "{err}"
        );
        let err = load(&format!("{MINIMAL}spool: {{ max_bytes: 4194304 }}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spool.max_bytes: 4194304 is smaller than twice chatwoot.max_frame_bytes"),
            "{err}"
        );
    }

    /// A config with one of every mistake validation knows, in every section.
    const EVERY_MISTAKE: &str = r#"
chatwoot:
  url: https://chat.example.com/cable
  origin: ftp://chat.example.com
  max_frame_bytes: 10
  connect_timeout: 0s
  presence_interval: 100000000years
  reconnect: { initial: 5s, max: 1s }
  headers: { "bad name": ok, X-Auth: "line\nbreak" }
tokens:
  - { name: "bad name", pubsub_token: " ", account_id: 1 }
  - { name: twin, pubsub_token: a, user_id: 2, url: "http://x/cable" }
  - { name: twin, pubsub_token: b, url: "ws://u:p@x/cable" }
sinks:
  "bad sink": { type: stdout, fields: { drop: ["a..b"] }, retry: { initial: 0s } }
  hook: { type: http, url: "ftp://x/", method: GET, dead_letter: parking }
  parking: { type: stdout, dead_letter: hook }
  lost: { type: stdout, dead_letter: nowhere }
  self: { type: stdout, dead_letter: self }
routes:
  - { name: r, to: [] }
  - { name: r, match: { token: nobody, where: [{ path: content, matches: "(" }] }, to: [hook, nope] }
unmatched: elsewhere
spool: { max_bytes: 100, fsync_interval: 0s }
"#;

    #[test]
    fn every_problem_is_reported_with_its_key_in_file_order() {
        let Err(ConfigError::Invalid(found)) = load(EVERY_MISTAKE) else {
            panic!("the config is refused as invalid");
        };
        let found: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(found, EVERY_MISTAKE_REPORT, "{found:#?}");
    }

    /// What validation says about [`EVERY_MISTAKE`], line by line.
    const EVERY_MISTAKE_REPORT: &[&str] = &[    "chatwoot.url: `https://chat.example.com/cable` must start with ws:// or wss://",
    "chatwoot.origin: `ftp://chat.example.com` must start with http:// or https://",
    "chatwoot.max_frame_bytes: 10 is too small; Chatwoot frames are often several KB",
    "chatwoot.connect_timeout: must be greater than zero",
    "chatwoot.presence_interval: must be at most 30 days",
    "chatwoot.reconnect.max: must not be smaller than chatwoot.reconnect.initial",
    "chatwoot.headers.X-Auth: value contains characters not allowed in an HTTP header",
    "chatwoot.headers.bad name: is not a valid HTTP header name",
    "tokens[0].name: `bad name` may contain only letters, digits, `-`, `_` and `.`",
    "tokens[0].pubsub_token: is empty",
    "tokens[0].user_id: an agent token needs user_id with account_id (Chatwoot ignores the subscription otherwise)",
    "tokens[1].account_id: an agent token needs account_id with user_id",
    "tokens[1].url: `http://x/cable` must start with ws:// or wss://",
    "tokens[2].name: `twin` is used by another token already",
    "tokens[2].url: must not contain credentials (user:password@); use chatwoot.headers",
    "sinks.bad sink: `bad sink` may contain only letters, digits, `-`, `_` and `.`",
    "sinks.bad sink.fields.drop[0]: `a..b` has an empty segment",
    "sinks.bad sink.retry: initial must be above zero and max at least initial",
    "sinks.hook.url: `ftp://x/` must start with http:// or https://",
    "sinks.hook.method: `GET` is not one of POST, PUT, PATCH (a webhook carries a body)",
    "sinks.hook.dead_letter: `parking` has a dead_letter sink of its own; a dead letter sink must keep its failures on disk",
    "sinks.lost.dead_letter: no sink is named `nowhere` (sinks: bad sink, hook, lost, parking, self)",
    "sinks.parking.dead_letter: `hook` has a dead_letter sink of its own; a dead letter sink must keep its failures on disk",
    "sinks.self.dead_letter: a sink cannot be its own dead letter sink",
    "routes[0].to: names no sink",
    "routes[1].name: `r` is used by another route already",
    "routes[1].to[1]: no sink is named `nope` (sinks: bad sink, hook, lost, parking, self)",
    "unmatched: must be `drop` or a sink name; no sink is named `elsewhere` (sinks: bad sink, hook, lost, parking, self)",
    "spool.max_bytes: 100 is too small; give the spool at least 1 MiB (1048576)",
    "spool.fsync_interval: must be greater than zero",
    "routes[1].match.token[0]: no token is named `nobody`",
    "routes[1].match.where[0].matches: not a valid regular expression: regex parse error:\n    (\n    ^\nerror: unclosed group",
];

    #[test]
    fn yaml_syntax_error_is_reported() {
        let err = load("chatwoot: [unclosed").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax(_)), "{err}");
    }
}
