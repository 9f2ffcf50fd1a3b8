//! A Chatwoot for tests, the demo and benchmarks: its ActionCable server and the REST endpoints a
//! bridge reads, on one address.
//!
//! It greets with `welcome`, pings every 3 s, and answers `subscribe` as Chatwoot's `RoomChannel`
//! does for the users and contacts it knows (the right `user_id` and account, or silence; the
//! user's token and account streams, or the contact's token), and per configured token for any
//! other (confirm, silence, reject, or events without a confirm as old installs do). It ignores a
//! repeated subscribe like Chatwoot does. [`MockServer::emit`] sends any event name Chatwoot 4.x
//! broadcasts, shaped like the recorded fixtures, to the streams Chatwoot sends it to;
//! [`MockServer::create_message`] and friends change the records the REST API reads and
//! broadcast what Chatwoot would. Events carry a sequence number (`mock_seq`) and a send time
//! (`mock_sent_at_us`) at the start of `data`. Tests steer it from outside: drop every connection
//! abruptly, send `disconnect` frames, go silent, rotate a token, stall broadcasting, throttle
//! REST, inject raw frames.
//!
//! [`MockServer`] is the handle; `connection` serves one client, `identity` decides
//! subscriptions, `catalog` names the events and their audiences, `model` keeps the records,
//! `activity` emits events and creates records, `rest` answers the API, `events` makes the generated events, and `blast` writes pre-encoded
//! frames in high-rate mode.

mod activity;
mod blast;
mod catalog;
mod connection;
mod events;
pub mod fixtures;
mod identity;
mod model;
pub mod rest;
mod socket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls;
pub use catalog::{Subject, EVENT_NAMES};
use events::{encode_message, next_generated};
use identity::Directory;
pub use identity::{MockContact, MockContactInbox, MockRole, MockUser};
use model::Model;
pub use model::{MockAccount, MockMessage};

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
    /// Confirm only after this delay, or just before handling the client's next command if
    /// that comes first, as a server that fell behind answers in order: a client that gave up
    /// and unsubscribes gets the confirm after it gave up. Events stream from the subscribe on.
    ConfirmAfter(Duration),
}

/// One token the server knows.
#[derive(Debug, Clone)]
pub struct MockToken {
    /// The token as it appears in the subscription identifier.
    pub pubsub_token: String,
    /// How a subscription with it is answered.
    pub answer: Answer,
}

/// What the server does.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Address to listen on; port 0 picks a free one (see [`MockServer::addr`]).
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
    /// The `mock_seq` of the first event: a server restarted with the next unused number keeps
    /// every event's number unique across runs (the chaos run relies on that).
    pub first_seq: u64,
    /// Start generating only once this many subscriptions stream, so no generated event is
    /// broadcast to nobody.
    pub wait_for_subscriptions: usize,
    /// High-rate mode for benchmarks: each connection writes pre-encoded frames itself.
    pub blast: Option<Blast>,
    /// Serve `wss://` with this certificate instead of `ws://`, for tests of the bridge's TLS.
    pub tls: Option<MockTls>,
    /// Greet each connection with `welcome` (Chatwoot always does); off, a connection only
    /// pings, as a server that never finished setting the connection up, for tests of the
    /// bridge's welcome timer.
    pub send_welcome: bool,
    /// Agents and administrators: their tokens are answered as Chatwoot's `RoomChannel` does
    /// (right `user_id` and `account_id` or silence), whatever `tokens` says of them.
    pub users: Vec<MockUser>,
    /// Widget visitors: their tokens confirm without a `user_id` and stream the contact's events.
    pub contacts: Vec<MockContact>,
    /// Accounts conversations can be opened in ([`MockServer::create_conversation`]); the
    /// profile names them.
    pub accounts: Vec<MockAccount>,
}

/// The certificate a mock serving `wss://` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockTls {
    /// PEM certificate chain, the server's certificate first (valid for 127.0.0.1 when the
    /// bridge connects to the default listen address).
    pub cert_file: PathBuf,
    /// PEM private key of the certificate.
    pub key_file: PathBuf,
}

impl MockTls {
    /// The TLS acceptor of these files; an error names the file that is wrong.
    fn acceptor(&self) -> std::io::Result<TlsAcceptor> {
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let chain = tls::read_certificates(&self.cert_file).map_err(invalid)?;
        let key = tls::read_private_key(&self.key_file).map_err(invalid)?;
        let config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
            .map_err(|e| {
                invalid(format!(
                    "{} and {} do not make a TLS server: {e}",
                    self.cert_file.display(),
                    self.key_file.display()
                ))
            })?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
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
            first_seq: 0,
            wait_for_subscriptions: 0,
            blast: None,
            tls: None,
            send_welcome: true,
            users: Vec::new(),
            contacts: Vec::new(),
            accounts: Vec::new(),
        }
    }
}

/// Something pushed to every connection.
#[derive(Debug, Clone)]
enum Push {
    /// An event, pre-encoded as the `message` value, for subscriptions of `only` (or all).
    Event {
        /// The pubsub token whose subscriptions get it; `None` for all.
        only: Option<Arc<str>>,
        /// The `message` value of the frame.
        message: Arc<str>,
    },
    /// A raw text frame, sent as is.
    Raw(Arc<str>),
    /// Close TCP without a close frame, as a Chatwoot deploy does.
    Drop,
    /// A `disconnect` frame, then close.
    Disconnect {
        /// The frame's `reconnect` field.
        reconnect: bool,
    },
}

/// State shared by the server's tasks and its handle.
struct Shared {
    /// How each known pubsub token is answered; changeable while running.
    answers: Mutex<HashMap<String, Answer>>,
    /// How any other token is answered.
    unknown_answer: Answer,
    /// What the handle sends to every connection.
    pushes: broadcast::Sender<Push>,
    /// Whether connections send the heartbeat; off simulates a half-dead server.
    pings: AtomicBool,
    /// Handshakes completed, ever.
    connections: AtomicU64,
    /// Connections open right now.
    open_connections: AtomicUsize,
    /// `subscribe` commands received, repeated ones included.
    subscribes: AtomicU64,
    /// `unsubscribe` commands received.
    unsubscribes: AtomicU64,
    /// `update_presence` messages received.
    presence_updates: AtomicU64,
    /// Subscriptions that stream events right now.
    streaming: AtomicUsize,
    /// The next `mock_seq`: unique across connections and the generator.
    sequence: AtomicU64,
    /// `Origin` header of the latest handshake.
    last_origin: Mutex<Option<String>>,
    /// High-rate mode, if configured.
    blast: Option<Blast>,
    /// Streaming subscriptions a blast waits for before it starts.
    wait_for_subscriptions: usize,
    /// Whether connections are greeted with `welcome`.
    send_welcome: bool,
    /// The users and contacts, for subscriptions and for whom an emitted event reaches.
    directory: Mutex<Directory>,
    /// While set, [`MockServer::emit`] reaches no socket, as when Chatwoot's Sidekiq workers
    /// that broadcast are down (presence, broadcast by the cable process itself, goes on).
    stalled: AtomicBool,
    /// Conversations and messages, which [`MockServer::create_message`] changes and the REST
    /// API reads.
    model: Mutex<Model>,
    /// While set, every REST request is answered 429 with this `Retry-After`.
    rest_throttle: Mutex<Option<Duration>>,
    /// REST requests received, throttled ones included.
    rest_requests: AtomicU64,
    /// While set, WebSocket upgrades are answered 503 (the cable is down; REST still answers).
    cable_refused: AtomicBool,
}

/// A running mock server. Dropping it does not stop it; call [`MockServer::stop`].
pub struct MockServer {
    /// Where it listens.
    addr: SocketAddr,
    /// Whether it serves `wss://` (else `ws://`), for [`MockServer::url`].
    tls: bool,
    /// State shared with the connections.
    shared: Arc<Shared>,
    /// Stops the acceptor, the generator and every connection.
    cancel: CancellationToken,
    /// The server's tasks, waited for by [`MockServer::stop`].
    tasks: TaskTracker,
}

impl MockServer {
    /// Binds `config.listen` and starts accepting connections (and generating, if `rate` > 0).
    /// Fails when the address cannot be bound or `config.tls` names files that are wrong.
    pub async fn start(config: MockConfig) -> std::io::Result<MockServer> {
        let acceptor = config.tls.as_ref().map(MockTls::acceptor).transpose()?;
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
            sequence: AtomicU64::new(config.first_seq),
            last_origin: Mutex::new(None),
            blast: config.blast,
            wait_for_subscriptions: config.wait_for_subscriptions,
            send_welcome: config.send_welcome,
            directory: Mutex::new(Directory {
                users: config.users,
                contacts: config.contacts,
                ..Directory::default()
            }),
            stalled: AtomicBool::new(false),
            model: Mutex::new(Model {
                accounts: config.accounts,
                ..Model::default()
            }),
            rest_throttle: Mutex::new(None),
            rest_requests: AtomicU64::new(0),
            cable_refused: AtomicBool::new(false),
        });
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let tls = acceptor.is_some();
        tasks.spawn(connection::accept_loop(
            listener,
            acceptor,
            shared.clone(),
            config.ping_interval,
            cancel.clone(),
            tasks.clone(),
        ));
        if config.rate > 0.0 {
            tasks.spawn(events::generate(
                shared.clone(),
                config.rate,
                config.count,
                config.wait_for_subscriptions,
                cancel.clone(),
            ));
        }
        Ok(MockServer {
            addr,
            tls,
            shared,
            cancel,
            tasks,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cable URL to give the bridge: `wss://` when it serves TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}/cable", self.addr)
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

    /// Broadcasts `event` (one of [`EVENT_NAMES`]) with a payload of its recorded shape to the
    /// streams Chatwoot sends it to for `subject` (see [`Subject`]), numbered with `mock_seq`
    /// and `mock_sent_at_us` like generated events. Returns the sequence number, or `None` for
    /// a name Chatwoot does not broadcast. While stalled ([`MockServer::set_stalled`]) nothing is
    /// sent (the number is still used).
    pub fn emit(&self, event: &str, subject: &Subject) -> Option<u64> {
        self.shared.emit_patched(event, subject, |_| {})
    }

    /// Broadcasts `event` with `data` (a JSON object, sent as is) to the streams Chatwoot sends
    /// it to for `subject`; `None` for a name Chatwoot does not broadcast. Nothing is sent while
    /// stalled.
    pub fn emit_data(&self, event: &str, data: &str, subject: &Subject) -> Option<()> {
        self.shared.emit_data(event, data, subject)
    }

    /// Stalls (or resumes) broadcasting: sockets stay open and ping, subscriptions confirm, but
    /// [`MockServer::emit`] reaches nobody, as when Chatwoot's background workers are down
    /// (`presence.update`, which the cable process broadcasts itself, goes on). Events emitted
    /// meanwhile are lost, as Chatwoot's are.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::Relaxed);
    }

    /// Gives user `user_id` a new pubsub token, as a password change does in Chatwoot, and
    /// returns it (`None` for an unknown user). Open subscriptions with the old token stay open
    /// but its stream goes quiet (only their account stream still carries `contact.*`, as in
    /// Chatwoot); a new subscribe with the old token gets silence, one with the new token
    /// confirms.
    pub fn rotate_pubsub_token(&self, user_id: u64) -> Option<String> {
        let new_token: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(24)
            .collect();
        let mut directory = self.shared.directory.lock().expect("directory lock");
        let user = directory.users.iter_mut().find(|u| u.id == user_id)?;
        let old = std::mem::replace(&mut user.pubsub_token, new_token.clone());
        directory.retired_tokens.insert(old);
        Some(new_token)
    }

    /// Opens a conversation in `account_id` with `contact_id` and broadcasts
    /// `conversation.created` (to the account's users who see conversations, [`MockRole`], and
    /// the contact); returns its display id,
    /// or `None` for an account not in [`MockConfig::accounts`].
    pub fn create_conversation(&self, account_id: u64, contact_id: Option<u64>) -> Option<u64> {
        self.shared.create_conversation(account_id, contact_id)
    }

    /// Adds a message to conversation `display_id` of `account_id` (from the contact, or a
    /// private note from an agent), moves the conversation's `updated_at` and
    /// `last_activity_at`, and broadcasts `message.created` (to the account's users who see
    /// conversations and, unless a private note, the contact).
    /// Returns the message id, or `None` for an unknown conversation. While stalled the REST
    /// API shows the message and no socket receives it.
    pub fn create_message(
        &self,
        account_id: u64,
        display_id: u64,
        content: &str,
        private: bool,
    ) -> Option<u64> {
        self.shared
            .create_message(account_id, display_id, content, private)
    }

    /// The messages of conversation `display_id` of `account_id`, oldest first.
    pub fn messages(&self, account_id: u64, display_id: u64) -> Vec<MockMessage> {
        let model = self.shared.model.lock().expect("model lock");
        model
            .conversation(account_id, display_id)
            .map(|c| c.messages.clone())
            .unwrap_or_default()
    }

    /// Answers every REST request with 429 and `Retry-After` (whole seconds, rounded up) while
    /// `Some`; `None` serves again.
    pub fn set_rest_throttle(&self, retry_after: Option<Duration>) {
        *self.shared.rest_throttle.lock().expect("throttle lock") = retry_after;
    }

    /// Refuses (or accepts again) new cable connections: their upgrade is answered 503, as a
    /// proxy answers while Chatwoot's cable is down, and REST keeps answering. Open sockets are
    /// not touched: [`MockServer::drop_connections`] with this keeps every socket down for as
    /// long as a test wants.
    pub fn set_cable_refused(&self, refused: bool) {
        self.shared.cable_refused.store(refused, Ordering::Relaxed);
    }

    /// REST requests received since start, throttled ones included.
    pub fn rest_requests(&self) -> u64 {
        self.shared.rest_requests.load(Ordering::Relaxed)
    }

    /// The REST API's base URL (`http(s)://addr`), on the cable's address as in Chatwoot.
    pub fn api_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// User `user_id` as the server knows it now (its current pubsub token included).
    pub fn user(&self, user_id: u64) -> Option<MockUser> {
        let directory = self.shared.directory.lock().expect("directory lock");
        directory.users.iter().find(|u| u.id == user_id).cloned()
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

    /// Changes how a token is answered from now on (a rotated token goes silent). Tokens of
    /// [`MockConfig::users`] and [`MockConfig::contacts`] are answered as `RoomChannel` answers
    /// them whatever this says: rotate those with [`MockServer::rotate_pubsub_token`].
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

    /// WebSocket handshakes completed since start.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    /// `subscribe` commands received since start, repeated ones included.
    pub fn subscribe_commands(&self) -> u64 {
        self.shared.subscribes.load(Ordering::Relaxed)
    }

    /// `unsubscribe` commands received since start.
    pub fn unsubscribe_commands(&self) -> u64 {
        self.shared.unsubscribes.load(Ordering::Relaxed)
    }

    /// `update_presence` messages received since start.
    pub fn presence_updates(&self) -> u64 {
        self.shared.presence_updates.load(Ordering::Relaxed)
    }

    /// The `Origin` header of the latest handshake, if it had one.
    pub fn last_origin(&self) -> Option<String> {
        self.shared.last_origin.lock().expect("origin lock").clone()
    }

    /// Stops accepting, closes every connection abruptly, and waits for the tasks.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Sends `push` to every open connection.
    fn push(&self, push: Push) {
        // No receivers just means no connection is open.
        let _ = self.shared.pushes.send(push);
    }
}

/// A connection or task cannot go on: its socket failed, or the server is stopping.
#[derive(Debug)]
struct Closed;

#[cfg(test)]
mod tests {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    use super::*;

    #[tokio::test]
    async fn generated_events_are_numbered_from_first_seq() {
        let server = MockServer::start(MockConfig {
            first_seq: 5_000,
            ..MockConfig::default()
        })
        .await
        .unwrap();
        assert_eq!(server.broadcast_generated(), 5_000);
        assert_eq!(server.broadcast_generated(), 5_001);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_tls_listener_with_a_wrong_file_does_not_start_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("server.pem"), dir.path().join("server.key"));
        std::fs::write(&key_file, "not a key\n").unwrap();
        let tls = MockTls {
            cert_file: cert_file.clone(),
            key_file,
        };
        let start = MockServer::start(MockConfig {
            tls: Some(tls),
            ..MockConfig::default()
        });
        let error = start
            .await
            .err()
            .expect("no server without its certificate");
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
        let error = error.to_string();
        assert!(
            error.starts_with(&format!("cannot read {}", cert_file.display())),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_blast_sends_every_event_once_then_the_connection_serves_as_usual() {
        let server = MockServer::start(MockConfig {
            tokens: vec![MockToken {
                pubsub_token: "t".into(),
                answer: Answer::Confirm,
            }],
            blast: Some(Blast {
                count: 100,
                rate: None,
                conversations: 3,
            }),
            ..MockConfig::default()
        })
        .await
        .unwrap();
        let (mut ws, _) = tokio_tungstenite::connect_async(server.url())
            .await
            .unwrap();
        let identifier = r#"{"channel":"RoomChannel","pubsub_token":"t"}"#;
        let subscribe = serde_json::json!({"command": "subscribe", "identifier": identifier});
        ws.send(Message::text(subscribe.to_string())).await.unwrap();
        let mut seqs = Vec::new();
        let mut conversations = std::collections::BTreeSet::new();
        while seqs.len() < 100 {
            let Some(Ok(Message::Text(text))) = ws.next().await else {
                panic!("the connection ended early");
            };
            let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            if let Some(data) = frame["message"]["data"].as_object() {
                seqs.push(data["mock_seq"].as_u64().unwrap());
                conversations.insert(data["conversation_id"].as_u64().unwrap());
            }
        }
        assert_eq!(seqs, (0..100).collect::<Vec<_>>());
        assert_eq!(conversations, [1, 2, 3].into());
        server.broadcast_generated();
        let text = loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) if text.contains("mock_seq") => break text,
                Some(Ok(_)) => continue,
                other => panic!("no broadcast after the blast: {other:?}"),
            }
        };
        assert!(text.contains(r#""mock_seq":100"#), "{text}");
        server.stop().await;
    }

    #[tokio::test]
    async fn emitted_events_carry_their_numbers_first_like_generated_ones() {
        let server = MockServer::start(MockConfig {
            users: vec![MockUser {
                id: 3,
                pubsub_token: "agent".into(),
                api_access_token: None,
                accounts: vec![1],
                role: MockRole::default(),
            }],
            first_seq: 70,
            ..MockConfig::default()
        })
        .await
        .unwrap();
        let (mut ws, _) = tokio_tungstenite::connect_async(server.url())
            .await
            .unwrap();
        let identifier =
            r#"{"channel":"RoomChannel","pubsub_token":"agent","account_id":1,"user_id":3}"#;
        let subscribe = serde_json::json!({"command": "subscribe", "identifier": identifier});
        ws.send(Message::text(subscribe.to_string())).await.unwrap();
        let subject = Subject {
            account_id: 1,
            ..Subject::default()
        };
        // Sent once the subscription streams: after its presence update.
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) if text.contains("presence.update") => break,
                Some(Ok(_)) => continue,
                other => panic!("no presence update: {other:?}"),
            }
        }
        assert_eq!(server.emit("contact.deleted", &subject), Some(70));
        let text = loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) if text.contains("contact.deleted") => break text,
                Some(Ok(_)) => continue,
                other => panic!("no contact.deleted: {other:?}"),
            }
        };
        assert!(
            text.contains(r#""data":{"mock_seq":70,"mock_sent_at_us":"#),
            "{text}"
        );
        server.stop().await;
    }
}
