//! Templates for topics, subjects, keys and URL paths: `chatwoot.{event}`, `{data.sender.id|anon}`.
//!
//! A template is compiled once when the config is loaded, so a typo in a field name is a config
//! error with its key path rather than a failure per event. Rendering never panics and never
//! yields an empty value: a field the event does not have (and no `|fallback`) is an error the
//! sink turns into a permanent outcome for that one event.

use std::borrow::Cow;
use std::fmt;

use crate::event::Event;
use crate::route::jsonpath::{Found, JsonPath};

/// A compiled template.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Template {
    /// What it names (`topic`, `subject`, `key`, `url`), for error messages.
    what: &'static str,
    /// The text as written, for Debug output and error messages.
    source: String,
    /// Literals and fields in order.
    parts: Vec<Part>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.source)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field {
        /// Which value to insert.
        field: Field,
        /// The placeholder as written without braces and fallback, for error messages.
        name: String,
        /// Inserted when the event has no value for `field`.
        fallback: Option<String>,
    },
}

/// The values a template can insert.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Event,
    AccountId,
    ConversationId,
    InboxId,
    Token,
    Id,
    /// A dotted path into Chatwoot's `data` object.
    Data(JsonPath),
}

/// Why a template text cannot be compiled; the caller prefixes the key path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error("unknown template field {{{0}}} (known: event, account_id, conversation_id, inbox_id, token, id, data.<path>)")]
    UnknownField(String),
    #[error("unbalanced braces in template `{0}`")]
    Unbalanced(String),
    #[error("template is empty")]
    Empty,
}

/// An event lacks a value the template needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} template {{{name}}}: event {event} has no {name}")]
pub(crate) struct MissingValue {
    /// Which template (`topic`, `subject`, ...).
    pub(crate) what: &'static str,
    /// The field as written.
    pub(crate) name: String,
    /// The event's name, so the operator can tell which kind of event lacks it.
    pub(crate) event: String,
}

impl Template {
    /// Compiles `text`; `what` names the template in later error messages.
    pub(crate) fn compile(what: &'static str, text: &str) -> Result<Template, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Literal(rest.to_owned()));
                    break;
                }
                Some(at) if rest.as_bytes()[at] == b'}' => {
                    return Err(TemplateError::Unbalanced(text.to_owned()))
                }
                Some(at) => {
                    if at > 0 {
                        parts.push(Part::Literal(rest[..at].to_owned()));
                    }
                    let inner = &rest[at + 1..];
                    let end = inner
                        .find(['{', '}'])
                        .filter(|&end| inner.as_bytes()[end] == b'}')
                        .ok_or_else(|| TemplateError::Unbalanced(text.to_owned()))?;
                    parts.push(parse_field(&inner[..end])?);
                    rest = &inner[end + 1..];
                }
            }
        }
        Ok(Template {
            what,
            source: text.to_owned(),
            parts,
        })
    }

    /// The text as written.
    pub(crate) fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the template inserts any value (a constant topic needs no rendering).
    pub(crate) fn has_fields(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Field { .. }))
    }

    /// Renders for `event`, passing each inserted value through `clean` (which makes it safe
    /// where it lands: a subject token, a topic name, a URL path). Literals are not cleaned:
    /// they were checked when the config was loaded.
    pub(crate) fn render(
        &self,
        event: &Event,
        clean: impl Fn(&str) -> Cow<'_, str>,
    ) -> Result<String, MissingValue> {
        self.render_with(event, &clean, &clean)
    }

    /// [`Template::render`] with the event name cleaned by `clean_event` and every other value
    /// by `clean_value`: a NATS subject keeps the dots of `message.created` as subject tokens,
    /// but not those of a value taken from `data`.
    pub(crate) fn render_with(
        &self,
        event: &Event,
        clean_event: &dyn Fn(&str) -> Cow<'_, str>,
        clean_value: &dyn Fn(&str) -> Cow<'_, str>,
    ) -> Result<String, MissingValue> {
        let mut out = String::with_capacity(self.source.len() + 16);
        // Parsed at most once per render, and only when a `data.` field asks for it.
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Field {
                    field,
                    name,
                    fallback,
                } => {
                    let value = lookup(field, event).filter(|v| !v.is_empty());
                    let Some(value) = value.or_else(|| fallback.clone()) else {
                        return Err(MissingValue {
                            what: self.what,
                            name: name.clone(),
                            event: event.name.to_string(),
                        });
                    };
                    let clean = if *field == Field::Event {
                        clean_event
                    } else {
                        clean_value
                    };
                    out.push_str(&clean(&value));
                }
            }
        }
        Ok(out)
    }

    /// A NATS subject filter matching every subject this template can render: a token holding
    /// a field becomes `*`, or `>` when it is the last token or holds the event name (which
    /// [`nats_event`] may render as several tokens).
    pub(crate) fn nats_filter(&self) -> String {
        let tokens: Vec<&str> = self.source.split('.').collect();
        // Split on dots of the source; a `.` inside `{data.a.b}` must not split a token, so
        // re-join pieces while braces are open.
        let mut joined: Vec<String> = Vec::new();
        let mut open = 0i32;
        for token in tokens {
            if open > 0 {
                let last = joined.last_mut().expect("an open brace started a token");
                last.push('.');
                last.push_str(token);
            } else {
                joined.push(token.to_owned());
            }
            open += token.matches('{').count() as i32 - token.matches('}').count() as i32;
        }
        let mut filter: Vec<String> = Vec::with_capacity(joined.len());
        let count = joined.len();
        for (i, token) in joined.into_iter().enumerate() {
            if !token.contains('{') {
                filter.push(token);
            } else if i + 1 == count || token.contains("{event") {
                // The last token, or the event name, which may be several tokens: all the rest.
                filter.push(">".to_owned());
                break;
            } else {
                filter.push("*".to_owned());
            }
        }
        filter.join(".")
    }

    /// The literal text before the first field: for URLs, where the scheme and host must be.
    pub(crate) fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Literal(text)) => text,
            _ => "",
        }
    }

    /// Renders with every field replaced by `filler`, to check the shape of the result at
    /// config load.
    pub(crate) fn render_sample(&self, filler: &str) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(text) => text.as_str(),
                Part::Field { .. } => filler,
            })
            .collect()
    }

    /// The literal parts, for checks of characters that would break the target.
    pub(crate) fn literals(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Literal(text) => Some(text.as_str()),
            Part::Field { .. } => None,
        })
    }
}

fn parse_field(inner: &str) -> Result<Part, TemplateError> {
    let (name, fallback) = match inner.split_once('|') {
        Some((name, fallback)) => (name.trim(), Some(fallback.to_owned())),
        None => (inner.trim(), None),
    };
    let field = match name {
        "event" => Field::Event,
        "account_id" => Field::AccountId,
        "conversation_id" => Field::ConversationId,
        "inbox_id" => Field::InboxId,
        "token" => Field::Token,
        "id" => Field::Id,
        _ => match name.strip_prefix("data.").map(JsonPath::parse) {
            Some(Ok(path)) => Field::Data(path),
            _ => return Err(TemplateError::UnknownField(name.to_owned())),
        },
    };
    Ok(Part::Field {
        field,
        name: name.to_owned(),
        fallback,
    })
}

fn lookup(field: &Field, event: &Event) -> Option<String> {
    match field {
        Field::Event => Some(event.name.to_string()),
        Field::AccountId => event.keys.account_id.map(|v| v.to_string()),
        Field::ConversationId => event.keys.conversation_id.map(|v| v.to_string()),
        Field::InboxId => event.keys.inbox_id.map(|v| v.to_string()),
        Field::Token => Some(event.token.to_string()),
        Field::Id => Some(event.id.to_string()),
        // Read straight from the raw bytes, like route conditions: no tree per event.
        Field::Data(path) => match path.lookup(event.data.get())? {
            Found::Str(s) => Some(s.into_owned()),
            Found::Unsigned(n) => Some(n.to_string()),
            Found::Signed(n) => Some(n.to_string()),
            Found::Float(n) => Some(n.to_string()),
            Found::Bool(b) => Some(b.to_string()),
            Found::Null | Found::Object | Found::Array => None,
        },
    }
}

/// An event name as NATS subject tokens: a name of lowercase words, digits and `_` joined by
/// single dots (every name Chatwoot sends) keeps its dots, so `chatwoot.{event}` gives
/// `chatwoot.message.created` and `chatwoot.message.>` subscribes to every message event. Any
/// other name becomes one token, as [`nats_token`] makes it.
pub(crate) fn nats_event(name: &str) -> Cow<'_, str> {
    let word = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    if name.split('.').all(word) {
        Cow::Borrowed(name)
    } else {
        nats_token(name)
    }
}

/// Keeps a value one NATS subject token: space, `.`, `*`, `>` (and other whitespace) become `_`.
pub(crate) fn nats_token(value: &str) -> Cow<'_, str> {
    let bad = |c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>');
    if value.contains(bad) {
        Cow::Owned(value.replace(bad, "_"))
    } else {
        Cow::Borrowed(value)
    }
}

/// Keeps a value legal in a Kafka topic name: anything outside `[A-Za-z0-9._-]` becomes `_`.
pub(crate) fn kafka_topic(value: &str) -> Cow<'_, str> {
    let bad = |c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if value.contains(bad) {
        Cow::Owned(value.replace(bad, "_"))
    } else {
        Cow::Borrowed(value)
    }
}

/// Inserts a value as one URL path segment: anything but unreserved characters is
/// percent-encoded, so a value can neither add segments nor a query.
pub(crate) fn url_segment(value: &str) -> Cow<'_, str> {
    // `.` and `..` are unreserved but mean "here" and "up" in a path: a value taken from data
    // (a contact's name) must not move the request to another path on the host.
    if value == "." || value == ".." {
        return Cow::Owned(value.replace('.', "%2E"));
    }
    let keep = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    if value.bytes().all(keep) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(out)
}

/// Inserts a value unchanged (Kafka keys are bytes; anything goes).
pub(crate) fn verbatim(value: &str) -> Cow<'_, str> {
    Cow::Borrowed(value)
}

#[cfg(test)]
mod dot_tests {
    use super::*;

    #[test]
    fn dot_segments_cannot_climb_the_path() {
        assert_eq!(url_segment(".."), "%2E%2E");
        assert_eq!(url_segment("."), "%2E");
        assert_eq!(url_segment("a.b"), "a.b");
        assert_eq!(url_segment("../x"), "..%2Fx");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;

    fn message() -> Event {
        let mut e = Event::for_test(
            "message.created",
            "agent",
            r#"{"id":5,"account_id":1,"inbox_id":2,"conversation_id":87,"sender":{"name":"Ana B.","id":9,"bot":false,"tags":["a"],"none":null},"items":["x","y"]}"#,
        );
        e.id = EventId(0xff);
        e
    }

    fn render(text: &str, event: &Event) -> Result<String, MissingValue> {
        Template::compile("topic", text)
            .unwrap()
            .render(event, verbatim)
    }

    #[test]
    fn renders_every_field_kind() {
        let e = message();
        assert_eq!(
            render(
                "{event}/{account_id}/{conversation_id}/{inbox_id}/{token}/{id}",
                &e
            )
            .unwrap(),
            "message.created/1/87/2/agent/000000000000000000000000000000ff"
        );
        assert_eq!(
            render("{data.sender.name}|{data.sender.id}|{data.sender.bot}", &e).unwrap(),
            "Ana B.|9|false"
        );
        assert_eq!(render("{data.items.1}", &e).unwrap(), "y");
        assert_eq!(render("plain", &e).unwrap(), "plain");
    }

    #[test]
    fn missing_values_use_fallback_or_fail_clearly() {
        let contact = Event::for_test("contact.updated", "agent", r#"{"id":4,"account_id":1}"#);
        let err = render("chatwoot.{conversation_id}", &contact).unwrap_err();
        assert_eq!(
            err.to_string(),
            "topic template {conversation_id}: event contact.updated has no conversation_id"
        );
        assert_eq!(
            render("c.{conversation_id|none}", &contact).unwrap(),
            "c.none"
        );
        let e = message();
        // Objects, arrays and null count as missing; so does an absent path.
        for path in [
            "data.sender",
            "data.sender.tags",
            "data.sender.none",
            "data.nope.x",
        ] {
            let err = render(&format!("{{{path}}}"), &e).unwrap_err();
            assert_eq!(err.name, path);
            assert_eq!(render(&format!("{{{path}|dflt}}"), &e).unwrap(), "dflt");
        }
        // Data that is not an object at all renders as missing, not as a panic.
        let odd = Event::for_test("x", "agent", "[1,2]");
        assert!(render("{data.a}", &odd).is_err());
    }

    #[test]
    fn compile_errors_name_the_field() {
        assert_eq!(
            Template::compile("topic", "chatwoot.{acount_id}")
                .unwrap_err()
                .to_string()
                .split(" (")
                .next()
                .unwrap(),
            "unknown template field {acount_id}"
        );
        for bad in [
            "a{event",
            "a}b",
            "{{event}}",
            "{event}}",
            "{data.}",
            "{data..x}",
        ] {
            assert!(Template::compile("topic", bad).is_err(), "{bad}");
        }
        assert_eq!(Template::compile("topic", ""), Err(TemplateError::Empty));
    }

    #[test]
    fn event_names_keep_their_dots_only_when_every_token_is_plain() {
        assert_eq!(nats_event("message.created"), "message.created");
        assert_eq!(
            nats_event("conversation.typing_on"),
            "conversation.typing_on"
        );
        assert_eq!(nats_event("presence.update"), "presence.update");
        // Anything else is one token, with no wildcard, space or empty token.
        assert_eq!(nats_event("message..created"), "message__created");
        assert_eq!(nats_event(".message"), "_message");
        assert_eq!(nats_event("message.>"), "message__");
        assert_eq!(nats_event("Message.Created"), "Message_Created");
        assert_eq!(nats_event("a b.c"), "a_b_c");
        assert_eq!(nats_event(""), "");
    }

    #[test]
    fn cleaners_keep_targets_valid() {
        let e = message();
        let subject = Template::compile("subject", "chatwoot.{data.sender.name}.{event}")
            .unwrap()
            .render_with(&e, &nats_event, &nats_token)
            .unwrap();
        // The event name keeps its dots as subject tokens; a value from data stays one token.
        assert_eq!(subject, "chatwoot.Ana_B_.message.created");
        assert_eq!(nats_token("a*b>c d\te"), "a_b_c_d_e");
        let topic = Template::compile("topic", "cw.{data.sender.name}")
            .unwrap()
            .render(&e, kafka_topic)
            .unwrap();
        assert_eq!(topic, "cw.Ana_B.");
        assert_eq!(kafka_topic("é/x"), "__x");
        assert_eq!(url_segment("a b/c?d"), "a%20b%2Fc%3Fd");
    }

    #[test]
    fn nats_filters_from_templates() {
        let t = |s| Template::compile("subject", s).unwrap().nats_filter();
        assert_eq!(t("chatwoot.{account_id}.{event}"), "chatwoot.*.>");
        assert_eq!(t("chatwoot.events"), "chatwoot.events");
        assert_eq!(t("cw.{data.sender.id}.x"), "cw.*.x");
        // The event name may be several tokens (`message.created`): everything from it on.
        assert_eq!(t("cw.acct-{account_id}.{event}.v1"), "cw.*.>");
        assert_eq!(t("chatwoot.{event}.{account_id}"), "chatwoot.>");
        assert_eq!(t("chatwoot.{token}.{event}"), "chatwoot.*.>");
    }
}
