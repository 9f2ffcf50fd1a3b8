//! Contacts (widget visitors) given by `inbox_identifier` + `contact_identifier`: the pubsub
//! token is read from Chatwoot's public contact API instead of being written in the config.

use super::api_token::{api_endpoint, ApiDefaults, DEFAULT_REFRESH_INTERVAL};
use super::checks::check_duration;
use super::raw::RawToken;
use crate::secret_file;
use crate::source::settings::ContactToken;
use crate::types::{Problems, Secret};

/// Longest `inbox_identifier` accepted. Chatwoot's are 24 characters; the bound keeps a
/// mistaken value (a pasted script) out of URLs and error messages.
pub(super) const MAX_INBOX_IDENTIFIER_CHARS: usize = 128;

/// Longest `contact_identifier` accepted. A web widget's is a 36-character UUID; an API
/// inbox's is chosen by its integrator, and is a URL path segment here.
pub(super) const MAX_CONTACT_IDENTIFIER_BYTES: usize = 1024;

/// The contact of `raw`, taking its identifier fields, or `None` when it gives neither.
/// A mix with `pubsub_token` or `api_access_token`, one identifier alone, and ids (a contact
/// has no account or user id) are added to `at`.
pub(super) fn take(
    raw: &mut RawToken,
    cable_url: &str,
    chatwoot: &ApiDefaults<'_>,
    at: &mut Problems<'_>,
) -> Option<ContactToken> {
    let inbox = raw.inbox_identifier.take();
    let inline = raw.contact_identifier.take();
    let file = raw.contact_identifier_file.take();
    let contact_given = inline.is_some() || file.is_some();
    let inbox_identifier = match (inbox, contact_given) {
        (None, false) => return None,
        (Some(inbox), true) => inbox,
        (Some(_), false) => {
            at.add(
                "inbox_identifier",
                "needs contact_identifier (or contact_identifier_file): the contact's identifier in that inbox",
            );
            return Some(unusable());
        }
        (None, true) => {
            at.add(
                "contact_identifier",
                "needs inbox_identifier: the public identifier of the contact's inbox",
            );
            return Some(unusable());
        }
    };
    check_mixes(raw, at);
    // Reported: left out, so the agent checks do not report them again.
    raw.account_id = None;
    raw.user_id = None;
    at.check(
        "inbox_identifier",
        check_inbox_identifier(&inbox_identifier),
    );
    let contact_identifier = match secret_file::one(at, "contact_identifier", inline, file) {
        Some(Ok(identifier)) => {
            at.check(
                "contact_identifier",
                check_contact_identifier(identifier.expose()),
            );
            identifier
        }
        // Reported already (both given, or the file unreadable).
        _ => Secret::new(""),
    };
    let refresh_interval = raw
        .refresh_interval
        .take()
        .map_or(DEFAULT_REFRESH_INTERVAL, |d| d.0);
    at.check("refresh_interval", check_duration(refresh_interval));
    let (api_url, tls) = api_endpoint(cable_url, chatwoot);
    Some(ContactToken {
        inbox_identifier,
        contact_identifier,
        api_url,
        refresh_interval,
        tls,
    })
}

/// The contact of a token whose identifiers were reported as incomplete: it says the token
/// is a contact's (so no missing pubsub token is reported too); the config is refused anyway.
fn unusable() -> ContactToken {
    ContactToken {
        inbox_identifier: String::new(),
        contact_identifier: Secret::new(""),
        api_url: String::new(),
        refresh_interval: DEFAULT_REFRESH_INTERVAL,
        tls: None,
    }
}

/// Refuses what a contact given by its identifiers cannot also have.
fn check_mixes(raw: &RawToken, at: &mut Problems<'_>) {
    if raw.pubsub_token.is_some() || raw.pubsub_token_file.is_some() {
        at.add(
            "inbox_identifier",
            "pubsub_token and inbox_identifier + contact_identifier are both given; keep one (with the identifiers the pubsub token is read from Chatwoot's public contact API)",
        );
    }
    if raw.api_access_token.is_some() || raw.api_access_token_file.is_some() {
        at.add(
            "inbox_identifier",
            "api_access_token and inbox_identifier + contact_identifier are both given; keep one (a user's access token, or a contact's identifiers)",
        );
    }
    if raw.account_id.is_some() || raw.user_id.is_some() {
        at.add(
            "inbox_identifier",
            "a contact given by inbox_identifier + contact_identifier has no account_id or user_id (those are an agent's)",
        );
    }
}

/// An inbox identifier: letters, digits, `-` and `_`, as Chatwoot generates them.
fn check_inbox_identifier(identifier: &str) -> Result<(), String> {
    if identifier.is_empty() {
        return Err("is empty".into());
    }
    if identifier.chars().count() > MAX_INBOX_IDENTIFIER_CHARS {
        return Err(format!(
            "is longer than {MAX_INBOX_IDENTIFIER_CHARS} characters; Chatwoot's inbox identifiers are 24"
        ));
    }
    if let Some(bad) = identifier
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "`{identifier}` holds {bad:?}; an inbox identifier has letters, digits, - and _ only (Settings → Inboxes → the inbox → Configuration)"
        ));
    }
    Ok(())
}

/// A contact identifier: not empty, bounded, no control characters. Never quoted back.
fn check_contact_identifier(identifier: &str) -> Result<(), String> {
    if identifier.trim().is_empty() {
        return Err("is empty".into());
    }
    if identifier.len() > MAX_CONTACT_IDENTIFIER_BYTES {
        return Err(format!(
            "is longer than {MAX_CONTACT_IDENTIFIER_BYTES} bytes"
        ));
    }
    if identifier.chars().any(char::is_control) {
        return Err("holds a control character (a trailing newline in the file?)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError, Identity};

    /// The problems loading `tokens` (YAML list items) under a `wss://` cable give, in words.
    fn load(tokens: &str) -> Result<Config, Vec<String>> {
        let text = format!(
            "chatwoot:\n  url: wss://chat.example.com/cable\ntokens:\n{tokens}sinks:\n  out: {{ type: file, path: ./events.jsonl }}\nroutes:\n  - {{ name: all, match: {{}}, to: [out] }}\n"
        );
        let env = |name: &str| (name == "CONTACT").then(|| "contact-SECRET".to_owned());
        Config::from_yaml(&text, &env, false).map_err(|e| match e {
            ConfigError::Invalid(found) => found.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        })
    }

    #[test]
    fn a_contact_by_identifiers_reads_the_public_api() {
        let cfg = load(
            "  - { name: visitor, inbox_identifier: Xy12-ab_C, contact_identifier: \"${CONTACT}\", refresh_interval: 1m }\n",
        )
        .unwrap();
        let token = &cfg.tokens[0];
        let contact = token.contact.as_ref().expect("a contact token");
        assert_eq!(contact.inbox_identifier, "Xy12-ab_C");
        assert_eq!(contact.contact_identifier.expose(), "contact-SECRET");
        assert_eq!(contact.api_url, "https://chat.example.com");
        assert_eq!(contact.refresh_interval.as_secs(), 60);
        assert!(contact.tls.is_some(), "https:// uses chatwoot.tls");
        assert_eq!(
            contact.shown_url(),
            "https://chat.example.com/public/api/v1/inboxes/Xy12-ab_C/contacts/{contact_identifier}"
        );
        assert!(token.api.is_none());
        assert_eq!(token.identity, Identity::Contact);
        let shown = format!("{cfg:?}");
        assert!(shown.contains("Xy12-ab_C") && !shown.contains("SECRET"));
    }

    #[test]
    fn mixes_and_halves_are_named() {
        let found = load(concat!(
            "  - { name: a, inbox_identifier: in1, contact_identifier: c, pubsub_token: p }\n",
            "  - { name: b, inbox_identifier: in1, contact_identifier: c, api_access_token: t, account_id: 1 }\n",
            "  - { name: c, inbox_identifier: in1 }\n",
            "  - { name: d, contact_identifier: c-SECRET }\n",
            "  - { name: e, inbox_identifier: \"in 1\", contact_identifier: \"\" }\n",
            "  - { name: f, inbox_identifier: in1, contact_identifier: c, presence: true }\n",
        ))
        .unwrap_err();
        assert_eq!(
            found,
            [
                "tokens[0].inbox_identifier: pubsub_token and inbox_identifier + contact_identifier are both given; keep one (with the identifiers the pubsub token is read from Chatwoot's public contact API)",
                "tokens[1].inbox_identifier: api_access_token and inbox_identifier + contact_identifier are both given; keep one (a user's access token, or a contact's identifiers)",
                "tokens[1].inbox_identifier: a contact given by inbox_identifier + contact_identifier has no account_id or user_id (those are an agent's)",
                "tokens[2].inbox_identifier: needs contact_identifier (or contact_identifier_file): the contact's identifier in that inbox",
                "tokens[3].contact_identifier: needs inbox_identifier: the public identifier of the contact's inbox",
                "tokens[4].inbox_identifier: `in 1` holds ' '; an inbox identifier has letters, digits, - and _ only (Settings → Inboxes → the inbox → Configuration)",
                "tokens[4].contact_identifier: is empty",
                "tokens[5].presence: a contact token must not send presence: Chatwoot would show the widget visitor online to agents while nobody is there; presence is for agent tokens (account_id and user_id)",
            ]
        );
        assert!(found.iter().all(|p| !p.contains("SECRET")));
    }

    #[test]
    fn the_contact_identifier_may_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("contact");
        std::fs::write(&path, "contact-SECRET\n").unwrap();
        let cfg = load(&format!(
            "  - {{ name: visitor, inbox_identifier: in1, contact_identifier_file: {} }}\n",
            path.display()
        ))
        .unwrap();
        let contact = cfg.tokens[0].contact.as_ref().unwrap();
        assert_eq!(contact.contact_identifier.expose(), "contact-SECRET");
    }
}
