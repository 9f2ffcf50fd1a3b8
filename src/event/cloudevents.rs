//! The CloudEvents 1.0 attributes of an event and its structured-mode JSON form.

use crate::event::ascii::{rfc3339_micros, AsciiBuf};
use crate::event::Event;

impl Event {
    /// CloudEvents `type`.
    pub fn ce_type(&self) -> String {
        format!("com.chatwoot.{}", self.name)
    }

    /// CloudEvents `subject`: `conversation/<display id>` when the event concerns one.
    pub fn subject(&self) -> Option<String> {
        self.keys
            .conversation_id
            .map(|id| format!("conversation/{id}"))
    }

    /// CloudEvents `time`: receive time, RFC 3339 in UTC with microseconds.
    pub fn time(&self) -> String {
        self.time_text().as_str().to_owned()
    }

    /// [`Event::time`] on the stack. Panics for a receive time outside 1970..=9999, as
    /// humantime did.
    pub fn time_text(&self) -> AsciiBuf<27> {
        rfc3339_micros(self.received_at).unwrap_or_else(|| {
            panic!(
                "receive time {:?} cannot be written as RFC 3339",
                self.received_at
            )
        })
    }

    /// Appends the CloudEvents 1.0 structured-mode JSON object (no trailing newline).
    pub fn write_structured(&self, out: &mut Vec<u8>) {
        fn string(out: &mut Vec<u8>, s: &str) {
            serde_json::to_writer(&mut *out, s).expect("writing JSON to a Vec cannot fail");
        }
        out.extend_from_slice(br#"{"specversion":"1.0","id":""#);
        out.extend_from_slice(self.id.hex().as_str().as_bytes());
        out.extend_from_slice(br#"","source":"#);
        string(out, &self.source);
        out.extend_from_slice(br#","type":"#);
        string(out, &self.ce_type());
        out.extend_from_slice(br#","time":""#);
        out.extend_from_slice(self.time_text().as_str().as_bytes());
        out.push(b'"');
        if let Some(subject) = self.subject() {
            out.extend_from_slice(br#","subject":"#);
            string(out, &subject);
        }
        out.extend_from_slice(br#","datacontenttype":"application/json","chatwootevent":"#);
        string(out, &self.name);
        out.extend_from_slice(br#","chatwoottoken":"#);
        string(out, &self.token);
        if let Some(account) = self.keys.account_id {
            out.extend_from_slice(br#","chatwootaccount":"#);
            out.extend_from_slice(AsciiBuf::decimal(account).as_str().as_bytes());
        }
        if self.backfill {
            out.extend_from_slice(br#","chatwootbackfill":true"#);
        }
        out.extend_from_slice(br#","data":"#);
        out.extend_from_slice(self.data.get().as_bytes());
        out.push(b'}');
    }
}
