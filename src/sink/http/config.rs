//! `type: http` as written, and what it validates into.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, Url};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::route::template::Template;
use crate::secret_file;
use crate::sink::Envelope;
use crate::tls::{ClientTls, TlsConfig};
use crate::types::{HumanDuration, OneOrMany, Problem, Problems, Secret};

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(15))
}

fn default_max_in_flight() -> usize {
    8
}

/// `type: http` as written.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Endpoint; fields are allowed in the path (`https://hooks.example.com/chatwoot/{event}`).
    url: String,
    /// `POST` unless said otherwise.
    method: Option<String>,
    /// Extra request headers; values are often credentials, so they are secrets.
    #[serde(default)]
    headers: BTreeMap<String, Secret>,
    /// Request headers whose values are read from files (a header name to a path), such as an
    /// `Authorization` kept out of the config; a name may not be in `headers` too.
    #[serde(default)]
    headers_file: BTreeMap<String, PathBuf>,
    /// TLS of an `https://` endpoint: a private CA, a client certificate, or (for a test bench
    /// only) `insecure_skip_verify`. The system's trust store and the bundled web roots are
    /// trusted without it.
    #[serde(default)]
    tls: TlsConfig,
    /// Bound on one request, connect to last byte.
    #[serde(default = "default_timeout")]
    timeout: HumanDuration,
    /// Requests sent at once to this endpoint.
    #[serde(default = "default_max_in_flight", deserialize_with = "usize_number")]
    #[schemars(with = "u64")]
    max_in_flight: usize,
    /// Standard Webhooks signing secret(s), `whsec_<base64>`; several sign with each during a
    /// rotation.
    secret: Option<OneOrMany<Secret>>,
    /// File(s) holding the signing secret(s), one per file; instead of `secret`.
    secret_file: Option<OneOrMany<PathBuf>>,
    /// Binary (default) or structured CloudEvents.
    #[serde(default)]
    envelope: Envelope,
}

fn usize_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    crate::types::number(d).map(|n| n as usize)
}

/// A validated webhook sink.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// Endpoint template.
    pub(crate) url: Template,
    /// HTTP method.
    pub(crate) method: Method,
    /// Extra headers, checked to be valid header names and values.
    pub(crate) headers: Vec<(HeaderName, Secret)>,
    /// Per-request bound.
    pub(crate) timeout: Duration,
    /// Concurrency per batch.
    pub(crate) max_in_flight: usize,
    /// Decoded signing keys; empty means unsigned.
    pub(crate) secrets: Vec<SigningKey>,
    /// The TLS of `https://` requests (`tls:`).
    pub(crate) tls: ClientTls,
    /// Binary or structured CloudEvents.
    pub(crate) envelope: Envelope,
}

/// A decoded `whsec_` secret.
#[derive(Clone, PartialEq)]
pub(crate) struct SigningKey(pub(crate) Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl SigningKey {
    /// Parses `whsec_<base64>`.
    pub(crate) fn parse(secret: &str) -> Result<SigningKey, &'static str> {
        let encoded = secret
            .strip_prefix("whsec_")
            .ok_or("must start with `whsec_` followed by base64")?;
        let bytes = BASE64
            .decode(encoded)
            .map_err(|_| "the part after `whsec_` is not valid base64")?;
        if bytes.len() < 16 {
            return Err("is shorter than 16 bytes (Standard Webhooks asks for 24 to 64)");
        }
        Ok(SigningKey(bytes))
    }
}

impl HttpConfig {
    /// Checks the settings; `key` (`sinks.<name>`) prefixes every problem.
    pub(crate) fn validate(self, key: &str) -> Result<HttpSettings, Vec<Problem>> {
        let mut problems = Problems::new(key);
        let url = problems.check("url", Template::compile("url", &self.url));
        if let Some(url) = &url {
            check_url(&mut problems, url);
        }
        let method = method(&mut problems, self.method.as_deref());
        let written = secret_file::map(&mut problems, "headers", self.headers, self.headers_file);
        let headers = headers(&mut problems, written);
        let timeout = self.timeout.0;
        if timeout.is_zero() {
            problems.add("timeout", "must be greater than zero");
        }
        if self.max_in_flight == 0 {
            problems.add("max_in_flight", "must be at least 1");
        }
        let secrets = signing_keys(&mut problems, self.secret, self.secret_file);
        let tls = problems.absorb(self.tls.validate(&format!("{key}.tls")));
        let (max_in_flight, envelope) = (self.max_in_flight, self.envelope);
        problems.finish(|| HttpSettings {
            url: url.expect("no problems means the url compiled"),
            method,
            headers,
            timeout,
            max_in_flight,
            secrets,
            tls: tls.expect("no problems means the TLS was built"),
            envelope,
        })
    }
}

/// The endpoint must be an http(s) URL without credentials, with template fields only in its
/// path: the host (and so where signed bodies go) is fixed by the config, not by event data.
fn check_url(problems: &mut Problems<'_>, url: &Template) {
    match Url::parse(&url.render_sample("x")) {
        Err(e) => problems.add("url", format!("`{}` is not a URL ({e})", url.as_str())),
        // Credentials in the URL would show up in logs and Debug output.
        Ok(parsed) if parsed.password().is_some() || !parsed.username().is_empty() => {
            problems.add(
                "url",
                "has credentials in it; send them in `headers` (e.g. Authorization), which are kept secret",
            );
        }
        Ok(parsed) => {
            if !matches!(parsed.scheme(), "http" | "https") {
                problems.add(
                    "url",
                    format!("`{}` must start with http:// or https://", url.as_str()),
                );
            }
            let prefix = url.literal_prefix();
            let authority_end = prefix
                .find("://")
                .and_then(|s| prefix[s + 3..].find('/').map(|p| s + 3 + p));
            if url.has_fields() && authority_end.is_none() {
                problems.add(
                    "url",
                    format!(
                        "`{}`: template fields are allowed only in the path",
                        url.as_str()
                    ),
                );
            }
        }
    }
}

/// The method: a webhook carries a body, so POST (the default), PUT or PATCH.
fn method(problems: &mut Problems<'_>, written: Option<&str>) -> Method {
    match written.unwrap_or("POST") {
        m if m.eq_ignore_ascii_case("post") => Method::POST,
        m if m.eq_ignore_ascii_case("put") => Method::PUT,
        m if m.eq_ignore_ascii_case("patch") => Method::PATCH,
        other => {
            problems.add(
                "method",
                format!("`{other}` is not one of POST, PUT, PATCH (a webhook carries a body)"),
            );
            Method::POST
        }
    }
}

/// The extra headers, with names and values checked; a value is never echoed (it is a secret).
fn headers(
    problems: &mut Problems<'_>,
    written: BTreeMap<String, Secret>,
) -> Vec<(HeaderName, Secret)> {
    let mut headers = Vec::new();
    for (name, value) in written {
        match HeaderName::from_bytes(name.as_bytes()) {
            Err(_) => problems.add(
                &format!("headers.{name}"),
                format!("`{name}` is not a valid header name"),
            ),
            Ok(header) => {
                if HeaderValue::from_str(value.expose()).is_err() {
                    problems.add(
                        &format!("headers.{name}"),
                        "value has characters not allowed in a header",
                    );
                }
                headers.push((header, value));
            }
        }
    }
    headers
}

/// The decoded signing keys, from `secret` or `secret_file`; a problem is reported at the key
/// of the value (`secret`, `secret[1]`, `secret_file[0]`).
fn signing_keys(
    problems: &mut Problems<'_>,
    written: Option<OneOrMany<Secret>>,
    files: Option<OneOrMany<PathBuf>>,
) -> Vec<SigningKey> {
    let Ok(listed) = secret_file::list(problems, "secret", written, files) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    for (field, secret) in &listed {
        match SigningKey::parse(secret.expose()) {
            Ok(k) => keys.push(k),
            Err(message) => problems.add(field, message),
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(value: serde_json::Value) -> Result<HttpSettings, Vec<Problem>> {
        serde_json::from_value::<HttpConfig>(value)
            .unwrap()
            .validate("sinks.h")
    }

    #[test]
    fn config_checks() {
        let s = settings(serde_json::json!({
            "url": "https://hooks.example.com/chatwoot/{event}",
            "headers": {"Authorization": "Bearer very-secret"},
            "secret": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
            "timeout": "5s"
        }))
        .unwrap();
        assert_eq!(s.secrets.len(), 2);
        assert_eq!(s.max_in_flight, 8);
        assert_eq!(s.timeout, Duration::from_secs(5));
        let dump = format!("{s:?}");
        assert!(
            !dump.contains("very-secret") && !dump.contains("MfKQ9r8"),
            "{dump}"
        );

        let problems = settings(serde_json::json!({
            "url": "https://{token}.example.com/x",
            "method": "GET",
            "secret": "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "headers": {"X-Bad": "line\nbreak-secret"},
            "max_in_flight": 0
        }))
        .unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let text = text.join("\n");
        assert!(text.contains("sinks.h.url"), "{text}");
        assert!(text.contains("only in the path"), "{text}");
        assert!(text.contains("sinks.h.method"), "{text}");
        assert!(
            text.contains("sinks.h.secret: must start with `whsec_`"),
            "{text}"
        );
        assert!(text.contains("sinks.h.headers.X-Bad"), "{text}");
        assert!(!text.contains("break-secret"), "{text}");
        assert!(text.contains("sinks.h.max_in_flight"), "{text}");
        let problems =
            settings(serde_json::json!({"url": "https://u:pa55word@x/{event}"})).unwrap_err();
        assert!(problems[0].message.contains("credentials"), "{problems:?}");
        assert!(!problems[0].message.contains("pa55word"), "{problems:?}");
        let problems = settings(serde_json::json!({"url": "ftp://x/{event}"})).unwrap_err();
        assert!(problems[0].message.contains("http://"), "{problems:?}");
    }
}
