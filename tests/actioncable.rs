//! The bridge against a real Rails ActionCable server (Debian's ruby-actioncable on puma) whose
//! RoomChannel is written the way Chatwoot's is (tests/actioncable/config.ru): what the mock
//! Chatwoot promises about the protocol, checked against the implementation Chatwoot runs.
//! Streams per identity (the user's token, the account for agents, the contact's token), silence
//! for a wrong user or account, presence in answer to a subscribe, a rotated pubsub token
//! followed, a gap backfilled over the REST API the app answers as Chatwoot does, and a stall of
//! Chatwoot's broadcasting (its workers down while the socket stays subscribed) noticed from
//! that REST API and backfilled.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatwoot_bridge::status::{TokenState, TokenStatus};
use chatwoot_bridge::Bridge;
use serde_json::{json, Value};
use support::{
    assert_each_message_once, backfilled_conversations, events_in, free_port, quoted, shut_down,
    wait_for_messages, wait_until, wait_until_async, BridgeYaml, POLL, WAIT,
};

/// A puma serving tests/actioncable/config.ru on a free loopback port; killed on drop.
struct RailsCable {
    /// The puma process.
    child: Child,
    /// Its loopback port.
    port: u16,
    /// For the test controls (`/test/broadcast`, `/test/rotate`).
    http: reqwest::Client,
}

impl RailsCable {
    /// Starts puma on a free port and waits until the app answers; fails saying how to install
    /// what is missing.
    async fn start() -> RailsCable {
        RailsCable::start_on(free_port(), "").await
    }

    /// Starts puma on `port`, with the users' tokens `rotated` already (`1=token,...`).
    async fn start_on(port: u16, rotated: &str) -> RailsCable {
        let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/actioncable/config.ru");
        let has_actioncable = Command::new("ruby")
            .args(["-e", "require 'action_cable'"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            has_actioncable,
            "Rails ActionCable is missing: apt-get install -y ruby-actioncable puma \
             (scripts/install-test-deps.sh installs them)"
        );
        let child = Command::new("puma")
            .env("ROTATED", rotated)
            .args(["-b", &format!("tcp://127.0.0.1:{port}"), "-t", "1:8"])
            .arg(&app)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run puma ({e}): apt-get install -y puma ruby-actioncable")
            });
        let cable = RailsCable {
            child,
            port,
            http: reqwest::Client::new(),
        };
        let ready = format!("{}/test/ready", cable.base());
        let started = tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(answer) = cable.http.get(&ready).send().await {
                    if answer.status().is_success() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(started.is_ok(), "puma did not answer on port {port}");
        cable
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The cable's URL.
    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/cable", self.port)
    }

    /// `POST {path}` of the test controls with `body`; the JSON answer.
    async fn control(&self, path: &str, body: Value) -> Value {
        let answer = self
            .http
            .post(format!("{}{path}", self.base()))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{path}: {answer:?}");
        serde_json::from_str(&answer.text().await.unwrap()).expect("a JSON answer")
    }

    /// `ActionCable.server.broadcast(stream, {event:, data:})`, as Chatwoot's jobs do.
    async fn broadcast(&self, stream: &str, event: &str, data: Value) {
        let body = json!({ "stream": stream, "event": event, "data": data });
        self.control("/test/broadcast", body).await;
    }
}

impl RailsCable {
    /// `POST /test/rotate`: the user's pubsub token changes, as when its password does.
    async fn rotate(&self, user_id: u64, pubsub_token: &str) {
        let body = json!({ "user_id": user_id, "pubsub_token": pubsub_token });
        self.control("/test/rotate", body).await;
    }

    /// `POST /test/conversation`: a visitor opens a conversation in account 1; its display id.
    async fn create_conversation(&self) -> u64 {
        let answer = self
            .control("/test/conversation", json!({ "account_id": 1 }))
            .await;
        answer["id"].as_u64().expect("a display id")
    }

    /// `POST /test/message`: the visitor writes `n` messages in `conversation` of account 1,
    /// each stored and broadcast as Chatwoot does; their ids.
    async fn create_messages(&self, conversation: u64, n: usize) -> Vec<u64> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let body = json!({ "account_id": 1, "conversation_id": conversation,
                               "content": format!("message {i}") });
            let answer = self.control("/test/message", body).await;
            ids.push(answer["id"].as_u64().expect("a message id"));
        }
        ids
    }

    /// `POST /test/cable_down`: every socket closed, and the cable refused for `seconds`.
    async fn cable_down(&self, seconds: u64) {
        self.control("/test/cable_down", json!({ "seconds": seconds }))
            .await;
    }

    /// `POST /test/stall`: Chatwoot's workers stop (`true`) or run again (`false`); while
    /// stopped, created conversations and messages are stored and broadcast to nobody.
    async fn set_stalled(&self, stalled: bool) {
        let answer = self
            .control("/test/stall", json!({ "stalled": stalled }))
            .await;
        assert_eq!(answer["stalled"], stalled, "{answer}");
    }

    /// Stops puma (every socket drops, as in a Chatwoot deploy).
    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for RailsCable {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fast timings, every event to the file `out`.
fn config(url: &str, out: &Path) -> BridgeYaml {
    BridgeYaml::new(url)
        .cable("confirm_timeout: 1s")
        .cable("reconnect: { initial: 50ms, max: 500ms }")
        .sink(
            "archive",
            &format!("{{ type: file, path: {} }}", quoted(out)),
        )
        .route("{ name: everything, match: {}, to: [archive] }")
        .spool(&out.with_extension("spool"))
}

/// What `token` read of `event`, as the `data.id`s.
fn ids(events: &[Value], token: &str, event: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| {
            e["chatwoottoken"] == token && e["type"].as_str().is_some_and(|t| t.ends_with(event))
        })
        .filter_map(|e| e["data"]["id"].as_u64())
        .collect()
}

async fn wait_state(bridge: &Bridge, name: &str, state: TokenState) {
    let reached = bridge
        .status()
        .wait_for(WAIT, |b| b.token(name).is_some_and(|t| t.state == state))
        .await;
    assert!(
        reached,
        "{name} never {state}: {:?}",
        bridge.status().token(name)
    );
}

#[tokio::test]
async fn each_identity_gets_the_streams_chatwoots_room_channel_gives_it() {
    let rails = RailsCable::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let config = config(&rails.url(), &out)
        .token("{ name: agent, pubsub_token: agent-token-1, account_id: 1, user_id: 1 }")
        .token("{ name: visitor, pubsub_token: contact-token-1 }")
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    wait_state(&bridge, "visitor", TokenState::Subscribed).await;

    let message = |id: u64| json!({ "id": id, "account_id": 1, "conversation_id": 7 });
    rails
        .broadcast("agent-token-1", "message.created", message(101))
        .await;
    rails
        .broadcast(
            "account_1",
            "contact.created",
            json!({ "id": 9, "account_id": 1 }),
        )
        .await;
    rails
        .broadcast("contact-token-1", "message.created", message(102))
        .await;
    rails
        .broadcast(
            "account_2",
            "contact.created",
            json!({ "id": 10, "account_id": 2 }),
        )
        .await;
    let mut events = Vec::new();
    wait_until("the broadcasts to reach the file", || {
        events = events_in(&out);
        !ids(&events, "visitor", "message.created").is_empty()
            && !ids(&events, "agent", "contact.created").is_empty()
            && !ids(&events, "agent", "message.created").is_empty()
    })
    .await;
    shut_down(bridge).await;
    let events = events_in(&out);

    assert_eq!(
        ids(&events, "agent", "message.created"),
        [101],
        "the user's token stream"
    );
    assert_eq!(
        ids(&events, "agent", "contact.created"),
        [9],
        "the account's stream, not another's"
    );
    assert_eq!(
        ids(&events, "visitor", "message.created"),
        [102],
        "the contact's token stream"
    );
    assert!(
        ids(&events, "visitor", "contact.created").is_empty(),
        "contact.* travels on the account stream, which a contact never gets"
    );
    // The agent's own presence.update races its stream: RoomChannel broadcasts it from
    // `subscribed`, while `stream_from` attaches asynchronously, so it may never arrive (as
    // PROTOCOL.md says of Chatwoot). A contact's subscription has no account: it never gets one.
    let visitor_presence = events
        .iter()
        .filter(|e| e["chatwoottoken"] == "visitor")
        .filter(|e| {
            e["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("presence.update"))
        })
        .count();
    assert_eq!(visitor_presence, 0);
}

#[tokio::test]
async fn a_wrong_user_or_account_is_answered_with_silence() {
    let rails = RailsCable::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let config = config(&rails.url(), &out)
        .token("{ name: wrong-user, pubsub_token: agent-token-1, account_id: 1, user_id: 2 }")
        .token("{ name: wrong-account, pubsub_token: agent-token-1, account_id: 2, user_id: 1 }")
        .token("{ name: unknown, pubsub_token: nobody }")
        .token("{ name: right, pubsub_token: agent-token-2, account_id: 2, user_id: 2 }")
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    wait_state(&bridge, "right", TokenState::Subscribed).await;
    for name in ["wrong-user", "wrong-account", "unknown"] {
        wait_state(&bridge, name, TokenState::Unconfirmed).await;
    }
    rails
        .broadcast(
            "agent-token-1",
            "message.created",
            json!({ "id": 201, "account_id": 1 }),
        )
        .await;
    rails
        .broadcast(
            "account_2",
            "contact.created",
            json!({ "id": 202, "account_id": 2 }),
        )
        .await;
    wait_until("the right token to read the account broadcast", || {
        !ids(&events_in(&out), "right", "contact.created").is_empty()
    })
    .await;
    shut_down(bridge).await;
    let events = events_in(&out);
    for name in ["wrong-user", "wrong-account", "unknown"] {
        let status_events: Vec<&Value> = events
            .iter()
            .filter(|e| e["chatwoottoken"] == name)
            .collect();
        assert!(
            status_events.is_empty(),
            "{name} read nothing: {status_events:?}"
        );
    }
}

#[tokio::test]
async fn a_rotated_token_is_followed_on_the_same_socket_and_the_old_stream_is_dropped() {
    let rails = RailsCable::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let config = config(&rails.url(), &out)
        .token("{ name: agent, api_access_token: api-1, account_id: 1, refresh_interval: 1s }")
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;

    rails.rotate(1, "agent-token-1-rotated").await;
    let rotated = bridge
        .status()
        .wait_for(WAIT, |b| b.token("agent").is_some_and(|t| t.rotations == 1))
        .await;
    assert!(
        rotated,
        "the refresh found the rotation: {:?}",
        bridge.status().token("agent")
    );
    let message = |id: u64| json!({ "id": id, "account_id": 1, "conversation_id": 7 });
    // Broadcast to the new token until one arrives: the new subscription confirms, then the old
    // one is unsubscribed.
    let mut next = 300;
    wait_until_async("the rotated token's stream to reach the file", || {
        next += 1;
        let (rails, out, id) = (&rails, &out, next);
        async move {
            rails
                .broadcast("agent-token-1-rotated", "message.created", message(id))
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            !ids(&events_in(out), "agent", "message.created").is_empty()
        }
    })
    .await;
    // The old subscription is unsubscribed right after the new one's confirm, which may come
    // after the new stream's first data: probe the old stream, then mark the new one, until a
    // marker arrives without its probe.
    let mut probe = 900;
    wait_until_async("a broadcast to the old token to stay away", || {
        probe += 1;
        let (rails, out, probe) = (&rails, &out, probe);
        async move {
            rails
                .broadcast("agent-token-1", "message.created", message(probe))
                .await;
            let marker = probe + 1000;
            rails
                .broadcast("agent-token-1-rotated", "message.created", message(marker))
                .await;
            loop {
                let delivered = ids(&events_in(out), "agent", "message.created");
                if delivered.contains(&marker) {
                    return !delivered.contains(&probe);
                }
                tokio::time::sleep(POLL).await;
            }
        }
    })
    .await;
    // Whatever its stream's order, the probe would have come by a later round trip.
    rails
        .broadcast("agent-token-1-rotated", "message.created", message(5000))
        .await;
    wait_until("the last broadcast to the rotated token", || {
        ids(&events_in(&out), "agent", "message.created").contains(&5000)
    })
    .await;
    assert!(
        !ids(&events_in(&out), "agent", "message.created").contains(&probe),
        "the old token's stream was unsubscribed"
    );
    let status = bridge.status().token("agent").unwrap();
    shut_down(bridge).await;
    assert_eq!(status.connects, 1, "the same socket all along");
}

#[tokio::test]
async fn after_a_restart_with_a_rotated_token_the_unconfirmed_subscription_reads_the_profile() {
    let rails = RailsCable::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    // The refresh is an hour away: only the unconfirmed path can find the new token.
    let config = config(&rails.url(), &out)
        .token("{ name: agent, api_access_token: api-1, account_id: 1, refresh_interval: 1h }")
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;

    // Chatwoot restarts while the user changed password: every socket drops, and the token the
    // bridge subscribed with is met with silence.
    let port = rails.stop();
    let rails = RailsCable::start_on(port, "1=agent-token-1-new").await;
    let rotated = bridge
        .status()
        .wait_for(WAIT, |b| {
            b.token("agent")
                .is_some_and(|t| t.rotations == 1 && t.state == TokenState::Subscribed)
        })
        .await;
    assert!(rotated, "{:?}", bridge.status().token("agent"));
    rails
        .broadcast(
            "agent-token-1-new",
            "message.created",
            json!({ "id": 401, "account_id": 1 }),
        )
        .await;
    wait_until("the new token's broadcast", || {
        ids(&events_in(&out), "agent", "message.created").contains(&401)
    })
    .await;
    let status = bridge.status().token("agent").unwrap();
    shut_down(bridge).await;
    assert!(
        status.connects >= 2,
        "reconnected after the restart: {status:?}"
    );
}

#[tokio::test]
async fn messages_created_while_the_cable_is_down_are_backfilled_once_from_the_rest_api() {
    let rails = RailsCable::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let config = config(&rails.url(), &out)
        .token("{ name: agent, api_access_token: api-1, account_id: 1, refresh_interval: 1h, backfill: true }")
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    let known = rails.create_conversation().await;
    let live = rails.create_messages(known, 5).await;
    wait_for_messages(&out, &live, "the live messages").await;

    // A Chatwoot deploy: sockets closed and refused for 5 s while 50 messages are created, in
    // the conversation the socket knows (read with `after`) and in one it never saw (read
    // backwards, 20 a page).
    rails.cable_down(5).await;
    let mut missed = rails.create_messages(known, 25).await;
    let unseen = rails.create_conversation().await;
    missed.extend(rails.create_messages(unseen, 25).await);

    let backfilled = bridge
        .status()
        .wait_for(WAIT, |b| b.token("agent").is_some_and(|t| t.backfills == 1))
        .await;
    let status = bridge.status().token("agent").unwrap();
    assert!(backfilled, "the backfill ran: {status:?}");
    wait_for_messages(&out, &missed, "the backfilled messages in the file").await;
    // After the shutdown, which delivers everything spooled: a late duplicate would show.
    shut_down(bridge).await;
    assert_each_message_once(&out, &missed, &live);
    let updated = backfilled_conversations(&out);
    assert!(
        updated.contains(&known) && updated.contains(&unseen),
        "a conversation.updated per listed conversation: {updated:?}"
    );
    assert!(
        status.connects >= 2,
        "reconnected after the deploy: {status:?}"
    );
    assert!(status.backfilled_events >= 52, "{status:?}");
    assert_eq!(status.backfill_gaps_given_up, 0);
}

/// How long activity may stay undelivered before the stall test's agent calls it a stall; it
/// checks every quarter of it.
const STALL_AFTER: Duration = Duration::from_secs(2);

/// What the agent's status says once `holds` does, failing the test after [`WAIT`] naming `what`.
async fn agent_when(
    bridge: &Bridge,
    what: &str,
    holds: impl Fn(&TokenStatus) -> bool,
) -> TokenStatus {
    let reached = bridge
        .status()
        .wait_for(WAIT, |b| b.token("agent").is_some_and(|t| holds(&t)))
        .await;
    let status = bridge.status().token("agent").unwrap();
    assert!(reached, "{what}: {status:?}");
    status
}

#[tokio::test]
async fn a_stall_of_broadcasting_is_noticed_from_the_rest_api_and_backfilled() {
    let rails = RailsCable::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let config = config(&rails.url(), &out)
        .token(
            "{ name: agent, api_access_token: api-1, account_id: 1, refresh_interval: 1h, \
             backfill: true, stall_after: 2s }",
        )
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    wait_state(&bridge, "agent", TokenState::Subscribed).await;
    let conversation = rails.create_conversation().await;
    let mut live = rails.create_messages(conversation, 3).await;
    wait_for_messages(&out, &live, "the live messages").await;
    // The first stall check after a confirm counts only activity after the confirm's second
    // (what moved before it is a reconnect gap's, read by that backfill); Chatwoot's
    // last_activity_at is in whole seconds, so the stalled messages must come in a later one.
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    // Chatwoot's Sidekiq stops: the socket stays connected, pinged and subscribed, and the
    // messages are stored, shown by the REST API and broadcast to nobody.
    rails.set_stalled(true).await;
    let stalled_at = Instant::now();
    let missed = rails.create_messages(conversation, 10).await;
    let status = agent_when(&bridge, "the stall noticed", |t| {
        t.stalls == 1 && t.stalled_since.is_some()
    })
    .await;
    let noticed_after = stalled_at.elapsed();
    assert!(
        noticed_after >= STALL_AFTER,
        "a stall is activity undelivered for stall_after; noticed after {noticed_after:?}"
    );
    assert_eq!(status.connects, 1, "the first socket all along: {status:?}");
    assert_eq!(status.state, TokenState::Subscribed, "{status:?}");
    wait_for_messages(&out, &missed, "the stalled messages backfilled").await;

    // The workers are back: the socket delivers again, which ends the stall.
    rails.set_stalled(false).await;
    let after = rails.create_messages(conversation, 1).await;
    let status = agent_when(&bridge, "the stall over", |t| t.stalled_since.is_none()).await;
    assert_eq!((status.stalls, status.connects), (1, 1), "{status:?}");
    assert_eq!(status.state, TokenState::Subscribed, "{status:?}");
    wait_for_messages(&out, &after, "the live message after the stall").await;
    // After the shutdown, which delivers everything spooled: a late duplicate would show.
    shut_down(bridge).await;
    live.extend(after);
    assert_each_message_once(&out, &missed, &live);
    assert!(
        backfilled_conversations(&out).contains(&conversation),
        "the stalled conversation's backfilled conversation.updated"
    );
}
