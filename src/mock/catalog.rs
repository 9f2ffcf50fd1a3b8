//! Every event name Chatwoot 4.x broadcasts on the cable, who receives each, and a payload of
//! the recorded shape for each.
//!
//! Who: Chatwoot's `ActionCableListener` (app/listeners/action_cable_listener.rb) sends
//! conversation and message events to `user_tokens(account, conversation.inbox.members)`, the
//! tokens of the inbox's members and the account's administrators (here: the account's users
//! whose [`super::MockRole`] sees conversations, as every mock conversation is in one inbox) and,
//! except for private notes, to the contact's token; `contact.*` and `account.cache_invalidated` to `account_<id>`, the stream
//! only agent subscriptions join; notifications and mentions to the one user; `presence.update`
//! to the subscriber's own token (see identity.rs and connection.rs).
//!
//! What: the recorded fixtures where there is one; the others are built from the recording of the
//! same payload method in Chatwoot (`conversation.push_event_data` for the conversation events,
//! `contact.push_event_data` for `contact.*`, the typing payload for `typing_off`, the
//! notification payload for `notification.*`), as the listener builds them.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::events::templates;
use super::identity::{account_stream, Directory};

/// Every event name the mock emits: what Chatwoot 4.x's community edition broadcasts.
pub const EVENT_NAMES: &[&str] = &[
    "message.created",
    "message.updated",
    "first.reply.created",
    "conversation.created",
    "conversation.read",
    "conversation.status_changed",
    "conversation.updated",
    "conversation.contact_changed",
    "conversation.mentioned",
    "conversation.typing_on",
    "conversation.typing_off",
    "conversation.unread_count_changed",
    "assignee.changed",
    "team.changed",
    "contact.created",
    "contact.updated",
    "contact.merged",
    "contact.deleted",
    "notification.created",
    "notification.updated",
    "notification.deleted",
    "account.cache_invalidated",
    "presence.update",
];

/// What an emitted event is about, which decides who receives it (see the module comment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subject {
    /// The account the event belongs to: its `data.account_id`, and whose users and stream
    /// receive it.
    pub account_id: u64,
    /// The conversation's contact, who also receives conversation and message events.
    pub contact_id: Option<u64>,
    /// The user a notification, a mention or a presence update is for; for typing, the user
    /// who types (who does not receive it).
    pub user_id: Option<u64>,
    /// A private note: agents only (the contact does not receive it).
    pub private: bool,
}

/// Who receives an event, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Audience {
    /// The account's administrators and inbox members and, unless private, the contact.
    Conversation,
    /// The account stream.
    Account,
    /// One user's token.
    User,
}

/// The audience of `event`; `None` for a name Chatwoot does not broadcast.
fn audience(event: &str) -> Option<Audience> {
    if !EVENT_NAMES.contains(&event) {
        return None;
    }
    Some(match event {
        e if e.starts_with("contact.") || e.starts_with("account.") => Audience::Account,
        e if e.starts_with("notification.") => Audience::User,
        "conversation.mentioned" | "presence.update" => Audience::User,
        _ => Audience::Conversation,
    })
}

/// The streams `event` about `subject` goes to, each once; `None` for an unknown name.
pub(super) fn streams_for(
    event: &str,
    subject: &Subject,
    directory: &Directory,
) -> Option<Vec<Arc<str>>> {
    let streams = match audience(event)? {
        Audience::Account => vec![account_stream(subject.account_id)],
        Audience::User => subject
            .user_id
            .and_then(|id| directory.user_stream(id))
            .into_iter()
            .collect(),
        Audience::Conversation => {
            // The typing user never receives their own typing.
            let typist = event
                .starts_with("conversation.typing_")
                .then_some(subject.user_id)
                .flatten()
                .and_then(|id| directory.user_stream(id));
            let mut streams: Vec<Arc<str>> = directory
                .conversation_streams(subject.account_id)
                .filter(|s| Some(s) != typist.as_ref())
                .collect();
            if !subject.private {
                streams.extend(
                    subject
                        .contact_id
                        .and_then(|id| directory.contact_stream(id)),
                );
            }
            streams
        }
    };
    Some(streams)
}

/// The recorded `data` of fixture `name`, parsed.
fn recorded(name: &str) -> Map<String, Value> {
    let (_, rest) = templates()
        .iter()
        .find(|(recorded, _)| recorded == name)
        .expect("the catalog names only recorded fixtures");
    match serde_json::from_str(&format!("{{{rest}")) {
        Ok(Value::Object(map)) => map,
        _ => unreachable!("fixture data is an object"),
    }
}

/// A payload of `event`'s shape (`None` for an unknown name), with `account_id` set.
pub(super) fn payload(event: &str, subject: &Subject) -> Option<Map<String, Value>> {
    audience(event)?;
    let mut data = match event {
        "first.reply.created"
        | "conversation.read"
        | "conversation.contact_changed"
        | "conversation.mentioned"
        | "conversation.unread_count_changed"
        | "team.changed" => recorded("conversation.updated"),
        "conversation.typing_off" => recorded("conversation.typing_on"),
        "contact.created" | "contact.merged" | "contact.deleted" => recorded("contact.updated"),
        "notification.updated" => recorded("notification.created"),
        "notification.deleted" => notification_deleted(),
        "account.cache_invalidated" => {
            // `account.cache_keys`: the time each cached list last changed.
            let now = super::events::now_us() / 1_000_000;
            let keys = json!({"label": now, "inbox": now, "team": now});
            Map::from_iter([("cache_keys".to_string(), keys)])
        }
        recorded_name => recorded(recorded_name),
    };
    data.insert("account_id".into(), subject.account_id.into());
    if event.starts_with("message.") {
        data.insert("private".into(), subject.private.into());
    }
    if let (true, Some(user_id)) = (event == "presence.update", subject.user_id) {
        data.insert("users".into(), json!({ user_id.to_string(): "online" }));
    }
    Some(data)
}

/// `notification.deleted`: Chatwoot sends only the notification's identity and the counts.
fn notification_deleted() -> Map<String, Value> {
    let created = recorded("notification.created");
    let notification = &created["notification"];
    let identity = [
        "id",
        "notification_type",
        "primary_actor_type",
        "primary_actor_id",
    ]
    .into_iter()
    .map(|key| (key.to_string(), notification[key].clone()));
    let mut data = Map::new();
    data.insert("notification".into(), Value::Object(identity.collect()));
    data.insert("unread_count".into(), created["unread_count"].clone());
    data.insert("count".into(), created["count"].clone());
    data
}

#[cfg(test)]
mod tests {
    use super::super::identity::{MockContact, MockRole, MockUser};
    use super::*;

    /// Administrator 3, inbox member 7 and agent 8 outside the inbox in account 1; user 9 in
    /// account 2; visitor 42 in account 1.
    fn directory() -> Directory {
        let user = |id, token: &str, accounts: Vec<u64>, role| MockUser {
            id,
            pubsub_token: token.into(),
            api_access_token: None,
            accounts,
            role,
        };
        let member = MockRole::Agent { inbox_member: true };
        let outsider = MockRole::Agent {
            inbox_member: false,
        };
        Directory {
            users: vec![
                user(3, "u3", vec![1], MockRole::Administrator),
                user(7, "u7", vec![1], member),
                user(8, "u8", vec![1], outsider),
                user(9, "u9", vec![2], MockRole::Administrator),
            ],
            contacts: vec![MockContact {
                id: 42,
                account_id: 1,
                pubsub_token: "c42".into(),
                public: None,
            }],
            ..Directory::default()
        }
    }

    fn names(streams: Option<Vec<Arc<str>>>) -> Vec<String> {
        streams
            .expect("a known event")
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn every_event_has_a_payload_with_its_account_and_an_audience() {
        let subject = Subject {
            account_id: 5,
            ..Subject::default()
        };
        for event in EVENT_NAMES {
            let data = payload(event, &subject).expect(event);
            assert_eq!(data["account_id"], 5, "{event}");
        }
        assert!(payload("conversation.exploded", &subject).is_none());
        assert!(streams_for("conversation.exploded", &subject, &directory()).is_none());
    }

    #[test]
    fn streams_follow_chatwoots_listener() {
        let d = directory();
        let subject = Subject {
            account_id: 1,
            contact_id: Some(42),
            user_id: Some(3),
            private: false,
        };
        let private = Subject {
            private: true,
            ..subject
        };
        let to = |event, subject: &Subject| names(streams_for(event, subject, &d));
        assert_eq!(to("message.created", &subject), ["u3", "u7", "c42"]);
        assert_eq!(to("message.created", &private), ["u3", "u7"]);
        assert_eq!(to("contact.created", &subject), ["account_1"]);
        assert_eq!(to("account.cache_invalidated", &subject), ["account_1"]);
        assert_eq!(to("notification.deleted", &subject), ["u3"]);
        // The agent outside the inbox is told of contacts and of its own mentions only.
        let outsider = Subject {
            user_id: Some(8),
            ..subject
        };
        assert_eq!(
            to("conversation.status_changed", &subject),
            ["u3", "u7", "c42"]
        );
        assert_eq!(to("conversation.mentioned", &outsider), ["u8"]);
        assert_eq!(to("conversation.mentioned", &subject), ["u3"]);
        assert_eq!(to("presence.update", &subject), ["u3"]);
        assert_eq!(to("conversation.typing_off", &subject), ["u7", "c42"]);
    }

    #[test]
    fn payloads_keep_the_recorded_shapes() {
        let subject = Subject {
            account_id: 1,
            user_id: Some(3),
            ..Subject::default()
        };
        let conversation = payload("team.changed", &subject).unwrap();
        assert!(conversation["contact_inbox"]["pubsub_token"].is_string());
        let typing = payload("conversation.typing_off", &subject).unwrap();
        assert!(typing["conversation"].is_object() && typing["user"].is_object());
        let deleted = payload("notification.deleted", &subject).unwrap();
        assert_eq!(deleted["notification"]["primary_actor_id"], 311);
        assert!(deleted["notification"].get("secondary_actor").is_none());
        let presence = payload("presence.update", &subject).unwrap();
        assert_eq!(presence["users"], json!({"3": "online"}));
        let cache = payload("account.cache_invalidated", &subject).unwrap();
        assert!(cache["cache_keys"]["inbox"].is_u64());
    }
}
