//! The YAML an operator writes, checked into typed settings before anything connects.
//!
//! Loading goes in three steps, each with errors that name the key path:
//! 1. the file's size, nesting and aliases are checked on its YAML events (`shape`), then the
//!    `config` crate reads it and `CHATWOOT_BRIDGE__A__B` overrides into a tree;
//! 2. `${VAR}` / `${VAR:-default}` are expanded in every string of that tree (`expand`);
//! 3. the tree is deserialized into the `Raw*` schema (`raw`, unknown keys rejected) and
//!    validated section by section (`validate`) into [`Config`], whose values are the ones the
//!    daemon uses as they are.
//!
//! The settings types themselves belong to the stages that use them and are re-exported here.

mod api_token;
mod checks;
mod contact_token;
mod expand;
mod presence;
mod raw;
mod shape;
mod validate;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::admin::settings::{AdminSettings, ReadyRequires};
pub use crate::delivery::retry::RetrySettings;
use crate::route::redact::Redaction;
use crate::route::RouteTable;
pub use crate::sink::{SinkConfig, SinkKind};
pub use crate::source::settings::{CableSettings, Identity, ReconnectSettings, TokenSpec};
use crate::spool::SpoolConfig;
pub use crate::types::{HumanDuration, OneOrMany, Problem, Secret};
use expand::expand_tree;
use raw::RawConfig;
pub(crate) use shape::check_yaml_of;
pub use shape::{MAX_CONFIG_BYTES, MAX_CONFIG_NESTING, MAX_CONFIG_VALUES};

/// Prefix of environment variables that override config keys (`CHATWOOT_BRIDGE__CHATWOOT__URL`).
pub(crate) const ENV_PREFIX: &str = "CHATWOOT_BRIDGE";

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
    /// The file could not be read at all.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// Why reading it failed.
        source: std::io::Error,
    },
    /// The text is not YAML, or an environment override could not be merged into it.
    #[error("config is not valid YAML: {0}")]
    Syntax(String),
    /// A `${VAR}` names a variable that is not set and gives no default.
    #[error("{key}: environment variable `{var}` is not set and has no default (write ${{{var}:-default}} to give one)")]
    MissingEnv {
        /// Where the `${VAR}` is.
        key: String,
        /// The variable's name.
        var: String,
    },
    /// A value does not fit the schema (unknown key, wrong type, bad `${`).
    #[error("{key}: {message}")]
    Schema {
        /// Where the value is.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The file is larger, nests deeper or holds more values than the loader reads (see
    /// [`MAX_CONFIG_BYTES`], [`MAX_CONFIG_NESTING`], [`MAX_CONFIG_VALUES`]).
    #[error("{at}: {message}")]
    Limit {
        /// Where it went past the limit: a line and column, a key path, the file.
        at: String,
        /// Which limit, and by what.
        message: String,
    },
    /// The file fits the schema but its values do not make a working config: every problem.
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

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
    /// How long shutdown may take, from the signal, to store and deliver what was read before it
    /// gives up; the process ends within this plus 5 s.
    pub shutdown_timeout: Duration,
    /// Bytes of events held in memory at once, divided among the stages that hold them.
    pub memory_limit: u64,
    /// What a reload does with the events not delivered yet of the sinks it removes, by sink.
    pub retired_sinks: BTreeMap<String, Retirement>,
    /// SHA-256 of the config text as read, in hex (what `sha256sum` prints for the file):
    /// which config runs, in the status and in metrics. Environment variables the text refers
    /// to are not part of it.
    pub hash: String,
    /// The admin endpoint (metrics, health, status, tap, reload); `None` leaves it off.
    pub admin: Option<AdminSettings>,
}

/// What a reload does with the events a removed sink has not delivered yet (`retired_sinks:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Retirement {
    /// Deliver them, then remove the sink; it takes no new events meanwhile.
    Drain,
    /// Give them up: the count is at least how many there are (the spool's backlog and the
    /// retry set), so that the operator states what is lost; a reload with fewer is refused.
    Drop(
        #[serde(deserialize_with = "crate::types::number")]
        #[schemars(with = "u64")]
        u64,
    ),
}

/// One sink: where it delivers and what it removes from `data` first. Compared by a reload:
/// a sink whose settings differ is built again.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkSettings {
    /// The validated destination.
    pub kind: SinkKind,
    /// What is removed from `data` before this sink sees an event.
    pub redaction: Redaction,
    /// Backoff between delivery attempts, and when an event goes to the dead letters.
    pub retry: RetrySettings,
    /// Where dead letters go: another sink's name, or `None` for local disk.
    pub dead_letter: Option<String>,
}

impl Config {
    /// Reads, expands and validates a config file. Environment overrides apply.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        // One byte past the limit is enough to know it is past (`/dev/zero` never ends).
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(read)?;
        Config::from_yaml(&text, &|name| std::env::var(name).ok(), true)
    }

    /// Parses config text. `env` resolves `${VAR}`; `env_overrides` also applies
    /// `CHATWOOT_BRIDGE__...` variables from the process environment.
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        env_overrides: bool,
    ) -> Result<Config, ConfigError> {
        shape::check_yaml(text)?;
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Yaml));
        if env_overrides {
            let names: Vec<String> = std::env::vars_os()
                .filter_map(|(name, _)| name.into_string().ok())
                .collect();
            shape::check_overrides(names.iter().map(String::as_str))?;
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
        let raw: RawConfig = serde_path_to_error::deserialize(&tree).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Schema {
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key_inside_sink(&tree, &key).unwrap_or(key)
                },
                message: e.into_inner().to_string(),
            }
        })?;
        let mut config = raw.validate()?;
        config.hash = text_hash(text);
        Ok(config)
    }
}

/// SHA-256 of `text` in lowercase hex.
fn text_hash(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The full key path of an error that `key` places at a sink (`sinks.<name>`): a sink's kind
/// is a tagged enum, which reads its fields from a copy that the path tracking does not see,
/// so they are read again here, the kind's own type alone, to find where. `None` when that
/// finds nothing more precise.
fn key_inside_sink(tree: &serde_json::Value, key: &str) -> Option<String> {
    fn inner<T: serde::de::DeserializeOwned>(sink: serde_json::Value) -> Option<String> {
        let error = serde_path_to_error::deserialize::<_, T>(sink).err()?;
        Some(error.path().to_string()).filter(|path| path != ".")
    }
    let name = key.strip_prefix("sinks.")?;
    let mut sink = tree.get("sinks")?.get(name)?.as_object()?.clone();
    let kind = sink.remove("type")?;
    for shared in ["keep_pubsub_tokens", "fields", "retry", "dead_letter"] {
        sink.remove(shared);
    }
    let sink = serde_json::Value::Object(sink);
    let path = match kind.as_str()? {
        "kafka" => inner::<crate::sink::kafka::KafkaConfig>(sink),
        "nats" => inner::<crate::sink::nats::NatsConfig>(sink),
        "http" => inner::<crate::sink::http::HttpConfig>(sink),
        _ => None,
    }?;
    Some(format!("{key}.{path}"))
}

#[cfg(test)]
mod tests {
    use super::expand::expand_string;
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

    /// The error loading `text` gives, in words; fails the test if it loads.
    fn load_error(text: &str) -> String {
        load(text).unwrap_err().to_string()
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
            SinkKind::File { path, mode: 0o600 } if path == Path::new("./events.jsonl")
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
        let err = load_error(&text);
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
        let err = load_error(&text);
        assert!(
            err.starts_with("tokens[0].presense: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn unknown_sink_type_names_its_path() {
        let text = MINIMAL.replace("type: file", "type: fiel");
        let err = load_error(&text);
        assert!(err.contains("sinks.archive"), "{err}");
        assert!(err.contains("fiel"), "{err}");
    }

    #[test]
    fn unknown_key_inside_a_sink_names_its_path() {
        let text = MINIMAL.replace("type: file, path:", "type: file, pth:");
        let err = load_error(&text);
        assert!(err.starts_with("sinks.archive"), "{err}");
        assert!(err.contains("pth"), "{err}");
    }

    #[test]
    fn sink_redaction_options() {
        let text = MINIMAL.replace(
            "type: file, path: ./events.jsonl",
            "type: file, path: ./events.jsonl, keep_pubsub_tokens: true, fields: { drop: [meta.sender.email, \"a..b\"] }",
        );
        let err = load_error(&text);
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
        let err = load_error(&sinks(", dead_letter: nowhere", ""));
        assert!(
            err.starts_with("sinks.archive.dead_letter: no sink is named `nowhere`"),
            "{err}"
        );
        let err = load_error(&sinks(", dead_letter: archive", ""));
        assert!(err.contains("cannot be its own"), "{err}");
        let err = load_error(&sinks(", dead_letter: parking", ", dead_letter: archive"));
        assert!(
            err.contains("sinks.archive.dead_letter: `parking` has a dead_letter sink of its own"),
            "{err}"
        );
    }

    #[test]
    fn unmatched_must_be_drop_or_a_sink() {
        let cfg = load(&format!("{MINIMAL}unmatched: archive\n")).unwrap();
        assert_eq!(cfg.routes.sink_names(), ["archive"]);
        let err = load_error(&format!("{MINIMAL}unmatched: archiv\n"));
        assert!(
            err.starts_with("unmatched: must be `drop` or a sink name"),
            "{err}"
        );
        load(&format!("{MINIMAL}unmatched: drop\n")).unwrap();
    }

    #[test]
    fn agent_token_needs_both_ids() {
        let text = MINIMAL.replace("    user_id: 3\n", "");
        let err = load_error(&text);
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
        let err = load_error(&text);
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
        let err = load_error(&text);
        assert!(err.starts_with("chatwoot.stale_after:"), "{err}");
    }

    #[test]
    fn bad_header_is_reported_without_its_value() {
        let text = MINIMAL.replace(
            "  url: wss://chat.example.com/cable",
            "  url: wss://chat.example.com/cable\n  headers: { X-Proxy-Auth: \"secret\\nvalue\" }",
        );
        let err = load_error(&text);
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
    fn secrets_must_be_strings_and_bad_shapes_are_not_echoed() {
        let quoted = MINIMAL.replace("pubsub_token: contact-token", r#"pubsub_token: "0123456""#);
        let cfg = load(&quoted).unwrap();
        assert_eq!(cfg.tokens[1].pubsub_token.expose(), "0123456");
        for (written, echo) in [
            ("pubsub_token: 0123456", "123456"),
            ("pubsub_token: 98765.5", "98765"),
            ("pubsub_token: true", "true"),
            ("pubsub_token: [987654]", "987654"),
        ] {
            let err = load_error(&MINIMAL.replace("pubsub_token: contact-token", written));
            assert!(err.starts_with("tokens[1].pubsub_token: "), "{err}");
            assert!(!err.contains(echo), "{err}");
            if !written.contains('[') {
                assert!(err.contains("put it in quotes"), "{err}");
            }
        }
    }

    #[test]
    fn a_config_nested_deeper_than_the_limit_is_refused_not_walked() {
        // Two bytes a level: walked by the loader, it overflowed the stack.
        let deep = format!(
            "{MINIMAL}unmatched:\n  {}x\n",
            "- ".repeat(100_000),
            MINIMAL = MINIMAL.trim_start()
        );
        let err = load(&deep).unwrap_err();
        assert!(matches!(err, ConfigError::Limit { .. }), "{err}");
        let err = err.to_string();
        assert!(err.starts_with("line 16, column "), "{err}");
        assert!(err.contains("deeper than 32 levels"), "{err}");
    }

    #[test]
    fn a_file_that_never_ends_is_refused_at_the_size_limit() {
        let err = Config::load(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("MAX_CONFIG_BYTES"), "{err}");
    }

    #[test]
    fn every_secret_field_refuses_a_number() {
        for (sink, key) in [
            (
                "{ type: nats, url: nats://127.0.0.1:4222, subject: s, user: u, password: 4711 }",
                "sinks.s.password",
            ),
            (
                "{ type: nats, url: nats://127.0.0.1:4222, subject: s, token: 4711 }",
                "sinks.s.token",
            ),
            (
                "{ type: http, url: 'http://127.0.0.1:1/h', secret: 4711 }",
                "sinks.s.secret",
            ),
            (
                "{ type: http, url: 'http://127.0.0.1:1/h', secret: [whsec_abc, 4711] }",
                "sinks.s.secret",
            ),
            (
                "{ type: http, url: 'http://127.0.0.1:1/h', headers: { X-Key: 4711 } }",
                "sinks.s.headers.X-Key",
            ),
        ] {
            let archive = "  archive: { type: file, path: ./events.jsonl }\n";
            let text = MINIMAL.replace(archive, &format!("{archive}  s: {sink}\n"));
            let err = load_error(&text);
            assert!(err.starts_with(&format!("{key}: ")), "{err}");
            assert!(err.contains("put it in quotes"), "{err}");
            assert!(!err.contains("4711"), "{err}");
        }
    }

    #[test]
    fn cable_urls_with_credentials_are_refused_without_echoing_them() {
        let text = MINIMAL.replace(
            "wss://chat.example.com/cable",
            "wss://admin:hunter2@chat.example.com/cable",
        );
        let err = load_error(&text);
        assert!(
            err.contains("chatwoot.url: must not contain credentials"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let text = MINIMAL.replace(
            "wss://chat.example.com/cable",
            "wss://chat.example.com/cable?token=hunter2",
        );
        let err = load_error(&text);
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
        let err = load_error(&text);
        assert!(
            err.contains("chatwoot.stale_after: must be at most 30 days"),
            "{err}"
        );
        let err = load_error(&format!("{MINIMAL}spool: {{ max_bytes: 4194304 }}\n"));
        assert!(
            err.contains("spool.max_bytes: 4194304 is smaller than twice chatwoot.max_frame_bytes"),
            "{err}"
        );
        assert_eq!(load(MINIMAL).unwrap().memory_limit, 64 << 20);
        let err = load_error(&format!("{MINIMAL}memory_limit: 1048576\n"));
        assert!(
            err.contains("memory_limit: 1048576 is too small; give at least 4 MiB"),
            "{err}"
        );
        let err = load_error(&format!("{MINIMAL}memory_limit: 8388608\n"));
        assert!(
            err.contains("memory_limit: 8388608 is smaller than twice chatwoot.max_frame_bytes"),
            "{err}"
        );
        for bad in ["0", "1025"] {
            let text = MINIMAL.replace(
                "  url: wss://chat.example.com/cable",
                &format!("  url: wss://chat.example.com/cable\n  max_nesting: {bad}"),
            );
            let err = load_error(&text);
            assert!(
                err.contains(&format!(
                    "chatwoot.max_nesting: {bad} is out of range; give 1 to 1024"
                )),
                "{err}"
            );
        }
        assert_eq!(load(MINIMAL).unwrap().cable.max_nesting, 128);
    }

    #[test]
    fn park_after_defaults_to_five_minutes_or_max_elapsed_and_is_at_most_max_elapsed() {
        let retry = load(MINIMAL).unwrap().sinks["archive"].retry;
        assert_eq!(retry.park_after, Duration::from_secs(300));
        let with_retry = |retry: &str| {
            MINIMAL.replace(
                "archive: { type: file, path: ./events.jsonl }",
                &format!("archive: {{ type: file, path: ./events.jsonl, retry: {retry} }}"),
            )
        };
        let retry = load(&with_retry("{ park_after: 2s }")).unwrap().sinks["archive"].retry;
        assert_eq!(retry.park_after, Duration::from_secs(2));
        // A config that gives up sooner than the default parks as it gives up.
        let retry = load(&with_retry("{ max_elapsed: 1m }")).unwrap().sinks["archive"].retry;
        assert_eq!(retry.park_after, Duration::from_secs(60));
        for bad in ["{ park_after: 2h, max_elapsed: 1h }", "{ park_after: 0s }"] {
            let err = load_error(&with_retry(bad));
            assert!(
                err.contains("sinks.archive.retry.park_after: must be above zero and at most retry.max_elapsed"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn when_full_pushes_out_by_default_and_a_wrong_value_names_the_choices() {
        use crate::spool::WhenFull;
        assert_eq!(load(MINIMAL).unwrap().spool.when_full, WhenFull::DeadLetter);
        let chosen = load(&format!("{MINIMAL}spool: {{ when_full: drop_oldest }}\n")).unwrap();
        assert_eq!(chosen.spool.when_full, WhenFull::DropOldest);
        let err = load_error(&format!("{MINIMAL}spool: {{ when_full: discard }}\n"));
        assert!(err.contains("when_full"), "{err}");
        assert!(
            err.contains("`dead_letter`, `drop_newest`, `drop_oldest`"),
            "{err}"
        );
    }

    #[test]
    fn replay_share_is_a_fraction_whose_share_holds_a_frame() {
        let spool = |settings: &str| format!("{MINIMAL}spool: {{ {settings} }}\n");
        let config = load(MINIMAL).unwrap();
        assert_eq!(config.spool.replay_share, 0.5);
        assert_eq!(config.spool.replay_bytes(), 1 << 29);
        let config = load(&spool("replay_share: '0.25'")).unwrap();
        assert_eq!(
            config.spool.replay_share, 0.25,
            "text, as ${{VAR}} gives it"
        );
        assert_eq!(
            load(&spool("replay_share: 1")).unwrap().spool.replay_share,
            1.0
        );
        for (bad, said) in [
            (
                "0",
                "0 is out of range; give a fraction above 0 and at most 1",
            ),
            ("1.5", "1.5 is out of range"),
            ("-0.5", "-0.5 is out of range"),
            ("'NaN'", "NaN is out of range"),
            ("half", "`half` is not a number"),
        ] {
            let err = load_error(&spool(&format!("replay_share: {bad}")));
            assert!(
                err.contains(&format!("spool.replay_share: {said}")),
                "{bad}: {err}"
            );
        }
        // Half of 16 MiB is exactly one 8 MiB frame; a quarter is not enough.
        assert!(load(&spool("max_bytes: 16777216")).is_ok());
        let err = load_error(&spool("max_bytes: 16777216, replay_share: 0.25"));
        assert!(
            err.contains("spool.replay_share: 0.25 of max_bytes is 4194304 bytes, less than chatwoot.max_frame_bytes (8388608)"),
            "{err}"
        );
    }

    /// A config whose every kind of secret is read from a file under `${CREDENTIALS_DIRECTORY}`,
    /// as systemd's `LoadCredential=` hands them over.
    const SECRETS_FROM_FILES: &str = r#"
chatwoot:
  url: ws://127.0.0.1:3000/cable
  headers_file: { X-Proxy-Auth: "${CREDENTIALS_DIRECTORY}/proxy" }
tokens:
  - { name: agent, pubsub_token_file: "${CREDENTIALS_DIRECTORY}/agent", account_id: 1, user_id: 2 }
sinks:
  hook:
    type: http
    url: http://127.0.0.1:8080/in
    secret_file: ["${CREDENTIALS_DIRECTORY}/whsec"]
    headers_file: { Authorization: "${CREDENTIALS_DIRECTORY}/bearer" }
  bus: { type: nats, url: "nats://127.0.0.1:4222", subject: a, user: bridge, password_file: "${CREDENTIALS_DIRECTORY}/nats" }
  log: { type: kafka, brokers: "127.0.0.1:9092", topic: t, librdkafka_file: { sasl.password: "${CREDENTIALS_DIRECTORY}/kafka" } }
routes:
  - { name: all, to: [hook, bus, log] }
"#;

    /// A folder of credentials as systemd hands them over, each file ending in a line break.
    fn credentials(agent: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, value) in [
            ("proxy", "proxy-secret"),
            ("agent", agent),
            ("whsec", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            ("bearer", "Bearer hook-secret"),
            ("nats", "nats-secret"),
            ("kafka", "kafka-secret"),
        ] {
            std::fs::write(dir.path().join(name), format!("{value}\n")).unwrap();
        }
        dir
    }

    /// [`SECRETS_FROM_FILES`] with `${CREDENTIALS_DIRECTORY}` set to `dir`, edited by `edit`.
    fn load_credentials(dir: &Path, edit: impl Fn(&str) -> String) -> Result<Config, ConfigError> {
        let folder = dir.display().to_string();
        let env = move |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| folder.clone());
        Config::from_yaml(&edit(SECRETS_FROM_FILES), &env, false)
    }

    #[test]
    fn every_secret_is_read_from_its_file_at_every_load_without_the_line_break() {
        let dir = credentials("agent-v1");
        let cfg = load_credentials(dir.path(), str::to_owned).unwrap();
        let token = &cfg.tokens[0];
        assert_eq!(token.pubsub_token.expose(), "agent-v1");
        assert_eq!(token.headers[0].0, "X-Proxy-Auth");
        assert_eq!(token.headers[0].1.expose(), "proxy-secret");
        let SinkKind::Http(hook) = &cfg.sinks["hook"].kind else {
            panic!("hook is a webhook")
        };
        assert_eq!(hook.secrets.len(), 1);
        assert_eq!(hook.headers[0].0.as_str(), "authorization");
        assert_eq!(hook.headers[0].1.expose(), "Bearer hook-secret");
        let SinkKind::Nats(bus) = &cfg.sinks["bus"].kind else {
            panic!("bus is NATS")
        };
        // The password itself is checked by the NATS sink's own tests.
        let auth = format!("{:?}", bus.auth);
        assert!(auth.starts_with("UserPassword"), "{auth}");
        let SinkKind::Kafka(log) = &cfg.sinks["log"].kind else {
            panic!("log is Kafka")
        };
        assert_eq!(log.librdkafka[0].0, "sasl.password");
        assert_eq!(log.librdkafka[0].1.expose(), "kafka-secret");
        let dump = format!("{cfg:?}");
        for secret in [
            "agent-v1",
            "proxy-secret",
            "MfKQ9r8",
            "hook-secret",
            "nats-secret",
            "kafka-secret",
        ] {
            assert!(!dump.contains(secret), "{secret} in {dump}");
        }
        // A rotated file is read again by the next load: a reload.
        std::fs::write(dir.path().join("agent"), "agent-v2\n").unwrap();
        let cfg = load_credentials(dir.path(), str::to_owned).unwrap();
        assert_eq!(cfg.tokens[0].pubsub_token.expose(), "agent-v2");
    }

    #[test]
    fn a_secret_given_both_ways_is_refused_naming_both_keys() {
        let dir = credentials("agent");
        let both = |edit: &dyn Fn(&str) -> String| match load_credentials(dir.path(), edit) {
            Err(ConfigError::Invalid(found)) => {
                found.iter().map(ToString::to_string).collect::<Vec<_>>()
            }
            other => panic!("not refused as invalid: {other:?}"),
        };
        let found =
            both(&|yaml| yaml.replace("pubsub_token_file:", "pubsub_token: t, pubsub_token_file:"));
        assert_eq!(
            found,
            ["tokens[0].pubsub_token: pubsub_token and pubsub_token_file are both given; keep one"]
        );
        let found = both(&|yaml| {
            yaml.replace(
                "    secret_file:",
                "    secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n    secret_file:",
            )
        });
        assert_eq!(
            found,
            ["sinks.hook.secret: secret and secret_file are both given; keep one"]
        );
        let found = both(&|yaml| yaml.replace("password_file:", "password: p, password_file:"));
        assert_eq!(
            found,
            ["sinks.bus.password: password and password_file are both given; keep one"]
        );
        let found = both(&|yaml| {
            yaml.replace(
                "librdkafka_file:",
                "librdkafka: { sasl.password: p }, librdkafka_file:",
            )
            .replace(
                "  headers_file: { X-Proxy",
                "  headers: { X-Proxy-Auth: x }\n  headers_file: { X-Proxy",
            )
        });
        assert_eq!(
            found,
            [
                "chatwoot.headers.X-Proxy-Auth: is given in both headers and headers_file; keep one",
                "sinks.log.librdkafka.sasl.password: is given in both librdkafka and librdkafka_file; keep one",
            ]
        );
    }

    #[test]
    fn an_unreadable_secret_file_names_its_key_and_path() {
        let dir = credentials("agent");
        std::fs::remove_file(dir.path().join("agent")).unwrap();
        std::fs::write(dir.path().join("nats"), "\n").unwrap();
        let Err(ConfigError::Invalid(found)) = load_credentials(dir.path(), str::to_owned) else {
            panic!("refused as invalid")
        };
        let agent = dir.path().join("agent").display().to_string();
        let nats = dir.path().join("nats").display().to_string();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].key, "tokens[0].pubsub_token_file");
        assert!(
            found[0]
                .message
                .starts_with(&format!("cannot read {agent}: No such file")),
            "{found:?}"
        );
        assert_eq!(
            found[1].to_string(),
            format!("sinks.bus.password_file: {nats} is empty")
        );
        let err = load_error(&MINIMAL.replace("pubsub_token: contact-token", "presence: false"));
        assert_eq!(
            err,
            "tokens[1].pubsub_token: is missing; give pubsub_token or pubsub_token_file, api_access_token or api_access_token_file, or inbox_identifier + contact_identifier"
        );
    }

    #[test]
    fn only_wss_sockets_get_tls_and_a_written_tls_section_is_always_checked() {
        // MINIMAL: chatwoot.url is wss://, the visitor has a ws:// url of its own.
        let cfg = load(MINIMAL).unwrap();
        let tls = cfg.tokens[0]
            .tls
            .as_ref()
            .expect("the agent's socket is wss://");
        assert!(tls.verifies_certificates());
        assert!(cfg.tokens[1].tls.is_none(), "the visitor's socket is ws://");
        let plain = MINIMAL.replace(
            "wss://chat.example.com/cable",
            "ws://chat.example.com/cable",
        );
        assert!(load(&plain).unwrap().tokens[0].tls.is_none());
        let with_tls = plain.replace(
            "  url: ws://chat.example.com/cable",
            "  url: ws://chat.example.com/cable\n  tls: { ca_file: /nonexistent/ca.pem }",
        );
        let err = load_error(&with_tls);
        assert!(
            err.starts_with("chatwoot.tls.ca_file: cannot read /nonexistent/ca.pem: "),
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
  - { name: r, to: [], continue: true }
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
    const EVERY_MISTAKE_REPORT: &[&str] = &[
        "chatwoot.url: `https://chat.example.com/cable` must start with ws:// or wss://",
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
        "routes[0].to: names no sink and has continue: true, so it does nothing; `to: []` drops what the route matches only without continue",
        "routes[1].name: `r` is used by another route already",
        "routes[1].to[1]: no sink is named `nope` (sinks: bad sink, hook, lost, parking, self)",
        "unmatched: must be `drop` or a sink name; no sink is named `elsewhere` (sinks: bad sink, hook, lost, parking, self)",
        "spool.max_bytes: 100 is too small; give the spool at least 1 MiB (1048576)",
        "spool.fsync_interval: must be greater than zero",
        "routes[1].match.token[0]: no token is named `nobody`",
        "routes[1].match.where[0].matches: not a valid regular expression: regex parse error:\n    (\n    ^\nerror: unclosed group",
    ];

    #[test]
    fn the_admin_endpoint_is_off_unless_configured_and_on_loopback_by_default() {
        use std::net::SocketAddr;
        assert_eq!(load(MINIMAL).unwrap().admin, None);
        let admin = load(&format!("{MINIMAL}admin: {{}}\n"))
            .unwrap()
            .admin
            .unwrap();
        assert_eq!(admin.listen, SocketAddr::from(([127, 0, 0, 1], 9464)));
        assert_eq!(admin.ready_requires, ReadyRequires::All);
        let admin = load(&format!(
            "{MINIMAL}admin: {{ listen: 9000, ready_requires: [support-agent] }}\n"
        ))
        .unwrap()
        .admin
        .unwrap();
        assert_eq!(admin.listen, SocketAddr::from(([127, 0, 0, 1], 9000)));
        assert_eq!(
            admin.ready_requires,
            ReadyRequires::Tokens(vec!["support-agent".into()])
        );
        let any = load(&format!("{MINIMAL}admin: {{ ready_requires: any }}\n")).unwrap();
        assert_eq!(any.admin.unwrap().ready_requires, ReadyRequires::Any);
        let err = load_error(&format!(
            "{MINIMAL}admin: {{ listen: 'admin.local:9464', ready_requires: [support-agent, nobody] }}\n"
        ));
        assert!(
            err.contains("admin.listen: `admin.local:9464` is not `IP:port` or a port"),
            "{err}"
        );
        assert!(
            err.contains("admin.ready_requires[1]: no token is named `nobody`"),
            "{err}"
        );
        let err = load_error(&format!("{MINIMAL}admin: {{ ready_requires: most }}\n"));
        assert!(
            err.contains("admin.ready_requires: `most` must be `all`, `any`"),
            "{err}"
        );
        let err = load_error(&format!(
            "{MINIMAL}admin: {{ ready_requires: {{ a: 1 }} }}\n"
        ));
        assert!(
            err.starts_with("admin.ready_requires: must be `all`, `any`"),
            "{err}"
        );
    }

    #[test]
    fn yaml_syntax_error_is_reported() {
        let err = load("chatwoot: [unclosed").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax(_)), "{err}");
    }
}
