//! HTTP webhook sink: one request per event, signed the Standard Webhooks way.
//!
//! Events follow the CloudEvents HTTP binding: in binary mode the body is Chatwoot's data bytes
//! and the attributes are `ce-*` headers; in structured mode the body is the whole CloudEvent.
//! Redirects are not followed: a webhook URL that moved is a configuration to fix, and following
//! one would send the signed body (and custom headers) somewhere nobody configured.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use futures_util::stream::{self, StreamExt};
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use schemars::JsonSchema;
use serde::Deserialize;
use sha2::Sha256;

use super::{
    each_binary_attribute, payload, percent_encode_header, Envelope, ErrorClass, Outcome,
    SinkError, DATA_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE,
};
use crate::event::Event;
use crate::route::template::{self, Template};
use crate::types::{HumanDuration, OneOrMany, Problem, Problems, Secret};

/// The longest `Retry-After` honoured; a larger one is most likely a misconfigured server, and
/// waiting hours would look like a hang.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

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
    /// Binary (default) or structured CloudEvents.
    #[serde(default)]
    envelope: Envelope,
}

fn usize_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    crate::types::number(d).map(|n| n as usize)
}

/// A validated webhook sink.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Endpoint template.
    pub url: Template,
    /// HTTP method.
    pub method: Method,
    /// Extra headers, checked to be valid header names and values.
    pub headers: Vec<(HeaderName, Secret)>,
    /// Per-request bound.
    pub timeout: Duration,
    /// Concurrency per batch.
    pub max_in_flight: usize,
    /// Decoded signing keys; empty means unsigned.
    pub secrets: Vec<SigningKey>,
    /// Binary or structured CloudEvents.
    pub envelope: Envelope,
}

/// A decoded `whsec_` secret.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl SigningKey {
    /// Parses `whsec_<base64>`.
    pub fn parse(secret: &str) -> Result<SigningKey, &'static str> {
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
    pub(crate) fn validate(self, key: &str) -> Result<HttpSettings, Vec<Problem>> {
        let mut problems = Problems::new(key);
        let url = problems.check("url", Template::compile("url", &self.url));
        if let Some(url) = &url {
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
                    // Fields only in the path: the host (and so where signed bodies go) is
                    // fixed by the config, not by event data.
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
        let method = match self.method.as_deref().unwrap_or("POST") {
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
        };
        let mut headers = Vec::new();
        for (name, value) in self.headers {
            match HeaderName::from_bytes(name.as_bytes()) {
                Err(_) => problems.add(
                    &format!("headers.{name}"),
                    format!("`{name}` is not a valid header name"),
                ),
                Ok(header) => {
                    if HeaderValue::from_str(value.expose()).is_err() {
                        // Never echo the value: it is a secret.
                        problems.add(
                            &format!("headers.{name}"),
                            "value has characters not allowed in a header",
                        );
                    }
                    headers.push((header, value));
                }
            }
        }
        let timeout = self.timeout.0;
        if timeout.is_zero() {
            problems.add("timeout", "must be greater than zero");
        }
        if self.max_in_flight == 0 {
            problems.add("max_in_flight", "must be at least 1");
        }
        let mut secrets = Vec::new();
        let listed = self.secret.map(OneOrMany::into_vec).unwrap_or_default();
        let single = listed.len() == 1;
        for (i, secret) in listed.iter().enumerate() {
            let field = if single {
                "secret".to_owned()
            } else {
                format!("secret[{i}]")
            };
            match SigningKey::parse(secret.expose()) {
                Ok(k) => secrets.push(k),
                Err(message) => problems.add(&field, message),
            }
        }
        let (max_in_flight, envelope) = (self.max_in_flight, self.envelope);
        problems.finish(|| HttpSettings {
            url: url.expect("no problems means the url compiled"),
            method,
            headers,
            timeout,
            max_in_flight,
            secrets,
            envelope,
        })
    }
}

/// Errors that stop a webhook sink from being created.
#[derive(Debug, thiserror::Error)]
pub enum HttpBuildError {
    #[error("cannot set up the HTTP client: {0}")]
    Client(reqwest::Error),
}

/// A webhook endpoint.
pub struct HttpSink {
    /// One client per sink, so connections (and TLS sessions) are reused across events.
    client: reqwest::Client,
    /// The validated settings.
    settings: Arc<HttpSettings>,
}

impl HttpSink {
    pub fn build(settings: &Arc<HttpSettings>) -> Result<HttpSink, HttpBuildError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .pool_max_idle_per_host(settings.max_in_flight)
            .user_agent(concat!("chatwoot-bridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(HttpBuildError::Client)?;
        Ok(HttpSink {
            client,
            settings: settings.clone(),
        })
    }

    /// Opens a TCP connection to the endpoint's host. No request is sent: to a webhook, any
    /// request is a delivery.
    pub async fn probe(&self, within: Duration) -> Result<(), String> {
        let url =
            Url::parse(&self.settings.url.render_sample("x")).map_err(|e| format!("url: {e}"))?;
        let host = url.host_str().ok_or("url has no host")?.to_owned();
        let port = url.port_or_known_default().ok_or("url has no port")?;
        tokio::time::timeout(
            within,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| format!("no connection to {host}:{port} within {within:?}"))?
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        Ok(())
    }

    /// Sends the batch's events concurrently, at most `max_in_flight` at once; outcomes keep
    /// the batch's order.
    pub async fn deliver(&mut self, batch: &[Arc<Event>]) -> Vec<Outcome> {
        // Futures built up front: a closure inside the stream type trips the compiler's `Send`
        // check for the spawned sink loop.
        let sends: Vec<_> = batch.iter().map(|event| self.send(event)).collect();
        stream::iter(sends)
            .buffered(self.settings.max_in_flight)
            .collect()
            .await
    }

    async fn send(&self, event: &Event) -> Outcome {
        let url = match self.settings.url.render(event, template::url_segment) {
            Ok(url) => url,
            Err(e) => return Outcome::Permanent(SinkError::new(e.to_string())),
        };
        let body = payload(event, self.settings.envelope);
        let mut headers = request_headers(event, self.settings.envelope);
        for (name, value) in &self.settings.headers {
            if let Ok(value) = HeaderValue::from_str(value.expose()) {
                headers.insert(name.clone(), sensitive(value));
            }
        }
        if !self.settings.secrets.is_empty() {
            // Recomputed on every attempt: receivers reject old timestamps to stop replays.
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let id = event.id.to_string();
            let signature = sign(&self.settings.secrets, &id, timestamp, &body);
            headers.insert("webhook-id", header_value(&id));
            headers.insert("webhook-timestamp", header_value(&timestamp.to_string()));
            headers.insert("webhook-signature", sensitive(header_value(&signature)));
        }
        let request = self
            .client
            .request(self.settings.method.clone(), &url)
            .headers(headers)
            .body(body);
        match request.send().await {
            Ok(mut response) => {
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                let status = response.status();
                // Read the (small) answer to its end so the connection goes back to the pool;
                // an unread body closes it. Bounded: a huge answer is not worth keeping it.
                let mut drained = 0usize;
                while let Ok(Some(chunk)) = response.chunk().await {
                    drained += chunk.len();
                    if drained > MAX_DRAINED_BODY {
                        break;
                    }
                }
                classify_status(status, retry_after)
            }
            Err(e) => {
                // The URL is left out: the sink's name already says where, and the rendered path
                // holds event data.
                let class = classify_transport(&e);
                SinkError::new(format!("webhook: {}", e.without_url())).outcome(class)
            }
        }
    }
}

/// Most of a response body read to keep its connection reusable.
const MAX_DRAINED_BODY: usize = 64 * 1024;

/// The CloudEvents HTTP binding headers.
pub fn request_headers(event: &Event, envelope: Envelope) -> HeaderMap {
    let mut headers = HeaderMap::new();
    match envelope {
        Envelope::Binary => {
            each_binary_attribute(event, |attribute, value| {
                headers.insert(
                    HeaderName::from_static(attribute.dashed()),
                    header_value(&percent_encode_header(value)),
                );
            });
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(DATA_CONTENT_TYPE));
        }
        Envelope::Structured => {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static(STRUCTURED_CONTENT_TYPE),
            );
        }
    }
    headers
}

/// Values made of printable ASCII (ids, numbers, percent-encoded text) are always valid.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Marks a value so HTTP tooling (and hyper's Debug) leaves it out.
fn sensitive(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// The `webhook-signature` header: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` per
/// key, space separated.
pub fn sign(keys: &[SigningKey], id: &str, timestamp: u64, body: &[u8]) -> String {
    keys.iter()
        .map(|key| {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(&key.0).expect("HMAC accepts keys of any length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `Retry-After` in seconds; an HTTP date is not honoured (the backoff applies instead).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

/// What a response status means for the event: 2xx delivered; 408, 429 and 5xx retryable
/// (with the server's `Retry-After`); 410 permanent (the endpoint is gone); other 4xx
/// permanent (the request itself is refused); 3xx a failure, since redirects are not followed.
pub fn classify_status(status: StatusCode, retry_after: Option<Duration>) -> Outcome {
    let code = status.as_u16();
    match code {
        200..=299 => Outcome::Delivered,
        408 | 429 | 500..=599 => Outcome::Retryable(
            SinkError::new(format!("webhook answered {status}")).with_retry_after(retry_after),
        ),
        410 => Outcome::Permanent(SinkError::new(format!(
            "webhook answered {status}: the endpoint is gone"
        ))),
        300..=399 => Outcome::Permanent(SinkError::new(format!(
            "webhook answered {status}: redirects are not followed; configure the final URL"
        ))),
        _ => Outcome::Permanent(SinkError::new(format!("webhook answered {status}"))),
    }
}

/// Transport errors: timeouts and connection failures are retried; a request that cannot even
/// be built (a rendered URL that does not parse) never will succeed.
pub fn classify_transport(error: &reqwest::Error) -> ErrorClass {
    if error.is_builder() {
        ErrorClass::Permanent
    } else {
        ErrorClass::Retryable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(outcome: &Outcome) -> &'static str {
        match outcome {
            Outcome::Delivered => "delivered",
            Outcome::Retryable(_) => "retryable",
            Outcome::Permanent(_) => "permanent",
        }
    }

    #[test]
    fn status_classes() {
        let s = |code: u16| class(&classify_status(StatusCode::from_u16(code).unwrap(), None));
        for code in [200, 201, 202, 204] {
            assert_eq!(s(code), "delivered", "{code}");
        }
        for code in [408, 429, 500, 502, 503, 504] {
            assert_eq!(s(code), "retryable", "{code}");
        }
        for code in [400, 401, 403, 404, 410, 413, 422, 301, 302, 307, 308] {
            assert_eq!(s(code), "permanent", "{code}");
        }
        let Outcome::Retryable(e) = classify_status(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(3)),
        ) else {
            panic!("503 is retryable")
        };
        assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
        let Outcome::Permanent(e) = classify_status(StatusCode::FOUND, None) else {
            panic!("302 is permanent")
        };
        assert!(e.message.contains("redirects are not followed"), "{e}");
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("99999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification's test vectors.
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&[key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn several_secrets_sign_with_each() {
        let a = SigningKey(vec![1; 24]);
        let b = SigningKey(vec![2; 24]);
        let sig = sign(&[a, b], "id", 1, b"{}");
        assert_eq!(sig.split(' ').count(), 2);
        assert!(sig.split(' ').all(|s| s.starts_with("v1,")));
    }

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

    #[test]
    fn binary_headers() {
        let e = Event::for_test(
            "message.created",
            "agent",
            r#"{"account_id":3,"conversation_id":7}"#,
        );
        let h = request_headers(&e, Envelope::Binary);
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["ce-type"], "com.chatwoot.message.created");
        assert_eq!(h["content-type"], "application/json");
        let h = request_headers(&e, Envelope::Structured);
        assert_eq!(h["content-type"], "application/cloudevents+json");
        assert!(h.get("ce-id").is_none());
    }
}
