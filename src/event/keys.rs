//! Reading the few ids [`DataKeys`] needs out of `data` without parsing all of it.
//!
//! Every event goes through this on the socket's task, and serde's pass over the whole payload
//! (and a second one over a nested `conversation`) was a large share of the daemon's CPU. `data`
//! is an event's `JsonText`, already known to be one JSON value (the frame decoder or
//! `JsonText::from_string` checked it), so nothing here checks it again: the scanner walks the
//! members of one object, finds where each value ends by its quotes and brackets, and looks only
//! at the values it was asked for.
//!
//! The outcome must stay what serde's derived `Deserialize` gave, errors included, since an error
//! made every id absent. The forms where serde decodes or can fail (a key with an escape, a
//! number that is not a plain `u64`, a string with an escape, a container where an id should be)
//! are rare in what Chatwoot sends, so they are handed to serde itself rather than imitated.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Identifiers pulled out of `data` once, for routing, keys, templates and the CloudEvents subject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataKeys {
    /// The account the event belongs to.
    pub account_id: Option<u64>,
    /// The conversation's display id, when the event concerns one conversation.
    pub conversation_id: Option<u64>,
    /// The inbox of the conversation or message.
    pub inbox_id: Option<u64>,
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
        read(event, data).unwrap_or_default()
    }
}

/// [`DataKeys::extract`], which says what is read from where. `None` where serde failed to
/// read `data` into a struct of the fields read here: that made every id absent.
pub(crate) fn read(event: &str, data: &str) -> Option<DataKeys> {
    const TOP: [&str; 4] = ["account_id", "id", "conversation_id", "inbox_id"];
    let mut s = Scanner { text: data, pos: 0 };
    let mut top = [None; 4];
    // `None` until a `conversation` member is read; then `Some` of its `id` and `inbox_id`,
    // themselves `None` when it is not an object serde could read.
    let mut conversation = None;
    s.whitespace();
    s.object(|s, key| {
        if key == "conversation" {
            // Read in place, not skipped and read again later: typing events carry their ids
            // only in there, and it is most of their bytes.
            let nested = s.object_members(["id", "inbox_id"])?;
            conversation.replace(nested).is_none().then_some(())
        } else {
            s.skip_member(key, TOP, &mut top)
        }
    })?;
    let [account_id, id, conversation_id, inbox_id] = ids(top)?;
    // The nested ids only fill what the top level lacks; a nested object serde could not read
    // just has none.
    let [nested_id, nested_inbox_id] = match conversation.flatten() {
        Some(nested) if conversation_id.is_none() || inbox_id.is_none() => {
            ids(nested).unwrap_or_default()
        }
        _ => [None; 2],
    };
    let is_conversation_event =
        event.starts_with("conversation.") || matches!(event, "assignee.changed" | "team.changed");
    Some(DataKeys {
        account_id,
        conversation_id: conversation_id
            .or(nested_id)
            .or(id.filter(|_| is_conversation_event)),
        inbox_id: inbox_id.or(nested_inbox_id),
    })
}

/// The ids in these values, as [`lenient`] reads each; `None` if serde fails on one of them.
fn ids<const N: usize>(raw: [Option<&str>; N]) -> Option<[Option<u64>; N]> {
    let mut ids = [None; N];
    for (id, raw) in ids.iter_mut().zip(raw) {
        if let Some(raw) = raw {
            *id = lenient(raw)?;
        }
    }
    Some(ids)
}

/// What [`Lenient`] reads from the JSON value `raw`: a non-negative integer, or a string that
/// parses as one. `None` where serde fails on the value (a number beyond `f64`'s range, a string
/// or key with an escaped lone surrogate), which fails the whole object as it did with serde.
fn lenient(raw: &str) -> Option<Option<u64>> {
    match raw.as_bytes() {
        digits @ [b'0'..=b'9', ..] if digits.iter().all(u8::is_ascii_digit) => {
            // Beyond u64 serde reads a float (absent), or fails beyond f64: serde decides.
            if let Ok(n) = raw.parse() {
                return Some(Some(n));
            }
        }
        [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => {
            return Some(raw[1..raw.len() - 1].parse().ok());
        }
        b"null" | b"true" | b"false" => return Some(None),
        _ => {}
    }
    serde_json::from_str::<Lenient>(raw).ok().map(|l| l.0)
}

/// A position in JSON text that is assumed valid: only what is needed to find where tokens end
/// is looked at, and anything unexpected just ends the scan with `None`.
struct Scanner<'a> {
    /// The text, stepped through as bytes (every byte the scanner stops at is ASCII, and
    /// indexing bytes avoids char-boundary checks on each step) and sliced as text for the
    /// values that are kept.
    text: &'a str,
    /// Index of the next unread byte; never past the end, so `rest` cannot panic.
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn expect(&mut self, wanted: u8) -> Option<()> {
        (self.next()? == wanted).then_some(())
    }

    fn rest(&self) -> &'a [u8] {
        &self.text.as_bytes()[self.pos..]
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// Reads the object at the scanner's position to its end, calling `member` with each key
    /// and the scanner at the member's value, which `member` must read to its end. `None` where
    /// `member` says so, a key does not decode, or this is not an object.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &str) -> Option<()>) -> Option<()> {
        self.expect(b'{')?;
        self.whitespace();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(());
        }
        loop {
            let key = self.key()?;
            self.whitespace();
            self.expect(b':')?;
            self.whitespace();
            member(self, &key)?;
            self.whitespace();
            match self.next()? {
                b',' => self.whitespace(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// The text of each member of the object at the scanner's position whose key is in
    /// `names`, in the order of `names`. `None` where serde would fail to read the object into
    /// a struct with those fields: a field given twice, or any key that does not decode (an
    /// escaped lone surrogate).
    fn members<const N: usize>(&mut self, names: [&str; N]) -> Option<[Option<&'a str>; N]> {
        let mut found = [None; N];
        self.object(|s, key| s.skip_member(key, names, &mut found))?;
        Some(found)
    }

    /// Passes the value of member `key`, keeping its text in `found` if `key` is one of
    /// `names`. `None` for a second member of one of `names`: serde's derived Deserialize
    /// rejects a field given twice.
    fn skip_member<const N: usize>(
        &mut self,
        key: &str,
        names: [&str; N],
        found: &mut [Option<&'a str>; N],
    ) -> Option<()> {
        let start = self.pos;
        self.skip_value()?;
        match names.iter().position(|name| *name == key) {
            Some(i) => found[i]
                .replace(self.text.get(start..self.pos)?)
                .is_none()
                .then_some(()),
            None => Some(()),
        }
    }

    /// [`Scanner::members`] of the value at the scanner's position, `Some(None)` when that is
    /// not an object or serde could not read it; the value is skipped either way.
    fn object_members<const N: usize>(
        &mut self,
        names: [&str; N],
    ) -> Option<Option<[Option<&'a str>; N]>> {
        let start = self.pos;
        if self.peek()? == b'{' {
            if let Some(found) = self.members(names) {
                return Some(Some(found));
            }
            // Rare (a key given twice, or one that does not decode): skip it from the start.
            self.pos = start;
        }
        self.skip_value()?;
        Some(None)
    }

    /// An object key, decoded. Escaped keys are rare, so serde decodes them: that is also how
    /// `account\u005fid` still names `account_id`, and how a key serde cannot decode fails.
    fn key(&mut self) -> Option<Cow<'a, str>> {
        let start = self.pos;
        self.expect(b'"')?;
        let escaped = self.skip_string_body()?;
        let quoted = self.text.get(start..self.pos)?;
        if escaped {
            serde_json::from_str::<String>(quoted).ok().map(Cow::Owned)
        } else {
            Some(Cow::Borrowed(&quoted[1..quoted.len() - 1]))
        }
    }

    /// Past the closing quote of a string whose opening quote was read; whether it held an
    /// escape.
    #[inline]
    fn skip_string_body(&mut self) -> Option<bool> {
        let mut escaped = false;
        loop {
            self.pos += quote_or_backslash(self.rest())?;
            if self.next()? == b'"' {
                return Some(escaped);
            }
            // The escaped byte can be a quote that does not end the string; `\u` is followed
            // by hex digits, which need no care.
            escaped = true;
            self.next()?;
        }
    }

    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.pos += 1;
                self.skip_string_body()?;
            }
            b'{' | b'[' => {
                // Brackets inside strings must not count, so strings are skipped whole. The
                // gaps between them are a few bytes: a word-at-a-time search measured slower.
                let mut depth = 0usize;
                loop {
                    let at = self
                        .rest()
                        .iter()
                        .position(|b| matches!(b, b'"' | b'{' | b'[' | b'}' | b']'))?;
                    self.pos += at;
                    match self.next()? {
                        b'"' => {
                            self.skip_string_body()?;
                        }
                        b'{' | b'[' => depth += 1,
                        _ => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                    }
                }
            }
            _ => {
                // A number or literal ends where the next token or whitespace begins.
                let len = self
                    .rest()
                    .iter()
                    .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                    .unwrap_or(self.rest().len());
                if len == 0 {
                    return None;
                }
                self.pos += len;
            }
        }
        Some(())
    }
}

/// Index of the first `"` or `\` in `bytes`, looking at 8 bytes at a time: strings are most of
/// `data`'s bytes, and with a byte-by-byte search the scan was only a fifth faster than serde.
/// `memchr::memchr2` (SIMD, already in the dependency tree) measured slower on these short
/// strings: 675 against 537 ns for message.created.
#[inline]
fn quote_or_backslash(bytes: &[u8]) -> Option<usize> {
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        let found = equal(word, b'"') | equal(word, b'\\');
        if found != 0 {
            // Little endian: the first byte is the lowest, and the lowest mark is exact.
            return Some(offset + found.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    let at = chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\')?;
    Some(offset + at)
}

/// The high bit of each byte of `word` that equals `byte`: exact up to the first such byte (a
/// borrow can mark bytes after it, never before).
#[inline]
fn equal(word: u64, byte: u8) -> u64 {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// A non-negative integer where Chatwoot usually puts one; anything else reads as absent
/// instead of failing the whole event. [`lenient`] leaves the rare forms to it.
#[derive(Default, Debug, Clone, Copy)]
struct Lenient(Option<u64>);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Lenient, E> {
                Ok(Lenient(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Lenient, E> {
                Ok(Lenient(u64::try_from(v).ok()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Lenient, E> {
                Ok(Lenient(v.parse().ok()))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Lenient, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lenient, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::value::RawValue;

    use super::*;

    /// How `DataKeys::extract` read `data` before the scanner: the behaviour it must keep.
    fn extract_with_serde(event: &str, data: &str) -> DataKeys {
        #[derive(Deserialize, Default)]
        struct Nested {
            #[serde(default)]
            id: Lenient,
            #[serde(default)]
            inbox_id: Lenient,
        }
        #[derive(Deserialize, Default)]
        struct Top<'a> {
            #[serde(default)]
            account_id: Lenient,
            #[serde(default)]
            id: Lenient,
            #[serde(default)]
            conversation_id: Lenient,
            #[serde(default)]
            inbox_id: Lenient,
            #[serde(default, borrow, deserialize_with = "object_only")]
            conversation: Option<&'a RawValue>,
        }
        fn object_only<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
            // A `conversation` that is not an object (null, a string) is simply absent.
            let raw = <&RawValue>::deserialize(d)?;
            Ok(raw.get().starts_with('{').then_some(raw))
        }
        // serde would read an array as a struct's fields in order; only objects carry keys.
        if !data.trim_start().starts_with('{') {
            return DataKeys::default();
        }
        let Ok(top) = serde_json::from_str::<Top>(data) else {
            return DataKeys::default();
        };
        // The nested conversation is read only for what the top level lacks: message events
        // carry both ids at the top, and their `conversation` is most of their bytes.
        let nested = match top.conversation {
            Some(raw) if top.conversation_id.0.is_none() || top.inbox_id.0.is_none() => {
                serde_json::from_str::<Nested>(raw.get()).unwrap_or_default()
            }
            _ => Nested::default(),
        };
        let is_conversation_event = event.starts_with("conversation.")
            || matches!(event, "assignee.changed" | "team.changed");
        let conversation_id = top
            .conversation_id
            .0
            .or(nested.id.0)
            .or(if is_conversation_event {
                top.id.0
            } else {
                None
            });
        DataKeys {
            account_id: top.account_id.0,
            conversation_id,
            inbox_id: top.inbox_id.0.or(nested.inbox_id.0),
        }
    }

    /// Both readings of `data`, which must already be one JSON value as the bridge's data is.
    fn both(event: &str, data: &str) -> (DataKeys, DataKeys) {
        assert!(
            serde_json::from_str::<&RawValue>(data).is_ok(),
            "not JSON: {data}"
        );
        (
            DataKeys::extract(event, data),
            extract_with_serde(event, data),
        )
    }

    #[test]
    fn every_fixture_reads_as_with_serde() {
        for (name, frame) in crate::mock::fixtures::ALL {
            let (event, data) = crate::mock::fixtures::message(frame);
            let (ours, serde) = both(&event, data.get());
            assert_eq!(ours, serde, "{name}");
            // Every recorded event names its account: the two did not merely agree on nothing.
            assert_eq!(ours.account_id, Some(1), "{name}");
            // The same data spread over lines, as another producer might write it.
            let value: serde_json::Value = serde_json::from_str(data.get()).unwrap();
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            let (ours, serde) = both(&event, &pretty);
            assert_eq!(ours, serde, "{name}, pretty");
        }
    }

    #[test]
    fn edge_cases_read_as_with_serde() {
        let ids = [
            "0",
            "7",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999999",
            &format!("1{}", "0".repeat(400)),
            "-0",
            "-1",
            "-9223372036854775808",
            "-9223372036854775809",
            "1.0",
            "1.5",
            "1e2",
            "1E+2",
            "0e999999999999999",
            "1e400",
            "-1e400",
            "1.8e308",
            "1e-400",
            "\"3\"",
            "\"+3\"",
            "\" 3\"",
            "\"\"",
            "\"-0\"",
            "\"18446744073709551616\"",
            "\"\\u0033\"",
            "\"\\ud800\"",
            "\"\\ud83d\\ude00\"",
            "null",
            "true",
            "false",
            "[]",
            "[1,{\"\\ud800\":1}]",
            "{}",
            "{\"a\":1}",
            "{\"\\ud800\":1}",
            "{\"a\":{\"\\ud800\":1}}",
        ];
        let keys = [
            "account_id",
            "account\\u005fid",
            "\\u0061ccount_id",
            "id",
            "\\u0069\\u0064",
            "conversation_id",
            "inbox_id",
            "inbox\\u005Fid",
            "conversation",
            "x\\ud800",
            "\\\"id",
            "i\\/d",
        ];
        let events = ["message.created", "conversation.updated", "team.changed"];
        let mut cases = vec![
            "{}".to_owned(),
            " {} ".to_owned(),
            "[1,2,3,4]".to_owned(),
            "[]".to_owned(),
            "7".to_owned(),
            "\"{\"".to_owned(),
            "null".to_owned(),
            r#"{"account_id":1,"account_id":1}"#.to_owned(),
            r#"{"account_id":1,"account\u005fid":2}"#.to_owned(),
            r#"{"account_id":1,"conversation":null,"conversation":{}}"#.to_owned(),
            r#"{"conversation":{"id":1,"id":2},"account_id":3}"#.to_owned(),
            r#"{"conversation":{"id":1,"\ud800":2},"account_id":3}"#.to_owned(),
            r#"{"conversation":{"id":1e400,"inbox_id":2},"account_id":3}"#.to_owned(),
            r#"{"conversation":{"conversation":{"id":5}},"account_id":3}"#.to_owned(),
            r#"{"conversation":"{\"id\":5}","id":6}"#.to_owned(),
            r#"{"a":"}\"{[","b":["]",{"}":"{"}],"id":4}"#.to_owned(),
            r#"{"a":{"id":1,"account_id":2},"b":[{"account_id":3}],"inbox_id":4}"#.to_owned(),
            r#"{"conversation_id":9,"inbox_id":8,"conversation":{"id":1,"id":1}}"#.to_owned(),
        ];
        for key in keys {
            for id in &ids {
                cases.push(format!("{{\"{key}\":{id}}}"));
                // With an id that is read, so that failing the object shows.
                cases.push(format!("{{\"account_id\":5,\"{key}\":{id}}}"));
                cases.push(format!("{{\"{key}\":{id},\"inbox_id\":2}}"));
                cases.push(format!(
                    "{{ \"x\" : [ {id} ] , \"{key}\" :\n{id} ,\"conversation\":{{\"{key}\":{id}}}}}"
                ));
            }
        }
        for data in &cases {
            for event in events {
                let (ours, serde) = both(event, data);
                assert_eq!(ours, serde, "{event} {data}");
            }
        }
    }

    /// A JSON value as the generator builds it, rendered with chosen whitespace.
    #[derive(Debug, Clone)]
    enum Json {
        /// A number, literal or string, written as it appears in the text.
        Scalar(String),
        Array(Vec<Json>),
        /// Keys as written between their quotes, escapes and duplicates included.
        Object(Vec<(String, Json)>),
    }

    impl Json {
        fn render(&self, out: &mut String, spaces: &mut impl Iterator<Item = &'static str>) {
            fn space(out: &mut String, spaces: &mut impl Iterator<Item = &'static str>) {
                out.push_str(spaces.next().unwrap_or(""));
            }
            match self {
                Json::Scalar(text) => out.push_str(text),
                Json::Array(items) => {
                    out.push('[');
                    space(out, spaces);
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        space(out, spaces);
                        item.render(out, spaces);
                        space(out, spaces);
                    }
                    out.push(']');
                }
                Json::Object(members) => {
                    out.push('{');
                    space(out, spaces);
                    for (i, (key, value)) in members.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        space(out, spaces);
                        out.push('"');
                        out.push_str(key);
                        out.push('"');
                        space(out, spaces);
                        out.push(':');
                        space(out, spaces);
                        value.render(out, spaces);
                        space(out, spaces);
                    }
                    out.push('}');
                }
            }
        }
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "(0|[1-9][0-9]{0,3})",
            1 => "-?(0|[1-9][0-9]{0,24})(\\.[0-9]{1,3})?([eE][-+]?[0-9]{1,3})?",
            // Around the largest f64, written out.
            1 => "[1-9][0-9]{305,310}",
            1 => prop::sample::select(vec![
                "18446744073709551615",
                "18446744073709551616",
                "-9223372036854775808",
                "-9223372036854775809",
                "-0",
                "-0.0",
                "1e400",
                "0e400",
                "1e-400",
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn string() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            3 => "[0-9a-z +:,{}\\[\\]é]{0,3}",
            1 => prop::sample::select(vec![
                "\\\"", "\\\\", "\\/", "\\n", "\\u0033", "\\u005f", "\\ud83d\\ude00", "\\ud800",
                "\\udc00x", "\\\\\\\"",
            ])
            .prop_map(str::to_owned),
        ];
        prop::collection::vec(piece, 0..4).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
    }

    /// Any key: mostly ones that are not ids, some that are (plain or escaped), rarely one
    /// serde cannot decode.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => prop::sample::select(vec![
                "x", "ids", "Id", "", "account_id ", "a{", "[id]", "\\\\", "é",
            ]),
            6 => prop::sample::select(vec![
                "account_id",
                "id",
                "conversation_id",
                "inbox_id",
                "conversation",
            ]),
            2 => prop::sample::select(vec![
                "account\\u005fid",
                "\\u0069d",
                "inbox\\u005Fid",
                "conversation\\u005fid",
                "conversatio\\u006e",
                "i\\\"d",
            ]),
            1 => Just("\\ud800"),
        ]
        .prop_map(str::to_owned)
    }

    fn json() -> BoxedStrategy<Json> {
        let scalar = prop_oneof![
            4 => number(),
            2 => string(),
            1 => prop::sample::select(vec!["null", "true", "false"]).prop_map(str::to_owned),
        ]
        .prop_map(Json::Scalar);
        scalar
            .prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    1 => prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                    3 => prop::collection::vec((key(), inner), 0..6).prop_map(Json::Object),
                ]
            })
            .boxed()
    }

    /// `name` as written between quotes: mostly plain, sometimes with one byte escaped.
    fn spelling(name: &'static str) -> impl Strategy<Value = String> {
        prop_oneof![
            4 => Just(name.to_owned()),
            1 => (0..name.len()).prop_map(move |i| {
                format!("{}\\u{:04x}{}", &name[..i], name.as_bytes()[i], &name[i + 1..])
            }),
        ]
    }

    /// What an id usually is, or anything at all.
    fn id_value() -> BoxedStrategy<Json> {
        prop_oneof![
            3 => "(0|[1-9][0-9]{0,5})".prop_map(Json::Scalar),
            1 => "\"[+-]?[0-9]{1,3}\"".prop_map(Json::Scalar),
            2 => json(),
        ]
        .boxed()
    }

    /// An object in which each of `named` is present or not, among other members in any order;
    /// sometimes one key comes twice.
    fn object_of(named: Vec<(&'static str, BoxedStrategy<Json>)>) -> BoxedStrategy<Json> {
        let picks: Vec<_> = named
            .into_iter()
            .map(|(name, value)| prop::option::weighted(0.6, (spelling(name), value)))
            .collect();
        let noise = prop::collection::vec((key(), json()), 0..5);
        let twice = prop::option::weighted(0.1, (any::<prop::sample::Index>(), json()));
        (picks, noise, twice)
            .prop_flat_map(|(picks, noise, twice)| {
                let mut members: Vec<(String, Json)> =
                    picks.into_iter().flatten().chain(noise).collect();
                if let (Some((at, value)), false) = (twice, members.is_empty()) {
                    members.push((members[at.index(members.len())].0.clone(), value));
                }
                Just(members).prop_shuffle()
            })
            .prop_map(Json::Object)
            .boxed()
    }

    /// `data` as Chatwoot might send it, or as it never would.
    fn data() -> impl Strategy<Value = Json> {
        let conversation = prop_oneof![
            3 => object_of(vec![("id", id_value()), ("inbox_id", id_value())]),
            1 => json(),
        ]
        .boxed();
        prop_oneof![
            12 => object_of(vec![
                ("account_id", id_value()),
                ("id", id_value()),
                ("conversation_id", id_value()),
                ("inbox_id", id_value()),
                ("conversation", conversation),
            ]),
            1 => json(),
        ]
    }

    /// What goes between two tokens, mostly nothing.
    fn whitespace() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "", "", " ", "\n", "\t", " \r\n  "])
    }

    /// Event names that differ in where the conversation id may come from.
    fn event_name() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "message.created",
            "conversation.typing_on",
            "assignee.changed",
            "contact.updated",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 1024,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// For any JSON (ids at any depth and position, escaped and duplicate keys, numbers of
        /// every form, strings full of quotes and brackets, whitespace between tokens), the
        /// scanner reads what serde read.
        #[test]
        fn scanner_reads_as_serde(
            value in data(),
            spaces in prop::collection::vec(whitespace(), 64),
            event in event_name(),
        ) {
            let mut data = String::new();
            value.render(&mut data, &mut spaces.into_iter().cycle());
            let (ours, serde) = both(event, &data);
            prop_assert_eq!(ours, serde, "{}", data);
        }

        /// Text that is not JSON breaks the promise extract relies on, but must still not panic
        /// or hang it.
        #[test]
        fn invalid_text_does_not_panic(text in "[{}\\[\\]\":,\\\\ aeuéd0-9.-]{0,40}") {
            let _ = DataKeys::extract("conversation.updated", &text);
        }
    }
}
