//! An ActionCable server that behaves like Chatwoot's, for tests, the demo and benchmarks.
//!
//! It greets with `welcome`, pings every 3 s, answers `subscribe` per configured token (confirm,
//! silence, reject, or events without a confirm as old installs do), ignores a repeated subscribe
//! like Chatwoot does, and broadcasts events shaped like the recorded fixtures with a sequence
//! number (`mock_seq`) and a send time (`mock_sent_at_us`) at the start of `data`. Tests steer it
//! from outside: drop every connection abruptly, send `disconnect` frames, go silent, inject raw
//! frames.

pub mod fixtures;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::time::{interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::source::protocol::SUBPROTOCOL;

/// How the server answers a subscription with a given pubsub token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Confirm and stream events: a valid token.
    Confirm,
    /// Nothing at all, as Chatwoot does for a wrong token, user or account.
    Silent,
    /// `reject_subscription` (in the protocol; Chatwoot does not send it today).
    Reject,
    /// Stream events but never confirm, as installs older than v4.0.4 did for a bad user id.
    StreamUnconfirmed,
    /// Confirm only after this delay (a server under load); the connection does nothing else
    /// meanwhile.
    ConfirmAfter(Duration),
}

/// One token the server knows.
#[derive(Debug, Clone)]
pub struct MockToken {
    pub pubsub_token: String,
    pub answer: Answer,
}

/// What the server does.
#[derive(Debug, Clone)]
pub struct MockConfig {
    pub listen: SocketAddr,
    /// Known tokens; any other gets `unknown_answer`.
    pub tokens: Vec<MockToken>,
    /// Answer for tokens not in `tokens` (Chatwoot: silence).
    pub unknown_answer: Answer,
    /// Heartbeat period (Chatwoot: 3 s).
    pub ping_interval: Duration,
    /// Events per second the generator broadcasts; 0 for none.
    pub rate: f64,
    /// Stop generating after this many events.
    pub count: Option<u64>,
    /// Start generating only once this many subscriptions stream, so no generated event is
    /// broadcast to nobody.
    pub wait_for_subscriptions: usize,
    /// High-rate mode for benchmarks: each connection writes pre-encoded frames itself.
    pub blast: Option<Blast>,
}

/// High-rate mode: once a connection's first subscription streams (and `wait_for_subscriptions`
/// subscriptions stream in all), the connection writes `count` `message.created` events built
/// from one pre-encoded WebSocket frame (~1.2 KB), patching only the digits of `mock_seq`,
/// `mock_sent_at_us` and `conversation_id` (space-padded, so the length never changes). Frames go
/// straight to the socket, many per `write`, as fast as it takes them or at a fixed `rate`.
/// Sequence numbers are unique across connections. Afterwards the connection behaves as usual.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Blast {
    /// Events per connection.
    pub count: u64,
    /// Events per second per connection; `None` for as fast as the socket takes them.
    pub rate: Option<f64>,
    /// `conversation_id` cycles through this many values (1..=n), so sinks that keep one event
    /// per conversation in flight see realistic concurrency.
    pub conversations: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tokens: Vec::new(),
            unknown_answer: Answer::Silent,
            ping_interval: Duration::from_secs(3),
            rate: 0.0,
            count: None,
            wait_for_subscriptions: 0,
            blast: None,
        }
    }
}

/// Something pushed to every connection.
#[derive(Debug, Clone)]
enum Push {
    /// An event, pre-encoded as the `message` value, for subscriptions of `only` (or all).
    Event {
        only: Option<Arc<str>>,
        message: Arc<str>,
    },
    /// A raw text frame, sent as is.
    Raw(Arc<str>),
    /// Close TCP without a close frame, as a Chatwoot deploy does.
    Drop,
    /// A `disconnect` frame, then close.
    Disconnect { reconnect: bool },
}

/// State shared by the server's tasks and its handle.
struct Shared {
    answers: Mutex<HashMap<String, Answer>>,
    unknown_answer: Answer,
    pushes: broadcast::Sender<Push>,
    pings: AtomicBool,
    /// Counters tests and benchmarks read.
    connections: AtomicU64,
    open_connections: AtomicUsize,
    subscribes: AtomicU64,
    unsubscribes: AtomicU64,
    presence_updates: AtomicU64,
    /// Subscriptions that stream events right now.
    streaming: AtomicUsize,
    sequence: AtomicU64,
    /// `Origin` header of the latest handshake.
    last_origin: Mutex<Option<String>>,
    blast: Option<Blast>,
    wait_for_subscriptions: usize,
}

/// A running mock server. Dropping it does not stop it; call [`MockServer::stop`].
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl MockServer {
    pub async fn start(config: MockConfig) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let (pushes, _) = broadcast::channel(65_536);
        let shared = Arc::new(Shared {
            answers: Mutex::new(
                config
                    .tokens
                    .iter()
                    .map(|t| (t.pubsub_token.clone(), t.answer))
                    .collect(),
            ),
            unknown_answer: config.unknown_answer,
            pushes,
            pings: AtomicBool::new(true),
            connections: AtomicU64::new(0),
            open_connections: AtomicUsize::new(0),
            subscribes: AtomicU64::new(0),
            unsubscribes: AtomicU64::new(0),
            presence_updates: AtomicU64::new(0),
            streaming: AtomicUsize::new(0),
            sequence: AtomicU64::new(0),
            last_origin: Mutex::new(None),
            blast: config.blast,
            wait_for_subscriptions: config.wait_for_subscriptions,
        });
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(
            listener,
            shared.clone(),
            config.ping_interval,
            cancel.clone(),
            tasks.clone(),
        ));
        if config.rate > 0.0 {
            tasks.spawn(generate(
                shared.clone(),
                config.rate,
                config.count,
                config.wait_for_subscriptions,
                cancel.clone(),
            ));
        }
        Ok(MockServer {
            addr,
            shared,
            cancel,
            tasks,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cable URL to give the bridge.
    pub fn url(&self) -> String {
        format!("ws://{}/cable", self.addr)
    }

    /// Broadcasts `event` with `data` (a JSON object) to every streaming subscription.
    pub fn broadcast(&self, event: &str, data: &str) {
        self.push(Push::Event {
            only: None,
            message: encode_message(event, data).into(),
        });
    }

    /// Broadcasts to the subscriptions of one pubsub token only.
    pub fn broadcast_to(&self, pubsub_token: &str, event: &str, data: &str) {
        self.push(Push::Event {
            only: Some(pubsub_token.into()),
            message: encode_message(event, data).into(),
        });
    }

    /// Broadcasts the next generated event (fixture-shaped, numbered); returns its sequence number.
    pub fn broadcast_generated(&self) -> u64 {
        let (seq, message) = next_generated(&self.shared);
        self.push(Push::Event {
            only: None,
            message: message.into(),
        });
        seq
    }

    /// Sends a raw text frame to every connection.
    pub fn send_raw(&self, frame: &str) {
        self.push(Push::Raw(frame.into()));
    }

    /// Drops every connection without a close frame.
    pub fn drop_connections(&self) {
        self.push(Push::Drop);
    }

    /// Sends `disconnect` to every connection and closes them.
    pub fn disconnect_all(&self, reconnect: bool) {
        self.push(Push::Disconnect { reconnect });
    }

    /// Stops (or resumes) the heartbeat, so clients see a silent, half-dead server.
    pub fn set_pings(&self, enabled: bool) {
        self.shared.pings.store(enabled, Ordering::Relaxed);
    }

    /// Changes how a token is answered from now on (a rotated token goes silent).
    pub fn set_answer(&self, pubsub_token: &str, answer: Answer) {
        self.shared
            .answers
            .lock()
            .expect("answers lock")
            .insert(pubsub_token.into(), answer);
    }

    /// Subscriptions that receive events right now.
    pub fn streaming_subscriptions(&self) -> usize {
        self.shared.streaming.load(Ordering::Relaxed)
    }

    pub fn connections_accepted(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    pub fn subscribe_commands(&self) -> u64 {
        self.shared.subscribes.load(Ordering::Relaxed)
    }

    pub fn unsubscribe_commands(&self) -> u64 {
        self.shared.unsubscribes.load(Ordering::Relaxed)
    }

    pub fn presence_updates(&self) -> u64 {
        self.shared.presence_updates.load(Ordering::Relaxed)
    }

    pub fn last_origin(&self) -> Option<String> {
        self.shared.last_origin.lock().expect("origin lock").clone()
    }

    /// Stops accepting, closes every connection abruptly, and waits for the tasks.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn push(&self, push: Push) {
        // No receivers just means no connection is open.
        let _ = self.shared.pushes.send(push);
    }
}

/// `{"event":...,"data":...}` with `data` inserted verbatim.
fn encode_message(event: &str, data: &str) -> String {
    let event = serde_json::to_string(event).expect("a string serializes");
    format!(r#"{{"event":{event},"data":{data}}}"#)
}

/// Templates of generated events: `(event name, data after its opening brace)`.
fn templates() -> &'static [(String, String)] {
    static TEMPLATES: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    TEMPLATES.get_or_init(|| {
        fixtures::ALL
            .iter()
            .map(|(name, frame)| {
                // Keep the fixture's bytes (key order, spacing) as Chatwoot sent them.
                #[derive(serde::Deserialize)]
                struct Frame<'a> {
                    #[serde(borrow)]
                    message: Message<'a>,
                }
                #[derive(serde::Deserialize)]
                struct Message<'a> {
                    #[serde(borrow)]
                    data: &'a serde_json::value::RawValue,
                }
                let frame: Frame = serde_json::from_str(frame).expect("fixture is JSON");
                let data = frame.message.data.get();
                (name.to_string(), data[1..].to_string())
            })
            .collect()
    })
}

/// The next generated event: a fixture's data with `mock_seq` and `mock_sent_at_us` in front.
fn next_generated(shared: &Shared) -> (u64, String) {
    let seq = shared.sequence.fetch_add(1, Ordering::Relaxed);
    let templates = templates();
    let (name, rest) = &templates[seq as usize % templates.len()];
    let sent_at_us = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let data = format!(r#"{{"mock_seq":{seq},"mock_sent_at_us":{sent_at_us},{rest}"#);
    (seq, encode_message(name, &data))
}

async fn generate(
    shared: Arc<Shared>,
    rate: f64,
    count: Option<u64>,
    wait_for_subscriptions: usize,
    cancel: CancellationToken,
) {
    while shared.streaming.load(Ordering::Relaxed) < wait_for_subscriptions {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    let mut tick = interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut sent = 0u64;
    while count.is_none_or(|c| sent < c) {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (_, message) = next_generated(&shared);
        let _ = shared.pushes.send(Push::Event {
            only: None,
            message: message.into(),
        });
        sent += 1;
    }
}

async fn accept_loop(
    listener: TcpListener,
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
            shared.clone(),
            pushes,
            ping_interval,
            cancel.clone(),
        ));
    }
}

/// One subscription on one connection.
struct Subscribed {
    identifier: String,
    pubsub_token: String,
    streams: bool,
}

async fn serve(
    stream: TcpStream,
    shared: Arc<Shared>,
    mut pushes: broadcast::Receiver<Push>,
    ping_interval: Duration,
    cancel: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
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
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    *shared.last_origin.lock().expect("origin lock") = origin.lock().expect("origin lock").take();
    shared.connections.fetch_add(1, Ordering::Relaxed);
    shared.open_connections.fetch_add(1, Ordering::Relaxed);
    let mut subscriptions: Vec<Subscribed> = Vec::new();
    let mut blasted = false;
    let mut ping = interval(ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping.tick().await;

    let welcome = ws.send(Message::text(r#"{"type":"welcome"}"#)).await;
    if welcome.is_ok() {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = ping.tick() => {
                    if shared.pings.load(Ordering::Relaxed) {
                        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                        if ws.send(Message::text(format!(r#"{{"type":"ping","message":{now}}}"#))).await.is_err() {
                            break;
                        }
                    }
                }
                push = pushes.recv() => {
                    let push = match push {
                        Ok(push) => push,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            warn!(missed = n, "mock server: a connection lagged behind the broadcasts");
                            continue;
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    };
                    match push {
                        Push::Event { only, message } => {
                            let mut failed = false;
                            for sub in subscriptions.iter().filter(|s| s.streams) {
                                if only.as_deref().is_some_and(|t| t != sub.pubsub_token) {
                                    continue;
                                }
                                let identifier = serde_json::to_string(&sub.identifier).expect("a string serializes");
                                let frame = format!(r#"{{"identifier":{identifier},"message":{message}}}"#);
                                if ws.feed(Message::text(frame)).await.is_err() {
                                    failed = true;
                                    break;
                                }
                            }
                            if failed || ws.flush().await.is_err() {
                                break;
                            }
                        }
                        Push::Raw(frame) => {
                            if ws.send(Message::text(frame.to_string())).await.is_err() {
                                break;
                            }
                        }
                        Push::Drop => break,
                        Push::Disconnect { reconnect } => {
                            let frame = format!(r#"{{"type":"disconnect","reason":"server_restart","reconnect":{reconnect}}}"#);
                            let _ = ws.send(Message::text(frame)).await;
                            let _ = ws.close(None).await;
                            break;
                        }
                    }
                }
                incoming = ws.next() => {
                    let text = match incoming {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                        Some(Ok(_)) => continue,
                    };
                    if handle_command(&shared, text.as_str(), &mut subscriptions, &mut ws).await.is_err() {
                        break;
                    }
                    if let Some(blast) = shared.blast.filter(|_| !blasted) {
                        if let Some(sub) = subscriptions.iter().find(|s| s.streams) {
                            blasted = true;
                            let identifier = sub.identifier.clone();
                            if run_blast(&mut ws, &shared, blast, &identifier, &mut ping, &cancel).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
    let streaming = subscriptions.iter().filter(|s| s.streams).count();
    shared.streaming.fetch_sub(streaming, Ordering::Relaxed);
    shared.open_connections.fetch_sub(1, Ordering::Relaxed);
    // Dropping `ws` drops TCP: no close frame, like a Chatwoot deploy.
}

async fn handle_command<S>(
    shared: &Shared,
    text: &str,
    subscriptions: &mut Vec<Subscribed>,
    ws: &mut S,
) -> Result<(), ()>
where
    S: futures_util::Sink<Message> + Unpin,
{
    #[derive(serde::Deserialize)]
    struct Command {
        command: String,
        identifier: String,
        data: Option<String>,
    }
    let Ok(command) = serde_json::from_str::<Command>(text) else {
        debug!("mock server: ignored a frame that is not a command");
        return Ok(());
    };
    match command.command.as_str() {
        "subscribe" => {
            shared.subscribes.fetch_add(1, Ordering::Relaxed);
            // Chatwoot ignores a subscribe for an identifier that is already registered,
            // including one that failed silently.
            if subscriptions
                .iter()
                .any(|s| s.identifier == command.identifier)
            {
                return Ok(());
            }
            let pubsub_token = serde_json::from_str::<serde_json::Value>(&command.identifier)
                .ok()
                .and_then(|v| v["pubsub_token"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let answer = shared
                .answers
                .lock()
                .expect("answers lock")
                .get(&pubsub_token)
                .copied()
                .unwrap_or(shared.unknown_answer);
            let identifier =
                serde_json::to_string(&command.identifier).expect("a string serializes");
            match answer {
                Answer::Reject => {
                    let frame =
                        format!(r#"{{"identifier":{identifier},"type":"reject_subscription"}}"#);
                    return ws.send(Message::text(frame)).await.map_err(|_| ());
                }
                Answer::Silent
                | Answer::Confirm
                | Answer::StreamUnconfirmed
                | Answer::ConfirmAfter(_) => {
                    let streams = answer != Answer::Silent;
                    if streams {
                        shared.streaming.fetch_add(1, Ordering::Relaxed);
                    }
                    subscriptions.push(Subscribed {
                        identifier: command.identifier,
                        pubsub_token,
                        streams,
                    });
                    if answer == Answer::Confirm {
                        let frame = format!(
                            r#"{{"identifier":{identifier},"type":"confirm_subscription"}}"#
                        );
                        return ws.send(Message::text(frame)).await.map_err(|_| ());
                    }
                }
            }
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
        }
        _ => {}
    }
    Ok(())
}

/// Width of the space-padded numbers in a blast frame (JSON allows whitespace before a value).
const SEQ_WIDTH: usize = 12;
const SENT_AT_WIDTH: usize = 17;
const CONVERSATION_WIDTH: usize = 8;

/// One WebSocket text frame (server to client: unmasked), header included.
fn ws_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// Writes `value` right-aligned in `field`, spaces in front.
fn patch_number(field: &mut [u8], mut value: u64) {
    let mut i = field.len();
    loop {
        i -= 1;
        field[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 || i == 0 {
            break;
        }
    }
    field[..i].fill(b' ');
}

/// A pre-encoded `message.created` frame and where its numbers are.
struct BlastTemplate {
    frame: Vec<u8>,
    seq_at: usize,
    sent_at_at: usize,
    conversation_at: usize,
}

impl BlastTemplate {
    fn new(identifier: &str) -> BlastTemplate {
        let (_, rest) = templates()
            .iter()
            .find(|(name, _)| name == "message.created")
            .expect("the message.created fixture exists");
        let pad = |w: usize| " ".repeat(w);
        let rest = rest.replacen(
            r#""conversation_id":87"#,
            &format!(r#""conversation_id":{}"#, pad(CONVERSATION_WIDTH)),
            1,
        );
        let identifier = serde_json::to_string(identifier).expect("a string serializes");
        let data = format!(
            r#"{{"mock_seq":{},"mock_sent_at_us":{},{rest}"#,
            pad(SEQ_WIDTH),
            pad(SENT_AT_WIDTH)
        );
        let payload = format!(
            r#"{{"identifier":{identifier},"message":{}}}"#,
            encode_message("message.created", &data)
        );
        let frame = ws_text_frame(payload.as_bytes());
        let find = |key: &str| {
            let needle = format!(r#""{key}":"#);
            frame
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .expect("the template has the key")
                + needle.len()
        };
        BlastTemplate {
            seq_at: find("mock_seq"),
            sent_at_at: find("mock_sent_at_us"),
            conversation_at: find("conversation_id"),
            frame,
        }
    }

    /// Appends the frame for one event.
    fn write(&mut self, out: &mut Vec<u8>, seq: u64, sent_at_us: u64, conversation: u64) {
        patch_number(&mut self.frame[self.seq_at..][..SEQ_WIDTH], seq);
        patch_number(
            &mut self.frame[self.sent_at_at..][..SENT_AT_WIDTH],
            sent_at_us,
        );
        patch_number(
            &mut self.frame[self.conversation_at..][..CONVERSATION_WIDTH],
            conversation,
        );
        out.extend_from_slice(&self.frame);
    }
}

/// Most frames written with one `write` in a blast.
const BLAST_CHUNK: u64 = 32;

/// Writes a connection's blast (see [`Blast`]), answering nothing meanwhile but keeping pings.
async fn run_blast(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
    shared: &Shared,
    blast: Blast,
    identifier: &str,
    ping: &mut tokio::time::Interval,
    cancel: &CancellationToken,
) -> Result<(), ()> {
    use tokio::io::AsyncWriteExt;
    while shared.streaming.load(Ordering::Relaxed) < shared.wait_for_subscriptions {
        tokio::select! {
            _ = cancel.cancelled() => return Err(()),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    ws.flush().await.map_err(|_| ())?;
    let mut template = BlastTemplate::new(identifier);
    let conversations = blast.conversations.max(1);
    let stream = ws.get_mut();
    let mut buffer = Vec::with_capacity(template.frame.len() * BLAST_CHUNK as usize);
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    while sent < blast.count {
        let due = match blast.rate {
            None => blast.count,
            Some(rate) => blast
                .count
                .min((start.elapsed().as_secs_f64() * rate) as u64 + 1),
        };
        if due <= sent {
            let rate = blast.rate.expect("only a paced blast waits");
            let next = start + Duration::from_secs_f64((sent as f64) / rate);
            tokio::select! {
                _ = cancel.cancelled() => return Err(()),
                _ = ping.tick() => {
                    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    let frame = ws_text_frame(format!(r#"{{"type":"ping","message":{now}}}"#).as_bytes());
                    stream.write_all(&frame).await.map_err(|_| ())?;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            continue;
        }
        let n = (due - sent).min(BLAST_CHUNK);
        let first = shared.sequence.fetch_add(n, Ordering::Relaxed);
        let sent_at_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        buffer.clear();
        for seq in first..first + n {
            template.write(&mut buffer, seq, sent_at_us, seq % conversations + 1);
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(()),
            written = stream.write_all(&buffer) => written.map_err(|_| ())?,
        }
        sent += n;
    }
    Ok(())
}
