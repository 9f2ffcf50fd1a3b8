//! TLS and secrets from files, end to end: the bridge reaches a `wss://` mock Chatwoot and an
//! `https://` webhook receiver whose certificates a private CA signed (made by the test), only
//! when the config names that CA; a client certificate for a receiver that demands one;
//! `insecure_skip_verify` and its warning; bad files refused at load, naming the file.

mod support;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatwoot_bridge::config::{Config, ConfigError};
use chatwoot_bridge::event::{Event, EventId};
use chatwoot_bridge::mock::{Answer, MockConfig, MockServer, MockTls};
use chatwoot_bridge::sink::{Outcome, Sink};
use chatwoot_bridge::Bridge;
use support::{
    mock_token, quoted, scripted, shut_down, sink, sink_kind, start_mock, wait_until,
    wait_until_explained, within, BridgeYaml, Pki, Receiver,
};

/// A mock Chatwoot serving `wss://` with the PKI's server certificate, confirming `tok-agent`.
async fn wss_mock(pki: &Pki) -> MockServer {
    start_mock(MockConfig {
        tokens: vec![mock_token("tok-agent", Answer::Confirm)],
        ping_interval: Duration::from_millis(300),
        tls: Some(MockTls {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
        }),
        ..MockConfig::default()
    })
    .await
}

/// A config reading `url` with `tls` (the YAML of `chatwoot.tls`, or none) and `token` (the
/// YAML of the agent's token entry), writing every event to `out`.
fn cable_yaml(url: &str, tls: Option<&str>, token: &str, out: &Path) -> BridgeYaml {
    let mut yaml = BridgeYaml::new(url)
        .cable("reconnect: { initial: 50ms, max: 200ms }")
        .token(token)
        .sink(
            "archive",
            &format!("{{ type: file, path: {} }}", quoted(out)),
        )
        .route_all(&["archive"])
        .spool(&out.with_extension("spool"));
    if let Some(tls) = tls {
        yaml = yaml.cable(&format!("tls: {tls}"));
    }
    yaml
}

/// The agent token entry of the mock's `tok-agent`.
const AGENT: &str = "{ name: agent, pubsub_token: tok-agent, account_id: 1, user_id: 1 }";

/// Starts a bridge on `config`, broadcasts one event once its token streams, and waits for it
/// in the file `out`.
async fn one_event_through(config: Config, mock: &MockServer, out: &Path) {
    let bridge = within("the bridge to start", Bridge::start(config))
        .await
        .unwrap();
    wait_until_explained(
        "the token to subscribe over wss://",
        || mock.streaming_subscriptions() >= 1,
        || format!("{:?}", bridge.status().token("agent")),
    )
    .await;
    mock.broadcast("message.created", r#"{"id":1,"content":"over tls"}"#);
    wait_until("the event in the file", || {
        std::fs::read_to_string(out).is_ok_and(|text| text.contains("over tls"))
    })
    .await;
    shut_down(bridge).await;
}

#[tokio::test]
async fn the_cable_reaches_a_wss_mock_signed_by_a_private_ca_named_in_ca_file() {
    let pki = Pki::make();
    let mock = wss_mock(&pki).await;
    assert!(mock.url().starts_with("wss://127.0.0.1:"), "{}", mock.url());
    let out = pki.dir.path().join("events.jsonl");
    let tls = format!("{{ ca_file: {} }}", quoted(&pki.ca));
    let config = cable_yaml(&mock.url(), Some(&tls), AGENT, &out).config();
    one_event_through(config, &mock, &out).await;
    mock.stop().await;
}

#[tokio::test]
async fn without_the_ca_the_cable_fails_with_a_named_tls_error() {
    let pki = Pki::make();
    let mock = wss_mock(&pki).await;
    let out = pki.dir.path().join("events.jsonl");
    let bridge = within(
        "the bridge to start",
        Bridge::start(cable_yaml(&mock.url(), None, AGENT, &out).config()),
    )
    .await
    .unwrap();
    let last_error = || {
        bridge
            .status()
            .token("agent")
            .and_then(|status| status.last_error)
            .unwrap_or_default()
    };
    wait_until_explained(
        "the token to fail on the server's certificate",
        || last_error().contains("TLS error"),
        last_error,
    )
    .await;
    let error = last_error();
    assert!(
        error.contains("signed by a CA this bridge does not trust")
            && error.contains("chatwoot.tls.ca_file")
            && error.contains("UnknownIssuer"),
        "{error}"
    );
    assert_eq!(mock.connections_accepted(), 0, "no WebSocket was opened");
    shut_down(bridge).await;
    mock.stop().await;
}

/// Log lines written by `tracing` while a closure runs, for tests of warnings.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// What `load` logs while it runs, and what it returns.
    fn during<T>(load: impl FnOnce() -> T) -> (T, String) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let value = tracing::subscriber::with_default(subscriber, load);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        (value, text)
    }
}

#[tokio::test]
async fn insecure_skip_verify_reaches_the_cable_and_warns_every_time_the_config_is_loaded() {
    let pki = Pki::make();
    let mock = wss_mock(&pki).await;
    let out = pki.dir.path().join("events.jsonl");
    let yaml = cable_yaml(
        &mock.url(),
        Some("{ insecure_skip_verify: true }"),
        AGENT,
        &out,
    );
    for _ in 0..2 {
        let (_, logged) = Captured::during(|| yaml.config());
        assert!(
            logged.contains("WARN")
                && logged.contains("TLS certificate verification is OFF for chatwoot.tls"),
            "{logged}"
        );
    }
    let (config, _) = Captured::during(|| yaml.config());
    one_event_through(config, &mock, &out).await;
    mock.stop().await;
}

#[tokio::test]
async fn the_pubsub_token_is_read_from_its_file_at_load() {
    let pki = Pki::make();
    let mock = wss_mock(&pki).await;
    let out = pki.dir.path().join("events.jsonl");
    let token_file = pki.dir.path().join("agent-token");
    std::fs::write(&token_file, "tok-agent\n").unwrap();
    let token = format!(
        "{{ name: agent, pubsub_token_file: {}, account_id: 1, user_id: 1 }}",
        quoted(&token_file)
    );
    let tls = format!("{{ ca_file: {} }}", quoted(&pki.ca));
    let config = cable_yaml(&mock.url(), Some(&tls), &token, &out).config();
    one_event_through(config, &mock, &out).await;
    mock.stop().await;
}

/// An event for a webhook.
fn event(id: u128) -> Arc<Event> {
    let mut event = Event::for_test("message.created", "agent", r#"{"id":1}"#);
    event.id = EventId(id);
    Arc::new(event)
}

/// The sink YAML of a webhook at `receiver` with `tls` (the YAML of its `tls:`, or none).
fn webhook(receiver: &Receiver, tls: Option<&str>) -> String {
    let tls = tls.map(|tls| format!(", tls: {tls}")).unwrap_or_default();
    format!(
        "{{ type: http, url: {}, timeout: 5s{tls} }}",
        quoted(receiver.url("/in"))
    )
}

/// The message of a failed outcome; fails the test on a delivered one.
fn failure(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Delivered => panic!("the event was delivered"),
        Outcome::Retryable(e) | Outcome::Permanent(e) => e.message.clone(),
    }
}

#[tokio::test]
async fn a_webhook_reaches_an_https_receiver_signed_by_a_private_ca_named_in_ca_file() {
    let pki = Pki::make();
    let receiver = Receiver::start_tls(scripted(vec![]), pki.server_config(false)).await;
    assert!(receiver.url("/").starts_with("https://"));
    let yaml = webhook(
        &receiver,
        Some(&format!("{{ ca_file: {} }}", quoted(&pki.ca))),
    );
    let mut hook = sink("hook", &yaml).await;
    let outcomes = within("the delivery", hook.deliver(&[event(1)])).await;
    assert!(matches!(outcomes[..], [Outcome::Delivered]), "{outcomes:?}");
    assert_eq!(receiver.wait_for(1).await[0].path, "/in");
    let probed = within("the probe", Sink::probe("hook", &sink_kind("hook", &yaml))).await;
    assert_eq!(probed, Ok(()));
}

#[tokio::test]
async fn without_the_ca_a_webhook_fails_with_a_named_tls_error() {
    let pki = Pki::make();
    let receiver = Receiver::start_tls(scripted(vec![]), pki.server_config(false)).await;
    let yaml = webhook(&receiver, None);
    let mut hook = sink("hook", &yaml).await;
    let outcomes = within("the delivery", hook.deliver(&[event(1)])).await;
    assert!(
        matches!(outcomes[..], [Outcome::Retryable(_)]),
        "{outcomes:?}"
    );
    let message = failure(&outcomes[0]);
    assert!(
        message.starts_with("webhook: TLS error: the server's certificate is signed by a CA this bridge does not trust")
            && message.contains("the sink's tls.ca_file"),
        "{message}"
    );
    let probed = within("the probe", Sink::probe("hook", &sink_kind("hook", &yaml))).await;
    let probed = probed.unwrap_err();
    assert!(probed.contains("TLS error"), "{probed}");
    wait_until("the receiver to see both handshakes fail", || {
        receiver.tls_failures.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert!(receiver.received().is_empty(), "nothing got through");
}

#[tokio::test]
async fn a_webhook_shows_its_client_certificate_to_a_receiver_that_demands_one() {
    let pki = Pki::make();
    let receiver = Receiver::start_tls(scripted(vec![]), pki.server_config(true)).await;
    let with_client = format!(
        "{{ ca_file: {}, cert_file: {}, key_file: {} }}",
        quoted(&pki.ca),
        quoted(&pki.client_cert),
        quoted(&pki.client_key)
    );
    let mut hook = sink("hook", &webhook(&receiver, Some(&with_client))).await;
    let outcomes = within("the delivery", hook.deliver(&[event(1)])).await;
    assert!(matches!(outcomes[..], [Outcome::Delivered]), "{outcomes:?}");

    let ca_only = format!("{{ ca_file: {} }}", quoted(&pki.ca));
    let mut hook = sink("hook", &webhook(&receiver, Some(&ca_only))).await;
    let outcomes = within("the delivery", hook.deliver(&[event(2)])).await;
    let message = failure(&outcomes[0]);
    assert!(
        message.contains("TLS error: the server asks for a client certificate: give the sink's tls.cert_file and key_file"),
        "{message}"
    );
    assert_eq!(receiver.received().len(), 1, "only the first got through");
}

/// The problems loading `yaml` gives, one per line; fails the test if it loads.
fn problems(yaml: &str) -> String {
    match Config::from_yaml(yaml, &|_| None, false) {
        Ok(_) => panic!("the config loaded:\n{yaml}"),
        Err(ConfigError::Invalid(found)) => found
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
        Err(other) => panic!("refused before validation: {other}"),
    }
}

#[test]
fn bad_tls_files_are_refused_at_load_naming_the_key_and_the_file() {
    let pki = Pki::make();
    let dir = pki.dir.path();
    let missing = dir.join("missing.pem");
    let not_pem = dir.join("not-pem.txt");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let junk_key = dir.join("junk.key");
    let key_text = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n";
    std::fs::write(&junk_key, key_text).unwrap();
    let yaml = |cable_tls: &str, hook_tls: &str| {
        format!(
            "chatwoot: {{ url: 'wss://chat.example.com/cable', tls: {cable_tls} }}\n\
             tokens: [{{ name: agent, pubsub_token: t }}]\n\
             sinks: {{ hook: {{ type: http, url: 'https://hooks.example.com/in', tls: {hook_tls} }} }}\n\
             routes: [{{ name: all, to: [hook] }}]\n"
        )
    };
    let found = problems(&yaml(
        &format!("{{ ca_file: {} }}", quoted(&missing)),
        &format!("{{ ca_file: {} }}", quoted(&not_pem)),
    ));
    let lines: Vec<&str> = found.lines().collect();
    assert!(
        lines[0].starts_with(&format!(
            "chatwoot.tls.ca_file: cannot read {}: ",
            missing.display()
        )),
        "{found}"
    );
    assert_eq!(
        lines[1],
        format!(
            "sinks.hook.tls.ca_file: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            not_pem.display()
        )
    );

    // A key that is not the certificate's, a cut-off key, a certificate without its key.
    let found = problems(&yaml(
        &format!(
            "{{ cert_file: {}, key_file: {} }}",
            quoted(&pki.client_cert),
            quoted(&pki.server_key)
        ),
        &format!(
            "{{ cert_file: {}, key_file: {} }}",
            quoted(&pki.client_cert),
            quoted(&junk_key)
        ),
    ));
    assert_eq!(
        found,
        format!(
            "chatwoot.tls.key_file: the key in {} does not belong to the certificate in {}\n\
             sinks.hook.tls.key_file: {} is not PEM: a section has no END line",
            pki.server_key.display(),
            pki.client_cert.display(),
            junk_key.display()
        )
    );
    assert!(!found.contains("c2VjcmV0"), "key material leaked: {found}");
    let found = problems(&yaml(
        &format!("{{ cert_file: {} }}", quoted(&pki.client_cert)),
        &format!(
            "{{ insecure_skip_verify: true, ca_file: {} }}",
            quoted(&pki.ca)
        ),
    ));
    assert_eq!(
        found,
        "chatwoot.tls.key_file: is needed with cert_file: the client certificate's key\n\
         sinks.hook.tls.insecure_skip_verify: verifies nothing, so ca_file would not be used: remove one of them"
    );
}
