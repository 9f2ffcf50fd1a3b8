//! The NATS client: core publish (confirmed by a receipt, a marker the server sends back once it
//! has read the batch) or JetStream (confirmed by the stream's publish ack, deduplicated by
//! `Nats-Msg-Id`), and the classification of its errors.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderName;
use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::{ConnectOptions, HeaderMap, ServerAddr};
use futures_util::future::join_all;

use super::config::{JetStreamSettings, NatsAuth, DEFAULT_DUPLICATE_WINDOW};
use super::receipt::{Receipt, Receipts};
use super::NatsSettings;
use crate::event::Event;
use crate::route::template;
use crate::sink::{
    each_binary_attribute, payload, percent_encode_header, settled, settled_all, Confirmations,
    Destination, Envelope, ErrorClass, Outcome, SinkError, SinkLimits, DATA_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
};

/// Errors that stop a NATS sink from being created: only settings, never an unreachable server.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NatsBuildError {
    /// The `.creds` file could not be read or parsed.
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The client refused its options (TLS files, an NKey seed, the server list).
    #[error("NATS client settings refused: {0}")]
    Connect(async_nats::ConnectError),
    /// The client took no subscription for the receipts (its connection task is gone).
    #[error("cannot subscribe to the NATS sink's receipt inbox: {0}")]
    Receipts(async_nats::SubscribeError),
}

/// What went wrong, per operation, with the client's own kinds inside.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NatsFailure {
    /// Handing a message to the client (core mode).
    Publish(async_nats::client::PublishErrorKind),
    /// The client did not take a core batch's receipt marker.
    ReceiptNotSent,
    /// A core batch's receipt did not come back from the server within the sink's timeout.
    NotConfirmed,
    /// The client did not take the message within the sink's timeout (disconnected, buffer
    /// full).
    PublishTimedOut,
    /// The client was not connected to a server within the sink's timeout; nothing was handed to
    /// it.
    NotConnected,
    /// Publishing to JetStream or waiting for its ack.
    JetStreamPublish(jetstream::context::PublishErrorKind),
    /// Creating or updating the stream.
    Stream(jetstream::context::CreateStreamErrorKind),
}

/// Whether a NATS failure can succeed later with the same message (and the same id, which the
/// stream's duplicate window turns into exactly one stored copy).
pub(crate) fn classify(failure: &NatsFailure) -> ErrorClass {
    use async_nats::client::PublishErrorKind as P;
    use jetstream::context::{CreateStreamErrorKind as S, PublishErrorKind as J};
    match failure {
        // The server would refuse this message every time.
        NatsFailure::Publish(P::MaxPayloadExceeded | P::InvalidSubject) => ErrorClass::Permanent,
        NatsFailure::Publish(P::Send) => ErrorClass::Retryable,
        NatsFailure::ReceiptNotSent
        | NatsFailure::NotConfirmed
        | NatsFailure::PublishTimedOut
        | NatsFailure::NotConnected => ErrorClass::Retryable,
        NatsFailure::JetStreamPublish(kind) => match kind {
            J::MaxPayloadExceeded | J::WrongLastMessageId | J::WrongLastSequence => {
                ErrorClass::Permanent
            }
            // A missing stream can be created (by this sink with `create: true`, or by an
            // operator); a lost ack is retried with the same id and deduplicated.
            J::StreamNotFound | J::TimedOut | J::BrokenPipe | J::MaxAckPending | J::Other => {
                ErrorClass::Retryable
            }
        },
        NatsFailure::Stream(kind) => match kind {
            S::EmptyStreamName | S::InvalidStreamName | S::DomainAndExternalSet => {
                ErrorClass::Permanent
            }
            // A refusal by the server (overlapping subjects, limits, permissions) needs an
            // operator; events wait instead of being dropped while it is fixed.
            S::JetStream(_)
            | S::JetStreamUnavailable
            | S::TimedOut
            | S::Response
            | S::NotFound
            | S::ResponseParse => ErrorClass::Retryable,
        },
    }
}

/// A NATS connection and what to publish with it.
pub struct NatsSink {
    /// Connects and reconnects in the background, so a server that is down at startup only
    /// delays delivery.
    client: async_nats::Client,
    /// Core NATS or JetStream, with what confirms a batch in each.
    publisher: Publisher,
    /// Whether the stream is known to exist with this sink's subjects (JetStream, `create`).
    /// Shared with outstanding confirmations: an ack saying the stream is gone clears it.
    stream_ready: Arc<AtomicBool>,
    /// The validated settings.
    settings: Arc<NatsSettings>,
}

/// How a batch is published and confirmed.
enum Publisher {
    /// Core NATS: confirmed by a receipt the server sends back ([`Receipts`]).
    Core(Receipts),
    /// JetStream: confirmed by the stream's publish acks.
    JetStream(jetstream::Context),
}

impl Destination for NatsSink {
    type Settings = Arc<NatsSettings>;
    type BuildError = NatsBuildError;

    async fn build(
        settings: &Arc<NatsSettings>,
        limits: SinkLimits,
    ) -> Result<NatsSink, NatsBuildError> {
        let addrs: Vec<ServerAddr> = settings
            .urls
            .iter()
            .filter_map(|u| u.parse().ok())
            .collect();
        let client = connect_options(settings)
            .await?
            .require_tls(settings.tls_required)
            .name("chatwoot-bridge")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(addrs)
            .await
            .map_err(NatsBuildError::Connect)?;
        let publisher = match &settings.jetstream {
            None => Publisher::Core(
                Receipts::start(&client)
                    .await
                    .map_err(NatsBuildError::Receipts)?,
            ),
            Some(_) => Publisher::JetStream(
                jetstream::ContextBuilder::new()
                    .timeout(settings.timeout)
                    .ack_timeout(settings.timeout)
                    // With this many acks outstanding async-nats refuses a publish (MaxAckPending,
                    // retried). The caller keeps up to `max_unconfirmed_events` unconfirmed and, after
                    // one look at hand-over, polls a batch's acks only when it gets to them: the limit
                    // must be above that, or publishes fail (and with backpressure on, would wait for
                    // acks nobody polls).
                    .max_ack_inflight(limits.max_unconfirmed_events + 1)
                    .build(client.clone()),
            ),
        };
        Ok(NatsSink {
            client,
            publisher,
            stream_ready: Arc::new(AtomicBool::new(false)),
            settings: settings.clone(),
        })
    }

    /// Publishes a batch; the confirmations are its receipt (core) or its acks (JetStream).
    async fn send(&mut self, batch: &[Arc<Event>]) -> Confirmations {
        if !self.connected().await {
            let outcome = failure(
                NatsFailure::NotConnected,
                &format!(
                    "not connected to a server within {:?}",
                    self.settings.timeout
                ),
            );
            return settled_all(batch, &outcome);
        }
        match &mut self.publisher {
            Publisher::Core(receipts) => {
                let receipt = receipts.next();
                self.send_core(receipt, batch).await
            }
            Publisher::JetStream(js) => {
                let js = js.clone();
                self.send_jetstream(&js, batch).await
            }
        }
    }

    /// One connection; the server stores publishes in the order they arrive.
    fn preserves_key_order(&self) -> bool {
        true
    }

    /// Waits for the server's answer: a receipt (core), or the stream's lookup (JetStream),
    /// which must find it unless the sink creates it.
    async fn probe(&self, within: Duration) -> Result<(), String> {
        let no_answer = || {
            format!(
                "no answer from {} within {within:?}",
                self.settings.urls.join(", ")
            )
        };
        let js = match &self.publisher {
            Publisher::Core(_) => {
                // A receipt of its own: the sink's are taken one batch at a time.
                let mut receipts = Receipts::start(&self.client)
                    .await
                    .map_err(|e| format!("nats: {e}"))?;
                let receipt = receipts.next();
                let answered = async {
                    receipt.send(&self.client).await?;
                    receipt.returned().await;
                    Ok::<(), async_nats::PublishError>(())
                };
                return tokio::time::timeout(within, answered)
                    .await
                    .map_err(|_| {
                        format!(
                            "{} (the sink needs publish and subscribe permission on _INBOX.>)",
                            no_answer()
                        )
                    })?
                    .map_err(|e| format!("nats: {e}"));
            }
            Publisher::JetStream(js) => js,
        };
        tokio::time::timeout(within, self.client.flush())
            .await
            .map_err(|_| no_answer())?
            .map_err(|e| format!("nats: {e}"))?;
        let Some(stream) = &self.settings.jetstream else {
            return Ok(());
        };
        use jetstream::context::GetStreamErrorKind;
        let looked_up = tokio::time::timeout(within, js.get_stream(&stream.stream))
            .await
            .map_err(|_| format!("no answer about stream {}", stream.stream))?;
        match looked_up {
            Ok(_) => Ok(()),
            // JetStream answered; a missing stream is fine when the sink creates it.
            Err(e)
                if stream.create
                    && matches!(e.kind(), GetStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(())
            }
            Err(e) => Err(format!(
                "stream {}: {e} (is JetStream enabled{}?)",
                stream.stream,
                if stream.create {
                    ""
                } else {
                    ", and the stream created"
                }
            )),
        }
    }

    async fn close(&mut self) {
        // Every batch already ended in a receipt or its acks; only a live connection can hold
        // anything more, and waiting on a dead one would only slow shutdown down.
        if self.client.connection_state() == async_nats::connection::State::Connected {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.client.flush()).await;
        }
    }
}

impl NatsSink {
    /// Whether the client is connected, waiting up to the sink's timeout. A client that is not
    /// keeps what it is given in its buffer and sends it once it reconnects: after the retries of
    /// the same events (extra copies of each, one per retry), and even after this sink was closed
    /// (the client's connection task keeps reconnecting until it succeeds, whoever holds the
    /// client). A connection lost but not noticed yet (no read error, pings not yet missed)
    /// still counts as connected: what is published then can still go out again after the
    /// reconnect. The delivery loop hands nothing more over after a batch answered
    /// `NotConnected`, so later batches do not overtake its retry.
    async fn connected(&self) -> bool {
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        loop {
            if self.client.connection_state() == async_nats::connection::State::Connected {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // The client tells of its state only through this getter; a reconnect takes longer.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Core NATS: publish all, then the receipt's marker; the batch counts once the marker is
    /// back, which proves the server read every message before it (not that anyone subscribed).
    async fn send_core(&self, receipt: Receipt, batch: &[Arc<Event>]) -> Confirmations {
        let timeout = self.settings.timeout;
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
        for event in batch {
            let outcome = match self.message(event) {
                Err(outcome) => Some(outcome),
                Ok((subject, headers, body)) => {
                    // Bounded: with the server gone the client's buffer fills and a publish
                    // would wait for the reconnect.
                    let publish = self.client.publish_with_headers(subject, headers, body);
                    match tokio::time::timeout(timeout, publish).await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(failure(NatsFailure::Publish(e.kind()), &e)),
                        Err(_) => Some(timed_out(NatsFailure::PublishTimedOut, timeout)),
                    }
                }
            };
            outcomes.push(outcome);
        }
        if outcomes.iter().all(Option::is_some) {
            return settled(outcomes.into_iter().flatten().collect());
        }
        let sent = match tokio::time::timeout(timeout, receipt.send(&self.client)).await {
            Ok(Ok(())) => Ok(receipt),
            Ok(Err(e)) => Err(failure(NatsFailure::ReceiptNotSent, &e)),
            Err(_) => Err(timed_out(NatsFailure::ReceiptNotSent, timeout)),
        };
        Box::pin(async move {
            let confirmed = match sent {
                Err(outcome) => outcome,
                Ok(receipt) => match tokio::time::timeout(timeout, receipt.returned()).await {
                    Ok(()) => Outcome::Delivered,
                    Err(_) => timed_out(NatsFailure::NotConfirmed, timeout),
                },
            };
            outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| confirmed.same()))
                .collect()
        })
    }

    /// JetStream: publish the whole batch; the confirmations are its acks. `Nats-Msg-Id` is the
    /// event id and the subject ([`message_id`]), so a retry after a lost ack (or a second copy
    /// of a broadcast to the same subject) is stored once.
    async fn send_jetstream(&self, js: &jetstream::Context, batch: &[Arc<Event>]) -> Confirmations {
        let settings = self.settings.clone();
        let stream = settings.jetstream.as_ref().expect("jetstream mode");
        if stream.create && !self.stream_ready.load(Ordering::Relaxed) {
            if let Err((kind, message)) = ensure_stream(js, stream).await {
                let outcome = failure(NatsFailure::Stream(kind), &message);
                return settled_all(batch, &outcome);
            }
            self.stream_ready.store(true, Ordering::Relaxed);
        }
        let mut outcomes: Vec<Option<Outcome>> = batch.iter().map(|_| None).collect();
        let mut acks = Vec::with_capacity(batch.len());
        for (i, event) in batch.iter().enumerate() {
            let (subject, headers, body) = match self.message(event) {
                Ok(parts) => parts,
                Err(outcome) => {
                    outcomes[i] = Some(outcome);
                    continue;
                }
            };
            let message = PublishMessage::build()
                .payload(body)
                .headers(headers)
                .message_id(message_id(event, &subject));
            match tokio::time::timeout(settings.timeout, js.send_publish(subject, message)).await {
                Ok(Ok(ack)) => acks.push((i, ack)),
                Ok(Err(e)) => {
                    outcomes[i] = Some(failure(NatsFailure::JetStreamPublish(e.kind()), &e))
                }
                Err(_) => {
                    outcomes[i] = Some(timed_out(NatsFailure::PublishTimedOut, settings.timeout))
                }
            }
        }
        let stream_ready = self.stream_ready.clone();
        Box::pin(async move {
            let indices: Vec<usize> = acks.iter().map(|(i, _)| *i).collect();
            let results = join_all(acks.into_iter().map(|(_, ack)| ack.into_future())).await;
            for (i, result) in indices.into_iter().zip(results) {
                outcomes[i] = Some(match result {
                    // A duplicate ack means the stream already holds this id: delivered.
                    Ok(_ack) => Outcome::Delivered,
                    Err(e) => {
                        if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                            // Deleted under us: create it again before the retry.
                            stream_ready.store(false, Ordering::Relaxed);
                        }
                        failure(NatsFailure::JetStreamPublish(e.kind()), &e)
                    }
                });
            }
            outcomes
                .into_iter()
                .map(|o| o.expect("every event got an outcome"))
                .collect()
        })
    }

    /// Subject, headers and payload of one event, or its permanent failure.
    fn message(&self, event: &Event) -> Result<(String, HeaderMap, bytes::Bytes), Outcome> {
        let subject = self
            .settings
            .subject
            .render_with(event, &template::nats_event, &template::nats_token)
            .map_err(|e| Outcome::Permanent(SinkError::new(e.to_string())))?;
        Ok((
            subject,
            headers(event, self.settings.envelope),
            payload(event, self.settings.envelope),
        ))
    }
}

/// The `Nats-Msg-Id` of an event published to `subject`: `<event id>:<subject>`. A stream
/// deduplicates by it alone, whatever the subject, so the event id by itself would make a stream
/// drop the second of two sinks' copies (subjects `a.{event}` and `b.{event}` into one stream),
/// or the copy of a broadcast that another token's subject (`{token}`) should also hold.
fn message_id(event: &Event, subject: &str) -> String {
    format!("{}:{subject}", event.id)
}

/// The client's options for the configured authentication and TLS files; reading a `.creds`
/// file is the only step that can fail here.
async fn connect_options(settings: &NatsSettings) -> Result<ConnectOptions, NatsBuildError> {
    let mut options = match &settings.auth {
        NatsAuth::None => ConnectOptions::new(),
        NatsAuth::CredentialsFile(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| NatsBuildError::Credentials {
                path: path.clone(),
                source,
            })?,
        NatsAuth::Token(token) => ConnectOptions::with_token(token.expose().to_owned()),
        NatsAuth::UserPassword { user, password } => {
            ConnectOptions::with_user_and_password(user.clone(), password.expose().to_owned())
        }
        NatsAuth::Nkey(seed) => ConnectOptions::with_nkey(seed.expose().to_owned()),
    };
    if let Some(tls) = &settings.tls {
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    Ok(options)
}

/// Creates the stream when it is missing, with this sink's subject filter and duplicate window;
/// an existing one is adopted ([`adopt_stream`]).
async fn ensure_stream(
    js: &jetstream::Context,
    settings: &JetStreamSettings,
) -> Result<(), (jetstream::context::CreateStreamErrorKind, String)> {
    match js.get_stream(&settings.stream).await {
        Ok(stream) => adopt_stream(js, settings, stream.cached_info().config.clone()).await,
        Err(get_error) => {
            let config = jetstream::stream::Config {
                name: settings.stream.clone(),
                subjects: vec![settings.filter.clone()],
                duplicate_window: settings
                    .duplicate_window
                    .unwrap_or(DEFAULT_DUPLICATE_WINDOW),
                ..Default::default()
            };
            match js.create_stream(config).await {
                Ok(_) => Ok(()),
                Err(e) => Err((
                    e.kind(),
                    format!(
                        "creating stream {} (lookup: {get_error}): {e}",
                        settings.stream
                    ),
                )),
            }
        }
    }
}

/// An existing stream keeps every setting someone gave it (duplicate window, limits, storage,
/// its other subjects): the sink only adds its subject filter when none of the stream's subjects
/// captures it yet, since without it nothing the sink publishes would be stored. A duplicate
/// window in the config that differs from the stream's is reported, not applied.
async fn adopt_stream(
    js: &jetstream::Context,
    settings: &JetStreamSettings,
    mut config: jetstream::stream::Config,
) -> Result<(), (jetstream::context::CreateStreamErrorKind, String)> {
    if let Some(asked) = settings.duplicate_window {
        if asked != config.duplicate_window {
            tracing::warn!(
                stream = %settings.stream,
                configured = ?asked,
                stream_has = ?config.duplicate_window,
                "the stream exists with another duplicate window; it is left as it is, and \
                 repeats are dropped within the stream's window"
            );
        }
    }
    if config
        .subjects
        .iter()
        .any(|subject| subject_captures(subject, &settings.filter))
    {
        return Ok(());
    }
    config.subjects.push(settings.filter.clone());
    js.update_stream(config).await.map_err(|e| {
        (
            e.kind(),
            format!(
                "adding subjects {} to stream {}: {e}",
                settings.filter, settings.stream
            ),
        )
    })?;
    Ok(())
}

/// Whether every subject matching `filter` also matches the stream subject `subject`: token by
/// token, `>` takes one or more remaining tokens, `*` any one token but not the filter's `>`,
/// and a literal only itself.
fn subject_captures(subject: &str, filter: &str) -> bool {
    let mut filter_tokens = filter.split('.');
    for token in subject.split('.') {
        let Some(wanted) = filter_tokens.next() else {
            return false;
        };
        match token {
            ">" => return true,
            "*" if wanted != ">" => {}
            literal if literal == wanted => {}
            _ => return false,
        }
    }
    filter_tokens.next().is_none()
}

fn timed_out(kind: NatsFailure, timeout: Duration) -> Outcome {
    let message = match kind {
        NatsFailure::NotConfirmed => format!(
            "batch not confirmed by the server within {timeout:?}: its receipt did not come back \
             (a stalled server, or a user without publish and subscribe on _INBOX.>)"
        ),
        NatsFailure::ReceiptNotSent => format!("receipt marker not accepted within {timeout:?}"),
        _ => format!("publish not accepted within {timeout:?}"),
    };
    failure(kind, &message)
}

fn failure(kind: NatsFailure, error: &dyn std::fmt::Display) -> Outcome {
    SinkError::new(format!("nats: {error}")).outcome(classify(&kind))
}

/// The message headers of the CloudEvents NATS binding.
pub fn headers(event: &Event, envelope: Envelope) -> HeaderMap {
    let mut headers = HeaderMap::new();
    match envelope {
        Envelope::Binary => {
            each_binary_attribute(event, |attribute, value| {
                headers.insert(
                    HeaderName::from_static(attribute.dashed()),
                    percent_encode_header(value).into_owned(),
                );
            });
            headers.insert(
                HeaderName::from_static("ce-datacontenttype"),
                DATA_CONTENT_TYPE,
            );
        }
        Envelope::Structured => headers.insert("content-type", STRUCTURED_CONTENT_TYPE),
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::client::PublishErrorKind;
    use jetstream::context::{CreateStreamErrorKind, PublishErrorKind as JsKind};

    #[test]
    fn classification() {
        let permanent = [
            NatsFailure::Publish(PublishErrorKind::MaxPayloadExceeded),
            NatsFailure::Publish(PublishErrorKind::InvalidSubject),
            NatsFailure::JetStreamPublish(JsKind::MaxPayloadExceeded),
            NatsFailure::Stream(CreateStreamErrorKind::InvalidStreamName),
        ];
        for f in permanent {
            assert_eq!(classify(&f), ErrorClass::Permanent, "{f:?}");
        }
        let retryable = [
            NatsFailure::Publish(PublishErrorKind::Send),
            NatsFailure::NotConnected,
            NatsFailure::ReceiptNotSent,
            NatsFailure::NotConfirmed,
            NatsFailure::PublishTimedOut,
            NatsFailure::JetStreamPublish(JsKind::TimedOut),
            NatsFailure::JetStreamPublish(JsKind::StreamNotFound),
            NatsFailure::JetStreamPublish(JsKind::BrokenPipe),
            NatsFailure::Stream(CreateStreamErrorKind::TimedOut),
            NatsFailure::Stream(CreateStreamErrorKind::JetStreamUnavailable),
        ];
        for f in retryable {
            assert_eq!(classify(&f), ErrorClass::Retryable, "{f:?}");
        }
    }

    #[test]
    fn a_stream_subject_captures_the_filters_it_matches() {
        for (subject, filter) in [
            ("chatwoot.>", "chatwoot.*.>"),
            ("chatwoot.>", "chatwoot.>"),
            ("chatwoot.*.>", "chatwoot.*.>"),
            ("*.*", "a.b"),
            ("a.*", "a.*"),
            ("a.b", "a.b"),
            (">", "a"),
        ] {
            assert!(subject_captures(subject, filter), "{subject} {filter}");
        }
        for (subject, filter) in [
            ("chatwoot.*.>", "chatwoot.>"),
            ("chatwoot.*", "chatwoot.*.>"),
            ("chatwoot.*", "chatwoot.>"),
            ("a.b", "a.*"),
            ("a.b", "a.b.c"),
            ("a.b.c", "a.b"),
            ("chatwoot.>", "chatwoot"),
            ("other.>", "chatwoot.>"),
        ] {
            assert!(!subject_captures(subject, filter), "{subject} {filter}");
        }
    }

    #[test]
    fn binary_headers_are_percent_encoded() {
        let e = Event::for_test(
            "message.created",
            "agent",
            r#"{"account_id":3,"conversation_id":7}"#,
        );
        let h = headers(&e, Envelope::Binary);
        let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned());
        assert_eq!(get("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(get("ce-subject").as_deref(), Some("conversation/7"));
        assert_eq!(
            get("ce-datacontenttype").as_deref(),
            Some("application/json")
        );
        assert_eq!(get("ce-chatwootevent").as_deref(), Some("message.created"));
        // The test source has no spaces; a token name with one would be encoded.
        let e = Event::for_test("message.created", "agent one", r#"{"account_id":3}"#);
        let h = headers(&e, Envelope::Binary);
        assert_eq!(h.get("ce-chatwoottoken").unwrap().as_str(), "agent%20one");
    }
}
