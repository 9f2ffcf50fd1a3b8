//! What the integration tests share: one wait budget and the waits that use it, the mock
//! Chatwoot's tokens, the YAML of a bridge's config ([`BridgeYaml`]), real servers on free
//! loopback ports ([`NatsServer`], [`KafkaBroker`], the webhook [`Receiver`], over TLS too), a
//! private CA's certificates ([`Pki`]), dead letters to replay ([`padded_letters`]), what a file
//! sink wrote so far ([`events_in`]) and what a backfill wrote ([`message_marks`]).

// Each test file uses its own part of this module.
#![allow(dead_code, unused_imports)]

mod backfilled;
mod brokers;
mod dead_letters;
mod pki;
mod receiver;
mod written;
mod yaml;

use std::future::Future;
use std::time::Duration;

use chatwoot_bridge::config::SinkKind;
use chatwoot_bridge::mock::{Answer, MockConfig, MockServer, MockToken};
use chatwoot_bridge::sink::{Sink, SinkLimits};
use chatwoot_bridge::{Bridge, ShutdownReport};

pub(crate) use backfilled::{
    assert_each_message_once, backfilled_conversations, message_marks, wait_for_messages,
};
pub(crate) use brokers::{kafka_consumer, KafkaBroker, NatsServer, TestCertificates};
pub(crate) use dead_letters::{padded_letters, replay_progress_written};
pub(crate) use pki::Pki;
pub(crate) use receiver::{scripted, Received, Receiver, Reply, Responder};
pub(crate) use written::events_in;
pub(crate) use yaml::{quoted, BridgeYaml};

/// Bounds every wait of the tests: for a condition, a server, a command or a future. Generous,
/// because a loaded machine is slow; a passing test never waits this long.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// Bounds how long a wait sleeps before it looks at its condition again.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// Waits until `condition` holds; after [`WAIT`] fails the test naming `what` it waited for.
pub(crate) async fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    wait_until_explained(what, condition, String::new).await;
}

/// Waits until `condition` holds; after [`WAIT`] fails the test naming `what` it waited for and
/// what `explain` then says about the state it was left in.
pub(crate) async fn wait_until_explained(
    what: &str,
    mut condition: impl FnMut() -> bool,
    explain: impl FnOnce() -> String,
) {
    let waited = tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    if waited.is_err() {
        let state = explain();
        let separator = if state.is_empty() { "" } else { ": " };
        panic!("timed out after {WAIT:?} waiting for {what}{separator}{state}");
    }
}

/// Waits until the future `check` makes says yes; after [`WAIT`] fails the test naming `what`
/// it waited for.
pub(crate) async fn wait_until_async<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
}

/// Awaits `future`; after [`WAIT`] fails the test naming `what` it waited for: no test hangs on
/// a server that stopped answering.
pub(crate) async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// Shuts `bridge` down within [`WAIT`] and returns its report.
pub(crate) async fn shut_down(bridge: Bridge) -> ShutdownReport {
    within("the bridge to shut down", bridge.shutdown()).await
}

/// A token the mock Chatwoot knows by `pubsub_token`, answering subscriptions as `answer` says.
pub(crate) fn mock_token(pubsub_token: &str, answer: Answer) -> MockToken {
    MockToken {
        pubsub_token: pubsub_token.to_owned(),
        answer,
    }
}

/// Starts a mock Chatwoot with `config`.
pub(crate) async fn start_mock(config: MockConfig) -> MockServer {
    within("the mock Chatwoot to start", MockServer::start(config))
        .await
        .expect("the mock Chatwoot starts")
}

/// A port nobody listens on right now (the OS picks it; the listener is closed before use).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .unwrap()
        .port()
}

/// The validated settings of a sink given as the YAML of one `sinks:` entry.
pub(crate) fn sink_kind(name: &str, sink_yaml: &str) -> SinkKind {
    let config = BridgeYaml::new("ws://127.0.0.1:9/cable")
        .agent("agent", "tok-agent", 1)
        .sink(name, sink_yaml)
        .route_all(&[name])
        .spool(std::path::Path::new("unused-spool"))
        .config();
    config.sinks[name].kind.clone()
}

/// The limits of a sink driven by a test: far more than the few batches a test hands over.
const TEST_SINK_LIMITS: SinkLimits = SinkLimits {
    max_unconfirmed_events: 8192,
};

/// Builds the sink named `name` from the YAML of one `sinks:` entry.
pub(crate) async fn sink(name: &str, sink_yaml: &str) -> Sink {
    within(
        "the sink to build",
        Sink::build(name, &sink_kind(name, sink_yaml), TEST_SINK_LIMITS),
    )
    .await
    .expect("sink builds")
}

/// Sends `signal` (`TERM`, `HUP`, ...) to the daemon `child` with kill(1), as systemd,
/// `docker stop`, `systemctl reload` and logrotate's postrotate do.
pub(crate) fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("the daemon is running").to_string();
    let sent = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} failed");
}

/// A mock Chatwoot with one agent: user 3 of account 1, pubsub token `agent3`, API access
/// token `api3`.
pub(crate) async fn mock_with_api_agent() -> MockServer {
    start_mock(MockConfig {
        users: vec![chatwoot_bridge::mock::MockUser {
            id: 3,
            pubsub_token: "agent3".into(),
            api_access_token: Some("api3".into()),
            accounts: vec![1],
            role: chatwoot_bridge::mock::MockRole::Administrator,
        }],
        accounts: vec![chatwoot_bridge::mock::MockAccount {
            id: 1,
            name: "Account 1".into(),
        }],
        ..MockConfig::default()
    })
    .await
}

/// The agent of [`mock_with_api_agent`] as the token `agent`, given by its API token alone with
/// `settings` (`refresh_interval: 1s`, ...); fast timings; every event to the file `out`.
pub(crate) fn api_agent_config(
    mock: &MockServer,
    out: &std::path::Path,
    settings: &str,
) -> chatwoot_bridge::config::Config {
    api_agent_yaml(mock, out, settings).config()
}

/// The YAML of [`api_agent_config`], for a test that adds to it.
pub(crate) fn api_agent_yaml(
    mock: &MockServer,
    out: &std::path::Path,
    settings: &str,
) -> BridgeYaml {
    BridgeYaml::new(&mock.url())
        .cable("confirm_timeout: 1s")
        .cable("reconnect: { initial: 50ms, max: 300ms }")
        .token(&format!(
            "{{ name: agent, api_access_token: api3, account_id: 1, {settings} }}"
        ))
        .sink(
            "archive",
            &format!("{{ type: file, path: {} }}", quoted(out)),
        )
        .route("{ name: everything, match: {}, to: [archive] }")
        .spool(&out.with_extension("spool"))
}
