//! The mock Chatwoot against real clients (tokio-tungstenite and reqwest): streams per identity,
//! silence for a wrong user or account, every event name, the REST API backed by the data it
//! broadcasts, and the controls (rotation, drop, stall, 429).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use chatwoot_bridge::mock::{
    MockAccount, MockConfig, MockContact, MockContactInbox, MockRole, MockServer, MockTls,
    MockUser, Subject, EVENT_NAMES,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a client listens to conclude that nothing comes (silence is the answer under test).
const QUIET: Duration = Duration::from_millis(400);

/// Bounds every wait for a frame that should come.
const PATIENCE: Duration = Duration::from_secs(15);

/// The mock's people: administrators 3 and 7 in account 1, administrator 9 in account 2, visitor
/// 42 in account 1.
async fn start() -> MockServer {
    start_serving(None).await
}

/// [`start`], serving `wss://` and `https://` with `tls` if given.
async fn start_serving(tls: Option<MockTls>) -> MockServer {
    MockServer::start(MockConfig { tls, ..people() })
        .await
        .expect("the mock starts")
}

/// The config of [`start`].
fn people() -> MockConfig {
    let user = |id: u64, accounts: Vec<u64>| MockUser {
        id,
        pubsub_token: format!("agent{id}"),
        api_access_token: Some(format!("api{id}")),
        accounts,
        role: MockRole::Administrator,
    };
    let account = |id: u64| MockAccount {
        id,
        name: format!("Account {id}"),
    };
    MockConfig {
        users: vec![user(3, vec![1]), user(7, vec![1]), user(9, vec![2])],
        contacts: vec![MockContact {
            id: 42,
            account_id: 1,
            pubsub_token: "visitor42".into(),
            public: Some(MockContactInbox {
                inbox_identifier: "widget-inbox".into(),
                source_id: "visitor-42-source".into(),
            }),
        }],
        accounts: vec![account(1), account(2)],
        ..MockConfig::default()
    }
}

/// A cable client, as a Chatwoot dashboard or widget is one.
struct Client {
    /// The socket.
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// An agent's identifier.
fn agent(token: &str, user_id: u64, account_id: u64) -> String {
    json!({"channel": "RoomChannel", "pubsub_token": token, "account_id": account_id,
           "user_id": user_id})
    .to_string()
}

/// A contact's identifier.
fn visitor(token: &str) -> String {
    json!({"channel": "RoomChannel", "pubsub_token": token}).to_string()
}

impl Client {
    async fn connect(server: &MockServer) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(server.url())
            .await
            .expect("the cable accepts");
        Client { ws }
    }

    async fn send(&mut self, command: &str, identifier: &str, data: Option<&str>) {
        let mut frame = json!({"command": command, "identifier": identifier});
        if let Some(data) = data {
            frame["data"] = data.into();
        }
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .unwrap();
    }

    async fn subscribe(&mut self, identifier: &str) {
        self.send("subscribe", identifier, None).await;
    }

    /// The next frame other than welcome and ping, within `wait`; `None` when nothing came.
    async fn next(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            let Some(Ok(Message::Text(text))) = frame else {
                return None;
            };
            let value: Value = serde_json::from_str(text.as_str()).unwrap();
            if !matches!(value["type"].as_str(), Some("welcome" | "ping")) {
                return Some(value);
            }
        }
    }

    /// The next frame, which must come.
    async fn expect(&mut self) -> Value {
        self.next(PATIENCE).await.expect("a frame within PATIENCE")
    }

    /// The next data frame's event name, which must come.
    async fn expect_event(&mut self) -> (String, Value) {
        let frame = self.expect().await;
        let message = &frame["message"];
        assert!(message.is_object(), "not an event: {frame}");
        (
            message["event"].as_str().unwrap().into(),
            message["data"].clone(),
        )
    }

    /// Asserts that nothing (no confirm, no event) arrives for a while.
    async fn expect_silence(&mut self) {
        if let Some(frame) = self.next(QUIET).await {
            panic!("expected silence, got {frame}");
        }
    }

    /// Subscribes as an agent and takes the confirm and the presence update that follow.
    async fn join_as_agent(&mut self, token: &str, user_id: u64, account_id: u64) {
        let identifier = agent(token, user_id, account_id);
        self.subscribe(&identifier).await;
        let confirm = self.expect().await;
        assert_eq!(confirm["type"], "confirm_subscription", "{confirm}");
        assert_eq!(confirm["identifier"], identifier.as_str());
        let (event, data) = self.expect_event().await;
        assert_eq!(event, "presence.update");
        assert_eq!(data["users"][user_id.to_string()], "online", "{data}");
    }
}

#[tokio::test]
async fn each_identity_gets_its_streams_and_a_wrong_user_or_account_gets_silence() {
    let server = start().await;
    let mut agent3 = Client::connect(&server).await;
    agent3.join_as_agent("agent3", 3, 1).await;
    let mut agent9 = Client::connect(&server).await;
    agent9.join_as_agent("agent9", 9, 2).await;
    let mut contact = Client::connect(&server).await;
    contact.subscribe(&visitor("visitor42")).await;
    assert_eq!(contact.expect().await["type"], "confirm_subscription");
    let mut wrong = Client::connect(&server).await;
    wrong.subscribe(&agent("agent3", 7, 1)).await;
    wrong.subscribe(&agent("agent3", 3, 2)).await;
    wrong.subscribe(&visitor("agent3")).await;
    wrong.subscribe(&agent("visitor42", 3, 1)).await;
    wrong.expect_silence().await;

    let display_id = server.create_conversation(1, Some(42)).unwrap();
    for client in [&mut agent3, &mut contact] {
        let (event, data) = client.expect_event().await;
        assert_eq!(event, "conversation.created");
        assert_eq!(
            (data["id"].as_u64(), data["account_id"].as_u64()),
            (Some(display_id), Some(1))
        );
    }
    let subject = Subject {
        account_id: 1,
        contact_id: Some(42),
        ..Subject::default()
    };
    server.emit("contact.created", &subject).unwrap();
    assert_eq!(agent3.expect_event().await.0, "contact.created");
    server
        .create_message(1, display_id, "internal", true)
        .unwrap();
    let (event, data) = agent3.expect_event().await;
    assert_eq!(
        (event.as_str(), &data["private"]),
        ("message.created", &json!(true))
    );
    server
        .create_message(1, display_id, "hello", false)
        .unwrap();
    let (_, data) = agent3.expect_event().await;
    assert_eq!(data["content"], "hello");
    // The contact saw neither contact.created nor the private note: the next is the message.
    let (event, data) = contact.expect_event().await;
    assert_eq!(
        (event.as_str(), &data["content"]),
        ("message.created", &json!("hello"))
    );
    for client in [&mut agent9, &mut contact, &mut wrong] {
        client.expect_silence().await;
    }
    assert_eq!(server.subscribe_commands(), 7);
    server.stop().await;
}

#[tokio::test]
async fn update_presence_answers_on_the_agents_own_stream() {
    let server = start().await;
    let mut agent3 = Client::connect(&server).await;
    agent3.join_as_agent("agent3", 3, 1).await;
    let mut agent7 = Client::connect(&server).await;
    agent7.join_as_agent("agent7", 7, 1).await;
    let action = r#"{"action":"update_presence"}"#;
    agent3
        .send("message", &agent("agent3", 3, 1), Some(action))
        .await;
    let (event, data) = agent3.expect_event().await;
    assert_eq!(
        (event.as_str(), &data["account_id"]),
        ("presence.update", &json!(1))
    );
    agent7.expect_silence().await;
    assert_eq!(server.presence_updates(), 1);
    server.stop().await;
}

#[tokio::test]
async fn every_chatwoot_event_name_reaches_an_agent_with_the_recorded_shape() {
    let server = start().await;
    let mut agent7 = Client::connect(&server).await;
    agent7.join_as_agent("agent7", 7, 1).await;
    let subject = Subject {
        account_id: 1,
        contact_id: Some(42),
        user_id: Some(7),
        private: false,
    };
    for event in EVENT_NAMES {
        server.emit(event, &subject).unwrap();
    }
    assert!(server.emit("conversation.exploded", &subject).is_none());
    let mut seen = BTreeSet::new();
    // Agent 7 is the typist here: its own typing never reaches it.
    while seen.len() < EVENT_NAMES.len() - 2 {
        let (event, data) = agent7.expect_event().await;
        assert_eq!(data["account_id"], 1, "{event}");
        assert!(data["mock_seq"].is_u64(), "{event}");
        seen.insert(event);
    }
    let expected: BTreeSet<String> = EVENT_NAMES
        .iter()
        .filter(|e| !e.starts_with("conversation.typing_"))
        .map(|e| e.to_string())
        .collect();
    assert_eq!(seen, expected);
    agent7.expect_silence().await;
    server.stop().await;
}

/// A GET to the mock's REST API: status, `Retry-After`, and the JSON body.
async fn get(server: &MockServer, path: &str, token: Option<&str>) -> (u16, Option<String>, Value) {
    let mut request = reqwest::Client::new().get(format!("{}{path}", server.api_url()));
    if let Some(token) = token {
        request = request.header("api_access_token", token);
    }
    let response = request.send().await.expect("the REST API answers");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = serde_json::from_str(&response.text().await.unwrap()).expect("a JSON body");
    (status, retry_after, body)
}

#[tokio::test]
async fn the_rest_api_answers_with_chatwoots_shapes_from_the_broadcast_data() {
    let server = start().await;
    let (status, _, profile) = get(&server, "/api/v1/profile", Some("api3")).await;
    assert_eq!(status, 200);
    assert_eq!(
        (&profile["id"], &profile["pubsub_token"]),
        (&json!(3), &json!("agent3"))
    );
    assert_eq!(profile["accounts"][0]["id"], 1);
    assert_eq!(profile["accounts"][0]["name"], "Account 1");
    assert!(profile["accounts"][0]["role"].is_string());
    assert_eq!(get(&server, "/api/v1/profile", Some("nope")).await.0, 401);
    assert_eq!(get(&server, "/api/v1/profile", None).await.0, 401);
    assert_eq!(
        get(&server, "/api/v1/accounts/2/conversations", Some("api3"))
            .await
            .0,
        401
    );

    for _ in 0..27 {
        server.create_conversation(1, Some(42)).unwrap();
    }
    let ids: Vec<u64> = (0..3)
        .map(|_| server.create_message(1, 5, "m", false).unwrap())
        .collect();
    let (status, _, first) = get(&server, "/api/v1/accounts/1/conversations", Some("api3")).await;
    assert_eq!(status, 200);
    assert_eq!(first["data"]["meta"]["all_count"], 27);
    let payload = first["data"]["payload"].as_array().unwrap();
    assert_eq!(payload.len(), 25);
    // Latest activity first: conversation 5 got the messages.
    assert_eq!(
        (&payload[0]["id"], &payload[0]["messages"][0]["id"]),
        (&json!(5), &json!(ids[2]))
    );
    assert!(payload[0]["updated_at"].is_f64() && payload[0]["last_activity_at"].is_u64());
    let path = "/api/v1/accounts/1/conversations?page=2";
    let (_, _, second) = get(&server, path, Some("api3")).await;
    assert_eq!(second["data"]["payload"].as_array().unwrap().len(), 2);
    let path = "/api/v1/accounts/1/conversations?updated_within=3600&status=all";
    let (_, _, recent) = get(&server, path, Some("api3")).await;
    assert_eq!(recent["data"]["payload"].as_array().unwrap().len(), 27);
    let path = "/api/v1/accounts/1/conversations?page=x";
    let (status, _, bad) = get(&server, path, Some("api3")).await;
    assert_eq!(
        (status, &bad["error"]),
        (400, &json!("page must be a whole number"))
    );

    let path = format!(
        "/api/v1/accounts/1/conversations/5/messages?after={}",
        ids[0]
    );
    let (status, _, messages) = get(&server, &path, Some("api3")).await;
    assert_eq!(status, 200);
    let listed: Vec<&Value> = messages["payload"].as_array().unwrap().iter().collect();
    assert_eq!(
        listed
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        ids[1..]
    );
    let message = listed[0];
    assert_eq!(
        (&message["conversation_id"], &message["message_type"]),
        (&json!(5), &json!(0))
    );
    assert_eq!(message["sender"]["id"], 42);
    assert!(
        message.get("account_id").is_none(),
        "narrower than the cable's: {message}"
    );
    let path = "/api/v1/accounts/1/conversations/99/messages";
    assert_eq!(get(&server, path, Some("api3")).await.0, 404);
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_token_goes_quiet_and_the_new_one_confirms_on_the_same_socket() {
    let server = start().await;
    let mut dashboard = Client::connect(&server).await;
    dashboard.join_as_agent("agent3", 3, 1).await;
    let new_token = server.rotate_pubsub_token(3).unwrap();
    assert_ne!(new_token, "agent3");
    let (_, _, profile) = get(&server, "/api/v1/profile", Some("api3")).await;
    assert_eq!(profile["pubsub_token"], new_token.as_str());
    let display_id = server.create_conversation(1, None).unwrap();
    dashboard.expect_silence().await;
    // The same socket, subscribed with the new token: confirmed, and it streams.
    dashboard.join_as_agent(&new_token, 3, 1).await;
    server
        .create_message(1, display_id, "after rotation", false)
        .unwrap();
    let frame = dashboard.expect().await;
    assert_eq!(frame["identifier"], agent(&new_token, 3, 1).as_str());
    dashboard.expect_silence().await;
    // A new socket with the old token: silence.
    let mut stale = Client::connect(&server).await;
    stale.subscribe(&agent("agent3", 3, 1)).await;
    stale.expect_silence().await;
    server.stop().await;
}

#[tokio::test]
async fn drop_closes_every_socket_and_clients_can_come_back() {
    let server = start().await;
    let mut first = Client::connect(&server).await;
    first.join_as_agent("agent3", 3, 1).await;
    let mut second = Client::connect(&server).await;
    second.subscribe(&visitor("visitor42")).await;
    second.expect().await;
    server.drop_connections();
    for client in [&mut first, &mut second] {
        // Frames already in flight may still come; then the socket ends.
        let ended = tokio::time::timeout(PATIENCE, async {
            while let Some(Ok(_)) = client.ws.next().await {}
        });
        ended.await.expect("the socket ends");
    }
    let mut again = Client::connect(&server).await;
    again.join_as_agent("agent3", 3, 1).await;
    assert_eq!(server.connections_accepted(), 3);
    server.stop().await;
}

#[tokio::test]
async fn a_refused_cable_keeps_sockets_down_while_rest_answers() {
    let server = start().await;
    let mut dashboard = Client::connect(&server).await;
    dashboard.join_as_agent("agent3", 3, 1).await;
    server.set_cable_refused(true);
    server.drop_connections();
    let refused = tokio_tungstenite::connect_async(server.url()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503)
        }
        other => panic!("expected a 503, got {:?}", other.map(|(_, r)| r.status())),
    }
    let display_id = server.create_conversation(1, None).unwrap();
    let message_id = server
        .create_message(1, display_id, "while down", false)
        .unwrap();
    let path = format!("/api/v1/accounts/1/conversations/{display_id}/messages?after=0");
    let (_, _, messages) = get(&server, &path, Some("api3")).await;
    assert_eq!(messages["payload"][0]["id"], message_id);
    server.set_cable_refused(false);
    let mut back = Client::connect(&server).await;
    back.join_as_agent("agent3", 3, 1).await;
    back.expect_silence().await;
    server.stop().await;
}

#[tokio::test]
async fn a_stall_keeps_sockets_quiet_while_rest_shows_the_new_messages() {
    let server = start().await;
    let mut dashboard = Client::connect(&server).await;
    dashboard.join_as_agent("agent3", 3, 1).await;
    let display_id = server.create_conversation(1, Some(42)).unwrap();
    dashboard.expect_event().await;
    server.set_stalled(true);
    let ids: Vec<u64> = (0..3)
        .map(|i| {
            server
                .create_message(1, display_id, &format!("m{i}"), false)
                .unwrap()
        })
        .collect();
    dashboard.expect_silence().await;
    let path = format!("/api/v1/accounts/1/conversations/{display_id}/messages?after=0");
    let (_, _, messages) = get(&server, &path, Some("api3")).await;
    let listed: Vec<u64> = messages["payload"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, ids);
    let path = "/api/v1/accounts/1/conversations?updated_within=60";
    let (_, _, recent) = get(&server, path, Some("api3")).await;
    assert_eq!(recent["data"]["payload"][0]["messages"][0]["id"], ids[2]);
    server.set_stalled(false);
    let resumed = server.create_message(1, display_id, "back", false).unwrap();
    let (_, data) = dashboard.expect_event().await;
    assert_eq!(data["id"], resumed);
    server.stop().await;
}

#[tokio::test]
async fn a_throttled_rest_api_answers_429_with_retry_after_until_released() {
    let server = start().await;
    server.set_rest_throttle(Some(Duration::from_millis(1_500)));
    let (status, retry_after, _) = get(&server, "/api/v1/profile", Some("api3")).await;
    assert_eq!((status, retry_after.as_deref()), (429, Some("2")));
    server.set_rest_throttle(None);
    assert_eq!(get(&server, "/api/v1/profile", Some("api3")).await.0, 200);
    assert_eq!(server.rest_requests(), 2);
    server.stop().await;
}

#[tokio::test]
async fn over_tls_the_rest_api_shares_the_cables_address_and_certificate() {
    let pki = support::Pki::make();
    let server = start_serving(Some(MockTls {
        cert_file: pki.server_cert.clone(),
        key_file: pki.server_key.clone(),
    }))
    .await;
    assert!(
        server.api_url().starts_with("https://"),
        "{}",
        server.api_url()
    );
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let response = client
        .get(format!("{}/api/v1/profile", server.api_url()))
        .header("api_access_token", "api3")
        .send()
        .await
        .expect("the REST API answers over TLS");
    assert_eq!(response.status().as_u16(), 200);
    let profile: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(profile["pubsub_token"], "agent3");
    server.stop().await;
}

#[tokio::test]
async fn with_users_the_generator_creates_messages_that_the_cable_and_rest_both_show() {
    let server = MockServer::start(MockConfig {
        rate: 200.0,
        count: Some(4),
        wait_for_subscriptions: 1,
        ..people()
    })
    .await
    .unwrap();
    let mut agent3 = Client::connect(&server).await;
    agent3.join_as_agent("agent3", 3, 1).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (event, data) = agent3.expect_event().await;
        assert_eq!(
            data["account_id"], 1,
            "account 2's traffic reached agent 3: {data}"
        );
        seen.push((event, data["id"].as_u64().unwrap()));
    }
    let names: Vec<&str> = seen.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names,
        [
            "conversation.created",
            "message.created",
            "conversation.created",
            "message.created"
        ]
    );
    let (_, _, listed) = get(&server, "/api/v1/accounts/1/conversations", Some("api3")).await;
    let payload = listed["data"]["payload"].as_array().unwrap();
    let mut last_messages: Vec<u64> = payload
        .iter()
        .map(|c| c["messages"][0]["id"].as_u64().unwrap())
        .collect();
    last_messages.sort();
    assert_eq!(last_messages, [seen[1].1, seen[3].1]);
    assert_eq!(server.messages(2, 1).len(), 1);
    agent3.expect_silence().await;
    server.stop().await;
}

/// [`people`] with two agents in account 1: 11 outside the mock's inbox, 12 a member of it.
fn people_with_agents() -> MockConfig {
    let mut config = people();
    let agent = |id: u64, inbox_member: bool| MockUser {
        id,
        pubsub_token: format!("agent{id}"),
        api_access_token: Some(format!("api{id}")),
        accounts: vec![1],
        role: MockRole::Agent { inbox_member },
    };
    config.users.extend([agent(11, false), agent(12, true)]);
    config
}

#[tokio::test]
async fn conversation_events_reach_the_inbox_members_and_administrators_only() {
    let server = MockServer::start(people_with_agents()).await.unwrap();
    let mut administrator = Client::connect(&server).await;
    administrator.join_as_agent("agent3", 3, 1).await;
    let mut member = Client::connect(&server).await;
    member.join_as_agent("agent12", 12, 1).await;
    let mut outsider = Client::connect(&server).await;
    outsider.join_as_agent("agent11", 11, 1).await;

    let display_id = server.create_conversation(1, Some(42)).unwrap();
    server
        .create_message(1, display_id, "hello", false)
        .unwrap();
    let subject = Subject {
        account_id: 1,
        contact_id: Some(42),
        user_id: Some(11),
        private: false,
    };
    for event in ["conversation.status_changed", "conversation.typing_on"] {
        server.emit(event, &subject).unwrap();
    }
    // The account stream still reaches the outsider, as do its own mentions.
    server.emit("contact.created", &subject).unwrap();
    server.emit("conversation.mentioned", &subject).unwrap();
    for client in [&mut administrator, &mut member] {
        let mut events = Vec::new();
        for _ in 0..5 {
            events.push(client.expect_event().await.0);
        }
        assert_eq!(
            events,
            [
                "conversation.created",
                "message.created",
                "conversation.status_changed",
                "conversation.typing_on",
                "contact.created"
            ]
        );
    }
    assert_eq!(outsider.expect_event().await.0, "contact.created");
    assert_eq!(outsider.expect_event().await.0, "conversation.mentioned");
    for client in [&mut administrator, &mut member, &mut outsider] {
        client.expect_silence().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn an_agent_outside_the_inbox_lists_no_conversation_and_may_not_read_its_messages() {
    let server = MockServer::start(people_with_agents()).await.unwrap();
    let display_id = server.create_conversation(1, Some(42)).unwrap();
    let message = server
        .create_message(1, display_id, "hello", false)
        .unwrap();
    let list = "/api/v1/accounts/1/conversations?status=all";
    let messages = format!("/api/v1/accounts/1/conversations/{display_id}/messages");
    for token in ["api3", "api12"] {
        let (status, _, listed) = get(&server, list, Some(token)).await;
        assert_eq!(status, 200, "{token}");
        assert_eq!(listed["data"]["payload"][0]["id"], display_id, "{token}");
        assert_eq!(listed["data"]["meta"]["all_count"], 1, "{token}");
        let (status, _, read) = get(&server, &messages, Some(token)).await;
        assert_eq!((status, &read["payload"][0]["id"]), (200, &json!(message)));
    }
    let (status, _, listed) = get(&server, list, Some("api11")).await;
    assert_eq!(status, 200);
    assert_eq!(listed["data"]["payload"], json!([]));
    assert_eq!(listed["data"]["meta"]["all_count"], 0);
    let (status, _, refused) = get(&server, &messages, Some("api11")).await;
    assert_eq!(
        (status, &refused["error"]),
        (401, &json!("You are not authorized to do this action"))
    );
    // A conversation that does not exist is 404 for everyone, as Chatwoot looks it up first.
    let missing = "/api/v1/accounts/1/conversations/99/messages";
    assert_eq!(get(&server, missing, Some("api11")).await.0, 404);
    let (_, _, profile) = get(&server, "/api/v1/profile", Some("api11")).await;
    assert_eq!(profile["role"], "agent");
    assert_eq!(profile["accounts"][0]["role"], "agent");
    let (_, _, profile) = get(&server, "/api/v1/profile", Some("api3")).await;
    assert_eq!(profile["role"], "administrator");
    server.stop().await;
}
