//! One token's socket: connect, subscribe, read events, notice silence, reconnect. Forever.
//!
//! A [`TokenTask`] owns one WebSocket at a time and reports every state change to the
//! [`StatusBoard`](crate::status::StatusBoard). It never gives up; only cancellation stops it.
//! Every event it reads is handed to the pipeline before the next frame is read, so the socket's
//! TCP window is the backpressure.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::{full_jitter, Backoff};
use crate::event::{Event, JsonText};
use crate::source::protocol::{self, ServerFrame};
use crate::source::settings::{CableSettings, ReconnectSettings, TokenSpec};
use crate::status::{TokenReporter, TokenState};

/// Read buffer per socket. Chatwoot frames are a few KB; thousands of idle sockets must stay
/// cheap, and tungstenite's 128 KiB default would cost over a gigabyte at 10,000 tokens.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Handshakes in progress at once, over all tokens. A handshake's buffers (request,
/// response, TLS) are several KB; 10,000 tokens starting together held them all at once and
/// the process kept that peak (about 90 MB of RSS) for good. Slots are released as soon as the
/// WebSocket is open; a loopback handshake takes about a millisecond, a TLS one tens.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 64;

/// After a `disconnect` with `reconnect: true`, reconnect within this (jittered) delay.
const PROMPT_RECONNECT_CEILING: Duration = Duration::from_secs(1);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The supervised loop of one token.
pub struct TokenTask {
    /// What to connect to and as whom.
    pub spec: Arc<TokenSpec>,
    /// Timeouts and limits shared by all tokens.
    pub settings: Arc<CableSettings>,
    /// Where decoded events go; the pipeline assigns ids and routes them.
    pub events: mpsc::Sender<Event>,
    /// This token's cell on the status board.
    pub status: TokenReporter,
    /// Stops the task: on shutdown, or when the token is removed or changed by a reload.
    pub cancel: CancellationToken,
    /// Handshake slots shared by all tokens of one supervisor.
    pub handshakes: Arc<tokio::sync::Semaphore>,
}

/// How a connection ended, which decides the delay before the next one.
#[derive(Debug)]
enum SessionEnd {
    Cancelled,
    /// Transport failure, close, stale socket: reconnect with backoff.
    Lost(String),
    /// The server asked us to come back now.
    DisconnectReconnect(String),
    /// The server asked us not to come back soon.
    DisconnectNoReconnect(String),
}

/// Where the subscription is on the current socket.
#[derive(Debug, Clone, Copy)]
enum Subscription {
    /// No welcome yet; nothing sent.
    AwaitingWelcome,
    /// `subscribe` sent; unconfirmed after the deadline.
    Pending {
        deadline: Instant,
    },
    Confirmed {
        since: Instant,
    },
    /// Unconfirmed or rejected; subscribe again at this instant.
    RetryAt(Instant),
}

impl TokenTask {
    /// Runs until cancelled.
    pub async fn run(self) {
        let identifier = protocol::identifier(&self.spec.pubsub_token, &self.spec.identity);
        let source: Arc<str> = Arc::from(self.spec.source());
        let mut backoff =
            Backoff::new(self.settings.reconnect.initial, self.settings.reconnect.max);
        loop {
            self.status.set(TokenState::Connecting);
            let mut healthy_for = Duration::ZERO;
            let end = self
                .session(&identifier, &source, &mut backoff, &mut healthy_for)
                .await;
            let Some(delay) =
                delay_after(&end, healthy_for, &self.settings.reconnect, &mut backoff)
            else {
                break;
            };
            let reason = match end {
                SessionEnd::Cancelled => break,
                SessionEnd::Lost(reason) => {
                    warn!(token = %self.spec.name, %reason, "connection lost; reconnecting with backoff");
                    reason
                }
                SessionEnd::DisconnectReconnect(reason) => {
                    info!(token = %self.spec.name, %reason, "server sent disconnect (reconnect: true); reconnecting now");
                    reason
                }
                SessionEnd::DisconnectNoReconnect(reason) => {
                    error!(token = %self.spec.name, %reason, delay = ?delay,
                        "server sent disconnect (reconnect: false); waiting long before trying again");
                    reason
                }
            };
            self.status.fail(TokenState::BackingOff, reason);
            debug!(token = %self.spec.name, delay = ?delay, "backing off");
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = sleep(delay) => {}
            }
        }
        self.status.set(TokenState::Stopped);
    }

    /// One connection, from connect to its end. `healthy_for` tells how long it was subscribed.
    async fn session(
        &self,
        identifier: &str,
        source: &Arc<str>,
        backoff: &mut Backoff,
        healthy_for: &mut Duration,
    ) -> SessionEnd {
        let name = &self.spec.name;
        // Waiting for a handshake slot does not count against connect_timeout.
        let handshake = tokio::select! {
            _ = self.cancel.cancelled() => return SessionEnd::Cancelled,
            permit = self.handshakes.acquire() => permit.expect("the handshake semaphore is never closed"),
        };
        let mut ws = tokio::select! {
            _ = self.cancel.cancelled() => return SessionEnd::Cancelled,
            connected = timeout(self.settings.connect_timeout, Box::pin(connect(&self.spec, &self.settings))) => match connected {
                Err(_) => return SessionEnd::Lost(format!(
                    "connect to {} timed out after {:?}", self.spec.url, self.settings.connect_timeout)),
                Ok(Err(e)) => return SessionEnd::Lost(format!(
                    "connect to {} failed: {}", self.spec.url, describe(&e))),
                Ok(Ok(ws)) => ws,
            },
        };
        drop(handshake);
        self.status.connected();
        debug!(token = %name, url = %self.spec.url, "connected");

        let stale_after = self.settings.stale_after;
        let stale = sleep(stale_after);
        tokio::pin!(stale);
        let mut subscription = Subscription::AwaitingWelcome;
        let mut next_presence = Instant::now();

        let end = loop {
            let timer = match subscription {
                Subscription::Pending { deadline } => Some(deadline),
                Subscription::RetryAt(at) => Some(at),
                Subscription::Confirmed { .. } if self.spec.presence => Some(next_presence),
                _ => None,
            };
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    let _ = ws.close(None).await;
                    break SessionEnd::Cancelled;
                }
                frame = ws.next() => {
                    let text = match frame {
                        None => break SessionEnd::Lost("server closed the connection".into()),
                        Some(Err(e)) => break SessionEnd::Lost(describe(&e)),
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(close))) => break SessionEnd::Lost(match close {
                            Some(c) => format!("server closed the connection (code {})", u16::from(c.code)),
                            None => "server closed the connection".into(),
                        }),
                        Some(Ok(Message::Binary(_))) => {
                            self.status.malformed_frame();
                            warn!(token = %name, "skipped a binary frame: ActionCable frames are text");
                            stale.as_mut().reset(Instant::now() + stale_after);
                            continue;
                        }
                        Some(Ok(_)) => {
                            // WebSocket ping/pong: proof of life; tungstenite answers pings itself.
                            stale.as_mut().reset(Instant::now() + stale_after);
                            continue;
                        }
                    };
                    let received_at = SystemTime::now();
                    stale.as_mut().reset(Instant::now() + stale_after);
                    match protocol::decode(text.as_str()) {
                        Err(e) => {
                            self.status.malformed_frame();
                            warn!(token = %name, error = %e, bytes = text.len(), "skipped a malformed frame");
                        }
                        Ok(ServerFrame::Welcome) => {
                            if let Subscription::AwaitingWelcome = subscription {
                                if let Err(e) = ws.send(Message::text(protocol::subscribe(identifier))).await {
                                    break SessionEnd::Lost(describe(&e));
                                }
                                self.status.set(TokenState::Pending);
                                subscription = Subscription::Pending { deadline: Instant::now() + self.settings.confirm_timeout };
                            }
                        }
                        Ok(ServerFrame::Ping) | Ok(ServerFrame::Other { .. }) => {}
                        Ok(ServerFrame::Confirm { identifier: confirmed }) if confirmed == identifier => {
                            // Only a pending subscribe can be confirmed. A confirm that arrives
                            // after we gave up and sent `unsubscribe` is for a subscription the
                            // server has dropped since: believing it would show `subscribed`
                            // while no event can come.
                            if let Subscription::Pending { .. } = subscription {
                                info!(token = %name, "subscribed");
                                self.status.set(TokenState::Subscribed);
                                subscription = Subscription::Confirmed { since: Instant::now() };
                                next_presence = Instant::now();
                            } else {
                                debug!(token = %name, "ignored a confirm that came after the subscription was given up");
                            }
                        }
                        Ok(ServerFrame::Reject { identifier: rejected }) if rejected == identifier => {
                            let delay = backoff.next_delay();
                            error!(token = %name, retry_in = ?delay,
                                "subscription rejected: check the token's pubsub_token, account_id and user_id");
                            self.status.fail(TokenState::Rejected, "server rejected the subscription");
                            subscription = Subscription::RetryAt(Instant::now() + delay);
                        }
                        Ok(ServerFrame::Confirm { .. }) | Ok(ServerFrame::Reject { .. }) => {
                            debug!(token = %name, "ignored a confirm/reject for another identifier");
                        }
                        Ok(ServerFrame::Disconnect { reason, reconnect }) => {
                            let reason = format!("server sent disconnect: {}", reason.as_deref().unwrap_or("no reason"));
                            break if reconnect {
                                SessionEnd::DisconnectReconnect(reason)
                            } else {
                                SessionEnd::DisconnectNoReconnect(reason)
                            };
                        }
                        Ok(ServerFrame::Message { identifier: of, event, data }) => {
                            if of != identifier {
                                debug!(token = %name, "ignored a message for another identifier");
                                continue;
                            }
                            // Data may arrive before the confirm (the server attaches the stream
                            // first); it is accepted in every subscription state.
                            // A slice of the frame's buffer, not a copy.
                            let data = JsonText::in_frame(&Bytes::from(text.clone()), data.0);
                            let event = Event::new(&event, data, self.spec.name.clone(), source.clone(), received_at);
                            self.status.event();
                            if self.events.send(event).await.is_err() {
                                // The pipeline is gone: only happens when the process is ending.
                                error!(token = %name, "pipeline closed; an event read from the socket could not be handed over");
                                break SessionEnd::Cancelled;
                            }
                        }
                    }
                }
                _ = &mut stale => {
                    self.status.stale();
                    break SessionEnd::Lost(format!("no frame for {stale_after:?} (the server pings every 3 s): socket is stale"));
                }
                _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                    match subscription {
                        Subscription::Pending { .. } => {
                            let delay = backoff.next_delay();
                            error!(token = %name, timeout = ?self.settings.confirm_timeout, retry_in = ?delay,
                                "subscription not confirmed: Chatwoot ignores a wrong or rotated pubsub_token, \
                                 account_id or user_id in silence; check this token");
                            self.status.fail(TokenState::Unconfirmed, format!(
                                "no confirm_subscription within {:?}", self.settings.confirm_timeout));
                            // The failed subscription stays registered on the server, which would
                            // ignore a second subscribe: drop it first.
                            if let Err(e) = ws.send(Message::text(protocol::unsubscribe(identifier))).await {
                                break SessionEnd::Lost(describe(&e));
                            }
                            subscription = Subscription::RetryAt(Instant::now() + delay);
                        }
                        Subscription::RetryAt(_) => {
                            if let Err(e) = ws.send(Message::text(protocol::subscribe(identifier))).await {
                                break SessionEnd::Lost(describe(&e));
                            }
                            self.status.set(TokenState::Pending);
                            subscription = Subscription::Pending { deadline: Instant::now() + self.settings.confirm_timeout };
                        }
                        Subscription::Confirmed { .. } => {
                            if let Err(e) = ws.send(Message::text(protocol::update_presence(identifier))).await {
                                break SessionEnd::Lost(describe(&e));
                            }
                            next_presence = Instant::now() + self.settings.presence_interval;
                        }
                        Subscription::AwaitingWelcome => {}
                    }
                }
            }
        };
        if let Subscription::Confirmed { since } = subscription {
            *healthy_for = since.elapsed();
        }
        end
    }
}

/// The pause before the next connection, by how the last one ended; `None` when cancelled.
/// The backoff starts over only after a connection stayed subscribed for `reset_after`, so a
/// server that accepts and then drops everyone does not get every token back at once.
fn delay_after(
    end: &SessionEnd,
    healthy_for: Duration,
    settings: &ReconnectSettings,
    backoff: &mut Backoff,
) -> Option<Duration> {
    if healthy_for >= settings.reset_after {
        backoff.reset();
    }
    match end {
        SessionEnd::Cancelled => None,
        SessionEnd::Lost(_) => Some(backoff.next_delay()),
        SessionEnd::DisconnectReconnect(_) => Some(full_jitter(PROMPT_RECONNECT_CEILING)),
        // Half fixed, half jittered: long, but still spread.
        SessionEnd::DisconnectNoReconnect(_) => {
            let delay = settings.after_disconnect_without_reconnect;
            Some(delay / 2 + full_jitter(delay / 2))
        }
    }
}

/// Opens the WebSocket for a token: subprotocol, Origin, extra headers, small buffers.
async fn connect(spec: &TokenSpec, settings: &CableSettings) -> Result<Socket, tungstenite::Error> {
    let mut request = spec.url.as_str().into_client_request()?;
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(protocol::SUBPROTOCOL),
    );
    if let Ok(origin) = HeaderValue::from_str(&spec.origin) {
        headers.insert("Origin", origin);
    }
    for (name, value) in &spec.headers {
        // Validated at config load; a bad one here is skipped rather than logged (it may be
        // a credential).
        if let (Ok(name), Ok(mut value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::from_str(value.expose()),
        ) {
            value.set_sensitive(true);
            headers.insert(name, value);
        }
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(settings.max_frame_bytes))
        .max_frame_size(Some(settings.max_frame_bytes));
    let (ws, _response) =
        tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
    Ok(ws)
}

/// Checks a token once, for `check --connect`: handshake, welcome, subscribe, confirm.
/// Returns how it went in words; never the token.
pub async fn probe(spec: &TokenSpec, settings: &CableSettings) -> Result<(), String> {
    let mut ws = match timeout(settings.connect_timeout, connect(spec, settings)).await {
        Err(_) => {
            return Err(format!(
                "connect to {} timed out after {:?}",
                spec.url, settings.connect_timeout
            ))
        }
        Ok(Err(e)) => return Err(format!("connect to {} failed: {}", spec.url, describe(&e))),
        Ok(Ok(ws)) => ws,
    };
    let identifier = protocol::identifier(&spec.pubsub_token, &spec.identity);
    let mut deadline = Instant::now() + settings.connect_timeout;
    let mut subscribed = false;
    let outcome = loop {
        let frame = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) if subscribed => break Err(format!(
                "no confirm_subscription within {:?}: Chatwoot ignores a wrong or rotated pubsub_token, account_id or user_id in silence",
                settings.confirm_timeout
            )),
            Err(_) => break Err("the server sent no welcome".to_string()),
            Ok(None) => break Err("server closed the connection".into()),
            Ok(Some(Err(e))) => break Err(describe(&e)),
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
        };
        match protocol::decode(frame.as_str()) {
            Ok(ServerFrame::Welcome) if !subscribed => {
                if let Err(e) = ws
                    .send(Message::text(protocol::subscribe(&identifier)))
                    .await
                {
                    break Err(describe(&e));
                }
                subscribed = true;
                deadline = Instant::now() + settings.confirm_timeout;
            }
            Ok(ServerFrame::Confirm { identifier: of }) if of == identifier => break Ok(()),
            Ok(ServerFrame::Reject { identifier: of }) if of == identifier => {
                break Err("server rejected the subscription".into())
            }
            Ok(ServerFrame::Disconnect { reason, .. }) => {
                break Err(format!(
                    "server sent disconnect: {}",
                    reason.as_deref().unwrap_or("no reason")
                ))
            }
            _ => {}
        }
    };
    if subscribed {
        let _ = ws
            .send(Message::text(protocol::unsubscribe(&identifier)))
            .await;
    }
    let _ = ws.close(None).await;
    outcome
}

/// A transport error in words an operator can act on. Never includes frame content.
fn describe(error: &tungstenite::Error) -> String {
    use tungstenite::error::CapacityError;
    use tungstenite::Error as E;
    match error {
        E::Capacity(CapacityError::MessageTooLong { size, max_size }) => format!(
            "server sent a frame of {size} bytes, over chatwoot.max_frame_bytes ({max_size})"
        ),
        E::Http(response) => format!("handshake refused with HTTP {}", response.status()),
        E::Io(e) => format!("I/O error: {e}"),
        E::Tls(e) => format!("TLS error: {e}"),
        E::ConnectionClosed | E::AlreadyClosed => "connection closed".into(),
        E::Protocol(e) => format!("WebSocket protocol error: {e}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ReconnectSettings {
        ReconnectSettings::default()
    }

    fn lost() -> SessionEnd {
        SessionEnd::Lost("dropped".into())
    }

    #[test]
    fn backoff_grows_until_a_connection_stays_healthy_for_reset_after() {
        let s = settings();
        let mut backoff = Backoff::new(s.initial, s.max);
        for _ in 0..6 {
            let delay = delay_after(&lost(), Duration::ZERO, &s, &mut backoff).unwrap();
            assert!(delay <= s.max);
        }
        // Subscribed, but not long enough: the next ceiling stays at the cap.
        delay_after(
            &lost(),
            s.reset_after - Duration::from_secs(1),
            &s,
            &mut backoff,
        );
        assert_eq!(backoff.next_ceiling(), s.max);
        // Healthy for reset_after: it starts over (this call used the first ceiling).
        let delay = delay_after(&lost(), s.reset_after, &s, &mut backoff).unwrap();
        assert!(delay <= s.initial, "{delay:?}");
        assert_eq!(backoff.next_ceiling(), s.initial * 2);
    }

    #[test]
    fn disconnect_frames_decide_the_delay() {
        let s = settings();
        let mut backoff = Backoff::new(s.initial, s.max);
        for _ in 0..100 {
            let now = delay_after(
                &SessionEnd::DisconnectReconnect(String::new()),
                Duration::ZERO,
                &s,
                &mut backoff,
            )
            .unwrap();
            assert!(now <= PROMPT_RECONNECT_CEILING);
            let long = delay_after(
                &SessionEnd::DisconnectNoReconnect(String::new()),
                Duration::ZERO,
                &s,
                &mut backoff,
            )
            .unwrap();
            assert!(
                long >= s.after_disconnect_without_reconnect / 2
                    && long <= s.after_disconnect_without_reconnect
            );
        }
        assert_eq!(
            delay_after(&SessionEnd::Cancelled, Duration::ZERO, &s, &mut backoff),
            None
        );
        // Disconnect frames do not consume the backoff.
        assert_eq!(backoff.next_ceiling(), s.initial);
    }
}
