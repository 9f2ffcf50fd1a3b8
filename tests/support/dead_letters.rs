//! Dead letters written for a test, and what a replay of them leaves on disk.

use std::path::Path;

use chatwoot_bridge::delivery::dead_letter::DeadLetter;
use chatwoot_bridge::event::{Event, EventId};

/// `count` dead letters of `message.created` events, each its own conversation, numbered from 0
/// under `key` in their data and by id from 1, their data padded with `pad_bytes` bytes so that
/// a test can size them against a spool.
pub(crate) fn padded_letters(count: u64, key: &str, pad_bytes: usize) -> Vec<DeadLetter> {
    let pad = "x".repeat(pad_bytes);
    (0..count)
        .map(|n| {
            let mut event = Event::for_test(
                "message.created",
                "agent",
                &format!(r#"{{"account_id":1,"conversation_id":{n},"{key}":{n},"pad":"{pad}"}}"#),
            );
            event.id = EventId(u128::from(n) + 1);
            DeadLetter {
                event,
                error: "HTTP 400 Bad Request".into(),
                attempts: 1,
                first_attempt: std::time::SystemTime::now(),
                last_attempt: std::time::SystemTime::now(),
            }
        })
        .collect()
}

/// Whether a replay has recorded how far it got (a `.progress` file) in the dead-letter folder
/// `dead_letters`.
pub(crate) fn replay_progress_written(dead_letters: &Path) -> bool {
    std::fs::read_dir(dead_letters)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".progress"))
}
