//! Reading what a file sink wrote while the bridge may still be writing it.

use std::path::Path;

use serde_json::Value;

/// The CloudEvents the file `out` holds, one per complete line: a line the sink is still
/// writing (no newline yet) is left for the next read. No file reads as no events.
pub(crate) fn events_in(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("each complete line is JSON"))
        .collect()
}
