//! The event envelope: one Chatwoot broadcast as the bridge carries it, and its CloudEvents form.
//!
//! Chatwoot's `data` is kept as the exact bytes received: never re-serialized, so consumers get
//! what Chatwoot sent and the id can be computed from the bytes.
//!
//! - [`id`]: event ids, one per broadcast, shared by its copies on several tokens.
//! - `keys`: [`DataKeys`], the few ids read out of `data` by a scanner, without parsing it all.
//! - `cloudevents`: the CloudEvents attributes and the structured-mode JSON writer.
//! - `record`: the spool record codec.
//! - `ascii`: ids, numbers and times formatted on the stack.

mod ascii;
mod cloudevents;
pub mod id;
mod keys;
mod record;

pub use ascii::{rfc3339_micros, AsciiBuf};
pub use keys::DataKeys;
pub use record::RecordError;

use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// 128-bit event id, written as 32 lowercase hex digits. See [`crate::event::id`] for how it is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub u128);

impl EventId {
    /// The 32 lowercase hex digits, without the formatting machinery: an id goes into several
    /// headers of every event.
    pub fn hex(&self) -> AsciiBuf<32> {
        AsciiBuf::hex(self.0)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex().as_str())
    }
}

/// The text of one JSON value (an object when it came from a frame): an event's `data`, byte for
/// byte as received or as a redaction rewrote it.
///
/// Backed by shared bytes rather than an owned string: the socket slices it out of the frame it
/// read without copying, a binary-mode payload is the same buffer, and clones cost a reference
/// count. The bytes are known to be UTF-8 (tungstenite's `Utf8Bytes` keeps that promise, so
/// [`JsonText::get`] needs no check and this crate no `unsafe`).
#[derive(Clone, PartialEq, Eq)]
pub struct JsonText(Utf8Bytes);

impl JsonText {
    /// Checks that `text` is one JSON value; surrounding whitespace is left out, as
    /// [`RawValue::from_string`] does.
    pub fn from_string(text: String) -> Result<JsonText, serde_json::Error> {
        let raw: &RawValue = serde_json::from_str(&text)?;
        if raw.get().len() == text.len() {
            Ok(JsonText(Utf8Bytes::from(text)))
        } else {
            Ok(JsonText(Utf8Bytes::from(raw.get())))
        }
    }

    /// A copy of JSON that serde already checked.
    pub fn from_raw(raw: &RawValue) -> JsonText {
        JsonText(Utf8Bytes::from(raw.get()))
    }

    /// `data`, which borrows from `frame`, as a slice of the frame's buffer instead of a copy.
    /// Panics when `data` does not lie inside `frame`.
    pub fn in_frame(frame: &Bytes, data: &RawValue) -> JsonText {
        let slice = frame.slice_ref(data.get().as_bytes());
        // The one check left: a str borrowed from the frame is UTF-8, but tungstenite's type
        // can only be built from bytes by checking them (or with `unsafe`), and the check is a
        // few percent of one parse.
        JsonText(Utf8Bytes::try_from(slice).expect("a str's bytes are UTF-8"))
    }

    /// Text read back from a spool record. The record was written by this program from a
    /// `JsonText` and is CRC-checked, so it is not parsed again; being `&str` it is UTF-8.
    pub(crate) fn from_record(text: &str) -> JsonText {
        JsonText(Utf8Bytes::from(text))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.as_str()
    }

    /// The bytes themselves, shared (no copy), for payloads that go out as they are.
    pub fn bytes(&self) -> Bytes {
        Bytes::from(self.0.clone())
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonText({})", self.get())
    }
}

/// One decoded Chatwoot event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Assigned by the pipeline ([`crate::event::id::IdAssigner`]); zero until then.
    pub id: EventId,
    /// Hash of the event name and the raw data bytes, computed once on the socket's task.
    pub content_hash: u128,
    /// Chatwoot's event name, e.g. `message.created`; unknown names pass through unchanged.
    pub name: Box<str>,
    /// Chatwoot's `data` object, byte for byte as received.
    pub data: JsonText,
    /// Name of the token whose socket delivered it (never the secret).
    pub token: Arc<str>,
    /// CloudEvents `source`: the cable URL and `#<token name>`.
    pub source: Arc<str>,
    /// When the frame was read from the socket: the event's published `time`.
    pub received_at: SystemTime,
    /// When the event was built, on the monotonic clock: on the socket's task right after its
    /// frame was read. The id window runs on it, so that a wall clock stepped back cannot stop
    /// it (see [`crate::event::id`]). An event read back from the spool or a dead letter, which
    /// has its id already, carries when it was read.
    pub received_mono: Instant,
    /// The ids read out of `data` once, for routing, keys, templates and the subject.
    pub keys: DataKeys,
    /// Read over Chatwoot's REST API to fill a gap in the socket, not from the socket: carried
    /// as the CloudEvents extension `chatwootbackfill: true` (see `source::backfill`).
    pub backfill: bool,
}

impl Event {
    /// Builds an event from a frame's `message` parts. `data` must be a JSON object.
    pub fn new(
        name: &str,
        data: JsonText,
        token: Arc<str>,
        source: Arc<str>,
        received_at: SystemTime,
    ) -> Event {
        let keys = DataKeys::extract(name, data.get());
        Event {
            id: EventId::default(),
            content_hash: content_hash(name, data.get()),
            name: name.into(),
            data,
            token,
            source,
            received_at,
            received_mono: Instant::now(),
            keys,
            backfill: false,
        }
    }

    /// Bytes it holds in memory, as `memory_limit` counts them: its `data`, its name and the
    /// envelope. Computed the same wherever it is asked, so that what one stage charges for an
    /// event, another can give back.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.data.get().len() + self.name.len() + std::mem::size_of::<Event>()
    }

    /// An event with the given parts, for tests of routing and encoding.
    pub fn for_test(name: &str, token: &str, data: &str) -> Event {
        Event::new(
            name,
            JsonText::from_string(data.to_owned()).expect("test data is JSON"),
            Arc::from(token),
            Arc::from(format!("ws://127.0.0.1/cable#{token}")),
            SystemTime::UNIX_EPOCH,
        )
    }
}

/// Deepest nesting of objects and arrays accepted in an event's `data` (Chatwoot's payloads
/// nest under 10): what the configured limit may be raised to, and what the redaction walks.
pub const MAX_NESTING_CEILING: usize = 1024;

/// Whether the JSON `json` nests objects and arrays deeper than `limit` levels. One pass over
/// the bytes, without recursion: strings (and the brackets and escapes inside them) are skipped.
/// Texts with no more than `limit` brackets in all, nearly every event, are settled by counting.
pub fn nesting_exceeds(json: &str, limit: usize) -> bool {
    let bytes = json.as_bytes();
    if openings(bytes) <= limit {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// How many `{` and `[` bytes `bytes` holds. They differ only in bit 0x20, so one comparison
/// per byte does, and counting into a `u8` per chunk of 255 lets the compiler vectorize it.
fn openings(bytes: &[u8]) -> usize {
    bytes
        .chunks(255)
        .map(|chunk| {
            chunk
                .iter()
                .fold(0u8, |n, &b| n + u8::from(b | 0x20 == b'{')) as usize
        })
        .sum()
}

/// Hash of what a broadcast carries: the event name and the data bytes.
pub fn content_hash(name: &str, data: &str) -> u128 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(name.as_bytes());
    hasher.update(&[0]);
    hasher.update(data.as_bytes());
    hasher.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        let text = r#"{"a":[1,{"b":"[[[{{\"{"}],"c":{}}"#;
        assert!(serde_json::from_str::<serde_json::Value>(text).is_ok());
        assert!(nesting_exceeds(text, 2));
        assert!(!nesting_exceeds(text, 3));
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(nesting_exceeds(&deep, 128));
        assert!(!nesting_exceeds(&deep, 100_000));
        // Brackets only inside strings, more of them than the limit: not nesting.
        let flat = format!(r#"{{"s":"{}"}}"#, "[".repeat(500));
        assert!(!nesting_exceeds(&flat, 2));
    }

    #[test]
    fn keys_by_event_kind() {
        let msg = DataKeys::extract(
            "message.created",
            r#"{"id":5120,"account_id":1,"inbox_id":2,"conversation_id":87,"conversation":{"assignee_id":null}}"#,
        );
        assert_eq!(
            msg,
            DataKeys {
                account_id: Some(1),
                conversation_id: Some(87),
                inbox_id: Some(2)
            }
        );
        let typing = DataKeys::extract(
            "conversation.typing_on",
            r#"{"account_id":1,"conversation":{"id":87,"inbox_id":2},"user":{"id":3}}"#,
        );
        assert_eq!(typing.conversation_id, Some(87));
        assert_eq!(typing.inbox_id, Some(2));
        let conv = DataKeys::extract("assignee.changed", r#"{"id":87,"account_id":1}"#);
        assert_eq!(conv.conversation_id, Some(87));
        let contact = DataKeys::extract("contact.updated", r#"{"id":42,"account_id":1}"#);
        assert_eq!(contact.conversation_id, None);
        assert_eq!(contact.account_id, Some(1));
    }

    #[test]
    fn odd_values_read_as_absent() {
        let keys = DataKeys::extract(
            "message.created",
            r#"{"account_id":"3","conversation_id":{"x":[1,2]},"inbox_id":-1,"conversation":"nope"}"#,
        );
        assert_eq!(
            keys,
            DataKeys {
                account_id: Some(3),
                conversation_id: None,
                inbox_id: None
            }
        );
        assert_eq!(DataKeys::extract("x", "[1]"), DataKeys::default());
    }

    #[test]
    fn json_text_checks_like_raw_value() {
        for text in [
            r#"{"a":1}"#,
            " {\"a\": [1, 2]}\n",
            "[1]",
            "7",
            "{",
            "",
            "{} {}",
        ] {
            let ours = JsonText::from_string(text.to_owned()).map(|t| t.get().to_owned());
            let theirs = RawValue::from_string(text.to_owned()).map(|r| r.get().to_owned());
            assert_eq!(ours.ok(), theirs.ok(), "{text:?}");
        }
    }

    #[test]
    fn json_text_in_a_frame_shares_its_bytes() {
        let frame = Bytes::from(r#"{"message":{"data":{"x":"caf\u00e9 é"}}}"#.to_owned());
        #[derive(Deserialize)]
        struct Frame<'a> {
            #[serde(borrow)]
            message: Message<'a>,
        }
        #[derive(Deserialize)]
        struct Message<'a> {
            #[serde(borrow)]
            data: &'a RawValue,
        }
        let parsed: Frame = serde_json::from_slice(&frame).unwrap();
        let data = JsonText::in_frame(&frame, parsed.message.data);
        assert_eq!(data.get(), r#"{"x":"caf\u00e9 é"}"#);
        assert_eq!(data.bytes().as_ptr(), frame[19..].as_ptr(), "no copy");
    }

    #[test]
    fn stack_formatting_matches_fmt_and_humantime() {
        for id in [
            0,
            1,
            0xabc,
            u128::MAX,
            0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        ] {
            assert_eq!(EventId(id).hex().as_str(), format!("{id:032x}"));
            assert_eq!(EventId(id).to_string(), format!("{id:032x}"));
        }
        for n in [0, 7, 10, 99, 12345, u64::MAX] {
            assert_eq!(AsciiBuf::decimal(n).as_str(), n.to_string());
        }
        let mut rng = fastrand::Rng::with_seed(7);
        let mut secs: Vec<u64> = (0..200_000).map(|_| rng.u64(0..253_402_300_800)).collect();
        // Day, month, year and leap boundaries.
        for day in [
            0u64,
            59,
            60,
            365,
            11016,
            11017,
            11017 + 59,
            11017 + 60,
            2_932_896,
        ] {
            for delta in [0, 1, 86_399] {
                secs.push(day * 86_400 + delta);
            }
        }
        secs.push(253_402_300_799);
        for s in secs {
            let at =
                SystemTime::UNIX_EPOCH + std::time::Duration::new(s, rng.u32(0..1_000_000_000));
            assert_eq!(
                rfc3339_micros(at).unwrap().as_str(),
                humantime::format_rfc3339_micros(at).to_string(),
                "{s}"
            );
        }
        let end = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_800);
        assert!(rfc3339_micros(end).is_none());
    }

    #[test]
    fn structured_cloudevent_keeps_data_bytes() {
        let data = r#"{"id":1, "account_id":4,"conversation_id":9,"content":"caf\u00e9 \"q\""}"#;
        let mut event = Event::for_test("message.created", "agent", data);
        event.id = EventId(0xabc);
        let mut out = Vec::new();
        event.write_structured(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with(&format!(r#""data":{data}}}"#)), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "00000000000000000000000000000abc");
        assert_eq!(v["source"], "ws://127.0.0.1/cable#agent");
        assert_eq!(v["type"], "com.chatwoot.message.created");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(v["subject"], "conversation/9");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["chatwootevent"], "message.created");
        assert_eq!(v["chatwoottoken"], "agent");
        assert_eq!(v["chatwootaccount"], 4);
        assert_eq!(v["data"]["content"], "café \"q\"");
    }

    #[test]
    fn no_subject_without_conversation() {
        let event = Event::for_test("presence.update", "agent", r#"{"account_id":1}"#);
        let mut out = Vec::new();
        event.write_structured(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v.get("subject").is_none());
    }
}
