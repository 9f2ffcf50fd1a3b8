//! The `chatwoot-bridge` binary as an operator runs it.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatwoot_bridge::mock::{Answer, Blast, MockConfig};
use support::{
    events_in, free_port, mock_token, quoted, signal, start_mock, wait_until, within, BridgeYaml,
};
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
        .cable("confirm_timeout: 2s")
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
        stdout.contains("token rotated: FAILED: no confirm_subscription within 2s"),
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

/// Writes `dir/c.yaml`: the mock at `cable` streaming to `token`, every event routed to a file
/// sink at `dir/out.jsonl`, the spool in `dir/spool`. Returns the config and the sink's file.
fn file_sink_config(cable: &str, token: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let out_file = dir.join("out.jsonl");
    let config = BridgeYaml::new(cable)
        .token(&format!("{{ name: a, pubsub_token: {token} }}"))
        .sink(
            "out",
            &format!("{{ type: file, path: {} }}", quoted(&out_file)),
        )
        .route_all(&["out"])
        .spool(&dir.join("spool"))
        .write(&dir.join("c.yaml"));
    (config, out_file)
}

/// Writes `dir/c.yaml`: the mock at `cable` streaming to the token `t`, every event routed to a
/// webhook on a loopback port nobody listens on (every delivery fails), the spool in
/// `dir/spool`, shutting down within `shutdown_timeout`.
fn refused_webhook_config(cable: &str, dir: &Path, shutdown_timeout: &str) -> PathBuf {
    let url = format!("http://127.0.0.1:{}/hook", free_port());
    BridgeYaml::new(cable)
        .token("{ name: a, pubsub_token: t }")
        .sink("hook", &format!("{{ type: http, url: '{url}' }}"))
        .route_all(&["hook"])
        .spool(&dir.join("spool"))
        .setting(&format!("shutdown_timeout: {shutdown_timeout}"))
        .write(&dir.join("c.yaml"))
}

/// The daemon as `run --config <config>`, killed if the test ends before it does.
fn daemon(config: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["run", "--config", config.to_str().unwrap()])
        .kill_on_drop(true);
    command
}

/// Waits until the file sink's `file` holds at least `count` lines.
async fn wait_for_lines_in(file: &Path, count: usize) {
    wait_until(&format!("events to flow ({count} in the file)"), || {
        events_in(file).len() >= count
    })
    .await;
}

/// Sends SIGTERM to the daemon and waits for it to exit.
async fn stop_with_sigterm(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    signal(child, "TERM");
    within("the daemon to exit after SIGTERM", child.wait())
        .await
        .unwrap()
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully_with_exit_code_zero() {
    let server = streaming_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let (path, out_file) = file_sink_config(&server.url(), "t", dir.path());
    let mut child = daemon(&path).spawn().unwrap();
    wait_for_lines_in(&out_file, 20).await;
    let status = stop_with_sigterm(&mut child).await;
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
    let path = refused_webhook_config(&server.url(), dir.path(), "60s");
    let mut child = daemon(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = StderrLines::collect(&mut child);
    // An event in the spool that the webhook refused: the first shutdown has work to wait for.
    stderr
        .wait_for("a delivery to fail", "delivery failed; will retry", 1)
        .await;
    signal(&child, "TERM");
    // Still shutting down: the dead webhook holds it for up to 60 s.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the sinks"
    );
    signal(&child, "TERM");
    // Well under the 60 s the dead webhook would hold a graceful shutdown.
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the second SIGTERM ends the process within seconds")
        .unwrap();
    server.stop().await;
    let stderr = stderr.all().await.join("\n");
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(stderr.contains("second signal: exiting now"), "{stderr}");
}

/// Every line a child writes on stderr, collected as it comes: a full pipe would stop the
/// daemon at its next log line.
struct StderrLines {
    /// The lines so far, shared with the task that reads them.
    lines: Arc<Mutex<Vec<String>>>,
    /// The task that reads them; it ends when the child closes its stderr.
    reader: tokio::task::JoinHandle<()>,
}

impl StderrLines {
    /// Starts collecting the piped stderr of `child`.
    fn collect(child: &mut tokio::process::Child) -> StderrLines {
        use tokio::io::AsyncBufReadExt;
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = lines.clone();
        let reader = tokio::spawn(async move {
            let mut stderr = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr.next_line().await {
                collected.lock().unwrap().push(line);
            }
        });
        StderrLines { lines, reader }
    }

    /// Waits until `count` lines contain `needle`; fails the test naming `what` otherwise.
    async fn wait_for(&self, what: &str, needle: &str, count: usize) {
        wait_until(what, || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .count()
                >= count
        })
        .await;
    }

    /// Every line, once the child has closed its stderr.
    async fn all(self) -> Vec<String> {
        self.reader.await.unwrap();
        std::mem::take(&mut *self.lines.lock().unwrap())
    }
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
    let path = refused_webhook_config(&server.url(), dir.path(), "1s");
    // dash counts `ulimit -f` in 512-byte blocks: 1 MiB.
    let mut child = Command::new("sh")
        .args(["-c", r#"trap '' XFSZ; ulimit -f 2048; exec "$0" "$@""#, BIN])
        .args(["run", "--config", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = StderrLines::collect(&mut child);
    // The first retry has come: the ingest holds a batch, and the blast fills its channel and
    // holds the token's task behind it within milliseconds.
    stderr
        .wait_for(
            "the spool to refuse a write twice",
            "cannot append to the spool",
            2,
        )
        .await;
    signal(&child, "TERM");
    // One second of deadline, four of grace, one for the runtime, and slack for a loaded machine.
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("SIGTERM ends the process by the shutdown deadline plus a few seconds")
        .unwrap();
    server.stop().await;
    let lines = stderr.all().await;
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
    let (path, out_file) = file_sink_config(&server.url(), "wire-secret-token", dir.path());
    let mut child = daemon(&path)
        .env("RUST_LOG", "trace")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
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
    wait_for_lines_in(&out_file, 5).await;
    let status = stop_with_sigterm(&mut child).await;
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

#[tokio::test]
async fn sighup_reloads_the_config_and_the_file_sink_reopens_its_file_after_logrotate() {
    let server = streaming_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let (path, out_file) = file_sink_config(&server.url(), "t", dir.path());
    let mut child = daemon(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = StderrLines::collect(&mut child);
    wait_for_lines_in(&out_file, 10).await;

    // logrotate moves the file away and sends SIGHUP; the config gains a second sink meanwhile.
    let rotated = dir.path().join("out.jsonl.1");
    std::fs::rename(&out_file, &rotated).unwrap();
    let second = dir.path().join("second.jsonl");
    BridgeYaml::new(&server.url())
        .token("{ name: a, pubsub_token: t }")
        .sink(
            "out",
            &format!("{{ type: file, path: {} }}", quoted(&out_file)),
        )
        .sink(
            "second",
            &format!("{{ type: file, path: {} }}", quoted(&second)),
        )
        .route_all(&["out", "second"])
        .spool(&dir.path().join("spool"))
        .write(&path);
    signal(&child, "HUP");
    stderr.wait_for("the reload", "config reloaded", 1).await;
    wait_for_lines_in(&out_file, 10).await;
    wait_for_lines_in(&second, 10).await;
    let rotated_lines = events_in(&rotated).len();

    // A broken config is logged with its problems; the running one goes on.
    std::fs::write(&path, "chatwoot: { url: ws://x/cable }\ntokens: []\n").unwrap();
    signal(&child, "HUP");
    stderr
        .wait_for(
            "the refusal",
            "config not reloaded, the running one stays",
            1,
        )
        .await;
    let before = events_in(&second).len();
    wait_for_lines_in(&second, before + 10).await;
    assert!(child.try_wait().unwrap().is_none(), "still running");

    let status = stop_with_sigterm(&mut child).await;
    server.stop().await;
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        events_in(&rotated).len(),
        rotated_lines,
        "nothing more went to the moved file"
    );
    assert!(events_in(&out_file).len() >= 10);
    let lines = stderr.all().await.join("\n");
    assert!(
        lines.contains("tokens: at least one token is needed"),
        "{lines}"
    );
}

#[tokio::test]
async fn reload_on_the_admin_endpoint_applies_the_file_and_a_refused_one_exits_non_zero() {
    let server = streaming_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let out_file = dir.path().join("out.jsonl");
    let second = dir.path().join("second.jsonl");
    let path = dir.path().join("c.yaml");
    let config = |sinks: &[&str]| {
        let mut yaml = BridgeYaml::new(&server.url())
            .token("{ name: a, pubsub_token: t }")
            .sink(
                "out",
                &format!("{{ type: file, path: {} }}", quoted(&out_file)),
            );
        if sinks.contains(&"second") {
            yaml = yaml.sink(
                "second",
                &format!("{{ type: file, path: {} }}", quoted(&second)),
            );
        }
        yaml.route_all(sinks)
            .spool(&dir.path().join("spool"))
            .setting(&format!("admin: {{ listen: '{admin}' }}"))
            .write(&path);
    };
    config(&["out"]);
    let mut child = daemon(&path).spawn().unwrap();
    wait_for_lines_in(&out_file, 10).await;

    config(&["out", "second"]);
    let reloaded = run(&["reload", "--admin", &admin], &[]).await;
    assert!(reloaded.status.success(), "{}", text(&reloaded.stderr));
    let answer = text(&reloaded.stdout);
    assert!(
        answer.contains("second"),
        "the answer says what changed: {answer}"
    );
    wait_for_lines_in(&second, 10).await;

    std::fs::write(&path, "chatwoot: { url: ws://x/cable }\ntokens: []\n").unwrap();
    let refused = run(&["reload", "--admin", &admin], &[]).await;
    assert!(!refused.status.success(), "a refused reload exits non-zero");
    let why = text(&refused.stderr);
    assert!(
        why.contains("tokens: at least one token is needed"),
        "the refusal names the problem: {why}"
    );
    let before = events_in(&second).len();
    wait_for_lines_in(&second, before + 10).await;

    let status = stop_with_sigterm(&mut child).await;
    server.stop().await;
    assert!(status.success(), "exit status {status:?}");
}
