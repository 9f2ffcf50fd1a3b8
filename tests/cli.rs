//! The `chatwoot-bridge` binary as an operator runs it.

mod support;

use std::process::Output;
use std::time::Duration;

use chatwoot_bridge::mock::{Answer, Blast, MockConfig};
use support::{mock_token, quoted, start_mock, wait_until, within, BridgeYaml};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_chatwoot-bridge");

async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let what = format!("chatwoot-bridge {} to finish", args.join(" "));
    within(&what, command.output())
        .await
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn check_accepts_the_example_and_reports_every_mistake_with_its_path() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/bridge.example.yaml");
    let out = run(&["check", "--config", example], &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok (2 tokens"));
    // The example's NATS sink, as the README's subscription examples expect.
    assert!(
        text(&out.stdout)
            .contains("sink nats-events: message.created goes to chatwoot.1.message.created"),
        "{}",
        text(&out.stdout)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        r#"
chatwoot: { url: "http://chat.example.com/cable" }
tokens:
  - { name: a, pubsub_token: "${SURELY_UNSET_VAR:-x}", account_id: 1 }
  - { name: a, pubsub_token: y }
sinks:
  out: { type: stdout }
routes:
  - { name: r, match: { event: "message.*", where: [{ path: content, matches: "(" }] }, to: [out, nope] }
"#,
    )
    .unwrap();
    let out = run(&["check", "--config", bad.to_str().unwrap()], &[]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    for expected in [
        "chatwoot.url: `http://chat.example.com/cable` must start with ws:// or wss://",
        "tokens[0].user_id: an agent token needs user_id",
        "tokens[1].name: `a` is used by another token already",
        "routes[0].to[1]: no sink is named `nope`",
        "routes[0].match.where[0].matches: not a valid regular expression",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    let missing = dir.path().join("missing-env.yaml");
    std::fs::write(
        &missing,
        "chatwoot: { url: ws://x/cable }\ntokens: [{ name: a, pubsub_token: \"${SURELY_UNSET_VAR}\" }]\n",
    )
    .unwrap();
    let out = run(&["check", "--config", missing.to_str().unwrap()], &[]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr)
        .contains("tokens[0].pubsub_token: environment variable `SURELY_UNSET_VAR` is not set"));
}

#[tokio::test]
async fn environment_overrides_apply() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        "chatwoot: { url: http://wrong/cable }\ntokens: [{ name: a, pubsub_token: t }]\n",
    )
    .unwrap();
    let out = run(
        &["check", "--config", path.to_str().unwrap()],
        &[(
            "CHATWOOT_BRIDGE__CHATWOOT__URL",
            "wss://right.example.com/cable",
        )],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test]
async fn check_connect_reports_each_token_without_its_secret() {
    let server = start_mock(MockConfig {
        tokens: vec![
            mock_token("good-secret", Answer::Confirm),
            mock_token("rotated-secret", Answer::Silent),
        ],
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let path = BridgeYaml::new(&server.url())
        .cable("confirm_timeout: 500ms")
        .agent("good", "good-secret", 1)
        .agent("rotated", "rotated-secret", 2)
        .sink("out", &format!("{{ type: file, path: {} }}", quoted(&out)))
        .sink(
            "unwritable",
            "{ type: file, path: /proc/no/such/dir/x.jsonl }",
        )
        .route_all(&["out", "unwritable"])
        .write(&dir.path().join("c.yaml"));
    let out = run(
        &["check", "--connect", "--config", path.to_str().unwrap()],
        &[],
    )
    .await;
    server.stop().await;
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("token good: ok (subscription confirmed)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("token rotated: FAILED: no confirm_subscription within 500ms"),
        "{stdout}"
    );
    assert!(stdout.contains("sink out: ok"), "{stdout}");
    assert!(
        stdout.contains("sink unwritable: FAILED: cannot open /proc/no/such/dir/x.jsonl"),
        "{stdout}"
    );
    let everything = format!("{stdout}{}", text(&out.stderr));
    assert!(!everything.contains("good-secret") && !everything.contains("rotated-secret"));
}

#[tokio::test]
async fn demo_runs_end_to_end_and_stops_by_itself() {
    let out = run(&["demo", "--rate", "50", "--events", "4"], &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("stdout is JSON lines"))
        .collect();
    // Four broadcasts, each seen by the agent and the visitor token.
    assert_eq!(events.len(), 8, "{stdout}");
    assert!(events.iter().all(|e| e["specversion"] == "1.0"));
    assert!(
        !stdout.contains("pubsub_token"),
        "contact tokens are stripped"
    );
}

/// A mock Chatwoot streaming 200 events a second to the token `t`.
async fn streaming_mock() -> chatwoot_bridge::mock::MockServer {
    start_mock(MockConfig {
        tokens: vec![mock_token("t", Answer::Confirm)],
        rate: 200.0,
        ..MockConfig::default()
    })
    .await
}

/// Sends SIGTERM with kill(1), as systemd and docker stop do.
fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("the daemon is running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully_with_exit_code_zero() {
    let server = streaming_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.jsonl");
    let path = BridgeYaml::new(&server.url())
        .token("{ name: a, pubsub_token: t }")
        .sink(
            "out",
            &format!("{{ type: file, path: {} }}", quoted(&out_file)),
        )
        .route_all(&["out"])
        .spool(&dir.path().join("spool"))
        .write(&dir.path().join("c.yaml"));
    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until("events to flow (20 in the file)", || {
        std::fs::read_to_string(&out_file)
            .unwrap_or_default()
            .lines()
            .count()
            >= 20
    })
    .await;
    sigterm(&child);
    let status = within("the daemon to exit after SIGTERM", child.wait())
        .await
        .unwrap();
    server.stop().await;
    assert!(status.success(), "exit status {status:?}");
    let lines = std::fs::read_to_string(&out_file).unwrap();
    for line in lines.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("no torn line at shutdown");
    }
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    // The only sink is a webhook that refuses connections, so the first SIGTERM's shutdown
    // waits the whole shutdown_timeout (60 s) for it; the second cuts that short.
    let server = streaming_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let path = BridgeYaml::new(&server.url())
        .token("{ name: a, pubsub_token: t }")
        .sink("hook", &format!("{{ type: http, url: '{url}' }}"))
        .route_all(&["hook"])
        .spool(&dir.path().join("spool"))
        .setting("shutdown_timeout: 60s")
        .write(&dir.path().join("c.yaml"));
    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (lines, reader) = collect_lines(child.stderr.take().unwrap());
    // An event in the spool that the webhook refused: the first shutdown has work to wait for.
    wait_until("a delivery to fail", || {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("delivery failed; will retry"))
    })
    .await;
    sigterm(&child);
    // Still shutting down: the dead webhook holds it for up to 60 s.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the sinks"
    );
    sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("the second SIGTERM ends the process within seconds")
        .unwrap();
    server.stop().await;
    reader.await.unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    let stderr = lines.lock().unwrap().join("\n");
    assert!(stderr.contains("second signal: exiting now"), "{stderr}");
}

/// Every line the child writes on stderr, collected as it comes.
fn collect_lines(
    stderr: tokio::process::ChildStderr,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    use tokio::io::AsyncBufReadExt;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let collected = lines.clone();
    let reader = tokio::spawn(async move {
        let mut stderr = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = stderr.next_line().await {
            collected.lock().unwrap().push(line);
        }
    });
    (lines, reader)
}

#[tokio::test]
async fn sigterm_on_a_disk_that_refuses_writes_exits_by_the_deadline_saying_what_was_lost() {
    // A file-size limit (RLIMIT_FSIZE) makes the spool's segment refuse every write past 1 MiB
    // with EFBIG, as a full disk refuses with ENOSPC: a real failing write, without root or a
    // small filesystem. SIGXFSZ is ignored (and stays so across exec) so that the write fails
    // instead of killing the process. The mock writes events as fast as the socket takes them,
    // and the only sink is a webhook nobody listens on.
    let server = start_mock(MockConfig {
        tokens: vec![mock_token("t", Answer::Confirm)],
        blast: Some(Blast {
            count: 50_000,
            rate: None,
            conversations: 10,
        }),
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let path = BridgeYaml::new(&server.url())
        .token("{ name: a, pubsub_token: t }")
        .sink("hook", &format!("{{ type: http, url: '{url}' }}"))
        .route_all(&["hook"])
        .spool(&dir.path().join("spool"))
        .setting("shutdown_timeout: 1s")
        .write(&dir.path().join("c.yaml"));
    // dash counts `ulimit -f` in 512-byte blocks: 1 MiB.
    let mut child = Command::new("sh")
        .args(["-c", r#"trap '' XFSZ; ulimit -f 2048; exec "$0" "$@""#, BIN])
        .args(["run", "--config", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (lines, reader) = collect_lines(child.stderr.take().unwrap());
    // The first retry has come: the ingest holds a batch, and the blast fills its channel and
    // holds the token's task behind it within milliseconds.
    wait_until("the spool to refuse a write twice", || {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("cannot append to the spool"))
            .count()
            >= 2
    })
    .await;
    sigterm(&child);
    // One second of deadline, four of grace, one for the runtime, and slack for a loaded machine.
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("SIGTERM ends the process by the shutdown deadline plus a few seconds")
        .unwrap();
    server.stop().await;
    reader.await.unwrap();
    let lines = lines.lock().unwrap();
    assert_eq!(status.code(), Some(74), "{status:?}\n{}", lines.join("\n"));
    let last = lines.last().expect("the daemon logged");
    assert!(
        last.contains("shutdown complete") && last.contains("events read were not stored"),
        "the last line says what was lost: {last}"
    );
}

/// The daemon's stderr at `RUST_LOG=trace` (and `env`), run against a mock streaming to the
/// token `wire-secret-token` until events reached its file sink, then stopped with SIGTERM.
async fn stderr_of_a_traced_run(env: &[(&str, &str)]) -> String {
    let server = start_mock(MockConfig {
        tokens: vec![mock_token("wire-secret-token", Answer::Confirm)],
        rate: 200.0,
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.jsonl");
    let path = BridgeYaml::new(&server.url())
        .token("{ name: a, pubsub_token: wire-secret-token }")
        .sink(
            "out",
            &format!("{{ type: file, path: {} }}", quoted(&out_file)),
        )
        .route_all(&["out"])
        .spool(&dir.path().join("spool"))
        .write(&dir.path().join("c.yaml"));
    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "trace")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Read as it comes: a full pipe would stop the daemon at its next log line.
    let mut stderr = child.stderr.take().unwrap();
    let reading = tokio::spawn(async move {
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stderr, &mut bytes)
            .await
            .unwrap();
        bytes
    });
    wait_until("events to flow (5 in the file)", || {
        std::fs::read_to_string(&out_file)
            .unwrap_or_default()
            .lines()
            .count()
            >= 5
    })
    .await;
    sigterm(&child);
    let status = within("the daemon to exit after SIGTERM", child.wait())
        .await
        .unwrap();
    server.stop().await;
    assert!(status.success(), "exit status {status:?}");
    text(&within("its stderr to end", reading).await.unwrap())
}

#[tokio::test]
async fn trace_logs_show_no_token_unless_asked_to() {
    // The contacts' token inside the recorded broadcasts' data.
    let contact_token = "bf2RWA4TaHac2fPThmKYp6Nn";
    // Asking for the transports by name does not lift the cap either.
    let capped = stderr_of_a_traced_run(&[("RUST_LOG", "trace,tungstenite::protocol=trace")]).await;
    // The WebSocket library still logs, at debug.
    assert!(capped.contains("Client handshake done"), "{capped}");
    assert!(
        !capped.contains("wire-secret-token"),
        "the subscribing token leaked"
    );
    assert!(!capped.contains(contact_token), "a contact's token leaked");

    let uncapped = stderr_of_a_traced_run(&[("CHATWOOT_BRIDGE_TRACE_SECRETS", "1")]).await;
    assert!(
        uncapped.contains("wire-secret-token"),
        "--trace-secrets shows the frames, token included"
    );
}

/// `dlq list` over a file whose last append was torn (a crash, a full disk): it lists every
/// whole letter and says how many lines it skipped, without their content; `dlq replay` keeps
/// the torn bytes aside rather than queueing them.
#[tokio::test]
async fn dlq_list_skips_a_torn_line_and_says_how_many() {
    use chatwoot_bridge::delivery::dead_letter::{DeadLetter, DeadLetters};
    use chatwoot_bridge::event::Event;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let config = BridgeYaml::new("ws://127.0.0.1:9/cable")
        .agent("agent", "tok-agent", 1)
        .sink("hook", "{ type: stdout }")
        .route_all(&["hook"])
        .spool(&spool)
        .write(&dir.path().join("bridge.yaml"));
    let letters: Vec<DeadLetter> = (1..=2)
        .map(|n| DeadLetter {
            event: Event::for_test("message.created", "agent", &format!(r#"{{"n":{n}}}"#)),
            error: "HTTP 400 Bad Request".into(),
            attempts: n,
            first_attempt: std::time::SystemTime::now(),
            last_attempt: std::time::SystemTime::now(),
        })
        .collect();
    DeadLetters::open(&spool)
        .unwrap()
        .append("hook", &letters)
        .unwrap();
    let file = spool.join("dead-letters/hook.jsonl");
    let mut torn_append = std::fs::read(&file).unwrap();
    torn_append.extend_from_slice(br#"{"sink":"hook","error":"token=SECRET"#);
    std::fs::write(&file, torn_append).unwrap();

    let config = config.to_str().unwrap();
    let list = [
        "dlq",
        "list",
        "--sink",
        "hook",
        "--log-format",
        "json",
        "--config",
    ];
    let out = run(&[&list[..], &[config]].concat(), &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).lines().count(),
        2,
        "{}",
        text(&out.stdout)
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("2 dead letters for sink hook; 1 lines skipped"),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#""line":3"#) && !stderr.contains("SECRET"),
        "{stderr}"
    );

    let out = run(
        &["dlq", "replay", "--sink", "hook", "--config", config],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("2 dead letters queued for redelivery to sink hook\n"),
        "{}",
        text(&out.stdout)
    );
    let torn: Vec<_> = std::fs::read_dir(spool.join("dead-letters"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("hook.jsonl.torn-")
        })
        .collect();
    assert_eq!(torn.len(), 1, "the torn bytes are kept aside");
}
