//! Filling the socket's gaps over the REST API, against the mock Chatwoot's cable and REST
//! endpoints backed by the same data: messages created while the cable refuses sockets reach
//! the sink after the reconnect, marked `chatwootbackfill`, and what the socket delivered is not
//! sent twice; a throttled REST API slows the backfill and not the live events; a gap over
//! `backfill.max_gap` is given up and counted; a broadcast that stalls while the socket stays
//! subscribed is noticed within `stall_after`, shown, and backfilled.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use chatwoot_bridge::mock::MockServer;
use chatwoot_bridge::status::{TokenState, TokenStatus};
use chatwoot_bridge::Bridge;
use serde_json::Value;
use support::{
    api_agent_config, api_agent_yaml, assert_each_message_once, backfilled_conversations,
    message_marks as messages, mock_with_api_agent, shut_down, wait_for_messages, wait_until,
    within, WAIT,
};

/// The token settings of every test here: the profile's refresh out of the way, backfill on.
const BACKFILL: &str = "refresh_interval: 1h, backfill: true";

/// The agent's status once `done` holds for it.
async fn agent_when(
    bridge: &Bridge,
    what: &str,
    done: impl Fn(&TokenStatus) -> bool,
) -> TokenStatus {
    let reached = bridge
        .status()
        .wait_for(WAIT, |b| b.token("agent").is_some_and(|t| done(&t)))
        .await;
    let status = bridge.status().token("agent").expect("the agent token");
    assert!(reached, "{what}: {status:?}");
    status
}

/// Whether the agent is subscribed on its `connects`-th socket.
fn subscribed_on(connects: u64) -> impl Fn(&TokenStatus) -> bool {
    move |t| t.state == TokenState::Subscribed && t.connects >= connects
}

/// Creates `n` messages in conversation `conversation` of account 1; their ids.
fn create(mock: &MockServer, conversation: u64, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            mock.create_message(1, conversation, &format!("message {i}"), false)
                .expect("the conversation exists")
        })
        .collect()
}

/// Starts the bridge, waits for its subscription, and has the socket deliver `live` messages
/// of a new conversation; the conversation and the ids.
async fn delivered_live(
    mock: &MockServer,
    bridge: &Bridge,
    out: &Path,
    live: usize,
) -> (u64, Vec<u64>) {
    agent_when(bridge, "subscribed", subscribed_on(1)).await;
    let conversation = mock.create_conversation(1, None).expect("account 1 exists");
    let ids = create(mock, conversation, live);
    wait_for_messages(out, &ids, "the live messages").await;
    (conversation, ids)
}

#[tokio::test]
async fn messages_created_while_the_cable_is_down_are_backfilled_once_and_marked() {
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let bridge = Bridge::start(api_agent_config(&mock, &out, BACKFILL))
        .await
        .unwrap();
    let (known, live) = delivered_live(&mock, &bridge, &out, 5).await;

    // A Chatwoot deploy: sockets dropped and refused for 5 s while 50 messages are created, in
    // the conversation the socket knows and in one it never saw (read backwards, 20 a page).
    mock.set_cable_refused(true);
    mock.drop_connections();
    let mut missed = create(&mock, known, 25);
    let unseen = mock.create_conversation(1, None).expect("account 1 exists");
    missed.extend(create(&mock, unseen, 25));
    tokio::time::sleep(Duration::from_secs(5)).await;
    mock.set_cable_refused(false);

    let status = agent_when(&bridge, "the backfill ran", |t| t.backfills == 1).await;
    wait_for_messages(&out, &missed, "the backfilled messages in the file").await;
    // After the shutdown, which delivers everything spooled: a late duplicate would show.
    shut_down(bridge).await;
    mock.stop().await;
    assert_each_message_once(&out, &missed, &live);
    let updated = backfilled_conversations(&out);
    assert!(
        updated.contains(&known) && updated.contains(&unseen),
        "{updated:?}"
    );
    assert!(status.backfilled_events >= 52, "{status:?}");
    assert_eq!(status.backfill_gaps_given_up, 0);
    let last = status.last_backfill.expect("the backfill is shown");
    assert!(last.from < last.to && last.to <= last.ended_at, "{last:?}");
    assert!(
        last.to.duration_since(last.from).unwrap() >= Duration::from_secs(5),
        "the gap spans the 5 s the cable was down: {last:?}"
    );
    assert_eq!(
        (last.events, last.given_up),
        (status.backfilled_events, None)
    );
}

#[tokio::test]
async fn a_throttled_api_slows_the_backfill_and_not_the_live_events() {
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let bridge = Bridge::start(api_agent_config(&mock, &out, BACKFILL))
        .await
        .unwrap();
    let (conversation, _) = delivered_live(&mock, &bridge, &out, 1).await;

    mock.set_cable_refused(true);
    mock.drop_connections();
    let missed = create(&mock, conversation, 10);
    mock.set_rest_throttle(Some(Duration::from_secs(1)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    mock.set_cable_refused(false);
    agent_when(&bridge, "subscribed again", subscribed_on(2)).await;

    // While every REST request is answered 429, live events keep flowing.
    let throttled_from = mock.rest_requests();
    let live = create(&mock, conversation, 5);
    wait_for_messages(&out, &live, "the live messages while throttled").await;
    wait_until("the backfill asking again after Retry-After", || {
        mock.rest_requests() >= throttled_from + 2
    })
    .await;
    let got = messages(&out);
    assert!(
        missed.iter().all(|id| !got.contains_key(id)),
        "nothing backfilled while throttled"
    );
    assert_eq!(bridge.status().token("agent").unwrap().backfills, 0);

    mock.set_rest_throttle(None);
    let status = agent_when(&bridge, "the backfill ran", |t| t.backfills == 1).await;
    wait_for_messages(&out, &missed, "the backfilled messages in the file").await;
    // After the shutdown, which delivers everything spooled: a late duplicate would show.
    shut_down(bridge).await;
    mock.stop().await;
    let got = messages(&out);
    for id in &missed {
        assert_eq!(got.get(id), Some(&vec![true]), "missed message {id}");
    }
    for id in &live {
        assert_eq!(
            got.get(id),
            Some(&vec![false]),
            "live message {id}, not sent again"
        );
    }
    assert_eq!(status.backfill_gaps_given_up, 0);
}

#[tokio::test]
async fn a_gap_over_max_gap_is_given_up_and_counted() {
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let bridge = Bridge::start(api_agent_config(
        &mock,
        &out,
        "refresh_interval: 1h, backfill: { max_gap: 1s }",
    ))
    .await
    .unwrap();
    let (conversation, _) = delivered_live(&mock, &bridge, &out, 1).await;

    mock.set_cable_refused(true);
    mock.drop_connections();
    let missed = create(&mock, conversation, 3);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = mock.rest_requests();
    mock.set_cable_refused(false);

    let status = agent_when(&bridge, "the gap given up", |t| {
        t.backfill_gaps_given_up == 1
    })
    .await;
    let got = messages(&out);
    let requests_after = mock.rest_requests();
    shut_down(bridge).await;
    mock.stop().await;
    assert_eq!(status.backfills, 0);
    assert_eq!(
        requests_after, requests,
        "a gap given up asks the REST API nothing"
    );
    assert!(missed.iter().all(|id| !got.contains_key(id)));
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("backfill.max_gap")),
        "{status:?}"
    );
    let last = status.last_backfill.expect("the gap given up is shown");
    assert_eq!(last.events, 0);
    assert!(
        last.given_up
            .as_deref()
            .is_some_and(|e| e.contains("backfill.max_gap")),
        "{last:?}"
    );
}

#[tokio::test]
async fn a_gap_across_a_restart_of_the_bridge_is_backfilled_from_the_resume_file() {
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let config = || api_agent_config(&mock, &out, BACKFILL);
    let bridge = Bridge::start(config()).await.unwrap();
    let (conversation, live) = delivered_live(&mock, &bridge, &out, 5).await;
    shut_down(bridge).await;
    let resume = out.with_extension("spool").join("backfill/agent.json");
    let saved: Value = serde_json::from_slice(&std::fs::read(&resume).unwrap()).unwrap();
    assert_eq!(saved["account_id"], 1, "{saved}");
    assert_eq!(
        saved["last_messages"],
        serde_json::json!([[conversation, live[4]]])
    );

    // Messages created while the bridge is stopped.
    let missed = create(&mock, conversation, 10);
    let bridge = Bridge::start(config()).await.unwrap();
    let status = agent_when(&bridge, "the backfill after the restart", |t| {
        t.backfills == 1
    })
    .await;
    assert_eq!(status.backfill_gaps_given_up, 0, "{status:?}");
    wait_for_messages(&out, &missed, "the messages of the downtime in the file").await;
    shut_down(bridge).await;
    mock.stop().await;
    assert_each_message_once(&out, &missed, &live);
}

/// Waits past the second the subscription was confirmed in: the stall check leaves activity of
/// that second to the reconnect's gap backfill (it may predate the subscription).
async fn past_the_confirm_second() {
    tokio::time::sleep(Duration::from_millis(1_100)).await;
}

/// A stall check every 500 ms that calls activity undelivered for 2 s a stall.
const STALL_AFTER: Duration = Duration::from_secs(2);

/// The agent's `token_stalled` and `token_stalls_total` on the admin endpoint.
async fn stall_metrics(admin: SocketAddr) -> (String, String) {
    let body = within(
        "/metrics",
        reqwest::get(format!("http://{admin}/metrics"))
            .await
            .unwrap()
            .text(),
    )
    .await
    .unwrap();
    let sample = |name: &str| {
        let series = format!("chatwoot_bridge_{name}{{token=\"agent\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("{series} is not in /metrics"))
            .to_owned()
    };
    (sample("token_stalled"), sample("token_stalls_total"))
}

#[tokio::test]
async fn a_stalled_broadcast_is_noticed_within_stall_after_shown_and_backfilled() {
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let yaml = api_agent_yaml(&mock, &out, &format!("{BACKFILL}, stall_after: 2s"))
        .setting("admin: { listen: '127.0.0.1:0' }");
    let bridge = Bridge::start(yaml.config()).await.unwrap();
    let admin = bridge.admin_addr().expect("the admin endpoint is on");
    let (conversation, live) = delivered_live(&mock, &bridge, &out, 3).await;
    assert_eq!(stall_metrics(admin).await, ("0".into(), "0".into()));
    past_the_confirm_second().await;

    // Chatwoot's workers stop: the socket stays subscribed and pinging, the REST API moves on.
    mock.set_stalled(true);
    let stalled_at = Instant::now();
    let missed = create(&mock, conversation, 10);
    let status = agent_when(&bridge, "the stall noticed", |t| t.stalled_since.is_some()).await;
    let noticed_after = stalled_at.elapsed();
    // At the earliest stall_after after a check first shows the activity; at the latest one
    // check interval (500 ms) later, plus slack for a loaded machine: a bound that still fails
    // a check that waits for the profile refresh or a second stall_after.
    assert!(
        noticed_after >= STALL_AFTER && noticed_after < STALL_AFTER * 4,
        "noticed after {noticed_after:?}"
    );
    assert_eq!((status.stalls, status.connects), (1, 1), "{status:?}");
    assert_eq!(status.state, TokenState::Subscribed);
    assert_eq!(stall_metrics(admin).await, ("1".into(), "1".into()));
    let shown: Value = serde_json::from_str(
        &within(
            "/status",
            reqwest::get(format!("http://{admin}/status"))
                .await
                .unwrap()
                .text(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    assert!(
        shown["tokens"]["agent"]["stalled_since"].is_string(),
        "{shown}"
    );
    wait_for_messages(&out, &missed, "the stalled messages backfilled").await;

    // The workers are back: the socket delivers again and the stall is over.
    mock.set_stalled(false);
    let after = create(&mock, conversation, 1);
    let status = agent_when(&bridge, "the stall over", |t| t.stalled_since.is_none()).await;
    assert_eq!((status.stalls, status.connects), (1, 1), "{status:?}");
    assert_eq!(stall_metrics(admin).await, ("0".into(), "1".into()));
    wait_until("the live message after the stall", || {
        messages(&out).contains_key(&after[0])
    })
    .await;
    shut_down(bridge).await;
    mock.stop().await;
    let live: Vec<u64> = live.into_iter().chain(after).collect();
    assert_each_message_once(&out, &missed, &live);
}

#[tokio::test]
async fn without_backfill_a_stall_is_still_noticed_and_nothing_is_read_back() {
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let bridge = Bridge::start(api_agent_config(
        &mock,
        &out,
        "refresh_interval: 1h, stall_after: 1s",
    ))
    .await
    .unwrap();
    let (conversation, live) = delivered_live(&mock, &bridge, &out, 2).await;
    past_the_confirm_second().await;
    mock.set_stalled(true);
    create(&mock, conversation, 3);
    let status = agent_when(&bridge, "the stall noticed", |t| t.stalls == 1).await;
    assert!(status.stalled_since.is_some(), "{status:?}");
    shut_down(bridge).await;
    mock.stop().await;
    let got = messages(&out);
    assert_eq!(
        got.keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        live.into_iter().collect(),
        "only the live messages: a token without backfill reads nothing back"
    );
    assert_eq!(
        (
            status.backfills,
            status.backfilled_events,
            status.backfill_gaps_given_up
        ),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn a_reconnect_gap_is_backfilled_and_not_mistaken_for_a_stall() {
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let settings = format!("{BACKFILL}, stall_after: 2s");
    let bridge = Bridge::start(api_agent_config(&mock, &out, &settings))
        .await
        .unwrap();
    let (conversation, _) = delivered_live(&mock, &bridge, &out, 3).await;
    past_the_confirm_second().await;
    mock.set_cable_refused(true);
    mock.drop_connections();
    let missed = create(&mock, conversation, 5);
    tokio::time::sleep(Duration::from_secs(2)).await;
    mock.set_cable_refused(false);
    agent_when(&bridge, "the gap backfilled", |t| t.backfills == 1).await;
    wait_for_messages(&out, &missed, "the messages of the gap").await;
    // Long enough for the checks after the confirm to see the gap's activity past stall_after.
    tokio::time::sleep(STALL_AFTER * 2).await;
    let status = bridge.status().token("agent").unwrap();
    assert_eq!(
        (status.stalls, status.stalled_since),
        (0, None),
        "{status:?}"
    );
    shut_down(bridge).await;
    mock.stop().await;
}
