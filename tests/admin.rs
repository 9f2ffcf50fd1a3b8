//! The admin endpoint against a running bridge, the mock Chatwoot and real sinks: `/metrics`
//! read by promtool and moving as events flow and a sink fails, `/healthz`, `/readyz` flipping
//! with a rejected token, `/status`, `/tap` and its filters, `top`, `reload`, and requests past
//! the endpoint's limits.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use chatwoot_bridge::admin::client::{AdminClient, ClientError, TapFilter};
use chatwoot_bridge::admin::report::StatusReport;
use chatwoot_bridge::admin::MAX_ADMIN_CONNECTIONS;
use chatwoot_bridge::mock::{Answer, MockConfig, MockServer};
use chatwoot_bridge::status::{SinkState, TokenState};
use chatwoot_bridge::Bridge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{
    free_port, mock_token, quoted, shut_down, start_mock, wait_until_async, within, BridgeYaml,
    WAIT,
};

const BIN: &str = env!("CARGO_BIN_EXE_chatwoot-bridge");

/// A mock Chatwoot that answers `ta` and `tb` as given.
async fn mock(a: Answer, b: Answer) -> MockServer {
    start_mock(MockConfig {
        tokens: vec![mock_token("ta", a), mock_token("tb", b)],
        ..MockConfig::default()
    })
    .await
}

/// Agent tokens `a` (pubsub token `ta`) and `b` (`tb`), quick to resubscribe, the admin endpoint
/// on a free loopback port, and the spool in `dir`.
fn bridge_yaml(mock: &MockServer, dir: &Path) -> BridgeYaml {
    BridgeYaml::new(&mock.url())
        .cable("reconnect: { initial: 50ms, max: 100ms }")
        .agent("a", "ta", 1)
        .agent("b", "tb", 2)
        .spool(&dir.join("spool"))
        .setting("shutdown_timeout: 1s")
}

/// `GET path` on the admin endpoint: the status and the body.
async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    let response = within(path, reqwest::get(format!("http://{admin}{path}")))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The samples of a scrape, by series (`name{labels}` as written).
fn samples(exposition: &str) -> BTreeMap<String, f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let value = if value == "+Inf" {
                f64::INFINITY
            } else {
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("not a number: {line}"))
            };
            (series.to_owned(), value)
        })
        .collect()
}

/// The value of `series` in `scrape`; fails naming it when it is missing.
fn sample(scrape: &BTreeMap<String, f64>, series: &str) -> f64 {
    *scrape
        .get(series)
        .unwrap_or_else(|| panic!("no sample {series} in the scrape: {:#?}", scrape.keys()))
}

/// Checks that each `(series, at least, at most)` holds in `scrape` (series without the
/// `chatwoot_bridge_` prefix).
fn expect(scrape: &BTreeMap<String, f64>, checks: &[(&str, f64, f64)]) {
    for &(series, least, most) in checks {
        let value = sample(scrape, &format!("chatwoot_bridge_{series}"));
        assert!(
            (least..=most).contains(&value),
            "{series} is {value}, expected {least} to {most}"
        );
    }
}

/// Runs `promtool check metrics` on `exposition`; fails with what it said.
async fn promtool_accepts(exposition: &str) {
    let mut promtool = match tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: run scripts/install-test-deps.sh \
             (or apt-get install -y prometheus)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(exposition.as_bytes()).await.unwrap();
    drop(stdin);
    let output = within("promtool", promtool.wait_with_output())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics refused the exposition:\n{}{}\n--- exposition ---\n{exposition}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// The `/status` report.
async fn status(admin: SocketAddr) -> StatusReport {
    AdminClient::new(&admin.to_string())
        .unwrap()
        .status()
        .await
        .expect("/status answers")
}

/// A file sink writing to `name`.jsonl in `dir`, as YAML.
fn file_sink(dir: &Path, name: &str) -> String {
    format!(
        "{{ type: file, path: {} }}",
        quoted(dir.join(format!("{name}.jsonl")))
    )
}

/// Whether tokens `a` and `b` are both subscribed.
fn both_subscribed(board: &chatwoot_bridge::status::StatusBoard) -> bool {
    ["a", "b"].iter().all(|t| {
        board
            .token(t)
            .is_some_and(|t| t.state == TokenState::Subscribed)
    })
}

/// What a scrape says after 10 events from `a` went to the file sink `out` while the webhook
/// `hook` refused every attempt.
fn expect_delivered_to_out_and_stuck_in_hook(scrape: &BTreeMap<String, f64>) {
    let waited = WAIT.as_secs_f64();
    expect(
        scrape,
        &[
            ("token_events_received_total{token=\"a\"}", 10.0, 10.0),
            ("token_frames_received_total{token=\"a\"}", 10.0, f64::MAX),
            ("events_spooled_total", 10.0, 10.0),
            ("sink_events_delivered_total{sink=\"out\"}", 10.0, 10.0),
            (
                "sink_delivery_latency_seconds_count{sink=\"out\"}",
                10.0,
                10.0,
            ),
            (
                "sink_delivery_latency_seconds_bucket{sink=\"out\",le=\"+Inf\"}",
                10.0,
                10.0,
            ),
            (
                "sink_delivery_latency_seconds_sum{sink=\"out\"}",
                f64::MIN_POSITIVE,
                waited,
            ),
            ("sink_backlog_events{sink=\"out\"}", 0.0, 0.0),
            ("sink_events_delivered_total{sink=\"hook\"}", 0.0, 0.0),
            ("sink_retries_total{sink=\"hook\"}", 2.0, f64::MAX),
            ("sink_state{sink=\"hook\",state=\"retrying\"}", 1.0, 1.0),
            ("sink_backlog_events{sink=\"hook\"}", 10.0, 10.0),
            ("sink_backlog_bytes{sink=\"hook\"}", 1.0, f64::MAX),
            ("sink_events_in_flight{sink=\"hook\"}", 1.0, 10.0),
            (
                "sink_oldest_undelivered_age_seconds{sink=\"hook\"}",
                f64::MIN_POSITIVE,
                waited,
            ),
            ("spool_bytes", 1.0, f64::MAX),
        ],
    );
    let since_event = sample(
        scrape,
        "chatwoot_bridge_token_last_event_age_seconds{token=\"a\"}",
    );
    let since_start = sample(
        scrape,
        "chatwoot_bridge_token_last_event_age_seconds{token=\"b\"}",
    );
    assert!(
        since_event <= since_start,
        "b never had an event: its age runs from its start"
    );
}

#[tokio::test]
async fn metrics_pass_promtool_and_move_as_events_flow_and_a_webhook_fails() {
    let mock = mock(Answer::Confirm, Answer::Confirm).await;
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("http://127.0.0.1:{}/hook", free_port());
    let config = bridge_yaml(&mock, dir.path())
        .sink("out", &file_sink(dir.path(), "out"))
        .sink(
            "hook",
            &format!(
                "{{ type: http, url: {}, retry: {{ initial: 20ms, max: 50ms }} }}",
                quoted(&dead)
            ),
        )
        .route_all(&["out", "hook"])
        .setting("admin: { listen: '127.0.0.1:0' }")
        .config();
    let hash = config.hash.clone();
    let bridge = Bridge::start(config).await.unwrap();
    let admin = bridge.admin_addr().expect("the admin endpoint is on");
    assert!(
        bridge.status().wait_for(WAIT, both_subscribed).await,
        "both tokens subscribe"
    );
    let (code, first) = get(admin, "/metrics").await;
    assert_eq!(code, 200);
    promtool_accepts(&first).await;
    expect(
        &samples(&first),
        &[
            ("token_subscribed{token=\"a\"}", 1.0, 1.0),
            ("token_state{token=\"a\",state=\"subscribed\"}", 1.0, 1.0),
            ("token_state{token=\"a\",state=\"pending\"}", 0.0, 0.0),
            (&format!("config_info{{hash=\"{hash}\"}}"), 1.0, 1.0),
            ("events_spooled_total", 0.0, 0.0),
        ],
    );

    for n in 0..10 {
        let data = format!(r#"{{"id":{n},"account_id":1,"conversation_id":{n}}}"#);
        mock.broadcast_to("ta", "message.created", &data);
    }
    let delivered = |b: &chatwoot_bridge::status::StatusBoard| {
        // Idle comes after the commit that empties the backlog, which `delivered` precedes.
        b.sink("out")
            .is_some_and(|s| s.delivered == 10 && s.state == SinkState::Idle)
            && b.sink("hook").is_some_and(|s| s.retries >= 2)
    };
    assert!(
        bridge.status().wait_for(WAIT, delivered).await,
        "the file has them, the webhook retries"
    );
    let (_, second) = get(admin, "/metrics").await;
    promtool_accepts(&second).await;
    expect_delivered_to_out_and_stuck_in_hook(&samples(&second));
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".into()));
    let report = status(admin).await;
    assert_eq!(report.sinks["hook"].backlog_events, 10);
    assert!(report.sinks["hook"].last_error.is_some());
    assert_eq!(report.tokens["a"].state, "subscribed");
    assert_eq!(report.config.hash, hash);
    shut_down(bridge).await;
    assert!(
        TcpStream::connect(admin).await.is_err(),
        "the endpoint stops with the bridge"
    );
    mock.stop().await;
}

#[tokio::test]
async fn readyz_flips_when_a_token_is_rejected_and_back_when_it_confirms_or_is_not_required() {
    let mock = mock(Answer::Confirm, Answer::Reject).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = bridge_yaml(&mock, dir.path())
        .sink("out", &file_sink(dir.path(), "out"))
        .route_all(&["out"]);
    let bridge = Bridge::start(yaml.clone().setting("admin: { listen: 0 }").config())
        .await
        .unwrap();
    let admin = bridge.admin_addr().unwrap();
    assert!(admin.ip().is_loopback(), "a port alone listens on loopback");
    let rejected = |b: &chatwoot_bridge::status::StatusBoard| {
        b.token("a")
            .is_some_and(|t| t.state == TokenState::Subscribed)
            && b.token("b").is_some_and(|t| t.rejected_subscriptions >= 1)
    };
    assert!(bridge.status().wait_for(WAIT, rejected).await);
    let (code, body) = get(admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("token b is"), "{body}");
    assert!(!body.contains("token a"), "{body}");
    assert_eq!(
        get(admin, "/healthz").await.0,
        200,
        "a rejected token is no dead loop"
    );
    let (_, metrics) = get(admin, "/metrics").await;
    assert!(
        sample(
            &samples(&metrics),
            "chatwoot_bridge_token_subscriptions_rejected_total{token=\"b\"}"
        ) >= 1.0
    );

    mock.set_answer("tb", Answer::Confirm);
    wait_until_async("/readyz to say ready once b confirms", || async {
        get(admin, "/readyz").await == (200, "ready\n".to_owned())
    })
    .await;
    shut_down(bridge).await;

    // Restarted to require `a` alone, with `b` rejected again: ready all along.
    mock.set_answer("tb", Answer::Reject);
    let bridge = Bridge::start(
        yaml.setting("admin: { listen: '127.0.0.1:0', ready_requires: [a] }")
            .config(),
    )
    .await
    .unwrap();
    let admin = bridge.admin_addr().unwrap();
    assert!(bridge.status().wait_for(WAIT, rejected).await);
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".into()));
    let report = status(admin).await;
    assert!(report.ready && report.healthy, "{report:?}");
    // `b` cycles rejected → pending (resubscribed after a backoff) → rejected: wait for the
    // first of its states, not whichever one a single read lands on.
    wait_until_async("/status to show b rejected", || async {
        status(admin).await.tokens["b"].state == "rejected"
    })
    .await;
    shut_down(bridge).await;
    mock.stop().await;
}

/// Agent tokens `a` and `b`; `a`'s events go to `from-a` (sink `out`), the others to `rest`
/// (sink `other`, which drops `secret_field`).
fn tap_config(mock: &MockServer, dir: &Path) -> chatwoot_bridge::config::Config {
    bridge_yaml(mock, dir)
        .sink(
            "out",
            &format!("{{ type: file, path: {} }}", quoted(dir.join("out.jsonl"))),
        )
        .sink(
            "other",
            &format!(
                "{{ type: file, path: {}, fields: {{ drop: [secret_field] }} }}",
                quoted(dir.join("other.jsonl"))
            ),
        )
        .route("{ name: from-a, match: { token: a }, to: [out] }")
        .route("{ name: rest, to: [other] }")
        .setting("admin: { listen: '127.0.0.1:0' }")
        .config()
}

/// Taps `admin` with `filter` for `count` events while the mock sends one event to each token
/// every 50 ms (a tap sees only what comes after it connected); the lines.
async fn tap_lines(
    mock: &MockServer,
    admin: SocketAddr,
    filter: TapFilter,
    count: u64,
) -> Vec<serde_json::Value> {
    let client = AdminClient::new(&admin.to_string()).unwrap();
    let tapping = async {
        let mut out = Vec::new();
        client.tap(&filter, Some(count), &mut out).await.unwrap();
        out
    };
    let sending = async {
        for n in 0.. {
            let data = format!(
                r#"{{"id":{n},"account_id":1,"secret_field":"s3cr3t","contact_inbox":{{"pubsub_token":"contact-secret"}}}}"#
            );
            mock.broadcast_to("ta", "message.created", &data);
            mock.broadcast_to("tb", "conversation.updated", &data);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let out = tokio::select! {
        out = within("the tap's events", tapping) => out,
        () = sending => unreachable!("the sending never ends"),
    };
    let text = String::from_utf8(out).unwrap();
    assert!(
        !text.contains("contact-secret"),
        "a tap never shows a pubsub token: {text}"
    );
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .filter(|line: &serde_json::Value| line.get("missed").is_none())
        .collect()
}

#[tokio::test]
async fn tap_shows_routed_events_redacted_and_its_filters_work() {
    let mock = mock(Answer::Confirm, Answer::Confirm).await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = Bridge::start(tap_config(&mock, dir.path())).await.unwrap();
    let admin = bridge.admin_addr().unwrap();
    assert!(bridge.status().wait_for(WAIT, both_subscribed).await);

    let by_token = tap_lines(
        &mock,
        admin,
        TapFilter {
            token: Some("b".into()),
            ..TapFilter::default()
        },
        3,
    )
    .await;
    assert_eq!(by_token.len(), 3);
    for line in &by_token {
        assert_eq!(line["routes"], serde_json::json!(["rest"]), "{line}");
        assert_eq!(line["sinks"], serde_json::json!(["other"]), "{line}");
        assert_eq!(line["event"]["chatwoottoken"], "b", "{line}");
        assert!(
            line["event"]["data"].get("secret_field").is_none(),
            "as `other` sees it: {line}"
        );
    }
    let by_route = tap_lines(
        &mock,
        admin,
        TapFilter {
            route: Some("from-a".into()),
            ..TapFilter::default()
        },
        2,
    )
    .await;
    for line in &by_route {
        assert_eq!(line["sinks"], serde_json::json!(["out"]), "{line}");
        assert_eq!(
            line["event"]["data"]["secret_field"], "s3cr3t",
            "`out` keeps it: {line}"
        );
    }
    let by_sink = tap_lines(
        &mock,
        admin,
        TapFilter {
            sink: Some("out".into()),
            ..TapFilter::default()
        },
        2,
    )
    .await;
    assert!(by_sink
        .iter()
        .all(|line| line["event"]["chatwoottoken"] == "a"));
    let everything = tap_lines(&mock, admin, TapFilter::default(), 4).await;
    let tokens: std::collections::BTreeSet<&str> = everything
        .iter()
        .filter_map(|l| l["event"]["chatwoottoken"].as_str())
        .collect();
    assert_eq!(tokens, ["a", "b"].into(), "no filter: every routed event");

    let refused = AdminClient::new(&admin.to_string())
        .unwrap()
        .tap(
            &TapFilter {
                sink: Some("nope".into()),
                ..TapFilter::default()
            },
            Some(1),
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused { status: 400, body, .. } if body == "no sink is named `nope`"),
        "{refused}"
    );
    shut_down(bridge).await;
    mock.stop().await;
}

/// Runs the binary with `args`; its exit status, stdout and stderr.
async fn run(args: &[&str]) -> (bool, String, String) {
    let output = within(
        "the command",
        tokio::process::Command::new(BIN)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_tap_top_and_reload_commands_talk_to_a_running_daemon() {
    let mock = mock(Answer::Confirm, Answer::Confirm).await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = Bridge::start(tap_config(&mock, dir.path())).await.unwrap();
    let admin = bridge.admin_addr().unwrap().to_string();
    assert!(bridge.status().wait_for(WAIT, both_subscribed).await);

    let (ok, out, err) = run(&["top", "--admin", &admin, "--once", "--interval", "100ms"]).await;
    assert!(ok, "{err}");
    for expected in ["TOKEN", "subscribed", "SINK", "other", "out", "spool "] {
        assert!(out.contains(expected), "`{expected}` in:\n{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("a ") && l.contains("subscribed")),
        "{out}"
    );
    assert!(!out.contains('\x1b'), "no screen clearing for one frame");

    let tap = tokio::spawn(run_owned(vec![
        "tap".into(),
        "--admin".into(),
        admin.clone(),
        "--token".into(),
        "a".into(),
        "--count".into(),
        "1".into(),
    ]));
    let sending = async {
        loop {
            mock.broadcast_to("ta", "message.created", r#"{"id":1,"account_id":1}"#);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (ok, out, err) = tokio::select! {
        tapped = within("tap --count 1", tap) => tapped.unwrap(),
        () = sending => unreachable!(),
    };
    assert!(ok, "{err}");
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(line["routes"], serde_json::json!(["from-a"]));

    let (ok, _, err) = run(&["reload", "--admin", &admin]).await;
    assert!(!ok);
    assert!(
        err.contains("503") && err.contains("reload is not wired"),
        "{err}"
    );
    let mut requests = bridge.reload_requests().expect("taken once");
    assert!(bridge.reload_requests().is_none());
    let answering = tokio::spawn(async move {
        let first = requests.recv().await.unwrap();
        first
            .reply
            .send(Ok("reloaded: 1 token added".into()))
            .unwrap();
        let second = requests.recv().await.unwrap();
        second
            .reply
            .send(Err("tokens[0].url: must start with ws://".into()))
            .unwrap();
    });
    let (ok, out, err) = run(&["reload", "--admin", &admin]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "reloaded: 1 token added\n");
    let (ok, _, err) = run(&["reload", "--admin", &admin]).await;
    assert!(!ok, "a refused reload exits non-zero");
    assert!(
        err.contains("422") && err.contains("tokens[0].url: must start with ws://"),
        "{err}"
    );
    answering.await.unwrap();
    shut_down(bridge).await;
    mock.stop().await;
}

/// [`run`] with owned arguments, for a spawned task.
async fn run_owned(args: Vec<String>) -> (bool, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&args).await
}

/// Sends `request` on a new connection and returns the answer's status line (empty when the
/// connection was closed without one).
async fn raw(admin: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = within("an answer", stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().unwrap_or("").to_owned()
}

#[tokio::test]
async fn requests_past_the_admin_limits_are_refused() {
    let mock = mock(Answer::Confirm, Answer::Confirm).await;
    let dir = tempfile::tempdir().unwrap();
    let config = bridge_yaml(&mock, dir.path())
        .sink("out", &file_sink(dir.path(), "out"))
        .route_all(&["out"])
        .setting("admin: { listen: '127.0.0.1:0' }")
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    let admin = bridge.admin_addr().unwrap();

    let big_header = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(
        raw(admin, big_header.as_bytes()).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_headers = format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(
        raw(admin, many_headers.as_bytes()).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let body = format!(
        "POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n{}",
        "b".repeat(4000)
    );
    assert_eq!(
        raw(admin, body.as_bytes()).await,
        "HTTP/1.1 413 Payload Too Large"
    );
    assert_eq!(
        raw(admin, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        raw(admin, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        raw(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await,
        "HTTP/1.1 200 OK"
    );

    // Every slot taken by a client that sends nothing: the next connection is closed at once.
    let mut idle = Vec::new();
    for _ in 0..MAX_ADMIN_CONNECTIONS {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    assert_eq!(
        raw(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await,
        "",
        "refused"
    );
    drop(idle);
    wait_until_async("a slot to be free again", || async {
        raw(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await == "HTTP/1.1 200 OK"
    })
    .await;
    shut_down(bridge).await;
    mock.stop().await;
}
