//! A token given only as an API access token, against the mock Chatwoot's own profile endpoint
//! and cable: it subscribes, and a rotated pubsub token (the old subscription goes quiet, as
//! Chatwoot's does) is picked up by the refresh and by the unconfirmed subscription, with no
//! operator action and nothing lost of what is broadcast after the switch; with a stall check,
//! the quiet old subscription is noticed before the refresh is due, and what it missed is
//! backfilled.

mod support;

use std::path::Path;

use chatwoot_bridge::mock::MockServer;
use chatwoot_bridge::status::TokenState;
use chatwoot_bridge::Bridge;
use support::{
    api_agent_config, assert_each_message_once, mock_with_api_agent, shut_down, wait_for_messages,
    wait_until, WAIT,
};

/// The ids of the `message.created` events in the file.
fn messages(out: &Path) -> Vec<u64> {
    support::events_in(out)
        .into_iter()
        .filter(|e| {
            e["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("message.created"))
        })
        .filter_map(|e| e["data"]["id"].as_u64())
        .collect()
}

/// Waits until the agent, given by its API token alone, is subscribed.
async fn subscribed(bridge: &Bridge) {
    let done = bridge
        .status()
        .wait_for(WAIT, |b| {
            b.token("agent")
                .is_some_and(|t| t.state == TokenState::Subscribed)
        })
        .await;
    assert!(done, "{:?}", bridge.status().token("agent"));
}

/// Creates 20 messages, waits until each reached the file `out`, then stops the bridge and the
/// mock; the agent's status at the end.
async fn every_message_after_the_rotation(
    bridge: Bridge,
    mock: MockServer,
    out: &Path,
) -> chatwoot_bridge::status::TokenStatus {
    let sent = create_messages(&mock, 20);
    wait_until("every message after the rotation", || {
        let got = messages(out);
        sent.iter().all(|id| got.contains(id))
    })
    .await;
    let status = bridge.status().token("agent").unwrap();
    shut_down(bridge).await;
    mock.stop().await;
    status
}

/// Waits until the agent has followed one rotation and is subscribed.
async fn rotated(bridge: &Bridge) {
    let done = bridge
        .status()
        .wait_for(WAIT, |b| {
            b.token("agent")
                .is_some_and(|t| t.rotations == 1 && t.state == TokenState::Subscribed)
        })
        .await;
    assert!(done, "{:?}", bridge.status().token("agent"));
}

/// Creates `n` messages in a new conversation of account 1; their ids.
fn create_messages(mock: &MockServer, n: usize) -> Vec<u64> {
    let conversation = mock.create_conversation(1, None).expect("account 1 exists");
    (0..n)
        .map(|i| {
            mock.create_message(1, conversation, &format!("after the rotation {i}"), false)
                .expect("the conversation exists")
        })
        .collect()
}

#[tokio::test]
async fn the_refresh_follows_a_rotation_on_the_same_socket_and_misses_nothing_after_it() {
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let bridge = Bridge::start(api_agent_config(&mock, &out, "refresh_interval: 1s"))
        .await
        .unwrap();
    subscribed(&bridge).await;

    mock.rotate_pubsub_token(3).expect("user 3 exists");
    rotated(&bridge).await;
    // The switch ends when the new subscription is confirmed and the old one unsubscribed;
    // what Chatwoot broadcast to the new token before the confirm is the gap backfill is for.
    wait_until("the old subscription to be dropped", || {
        mock.unsubscribe_commands() >= 1
    })
    .await;
    let status = every_message_after_the_rotation(bridge, mock, &out).await;
    assert_eq!(status.connects, 1, "the same socket: {status:?}");
    assert!(status.last_rotation_at.is_some(), "{status:?}");
}

#[tokio::test]
async fn an_unconfirmed_subscription_after_a_rotation_reads_the_profile_again() {
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    // The refresh is an hour away: only the unconfirmed path can find the new token.
    let bridge = Bridge::start(api_agent_config(&mock, &out, "refresh_interval: 1h"))
        .await
        .unwrap();
    subscribed(&bridge).await;

    // The password changes and the sockets drop (a deploy): the token the bridge knows is met
    // with silence when it subscribes again.
    mock.rotate_pubsub_token(3).expect("user 3 exists");
    mock.drop_connections();
    rotated(&bridge).await;
    let status = every_message_after_the_rotation(bridge, mock, &out).await;
    assert!(status.connects >= 2, "{status:?}");
}

#[tokio::test]
async fn the_stall_check_notices_a_rotated_token_before_the_refresh_and_backfills_what_went_quiet()
{
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    // The refresh is an hour away and the socket never drops: only the stall check can tell.
    let settings = "refresh_interval: 1h, backfill: true, stall_after: 2s";
    let bridge = Bridge::start(api_agent_config(&mock, &out, settings))
        .await
        .unwrap();
    subscribed(&bridge).await;
    // Activity of the second the subscription was confirmed in is left to the reconnect's gap
    // backfill (it may predate the subscription); the stall check counts what comes later.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let before = create_messages(&mock, 2);
    wait_until("the messages before the rotation", || {
        let got = messages(&out);
        before.iter().all(|id| got.contains(id))
    })
    .await;

    mock.rotate_pubsub_token(3).expect("user 3 exists");
    let quiet = create_messages(&mock, 5);
    rotated(&bridge).await;
    wait_until(
        "the messages the old subscription missed, backfilled",
        || {
            let got = messages(&out);
            quiet.iter().all(|id| got.contains(id))
        },
    )
    .await;
    wait_until("the old subscription to be dropped", || {
        mock.unsubscribe_commands() >= 1
    })
    .await;
    let status = every_message_after_the_rotation(bridge, mock, &out).await;
    assert_eq!(status.connects, 1, "the same socket: {status:?}");
    assert_eq!(status.stalls, 1, "{status:?}");
    assert!(status.backfills >= 1, "{status:?}");
    let got = messages(&out);
    for id in before.iter().chain(&quiet) {
        assert_eq!(
            got.iter().filter(|g| *g == id).count(),
            1,
            "message {id} once"
        );
    }
}

#[tokio::test]
async fn what_the_old_subscription_missed_before_the_refresh_found_the_rotation_is_backfilled() {
    let mock = mock_with_api_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    // The refresh finds the rotation; no stall check to help.
    let settings = "refresh_interval: 2s, backfill: true, stall_after: off";
    let bridge = Bridge::start(api_agent_config(&mock, &out, settings))
        .await
        .unwrap();
    subscribed(&bridge).await;
    let conversation = mock.create_conversation(1, None).expect("account 1 exists");
    let create = |n: usize, what: &str| -> Vec<u64> {
        (0..n)
            .map(|i| {
                mock.create_message(1, conversation, &format!("{what} {i}"), false)
                    .expect("the conversation exists")
            })
            .collect()
    };
    let before = create(2, "before");
    wait_for_messages(&out, &before, "the messages before the rotation").await;

    mock.rotate_pubsub_token(3).expect("user 3 exists");
    let quiet = create(3, "to the old token");
    rotated(&bridge).await;
    wait_until("the old subscription to be dropped", || {
        mock.unsubscribe_commands() >= 1
    })
    .await;
    let after = create(2, "after");
    wait_for_messages(&out, &quiet, "the quiet messages, backfilled").await;
    wait_for_messages(&out, &after, "the messages after the rotation").await;
    shut_down(bridge).await;
    mock.stop().await;
    let live: Vec<u64> = before.into_iter().chain(after).collect();
    assert_each_message_once(&out, &quiet, &live);
}
