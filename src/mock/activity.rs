//! What happens in the mock Chatwoot: events emitted to the streams Chatwoot sends them to, and
//! conversations and messages created in the records and broadcast, for the handle and for the
//! generator's traffic.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::events::{encode_message, now_us};
use super::{catalog, Push, Shared, Subject};

/// Conversations per account the generator's traffic cycles through.
const TRAFFIC_CONVERSATIONS: u64 = 5;

impl Shared {
    /// Emits `event` for `subject` with its recorded payload changed by `patch`, numbered;
    /// returns the number, `None` for a name Chatwoot does not broadcast.
    pub(super) fn emit_patched(
        &self,
        event: &str,
        subject: &Subject,
        patch: impl FnOnce(&mut Map<String, Value>),
    ) -> Option<u64> {
        let mut data = catalog::payload(event, subject)?;
        patch(&mut data);
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let fields = Value::Object(data).to_string();
        // The numbers go first, as in generated events; `fields` is never empty (it has
        // `account_id`), so the comma is right.
        let data = format!(
            r#"{{"mock_seq":{seq},"mock_sent_at_us":{},{}"#,
            now_us(),
            &fields[1..]
        );
        self.emit_data(event, &data, subject)?;
        Some(seq)
    }

    /// Sends `event` with `data` to the streams Chatwoot sends it to for `subject`, unless
    /// stalled; `None` for a name Chatwoot does not broadcast.
    pub(super) fn emit_data(&self, event: &str, data: &str, subject: &Subject) -> Option<()> {
        let streams = {
            let directory = self.directory.lock().expect("directory lock");
            catalog::streams_for(event, subject, &directory)?
        };
        if self.stalled.load(Ordering::Relaxed) {
            return Some(());
        }
        let message: Arc<str> = encode_message(event, data).into();
        for stream in streams {
            // No receivers just means no connection is open.
            let _ = self.pushes.send(Push::Event {
                only: Some(stream),
                message: message.clone(),
            });
        }
        Some(())
    }

    /// Opens a conversation and broadcasts `conversation.created`; its display id, or `None`
    /// for an unknown account.
    pub(super) fn create_conversation(
        &self,
        account_id: u64,
        contact_id: Option<u64>,
    ) -> Option<u64> {
        let conversation = self
            .model
            .lock()
            .expect("model lock")
            .create_conversation(account_id, contact_id)?
            .clone();
        let subject = Subject {
            account_id,
            contact_id,
            ..Subject::default()
        };
        self.emit_patched("conversation.created", &subject, |data| {
            conversation.patch_event(data)
        });
        Some(conversation.display_id)
    }

    /// Adds a message and broadcasts `message.created`; its id, or `None` for an unknown
    /// conversation.
    pub(super) fn create_message(
        &self,
        account_id: u64,
        display_id: u64,
        content: &str,
        private: bool,
    ) -> Option<u64> {
        let (conversation, message) = {
            let mut model = self.model.lock().expect("model lock");
            let (conversation, message) =
                model.create_message(account_id, display_id, content, private)?;
            (conversation.clone(), message)
        };
        let subject = Subject {
            account_id,
            contact_id: conversation.contact_id,
            private,
            ..Subject::default()
        };
        self.emit_patched("message.created", &subject, |data| {
            conversation.patch_message_event(&message, data)
        });
        Some(message.id)
    }

    /// The generator's `tick`-th step when the mock knows users: a message from the contact in
    /// one of the first [`TRAFFIC_CONVERSATIONS`] conversations of each account in turn (opened
    /// with the account's first contact when missing), so the cable and the REST API both see
    /// it. Does nothing without accounts.
    pub(super) fn traffic(&self, tick: u64) {
        let accounts: Vec<(u64, Option<u64>)> = {
            let model = self.model.lock().expect("model lock");
            let directory = self.directory.lock().expect("directory lock");
            model
                .accounts
                .iter()
                .map(|a| {
                    let contact = directory.contacts.iter().find(|c| c.account_id == a.id);
                    (a.id, contact.map(|c| c.id))
                })
                .collect()
        };
        let Some(&(account_id, contact_id)) =
            accounts.get((tick % accounts.len().max(1) as u64) as usize)
        else {
            return;
        };
        let display_id = (tick / accounts.len() as u64) % TRAFFIC_CONVERSATIONS + 1;
        let exists = self
            .model
            .lock()
            .expect("model lock")
            .conversation(account_id, display_id)
            .is_some();
        if !exists {
            self.create_conversation(account_id, contact_id);
        }
        self.create_message(
            account_id,
            display_id,
            &format!("mock message {tick}"),
            false,
        );
    }
}
