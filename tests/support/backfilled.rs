//! Reading back what a file sink wrote, for the tests of backfills: which messages came, how
//! often, and which were marked `chatwootbackfill`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::events_in;

/// Per message id of the `message.created` events in `out`: one entry per copy, true when
/// that copy was marked `chatwootbackfill`.
pub(crate) fn message_marks(out: &Path) -> HashMap<u64, Vec<bool>> {
    let mut found: HashMap<u64, Vec<bool>> = HashMap::new();
    for event in events_in(out) {
        if event["type"] != "com.chatwoot.message.created" {
            continue;
        }
        let id = event["data"]["id"].as_u64().expect("a message has an id");
        found
            .entry(id)
            .or_default()
            .push(event["chatwootbackfill"] == true);
    }
    found
}

/// Asserts that `out` holds each of `backfilled` once and marked, each of `live` once and not
/// marked, and no other message.
pub(crate) fn assert_each_message_once(out: &Path, backfilled: &[u64], live: &[u64]) {
    let got = message_marks(out);
    for id in backfilled {
        assert_eq!(
            got.get(id),
            Some(&vec![true]),
            "backfilled message {id}, once and marked"
        );
    }
    for id in live {
        assert_eq!(
            got.get(id),
            Some(&vec![false]),
            "live message {id}, once and not marked"
        );
    }
    assert_eq!(
        got.len(),
        backfilled.len() + live.len(),
        "no other message: {got:?}"
    );
}

/// The display ids of the conversations `out` holds a backfilled `conversation.updated` of.
pub(crate) fn backfilled_conversations(out: &Path) -> Vec<u64> {
    events_in(out)
        .iter()
        .filter(|e| {
            e["type"] == "com.chatwoot.conversation.updated" && e["chatwootbackfill"] == true
        })
        .filter_map(|e| e["data"]["id"].as_u64())
        .collect()
}

/// Waits until every message of `ids` is in `out` (`what` names them if they never come).
pub(crate) async fn wait_for_messages(out: &Path, ids: &[u64], what: &str) {
    super::wait_until(what, || {
        let got = message_marks(out);
        ids.iter().all(|id| got.contains_key(id))
    })
    .await;
}
