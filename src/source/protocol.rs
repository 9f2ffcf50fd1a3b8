//! The ActionCable v1 JSON protocol as Chatwoot speaks it: server frames in, commands out.
//! See `shared/chatwoot/PROTOCOL.md` for what real Chatwoot does beyond Rails' documentation.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::source::settings::Identity;
use crate::types::Secret;

/// The subprotocol offered in the handshake.
pub const SUBPROTOCOL: &str = "actioncable-v1-json";

/// A frame from the server, borrowing from the text it was read from.
#[derive(Debug, PartialEq)]
pub enum ServerFrame<'a> {
    /// The greeting, once per connection: subscribe after it.
    Welcome,
    /// The heartbeat, every 3 s.
    Ping,
    /// `confirm_subscription`: the subscription is registered.
    Confirm {
        /// The subscription it confirms.
        identifier: Cow<'a, str>,
    },
    /// `reject_subscription`: the server refused the subscription.
    Reject {
        /// The subscription it refuses.
        identifier: Cow<'a, str>,
    },
    /// The server is closing the connection.
    Disconnect {
        /// Why, in the server's words (`server_restart`, `unauthorized`, ...).
        reason: Option<Cow<'a, str>>,
        /// Whether the server invites the client back at once (absent means yes).
        reconnect: bool,
    },
    /// A broadcast on a subscription. `data` is the raw JSON object.
    Message {
        /// The subscription it was broadcast on.
        identifier: Cow<'a, str>,
        /// Chatwoot's event name (`message.created`, ...).
        event: Cow<'a, str>,
        /// The event's payload, as the server wrote it.
        data: Data<'a>,
    },
    /// A well-formed frame of a type this client does not act on.
    Other {
        /// Its `type`.
        kind: Cow<'a, str>,
    },
}

/// An event's raw `data` JSON, borrowed from the frame; compares by its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Data<'a>(pub &'a RawValue);

impl PartialEq for Data<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl std::ops::Deref for Data<'_> {
    type Target = RawValue;
    fn deref(&self) -> &RawValue {
        self.0
    }
}

/// Why a frame could not be decoded. Carries no frame content: frames hold tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not JSON, or not an object; the parser's class and position only.
    #[error("frame is not a JSON object: {0}")]
    NotJson(String),
    /// A frame that needs an `identifier` has none.
    #[error("message frame has no `identifier`")]
    NoIdentifier,
    /// `message` is not an object with a string `event` and an object `data`.
    #[error(
        "message frame's `message` is not an object with a string `event` and an object `data`"
    )]
    BadMessage,
    /// Neither `type` nor `message`: not an ActionCable frame.
    #[error("frame has neither `type` nor `message`")]
    Unrecognized,
}

/// Every field any server frame has, as read off the wire.
#[derive(Deserialize)]
struct RawFrame<'a> {
    /// `type`: welcome, ping, confirm/reject_subscription, disconnect; absent on broadcasts.
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    /// The subscription a confirm, reject or broadcast is about.
    #[serde(borrow, default)]
    identifier: Option<Cow<'a, str>>,
    /// A broadcast's body, read in the same pass as the frame so `data` is scanned once.
    #[serde(borrow, default)]
    message: Option<RawMessage<'a>>,
    /// A disconnect's reason.
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
    /// A disconnect's invitation to come back.
    #[serde(default)]
    reconnect: Option<bool>,
}

/// A frame's `message`. A shape other than an object with a string `event` and a `data` reads as
/// `Bad` instead of failing the frame, so that a frame that is JSON with a bad `message` stays a
/// different error from a frame that is not JSON.
enum RawMessage<'a> {
    /// An object with a string `event` and a `data`.
    Good {
        /// The event name.
        event: Cow<'a, str>,
        /// The payload, unparsed.
        data: &'a RawValue,
    },
    /// Any other shape.
    Bad,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawMessage<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MessageVisitor(PhantomData))
    }
}

/// Reads a [`RawMessage`] borrowing from input that lives for `'a`.
struct MessageVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for MessageVisitor<'a> {
    type Value = RawMessage<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an ActionCable message")
    }

    /// As a derived struct would read it: known keys once each, others skipped.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut event, mut data, mut duplicate) = (None, None, false);
        while let Some(key) = map.next_key::<MessageKey>()? {
            match key {
                MessageKey::Event => {
                    duplicate |= event.is_some();
                    event = Some(map.next_value::<MaybeStr<'a>>()?.0);
                }
                MessageKey::Data => {
                    duplicate |= data.is_some();
                    data = Some(map.next_value::<&'a RawValue>()?);
                }
                MessageKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(match (event, data, duplicate) {
            (Some(Some(event)), Some(data), false) => RawMessage::Good { event, data },
            _ => RawMessage::Bad,
        })
    }

    /// A derived struct also reads `[event, data]`; kept so such frames decode as before.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let Some(MaybeStr(event)) = seq.next_element::<MaybeStr<'a>>()? else {
            return Ok(RawMessage::Bad);
        };
        let Some(data) = seq.next_element::<&'a RawValue>()? else {
            return Ok(RawMessage::Bad);
        };
        let mut extra = false;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            extra = true;
        }
        Ok(match (event, extra) {
            (Some(event), false) => RawMessage::Good { event, data },
            _ => RawMessage::Bad,
        })
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(RawMessage::Bad)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(RawMessage::Bad)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(RawMessage::Bad)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(RawMessage::Bad)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(RawMessage::Bad)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(RawMessage::Bad)
    }
}

/// A key of `message`, told apart without allocating (escaped keys included).
enum MessageKey {
    Event,
    Data,
    Other,
}

impl<'de> Deserialize<'de> for MessageKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MessageKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MessageKey, E> {
                Ok(match v {
                    "event" => MessageKey::Event,
                    "data" => MessageKey::Data,
                    _ => MessageKey::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// A string, or `None` for any other JSON value (consumed, not an error).
struct MaybeStr<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for MaybeStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = MaybeStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MaybeStr(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MaybeStr(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(MaybeStr(Some(Cow::Owned(v))))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeStr(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// Decodes one text frame.
pub fn decode(text: &str) -> Result<ServerFrame<'_>, FrameError> {
    let frame: RawFrame<'_> =
        serde_json::from_str(text).map_err(|e| FrameError::NotJson(e.classify_message()))?;
    match frame.kind.as_deref() {
        Some("welcome") => return Ok(ServerFrame::Welcome),
        Some("ping") => return Ok(ServerFrame::Ping),
        Some("confirm_subscription") => {
            return Ok(ServerFrame::Confirm {
                identifier: frame.identifier.ok_or(FrameError::NoIdentifier)?,
            })
        }
        Some("reject_subscription") => {
            return Ok(ServerFrame::Reject {
                identifier: frame.identifier.ok_or(FrameError::NoIdentifier)?,
            })
        }
        Some("disconnect") => {
            return Ok(ServerFrame::Disconnect {
                reason: frame.reason,
                // Rails' client reconnects unless told not to.
                reconnect: frame.reconnect.unwrap_or(true),
            });
        }
        _ => {}
    }
    if let Some(message) = frame.message {
        let identifier = frame.identifier.ok_or(FrameError::NoIdentifier)?;
        let RawMessage::Good { event, data } = message else {
            return Err(FrameError::BadMessage);
        };
        if !data.get().starts_with('{') {
            return Err(FrameError::BadMessage);
        }
        return Ok(ServerFrame::Message {
            identifier,
            event,
            data: Data(data),
        });
    }
    match frame.kind {
        Some(kind) => Ok(ServerFrame::Other { kind }),
        None => Err(FrameError::Unrecognized),
    }
}

/// An error message that never quotes the input (frames hold tokens).
trait ClassifyMessage {
    /// The error's class and position.
    fn classify_message(&self) -> String;
}

impl ClassifyMessage for serde_json::Error {
    /// serde_json's messages can quote input; keep only the class and position.
    fn classify_message(&self) -> String {
        let class = match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected shape",
            serde_json::error::Category::Eof => "truncated",
        };
        format!("{class} at line {} column {}", self.line(), self.column())
    }
}

/// The subscription identifier, as Chatwoot's own clients write it. The server echoes this exact
/// string in every frame of the subscription.
pub(crate) fn identifier(token: &Secret, identity: &Identity) -> String {
    let token = serde_json::to_string(token.expose()).expect("a string serializes");
    match identity {
        Identity::Agent {
            account_id,
            user_id,
        } => format!(
            r#"{{"channel":"RoomChannel","pubsub_token":{token},"account_id":{account_id},"user_id":{user_id}}}"#
        ),
        Identity::Contact => format!(r#"{{"channel":"RoomChannel","pubsub_token":{token}}}"#),
    }
}

/// A command frame without data.
fn command(command: &str, identifier: &str) -> String {
    serde_json::json!({ "command": command, "identifier": identifier }).to_string()
}

/// The `subscribe` command for a subscription.
pub(crate) fn subscribe(identifier: &str) -> String {
    command("subscribe", identifier)
}

/// The `unsubscribe` command, which drops a subscription on the server.
pub(crate) fn unsubscribe(identifier: &str) -> String {
    command("unsubscribe", identifier)
}

/// Keeps an agent shown online. `data` is a JSON string inside the JSON frame.
pub(crate) fn update_presence(identifier: &str) -> String {
    serde_json::json!({
        "command": "message",
        "identifier": identifier,
        "data": r#"{"action":"update_presence"}"#,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = r#"{"channel":"RoomChannel","pubsub_token":"EryZgQq23hewM5R1THChWK4g","account_id":1,"user_id":3}"#;

    #[test]
    fn identifier_matches_what_chatwoot_clients_send() {
        let agent = identifier(
            &Secret::new("EryZgQq23hewM5R1THChWK4g"),
            &Identity::Agent {
                account_id: 1,
                user_id: 3,
            },
        );
        assert_eq!(agent, ID);
        let contact = identifier(&Secret::new("abc"), &Identity::Contact);
        assert_eq!(contact, r#"{"channel":"RoomChannel","pubsub_token":"abc"}"#);
    }

    #[test]
    fn commands_match_the_protocol_fixture() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../fixtures/_protocol_frames.json")).unwrap();
        let sent = &fixture["client_to_server"];
        let parse = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap();
        assert_eq!(parse(subscribe(ID)), sent[0]);
        assert_eq!(parse(update_presence(ID)), sent[1]);
        assert_eq!(parse(unsubscribe(ID)), sent[2]);
    }

    #[test]
    fn decodes_every_protocol_frame_of_the_fixture() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../fixtures/_protocol_frames.json")).unwrap();
        let frames: Vec<String> = fixture["server_to_client"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(decode(&frames[0]), Ok(ServerFrame::Welcome));
        assert_eq!(decode(&frames[1]), Ok(ServerFrame::Ping));
        assert_eq!(
            decode(&frames[2]),
            Ok(ServerFrame::Confirm {
                identifier: ID.into()
            })
        );
        assert_eq!(
            decode(&frames[3]),
            Ok(ServerFrame::Reject {
                identifier: ID.into()
            })
        );
        assert_eq!(
            decode(&frames[4]),
            Ok(ServerFrame::Disconnect {
                reason: Some("server_restart".into()),
                reconnect: true
            })
        );
        assert_eq!(
            decode(&frames[5]),
            Ok(ServerFrame::Disconnect {
                reason: Some("unauthorized".into()),
                reconnect: false
            })
        );
    }

    #[test]
    fn decodes_every_event_fixture_with_exact_data_bytes() {
        for (name, text) in crate::mock::fixtures::ALL {
            let frame = decode(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let ServerFrame::Message {
                identifier,
                event,
                data,
            } = frame
            else {
                panic!("{name}: not a message frame");
            };
            assert_eq!(identifier, ID, "{name}");
            assert_eq!(&*event, *name, "{name}");
            let original: serde_json::Value = serde_json::from_str(text).unwrap();
            let reparsed: serde_json::Value = serde_json::from_str(data.get()).unwrap();
            assert_eq!(reparsed, original["message"]["data"], "{name}");
            assert!(
                text.contains(data.get()),
                "{name}: data bytes are a slice of the frame"
            );
        }
    }

    /// The two-pass decoder this one replaced: `message` as raw JSON, then parsed again.
    fn two_pass(text: &str) -> Result<(Cow<'_, str>, String), FrameError> {
        #[derive(Deserialize)]
        struct Frame<'a> {
            #[serde(borrow, default)]
            identifier: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            message: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct Message<'a> {
            #[serde(borrow)]
            event: Cow<'a, str>,
            #[serde(borrow)]
            data: &'a RawValue,
        }
        let frame: Frame<'_> =
            serde_json::from_str(text).map_err(|e| FrameError::NotJson(e.classify_message()))?;
        let message = frame.message.ok_or(FrameError::Unrecognized)?;
        let identifier = frame.identifier.ok_or(FrameError::NoIdentifier)?;
        let message: Message<'_> =
            serde_json::from_str(message.get()).map_err(|_| FrameError::BadMessage)?;
        if !message.data.get().starts_with('{') {
            return Err(FrameError::BadMessage);
        }
        Ok((
            message.event,
            format!("{identifier}|{}", message.data.get()),
        ))
    }

    #[test]
    fn one_pass_reads_message_shapes_as_the_two_pass_decoder_did() {
        let frames = [
            r#"{"identifier":"i","message":{"event":"e","data":{"a":1}}}"#,
            r#"{"identifier":"i","message":{"data":{"a":[1,{}]},"x":[{"y":null}],"event":"e"}}"#,
            r#"{"identifier":"i","message":{"ev\u0065nt":"\u0065","d\u0061ta":{}}}"#,
            r#"{"identifier":"i","message":{"event":"e","data":{},"event":"f"}}"#,
            r#"{"identifier":"i","message":{"event":"e","data":{},"data":{}}}"#,
            r#"{"identifier":"i","message":{"event":"e"}}"#,
            r#"{"identifier":"i","message":{"data":{}}}"#,
            r#"{"identifier":"i","message":{"event":null,"data":{}}}"#,
            r#"{"identifier":"i","message":{"event":["e"],"data":{}}}"#,
            r#"{"identifier":"i","message":{"event":{"e":1},"data":{}}}"#,
            r#"{"identifier":"i","message":{"event":"e","data":"{}"}}"#,
            r#"{"identifier":"i","message":{"event":"e","data":null}}"#,
            r#"{"identifier":"i","message":["e",{"a":1}]}"#,
            r#"{"identifier":"i","message":["e",{"a":1},2]}"#,
            r#"{"identifier":"i","message":["e"]}"#,
            r#"{"identifier":"i","message":[]}"#,
            r#"{"identifier":"i","message":[1,{}]}"#,
            r#"{"identifier":"i","message":"text"}"#,
            r#"{"identifier":"i","message":12}"#,
            r#"{"identifier":"i","message":-1.5}"#,
            r#"{"identifier":"i","message":true}"#,
            r#"{"identifier":"i","message":null}"#,
            r#"{"identifier":"i","message":{"event":"e","data":{"a":}}}"#,
            r#"{"identifier":"i","message":{"event":"e","data":{}},"message":{}}"#,
            r#"{"message":{"event":"e","data":{}}}"#,
            r#"{"message":7}"#,
        ];
        let fixtures = crate::mock::fixtures::ALL.iter().map(|(_, f)| *f);
        for text in frames.into_iter().chain(fixtures) {
            let now = match decode(text) {
                Ok(ServerFrame::Message {
                    identifier,
                    event,
                    data,
                }) => Ok((event, format!("{identifier}|{}", data.get()))),
                Ok(other) => panic!("{text}: {other:?}"),
                Err(e) => Err(e),
            };
            assert_eq!(now, two_pass(text), "{text}");
        }
    }

    #[test]
    fn malformed_frames_are_errors_without_content() {
        let secret_frame =
            r#"{"identifier":"{\"pubsub_token\":\"SECRET\"}","message":{"event":"x","data":[1]}}"#;
        let err = decode(secret_frame).unwrap_err();
        assert_eq!(err, FrameError::BadMessage);
        assert!(!err.to_string().contains("SECRET"));
        let err = decode(r#"{"pubsub_token":"SECRET""#).unwrap_err();
        assert!(matches!(err, FrameError::NotJson(_)));
        assert!(!err.to_string().contains("SECRET"));
        assert_eq!(decode("{}"), Err(FrameError::Unrecognized));
        assert_eq!(
            decode(r#"{"message":{"event":"x","data":{}}}"#),
            Err(FrameError::NoIdentifier)
        );
        assert_eq!(
            decode(r#"{"identifier":"i","message":{"event":7,"data":{}}}"#),
            Err(FrameError::BadMessage)
        );
        assert!(decode("not json at all").is_err());
        assert_eq!(
            decode(r#"{"type":"something_new"}"#),
            Ok(ServerFrame::Other {
                kind: "something_new".into()
            })
        );
    }
}
