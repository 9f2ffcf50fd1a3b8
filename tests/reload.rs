//! Reloading the config of a running bridge ([`Bridge::reload`], what SIGHUP does): tokens,
//! routes and sinks change while everything else keeps running, against the mock Chatwoot, real
//! files and a real webhook receiver.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chatwoot_bridge::mock::{Answer, MockConfig, MockServer};
use chatwoot_bridge::status::TokenState;
use chatwoot_bridge::{Bridge, ReloadError};
use hyper::StatusCode;
use support::{
    mock_token, quoted, shut_down, start_mock, wait_until, wait_until_explained, within,
    BridgeYaml, Receiver,
};

/// One event a file sink wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    /// Its CloudEvents id.
    id: String,
    /// The token that read it.
    token: String,
    /// The mock's number of the broadcast.
    seq: u64,
}

/// Every event in the file sink's file at `path`, in file order; none when there is no file.
fn written(path: &Path) -> Vec<Written> {
    support::events_in(path)
        .into_iter()
        .map(|event| Written {
            id: event["id"].as_str().unwrap().to_owned(),
            token: event["chatwoottoken"].as_str().unwrap().to_owned(),
            seq: event["data"]["mock_seq"].as_u64().unwrap(),
        })
        .collect()
}

/// A file sink at `path`, as the YAML of its `sinks:` entry.
fn file_sink(path: &Path) -> String {
    format!("{{ type: file, path: {} }}", quoted(path))
}

/// A mock Chatwoot confirming every token in `secrets`, broadcasting `rate` events a second
/// (`count` of them, if given, once one subscription streams).
async fn mock(secrets: &[&str], rate: f64, count: Option<u64>) -> MockServer {
    start_mock(MockConfig {
        tokens: secrets
            .iter()
            .map(|s| mock_token(s, Answer::Confirm))
            .collect(),
        rate,
        count,
        wait_for_subscriptions: 1,
        ..MockConfig::default()
    })
    .await
}

/// A config reading `server` with `tokens` (name, secret), the spool in `dir/spool`.
fn reading(server: &MockServer, tokens: &[(&str, &str)], dir: &Path) -> BridgeYaml {
    tokens
        .iter()
        .fold(BridgeYaml::new(&server.url()), |yaml, (name, secret)| {
            yaml.token(&format!("{{ name: {name}, pubsub_token: {secret} }}"))
        })
        .spool(&dir.join("spool"))
}

#[tokio::test]
async fn a_reload_adds_one_token_and_removes_another_while_a_third_keeps_streaming() {
    let server = mock(&["keep-secret", "gone-secret", "new-secret"], 100.0, None).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let config = |tokens: &[(&str, &str)]| {
        reading(&server, tokens, dir.path())
            .sink("out", &file_sink(&out))
            .route_all(&["out"])
            .config()
    };
    let mut bridge = Bridge::start(config(&[("keep", "keep-secret"), ("gone", "gone-secret")]))
        .await
        .unwrap();
    let events_of = |bridge: &Bridge, token: &str| bridge.status().token(token).map(|t| t.events);
    wait_until("both tokens stream", || {
        events_of(&bridge, "keep") > Some(0) && events_of(&bridge, "gone") > Some(0)
    })
    .await;

    let report = within(
        "the reload",
        bridge.reload(config(&[("keep", "keep-secret"), ("new", "new-secret")])),
    )
    .await
    .unwrap();
    assert_eq!(report.tokens.started, ["new"]);
    assert_eq!(report.tokens.stopped, ["gone"]);
    assert!(report.tokens.restarted.is_empty(), "{report}");
    assert!(bridge.status().token("gone").is_none());

    let kept_before = events_of(&bridge, "keep").unwrap();
    let file_before = written(&out).len();
    wait_until("the new token streams and the kept one goes on", || {
        events_of(&bridge, "new") > Some(0) && events_of(&bridge, "keep") > Some(kept_before + 20)
    })
    .await;
    wait_until(
        "events of both tokens reach the file after the reload",
        || {
            let after = written(&out).split_off(file_before);
            ["keep", "new"]
                .iter()
                .all(|t| after.iter().any(|w| w.token == *t))
        },
    )
    .await;
    let keep = bridge.status().token("keep").unwrap();
    assert_eq!(
        keep.connects, 1,
        "the kept token's socket was never reopened"
    );
    assert_eq!(keep.state, TokenState::Subscribed);
    assert_eq!(bridge.status().config().reloads_succeeded, 1);
    shut_down(bridge).await;
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_reload_keeps_the_old_config_running_and_names_every_problem() {
    let server = mock(&["t"], 100.0, None).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let good = reading(&server, &[("a", "t")], dir.path())
        .sink("out", &file_sink(&out))
        .route_all(&["out"]);
    let mut bridge = Bridge::start(good.config()).await.unwrap();
    let hash = bridge.status().config().hash;
    assert!(!hash.is_empty(), "loaded at start");
    let sha256: String = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(good.text().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    };
    assert_eq!(hash, sha256, "what sha256sum prints for the file");

    // Not a valid config: every problem is named with its key, and nothing is applied.
    let invalid = dir.path().join("invalid.yaml");
    good.clone()
        .token("{ name: a, pubsub_token: other }")
        .route("{ name: stray, to: [nowhere] }")
        .setting("retired_sinks: { out: drain }")
        .write(&invalid);
    let refused = within("the reload", bridge.reload_from(&invalid))
        .await
        .unwrap_err();
    let text = refused.to_string();
    assert!(matches!(refused, ReloadError::Invalid(_)), "{text}");
    assert!(
        text.contains("tokens[1].name: `a` is used by another token already"),
        "{text}"
    );
    assert!(
        text.contains("routes[1].to[0]: no sink is named `nowhere`"),
        "{text}"
    );
    assert!(
        text.contains("retired_sinks.out: `out` is configured under sinks"),
        "{text}"
    );

    // Valid, but with settings the running process is built around: each is named.
    let restart_only = good
        .clone()
        .spool_setting("max_bytes: 2000000000")
        .setting("memory_limit: 33554432")
        .cable("stale_after: 20s");
    let refused = within("the reload", bridge.reload(restart_only.config()))
        .await
        .unwrap_err();
    let text = refused.to_string();
    assert!(matches!(refused, ReloadError::Refused(_)), "{text}");
    for key in ["spool.max_bytes", "memory_limit", "chatwoot.stale_after"] {
        assert!(
            text.contains(&format!("{key}: changes from")) && text.contains("needs a restart"),
            "{key} missing in: {text}"
        );
    }

    let config = bridge.status().config();
    assert_eq!(config.hash, hash, "the old config runs");
    assert_eq!((config.reloads_failed, config.reloads_succeeded), (2, 0));
    assert!(config.last_error.unwrap().contains("chatwoot.stale_after"));
    let before = written(&out).len();
    wait_until("events still flow to the old config's sink", || {
        written(&out).len() > before + 10
    })
    .await;
    shut_down(bridge).await;
    server.stop().await;
}

#[tokio::test]
async fn a_reload_swaps_the_routes_and_events_go_to_the_new_sink_from_one_batch_on() {
    let server = mock(&["t"], 200.0, None).await;
    let dir = tempfile::tempdir().unwrap();
    let (old_file, new_file) = (dir.path().join("old.jsonl"), dir.path().join("new.jsonl"));
    let base = reading(&server, &[("a", "t")], dir.path()).sink("old", &file_sink(&old_file));
    let mut bridge = Bridge::start(base.clone().route_all(&["old"]).config())
        .await
        .unwrap();
    wait_until("events reach the old sink", || {
        written(&old_file).len() > 10
    })
    .await;

    // The old sink stays configured, with no route to it any more.
    let swapped = base
        .sink("new", &file_sink(&new_file))
        .route_all(&["new"])
        .config();
    let report = within("the reload", bridge.reload(swapped)).await.unwrap();
    assert_eq!(report.sinks_added, ["new"]);
    assert!(report.sinks_changed.is_empty() && report.sinks_draining.is_empty());
    assert_eq!(report.generation, 1);
    wait_until("events reach the new sink", || {
        written(&new_file).len() > 20
    })
    .await;
    wait_until("the old sink has delivered what was routed to it", || {
        bridge.spool().backlog("old") == Some(0)
    })
    .await;

    // One cut between two batches: every event before it went to the old sink, every one
    // after it to the new one; none to both, none to neither.
    let (old, new) = (written(&old_file), written(&new_file));
    let last_old = old.iter().map(|w| w.seq).max().unwrap();
    let first_new = new.iter().map(|w| w.seq).min().unwrap();
    assert_eq!(
        first_new,
        last_old + 1,
        "old ends at {last_old}, new starts at {first_new}"
    );
    assert!(new.iter().all(|w| w.seq > last_old));
    shut_down(bridge).await;
    server.stop().await;
}

/// A webhook receiver that answers 503 while `down` holds, then 200.
async fn webhook(down: &Arc<AtomicBool>) -> Receiver {
    let down = down.clone();
    Receiver::start(Arc::new(move |_, _| {
        if down.load(Ordering::Relaxed) {
            (StatusCode::SERVICE_UNAVAILABLE, vec![])
        } else {
            (StatusCode::OK, vec![])
        }
    }))
    .await
}

/// A bridge reading 30 events, every one routed to the file sink `out` and to the webhook
/// `hook` on `receiver`, which fails them while it is down: `hook` then owes them.
struct Owing {
    /// The mock Chatwoot.
    server: MockServer,
    /// The spool, the file sink's file.
    dir: tempfile::TempDir,
    /// The bridge.
    bridge: Bridge,
    /// The file sink's file.
    out: PathBuf,
}

/// Events the mock broadcasts in [`owing`].
const OWED: u64 = 30;

/// Starts an [`Owing`] bridge and waits until `hook` owes every event.
async fn owing(receiver: &Receiver) -> (Owing, BridgeYaml) {
    let server = mock(&["t"], 200.0, Some(OWED)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let hook = format!(
        "{{ type: http, url: '{}', retry: {{ initial: 50ms, max: 200ms }} }}",
        receiver.url("/hook")
    );
    let base = reading(&server, &[("a", "t")], dir.path()).sink("out", &file_sink(&out));
    let config = base.clone().sink("hook", &hook).route_all(&["out", "hook"]);
    let bridge = Bridge::start(config.config()).await.unwrap();
    wait_until("every event in the file", || {
        written(&out).len() as u64 == OWED
    })
    .await;
    wait_until("the webhook to owe every event", || {
        bridge.spool().backlog("hook") == Some(OWED)
    })
    .await;
    let without_hook = base.route_all(&["out"]);
    (
        Owing {
            server,
            dir,
            bridge,
            out,
        },
        without_hook,
    )
}

#[tokio::test]
async fn removing_a_sink_that_owes_events_is_refused_unless_they_are_dropped_knowingly() {
    let down = Arc::new(AtomicBool::new(true));
    let receiver = webhook(&down).await;
    let (mut owing, without_hook) = owing(&receiver).await;
    let bridge = &mut owing.bridge;

    let refused = bridge.reload(without_hook.config()).await.unwrap_err();
    let text = refused.to_string();
    assert!(
        text.contains(&format!(
            "sinks.hook: is removed while it has {OWED} events not delivered"
        )) && text.contains("retired_sinks: { hook: drain }"),
        "{text}"
    );
    let too_few = without_hook
        .clone()
        .setting("retired_sinks: { hook: { drop: 5 } }");
    let text = bridge
        .reload(too_few.config())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains(&format!(
            "retired_sinks.hook.drop: gives up 5 events, but the sink has {OWED}"
        )),
        "{text}"
    );
    assert!(bridge.status().sink("hook").is_some(), "still running");

    let dropped = without_hook.setting(&format!("retired_sinks: {{ hook: {{ drop: {OWED} }} }}"));
    let report = bridge.reload(dropped.config()).await.unwrap();
    assert_eq!(report.sinks_dropped, [("hook".to_owned(), OWED)]);
    wait_until("the dropped sink to leave", || {
        bridge.status().sink("hook").is_none() && bridge.spool().backlog("hook").is_none()
    })
    .await;
    // Whatever the webhook answers now, the dropped events are not sent again.
    down.store(false, Ordering::Relaxed);
    let requests = receiver.received().len();
    let out_sink = bridge.status().sink("out").unwrap();
    assert_eq!(out_sink.delivered, OWED, "the other sink was not touched");
    let report = shut_down(owing.bridge).await;
    assert!(report.everything_read_is_spooled());
    assert_eq!(receiver.received().len(), requests);
    owing.server.stop().await;
    drop(owing.dir);
}

#[tokio::test]
async fn a_drained_sink_delivers_everything_it_owes_before_it_leaves() {
    let down = Arc::new(AtomicBool::new(true));
    let receiver = webhook(&down).await;
    let (mut owing, without_hook) = owing(&receiver).await;
    let bridge = &mut owing.bridge;
    let drained = without_hook.setting("retired_sinks: { hook: drain }");
    let report = bridge.reload(drained.config()).await.unwrap();
    assert_eq!(report.sinks_draining, ["hook"]);
    assert!(
        bridge.status().sink("hook").is_some(),
        "it stays until it has delivered"
    );

    down.store(false, Ordering::Relaxed);
    wait_until_explained(
        "the drained sink to deliver everything and leave",
        || bridge.status().sink("hook").is_none(),
        || format!("{:?}", bridge.status().sink("hook")),
    )
    .await;
    let (_, distinct) = receiver.requests_and_distinct_ids();
    assert_eq!(
        distinct as u64, OWED,
        "every event it owed reached the webhook"
    );
    assert_eq!(bridge.spool().backlog("hook"), None, "it left the spool");
    assert_eq!(written(&owing.out).len() as u64, OWED);
    shut_down(owing.bridge).await;
    owing.server.stop().await;
}

#[tokio::test]
async fn a_changed_sink_is_built_again_and_resumes_from_its_cursor_while_the_others_run_on() {
    const EVENTS: u64 = 600;
    let server = mock(&["t"], 300.0, Some(EVENTS)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(format!("{name}.jsonl"));
    let config = |a_file: &str| {
        reading(&server, &[("a", "t")], dir.path())
            .sink("a", &file_sink(&path(a_file)))
            .sink("b", &file_sink(&path("b")))
            .route_all(&["a", "b"])
            .config()
    };
    let mut bridge = Bridge::start(config("a")).await.unwrap();
    wait_until("events to flow", || written(&path("a")).len() > 50).await;
    let report = within("the reload", bridge.reload(config("a2")))
        .await
        .unwrap();
    assert_eq!(report.sinks_changed, ["a"], "{report}");
    assert!(report.sinks_added.is_empty() && report.tokens == Default::default());

    let seqs = |files: &[&str]| -> Vec<u64> {
        let mut seqs: Vec<u64> = files
            .iter()
            .flat_map(|f| written(&path(f)))
            .map(|w| w.seq)
            .collect();
        seqs.sort_unstable();
        seqs
    };
    wait_until("every event in b", || seqs(&["b"]).len() as u64 == EVENTS).await;
    wait_until("every event in a's files", || {
        let mut a = seqs(&["a", "a2"]);
        a.dedup();
        a.len() as u64 == EVENTS
    })
    .await;
    assert!(
        !written(&path("a2")).is_empty(),
        "the rebuilt sink writes to its new file"
    );
    let b = seqs(&["b"]);
    let mut distinct = b.clone();
    distinct.dedup();
    assert_eq!(b, distinct, "b was not restarted: nothing sent to it twice");
    shut_down(bridge).await;
    server.stop().await;
}
