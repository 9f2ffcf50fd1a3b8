//! Who a subscription is and which streams it reads, decided as Chatwoot 4.x's `RoomChannel`
//! decides it (app/channels/room_channel.rb): with a `user_id` the token must be that user's and
//! `account_id` one of the user's accounts, and the subscription streams the token and the
//! account stream; without one the token must be a contact's, and it streams the token. Anything
//! else raises in `subscribed`, which ActionCable answers with silence.
//!
//! Which conversations a user sees is its [`MockRole`]: Chatwoot sends a conversation's events
//! to the inbox's members and the account's administrators, and lists it to the same people.

use std::collections::HashSet;
use std::sync::Arc;

/// An agent or administrator of the mock Chatwoot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockUser {
    /// The user's id: a subscription must give it as `user_id`.
    pub id: u64,
    /// The user's pubsub token now ([`super::MockServer::rotate_pubsub_token`] changes it).
    pub pubsub_token: String,
    /// The user's `api_access_token` for the REST API, if the user has one.
    pub api_access_token: Option<String>,
    /// The accounts the user belongs to: a subscription's `account_id` must be one.
    pub accounts: Vec<u64>,
    /// Whether the user sees the conversations of its accounts (their events and their REST
    /// records): an administrator and a member of the mock's inbox do, another agent does not.
    pub role: MockRole,
}

/// A user's role in its accounts, which decides whether it sees their conversations, as
/// Chatwoot's `ActionCableListener#user_tokens` (the inbox's members and the account's
/// administrators) and `ConversationFinder` (`assigned_inboxes`) decide it. Every mock
/// conversation is in one inbox, so one flag says whether an agent sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MockRole {
    /// An administrator of each of its accounts: sees every conversation.
    #[default]
    Administrator,
    /// An agent: sees the conversations only as a member of the mock's inbox.
    Agent {
        /// Whether the agent is a member of the inbox every mock conversation is in.
        inbox_member: bool,
    },
}

impl MockRole {
    /// Whether a user of this role sees the mock inbox's conversations.
    pub fn sees_conversations(self) -> bool {
        match self {
            MockRole::Administrator => true,
            MockRole::Agent { inbox_member } => inbox_member,
        }
    }

    /// The role's name in Chatwoot's profile (`administrator` or `agent`).
    pub fn name(self) -> &'static str {
        match self {
            MockRole::Administrator => "administrator",
            MockRole::Agent { .. } => "agent",
        }
    }
}

/// A contact (a widget visitor) of the mock Chatwoot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockContact {
    /// The contact's id, which [`super::Subject::contact_id`] names.
    pub id: u64,
    /// The account the contact belongs to.
    pub account_id: u64,
    /// The contact inbox's pubsub token (contact tokens never rotate).
    pub pubsub_token: String,
    /// How the public contact API finds the contact, if it should.
    pub public: Option<MockContactInbox>,
}

/// Where the public contact API (`/public/api/v1/inboxes/{inbox_identifier}/contacts/{source_id}`)
/// finds a contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockContactInbox {
    /// The inbox's public identifier (the website inbox's `inbox_identifier`).
    pub inbox_identifier: String,
    /// The contact's identifier in that inbox (`source_id`, the widget's `contact_identifier`).
    pub source_id: String,
}

/// The users and contacts the server knows, changeable while it runs.
#[derive(Debug, Default)]
pub(super) struct Directory {
    /// Agents and administrators.
    pub(super) users: Vec<MockUser>,
    /// Widget visitors.
    pub(super) contacts: Vec<MockContact>,
    /// Pubsub tokens users had before a rotation: a subscribe with one gets silence, as
    /// Chatwoot finds no user with it.
    pub(super) retired_tokens: HashSet<String>,
}

/// What a subscription identifier asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Identifier {
    /// `pubsub_token`.
    pub(super) pubsub_token: String,
    /// `user_id`, given by agent subscriptions.
    pub(super) user_id: Option<u64>,
    /// `account_id`, given by agent subscriptions.
    pub(super) account_id: Option<u64>,
}

impl Identifier {
    /// Reads the identifier string; what is missing or malformed stays empty (Chatwoot's
    /// lookups then fail, which is silence).
    pub(super) fn parse(identifier: &str) -> Identifier {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(identifier) else {
            return Identifier::default();
        };
        // ActionCable params arrive as given: the dashboard sends numbers, others strings.
        let number = |v: &serde_json::Value| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        };
        Identifier {
            pubsub_token: value["pubsub_token"].as_str().unwrap_or_default().into(),
            user_id: number(&value["user_id"]),
            account_id: number(&value["account_id"]),
        }
    }
}

/// The `presence.update` a user subscription sends to its own token on subscribe and on each
/// `update_presence`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PresenceOf {
    /// The account the subscription joined.
    pub(super) account_id: u64,
    /// The user who is present.
    pub(super) user_id: u64,
    /// The token stream the update goes to.
    pub(super) stream: Arc<str>,
}

/// How `RoomChannel` answers a subscribe.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Resolved {
    /// The token is neither a user's nor a contact's: the configured [`super::Answer`] decides.
    NotInDirectory,
    /// Confirmed: these streams, and for a user the presence it announces.
    Streams {
        /// Stream names: the token, and `account_<id>` for a user.
        streams: Vec<Arc<str>>,
        /// Set for users: contacts announce no presence (no account in RoomChannel).
        presence: Option<PresenceOf>,
    },
    /// A lookup failed (wrong user, account, or a retired token): silence.
    Refused,
}

/// The name of an account's stream, which only agent subscriptions join.
pub(super) fn account_stream(account_id: u64) -> Arc<str> {
    format!("account_{account_id}").into()
}

impl Directory {
    /// Decides a subscribe with `identifier` as `RoomChannel#subscribed` does.
    pub(super) fn resolve(&self, identifier: &Identifier) -> Resolved {
        let token = identifier.pubsub_token.as_str();
        if self.retired_tokens.contains(token) {
            return Resolved::Refused;
        }
        let user = self.users.iter().find(|u| u.pubsub_token == token);
        let contact = self.contacts.iter().find(|c| c.pubsub_token == token);
        match (identifier.user_id, user, contact) {
            (_, None, None) => Resolved::NotInDirectory,
            // `User.find_by!(pubsub_token:, id:)` then `accounts.find(account_id)`.
            (Some(user_id), Some(user), _) if user.id == user_id => match identifier.account_id {
                Some(account_id) if user.accounts.contains(&account_id) => {
                    let stream: Arc<str> = token.into();
                    Resolved::Streams {
                        streams: vec![stream.clone(), account_stream(account_id)],
                        presence: Some(PresenceOf {
                            account_id,
                            user_id,
                            stream,
                        }),
                    }
                }
                _ => Resolved::Refused,
            },
            // `ContactInbox.find_by!(pubsub_token:)`.
            (None, _, Some(_)) => Resolved::Streams {
                streams: vec![token.into()],
                presence: None,
            },
            _ => Resolved::Refused,
        }
    }

    /// The current token streams of the users of `account_id` who see its conversations (the
    /// inbox's members and the administrators).
    pub(super) fn conversation_streams(
        &self,
        account_id: u64,
    ) -> impl Iterator<Item = Arc<str>> + '_ {
        self.users
            .iter()
            .filter(move |u| u.accounts.contains(&account_id) && u.role.sees_conversations())
            .map(|u| Arc::from(u.pubsub_token.as_str()))
    }

    /// The current token stream of user `user_id`.
    pub(super) fn user_stream(&self, user_id: u64) -> Option<Arc<str>> {
        let user = self.users.iter().find(|u| u.id == user_id)?;
        Some(user.pubsub_token.as_str().into())
    }

    /// The token stream of contact `contact_id`.
    pub(super) fn contact_stream(&self, contact_id: u64) -> Option<Arc<str>> {
        let contact = self.contacts.iter().find(|c| c.id == contact_id)?;
        Some(contact.pubsub_token.as_str().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory() -> Directory {
        Directory {
            users: vec![MockUser {
                id: 3,
                pubsub_token: "agent".into(),
                api_access_token: None,
                accounts: vec![1, 2],
                role: MockRole::default(),
            }],
            contacts: vec![MockContact {
                id: 42,
                account_id: 1,
                pubsub_token: "visitor".into(),
                public: None,
            }],
            retired_tokens: HashSet::from(["old".to_string()]),
        }
    }

    fn ask(identifier: &str) -> Resolved {
        directory().resolve(&Identifier::parse(identifier))
    }

    #[test]
    fn a_user_with_its_id_and_account_streams_its_token_and_the_account() {
        let Resolved::Streams { streams, presence } =
            ask(r#"{"channel":"RoomChannel","pubsub_token":"agent","account_id":2,"user_id":"3"}"#)
        else {
            panic!("refused");
        };
        assert_eq!(streams, vec![Arc::from("agent"), Arc::from("account_2")]);
        assert_eq!(presence.map(|p| (p.account_id, p.user_id)), Some((2, 3)));
    }

    #[test]
    fn a_wrong_user_or_account_or_a_missing_one_is_refused() {
        for identifier in [
            r#"{"pubsub_token":"agent","account_id":1,"user_id":4}"#,
            r#"{"pubsub_token":"agent","account_id":9,"user_id":3}"#,
            r#"{"pubsub_token":"agent","user_id":3}"#,
            r#"{"pubsub_token":"agent"}"#,
            r#"{"pubsub_token":"visitor","account_id":1,"user_id":3}"#,
            r#"{"pubsub_token":"old","account_id":1,"user_id":3}"#,
        ] {
            assert_eq!(ask(identifier), Resolved::Refused, "{identifier}");
        }
    }

    #[test]
    fn a_contact_streams_its_token_only_and_an_unknown_token_is_left_to_the_answers() {
        assert_eq!(
            ask(r#"{"pubsub_token":"visitor"}"#),
            Resolved::Streams {
                streams: vec![Arc::from("visitor")],
                presence: None
            }
        );
        assert_eq!(ask(r#"{"pubsub_token":"t"}"#), Resolved::NotInDirectory);
    }
}
