//! `chatwoot-bridge test --config CONFIG CASES` as an operator (or CI) runs it: the shipped cases
//! pass against the shipped config, a wrong case fails with a diff, a malformed file is refused.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_chatwoot-bridge");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/bridge.example.yaml");
const EXAMPLE_CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/bridge.example.cases.yaml");

/// Runs `test` on the example config and `cases`. Nothing it does waits on the network.
fn test_command(cases: &Path) -> Output {
    test_command_on(Path::new(EXAMPLE), cases)
}

/// Runs `test` on `config` and `cases`.
fn test_command_on(config: &Path, cases: &Path) -> Output {
    Command::new(BIN)
        .args(["test", "--config"])
        .arg(config)
        .arg(cases)
        .output()
        .expect("the binary runs")
}

/// `text` with the commented lines from the one containing `first` on (while they stay
/// commented at the same indent) uncommented; fails when `first` is not found once.
fn uncomment(text: &str, first: &str) -> String {
    assert_eq!(
        text.matches(first).count(),
        1,
        "{first:?} is in the file once"
    );
    let mut inside = false;
    let mut out = String::new();
    for line in text.lines() {
        inside = if line.contains(first) {
            true
        } else {
            inside && line.starts_with("  #   ")
        };
        if inside {
            out.push_str(&line.replacen("  # ", "  ", 1));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_shipped_cases_pass_against_the_example_config() {
    let out = test_command(Path::new(EXAMPLE_CASES));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let shipped = std::fs::read_to_string(EXAMPLE_CASES).unwrap();
    let count = shipped.matches("\n  - name: ").count();
    assert!(count >= 9, "the shipped file has its cases");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok    ")).count(),
        count,
        "{stdout}"
    );
    assert!(
        stdout.ends_with(&format!("{count} cases: {count} passed, 0 failed\n")),
        "{stdout}"
    );
    // Every route of the example is exercised by some case.
    for sink in [
        "kafka-main",
        "analytics",
        "crm-webhook",
        "archive",
        "nats-events",
    ] {
        assert!(shipped.contains(sink), "no case reaches {sink}");
    }
}

#[test]
fn a_wrong_case_fails_with_a_diff_that_names_the_case_and_the_sinks() {
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.yaml");
    std::fs::write(
        &cases,
        r#"
cases:
  - name: presence is archived
    fixture: presence.update
    token: support-agent
    reaches: [archive, nats-events]
  - name: resolved conversations go to Kafka
    fixture: conversation.status_changed
    token: support-agent
    data: { status: resolved }
    reaches: [kafka-main, archive, nats-events]
    targets:
      nats-events: chatwoot.2.conversation.status_changed
"#,
    )
    .unwrap();
    let out = test_command(&cases);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let expected = "\
ok    presence is archived
FAIL  resolved conversations go to Kafka
      sinks expected: archive, kafka-main, nats-events
      sinks reached:  archive, crm-webhook, nats-events
        - kafka-main  (expected, not reached)
        + crm-webhook  (reached, not expected)
      nats-events subject: expected chatwoot.2.conversation.status_changed
                           rendered chatwoot.1.conversation.status_changed
2 cases: 1 passed, 1 failed
";
    assert_eq!(stdout, expected);
}

#[test]
fn a_malformed_cases_file_is_refused_naming_the_case_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.yaml");
    let refused = |yaml: &str| {
        std::fs::write(&cases, yaml).unwrap();
        let out = test_command(&cases);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
        assert!(out.stdout.is_empty(), "nothing runs: {}", text(&out.stdout));
        text(&out.stderr)
    };

    let stderr = refused(
        r#"
cases:
  - name: a typo
    fixture: presence.update
    token: support-agent
    reach: [archive]
"#,
    );
    assert!(
        stderr.contains("cases[0].reach (case `a typo`): unknown field `reach`"),
        "{stderr}"
    );

    let stderr = refused(
        r#"
cases:
  - name: fine
    fixture: presence.update
    token: support-agent
    reaches: [archive, nats-events]
  - name: wrong names
    fixture: message.deleted
    token: support-agent
    reaches: [archive, kafka]
    targets: { archive: events.jsonl }
"#,
    );
    for expected in [
        "cases[1].fixture (case `wrong names`): no recorded event is named `message.deleted`",
        "cases[1].reaches[1] (case `wrong names`): no sink is named `kafka` (sinks: analytics, archive, crm-webhook, kafka-main, nats-events)",
        "cases[1].targets.archive (case `wrong names`): sink `archive` writes to a file",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("case `fine`"), "{stderr}");

    let stderr = refused("cases:\n  - name: x\n    reaches: [archive\n");
    assert!(stderr.contains("cases file is not valid YAML"), "{stderr}");
}

#[test]
fn the_commented_drop_presence_route_drops_presence_once_uncommented() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    let dropping = dir.path().join("bridge.yaml");
    std::fs::write(&dropping, uncomment(&example, "# - { name: drop-presence,")).unwrap();
    let shipped = std::fs::read_to_string(EXAMPLE_CASES).unwrap();
    let uncommented = uncomment(&shipped, "# - name: presence updates are dropped");
    let case = uncommented
        .split("\n\n")
        .find(|block| block.contains("name: presence updates are dropped"))
        .expect("the commented case is shipped");
    let case = &case[case.find("  - name: presence updates are dropped").unwrap()..];
    let cases = dir.path().join("cases.yaml");
    std::fs::write(&cases, format!("cases:\n{case}\n")).unwrap();

    let out = test_command_on(&dropping, &cases);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert_eq!(
        stdout,
        "ok    presence updates are dropped\n1 cases: 1 passed, 0 failed\n"
    );
    // The route is what drops it: the example as shipped archives presence.
    let out = test_command(&cases);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
}
