//! Presence checked against what Chatwoot does with it: `update_presence` keeps a user present
//! for 20 s and a contact for 90 s (`OnlineStatusTracker`), so a longer interval leaves the user
//! offline between updates; and presence sent with a contact's token shows the widget visitor
//! online to agents while nobody is there.

use std::time::Duration;

use crate::source::settings::{Identity, TokenSpec};
use crate::types::{Problems, MAX_DURATION};

/// How long Chatwoot keeps a user (agent or administrator) present after a subscribe or an
/// `update_presence`.
pub(crate) const USER_PRESENCE_LIFETIME: Duration = Duration::from_secs(20);

/// How long Chatwoot keeps a contact (widget visitor) present after an `update_presence`.
pub(crate) const CONTACT_PRESENCE_LIFETIME: Duration = Duration::from_secs(90);

/// Refuses `presence: true` on a contact token, and a `chatwoot.presence_interval` that is not
/// under the presence lifetime of the tokens' kind: a user's when any token is an agent's
/// (the interval is shared by every token), a contact's otherwise.
pub(super) fn check_presence(
    interval: Duration,
    tokens: &[TokenSpec],
    problems: &mut Problems<'_>,
) {
    for (i, token) in tokens.iter().enumerate() {
        if token.presence && token.identity == Identity::Contact {
            problems.add(
                &format!("tokens[{i}].presence"),
                "a contact token must not send presence: Chatwoot would show the widget visitor \
                 online to agents while nobody is there; presence is for agent tokens \
                 (account_id and user_id)",
            );
        }
    }
    // Zero and out-of-range values are reported by the duration check already.
    if interval.is_zero() || interval > MAX_DURATION {
        return;
    }
    let agent = tokens.iter().find(|t| t.identity != Identity::Contact);
    let (lifetime, whose) = match agent {
        Some(agent) => (
            USER_PRESENCE_LIFETIME,
            format!("agents (token `{}` is one): the agent", agent.name),
        ),
        None => (
            CONTACT_PRESENCE_LIFETIME,
            "contacts: the contact".to_owned(),
        ),
    };
    if interval >= lifetime {
        let lifetime = lifetime.as_secs();
        problems.add(
            "chatwoot.presence_interval",
            format!(
                "{} is not under Chatwoot's presence lifetime of {lifetime} s for {whose} would \
                 look offline between updates; give less than {lifetime}s",
                humantime::format_duration(interval),
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    /// An agent token and a contact token; `{chatwoot}` and `{visitor}` are filled in.
    const TEMPLATE: &str = r#"
chatwoot:
  url: ws://127.0.0.1:3000/cable
{chatwoot}
tokens:
{agent}
  - name: widget-visitor
    pubsub_token: contact-token
{visitor}
sinks:
  archive: { type: file, path: ./events.jsonl }
routes:
  - { name: everything, match: {}, to: [archive] }
"#;

    const AGENT: &str = "  - { name: support-agent, pubsub_token: agent-token, account_id: 1, user_id: 3, presence: true }";

    fn config(chatwoot: &str, agent: &str, visitor: &str) -> String {
        TEMPLATE
            .replace("{chatwoot}", chatwoot)
            .replace("{agent}", agent)
            .replace("{visitor}", visitor)
    }

    /// Every problem found in `text`, one per line; empty when it loads.
    fn problems(text: &str) -> Vec<String> {
        match Config::from_yaml(text, &|_| None, false) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(found)) => found.iter().map(ToString::to_string).collect(),
            Err(other) => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn an_agents_presence_interval_must_stay_under_twenty_seconds() {
        assert_eq!(
            problems(&config("  presence_interval: 30s", AGENT, "")),
            ["chatwoot.presence_interval: 30s is not under Chatwoot's presence lifetime of 20 s \
              for agents (token `support-agent` is one): the agent would look offline between \
              updates; give less than 20s"]
        );
        // The lifetime itself is not under it: the agent would flicker offline at each update.
        assert_eq!(
            problems(&config("  presence_interval: 20s", AGENT, "")).len(),
            1
        );
        assert!(problems(&config("  presence_interval: 19s", AGENT, "")).is_empty());
        // The default (15 s) is under it.
        assert!(problems(&config("", AGENT, "")).is_empty());
    }

    #[test]
    fn the_agent_bound_applies_even_when_the_agent_sends_no_presence() {
        // The interval is shared: turning presence on later must not make it wrong.
        let quiet_agent = AGENT.replace("presence: true", "presence: false");
        assert_eq!(
            problems(&config("  presence_interval: 1m", &quiet_agent, "")),
            [
                "chatwoot.presence_interval: 1m is not under Chatwoot's presence lifetime of 20 s \
              for agents (token `support-agent` is one): the agent would look offline between \
              updates; give less than 20s"
            ]
        );
    }

    #[test]
    fn contacts_alone_are_held_to_the_contact_lifetime() {
        assert!(problems(&config("  presence_interval: 60s", "", "")).is_empty());
        assert_eq!(
            problems(&config("  presence_interval: 90s", "", "")),
            [
                "chatwoot.presence_interval: 1m 30s is not under Chatwoot's presence lifetime of \
              90 s for contacts: the contact would look offline between updates; give less than \
              90s"
            ]
        );
    }

    #[test]
    fn presence_on_a_contact_token_is_refused() {
        assert_eq!(
            problems(&config("", AGENT, "    presence: true")),
            [
                "tokens[1].presence: a contact token must not send presence: Chatwoot would show \
              the widget visitor online to agents while nobody is there; presence is for agent \
              tokens (account_id and user_id)"
            ]
        );
    }

    #[test]
    fn an_interval_out_of_range_is_reported_once() {
        assert_eq!(
            problems(&config("  presence_interval: 0s", AGENT, "")),
            ["chatwoot.presence_interval: must be greater than zero"]
        );
    }
}
