use super::*;

/// A config with one token, a Kafka sink, a NATS sink with `{id}` in its subject, a file sink
/// that drops a field, and an `unmatched` sink.
fn config() -> Config {
    Config::from_yaml(
        r#"
chatwoot: { url: "ws://127.0.0.1:9/cable" }
tokens:
  - { name: agent, pubsub_token: secret-token-value, account_id: 1, user_id: 3 }
sinks:
  kafka: { type: kafka, brokers: ["127.0.0.1:9"], topic: "cw.{account_id}.{event}" }
  nats: { type: nats, url: "nats://127.0.0.1:9", subject: "cw.{event}.{id}" }
  notes: { type: file, path: /dev/null, fields: { drop: [author.email] } }
  leftovers: { type: stdout }
routes:
  - { name: messages, match: { event: "message.*" }, to: [kafka, notes] }
  - { name: presence, match: { event: presence.update }, to: [nats] }
unmatched: leftovers
"#,
        &|_| None,
        false,
    )
    .expect("the test config is valid")
}

fn run(cases: &str) -> Report {
    let config = config();
    Cases::from_yaml(cases, &config)
        .expect("the cases are valid")
        .run(&config)
}

fn problems(cases: &str) -> String {
    Cases::from_yaml(cases, &config())
        .expect_err("the cases are invalid")
        .to_string()
}

#[test]
fn the_only_token_is_the_default_and_unmatched_events_go_to_the_unmatched_sink() {
    let report = run(r#"
cases:
  - { name: msg, event: message.created, data: { account_id: 7 }, reaches: [kafka, notes],
      targets: { kafka: cw.7.message.created } }
  - { name: other, fixture: contact.updated, reaches: [leftovers] }
"#);
    assert!(report.passed(), "{report}");
    assert_eq!(
        report.to_string().lines().last(),
        Some("2 cases: 2 passed, 0 failed")
    );
}

#[test]
fn a_fixture_is_patched_as_rfc_7386_says() {
    let mut data = serde_json::json!({ "a": { "b": 1, "c": 2 }, "d": [1, 2], "e": 3 });
    let patch = serde_json::json!({ "a": { "b": null, "x": { "y": 1 } }, "d": [3], "e": null });
    spec::merge_patch(&mut data, &patch);
    assert_eq!(
        data,
        serde_json::json!({ "a": { "c": 2, "x": { "y": 1 } }, "d": [3] })
    );
    // Through a case: the recording's inbox is 2; the patch moves it and removes `private`.
    let report = run(r#"
cases:
  - name: patched
    fixture: message.created
    data: { inbox_id: 3, private: null, author: { email: x@example.net } }
    reaches: [kafka, notes]
    removed: { notes: [author.email, private] }
    targets: { kafka: cw.1.message.created }
"#);
    assert!(report.passed(), "{report}");
}

#[test]
fn each_kind_of_failure_is_reported_with_what_differed() {
    let report = run(r#"
cases:
  - { name: sinks, event: message.created, data: { account_id: 1 }, reaches: [kafka, nats] }
  - { name: missed, event: message.created, data: { account_id: 1 }, misses: [notes] }
  - { name: topic, event: message.created, data: { account_id: 1 }, targets: { kafka: cw.2.message.created } }
  - { name: no account, event: message.created, data: {}, reaches: [kafka, notes] }
  - { name: kept, event: message.created, data: { account_id: 1, x: 1 }, removed: { notes: [x] } }
  - { name: unreached, event: presence.update, data: { account_id: 1 }, removed: { kafka: [x] } }
"#);
    assert!(!report.passed());
    assert_eq!(report.failed(), 6);
    let failures: Vec<&[Failure]> = report
        .outcomes
        .iter()
        .map(|o| o.failures.as_slice())
        .collect();
    assert_eq!(
        failures[0],
        [Failure::Sinks {
            missing: vec!["nats".into()],
            unexpected: vec!["notes".into()]
        }]
    );
    assert_eq!(
        failures[1],
        [Failure::Reached {
            sink: "notes".into()
        }]
    );
    assert_eq!(
        failures[2],
        [Failure::Target {
            sink: "kafka".into(),
            what: "topic",
            expected: "cw.2.message.created".into(),
            actual: Target::Rendered("cw.1.message.created".into()),
        }]
    );
    assert!(
        matches!(&failures[3], [Failure::Undeliverable { sink, why }]
            if sink == "kafka" && why.contains("has no account_id")),
        "{:?}",
        failures[3]
    );
    assert_eq!(
        failures[4],
        [Failure::NotRemoved {
            sink: "notes".into(),
            path: "x".into()
        }]
    );
    assert_eq!(
        failures[5],
        [Failure::RemovedButNotReached {
            sink: "kafka".into()
        }]
    );
    let text = report.to_string();
    assert!(text.contains("FAIL  sinks\n"), "{text}");
    assert!(
        text.contains("        - nats  (expected, not reached)"),
        "{text}"
    );
    assert!(
        text.contains("        + notes  (reached, not expected)"),
        "{text}"
    );
    assert!(text.contains("rendered cw.1.message.created"), "{text}");
    assert!(text.ends_with("6 cases: 0 passed, 6 failed\n"), "{text}");
}

#[test]
fn a_template_with_the_event_id_renders_an_assigned_id() {
    let config = config();
    let cases = Cases::from_yaml(
        "cases: [{ name: p, event: presence.update, data: { account_id: 1 }, reaches: [nats] }]",
        &config,
    )
    .unwrap();
    let event = &cases.cases[0].event;
    assert_ne!(event.id, crate::event::EventId::default());
    let subject = config.sinks["nats"].kind.target(event).unwrap().unwrap();
    assert_eq!(subject, format!("cw.presence.update.{}", event.id));
}

#[test]
fn problems_name_the_case_and_the_field() {
    let text = problems(
        r#"
cases:
  - { name: a, fixture: nope, token: ghost, reaches: [kafka, gone], targets: { notes: x } }
  - { name: b, event: x, data: { a: 1 }, removed: { kafka: [".a"] } }
"#,
    );
    for expected in [
        "cases[0].token (case `a`): no token is named `ghost` (tokens: `agent`)",
        "cases[0].fixture (case `a`): no recorded event is named `nope`",
        "cases[0].reaches[1] (case `a`): no sink is named `gone`",
        "cases[0].targets.notes (case `a`): sink `notes` writes to a file",
        "cases[0].targets.notes (case `a`): `notes` is not in `reaches`",
        "cases[1].removed.kafka[0] (case `b`): `.a` has an empty segment",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let text = problems("cases: [{ name: a, event: x, data: {}, reaches: [], tokn: agent }]");
    assert!(
        text.starts_with("cases[0].tokn (case `a`): unknown field `tokn`"),
        "{text}"
    );
}

#[test]
fn the_file_is_held_to_the_config_limits() {
    let config = config();
    let big = format!("cases: []\n#{}\n", "x".repeat(MAX_CONFIG_BYTES as usize));
    let err = Cases::from_yaml(&big, &config).unwrap_err().to_string();
    assert!(err.starts_with("cases file: is larger than"), "{err}");
    assert!(err.contains("MAX_CONFIG_BYTES"), "{err}");
    let deep = format!(
        "cases: [{{ name: d, event: x, reaches: [], data: {}1{} }}]",
        "{a: ".repeat(40),
        "}".repeat(40)
    );
    let err = Cases::from_yaml(&deep, &config).unwrap_err().to_string();
    assert!(err.contains("MAX_CONFIG_NESTING"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    std::fs::write(&path, &big).unwrap();
    let err = Cases::load(&path, &config).unwrap_err().to_string();
    assert!(err.contains("MAX_CONFIG_BYTES"), "{err}");
}

#[test]
fn data_nested_deeper_than_the_bridge_accepts_is_refused() {
    let config = Config::from_yaml(
        r#"
chatwoot: { url: "ws://127.0.0.1:9/cable", max_nesting: 4 }
tokens: [{ name: agent, pubsub_token: t, account_id: 1, user_id: 3 }]
sinks: { out: { type: stdout } }
routes: [{ name: all, match: {}, to: [out] }]
"#,
        &|_| None,
        false,
    )
    .unwrap();
    let err = Cases::from_yaml(
        "cases: [{ name: d, event: x, reaches: [out], data: { a: { b: { c: { d: { e: 1 } } } } } }]",
        &config,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cases[0].data (case `d`): nests deeper than chatwoot.max_nesting (4)"),
        "{err}"
    );
}
