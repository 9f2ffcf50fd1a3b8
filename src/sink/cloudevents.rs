//! The CloudEvents bindings the sinks share: the envelope (binary or structured), the attributes
//! carried as headers in binary mode, the payload, and the percent-encoding of header values.
//! Each transport turns these into its own header type (`ce_` prefix for Kafka, `ce-` for NATS
//! and HTTP).

use bytes::Bytes;
use serde::Deserialize;

use crate::event::{AsciiBuf, Event};

/// How an event is laid out on the wire (CloudEvents "content modes").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Envelope {
    /// Chatwoot's data bytes as the payload, the CloudEvents attributes as headers: consumers
    /// that do not know CloudEvents still read plain Chatwoot JSON.
    #[default]
    Binary,
    /// The whole CloudEvent as one JSON object, for transports or consumers without headers.
    Structured,
}

/// `content-type` of a structured-mode payload.
pub(crate) const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// `content-type` of a binary-mode payload: Chatwoot's data is JSON.
pub(crate) const DATA_CONTENT_TYPE: &str = "application/json";

/// A CloudEvents attribute carried as a header in binary mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attribute {
    SpecVersion,
    Id,
    Source,
    Type,
    Time,
    Subject,
    ChatwootEvent,
    ChatwootToken,
    ChatwootAccount,
    ChatwootBackfill,
}

impl Attribute {
    /// The attribute's name, without a transport prefix.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Attribute::SpecVersion => "specversion",
            Attribute::Id => "id",
            Attribute::Source => "source",
            Attribute::Type => "type",
            Attribute::Time => "time",
            Attribute::Subject => "subject",
            Attribute::ChatwootEvent => "chatwootevent",
            Attribute::ChatwootToken => "chatwoottoken",
            Attribute::ChatwootAccount => "chatwootaccount",
            Attribute::ChatwootBackfill => "chatwootbackfill",
        }
    }

    /// The header name in the NATS and HTTP bindings (`ce-` prefix), as a constant: formatting
    /// it for every header of every event showed in profiles.
    pub(crate) const fn dashed(self) -> &'static str {
        match self {
            Attribute::SpecVersion => "ce-specversion",
            Attribute::Id => "ce-id",
            Attribute::Source => "ce-source",
            Attribute::Type => "ce-type",
            Attribute::Time => "ce-time",
            Attribute::Subject => "ce-subject",
            Attribute::ChatwootEvent => "ce-chatwootevent",
            Attribute::ChatwootToken => "ce-chatwoottoken",
            Attribute::ChatwootAccount => "ce-chatwootaccount",
            Attribute::ChatwootBackfill => "ce-chatwootbackfill",
        }
    }

    /// The header name in the Kafka binding (`ce_` prefix).
    pub(crate) const fn underscored(self) -> &'static str {
        match self {
            Attribute::SpecVersion => "ce_specversion",
            Attribute::Id => "ce_id",
            Attribute::Source => "ce_source",
            Attribute::Type => "ce_type",
            Attribute::Time => "ce_time",
            Attribute::Subject => "ce_subject",
            Attribute::ChatwootEvent => "ce_chatwootevent",
            Attribute::ChatwootToken => "ce_chatwoottoken",
            Attribute::ChatwootAccount => "ce_chatwootaccount",
            Attribute::ChatwootBackfill => "ce_chatwootbackfill",
        }
    }
}

/// Calls `f` with each CloudEvents attribute carried as a header in binary mode, in a fixed
/// order, values unencoded. Values are lent, not allocated: ids, times and numbers are formatted
/// on the stack, and each transport copies them into its own header type once. `datacontenttype`
/// is left to each binding: Kafka and HTTP use their own `content-type` header.
pub(crate) fn each_binary_attribute(event: &Event, mut f: impl FnMut(Attribute, &str)) {
    f(Attribute::SpecVersion, "1.0");
    f(Attribute::Id, event.id.hex().as_str());
    f(Attribute::Source, &event.source);
    let mut text = String::with_capacity(TYPE_PREFIX.len() + event.name.len());
    text.push_str(TYPE_PREFIX);
    text.push_str(&event.name);
    f(Attribute::Type, &text);
    f(Attribute::Time, event.time_text().as_str());
    if let Some(conversation) = event.keys.conversation_id {
        text.clear();
        text.push_str(SUBJECT_PREFIX);
        text.push_str(AsciiBuf::decimal(conversation).as_str());
        f(Attribute::Subject, &text);
    }
    f(Attribute::ChatwootEvent, &event.name);
    f(Attribute::ChatwootToken, &event.token);
    if let Some(account) = event.keys.account_id {
        f(
            Attribute::ChatwootAccount,
            AsciiBuf::decimal(account).as_str(),
        );
    }
    if event.backfill {
        f(Attribute::ChatwootBackfill, "true");
    }
}

/// Before the event name in CloudEvents `type` (as [`Event::ce_type`] writes it).
const TYPE_PREFIX: &str = "com.chatwoot.";

/// Before the conversation id in CloudEvents `subject` (as [`Event::subject`] writes it).
const SUBJECT_PREFIX: &str = "conversation/";

/// The CloudEvents attributes carried as headers in binary mode, in a fixed order, without the
/// transport prefix (`ce_` for Kafka, `ce-` for NATS and HTTP). `datacontenttype` is left to
/// each binding: Kafka and HTTP use their own `content-type` header.
pub fn binary_attributes(event: &Event) -> Vec<(&'static str, String)> {
    let mut attributes = Vec::with_capacity(10);
    each_binary_attribute(event, |attribute, value| {
        attributes.push((attribute.name(), value.to_owned()))
    });
    attributes
}

/// The payload for `envelope`: data bytes as received (shared with the event, not copied), or
/// the structured CloudEvent.
pub(crate) fn payload(event: &Event, envelope: Envelope) -> Bytes {
    match envelope {
        Envelope::Binary => event.data.bytes(),
        Envelope::Structured => {
            let mut out = Vec::with_capacity(event.data.get().len() + 512);
            event.write_structured(&mut out);
            Bytes::from(out)
        }
    }
}

/// Header values in the CloudEvents HTTP (and NATS) binding: space, `"`, `%` and anything
/// outside printable ASCII are percent-encoded, byte by byte of the UTF-8.
pub(crate) fn percent_encode_header(value: &str) -> std::borrow::Cow<'_, str> {
    let keep = |b: u8| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%';
    if value.bytes().all(keep) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for b in value.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn header_values_are_percent_encoded_as_the_http_binding_says() {
        assert_eq!(percent_encode_header("plain-ASCII/1.0"), "plain-ASCII/1.0");
        assert_eq!(percent_encode_header("a b\"c%d"), "a%20b%22c%25d");
        assert_eq!(percent_encode_header("café\n"), "caf%C3%A9%0A");
    }

    #[test]
    fn binary_attributes_are_the_events_own_texts() {
        let mut e = Event::for_test(
            "message.created",
            "agent",
            r#"{"account_id":3,"conversation_id":7}"#,
        );
        e.id = crate::event::EventId(0xabc);
        e.received_at += Duration::new(1_781_964_126, 318_123_456);
        let expected = [
            ("specversion", "1.0".to_owned()),
            ("id", format!("{:032x}", 0xabc)),
            ("source", e.source.to_string()),
            ("type", e.ce_type()),
            (
                "time",
                humantime::format_rfc3339_micros(e.received_at).to_string(),
            ),
            ("subject", e.subject().unwrap()),
            ("chatwootevent", e.name.to_string()),
            ("chatwoottoken", e.token.to_string()),
            ("chatwootaccount", "3".to_owned()),
        ];
        assert_eq!(binary_attributes(&e), expected);
        let mut structured = Vec::new();
        e.write_structured(&mut structured);
        assert!(!String::from_utf8_lossy(&structured).contains("chatwootbackfill"));
        e.backfill = true;
        let mut marked = expected.to_vec();
        marked.push(("chatwootbackfill", "true".to_owned()));
        assert_eq!(binary_attributes(&e), marked);
        structured.clear();
        e.write_structured(&mut structured);
        let value: serde_json::Value = serde_json::from_slice(&structured).unwrap();
        assert_eq!(value["chatwootbackfill"], true);
        each_binary_attribute(&e, |attribute, _| {
            assert_eq!(attribute.dashed(), format!("ce-{}", attribute.name()));
            assert_eq!(attribute.underscored(), format!("ce_{}", attribute.name()));
        });
    }

    #[test]
    fn binary_attributes_include_subject_and_account_only_when_known() {
        let e = Event::for_test(
            "message.created",
            "agent",
            r#"{"account_id":3,"conversation_id":7}"#,
        );
        let names: Vec<&str> = binary_attributes(&e).iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "specversion",
                "id",
                "source",
                "type",
                "time",
                "subject",
                "chatwootevent",
                "chatwoottoken",
                "chatwootaccount"
            ]
        );
        let e = Event::for_test("presence.update", "agent", r#"{"users":{}}"#);
        let names: Vec<&str> = binary_attributes(&e).iter().map(|(n, _)| *n).collect();
        assert!(!names.contains(&"subject") && !names.contains(&"chatwootaccount"));
    }
}
