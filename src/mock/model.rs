//! The few records the mock broadcasts from and its REST API reads: accounts, conversations (with
//! their display id and last activity) and messages (with their ids), so the cable and the REST
//! API tell the same story, as Chatwoot's do.

use serde_json::{json, Map, Value};

/// An account of the mock Chatwoot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockAccount {
    /// The account id: `account_id` in identifiers, events and REST paths.
    pub id: u64,
    /// Its name, as the profile lists it.
    pub name: String,
}

/// A message as the mock keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct MockMessage {
    /// The message id, increasing across the server (Chatwoot's database id).
    pub id: u64,
    /// The text.
    pub content: String,
    /// 0 incoming (from the contact), 1 outgoing (from an agent), as Chatwoot numbers them.
    pub message_type: u8,
    /// A private note: agents only.
    pub private: bool,
    /// Creation time, Unix seconds.
    pub created_at: u64,
}

/// A conversation as the mock keeps it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Conversation {
    /// The account it belongs to.
    pub(super) account_id: u64,
    /// The display id: what events and REST paths call the conversation's id.
    pub(super) display_id: u64,
    /// The contact it is with, who receives its events.
    pub(super) contact_id: Option<u64>,
    /// `open`, `resolved`, `pending` or `snoozed`.
    pub(super) status: &'static str,
    /// Creation time, Unix seconds.
    pub(super) created_at: f64,
    /// Last change, Unix seconds with fractions (Chatwoot sends it as a float): what
    /// `updated_within` filters on.
    pub(super) updated_at: f64,
    /// Last message, Unix seconds: what the list is sorted by.
    pub(super) last_activity_at: f64,
    /// Its messages, oldest first.
    pub(super) messages: Vec<MockMessage>,
}

/// The inbox every mock conversation is in (the fixtures' website inbox).
pub(super) const INBOX_ID: u64 = 2;

/// Every record.
#[derive(Debug, Default)]
pub(super) struct Model {
    /// The accounts.
    pub(super) accounts: Vec<MockAccount>,
    /// The conversations, in creation order.
    pub(super) conversations: Vec<Conversation>,
    /// The last message id given out (ids start at 1).
    pub(super) last_message_id: u64,
}

/// Now, in Unix seconds with fractions.
pub(super) fn now_seconds() -> f64 {
    super::events::now_us() as f64 / 1e6
}

impl Model {
    /// Opens a conversation in `account_id`; `None` for an unknown account.
    pub(super) fn create_conversation(
        &mut self,
        account_id: u64,
        contact_id: Option<u64>,
    ) -> Option<&Conversation> {
        self.accounts.iter().find(|a| a.id == account_id)?;
        let display_id = 1 + self
            .conversations
            .iter()
            .filter(|c| c.account_id == account_id)
            .map(|c| c.display_id)
            .max()
            .unwrap_or(0);
        let now = now_seconds();
        self.conversations.push(Conversation {
            account_id,
            display_id,
            contact_id,
            status: "open",
            created_at: now,
            updated_at: now,
            last_activity_at: now,
            messages: Vec::new(),
        });
        self.conversations.last()
    }

    /// Conversation `display_id` of `account_id`.
    pub(super) fn conversation(&self, account_id: u64, display_id: u64) -> Option<&Conversation> {
        self.conversations
            .iter()
            .find(|c| c.account_id == account_id && c.display_id == display_id)
    }

    /// Adds a message to a conversation, moving its activity; `None` for an unknown one.
    pub(super) fn create_message(
        &mut self,
        account_id: u64,
        display_id: u64,
        content: &str,
        private: bool,
    ) -> Option<(&Conversation, MockMessage)> {
        let id = self.last_message_id + 1;
        let conversation = self
            .conversations
            .iter_mut()
            .find(|c| c.account_id == account_id && c.display_id == display_id)?;
        self.last_message_id = id;
        let now = now_seconds();
        let message = MockMessage {
            id,
            content: content.into(),
            // Private notes come from agents; other mock messages from the contact.
            message_type: u8::from(private),
            private,
            created_at: now as u64,
        };
        conversation.messages.push(message.clone());
        conversation.updated_at = now;
        conversation.last_activity_at = now;
        Some((conversation, message))
    }
}

impl Conversation {
    /// Writes this conversation's identity and times over a cable conversation payload
    /// (`conversation.push_event_data`, as in the fixtures).
    pub(super) fn patch_event(&self, data: &mut Map<String, Value>) {
        data.insert("id".into(), self.display_id.into());
        data.insert("inbox_id".into(), INBOX_ID.into());
        data.insert("status".into(), self.status.into());
        data.insert("messages".into(), json!([]));
        let activity = self.last_activity_at as u64;
        data.insert("last_activity_at".into(), activity.into());
        data.insert("timestamp".into(), activity.into());
        data.insert("created_at".into(), (self.created_at as u64).into());
        data.insert("updated_at".into(), self.updated_at.into());
    }

    /// The conversation as `GET /api/v1/accounts/{id}/conversations` lists it. Shape from
    /// Chatwoot's app/views/api/v1/conversations/partials/_conversation.json.jbuilder, plus the
    /// float `updated_at` 4.x adds (shared/chatwoot/PROTOCOL.md).
    pub(super) fn rest_json(&self) -> Value {
        let activity = self.last_activity_at as u64;
        json!({
            "meta": {
                "sender": self.contact_id.map(contact_json),
                "channel": "Channel::WebWidget",
                "hmac_verified": false,
            },
            "id": self.display_id,
            "messages": self.messages.last().map(|m| self.message_event_json(m)).into_iter().collect::<Vec<_>>(),
            "account_id": self.account_id,
            "uuid": format!("00000000-0000-4000-8000-{:012}", self.display_id),
            "additional_attributes": {},
            "agent_last_seen_at": 0,
            "assignee_last_seen_at": 0,
            "can_reply": true,
            "contact_last_seen_at": 0,
            "custom_attributes": {},
            "inbox_id": INBOX_ID,
            "labels": [],
            "muted": false,
            "snoozed_until": null,
            "status": self.status,
            "created_at": self.created_at as u64,
            "updated_at": self.updated_at,
            "timestamp": activity,
            "first_reply_created_at": 0,
            "unread_count": 0,
            "last_activity_at": activity,
            "priority": null,
            "waiting_since": 0,
            "sla_policy_id": null,
        })
    }

    /// A message as `GET .../conversations/{display_id}/messages` lists it. Shape from
    /// shared/chatwoot/PROTOCOL.md ("REST shapes a backfill reads"), after Chatwoot's
    /// app/views/api/v1/accounts/conversations/messages/index.json.jbuilder.
    pub(super) fn message_rest_json(&self, message: &MockMessage) -> Value {
        json!({
            "id": message.id,
            "content": message.content,
            "inbox_id": INBOX_ID,
            "conversation_id": self.display_id,
            "message_type": message.message_type,
            "content_type": "text",
            "status": "sent",
            "content_attributes": {},
            "created_at": message.created_at,
            "private": message.private,
            "source_id": null,
            "sender": self.sender_json(message),
            "attachments": [],
        })
    }

    /// A message as `message.push_event_data` makes it (the `messages` of a listed
    /// conversation): the REST message plus the account and sender fields.
    fn message_event_json(&self, message: &MockMessage) -> Value {
        let mut value = self.message_rest_json(message);
        value["account_id"] = self.account_id.into();
        value["sender_type"] = if message.message_type == 0 {
            "Contact"
        } else {
            "User"
        }
        .into();
        value
    }

    /// Who sent `message`: the contact for incoming messages, an agent for the others.
    fn sender_json(&self, message: &MockMessage) -> Value {
        match (message.message_type, self.contact_id) {
            (0, Some(contact_id)) => contact_json(contact_id),
            (0, None) => Value::Null,
            _ => json!({"id": 0, "name": "Mock Agent", "type": "user"}),
        }
    }

    /// Writes `message` over a cable `message.created` payload (as in the fixtures).
    pub(super) fn patch_message_event(&self, message: &MockMessage, data: &mut Map<String, Value>) {
        data.insert("id".into(), message.id.into());
        data.insert("content".into(), message.content.clone().into());
        data.insert(
            "processed_message_content".into(),
            message.content.clone().into(),
        );
        data.insert("inbox_id".into(), INBOX_ID.into());
        data.insert("conversation_id".into(), self.display_id.into());
        data.insert("message_type".into(), message.message_type.into());
        data.insert("created_at".into(), message.created_at.into());
        data.insert("private".into(), message.private.into());
        data.insert("sender".into(), self.sender_json(message));
        let sender_type = if message.message_type == 0 {
            "Contact"
        } else {
            "User"
        };
        data.insert("sender_type".into(), sender_type.into());
        if let Some(Value::Object(conversation)) = data.get_mut("conversation") {
            conversation.insert(
                "last_activity_at".into(),
                (self.last_activity_at as u64).into(),
            );
        }
    }
}

/// A contact as `contact.push_event_data` makes it (the fixtures' visitor, renumbered).
fn contact_json(contact_id: u64) -> Value {
    json!({
        "additional_attributes": {},
        "custom_attributes": {},
        "email": null,
        "id": contact_id,
        "identifier": null,
        "name": format!("visitor-{contact_id}"),
        "phone_number": null,
        "thumbnail": "",
        "blocked": false,
        "type": "contact",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        Model {
            accounts: vec![MockAccount {
                id: 1,
                name: "Acme".into(),
            }],
            ..Model::default()
        }
    }

    #[test]
    fn display_ids_count_per_account_and_message_ids_across_the_server() {
        let mut model = model();
        assert!(model.create_conversation(9, None).is_none());
        assert_eq!(
            model.create_conversation(1, Some(42)).unwrap().display_id,
            1
        );
        assert_eq!(model.create_conversation(1, None).unwrap().display_id, 2);
        let (_, first) = model.create_message(1, 1, "hi", false).unwrap();
        let (conversation, second) = model.create_message(1, 2, "note", true).unwrap();
        assert_eq!((first.id, second.id), (1, 2));
        assert_eq!(conversation.messages.len(), 1);
        assert_eq!(second.message_type, 1);
        assert!(model.create_message(1, 3, "nowhere", false).is_none());
    }

    #[test]
    fn a_listed_conversation_carries_its_last_message_and_activity() {
        let mut model = model();
        model.create_conversation(1, Some(42));
        model.create_message(1, 1, "hi", false);
        let listed = model.conversation(1, 1).unwrap().rest_json();
        assert_eq!(listed["id"], 1);
        assert_eq!(listed["messages"][0]["content"], "hi");
        assert_eq!(listed["meta"]["sender"]["id"], 42);
        assert!(listed["updated_at"].is_f64());
        assert_eq!(listed["timestamp"], listed["last_activity_at"]);
    }
}
