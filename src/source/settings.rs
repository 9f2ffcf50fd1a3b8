//! What a token's socket needs to know: the cable's timing and limits, and each token's identity.

use std::sync::Arc;
use std::time::Duration;

use crate::tls::ClientTls;
use crate::types::Secret;

/// Timing and limits of the cable client, the same for every token.
#[derive(Debug, Clone, PartialEq)]
pub struct CableSettings {
    /// Bound on TCP connect plus the WebSocket handshake, and then on the wait for `welcome`:
    /// a socket that pings but never greets can never subscribe.
    pub connect_timeout: Duration,
    /// How long a subscription may stay unconfirmed before the token counts as unconfirmed:
    /// Chatwoot answers a bad token with silence, not with a reject.
    pub confirm_timeout: Duration,
    /// Silence after which the socket is considered dead (the server pings every 3 s).
    pub stale_after: Duration,
    /// How often `update_presence` is sent for tokens that ask for it.
    pub presence_interval: Duration,
    /// Largest frame accepted; a larger one ends the connection instead of exhausting memory.
    pub max_frame_bytes: usize,
    /// Deepest nesting of objects and arrays accepted in an event's `data`; a deeper event is
    /// counted as malformed and dropped before the spool, since walking it could exhaust a
    /// stack.
    pub max_nesting: usize,
    /// Reconnect backoff.
    pub reconnect: ReconnectSettings,
}

impl Default for CableSettings {
    fn default() -> Self {
        CableSettings {
            connect_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(10),
            stale_after: Duration::from_secs(6),
            // Chatwoot keeps an agent present for about 20 s after each `update_presence`.
            presence_interval: Duration::from_secs(15),
            max_frame_bytes: 8 * 1024 * 1024,
            max_nesting: 128,
            reconnect: ReconnectSettings::default(),
        }
    }
}

/// Exponential backoff with full jitter between reconnects and resubscribes.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectSettings {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Largest ceiling the delays grow to.
    pub max: Duration,
    /// A connection must stay subscribed this long before the backoff starts over, so a flapping
    /// server does not get every token back at the initial delay at once.
    pub reset_after: Duration,
    /// Delay after a `disconnect` frame that says `reconnect: false`.
    pub after_disconnect_without_reconnect: Duration,
}

impl Default for ReconnectSettings {
    fn default() -> Self {
        ReconnectSettings {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
            after_disconnect_without_reconnect: Duration::from_secs(300),
        }
    }
}

/// Who a pubsub token belongs to; it decides the subscription identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An agent or administrator token: events of the inboxes and account it can see.
    Agent {
        /// The Chatwoot account whose events it receives.
        account_id: u64,
        /// The agent's user id; Chatwoot ignores the subscription in silence if it is wrong.
        user_id: u64,
    },
    /// A contact (widget visitor) token: events of that contact's conversations.
    Contact,
}

/// One socket to keep open. Compared as a whole on reload: a changed spec restarts its socket.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSpec {
    /// Unique label used in routes, logs and metrics; never the secret.
    pub name: Arc<str>,
    /// The cable endpoint (`ws://` or `wss://`).
    pub url: String,
    /// Sent as the `Origin` header; some installs and proxies check it.
    pub origin: String,
    /// Extra handshake headers; values may be credentials for a proxy.
    pub headers: Vec<(String, Secret)>,
    /// The bearer token of the subscription; empty for a token given as an API access token
    /// (`api`), which reads it from the profile.
    pub pubsub_token: Secret,
    /// Whose token it is, which decides the subscription identifier; for a token with `api`,
    /// the profile's user and `api.account_id` replace it.
    pub identity: Identity,
    /// Where the pubsub token comes from when the config gives a user's API access token
    /// instead: the profile, read again to follow rotations.
    pub api: Option<ApiToken>,
    /// Where the pubsub token comes from when the config gives a contact by its inbox and
    /// contact identifiers instead: Chatwoot's public contact API, read again like `api`.
    pub contact: Option<ContactToken>,
    /// Whether to send `update_presence`, which shows the agent online.
    pub presence: bool,
    /// The TLS of a `wss://` socket (`chatwoot.tls`); `None` for `ws://`.
    pub tls: Option<ClientTls>,
}

/// A token given as a user's API access token: the pubsub token and the user id come from
/// `GET {api_url}/api/v1/profile`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiToken {
    /// The user's access token, sent in the `api_access_token` header.
    pub access_token: Secret,
    /// Chatwoot's REST base URL (`https://host`), without `/api/v1`.
    pub api_url: String,
    /// The account whose events the subscription receives; checked against the profile.
    pub account_id: u64,
    /// The user id the config expects, if it gives one; a profile of another user is refused.
    pub user_id: Option<u64>,
    /// How often the profile is read again to notice a rotated pubsub token.
    pub refresh_interval: Duration,
    /// The TLS of an `https://` API URL (`chatwoot.tls`); `None` for `http://`.
    pub tls: Option<ClientTls>,
    /// Whether and how the socket's gaps are filled over the REST API (`backfill: true`).
    pub backfill: Option<BackfillSettings>,
    /// How long activity the REST API shows may stay undelivered by the subscribed socket
    /// before it counts as a stall (`stall_after`); `None` checks nothing (`stall_after: off`).
    pub stall_after: Option<Duration>,
}

impl ApiToken {
    /// The profile endpoint.
    pub fn profile_url(&self) -> String {
        format!("{}/api/v1/profile", self.api_url.trim_end_matches('/'))
    }
}

/// A contact (widget visitor) given by its identifiers: the pubsub token comes from
/// `GET {api_url}/public/api/v1/inboxes/{inbox_identifier}/contacts/{contact_identifier}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ContactToken {
    /// The inbox's public identifier (the widget's website token); not a secret, so errors
    /// name it.
    pub inbox_identifier: String,
    /// The contact's identifier in that inbox (its `source_id`): whoever holds it reads the
    /// contact's pubsub token, so it is a secret and never logged, not even inside a URL.
    pub contact_identifier: Secret,
    /// Chatwoot's REST base URL (`https://host`), without `/public/api/v1`.
    pub api_url: String,
    /// How often the contact is read again to notice a changed pubsub token.
    pub refresh_interval: Duration,
    /// The TLS of an `https://` API URL (`chatwoot.tls`); `None` for `http://`.
    pub tls: Option<ClientTls>,
}

impl ContactToken {
    /// The contact endpoint as it may be shown: the contact identifier left out.
    pub fn shown_url(&self) -> String {
        format!(
            "{}/public/api/v1/inboxes/{}/contacts/{{contact_identifier}}",
            self.api_url.trim_end_matches('/'),
            self.inbox_identifier
        )
    }
}

impl TokenSpec {
    /// `source` of the events this token yields: the cable URL and the token name.
    pub fn source(&self) -> String {
        format!("{}#{}", self.url, self.name)
    }
}

/// The longest gap backfilled by default: a longer one is given up, loudly and counted. An
/// hour of an account's traffic is what a backfill can re-read without flooding the REST API.
pub const DEFAULT_MAX_GAP: Duration = Duration::from_secs(60 * 60);

/// How long activity may stay undelivered by default before it counts as a stall: long enough
/// for Chatwoot's broadcast queue on a busy install (seconds), short enough to act on.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(2 * 60);

/// How a token backfills (`backfill: true`, `backfill.max_gap`).
#[derive(Debug, Clone, PartialEq)]
pub struct BackfillSettings {
    /// The longest gap read; a longer one is given up with a loud log and a counter.
    pub max_gap: Duration,
    /// Where the token keeps its resume file (`backfill/` in the spool directory), so that a
    /// gap across a restart is backfilled too; `None` keeps nothing.
    pub resume_dir: Option<std::path::PathBuf>,
}
