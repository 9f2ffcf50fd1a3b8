//! deploy/systemd/chatwoot-bridge.service: `systemd-analyze verify` accepts it, `systemd-analyze
//! security` scores its exposure at most 2.0, and the daemon, delivering to every kind of sink,
//! makes only system calls its `SystemCallFilter=` allows.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use chatwoot_bridge::mock::{Answer, MockConfig};

use crate::support::{
    mock_token, quoted, scripted, start_mock, wait_until, within, BridgeYaml, KafkaBroker,
    NatsServer, Receiver,
};
use crate::tools::{both, output_of, read, repo_path, tool};

const UNIT: &str = "deploy/systemd/chatwoot-bridge.service";

/// Where the unit expects the binary.
const INSTALLED_BINARY: &str = "/usr/local/bin/chatwoot-bridge";

const BIN: &str = env!("CARGO_BIN_EXE_chatwoot-bridge");

/// The highest exposure `systemd-analyze security` may give the unit (0 to 10, lower is safer).
const MAX_EXPOSURE: f64 = 2.0;

fn systemd_analyze() -> Command {
    Command::new(tool("systemd-analyze", "systemd"))
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    // The unit as installed, with the binary where it was built: verify checks that every
    // command it names is executable.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("chatwoot-bridge.service");
    std::fs::write(&unit, read(UNIT).replace(INSTALLED_BINARY, BIN)).unwrap();
    let out = output_of(systemd_analyze().arg("verify").arg(&unit));
    assert!(
        out.status.success(),
        "systemd-analyze verify:\n{}",
        both(&out)
    );
    // Unknown or misspelt settings are warnings, with a successful exit.
    assert!(
        both(&out).trim().is_empty(),
        "systemd-analyze verify warns:\n{}",
        both(&out)
    );
}

#[test]
fn the_units_exposure_is_at_most_2() {
    // --threshold is in tenths of the 0-10 scale it prints.
    let threshold = format!("--threshold={}", (MAX_EXPOSURE * 10.0) as u32);
    let out = output_of(
        systemd_analyze()
            .args(["security", "--offline=yes", &threshold])
            .arg(repo_path(UNIT)),
    );
    let report = both(&out);
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for chatwoot-bridge.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|figure| figure.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"));
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{report}"
    );
    assert!(out.status.success(), "{report}");
}

/// The values of every `key=` line of the unit, in order.
fn settings(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

/// The system calls in `group` (`@system-service`) or the one call `name`, groups inside
/// groups expanded, as `systemd-analyze syscall-filter` lists them.
fn expand(entry: &str, out: &mut BTreeSet<String>) {
    if !entry.starts_with('@') {
        out.insert(entry.to_owned());
        return;
    }
    let listed = output_of(systemd_analyze().args(["syscall-filter", entry]));
    assert!(listed.status.success(), "{}", both(&listed));
    let listed = String::from_utf8(listed.stdout).unwrap();
    // The first line names the group; `#` lines describe it.
    for line in listed.lines().skip(1).map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('@') {
            expand(line, out);
        } else {
            out.insert(line.to_owned());
        }
    }
}

/// The system calls the unit's `SystemCallFilter=` lines allow: the allow lists, less the
/// `~` deny lists.
fn allowed_syscalls() -> BTreeSet<String> {
    let (mut allowed, mut denied) = (BTreeSet::new(), BTreeSet::new());
    let filters = settings(&read(UNIT), "SystemCallFilter");
    assert!(!filters.is_empty(), "the unit has no SystemCallFilter=");
    for filter in filters {
        let (list, entries) = match filter.strip_prefix('~') {
            Some(rest) => (&mut denied, rest.to_owned()),
            None => (&mut allowed, filter),
        };
        for entry in entries.split_whitespace() {
            expand(entry, list);
        }
    }
    assert!(allowed.contains("epoll_wait"), "{allowed:?}");
    allowed.difference(&denied).cloned().collect()
}

/// The system call names in `strace -c`'s table.
fn strace_summary(path: &Path) -> BTreeSet<String> {
    let table = std::fs::read_to_string(path).unwrap();
    let mut calls = BTreeSet::new();
    for line in table.lines() {
        let columns: Vec<&str> = line.split_whitespace().collect();
        // Rows start with the share of time; the header, the rules and `total` do not count.
        let is_row = columns.first().is_some_and(|c| c.parse::<f64>().is_ok());
        if is_row && columns.len() >= 5 && columns[columns.len() - 1] != "total" {
            calls.insert(columns[columns.len() - 1].to_owned());
        }
    }
    calls
}

/// The bridge traced: the mock's token `t` to a file, a webhook, NATS and Kafka.
struct TracedRun {
    /// `strace -f -c -o SUMMARY chatwoot-bridge run ...`.
    strace: tokio::process::Child,
    /// Where strace writes its table when the bridge exits.
    summary: PathBuf,
    /// The file sink's file.
    out_file: PathBuf,
}

/// Starts the bridge under strace, delivering to one sink of each kind.
fn traced_run(dir: &Path, cable: &str, nats: &str, kafka: &str, hook: &str) -> TracedRun {
    let out_file = dir.join("out.jsonl");
    let config = BridgeYaml::new(cable)
        .token("{ name: a, pubsub_token: t }")
        .sink(
            "file",
            &format!("{{ type: file, path: {} }}", quoted(&out_file)),
        )
        .sink("hook", &format!("{{ type: http, url: {} }}", quoted(hook)))
        .sink(
            "nats",
            &format!("{{ type: nats, url: {}, subject: 'traced.{{event}}', jetstream: {{ stream: TRACED, create: true }} }}", quoted(nats)),
        )
        .sink(
            "kafka",
            &format!("{{ type: kafka, brokers: {}, topic: traced }}", quoted(kafka)),
        )
        .route_all(&["file", "hook", "nats", "kafka"])
        .spool(&dir.join("spool"))
        .write(&dir.join("c.yaml"));
    let summary = dir.join("strace.txt");
    let strace = tokio::process::Command::new(tool("strace", "strace"))
        .args(["-f", "-qq", "-c", "-o"])
        .arg(&summary)
        .arg(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("strace starts");
    TracedRun {
        strace,
        summary,
        out_file,
    }
}

/// Sends SIGTERM to the bridge strace runs (strace's child), as systemd does.
fn stop_traced_bridge(strace: &tokio::process::Child) {
    let strace_pid = strace.id().expect("strace runs");
    let children =
        std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children")).unwrap();
    let bridge = children.split_whitespace().next().expect("the bridge runs");
    let sent = std::process::Command::new("kill")
        .args(["-TERM", bridge])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[tokio::test]
async fn the_daemon_makes_only_system_calls_the_units_filter_allows() {
    let allowed = allowed_syscalls();
    let nats = NatsServer::start().await;
    let kafka = KafkaBroker::start().await;
    kafka.create_topics(&[("traced", 1)]).await;
    let receiver = Receiver::start(scripted(vec![])).await;
    let mut stream = nats.subscribed("traced.>").await;
    let mock = start_mock(MockConfig {
        tokens: vec![mock_token("t", Answer::Confirm)],
        rate: 100.0,
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut run = traced_run(
        dir.path(),
        &mock.url(),
        &nats.url(),
        &kafka.bootstrap(),
        &receiver.url("/in"),
    );

    receiver.wait_for(5).await;
    within(
        "an event on NATS",
        futures_util::StreamExt::next(&mut stream),
    )
    .await
    .expect("a NATS message");
    let consumer = kafka.consumer("traced", 1);
    within("an event on Kafka", consumer.recv())
        .await
        .expect("a Kafka record");
    let out_file = run.out_file.clone();
    wait_until("events in the file sink", || {
        std::fs::read_to_string(&out_file).is_ok_and(|t| t.lines().count() >= 5)
    })
    .await;

    stop_traced_bridge(&run.strace);
    let status = within("the traced bridge to exit", run.strace.wait())
        .await
        .unwrap();
    assert!(status.success(), "the bridge under strace: {status}");
    let used = strace_summary(&run.summary);
    assert!(
        used.contains("epoll_wait") && used.contains("connect"),
        "strace's table was not read: {used:?}"
    );
    let outside: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        outside.is_empty(),
        "system calls outside the unit's SystemCallFilter= (they fail with EPERM under \
         systemd): {outside:?}"
    );
}
