//! The `chatwoot-bridge` binary as an operator runs it.

use std::process::Output;
use std::time::Duration;

use chatwoot_bridge::mock::{Answer, MockConfig, MockServer, MockToken};
use tokio::process::Command;
use tokio::time::timeout;

const BIN: &str = env!("CARGO_BIN_EXE_chatwoot-bridge");

async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the command finishes")
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
    let server = MockServer::start(MockConfig {
        tokens: vec![
            MockToken {
                pubsub_token: "good-secret".into(),
                answer: Answer::Confirm,
            },
            MockToken {
                pubsub_token: "rotated-secret".into(),
                answer: Answer::Silent,
            },
        ],
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
chatwoot: {{ url: "{}", confirm_timeout: 500ms }}
tokens:
  - {{ name: good, pubsub_token: good-secret, account_id: 1, user_id: 1 }}
  - {{ name: rotated, pubsub_token: rotated-secret, account_id: 1, user_id: 2 }}
sinks:
  out: {{ type: file, path: {} }}
  unwritable: {{ type: file, path: /proc/no/such/dir/x.jsonl }}
routes:
  - {{ name: all, to: [out, unwritable] }}
"#,
            server.url(),
            serde_json::to_string(&dir.path().join("out.jsonl")).unwrap()
        ),
    )
    .unwrap();
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

#[tokio::test]
async fn sigterm_shuts_down_gracefully_with_exit_code_zero() {
    let server = MockServer::start(MockConfig {
        tokens: vec![MockToken {
            pubsub_token: "t".into(),
            answer: Answer::Confirm,
        }],
        rate: 200.0,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let out_file = dir.path().join("out.jsonl");
    std::fs::write(
        &path,
        format!(
            "chatwoot: {{ url: \"{}\" }}\ntokens: [{{ name: a, pubsub_token: t }}]\nsinks: {{ out: {{ type: file, path: {} }} }}\nroutes: [{{ name: all, to: [out] }}]\nspool: {{ dir: {} }}\n",
            server.url(),
            serde_json::to_string(&out_file).unwrap(),
            serde_json::to_string(&dir.path().join("spool")).unwrap()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let got_events = timeout(Duration::from_secs(20), async {
        while std::fs::read_to_string(&out_file)
            .unwrap_or_default()
            .lines()
            .count()
            < 20
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(got_events.is_ok(), "events did not flow");
    let pid = child.id().unwrap() as i32;
    // kill(1) sends the signal, as systemd and docker stop do.
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    server.stop().await;
    assert!(status.success(), "exit status {status:?}");
    let lines = std::fs::read_to_string(&out_file).unwrap();
    for line in lines.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("no torn line at shutdown");
    }
}
