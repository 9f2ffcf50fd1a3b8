//! One client connection: handshake, welcome, pings, commands, and what the handle pushes.

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::time::{interval, sleep_until, Instant, Interval, MissedTickBehavior};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::blast::run_blast;
use super::events::{encode_message, ping_frame};
use super::identity::{Identifier, PresenceOf, Resolved};
use super::socket::{Rewind, Socket, Stream};
use super::{catalog, rest, Answer, Closed, Push, Shared, Subject};
use crate::source::protocol::SUBPROTOCOL;

/// Accepts connections until cancelled; each gets its own task.
pub(super) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    ping_interval: Duration,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "mock server: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Subscribe before the handshake so no push sent after accept is missed.
        let pushes = shared.pushes.subscribe();
        tasks.spawn(serve(
            stream,
            tls.clone(),
            shared.clone(),
            pushes,
            ping_interval,
            cancel.clone(),
        ));
    }
}

/// One subscription on one connection.
struct Subscribed {
    /// The identifier the client subscribed with, echoed in every frame of the subscription.
    identifier: String,
    /// The streams it reads: its pubsub token, and `account_<id>` for an agent.
    streams_from: Vec<Arc<str>>,
    /// Whether events are sent to it (every answer but silence).
    streams: bool,
    /// For an agent: the `presence.update` each `update_presence` broadcasts.
    presence: Option<PresenceOf>,
}

/// A `confirm_subscription` a slow server sends after the fact ([`Answer::ConfirmAfter`]).
struct LateConfirm {
    /// When it is sent.
    at: Instant,
    /// The frame, ready to send: sent even if the client unsubscribed meanwhile, as a server
    /// that handles the subscribe late still confirms it before it reads the unsubscribe.
    frame: String,
}

/// Whether this connection has written its blast yet (in high-rate mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlastProgress {
    /// Waiting for the connection's first streaming subscription.
    NotYet,
    /// Written; the connection behaves as usual since.
    Done,
}

/// One accepted WebSocket and what the server knows of it.
struct Connection {
    /// The socket.
    ws: Socket,
    /// The server's state and counters.
    shared: Arc<Shared>,
    /// What the handle sends to every connection.
    pushes: broadcast::Receiver<Push>,
    /// This connection's subscriptions, in the order they were made.
    subscriptions: Vec<Subscribed>,
    /// Whether the blast (if configured) has been written.
    blast: BlastProgress,
    /// Confirms still to send, earliest first.
    late_confirms: Vec<LateConfirm>,
    /// The heartbeat.
    ping: Interval,
    /// Stops the server.
    cancel: CancellationToken,
}

/// Serves one connection until it ends or the server stops.
async fn serve(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    pushes: broadcast::Receiver<Push>,
    ping_interval: Duration,
    cancel: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let mut stream = match tls {
        None => Either::Left(stream),
        Some(acceptor) => tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = acceptor.accept(stream) => match accepted {
                Ok(tls) => Either::Right(tls),
                Err(e) => {
                    debug!(error = %e, "mock server: TLS handshake failed");
                    return;
                }
            },
        },
    };
    let head = tokio::select! {
        _ = cancel.cancelled() => return,
        head = rest::read_head(&mut stream) => match head {
            Ok(head) => head,
            Err(e) => {
                debug!(error = %e, "mock server: no request head");
                return;
            }
        },
    };
    let upgrade = rest::is_upgrade(&head);
    if upgrade && shared.cable_refused.load(Ordering::Relaxed) {
        // What a proxy in front of a Chatwoot whose cable is down answers.
        let refusal =
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, refusal.as_bytes()).await;
        return;
    }
    let stream = Rewind::new(head, stream);
    if !upgrade {
        rest::serve(stream, shared, cancel).await;
        return;
    }
    let Some(ws) = handshake(stream, &shared).await else {
        return;
    };
    shared.connections.fetch_add(1, Ordering::Relaxed);
    shared.open_connections.fetch_add(1, Ordering::Relaxed);
    let mut ping = interval(ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping.tick().await;
    let mut connection = Connection {
        ws,
        shared,
        pushes,
        subscriptions: Vec::new(),
        blast: BlastProgress::NotYet,
        late_confirms: Vec::new(),
        ping,
        cancel,
    };
    connection.run().await;
    connection.close();
}

/// Accepts the WebSocket handshake, answering the ActionCable subprotocol when offered, and
/// records the `Origin` header.
async fn handshake(stream: Stream, shared: &Shared) -> Option<Socket> {
    let origin = Arc::new(Mutex::new(None));
    let seen_origin = origin.clone();
    // The handshake callback's error type is tungstenite's, which is large; it never fails here.
    #[allow(clippy::result_large_err)]
    let callback = move |request: &Request, mut response: Response| {
        *seen_origin.lock().expect("origin lock") = request
            .headers()
            .get("origin")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let offered = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if offered.split(',').any(|p| p.trim() == SUBPROTOCOL) {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        Ok(response)
    };
    let ws = tokio_tungstenite::accept_hdr_async(stream, callback)
        .await
        .ok()?;
    *shared.last_origin.lock().expect("origin lock") = origin.lock().expect("origin lock").take();
    Some(ws)
}

impl Connection {
    /// Greets, then serves until the connection ends or the server stops.
    async fn run(&mut self) {
        if self.shared.send_welcome
            && self
                .ws
                .send(Message::text(r#"{"type":"welcome"}"#))
                .await
                .is_err()
        {
            return;
        }
        while self.step().await.is_continue() {}
    }

    /// Waits for the first of: the server stopping, a heartbeat, a late confirm falling due, a
    /// push, a client frame.
    async fn step(&mut self) -> ControlFlow<()> {
        let next_confirm = self.late_confirms.first().map(|late| late.at);
        tokio::select! {
            _ = self.cancel.cancelled() => ControlFlow::Break(()),
            _ = self.ping.tick() => self.heartbeat().await,
            _ = sleep_until(next_confirm.unwrap_or_else(Instant::now)), if next_confirm.is_some() => {
                let late = self.late_confirms.remove(0);
                go_on_if_sent(self.ws.send(Message::text(late.frame)).await)
            }
            push = self.pushes.recv() => match push {
                Ok(push) => self.on_push(push).await,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "mock server: a connection lagged behind the broadcasts");
                    ControlFlow::Continue(())
                }
                Err(broadcast::error::RecvError::Closed) => ControlFlow::Break(()),
            },
            incoming = self.ws.next() => self.on_incoming(incoming).await,
        }
    }

    /// Sends a ping unless pings are switched off.
    async fn heartbeat(&mut self) -> ControlFlow<()> {
        if !self.shared.pings.load(Ordering::Relaxed) {
            return ControlFlow::Continue(());
        }
        go_on_if_sent(self.ws.send(Message::text(ping_frame())).await)
    }

    /// Does what the handle asked of every connection.
    async fn on_push(&mut self, push: Push) -> ControlFlow<()> {
        match push {
            Push::Event { only, message } => {
                go_on_if_sent(self.send_event(only.as_deref(), &message).await)
            }
            Push::Raw(frame) => go_on_if_sent(self.ws.send(Message::text(frame.to_string())).await),
            Push::Drop => ControlFlow::Break(()),
            Push::Disconnect { reconnect } => {
                let frame = format!(
                    r#"{{"type":"disconnect","reason":"server_restart","reconnect":{reconnect}}}"#
                );
                let _ = self.ws.send(Message::text(frame)).await;
                let _ = self.ws.close(None).await;
                ControlFlow::Break(())
            }
        }
    }

    /// Sends an event to every streaming subscription (that reads stream `only`, if given).
    async fn send_event(&mut self, only: Option<&str>, message: &str) -> Result<(), Closed> {
        for sub in self.subscriptions.iter().filter(|s| s.streams) {
            if only.is_some_and(|t| !sub.streams_from.iter().any(|s| &**s == t)) {
                continue;
            }
            let identifier = serde_json::to_string(&sub.identifier).expect("a string serializes");
            let frame = format!(r#"{{"identifier":{identifier},"message":{message}}}"#);
            self.ws
                .feed(Message::text(frame))
                .await
                .map_err(|_| Closed)?;
        }
        self.ws.flush().await.map_err(|_| Closed)
    }

    /// Answers a client frame, then starts the blast once a subscription streams.
    async fn on_incoming(
        &mut self,
        incoming: Option<Result<Message, tungstenite::Error>>,
    ) -> ControlFlow<()> {
        let text = match incoming {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return ControlFlow::Break(()),
            Some(Ok(_)) => return ControlFlow::Continue(()),
        };
        // A server that is behind answers in order: a confirm still owed goes out before the
        // next command is handled (before an `unsubscribe`, the client then sees it late).
        for late in std::mem::take(&mut self.late_confirms) {
            if self.ws.send(Message::text(late.frame)).await.is_err() {
                return ControlFlow::Break(());
            }
        }
        match handle_command(
            &self.shared,
            text.as_str(),
            &mut self.subscriptions,
            &mut self.ws,
        )
        .await
        {
            Err(Closed) => return ControlFlow::Break(()),
            Ok(Some(late)) => {
                let at = self.late_confirms.partition_point(|l| l.at <= late.at);
                self.late_confirms.insert(at, late);
            }
            Ok(None) => {}
        }
        go_on_if_sent(self.blast_once().await)
    }

    /// In high-rate mode, writes the blast on the first streaming subscription, once.
    async fn blast_once(&mut self) -> Result<(), Closed> {
        let Some(blast) = self.shared.blast else {
            return Ok(());
        };
        if self.blast == BlastProgress::Done {
            return Ok(());
        }
        let Some(sub) = self.subscriptions.iter().find(|s| s.streams) else {
            return Ok(());
        };
        self.blast = BlastProgress::Done;
        let identifier = sub.identifier.clone();
        run_blast(
            &mut self.ws,
            &self.shared,
            blast,
            &identifier,
            &mut self.ping,
            &self.cancel,
        )
        .await
    }

    /// Takes the connection's subscriptions off the counters. Dropping the socket afterwards
    /// drops TCP: no close frame, like a Chatwoot deploy.
    fn close(self) {
        let streaming = self.subscriptions.iter().filter(|s| s.streams).count();
        self.shared
            .streaming
            .fetch_sub(streaming, Ordering::Relaxed);
        self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Goes on after a successful write; a failed one ends the connection.
fn go_on_if_sent<E>(written: Result<(), E>) -> ControlFlow<()> {
    match written {
        Ok(()) => ControlFlow::Continue(()),
        Err(_) => ControlFlow::Break(()),
    }
}

/// A command from the client, as ActionCable clients send it.
#[derive(serde::Deserialize)]
struct Command {
    /// `subscribe`, `unsubscribe` or `message`.
    command: String,
    /// The subscription it is about.
    identifier: String,
    /// For `message`: a JSON string with the action.
    data: Option<String>,
}

/// Acts on one client frame and counts it; a subscribe may leave a confirm to send later.
async fn handle_command<S>(
    shared: &Shared,
    text: &str,
    subscriptions: &mut Vec<Subscribed>,
    ws: &mut S,
) -> Result<Option<LateConfirm>, Closed>
where
    S: futures_util::Sink<Message> + Unpin,
{
    let Ok(command) = serde_json::from_str::<Command>(text) else {
        debug!("mock server: ignored a frame that is not a command");
        return Ok(None);
    };
    match command.command.as_str() {
        "subscribe" => {
            shared.subscribes.fetch_add(1, Ordering::Relaxed);
            return subscribe(shared, command.identifier, subscriptions, ws).await;
        }
        "unsubscribe" => {
            shared.unsubscribes.fetch_add(1, Ordering::Relaxed);
            if let Some(at) = subscriptions
                .iter()
                .position(|s| s.identifier == command.identifier)
            {
                if subscriptions.remove(at).streams {
                    shared.streaming.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        "message"
            if command
                .data
                .as_deref()
                .is_some_and(|d| d.contains("update_presence")) =>
        {
            shared.presence_updates.fetch_add(1, Ordering::Relaxed);
            let presence = subscriptions
                .iter()
                .find(|s| s.identifier == command.identifier && s.streams)
                .and_then(|s| s.presence.as_ref());
            if let Some(presence) = presence {
                broadcast_presence(shared, presence);
            }
        }
        _ => {}
    }
    Ok(None)
}

/// Answers a `subscribe` the way the token is configured to be answered.
async fn subscribe<S>(
    shared: &Shared,
    identifier: String,
    subscriptions: &mut Vec<Subscribed>,
    ws: &mut S,
) -> Result<Option<LateConfirm>, Closed>
where
    S: futures_util::Sink<Message> + Unpin,
{
    // Chatwoot ignores a subscribe for an identifier that is already registered, including one
    // that failed silently.
    if subscriptions.iter().any(|s| s.identifier == identifier) {
        return Ok(None);
    }
    let (answer, streams_from, presence) = answer_to(shared, &identifier);
    let quoted = serde_json::to_string(&identifier).expect("a string serializes");
    let reply = match answer {
        Answer::Reject => Some("reject_subscription"),
        Answer::Confirm => Some("confirm_subscription"),
        Answer::Silent | Answer::StreamUnconfirmed | Answer::ConfirmAfter(_) => None,
    };
    if answer != Answer::Reject {
        let streams = answer != Answer::Silent;
        if streams {
            shared.streaming.fetch_add(1, Ordering::Relaxed);
        }
        subscriptions.push(Subscribed {
            identifier,
            streams_from,
            streams,
            presence: presence.clone(),
        });
    }
    let frame = |kind: &str| format!(r#"{{"identifier":{quoted},"type":"{kind}"}}"#);
    if let Answer::ConfirmAfter(delay) = answer {
        return Ok(Some(LateConfirm {
            at: Instant::now() + delay,
            frame: frame("confirm_subscription"),
        }));
    }
    if let Some(kind) = reply {
        ws.send(Message::text(frame(kind)))
            .await
            .map_err(|_| Closed)?;
    }
    // RoomChannel broadcasts the agent's presence after it confirmed the subscription.
    if let Some(presence) = presence {
        broadcast_presence(shared, &presence);
    }
    Ok(None)
}

/// How a subscribe with `identifier` is answered, which streams it reads and the presence it
/// announces: the directory decides for its users and contacts, the configured answers for any
/// other token (which reads the stream named by its token).
fn answer_to(shared: &Shared, identifier: &str) -> (Answer, Vec<Arc<str>>, Option<PresenceOf>) {
    let asked = Identifier::parse(identifier);
    let resolved = shared
        .directory
        .lock()
        .expect("directory lock")
        .resolve(&asked);
    match resolved {
        Resolved::Streams { streams, presence } => (Answer::Confirm, streams, presence),
        Resolved::Refused => (Answer::Silent, Vec::new(), None),
        Resolved::NotInDirectory => {
            let answer = shared
                .answers
                .lock()
                .expect("answers lock")
                .get(&asked.pubsub_token)
                .copied()
                .unwrap_or(shared.unknown_answer);
            (answer, vec![asked.pubsub_token.into()], None)
        }
    }
}

/// Broadcasts `presence.update` to the agent's own token stream, as `RoomChannel` does on
/// subscribe and on `update_presence` (every subscription of that token receives it).
fn broadcast_presence(shared: &Shared, presence: &PresenceOf) {
    let subject = Subject {
        account_id: presence.account_id,
        user_id: Some(presence.user_id),
        ..Subject::default()
    };
    let Some(data) = catalog::payload("presence.update", &subject) else {
        return;
    };
    let message = encode_message(
        "presence.update",
        &serde_json::Value::Object(data).to_string(),
    );
    // No receivers just means no connection is open.
    let _ = shared.pushes.send(Push::Event {
        only: Some(presence.stream.clone()),
        message: message.into(),
    });
}
