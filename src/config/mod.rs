//! The YAML an operator writes, checked into typed settings before anything connects.
//!
//! Loading goes in three steps, each with errors that name the key path:
//! 1. the `config` crate reads the YAML file and `CHATWOOT_BRIDGE__A__B` overrides into a tree;
//! 2. `${VAR}` / `${VAR:-default}` are expanded in every string of that tree (`expand`);
//! 3. the tree is deserialized into the `Raw*` schema (`raw`, unknown keys rejected) and
//!    validated section by section (`validate`) into [`Config`], whose values are the ones the
//!    daemon uses as they are.
//!
//! The settings types themselves belong to the stages that use them and are re-exported here.

mod expand;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::delivery::retry::RetrySettings;
use crate::route::redact::Redaction;
use crate::route::RouteTable;
pub use crate::sink::{SinkConfig, SinkKind};
pub use crate::source::settings::{CableSettings, Identity, ReconnectSettings, TokenSpec};
use crate::spool::SpoolConfig;
pub use crate::types::{HumanDuration, OneOrMany, Problem, Secret};
use expand::expand_tree;
use raw::RawConfig;

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
    /// How long shutdown may take to deliver what is in flight before it gives up.
    pub shutdown_timeout: Duration,
}

/// One sink: where it delivers and what it removes from `data` first.
#[derive(Debug, Clone)]
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
        for bad in ["0", "1025"] {
            let text = MINIMAL.replace(
                "  url: wss://chat.example.com/cable",
                &format!("  url: wss://chat.example.com/cable\n  max_nesting: {bad}"),
            );
            let err = load(&text).unwrap_err().to_string();
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
            let err = load(&spool(&format!("replay_share: {bad}")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("spool.replay_share: {said}")),
                "{bad}: {err}"
            );
        }
        // Half of 16 MiB is exactly one 8 MiB frame; a quarter is not enough.
        assert!(load(&spool("max_bytes: 16777216")).is_ok());
        let err = load(&spool("max_bytes: 16777216, replay_share: 0.25"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spool.replay_share: 0.25 of max_bytes is 4194304 bytes, less than chatwoot.max_frame_bytes (8388608)"),
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
