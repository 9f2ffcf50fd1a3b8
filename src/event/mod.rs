//! The event envelope: one Chatwoot broadcast as the bridge carries it, and its CloudEvents form.
//!
//! Chatwoot's `data` is kept as the exact bytes received: never re-serialized, so consumers get
//! what Chatwoot sent and the id can be computed from the bytes.

pub mod id;
mod keys;

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

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
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = AsciiBuf {
            bytes: [0; 32],
            len: 32,
        };
        for (i, byte) in out.bytes.iter_mut().enumerate() {
            *byte = DIGITS[(self.0 >> (124 - 4 * i) & 0xf) as usize];
        }
        out
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex().as_str())
    }
}

/// Short ASCII text formatted on the stack (ids, times, numbers), to be copied where it goes
/// instead of allocated for each event.
#[derive(Clone, Copy)]
pub struct AsciiBuf<const N: usize> {
    /// The text, then unused zeros.
    bytes: [u8; N],
    /// How much of `bytes` is text.
    len: usize,
}

impl<const N: usize> AsciiBuf<N> {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("only ASCII is written")
    }
}

impl AsciiBuf<20> {
    /// `value` in decimal.
    pub fn decimal(mut value: u64) -> AsciiBuf<20> {
        let mut digits = [0u8; 20];
        let mut start = 20;
        loop {
            start -= 1;
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        let mut out = AsciiBuf {
            bytes: [0; 20],
            len: 20 - start,
        };
        out.bytes[..out.len].copy_from_slice(&digits[start..]);
        out
    }
}

/// `at` as RFC 3339 in UTC with microseconds, as `humantime::format_rfc3339_micros` writes it
/// (same days-from-2000-03-01 arithmetic), without a `String` and the `fmt` machinery per event.
/// `None` outside 1970..=9999, where humantime cannot format either.
pub fn rfc3339_micros(at: SystemTime) -> Option<AsciiBuf<27>> {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    let secs = since.as_secs();
    if secs >= 253_402_300_800 {
        return None;
    }
    const LEAPOCH: i64 = 11017;
    const DAYS_PER_400Y: i64 = 365 * 400 + 97;
    const DAYS_PER_100Y: i64 = 365 * 100 + 24;
    const DAYS_PER_4Y: i64 = 365 * 4 + 1;
    let days = (secs / 86400) as i64 - LEAPOCH;
    let secs_of_day = secs % 86400;
    let mut qc_cycles = days / DAYS_PER_400Y;
    let mut remdays = days % DAYS_PER_400Y;
    if remdays < 0 {
        remdays += DAYS_PER_400Y;
        qc_cycles -= 1;
    }
    let c_cycles = (remdays / DAYS_PER_100Y).min(3);
    remdays -= c_cycles * DAYS_PER_100Y;
    let q_cycles = (remdays / DAYS_PER_4Y).min(24);
    remdays -= q_cycles * DAYS_PER_4Y;
    let remyears = (remdays / 365).min(3);
    remdays -= remyears * 365;
    let mut year = 2000 + remyears + 4 * q_cycles + 100 * c_cycles + 400 * qc_cycles;
    let mut mon = 0;
    for mon_len in [31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31, 29] {
        mon += 1;
        if remdays < mon_len {
            break;
        }
        remdays -= mon_len;
    }
    let mday = remdays + 1;
    let mon = if mon + 2 > 12 {
        year += 1;
        mon - 10
    } else {
        mon + 2
    };
    let micros = since.subsec_micros();
    let mut out = AsciiBuf {
        bytes: *b"0000-00-00T00:00:00.000000Z",
        len: 27,
    };
    let b = &mut out.bytes;
    let digit = |n: i64| b'0' + (n % 10) as u8;
    b[0] = digit(year / 1000);
    b[1] = digit(year / 100);
    b[2] = digit(year / 10);
    b[3] = digit(year);
    b[5] = digit(mon / 10);
    b[6] = digit(mon);
    b[8] = digit(mday / 10);
    b[9] = digit(mday);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    for (at, value) in [(11, hour), (14, minute), (17, second)] {
        b[at] = b'0' + (value / 10) as u8;
        b[at + 1] = b'0' + (value % 10) as u8;
    }
    let mut micros_left = micros;
    for i in (20..26).rev() {
        b[i] = b'0' + (micros_left % 10) as u8;
        micros_left /= 10;
    }
    Some(out)
}

/// Identifiers pulled out of `data` once, for routing, keys, templates and the CloudEvents subject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataKeys {
    pub account_id: Option<u64>,
    /// The conversation's display id, when the event concerns one conversation.
    pub conversation_id: Option<u64>,
    pub inbox_id: Option<u64>,
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
    /// When the frame was read from the socket.
    pub received_at: SystemTime,
    pub keys: DataKeys,
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
            keys,
        }
    }

    /// CloudEvents `type`.
    pub fn ce_type(&self) -> String {
        format!("com.chatwoot.{}", self.name)
    }

    /// CloudEvents `subject`: `conversation/<display id>` when the event concerns one.
    pub fn subject(&self) -> Option<String> {
        self.keys
            .conversation_id
            .map(|id| format!("conversation/{id}"))
    }

    /// CloudEvents `time`: receive time, RFC 3339 in UTC with microseconds.
    pub fn time(&self) -> String {
        self.time_text().as_str().to_owned()
    }

    /// [`Event::time`] on the stack. Panics for a receive time outside 1970..=9999, as
    /// humantime did.
    pub fn time_text(&self) -> AsciiBuf<27> {
        rfc3339_micros(self.received_at).unwrap_or_else(|| {
            panic!(
                "receive time {:?} cannot be written as RFC 3339",
                self.received_at
            )
        })
    }

    /// Appends the CloudEvents 1.0 structured-mode JSON object (no trailing newline).
    pub fn write_structured(&self, out: &mut Vec<u8>) {
        fn string(out: &mut Vec<u8>, s: &str) {
            serde_json::to_writer(&mut *out, s).expect("writing JSON to a Vec cannot fail");
        }
        out.extend_from_slice(br#"{"specversion":"1.0","id":""#);
        out.extend_from_slice(self.id.hex().as_str().as_bytes());
        out.extend_from_slice(br#"","source":"#);
        string(out, &self.source);
        out.extend_from_slice(br#","type":"#);
        string(out, &self.ce_type());
        out.extend_from_slice(br#","time":""#);
        out.extend_from_slice(self.time_text().as_str().as_bytes());
        out.push(b'"');
        if let Some(subject) = self.subject() {
            out.extend_from_slice(br#","subject":"#);
            string(out, &subject);
        }
        out.extend_from_slice(br#","datacontenttype":"application/json","chatwootevent":"#);
        string(out, &self.name);
        out.extend_from_slice(br#","chatwoottoken":"#);
        string(out, &self.token);
        if let Some(account) = self.keys.account_id {
            out.extend_from_slice(br#","chatwootaccount":"#);
            out.extend_from_slice(AsciiBuf::decimal(account).as_str().as_bytes());
        }
        out.extend_from_slice(br#","data":"#);
        out.extend_from_slice(self.data.get().as_bytes());
        out.push(b'}');
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

/// Hash of what a broadcast carries: the event name and the data bytes.
pub fn content_hash(name: &str, data: &str) -> u128 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(name.as_bytes());
    hasher.update(&[0]);
    hasher.update(data.as_bytes());
    hasher.digest128()
}

impl DataKeys {
    /// Reads the ids Chatwoot puts in `data`. Where the conversation id sits depends on the event:
    /// message events carry `conversation_id`, typing events a nested `conversation`, and
    /// conversation events are the conversation itself (`id`).
    ///
    /// An id is a non-negative integer or a string of one; anything else there is absent. `data`
    /// that is not an object, gives one of these fields twice, or holds a value serde cannot read
    /// (a number beyond `f64`, an escaped lone surrogate in such a field or in a key) has no ids
    /// at all; inside `conversation` that drops only the nested ids. `data` must
    /// already be known to be one JSON value: it is not checked again (the private `datakeys`
    /// module says why).
    pub fn extract(event: &str, data: &str) -> DataKeys {
        keys::read(event, data).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

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

/// Why a spooled record could not be read back as an event.
#[derive(Debug, thiserror::Error)]
#[error("spool record is damaged or from an unknown version: {0}")]
pub struct RecordError(&'static str);

/// Version byte of the record layout, so a future layout can still read old spools.
const RECORD_VERSION: u8 = 1;

impl Event {
    /// The event as a spool record: everything needed to deliver it again after a restart.
    /// Layout (little endian): version, id (16), received_at seconds (8) and nanos (4), three
    /// optional ids (flag + 8 each), then name, token, source and data, each length-prefixed (u32).
    pub fn encode_record(&self, out: &mut Vec<u8>) {
        let since_epoch = self
            .received_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.id.0.to_le_bytes());
        out.extend_from_slice(&since_epoch.as_secs().to_le_bytes());
        out.extend_from_slice(&since_epoch.subsec_nanos().to_le_bytes());
        for key in [
            self.keys.account_id,
            self.keys.conversation_id,
            self.keys.inbox_id,
        ] {
            match key {
                Some(value) => {
                    out.push(1);
                    out.extend_from_slice(&value.to_le_bytes());
                }
                None => out.push(0),
            }
        }
        for field in [&*self.name, &*self.token, &*self.source, self.data.get()] {
            out.extend_from_slice(&(field.len() as u32).to_le_bytes());
            out.extend_from_slice(field.as_bytes());
        }
    }

    /// Reads a record written by [`Event::encode_record`].
    pub fn decode_record(mut bytes: &[u8]) -> Result<Event, RecordError> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], RecordError> {
            if bytes.len() < n {
                return Err(RecordError("truncated"));
            }
            let (head, tail) = bytes.split_at(n);
            *bytes = tail;
            Ok(head)
        }
        fn text<'a>(bytes: &mut &'a [u8]) -> Result<&'a str, RecordError> {
            let len = u32::from_le_bytes(take(bytes, 4)?.try_into().expect("4 bytes")) as usize;
            std::str::from_utf8(take(bytes, len)?).map_err(|_| RecordError("text is not UTF-8"))
        }
        if take(&mut bytes, 1)?[0] != RECORD_VERSION {
            return Err(RecordError("unknown version"));
        }
        let id = u128::from_le_bytes(take(&mut bytes, 16)?.try_into().expect("16 bytes"));
        let secs = u64::from_le_bytes(take(&mut bytes, 8)?.try_into().expect("8 bytes"));
        let nanos = u32::from_le_bytes(take(&mut bytes, 4)?.try_into().expect("4 bytes"));
        let mut keys = [None; 3];
        for key in &mut keys {
            if take(&mut bytes, 1)?[0] == 1 {
                *key = Some(u64::from_le_bytes(
                    take(&mut bytes, 8)?.try_into().expect("8 bytes"),
                ));
            }
        }
        let name = text(&mut bytes)?;
        let token = text(&mut bytes)?;
        let source = text(&mut bytes)?;
        let data = text(&mut bytes)?;
        let (token, source) = shared_names(token, source);
        Ok(Event {
            id: EventId(id),
            content_hash: content_hash(name, data),
            name: name.into(),
            data: JsonText::from_record(data),
            token,
            source,
            received_at: SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos),
            keys: DataKeys {
                account_id: keys[0],
                conversation_id: keys[1],
                inbox_id: keys[2],
            },
        })
    }
}

/// How many (token, source) pairs each thread remembers for [`shared_names`]: more than the
/// tokens whose events usually interleave in one sink's batch, few enough to search linearly.
const SHARED_NAMES: usize = 8;

thread_local! {
    /// The token and source names of records decoded lately on this thread, most recent first.
    /// A batch is a run of records from a few tokens: sharing their `Arc`s saves two allocations
    /// per event. Per thread because the decoders (sink loops) share no state they could hold
    /// it in.
    static RECENT_NAMES: std::cell::RefCell<Vec<(Arc<str>, Arc<str>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// `token` and `source` as shared strings, reusing those of a recent record when equal.
fn shared_names(token: &str, source: &str) -> (Arc<str>, Arc<str>) {
    RECENT_NAMES.with_borrow_mut(|recent| {
        if let Some(i) = recent
            .iter()
            .position(|(t, s)| **t == *token && **s == *source)
        {
            let pair = recent[i].clone();
            recent[..=i].rotate_right(1);
            return pair;
        }
        if recent.len() == SHARED_NAMES {
            recent.pop();
        }
        let pair: (Arc<str>, Arc<str>) = (Arc::from(token), Arc::from(source));
        recent.insert(0, pair.clone());
        pair
    })
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for (name, frame) in crate::mock::fixtures::ALL {
            let (event, data) = crate::mock::fixtures::message(frame);
            let mut original = Event::new(
                &event,
                data,
                Arc::from("agent"),
                Arc::from("wss://x/cable#agent"),
                SystemTime::UNIX_EPOCH + std::time::Duration::new(1_781_964_126, 318_123_456),
            );
            original.id = EventId(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
            let mut bytes = Vec::new();
            original.encode_record(&mut bytes);
            let back = Event::decode_record(&bytes).unwrap();
            assert_eq!(back.id, original.id, "{name}");
            assert_eq!(back.name, original.name);
            assert_eq!(back.data.get(), original.data.get());
            assert_eq!(back.token, original.token);
            assert_eq!(back.source, original.source);
            assert_eq!(back.received_at, original.received_at);
            assert_eq!(back.keys, original.keys);
            assert_eq!(back.content_hash, original.content_hash);
            for cut in [0, 1, 17, bytes.len() / 2, bytes.len() - 1] {
                assert!(
                    Event::decode_record(&bytes[..cut]).is_err(),
                    "{name} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn decoded_records_share_token_and_source() {
        let record = |token: &str| {
            let mut bytes = Vec::new();
            Event::for_test("message.created", token, r#"{"id":1}"#).encode_record(&mut bytes);
            Event::decode_record(&bytes).unwrap()
        };
        let (a, b, c) = (record("agent"), record("other"), record("agent"));
        assert!(Arc::ptr_eq(&a.token, &c.token) && Arc::ptr_eq(&a.source, &c.source));
        assert_eq!(&*b.token, "other");
        assert_eq!(&*b.source, "ws://127.0.0.1/cable#other");
        for i in 0..2 * SHARED_NAMES {
            assert_eq!(&*record(&format!("t{i}")).token, format!("t{i}"));
        }
        assert_eq!(&*record("agent").token, "agent");
    }
}
