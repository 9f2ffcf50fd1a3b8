//! Reading one value at a dotted path out of raw JSON, without building a tree.
//!
//! Route conditions (`where: [{ path: conversation.assignee_id, exists: true }]`) and templates
//! (`{data.sender.id}`) look at a few values of a 1-10 KB payload. Parsing the whole payload into a
//! `serde_json::Value` per event would allocate for every key; this walks the text once, skipping
//! what is off the path, and borrows the value it finds.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A dotted path, split once at load: `conversation.messages.0.id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonPath {
    /// Object keys; a segment that is a number also indexes arrays.
    segments: Vec<String>,
}

impl JsonPath {
    /// Parses `a.b.0.c`. Empty segments (`a..b`, a leading or trailing dot) are an error.
    pub(crate) fn parse(path: &str) -> Result<JsonPath, String> {
        if path.is_empty() {
            return Err("path is empty".into());
        }
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("`{path}` has an empty segment"));
        }
        Ok(JsonPath { segments })
    }

    pub(crate) fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The value at this path in `json`, or `None` when it is absent (or `json` is invalid).
    pub(crate) fn lookup<'a>(&self, json: &'a str) -> Option<Found<'a>> {
        let mut deserializer = serde_json::Deserializer::from_str(json);
        PathSeed {
            rest: &self.segments,
        }
        .deserialize(&mut deserializer)
        .ok()
        .flatten()
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments.join("."))
    }
}

/// A value found at a path. Containers are reported by kind only.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Found<'a> {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Object,
    Array,
}

impl Found<'_> {
    /// Whether this equals a value written in the config.
    pub(crate) fn equals(&self, expected: &serde_json::Value) -> bool {
        use serde_json::Value;
        match (self, expected) {
            (Found::Null, Value::Null) => true,
            (Found::Bool(a), Value::Bool(b)) => a == b,
            (Found::Str(a), Value::String(b)) => a == b,
            (Found::Unsigned(a), Value::Number(b)) => {
                b.as_u64() == Some(*a) || b.as_f64() == Some(*a as f64) && b.is_f64()
            }
            (Found::Signed(a), Value::Number(b)) => {
                b.as_i64() == Some(*a) || b.as_f64() == Some(*a as f64) && b.is_f64()
            }
            (Found::Float(a), Value::Number(b)) => b.as_f64() == Some(*a),
            _ => false,
        }
    }
}

struct PathSeed<'p> {
    rest: &'p [String],
}

impl<'de> DeserializeSeed<'de> for PathSeed<'_> {
    type Value = Option<Found<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        if self.rest.is_empty() {
            d.deserialize_any(LeafVisitor).map(Some)
        } else {
            d.deserialize_any(self)
        }
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Visitor<'de> for PathSeed<'_> {
    type Value = Option<Found<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (head, tail) = self
            .rest
            .split_first()
            .expect("PathSeed visits with a segment left");
        let mut found = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if found.is_none() && key == head.as_str() {
                found = map.next_value_seed(PathSeed { rest: tail })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (head, tail) = self
            .rest
            .split_first()
            .expect("PathSeed visits with a segment left");
        let Ok(wanted) = head.parse::<usize>() else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(None);
        };
        let mut found = None;
        let mut index = 0;
        loop {
            if index == wanted {
                match seq.next_element_seed(PathSeed { rest: tail })? {
                    Some(value) => found = value,
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            index += 1;
        }
        Ok(found)
    }

    // A scalar where the path wants to go deeper: absent.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

struct LeafVisitor;

impl<'de> Visitor<'de> for LeafVisitor {
    type Value = Found<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Found<'de>, E> {
        Ok(Found::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Found<'de>, E> {
        Ok(Found::Signed(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Found<'de>, E> {
        Ok(Found::Unsigned(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Found<'de>, E> {
        Ok(Found::Float(v))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Found<'de>, E> {
        Ok(Found::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Found<'de>, E> {
        Ok(Found::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Found<'de>, E> {
        Ok(Found::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Found::Object)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Found<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Found::Array)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at<'a>(json: &'a str, path: &str) -> Option<Found<'a>> {
        JsonPath::parse(path).unwrap().lookup(json)
    }

    #[test]
    fn finds_values_at_paths() {
        let json = r#"{"a":{"b":[10,{"c":"x"}],"n":null,"t":true,"f":-1.5,"s":"caf\u00e9"},"z":7}"#;
        assert_eq!(at(json, "z"), Some(Found::Unsigned(7)));
        assert_eq!(at(json, "a.b.0"), Some(Found::Unsigned(10)));
        assert_eq!(at(json, "a.b.1.c"), Some(Found::Str("x".into())));
        assert_eq!(at(json, "a.n"), Some(Found::Null));
        assert_eq!(at(json, "a.t"), Some(Found::Bool(true)));
        assert_eq!(at(json, "a.f"), Some(Found::Float(-1.5)));
        assert_eq!(at(json, "a.s"), Some(Found::Str("café".into())));
        assert_eq!(at(json, "a.b"), Some(Found::Array));
        assert_eq!(at(json, "a"), Some(Found::Object));
        assert_eq!(at(json, "a.b.2"), None);
        assert_eq!(at(json, "a.b.x"), None);
        assert_eq!(at(json, "z.deeper"), None);
        assert_eq!(at(json, "missing"), None);
        assert_eq!(at("not json", "a"), None);
    }

    #[test]
    fn borrowed_when_unescaped() {
        let json = r#"{"s":"plain"}"#;
        assert!(matches!(
            at(json, "s"),
            Some(Found::Str(Cow::Borrowed("plain")))
        ));
    }

    #[test]
    fn equality_with_config_values() {
        use serde_json::json;
        assert!(Found::Unsigned(0).equals(&json!(0)));
        assert!(!Found::Unsigned(0).equals(&json!("0")));
        assert!(Found::Str("incoming".into()).equals(&json!("incoming")));
        assert!(Found::Bool(false).equals(&json!(false)));
        assert!(Found::Null.equals(&json!(null)));
        assert!(Found::Float(1.5).equals(&json!(1.5)));
        assert!(Found::Unsigned(2).equals(&json!(2.0)));
        assert!(Found::Signed(-2).equals(&json!(-2)));
    }

    #[test]
    fn bad_paths() {
        assert!(JsonPath::parse("").is_err());
        assert!(JsonPath::parse("a..b").is_err());
        assert!(JsonPath::parse(".a").is_err());
        assert_eq!(JsonPath::parse("a.b").unwrap().to_string(), "a.b");
    }
}
