//! Tokens given as a user's API access token: the profile comes from a real HTTP server the
//! test controls, the socket from the mock Chatwoot. A rotated pubsub token is followed on the
//! same socket, by the periodic refresh and by the unconfirmed path; a refused access token and
//! a foreign account show on the status board; no secret reaches the logs. A contact given by
//! its inbox and contact identifiers reads its pubsub token from the same server's public
//! contact API.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatwoot_bridge::mock::{Answer, MockConfig, MockServer, MockToken};
use chatwoot_bridge::status::{TokenState, TokenStatus};
use chatwoot_bridge::Bridge;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::{mock_token, quoted, shut_down, start_mock, wait_until_explained, BridgeYaml, WAIT};
use tokio::net::TcpListener;

/// The access token the profile server accepts; it must never be logged.
const ACCESS_TOKEN: &str = "access-token-SECRET-1";

/// A profile endpoint: answers `GET /api/v1/profile` as `answer` says when the access token
/// header is right (401 otherwise), and counts the requests. It answers the public contact
/// API too: the bodies of `contacts` by path, 404 for any other contact.
struct ProfileServer {
    /// Where it listens.
    addr: SocketAddr,
    /// The status and body it answers now; a test changes it to rotate the token.
    answer: Arc<Mutex<(StatusCode, String)>>,
    /// Requests so far, with the access token header each carried.
    requests: Arc<Mutex<Vec<Option<String>>>>,
    /// The public contact API's answers, by request path (percent-encoded as sent).
    contacts: Arc<Mutex<BTreeMap<String, String>>>,
    /// The accept loop, aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProfileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A profile of user 3 with `pubsub_token`, member of accounts 1 and 2.
fn profile(pubsub_token: &str) -> String {
    serde_json::json!({
        "id": 3,
        "name": "Agent",
        "email": "agent@example.com",
        "pubsub_token": pubsub_token,
        "accounts": [{ "id": 1, "name": "One", "role": "agent" }, { "id": 2, "name": "Two", "role": "administrator" }],
    })
    .to_string()
}

impl ProfileServer {
    async fn start(status: StatusCode, body: String) -> ProfileServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new((status, body)));
        let requests: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let contacts: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
        let (answers, seen, known) = (answer.clone(), requests.clone(), contacts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (answers, seen, known) = (answers.clone(), seen.clone(), known.clone());
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let header = request
                        .headers()
                        .get("api_access_token")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    seen.lock().unwrap().push(header.clone());
                    let path = request.uri().path();
                    let (status, body) = if path.starts_with("/public/api/v1/inboxes/") {
                        match known.lock().unwrap().get(path) {
                            Some(body) => (StatusCode::OK, body.clone()),
                            None => (
                                StatusCode::NOT_FOUND,
                                r#"{"error":"Resource could not be found"}"#.into(),
                            ),
                        }
                    } else if path != "/api/v1/profile" {
                        (StatusCode::NOT_FOUND, String::new())
                    } else if header.as_deref() != Some(ACCESS_TOKEN) {
                        (
                            StatusCode::UNAUTHORIZED,
                            r#"{"error":"Invalid Access Token"}"#.into(),
                        )
                    } else {
                        answers.lock().unwrap().clone()
                    };
                    let response = Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ProfileServer {
            addr,
            answer,
            requests,
            contacts,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn answer(&self, status: StatusCode, body: String) {
        *self.answer.lock().unwrap() = (status, body);
    }

    /// Answers the contact at `path` with Chatwoot's public contact shape and `pubsub_token`.
    fn contact(&self, path: &str, pubsub_token: &str) {
        let body = serde_json::json!({
            "id": 12,
            "source_id": "0f6ba8b5-3c8e-4a3a-9a55-0a1f2a3b4c5d",
            "name": "Visitor",
            "email": null,
            "phone_number": null,
            "pubsub_token": pubsub_token,
        });
        self.contacts
            .lock()
            .unwrap()
            .insert(path.to_owned(), body.to_string());
    }

    fn requests(&self) -> Vec<Option<String>> {
        self.requests.lock().unwrap().clone()
    }
}

/// A mock Chatwoot knowing `tokens`, pinging every 300 ms.
async fn mock(tokens: Vec<MockToken>) -> MockServer {
    start_mock(MockConfig {
        tokens,
        ping_interval: Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await
}

/// Fast timings, the profile at `api`, every event to the file `out`, and `token`.
fn config(cable: &str, api: &str, out: &Path, token: &str) -> BridgeYaml {
    BridgeYaml::new(cable)
        .cable(&format!("api_url: {api}"))
        .cable("confirm_timeout: 2s")
        .cable("stale_after: 2s")
        .cable("connect_timeout: 2s")
        .cable("reconnect: { initial: 50ms, max: 200ms }")
        .sink(
            "archive",
            &format!("{{ type: file, path: {} }}", quoted(out)),
        )
        .route("{ name: everything, match: {}, to: [archive] }")
        .spool(&out.with_extension("spool"))
        .token(token)
}

fn out_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    (dir, path)
}

/// Waits until `condition` holds for token `name`'s status.
async fn wait_token(
    bridge: &Bridge,
    name: &str,
    what: &str,
    condition: impl Fn(&TokenStatus) -> bool,
) {
    let ok = bridge
        .status()
        .wait_for(WAIT, |b| b.token(name).is_some_and(|t| condition(&t)))
        .await;
    assert!(
        ok,
        "token {name}: {what}: {:?}",
        bridge.status().token(name)
    );
}

/// Broadcasts a message to `pubsub_token` until its event (told apart by `marker`) reaches
/// the file; returns that event. Broadcasting again covers a subscription that was confirmed
/// a moment after the first broadcast.
async fn deliver(server: &MockServer, out: &Path, pubsub_token: &str, marker: u64) -> Value {
    let data = format!(r#"{{"account_id":1,"id":{marker},"content":"hello"}}"#);
    let mut found = None;
    wait_until_explained(
        &format!("the event broadcast to one pubsub token (id {marker}) in the file"),
        || {
            found = support::events_in(out)
                .into_iter()
                .find(|e| e["data"]["id"] == marker);
            if found.is_none() {
                server.broadcast_to(pubsub_token, "message.created", &data);
            }
            found.is_some()
        },
        || format!("{:?}", support::events_in(out)),
    )
    .await;
    found.unwrap()
}

/// Collects what the bridge logs while the test runs (this test's runtime is one thread).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures every log of the bridge at debug and above (not the mock's, which echoes
    /// identifiers) until the guard is dropped.
    fn start() -> (Captured, tracing::subscriber::DefaultGuard) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("chatwoot_bridge=debug,chatwoot_bridge::mock=off")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test]
async fn an_api_token_subscribes_and_follows_a_rotation_on_the_same_socket() {
    let (logs, _guard) = Captured::start();
    let server = mock(vec![
        mock_token("pubsub-one-SECRET", Answer::Confirm),
        mock_token("pubsub-two-SECRET", Answer::Confirm),
    ])
    .await;
    let api = ProfileServer::start(StatusCode::OK, profile("pubsub-one-SECRET")).await;
    let (_dir, out) = out_file();
    let token = format!(
        "{{ name: agent, api_access_token: {ACCESS_TOKEN}, account_id: 1, refresh_interval: 300ms }}"
    );
    let bridge = Bridge::start(config(&server.url(), &api.url(), &out, &token).config())
        .await
        .unwrap();
    wait_token(&bridge, "agent", "subscribed", |t| {
        t.state == TokenState::Subscribed
    })
    .await;
    let before = deliver(&server, &out, "pubsub-one-SECRET", 1).await;
    assert_eq!(before["chatwoottoken"], "agent");

    api.answer(StatusCode::OK, profile("pubsub-two-SECRET"));
    wait_token(&bridge, "agent", "one rotation counted", |t| {
        t.rotations == 1
    })
    .await;
    wait_until_explained(
        "the old subscription dropped once the new one is confirmed",
        || server.unsubscribe_commands() >= 1,
        || format!("{} unsubscribes", server.unsubscribe_commands()),
    )
    .await;
    let after = deliver(&server, &out, "pubsub-two-SECRET", 2).await;
    assert_eq!(after["chatwoottoken"], "agent", "the same token name");
    assert_eq!(after["source"], before["source"]);

    let status = bridge.status().token("agent").unwrap();
    assert_eq!(status.state, TokenState::Subscribed);
    assert_eq!(
        server.connections_accepted(),
        1,
        "no new socket for a rotation"
    );
    assert_eq!(
        server.subscribe_commands(),
        2,
        "one subscribe per pubsub token"
    );
    assert_eq!(status.unconfirmed_subscriptions, 0);
    let shown = serde_json::to_value(&status).unwrap();
    assert_eq!(shown["rotations"], 1, "/status shows it: {shown}");
    let requests = api.requests();
    assert!(
        requests.len() >= 2,
        "the profile is read again: {requests:?}"
    );
    assert!(requests.iter().all(|h| h.as_deref() == Some(ACCESS_TOKEN)));

    shut_down(bridge).await;
    server.stop().await;
    let logged = logs.text();
    assert!(logged.contains("pubsub token changed"), "{logged}");
    assert!(!logged.contains("SECRET"), "a secret was logged: {logged}");
}

#[tokio::test]
async fn an_unconfirmed_subscription_reads_the_profile_and_follows_the_rotation() {
    let (logs, _guard) = Captured::start();
    let server = mock(vec![
        mock_token("pubsub-old-SECRET", Answer::Silent),
        mock_token("pubsub-new-SECRET", Answer::Confirm),
    ])
    .await;
    let api = ProfileServer::start(StatusCode::OK, profile("pubsub-old-SECRET")).await;
    let (_dir, out) = out_file();
    // The periodic refresh is an hour away: only the unconfirmed subscription reads it again.
    let token = format!(
        "{{ name: agent, api_access_token: {ACCESS_TOKEN}, account_id: 2, user_id: 3, refresh_interval: 1h }}"
    );
    let bridge = Bridge::start(config(&server.url(), &api.url(), &out, &token).config())
        .await
        .unwrap();
    wait_until_explained(
        "the first profile read",
        || !api.requests().is_empty(),
        String::new,
    )
    .await;
    api.answer(StatusCode::OK, profile("pubsub-new-SECRET"));
    wait_token(&bridge, "agent", "subscribed with the new token", |t| {
        t.state == TokenState::Subscribed
    })
    .await;
    let event = deliver(&server, &out, "pubsub-new-SECRET", 7).await;
    assert_eq!(event["chatwoottoken"], "agent");

    let status = bridge.status().token("agent").unwrap();
    assert!(status.unconfirmed_subscriptions >= 1, "{status:?}");
    assert_eq!(status.rotations, 1);
    assert_eq!(
        server.connections_accepted(),
        1,
        "no new socket for a rotation"
    );
    assert!(api.requests().len() >= 2);

    shut_down(bridge).await;
    server.stop().await;
    let logged = logs.text();
    assert!(!logged.contains("SECRET"), "a secret was logged: {logged}");
}

#[tokio::test]
async fn an_account_the_user_is_not_in_is_named_with_the_accounts_available() {
    let server = mock(vec![mock_token("pubsub-one-SECRET", Answer::Confirm)]).await;
    let api = ProfileServer::start(StatusCode::OK, profile("pubsub-one-SECRET")).await;
    let (_dir, out) = out_file();
    let token = format!("{{ name: agent, api_access_token: {ACCESS_TOKEN}, account_id: 9 }}");
    let bridge = Bridge::start(config(&server.url(), &api.url(), &out, &token).config())
        .await
        .unwrap();
    wait_token(&bridge, "agent", "the account refused", |t| {
        t.last_error
            .as_deref()
            .is_some_and(|e| e.contains("account_id 9"))
    })
    .await;
    let status = bridge.status().token("agent").unwrap();
    let error = status.last_error.unwrap();
    assert_eq!(
        error,
        "token `agent`: account_id 9 is not among the accounts of the API access token's user (accounts: [1, 2])"
    );
    assert_eq!(status.state, TokenState::BackingOff);
    assert_eq!(
        server.connections_accepted(),
        0,
        "no socket without a subscriber"
    );
    shut_down(bridge).await;
    server.stop().await;
}

#[tokio::test]
async fn a_refused_api_token_shows_on_the_status_board_and_spares_the_others() {
    let (logs, _guard) = Captured::start();
    let server = mock(vec![mock_token("plain-SECRET", Answer::Confirm)]).await;
    let api = ProfileServer::start(StatusCode::OK, profile("pubsub-one-SECRET")).await;
    let (_dir, out) = out_file();
    let token = "{ name: agent, api_access_token: wrong-access-SECRET, account_id: 1 }";
    let bridge = Bridge::start(
        config(&server.url(), &api.url(), &out, token)
            .agent("plain", "plain-SECRET", 4)
            .config(),
    )
    .await
    .unwrap();
    wait_token(&bridge, "agent", "refused", |t| {
        t.state == TokenState::ApiTokenRefused
    })
    .await;
    wait_token(&bridge, "plain", "subscribed", |t| {
        t.state == TokenState::Subscribed
    })
    .await;
    let error = bridge.status().token("agent").unwrap().last_error.unwrap();
    assert!(error.starts_with("API access token refused: "), "{error}");
    assert!(error.contains("HTTP 401"), "{error}");
    assert_eq!(
        server.subscribe_commands(),
        1,
        "only the plain token subscribed"
    );
    // Retried with the backoff, not given up.
    wait_until_explained(
        "the profile read again",
        || api.requests().len() >= 3,
        String::new,
    )
    .await;

    shut_down(bridge).await;
    server.stop().await;
    let logged = logs.text();
    assert!(!logged.contains("SECRET"), "a secret was logged: {logged}");
}

#[tokio::test]
async fn a_profile_over_the_size_limit_is_refused_before_parsing() {
    let server = mock(Vec::new()).await;
    let huge = format!(
        r#"{{"id":3,"pubsub_token":"x","accounts":[],"pad":"{}"}}"#,
        "a".repeat(300 * 1024)
    );
    let api = ProfileServer::start(StatusCode::OK, huge).await;
    let (_dir, out) = out_file();
    let token = format!("{{ name: agent, api_access_token: {ACCESS_TOKEN}, account_id: 1 }}");
    let bridge = Bridge::start(config(&server.url(), &api.url(), &out, &token).config())
        .await
        .unwrap();
    wait_token(&bridge, "agent", "the profile refused", |t| {
        t.last_error
            .as_deref()
            .is_some_and(|e| e.contains("more than 262144 bytes"))
    })
    .await;
    assert_eq!(server.connections_accepted(), 0);
    shut_down(bridge).await;
    server.stop().await;
}

#[tokio::test]
async fn check_connect_reads_the_profile_before_it_subscribes() {
    let server = mock(vec![mock_token("pubsub-one-SECRET", Answer::Confirm)]).await;
    let api = ProfileServer::start(StatusCode::OK, profile("pubsub-one-SECRET")).await;
    let (_dir, out) = out_file();
    let good = format!("{{ name: agent, api_access_token: {ACCESS_TOKEN}, account_id: 1 }}");
    let config = config(&server.url(), &api.url(), &out, &good)
        .token("{ name: refused, api_access_token: wrong-SECRET, account_id: 1 }")
        .config();
    let probe = chatwoot_bridge::source::cable::probe;
    assert_eq!(probe(&config.tokens[0], &config.cable).await, Ok(()));
    let refused = probe(&config.tokens[1], &config.cable).await.unwrap_err();
    assert!(
        refused.starts_with("API access token refused: "),
        "{refused}"
    );
    assert!(!refused.contains("SECRET"), "{refused}");
    assert_eq!(
        server.subscribe_commands(),
        1,
        "the refused token never subscribed"
    );
    server.stop().await;
}

/// The contact identifier of the contact tests, with a character the URL must encode; never
/// logged.
const CONTACT_IDENTIFIER: &str = "visitor/7-SECRET";

/// Where the public contact API answers the contact of inbox `inbox`.
fn contact_path(inbox: &str) -> String {
    format!("/public/api/v1/inboxes/{inbox}/contacts/visitor%2F7-SECRET")
}

#[tokio::test]
async fn a_contact_given_by_its_identifiers_subscribes_and_follows_a_rotation() {
    let (logs, _guard) = Captured::start();
    let server = mock(vec![
        mock_token("contact-one-SECRET", Answer::Confirm),
        mock_token("contact-two-SECRET", Answer::Confirm),
    ])
    .await;
    let api = ProfileServer::start(StatusCode::OK, profile("unused")).await;
    api.contact(&contact_path("WidgetInbox1"), "contact-one-SECRET");
    let (_dir, out) = out_file();
    let token = format!(
        "{{ name: visitor, inbox_identifier: WidgetInbox1, contact_identifier: {CONTACT_IDENTIFIER}, refresh_interval: 300ms }}"
    );
    let bridge = Bridge::start(config(&server.url(), &api.url(), &out, &token).config())
        .await
        .unwrap();
    wait_token(&bridge, "visitor", "subscribed", |t| {
        t.state == TokenState::Subscribed
    })
    .await;
    let before = deliver(&server, &out, "contact-one-SECRET", 1).await;
    assert_eq!(before["chatwoottoken"], "visitor");

    api.contact(&contact_path("WidgetInbox1"), "contact-two-SECRET");
    wait_token(&bridge, "visitor", "one rotation counted", |t| {
        t.rotations == 1
    })
    .await;
    let after = deliver(&server, &out, "contact-two-SECRET", 2).await;
    assert_eq!(after["chatwoottoken"], "visitor");
    assert_eq!(
        server.connections_accepted(),
        1,
        "no new socket for a rotation"
    );
    assert!(
        api.requests().iter().all(Option::is_none),
        "no access token is sent to the public API"
    );

    shut_down(bridge).await;
    server.stop().await;
    let logged = logs.text();
    assert!(logged.contains("pubsub token changed"), "{logged}");
    assert!(!logged.contains("SECRET"), "a secret was logged: {logged}");
    assert!(
        !logged.contains("visitor%2F7"),
        "the identifier was logged: {logged}"
    );
}

#[tokio::test]
async fn an_unknown_contact_names_its_inbox_and_spares_the_others() {
    let (logs, _guard) = Captured::start();
    let server = mock(vec![mock_token("plain-SECRET", Answer::Confirm)]).await;
    let api = ProfileServer::start(StatusCode::OK, profile("unused")).await;
    api.contact(&contact_path("WidgetInbox1"), "contact-one-SECRET");
    let (_dir, out) = out_file();
    let token = format!(
        "{{ name: visitor, inbox_identifier: OtherInbox, contact_identifier: {CONTACT_IDENTIFIER} }}"
    );
    let bridge = Bridge::start(
        config(&server.url(), &api.url(), &out, &token)
            .agent("plain", "plain-SECRET", 4)
            .config(),
    )
    .await
    .unwrap();
    wait_token(&bridge, "visitor", "refused", |t| {
        t.state == TokenState::ApiTokenRefused
    })
    .await;
    wait_token(&bridge, "plain", "subscribed", |t| {
        t.state == TokenState::Subscribed
    })
    .await;
    let error = bridge
        .status()
        .token("visitor")
        .unwrap()
        .last_error
        .unwrap();
    assert_eq!(
        error,
        format!(
            "token `visitor`: inbox `OtherInbox` has no contact with the configured contact_identifier, or there is no such inbox ({}/public/api/v1/inboxes/OtherInbox/contacts/{{contact_identifier}} answered HTTP 404); check inbox_identifier and contact_identifier",
            api.url()
        )
    );
    assert_eq!(
        server.subscribe_commands(),
        1,
        "only the plain token subscribed"
    );
    wait_until_explained(
        "the contact read again with the backoff",
        || api.requests().len() >= 3,
        String::new,
    )
    .await;

    let probe = chatwoot_bridge::source::cable::probe;
    let config = config(&server.url(), &api.url(), &out, &token).config();
    let probed = probe(&config.tokens[0], &config.cable).await.unwrap_err();
    assert!(probed.contains("inbox `OtherInbox`"), "{probed}");
    assert!(
        !probed.contains("SECRET") && !probed.contains("visitor%2F7"),
        "{probed}"
    );

    shut_down(bridge).await;
    server.stop().await;
    let logged = logs.text();
    assert!(
        logged.contains("OtherInbox"),
        "the inbox is named: {logged}"
    );
    assert!(!logged.contains("SECRET"), "a secret was logged: {logged}");
    assert!(
        !logged.contains("visitor%2F7"),
        "the identifier was logged: {logged}"
    );
}
