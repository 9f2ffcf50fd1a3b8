//! Removing fields from `data` before a sink sees it.
//!
//! Chatwoot puts the contact's pubsub token (`contact_inbox.pubsub_token`) into every conversation
//! payload it sends to agents: forwarded as is, any consumer could listen as that contact. So by
//! default every `pubsub_token` key, at any depth, is removed; a sink can opt out
//! (`keep_pubsub_tokens: true`) and can drop more (`fields: { drop: [contact.email] }`).
//!
//! The rewrite works on the raw text: members that stay are copied byte for byte, so the output
//! differs from Chatwoot's bytes only where something was removed. The event id is computed from
//! the bytes as received, before any of this.

use std::borrow::Cow;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::Deserialize;
use tracing::error;

use crate::event::{Event, JsonText, MAX_NESTING_CEILING};
use crate::route::jsonpath::JsonPath;

/// The key Chatwoot uses for bearer tokens of its cable.
const PUBSUB_TOKEN: &str = "pubsub_token";

/// What one sink removes from `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct Redaction {
    /// Remove every `pubsub_token` key at any depth (the default).
    pub strip_pubsub_tokens: bool,
    /// Exact paths to remove.
    pub(crate) drop: Vec<JsonPath>,
}

impl Default for Redaction {
    fn default() -> Self {
        Redaction {
            strip_pubsub_tokens: true,
            drop: Vec::new(),
        }
    }
}

/// `fields:` of a sink, as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldsSpec {
    /// Dotted paths inside `data` to remove.
    #[serde(default)]
    pub drop: Vec<String>,
}

impl Redaction {
    /// `event` as sink `sink` may see it, `redaction` applied; copied only when something was
    /// removed. Used for delivery and for the copies pushed out of a full spool.
    pub(crate) fn redacted(&self, sink: &str, event: Arc<Event>) -> Arc<Event> {
        let Some(data) = self.apply(event.data.get()) else {
            return event;
        };
        let mut event = Event::clone(&event);
        event.data = JsonText::from_string(data).unwrap_or_else(|_| {
            // The property test says this cannot happen; if it does, send nothing of it.
            error!(sink = %sink, id = %event.id, "redaction produced invalid JSON; data withheld");
            JsonText::from_string(r#"{"redaction_failed":true}"#.into())
                .expect("a constant is JSON")
        });
        Arc::new(event)
    }

    /// The rewritten data, or `None` when nothing had to be removed (the common case costs two
    /// substring searches when only tokens are stripped). Keys are compared decoded, and any
    /// letter of a key can be written as a `\u` escape (`\u0070ubsub_token`), so data with a
    /// `\u` anywhere takes the careful path too.
    pub fn apply(&self, data: &str) -> Option<String> {
        let tokens_present = self.strip_pubsub_tokens && may_hold_token_key(data);
        if !tokens_present && self.drop.is_empty() {
            return None;
        }
        let mut rewriter = Rewriter {
            src: data.as_bytes(),
            pos: 0,
            out: String::with_capacity(data.len()),
            redaction: self,
            path: Vec::new(),
            changed: false,
        };
        if rewriter.value().is_err() {
            // Not for the JSON the socket accepts (valid, nested at most `max_nesting`): only a
            // record another build spooled can get here. Send nothing of it rather than a
            // payload that may still hold a token.
            return Some(r#"{"redaction_failed":true}"#.to_owned());
        }
        rewriter.changed.then_some(rewriter.out)
    }

    fn drops(&self, path: &[Cow<'_, str>], key: &str) -> bool {
        (self.strip_pubsub_tokens && key == PUBSUB_TOKEN)
            || self.drop.iter().any(|p| {
                let segments = p.segments();
                segments.len() == path.len() + 1
                    && segments[..path.len()]
                        .iter()
                        .zip(path)
                        .all(|(a, b)| a == b.as_ref())
                    && segments[path.len()] == key
            })
    }
}

/// Whether `data` can hold a `pubsub_token` key: written plainly, or with some of its letters
/// escaped (only `\u` escapes can stand for letters and `_`).
fn may_hold_token_key(data: &str) -> bool {
    data.contains(PUBSUB_TOKEN) || data.contains("\\u")
}

/// A single pass over valid JSON, copying what stays.
struct Rewriter<'a> {
    src: &'a [u8],
    pos: usize,
    out: String,
    redaction: &'a Redaction,
    /// Keys (and array indices as text) from the root to the current value; its length is
    /// the nesting depth, bounded by [`MAX_NESTING_CEILING`].
    path: Vec<Cow<'a, str>>,
    changed: bool,
}

/// The input was not valid JSON, or nested deeper than the walk goes: nothing of it is sent.
struct Invalid;

impl<'a> Rewriter<'a> {
    fn text(&self, from: usize, to: usize) -> &'a str {
        std::str::from_utf8(&self.src[from..to])
            .expect("slices fall on ASCII delimiters of UTF-8 input")
    }

    fn skip_ws(&mut self) {
        while self.pos < self.src.len()
            && matches!(self.src[self.pos], b' ' | b'\t' | b'\n' | b'\r')
        {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Result<u8, Invalid> {
        self.src.get(self.pos).copied().ok_or(Invalid)
    }

    /// Copies one value to `out`, rewriting objects inside it. Recursion stops at
    /// [`MAX_NESTING_CEILING`] levels: data that deep never passes the socket, but a spool
    /// record written by another build may hold it, and it must not exhaust the stack.
    fn value(&mut self) -> Result<(), Invalid> {
        self.skip_ws();
        if self.path.len() >= MAX_NESTING_CEILING {
            return Err(Invalid);
        }
        match self.peek()? {
            b'{' => self.object(),
            b'[' => self.array(),
            _ => {
                let start = self.pos;
                self.skip_scalar()?;
                self.out.push_str(self.text(start, self.pos));
                Ok(())
            }
        }
    }

    /// Skips a string, number, literal, or a whole container without copying.
    fn skip_value(&mut self) -> Result<(), Invalid> {
        self.skip_ws();
        match self.peek()? {
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => self.skip_string()?,
                        b'{' | b'[' => {
                            depth += 1;
                            self.pos += 1;
                        }
                        b'}' | b']' => {
                            depth -= 1;
                            self.pos += 1;
                            if depth == 0 {
                                return Ok(());
                            }
                        }
                        _ => self.pos += 1,
                    }
                }
            }
            _ => self.skip_scalar(),
        }
    }

    fn skip_scalar(&mut self) -> Result<(), Invalid> {
        if self.peek()? == b'"' {
            return self.skip_string();
        }
        let start = self.pos;
        while self.pos < self.src.len()
            && !matches!(
                self.src[self.pos],
                b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'
            )
        {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(Invalid);
        }
        Ok(())
    }

    fn skip_string(&mut self) -> Result<(), Invalid> {
        self.pos += 1; // opening quote
        loop {
            match self.peek()? {
                b'\\' => self.pos += 2,
                b'"' => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => self.pos += 1,
            }
        }
    }

    fn object(&mut self) -> Result<(), Invalid> {
        self.pos += 1;
        self.out.push('{');
        let mut first = true;
        loop {
            self.skip_ws();
            match self.peek()? {
                b'}' => {
                    self.pos += 1;
                    self.out.push('}');
                    return Ok(());
                }
                b',' => {
                    self.pos += 1;
                    continue;
                }
                b'"' => {}
                _ => return Err(Invalid),
            }
            let key_start = self.pos;
            self.skip_string()?;
            let raw_key = self.text(key_start, self.pos);
            let inner = &raw_key[1..raw_key.len() - 1];
            // Keys with escapes are compared decoded; plain ones as they are.
            let decoded;
            let key: &str = if inner.contains('\\') {
                decoded = serde_json::from_str::<String>(raw_key).map_err(|_| Invalid)?;
                &decoded
            } else {
                inner
            };
            self.skip_ws();
            if self.peek()? != b':' {
                return Err(Invalid);
            }
            self.pos += 1;
            if self.redaction.drops(&self.path, key) {
                self.skip_value()?;
                self.changed = true;
                continue;
            }
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(raw_key);
            self.out.push(':');
            self.path.push(Cow::Borrowed(inner));
            let result = self.value();
            self.path.pop();
            result?;
        }
    }

    fn array(&mut self) -> Result<(), Invalid> {
        self.pos += 1;
        self.out.push('[');
        let mut index = 0usize;
        loop {
            self.skip_ws();
            match self.peek()? {
                b']' => {
                    self.pos += 1;
                    self.out.push(']');
                    return Ok(());
                }
                b',' => {
                    self.pos += 1;
                    self.out.push(',');
                    continue;
                }
                _ => {}
            }
            // Indices join the path as text so `messages.0.content` can be dropped.
            self.path.push(index_segment(index));
            let result = self.value();
            self.path.pop();
            result?;
            index += 1;
        }
    }
}

/// An array index as a path segment, without allocating for the common small ones.
fn index_segment(index: usize) -> Cow<'static, str> {
    const SMALL: [&str; 16] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
    ];
    match SMALL.get(index) {
        Some(small) => Cow::Borrowed(small),
        None => Cow::Owned(index.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip() -> Redaction {
        Redaction::default()
    }

    #[test]
    fn strips_pubsub_tokens_at_any_depth_and_keeps_the_rest_byte_for_byte() {
        let data = r#"{"id":87, "contact_inbox":{"id":58,"pubsub_token":"bf2RWA4TaHac2fPThmKYp6Nn","source_id":"x"},"meta":{"a":[{"pubsub_token":"t2"}]},"z": 1.50}"#;
        let out = strip().apply(data).unwrap();
        assert_eq!(
            out,
            r#"{"id":87,"contact_inbox":{"id":58,"source_id":"x"},"meta":{"a":[{}]},"z":1.50}"#
        );
        assert!(!out.contains("bf2RWA4T"));
        let _: serde_json::Value = serde_json::from_str(&out).unwrap();
    }

    #[test]
    fn data_deeper_than_the_walk_goes_is_withheld_not_walked() {
        // What a spool written by another build could hold: walked recursively it exhausted the
        // stack at every start. Nothing of it is sent, since it may hide a token.
        let depth = 100_000;
        let deep = format!(
            r#"{{"x":{}{{"pubsub_token":"secret"}}{}}}"#,
            r#"{"a":"#.repeat(depth),
            "}".repeat(depth)
        );
        assert_eq!(
            strip().apply(&deep).as_deref(),
            Some(r#"{"redaction_failed":true}"#)
        );
    }

    #[test]
    fn data_as_deep_as_the_socket_accepts_is_still_redacted() {
        let depth = 1000;
        let deep = format!(
            r#"{{"x":{}{{"pubsub_token":"secret","k":1}}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let out = strip().apply(&deep).expect("a token was removed");
        assert!(!out.contains("secret") && out.contains(r#"{"k":1}"#));
    }

    #[test]
    fn leaves_data_without_tokens_alone() {
        assert_eq!(strip().apply(r#"{"a":1}"#), None);
        // "pubsub_token" as a value, not a key: nothing removed.
        assert_eq!(strip().apply(r#"{"a":"pubsub_token"}"#), None);
    }

    #[test]
    fn keep_pubsub_tokens_opts_out() {
        let keep = Redaction {
            strip_pubsub_tokens: false,
            drop: vec![],
        };
        assert_eq!(keep.apply(r#"{"pubsub_token":"t"}"#), None);
    }

    #[test]
    fn drops_exact_paths() {
        let r = Redaction {
            strip_pubsub_tokens: true,
            drop: vec![
                JsonPath::parse("meta.sender.email").unwrap(),
                JsonPath::parse("meta.sender.phone_number").unwrap(),
                JsonPath::parse("messages.0.content").unwrap(),
            ],
        };
        let data = r#"{"email":"keep@x","meta":{"sender":{"email":"a@b","name":"A","phone_number":"+1"}},"messages":[{"content":"hi","id":1},{"content":"yo"}]}"#;
        assert_eq!(
            r.apply(data).unwrap(),
            r#"{"email":"keep@x","meta":{"sender":{"name":"A"}},"messages":[{"id":1},{"content":"yo"}]}"#
        );
    }

    #[test]
    fn escaped_keys_are_compared_decoded() {
        let out = strip().apply(r#"{"pubsub\u005ftoken":"t","ok":true}"#);
        assert_eq!(out.as_deref(), Some(r#"{"ok":true}"#));
        let r = Redaction {
            strip_pubsub_tokens: true,
            drop: vec![JsonPath::parse("x").unwrap()],
        };
        assert_eq!(
            r.apply(r#"{"pubsub\u005ftoken":"t","ok":true}"#).unwrap(),
            r#"{"ok":true}"#
        );
    }

    #[test]
    fn a_key_with_any_of_its_letters_escaped_is_still_stripped() {
        let key = PUBSUB_TOKEN.as_bytes();
        let mut keys: Vec<String> = (0..key.len())
            .map(|i| {
                let (before, after) = (&PUBSUB_TOKEN[..i], &PUBSUB_TOKEN[i + 1..]);
                format!("{before}\\u{:04x}{after}", key[i])
            })
            .collect();
        keys.push(key.iter().map(|b| format!("\\u{b:04X}")).collect());
        for escaped in keys {
            let data = format!(r#"{{"contact_inbox":{{"{escaped}":"secret","id":5}}}}"#);
            let out = strip().apply(&data);
            assert_eq!(
                out.as_deref(),
                Some(r#"{"contact_inbox":{"id":5}}"#),
                "{escaped}"
            );
        }
    }

    #[test]
    fn every_fixture_loses_its_tokens_and_stays_valid() {
        for (name, frame) in crate::mock::fixtures::ALL {
            let v: serde_json::Value = serde_json::from_str(frame).unwrap();
            let data = serde_json::to_string(&v["message"]["data"]).unwrap();
            let out = strip().apply(&data).unwrap_or(data.clone());
            assert!(!out.contains("pubsub_token"), "{name}");
            let mut expected = v["message"]["data"].clone();
            remove_tokens(&mut expected);
            let got: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(got, expected, "{name}");
        }
    }

    fn remove_tokens(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove("pubsub_token");
                map.values_mut().for_each(remove_tokens);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(remove_tokens),
            _ => {}
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// For any JSON with tokens and dropped paths sprinkled in, the output is valid JSON equal
        /// to the input tree without them.
        #[test]
        fn redaction_matches_a_tree_model(value in json_tree(), spaced in proptest::prelude::any::<bool>()) {
            let text = if spaced {
                serde_json::to_string_pretty(&value).unwrap()
            } else {
                value.to_string()
            };
            let r = Redaction {
                strip_pubsub_tokens: true,
                drop: vec![JsonPath::parse("a.b").unwrap()],
            };
            let out = r.apply(&text).unwrap_or(text.clone());
            let got: serde_json::Value = serde_json::from_str(&out).unwrap();
            let mut expected = value.clone();
            remove_tokens(&mut expected);
            if let Some(a) = expected.get_mut("a").and_then(|a| a.as_object_mut()) {
                a.remove("b");
            }
            proptest::prop_assert_eq!(got, expected);
        }
    }

    fn json_tree() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            "[a-z \\\\\"{}\\[\\],:]{0,6}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("pubsub_token".to_string()),
                        Just("a".to_string()),
                        Just("b".to_string()),
                        "[a-c]{1,2}"
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
