//! `type: nats` as written, and what it validates into. Validation is one step per concern:
//! servers, subject, authentication, TLS, JetStream.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::ServerAddr;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::route::template::Template;
use crate::secret_file::{self, Resolved};
use crate::sink::Envelope;
use crate::tls;
use crate::types::{HumanDuration, OneOrMany, Problem, Problems, Secret};

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// The duplicate window of a stream the sink creates when the config names none (the server's
/// own default too).
pub(crate) const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// `type: nats` as written.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s); the client fails over between them.
    url: OneOrMany<String>,
    /// Subject template, e.g. `chatwoot.{account_id}.{event}`.
    subject: String,
    /// A `.creds` file (JWT and NKey seed), the usual auth of NGS/Synadia and operator mode.
    credentials_file: Option<PathBuf>,
    /// Token auth.
    token: Option<Secret>,
    /// Token auth, the token read from this file; instead of `token`.
    token_file: Option<PathBuf>,
    /// User/password auth, with `password`.
    user: Option<String>,
    /// User/password auth, with `user`.
    password: Option<Secret>,
    /// User/password auth, the password read from this file; instead of `password`.
    password_file: Option<PathBuf>,
    /// NKey seed auth.
    nkey: Option<Secret>,
    /// NKey seed auth, the seed read from this file; instead of `nkey`.
    nkey_file: Option<PathBuf>,
    /// Client TLS: a private CA and/or a client certificate.
    tls: Option<NatsTls>,
    /// Refuse to talk to a server that does not offer TLS.
    #[serde(default)]
    tls_required: bool,
    /// Publish into a JetStream stream and wait for its acks.
    jetstream: Option<JetStreamConfig>,
    /// Bound on a flush (core) or a batch's acks (JetStream).
    #[serde(default = "default_timeout")]
    timeout: HumanDuration,
    /// Binary (default) or structured CloudEvents.
    #[serde(default)]
    envelope: Envelope,
}

/// Client TLS files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NatsTls {
    /// PEM roots to trust besides the system's, for servers with a private CA.
    pub(crate) ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `key_file`).
    pub(crate) cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub(crate) key_file: Option<PathBuf>,
}

/// The JetStream part of `type: nats`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct JetStreamConfig {
    /// The stream the subjects belong to.
    stream: String,
    /// Create the stream when missing, or add this sink's subjects to an existing one that does
    /// not capture them yet; an existing stream's other settings are left as they are.
    #[serde(default)]
    create: bool,
    /// How long the server remembers message ids to drop duplicates (default 2m). Set only on a
    /// stream the sink creates; an existing stream keeps its own (a warning says when it differs).
    duplicate_window: Option<HumanDuration>,
}

/// How the sink authenticates.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NatsAuth {
    None,
    CredentialsFile(PathBuf),
    Token(Secret),
    UserPassword { user: String, password: Secret },
    Nkey(Secret),
}

/// The validated JetStream settings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct JetStreamSettings {
    /// Stream name.
    pub(crate) stream: String,
    /// Whether the sink creates the stream, or adds its subjects to it.
    pub(crate) create: bool,
    /// Server-side deduplication window by `Nats-Msg-Id`, as the config gives it: what a
    /// created stream gets (else [`DEFAULT_DUPLICATE_WINDOW`]), and what an existing stream's
    /// window is compared with.
    pub(crate) duplicate_window: Option<Duration>,
    /// The subject filter the stream must capture, derived from the subject template.
    pub(crate) filter: String,
}

/// A validated NATS sink.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsSettings {
    /// Server addresses, already parsed.
    pub(crate) urls: Vec<String>,
    /// Where each event goes.
    pub(crate) subject: Template,
    /// Credentials.
    pub(crate) auth: NatsAuth,
    /// TLS files.
    pub(crate) tls: Option<NatsTls>,
    /// Refuse plain-text servers.
    pub(crate) tls_required: bool,
    /// Core NATS when `None`.
    pub(crate) jetstream: Option<JetStreamSettings>,
    /// Bound on flushes and acks.
    pub(crate) timeout: Duration,
    /// Binary or structured CloudEvents.
    pub(crate) envelope: Envelope,
}

impl NatsConfig {
    /// Checks the settings; `key` (`sinks.<name>`) prefixes every problem.
    pub(crate) fn validate(self, key: &str) -> Result<NatsSettings, Vec<Problem>> {
        let mut problems = Problems::new(key);
        let urls = self.url.into_vec();
        check_urls(&mut problems, &urls);
        let subject = problems.check("subject", Template::compile("subject", &self.subject));
        if let Some(subject) = &subject {
            check_subject(&mut problems, subject);
        }
        let fields = AuthFields {
            credentials_file: self.credentials_file,
            token: secret_file::one(&mut problems, "token", self.token, self.token_file),
            user: self.user,
            password: secret_file::one(
                &mut problems,
                "password",
                self.password,
                self.password_file,
            ),
            nkey: secret_file::one(&mut problems, "nkey", self.nkey, self.nkey_file),
        };
        let auth = NatsAuth::from_fields(&mut problems, fields);
        if let Some(tls) = &self.tls {
            tls.check(&mut problems);
        }
        let timeout = self.timeout.0;
        if timeout.is_zero() {
            problems.add("timeout", "must be greater than zero");
        }
        let jetstream = self
            .jetstream
            .map(|js| js.validate(&mut problems, subject.as_ref()));
        let (tls, tls_required, envelope) = (self.tls, self.tls_required, self.envelope);
        problems.finish(|| NatsSettings {
            urls,
            subject: subject.expect("no problems means the subject compiled"),
            auth,
            tls,
            tls_required,
            jetstream,
            timeout,
            envelope,
        })
    }
}

/// At least one server, each a NATS URL without credentials in it.
fn check_urls(problems: &mut Problems<'_>, urls: &[String]) {
    if urls.is_empty() {
        problems.add("url", "names no server");
    }
    for (i, url) in urls.iter().enumerate() {
        // Credentials in the URL would show up in logs and Debug output; the auth fields keep
        // them secret. Such a URL is not echoed back either.
        if url.contains('@') {
            problems.add(
                &format!("url[{i}]"),
                "has credentials in it; use `token`, `user`/`password`, `nkey` or `credentials_file`",
            );
        } else if let Err(e) = url.parse::<ServerAddr>() {
            problems.add(
                &format!("url[{i}]"),
                format!("`{url}` is not a NATS URL ({e})"),
            );
        }
    }
}

/// Every subject the template renders is a valid publish subject.
fn check_subject(problems: &mut Problems<'_>, subject: &Template) {
    let sample = subject.render_sample("x");
    if sample.split('.').any(|t| t.is_empty())
        || sample.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
    {
        problems.add(
            "subject",
            format!(
                "`{}` is not a valid NATS subject (no empty tokens, spaces, `*` or `>`)",
                subject.as_str()
            ),
        );
    }
}

/// The authentication fields as written, each secret from its key or its `_file` twin; at
/// most one way may be used.
struct AuthFields {
    /// `credentials_file`.
    credentials_file: Option<PathBuf>,
    /// `token` or `token_file`.
    token: Option<Resolved>,
    /// `user`, with `password`.
    user: Option<String>,
    /// `password` or `password_file`, with `user`.
    password: Option<Resolved>,
    /// `nkey` or `nkey_file`.
    nkey: Option<Resolved>,
}

impl NatsAuth {
    /// The one way of authenticating the fields name; a problem when they name several or half
    /// of one. A secret that could not be read (already reported) leaves no way: `None`.
    fn from_fields(problems: &mut Problems<'_>, fields: AuthFields) -> NatsAuth {
        let AuthFields {
            credentials_file,
            token,
            user,
            password,
            nkey,
        } = fields;
        match (credentials_file, token, user, password, nkey) {
            (None, None, None, None, None) => NatsAuth::None,
            (Some(path), None, None, None, None) => {
                if !path.is_file() {
                    problems.add(
                        "credentials_file",
                        format!("{} is not a readable file", path.display()),
                    );
                }
                NatsAuth::CredentialsFile(path)
            }
            (None, Some(token), None, None, None) => token.map_or(NatsAuth::None, NatsAuth::Token),
            (None, None, Some(user), Some(password), None) => {
                password.map_or(NatsAuth::None, |password| NatsAuth::UserPassword {
                    user,
                    password,
                })
            }
            (None, None, Some(_), None, None) => {
                problems.add("password", "`user` needs `password`");
                NatsAuth::None
            }
            (None, None, None, Some(_), None) => {
                problems.add("user", "`password` needs `user`");
                NatsAuth::None
            }
            (None, None, None, None, Some(Err(secret_file::Reported))) => NatsAuth::None,
            (None, None, None, None, Some(Ok(nkey))) => {
                if !nkey.expose().starts_with('S') {
                    problems.add("nkey", "is not an NKey seed (seeds start with `S`)");
                }
                NatsAuth::Nkey(nkey)
            }
            _ => {
                problems.add(
                    "credentials_file",
                    "use one of credentials_file, token, user/password or nkey (or their _file twins)",
                );
                NatsAuth::None
            }
        }
    }
}

impl NatsTls {
    /// Every named file is PEM of its kind, read as the cable's and the webhooks' `tls:` files
    /// are; a client certificate comes with its key.
    fn check(&self, problems: &mut Problems<'_>) {
        for (field, file) in [
            ("tls.ca_file", &self.ca_file),
            ("tls.cert_file", &self.cert_file),
        ] {
            if let Some(path) = file {
                problems.check(field, tls::read_certificates(path));
            }
        }
        if let Some(path) = &self.key_file {
            problems.check("tls.key_file", tls::read_private_key(path));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.add("tls", "cert_file and key_file go together");
        }
    }
}

impl JetStreamConfig {
    /// Checks the stream name and window; the filter is derived from the subject template
    /// (empty when it did not compile, which is a problem already).
    fn validate(
        self,
        problems: &mut Problems<'_>,
        subject: Option<&Template>,
    ) -> JetStreamSettings {
        if self.stream.is_empty()
            || self
                .stream
                .contains(|c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            problems.add(
                "jetstream.stream",
                format!(
                    "`{}` is not a stream name (no spaces, `.`, `*`, `>`, `/` or `\\`)",
                    self.stream
                ),
            );
        }
        if self.duplicate_window.is_some_and(|w| w.0.is_zero()) {
            problems.add(
                "jetstream.duplicate_window",
                "must be greater than zero: retries rely on it to store events once",
            );
        }
        JetStreamSettings {
            filter: subject.map(Template::nats_filter).unwrap_or_default(),
            stream: self.stream,
            create: self.create,
            duplicate_window: self.duplicate_window.map(|w| w.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(value: serde_json::Value) -> Result<NatsSettings, Vec<Problem>> {
        serde_json::from_value::<NatsConfig>(value)
            .unwrap()
            .validate("sinks.n")
    }

    #[test]
    fn config_checks_and_filter() {
        let s = settings(serde_json::json!({
            "url": ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"],
            "subject": "chatwoot.{account_id}.{event}",
            "token": "s3cret-token",
            "jetstream": {"stream": "CHATWOOT", "create": true, "duplicate_window": "2h"}
        }))
        .unwrap();
        let js = s.jetstream.as_ref().unwrap();
        assert_eq!(js.filter, "chatwoot.*.>");
        assert_eq!(js.duplicate_window, Some(Duration::from_secs(7200)));
        assert!(!format!("{s:?}").contains("s3cret-token"));

        let problems = settings(serde_json::json!({
            "url": "nats://127.0.0.1:4222",
            "subject": "chat woot.{acount_id}",
            "user": "bridge",
            "token": "t",
            "jetstream": {"stream": "bad.name"}
        }))
        .unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let text = text.join("\n");
        assert!(
            text.contains("sinks.n.subject: unknown template field {acount_id}"),
            "{text}"
        );
        assert!(
            text.contains("sinks.n.credentials_file: use one of"),
            "{text}"
        );
        assert!(text.contains("sinks.n.jetstream.stream"), "{text}");
        let problems = settings(serde_json::json!({
            "url": "nats://127.0.0.1:4222", "subject": "a..{event}"
        }))
        .unwrap_err();
        assert_eq!(problems[0].key, "sinks.n.subject");
        let problems = settings(serde_json::json!({
            "url": ["nats://bridge:pa55word@127.0.0.1:4222"], "subject": "a"
        }))
        .unwrap_err();
        assert_eq!(problems[0].key, "sinks.n.url[0]");
        assert!(!problems[0].message.contains("pa55word"));
    }

    #[test]
    fn secrets_are_read_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let (password, seed) = (dir.path().join("password"), dir.path().join("seed"));
        std::fs::write(&password, "pa55word\n").unwrap();
        std::fs::write(&seed, "not-a-seed\n").unwrap();
        let s = settings(serde_json::json!({
            "url": "nats://127.0.0.1:4222", "subject": "a", "user": "bridge",
            "password_file": password
        }))
        .unwrap();
        assert!(matches!(
            &s.auth,
            NatsAuth::UserPassword { user, password } if user == "bridge" && password.expose() == "pa55word"
        ));
        // A seed from a file is checked like one written inline; one that cannot be read is
        // reported once, at its file.
        let problems = settings(serde_json::json!({
            "url": "nats://127.0.0.1:4222", "subject": "a", "nkey_file": seed
        }))
        .unwrap_err();
        assert_eq!(
            problems[0].to_string(),
            "sinks.n.nkey: is not an NKey seed (seeds start with `S`)"
        );
        let gone = dir.path().join("gone");
        let problems = settings(serde_json::json!({
            "url": "nats://127.0.0.1:4222", "subject": "a", "token_file": gone
        }))
        .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "sinks.n.token_file");
        assert!(problems[0].message.contains(&gone.display().to_string()));
    }
}
