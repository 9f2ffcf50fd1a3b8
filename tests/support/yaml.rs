//! The YAML text of a bridge's config, built from its parts: the cable, the tokens, the sinks,
//! the routes and the spool. Tests read it as a [`Config`] or write it to a file for the binary.

use std::path::{Path, PathBuf};

use chatwoot_bridge::config::Config;

/// A bridge config under construction; every part is YAML text, each sink and route in flow
/// style on one line (`{ type: file, path: ... }`).
#[derive(Debug, Clone)]
pub(crate) struct BridgeYaml {
    /// The cable's WebSocket URL (`chatwoot.url`).
    cable_url: String,
    /// More `chatwoot:` keys, one `key: value` each (timings, frame limits).
    cable_settings: Vec<String>,
    /// The `tokens:` entries.
    tokens: Vec<String>,
    /// The `sinks:` entries: name and value.
    sinks: Vec<(String, String)>,
    /// The `routes:` entries.
    routes: Vec<String>,
    /// The spool's folder; without one the key is left out (the default folder).
    spool_dir: Option<PathBuf>,
    /// More `spool:` keys, one `key: value` each.
    spool_settings: Vec<String>,
    /// Top-level keys besides those above, one `key: value` each.
    settings: Vec<String>,
}

impl BridgeYaml {
    /// A config reading the cable at `cable_url`; no tokens, sinks or routes yet.
    pub(crate) fn new(cable_url: &str) -> BridgeYaml {
        BridgeYaml {
            cable_url: cable_url.to_owned(),
            cable_settings: Vec::new(),
            tokens: Vec::new(),
            sinks: Vec::new(),
            routes: Vec::new(),
            spool_dir: None,
            spool_settings: Vec::new(),
            settings: Vec::new(),
        }
    }

    /// Adds a `chatwoot:` key, e.g. `confirm_timeout: 500ms`.
    pub(crate) fn cable(mut self, setting: &str) -> BridgeYaml {
        self.cable_settings.push(setting.to_owned());
        self
    }

    /// Adds a token given as its YAML flow mapping.
    pub(crate) fn token(mut self, token: &str) -> BridgeYaml {
        self.tokens.push(token.to_owned());
        self
    }

    /// Adds an agent token of account 1: `name`, its pubsub token and user id.
    pub(crate) fn agent(self, name: &str, pubsub_token: &str, user_id: u64) -> BridgeYaml {
        self.token(&format!(
            "{{ name: {name}, pubsub_token: {pubsub_token}, account_id: 1, user_id: {user_id} }}"
        ))
    }

    /// Adds the sink `name`, given as the YAML value of its `sinks:` entry.
    pub(crate) fn sink(mut self, name: &str, sink: &str) -> BridgeYaml {
        self.sinks.push((name.to_owned(), sink.to_owned()));
        self
    }

    /// Adds a route given as its YAML flow mapping.
    pub(crate) fn route(mut self, route: &str) -> BridgeYaml {
        self.routes.push(route.to_owned());
        self
    }

    /// Adds the route `all`: every event to each of `sinks`.
    pub(crate) fn route_all(self, sinks: &[&str]) -> BridgeYaml {
        self.route(&format!("{{ name: all, to: [{}] }}", sinks.join(", ")))
    }

    /// Puts the spool in `dir` (created when a bridge starts).
    pub(crate) fn spool(mut self, dir: &Path) -> BridgeYaml {
        self.spool_dir = Some(dir.to_owned());
        self
    }

    /// Adds a `spool:` key, e.g. `fsync: never`.
    pub(crate) fn spool_setting(mut self, setting: &str) -> BridgeYaml {
        self.spool_settings.push(setting.to_owned());
        self
    }

    /// Adds a top-level key, e.g. `shutdown_timeout: 5s`.
    pub(crate) fn setting(mut self, setting: &str) -> BridgeYaml {
        self.settings.push(setting.to_owned());
        self
    }

    /// The YAML text.
    pub(crate) fn text(&self) -> String {
        let mut yaml = format!("chatwoot:\n  url: {}\n", quoted(&self.cable_url));
        for setting in &self.cable_settings {
            yaml += &format!("  {setting}\n");
        }
        yaml += "tokens:\n";
        for token in &self.tokens {
            yaml += &format!("  - {token}\n");
        }
        if !self.sinks.is_empty() {
            yaml += "sinks:\n";
            for (name, sink) in &self.sinks {
                yaml += &format!("  {name}: {sink}\n");
            }
        }
        if !self.routes.is_empty() {
            yaml += "routes:\n";
            for route in &self.routes {
                yaml += &format!("  - {route}\n");
            }
        }
        if let Some(dir) = &self.spool_dir {
            let mut keys = vec![format!("dir: {}", quoted(dir))];
            keys.extend(self.spool_settings.iter().cloned());
            yaml += &format!("spool: {{ {} }}\n", keys.join(", "));
        }
        for setting in &self.settings {
            yaml += &format!("{setting}\n");
        }
        yaml
    }

    /// The validated config; a mistake fails the test with the text.
    pub(crate) fn config(&self) -> Config {
        let yaml = self.text();
        Config::from_yaml(&yaml, &|_| None, false).unwrap_or_else(|e| panic!("config: {e}\n{yaml}"))
    }

    /// Writes the text to `path` (for the binary) and returns the path.
    pub(crate) fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.text())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.to_owned()
    }
}

/// `value` as a double-quoted YAML scalar (a JSON string is one).
pub(crate) fn quoted(value: impl serde::Serialize) -> String {
    serde_json::to_string(&value).expect("a string or a path serializes")
}
