//! The vocabulary every part of the config is written in: secrets, durations, one-or-many lists,
//! numbers that may arrive as text, and the problems validation reports.
//!
//! A leaf: it imports nothing of the crate, so every stage may describe its own settings with it.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};

/// A value that must never reach logs, metrics or error messages.
#[derive(Clone, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Secret(String);

/// Why a secret written as a number or a boolean is refused: YAML has already turned `007` into
/// 7 (and `1e3` into 1000) by the time the value is read, so the secret sent would be another.
pub(crate) const SECRET_MUST_BE_TEXT: &str = "a secret must be a string, not a number or a \
    boolean: put it in quotes (YAML reads `password: 007` as the number 7). An environment \
    override that looks like a number is read as one too: write `${VAR}` in the file instead";

impl<'de> Deserialize<'de> for Secret {
    /// Only a string: a number or a boolean has lost how it was written (see
    /// `SECRET_MUST_BE_TEXT`). Nothing wrong is echoed, as serde's own "invalid type: integer
    /// `123456`" would.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Scalar::deserialize(d)?;
        if !value.quoted {
            return Err(serde::de::Error::custom(SECRET_MUST_BE_TEXT));
        }
        Ok(value.text)
    }
}

/// A value handed on to a library as text (librdkafka's options): a string, or a number or a
/// boolean written plainly (`linger.ms: 5`). Kept out of logs like a [`Secret`], since some of
/// those options are secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalar {
    /// The value as text.
    pub(crate) text: Secret,
    /// Whether it was written as a string. A number or a boolean lost how it was written
    /// (`007` is 7), which a secret must not have: options that are secrets check this.
    pub(crate) quoted: bool,
}

impl<'de> Deserialize<'de> for Scalar {
    /// Any scalar; other shapes are refused without echoing the value.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn plain<E>(text: String) -> Result<Scalar, E> {
            Ok(Scalar {
                text: Secret(text),
                quoted: false,
            })
        }
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar {
                    text: Secret(v.to_owned()),
                    quoted: true,
                })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                plain(v.to_string())
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                plain(v.to_string())
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                plain(v.to_string())
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                plain(v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Scalar {
    fn schema_name() -> Cow<'static, str> {
        "Scalar".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": ["string", "number", "boolean"],
            "description": "Text, or a number or boolean written plainly; secrets must be quoted."
        })
    }
}

impl Secret {
    /// Wraps a value that must stay out of logs, metrics and error messages.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself: call only where it goes on the wire.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One validation failure: the key path and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where in the config: a key path such as `sinks.archive.fields.drop[1]`.
    pub key: String,
    /// What is wrong there, written for the operator who fixes it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Where a section's problems are reported: collects them with their full key path.
///
/// A section's validation adds problems at its own fields (`add`, `check`) and takes in what
/// the validation of a part below it found (`absorb`), so every problem of a config is reported
/// in one list, in the order the checks ran.
pub(crate) struct Problems<'a> {
    /// The section's key path, such as `sinks.<name>`; empty at the config's top level, where
    /// fields are keys of their own.
    prefix: Cow<'a, str>,
    /// What was found so far.
    pub(crate) found: Vec<Problem>,
}

impl<'a> Problems<'a> {
    /// Collects the problems of the section at `prefix`.
    pub(crate) fn new(prefix: impl Into<Cow<'a, str>>) -> Self {
        Problems {
            prefix: prefix.into(),
            found: Vec::new(),
        }
    }

    /// Collects the problems of a whole config: each field is a top-level key.
    pub(crate) fn top_level() -> Self {
        Problems::new("")
    }

    /// Records a problem at `<prefix>.<field>` (at `field` itself at the top level).
    pub(crate) fn add(&mut self, field: &str, message: impl Into<String>) {
        let key = if self.prefix.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.prefix)
        };
        self.found.push(Problem {
            key,
            message: message.into(),
        });
    }

    /// The value of a field's check, or `None` with its error recorded at `<prefix>.<field>`.
    pub(crate) fn check<T>(
        &mut self,
        field: &str,
        checked: Result<T, impl fmt::Display>,
    ) -> Option<T> {
        match checked {
            Ok(value) => Some(value),
            Err(e) => {
                self.add(field, e.to_string());
                None
            }
        }
    }

    /// The value of a part's own validation, or `None` with the problems it found recorded
    /// after those found so far, keyed as that validation keyed them.
    pub(crate) fn absorb<T>(&mut self, checked: Result<T, Vec<Problem>>) -> Option<T> {
        match checked {
            Ok(value) => Some(value),
            Err(found) => {
                self.found.extend(found);
                None
            }
        }
    }

    /// Takes in what a section below this one found, after the problems found so far.
    pub(crate) fn include(&mut self, section: Problems<'_>) {
        self.found.extend(section.found);
    }

    /// `Ok(value)` when nothing was found, else every problem.
    pub(crate) fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, Vec<Problem>> {
        if self.found.is_empty() {
            Ok(value())
        } else {
            Err(self.found)
        }
    }
}

/// One value or a list of them (a list means any-of in routes): `url: nats://a:4222` or
/// `url: [nats://a:4222, nats://b:4222]`.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single value written without a list.
    One(T),
    /// A list, possibly empty.
    Many(Vec<T>),
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for OneOrMany<T> {
    /// A list is `Many`, anything else `One`. A value that does not fit gets its own error
    /// (such as "put the secret in quotes"), where an untagged enum would only say that no
    /// variant matched.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Array(items) => items
                .into_iter()
                .map(T::deserialize)
                .collect::<Result<_, _>>()
                .map(OneOrMany::Many),
            one => T::deserialize(one).map(OneOrMany::One),
        }
        .map_err(D::Error::custom)
    }
}

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

impl<T> OneOrMany<T> {
    /// The values as a list, a single one as a list of one.
    pub(crate) fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Longest timeout or interval accepted: timers far in the future overflow `Instant`.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A duration written the human way in the config: `10s`, `500ms`, `2h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(
    /// The duration the text stands for.
    pub Duration,
);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a duration like `10s` or `500ms` ({e})"
                ))
            })
    }
}

impl serde::Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration such as `500ms`, `10s`, `5m` or `2h`.",
            "pattern": "^\\s*[0-9]+\\s*[a-zµ]+(\\s*[0-9]+\\s*[a-zµ]+)*\\s*$"
        })
    }
}

/// Numbers may arrive as strings when they come from `${VAR}` expansion.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

/// A non-negative integer written as a number or as text (`${VAR}` expansions are text).
pub(crate) fn number<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) => Ok(n),
        NumberOrText::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("`{t}` is not a non-negative integer"))),
    }
}

/// A number that may have a fraction (`0.5`), written as a number or as text (`${VAR}`
/// expansions are text). Range checks are the caller's, with the key's name.
pub(crate) fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    /// A number as YAML gives it, or text.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum FractionOrText {
        Number(f64),
        Text(String),
    }
    match FractionOrText::deserialize(d)? {
        FractionOrText::Number(n) => Ok(n),
        FractionOrText::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("`{t}` is not a number"))),
    }
}

/// [`number`] for an optional field: present means `Some`.
pub(crate) fn optional_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    number(d).map(Some)
}
