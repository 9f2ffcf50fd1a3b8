//! The webhook client: one request per event, signed the Standard Webhooks way, and the
//! classification of answers and transport errors.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use futures_util::stream::{self, StreamExt};
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use rustls::pki_types::ServerName;
use sha2::Sha256;

use super::config::SigningKey;
use super::HttpSettings;
use crate::event::Event;
use crate::route::template;
use crate::sink::{
    each_binary_attribute, payload, percent_encode_header, settled, Confirmations, Destination,
    Envelope, ErrorClass, Outcome, SinkError, SinkLimits, DATA_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
};
use crate::tls;

/// The longest `Retry-After` honoured; a larger one is most likely a misconfigured server, and
/// waiting hours would look like a hang.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Errors that stop a webhook sink from being created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpBuildError {
    /// reqwest could not make a client with these settings (e.g. no TLS backend).
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

impl Destination for HttpSink {
    type Settings = Arc<HttpSettings>;
    type BuildError = HttpBuildError;

    async fn build(
        settings: &Arc<HttpSettings>,
        _: SinkLimits,
    ) -> Result<HttpSink, HttpBuildError> {
        let client = settings
            .tls
            .reqwest(reqwest::Client::builder())
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

    /// Sends the batch's events concurrently, at most `max_in_flight` at once; outcomes keep
    /// the batch's order.
    async fn send(&mut self, batch: &[Arc<Event>]) -> Confirmations {
        // Futures built up front: a closure inside the stream type trips the compiler's `Send`
        // check for the spawned sink loop.
        let sends: Vec<_> = batch.iter().map(|event| self.request(event)).collect();
        settled(
            stream::iter(sends)
                .buffered(self.settings.max_in_flight)
                .collect()
                .await,
        )
    }

    /// Requests run concurrently (`max_in_flight`).
    fn preserves_key_order(&self) -> bool {
        false
    }

    /// Opens a TCP connection to the endpoint's host, and for `https://` completes the TLS
    /// handshake, so an untrusted certificate shows here. No request is sent: to a webhook, any
    /// request is a delivery.
    async fn probe(&self, within: Duration) -> Result<(), String> {
        let url =
            Url::parse(&self.settings.url.render_sample("x")).map_err(|e| format!("url: {e}"))?;
        let host = url.host_str().ok_or("url has no host")?.to_owned();
        let port = url.port_or_known_default().ok_or("url has no port")?;
        let connect = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
            if url.scheme() == "https" {
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
                tokio_rustls::TlsConnector::from(self.settings.tls.rustls())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        tls::explain_failure(&e, TLS_SECTION)
                            .unwrap_or_else(|| format!("TLS handshake with {host}:{port}: {e}"))
                    })?;
            }
            Ok::<_, String>(())
        };
        tokio::time::timeout(within, connect)
            .await
            .map_err(|_| format!("no connection to {host}:{port} within {within:?}"))?
    }

    /// Nothing is held between batches: every request was answered before its batch's outcomes.
    async fn close(&mut self) {}
}

impl HttpSink {
    /// One request for one event; its outcome from the status or the transport error.
    async fn request(&self, event: &Event) -> Outcome {
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
                let e = e.without_url();
                let why = tls::explain_failure(&e, TLS_SECTION).unwrap_or_else(|| e.to_string());
                SinkError::new(format!("webhook: {why}")).outcome(class)
            }
        }
    }
}

/// Where a webhook's TLS is configured, for the hint of a TLS error: the sink's name is already
/// on every message about it.
const TLS_SECTION: &str = "the sink's tls";

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
pub(crate) fn sign(keys: &[SigningKey], id: &str, timestamp: u64, body: &[u8]) -> String {
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
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

/// What a response status means for the event: 2xx delivered; 408, 429 and 5xx retryable
/// (with the server's `Retry-After`); 410 permanent (the endpoint is gone); other 4xx
/// permanent (the request itself is refused); 3xx a failure, since redirects are not followed.
pub(crate) fn classify_status(status: StatusCode, retry_after: Option<Duration>) -> Outcome {
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
pub(crate) fn classify_transport(error: &reqwest::Error) -> ErrorClass {
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
