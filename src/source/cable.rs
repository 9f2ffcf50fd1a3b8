//! One token's socket: connect, subscribe, read events, notice silence, reconnect. Forever.
//!
//! A `TokenTask` owns one WebSocket at a time and reports every state change to the
//! [`StatusBoard`](crate::status::StatusBoard). It never gives up; only cancellation stops it.
//! Every event it reads is handed to the pipeline before the next frame is read, so the socket's
//! TCP window is the backpressure.
//!
//! One connection is a `Session`: the socket, where its subscription is, and its timers. It
//! ends with a `SessionEnd` that says why, and the reason decides the pause before the next.

use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, sleep_until, timeout, Instant, Sleep};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::{full_jitter, Backoff};
use crate::event::{nesting_exceeds, Event, JsonText};
use crate::source::gaps::{Gaps, GapsContext};
use crate::source::profile::Subscriber;
use crate::source::protocol::{self, ServerFrame};
use crate::source::sender::EventSender;
use crate::source::settings::{CableSettings, ReconnectSettings, TokenSpec};
use crate::source::subscriber::Subscribers;
use crate::status::{ReconnectReason, TokenReporter, TokenState};
use crate::tls;

/// Bounds the read buffer per socket. Chatwoot frames are a few KB; thousands of idle sockets
/// must stay cheap, and tungstenite's 128 KiB default would cost over a gigabyte at 10,000 tokens.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Bounds the handshakes in progress at once, over all tokens. A handshake's buffers (request,
/// response, TLS) are several KB, and a process keeps the peak of many at once for good; slots
/// are released as soon as the WebSocket is open. A loopback handshake takes about a
/// millisecond, a TLS one tens.
pub(crate) const MAX_CONCURRENT_HANDSHAKES: usize = 64;

/// Bounds the delay of a reconnect after a `disconnect` with `reconnect: true` (jittered).
const PROMPT_RECONNECT_CEILING: Duration = Duration::from_secs(1);

/// Bounds the wait for a stopped socket's close: a server that does not read cannot hold up a
/// shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A client WebSocket, plain or TLS.
type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A frame as the socket yields it: `None` once the stream ends.
type Incoming = Option<Result<Message, tungstenite::Error>>;

/// The supervised loop of one token.
pub(crate) struct TokenTask {
    /// What to connect to and as whom.
    pub(crate) spec: Arc<TokenSpec>,
    /// Timeouts and limits shared by all tokens.
    pub(crate) settings: Arc<CableSettings>,
    /// Where decoded events go; the pipeline assigns ids and routes them.
    pub(crate) events: EventSender,
    /// This token's cell on the status board.
    pub(crate) status: TokenReporter,
    /// Stops the task: on shutdown, or when the token is removed or changed by a reload.
    pub(crate) cancel: CancellationToken,
    /// Handshake slots shared by all tokens of one supervisor.
    pub(crate) handshakes: Arc<tokio::sync::Semaphore>,
}

/// Why a connection ended, which decides the delay before the next one.
#[derive(Debug)]
enum SessionEnd {
    /// The task was cancelled, or the pipeline is gone: no next connection.
    Cancelled,
    /// The socket could not be opened: reconnect with backoff.
    ConnectFailed(String),
    /// Transport failure or close: reconnect with backoff.
    Lost(String),
    /// No frame for `stale_after`: reconnect with backoff.
    Stale(String),
    /// The server sent `disconnect` with `reconnect: true`: come back promptly.
    ServerAskedToReconnect(String),
    /// The server sent `disconnect` with `reconnect: false`: wait long before coming back.
    ServerAskedToWait(String),
    /// No `welcome` within `connect_timeout` of the handshake: reconnect with backoff. Pings
    /// alone would otherwise keep a socket that can never subscribe looking alive.
    NoWelcome(String),
}

/// How a connection went: why it ended and how long it had been subscribed by then.
#[derive(Debug)]
struct Ended {
    /// Why it ended.
    end: SessionEnd,
    /// How long the subscription had been confirmed (zero if it never was); a long healthy
    /// connection starts the backoff over.
    healthy_for: Duration,
}

impl From<SessionEnd> for Ended {
    /// A connection that ended before it was ever subscribed.
    fn from(end: SessionEnd) -> Self {
        Ended {
            end,
            healthy_for: Duration::ZERO,
        }
    }
}

impl SessionEnd {
    /// What the reconnect after this end is counted as; `None` when there is none.
    fn reconnect_reason(&self) -> Option<ReconnectReason> {
        match self {
            SessionEnd::Cancelled => None,
            SessionEnd::ConnectFailed(_) => Some(ReconnectReason::ConnectFailed),
            SessionEnd::Lost(_) => Some(ReconnectReason::ConnectionLost),
            SessionEnd::Stale(_) => Some(ReconnectReason::Stale),
            SessionEnd::ServerAskedToReconnect(_) => Some(ReconnectReason::ServerDisconnect),
            SessionEnd::ServerAskedToWait(_) => Some(ReconnectReason::ServerDisconnectNoReconnect),
            SessionEnd::NoWelcome(_) => Some(ReconnectReason::NoWelcome),
        }
    }
}

/// Where the subscription is on the current socket.
#[derive(Debug, Clone, Copy)]
enum Subscription {
    /// No welcome yet; nothing sent.
    AwaitingWelcome {
        /// When waiting for the welcome ends and the connection counts as failed:
        /// `connect_timeout` after the handshake.
        deadline: Instant,
    },
    /// `subscribe` sent, not confirmed yet.
    Pending {
        /// When waiting for the confirm ends and the token counts as unconfirmed.
        deadline: Instant,
    },
    /// Confirmed; events are expected.
    Confirmed {
        /// When, to tell how long the connection was healthy.
        since: Instant,
    },
    /// Unconfirmed or rejected; subscribe again at this instant.
    RetryAt(Instant),
}

impl TokenTask {
    /// Runs until cancelled.
    pub(crate) async fn run(self) {
        let source: Arc<str> = Arc::from(self.spec.source());
        let mut backoff =
            Backoff::new(self.settings.reconnect.initial, self.settings.reconnect.max);
        // A token given as an API access token has no subscriber until its profile is read.
        let Some(mut subscribers) =
            Subscribers::start(&self.spec, &self.settings, &self.status, &self.cancel).await
        else {
            self.status.set(TokenState::Stopped);
            return;
        };
        let mut gaps = Gaps::new(
            &self.spec,
            GapsContext {
                settings: &self.settings,
                events: &self.events,
                status: &self.status,
                cancel: &self.cancel,
                refresh_profile: subscribers.refresh_handle(),
            },
        )
        .await;
        loop {
            self.status.set(TokenState::Connecting);
            let ended = self
                .session(&mut subscribers, &mut gaps, &source, &mut backoff)
                .await;
            gaps.ended();
            let Some(delay) = delay_after(
                &ended.end,
                ended.healthy_for,
                &self.settings.reconnect,
                &mut backoff,
            ) else {
                break;
            };
            if let Some(counted_as) = ended.end.reconnect_reason() {
                self.status.reconnecting(counted_as);
            }
            let Some(reason) = self.announce(ended.end, delay) else {
                break;
            };
            self.status.fail(TokenState::BackingOff, reason);
            debug!(token = %self.spec.name, delay = ?delay, "backing off");
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = sleep(delay) => {}
            }
        }
        gaps.stopped().await;
        self.status.set(TokenState::Stopped);
    }

    /// Logs why the connection ended and returns the reason, or `None` when cancelled.
    fn announce(&self, end: SessionEnd, delay: Duration) -> Option<String> {
        let name = &self.spec.name;
        match end {
            SessionEnd::Cancelled => None,
            SessionEnd::ConnectFailed(reason)
            | SessionEnd::Lost(reason)
            | SessionEnd::Stale(reason)
            | SessionEnd::NoWelcome(reason) => {
                warn!(token = %name, %reason, "connection lost; reconnecting with backoff");
                Some(reason)
            }
            SessionEnd::ServerAskedToReconnect(reason) => {
                info!(token = %name, %reason, "server sent disconnect (reconnect: true); reconnecting now");
                Some(reason)
            }
            SessionEnd::ServerAskedToWait(reason) => {
                error!(token = %name, %reason, delay = ?delay,
                    "server sent disconnect (reconnect: false); waiting long before trying again");
                Some(reason)
            }
        }
    }

    /// One connection, from connect to its end.
    async fn session(
        &self,
        subscribers: &mut Subscribers,
        gaps: &mut Gaps,
        source: &Arc<str>,
        backoff: &mut Backoff,
    ) -> Ended {
        let ws = match self.open().await {
            Ok(ws) => ws,
            Err(end) => return end.into(),
        };
        self.status.connected();
        debug!(token = %self.spec.name, url = %self.spec.url, "connected");
        // Kept here and borrowed: moved into `run`, the socket would take room twice in the
        // task's future (about 1.5 KB more per token).
        let mut session = Session::new(self, subscribers, gaps, source, backoff, ws);
        session.run().await
    }

    /// Takes a handshake slot and opens the socket within the connect timeout.
    async fn open(&self) -> Result<Socket, SessionEnd> {
        // Waiting for a handshake slot does not count against connect_timeout.
        let _handshake = tokio::select! {
            _ = self.cancel.cancelled() => return Err(SessionEnd::Cancelled),
            permit = self.handshakes.acquire() => permit.expect("the handshake semaphore is never closed"),
        };
        let connect_timeout = self.settings.connect_timeout;
        tokio::select! {
            _ = self.cancel.cancelled() => Err(SessionEnd::Cancelled),
            connected = timeout(connect_timeout, Box::pin(connect(&self.spec, &self.settings))) => match connected {
                Err(_) => Err(SessionEnd::ConnectFailed(format!(
                    "connect to {} timed out after {connect_timeout:?}", self.spec.url))),
                Ok(Err(e)) => Err(SessionEnd::ConnectFailed(format!(
                    "connect to {} failed: {}", self.spec.url, describe(&e)))),
                Ok(Ok(ws)) => Ok(ws),
            },
        }
    }
}

/// One open connection: the socket, where its subscription is, and its timers.
struct Session<'a> {
    /// The token this connection belongs to: its spec, settings, status and pipeline.
    task: &'a TokenTask,
    /// The subscription identifier, sent in commands and matched in frames.
    identifier: String,
    /// What the token subscribes with, and the news of a rotated pubsub token.
    subscribers: &'a mut Subscribers,
    /// A subscription with a rotated pubsub token, made beside the confirmed one, which is
    /// dropped once this one is confirmed.
    rotation: Option<Rotation>,
    /// When the subscription was last healthy, what the socket delivered, and the backfill
    /// of a gap once confirmed again (tokens with `backfill`).
    gaps: &'a mut Gaps,
    /// `source` of the events read here.
    source: &'a Arc<str>,
    /// The token's backoff, which also spaces resubscribes after a reject or silence.
    backoff: &'a mut Backoff,
    /// The open socket.
    ws: Socket,
    /// Where the subscription is.
    subscription: Subscription,
    /// When the next `update_presence` is due, once confirmed (for tokens that send it).
    next_presence: Instant,
    /// Fires after `stale_after` without any frame; every frame pushes it back.
    stale: Pin<Box<Sleep>>,
}

impl<'a> Session<'a> {
    /// A session on a socket that just opened: nothing sent, no frame read.
    fn new(
        task: &'a TokenTask,
        subscribers: &'a mut Subscribers,
        gaps: &'a mut Gaps,
        source: &'a Arc<str>,
        backoff: &'a mut Backoff,
        ws: Socket,
    ) -> Self {
        Session {
            task,
            identifier: subscribers.identifier(),
            subscribers,
            rotation: None,
            gaps,
            source,
            backoff,
            ws,
            subscription: Subscription::AwaitingWelcome {
                deadline: Instant::now() + task.settings.connect_timeout,
            },
            next_presence: Instant::now(),
            stale: Box::pin(sleep(task.settings.stale_after)),
        }
    }

    /// Reads frames and fires timers until the connection ends.
    async fn run(&mut self) -> Ended {
        let end = loop {
            if let ControlFlow::Break(end) = self.step().await {
                break end;
            }
        };
        let healthy_for = match self.subscription {
            Subscription::Confirmed { since } => since.elapsed(),
            _ => Duration::ZERO,
        };
        Ended { end, healthy_for }
    }

    /// Waits for the first of cancellation, a frame, silence, or the subscription's timer.
    async fn step(&mut self) -> ControlFlow<SessionEnd> {
        let timer = self.timer();
        tokio::select! {
            biased;
            _ = self.task.cancel.cancelled() => self.close().await,
            frame = self.ws.next() => self.on_frame(frame).await,
            _ = &mut self.stale => {
                ControlFlow::Break(SessionEnd::Stale(format!(
                    "no frame for {:?} (the server pings every 3 s): socket is stale",
                    self.task.settings.stale_after
                )))
            }
            _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                self.on_timer().await
            }
            subscriber = self.subscribers.changed() => self.on_new_subscriber(subscriber).await,
        }
    }

    /// When the subscription (or a rotation's) next needs attention, if ever.
    fn timer(&self) -> Option<Instant> {
        let rotation = self.rotation.as_ref().map(|r| r.deadline);
        let subscription = match self.subscription {
            Subscription::AwaitingWelcome { deadline } | Subscription::Pending { deadline } => {
                Some(deadline)
            }
            Subscription::RetryAt(at) => Some(at),
            Subscription::Confirmed { .. } if self.task.spec.presence => Some(self.next_presence),
            _ => None,
        };
        rotation.into_iter().chain(subscription).min()
    }

    /// A ping or event at `at`: while confirmed, the subscription is healthy then.
    fn healthy(&mut self, at: SystemTime) {
        if let Subscription::Confirmed { .. } = self.subscription {
            self.gaps.healthy(at);
        }
    }

    /// Any frame is proof of life: silence is measured from the latest one.
    fn alive(&mut self) {
        let at = Instant::now() + self.task.settings.stale_after;
        self.stale.as_mut().reset(at);
    }

    /// Handles whatever the socket yielded.
    async fn on_frame(&mut self, frame: Incoming) -> ControlFlow<SessionEnd> {
        if let Some(Ok(_)) = frame {
            self.task.status.frame();
        }
        let text = match frame {
            None => return ControlFlow::Break(SessionEnd::Lost(closed(None))),
            Some(Err(e)) => return ControlFlow::Break(SessionEnd::Lost(describe(&e))),
            Some(Ok(Message::Close(close))) => {
                return ControlFlow::Break(SessionEnd::Lost(closed(close)))
            }
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                self.task.status.malformed_frame();
                warn!(token = %self.task.spec.name, "skipped a binary frame: ActionCable frames are text");
                self.alive();
                return ControlFlow::Continue(());
            }
            Some(Ok(_)) => {
                // WebSocket ping/pong: proof of life; tungstenite answers pings itself.
                self.alive();
                return ControlFlow::Continue(());
            }
        };
        let received_at = SystemTime::now();
        self.alive();
        self.on_text(&text, received_at).await
    }

    /// Handles one ActionCable frame.
    async fn on_text(
        &mut self,
        text: &Utf8Bytes,
        received_at: SystemTime,
    ) -> ControlFlow<SessionEnd> {
        let name = &self.task.spec.name;
        match protocol::decode(text.as_str()) {
            Err(e) => {
                self.task.status.malformed_frame();
                warn!(token = %name, error = %e, bytes = text.len(), "skipped a malformed frame");
            }
            Ok(ServerFrame::Welcome) => return self.on_welcome().await,
            Ok(ServerFrame::Ping) => {
                self.task.status.pinged(received_at);
                self.healthy(received_at);
            }
            Ok(ServerFrame::Other { .. }) => {}
            Ok(ServerFrame::Confirm { identifier }) if identifier == self.identifier => {
                self.on_confirm()
            }
            Ok(ServerFrame::Confirm { identifier }) if self.rotating_to(&identifier) => {
                return self.on_rotation_confirmed().await
            }
            Ok(ServerFrame::Reject { identifier }) if identifier == self.identifier => {
                self.on_reject()
            }
            Ok(ServerFrame::Confirm { .. }) | Ok(ServerFrame::Reject { .. }) => {
                debug!(token = %name, "ignored a confirm/reject for another identifier");
            }
            Ok(ServerFrame::Disconnect { reason, reconnect }) => {
                let reason = format!(
                    "server sent disconnect: {}",
                    reason.as_deref().unwrap_or("no reason")
                );
                return ControlFlow::Break(if reconnect {
                    SessionEnd::ServerAskedToReconnect(reason)
                } else {
                    SessionEnd::ServerAskedToWait(reason)
                });
            }
            Ok(ServerFrame::Message {
                identifier,
                event,
                data,
            }) => {
                if identifier != self.identifier && !self.rotating_to(&identifier) {
                    debug!(token = %name, "ignored a message for another identifier");
                    return ControlFlow::Continue(());
                }
                let max_nesting = self.task.settings.max_nesting;
                if nesting_exceeds(data.0.get(), max_nesting) {
                    // Never spooled: walking it (redaction, paths) could exhaust a stack.
                    self.task.status.malformed_frame();
                    warn!(token = %name, bytes = text.len(), max_nesting,
                        "skipped an event whose data nests deeper than chatwoot.max_nesting");
                    return ControlFlow::Continue(());
                }
                // Data may arrive before the confirm (the server attaches the stream first); it
                // is accepted in every subscription state. A slice of the frame's buffer, not a
                // copy.
                let data = JsonText::in_frame(&Bytes::from(text.clone()), data.0);
                let event = Event::new(
                    &event,
                    data,
                    self.task.spec.name.clone(),
                    self.source.clone(),
                    received_at,
                );
                self.gaps.delivered(&event, &self.task.status);
                self.healthy(received_at);
                return self.hand_over(event).await;
            }
        }
        ControlFlow::Continue(())
    }

    /// Passes an event to the pipeline, waiting while it is full, even once the task is
    /// stopped: a disk that answers again before the shutdown deadline loses nothing. The wait
    /// ends at that deadline at the latest, when the ingest closes the pipeline; an event not
    /// handed over then is lost, and counted.
    async fn hand_over(&mut self, event: Event) -> ControlFlow<SessionEnd> {
        self.task.status.event(event.received_at);
        if self.task.events.send(event).await.is_ok() {
            return ControlFlow::Continue(());
        }
        self.task.status.dropped_at_stop();
        error!(token = %self.task.spec.name,
            "the pipeline closed (shutdown deadline passed): an event read from the socket was \
             not handed over and is lost");
        self.close().await
    }

    /// Closes the socket, waiting at most [`CLOSE_TIMEOUT`] for the server: ends the session.
    async fn close(&mut self) -> ControlFlow<SessionEnd> {
        let _ = timeout(CLOSE_TIMEOUT, self.ws.close(None)).await;
        ControlFlow::Break(SessionEnd::Cancelled)
    }

    /// The server greets once per socket: subscribe then.
    async fn on_welcome(&mut self) -> ControlFlow<SessionEnd> {
        if let Subscription::AwaitingWelcome { .. } = self.subscription {
            return self.subscribe().await;
        }
        ControlFlow::Continue(())
    }

    /// Sends `subscribe` and starts waiting for its confirm.
    async fn subscribe(&mut self) -> ControlFlow<SessionEnd> {
        self.send(protocol::subscribe(&self.identifier)).await?;
        self.task.status.set(TokenState::Pending);
        self.subscription = Subscription::Pending {
            deadline: Instant::now() + self.task.settings.confirm_timeout,
        };
        ControlFlow::Continue(())
    }

    /// The server confirmed our subscription.
    fn on_confirm(&mut self) {
        // Only a pending subscribe can be confirmed. A confirm that arrives after we gave up and
        // sent `unsubscribe` is for a subscription the server has dropped since: believing it
        // would show `subscribed` while no event can come.
        if let Subscription::Pending { .. } = self.subscription {
            info!(token = %self.task.spec.name, "subscribed");
            self.task.status.set(TokenState::Subscribed);
            self.subscription = Subscription::Confirmed {
                since: Instant::now(),
            };
            self.next_presence = Instant::now();
            self.gaps.confirmed();
        } else {
            debug!(token = %self.task.spec.name,
                "ignored a confirm that came after the subscription was given up");
        }
    }

    /// The server refused our subscription: retry after a backoff.
    fn on_reject(&mut self) {
        let delay = self.backoff.next_delay();
        error!(token = %self.task.spec.name, retry_in = ?delay,
            "subscription rejected: check the token's pubsub_token, account_id and user_id");
        self.task
            .status
            .fail(TokenState::Rejected, "server rejected the subscription");
        self.gaps.ended();
        self.subscription = Subscription::RetryAt(Instant::now() + delay);
    }

    /// The subscription's timer fired: give up the connection for want of a welcome, give up
    /// waiting for a confirm, subscribe again, or keep the agent present.
    async fn on_timer(&mut self) -> ControlFlow<SessionEnd> {
        if self
            .rotation
            .as_ref()
            .is_some_and(|r| r.deadline <= Instant::now())
        {
            return self.give_up_rotation().await;
        }
        match self.subscription {
            Subscription::Pending { .. } => self.give_up_unconfirmed().await,
            Subscription::RetryAt(_) => self.subscribe().await,
            Subscription::Confirmed { .. } => {
                self.send(protocol::update_presence(&self.identifier))
                    .await?;
                self.next_presence = Instant::now() + self.task.settings.presence_interval;
                ControlFlow::Continue(())
            }
            Subscription::AwaitingWelcome { .. } => {
                ControlFlow::Break(SessionEnd::NoWelcome(format!(
                    "no welcome within {:?} (chatwoot.connect_timeout) of the WebSocket handshake: \
                     the server never set the connection up",
                    self.task.settings.connect_timeout
                )))
            }
        }
    }

    /// No confirm came in time: report it, drop the subscription and retry after a backoff.
    async fn give_up_unconfirmed(&mut self) -> ControlFlow<SessionEnd> {
        let confirm_timeout = self.task.settings.confirm_timeout;
        let delay = self.backoff.next_delay();
        error!(token = %self.task.spec.name, timeout = ?confirm_timeout, retry_in = ?delay,
            "subscription not confirmed: Chatwoot ignores a wrong or rotated pubsub_token, \
             account_id or user_id in silence; check this token");
        self.task.status.fail(
            TokenState::Unconfirmed,
            format!("no confirm_subscription within {confirm_timeout:?}"),
        );
        // The failed subscription stays registered on the server, which would ignore a second
        // subscribe: drop it first.
        self.send(protocol::unsubscribe(&self.identifier)).await?;
        self.subscription = Subscription::RetryAt(Instant::now() + delay);
        // A rotated pubsub token is one cause: the profile tells.
        self.subscribers.refresh_now();
        ControlFlow::Continue(())
    }

    /// Sends a command; a failed send ends the connection. A server that stops reading cannot
    /// hold a stopped task here.
    async fn send(&mut self, command: String) -> ControlFlow<SessionEnd> {
        let sent = tokio::select! {
            sent = self.ws.send(Message::text(command)) => sent,
            _ = self.task.cancel.cancelled() => return ControlFlow::Break(SessionEnd::Cancelled),
        };
        match sent {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => ControlFlow::Break(SessionEnd::Lost(describe(&e))),
        }
    }
}

/// A subscription with a rotated pubsub token, waiting for its confirm beside the old one.
#[derive(Debug)]
struct Rotation {
    /// The new subscription's identifier.
    identifier: String,
    /// When waiting for its confirm ends.
    deadline: Instant,
}

/// Following a rotated pubsub token on the same socket (tokens given as API access tokens).
impl Session<'_> {
    /// Whether `identifier` is that of the rotation in progress.
    fn rotating_to(&self, identifier: &str) -> bool {
        self.rotation
            .as_ref()
            .is_some_and(|r| r.identifier == identifier)
    }

    /// The profile gave another subscriber: a confirmed subscription keeps running until the
    /// new one is confirmed beside it; one not confirmed yet is simply replaced.
    async fn on_new_subscriber(&mut self, subscriber: Subscriber) -> ControlFlow<SessionEnd> {
        let identifier = protocol::identifier(&subscriber.pubsub_token, &subscriber.identity);
        if identifier == self.identifier {
            self.gaps.token_still_shown();
            return ControlFlow::Continue(());
        }
        if self.rotating_to(&identifier) {
            return ControlFlow::Continue(());
        }
        match self.subscription {
            Subscription::AwaitingWelcome { .. } => {
                self.identifier = identifier;
                ControlFlow::Continue(())
            }
            Subscription::Pending { .. } => {
                self.send(protocol::unsubscribe(&self.identifier)).await?;
                self.identifier = identifier;
                self.subscribe().await
            }
            Subscription::RetryAt(_) => {
                self.identifier = identifier;
                self.subscribe().await
            }
            Subscription::Confirmed { .. } => {
                if let Some(stale) = self.rotation.take() {
                    self.send(protocol::unsubscribe(&stale.identifier)).await?;
                }
                self.send(protocol::subscribe(&identifier)).await?;
                self.rotation = Some(Rotation {
                    identifier,
                    deadline: Instant::now() + self.task.settings.confirm_timeout,
                });
                ControlFlow::Continue(())
            }
        }
    }

    /// The new subscription is confirmed: drop the old one, which Chatwoot no longer streams.
    async fn on_rotation_confirmed(&mut self) -> ControlFlow<SessionEnd> {
        let Some(rotation) = self.rotation.take() else {
            return ControlFlow::Continue(());
        };
        let old = std::mem::replace(&mut self.identifier, rotation.identifier);
        info!(token = %self.task.spec.name, "subscribed with the rotated pubsub token; dropping the old subscription");
        self.gaps.rotated();
        self.send(protocol::unsubscribe(&old)).await
    }

    /// The new subscription was not confirmed in time: drop it, keep the old one, and read
    /// the profile again.
    async fn give_up_rotation(&mut self) -> ControlFlow<SessionEnd> {
        let Some(rotation) = self.rotation.take() else {
            return ControlFlow::Continue(());
        };
        warn!(token = %self.task.spec.name, timeout = ?self.task.settings.confirm_timeout,
            "the subscription with the rotated pubsub token was not confirmed; keeping the old one and reading the profile again");
        self.task.status.note(format!(
            "the subscription with the rotated pubsub token got no confirm_subscription within {:?}",
            self.task.settings.confirm_timeout
        ));
        self.send(protocol::unsubscribe(&rotation.identifier))
            .await?;
        self.subscribers.refresh_now();
        ControlFlow::Continue(())
    }
}

/// Why the server closed the connection, with the close code when it sent one.
fn closed(close: Option<CloseFrame>) -> String {
    match close {
        Some(c) => format!("server closed the connection (code {})", u16::from(c.code)),
        None => "server closed the connection".into(),
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
        SessionEnd::ConnectFailed(_)
        | SessionEnd::Lost(_)
        | SessionEnd::Stale(_)
        | SessionEnd::NoWelcome(_) => Some(backoff.next_delay()),
        SessionEnd::ServerAskedToReconnect(_) => Some(full_jitter(PROMPT_RECONNECT_CEILING)),
        // Half fixed, half jittered: long, but still spread.
        SessionEnd::ServerAskedToWait(_) => {
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
    // `chatwoot.tls` for `wss://`; plain for `ws://`, where validation built none.
    let connector = match &spec.tls {
        Some(tls) => Connector::Rustls(tls.rustls()),
        None => Connector::Plain,
    };
    let (ws, _response) = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(config),
        true,
        Some(connector),
    )
    .await?;
    Ok(ws)
}

/// Where a probe is in its exchange with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeStage {
    /// Connected; no welcome yet, nothing sent.
    AwaitingWelcome,
    /// `subscribe` sent; waiting for its confirm.
    AwaitingConfirm,
}

/// Checks a token once, for `check --connect`: handshake, welcome, subscribe, confirm.
/// Returns how it went in words; never the token.
pub async fn probe(spec: &TokenSpec, settings: &CableSettings) -> Result<(), String> {
    // A token given as an API access token or by a contact's identifiers is checked through
    // Chatwoot's API first.
    let identifier = match crate::source::profile::Lookup::of(spec) {
        None => protocol::identifier(&spec.pubsub_token, &spec.identity),
        Some(lookup) => {
            let client = crate::source::profile::client(&lookup, settings)?;
            let subscriber = crate::source::profile::fetch(&client, &spec.name, &lookup)
                .await
                .map_err(|e| e.to_string())?;
            protocol::identifier(&subscriber.pubsub_token, &subscriber.identity)
        }
    };
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
    let mut stage = ProbeStage::AwaitingWelcome;
    let outcome = probe_exchange(&mut ws, &identifier, settings, &mut stage).await;
    if stage == ProbeStage::AwaitingConfirm {
        let _ = ws
            .send(Message::text(protocol::unsubscribe(&identifier)))
            .await;
    }
    let _ = ws.close(None).await;
    outcome
}

/// Reads frames until the subscription is confirmed, refused, or times out; `stage` tells the
/// caller whether a subscription must be dropped afterwards.
async fn probe_exchange(
    ws: &mut Socket,
    identifier: &str,
    settings: &CableSettings,
    stage: &mut ProbeStage,
) -> Result<(), String> {
    let mut deadline = Instant::now() + settings.connect_timeout;
    loop {
        let frame = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => {
                return Err(match stage {
                    ProbeStage::AwaitingConfirm => format!(
                        "no confirm_subscription within {:?}: Chatwoot ignores a wrong or rotated pubsub_token, account_id or user_id in silence",
                        settings.confirm_timeout
                    ),
                    ProbeStage::AwaitingWelcome => "the server sent no welcome".to_string(),
                })
            }
            Ok(None) => return Err("server closed the connection".into()),
            Ok(Some(Err(e))) => return Err(describe(&e)),
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
        };
        match protocol::decode(frame.as_str()) {
            Ok(ServerFrame::Welcome) if *stage == ProbeStage::AwaitingWelcome => {
                ws.send(Message::text(protocol::subscribe(identifier)))
                    .await
                    .map_err(|e| describe(&e))?;
                *stage = ProbeStage::AwaitingConfirm;
                deadline = Instant::now() + settings.confirm_timeout;
            }
            Ok(ServerFrame::Confirm { identifier: of }) if of == identifier => return Ok(()),
            Ok(ServerFrame::Reject { identifier: of }) if of == identifier => {
                return Err("server rejected the subscription".into())
            }
            Ok(ServerFrame::Disconnect { reason, .. }) => {
                return Err(format!(
                    "server sent disconnect: {}",
                    reason.as_deref().unwrap_or("no reason")
                ))
            }
            _ => {}
        }
    }
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
        E::Io(e) => {
            tls::explain_failure(e, "chatwoot.tls").unwrap_or_else(|| format!("I/O error: {e}"))
        }
        E::Tls(e) => {
            tls::explain_failure(e, "chatwoot.tls").unwrap_or_else(|| format!("TLS error: {e}"))
        }
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
                &SessionEnd::ServerAskedToReconnect(String::new()),
                Duration::ZERO,
                &s,
                &mut backoff,
            )
            .unwrap();
            assert!(now <= PROMPT_RECONNECT_CEILING);
            let long = delay_after(
                &SessionEnd::ServerAskedToWait(String::new()),
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
